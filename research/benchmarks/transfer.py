r"""Feature-extraction throughput of a backbone (the features recipe's one pass), float32 vs
mixed_bfloat16, measured in one run on the same images.

  python -m research.benchmarks.transfer [--model=vgg16] [--image_size=64] [--images=512]

Random 32x32 raw pixels go through the same extractor the features recipe builds (resize,
the backbone's preprocess_input, the frozen base); weights are random (the speed does not
depend on them).
"""

from __future__ import annotations

import time

import keras
import tensorflow as tf
from absl import app, flags

from research.machine import banner
from research.model_options import BACKBONES
from research.models.backbones import build_transfer_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "vgg16", "Backbone (research.model_options.BACKBONES).")
flags.DEFINE_integer("image_size", None, "Input size of the backbone (default: its CPU "
                     "default).", lower_bound=1)
flags.DEFINE_integer("images", 512, "Images timed per precision (after one warm-up batch).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Images per batch.", lower_bound=1)


def extraction_rate(model: str, size: int | None, precision: str, images: int,
                    batch_size: int) -> float:
    keras.utils.set_random_seed(0)
    extractor = build_transfer_model(model, (32, 32, 3), 1, weights="none", image_size=size,
                                     dtype=None if precision == "float32" else precision,
                                     features_only=True)
    run = tf.function(lambda x: extractor(x, training=False))
    x = tf.random.uniform([batch_size, 32, 32, 3], 0, 255)
    run(x).numpy()  # trace + warm up
    start, done = time.perf_counter(), 0
    while done < images:
        run(x).numpy()
        done += batch_size
    return done / (time.perf_counter() - start)


def main(argv):
    del argv

    size = FLAGS.image_size or BACKBONES[FLAGS.model].default_size
    print(banner())
    print(f"{FLAGS.model} feature extraction at {size}x{size}, batch {FLAGS.batch_size}, "
          f"{FLAGS.images} images each")
    rates = {}
    for precision in ("float32", "mixed_bfloat16"):
        rates[precision] = extraction_rate(FLAGS.model, size, precision, FLAGS.images,
                                           FLAGS.batch_size)
        print(f"  {precision:<16}{rates[precision]:>9,.1f} img/s", flush=True)
    print(f"bf16 / fp32: {rates['mixed_bfloat16'] / rates['float32']:.2f}")


if __name__ == "__main__":
    app.run(main)
