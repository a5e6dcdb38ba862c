r"""Seconds per image of every explanation method, at the explain app's defaults
(ExplainOptions), on untrained models (the cost does not depend on the weights).

  python -m research.benchmarks.explain_methods [--models=scratch,fast,mobilenet_v2] \
      [--images=2] [--methods=gradcam,lime] [--precision=float32] [--out=costs.json]

scratch and fast are our detectors' CNNs at 32x32 (10 classes); the others are
keras.applications (research.model_options.APPLICATIONS) at their native size with
weights=None (no download). Each method runs once to
compile, then once timed on the same `--images` images; cam is skipped where the head is not
GlobalAveragePooling2D + Dense (our two CNNs).
"""

from __future__ import annotations

import time

import keras
import numpy as np
from absl import app, flags

from research import detector, files
from research.explain import attribution, core, loading, methods
from research.explain.options import ExplainOptions
from research.machine import banner
from research.model_options import APPLICATIONS
from research.models import build_model

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["scratch", "fast", "mobilenet_v2"],
                  "Any of scratch, fast, " + ", ".join(APPLICATIONS) + ".")
flags.DEFINE_list("methods", list(methods.NAMES), "Methods to time.")
flags.DEFINE_integer("images", 2, "Images per timed call.")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"], "Model precision.")
flags.DEFINE_string("out", None, "Also write the seconds per image here (JSON).")


def build(name: str, precision: str) -> core.Explainer:
    keras.utils.set_random_seed(0)
    if name in ("scratch", "fast"):
        model = build_model(name, (32, 32, 3), 10)
        head = model.get_layer("logits")
        head.kernel.assign(np.random.default_rng(0).normal(0, 0.1, head.kernel.shape))
        if precision != "float32":
            model = loading.with_policy(model, precision)
        return core.Explainer(model, detector.preprocess_fn("unit"))
    return loading.load_application(name, "none", precision)


def seconds_per_image(ex: core.Explainer, method: str, images: np.ndarray,
                      options: ExplainOptions) -> float:
    params = options.method_params(method)
    methods.explain(ex, method, images, **params)  # compiles
    start = time.perf_counter()
    methods.explain(ex, method, images, **params)
    return (time.perf_counter() - start) / len(images)


def main(argv):
    del argv
    print(banner())
    options, costs = ExplainOptions(), {}
    for name in FLAGS.models:
        ex = build(name, FLAGS.precision)
        h, w = ex.input_size
        images = np.random.default_rng(0).uniform(0, 255, (FLAGS.images, h, w, 3)).astype(
            np.float32)
        costs[name] = {}
        for method in FLAGS.methods:
            try:
                costs[name][method] = seconds_per_image(ex, method, images, options)
            except attribution.CamHeadError:
                costs[name][method] = None
            shown = ("n/a (head)" if costs[name][method] is None
                     else f"{costs[name][method]:.3f} s/image")
            print(f"{name} {h}x{w} {FLAGS.precision}  {method:<22}{shown}", flush=True)
    if FLAGS.out:
        files.write_json(FLAGS.out, {"cpu": banner(), "precision": FLAGS.precision,
                                     "images": FLAGS.images, "seconds_per_image": costs},
                         "the explanation costs")


if __name__ == "__main__":
    app.run(main)
