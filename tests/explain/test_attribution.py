"""Guided backprop, guided Grad-CAM, occlusion, CAM, LIME and integrated gradients on tiny
networks whose answers are known by hand, on a nested MobileNetV2 and in mixed_bfloat16."""

import json
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import warm
from research import detector
from research.explain import attribution, cams, core, loading, methods, render
from research.models import build_model
from test_explain import fake_run, images

NEW = ("guided_backprop", "guided_gradcam", "occlusion", "cam", "lime", "integrated_gradients")
CHEAP = {"occlusion": {"patch": 0.25, "stride": 0.25}, "lime": {"samples": 24, "segments": 8},
         "integrated_gradients": {"steps": 4}}


def two_layer(activation):
    """x (1x1x3) -> Dense(3) -> activation -> Dense(1): z = W1 x + b1, score = w2 . f(z)."""
    x = keras.Input((1, 1, 3))
    z = keras.layers.Dense(3, name="hidden")(x)
    a = activation(z)
    out = keras.layers.Dense(1, name="out")(keras.layers.Flatten()(a))
    model = keras.Model(x, out)
    w1 = np.array([[1.0, 1.0, -1.0], [0.5, -2.0, 1.0], [0.0, 1.0, 2.0]], np.float32)
    model.get_layer("hidden").set_weights([w1, np.array([0.1, 0.2, -0.3], np.float32)])
    # At x = (1, 1, 0.5), z = (1.6, -0.3, 0.7): unit 0 passes (z > 0, w2 > 0), unit 1 is
    # blocked by its input (z < 0), unit 2 by its gradient (w2 < 0).
    model.get_layer("out").set_weights([np.array([[2.0], [3.0], [-1.5]], np.float32),
                                        np.zeros(1, np.float32)])
    return model, w1


@pytest.mark.parametrize("activation", [
    lambda z: keras.layers.ReLU()(z), lambda z: keras.layers.Activation("gelu")(z),
    lambda z: keras.layers.Activation("relu")(z)], ids=["ReLU", "gelu", "relu"])
def test_guided_backprop_rule_by_hand(activation):
    model, w1 = two_layer(activation)
    x = np.array([1.0, 1.0, 0.5], np.float32).reshape(1, 1, 1, 3)
    z = x.reshape(3) @ w1 + np.array([0.1, 0.2, -0.3])
    np.testing.assert_allclose(z, [1.6, -0.3, 0.7], rtol=1e-6)
    g = np.array([2.0, 3.0, -1.5])
    expected = w1 @ (g * (z > 0) * (g > 0))  # only unit 0 passes, unscaled (also for GELU)
    ex = core.Explainer(model, output="sigmoid")
    grads, _, _ = ex.input_gradients(tf.constant(x), tf.zeros([1], tf.int32), guided=True)
    np.testing.assert_allclose(grads.numpy().reshape(3), expected, rtol=1e-6)
    plain, _, _ = ex.input_gradients(tf.constant(x), tf.zeros([1], tf.int32))
    assert not np.allclose(plain.numpy().reshape(3), expected)  # the patch did something
    res = attribution.guided_backprop(ex, x, 0)
    assert res.maps.shape == (1, 1, 1) and res.maps[0, 0, 0] == 1.0  # |.| max over channels
    assert all("call" not in layer.__dict__ for layer in model.layers)  # restored
    assert getattr(model.layers[2], "activation", None) in (None, keras.activations.gelu,
                                                            keras.activations.relu)


def test_guided_rule_blocks_a_saturated_relu6():
    x = tf.constant([-1.0, 2.0, 7.0, 3.0])
    f = core.guided_backward(keras.layers.ReLU(max_value=6.0).call)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = f(x)
    g = tape.gradient(y, x, output_gradients=tf.constant([1.0, 1.0, 1.0, -1.0]))
    np.testing.assert_array_equal(g.numpy(), [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(y.numpy(), [0.0, 2.0, 6.0, 3.0])  # forward unchanged


def conv_model(seed=0, activation="relu", size=8, classes=3):
    keras.utils.set_random_seed(seed)
    x = keras.Input((size, size, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", activation=activation, name="conv")(x)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(a)
    return keras.Model(x, keras.layers.Dense(classes, name="head")(y))


def test_occlusion_is_the_score_drop_per_patch():
    model = conv_model(1)
    ex = core.Explainer(model, detector.preprocess_fn("unit"))
    x = images(2, 8, 8, 3, seed=1)
    assert attribution.patch_starts(7, 3, 3) == [0, 3, 4] and attribution.patch_starts(
        8, 4, 2) == [0, 2, 4]
    res = attribution.occlusion(ex, x, [0, 2], patch=0.5, stride=0.25)  # 4 px by 2 px
    assert res.params["patch_px"] == 4 and res.params["forward_passes"] == 10
    logit = lambda img: model(img[None] / 255.0).numpy()[0]  # noqa: E731
    for i, c in enumerate([0, 2]):
        clean, total, count = logit(x[i])[c], np.zeros((8, 8)), np.zeros((8, 8))
        for top in (0, 2, 4):
            for left in (0, 2, 4):
                img = x[i].copy()
                img[top:top + 4, left:left + 4] = x[i].mean((0, 1))
                total[top:top + 4, left:left + 4] += clean - logit(img)[c]
                count[top:top + 4, left:left + 4] += 1
        want = np.maximum(total / count, 0)
        np.testing.assert_allclose(res.maps[i], want / want.max(), rtol=1e-4, atol=1e-5)
    drops, _, _ = attribution.occlusion_drops(ex, tf.constant(x), tf.constant([0, 2]),
                                              attribution.occlusion_masks(8, 8, 4, 2), 4)
    assert drops.shape == (2, 9)


def test_cam_equals_grad_cam_up_to_scale_and_names_a_wrong_head():
    model = conv_model(2)
    ex = core.Explainer(model)
    x = images(3, 8, 8, 3, seed=2)
    cam = attribution.cam(ex, x, [0, 1, 2])
    grad = cams.grad_cam(ex, x, [0, 1, 2], layer="conv")
    np.testing.assert_allclose(cam.low_res, grad.low_res, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cam.maps, grad.maps, rtol=1e-5, atol=1e-6)
    assert cam.layer == "gap (its input)" and cam.maps.max() == pytest.approx(1.0)
    scratch = build_model("scratch", (32, 32, 3), 10, widths=(8, 16), res_blocks=(1, 0),
                          stem_width=8)
    with pytest.raises(attribution.CamHeadError) as e:
        attribution.cam(core.Explainer(scratch), images(1, 32, 32, 3))
    assert "\n" not in str(e.value) and "Concatenate 'pool'" in str(e.value)
    assert "max and average pooling" in str(e.value)
    fast = build_model("fast", (32, 32, 3), 10, widths=(8, 8, 8))
    with pytest.raises(attribution.CamHeadError, match="max pool over the feature map"):
        attribution.cam_head(fast)


def test_integrated_gradients_completeness():
    model = conv_model(3, activation="tanh")
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(3).normal(0, 3, head.kernel.shape))
    ex = core.Explainer(model, detector.preprocess_fn("unit"))
    x = images(2, 8, 8, 3, seed=3)
    for baseline in attribution.BASELINES:
        res = attribution.integrated_gradients(ex, x, [1, 2], baseline=baseline, steps=64,
                                               batch_size=50)
        total, gap = res.extras["attribution_sum"], res.extras["score_minus_baseline"]
        assert np.abs(gap).max() > 0.1, gap  # black: 0.85, 1.07; mean: 0.06, -0.11
        np.testing.assert_allclose(total, gap, rtol=0.01)
    with pytest.raises(ValueError, match="--ig_baseline: 'gray'"):
        attribution.integrated_gradients(ex, x, baseline="gray")


def test_lime_recovers_a_planted_linear_model_over_superpixels():
    h = w = 8
    seg = attribution.grid_segments(h, w, 4)                  # four 4x4 quadrants
    assert seg.max() == 3 and np.all(np.bincount(seg.reshape(-1)) == 16)
    planted = np.array([2.0, -1.0, 0.5, 3.0])
    kernel = np.repeat((planted[seg] / 16.0).reshape(-1, 1), 3, axis=1).reshape(-1, 1)
    x = keras.Input((h, w, 3))
    out = keras.layers.Dense(1, use_bias=False)(keras.layers.Flatten()(x))
    model = keras.Model(x, out)
    model.layers[-1].set_weights([kernel.astype(np.float32)])  # score = sum_s w_s mean_s
    ex = core.Explainer(model, output="sigmoid")
    img = images(1, h, w, 3, seed=4)
    res = attribution.lime(ex, img, 0, samples=64, segments=4, segmentation="grid",
                           ridge=1e-6)
    region = np.stack([img[0][seg == s].sum(-1).mean() for s in range(4)])
    want = planted * (region - img[0].mean((0, 1)).sum())     # hidden -> the mean colour
    got = res.extras["superpixel_weights"][0, :4]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    default = attribution.lime(ex, img, 0, samples=64, segments=4, segmentation="grid")
    assert np.corrcoef(default.extras["superpixel_weights"][0, :4], want)[0, 1] > 0.99
    top = render.top_superpixels(img[0], seg, got, 1)
    best = int(np.argmax(got))
    assert np.all(top[seg != best] == 128) and np.array_equal(top[seg == best],
                                                              img[0].astype(np.uint8)[seg == best])


def test_slic_segments_follow_colour():
    img = np.zeros((16, 16, 3), np.float32)
    img[:, :6] = [220, 30, 30]
    img[:, 6:] = [30, 30, 220]
    seg = attribution.slic_segments(img, 4)
    for s in np.unique(seg):
        assert len(np.unique(img[seg == s][:, 2])) == 1  # no segment crosses the edge


def mobilenet_transfer():
    """MobileNetV2 (weights=None) nested as a sub-model, as research.models.backbones does."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(weights=None, include_top=False,
                                          input_shape=(32, 32, 3))
    x = keras.Input((32, 32, 3))
    y = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(base(y))
    return keras.Model(x, keras.layers.Dense(2, name="logits")(y), name="transfer")


@pytest.mark.slow
def test_every_new_method_on_a_nested_backbone_and_in_bfloat16():
    model = mobilenet_transfer()
    x = images(2, 32, 32, 3, seed=5)
    for policy in ("float32", "mixed_bfloat16"):
        m = model if policy == "float32" else loading.with_policy(model, policy)
        ex = core.Explainer(m)
        for method in NEW:
            res = methods.explain(ex, method, x, 1, **CHEAP.get(method, {}))
            assert res.maps.shape == (2, 32, 32) and res.maps.dtype == np.float32, method
            assert np.all(np.isfinite(res.maps)) and res.maps.max() == pytest.approx(1.0), (
                policy, method)
        sal = methods.explain(ex, "saliency", x, 1)
        guided = methods.explain(ex, "guided_backprop", x, 1)
        assert np.abs(sal.maps - guided.maps).max() > 0.05  # the nested ReLU6s were guided
    assert methods.explain(core.Explainer(model), "guided_gradcam", x, 1).layer.startswith(
        "mobilenetv2")


@pytest.mark.slow
def test_explain_all_methods_on_a_run(tmp_path):
    run = fake_run(tmp_path / "ck")
    photos = []
    for k in range(2):
        photos.append(tmp_path / f"p{k}.png")
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (32, 32, 3), np.uint8)
                        ).save(photos[-1])
    out = tmp_path / "out"
    base = [sys.executable, "-m", "research.apps.explain", f"--run_name={run}",
            f"--checkpoint_dir={tmp_path / 'ck'}", "--precision=float32"]
    res = warm.run(base + [f"--images={photos[0]},{photos[1]}", "--method=all",
                           "--ig_steps=4", "--lime_samples=16", "--lime_segments=4",
                           "--occlusion_stride=0.25", "--smoothgrad_samples=2",
                           "--scorecam_channels=4", "--rise_masks=16",
                           f"--out_dir={out}"], timeout=600)
    assert res.returncode == 0, res.stderr
    assert "cam skipped" in res.stdout and "Concatenate" in res.stdout
    assert (out / "all_methods.png").exists()
    for method in set(methods.NAMES) - {"cam"}:
        assert (out / method / "map_p0.png").exists(), method
    side = json.loads((out / "integrated_gradients" / "heatmap_p1.png.json").read_text())
    assert len(side["top_classes"]) == 3 and "attribution_sum" in side
    assert (out / "lime" / "lime_top3_p0.png").exists()
    res = warm.run(base + [f"--images={photos[0]}", "--method=cam",
                           f"--out_dir={out}"], timeout=600)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(lines) == 1 and "Concatenate 'pool'" in lines[0]
    res = warm.run(base + ["--visualize=filters", "--num_filters=2", "--filter_steps=2",
                           f"--out_dir={tmp_path / 'filters'}"], timeout=600)
    assert res.returncode == 0, res.stderr
    assert list((tmp_path / "filters").glob("filters_*.png"))


def test_rise_is_the_papers_weighted_mask_sum_and_finds_the_evidence():
    """Eq. 6: S = sum_i P(class | x * M_i) M_i / (N p), with the same seeded masks; a model
    that reads only the top-left quadrant gets its map there."""
    from test_faithfulness import linear_model
    ex, _ = linear_model()
    x = np.random.default_rng(2).uniform(50, 255, (2, 8, 8, 3)).astype(np.float32)
    res = attribution.rise(ex, x, 0, masks=96, grid=4, keep=0.5, seed=3, batch_size=40)
    m = attribution.rise_masks(96, 8, 8, 4, 0.5, np.random.default_rng(3))
    for i in range(2):
        p = ex.probabilities(np.asarray(ex.logits(x[i][None] * m[..., None])))[:, 0]
        want = np.einsum("m,mhw->hw", p, m) / (96 * 0.5)
        want = (want - want.min()) / (want - want.min()).max()
        np.testing.assert_allclose(res.maps[i], want, atol=1e-5)
        assert res.maps[i, :4, :4].mean() > res.maps[i, 4:, 4:].mean() + 0.2
    assert res.params["forward_passes"] == 96 and m.min() >= 0 and m.max() <= 1
