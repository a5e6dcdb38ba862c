"""A sweep: an Optuna study whose trials are ordinary runs.

Each trial is the run `<study>_t<NNN>` (its own checkpoint and log folders, resumable,
exported), the fixed part of its config from train's flags and the rest drawn from the space
file. Its evaluations report the val metric to the trial (`ReportToTrial`); a trial the pruner
stops ends at that evaluation, is PRUNED in the study, records `pruned_at` in its
train_summary.json, is exported from its best checkpoint and never resumed.

Storage: SQLite at `<checkpoint_dir>/<study>.db` by default (embedded, nothing to start), or
any SQLAlchemy URL (`postgresql+psycopg://...`) for several machines. Several `sweep` processes
on one study share it: each asks the storage for the next trial, so none runs a trial twice,
and the pruner reads every worker's reports.

Preemption: SIGTERM (or SIGINT) during a trial checkpoints its run at the next loop boundary
(as `train`), the trial is marked failed and re-queued with the same parameters and run
(`RetryHeartbeatStaleTrialCallback`, the run's name in its user attributes), and the process exits
75; the next `sweep` of the study resumes that run from its checkpoint. A worker killed
outright stops sending heartbeats: once they are `grace` seconds stale, the next worker to
ask for a trial fails it and re-queues it the same way.
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
import time
import warnings

import optuna
from absl import logging

from research import runs
from research.errors import UserError
from research.fields import setting
from research.sweep import space as spaces
from research.training import checkpoints
from research.training.actions import Action, best_metric
from research.training.config import TrainConfig

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
METRICS = {"best_val": "maximize", "val_loss": "minimize"}  # metric -> its direction
RUN_ATTR = "run"  # the trial's user attribute naming its run (inherited by a retry)


class SweepError(UserError):
    """A sweep that cannot start; the message names the flag or file."""


class TrialPreempted(Exception):
    """SIGTERM or SIGINT during a trial: its run is checkpointed, the trial is re-queued."""

    def __init__(self, run: str, step: int):
        super().__init__(f"trial run {run} preempted at step {step}")
        self.run, self.step = run, step


@dataclasses.dataclass
class SweepConfig:
    """The sweep's own settings (the sweep app's flags come from these fields)."""
    study: str = setting(None, "Study name: its trials are the runs <study>_t<NNN>; a portable "
                         "file name (letters, digits, ._-).")
    space: str | None = setting(None, "The search space: one train flag per line with its "
                                "distribution, e.g. --learning_rate=loguniform(1e-4, 3e-3), "
                                "--rotation_range=int(0, 40), --head=choice(max, gap).")
    n_trials: int = setting(10, "Finished trials (complete or pruned) the study should have; "
                            "every worker stops when it does.", ge=1)
    sampler: str = setting("tpe", "How the next trial's values are drawn.", choices=SAMPLERS)
    pruner: str = setting("median", "Stops a hopeless trial at an evaluation (median: below "
                          "the median of earlier trials at the same step).", choices=PRUNERS)
    pruner_startup_trials: int = setting(5, "Trials that finish before the median pruner "
                                         "prunes.", ge=0)
    metric: str = setting("best_val", "best_val: the run's best val metric (PR-AUC of a "
                          "detector, N-class accuracy of a classifier); val_loss: its lowest "
                          "val loss.", choices=tuple(METRICS))
    direction: str | None = setting(None, "maximize or minimize (default: the metric's own; "
                                    "the other is refused).", choices=("maximize", "minimize"))
    storage: str | None = setting(None, "Optuna storage URL (default sqlite:///"
                                  "<checkpoint_dir>/<study>.db); several machines: "
                                  "postgresql+psycopg://user@host:port/db.")
    seed: int = setting(0, "The sampler's seed.")
    heartbeat_seconds: int = setting(60, "A running trial's heartbeat; one stale for twice "
                                     "this is failed and retried.", ge=1)
    max_retries: int = setting(3, "Retries of a preempted or killed trial.", ge=0)
    baseline_trial: bool = setting(False, "A new study's first trial takes the fixed flags' "
                                   "own values of the swept flags (the recipe as shipped), "
                                   "so the report compares the sweep with it.")

    def resolved_direction(self) -> str:
        own = METRICS[self.metric]
        if self.direction is not None and self.direction != own:
            raise SweepError(f"--direction={self.direction} contradicts --metric={self.metric}"
                             f" (higher is better for best_val, lower for val_loss): use "
                             f"--direction={own} or leave it unset")
        return own

    def storage_url(self, checkpoint_dir: str) -> str:
        if self.storage:
            return self.storage
        return "sqlite:///" + os.path.abspath(os.path.join(checkpoint_dir, f"{self.study}.db"))


def check_name(study: str | None) -> None:
    if not study:
        raise SweepError("--study: give the study's name")
    problem = runs.name_error(study)  # the run-name rule: trials are runs <study>_t<NNN>
    if problem:
        raise SweepError(f"--study: {problem}")


def make_storage(cfg: SweepConfig, checkpoint_dir: str) -> optuna.storages.RDBStorage:
    """The study's storage, reached now: an unreachable URL is one line before any trial."""
    url = cfg.storage_url(checkpoint_dir)
    _quiet_optuna()
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url[len("sqlite:///"):]) or ".", exist_ok=True)
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=cfg.heartbeat_seconds,
                grace_period=2 * cfg.heartbeat_seconds,
                heartbeat_stale_trial_callback=retry_callback(cfg),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except Exception as e:  # SQLAlchemy's errors (no driver, refused, bad URL), optuna's
            if _schema_race(e) and attempt < SCHEMA_RACE_RETRIES:
                time.sleep(0.5 + attempt)  # another worker is creating the tables: they exist
                continue                   # once it commits
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SweepError(f"--storage: cannot use {url}: {reason}") from None


SCHEMA_RACE_RETRIES = 5


def _schema_race(e: Exception) -> bool:
    """Two workers creating a new database's tables at once: PostgreSQL refuses the second
    CREATE TABLE with a unique violation on its catalogue (pg_type) or 'already exists';
    SQLite with a second row in alembic_version, or a lock held by the first."""
    text, kind = str(e), type(e).__name__
    if kind == "OperationalError":
        return "database is locked" in text or "already exists" in text
    return kind in ("IntegrityError", "ProgrammingError") and any(
        s in text for s in ("already exists", "pg_type_typname_nsp_index", "duplicate key",
                            "UNIQUE constraint failed: alembic_version"))


def retry_callback(cfg: SweepConfig):
    return optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=cfg.max_retries, inherit_intermediate_values=True)


def make_sampler(cfg: SweepConfig, params: tuple[spaces.Param, ...]):
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(spaces.grid(params), seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed)


def make_pruner(cfg: SweepConfig):
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                       n_warmup_steps=0,
                                       n_min_trials=1)


def open_study(cfg: SweepConfig, storage, params: tuple[spaces.Param, ...],
               fixed_flags: str, fixed: TrainConfig | None = None) -> optuna.Study:
    """The study, created or loaded; one whose space, direction or fixed part changed since
    it was created is refused in one line. `fixed`: the fixed config (for a baseline trial)."""
    direction = cfg.resolved_direction()
    _quiet_optuna()
    names = {s.study_name: s for s in optuna.study.get_all_study_summaries(storage)}
    if cfg.study in names and names[cfg.study].direction.name.lower() != direction:
        raise SweepError(f"--study={cfg.study} was created to "
                         f"{names[cfg.study].direction.name.lower()}, not {direction}")
    study = optuna.create_study(study_name=cfg.study, storage=storage, direction=direction,
                                sampler=make_sampler(cfg, params), pruner=make_pruner(cfg),
                                load_if_exists=True)
    recorded = study.user_attrs
    fingerprint = spaces.fingerprint(params)
    if "space" in recorded and recorded["space"] != fingerprint:
        raise SweepError(f"--space: the space of study {cfg.study} changed since it was "
                         f"created (was: {recorded['space']}; now: {fingerprint}); start a new "
                         "--study")
    if "fixed" in recorded and recorded["fixed"] != fixed_flags:
        raise SweepError(f"the fixed train flags of study {cfg.study} changed since it was "
                         f"created (were: {recorded['fixed']}); start a new --study")
    if "space" not in recorded:
        study.set_user_attr("space", fingerprint)
        study.set_user_attr("fixed", fixed_flags)
        study.set_user_attr("metric", cfg.metric)
        if cfg.baseline_trial and fixed is not None:
            enqueue_baseline(study, params, fixed)
    return study


def fixed_values(params: tuple[spaces.Param, ...], fixed: TrainConfig) -> dict:
    """The fixed config's own values of the swept flags (its model's defaults included)."""
    from research.model_options import options_class

    cls = options_class(fixed.model, fixed.uses_backbone)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if cls else {}
    return {p.name: (fixed.model_options.get(p.name, defaults.get(p.name)) if p.option
                     else getattr(fixed, p.name)) for p in params}


def enqueue_baseline(study: optuna.Study, params, fixed: TrainConfig) -> None:
    values = fixed_values(params, fixed)
    outside = [f"--{p.name}={values[p.name]}" for p in params
               if not _inside(p, values[p.name])]
    if outside:
        raise SweepError(f"--baseline_trial: the fixed value of {', '.join(outside)} is "
                         "outside the space; widen the space or drop --baseline_trial")
    study.enqueue_trial(values, user_attrs={"baseline": True})


def _inside(p: spaces.Param, value) -> bool:
    if p.kind == "choice":
        return value in p.args
    return value is not None and p.args[0] <= value <= p.args[1]


def load_study(cfg: SweepConfig, checkpoint_dir: str) -> optuna.Study:
    """An existing study (for --report)."""
    storage = make_storage(cfg, checkpoint_dir)
    _quiet_optuna()
    try:
        return optuna.load_study(study_name=cfg.study, storage=storage)
    except KeyError:
        raise SweepError(f"--study={cfg.study}: no such study in "
                         f"{cfg.storage_url(checkpoint_dir)}") from None


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    pylogging.getLogger("sqlalchemy").setLevel(pylogging.WARNING)


class ReportToTrial(Action):
    """Reports the val metric of each evaluation to the trial; stops the run when the pruner
    says so, and then makes its best checkpoint the run's export (end, before finish). A
    fine-tune run is never pruned in its head phase: trials that differ only in fine-tuning
    are identical there, so the pruner would judge them on their image size alone (the first
    photo sweep pruned five trials at step 31 of 434 that way)."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None

    def __call__(self, ctx):
        if ctx.report is None or self.pruned_at is not None:
            return
        if self.metric == "val_loss":
            value = float(ctx.result.loss)
        else:
            name = best_metric(ctx.cfg, ctx.manifest)
            value = float(ctx.result.class_accuracy if name == "class_accuracy"
                          else ctx.report[name])
        self.trial.report(value, ctx.step)
        head_steps = ctx.plan.head_steps if ctx.cfg.transfer == "fine_tune" else None
        if head_steps and ctx.step <= head_steps:
            return  # the head phase: the fine-tuning values the trial tries have not acted yet
        if self.trial.should_prune():
            self.pruned_at = ctx.step
            ctx.stop = True
            logging.info("Trial %d pruned at step %d (val %s %.4f)", self.trial.number,
                         ctx.step, self.metric, value)

    def end(self, ctx):
        if self.pruned_at is None:
            return
        best = ctx.state.best_manager.latest_checkpoint
        if best:  # the export and the final val numbers are the best checkpoint's
            checkpoints.restore_model(ctx.state.model, best)
            ctx.last_report, ctx.result = None, None


def trial_value(summary: dict, cfg: TrainConfig, metric: str) -> float:
    if metric == "val_loss":
        losses = [r["val_loss"] for r in runs.read_history(cfg.run_dir)
                  if r.get("val_loss") is not None]
        if not losses:
            raise SweepError(f"run {cfg.run_name} has no val loss")
        return float(min(losses))
    if summary.get("best_val") is None:
        raise SweepError(f"run {cfg.run_name} finished without an evaluation")
    return float(summary["best_val"])


def run_name(study: str, trial) -> str:
    """The trial's run: its own, or the one of the trial it retries."""
    return trial.user_attrs.get(RUN_ATTR) or f"{study}_t{trial.number:03d}"


def make_objective(cfg: SweepConfig, fixed: TrainConfig, params: tuple[spaces.Param, ...],
                   train_fn):
    """The objective: the trial's run trained (or resumed) by `train_fn(cfg, actions,
    hparams)`, which returns (summary, preempted_at)."""

    def objective(trial) -> float:
        run = run_name(cfg.study, trial)
        trial.set_user_attr(RUN_ATTR, run)
        values = spaces.suggest(trial, params)
        trial_cfg = spaces.apply(fixed, params, values, run)
        trial_cfg.validate()  # a bad combination fails this trial in one line
        report = ReportToTrial(trial, cfg.metric)
        logging.info("Trial %d: run %s, %s", trial.number, run,
                     ", ".join(f"--{k}={v}" for k, v in values.items()))
        summary, preempted_at = train_fn(trial_cfg, [report], values)
        if preempted_at is not None:
            raise TrialPreempted(run, preempted_at)
        if report.pruned_at is not None:
            summary = {**runs.read_summary(trial_cfg.run_dir), "pruned_at": report.pruned_at}
            runs.write_summary(trial_cfg.run_dir, summary)
            raise optuna.TrialPruned(f"pruned at step {report.pruned_at}")
        return trial_value(summary, trial_cfg, cfg.metric)

    return objective


def finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def optimize(cfg: SweepConfig, study: optuna.Study, objective) -> int:
    """Runs trials until the study has cfg.n_trials finished ones (any worker's); returns
    how many this process ran. A preempted trial is re-queued and TrialPreempted raised."""
    remaining = cfg.n_trials - finished(study)
    if remaining <= 0:
        return 0
    before = len(study.trials)
    stop = optuna.study.MaxTrialsCallback(
        cfg.n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    try:
        study.optimize(objective, n_trials=remaining, callbacks=[stop],
                       catch=(UserError,), gc_after_trial=True)
    except TrialPreempted as e:
        failed = [t for t in study.get_trials(deepcopy=False)
                  if t.user_attrs.get(RUN_ATTR) == e.run and
                  t.state == optuna.trial.TrialState.FAIL]
        if failed:
            retry_callback(cfg)(study, failed[-1])
        raise
    return len(study.trials) - before
