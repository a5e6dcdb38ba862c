"""Attribution methods beyond the gradient CAMs of `core`: guided backpropagation and guided
Grad-CAM, occlusion, the original CAM, LIME and integrated gradients.

Like `core`'s methods they take raw images (float, 0..255, HxWx3) and an `Explainer`, score
the pre-activation output of the explained class, and return an `Explanation` whose maps are
in [0, 1] at the model's input size. Masked and interpolated images run in batches of
`batch_size` forward passes, which bounds the memory.
"""

from __future__ import annotations

import math

import cv2
import keras
import numpy as np
import tensorflow as tf

from research.errors import UserError
from research.explain.cams import grad_cam
from research.explain.core import (Explainer, Explanation, capture, class_scores, finish,
                                   iter_layers, normalize_maps, prepare, upsample)

BASELINES = ("black", "mean", "uniform")
FILLS = ("mean", "black")  # what occlusion hides a patch with
SEGMENTATIONS = ("slic", "grid")


class CamHeadError(UserError):
    """A model without the head the original CAM needs; the message says what it has."""


# ---------------------------------------------------------------------------------------------
# Guided backpropagation and guided Grad-CAM.

def _guided_gradients(ex: Explainer, images, class_index):
    raw, classes = prepare(ex, images, class_index)
    grads, logits, classes = ex.input_gradients(raw, classes, guided=True)
    return tf.reduce_max(tf.abs(grads), axis=-1), logits, classes.numpy()


def guided_backprop(ex: Explainer, images, class_index=None) -> Explanation:
    """Guided backpropagation (Springenberg et al. 2015): dS/dx with every rectifier's
    backward pass replaced by core.guided_backward's rule (positive gradients through
    positive inputs); the map is |.| max over colour channels."""
    g, logits, classes = _guided_gradients(ex, images, class_index)
    return finish(ex, normalize_maps(g), classes, logits, "guided_backprop", None,
                  {"rule": "g * (x > 0) * (g > 0) * (f'(x) > 0)"})


def guided_grad_cam(ex: Explainer, images, class_index=None, layer: str | None = None
                    ) -> Explanation:
    """Guided Grad-CAM (Selvaraju et al. 2017): the guided-backprop map times the Grad-CAM map
    upsampled to the input, for the same class."""
    g, logits, classes = _guided_gradients(ex, images, class_index)
    cam = grad_cam(ex, images, classes, layer=layer)
    maps = normalize_maps(g * cam.maps)
    return finish(ex, maps, classes, logits, "guided_gradcam", cam.layer,
                  {"rule": "guided_backprop x gradcam"}, cam.low_res)


# ---------------------------------------------------------------------------------------------
# Occlusion.

def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Offsets of the patches along one side: every `stride`, plus one flush with the far edge
    so that every pixel is covered."""
    patch = min(patch, size)
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion_masks(h: int, w: int, patch: int, stride: int) -> np.ndarray:
    """(P, H, W) float32: 1 inside each patch (row-major over the patch offsets)."""
    masks = []
    for top in patch_starts(h, patch, stride):
        for left in patch_starts(w, patch, stride):
            m = np.zeros((h, w), np.float32)
            m[top:top + patch, left:left + patch] = 1.0
            masks.append(m)
    return np.stack(masks)


def mean_colour(raw: tf.Tensor) -> tf.Tensor:
    """(N, 1, 1, C): each image's mean colour, what occlusion and LIME hide pixels with."""
    return tf.reduce_mean(raw, axis=[1, 2], keepdims=True)


def occlusion_drops(ex: Explainer, raw: tf.Tensor, classes: tf.Tensor, masks: np.ndarray,
                    batch_size: int = 64, fill: str = "mean"):
    """(drops (N, P): score of the image minus score with patch p filled with the image's mean
    colour (or black), logits of the images, resolved classes)."""
    if fill not in FILLS:
        raise UserError(f"--occlusion_fill: {fill!r} is not one of {', '.join(FILLS)}")
    logits = ex.logits(raw)
    classes, clean = class_scores(logits, classes)
    n, p = raw.shape[0], len(masks)
    owner, which = np.repeat(np.arange(n), p), np.tile(np.arange(p), n)
    fill = mean_colour(raw) if fill == "mean" else tf.zeros_like(mean_colour(raw))
    masks = tf.constant(masks)[..., None]
    scores = []
    for s in range(0, n * p, batch_size):
        o, m = owner[s:s + batch_size], tf.gather(masks, which[s:s + batch_size])
        occluded = tf.gather(raw, o) * (1.0 - m) + tf.gather(fill, o) * m
        scores.append(ex.scores(occluded, tf.gather(classes, o)))
    drops = clean[:, None] - tf.reshape(tf.concat(scores, 0), [n, p])
    return drops.numpy(), logits, classes.numpy()


def occlusion(ex: Explainer, images, class_index=None, patch: float = 0.25,
              stride: float = 0.125, fill: str = "mean", batch_size: int = 64
              ) -> Explanation:
    """Occlusion (Zeiler & Fergus 2014): a square of side `patch` (fraction of the input's
    shorter side) slides by `stride` (same unit), filled with the image's mean colour (`fill`
    'mean') or black; a pixel's value is the score drop averaged over the patches covering
    it (positive part)."""
    raw, classes = prepare(ex, images, class_index)
    h, w = raw.shape[1:3]
    side = min(h, w)
    patch_px, stride_px = max(1, round(patch * side)), max(1, round(stride * side))
    masks = occlusion_masks(h, w, patch_px, stride_px)
    drops, logits, classes = occlusion_drops(ex, raw, classes, masks, batch_size, fill)
    covered = np.einsum("np,phw->nhw", drops, masks) / masks.sum(0)
    maps = normalize_maps(tf.nn.relu(tf.constant(covered, tf.float32)))
    return finish(ex, maps, classes, logits, "occlusion", None,
                  {"patch": patch, "stride": stride, "patch_px": patch_px,
                   "stride_px": stride_px, "fill": fill,
                   "forward_passes": len(masks) + 1})


# ---------------------------------------------------------------------------------------------
# CAM (Zhou et al. 2016): needs scores = Dense(GlobalAveragePooling2D(feature map)).

def _producer(tensor):
    history = tensor._keras_history
    return history.operation, history.operation._inbound_nodes[history.node_index]


def _why_not_gap(op) -> str:
    if isinstance(op, keras.layers.Concatenate):
        return (f"it reads Concatenate {op.name!r} (max and average pooling side by side, "
                "as our scratch CNN's head), not one average")
    if isinstance(op, (keras.layers.MaxPooling2D, keras.layers.GlobalMaxPooling2D)):
        return (f"it reads {type(op).__name__} {op.name!r} (a max pool over the feature map, as "
                "our fast CNN's head), not an average")
    if isinstance(op, keras.layers.Dense):
        return f"it reads another Dense layer, {op.name!r} (a hidden layer in the head)"
    return f"it reads {type(op).__name__} {op.name!r}"


def cam_head(model: keras.Model) -> tuple[keras.layers.Layer, keras.layers.Dense]:
    """(the GlobalAveragePooling2D layer, the Dense layer on it) of a model whose scores are
    one Dense layer on a global average pool (Dropout, Flatten, a positive Rescaling and a
    final softmax/sigmoid in between are allowed; nested models are followed). CamHeadError
    naming what the head has instead otherwise."""
    why = "CAM needs scores = one Dense layer on GlobalAveragePooling2D; "
    try:
        tensor = model.outputs[0]
    except (AttributeError, IndexError, TypeError, ValueError):
        raise CamHeadError(why + f"{model.name} is not a functional model") from None
    dense = None
    for _ in range(1000):
        op, node = _producer(tensor)
        passes = (keras.layers.Dropout, keras.layers.Flatten, keras.layers.Activation)
        if isinstance(op, keras.Model):
            tensor = op.outputs[0]
            continue
        if isinstance(op, keras.layers.Rescaling) and not (
                float(np.min(op.scale)) > 0 and float(np.max(np.abs(op.offset))) == 0):
            raise CamHeadError(why + f"Rescaling {op.name!r} is not a positive scale")
        if isinstance(op, keras.layers.Activation) and op.activation.__name__ not in (
                "softmax", "sigmoid", "linear"):
            raise CamHeadError(why + f"Activation {op.name!r} is not the final softmax")
        if isinstance(op, passes + (keras.layers.Rescaling,)) and node.input_tensors:
            tensor = node.input_tensors[0]
            continue
        if dense is None and isinstance(op, keras.layers.Dense):
            dense, tensor = op, node.input_tensors[0]
            continue
        if dense is not None and isinstance(op, keras.layers.GlobalAveragePooling2D):
            return op, dense
        if dense is None:
            raise CamHeadError(why + f"{model.name}'s scores come from {type(op).__name__} "
                               f"{op.name!r}")
        raise CamHeadError(why + f"{model.name}'s Dense {dense.name!r}: " + _why_not_gap(op))
    raise CamHeadError(why + f"{model.name}'s head could not be followed")


def cam(ex: Explainer, images, class_index=None) -> Explanation:
    """The original CAM: cam_c = ReLU(sum_k w_kc A_k) with A the global average pool's input
    and w the Dense kernel on it (Grad-CAM at that layer, up to scale)."""
    gap, dense = cam_head(ex.model)
    path = next(p for p, layer in iter_layers(ex.model) if layer is gap)
    raw, classes = prepare(ex, images, class_index)

    def fn(raw, classes):
        with capture([gap], inputs=True) as store:
            logits = ex.forward(raw)
        classes, _ = class_scores(logits, classes)
        kernel = tf.cast(tf.convert_to_tensor(dense.kernel), tf.float32)   # (K, classes)
        weights = tf.gather(tf.transpose(kernel), classes)                 # (N, K)
        acts = tf.cast(store[id(gap)][-1], tf.float32)
        return tf.einsum("nhwk,nk->nhw", acts, weights), logits, classes

    raw_cam, logits, classes = ex.compiled(("cam", id(gap)), fn)(raw, classes)
    low = normalize_maps(tf.nn.relu(raw_cam))
    maps = normalize_maps(upsample(low, raw.shape[1:3]))
    return finish(ex, maps, classes.numpy(), logits, "cam", f"{path} (its input)",
                  {"dense": dense.name}, low)


# ---------------------------------------------------------------------------------------------
# LIME (Ribeiro et al. 2016) over superpixels.

def grid_segments(h: int, w: int, segments: int) -> np.ndarray:
    """(H, W) int32 labels of a rows x cols grid of about `segments` cells."""
    rows = max(1, round(math.sqrt(segments * h / w)))
    cols = max(1, round(segments / rows))
    ys = np.minimum(np.arange(h) * rows // h, rows - 1)
    xs = np.minimum(np.arange(w) * cols // w, cols - 1)
    return (ys[:, None] * cols + xs[None, :]).astype(np.int32)


def slic_segments(image: np.ndarray, segments: int, compactness: float = 10.0,
                  iterations: int = 10) -> np.ndarray:
    """SLIC-like superpixels: k-means on (CIELAB colour, compactness x position / grid step),
    started from the grid's cell centres (no randomness), over all pixels (no 2S window and
    no connectivity pass, so a segment may be split). Labels renumbered 0..K-1."""
    h, w, c = image.shape
    img = np.clip(np.asarray(image, np.float32), 0, 255) / 255.0
    colour = cv2.cvtColor(img, cv2.COLOR_RGB2LAB) if c == 3 else img * 100.0
    step = math.sqrt(h * w / segments)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    feats = np.concatenate([colour.reshape(h * w, -1), (np.stack([yy, xx], -1).reshape(
        h * w, 2) * (compactness / step))], 1)
    grid = grid_segments(h, w, segments).reshape(-1)
    centres = np.stack([feats[grid == k].mean(0) for k in np.unique(grid)])
    for _ in range(iterations):
        d = ((feats[:, None, :] - centres[None]) ** 2).sum(-1)
        labels = d.argmin(1)
        centres = np.stack([feats[labels == k].mean(0) if np.any(labels == k) else centres[k]
                            for k in range(len(centres))])
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(h, w).astype(np.int32)


def weighted_ridge(x: np.ndarray, y: np.ndarray, weights: np.ndarray, ridge: float
                   ) -> tuple[np.ndarray, float]:
    """(coefficients, intercept) minimising sum_i w_i (y_i - b - x_i.c)^2 + ridge |c|^2
    (sklearn's Ridge with sample_weight, as LIME fits)."""
    w = weights / weights.sum()
    xm, ym = w @ x, float(w @ y)
    xc, yc = x - xm, y - ym
    a = xc.T @ (weights[:, None] * xc) + ridge * np.eye(x.shape[1])
    coef = np.linalg.solve(a, xc.T @ (weights * yc))
    return coef, ym - float(xm @ coef)


def lime_weights(ex: Explainer, image: tf.Tensor, class_id: int, segments: np.ndarray,
                 samples: int, kernel_width: float, ridge: float, seed: int,
                 batch_size: int) -> np.ndarray:
    """Each superpixel's coefficient in LIME's local linear model of the class score: random
    keep/hide masks (the first keeps all), hidden superpixels take the image's mean colour,
    samples weighted by sqrt(exp(-d^2 / width^2)) with d the cosine distance of the mask to
    all-kept."""
    k = int(segments.max()) + 1
    z = np.random.default_rng(seed).integers(0, 2, (samples, k)).astype(np.float32)
    z[0] = 1.0
    fill = mean_colour(image[None])
    seg = tf.constant(segments)
    scores = []
    for s in range(0, samples, batch_size):
        keep = tf.gather(tf.constant(z[s:s + batch_size]), seg, axis=1)[..., None]
        batch = image[None] * keep + fill * (1.0 - keep)
        scores.append(ex.scores(batch, tf.fill([batch.shape[0]], class_id)).numpy())
    kept = z.sum(1)
    cosine = np.divide(kept, np.sqrt(kept * k), out=np.zeros_like(kept), where=kept > 0)
    weights = np.sqrt(np.exp(-((1.0 - cosine) ** 2) / kernel_width ** 2))
    return weighted_ridge(z.astype(np.float64), np.concatenate(scores).astype(np.float64),
                          weights, ridge)[0]


def lime(ex: Explainer, images, class_index=None, samples: int = 256, segments: int = 16,
         segmentation: str = "slic", kernel_width: float = 0.25, ridge: float = 1.0,
         seed: int = 0, batch_size: int = 64) -> Explanation:
    """LIME: superpixels (`segmentation`: 'slic' or 'grid', about `segments`), `samples`
    masked copies per image (seeded with seed + image index), a weighted ridge fit of the
    score on the keep/hide masks; each pixel's value is its superpixel's weight (positive
    part). The extras hold the segments and weights (for the top-k image)."""
    if segmentation not in SEGMENTATIONS:
        raise UserError(f"--lime_segmentation: {segmentation!r} is not one of "
                        f"{', '.join(SEGMENTATIONS)}")
    raw, classes = prepare(ex, images, class_index)
    logits = ex.logits(raw)
    classes = class_scores(logits, classes)[0].numpy()
    h, w = raw.shape[1:3]
    segs, weights, maps = [], [], []
    for i in range(raw.shape[0]):
        seg = (slic_segments(raw[i].numpy(), segments) if segmentation == "slic"
               else grid_segments(h, w, segments))
        coef = lime_weights(ex, raw[i], int(classes[i]), seg, samples, kernel_width, ridge,
                            seed + i, batch_size)
        segs.append(seg)
        weights.append(np.pad(coef, (0, h * w - len(coef))))  # ragged -> (N, H*W)
        maps.append(coef[seg])
    maps = normalize_maps(tf.nn.relu(tf.constant(np.stack(maps), tf.float32)))
    return finish(ex, maps, classes, logits, "lime", None,
                  {"samples": samples, "segments": segments, "segmentation": segmentation,
                   "kernel_width": kernel_width, "ridge": ridge, "seed": seed,
                   "score": "pre-activation", "fill": "image mean colour"},
                  extras={"segments": np.stack(segs), "superpixel_weights": np.stack(weights)})


# ---------------------------------------------------------------------------------------------
# Integrated gradients (Sundararajan et al. 2017).

def baseline_images(raw: tf.Tensor, baseline: str, seed: int = 0) -> tf.Tensor:
    """black: zeros; mean: each image's mean colour; uniform: seeded noise in 0..255."""
    if baseline == "black":
        return tf.zeros_like(raw)
    if baseline == "mean":
        return tf.broadcast_to(mean_colour(raw), raw.shape)
    if baseline == "uniform":
        return tf.random.stateless_uniform(raw.shape, [seed, 0], 0.0, 255.0)
    raise UserError(f"--ig_baseline: {baseline!r} is not one of {', '.join(BASELINES)}")


def ig_attributions(ex: Explainer, raw: tf.Tensor, base: tf.Tensor, classes: tf.Tensor,
                    steps: int, batch_size: int = 64) -> tf.Tensor:
    """(N, H, W, C): (x - x') times the trapezoid rule's mean of dS/dx over the `steps`
    intervals of the straight path x' -> x (steps + 1 gradients per image)."""
    n = raw.shape[0]
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    rule = np.full(steps + 1, 1.0 / steps, np.float32)
    rule[[0, -1]] *= 0.5
    owner, which = np.repeat(np.arange(n), steps + 1), np.tile(np.arange(steps + 1), n)
    total = tf.zeros_like(raw)
    for s in range(0, len(owner), batch_size):
        o, a = owner[s:s + batch_size], alphas[which[s:s + batch_size]][:, None, None, None]
        x0 = tf.gather(base, o)
        grads, _, _ = ex.input_gradients(x0 + a * (tf.gather(raw, o) - x0),
                                         tf.gather(classes, o))
        weighted = grads * rule[which[s:s + batch_size]][:, None, None, None]
        total += tf.math.unsorted_segment_sum(weighted, o, n)
    return (raw - base) * total


def integrated_gradients(ex: Explainer, images, class_index=None, baseline: str = "black",
                         steps: int = 32, seed: int = 0, batch_size: int = 64
                         ) -> Explanation:
    """Integrated gradients from `baseline` (black, mean or uniform) in `steps` trapezoid
    steps; the map is the positive part of the attributions summed over colour channels.
    The extras give sum(attributions) and S(x) - S(baseline) per image (completeness)."""
    raw, classes = prepare(ex, images, class_index)
    base = baseline_images(raw, baseline, seed)
    logits = ex.logits(raw)
    classes = class_scores(logits, classes)[0]
    attr = ig_attributions(ex, raw, base, classes, steps, batch_size)
    gap = ex.scores(raw, classes) - ex.scores(base, classes)
    maps = normalize_maps(tf.nn.relu(tf.reduce_sum(attr, -1)))
    return finish(ex, maps, classes.numpy(), logits, "integrated_gradients", None,
                  {"baseline": baseline, "steps": steps, "seed": seed, "rule": "trapezoid"},
                  extras={"attribution_sum": tf.reduce_sum(attr, [1, 2, 3]),
                          "score_minus_baseline": gap})


# ---------------------------------------------------------------------------------------------
# RISE (Petsiuk et al. 2018): randomised input sampling.

def rise_masks(n: int, h: int, w: int, grid: int, keep: float, rng: np.random.Generator
               ) -> np.ndarray:
    """(n, H, W) float32 smooth masks, as the paper's generate_masks: a grid x grid binary
    grid (1 with probability `keep`) upsampled bilinearly to (grid + 1) cells and cropped at
    a random shift of less than one cell."""
    cell_h, cell_w = math.ceil(h / grid), math.ceil(w / grid)
    up_h, up_w = (grid + 1) * cell_h, (grid + 1) * cell_w
    cells = (rng.uniform(size=(n, grid, grid)) < keep).astype(np.float32)
    out = np.empty((n, h, w), np.float32)
    for i in range(n):
        dy, dx = rng.integers(0, cell_h), rng.integers(0, cell_w)
        up = cv2.resize(cells[i], (up_w, up_h), interpolation=cv2.INTER_LINEAR)
        out[i] = up[dy:dy + h, dx:dx + w]
    return out


def rise(ex: Explainer, images, class_index=None, masks: int = 1024, grid: int = 7,
         keep: float = 0.5, seed: int = 0, batch_size: int = 64) -> Explanation:
    """RISE: `masks` random smooth masks (the same for every image, seeded); a pixel's value
    is the mean over masks of P(class | image x mask) x mask / `keep` (the paper's eq. 6,
    a black-box method: forward passes only, `batch_size` at a time). The map is min-max
    scaled, since every pixel carries the mean probability as an offset."""
    raw, classes = prepare(ex, images, class_index)
    logits = ex.logits(raw)
    classes = class_scores(logits, classes)[0]
    h, w = raw.shape[1:3]
    m = rise_masks(masks, h, w, grid, keep, np.random.default_rng(seed))
    total = np.zeros((raw.shape[0], h, w), np.float64)
    cls = classes.numpy()
    for i in range(raw.shape[0]):
        for s in range(0, masks, batch_size):
            chunk = m[s:s + batch_size]
            batch = raw[i][None] * chunk[..., None]
            probs = ex.probabilities(np.asarray(ex.logits(batch)))[:, cls[i]]
            total[i] += np.einsum("m,mhw->hw", probs, chunk)
    sal = total / (masks * keep)
    sal -= sal.min(axis=(1, 2), keepdims=True)
    maps = normalize_maps(tf.constant(sal, tf.float32))
    return finish(ex, maps, cls, logits, "rise", None,
                  {"masks": masks, "grid": grid, "keep": keep, "seed": seed,
                   "score": "probability", "forward_passes": masks})
