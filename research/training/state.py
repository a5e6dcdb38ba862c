"""Everything stateful a run needs: devices, strategy, precision, schedule, optimizer and the
train state (model, optimizer, metrics, checkpoint), all created inside `strategy.scope()`.

The global step is `optimizer.iterations`; the learning rate is a function of it, so a run
killed at any checkpoint resumes onto the same trajectory.
"""

from __future__ import annotations

import dataclasses
import math
import os

import keras
import tensorflow as tf

from research import machine
from research.data import pipeline
from research.models import build_model
from research.training.config import ConfigError, TrainConfig


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
    """'auto' picks float16 on GPUs, bf16 where the CPU has AMX or AVX512-BF16."""
    if precision != "auto":
        return precision
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if machine.has_fast_bf16() else "float32"


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The config with machine-dependent choices made, as the run record keeps it."""
    return dataclasses.replace(cfg, precision=resolve_precision(cfg.precision))


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long the run is, in optimizer steps."""
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int


def plan_steps(cfg: TrainConfig, manifest: dict) -> Plan:
    per_epoch = pipeline.steps_per_epoch(manifest, cfg.batch_size)
    total = cfg.train_steps or max(1, int(round(cfg.epochs * per_epoch)))
    eval_every = cfg.eval_every_steps or per_epoch
    return Plan(per_epoch, total, eval_every, cfg.checkpoint_every_steps or eval_every)


def num_outputs(cfg: TrainConfig, manifest: dict) -> int:
    return len(manifest["class_names"]) if cfg.objective == "multiclass" else 1


def make_model(cfg: TrainConfig, manifest: dict, **overrides) -> keras.Model:
    """The run's network (call inside the strategy scope)."""
    return build_model(cfg.model, manifest["image_shape"], num_outputs(cfg, manifest),
                       dtype=None if cfg.precision == "float32" else cfg.precision,
                       **{**cfg.model_options, **overrides})


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

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())


def make_train_metrics(cfg: TrainConfig) -> dict:
    metrics = {
        "loss": keras.metrics.Mean(name="loss"),
        "accuracy": keras.metrics.BinaryAccuracy(name="accuracy"),
        "roc_auc": keras.metrics.AUC(curve="ROC", num_thresholds=500, name="roc_auc"),
    }
    if cfg.objective == "multiclass":
        metrics["class_accuracy"] = keras.metrics.SparseCategoricalAccuracy("class_accuracy")
    return metrics


def create_train_state(cfg: TrainConfig, strategy: tf.distribute.Strategy, manifest: dict,
                       plan: Plan, model: keras.Model | None = None) -> TrainState:
    """Model (unless given, already built in this scope), optimizer, metrics and checkpoint,
    all created inside strategy.scope()."""
    with strategy.scope():
        model = model or make_model(cfg, manifest)
        schedule = WarmupCosine(cfg.learning_rate,
                                int(cfg.warmup_epochs * plan.steps_per_epoch),
                                plan.total_steps, cfg.final_lr_fraction)
        optimizer = make_optimizer(cfg, schedule)
        optimizer.build(model.trainable_variables)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        best = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_val_pr_auc")
        bad = tf.Variable(0, dtype=tf.int64, trainable=False, name="evals_without_gain")
        train_metrics = make_train_metrics(cfg)
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
                      bad, train_metrics)
