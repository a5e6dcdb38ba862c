r"""predict images/s: the batched pipeline (threaded decoding overlapping batched scoring)
against the former one-image-at-a-time loop, on the same model and files, in one run.

  python -m research.benchmarks.predict [--images=<folder>] [--model=<export>/model.keras]
      [--image_size=32|64|150]

By default it extracts ../shared/data/dogs-vs-cats-2000.tar (2,000 photos, median 447x374)
to a temporary folder and exports an untrained scratch CNN (2 classes, mirror TTA) at
--image_size: throughput does not depend on the weights.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import time

import numpy as np
from absl import app, flags

from research import detector as detectors
from research import inference
from research.data.imaging import ImageDecodeError, load_image_file
from research.detector import positive_scores
from research.inference import PredictOptions
from research.machine import banner
from research.models import build_model
from research.training.config import TrainConfig
from research.training.record import export_model

DEFAULT_PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                              "shared", "data", "dogs-vs-cats-2000.tar")

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "Folder of photos (default: the 2,000 shared photos).")
flags.DEFINE_string("model", None, "An exported model.keras (default: an untrained scratch "
                    "CNN exported to a temporary folder).")
flags.DEFINE_integer("image_size", 32, "Input size of the default model.")
flags.DEFINE_bool("tta", True, "Mirror averaging in the default model's metadata.")
flags.DEFINE_integer("batch_size", PredictOptions.batch_size, "Batch size of the pipeline.")
flags.DEFINE_integer("reference_images", 0,
                     "Images timed in the one-at-a-time loop (0: all; it runs ~16 img/s).")


def score_one_at_a_time(model, meta: dict, paths: list[str]) -> list[float | None]:
    """The former predict loop, kept as the reference: one eager call per image and view."""
    h, w, _ = meta["image_shape"]
    out = []
    for path in paths:
        try:
            img = load_image_file(path, (h, w)).astype(np.float32)
        except ImageDecodeError:
            out.append(None)
            continue
        x = img[None] / 255.0 if meta["scale"] == "unit" else img[None]
        views = [x, x[:, :, ::-1]] if meta.get("tta") else [x]
        out.append(float(np.mean([positive_scores(model(v, training=False), meta["objective"],
                                                  meta["positive_class_id"])[0]
                                  for v in views])))
    return out


def export_untrained(out_dir: str, size: int, tta: bool) -> str:

    cfg = TrainConfig(data_dir="", run_name="untrained", checkpoint_dir=out_dir,
                      objective="multiclass", tta=tta)
    manifest = {"positive_class": "cat", "positive_class_id": 0, "class_names": ["cat", "dog"],
                "image_shape": [size, size, 3]}
    model = build_model("scratch", (size, size, 3), 2)
    head = model.get_layer("logits").kernel  # zero-initialised: give the scores some spread
    head.assign(np.random.default_rng(0).normal(0, 1, head.shape).astype(np.float32))
    return export_model(model, cfg, manifest, {"threshold": 0.5})


def main(argv):
    del argv

    print(banner())
    tmp = tempfile.TemporaryDirectory()
    folder = FLAGS.images
    if folder is None:
        with tarfile.open(DEFAULT_PHOTOS) as tar:
            tar.extractall(tmp.name, filter="data")
        folder = tmp.name
    model_path = FLAGS.model or export_untrained(tmp.name, FLAGS.image_size, FLAGS.tta)
    detector = detectors.load_detector(model_path)
    paths = inference.expand_images([folder]).paths
    ref_paths = paths[:FLAGS.reference_images or len(paths)]
    options = PredictOptions(batch_size=FLAGS.batch_size)

    list(inference.predict_files(detector, paths[:options.batch_size], options))  # trace
    start = time.perf_counter()
    preds = list(inference.predict_files(detector, paths, options))
    t_batched = time.perf_counter() - start

    score_one_at_a_time(detector.model, detector.meta, paths[:2])  # warm up
    start = time.perf_counter()
    ref = score_one_at_a_time(detector.model, detector.meta, ref_paths)
    t_ref = time.perf_counter() - start

    diff = max(abs(p.score - r) for p, r in zip(preds, ref) if r is not None)
    unreadable = sum(p.error is not None for p in preds)
    h, w, _ = detector.meta["image_shape"]
    rate_b, rate_r = len(paths) / t_batched, len(ref_paths) / t_ref
    print(f"predict on {len(paths)} photos from {folder} ({unreadable} unreadable), model "
          f"input {h}x{w}, tta {detector.meta['tta']}")
    rows = ((f"batched pipeline (batch {options.batch_size})", rate_b),
            (f"one at a time ({len(ref_paths)} images)", rate_r))
    for label, rate in rows:
        print(f"  {label + ':':34s}{rate:8.1f} img/s")
    print(f"  ratio: {rate_b / rate_r:.1f}x   (target >= 10x); max |difference| of the "
          f"scores: {diff:.2e}")
    tmp.cleanup()


if __name__ == "__main__":
    app.run(main)
