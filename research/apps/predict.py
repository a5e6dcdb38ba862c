r"""Scores image files with an exported detector.

  python -m research.apps.predict --model=checkpoints/scratch/export/model.keras \
      --images=a.jpg,b.png

Images are decoded and resized exactly as make_tfrecords does for folders (center crop).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "An exported model.keras (metadata.json beside it).")
flags.DEFINE_list("images", None, "Image files (JPEG, PNG, ... of any size).")
flags.DEFINE_float("threshold", None, "Decision threshold (default: the val-chosen one).")
flags.mark_flags_as_required(["model", "images"])


def main(argv):
    del argv
    import keras
    import numpy as np

    import research.models.layers  # noqa: F401  (registers custom layers)
    from research.data.imaging import ImageDecodeError, load_image_file
    from research.training.loop import positive_scores

    meta_path = os.path.join(os.path.dirname(FLAGS.model), "metadata.json")
    if not os.path.isfile(FLAGS.model) or not os.path.isfile(meta_path):
        sys.exit(f"error: --model: need {FLAGS.model} and {meta_path}")
    with open(meta_path) as f:
        meta = json.load(f)
    model = keras.models.load_model(FLAGS.model)
    h, w, _ = meta["image_shape"]
    threshold = FLAGS.threshold if FLAGS.threshold is not None else meta["threshold"]
    failed = 0
    for path in FLAGS.images:
        try:
            img = load_image_file(path, (h, w)).astype(np.float32)
        except ImageDecodeError as e:
            print(f"{path}\terror: {e}")
            failed += 1
            continue
        x = img[None] / 255.0 if meta["scale"] == "unit" else img[None]
        views = [x, x[:, :, ::-1]] if meta.get("tta") else [x]
        p = float(np.mean([positive_scores(model(v, training=False), meta["objective"],
                                           meta["positive_class_id"])[0] for v in views]))
        verdict = meta["positive_class"] if p >= threshold else f"not {meta['positive_class']}"
        print(f"{path}\tp({meta['positive_class']})={p:.4f}\t{verdict}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
