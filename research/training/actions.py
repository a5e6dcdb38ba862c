"""Small actions run after each train-loop call (orbit's "actions"): each one owns one concern
(NaN guard, train summaries, evaluation, best checkpoint and early stop, checkpointing,
profiling, images at eval) instead of being threaded through the loop.

An action may name the next step at which the loop must hand control back
(`next_boundary`), prepare before a call (`before`), act after it (`__call__`), and finish
(`end`). They share one `LoopContext`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from research import runs, thresholds
from research.progress import Bar
from research import metrics as detmetrics
from research.training import checkpoints, record
from research.training.config import TrainConfig
from research.training.evaluator import EvalResult, Evaluator
from research.training.model import apply_phase, freeze_whitening_bias, whiten_bias_steps
from research.training.state import Plan, TrainState, since_eval_keys


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class LoopContext:
    cfg: TrainConfig
    state: TrainState
    plan: Plan
    manifest: dict
    writers: record.Writers
    evaluator: Evaluator
    start_step: int
    stop_at: int
    step: int = 0
    steps_run: int = 0          # in the last call
    seconds: float = 0.0        # of the last call
    train_seconds: float = 0.0  # this session
    loss: float = 0.0
    result: EvalResult | None = None  # set by Evaluate in the round it evaluates
    report: dict | None = None
    last_report: dict | None = None
    train_values: dict = dataclasses.field(default_factory=dict)  # of the last call
    stop: bool = False          # set by an action to end training after this round
    rebuild: bool = False       # set by an action that changed what trains (a new phase)

    @property
    def at_end(self) -> bool:
        return self.step == self.plan.total_steps

    @property
    def classifier(self) -> bool:
        return self.cfg.positive_class(self.manifest) is None


def val_report(cfg: TrainConfig, manifest: dict, result: EvalResult,
               interval: bool = False) -> dict:
    """A detector's exact detection metrics of an evaluation at the threshold its policy
    (--threshold_metric) chooses on these val scores (`interval`: with the threshold's
    bootstrap interval, for the final numbers), or a classifier's top-1, top-5 and per-class
    accuracy and confusion matrix (no positive class: no detection metric)."""
    if cfg.positive_class(manifest) is None:
        return detmetrics.classification_report(result.class_ids, result.logits,
                                                manifest["class_names"])
    chosen = thresholds.decision(result.labels, result.scores,
                                 *cfg.threshold_policy(manifest), interval=interval)
    report = detmetrics.detection_report(result.labels, result.scores, chosen["threshold"])
    if interval and cfg.calibrate:  # the final numbers: and the temperature for the export
        chosen["temperature"] = thresholds.fit_temperature(result.labels, result.scores)
    return {**report, **chosen}


class Action:
    def next_boundary(self, ctx: LoopContext) -> int | None:
        return None

    def before(self, ctx: LoopContext) -> None:
        pass

    def __call__(self, ctx: LoopContext) -> None:
        pass

    def end(self, ctx: LoopContext) -> None:
        pass


def drive(ctx: LoopContext, actions: list[Action], train_loop, iterator,
          rebuild: Callable[[], Callable] | None = None) -> None:
    """The loop of every training: run the compiled steps up to the next boundary any action
    asks for (or steps_per_loop), the actions' `before` first and their `__call__` after,
    `rebuild()` the compiled loop when an action set ctx.rebuild, and every action's `end`."""
    state, plan, cfg = ctx.state, ctx.plan, ctx.cfg
    while ctx.step < ctx.stop_at and not ctx.stop:
        bounds = [ctx.stop_at, ctx.step + cfg.steps_per_loop]
        bounds += [b for b in (a.next_boundary(ctx) for a in actions) if b is not None]
        n = min(bounds) - ctx.step
        for action in actions:
            action.before(ctx)
        start = time.perf_counter()
        train_loop(iterator, tf.constant(n))
        ctx.loss = float(state.train_metrics["loss"].result())  # also waits for the steps
        ctx.seconds = time.perf_counter() - start
        ctx.train_seconds += ctx.seconds
        ctx.steps_run, ctx.step = n, state.step
        state.epoch.assign(ctx.step // plan.steps_per_epoch)
        for action in actions:
            action(ctx)
        if ctx.rebuild:
            if rebuild is None:
                raise RuntimeError("an action asked to rebuild a loop that cannot be rebuilt")
            train_loop = rebuild()
            ctx.rebuild = False
    for action in actions:
        action.end(ctx)


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


class NanGuard(Action):
    """Stops with an error, without saving, when the training loss is not finite."""

    def __call__(self, ctx):
        if not math.isfinite(ctx.loss):
            latest = ctx.state.manager.latest_checkpoint
            kept = (f"The last good checkpoint is kept: {latest}." if latest else
                    "No checkpoint had been saved yet.")
            raise NonFiniteLossError(
                f"loss became {ctx.loss} between steps {ctx.step - ctx.steps_run} and "
                f"{ctx.step}; stopped without saving. {kept} Try a lower --learning_rate, "
                "--clip_norm, or --precision=float32.")


class TrainLog(Action):
    """Train scalars to TensorBoard, an orbit-style log line, and the progress bar; then the
    train metrics are reset for the next call."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.bar, self.bar_epoch = None, -1

    def __call__(self, ctx):
        cfg, state = ctx.cfg, ctx.state
        values = {k: float(v.result()) for k, v in state.train_metrics.items()}
        record.log_train(ctx.writers.train, values,
                         float(state.active_optimizer.learning_rate),
                         ctx.steps_run, ctx.seconds, cfg.batch_size, ctx.step)
        ctx.train_values = values
        for metric in state.train_metrics.values():
            metric.reset_state()
        rate = ctx.steps_run * cfg.batch_size / ctx.seconds
        if self.progress and sys.stdout.isatty():  # a log file has the lines below
            per_epoch = ctx.plan.steps_per_epoch
            epoch = (ctx.step - 1) // per_epoch
            if epoch != self.bar_epoch:
                self.bar_epoch, self.bar = epoch, Bar(per_epoch, "step", label=(
                    f"epoch {epoch + 1}/{math.ceil(ctx.plan.total_steps / per_epoch)}"))
            self.bar.update(ctx.step - epoch * per_epoch, loss=values["loss"],
                            img_per_s=round(rate))
        logging.info("train | step %6d | loss %.4f | %.1f steps/s | %.0f img/s%s", ctx.step,
                     ctx.loss, ctx.steps_run / ctx.seconds, rate, loss_scale_note(state))


def loss_scale_note(state) -> str:
    """' | loss scale S, K skipped' for a float16 run (K: steps skipped so far on
    non-finite gradients), else ''."""
    opt = state.active_optimizer
    skipped = getattr(opt, "skipped_steps", None)
    if skipped is None:
        return ""
    return f" | loss scale {float(opt.dynamic_scale.numpy()):g}, {int(skipped.numpy())} skipped"


class Evaluate(Action):
    """Scores the whole val split every `eval_every` steps and at the end of training."""

    def next_boundary(self, ctx):
        return _next_multiple(ctx.step, ctx.plan.eval_every)

    def __call__(self, ctx):
        ctx.result = ctx.report = None
        if ctx.step % ctx.plan.eval_every and not ctx.at_end:
            return
        ctx.result = ctx.evaluator.evaluate("val")
        ctx.report = ctx.last_report = val_report(ctx.cfg, ctx.manifest, ctx.result)
        names = (ctx.manifest["class_names"] if ctx.classifier
                 else ["other", ctx.manifest["positive_class"]])
        record.log_eval(ctx.writers.eval, ctx.result, ctx.report, ctx.step, names,
                        ctx.cfg.run_name)
        r, acc, top5 = ctx.report, ctx.result.class_accuracy, ctx.result.top5_class_accuracy
        classes = "" if acc is None else f" | class acc {acc:.4f} | top-5 {top5:.4f}"
        if ctx.classifier:
            logging.info("eval  | step %6d | val loss %.4f%s", ctx.step, ctx.result.loss, classes)
            return
        logging.info("eval  | step %6d | val loss %.4f | roc_auc %.4f | pr_auc %.4f | f1 %.4f"
                     " @ %.3f%s", ctx.step, ctx.result.loss, r["roc_auc"], r["pr_auc"], r["f1"],
                     r["threshold"], classes)


class Curves(Action):
    """history.jsonl and curves.png beside the checkpoints, redrawn at each evaluation:
    train loss and accuracy (averaged since the last eval), val loss, accuracy, ROC-AUC and
    PR-AUC. A resumed run continues the history of its earlier sessions, and its train
    averages since the last evaluation (kept in the checkpoint, state.since_eval)."""

    def __init__(self, cfg: TrainConfig, start_step: int):
        self.rows = runs.read_history(cfg.run_dir, start_step)

    def __call__(self, ctx):
        keys = since_eval_keys(ctx.cfg)
        sums = ctx.state.since_eval.numpy()
        for i, k in enumerate(keys):
            sums[i] += ctx.train_values.get(k, 0.0) * ctx.steps_run
        sums[-1] += ctx.steps_run
        ctx.state.since_eval.assign(sums if ctx.result is None else np.zeros_like(sums))
        if ctx.result is None:
            return
        train = {k: sums[i] / max(sums[-1], 1) for i, k in enumerate(keys)}
        multiclass = "class_accuracy" in train
        row = {"step": ctx.step, "train_loss": train.get("loss"),
               "train_accuracy": train.get("class_accuracy" if multiclass else "accuracy"),
               "val_loss": ctx.result.loss,
               "val_accuracy": (ctx.result.class_accuracy if multiclass
                                else ctx.result.accuracy),
               "val_roc_auc": _finite(ctx.report.get("roc_auc")),
               "val_pr_auc": _finite(ctx.report.get("pr_auc")),
               "val_top5_accuracy": ctx.result.top5_class_accuracy,
               "accuracy_kind": (f"{len(ctx.manifest['class_names'])}-class accuracy"
                                 if multiclass else "accuracy")}
        self.rows.append(row)
        record.write_history(ctx.cfg, self.rows, ctx.plan.steps_per_epoch)


def _finite(x):
    return x if x is not None and math.isfinite(x) else None


class OnEval(Action):
    """Calls `fn(model, eval_writer, step)` after each evaluation (e.g. Grad-CAM images)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, ctx):
        if ctx.result is not None:
            self.fn(ctx.state.model, ctx.writers.eval, ctx.step)


class BestAndEarlyStop(Action):
    """Keeps the checkpoint with the best val PR-AUC (val N-class accuracy for a classifier:
    data without a positive class, or a source task that leaves it out); stops after
    `patience` evals without a gain (0: never)."""

    def __init__(self, patience: int, metric: str = "pr_auc"):
        self.patience, self.metric = patience, metric

    def __call__(self, ctx):
        if ctx.report is None:
            return
        state = ctx.state
        value = (ctx.result.class_accuracy if self.metric == "class_accuracy"
                 else ctx.report[self.metric])
        if value > float(state.best_metric.numpy()):
            state.best_metric.assign(value)
            state.bad_evals.assign(0)
            checkpoints.save(state.best_manager, ctx.step)
            return
        state.bad_evals.assign_add(1)
        if self.patience and int(state.bad_evals.numpy()) >= self.patience:
            logging.info("Early stop: val %s has not improved for %d evals", self.metric,
                         self.patience)
            ctx.stop = True


class Checkpoint(Action):
    """Saves `ckpt-<step>` every `checkpoint_every` steps, at the stop step, and on a stop."""

    def next_boundary(self, ctx):
        return _next_multiple(ctx.step, ctx.plan.checkpoint_every)

    def __call__(self, ctx):
        if ctx.step % ctx.plan.checkpoint_every == 0 or ctx.step == ctx.stop_at or ctx.stop:
            checkpoints.save(ctx.state.manager, ctx.step)


class PhaseSwitch(Action):
    """fine_tune: at the end of phase 1, unfreezes the base from --fine_tune_from and hands
    training to the phase-2 optimizer (the loop rebuilds its compiled step)."""

    def next_boundary(self, ctx):
        return None if ctx.state.in_phase_2 else ctx.plan.head_steps

    def __call__(self, ctx):
        if ctx.state.in_phase_2 or ctx.step < ctx.plan.head_steps:
            return
        apply_phase(ctx.cfg, ctx.state.model, 2)
        ctx.state.phase.assign(2)
        ctx.rebuild = True
        trainable = sum(int(np.prod(v.shape)) for v in ctx.state.model.trainable_variables)
        logging.info("Phase 2 at step %d: fine-tuning %s parameters at peak lr %g", ctx.step,
                     f"{trainable:,}", ctx.cfg.fine_tune_lr)


class FreezeWhiteningBias(Action):
    """--whiten_bias_epochs: at that step the fast CNN's whitening bias stops training (the
    loop rebuilds its compiled step without it; a resumed run past it freezes it before the
    first step, in the loop)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def next_boundary(self, ctx):
        return self.at_step if ctx.step < self.at_step else None

    def __call__(self, ctx):
        if ctx.step >= self.at_step and freeze_whitening_bias(ctx.state.model):
            logging.info("Step %d: the whitening bias is frozen from now on", ctx.step)
            ctx.rebuild = True


class Profiler(Action):
    """Records a TensorFlow profiler trace of steps [a, b) into the train log folder."""

    def __init__(self, steps: tuple[int, int], log_dir: str):
        self.first, self.last = steps
        self.log_dir = log_dir
        self.running = False

    def next_boundary(self, ctx):
        later = [b for b in (self.first, self.last) if b > ctx.step]
        return min(later) if later else None

    def before(self, ctx):
        if ctx.step == self.first and not self.running:
            tf.profiler.experimental.start(self.log_dir)
            self.running = True

    def __call__(self, ctx):
        if self.running and ctx.step >= self.last:
            self.end(ctx)

    def end(self, ctx):
        if self.running:
            tf.profiler.experimental.stop()
            self.running = False


def best_metric(cfg: TrainConfig, manifest: dict) -> str:
    """What the best checkpoint is chosen by: val PR-AUC, or val N-class accuracy for a
    classifier (no positive class in its data or its classes: PR-AUC is undefined)."""
    return "class_accuracy" if cfg.positive_class(manifest) is None else "pr_auc"


def standard_actions(cfg: TrainConfig, manifest: dict, start_step: int = 0,
                     extra=(), steps_per_epoch: int = 1) -> list[Action]:
    """The loop's actions, in the order they run after each call; `extra` run right after
    the evaluation."""
    metric = best_metric(cfg, manifest)
    actions = [NanGuard(), TrainLog(cfg.progress), Evaluate(), Curves(cfg, start_step), *extra,
               BestAndEarlyStop(cfg.patience, metric)]
    if cfg.transfer == "fine_tune":
        actions.append(PhaseSwitch())  # before Checkpoint: a phase-2 checkpoint says so
    if cfg.whiten_bias_epochs is not None:
        actions.append(FreezeWhiteningBias(whiten_bias_steps(cfg, steps_per_epoch)))
    actions.append(Checkpoint())
    if cfg.profile_steps:
        actions.append(Profiler(cfg.profile_steps, os.path.join(cfg.tb_dir, "train")))
    return actions
