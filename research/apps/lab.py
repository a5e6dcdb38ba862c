r"""The whole lab in one command: TFRecords, the from-scratch and the transfer detector
(trained, evaluated on the full test set), their comparison, explanations, activation and
filter pictures, and the disk-vs-memory input check; then one report page.

  python -m research.apps.lab                       # what `make run` runs
  python -m research.apps.lab --quick               # every stage shrunk: a smoke test
  python -m research.apps.lab --stages=compare,explain --images=cat.jpg
  python -m research.apps.lab --profile=gpu --workdir=/data/lab

Every stage reuses its finished output (a rerun only writes the report) and an interrupted
training resumes. The report: <workdir>/logs/lab/report.html (self-contained) and report.md.
"""

from __future__ import annotations

import shlex
import sys

from absl import app, flags

from research.apps import config_flags

from research.lab.profiles import PROFILES, Overrides
from research.lab.settings import STAGES, LabSettings

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", ".", "Holds data/, checkpoints/ and logs/ (the report goes to "
                    "logs/lab/).")
flags.DEFINE_string("source", None, "CIFAR-10 source (as make_tfrecords --source). Default: "
                    "../shared/data/cifar10-jpg.tar.gz when it is there, else the official "
                    "archive, downloaded once into <workdir>/data/downloads.")
flags.DEFINE_string("weights", "auto", "Transfer backbone weights: auto (ImageNet when the "
                    "file is cached or downloadable, else the source-task fallback), imagenet "
                    "(stop if unavailable), source_task (the fallback), or a .h5 file.")
flags.DEFINE_list("images", [], "Your own photos, explained by both detectors.")
flags.DEFINE_list("stages", list(STAGES), "Stages to run, in the lab's order.")
flags.DEFINE_enum("profile", "cpu", list(PROFILES), "cpu: finishes on a 2-core machine; gpu: "
                  "full-size settings (bigger backbone inputs, more epochs, MirroredStrategy "
                  "over all GPUs).")
flags.DEFINE_bool("quick", False, "Shrink every stage (tiny step counts and subsets): a few "
                  "minutes on a 2-core CPU, for smoke tests; the report says so.")
flags.DEFINE_bool("progress", None, "Progress bars (default: when stdout is a terminal).")
# Shrinking overrides of the profile (None: the profile's value), e.g. for tests.
flags.DEFINE_integer("train_steps", None, "Steps of the scratch, source-task and memory-check "
                     "runs.")
flags.DEFINE_float("transfer_epochs", None, "Epochs of each transfer phase.")
flags.DEFINE_integer("batch_size", None, "Global batch size of every run.")
flags.DEFINE_integer("eval_batch_size", None, "Eval batch size of every run.")
flags.DEFINE_integer("eval_every_steps", None, "Validation interval of every run.")
flags.DEFINE_list("widths", None, "Scratch network stage widths.")
flags.DEFINE_list("res_blocks", None, "Scratch network residual blocks per stage.")
flags.DEFINE_integer("stem_width", None, "Scratch network stem width.")
flags.DEFINE_string("precision", None, "Precision of every run (train --precision).")
flags.DEFINE_integer("explain_per_class", None, "Test cats (and as many non-cats) explained.")
flags.DEFINE_integer("faithfulness_steps", None, "Deletion/insertion steps.")
flags.DEFINE_integer("num_filters", None, "Filter patterns per layer.")
flags.DEFINE_integer("filter_steps", None, "Gradient-ascent steps per filter pattern.")
flags.DEFINE_integer("gradcam_images", None, "Val images whose Grad-CAM goes to TensorBoard at "
                     "every eval (0: off).")


def _ints(name):
    value = FLAGS[name].value
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value)
    except ValueError:
        raise ValueError(f"--{name}: {','.join(value)!r} is not a list of integers") from None


def settings_from_flags() -> LabSettings:
    o = Overrides(train_steps=FLAGS.train_steps, transfer_epochs=FLAGS.transfer_epochs,
                  batch_size=FLAGS.batch_size, eval_batch_size=FLAGS.eval_batch_size,
                  eval_every_steps=FLAGS.eval_every_steps, widths=_ints("widths"),
                  res_blocks=_ints("res_blocks"), stem_width=FLAGS.stem_width,
                  precision=FLAGS.precision, explain_per_class=FLAGS.explain_per_class,
                  faithfulness_steps=FLAGS.faithfulness_steps, num_filters=FLAGS.num_filters,
                  filter_steps=FLAGS.filter_steps, gradcam_images=FLAGS.gradcam_images)
    progress = sys.stdout.isatty() if FLAGS.progress is None else FLAGS.progress
    return LabSettings(workdir=FLAGS.workdir, source=FLAGS.source, weights=FLAGS.weights,
                       images=tuple(FLAGS.images), stages=tuple(FLAGS.stages),
                       profile=FLAGS.profile, quick=FLAGS.quick, overrides=o,
                       progress=progress,
                       command=" ".join(["python -m research.apps.lab"]
                                        + [shlex.quote(a) for a in sys.argv[1:]]))


NUMERIC_RULES = (  # (flag, low, high, low allowed, high allowed); unset flags are skipped
    ("train_steps", 1, None, True, True), ("transfer_epochs", 0, None, False, True),
    ("batch_size", 1, None, True, True), ("eval_batch_size", 1, None, True, True),
    ("eval_every_steps", 1, None, True, True), ("stem_width", 1, None, True, True),
    ("explain_per_class", 0, None, True, True), ("faithfulness_steps", 1, None, True, True),
    ("num_filters", 0, None, True, True), ("filter_steps", 1, None, True, True),
    ("gradcam_images", 0, None, True, True),
)


def main(argv):
    from research.lab.settings import LabError, check, pick_source

    config_flags.exit_on_numeric_errors(NUMERIC_RULES)
    try:
        if argv[1:]:
            raise ValueError(f"unexpected arguments {' '.join(argv[1:])} (flags start with --)")
        settings = settings_from_flags()
        check(settings)
    except (LabError, ValueError) as e:
        sys.exit(f"error: {e}")
    source, line = pick_source(settings.source, settings.data_dir)
    print(line, flush=True)  # the first line: which data the lab reads

    from research.data.pipeline import DataError
    from research.data.sources import SourceError
    from research.explain.loading import ModelLoadError
    from research.lab.runner import run_lab
    from research.lab.stages import Preempted
    from research.models.backbones import BackboneError
    from research.training.config import ConfigError
    from research.training.faults import PREEMPTED_EXIT
    from research.training.loop import NonFiniteLossError

    try:
        run_lab(settings, source, line)
    except (LabError, ConfigError, DataError, SourceError, BackboneError, ModelLoadError,
            NonFiniteLossError) as e:
        sys.exit(f"error: {e}")
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    app.run(main)
