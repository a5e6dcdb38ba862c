r"""Scores image files with an exported detector.

  python -m research.apps.predict --model=checkpoints/scratch/export/model.keras \
      --images=photos/,extra/*.jpg,one.png --output=scores.csv

`--images` takes files, folders (searched recursively, image extensions only, sorted) and globs
(`**` included). Each image prints `<path as given>\tp(<class>)=<score>\t<decision>`; an
unreadable one prints `<path>\terror: <reason>`, is counted and listed in the CSV, and makes the
exit status 1 once the rest are scored. Images are decoded and resized exactly as the run's
data was (make_tfrecords' --resize_policy, recorded in the export's metadata.json; center crop
by default), as explain and the lab do. The first line on stderr gives the threshold and where
it comes from. A classifier's export (trained without a positive class) prints
`<path>\t<top class>\ttop: <class> <p>, ...` (--top_k classes) and has no threshold.

`--model=<a SavedModel folder>` (one with saved_model.pb): an export's saved_model/ prints
the same lines as its model.keras; any other SavedModel (TF-Hub) prints its top --top_k
outputs per image (research.savedmodel_predict).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from research import files, runs
from research.apps import config_flags
from research.errors import UserError
from research.inference import PredictOptions
from research.model_options import SavedModelOptions

FLAGS = flags.FLAGS
config_flags.define_max_image_pixels()
config_flags.define_export_flags()
config_flags.define_image_flags("Image files, folders and globs (JPEG, PNG, ... any size).")
flags.DEFINE_string("output", None, "CSV of path,score,decision,top_classes,error.")
config_flags.define_flags(PredictOptions)
config_flags.define_flags(SavedModelOptions, skip=("savedmodel_dir",))  # --model=<folder>
config_flags.define_device_flags()


def main(argv):
    del argv
    from research import inference
    from research.data import imaging

    if FLAGS.model and os.path.isfile(os.path.join(FLAGS.model, "saved_model.pb")):
        return predict_savedmodel(FLAGS.model)
    try:  # every check that needs no model, before TensorFlow loads
        model_path, flag = config_flags.export_path()
        if FLAGS.output:
            inference.check_output(FLAGS.output)
        options = PredictOptions(**config_flags.values_from_flags(PredictOptions))
        options.validate()
        meta = inference.views_meta(runs.read_metadata(model_path, flag), options)
        expansion = inference.expand_images(config_flags.image_paths())
        config_flags.setup_devices()
        from research import detector as detectors  # the heavy imports, once all is good

        detector = detectors.load_detector(model_path, meta, flag)
    except UserError as e:
        config_flags.fail(e)

    if expansion.skipped:
        first_path, first_reason = expansion.skipped[0]
        print(f"skipped {len(expansion.skipped)} files (not images, hidden or duplicates; "
              f"first: {first_path}: {first_reason})", file=sys.stderr)
    try:
        threshold, source = inference.threshold_of(detector, options)
    except UserError as e:
        config_flags.fail(e)
    what = (f"threshold {threshold:.4f} ({source})" if threshold is not None else
            f"a {len(meta['class_names'])}-class classifier: its top classes, no threshold")
    views = detectors.tta_mode(meta["tta"], meta.get("tta_shifts", False), options.tta_windows)
    windows = (f", {options.tta_windows} windows along the long side"
               if options.tta_windows > 1 else "")
    print(f"{what}; images {imaging.recorded_policy(meta)} to {detector.image_size[0]}x"
          f"{detector.image_size[1]}{windows}; test-time views {views}", file=sys.stderr)
    predictions = inference.predict_files(detector, expansion.paths, options)
    if FLAGS.output:
        with files.atomic_path(FLAGS.output, "the predictions CSV") as tmp:
            with open(tmp, "w", newline="") as f:
                counts = inference.write_predictions(predictions, detector.positive_class,
                                                     sys.stdout, f)
    else:
        counts = inference.write_predictions(predictions, detector.positive_class, sys.stdout)
    where = f"listed in {FLAGS.output}" if FLAGS.output else "listed above"
    print(f"scored {counts.scored}, unreadable {counts.unreadable}"
          + (f": {where}" if counts.unreadable else ""), file=sys.stderr)
    if counts.unreadable:
        sys.exit(1)


def predict_savedmodel(path: str) -> None:
    """predict --model=<a SavedModel folder> (research.savedmodel_predict)."""
    from research import inference

    try:
        options = PredictOptions(**config_flags.values_from_flags(PredictOptions))
        options.validate()
        for name in ("tta", "tta_windows"):
            if FLAGS[name].present:
                raise inference.InferenceError(
                    f"--{name}: a SavedModel folder scores the views it was exported with; "
                    "give the export's model.keras (--model=.../export/model.keras) to "
                    "choose them")
        if FLAGS.output:
            inference.check_output(FLAGS.output)
        expansion = inference.expand_images(config_flags.image_paths())
        config_flags.setup_devices()
        from research import savedmodel_predict  # the heavy imports, once all is good

        detector = savedmodel_predict.export_detector(path)
        if detector is None:
            opts = SavedModelOptions(savedmodel_dir=path, **config_flags.values_from_flags(
                SavedModelOptions, skip=("savedmodel_dir",)))
            predictions = savedmodel_predict.predict_any(path, expansion.paths, opts, options)
            positive, what = None, "any SavedModel: its top outputs as it returns them"
        else:
            threshold, source = inference.threshold_of(detector, options)
            predictions = inference.predict_files(detector, expansion.paths, options)
            positive = detector.positive_class
            what = (f"our export's SavedModel; threshold {threshold:.4f} ({source})"
                    if threshold is not None else "our export's SavedModel, a classifier")
        print(f"{path}: {what}", file=sys.stderr)
        if FLAGS.output:
            with files.atomic_path(FLAGS.output, "the predictions CSV") as tmp:
                with open(tmp, "w", newline="") as f:
                    counts = inference.write_predictions(predictions, positive, sys.stdout, f)
        else:
            counts = inference.write_predictions(predictions, positive, sys.stdout)
    except UserError as e:
        config_flags.fail(e)
    print(f"scored {counts.scored}, unreadable {counts.unreadable}", file=sys.stderr)
    if counts.unreadable:
        sys.exit(1)


if __name__ == "__main__":
    config_flags.run(main)
