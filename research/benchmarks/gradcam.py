r"""Grad-CAM images/s, in one run on the same model, images, classes and layer: ours (batched,
compiled) at float32 and at --precision=auto, the keras.io per-image eager loop, and
tf-keras-vis' `Gradcam` (with `ReplaceToLinear`). The maps must agree (Pearson correlation
with ours at float32, per image, at the layer's resolution); then the ratios are printed, and
ours at --precision as a fraction of the attainable FP32 peak measured here (FLOPs per image
counted by research.models.flops: the forward pass, the score's gradient back to the layer and
the CAM's weighted sum; research.benchmarks.peak).

  python -m research.benchmarks.gradcam [--models=vgg16,scratch] [--images=16] [--peak_matmul=4096]

tf-keras-vis is optional (pip install '.[bench]'); its row is skipped without it. VGG16 is
224x224 with weights=None (no download); "scratch" is our detector's CNN at 32x32, with its
zero-initialised head made random so the maps are not all zero.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from research import detector
from research.benchmarks import peak
from research.benchmarks.ratios import Ratios
from research.explain import cams, core, loading, sanity
from research.machine import banner, has_fast_bf16
from research.models import build_model
from research.models.flops import gradcam_flops

try:  # the [bench] extra; without it the benchmark skips that row
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore
except ImportError:
    Gradcam = ReplaceToLinear = CategoricalScore = None

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["vgg16", "scratch"], "Any of vgg16, scratch.")
flags.DEFINE_integer("images", 16, "Images explained per implementation and repeat.")
flags.DEFINE_integer("batch_size", 8, "Batch size of ours and of tf-keras-vis.")
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_bfloat16"],
                  "Precision of the second row of ours (auto: as explain picks it).")
flags.DEFINE_integer("repeats", 2, "Timed passes per implementation (the fastest counts).")

SKIPPED = "skipped (pip install '.[bench]')"


def keras_io_gradcam(model, layer_name, image, class_index):
    """The keras.io recipe, one image at a time, eager (its grad model built per call)."""
    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
    with tf.GradientTape() as tape:
        conv_out, preds = grad_model(image)
        channel = preds[:, class_index]
    grads = tape.gradient(channel, conv_out)
    pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = conv_out[0] @ pooled[..., tf.newaxis]
    heatmap = tf.squeeze(heatmap)
    return (tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)).numpy()


def build(name: str):
    """(float32 model with a linear head, preprocess, input size)."""

    keras.utils.set_random_seed(0)
    if name == "vgg16":
        model = keras.applications.VGG16(weights=None)
        model.layers[-1].activation = keras.activations.linear  # explain pre-softmax scores
        return model, keras.applications.vgg16.preprocess_input, 224
    if name == "scratch":
        model = build_model("scratch", (32, 32, 3), 10)
        head = model.layers[-1]
        head.kernel.assign(np.random.default_rng(0).normal(0, 0.1, head.kernel.shape))
        return model, detector.preprocess_fn("unit"), 32
    raise ValueError(f"--models: unknown model {name!r} (vgg16, scratch)")


def tf_keras_vis_gradcam(model, layer):
    """A function (images, classes) -> maps, or None when tf-keras-vis is not installed."""
    if Gradcam is None:
        return None
    gradcam = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
    # A residual add is no conv layer; tf-keras-vis would otherwise look for one before it.
    seek = isinstance(layer, keras.layers.Conv2D)

    def run(inputs, classes, expand_cam=True):
        return gradcam(CategoricalScore(list(classes)), inputs, penultimate_layer=layer.name,
                       seek_penultimate_conv_layer=seek, expand_cam=expand_cam)
    return run


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(name: str, out: Ratios, fp32_peak: peak.Peak) -> None:

    model, pre, size = build(name)
    policy = loading.resolve_precision(FLAGS.precision)
    second = f"ours, --precision={FLAGS.precision}"
    ours32 = core.Explainer(model, pre)
    path, layer = core.find_layer(model)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (FLAGS.images, size, size, 3)).astype(np.float32)
    b, n = FLAGS.batch_size, len(images)
    classes = np.argmax(np.concatenate([ours32.logits(images[i:i + b])
                                        for i in range(0, n, b)]), -1)
    chunks = [(images[i:i + b], classes[i:i + b]) for i in range(0, n, b)]

    def ours(ex):
        return lambda: [cams.grad_cam(ex, x, c).maps for x, c in chunks]

    def low_res(ex):
        return np.concatenate([cams.grad_cam(ex, x, c).low_res for x, c in chunks])

    rows = {}  # name -> (seconds or None, note)
    ref = low_res(ours32)  # also the warm-up
    rows["ours, float32"] = (best_time(ours(ours32), FLAGS.repeats), "")
    if policy == "float32":
        why = " (no AMX/AVX512-BF16 on this CPU)" if FLAGS.precision == "auto" else ""
        rows[second] = (rows["ours, float32"][0], "= float32" + why)
    else:
        fast = core.Explainer(loading.with_policy(model, policy), pre)
        r = sanity.pearson(low_res(fast), ref)
        t = best_time(ours(fast), FLAGS.repeats)
        rows[second] = (t, f"{policy}; correlation min {r.min():.4f}")

    # preprocess_input changes a float numpy array in place: give it copies.
    one = [(pre(images[i:i + 1].copy()), int(classes[i])) for i in range(n)]
    batches = [(pre(x.copy()), c) for x, c in chunks]
    keras_io = [keras_io_gradcam(model, layer.name, x, c) for x, c in one]  # warm-up
    r = sanity.pearson(keras_io, ref)
    t = best_time(lambda: [keras_io_gradcam(model, layer.name, x, c) for x, c in one],
                  FLAGS.repeats)
    rows["keras.io per-image eager loop"] = (t, f"correlation min {r.min():.4f}")

    tkv = tf_keras_vis_gradcam(model, layer)
    if tkv is None:
        rows["tf-keras-vis Gradcam, float32"] = (None, SKIPPED)
    else:
        r = sanity.pearson(np.concatenate([tkv(x, c, expand_cam=False) for x, c in batches]), ref)
        t = best_time(lambda: [tkv(x, c) for x, c in batches], FLAGS.repeats)
        rows["tf-keras-vis Gradcam, float32"] = (t, f"correlation min {r.min():.4f}")

    print(f"\nGrad-CAM on {name} ({path}), {n} images {size}x{size}, batch {b}, best of "
          f"{FLAGS.repeats}")
    for row, (t, note) in rows.items():
        speed = f"{n / t:9.1f} img/s" if t else " " * 15
        print(f"  {row:<32}{speed}   {note}")
    t_second, t32 = rows[second][0], rows["ours, float32"][0]
    t_io = rows["keras.io per-image eager loop"][0]
    t_tkv = rows["tf-keras-vis Gradcam, float32"][0]
    ratios = [("ours(float32) / keras.io loop", t_io / t32, "")]
    if t_tkv:
        target = "   (target >= 5x)" if name == "vgg16" else ""
        ratios += [(f"ours({FLAGS.precision}) / tf-keras-vis(float32)", t_tkv / t_second,
                    target),
                   ("ours(float32) / tf-keras-vis(float32)", t_tkv / t32, "")]
    else:
        out.add(f"Grad-CAM {name}: ours / tf-keras-vis", None, "", SKIPPED)
    for label, ratio, note in ratios:
        print(f"  ratio {label + ':':<42}{ratio:6.2f}x{note}")
        out.add(f"Grad-CAM {name}: {label}", ratio, note.strip(" ()").replace("target ", ""),
                rows[second][1] if label.startswith(f"ours({FLAGS.precision})") else "")
    flops = gradcam_flops(model, path)
    print(f"  FLOPs per image (counted): {flops.total / 1e9:.3f} G = forward "
          f"{flops.forward / 1e6:,.2f} M + score gradient {flops.backward / 1e6:,.2f} M + CAM "
          f"{flops.cam / 1e6:,.2f} M; ours, float32 {flops.total * n / t32 / 1e9:,.1f} GFLOP/s")
    print(peak.gradcam_row(out, fp32_peak, name, peak.Achieved(flops.total, n / t_second,
                                                               policy)))


def main(argv):
    del argv

    print(banner())
    policy = loading.resolve_precision(FLAGS.precision)
    fp32_peak = peak.measure_peak(bf16=policy == "mixed_bfloat16" and has_fast_bf16())
    print(fp32_peak.describe())
    out = Ratios("gradcam")
    for name in FLAGS.models:
        bench(name, out, fp32_peak)
    out.write()


if __name__ == "__main__":
    app.run(main)
