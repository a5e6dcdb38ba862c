"""The training configuration: one dataclass, the single home of every training default.

Each field carries its help text (and allowed choices) in its metadata; the train app derives
its flags from the fields, so a new hyperparameter is one field here plus its use.
`validate()` runs before any work starts and names the flag at fault.
"""

from __future__ import annotations

import dataclasses
import json
import os

from research.data.pipeline import FILL_MODES, Affine

OBJECTIVES = ("binary", "multiclass")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
CLASS_WEIGHTINGS = ("none", "balanced")
TRANSFERS = ("none", "features", "frozen", "fine_tune")


class ConfigError(ValueError):
    """A bad setting; the message names the flag."""


def _f(default, help: str, **meta):
    """A dataclass field with its flag help (and `choices`, `flag=False`) in its metadata."""
    meta["help"] = help
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainConfig:
    data_dir: str = _f(None, "TFRecords folder written by make_tfrecords.")
    run_name: str = _f(None, "Run name: checkpoints/<run_name>, logs/<run_name>.")
    model: str = _f("scratch", "Model name (see research.models.MODELS).")
    model_options: dict = _f({}, "Options of the model's builder (from its own flags).",
                             flag=False)
    objective: str = _f("multiclass", "binary: one sigmoid logit for the positive class; "
                        "multiclass: softmax over the source classes, the detector score is "
                        "P(positive class).", choices=OBJECTIVES)
    transfer: str = _f("none", "Transfer recipe for a backbone --model (vgg16, ..., or scratch "
                       "with --weights=<run>). features: the frozen base runs once over "
                       "train/val/test, its features are cached under <data_dir>/features/<key>/"
                       " and a dense head trains on them (no augmentation can apply); frozen: "
                       "base frozen, head trained end to end with augmentation; fine_tune: "
                       "phase 1 trains the head (--head_epochs at --head_lr), phase 2 unfreezes "
                       "from --fine_tune_from and trains at --fine_tune_lr for "
                       "--fine_tune_epochs with a fresh optimizer (new slots for every "
                       "variable). none: a backbone --model trains whole. BatchNorm layers of "
                       "the base stay in inference mode throughout.", choices=TRANSFERS)
    head_epochs: float = _f(2.0, "fine_tune: phase-1 length (head only), in epochs.")
    head_lr: float | None = _f(None, "fine_tune: phase-1 peak learning rate (default: "
                               "--learning_rate).")
    fine_tune_from: str | None = _f(None, "fine_tune: unfreeze the base from this block or "
                                    "layer on (default: the backbone's last block).")
    fine_tune_layers: int | None = _f(None, "fine_tune: unfreeze the last N weighted layers of "
                                      "the base instead of --fine_tune_from.")
    fine_tune_lr: float = _f(0.01, "fine_tune: phase-2 peak learning rate (cosine, no "
                             "warmup).")
    fine_tune_epochs: float = _f(2.0, "fine_tune: phase-2 length, in epochs.")
    exclude_classes: tuple[str, ...] = _f((), "Classes left out of every split (a source task, "
                                          "e.g. cat: with no positive class, the best "
                                          "checkpoint is chosen by val N-class accuracy).")
    train_fraction: float | None = _f(None, "Train on a deterministic stratified fraction of "
                                      "each class (val and test stay whole).")
    train_per_class: int | None = _f(None, "Train on at most N examples per class "
                                     "(deterministic, stratified).")
    checkpoint_dir: str = _f("checkpoints", "Parent folder of run checkpoints.")
    log_dir: str = _f("logs", "Parent folder of TensorBoard logs.")
    epochs: float = _f(20.0, "Epochs to train (ignored if --train_steps is set).")
    train_steps: int | None = _f(None, "Total optimizer steps (overrides --epochs).")
    batch_size: int = _f(256, "Global batch size (divisible by the replicas).")
    eval_batch_size: int = _f(1000, "Global eval batch size.")
    optimizer: str = _f("sgd", "SGD with Nesterov momentum, or AdamW.", choices=OPTIMIZERS)
    learning_rate: float = _f(0.2, "Peak learning rate after warmup.")
    warmup_epochs: float = _f(1.0, "Linear warmup length in epochs.")
    final_lr_fraction: float = _f(0.0, "Cosine decays to this fraction of the peak.")
    momentum: float = _f(0.9, "SGD momentum.")
    weight_decay: float = _f(5e-3, "Decoupled weight decay (kernels only): "
                             "var -= lr * wd * var.")
    label_smoothing: float = _f(0.1, "Label smoothing.")
    bias_lr_scale: float = _f(1.0, "SGD: the learning rate of BatchNorm shifts (beta) is this "
                              "times --learning_rate (the fast CIFAR-10 recipes use 64).")
    clip_norm: float | None = _f(None, "Clip the global gradient norm to this.")
    lookahead_every: int = _f(0, "Lookahead (airbench's): every N steps move slow copies of "
                              "the weights and BN statistics toward the trained ones and reset "
                              "those to them; the last step ends on the slow copies. 0: off.")
    lookahead_decay: float = _f(0.95, "Lookahead: the slow copies keep decay**N * "
                                "(step / total steps)**3 of themselves at each pull.")
    class_weighting: str = _f("none", "Per-example loss weights.", choices=CLASS_WEIGHTINGS)
    rebalance: bool = _f(False, "Sample positives and negatives 50/50 in training.")
    augment: bool = _f(True, "Random flip and pad-and-crop in training.")
    crop_pad: int = _f(4, "Pad-and-crop augmentation: reflect-pad by this many pixels, then "
                       "crop back at a random offset (0: flip only).")
    input: str = _f("tfrecords", "Where training batches come from: the TFRecords, or the whole "
                    "training split loaded into memory once (the same batches, augmented the "
                    "same way; not with --rebalance, subsets, --exclude_classes or "
                    "--transfer=features).", choices=("tfrecords", "memory"))
    input_sharding: str = _f("slice", "How several workers split the training input: slice "
                             "(each reads the one global stream and keeps its slice of every "
                             "batch: exactly one process's batches) or files (each reads only "
                             "its own shards: no read twice, for many workers; other batches).",
                             choices=("slice", "files"))
    rotation_range: float = _f(0.0, "Random rotation, degrees (Keras ImageDataGenerator's "
                               "name and meaning; 0: off). Vectorised in tf.data, seeded.")
    width_shift_range: float = _f(0.0, "Random horizontal shift, fraction of the width.")
    height_shift_range: float = _f(0.0, "Random vertical shift, fraction of the height.")
    shear_range: float = _f(0.0, "Random shear angle, degrees.")
    zoom_range: float = _f(0.0, "Random zoom in [1 - z, 1 + z], per axis.")
    fill_mode: str = _f("nearest", "How the affine augmentations fill points outside the "
                        "image.", choices=FILL_MODES)
    tta: bool = _f(True, "Average the score over the image and its mirror in eval.")
    tta_shifts: bool = _f(False, "With --tta, also average over the image shifted one pixel "
                          "down-right and up-left, and their mirrors: 6 forward passes instead "
                          "of 2 (the fast recipes' test-time augmentation).")
    scale: str = _f("unit", "Input scaling (research.detector.SCALES).", flag=False)
    precision: str = _f("auto", "auto: mixed_float16 on GPU, mixed_bfloat16 on CPUs with "
                        "AMX/AVX512-BF16, else float32. A run keeps the resolved value.",
                        choices=PRECISIONS)
    jit_compile: bool = _f(False, "XLA-compile the train step.")
    run_eagerly: bool = _f(False, "Run the train and eval steps without tf.function, for "
                           "debugging (slow; same results within float tolerance).")
    steps_per_loop: int = _f(50, "Steps per tf.function call.")
    eval_every_steps: int | None = _f(None, "Eval on val every N steps (default: epoch).")
    checkpoint_every_steps: int | None = _f(None, "Checkpoint every N steps "
                                            "(default: at every eval).")
    keep_checkpoints: int = _f(3, "Rolling checkpoints kept.")
    strategy: str = _f("auto", "tf.distribute strategy.", choices=STRATEGIES)
    cpu_replicas: int = _f(0, "Split the CPU into N logical devices (N > 1 makes "
                           "--strategy=auto mirrored over them).")
    seed: int = _f(0, "Seed for weights, data order and augmentation.")
    deterministic: bool = _f(False, "Enable TF op determinism.")
    patience: int = _f(0, "Stop after N evals without val PR-AUC gain (0: off).")
    restart: bool = _f(False, "Delete the run's checkpoints and logs and start anew.")
    init_checkpoint: str | None = _f(None, "Warm start the model (weights only) from here.")
    stop_at_step: int | None = _f(None, "Stop (resumably) at this step, as if preempted.")
    profile_steps: tuple[int, int] | None = _f(None, "a,b: record a profiler trace for "
                                               "steps [a, b).")
    gradcam_images: int = _f(16, "Val images (half positives) whose Grad-CAM overlays are "
                             "logged to TensorBoard at every eval (0: off; not with "
                             "--transfer=features).")
    progress: bool = _f(True, "Show a progress bar.")

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
        if not self.data_dir or not os.path.isfile(os.path.join(self.data_dir,
                                                                "manifest.json")):
            bad("data_dir", f"{self.data_dir!r} has no manifest.json; build it with "
                "`python -m research.apps.make_tfrecords`")
        from research.models import MODELS, model_options_error

        if self.model not in MODELS:
            bad("model", f"unknown model {self.model!r}; choose one of {', '.join(sorted(MODELS))}")
        problem = model_options_error(self.model, self.model_options, self.uses_backbone)
        if problem:
            bad(problem[0], problem[1])
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            if choices and getattr(self, field.name) not in choices:
                bad(field.name, f"{getattr(self, field.name)!r} is not one of "
                    f"{', '.join(choices)}")
        if self.batch_size < 1:
            bad("batch_size", "must be positive")
        from research.training.checks import numeric_errors

        for flag, problem in numeric_errors(self):  # signs, ranges and zero
            bad(flag, problem)
        if self.train_steps is None and self.epochs <= 0:
            bad("epochs", "must be positive (or set --train_steps)")
        if self.train_steps is not None and self.train_steps < 1:
            bad("train_steps", "must be positive")
        if self.steps_per_loop < 1:
            bad("steps_per_loop", "must be >= 1")
        if self.transfer == "fine_tune":
            if self.train_steps is not None:
                bad("train_steps", "does not apply to --transfer=fine_tune; its length is "
                    "--head_epochs + --fine_tune_epochs")
            if self.head_epochs <= 0 or self.fine_tune_epochs <= 0:
                bad("head_epochs", "--head_epochs and --fine_tune_epochs must be positive")
            if self.fine_tune_from and self.fine_tune_layers:
                bad("fine_tune_layers", "give --fine_tune_from or --fine_tune_layers, not both")
        if self.transfer != "none":
            from research.models.backbones import BACKBONES

            if self.model not in BACKBONES:
                bad("model", f"--transfer={self.transfer} needs a backbone model: "
                    f"{', '.join(BACKBONES)}")
        if self.tta_shifts and not self.tta:
            bad("tta_shifts", "adds shifted views to the mirror pair of --tta; it needs --tta")
        if self.lookahead_every and self.transfer == "fine_tune":
            bad("lookahead_every", "not with --transfer=fine_tune (its two phases would "
                "share one set of slow weights)")
        if self.bias_lr_scale != 1.0 and self.optimizer != "sgd":
            bad("bias_lr_scale", "scales SGD's gradients of the BatchNorm shifts; with "
                f"--optimizer={self.optimizer} it would not scale their learning rate")
        if self.input == "memory" and (self.rebalance or self.exclude_classes or
                                       self.train_fraction or self.train_per_class or
                                       self.transfer == "features"):
            bad("input", "memory replays the plain training stream: not with --rebalance, "
                "--exclude_classes, --train_fraction/--train_per_class or "
                "--transfer=features")
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            bad("train_fraction", f"must be in (0, 1], got {self.train_fraction}")
        if self.train_per_class is not None and self.train_per_class < 1:
            bad("train_per_class", f"must be >= 1, got {self.train_per_class}")
        if self.train_fraction is not None and self.train_per_class is not None:
            bad("train_per_class", "give --train_fraction or --train_per_class, not both")
        if self.profile_steps and (len(self.profile_steps) != 2 or
                                   not 0 <= self.profile_steps[0] < self.profile_steps[1]):
            bad("profile_steps", f"want a,b with 0 <= a < b, got {self.profile_steps}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for name in ("profile_steps", "exclude_classes"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)

    @property
    def affine(self):
        """The affine augmentation settings, as the input pipeline takes them."""
        return Affine(self.rotation_range, self.width_shift_range, self.height_shift_range,
                      self.shear_range, self.zoom_range, self.fill_mode)

    @property
    def input_scale(self) -> str:
        """How the model's inputs are scaled: a backbone model takes raw pixels and
        preprocesses them itself; other models take `scale`."""
        return "raw" if self.uses_backbone else self.scale

    @property
    def uses_backbone(self) -> bool:
        """A transfer model (backbone + head) rather than a plain registered network."""
        from research.models.backbones import BACKBONES

        return self.transfer != "none" or (self.model in BACKBONES and self.model != "scratch")


def load_run_config(checkpoint_dir: str, run_name: str) -> TrainConfig:
    path = os.path.join(checkpoint_dir, run_name, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--run_name: no training run at {os.path.dirname(path)} "
                          "(config.json missing)")
    with open(path) as f:
        return TrainConfig.from_json(f.read())
