r"""Our explanation methods against xplique 2.0.2's on the same model, images and classes:
the per-image Pearson correlation of the maps and images/s of each, for the methods both have.

xplique pins an older TensorFlow than ours, so it lives in its own venv, never in the
project's; our package needs nothing there that TensorFlow does not bring (keras, numpy,
opencv, matplotlib):

  python3 -m venv /work/venv-xplique
  /work/venv-xplique/bin/pip install tensorflow==2.20.0 'tensorflow-probability[tf]==0.25.0' \
      'scikit-image<=0.25.2' 'scikit-learn<=1.7.2' 'scipy<=1.15.3' einops deprecated \
      opencv-python-headless matplotlib
  /work/venv-xplique/bin/pip install --no-deps xplique==2.0.2   # else tensorflow[and-cuda]
  PYTHONPATH=. /work/venv-xplique/bin/python -m research.benchmarks.explain_vs_xplique \
      [--images=16] [--batch_size=16]

The model is our scratch CNN at 32x32 (10 classes, ReLU: xplique's guided backprop only
overrides ReLU), untrained with a random head; it takes [0, 1] inputs, which xplique gets and
ours computes from 0..255 (gradients differ by 1/255: correlations do not see it). Settings
are matched where the methods allow: the same Grad-CAM layer, integrated gradients from black
in 32 steps (xplique: a Riemann sum of 32 points, ours: the trapezoid rule over 32 steps),
occlusion 8x8 patches by 4 filled with black (xplique sums the drops of the covering
patches, ours averages them and adds a patch flush with the edge), SmoothGrad with 25 samples
at noise 0.15 x the range (different random draws; xplique averages signed gradients, ours
their absolute values). Maps are compared after our reduction to one channel (|.| max for
guided backprop and SmoothGrad, on xplique's raw gradients) and our post-processing (ReLU
where ours takes the positive part).
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from research.explain import core, methods
from research.machine import banner
from research.models import build_model

try:  # only in the xplique venv
    import xplique
    from xplique.attributions import (GradCAM, GradCAMPP, GuidedBackprop, IntegratedGradients,
                                      Occlusion, Saliency, SmoothGrad)
except ImportError:
    xplique = None

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 16, "Images explained by each implementation.")
flags.DEFINE_integer("batch_size", 16, "Batch size of both.")


LIBRARY = "xplique"  # the key of Method.references (research.explain.methods)
# Our settings where the defaults differ from what xplique is given.
OUR_PARAMS = {"integrated_gradients": {"steps": 32, "baseline": "black"},
              "occlusion": {"patch": 0.25, "stride": 0.125, "fill": "black"},
              "smoothgrad": {"n": 25, "noise": 0.15}}


def theirs(cls: str, model, layer: str):
    """(xplique explainer of class `cls`, set as OUR_PARAMS, post-processing of its map)."""
    b = FLAGS.batch_size
    relu = lambda m: np.maximum(m, 0)  # noqa: E731
    abs_max = lambda m: np.abs(m).max(-1)  # noqa: E731  (ours, on xplique's raw gradients)
    return {
        "Saliency": lambda: (Saliency(model, batch_size=b), np.abs),
        "GradCAM": lambda: (GradCAM(model, batch_size=b, conv_layer=layer), relu),
        "GradCAMPP": lambda: (GradCAMPP(model, batch_size=b, conv_layer=layer), relu),
        "GuidedBackprop": lambda: (GuidedBackprop(model, batch_size=b, reducer=None), abs_max),
        "IntegratedGradients": lambda: (IntegratedGradients(
            model, batch_size=b, steps=32, baseline_value=0.0, reducer="sum"), relu),
        "Occlusion": lambda: (Occlusion(model, batch_size=b * 4, patch_size=8, patch_stride=4,
                                        occlusion_value=0.0), relu),
        "SmoothGrad": lambda: (SmoothGrad(model, batch_size=b, nb_samples=25, noise=0.15,
                                          reducer=None), abs_max),
    }[cls]()


def ours_and_theirs(model, layer: str):
    """{method: (our params, xplique explainer, post-processing of xplique's map)} for every
    method whose record names its xplique class."""
    out = {}
    for m in methods.METHODS:
        if LIBRARY in m.references:
            params = {**OUR_PARAMS.get(m.name, {}), **({"layer": layer} if m.layer else {})}
            out[m.name] = (params, *theirs(m.references[LIBRARY], model, layer))
    return out


def timed(fn):
    fn()  # compiles
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv):
    del argv
    if xplique is None:
        raise SystemExit("error: xplique is not installed here; run this in its own venv "
                         "(see the module's docstring)")
    print(banner())
    print(f"xplique {xplique.__version__}, TensorFlow {tf.__version__}, Keras "
          f"{keras.__version__}")
    keras.utils.set_random_seed(0)
    model = build_model("scratch", (32, 32, 3), 10)
    head = model.get_layer("logits")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.1, head.kernel.shape))
    ex = core.Explainer(model, lambda x: x / 255.0)
    raw = np.random.default_rng(1).uniform(0, 255, (FLAGS.images, 32, 32, 3)).astype(
        np.float32)
    classes = np.argmax(np.asarray(ex.logits(raw)), -1)
    targets = np.eye(10, dtype=np.float32)[classes]
    layer = core.find_layer(model)[0]
    print(f"{FLAGS.images} images 32x32, batch {FLAGS.batch_size}, Grad-CAM layer {layer}")
    print(f"{'method':<22}{'corr min':>9}{'corr mean':>10}{'ours img/s':>12}"
          f"{'xplique img/s':>15}")
    for method, (params, theirs, post) in ours_and_theirs(model, layer).items():
        mine, t_ours = timed(lambda: methods.explain(ex, method, raw, classes, **params).maps)
        other, t_theirs = timed(lambda: np.asarray(theirs(raw / 255.0, targets)))
        if other.ndim == 4 and other.shape[-1] == 1:
            other = other[..., 0]
        other = post(other)
        r = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(mine, other)])
        n = FLAGS.images
        print(f"{method:<22}{r.min():>9.3f}{r.mean():>10.3f}{n / t_ours:>12.1f}"
              f"{n / t_theirs:>15.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
