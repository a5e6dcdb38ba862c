r"""Compares training runs on one split: a table and their ROC and PR curves overlaid.

  python -m research.apps.compare --runs=scratch,transfer --split=test \
      --output=results/compare

writes results/compare.md (markdown table), results/compare.json and results/compare.png.
Each run is scored as `evaluate` scores it: its own threshold (F1-max on its val) applied
unchanged to the split. All runs must read the same split (--data_dir makes them).
"""

from __future__ import annotations

import sys

from absl import app, flags

from research.apps import config_flags

from research.training.config import TrainConfig

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "Training runs to compare (names under --checkpoint_dir).")
flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to score.")
flags.DEFINE_string("output", None, "Path prefix: writes <prefix>.md, .json and .png (its "
                    "folder is created).")
flags.DEFINE_string("checkpoint_dir", TrainConfig.checkpoint_dir,
                    "Parent folder of run checkpoints.")
flags.DEFINE_string("data_dir", None, "TFRecords folder for every run (default: each run's "
                    "own, which must hold the same split).")
flags.DEFINE_string("checkpoint", "best", "best | latest | a checkpoint path prefix (one run "
                    "only).")
flags.DEFINE_integer("eval_batch_size", None, "Override the runs' eval batch size.",
                     lower_bound=1)
flags.mark_flags_as_required(["runs", "output"])


def main(argv):
    del argv
    from research.data.pipeline import DataError
    from research.training import compare
    from research.training.config import ConfigError

    config_flags.exit_on_numeric_errors((("eval_batch_size", 1, None, True, True),))
    try:
        compare.check_output_prefix(FLAGS.output)
        result, raw = compare.compare_runs(FLAGS.checkpoint_dir, FLAGS.runs, FLAGS.split,
                                           data_dir=FLAGS.data_dir, checkpoint=FLAGS.checkpoint,
                                           eval_batch_size=FLAGS.eval_batch_size)
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    paths = compare.write_table(result, FLAGS.output)
    paths.append(compare.write_figure(result, raw, FLAGS.output))
    print()
    print(compare.format_table(result))
    for path in paths:
        print(path)


if __name__ == "__main__":
    app.run(main)
