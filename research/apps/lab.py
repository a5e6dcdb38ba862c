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

import os
import shlex
import sys

from absl import flags

from research import files
from research.apps import config_flags
from research.errors import UserError
from research.lab.profiles import PROFILES, Overrides
from research.lab.settings import LabSettings, check, pick_source
from research.lab.stages import CHOICES
from research.training.runlock import RunLock

FLAGS = flags.FLAGS
config_flags.define_max_image_pixels()
flags.DEFINE_string("workdir", ".", "Holds data/, checkpoints/ and logs/ (the report goes to "
                    "logs/lab/).")
flags.DEFINE_string("source", None, "CIFAR-10 source (as make_tfrecords --source). Default: "
                    "../shared/data/cifar10-jpg.tar.gz when it is there, else the official "
                    "archive, downloaded once into <workdir>/data/downloads.")
flags.DEFINE_string("weights", "auto", "Transfer backbone weights: auto (ImageNet when the "
                    "file is cached or downloadable, else the source-task fallback), imagenet "
                    "(stop if unavailable), source_task (the fallback), or a .h5 file.")
flags.DEFINE_list("images", [], "Your own photos, explained by both detectors.")
flags.DEFINE_string("photo_source", None, "The photos stage's photos: a tar or folder with one "
                    "folder per class (cats/, dogs/). Default: ../shared/data/dogs-vs-cats-"
                    "2000.tar when it is there; without either, the stage is skipped (the "
                    "report says why).")
flags.DEFINE_list("stages", list(CHOICES), "Stages to run, in the lab's order.")
flags.DEFINE_enum("profile", "cpu", list(PROFILES), "cpu: finishes on a 2-core machine; gpu: "
                  "full-size settings (bigger backbone inputs, more epochs, MirroredStrategy "
                  "over all GPUs).")
flags.DEFINE_bool("quick", False, "Shrink every stage (tiny step counts and subsets): a few "
                  "minutes on a 2-core CPU, for smoke tests; the report says so.")
flags.DEFINE_bool("progress", None, "Progress bars (default: when stdout is a terminal).")
config_flags.define_flags(Overrides)  # shrinking overrides of the profile (tests use them)
config_flags.define_device_flags()


def settings_from_flags() -> LabSettings:
    o = Overrides(**config_flags.values_from_flags(Overrides))
    progress = sys.stdout.isatty() if FLAGS.progress is None else FLAGS.progress
    return LabSettings(workdir=FLAGS.workdir, source=FLAGS.source, weights=FLAGS.weights,
                       images=tuple(FLAGS.images), photo_source=FLAGS.photo_source,
                       stages=tuple(FLAGS.stages),
                       profile=FLAGS.profile, quick=FLAGS.quick, overrides=o,
                       progress=progress,
                       command=" ".join(["python -m research.apps.lab"]
                                        + [shlex.quote(a) for a in sys.argv[1:]]))


def workdir_lock(workdir: str) -> RunLock:
    """<workdir>/lab.lock while a lab works there: a second lab on the same workdir is refused
    at once, naming the holder; the lock of a dead lab is taken over with a warning."""
    return RunLock(os.path.join(workdir, "lab"),
                   subject=f"--workdir: {workdir} is in use by another lab,")


def main(argv):
    try:
        if argv[1:]:
            raise UserError(f"unexpected arguments {' '.join(argv[1:])} (flags start with --)")
        settings = settings_from_flags()
        check(settings)
        for folder, flag in ((settings.workdir, "--workdir"),
                             (settings.checkpoint_dir, "--workdir (its checkpoints/)"),
                             (settings.log_dir, "--workdir (its logs/)")):
            files.check_writable(folder, flag)  # before the first write
        lock = workdir_lock(settings.workdir).acquire()  # one lab per workdir
    except UserError as e:
        config_flags.fail(e)
    try:
        run(settings)
    finally:
        lock.release()


def run(settings: LabSettings) -> None:
    source, line = pick_source(settings.source, settings.data_dir)
    print(line, flush=True)  # the first line: which data the lab reads
    # Once, before the lab's first TensorFlow call: every run it starts uses this split.
    config_flags.setup_devices(cpu_replicas=settings.overrides.cpu_replicas or 0)

    from research.lab.lab import Preempted  # the heavy imports, once the flags are good
    from research.lab.runner import run_lab
    from research.training.actions import NonFiniteLossError
    from research.training.preemption import PREEMPTED_EXIT

    try:
        run_lab(settings, source, line)
    except (UserError, NonFiniteLossError) as e:
        config_flags.fail(e)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    config_flags.run(main)
