"""How a detector is fed and read, in one place: input scaling, the positive-class score, and
the mirror average used at test time.

Every stage that runs a trained detector (the training loop's eval step, predict, explain,
the TensorBoard Grad-CAM hook, the benchmarks) goes through these functions, so they all see
the same numbers.
"""

from __future__ import annotations

import tensorflow as tf

SCALES = ("unit", "raw", "uint8")


def scale_images(images, scale: str):
    """uint8 (or float 0..255) pixels to model inputs: 'unit' float32 in [0, 1], 'raw' float32
    in [0, 255] (for a backbone's own preprocess_input), or 'uint8' unchanged."""
    if scale == "unit":
        return tf.cast(images, tf.float32) / 255.0
    if scale == "raw":
        return tf.cast(images, tf.float32)
    if scale == "uint8":
        return images
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def preprocess_fn(scale: str):
    """The scaling as a one-argument function (for an Explainer)."""
    return lambda images: scale_images(images, scale)


def positive_scores(logits, objective: str, positive_id: int) -> tf.Tensor:
    """The detector's probability of the positive class, from its float logits."""
    logits = tf.cast(logits, tf.float32)
    if objective == "binary":
        return tf.sigmoid(logits[:, 0])
    return tf.nn.softmax(logits, axis=-1)[:, positive_id]


def mirror(images) -> tf.Tensor:
    """Left-right flip of NHWC images."""
    return tf.reverse(images, axis=[2])


def shifted(images, dy: int, dx: int) -> tf.Tensor:
    """NHWC images moved by (dy, dx) pixels (|d| <= 1), reflect-padded at the edges."""
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    return padded[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


def tta_views(tta: bool, shifts: bool = False) -> list[tuple[int, int, bool, float]]:
    """The test-time views as (dy, dx, mirrored, weight), weights summing to 1: the image;
    with `tta` its mirror too; with `shifts` also both shifted one pixel down-right and
    up-left (with their mirrors), at half the weight in all (the fast recipes' TTA)."""
    flips = (False, True) if tta else (False,)
    offsets = [(0, 0, 1.0)]
    if tta and shifts:
        offsets = [(0, 0, 0.5), (1, 1, 0.25), (-1, -1, 0.25)]
    return [(dy, dx, f, w / len(flips)) for dy, dx, w in offsets for f in flips]


def detector_scores(model, images, objective: str, positive_id: int, tta: bool,
                    shifts: bool = False):
    """(positive-class scores, logits), each the weighted mean over `tta_views`: with `tta`
    the image and its mirror, with `shifts` also one-pixel shifts of both. The logits are
    what the N-class accuracy reads. `images` are already scaled model inputs."""
    scores = logits = 0.0
    for dy, dx, flip, weight in tta_views(tta, shifts):
        view = shifted(images, dy, dx) if dy or dx else images
        out = tf.cast(model(mirror(view) if flip else view, training=False), tf.float32)
        scores += weight * positive_scores(out, objective, positive_id)
        logits += weight * out
    return scores, logits
