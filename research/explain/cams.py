"""The class-activation-map family on one skeleton, as pytorch-grad-cam's BaseCAM.

Every variant is a function of one layer's activations A (N, h, w, K) and the gradients
G = dS/dA of the explained class's pre-activation score S:

    weights(A, G) -> channel weights (N, K) or pixel weights (N, h, w, K)
    cam = ReLU(sum_k weights_k * features_k)     (features: A, unless the variant says)

then normalised to [0, 1] at the layer's size, upsampled to the input and normalised again.
A variant is one small weights function here and one `Method` record (holding a
`CamVariant`) in research.explain.methods.METHODS; the skeleton does the layers (several
layers: the mean of their normalised maps, as LayerCAM's fusion in pytorch-grad-cam), the
batches, aug-smoothing (flips x brightness, maps averaged
after undoing the flip) and eigen-smoothing (the first principal component of the weighted
activations instead of their sum).

Ablation-CAM and Score-CAM get their weights from extra forward passes: one per chunk of
(image, channel) pairs, `batch_size` at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

from research.explain.core import (Explainer, Explanation, find_layer, finish, normalize_maps,
                                   prepare, upsample)

EPS = 1e-7  # pytorch-grad-cam's eps in XGrad-CAM's and Grad-CAM++'s denominators


# ---------------------------------------------------------------------------------------------
# The weights functions: (acts, grads) -> (N, K) or (N, h, w, K). Grad-free ones ignore grads.

def gradcam_weights(acts, grads):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1): alpha_k = mean over pixels of dS/dA_k."""
    return tf.reduce_mean(grads, axis=[1, 2])


def gradcam_pp_weights(acts, grads):
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with S -> exp(S)): alpha_ij^k =
    g^2 / (2 g^2 + sum_ab A_ab^k g^3), w_k = sum_ij alpha_ij^k ReLU(g_ij^k)."""
    g2, g3 = tf.square(grads), tf.pow(grads, 3)
    sum_a = tf.reduce_sum(acts, axis=[1, 2], keepdims=True)
    denom = 2.0 * g2 + sum_a * g3
    alpha = tf.math.divide_no_nan(g2, tf.where(tf.abs(denom) > 0, denom, tf.ones_like(denom)))
    return tf.reduce_sum(alpha * tf.nn.relu(grads), axis=[1, 2])


def hirescam_weights(acts, grads):
    """HiResCAM (Draelos & Carin 2020): cam = sum_k G_k * A_k, the gradient itself per pixel."""
    return grads


def xgradcam_weights(acts, grads):
    """XGrad-CAM (Fu et al. 2020, eq. 8): w_k = sum_ij (A_ij^k / sum_ab A_ab^k) G_ij^k."""
    sum_a = tf.reduce_sum(acts, axis=[1, 2], keepdims=True)
    return tf.reduce_sum(grads * acts / (sum_a + EPS), axis=[1, 2])


def layercam_weights(acts, grads):
    """LayerCAM (Jiang et al. 2021, eq. 5): per-pixel weights ReLU(G_ij^k)."""
    return tf.nn.relu(grads)


FEM_K = 2.0  # FEM's k-sigma rule: a pixel counts when it is k stds above its channel's mean


def fem_weights(acts, grads):
    """FEM (Fuad et al. 2020): w_k = the fraction of the pixels where A_k exceeds its mean by
    FEM_K standard deviations (the k-sigma rule); gradient-free and class-agnostic."""
    mean = tf.reduce_mean(acts, axis=[1, 2], keepdims=True)
    std = tf.math.reduce_std(acts, axis=[1, 2], keepdims=True)
    return tf.reduce_mean(tf.cast(acts > mean + FEM_K * std, acts.dtype), axis=[1, 2])


def first_component(features):
    """(N, K) the first right singular vector of each image's centred (h*w, K) features,
    signed so that the projection correlates positively with the features' channel sum (the
    SVD's own sign is arbitrary; pytorch-grad-cam keeps it as it comes)."""
    n, h, w, k = features.shape
    flat = tf.reshape(features, [n, h * w, k])
    centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
    _, _, v = tf.linalg.svd(tf.cast(centred, tf.float64))
    v = tf.cast(v[:, :, 0], tf.float32)                                   # (N, K)
    proj = tf.einsum("npk,nk->np", centred, v)
    total = tf.reduce_sum(centred, axis=2)
    sign = tf.where(tf.reduce_sum(proj * total, axis=1) < 0, -1.0, 1.0)
    return v * sign[:, None]


def centred(features):
    return features - tf.reduce_mean(features, axis=[1, 2], keepdims=True)


def eigencam_weights(acts, grads):
    """EigenCAM (Muhammad & Yeasin 2020): the projection of the centred activations on their
    first principal component (weights = that component, features = centred A)."""
    return first_component(acts)


def eigengradcam_weights(acts, grads):
    """EigenGradCAM (pytorch-grad-cam): EigenCAM of G * A."""
    return first_component(grads * acts)


# ---------------------------------------------------------------------------------------------
# Weights from forward passes.

def ablation_scores(ex: Explainer, target, raw, classes, channels, batch_size: int):
    """(N, K) the class score of each image with channel k of `target`'s output zeroed, for
    k in `channels` (all): one forward pass per `batch_size` (image, channel) pairs."""
    n, k = raw.shape[0], channels

    def fn(raw, owner, channel, classes):
        drop = 1.0 - tf.one_hot(channel, k)[:, None, None, :]
        original = target.call

        def ablated(*args, **kwargs):
            out = original(*args, **kwargs)
            return out * tf.cast(drop, out.dtype)

        object.__setattr__(target, "call", ablated)
        try:
            logits = ex.forward(tf.gather(raw, owner))
        finally:
            object.__delattr__(target, "call")
        return tf.gather(logits, tf.gather(classes, owner), axis=1, batch_dims=1)

    owner, channel = tf.repeat(tf.range(n), k), tf.tile(tf.range(k), [n])
    call = ex.compiled(("ablation", id(target)), fn)
    scores = [call(raw, owner[s:s + batch_size], channel[s:s + batch_size], classes)
              for s in range(0, n * k, batch_size)]
    return tf.reshape(tf.concat(scores, 0), [n, k])


def ablation_weights(ex, target, raw, classes, acts, grads, logits, batch_size: int = 64,
                     **_):
    """Ablation-CAM (Desai & Ramaswamy 2020, eq. 3): w_k = (y - y_k) / y with y_k the score
    with channel k zeroed (pytorch-grad-cam divides by y, not |y|: a negative score flips
    every weight)."""
    y = tf.gather(logits, classes, axis=1, batch_dims=1)[:, None]
    ablated = ablation_scores(ex, target, raw, classes, acts.shape[-1], batch_size)
    return (y - ablated) / tf.where(tf.abs(y) > EPS, y, tf.fill(tf.shape(y), EPS))


def score_weights(ex, target, raw, classes, acts, grads, logits, batch_size: int = 64,
                  max_channels: int = 64, **_):
    """Score-CAM (Wang et al. 2020, eqs. 5-7): each channel, upsampled and min-max scaled to
    [0, 1], masks the input; w = softmax over channels of the class scores they yield. Only
    the `max_channels` channels of highest mean activation take part (the others weigh 0)."""
    n, h, w, channels = acts.shape
    k = min(max_channels, channels)
    top = tf.math.top_k(tf.reduce_mean(acts, axis=[1, 2]), k).indices          # (N, k)
    masks = tf.transpose(tf.gather(acts, top, axis=-1, batch_dims=1), [0, 3, 1, 2])
    lo = tf.reduce_min(masks, axis=[2, 3], keepdims=True)
    hi = tf.reduce_max(masks, axis=[2, 3], keepdims=True)
    flat = tf.reshape(tf.math.divide_no_nan(masks - lo, hi - lo), [n * k, h, w])
    owner = tf.repeat(tf.range(n), k)
    scores = tf.concat([ex.masked_scores(raw, flat[s:s + batch_size], owner[s:s + batch_size],
                                         classes) for s in range(0, n * k, batch_size)], 0)
    soft = tf.nn.softmax(tf.reshape(scores, [n, k]), axis=-1)
    rows = tf.repeat(tf.range(n)[:, None], k, axis=1)
    return tf.scatter_nd(tf.stack([rows, top], -1), soft, [n, channels])


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CamVariant:
    """How one CAM weighs the layer: `weights(acts, grads)` for gradient variants, or with
    `forward=True` `weights(ex, target, raw, classes, acts, grads, logits, **params)` for the
    ones that need forward passes; `features` maps (acts, grads) to what the weights multiply.
    Its name, paper and options are its `Method` record's (research.explain.methods)."""
    weights: Callable
    forward: bool = False
    features: Callable = staticmethod(lambda acts, grads: acts)


GRAD_CAM = CamVariant(gradcam_weights)  # also the base of guided Grad-CAM and the TB hook


def combine(weights, features, eigen_smooth: bool = False):
    """The skeleton's sum: ReLU(sum_k weights_k features_k) at the layer's size (N, h, w);
    `eigen_smooth`: the first principal component of weights * features instead."""
    weighted = (features * weights[:, None, None, :] if weights.shape.rank == 2
                else features * weights)
    if eigen_smooth:
        v = first_component(weighted)
        return tf.nn.relu(tf.einsum("nhwk,nk->nhw", centred(weighted), v))
    return tf.nn.relu(tf.reduce_sum(weighted, axis=-1))


def layer_cam(ex: Explainer, variant: CamVariant, path: str, target, raw, classes,
              eigen_smooth: bool = False, **params):
    """(cam at the layer's size (N, h, w), unnormalised; logits; resolved classes)."""
    acts, grads, logits, classes = ex.gradients(target, raw, classes, path)
    if variant.forward:
        w = variant.weights(ex, target, raw, classes, acts, grads, logits, **params)
    else:
        w = variant.weights(acts, grads)
    return combine(w, variant.features(acts, grads), eigen_smooth), logits, classes


def _maps(ex, variant, targets, raw, classes, eigen_smooth, params):
    """(maps at the input size, low-res map of the first layer, logits, classes)."""
    maps, low = [], None
    for path, target in targets:
        cam, logits, classes = layer_cam(ex, variant, path, target, raw, classes,
                                         eigen_smooth, **params)
        cam = normalize_maps(cam)
        low = cam if low is None else low
        maps.append(normalize_maps(upsample(cam, raw.shape[1:3])))
    return tf.add_n(maps) / len(maps), low, logits, classes


AUG_FACTORS = (0.9, 1.0, 1.1)  # pytorch-grad-cam's aug_smooth: flips x these brightnesses


def run_cam(ex: Explainer, variant: CamVariant, method: str, images, class_index=None,
            layer=None, aug_smooth: bool = False, eigen_smooth: bool = False, **params
            ) -> Explanation:
    """`variant` (named `method` in the Explanation) at `layer` (a name, a comma-separated
    list or a list of names: the mean of the layers' normalised maps; default the last
    spatial map)."""
    names = (layer.split(",") if isinstance(layer, str) and "," in layer
             else layer if isinstance(layer, (list, tuple)) else [layer])
    targets = [find_layer(ex.model, n) for n in names]
    raw, classes = prepare(ex, images, class_index)
    maps, low, logits, classes = _maps(ex, variant, targets, raw, classes, eigen_smooth,
                                       params)
    if aug_smooth:  # the explained class is the clean image's
        total = []
        for flip in (False, True):
            for f in AUG_FACTORS:
                x = tf.clip_by_value(raw * f, 0.0, 255.0)
                x = x[:, :, ::-1] if flip else x
                m = _maps(ex, variant, targets, x, classes, eigen_smooth, params)[0]
                total.append(m[:, :, ::-1] if flip else m)
        maps = normalize_maps(tf.add_n(total) / len(total))
        low = None
    shown = dict(params)
    if aug_smooth:
        shown["aug_smooth"] = True
    if eigen_smooth:
        shown["eigen_smooth"] = True
    return finish(ex, normalize_maps(maps), classes.numpy(), logits, method,
                  ",".join(p for p, _ in targets), shown, low)


def grad_cam(ex: Explainer, images, class_index=None, layer=None, **params) -> Explanation:
    """Grad-CAM (Selvaraju et al. 2017) at `layer`, as run_cam."""
    return run_cam(ex, GRAD_CAM, "gradcam", images, class_index, layer, **params)
