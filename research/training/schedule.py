"""Learning-rate schedules: functions of the optimizer's step, so a run killed at any
checkpoint resumes onto the same trajectory."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from research.training.config import TrainConfig


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


@keras.saving.register_keras_serializable(package="research")
class LinearWarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """airbench's triangle: linear from `peak * initial_fraction` at step 0 to `peak` at
    `warmup_steps`, then linear to `peak * final_fraction` at `total_steps` (and held there)."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int,
                 initial_fraction: float = 0.0, final_fraction: float = 0.0):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.initial_fraction = float(initial_fraction)
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = float(self.warmup_steps)
        up = self.initial_fraction + (1.0 - self.initial_fraction) * step / max(warm, 1.0)
        down_len = max(float(self.total_steps - self.warmup_steps), 1.0)
        down = 1.0 + (self.final_fraction - 1.0) * tf.minimum(
            (step - warm) / down_len, 1.0)
        return self.peak * tf.where(step < warm, up, down)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "initial_fraction": self.initial_fraction,
                "final_fraction": self.final_fraction}


def learning_rate_schedule(cfg: TrainConfig, peak: float, warmup_steps: int,
                           total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """The run's schedule (--lr_schedule) for one phase of `total_steps` steps."""
    if cfg.lr_schedule == "linear":
        return LinearWarmupDecay(peak, warmup_steps, total_steps, cfg.initial_lr_fraction,
                                 cfg.final_lr_fraction)
    return WarmupCosine(peak, warmup_steps, total_steps, cfg.final_lr_fraction)
