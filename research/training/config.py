"""The training configuration: one dataclass, validated before any work starts."""

from __future__ import annotations

import dataclasses
import json
import os

OBJECTIVES = ("binary", "multiclass")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")


class ConfigError(ValueError):
    """A bad setting; the message names the flag."""


@dataclasses.dataclass
class TrainConfig:
    data_dir: str
    run_name: str
    model: str = "scratch"
    model_options: dict = dataclasses.field(default_factory=dict)
    objective: str = "multiclass"
    checkpoint_dir: str = "checkpoints"
    log_dir: str = "logs"
    epochs: float = 20.0
    train_steps: int | None = None      # overrides epochs
    batch_size: int = 256               # global
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    learning_rate: float = 0.2          # peak, after warmup
    warmup_epochs: float = 1.0
    final_lr_fraction: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-3          # decoupled: var -= lr * wd * var
    label_smoothing: float = 0.1
    clip_norm: float | None = None
    class_weighting: str = "none"       # none | balanced
    rebalance: bool = False
    augment: bool = True
    tta: bool = True                    # eval on the image and its mirror
    scale: str = "unit"
    precision: str = "float32"
    jit_compile: bool = False
    steps_per_loop: int = 50
    eval_every_steps: int | None = None  # default: once per epoch
    checkpoint_every_steps: int | None = None  # default: at every eval
    keep_checkpoints: int = 3
    strategy: str = "auto"
    cpu_replicas: int = 0
    seed: int = 0
    deterministic: bool = False
    patience: int = 0                   # evals without val PR-AUC gain before stopping; 0: off
    restart: bool = False
    init_checkpoint: str | None = None  # warm start: model weights only
    stop_at_step: int | None = None     # stop early (as if preempted); resumable
    profile_steps: tuple[int, int] | None = None
    gradcam_images: int = 0             # val images whose Grad-CAM is logged at each eval
    progress: bool = True

    @property
    def run_dir(self) -> str:
        return os.path.join(self.checkpoint_dir, self.run_name)

    @property
    def tb_dir(self) -> str:
        return os.path.join(self.log_dir, self.run_name)

    def validate(self) -> None:
        def bad(flag, msg):
            raise ConfigError(f"--{flag}: {msg}")

        if not self.run_name or "/" in self.run_name:
            bad("run_name", f"must be a plain name, got {self.run_name!r}")
        if not os.path.isfile(os.path.join(self.data_dir, "manifest.json")):
            bad("data_dir", f"{self.data_dir!r} has no manifest.json; build it with "
                "`python -m research.apps.make_tfrecords`")
        from research.models import MODELS

        if self.model not in MODELS:
            bad("model", f"unknown model {self.model!r}; choose one of {', '.join(sorted(MODELS))}")
        for flag, value, allowed in (("objective", self.objective, OBJECTIVES),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("precision", self.precision, PRECISIONS),
                                     ("strategy", self.strategy, STRATEGIES),
                                     ("class_weighting", self.class_weighting,
                                      ("none", "balanced"))):
            if value not in allowed:
                bad(flag, f"{value!r} is not one of {', '.join(allowed)}")
        if self.batch_size < 1:
            bad("batch_size", "must be positive")
        if self.train_steps is None and self.epochs <= 0:
            bad("epochs", "must be positive (or set --train_steps)")
        if self.train_steps is not None and self.train_steps < 1:
            bad("train_steps", "must be positive")
        if self.steps_per_loop < 1:
            bad("steps_per_loop", "must be >= 1")
        if self.profile_steps and not 0 <= self.profile_steps[0] < self.profile_steps[1]:
            bad("profile_steps", f"want a,b with 0 <= a < b, got {self.profile_steps}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("profile_steps"):
            d["profile_steps"] = tuple(d["profile_steps"])
        return cls(**d)


def load_run_config(checkpoint_dir: str, run_name: str) -> TrainConfig:
    path = os.path.join(checkpoint_dir, run_name, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--run_name: no training run at {os.path.dirname(path)} "
                          "(config.json missing)")
    with open(path) as f:
        return TrainConfig.from_json(f.read())
