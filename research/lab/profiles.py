"""The lab's settings per machine: one `LabProfile` for a 2-core CPU, one for GPUs, and the
`--quick` shrink of either: the training runs that several stages share or derive from (the
detectors' recipes, the few-labels pair, the photo and memory-check runs). Training settings
are `TrainConfig` overrides (TrainConfig keeps every training default); only what the lab
changes is written here. A stage's own settings per profile are in its record
(research.lab.stages).
"""

from __future__ import annotations

import dataclasses
import os

from research.fields import default_of, setting
from research.machine import PRECISIONS
from research.model_options import options_class
from research.training.config import TrainConfig
from research.training.recipes import (AIRBENCH96, FAST_CIFAR10, PHOTOS_FROM_CIFAR, airbench93,
                                       load_recipe, rebatched, stretched)

# Explanation methods compared on the same images, with deletion/insertion scores: the cheap
# ones (not scorecam, smoothgrad or lime: tens to hundreds of forward passes per image).
METHODS = ("gradcam", "gradcam_pp", "saliency", "integrated_gradients", "guided_gradcam",
           "occlusion")
# ExplainOptions fields (explain flags) the lab sets: 17 gradients for integrated gradients,
# a 4x4 grid of non-overlapping patches (16 forward passes) for occlusion.
EXPLAIN_OPTIONS = {"ig_steps": 16, "occlusion_patch": 0.25, "occlusion_stride": 0.25}
# The shared dogs-vs-cats photos, relative to the repository root (where `make` runs).
LOCAL_PHOTOS = os.path.join("..", "shared", "data", "dogs-vs-cats-2000.tar")
# The photo stage: TFRecords at `size` px cut into exact per-class counts (train, val, test;
# Chollet's 1,000 / 500 / 500 halved for the shared 1,000 photos per class), the photo recipe
# (research/recipes/photos_from_cifar.flags) with `train`'s overrides.
PHOTOS = {"source": LOCAL_PHOTOS, "size": 64, "split_counts": (500, 250, 250),
          "train": {"gradcam_images": 0}, "explain_per_class": 3}


# The few-labels pair: scratch and transfer each trained on this stratified fraction of the
# train split (2,250 CIFAR-10 images, 225 cats) for this many epochs of it, at the transfer
# detector's batch size: equal steps (about 350 at batch 256, 2 epochs of the full data).
FEW_LABELS = 0.05
FEW_LABELS_EPOCHS = 40.0


@dataclasses.dataclass(frozen=True)
class LabProfile:
    name: str
    scratch: dict                 # the from-scratch detector
    source_task: dict             # the fallback backbone: a network trained without cats
    transfer_imagenet: dict       # the transfer detector with ImageNet weights
    transfer_fallback: dict       # the transfer detector on the source-task backbone
    memory_check: dict            # both runs of the input check
    photos: dict = dataclasses.field(default_factory=lambda: dict(PHOTOS))  # real photos
    run_prefix: str = "lab_"
    quick: bool = False
    per_replica_batches: bool = False  # batch_size per replica (`per_replica`), else global

    def transfer(self, weights: str) -> dict:
        """The transfer detector's settings for `weights` (imagenet, a .h5 file, or the
        source-task run name)."""
        if weights == "imagenet" or weights.endswith(".h5"):
            out = dict(self.transfer_imagenet)
            out["model_options"] = {**out.get("model_options", {}), "weights": weights}
            return out
        out = dict(self.transfer_fallback)
        out["model_options"] = {**out.get("model_options", {}), "weights": weights}
        return out


CPU = LabProfile(
    name="cpu",
    # The fast recipe (airbench94's port, research/recipes/fast_cifar10.flags) exactly: the
    # same run as `train --flagfile=research/recipes/fast_cifar10.flags`.
    scratch=load_recipe(FAST_CIFAR10),
    # 9 classes, no cats: the features a cat detector can start from when ImageNet is out
    # of reach. airbench93's recipe (research.training.recipes.airbench93): 0.46 of the fast
    # recipe's FLOPs per image; a backbone needs features, not the last point of accuracy.
    source_task={**airbench93(), "exclude_classes": ("cat",)},
    # Features are computed once (the backbone is the slow part on a CPU); the head trains
    # in seconds.
    transfer_imagenet=dict(model="vgg16", transfer="features", epochs=10.0,
                           optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4,
                           warmup_epochs=0.5, label_smoothing=0.0,
                           model_options={"image_size": 64, "head_units": (256,),
                                          "dropout": 0.5}),
    # The source-task network fine-tuned whole (it is small) into a one-logit cat detector:
    # the head for an epoch, then everything; AdamW as the photo recipe.
    transfer_fallback=dict(model="fast", transfer="fine_tune", head_epochs=1.0,
                           fine_tune_epochs=3.0, batch_size=256, optimizer="adamw",
                           weight_decay=1e-4, label_smoothing=0.0, head_lr=1e-3,
                           fine_tune_lr=3e-4, fine_tune_from="group0", warmup_epochs=0.25,
                           tta_shifts=True, train_eval_tta=False,
                           model_options={"head": "max", "head_units": ()}),
    # No TensorBoard Grad-CAM for the pair: only their test numbers matter.
    # One epoch each (2 x 175 steps): the difference it shows is exact, not a quality.
    memory_check=dict(model="scratch", epochs=1.0, eval_every_steps=175, gradcam_images=0),
)

# The GPU box: airbench96's detector (research/recipes/airbench96.flags, 96.0% published, the
# best recipe that runs on several GPUs: airbench96_faster's proxy keeps the hardest half of
# the whole batch and so refuses replicas), which is also the photo stage's backbone;
# airbench93's source task as the cpu profile; the ImageNet transfer at VGG16's native 224 px,
# and longer checks. Every
# batch_size here is per replica (`per_replica`): global = per replica x replicas, the
# learning rate of the airbench recipes scaled by their own rule (recipes.rebatched).
# Input: tf.data's flip + crop at 32 px runs at about 6,000 images/s per host core, and one
# A100 trains the fast recipe at about 130,000: 22 cores a GPU
# (research.benchmarks.input_pipeline; BUILD.md, On a GPU box). So every run reads
# --input=auto: the data on the GPU, augmented in the step, whenever it fits a quarter of
# the GPU's memory and the run allows it (no subset, no affine augmentation); the others
# read the TFRecords with tf.data's parallelism left at AUTOTUNE, every host core.
GPU_INPUT = {"input": "auto"}
GPU = LabProfile(
    name="gpu",
    per_replica_batches=True,
    # Per replica the recipe's own 1,024: on one GPU the run is airbench96 exactly.
    scratch={**load_recipe(AIRBENCH96), **GPU_INPUT},
    source_task={**airbench93(), "exclude_classes": ("cat",), **GPU_INPUT},
    # The backbone at its native size, fine-tuned with augmentation: the best numbers.
    transfer_imagenet=dict(model="vgg16", transfer="fine_tune", head_epochs=2.0,
                           fine_tune_epochs=8.0, batch_size=64, head_lr=1e-3,
                           optimizer="adamw", learning_rate=1e-3, fine_tune_lr=1e-4,
                           weight_decay=1e-4, label_smoothing=0.0,
                           model_options={"image_size": 224, "head_units": (256,),
                                          "dropout": 0.5}, **GPU_INPUT),
    transfer_fallback=dict(CPU.transfer_fallback, batch_size=128, **GPU_INPUT),
    memory_check=dict(model="scratch", epochs=5.0, batch_size=128, gradcam_images=0),
    photos={**PHOTOS, "train": {**PHOTOS["train"], "batch_size": load_recipe(
        PHOTOS_FROM_CIFAR)["batch_size"], **GPU_INPUT}},
)

PROFILES = {p.name: p for p in (CPU, GPU)}


QUICK_EVAL_FRACTION = 0.1  # --quick scores 500 val and 1,000 test images of CIFAR-10


def quick(profile: LabProfile) -> LabProfile:
    """A few minutes on a 2-core CPU, for smoke tests: tiny step counts, and val and test
    subsets (QUICK_EVAL_FRACTION of each class; the report says so). Runs get their own names,
    so a quick lab never resumes into a full one."""
    nets = {"scratch": {"widths": (16, 32, 64), "res_blocks": (1, 0, 0), "stem_width": 16},
            "fast": {"widths": (16, 32, 32)}}
    subset = {"eval_fraction": QUICK_EVAL_FRACTION}
    short = dict(train_steps=30, batch_size=64, eval_every_steps=15, **subset)

    def shrink(d):
        out = {**{k: v for k, v in d.items() if k != "epochs"}, **short}
        out["model_options"] = {**d.get("model_options", {}), **nets[d["model"]]}
        return out

    return dataclasses.replace(
        profile, quick=True, run_prefix=profile.run_prefix + "quick_",
        scratch=shrink(profile.scratch), source_task=shrink(profile.source_task),
        transfer_imagenet=few_epochs({**profile.transfer_imagenet, "train_fraction": 0.05,
                                      "batch_size": 64, **subset, "model_options": {
                                          **profile.transfer_imagenet["model_options"],
                                          "image_size": 32}}, 0.5),
        transfer_fallback=few_epochs({**profile.transfer_fallback, "train_fraction": 0.05,
                                      "batch_size": 64, **subset}, 1.0),
        memory_check=shrink(profile.memory_check),
        photos={**profile.photos, "split_counts": (60, 30, 30), "train": {
            **profile.photos["train"], "head_epochs": 1.0, "fine_tune_epochs": 1.0,
            "model_options": {"image_size": 32}}, "explain_per_class": 2})


def per_replica(profile: LabProfile, replicas: int) -> LabProfile:
    """A profile whose batch sizes are per replica made global for `replicas` replicas: each
    run's batch x replicas; the airbench recipes (--optimizer=sgd_l2: hyperparameters per
    example) keep their step per example (recipes.rebatched), the others their learning
    rates. A profile of global batches is returned as it is."""
    if not profile.per_replica_batches:
        return profile

    def scale(d):
        per = d.get("batch_size", default_of(TrainConfig, "batch_size"))
        if d.get("optimizer") == "sgd_l2":
            return rebatched(d, per * replicas)
        return {**d, "batch_size": per * replicas}

    return dataclasses.replace(
        profile, per_replica_batches=False, scratch=scale(profile.scratch),
        source_task=scale(profile.source_task), memory_check=scale(profile.memory_check),
        transfer_imagenet=scale(profile.transfer_imagenet),
        transfer_fallback=scale(profile.transfer_fallback),
        photos={**profile.photos, "train": scale(profile.photos["train"])})


def few_epochs(d: dict, epochs: float) -> dict:
    """A transfer recipe's length set to `epochs` (each phase of fine_tune)."""
    if d.get("transfer") == "fine_tune":
        return {**d, "head_epochs": epochs, "fine_tune_epochs": epochs}
    return {**d, "epochs": epochs}


@dataclasses.dataclass
class Overrides:
    """The lab flags that shrink or change every training run of a profile (None: the
    profile's value); the lab app's flags are derived from these fields. The end-to-end test
    uses them to run in about a minute."""
    train_steps: int | None = setting(None, "Steps of the scratch, source-task and "
                                      "memory-check runs.", ge=1)
    transfer_epochs: float | None = setting(None, "Epochs of each transfer phase.", gt=0)
    batch_size: int | None = setting(None, "Global batch size of every run.", ge=1)
    eval_batch_size: int | None = setting(None, "Eval batch size of every run.", ge=1)
    eval_every_steps: int | None = setting(None, "Validation interval of every run.", ge=1)
    widths: tuple[int, ...] | None = setting(None, "Stage widths of the networks trained from "
                                             "scratch (the fast and the scratch CNN).", ge=1)
    res_blocks: tuple[int, ...] | None = setting(None, "Scratch CNN residual blocks per "
                                                 "stage (runs of the fast CNN have none).",
                                                 ge=0)
    stem_width: int | None = setting(None, "Scratch CNN stem width (runs of the fast CNN "
                                     "have none).", ge=1)
    precision: str | None = setting(None, "Precision of every run (train --precision).",
                                    choices=PRECISIONS)
    cpu_replicas: int | None = setting(None, "Split the CPU into N logical devices, once, "
                                       "before the lab's first TensorFlow call; every run "
                                       "trains MirroredStrategy over them (train "
                                       "--cpu_replicas: the GPU box simulated).", ge=2)
    explain_per_class: int | None = setting(None, "Test cats (and as many non-cats) "
                                            "explained.", ge=1)
    faithfulness_steps: int | None = setting(None, "Deletion/insertion steps.", ge=1)
    num_filters: int | None = setting(None, "Filter patterns per layer.", ge=1)
    filter_steps: int | None = setting(None, "Gradient-ascent steps per filter pattern.",
                                       ge=1)
    gradcam_images: int | None = setting(None, "Val images whose Grad-CAM goes to "
                                         "TensorBoard at every eval (0: off).", ge=0)
    few_labels: float | None = setting(None, "Few-labels pair: the fraction of the train "
                                       "split both runs train on.", gt=0, le=1)
    few_labels_epochs: float | None = setting(None, "Few-labels pair: epochs of that "
                                              "fraction (equal steps for both).", gt=0)
    photo_counts: tuple[int, ...] | None = setting(None, "Photos stage: TRAIN,VAL,TEST photos "
                                                   "per class (make_tfrecords "
                                                   "--split_counts).", ge=1)


def apply_overrides(profile: LabProfile, o: Overrides) -> LabProfile:
    net = {k: v for k, v in (("widths", o.widths), ("res_blocks", o.res_blocks),
                             ("stem_width", o.stem_width)) if v is not None}
    common = {k: v for k, v in (("batch_size", o.batch_size),
                                ("eval_batch_size", o.eval_batch_size),
                                ("eval_every_steps", o.eval_every_steps),
                                ("precision", o.precision),
                                ("cpu_replicas", o.cpu_replicas),
                                ("gradcam_images", o.gradcam_images)) if v is not None}

    def scratch_like(d):
        d = {**d, **common}
        if o.train_steps is not None:
            d.pop("epochs", None)
            d["train_steps"] = o.train_steps
        fields = {f.name for f in dataclasses.fields(options_class(d["model"]))}
        mine = {k: v for k, v in net.items() if k in fields}  # the model's own options
        if mine:
            d["model_options"] = {**d.get("model_options", {}), **mine}
        return d

    def transfer(d):
        d = {**d, **common}
        return d if o.transfer_epochs is None else few_epochs(d, o.transfer_epochs)

    photos = {**profile.photos, "train": transfer({**profile.photos["train"],
                                                   "transfer": "fine_tune"})}
    if o.photo_counts is not None:
        photos["split_counts"] = tuple(o.photo_counts)
    if o.explain_per_class is not None:
        photos["explain_per_class"] = o.explain_per_class
    return dataclasses.replace(
        profile, scratch=scratch_like(profile.scratch),
        source_task=scratch_like(profile.source_task),
        memory_check=scratch_like(profile.memory_check),
        transfer_imagenet=transfer(profile.transfer_imagenet),
        transfer_fallback=transfer(profile.transfer_fallback), photos=photos)


def few_labels_pair(pair: dict, scratch: dict, transfer: dict) -> tuple[dict, dict]:
    """(scratch, transfer) settings of the few-labels pair (`pair`: the few_labels stage's
    settings): both on pair["few_labels"] of the train split for pair["few_labels_epochs"]
    of it, at the transfer's batch size, so at equal steps. The scratch recipe is rebatched
    (its learning rate per example kept) and stretched (its schedule's shape kept); the
    transfer's phases keep their proportions."""
    epochs, frac = pair["few_labels_epochs"], pair["few_labels"]
    batch = transfer.get("batch_size", default_of(TrainConfig, "batch_size"))
    t = {**transfer, "train_fraction": frac}
    if t.get("transfer") == "fine_tune":
        head = t.get("head_epochs", default_of(TrainConfig, "head_epochs"))
        tune = t.get("fine_tune_epochs",
                     default_of(TrainConfig, "fine_tune_epochs"))
        t["head_epochs"] = epochs * head / (head + tune)
        t["fine_tune_epochs"] = epochs - t["head_epochs"]
    else:
        t["epochs"] = epochs
    s = {k: v for k, v in scratch.items() if k != "train_steps"}
    s = {**stretched(rebatched(s, batch), epochs), "train_fraction": frac}
    return s, t
