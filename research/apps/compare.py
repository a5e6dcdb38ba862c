r"""Compares training runs on one split: a table and their ROC and PR curves overlaid.

  python -m research.apps.compare --runs=scratch,transfer --split=test \
      --output=results/compare

writes results/compare.md (markdown table), results/compare.json and results/compare.png.
Each run is scored as `evaluate` scores it: its own threshold (F1-max on its val) applied
unchanged to the split. All runs must read the same split (--data_dir makes them).
"""

from __future__ import annotations


from absl import flags

from research import runs
from research.apps import config_flags
from research.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "Training runs to compare (names under --checkpoint_dir).")
flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to score.")
flags.DEFINE_string("output", None, "Path prefix: writes <prefix>.md, .json and .png (its "
                    "folder is created).")
flags.DEFINE_string("checkpoint_dir", runs.CHECKPOINT_DIR, "Parent folder of run checkpoints.")
flags.DEFINE_string("data_dir", None, "TFRecords folder for every run (default: each run's "
                    "own, which must hold the same split).")
flags.DEFINE_string("checkpoint", "best", "best | latest | a checkpoint path prefix (one run "
                    "only).")
config_flags.define_integer("eval_batch_size", None, "Override the runs' eval batch size.",
                            ge=1)
config_flags.define_device_flags()
flags.mark_flags_as_required(["runs", "output"])


def main(argv):
    del argv
    from research.evaluation import compare  # the heavy imports, once the flags parsed

    try:
        compare.check_output_prefix(FLAGS.output)
        config_flags.setup_devices()
        result, raw = compare.compare_runs(FLAGS.checkpoint_dir, FLAGS.runs, FLAGS.split,
                                           data_dir=FLAGS.data_dir, checkpoint=FLAGS.checkpoint,
                                           eval_batch_size=FLAGS.eval_batch_size)
    except UserError as e:
        config_flags.fail(e)
    paths = compare.write_table(result, FLAGS.output)
    paths.append(compare.write_figure(result, raw, FLAGS.output))
    print()
    print(compare.format_table(result))
    for path in paths:
        print(path)


if __name__ == "__main__":
    config_flags.run(main)
