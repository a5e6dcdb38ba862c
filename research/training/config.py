"""The training configuration: one dataclass, the single home of every training default.

Each field carries everything known about it in its metadata (research.fields.setting): help,
choices, numeric range, and whether a resumed run may change it. The train app derives its
flags from the fields, `validate()` checks them, and the resume check reads which may change,
so a new hyperparameter is one field here plus its use. Nothing here imports TensorFlow, so an
app can check its flags (and the run lock) before the heavy imports.
"""

from __future__ import annotations

import dataclasses
import json
import os

from research import runs, thresholds
from research.machine import PRECISIONS
from research.data.augmentation import FILL_MODES, Affine
from research.data.manifest import has_manifest, load_manifest
from research.errors import UserError
from research.fields import field_errors, setting
from research.model_options import BACKBONES, MODEL_OPTIONS, OWN_NETWORKS, model_options_error
from research.model_options import SAVEDMODEL, SAVEDMODEL_TRANSFERS

SIMCLR = "simclr"
OBJECTIVES = ("binary", "multiclass", SIMCLR)
OPTIMIZERS = ("sgd", "sgd_l2", "adamw", "muon")
LR_SCHEDULES = ("cosine", "linear")
FLIPS = ("random", "alternate")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
CLASS_WEIGHTINGS = ("none", "balanced")
TRANSFERS = ("none", "features", "frozen", "fine_tune")
INPUTS = ("tfrecords", "memory", "device", "auto")
AFFINE_FLAGS = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range",
                "zoom_range")


class ConfigError(UserError):
    """A bad setting; the message names the flag."""


@dataclasses.dataclass
class TrainConfig:
    data_dir: str = setting(None, "TFRecords folder written by make_tfrecords.", resume=True)
    run_name: str = setting(None, "Run name: checkpoints/<run_name>, logs/<run_name>.", resume=True)
    model: str = setting("scratch", "Model name (see research.models.MODELS).")
    model_options: dict = setting({}, "Options of the model's builder (from its own flags).",
                                  flag=False)
    objective: str = setting("multiclass", "binary: one sigmoid logit for the positive class; "
                                           "multiclass: softmax over the source classes, the "
                                           "detector score is P(positive class). A run without "
                                           "a positive class (a classifier) is multiclass. "
                                           "simclr: self-supervised pretraining of the "
                                           "network on the unlabelled train images "
                                           "(research.training.simclr, docs/training.md); "
                                           "its run is a backbone for --weights=<run>.",
                                           choices=OBJECTIVES)
    transfer: str = setting("none", "Transfer recipe for a backbone --model (vgg16, ..., or "
                                    "scratch with --weights=<run>). features: the frozen base runs"
                                    " once over train/val/test, its features are cached under "
                                    "<data_dir>/features/<key>/ and a dense head trains on them "
                                    "(no augmentation can apply); frozen: base frozen, head "
                                    "trained end to end with augmentation; fine_tune: phase 1 "
                                    "trains the head (--head_epochs at --head_lr), phase 2 "
                                    "unfreezes from --fine_tune_from and trains at --fine_tune_lr "
                                    "for --fine_tune_epochs with a fresh optimizer (new slots for "
                                    "every variable). none: a backbone --model trains whole. "
                                    "BatchNorm layers of the base stay in inference mode "
                                    "throughout.", choices=TRANSFERS)
    simclr_temperature: float = setting(0.5, "simclr: the NT-Xent temperature (the "
                                        "reference's CIFAR-10 command: 0.5).", gt=0)
    simclr_projection_layers: int = setting(2, "simclr: Dense+BN layers of the projection "
                                            "head (SimCLR v1: 2, v2: 3).", ge=1, le=4)
    simclr_projection_dim: int = setting(128, "simclr: the projection's width.", ge=1)
    simclr_color_strength: float = setting(0.5, "simclr: colour-jitter strength (the "
                                           "reference's CIFAR-10 setting: 0.5).", ge=0, le=1)
    simclr_extra_data: str | None = setting(None, "simclr: a second TFRecords folder whose "
                                            "train split (only) joins the unlabelled images, "
                                            "cropped to --data_dir's size (e.g. the photos).")
    head_epochs: float = setting(2.0, "fine_tune: phase-1 length (head only), in epochs.", gt=0)
    head_lr: float | None = setting(None, "fine_tune: phase-1 peak learning rate (default: "
                                          "--learning_rate).", ge=0)
    fine_tune_from: str | None = setting(None, "fine_tune: unfreeze the base from this block or "
                                               "layer on (default: the backbone's last block).")
    fine_tune_layers: int | None = setting(None, "fine_tune: unfreeze the last N weighted layers "
                                                 "of the base instead of --fine_tune_from.", ge=1)
    fine_tune_lr: float = setting(0.01, "fine_tune: phase-2 peak learning rate (cosine, no "
                                        "warmup).", ge=0)
    fine_tune_epochs: float = setting(2.0, "fine_tune: phase-2 length, in epochs.", gt=0)
    exclude_classes: tuple[str, ...] = setting((), "Classes left out of every split (a source "
                                                   "task, e.g. cat: with no positive class the "
                                                   "run is a plain classifier, its best "
                                                   "checkpoint chosen by val N-class "
                                                   "accuracy).")
    train_fraction: float | None = setting(None, "Train on a deterministic stratified fraction of "
                                                 "each class (val and test stay whole unless "
                                                 "--eval_fraction).",
                                                 gt=0, le=1)
    train_per_class: int | None = setting(None, "Train on at most N examples per class "
                                                "(deterministic, stratified).", ge=1)
    eval_fraction: float | None = setting(None, "Score val and test on a deterministic "
                                                "stratified fraction of each class (a smoke "
                                                "test: every report says so).", gt=0, le=1)
    checkpoint_dir: str = setting(runs.CHECKPOINT_DIR, "Parent folder of run checkpoints.",
                                  resume=True)
    log_dir: str = setting(runs.LOG_DIR, "Parent folder of TensorBoard logs.", resume=True)
    epochs: float = setting(20.0, "Epochs to train (ignored if --train_steps is set).",
                            gt=0, resume=True)
    train_steps: int | None = setting(None, "Total optimizer steps (overrides --epochs).",
                                      ge=1, resume=True)
    batch_size: int = setting(256, "Global batch size (divisible by the replicas).", ge=1)
    eval_batch_size: int | None = setting(
        None, "Global eval batch size. Unset (auto): per replica, the largest batch whose "
        "estimated activation memory fits in half the device's free memory, at most 1,000 "
        "(research/training/eval_batch.py; the train log says what it chose).", ge=1,
        resume=True)
    optimizer: str = setting("sgd", "sgd: Keras' SGD with Nesterov momentum and decoupled weight "
                             "decay of the kernels; sgd_l2: SGD with Nesterov momentum as "
                             "PyTorch defines it (buf = m buf + g; step lr (g + m buf)) with "
                             "the weight decay as an L2 term of every trained variable added "
                             "to the gradient, through the momentum (airbench's optimizer, "
                             "per mean loss); adamw: AdamW; muon: airbench94_muon's, Muon "
                             "(momentum orthogonalised by a Newton-Schulz iteration, filters "
                             "renormalised every step) on the conv filters at --muon_lr and "
                             "sgd_l2 on the rest (research.training.muon).",
                             choices=OPTIMIZERS)
    muon_lr: float = setting(0.24, "--optimizer=muon: the conv filters' peak learning rate "
                             "(it follows the run's schedule as --learning_rate does).", gt=0,
                             resume=True)
    muon_momentum: float = setting(0.6, "--optimizer=muon: the conv filters' (Nesterov) "
                                   "momentum.", ge=0, lt=1, resume=True)
    logits_lr_scale: float = setting(1.0, "sgd_l2, muon: the logits kernel's learning rate is "
                                     "this times --learning_rate (its L2 coefficient divided "
                                     "by it, as --bias_lr_scale's).", gt=0)
    whiten_bias_decay: bool = setting(False, "--optimizer=muon: the whitening bias's learning "
                                      "rate falls linearly from --learning_rate to 0 at "
                                      "--whiten_bias_epochs, where it freezes "
                                      "(airbench94_muon), instead of following the run's "
                                      "schedule.")
    recipe_batch_size: int | None = setting(None, "The global batch size a recipe's learning "
                                            "rates are set for (its flag file sets it): "
                                            "another --batch_size is refused. Unset: any.",
                                            ge=1)
    learning_rate: float = setting(0.2, "Peak learning rate after warmup.", ge=0, resume=True)
    lr_schedule: str = setting("cosine", "cosine: linear warmup from 0 over --warmup_epochs, "
                               "then cosine decay to --final_lr_fraction; linear: linear from "
                               "--initial_lr_fraction up to the peak at --warmup_epochs, then "
                               "linear down to --final_lr_fraction at the end (airbench's "
                               "triangle).", choices=LR_SCHEDULES, resume=True)
    warmup_epochs: float = setting(1.0, "Linear warmup length in epochs.", ge=0, resume=True)
    initial_lr_fraction: float = setting(0.0, "--lr_schedule=linear: the learning rate of the "
                                         "first step, as a fraction of the peak.", ge=0, le=1,
                                         resume=True)
    final_lr_fraction: float = setting(0.0, "The schedule decays to this fraction of the peak.",
                                       ge=0, le=1, resume=True)
    momentum: float = setting(0.9, "SGD momentum.", ge=0, lt=1, resume=True)
    weight_decay: float = setting(5e-3, "sgd, adamw: decoupled weight decay of the kernels "
                                  "(var -= lr * wd * var); sgd_l2: the L2 coefficient of every "
                                  "trained variable (gradient += wd * var; a BatchNorm shift's "
                                  "is divided by --bias_lr_scale, as airbench's).", ge=0,
                                  resume=True)
    label_smoothing: float = setting(0.1, "Label smoothing.", ge=0, lt=1)
    bias_lr_scale: float = setting(1.0, "SGD: the learning rate of BatchNorm shifts (beta) is this"
                                        " times --learning_rate (the fast CIFAR-10 recipes use "
                                        "64).", gt=0)
    clip_norm: float | None = setting(None, "Clip the global gradient norm to this.",
                                      gt=0, resume=True)
    lookahead_every: int = setting(0, "Lookahead (airbench's): every N steps move slow copies of "
                                      "the weights and BN statistics toward the trained ones and "
                                      "reset those to them; the last step ends on the slow copies."
                                      " 0: off.", ge=0)
    whiten_bias_epochs: float | None = setting(None, "Fast CNN: the whitening conv's bias "
                                               "trains for this many epochs, then is frozen "
                                               "(airbench: 3); unset: throughout.", gt=0)
    proxy_widths: tuple[int, ...] = setting((), "Fast CNN: airbench96_faster's proxy "
                                            "selection: a small fast CNN of these widths (two "
                                            "convs per group; airbench96_faster: 32,64,64) "
                                            "scores each training batch and the network trains "
                                            "on the hardest --proxy_keep of it; the proxy "
                                            "trains every --proxy_train_every steps on those "
                                            "(research.training.proxy). Unset: off.", ge=1)
    proxy_keep: float = setting(0.5, "--proxy_widths: the fraction of each batch kept, by "
                                "the proxy's highest per-example losses (airbench96_faster: "
                                "512 of 1024).", gt=0, le=1)
    proxy_train_every: int = setting(4, "--proxy_widths: the proxy takes an SGD step on its "
                                     "kept examples every this many steps, from step 0.", ge=1)
    lookahead_decay: float = setting(0.95, "Lookahead: the slow copies keep decay**N * (step / "
                                           "total steps)**3 of themselves at each pull.",
                                           ge=0, lt=1)
    class_weighting: str = setting("none", "Per-example loss weights.", choices=CLASS_WEIGHTINGS)
    rebalance: bool = setting(False, "Sample positives and negatives 50/50 in training.")
    augment: bool = setting(True, "Random flip and pad-and-crop in training.")
    flip: str = setting("random", "How --augment flips: random (each image, each epoch, with "
                        "probability 1/2) or alternate (airbench's: a random half of the images "
                        "flipped in even epochs, the other half in odd ones, so every image is "
                        "flipped in exactly one of two consecutive epochs).", choices=FLIPS)
    crop_pad: int = setting(4, "Pad-and-crop augmentation: reflect-pad by this many pixels, then "
                               "crop back at a random offset (0: flip only).", ge=0, le=16)
    cutout: int = setting(0, "Cutout (airbench96: 12): with --augment, a square of this side "
                             "in each training image set to the input normalisation's mean "
                             "(airbench zeroes its normalised images), after flip and crop; "
                             "0: off.", ge=0, le=32)
    input: str = setting("tfrecords", "Where training batches come from (each gives the same "
                                      "batches, augmented the same way): tfrecords, read and "
                                      "augmented by tf.data on the host; memory, the whole "
                                      "training split loaded into host memory once; device, "
                                      "the uint8 training split on every replica's device, "
                                      "augmented inside the train step (flips, --crop_pad, "
                                      "--cutout; not the affine ones); auto, device on a GPU "
                                      "when the split fits in a quarter of its memory, else "
                                      "tfrecords (docs/data_at_scale.md). memory and device: "
                                      "not with --rebalance, subsets, --exclude_classes or "
                                      "--transfer=features.", choices=INPUTS, resume=True)
    input_sharding: str = setting("slice", "How several workers split the training input: slice "
                                           "(each reads the one global stream and keeps its slice "
                                           "of every batch: exactly one process's batches) or "
                                           "files (each reads only its own shards: no read twice, "
                                           "for many workers; other batches).",
                                           choices=("slice", "files"))
    rotation_range: float = setting(0.0, "Random rotation, degrees (Keras ImageDataGenerator's "
                                         "name and meaning; 0: off). Vectorised in tf.data, "
                                         "seeded.", ge=0, le=180)
    width_shift_range: float = setting(0.0, "Random horizontal shift, fraction of the width.",
                                       ge=0, lt=1)
    height_shift_range: float = setting(0.0, "Random vertical shift, fraction of the height.",
                                        ge=0, lt=1)
    shear_range: float = setting(0.0, "Random shear angle, degrees.", ge=0, lt=90)
    zoom_range: float = setting(0.0, "Random zoom in [1 - z, 1 + z], per axis.", ge=0, lt=1)
    fill_mode: str = setting("nearest", "How the affine augmentations fill points outside the "
                                        "image.", choices=FILL_MODES)
    tta: bool = setting(True, "Average the score over the image and its mirror in eval.",
                        resume=True)
    tta_shifts: bool = setting(False, "With --tta, also average over the image shifted one pixel "
                                      "down-right and up-left, and their mirrors: 6 forward passes"
                                      " instead of 2 (the fast recipes' test-time augmentation).",
                                      resume=True)
    train_eval_tta: bool = setting(True, "Use --tta (and --tta_shifts) in the val evaluations "
                                         "while training too; false: those are single-view (as "
                                         "airbench's per-epoch ones; the best checkpoint is "
                                         "chosen on them) and TTA scores val once at the end, "
                                         "for the final numbers and the export's threshold.",
                                   resume=True)
    threshold_metric: str = setting(thresholds.AUTO, thresholds.HELP, resume=True)
    calibrate: bool = setting(False, "Fit a temperature on val's scores (temperature scaling) "
                                     "for the reported probabilities; decisions are unchanged "
                                     "(the threshold maps through the same monotone function).",
                              resume=True)
    scale: str = setting("unit", "Input scaling (research.detector.SCALES).", flag=False)
    precision: str = setting("auto", "auto: mixed_float16 on GPU, mixed_bfloat16 on CPUs with "
                                     "AMX/AVX512-BF16, else float32. A run keeps the resolved "
                                     "value.", choices=PRECISIONS)
    jit_compile: bool = setting(False, "XLA-compile the train step.", resume=True)
    run_eagerly: bool = setting(False, "Run the train and eval steps without tf.function, for "
                                       "debugging (slow; same results within float tolerance).",
                                       resume=True)
    steps_per_loop: int = setting(50, "Steps per tf.function call.", ge=1, resume=True)
    eval_every_steps: int | None = setting(None, "Eval on val every N steps (default: epoch).",
                                           ge=1, resume=True)
    checkpoint_every_steps: int | None = setting(None, "Checkpoint every N steps (default: at "
                                                       "every eval).", ge=1, resume=True)
    keep_checkpoints: int = setting(3, "Rolling checkpoints kept.", ge=1, resume=True)
    strategy: str = setting("auto", "tf.distribute strategy.", choices=STRATEGIES, resume=True)
    cpu_replicas: int = setting(0, "Split the CPU into N logical devices (N > 1 makes "
                                   "--strategy=auto mirrored over them).", ge=0, resume=True)
    seed: int = setting(0, "Seed for weights, data order and augmentation.", ge=0, le=2**32 - 1)
    deterministic: bool = setting(False, "Enable TF op determinism.", resume=True)
    patience: int = setting(0, "Stop after N evals without val PR-AUC gain (a classifier: val "
                               "class accuracy; 0: off).", ge=0, resume=True)
    restart: bool = setting(False, "Delete the run's checkpoints and logs and start anew.",
                            resume=True)
    init_checkpoint: str | None = setting(None, "Warm start the model (weights only) from here.",
                                          resume=True)
    stop_at_step: int | None = setting(None, "Stop (resumably) at this step, as if preempted.",
                                       ge=1, resume=True)
    profile_steps: tuple[int, int] | None = setting(
        None, "a,b: record a profiler trace for steps [a, b).", resume=True)
    gradcam_images: int = setting(16, "Val images (half positives) whose Grad-CAM overlays are "
                                      "logged to TensorBoard at every eval (0: off; not with "
                                      "--transfer=features).", ge=0, resume=True)
    progress: bool = setting(True, "Show a progress bar.", resume=True)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.checkpoint_dir, self.run_name)

    @property
    def tb_dir(self) -> str:
        return os.path.join(self.log_dir, self.run_name)

    def validate(self) -> None:
        """Every setting's choices and range (from its field), then the rules between
        settings; the first problem raises ConfigError naming its flag."""
        def bad(flag, msg):
            raise ConfigError(f"--{flag}: {msg}")

        problem = runs.name_error(self.run_name)
        if problem:
            bad("run_name", problem)
        if not has_manifest(self.data_dir):
            bad("data_dir", f"{self.data_dir!r} has no manifest.json; build it with "
                "`python -m research.apps.make_tfrecords`")
        if self.model not in MODEL_OPTIONS:
            bad("model", f"unknown model {self.model!r}; choose one of "
                f"{', '.join(sorted(MODEL_OPTIONS))}")
        for name, problem in field_errors(self):
            bad(name, problem)
        problem = model_options_error(self.model, self.model_options, self.uses_backbone)
        if problem:
            bad(problem[0], problem[1])
        self._check_combinations(bad)
        try:
            thresholds.check(self.threshold_metric)
        except thresholds.ThresholdError as e:
            bad("threshold_metric", str(e).split(": ", 1)[1])
        self._check_threshold_data(bad)
        if (self.objective == "binary" or self.rebalance) and \
                self.positive_class(load_manifest(self.data_dir)) is None:
            bad("objective" if self.objective == "binary" else "rebalance",
                f"{'binary' if self.objective == 'binary' else 'rebalancing'} needs a positive "
                "class, and this run has none (data made with --positive_class=none, or "
                "--exclude_classes leaves it out): it is a classifier; train it with "
                "--objective=multiclass")

    def positive_class(self, manifest: dict) -> str | None:
        """The class the run detects: the data's positive class, unless the data has none
        (make_tfrecords --positive_class=none) or --exclude_classes leaves it out (a source
        task). None: the run is a plain N-class classifier (top-1, top-5 and per-class
        accuracy; no ROC-AUC, PR-AUC, F1 or threshold)."""
        positive = manifest.get("positive_class")
        return None if positive is None or positive in self.exclude_classes else positive

    def threshold_policy(self, manifest: dict) -> tuple[thresholds.Policy, str]:
        """(the policy that chooses the threshold on val, why): --threshold_metric, or for
        `auto` the share of the positive class among train's classes the run keeps."""
        counts = {k: v for k, v in manifest["splits"]["train"]["class_counts"].items()
                  if k not in self.exclude_classes}
        total = sum(counts.values())
        share = counts.get(self.positive_class(manifest), 0) / total if total else None
        return thresholds.resolve(self.threshold_metric, share)

    def positive_id(self, manifest: dict) -> int | None:
        """The class id of `positive_class` (None: a classifier)."""
        return None if self.positive_class(manifest) is None else manifest["positive_class_id"]

    def _check_threshold_data(self, bad) -> None:
        """A chosen policy needs a positive class, and val needs both classes to choose."""
        manifest = load_manifest(self.data_dir)
        if self.positive_class(manifest) is None:
            if self.threshold_metric != thresholds.AUTO:
                bad("threshold_metric", "this run is a classifier (no positive class): it has "
                    "no threshold to choose; leave it at auto")
            return
        val = manifest["splits"].get("val", {})
        kept = sum(v for k, v in val.get("class_counts", {}).items()
                   if k not in self.exclude_classes)
        if self.threshold_metric != thresholds.AUTO and not 0 < val.get("num_positive", 0) < kept:
            bad("threshold_metric", f"val has {val.get('num_positive', 0)} positives of {kept}: "
                "a threshold needs both classes there")

    def _check_combinations(self, bad) -> None:
        if self.objective == SIMCLR:
            self._check_simclr(bad)
        elif self.simclr_extra_data:
            bad("simclr_extra_data", "only with --objective=simclr")
        if self.transfer == "fine_tune":
            if self.train_steps is not None:
                bad("train_steps", "does not apply to --transfer=fine_tune; its length is "
                    "--head_epochs + --fine_tune_epochs")
            if self.fine_tune_from and self.fine_tune_layers:
                bad("fine_tune_layers", "give --fine_tune_from or --fine_tune_layers, not both")
        if self.transfer != "none" and self.model not in BACKBONES:
            bad("model", f"--transfer={self.transfer} needs a backbone model: "
                f"{', '.join(BACKBONES)}")
        if self.model == SAVEDMODEL and self.transfer not in SAVEDMODEL_TRANSFERS:
            bad("transfer", f"--model={SAVEDMODEL} runs frozen (keras.layers.TFSMLayer): "
                f"give --transfer={' or '.join(SAVEDMODEL_TRANSFERS)}")
        if self.tta_shifts and not self.tta:
            bad("tta_shifts", "adds shifted views to the mirror pair of --tta; it needs --tta")
        if self.lookahead_every and self.transfer == "fine_tune":
            bad("lookahead_every", "not with --transfer=fine_tune (its two phases would "
                "share one set of slow weights)")
        if self.recipe_batch_size is not None and self.batch_size != self.recipe_batch_size:
            why = ("the Muon step has no rule to rescale with the batch"
                   if self.optimizer == "muon" else
                   "research.training.recipes.rebatched rescales them")
            bad("batch_size", f"{self.batch_size}: this recipe's learning rates are set for "
                f"--batch_size={self.recipe_batch_size} (--recipe_batch_size), and {why}; "
                "train at that batch, or retune them and give --recipe_batch_size too")
        if self.optimizer == "muon":
            if self.learning_rate <= 0:
                bad("learning_rate", "--optimizer=muon needs a positive SGD learning rate "
                    "(the Muon rate is set relative to it)")
        if self.logits_lr_scale != 1.0 and self.optimizer not in ("sgd_l2", "muon"):
            bad("logits_lr_scale", f"scales the SGD gradient of the logits kernel with its "
                f"L2 term; with --optimizer={self.optimizer} it would not scale its "
                "learning rate")
        if self.whiten_bias_decay and (self.optimizer != "muon" or
                                       self.whiten_bias_epochs is None):
            bad("whiten_bias_decay", "needs --optimizer=muon and --whiten_bias_epochs (the "
                "step where its learning rate reaches 0)")
        if self.bias_lr_scale != 1.0 and self.optimizer == "adamw":
            bad("bias_lr_scale", "scales SGD's gradients of the BatchNorm shifts; with "
                f"--optimizer={self.optimizer} it would not scale their learning rate")
        if self.input in ("memory", "device"):
            problem = self.gathered_input_problem(self.input)
            if problem:
                bad(*problem)
        if self.train_fraction is not None and self.train_per_class is not None:
            bad("train_per_class", "give --train_fraction or --train_per_class, not both")
        if self.flip == "alternate" and self.rebalance:
            bad("flip", "alternate flips each image every other epoch of the stream; a "
                "rebalanced stream has no epochs")
        if self.whiten_bias_epochs is not None and self.model != "fast":
            bad("whiten_bias_epochs", f"only the fast CNN has a whitening conv, not "
                f"--model={self.model}")
        if self.proxy_widths and (self.model != "fast" or self.optimizer != "sgd_l2" or
                                  self.transfer != "none"):
            bad("proxy_widths", "the proxy selection is airbench96_faster's: it needs "
                "--model=fast and --optimizer=sgd_l2 (its proxy trains with that SGD), got "
                f"--model={self.model} --optimizer={self.optimizer} --transfer={self.transfer}")
        if self.proxy_widths and self.precision == "mixed_float16":
            bad("precision", "mixed_float16 is not supported with --proxy_widths (the proxy's "
                "step has no loss scale); use mixed_bfloat16 or float32")
        if self.profile_steps and (len(self.profile_steps) != 2 or
                                   not 0 <= self.profile_steps[0] < self.profile_steps[1]):
            bad("profile_steps", f"want a,b with 0 <= a < b, got {self.profile_steps}")

    def gathered_input_problem(self, input: str = "device") -> tuple[str, str] | None:
        """(flag, why) when --input=`input` (memory or device: inputs that gather the plain
        training stream by position) cannot feed this run, else None; --input=auto asks it
        too, and then reads the TFRecords."""
        if (self.rebalance or self.exclude_classes or self.train_fraction or
                self.train_per_class or self.transfer == "features"):
            return ("input", f"{input} replays the plain training stream: not with "
                    "--rebalance, --exclude_classes, --train_fraction/--train_per_class or "
                    "--transfer=features")
        if self.input_sharding == "files":
            return ("input_sharding", f"files gives each worker its own shards and draws; "
                    f"--input={input} replays the one global stream (slice)")
        if input == "device":
            active = [f for f in AFFINE_FLAGS if getattr(self, f)]
            if active:
                return (active[0], f"{getattr(self, active[0])} with --input=device: the "
                        "device input augments inside the train step with flips, --crop_pad "
                        "and --cutout only; the affine augmentations run in tf.data "
                        "(--input=tfrecords or memory)")
        return None

    def _check_simclr(self, bad) -> None:
        if self.model != "fast" or self.transfer != "none":
            bad("objective", f"simclr pretrains the fast CNN from scratch (--model=fast "
                f"--transfer=none), not --model={self.model} --transfer={self.transfer}")
        if self.optimizer == "muon" or self.precision == "mixed_float16":
            bad("optimizer" if self.optimizer == "muon" else "precision",
                "simclr trains with sgd, sgd_l2 or adamw in float32 or mixed_bfloat16")
        if (self.rebalance or self.exclude_classes or self.train_fraction or
                self.train_per_class or self.input != "tfrecords" or self.lookahead_every or
                self.whiten_bias_epochs is not None or self.clip_norm):
            bad("objective", "simclr reads every train image unlabelled: not with "
                "--rebalance, --exclude_classes, --train_fraction/--train_per_class, "
                "--input other than tfrecords, --lookahead_every, --whiten_bias_epochs or "
                "--clip_norm")
        extra = self.simclr_extra_data
        if extra:
            if not has_manifest(extra):
                bad("simclr_extra_data", f"{extra!r} has no manifest.json; build it with "
                    "`python -m research.apps.make_tfrecords`")
            m = load_manifest(extra)
            if "train" not in m["splits"] or m["image_shape"][-1] != 3:
                bad("simclr_extra_data", f"{extra}: wants a train split of RGB images")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A recorded config (fields this version no longer has are dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for name in ("profile_steps", "exclude_classes", "proxy_widths"):
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
        own = self.model in OWN_NETWORKS
        return self.transfer != "none" or (self.model in BACKBONES and not own)


def load_run_config(checkpoint_dir: str, run_name: str, data_dir: str | None = None,
                    **overrides) -> TrainConfig:
    """The run's recorded config, pointed at where the run is now (`checkpoint_dir`, and
    `data_dir` when given: the run may have moved, its data too), with `overrides` of
    settings that do not change what the run is (tta, eval_batch_size, ...)."""
    d = runs.read_config(runs.run_dir(checkpoint_dir, run_name))
    try:
        cfg = TrainConfig.from_dict(d)
    except (TypeError, ValueError) as e:  # fields of the wrong shape
        raise ConfigError(f"run {run_name}: unreadable "
                          f"{os.path.join(runs.run_dir(checkpoint_dir, run_name), runs.CONFIG)}"
                          f" ({e})") from e
    cfg.checkpoint_dir, cfg.run_name = checkpoint_dir, run_name
    if data_dir:
        cfg.data_dir = data_dir
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
