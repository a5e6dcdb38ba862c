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
import numpy as np
import tensorflow as tf
from absl import logging

from research import machine
from research.data import pipeline
from research.detector import scale_images
from research.models import backbones, build_model
from research.models.layers import data_initialised, init_from_data
from research.training import cluster
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
    if name == "multi_worker":  # before anything, listing devices included, starts TF
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster.resolve(name))
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
    """How long the run is, in optimizer steps (fine_tune: phase 1 is `head_steps` long)."""
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    head_steps: int | None = None


def plan_steps(cfg: TrainConfig, manifest: dict, num_train: int | None = None) -> Plan:
    """`num_train`: the run's training examples when it trains on a subset."""
    per_epoch = pipeline.steps_per_epoch(manifest, cfg.batch_size, num_examples=num_train)
    head = None
    if cfg.transfer == "fine_tune":
        head = max(1, int(round(cfg.head_epochs * per_epoch)))
        total = head + max(1, int(round(cfg.fine_tune_epochs * per_epoch)))
    else:
        total = cfg.train_steps or max(1, int(round(cfg.epochs * per_epoch)))
    eval_every = cfg.eval_every_steps or per_epoch
    return Plan(per_epoch, total, eval_every, cfg.checkpoint_every_steps or eval_every, head)


def num_outputs(cfg: TrainConfig, manifest: dict) -> int:
    return len(manifest["class_names"]) if cfg.objective == "multiclass" else 1


def make_model(cfg: TrainConfig, manifest: dict, **overrides) -> keras.Model:
    """The run's network (call inside the strategy scope): a registered network, a backbone
    with a new head, or (features recipe) the head alone on the cached features."""
    dtype = None if cfg.precision == "float32" else cfg.precision
    options = {**cfg.model_options, **overrides}
    if cfg.transfer == "features":
        from research.training import features

        return backbones.head_model(features.open_cache(cfg).feature_shape,
                                    num_outputs(cfg, manifest), dtype=dtype, **options)
    if cfg.uses_backbone:
        return backbones.build_transfer_model(
            cfg.model, manifest["image_shape"], num_outputs(cfg, manifest), dtype=dtype,
            checkpoint_dir=cfg.checkpoint_dir, **options)
    return build_model(cfg.model, manifest["image_shape"], num_outputs(cfg, manifest),
                       dtype=dtype, **options)


DATA_INIT_IMAGES = 5000  # training images that set a data-initialised layer (fast CNN)


def init_model_from_data(cfg: TrainConfig, model: keras.Model, manifest: dict) -> None:
    """Sets the layers that start from training-data statistics (the fast CNN's patch
    whitening) from the first DATA_INIT_IMAGES training images the run may see (its
    --exclude_classes left out; labels unused). Deterministic, so a resumed run computes the
    same values before the checkpoint restores them."""
    if not data_initialised(model):
        return
    d = pipeline.take_examples(cfg.data_dir, "train", DATA_INIT_IMAGES + 1000 * len(
        cfg.exclude_classes))
    excluded = [manifest["class_names"].index(c) for c in cfg.exclude_classes]
    images = d["image"][~np.isin(d["class_id"], excluded)][:DATA_INIT_IMAGES]
    names = init_from_data(model, scale_images(images, cfg.input_scale).numpy())
    logging.info("Initialised %s from %d training images", ", ".join(names), len(images))


def apply_phase(cfg: TrainConfig, model: keras.Model, phase: int) -> None:
    """Which backbone layers train: none (frozen, features, fine_tune phase 1), those from
    --fine_tune_from / the last --fine_tune_layers (phase 2), or all (transfer none).
    In the transfer recipes BatchNorm layers of the base never train (inference mode)."""
    if not cfg.uses_backbone or cfg.transfer == "features":
        return
    base = backbones.backbone_of(model)
    if cfg.transfer == "frozen" or (cfg.transfer == "fine_tune" and phase == 1):
        backbones.set_trainable_from(base, None)
    elif cfg.transfer == "fine_tune":
        if cfg.fine_tune_layers:
            weighted = [i for i, layer in enumerate(base.layers) if layer.weights]
            start = weighted[-min(cfg.fine_tune_layers, len(weighted))]
        else:
            name = cfg.fine_tune_from or backbones.BACKBONES[cfg.model].blocks[-1]
            start = backbones.block_start(base, name, cfg.model)
        backbones.set_trainable_from(base, start)
    else:  # transfer none: the whole network trains, BatchNorm in training mode too
        base.trainable = True


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
class Lookahead:
    """Slow copies of the model's float variables (weights and BN statistics), as in
    airbench's LookaheadState: every `every` steps the slow copies move toward the trained
    variables, keeping `decay**every * (step / total_steps)**3` of themselves (so the pull
    strengthens as training ends), and the trained variables are reset to them; at the last
    step the slow copies stay as they are and the model ends on them."""
    slow: list
    fast: list
    every: int
    decay: float
    total_steps: int

    @classmethod
    def create(cls, model: keras.Model, every: int, decay: float, total_steps: int):
        """Call inside the strategy scope."""
        fast = [v for v in model.weights
                if "float" in str(v.dtype) and "seed_generator" not in v.path]
        slow = [tf.Variable(v.value, trainable=False, name=f"slow_{i}")
                for i, v in enumerate(fast)]
        return cls(slow, fast, int(every), float(decay), int(total_steps))

    def keep(self, step):
        """The slow copies' share at `step` (1.0 at the last step)."""
        frac = tf.cast(step, tf.float32) / float(self.total_steps)
        return tf.where(step >= self.total_steps, 1.0, self.decay ** self.every * frac ** 3)

    def due(self, step):
        return tf.logical_or(step % self.every == 0, step >= self.total_steps)

    def update(self, step) -> None:
        """In cross-replica context (the train loop, between steps)."""
        keep = self.keep(step)
        for s, f in zip(self.slow, self.fast):
            k = tf.cast(keep, s.dtype)
            s.assign(k * s + (1.0 - k) * tf.cast(f.value, s.dtype))
            f.assign(tf.cast(s, f.dtype))


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
    fine_tune_optimizer: keras.optimizers.Optimizer | None = None  # fine_tune phase 2
    phase: tf.Variable | None = None                                # fine_tune: 1 or 2
    lookahead: Lookahead | None = None                               # --lookahead_every

    @property
    def in_phase_2(self) -> bool:
        return self.phase is not None and int(self.phase.numpy()) == 2

    @property
    def active_optimizer(self) -> keras.optimizers.Optimizer:
        return self.fine_tune_optimizer if self.in_phase_2 else self.optimizer

    @property
    def step(self) -> int:
        """The global step: phase 2's optimizer counts from 0 where phase 1's stopped."""
        step = int(self.optimizer.iterations.numpy())
        if self.fine_tune_optimizer is not None:
            step += int(self.fine_tune_optimizer.iterations.numpy())
        return step


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
        if model is None:
            model = make_model(cfg, manifest)
            init_model_from_data(cfg, model, manifest)
        head_steps = plan.head_steps or plan.total_steps
        schedule = WarmupCosine(cfg.head_lr or cfg.learning_rate,
                                int(cfg.warmup_epochs * plan.steps_per_epoch),
                                head_steps, cfg.final_lr_fraction)
        optimizer = make_optimizer(cfg, schedule)
        extra = {}
        if cfg.transfer == "fine_tune":
            # Phase 2's optimizer is built now, on phase 2's variables, so a checkpoint of
            # either phase restores into the same objects.
            apply_phase(cfg, model, 2)
            fine_tune = make_optimizer(cfg, WarmupCosine(
                cfg.fine_tune_lr, 0, plan.total_steps - head_steps, cfg.final_lr_fraction))
            fine_tune.build(model.trainable_variables)
            extra = {"fine_tune_optimizer": fine_tune,
                     "phase": tf.Variable(1, dtype=tf.int64, trainable=False, name="phase")}
        apply_phase(cfg, model, 1)
        optimizer.build(model.trainable_variables)
        lookahead = (Lookahead.create(model, cfg.lookahead_every, cfg.lookahead_decay,
                                      plan.total_steps) if cfg.lookahead_every else None)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        best = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_val")
        bad = tf.Variable(0, dtype=tf.int64, trainable=False, name="evals_without_gain")
        train_metrics = make_train_metrics(cfg)
        # Keras seed-generator states (dropout masks) are not tracked through the model by
        # tf.train.Checkpoint; without them a resumed run would replay the first masks.
        rng_states = [v for v in model.non_trainable_variables if "seed_generator" in v.path]
        slow = {"lookahead_slow": lookahead.slow} if lookahead else {}
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch,
                                         best_metric=best, bad_evals=bad, rng_states=rng_states,
                                         **extra, **slow)
        manager = tf.train.CheckpointManager(checkpoint, cfg.run_dir,
                                             max_to_keep=cfg.keep_checkpoints,
                                             step_counter=optimizer.iterations)
        best_manager = tf.train.CheckpointManager(checkpoint, os.path.join(cfg.run_dir, "best"),
                                                  max_to_keep=1, checkpoint_name="best",
                                                  step_counter=optimizer.iterations)
    return TrainState(strategy, model, optimizer, checkpoint, manager, best_manager, epoch, best,
                      bad, train_metrics, lookahead=lookahead, **extra)
