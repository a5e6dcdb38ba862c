"""The CAM family on one skeleton (research.explain.cams): each variant's weights against a
NumPy transcription of its paper's formula on one fixed (activations, gradients) pair, the
forward-pass variants against closed forms on a linear head, and every variant on a nested
backbone in float32 and mixed_bfloat16."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.explain import cams, core, loading, methods
from test_attribution import mobilenet_transfer
from test_explain import images, tiny_cam_model

EPS = 1e-7


def fixed_pair():
    """One (activations, gradients) pair, NHWC, as a layer would give them: N=2, 5x4, K=6."""
    rng = np.random.default_rng(38)
    acts = np.maximum(rng.normal(0.3, 1.0, (2, 5, 4, 6)), 0).astype(np.float32)
    grads = rng.normal(0.0, 0.5, (2, 5, 4, 6)).astype(np.float32)
    return acts, grads


def nchw(x):
    return np.transpose(x, (0, 3, 1, 2)).astype(np.float64)


# NumPy transcriptions, written in the papers' (and pytorch-grad-cam's) N, K, H, W layout.
def np_gradcam(a, g):
    return g.mean(axis=(2, 3))                                  # Selvaraju eq. 1


def np_gradcam_pp(a, g):
    # Chattopadhyay eq. 19 with exp(S): alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)
    sum_a = a.sum(axis=(2, 3))[:, :, None, None]
    alpha = g ** 2 / (2 * g ** 2 + sum_a * g ** 3 + EPS)
    alpha = np.where(g != 0, alpha, 0)
    return (np.maximum(g, 0) * alpha).sum(axis=(2, 3))


def np_xgradcam(a, g):
    # Fu et al. eq. 8: w_k = sum_ij (A_ij / sum A) dS/dA_ij
    return (g * a / (a.sum(axis=(2, 3))[:, :, None, None] + EPS)).sum(axis=(2, 3))


def np_fem(a, g):
    # Fuad et al. 2020, the k-sigma rule: w_k = mean_ij [A_ij^k > mu_k + 2 sigma_k]
    # (sigma the population std, as pytorch-grad-cam's FEM); the gradients play no part
    mu, sigma = a.mean(axis=(2, 3)), a.std(axis=(2, 3))
    return (a > (mu + 2 * sigma)[:, :, None, None]).mean(axis=(2, 3))


def np_cam_of_channel_weights(a, w):
    return np.maximum((w[:, :, None, None] * a).sum(1), 0)


def np_first_component(f):
    """pytorch-grad-cam's get_2d_projection: per image, centre (hw, K), SVD, project on V[0]."""
    out = []
    for x in f:
        flat = x.reshape(x.shape[0], -1).T
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=True)
        out.append((flat @ vt[0]).reshape(x.shape[1:]))
    return np.stack(out)


@pytest.mark.parametrize("name, ref", [("gradcam", np_gradcam), ("gradcam_pp", np_gradcam_pp),
                                       ("xgradcam", np_xgradcam), ("fem", np_fem)])
def test_channel_weights_match_the_papers(name, ref):
    acts, grads = fixed_pair()
    got = methods.find(name).cam.weights(tf.constant(acts), tf.constant(grads)).numpy()
    want = ref(nchw(acts), nchw(grads))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    cam = cams.combine(tf.constant(got), tf.constant(acts)).numpy()
    np.testing.assert_allclose(cam, np_cam_of_channel_weights(nchw(acts), want), rtol=1e-4,
                               atol=1e-5)


def test_pixel_weight_variants_match_the_papers():
    acts, grads = fixed_pair()
    a, g = nchw(acts), nchw(grads)
    for name, want in (("hirescam", np.maximum((g * a).sum(1), 0)),           # Draelos eq. 4
                       ("layercam", np.maximum((np.maximum(g, 0) * a).sum(1), 0))):  # Jiang 5
        v = methods.find(name).cam
        w = v.weights(tf.constant(acts), tf.constant(grads))
        assert w.shape == acts.shape
        cam = cams.combine(w, v.features(tf.constant(acts), tf.constant(grads))).numpy()
        np.testing.assert_allclose(cam, want, rtol=1e-4, atol=1e-5)
    # HiResCAM equals Grad-CAM times h*w exactly when the gradient is constant per channel.
    flat = np.broadcast_to(grads.mean(axis=(1, 2), keepdims=True), grads.shape)
    hires = cams.combine(tf.constant(flat), tf.constant(acts)).numpy()
    grad = cams.combine(cams.gradcam_weights(tf.constant(acts), tf.constant(flat)),
                        tf.constant(acts)).numpy()
    np.testing.assert_allclose(hires, grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, features", [("eigencam", lambda a, g: a),
                                            ("eigengradcam", lambda a, g: a * g)])
def test_eigen_variants_are_the_first_principal_component(name, features):
    acts, grads = fixed_pair()
    v = methods.find(name).cam
    w = v.weights(tf.constant(acts), tf.constant(grads))
    proj = tf.einsum("nhwk,nk->nhw", v.features(tf.constant(acts), tf.constant(grads)), w)
    ref = np_first_component(features(nchw(acts), nchw(grads)))
    for got, want, f in zip(proj.numpy(), ref, features(acts, grads)):
        sign = np.sign((got * want).sum())
        np.testing.assert_allclose(got, sign * want, rtol=1e-3, atol=1e-4)
        assert np.corrcoef(got.ravel(), f.sum(-1).ravel())[0, 1] > 0  # our sign rule


def test_eigen_smoothing_projects_the_weighted_activations():
    acts, grads = fixed_pair()
    w = cams.gradcam_weights(tf.constant(acts), tf.constant(grads))
    got = cams.combine(w, tf.constant(acts), eigen_smooth=True).numpy()
    ref = np_first_component(nchw(acts) * w.numpy()[:, :, None, None])
    for g_, r in zip(got, ref):
        assert np.allclose(g_, np.maximum(r, 0), atol=1e-4) or np.allclose(
            g_, np.maximum(-r, 0), atol=1e-4)


def test_ablation_cam_is_the_relative_score_drop_on_a_linear_head():
    """S = b + sum_k W_k mean(A_k): zeroing channel k drops S by W_k mean(A_k), so the
    weight is W_k mean(A_k) / S (Desai & Ramaswamy eq. 3), in chunks of any size."""
    model = tiny_cam_model(3)
    ex = core.Explainer(model)
    x = images(3, seed=3)
    acts = keras.Model(model.input, model.get_layer("conv").output)(x).numpy()
    kernel, bias = model.get_layer("head").get_weights()
    classes = [0, 1, 1]
    for batch in (1, 4, 64):
        res = methods.explain(ex, "ablationcam", x, classes, layer="conv", batch_size=batch)
        for i, c in enumerate(classes):
            m = acts[i].mean(axis=(0, 1))
            s = bias[c] + m @ kernel[:, c]
            w = kernel[:, c] * m / s
            cam = np.maximum(np.einsum("hwk,k->hw", acts[i], w), 0)
            cam = cam / cam.max() if cam.max() > 0 else cam
            np.testing.assert_allclose(res.low_res[i], cam, rtol=1e-4, atol=1e-5)


def test_fused_layers_are_the_mean_of_normalised_maps_and_aug_smooth_runs():
    model = mobilenet_transfer()
    ex = core.Explainer(model)
    x = images(2, 32, 32, 3, seed=5)
    layers = [core.find_layer(model, n)[0] for n in (
        "block_13_expand_relu", "out_relu")]
    fused = methods.explain(ex, "layercam", x, 1, layer=",".join(layers))
    each = [methods.explain(ex, "layercam", x, 1, layer=n).maps for n in layers]
    mean = (each[0] + each[1]) / 2
    np.testing.assert_allclose(fused.maps, mean / mean.max(axis=(1, 2), keepdims=True),
                               atol=1e-5)
    assert fused.layer == ",".join(layers)
    smooth = methods.explain(ex, "gradcam", x, 1, aug_smooth=True)
    assert smooth.params["aug_smooth"] and smooth.maps.max() == pytest.approx(1.0)


NEW_CAMS = ("hirescam", "xgradcam", "layercam", "eigencam", "eigengradcam", "ablationcam")


@pytest.mark.slow
def test_every_new_cam_on_a_nested_backbone_and_in_bfloat16():
    model = mobilenet_transfer()
    x = images(2, 32, 32, 3, seed=5)
    ref = {}
    for policy in ("float32", "mixed_bfloat16"):
        m = model if policy == "float32" else loading.with_policy(model, policy)
        ex = core.Explainer(m)
        for name in NEW_CAMS:
            smooth = {"eigen_smooth": True} if name == "xgradcam" else {}
            res = methods.explain(ex, name, x, 1, **smooth)
            assert res.maps.shape == (2, 32, 32) and res.maps.dtype == np.float32, name
            assert np.all(np.isfinite(res.maps)) and res.maps.max() == pytest.approx(1.0), (
                policy, name)
            assert res.layer.startswith("mobilenetv2")
            if policy == "float32":
                ref[name] = res.maps
            elif name != "ablationcam":  # bf16 rounding of near-equal scores is noise there
                r = np.corrcoef(res.maps.ravel(), ref[name].ravel())[0, 1]
                assert r > 0.9, (name, r)
