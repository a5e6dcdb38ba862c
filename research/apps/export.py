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
config_flags.define_export_flags()
flags.DEFINE_bool("tflite", False, "Also write model.tflite, converted from the SavedModel.")
config_flags.define_device_flags()


def main(argv):
    del argv
    try:
        model_path, flag = config_flags.export_path()
        runs.read_metadata(model_path, flag)  # a bad path is one line before TensorFlow
        from research import export  # the heavy imports, once the flags are known good

        config_flags.setup_devices()

        written = export.refresh_export(model_path, FLAGS.tflite, flag)
    except UserError as e:
        config_flags.fail(e)
    for path in written:
        print(path)


if __name__ == "__main__":
    config_flags.run(main)
