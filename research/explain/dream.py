"""DeepDream (Mordvintsev et al. 2015): gradient ascent on an image to amplify what some
layers respond to, over several octaves.

The image is dreamt at `octaves` sizes, smallest first, each `octave_scale` times the last;
at every size it is resized to the model's input size inside the gradient, so models with a
fixed input size (a Dense head) work, and at small octaves each receptive field covers more
of the image (larger patterns). Between octaves the detail lost by shrinking the original is
added back, as in the keras.io example. Each step moves the pixels (0..255) by `step_size` on
average (the gradient is divided by its mean absolute value). A seeded random shift (jitter)
before each step avoids grid artefacts and keeps the result deterministic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from research.explain.core import Explainer, capture, find_layer


@dataclasses.dataclass
class Dream:
    image: np.ndarray          # uint8 HxWx3, the input's size
    layers: list[str]
    start_activation: float    # mean activation of the layers on the input image
    final_activation: float    # ... on the dream


def dream(ex: Explainer, image: np.ndarray, layer_names: list[str], octaves: int = 3,
          octave_scale: float = 1.3, steps: int = 10, step_size: float = 2.0,
          jitter: int = 2, seed: int = 0) -> Dream:
    """Dreams `image` (HxWx3, 0..255, any size) to raise the mean activation of the layers."""
    if octaves < 1 or octave_scale < 1.0:
        raise ValueError(f"dream: octaves {octaves} must be >= 1 and octave_scale "
                         f"{octave_scale} >= 1")
    targets = [find_layer(ex.model, n) for n in layer_names]
    layers = [layer for _, layer in targets]
    model_size = ex.input_size
    original = tf.constant(np.asarray(image, np.float32)[None])
    size = np.asarray(original.shape[1:3])
    shapes = [tuple(np.maximum(1, np.round(size / octave_scale ** i)).astype(int))
              for i in reversed(range(octaves))]

    @tf.function(reduce_retracing=True, autograph=False)
    def activation_and_grad(img):
        with tf.GradientTape() as tape:
            tape.watch(img)
            with capture(layers) as store:
                ex.model(ex.preprocess(tf.image.resize(img, model_size)), training=False)
            value = tf.add_n([tf.reduce_mean(tf.cast(store[id(layer)][-1], tf.float32))
                              for layer in layers]) / len(layers)
        return value, tape.gradient(value, img)

    rng = np.random.default_rng(seed)
    start = float(activation_and_grad(original)[0])
    img = original
    shrunk = tf.image.resize(original, shapes[0])
    for shape in shapes:
        img = tf.image.resize(img, shape)
        for _ in range(steps):
            dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, 2))
            shifted = tf.roll(img, (dy, dx), (1, 2))
            _, g = activation_and_grad(shifted)
            g = tf.roll(g, (-dy, -dx), (1, 2))
            g = g / (tf.reduce_mean(tf.abs(g)) + 1e-8)
            img = tf.clip_by_value(img + step_size * g, 0.0, 255.0)
        # Put back the detail of the original that the smaller octaves could not hold.
        same = tf.image.resize(original, shape)
        img = tf.clip_by_value(img + same - tf.image.resize(shrunk, shape), 0.0, 255.0)
        shrunk = same
    final = float(activation_and_grad(img)[0])
    out = np.clip(np.round(img.numpy()[0]), 0, 255).astype(np.uint8)
    return Dream(out, [p for p, _ in targets], start, final)
