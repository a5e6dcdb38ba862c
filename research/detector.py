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


def detector_scores(model, images, objective: str, positive_id: int, tta: bool):
    """(positive-class scores, logits); with `tta` the score is the mean of the image's and
    its mirror's scores, and the logits (which the N-class accuracy reads) are the mean of
    theirs. `images` are already scaled model inputs."""
    logits = model(images, training=False)
    scores = positive_scores(logits, objective, positive_id)
    if tta:
        flipped_logits = model(mirror(images), training=False)
        flipped = positive_scores(flipped_logits, objective, positive_id)
        scores = 0.5 * (scores + flipped)
        logits = 0.5 * (tf.cast(logits, tf.float32) + tf.cast(flipped_logits, tf.float32))
    return scores, logits
