r"""A sweep: an Optuna study of training runs, prunable at every evaluation, preemption-safe,
on one machine (SQLite, the default) or many (PostgreSQL). Every train flag is the fixed part;
the space file draws the rest (research/sweep/space.py). Trials are the runs <study>_t<NNN>.

  python -m research.apps.sweep --study=photos --space=research/recipes/photos_from_cifar.space \
      --n_trials=12 --flagfile=research/recipes/photos_from_cifar.flags \
      --data_dir=data/photos64 --weights=lab_scratch
  python -m research.apps.sweep --study=photos --report [--test_top=3]

Several workers: start the same command in several processes or on several machines with
--storage=postgresql+psycopg://USER@HOST:PORT/DB (docs/sweeps.md has a SLURM array).

Exit status: 0 done; 1 an error, named in one line; 75 preempted (SIGTERM or SIGINT): the
trial's run was checkpointed and the trial re-queued; run the same command again.
"""

from __future__ import annotations

import sys

from absl import flags, logging

from research.apps import config_flags
from research.errors import PREEMPTED_EXIT, UserError
from research.sweep.study import SweepConfig

FLAGS = flags.FLAGS
config_flags.define_train_flags()
config_flags.define_flags(SweepConfig)
flags.DEFINE_bool("report", False, "Write the study's page (<checkpoint_dir>/<study>_report/"
                  "report.html) from its storage, and nothing else.")
config_flags.define_integer("test_top", 0, "With --report: also score the best K trials on "
                            "test (compare); the choice stays made on val.", ge=0)
config_flags.define_device_flags()

# The train flags a sweep sets itself.
OWN = ("run_name", "restart")


def fixed_part():
    """The trial config's fixed part from the train flags, and those flags as one line (kept
    with the study: a later worker with other fixed flags is refused)."""
    for name in OWN:
        if FLAGS[name].present:
            raise UserError(f"--{name}: a sweep sets it itself (trials are the runs "
                            "<study>_t<NNN>)")
    cfg = config_flags.train_config_from_flags()
    cfg.run_name = f"{FLAGS.study}_t000"  # for the checks; each trial gets its own
    cfg.validate()
    given = sorted(f"--{n}={flag_text(FLAGS[n].value)}" for n in train_flag_names()
                   if FLAGS[n].present and n not in PLACES)
    return cfg, " ".join(given)


def flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# Where things are, not what a trial is: a worker on another machine may name them otherwise.
PLACES = ("data_dir", "checkpoint_dir", "log_dir", "progress")


def train_flag_names() -> list[str]:
    from research.model_options import MODEL_OPTIONS
    from research.training.config import TrainConfig

    names = [f.name for f, _, _ in config_flags.flag_fields(TrainConfig)]
    for options in dict.fromkeys(MODEL_OPTIONS.values()):
        names += [f.name for f, _, _ in config_flags.flag_fields(options)]
    return list(dict.fromkeys(names))


def train_trial(cfg, actions, hparams):
    """One trial's run, as `train` runs it: (summary, the step a signal stopped it at)."""
    from research.explain.hooks import gradcam_actions
    from research.training.loop import train_and_evaluate
    from research.training.preemption import Preemption

    with Preemption() as preemption:
        summary = train_and_evaluate(cfg, actions=gradcam_actions(cfg) + actions + [preemption],
                                     hparams=hparams)
    return summary, preemption.stopped_at


def main(argv):
    del argv
    from research.sweep import study as sweeps
    from research.sweep import space as spaces

    try:
        cfg = SweepConfig(**config_flags.values_from_flags(SweepConfig))
        sweeps.check_name(cfg.study)
        if FLAGS.report:
            from research.sweep.report import write_report

            print(write_report(sweeps.load_study(cfg, FLAGS.checkpoint_dir),
                               FLAGS.checkpoint_dir, FLAGS.test_top))
            return
        if not cfg.space:
            raise UserError("--space: give the search space file (or --report)")
        cfg.resolved_direction()
        fixed, fixed_flags = fixed_part()
        params = spaces.load_space(cfg.space, fixed)
        storage = sweeps.make_storage(cfg, fixed.checkpoint_dir)
        study = sweeps.open_study(cfg, storage, params, fixed_flags, fixed)
    except UserError as e:
        config_flags.fail(e)
    config_flags.setup_devices(fixed.strategy, fixed.cpu_replicas)
    objective = sweeps.make_objective(cfg, fixed, params, train_trial)
    try:
        ran = sweeps.optimize(cfg, study, objective)
    except sweeps.TrialPreempted as e:
        print(f"{e}; the trial is re-queued: run the same command to resume it",
              file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    logging.info("Study %s: %d trial(s) run here, %d finished in all", cfg.study, ran,
                 sweeps.finished(study))
    best = [t for t in study.trials if t.state.name == "COMPLETE"]
    if best:
        print(f"best: trial {study.best_trial.number} (run "
              f"{study.best_trial.user_attrs.get(sweeps.RUN_ATTR)}), val {study.best_value:.4f}, "
              + ", ".join(f"--{k}={v}" for k, v in study.best_params.items()))


if __name__ == "__main__":
    config_flags.run(main)
