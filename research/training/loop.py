"""`train_and_evaluate`: the short outer loop (flax's `train_and_evaluate`, orbit's
controller). It builds the state, restores or warm-starts it, then alternates one compiled
call of `steps_per_loop` train steps with the actions that run after it (see actions.py),
and writes the run summary and the export at the end.
"""

from __future__ import annotations

import dataclasses
import shutil

import keras
import tensorflow as tf
from absl import logging

from research import devices, machine, runs, thresholds
from research.data import pipeline
from research.training import checkpoints, cluster, examples, feature_cache, inputs, record, resume
from research.training.actions import (LoopContext, best_metric, drive, standard_actions,
                                       val_report)
from research.errors import UserError
from research.training.config import SIMCLR, ConfigError, TrainConfig
from research.training.evaluator import Evaluator
from research.training.model import apply_phase, freeze_whitening_bias, whiten_bias_steps
from research.training.runlock import RunLock
from research.training.state import Plan, create_train_state, plan_steps
from research.training.steps import make_train_loop
from research.training.strategy import make_strategy


def prepare_config(cfg: TrainConfig) -> TrainConfig:
    """Validated, with precision and --input resolved; a resumed 'auto' run keeps its recorded
    dtype."""
    cfg.validate()
    precision = cfg.precision
    if precision == "auto" and not cfg.restart and runs.has_config(cfg.run_dir):
        precision = runs.read_config(cfg.run_dir).get("precision", precision)
    found = devices.current()
    resolved = machine.resolve_precision(precision, found.capability)
    if resolved == "mixed_float16" and found.capability is None:
        logging.warning("--precision=mixed_float16 without a GPU: float16 is emulated on the "
                        "CPU and slow (fine for tests; --precision=auto picks %s here)",
                        machine.resolve_precision("auto", None))
    chosen = inputs.resolve_input(cfg, pipeline.load_manifest(cfg.data_dir),
                                  on_gpu=found.capability is not None,
                                  replicas=devices.replicas(cfg.cpu_replicas))
    return dataclasses.replace(cfg, precision=resolved, scale=cfg.input_scale, input=chosen)


def run_plan(cfg: TrainConfig, manifest: dict | None = None) -> Plan:
    """The run's length in steps, from its config and the examples it trains on."""
    manifest = manifest or pipeline.load_manifest(cfg.data_dir)
    return plan_steps(cfg, manifest, examples.num_examples(cfg, manifest, "train"))


def finished_summary(cfg: TrainConfig) -> dict | None:
    """The run's train_summary.json if the run has finished (runs.is_finished) and its export
    is written, else None. `cfg` as prepare_config returns it."""
    summary = runs.read_summary(cfg.run_dir)
    if not runs.is_finished(summary, run_plan(cfg).total_steps) or not runs.is_exported(
            cfg.checkpoint_dir, cfg.run_name):
        return None
    return summary


def restore_or_warm_start(cfg: TrainConfig, state, latest: str | None = None) -> None:
    latest = latest or state.manager.latest_checkpoint
    if latest:
        state.checkpoint.restore(latest).assert_existing_objects_matched()
        if state.in_phase_2:
            apply_phase(cfg, state.model, 2)
        logging.info("Resumed %s at step %d (epoch %d%s)", latest, state.step,
                     int(state.epoch.numpy()), ", phase 2" if state.in_phase_2 else "")
    elif cfg.init_checkpoint:
        checkpoints.restore_model(state.model, cfg.init_checkpoint)
        logging.info("Warm-started the model from %s", cfg.init_checkpoint)


def train_and_evaluate(cfg: TrainConfig, flagfile: str | None = None,
                       strategy: tf.distribute.Strategy | None = None,
                       actions=(), hparams: dict | None = None) -> dict:
    """Trains (or resumes) the run in cfg.run_dir, evaluating on val; returns a summary.
    `actions` run after each evaluation (e.g. the train app's Grad-CAM images); `hparams`
    join the run's own in TensorBoard's HParams view (a sweep's parameters)."""
    cfg = prepare_config(cfg)
    cluster.resolve(cfg.strategy)  # a bad cluster stops here, with one line
    resume.check_resume(cfg)  # a resume that changes the network or the data stops here
    resume.check_nothing_lost(cfg)  # ... and so does a start that would overwrite a run
    strategy = strategy or make_strategy(cfg.strategy, cfg.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        below = cfg.batch_size - cfg.batch_size % replicas
        sizes = " or ".join(str(b) for b in (below, below + replicas) if b > 0)
        raise ConfigError(f"--batch_size={cfg.batch_size} is not divisible by the {replicas} "
                          f"replicas (it is global: {replicas} x the batch per replica); "
                          f"use {sizes}")
    worker_cfg = cluster.worker_config(cfg, strategy)  # other workers write to a temp folder
    with RunLock(worker_cfg.run_dir, reentrant=True):
        try:
            summary = _train(worker_cfg, cfg, flagfile, strategy, actions, hparams or {})
        except tf.errors.DataLossError as e:  # a shard damaged while training read it
            raise damaged_shard_error(cfg, e) from None
    # The workers leave together: the chief's exit ends the coordination service, and a
    # worker still saving its last (temporary) checkpoint then fails its heartbeat instead
    # of exiting 75 (seen once when the suite ran two tests at a time). One process: no-op.
    cluster.any_worker(strategy, False)
    return summary


def damaged_shard_error(cfg: TrainConfig, e: Exception) -> pipeline.DataError:
    """The one line for a shard that stopped reading during training: the shard (found by
    checking every shard against the manifest again) and the checkpoint training resumes
    from once the data is rebuilt."""
    pipeline.clear_verified()
    try:
        latest = checkpoints.latest_good_checkpoint(cfg.run_dir, move_aside=False)
    except UserError:  # none readable: said when the run is started again
        latest = None
    kept = (f"the last good checkpoint {latest} is kept" if latest else "no checkpoint "
            "had been written yet")
    then = ("rebuild the data (python -m research.apps.make_tfrecords ... --overwrite), then "
            "run the same command again")
    manifest = pipeline.load_manifest(cfg.data_dir)
    for split in manifest["splits"]:
        try:
            pipeline.shard_paths(cfg.data_dir, manifest, split)
        except pipeline.DataError as bad:
            return pipeline.DataError(f"--data_dir: {bad} (damaged during training); {kept}; "
                                      f"{then}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return pipeline.DataError(f"--data_dir: a shard of {cfg.data_dir} could not be read during "
                              f"training ({first}); {kept}; {then}")


def _train(cfg: TrainConfig, run_cfg: TrainConfig, flagfile, strategy, actions,
           hparams: dict) -> dict:
    """train_and_evaluate under the run lock; `run_cfg` names the run folder to resume from
    (the chief's), `cfg` the one to write."""
    manifest = pipeline.load_manifest(cfg.data_dir)  # an edited manifest stops here ...
    for split in manifest["splits"]:  # ... and shards that do not hold what it lists
        pipeline.shard_paths(cfg.data_dir, manifest, split)
    if cfg.objective == SIMCLR:  # no labels, no evaluation: its own short loop
        from research.training import simclr
        return simclr.pretrain(cfg, flagfile, strategy, actions)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.restart:
        for d in (cfg.run_dir, cfg.tb_dir):
            shutil.rmtree(d, ignore_errors=True)
    plan = run_plan(cfg, manifest)
    # An unreadable latest checkpoint is moved aside (by the chief) before the manager reads
    # the list; every worker resumes from the chief's run folder.
    latest = None if cfg.restart else checkpoints.latest_good_checkpoint(
        run_cfg.run_dir, move_aside=cfg is run_cfg)
    state = create_train_state(cfg, strategy, manifest, plan)
    restore_or_warm_start(cfg, state, latest)
    previous = runs.read_summary(run_cfg.run_dir)
    if runs.is_finished(previous, plan.total_steps, state.step):
        logging.info("Run %s already finished at step %d; nothing to do (--restart trains it "
                     "anew)", cfg.run_name, state.step)
        return previous
    resume.record_session(cfg, flagfile, state.step)  # config.json is written once

    positive_id = cfg.positive_id(manifest)  # None: a classifier
    weights = None
    if cfg.class_weighting == "balanced":
        weights = {k: tf.constant(v) for k, v in pipeline.class_weights(manifest).items()}
    frozen_from = whiten_bias_steps(cfg, plan.steps_per_epoch)
    if frozen_from is not None and state.step >= frozen_from:  # resumed past it
        freeze_whitening_bias(state.model)
    device = inputs.device_data(cfg, strategy) if cfg.input == "device" else None
    train_loop = make_train_loop(cfg, state, positive_id, weights, device)
    iterator = [iter(strategy.distribute_datasets_from_function(  # its one reference:
        inputs.train_input_fn(cfg, state.step)))]                 # pipeline.release
    # --notrain_eval_tta: one view in the evals while training (finish() scores TTA once).
    eval_cfg = (cfg if cfg.train_eval_tta
                else dataclasses.replace(cfg, tta=False, tta_shifts=False))
    ctx = LoopContext(cfg, state, plan, manifest, record.Writers(cfg.tb_dir),
                      Evaluator(eval_cfg, strategy, state.model, positive_id),
                      start_step=state.step,
                      stop_at=min(plan.total_steps, cfg.stop_at_step or plan.total_steps),
                      step=state.step)
    if ctx.start_step == 0 and cfg.transfer != "features":
        record.log_sample_inputs(cfg, manifest, ctx.writers.train)
    record.log_hparams_config(cfg, ctx.writers, plan.total_steps / plan.steps_per_epoch,
                              classifier=positive_id is None, extra=hparams)
    actions = standard_actions(cfg, manifest, ctx.start_step, extra=actions,
                               steps_per_epoch=plan.steps_per_epoch)
    record.log_devices(strategy, cfg.precision)
    record.log_model_summary(cfg, state.model)
    logging.info("Training %s: %d steps (%d per epoch), global batch %d on %d replica(s), %s",
                 cfg.run_name, plan.total_steps, plan.steps_per_epoch, cfg.batch_size,
                 strategy.num_replicas_in_sync, cfg.precision)
    try:
        drive(ctx, actions, train_loop, iterator[0],
              lambda: make_train_loop(cfg, state, positive_id, weights, device))
    finally:
        pipeline.release(iterator)  # freed beside the final evaluation, not before it
    return finish(ctx, previous)


def finish(ctx: LoopContext, previous: dict) -> dict:
    """Writes train_summary.json (one entry per session); at the end of training also the
    final val numbers, the export and the hparams."""
    cfg, state = ctx.cfg, ctx.state
    best = float(state.best_metric.numpy())  # -1 until the first evaluation
    sessions = previous.get("sessions", []) + [
        {"start_step": ctx.start_step, "final_step": state.step,
         "train_seconds": round(ctx.train_seconds, 1)}]
    summary = {"run_name": cfg.run_name, "start_step": ctx.start_step,
               "total_steps": ctx.plan.total_steps, "final_step": state.step,
               "epoch": int(state.epoch.numpy()),
               "best_val_metric": best_metric(cfg, ctx.manifest),
               "best_val": best if best >= 0 else None,
               "train_seconds": round(sum(s["train_seconds"] for s in sessions), 1),
               "stopped_early": ctx.stop, "sessions": sessions}
    if state.step >= ctx.plan.total_steps or ctx.stop:
        report, result, evaluator = ctx.last_report, ctx.result, ctx.evaluator
        if evaluator.cfg.tta != cfg.tta:  # single-view evals while training: TTA once now
            logging.info("Scoring val with TTA (%s) for the final numbers and the export",
                         "mirror + shifts" if cfg.tta_shifts else "mirror")
            evaluator = Evaluator(cfg, evaluator.strategy, state.model,
                                  cfg.positive_id(ctx.manifest))
            report = None
        if report is None:
            result = evaluator.evaluate("val")
        if not ctx.classifier:  # the final numbers: with the threshold's interval
            report = val_report(cfg, ctx.manifest, result, interval=True)
        elif report is None:
            report = val_report(cfg, ctx.manifest, result)
        keys = (("class_accuracy", "top5_class_accuracy") if ctx.classifier else
                ("roc_auc", "pr_auc", "f1", "precision", "recall", "accuracy", "threshold",
                 "threshold_metric", "threshold_reason", "threshold_interval"))
        summary["final_val"] = {k: report[k] for k in keys}
        if not ctx.classifier:
            summary["final_val"]["at_0.5"] = report["at_0.5"]
            logging.info("Threshold %.4f (95%% bootstrap interval %s) by %s: %s",
                         report["threshold"], thresholds.interval_text(
                             report["threshold_interval"]), report["threshold_metric"],
                         report["threshold_reason"])
        model = state.model
        if cfg.transfer == "features":  # export image -> logits, not the head alone
            model = feature_cache.full_model(cfg, ctx.manifest, state.model)
        summary["export"] = record.export_model(model, cfg, ctx.manifest, report)
        final = dict(report)
        if result is not None and result.class_accuracy is not None:
            final["class_accuracy"] = result.class_accuracy
        record.log_hparam_metrics(ctx.writers.eval, "val", final, state.step)
    ctx.writers.flush()
    runs.write_summary(cfg.run_dir, summary)
    return summary
