"""The custom training loop: strategy, state, train/eval steps and `train_and_evaluate`.

Layout follows simclr/orbit: everything stateful is created inside `strategy.scope()`, the
global step is `optimizer.iterations`, one `tf.function` runs `steps_per_loop` replica steps,
and metrics are written then reset once per loop. The learning rate and the data order are
functions of the step, so a run killed at any checkpoint resumes onto the same trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from research import plots
from research.data import pipeline
from research.models import build_model
from research.training import metrics as detmetrics
from research.training.config import ConfigError, TrainConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Devices, strategy, precision.

def configure_cpu_replicas(n: int) -> None:
    """Splits the CPU into n logical devices (must run before TensorFlow initialises)."""
    if n <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        raise ConfigError(f"--cpu_replicas={n}: TensorFlow is already initialised with "
                          f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s); "
                          "set it before any TensorFlow work") from e


def make_strategy(name: str = "auto", cpu_replicas: int = 0) -> tf.distribute.Strategy:
    configure_cpu_replicas(cpu_replicas)
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 or (not gpus and cpu_replicas > 1) else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
    if name == "mirrored":
        devices = None if gpus else [d.name for d in cpus]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"--strategy: unknown strategy {name!r}")


def resolve_precision(precision: str) -> str:
    """'auto' picks bf16 where the CPU has AMX or AVX512-BF16 and there is no GPU."""
    if precision != "auto":
        return precision
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if "amx_bf16" in flags or "avx512_bf16" in flags:
            return "mixed_bfloat16"
    except OSError:
        pass
    return "float32"


@keras.saving.register_keras_serializable(package="research")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then cosine decay to `peak * final_fraction` at `total_steps`."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int,
                 final_fraction: float = 0.0):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.maximum(float(self.warmup_steps), 1.0)
        decay = tf.maximum(float(self.total_steps - self.warmup_steps), 1.0)
        progress = tf.clip_by_value((step - self.warmup_steps) / decay, 0.0, 1.0)
        cosine = self.final_fraction + (1 - self.final_fraction) * 0.5 * (
            1.0 + tf.cos(math.pi * progress))
        return self.peak * tf.where(step < self.warmup_steps, (step + 1.0) / warm, cosine)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "final_fraction": self.final_fraction}


# ---------------------------------------------------------------------------------------------
# State.

@dataclasses.dataclass
class TrainState:
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    best_manager: tf.train.CheckpointManager
    epoch: tf.Variable
    best_metric: tf.Variable
    bad_evals: tf.Variable
    train_metrics: dict
    eval_metrics: dict

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())


def num_outputs(cfg: TrainConfig, manifest: dict) -> int:
    return len(manifest["class_names"]) if cfg.objective == "multiclass" else 1


def make_optimizer(cfg: TrainConfig, schedule) -> keras.optimizers.Optimizer:
    if cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=True,
                                   weight_decay=cfg.weight_decay or None)
    else:
        opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    # Decay conv/dense kernels only, not BN scales and shifts or biases.
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if cfg.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def create_train_state(cfg: TrainConfig, strategy: tf.distribute.Strategy, manifest: dict,
                       total_steps: int, steps_per_epoch: int) -> TrainState:
    """Model, optimizer, metrics and checkpoint, all created inside strategy.scope()."""
    with strategy.scope():
        model = build_model(cfg.model, manifest["image_shape"], num_outputs(cfg, manifest),
                            dtype=None if cfg.precision == "float32" else cfg.precision,
                            **cfg.model_options)
        schedule = WarmupCosine(cfg.learning_rate, int(cfg.warmup_epochs * steps_per_epoch),
                                total_steps, cfg.final_lr_fraction)
        optimizer = make_optimizer(cfg, schedule)
        optimizer.build(model.trainable_variables)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        best = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_val_pr_auc")
        bad = tf.Variable(0, dtype=tf.int64, trainable=False, name="evals_without_gain")
        multiclass = cfg.objective == "multiclass"
        train_metrics = {
            "loss": keras.metrics.Mean(name="loss"),
            "accuracy": keras.metrics.BinaryAccuracy(name="accuracy"),
            "roc_auc": keras.metrics.AUC(curve="ROC", num_thresholds=500, name="roc_auc"),
        }
        eval_metrics = {
            "loss": keras.metrics.Mean(name="loss"),
            "accuracy": keras.metrics.BinaryAccuracy(name="accuracy"),
        }
        if multiclass:
            for d in (train_metrics, eval_metrics):
                d["class_accuracy"] = keras.metrics.SparseCategoricalAccuracy("class_accuracy")
        # Keras seed-generator states (dropout masks) are not tracked through the model by
        # tf.train.Checkpoint; without them a resumed run would replay the first masks.
        rng_states = [v for v in model.non_trainable_variables if "seed_generator" in v.path]
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch,
                                         best_metric=best, bad_evals=bad, rng_states=rng_states)
        manager = tf.train.CheckpointManager(checkpoint, cfg.run_dir,
                                             max_to_keep=cfg.keep_checkpoints,
                                             step_counter=optimizer.iterations)
        best_manager = tf.train.CheckpointManager(checkpoint, os.path.join(cfg.run_dir, "best"),
                                                  max_to_keep=1, checkpoint_name="best",
                                                  step_counter=optimizer.iterations)
    return TrainState(strategy, model, optimizer, checkpoint, manager, best_manager, epoch, best,
                      bad, train_metrics, eval_metrics)


# ---------------------------------------------------------------------------------------------
# Steps.

def positive_scores(logits: tf.Tensor, objective: str, positive_id: int) -> tf.Tensor:
    """The detector's probability of the positive class."""
    logits = tf.cast(logits, tf.float32)
    if objective == "binary":
        return tf.sigmoid(logits[:, 0])
    return tf.nn.softmax(logits, axis=-1)[:, positive_id]


def per_example_loss(cfg: TrainConfig, batch: dict, logits: tf.Tensor,
                     weights: dict | None) -> tf.Tensor:
    logits = tf.cast(logits, tf.float32)
    if cfg.objective == "binary":
        y = tf.cast(batch["label"], tf.float32)[:, None]
        loss = keras.losses.binary_crossentropy(y, logits, from_logits=True,
                                                label_smoothing=cfg.label_smoothing)
        w = None if weights is None else tf.gather(weights["binary"], batch["label"])
    else:
        y = tf.one_hot(batch["class_id"], tf.shape(logits)[-1])
        loss = keras.losses.categorical_crossentropy(y, logits, from_logits=True,
                                                     label_smoothing=cfg.label_smoothing)
        w = None if weights is None else tf.gather(weights["multiclass"], batch["class_id"])
    return loss if w is None else loss * w


def make_train_loop(cfg: TrainConfig, state: TrainState, positive_id: int,
                    weights: dict | None):
    """A tf.function that runs `num_steps` distributed steps from `iterator`."""
    strategy, model, optimizer = state.strategy, state.model, state.optimizer
    m = state.train_metrics
    replicas = strategy.num_replicas_in_sync

    # XLA compiles the forward and backward pass; the iterator, the all-reduce and the
    # optimizer update stay outside (XLA has no kernel for IteratorGetNext). Without XLA it
    # is not a nested tf.function: synchronised BatchNorm all-reduces inside it.
    def forward_backward(batch):
        with tf.GradientTape() as tape:
            logits = model(batch["image"], training=True)
            per_ex = per_example_loss(cfg, batch, logits, weights)
            loss = tf.nn.compute_average_loss(per_ex, global_batch_size=cfg.batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)
        return tape.gradient(scaled, model.trainable_variables), per_ex, logits

    if cfg.jit_compile:
        if replicas > 1:
            raise ConfigError("--jit_compile needs a single replica: synchronised BatchNorm "
                              "all-reduces inside the compiled step")
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(batch):
        grads, per_ex, logits = forward_backward(batch)
        if cfg.clip_norm:
            # Clip the global (all-replica) gradient; Keras would clip per replica. Its own
            # all-reduce then sums the 1/replicas shares back to the clipped total.
            ctx = tf.distribute.get_replica_context()
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                grads = [g / optimizer.dynamic_scale for g in grads]
                grads, _ = tf.clip_by_global_norm(grads, cfg.clip_norm)
                grads = [g * optimizer.dynamic_scale for g in grads]
            else:
                grads, _ = tf.clip_by_global_norm(grads, cfg.clip_norm)
            grads = [g / replicas for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        scores = positive_scores(logits, cfg.objective, positive_id)
        m["loss"].update_state(per_ex)
        m["accuracy"].update_state(batch["label"], scores)
        m["roc_auc"].update_state(batch["label"], scores)
        if "class_accuracy" in m:
            m["class_accuracy"].update_state(batch["class_id"], logits)

    @tf.function
    def train_loop(iterator, num_steps):
        for _ in tf.range(num_steps):
            strategy.run(replica_step, args=(next(iterator),))

    return train_loop


def make_eval_step(cfg: TrainConfig, state: TrainState, positive_id: int):
    strategy, model, m = state.strategy, state.model, state.eval_metrics

    def replica_step(batch):
        logits = model(batch["image"], training=False)
        scores = positive_scores(logits, cfg.objective, positive_id)
        if cfg.tta:  # average the detector probability over the image and its mirror
            flipped = model(tf.reverse(batch["image"], axis=[2]), training=False)
            scores = 0.5 * (scores + positive_scores(flipped, cfg.objective, positive_id))
        per_ex = per_example_loss(cfg, batch, logits, None)
        m["loss"].update_state(per_ex)
        m["accuracy"].update_state(batch["label"], scores)
        if "class_accuracy" in m:
            m["class_accuracy"].update_state(batch["class_id"], logits)
        return {"score": scores, "label": batch["label"], "class_id": batch["class_id"],
                "index": batch["index"], "logits": tf.cast(logits, tf.float32)}

    @tf.function
    def eval_step(dist_batch):
        out = strategy.run(replica_step, args=(dist_batch,))
        return {k: strategy.gather(v, axis=0) for k, v in out.items()}

    return eval_step


@dataclasses.dataclass
class EvalResult:
    split: str
    scores: np.ndarray
    labels: np.ndarray
    class_ids: np.ndarray
    index: np.ndarray
    logits: np.ndarray
    loss: float
    accuracy: float
    class_accuracy: float | None


def evaluate(cfg: TrainConfig, state: TrainState, split: str, positive_id: int,
             eval_step=None, progress: bool = False) -> EvalResult:
    """One pass over the whole split (no example dropped); outputs sorted by split index."""
    eval_step = eval_step or make_eval_step(cfg, state, positive_id)
    for metric in state.eval_metrics.values():
        metric.reset_state()
    ds = pipeline.make_dataset(cfg.data_dir, split, cfg.eval_batch_size, training=False,
                               scale=cfg.scale)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dist = state.strategy.experimental_distribute_dataset(ds.with_options(options))
    n = pipeline.load_manifest(cfg.data_dir)["splits"][split]["num_examples"]
    bar = keras.utils.Progbar(n, unit_name="image") if progress else None
    parts = []
    for batch in dist:
        out = {k: v.numpy() for k, v in eval_step(batch).items()}
        parts.append(out)
        if bar:
            bar.add(len(out["score"]))
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cat["index"])
    cat = {k: v[order] for k, v in cat.items()}
    if len(cat["index"]) != n or not np.array_equal(cat["index"], np.arange(n)):
        raise RuntimeError(f"evaluation of {split} saw {len(cat['index'])} examples, the "
                           f"manifest lists {n}")
    em = state.eval_metrics
    return EvalResult(split, cat["score"], cat["label"], cat["class_id"], cat["index"],
                      cat["logits"], float(em["loss"].result()), float(em["accuracy"].result()),
                      float(em["class_accuracy"].result()) if "class_accuracy" in em else None)


# ---------------------------------------------------------------------------------------------
# Run record, summaries, export.

def versions() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    import cv2
    import matplotlib

    return {"python": sys.version.split()[0], "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
            "matplotlib": matplotlib.__version__, "git_commit": commit or "unknown",
            "git_dirty": bool(dirty)}


def write_run_record(cfg: TrainConfig, flagfile: str | None = None) -> None:
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json())
    with open(os.path.join(cfg.run_dir, "versions.json"), "w") as f:
        json.dump(versions(), f, indent=1)
    if flagfile is not None:
        with open(os.path.join(cfg.run_dir, "flags.txt"), "w") as f:
            f.write(flagfile)


def _image_summary(name: str, fig, step: int) -> None:
    png = plots.figure_to_png(fig)
    tf.summary.image(name, tf.image.decode_png(png)[None], step=step)


def log_eval(writer, result: EvalResult, report: dict, step: int, names) -> None:
    with writer.as_default(step=step):
        tf.summary.scalar("loss", result.loss)
        tf.summary.scalar("accuracy", result.accuracy)
        if result.class_accuracy is not None:
            tf.summary.scalar("class_accuracy", result.class_accuracy)
        for k in ("roc_auc", "pr_auc", "precision", "recall", "f1", "threshold"):
            tf.summary.scalar(k, report[k])
        tf.summary.scalar("f1_at_0.5", report["at_0.5"]["f1"])
        _image_summary("confusion_matrix", detmetrics.confusion_figure(
            report["confusion_matrix"], names, f"{result.split} at t={report['threshold']:.3f}"),
            step)
        _image_summary("roc_pr_curves", detmetrics.curves_figure(
            result.labels, result.scores, f"{result.split}, step {step}"), step)


def export_model(model: keras.Model, cfg: TrainConfig, manifest: dict, threshold: float) -> str:
    """Saves the model as .keras plus the metadata `predict` needs."""
    out = os.path.join(cfg.run_dir, "export")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.keras")
    model.save(path)
    meta = {"objective": cfg.objective, "positive_class": manifest["positive_class"],
            "positive_class_id": manifest["positive_class_id"],
            "class_names": manifest["class_names"], "image_shape": manifest["image_shape"],
            "scale": cfg.scale, "threshold": threshold, "tta": cfg.tta}
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return path


# ---------------------------------------------------------------------------------------------

def plan_steps(cfg: TrainConfig, manifest: dict) -> tuple[int, int]:
    spe = pipeline.steps_per_epoch(manifest, cfg.batch_size)
    total = cfg.train_steps or max(1, int(round(cfg.epochs * spe)))
    return spe, total


def train_and_evaluate(cfg: TrainConfig, flagfile: str | None = None,
                       strategy: tf.distribute.Strategy | None = None) -> dict:
    """Trains (or resumes) the run in cfg.run_dir, evaluating on val; returns a summary."""
    cfg.validate()
    manifest = pipeline.load_manifest(cfg.data_dir)
    if cfg.deterministic:
        keras.utils.set_random_seed(cfg.seed)
        tf.config.experimental.enable_op_determinism()
    else:
        keras.utils.set_random_seed(cfg.seed)
    strategy = strategy or make_strategy(cfg.strategy, cfg.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise ConfigError(f"--batch_size={cfg.batch_size} is not divisible by the "
                          f"{replicas} replicas")
    if cfg.restart:
        for d in (cfg.run_dir, cfg.tb_dir):
            shutil.rmtree(d, ignore_errors=True)
    spe, total_steps = plan_steps(cfg, manifest)
    eval_every = cfg.eval_every_steps or spe
    ckpt_every = cfg.checkpoint_every_steps or eval_every
    positive_id = manifest["positive_class_id"]
    names = ["other", manifest["positive_class"]]

    state = create_train_state(cfg, strategy, manifest, total_steps, spe)
    latest = state.manager.latest_checkpoint
    if latest:
        state.checkpoint.restore(latest).assert_existing_objects_matched()
        logging.info("Resumed %s at step %d (epoch %d)", latest, state.step,
                     int(state.epoch.numpy()))
    elif cfg.init_checkpoint:
        tf.train.Checkpoint(model=state.model).restore(cfg.init_checkpoint).expect_partial()
        logging.info("Warm-started the model from %s", cfg.init_checkpoint)
    start_step = state.step
    summary_path = os.path.join(cfg.run_dir, "train_summary.json")
    previous = {}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            previous = json.load(f)
    if start_step >= total_steps and previous.get("final_step", -1) >= total_steps:
        logging.info("Run %s already finished at step %d; nothing to do (--restart trains it "
                     "anew)", cfg.run_name, start_step)
        return previous
    write_run_record(cfg, flagfile)

    weights = None
    if cfg.class_weighting == "balanced":
        weights = {k: tf.constant(v) for k, v in pipeline.class_weights(manifest).items()}
    train_loop = make_train_loop(cfg, state, positive_id, weights)
    eval_step = make_eval_step(cfg, state, positive_id)
    input_fn = pipeline.make_input_fn(
        cfg.data_dir, "train", cfg.batch_size, training=True, seed=cfg.seed, scale=cfg.scale,
        augment=cfg.augment, rebalance=cfg.rebalance, start_step=start_step)
    iterator = iter(strategy.distribute_datasets_from_function(input_fn))

    os.makedirs(cfg.tb_dir, exist_ok=True)
    train_writer = tf.summary.create_file_writer(os.path.join(cfg.tb_dir, "train"))
    eval_writer = tf.summary.create_file_writer(os.path.join(cfg.tb_dir, "eval"))
    if start_step == 0:
        _log_sample_inputs(cfg, manifest, train_writer)
    gradcam_hook = None
    if cfg.gradcam_images:
        from research.explain.hooks import GradCamHook
        gradcam_hook = GradCamHook(cfg.data_dir, cfg.gradcam_images, scale=cfg.scale,
                                   objective=cfg.objective, positive_id=positive_id)

    logging.info("Training %s: %d steps (%d per epoch), global batch %d on %d replica(s), %s",
                 cfg.run_name, total_steps, spe, cfg.batch_size, replicas, cfg.precision)
    summary = {"run_name": cfg.run_name, "start_step": start_step, "total_steps": total_steps}
    stop_at = min(total_steps, cfg.stop_at_step or total_steps)
    step = start_step
    bar, bar_epoch = None, -1
    profiling = False
    stopped_early = False
    train_seconds = 0.0
    last_report = None
    while step < stop_at and not stopped_early:
        boundaries = [stop_at, (step // eval_every + 1) * eval_every,
                      (step // ckpt_every + 1) * ckpt_every, step + cfg.steps_per_loop]
        if cfg.profile_steps:
            boundaries += [b for b in cfg.profile_steps if b > step]
        n = min(boundaries) - step
        if cfg.profile_steps and step == cfg.profile_steps[0] and not profiling:
            tf.profiler.experimental.start(os.path.join(cfg.tb_dir, "train"))
            profiling = True
        t0 = time.perf_counter()
        train_loop(iterator, tf.constant(n))
        loss = float(state.train_metrics["loss"].result())  # also waits for the steps
        dt = time.perf_counter() - t0
        train_seconds += dt
        step = state.step
        if profiling and step >= cfg.profile_steps[1]:
            tf.profiler.experimental.stop()
            profiling = False
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss} between steps {step - n} and {step}; stopped without "
                f"saving. The last good checkpoint is kept: {state.manager.latest_checkpoint}. "
                "Try a lower --learning_rate, --clip_norm, or --precision=float32.")
        epoch = step // spe
        state.epoch.assign(epoch)
        values = {k: float(v.result()) for k, v in state.train_metrics.items()}
        with train_writer.as_default(step=step):
            for k, v in values.items():
                tf.summary.scalar(k, v)
            tf.summary.scalar("learning_rate", float(state.optimizer.learning_rate))
            tf.summary.scalar("steps_per_sec", n / dt)
            tf.summary.scalar("images_per_sec", n * cfg.batch_size / dt)
        for v in state.train_metrics.values():
            v.reset_state()
        if cfg.progress:
            cur = (step - 1) // spe
            if cur != bar_epoch:
                bar_epoch, bar = cur, keras.utils.Progbar(spe, unit_name="step")
                print(f"epoch {cur + 1}/{math.ceil(total_steps / spe)}")
            bar.update(step - cur * spe, list(values.items()) +
                       [("img/s", n * cfg.batch_size / dt)])
        logging.info("train | step %6d | loss %.4f | %.1f steps/s | %.0f img/s", step, loss,
                     n / dt, n * cfg.batch_size / dt)

        if step % eval_every == 0 or step == total_steps:
            result = evaluate(cfg, state, "val", positive_id, eval_step)
            report = detmetrics.detection_report(result.labels, result.scores)
            last_report = report
            log_eval(eval_writer, result, report, step, names)
            if gradcam_hook is not None:
                gradcam_hook(state.model, eval_writer, step)
            logging.info("eval  | step %6d | val loss %.4f | roc_auc %.4f | pr_auc %.4f | f1 %.4f"
                         " @ %.3f", step, result.loss, report["roc_auc"], report["pr_auc"],
                         report["f1"], report["threshold"])
            if report["pr_auc"] > float(state.best_metric.numpy()):
                state.best_metric.assign(report["pr_auc"])
                state.bad_evals.assign(0)
                state.best_manager.save(checkpoint_number=step)
            else:
                state.bad_evals.assign_add(1)
                if cfg.patience and int(state.bad_evals.numpy()) >= cfg.patience:
                    logging.info("Early stop: val PR-AUC has not improved for %d evals",
                                 cfg.patience)
                    stopped_early = True
        if step % ckpt_every == 0 or step == stop_at or stopped_early:
            state.manager.save(checkpoint_number=step)
    if profiling:
        tf.profiler.experimental.stop()

    sessions = previous.get("sessions", []) + [
        {"start_step": start_step, "final_step": state.step,
         "train_seconds": round(train_seconds, 1)}]
    summary.update({"final_step": state.step, "epoch": int(state.epoch.numpy()),
                    "best_val_pr_auc": float(state.best_metric.numpy()),
                    "train_seconds": round(sum(s["train_seconds"] for s in sessions), 1),
                    "stopped_early": stopped_early, "sessions": sessions})
    if state.step >= total_steps or stopped_early:
        if last_report is None:
            result = evaluate(cfg, state, "val", positive_id, eval_step)
            last_report = detmetrics.detection_report(result.labels, result.scores)
        summary["final_val"] = {k: last_report[k] for k in
                                ("roc_auc", "pr_auc", "f1", "precision", "recall", "threshold")}
        summary["export"] = export_model(state.model, cfg, manifest, last_report["threshold"])
        _log_hparams(cfg, eval_writer, summary)
    train_writer.flush()
    eval_writer.flush()
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _log_sample_inputs(cfg: TrainConfig, manifest: dict, writer) -> None:
    ds = pipeline.make_dataset(cfg.data_dir, "train", 16, training=True, seed=cfg.seed,
                               scale="uint8", augment=cfg.augment)
    batch = next(iter(ds))
    names = manifest["class_names"]
    fig = plots.image_grid(batch["image"].numpy(),
                           [names[c] for c in batch["class_id"].numpy()], ncols=8,
                           title="augmented training inputs")
    with writer.as_default(step=0):
        _image_summary("sample_inputs", fig, 0)


def _log_hparams(cfg: TrainConfig, writer, summary: dict) -> None:
    from tensorboard.plugins.hparams import api as hp

    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
               for k, v in dataclasses.asdict(cfg).items() if v is not None}
    with writer.as_default(step=summary["final_step"]):
        hp.hparams(hparams, trial_id=cfg.run_name)
        for k, v in summary.get("final_val", {}).items():
            tf.summary.scalar(f"hparams/val_{k}", v)
