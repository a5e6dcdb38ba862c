r"""Evaluates a training run on every example of a split.

  python -m research.apps.evaluate --run_name=scratch --split=test --output=eval_test.json

The threshold is the F1-maximising one on val, applied unchanged to the split. The test
split's metrics also go to TensorBoard: under absl's --log_dir/<run> when it is given (as
train reads it), else the run's own log folder as train resolved it; the last line says where.

Zero-shot, on a two-class dataset whose classes the run knows by other names (no training;
score p(cat) / (p(cat) + p(dog)), the run's network resized to its own input size):

  python -m research.apps.evaluate --run_name=lab_scratch --data_dir=data/photos \
      --class_map=cats:cat,dogs:dog --split=test

Test-time augmentation at the photo's native aspect (data made from photos): each photo of
val and the split scored on 3 square windows along its long side, read again from the photos
the data was made from (the manifest's source, or --photo_source), averaged; the report goes
to <run>/eval_<split>_<views>.json (e.g. eval_test_native3_flip_shifts.json):

  python -m research.apps.evaluate --run_name=photos --split=test --tta_windows=3
"""

from __future__ import annotations

import os

from absl import flags

from research import runs, thresholds
from research.apps import config_flags
from research.errors import UserError
from research.evaluation.native import NativeTTA
from research.training.config import load_run_config

FLAGS = flags.FLAGS
flags.DEFINE_string("run_name", None, "Training run to evaluate.")
flags.DEFINE_string("checkpoint_dir", runs.CHECKPOINT_DIR, "Parent folder of run checkpoints.")
flags.DEFINE_string("data_dir", None, "TFRecords folder (default: the run's own).")
flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to score.")
flags.DEFINE_string("checkpoint", "best", "best | latest | a checkpoint path prefix.")
flags.DEFINE_string("output", None, "JSON report path (default: "
                    "<checkpoint_dir>/<run_name>/eval_<split>.json).")
flags.DEFINE_string("figures_dir", None, "Figures folder (default: beside --output).")
flags.DEFINE_bool("tta", None, "Override the run's test-time mirror averaging.")
flags.DEFINE_bool("tta_shifts", None, "Override the run's one-pixel-shift test-time views.")
config_flags.define_flags(NativeTTA)
flags.DEFINE_integer("eval_batch_size", None, "Override the run's eval batch size.")
flags.DEFINE_string("threshold_metric", None, "Override the run's threshold policy (what the "
                    "threshold maximises on val): " + thresholds.HELP.split(": ", 1)[1])
flags.DEFINE_bool("calibrate", None, "Override the run's --calibrate (fit a temperature on val "
                  "and report the calibrated reliability beside the raw one).")
flags.DEFINE_list("class_map", [], "Zero-shot: DATA_CLASS:RUN_CLASS for both classes of "
                  "--data_dir (e.g. cats:cat,dogs:dog); the report goes to <run>/zero_shot_"
                  "<data folder>_<split>.json unless --output.")
config_flags.define_device_flags()
flags.mark_flags_as_required(["run_name"])


def zero_shot_main() -> None:
    from research.evaluation import zero_shot
    try:
        if not FLAGS.data_dir:
            raise zero_shot.ClassMapError("--class_map: give the --data_dir to score zero-shot")
        cfg = zero_shot.zero_shot_config(
            FLAGS.checkpoint_dir, FLAGS.run_name, FLAGS.data_dir,
            zero_shot.parse_class_map(FLAGS.class_map), tta=FLAGS.tta,
            tta_shifts=FLAGS.tta_shifts, eval_batch_size=FLAGS.eval_batch_size)
        cfg.validate()
        native = native_from_flags()
        if FLAGS.checkpoint != "best":
            raise zero_shot.ClassMapError("--checkpoint: zero-shot scoring uses the run's "
                                          "export; leave --checkpoint unset")
        config_flags.setup_devices()
        from research.detector import tta_mode
        from research.evaluation import report as reporting
        views = tta_mode(cfg.tta, cfg.tta_shifts, native.windows) if native.active else ""
        output = FLAGS.output or zero_shot.report_path(FLAGS.checkpoint_dir, FLAGS.run_name,
                                                       FLAGS.data_dir, FLAGS.split, views)
        report, raw = zero_shot.score_zero_shot(cfg, FLAGS.split, native=native)
        figures = FLAGS.figures_dir or runs.eval_figures_dir(output, FLAGS.split, views)
        report["figures"] = reporting.write_figures(cfg, report, raw, figures)
        runs.write_eval_report(output, report)
    except UserError as e:
        config_flags.fail(e)
    print()
    print(f"zero-shot: {report['zero_shot']['score']} of {FLAGS.run_name} at "
          f"{report['zero_shot']['image_size']} px")
    print(reporting.format_report(report))
    print(f"report: {output}")


def main(argv):
    del argv
    if FLAGS.class_map:
        return zero_shot_main()
    try:
        cfg = load_run_config(FLAGS.checkpoint_dir, FLAGS.run_name, FLAGS.data_dir,
                              tta=FLAGS.tta, tta_shifts=FLAGS.tta_shifts,
                              eval_batch_size=FLAGS.eval_batch_size,
                              threshold_metric=FLAGS.threshold_metric,
                              calibrate=FLAGS.calibrate)
        cfg.validate()  # an --eval_batch_size of 0 or less is an error here, not 'unset'
        native = native_from_flags()
        tb_dir, why = tensorboard_dir(FLAGS.run_name)
        if native.active:  # the run's TensorBoard row keeps the views it was scored with
            tb_dir, why = None, (f"--tta_windows={native.windows}: its row keeps the run's "
                                 "own views")
    except UserError as e:
        config_flags.fail(e)
    config_flags.setup_devices()
    from research.detector import tta_mode  # the heavy imports, flags known good
    from research.evaluation import report as reporting
    from research.evaluation.run import evaluate_and_save

    views = tta_mode(cfg.tta, cfg.tta_shifts, native.windows) if native.active else ""
    output = FLAGS.output or runs.eval_report_path(cfg.run_dir, FLAGS.split, views)
    figures = FLAGS.figures_dir or runs.eval_figures_dir(output, FLAGS.split, views)
    try:
        report, _ = evaluate_and_save(cfg, FLAGS.split, FLAGS.checkpoint, output, figures,
                                      tb_dir=tb_dir, native=native)
    except UserError as e:
        config_flags.fail(e)
    print()
    print(reporting.format_report(report))
    print(f"report: {output}")
    print(f"figures: {figures}/")
    if FLAGS.split == "test":
        print(f"tensorboard: {report['tensorboard']}" if report["tensorboard"] else
              f"tensorboard: not written ({why})")


def native_from_flags() -> NativeTTA:
    """--tta_windows and --photo_source, checked (a photo source without windows would be
    silently unused: an error)."""
    native = NativeTTA(**config_flags.values_from_flags(NativeTTA))
    native.validate()
    return native


def tensorboard_dir(run_name: str) -> tuple[str | None, str]:
    """(the folder the test metrics go to in TensorBoard, or None; why not): absl's --log_dir
    when given, as train reads it; else the run's recorded one as train resolved it
    (runs.recorded_log_dir), never one resolved against wherever evaluate runs."""
    if FLAGS["log_dir"].present:
        return os.path.join(FLAGS.log_dir, run_name), ""
    recorded = runs.read_config(runs.run_dir(FLAGS.checkpoint_dir, run_name))
    log_dir = runs.recorded_log_dir(recorded, FLAGS.checkpoint_dir)
    if log_dir is None:
        return None, (f"the run's log folder {recorded.get('log_dir')!r} is relative to a "
                      "folder evaluate cannot tell; --log_dir to name the folder")
    tb = os.path.join(log_dir, run_name)
    if not os.path.isdir(tb):
        return None, f"the run's log folder {tb} is not there; --log_dir to name the folder"
    return tb, ""


if __name__ == "__main__":
    config_flags.run(main)
