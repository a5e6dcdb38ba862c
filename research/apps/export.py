r"""Rewrites a run's export as training now writes it, and converts it to TFLite.

  python -m research.apps.export --run_name=fast --tflite
  python -m research.apps.export --model=checkpoints/fast/export/model.keras

model.keras becomes Keras' own layers (an export from before them too: it loads with our
package), metadata.json gets the SavedModel's contract, saved_model/ is (re)written, and with
--tflite model.tflite beside them (TFLite built-in ops, float32).
"""

from __future__ import annotations

from absl import flags

from research import runs
from research.apps import config_flags
from research.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "An exported model.keras (metadata.json beside it).")
flags.DEFINE_string("run_name", None, "Instead of --model: the training run whose export to use.")
flags.DEFINE_string("checkpoint_dir", runs.CHECKPOINT_DIR,
                    "Parent folder of training runs (with --run_name).")
flags.DEFINE_bool("tflite", False, "Also write model.tflite, converted from the SavedModel.")


def main(argv):
    del argv
    if (FLAGS.model is None) == (FLAGS.run_name is None):
        config_flags.fail(UserError("--model, --run_name: give exactly one"))
    model_path = FLAGS.model or runs.exported_model_path(FLAGS.checkpoint_dir, FLAGS.run_name)
    flag = "--model" if FLAGS.model else "--run_name"
    try:
        runs.read_metadata(model_path, flag)  # a bad path is one line before TensorFlow
        from research import export  # the heavy imports, once the flags are known good

        written = export.refresh_export(model_path, FLAGS.tflite, flag)
    except UserError as e:
        config_flags.fail(e)
    for path in written:
        print(path)


if __name__ == "__main__":
    config_flags.run(main)
