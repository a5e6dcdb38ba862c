r"""Grad-CAM images/s: our batched, compiled implementation against a per-image eager loop
in the keras.io style, on the same model and images, in one run.

  python -m research.benchmarks.gradcam [--model=scratch|vgg16] [--images=64]

The keras.io example builds `keras.Model(model.inputs, [layer.output, model.output])` and
runs one eager GradientTape per image. That needs a flat functional model, so the benchmark
uses our scratch detector (32x32) by default and VGG16 (224x224, weights=None) on request.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "scratch", ["scratch", "vgg16"], "Model to explain.")
flags.DEFINE_integer("images", 64, "Images to explain per implementation.")
flags.DEFINE_integer("batch_size", 32, "Batch size of the compiled implementation.")


def keras_io_gradcam(model, layer_name, image):
    """The keras.io recipe, one image at a time, eager."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
    with tf.GradientTape() as tape:
        conv_out, preds = grad_model(image)
        index = tf.argmax(preds[0])
        channel = preds[:, index]
    grads = tape.gradient(channel, conv_out)
    pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = conv_out[0] @ pooled[..., tf.newaxis]
    heatmap = tf.squeeze(heatmap)
    return (tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)).numpy()


def main(argv):
    del argv
    import keras

    from research.explain import core
    from research.models import build_model

    if FLAGS.model == "scratch":
        model = build_model("scratch", (32, 32, 3), 10)
        size, pre = 32, (lambda x: x / 255.0)
    else:
        model = keras.applications.VGG16(weights=None)
        model.layers[-1].activation = None  # keras.io: explain the pre-softmax score
        size, pre = 224, keras.applications.vgg16.preprocess_input
    ex = core.Explainer(model, pre)
    path, _ = core.find_layer(model)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (FLAGS.images, size, size, 3)).astype(np.float32)
    b = FLAGS.batch_size

    core.grad_cam(ex, images[:b])  # trace and warm up
    start = time.perf_counter()
    ours = [core.grad_cam(ex, images[i:i + b]).low_res for i in range(0, len(images), b)]
    t_ours = time.perf_counter() - start

    keras_io_gradcam(model, path, pre(images[:1]))  # warm up
    start = time.perf_counter()
    ref = [keras_io_gradcam(model, path, pre(images[i:i + 1])) for i in range(len(images))]
    t_ref = time.perf_counter() - start

    ours = np.concatenate(ours)
    same = np.nanmax(np.abs(np.nan_to_num(np.stack(ref)) - ours))
    print(f"Grad-CAM on {FLAGS.model} ({path}), {len(images)} images {size}x{size}")
    print(f"  batched + tf.function (batch {b}): {len(images) / t_ours:8.1f} img/s")
    print(f"  keras.io per-image eager loop:     {len(images) / t_ref:8.1f} img/s")
    print(f"  ratio: {t_ref / t_ours:.1f}x   (target >= 5x); max |difference| of the "
          f"maps: {same:.2e}")


if __name__ == "__main__":
    app.run(main)
