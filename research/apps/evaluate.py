r"""Evaluates a training run on every example of a split.

  python -m research.apps.evaluate --run_name=scratch --split=test --output=eval_test.json

The threshold is the F1-maximising one on val, applied unchanged to the split.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("run_name", None, "Training run to evaluate.")
flags.DEFINE_string("checkpoint_dir", "checkpoints", "Parent folder of run checkpoints.")
flags.DEFINE_string("data_dir", None, "TFRecords folder (default: the run's own).")
flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to score.")
flags.DEFINE_string("checkpoint", "best", "best | latest | a checkpoint path prefix.")
flags.DEFINE_string("output", None, "JSON report path (default: "
                    "<checkpoint_dir>/<run_name>/eval_<split>.json).")
flags.DEFINE_string("figures_dir", None, "Figures folder (default: beside --output).")
flags.DEFINE_bool("tta", None, "Override the run's test-time mirror averaging.")
flags.DEFINE_bool("tta_shifts", None, "Override the run's one-pixel-shift test-time views.")
flags.DEFINE_integer("eval_batch_size", None, "Override the run's eval batch size.")
flags.mark_flags_as_required(["run_name"])


def main(argv):
    del argv
    from research.data.pipeline import DataError
    from research.training import evaluation
    from research.training.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(FLAGS.checkpoint_dir, FLAGS.run_name)
        cfg.checkpoint_dir, cfg.run_name = FLAGS.checkpoint_dir, FLAGS.run_name
        if FLAGS.data_dir:
            cfg.data_dir = FLAGS.data_dir
        if FLAGS.tta is not None:
            cfg.tta = FLAGS.tta
        if FLAGS.tta_shifts is not None:
            cfg.tta_shifts = FLAGS.tta_shifts
        if FLAGS.eval_batch_size is not None:  # 0 or less is an error, not 'unset'
            cfg.eval_batch_size = FLAGS.eval_batch_size
        cfg.validate()
        report, raw = evaluation.evaluate_run(cfg, FLAGS.split, FLAGS.checkpoint)
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    output = FLAGS.output or os.path.join(cfg.run_dir, f"eval_{FLAGS.split}.json")
    figures = FLAGS.figures_dir or os.path.join(os.path.dirname(os.path.abspath(output)),
                                                f"figures_{FLAGS.split}")
    report["figures"] = evaluation.write_figures(cfg, report, raw, figures)
    evaluation.save_report(report, output)
    print()
    print(evaluation.format_report(report))
    print(f"report: {output}")
    print(f"figures: {figures}/")


if __name__ == "__main__":
    app.run(main)
