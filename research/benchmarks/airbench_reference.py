r"""A reference to hold the fast recipe against, on our data: airbench94's OWN training code
(the PyPI package airbench==0.1.8, PyTorch) and our fast recipe, trained on the same images
of our TFRecords and tested on the same 10,000, side by side in one table.

  pip install -e '.[reference]'    # torch, torchvision, airbench: in a separate venv
  python -m research.benchmarks.airbench_reference [--epochs=10] [--data_dir=data/cifar10]
      [--sides=reference,ours] [--train_splits=train|train,val] [--timing_steps=30]

Sides. `reference` calls `airbench.train94` (airbench.utils.train does the work), adapted to a
CPU by `airbench_on_cpu` below: the one place that patches it, reversibly (a context manager;
nothing of airbench is copied here). `ours` trains `--ours_flagfile` (the fast recipe) with
our training library, all of it called from `train_ours`. Both train on the TFRecords'
`--train_splits` in their stored order and are tested on the whole test split: after each
epoch without TTA (airbench's `val_acc`), at the end with TTA (airbench's tta_level 2 = our
--tta_shifts). Each side's results go to <results_dir>/<side>.json (written atomically); a
side not run this time is read back from there for the table, which says so. A reference run
takes ~1.5 h on 2 cores and cannot be resumed.

`--timing_steps=N` times N train steps of each side back to back in this one process (after
a few warm-up steps) and prints their ratio, for when the full runs shared the machine.

`--parity_steps=N` (e.g. 20) starts both networks from the same weights (ours, copied into
airbench's make_net94 by layer order) and trains them N steps on the same batches (the first N
of our training stream, fed to airbench.train94 through a loader without its augmentation),
then prints the per-step loss difference (target: <= 1e-3 relative) beside its noise floor
(airbench against itself from weights one float32 ulp apart: how far rounding alone moves the
losses; --noparity_noise_floor skips it), the first forward pass,
gradient and the weights after each step side by side, and saves <results_dir>/parity.json.
`--parity_batch` makes the steps smaller (our learning rate is rescaled to it as airbench's
is). Both schedules see N steps: airbench's triangle peaks at int(0.23 N), ours is given a
warm-up of that many steps. Like --timing_steps it only runs this (no full runs).

Exit status: 0 done; 1 an error, named in one line (e.g. torch not installed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import os
import sys
import tempfile
import time

from absl import app, flags

from research import files, machine

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "data/cifar10", "TFRecords written by make_tfrecords.")
flags.DEFINE_enum("recipe", "airbench94",
                  ["airbench94", "airbench94_muon", "airbench95", "airbench96"],
                  "The reference (airbench94, 95, 96: the airbench package's train94/95/96; "
                  "airbench94_muon: airbench94_muon.py of a checkout, --reference_repo) and "
                  "the default --ours_flagfile, --epochs and --results_dir with it.")
flags.DEFINE_string("reference_repo", None, "A checkout of github.com/KellerJordan/"
                    "cifar10-airbench (--recipe=airbench94_muon: its airbench94_muon.py).")
flags.DEFINE_float("epochs", None, "Epochs, both sides (default: the recipe's; airbench94's "
                   "own default is 9.9, ours 10).")
flags.DEFINE_list("sides", ["reference", "ours"], "Sides to run now: reference, ours; the "
                  "others are read from --results_dir for the table.")
flags.DEFINE_list("train_splits", ["train"], "Splits to train on, in this order (train,val: "
                  "all 50,000). Testing is on the whole test split.")
flags.DEFINE_string("results_dir", None, "Where each side's JSON (and our side's checkpoints "
                    "and logs) go (default: logs/airbench_reference for airbench94, else "
                    "logs/airbench_reference_<recipe>).")
flags.DEFINE_string("ours_flagfile", None, "Our recipe: train-app flags, parsed into a "
                    "TrainConfig as the train app does (default: the --recipe's).")
flags.DEFINE_enum("precision", "float32", ["auto", "float32", "mixed_bfloat16"], "Our side's "
                  "--precision (float32 matches the float32 reference).")
flags.DEFINE_integer("timing_steps", 0, "If > 0: only time this many train steps of each "
                     "side, back to back, and print the ratio (no full runs).")
flags.DEFINE_integer("timing_warmup", 3, "Untimed train steps before --timing_steps.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: the core count).")
flags.DEFINE_integer("seed", 0, "Seed of both sides (torch.manual_seed; our --seed).")
flags.DEFINE_integer("parity_steps", 0, "If > 0: only train both networks this many steps "
                     "from the same weights on the same batches and print the per-step loss "
                     "difference (no full runs).")
flags.DEFINE_integer("parity_batch", 0, "--parity_steps' batch size (0: the recipe's).")
flags.DEFINE_bool("parity_noise_floor", True, "--parity_steps: also train airbench against "
                  "itself from weights one float32 ulp apart (the noise floor of the "
                  "comparison; one more airbench run).")

SIDES = ("reference", "ours")
# torchvision: airbench_on_cpu stands in for it when missing
REFERENCE_PACKAGES = ("torch", "airbench")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A reference and ours: our flag file, the epochs of both, where the results go."""
    flagfile: str
    epochs: float
    results_dir: str
    packages: tuple = REFERENCE_PACKAGES
    script: str | None = None  # a script of the repository rather than the package
    lib: str = "94"            # the package's lib_airbench<lib> (make_net<lib>, train<lib>)
    # the lib module read from --reference_repo's airbench/ instead of the package's (on the
    # package's utils): airbench==0.1.8's lib_airbench96 is an older one than the one ported
    lib_from_repo: bool = False


RECIPES = {
    "airbench94": Recipe("research/recipes/fast_cifar10.flags", 10.0,
                         "logs/airbench_reference"),
    # airbench94_muon.py fixes its own 8 epochs of 2000; it needs no airbench package
    "airbench94_muon": Recipe("research/recipes/fast_cifar10_muon.flags", 8.0,
                              "logs/airbench_reference_airbench94_muon", ("torch",),
                              "airbench94_muon.py"),
    "airbench95": Recipe("research/recipes/airbench95.flags", 15.0,
                         "logs/airbench_reference_airbench95", lib="95"),
    # airbench96.flags ports lib_airbench96.py at f1c599c (widths 128/384/512, 37 epochs, the
    # activation after the residual sum); airbench==0.1.8's differs (40 epochs, 128/512/512,
    # the activation before the sum). Its utils.py differs from 0.1.8's only in CifarLoader's
    # device argument and in writing the same triangle schedule as a function.
    "airbench96": Recipe("research/recipes/airbench96.flags", 37.0,
                         "logs/airbench_reference_airbench96", lib="96", lib_from_repo=True),
}
INSTALL_HINT = ("error: the airbench reference needs torch, torchvision and airbench==0.1.8 "
                "(missing: {}): install the extra into a separate venv, "
                "pip install -e '.[reference]'")


def missing_reference_packages(packages=REFERENCE_PACKAGES) -> list[str]:
    """The reference side's packages that are not installed (checked without importing)."""
    return [name for name in packages if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------------------------------------
# Small helpers: time, the machine, saved results.


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def machine_record() -> dict:
    return {"cpu": machine.banner(), "lscpu": machine.vector_flags(), "cores": os.cpu_count()}


def read_json(path: str) -> dict | None:
    """A side's saved results, or None before it has run."""
    return files.read_json(path) if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------
# The data: our TFRecords, read with our own library, in stored order.


def read_splits(data_dir: str, splits) -> tuple:
    """(uint8 NHWC images, int64 class ids, class names) of `splits`, concatenated in order,
    each in its stored order (the whitening reads the first 5,000 training images)."""
    import numpy as np

    from research.data import pipeline

    images, labels = [], []
    for split in splits:
        batches = list(pipeline.make_dataset(data_dir, split, 5000, training=False,
                                             scale="uint8"))
        index = np.concatenate([b["index"].numpy() for b in batches])
        if not np.array_equal(index, np.arange(len(index))):
            raise RuntimeError(f"{data_dir}/{split} was not read in its stored order")
        images.append(np.concatenate([b["image"].numpy() for b in batches]))
        labels.append(np.concatenate([b["class_id"].numpy() for b in batches]).astype(np.int64))
    names = pipeline.load_manifest(data_dir)["class_names"]
    return np.concatenate(images), np.concatenate(labels), names


def training_data_dir(data_dir: str, splits, out_dir: str) -> str:
    """A data folder whose train split is `splits` (for our side, which trains on 'train'):
    `data_dir` itself for [train], else a manifest under `out_dir` that lists those splits'
    shards (absolute paths: the shards stay where they are) as its train split."""
    if list(splits) == ["train"]:
        return data_dir
    from research.data import pipeline

    manifest = pipeline.load_manifest(data_dir)
    parts = [manifest["splits"][s] for s in splits]
    names = manifest["class_names"]
    train = {"num_examples": sum(p["num_examples"] for p in parts),
             "num_positive": sum(p["num_positive"] for p in parts),
             "class_counts": {c: sum(p["class_counts"][c] for p in parts) for c in names},
             "shards": [{**sh, "file": os.path.abspath(os.path.join(data_dir, sh["file"]))}
                        for p in parts for sh in p["shards"]]}
    for s in manifest["splits"].values():
        for sh in s["shards"]:
            sh["file"] = os.path.abspath(os.path.join(data_dir, sh["file"]))
    manifest["splits"]["train"] = train
    manifest["source"] = f"{data_dir} splits {'+'.join(splits)} as train"
    out = os.path.join(out_dir, f"data_{'_'.join(splits)}")
    files.write_json(os.path.join(out, "manifest.json"), manifest)
    return out


# ---------------------------------------------------------------------------------------------
# The reference side: airbench's own code, patched to run on the CPU from our data.


@dataclasses.dataclass
class ReferenceRecord:
    """What the patches capture while airbench trains."""
    step_losses: list = dataclasses.field(default_factory=list)  # mean per-example loss
    step_times: list = dataclasses.field(default_factory=list)   # perf_counter at each loss
    step_batches: list = dataclasses.field(default_factory=list)  # examples in each loss
    epochs: list = dataclasses.field(default_factory=list)       # airbench's logged rows


class CpuEvent:
    """torch.cuda.Event(enable_timing=True) on the CPU: the code it times runs synchronously."""

    def __init__(self, enable_timing: bool = False, **_):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end: "CpuEvent") -> float:
        return 1e3 * (end.t - self.t)  # milliseconds, as CUDA events


@contextlib.contextmanager
def airbench_on_cpu(train_data: tuple, test_data: tuple, classes, record: ReferenceRecord):
    """airbench94 on the CPU, in float32, fed from our arrays; every patch is undone on exit.

    `train_data`, `test_data`: (uint8 NHWC images, int64 labels). The patches:
      1. data: `CifarLoader` (as airbench.utils.train builds the test loader and
         lib_airbench94.train94 the train loader) becomes a subclass that reads our arrays,
         written in airbench's own cifar10/{train,test}.pt format to a temporary folder, onto
         the CPU (its `gpu` argument); its iteration and augmentation are airbench's.
      2. dtype: Module.half and Tensor.half give float32 (airbench runs fp16 on the GPU, BN in
         fp32; fp16 convolutions are slow or missing on a CPU).
      3. device: Module.cuda is a no-op (`make_net94` ends `.half().cuda()`).
      4. timing: torch.cuda.Event is a CPU timer and torch.cuda.synchronize a no-op.
      5. per-step losses: the nn.CrossEntropyLoss that airbench.utils.train builds records
         each call's mean per-example loss and the time (airbench exposes none).
      6. per-epoch rows: airbench.utils.print_training_details (which gets train's locals:
         epoch, val_acc, tta_val_acc, total_time_seconds, ...) records them, then prints.
    """
    from unittest import mock

    from research.benchmarks.airbench_scripts import _torchvision_stand_in, _torchvision_works

    # airbench.utils imports torchvision for transforms.Normalize (and the dataset download,
    # unused): without a working torchvision for this torch, a stand-in that computes it (only
    # these keys of sys.modules, as airbench_scripts.muon_on_cpu does)
    stand_in = {} if _torchvision_works() else _torchvision_stand_in()
    sys.modules.update(stand_in)
    import airbench
    import airbench.lib_airbench94
    import airbench.utils
    import torch

    tmp = tempfile.mkdtemp(prefix="airbench-data-")
    for name, (images, labels) in (("train", train_data), ("test", test_data)):
        torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                    "classes": list(classes)}, os.path.join(tmp, f"{name}.pt"))

    class OurCifarLoader(airbench.utils.CifarLoader):
        """airbench's CifarLoader on our data folder and the CPU; `path` and `gpu` ignored."""

        def __init__(self, path, train=True, batch_size=500, aug=None, drop_last=None,
                     shuffle=None, altflip=False, gpu=0):
            super().__init__(tmp, train, batch_size, aug, drop_last, shuffle, altflip,
                             gpu="cpu")

    loss_class = torch.nn.CrossEntropyLoss

    class RecordingLoss(loss_class):
        def forward(self, input, target):
            out = super().forward(input, target)
            record.step_times.append(time.perf_counter())
            record.step_losses.append(float(out.detach().float().mean()))
            return out

    print_details = airbench.utils.print_training_details

    def recording_print(variables, is_final_entry):
        record.epochs.append({k: variables.get(k) for k in (
            "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc",
            "total_time_seconds")})
        print_details(variables, is_final_entry)
        sys.stdout.flush()

    patches = [
        mock.patch.object(airbench.utils, "CifarLoader", OurCifarLoader),
        mock.patch.object(airbench.lib_airbench94, "CifarLoader", OurCifarLoader),
        mock.patch.object(torch.nn.Module, "half", lambda self: self.float()),
        mock.patch.object(torch.Tensor, "half", lambda self, *a, **k: self.float()),
        mock.patch.object(torch.nn.Module, "cuda", lambda self, device=None: self),
        mock.patch.object(torch.cuda, "Event", CpuEvent),
        mock.patch.object(torch.cuda, "synchronize", lambda device=None: None),
        mock.patch.object(airbench.utils.nn, "CrossEntropyLoss", RecordingLoss),
        mock.patch.object(airbench.utils, "print_training_details", recording_print),
    ]
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield airbench
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        for name in stand_in:
            sys.modules.pop(name, None)


def setup_torch(threads: int, seed: int, package: bool = True) -> dict:
    """`package`: the reference is the airbench package (its version recorded)."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    from importlib.metadata import version

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "airbench": version("airbench") if package else "not used"}


def run_reference(train, test, classes, epochs: float) -> dict:
    """airbench.train94 for `epochs`, verbose (its per-epoch test accuracy and final TTA)."""
    record = ReferenceRecord()
    start = time.perf_counter()
    with airbench_on_cpu(train, test, classes, record) as airbench:
        hyp = airbench.lib_airbench94.hyp
        airbench.train94(epochs=epochs, verbose=True)
    wall = time.perf_counter() - start
    rows = [r for r in record.epochs if isinstance(r["epoch"], int)]
    final = next(r for r in record.epochs if r["epoch"] == "eval")
    steps = len(record.step_losses)
    batch = hyp["opt"]["batch_size"]
    # airbench's timer: the whitening init and the train epochs (its per-epoch eval excluded)
    train_seconds = rows[-1]["total_time_seconds"]
    return {"per_epoch": [{"epoch": r["epoch"] + 1, "test_acc": r["val_acc"],
                           "train_loss_last_batch": r["train_loss"],
                           "seconds_cumulative": r["total_time_seconds"]} for r in rows],
            "final_tta_acc": final["tta_val_acc"], "tta_level": hyp["net"]["tta_level"],
            "steps": steps, "batch_size": batch, "train_seconds": train_seconds,
            "img_per_s": steps * batch / train_seconds, "wall_seconds": wall,
            "step_losses": record.step_losses, "hyp": hyp}


def time_reference(train, test, classes, steps: int, warmup: int) -> dict:
    """Seconds of `steps` airbench train steps (loss call to loss call) after `warmup`."""
    record = ReferenceRecord()
    with airbench_on_cpu(train, test, classes, record) as airbench:
        per_epoch = len(train[0]) // airbench.lib_airbench94.hyp["opt"]["batch_size"]
        total = warmup + steps + 1
        airbench.train94(epochs=total / per_epoch * (1 - 1e-9), verbose=False)
    t = record.step_times
    seconds = t[warmup + steps] - t[warmup]
    batch = airbench.lib_airbench94.hyp["opt"]["batch_size"]
    return {"steps": steps, "warmup": warmup, "seconds": seconds, "batch_size": batch,
            "img_per_s": steps * batch / seconds}


# ---------------------------------------------------------------------------------------------
# Our side: the one function that calls our training library (research.training is being
# restructured; keep the import surface here, small and obvious).


def ours_config(flagfile: str, data_dir: str, run_dir: str, **overrides):
    """The recipe's TrainConfig, parsed from `flagfile` by absl with the train app's flag
    definitions on a FlagValues of its own (research.training.recipes), so our flags do not
    clash with the recipe's; `overrides` are train flags given after the flagfile."""
    from research.training import recipes

    fv = flags.FlagValues()
    recipes.define_train_flags(fv, "research.apps.train")
    base = dict(data_dir=data_dir, run_name="ours", checkpoint_dir=run_dir, log_dir=run_dir,
                restart=True, progress=False, gradcam_images=0)
    fv(["ours", f"--flagfile={flagfile}"] +
       [f"--{k}={v}" for k, v in {**base, **overrides}.items()])
    return recipes.config_from_flags(fv)  # as the train app reads its own flags


def train_ours(cfg, test_each_epoch: bool = True, final_tta: bool = True,
               boundaries=()) -> dict:
    """train_and_evaluate(cfg) plus one extra action: the 10-class test accuracy without TTA
    at each of the loop's evaluations (every epoch), with --tta_shifts at the end, and the
    seconds of each train-loop call (`boundaries`: steps at which a call must end)."""
    import dataclasses as dc

    from research.training.actions import Action
    from research.training.evaluator import Evaluator
    from research.training.loop import train_and_evaluate

    out = {"per_epoch": [], "calls": []}

    class TestAccuracy(Action):
        def __init__(self):
            self.evaluators = {}  # by tta: built once, on the loop's strategy and model

        def evaluate(self, ctx, tta: bool) -> float:
            if tta not in self.evaluators:
                cfg_ = dc.replace(ctx.cfg, tta=tta, tta_shifts=tta)
                self.evaluators[tta] = Evaluator(cfg_, ctx.evaluator.strategy, ctx.state.model,
                                                 ctx.manifest["positive_class_id"])
            return self.evaluators[tta].evaluate("test").class_accuracy

        def next_boundary(self, ctx):
            return next((b for b in boundaries if b > ctx.step), None)

        def __call__(self, ctx):
            out["calls"].append({"step": ctx.step, "steps": ctx.steps_run,
                                 "seconds": ctx.seconds})
            if test_each_epoch and ctx.result is not None:
                acc = self.evaluate(ctx, tta=False)
                out["per_epoch"].append({"epoch": ctx.step / ctx.plan.steps_per_epoch,
                                         "step": ctx.step, "test_acc": acc,
                                         "train_seconds_cumulative": ctx.train_seconds})
                print(f"ours | step {ctx.step} | test 10-class acc {acc:.4f}", flush=True)

        def end(self, ctx):
            out["steps"] = ctx.step
            out["steps_per_epoch"] = ctx.plan.steps_per_epoch
            if final_tta:
                out["final_tta_acc"] = self.evaluate(ctx, tta=True)

    out["summary"] = train_and_evaluate(cfg, actions=[TestAccuracy()])
    return out


def run_ours(cfg) -> dict:
    start = time.perf_counter()
    out = train_ours(cfg)
    wall = time.perf_counter() - start
    seconds = out["summary"]["train_seconds"]
    steady = out["calls"][1:]  # the first call also traces the step
    steady_s = sum(c["seconds"] for c in steady)
    return {"per_epoch": out["per_epoch"], "final_tta_acc": out.get("final_tta_acc"),
            "steps": out["steps"], "batch_size": cfg.batch_size, "train_seconds": seconds,
            "img_per_s": out["steps"] * cfg.batch_size / seconds,
            "img_per_s_after_first_call": (sum(c["steps"] for c in steady) * cfg.batch_size
                                           / steady_s) if steady_s else None,
            "wall_seconds": wall, "config": dataclasses.asdict(cfg)}


def time_ours(cfg, steps: int, warmup: int) -> dict:
    cfg = dataclasses.replace(cfg, train_steps=warmup + steps, steps_per_loop=warmup + steps,
                              tta=False, tta_shifts=False)
    out = train_ours(cfg, test_each_epoch=False, final_tta=False,
                     boundaries=(warmup, warmup + steps))
    timed = [c for c in out["calls"] if c["step"] > warmup]  # an eval may split them
    seconds = sum(c["seconds"] for c in timed)
    assert sum(c["steps"] for c in timed) == steps, out["calls"]
    return {"steps": steps, "warmup": warmup, "seconds": seconds, "batch_size": cfg.batch_size,
            "img_per_s": steps * cfg.batch_size / seconds}


# ---------------------------------------------------------------------------------------------
# Parity: both networks from the same weights, on the same batches, step by step.

AIRBENCH_PEAK = 0.23  # utils.train: triangle(total_train_steps, start=0.2, end=0.07, peak=0.23)
PARITY_TARGET = 1e-3  # the largest relative loss difference over the steps


def airbench_names(model) -> list[tuple[str, object]]:
    """(airbench's state_dict key, our variable) for every weight of our fast CNN, by layer
    order. make_net94 (95, 96) is nn.Sequential: the whitening conv (0), GELU (1), one
    ConvGroup per width (conv1, norm1, conv2, norm2; lib_airbench96's also conv3, norm3),
    MaxPool2d, Flatten, Linear (bias-free), Mul. Our input Normalization has no counterpart:
    airbench's loader normalises."""
    from keras import layers

    from research.models.layers import FusedBatchNorm, PatchWhitening

    weighted = [x for x in model.layers
                if x.weights and not isinstance(x, layers.Normalization)]
    convs = sum(x.name.startswith("group0_conv") for x in weighted) or 2  # per group
    groups = (len(weighted) - 2) // (2 * convs)
    kinds = ([PatchWhitening] + [layers.Conv2D, FusedBatchNorm] * convs * groups
             + [layers.Dense])
    if len(weighted) != len(kinds) or not all(map(isinstance, weighted, kinds)):
        raise ValueError(f"{model.name}: not airbench's layer order (whitening, then conv, "
                         f"BN, conv, BN[, conv, BN] per group, then the linear layer): "
                         f"{[type(x).__name__ for x in weighted]}")
    if any(x.bias is not None for x in weighted[1:] if not isinstance(x, FusedBatchNorm)):
        raise ValueError(f"{model.name}: airbench's convs and linear layer have no bias")
    names = [("0.weight", weighted[0].kernel), ("0.bias", weighted[0].bias)]
    bn = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
          ("running_var", "moving_variance"))
    per = 2 * convs
    for g in range(groups):
        for i, (conv, norm) in enumerate(zip(weighted[1 + per * g::2][:convs],
                                             weighted[2 + per * g::2][:convs]), start=1):
            names.append((f"{2 + g}.conv{i}.weight", conv.kernel))
            names += [(f"{2 + g}.norm{i}.{t}", getattr(norm, k)) for t, k in bn]
    names.append((f"{4 + groups}.weight", weighted[-1].kernel))
    return names


def to_torch_layout(value):
    """A Keras HWIO conv kernel as torch's OIHW, a Dense (in, out) kernel as nn.Linear's
    (out, in); vectors as they are."""
    import numpy as np

    value = np.asarray(value)
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
        value = value.T
    return np.ascontiguousarray(value)


def airbench_state(model, values: dict | None = None) -> dict:
    """Our model's weights as airbench's state_dict entries (numpy, torch layouts); or, given
    `values` (our variable path -> array, e.g. gradients), those values."""
    return {name: to_torch_layout(v.numpy() if values is None else values[v.path])
            for name, v in airbench_names(model) if values is None or v.path in values}


def is_trained(name: str) -> bool:
    """What training can move: not the BN statistics, nor BN's scale (1, as airbench's);
    the whitening filters are frozen but the lookahead pulls them too."""
    return ".running_" not in name and not (".norm" in name and name.endswith(".weight"))


def max_rel_diff(ours: dict, ref: dict, norm: bool = False) -> tuple[float, str]:
    """max over the shared names of max|ours - ref| / max|ref| (norm: ||ours - ref|| / ||ref||),
    and the name where it is."""
    import numpy as np

    size = (lambda x: float(np.linalg.norm(x))) if norm else (lambda x: float(np.abs(x).max()))
    worst = (0.0, "")
    for name in ref:
        if name in ours:
            worst = max(worst, (size(ours[name] - ref[name]) / (size(ref[name]) or 1.0), name))
    return worst


def rel(a: float, ref: float) -> float:
    return abs(a - ref) / abs(ref)


def parity_config(flagfile: str, data_dir: str, run_dir: str, steps: int, batch: int,
                  seed: int):
    """The recipe over `steps` steps of `batch` (0: the recipe's), float32, one step per
    call. airbench's learning rate is per summed example, so ours (per mean loss) is scaled
    by batch / the recipe's batch; its L2 coefficient is per example either way. The warm-up
    is airbench's int(0.23 steps) steps (ours: int(warmup_epochs * steps_per_epoch))."""
    from research.data import pipeline
    from research.training import examples
    from research.training.loop import prepare_config

    cfg = ours_config(flagfile, data_dir, run_dir, precision="float32", seed=seed,
                      train_steps=steps, steps_per_loop=1)
    batch = batch or cfg.batch_size
    manifest = pipeline.load_manifest(cfg.data_dir)
    per_epoch = pipeline.steps_per_epoch(manifest, batch,
                                         num_examples=examples.num_examples(cfg, manifest, "train"))
    warm = int(AIRBENCH_PEAK * steps)
    cfg = dataclasses.replace(cfg, batch_size=batch, warmup_epochs=(warm + 0.5) / per_epoch,
                              learning_rate=cfg.learning_rate * batch / cfg.batch_size)
    assert int(cfg.warmup_epochs * per_epoch) == warm
    return prepare_config(cfg), {"warmup_steps": warm, "steps_per_epoch": per_epoch}


def parity_batches(cfg, steps: int) -> list[dict]:
    """The first `steps` batches of our training stream (shuffled, flipped and cropped as the
    recipe's, [0, 1]), as numpy."""
    from research.data import pipeline
    from research.training import inputs

    ds = pipeline.make_dataset(cfg.data_dir, "train", cfg.batch_size, training=True,
                               stream=inputs.train_stream(cfg))
    keys = ("image", "label", "class_id")
    return [{k: b[k].numpy() for k in keys} for b in ds.take(steps)]


def probe_ours(cfg, model, batch: dict) -> dict:
    """Our first forward pass (training mode) and the gradient of the mean loss (the L2 term
    left out, as torch's SGD adds it in the step), leaving the model as it was; and how many
    (image, channel) maxima of the global max pool are exact ties (tf.reduce_max's gradient
    splits evenly among them, nn.MaxPool2d's goes to the first)."""
    import keras
    import tensorflow as tf

    from research.training.steps import per_example_loss

    saved = [v.numpy() for v in model.weights]  # training mode moves the BN statistics
    tensors = {k: tf.constant(v) for k, v in batch.items()}
    both = keras.Model(model.input, [model.get_layer("gmp").input, model.output])
    with tf.GradientTape() as tape:
        fmap, logits = both(tensors["image"], training=True)
        loss = tf.reduce_mean(per_example_loss(cfg, tensors, logits, None))
    grads = tape.gradient(loss, model.trainable_variables)
    for v, s in zip(model.weights, saved):
        v.assign(s)
    inputs = model.get_layer("normalize")(tensors["image"]).numpy().transpose(0, 3, 1, 2)
    fmap = fmap.numpy().reshape(len(fmap), -1, fmap.shape[-1])
    ties = int(((fmap == fmap.max(1, keepdims=True)).sum(1) > 1).sum())
    return {"inputs": inputs, "logits": logits.numpy(), "loss": float(loss),
            "grads": airbench_state(model, {v.path: g.numpy() for v, g in
                                            zip(model.trainable_variables, grads)}),
            "pool_ties": ties, "pool_maxima": fmap.shape[0] * fmap.shape[2]}


def parity_ours(cfg, batches: list[dict]) -> dict:
    """Our side: the train state as the train loop builds it (weights, whitening from the
    first 5,000 training images, optimizer, lookahead), stepped one batch per call."""
    import keras
    import numpy as np
    import tensorflow as tf

    from research.data import pipeline
    from research.training import examples
    from research.training.state import create_train_state, plan_steps
    from research.training.steps import make_train_loop

    keras.utils.set_random_seed(cfg.seed)
    manifest = pipeline.load_manifest(cfg.data_dir)
    plan = plan_steps(cfg, manifest, examples.num_examples(cfg, manifest, "train"))
    assert plan.total_steps == len(batches)
    state = create_train_state(cfg, tf.distribute.get_strategy(), manifest, plan)
    start = airbench_state(state.model)
    probe = probe_ours(cfg, state.model, batches[0])
    loop_fn = make_train_loop(cfg, state, manifest["positive_class_id"], None)
    it = iter(tf.data.Dataset.from_tensor_slices(
        {k: np.stack([b[k] for b in batches]) for k in batches[0]}))
    losses, states = [], []
    for _ in batches:
        loop_fn(it, tf.constant(1))
        losses.append(float(state.train_metrics["loss"].result()))
        for m in state.train_metrics.values():
            m.reset_state()
        states.append({k: v for k, v in airbench_state(state.model).items() if is_trained(k)})
    return {"start": start, "probe": probe, "losses": losses, "states": states,
            "lookahead_every": cfg.lookahead_every}


class ParityLoader:
    """What airbench.utils.train reads of its train loader: batch_size, len(), epoch, images
    (its whitening init takes the first 5,000) and normalize, then one epoch of `batches`
    (normalised NCHW images, labels), exactly those, no augmentation. Before each batch after
    the first it calls `after_step(k)`: airbench's net has then taken k steps (lookahead
    included)."""

    def __init__(self, images, normalize, batches: list, after_step):
        self.epoch = 0
        self.images, self.normalize = images, normalize
        self.batches, self.after_step = batches, after_step
        self.batch_size = len(batches[0][1])

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for k, batch in enumerate(self.batches):
            if k:
                self.after_step(k)
            yield batch
        self.epoch += 1


def whitening_difference(own, ours) -> dict:
    """airbench's own whitening filters (OIHW, 2n: n eigenvectors then their negatives)
    against ours: per eigenvector, its sign is LAPACK's choice, so compared up to sign."""
    import numpy as np

    n = len(ours) // 2
    diffs, flips = [], 0
    for k in range(n):
        same, opposite = (float(np.abs(own[k] - s * ours[k]).max()) for s in (1, -1))
        flips += opposite < same
        diffs.append(min(same, opposite) / float(np.abs(ours[k]).max()))
    return {"max_rel_diff": max(diffs), "worst_filter": int(np.argmax(diffs)),
            "sign_flips": flips, "filters": n}


def reference_lib(airbench, lib: str = "94", repo: str | None = None):
    """The module of train<lib> and make_net<lib>: the package's airbench.lib_airbench<lib>,
    or (`repo`) that file of a checkout, loaded as a module of the package (its relative
    imports read the package's utils)."""
    import importlib

    if repo is None:
        return importlib.import_module(f"airbench.lib_airbench{lib}")
    path = os.path.join(repo, "airbench", f"lib_airbench{lib}.py")
    spec = importlib.util.spec_from_file_location(f"airbench.lib_airbench{lib}_repo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parity_reference(ours: dict, batches: list[dict], whiten_images, classes,
                     lib: str = "94", repo: str | None = None) -> dict:
    """airbench's side: airbench.train<lib> (epochs=1 over a loader of our `batches`: its
    total_train_steps is len(batches)), its make_net<lib> returning a net with our initial
    weights, its whitening init run on the same 5,000 images `whiten_images` (uint8 NHWC)
    and then replaced by ours (its own filters are kept for the check). `repo`: lib's file
    from that checkout (reference_lib)."""
    from unittest import mock

    import numpy as np
    import torch

    record = ReferenceRecord()
    start = ours["start"]
    labels = np.zeros(len(whiten_images), np.int64)
    # train() builds a test loader; with verbose=False it never evaluates it
    with airbench_on_cpu((whiten_images, labels), (whiten_images, labels), classes,
                         record) as airbench:
        import torchvision  # the real one or airbench_on_cpu's stand-in

        utils = airbench.utils
        module = reference_lib(airbench, lib, repo)
        smoothing = module.hyp["opt"]["label_smoothing"]
        nets = []

        def make_net():
            net = getattr(module, f"make_net{lib}")()  # float32 on the CPU (the patches)
            state = net.state_dict()
            extra = set(start) ^ {k for k in state if not k.endswith("num_batches_tracked")}
            if extra:
                raise ValueError(f"our weights and make_net{lib}'s differ in {sorted(extra)}")
            with torch.no_grad():
                for name, value in start.items():
                    if tuple(state[name].shape) != value.shape:
                        raise ValueError(f"{name}: ours {value.shape}, airbench's "
                                         f"{tuple(state[name].shape)}")
                    state[name].copy_(torch.from_numpy(value))
            nets.append(net)
            return net

        normalize = torchvision.transforms.Normalize(utils.CIFAR_MEAN, utils.CIFAR_STD)
        data = [(normalize(torch.from_numpy(b["image"]).permute(0, 3, 1, 2)).contiguous(
                    memory_format=torch.channels_last),
                 torch.from_numpy(b["class_id"].astype(np.int64))) for b in batches]

        # Before any step: one forward pass and gradient of a net with our weights.
        net = make_net()
        net.train()
        x, y = data[0]
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=smoothing,
                                                 reduction="none").sum()
        loss.backward()
        probe = {"inputs": x.numpy(), "logits": logits.detach().numpy(),
                 "loss": loss.item() / len(y),
                 "grads": {k: p.grad.numpy() / len(y) for k, p in net.named_parameters()
                           if p.grad is not None}}
        nets.clear()

        states, whiten = [], {}

        def trained_state(net):
            return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()
                    if k in start and is_trained(k)}

        own_init = utils.init_whitening_conv

        def init_whitening_as_ours(layer, train_set, eps=5e-4):
            own_init(layer, train_set, eps)  # airbench's own, on the same 5,000 images
            whiten.update(whitening_difference(layer.weight.detach().numpy(),
                                               start["0.weight"]))
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(start["0.weight"]))

        images = torch.from_numpy(whiten_images).permute(0, 3, 1, 2).float() / 255
        loader = ParityLoader(images, normalize, data,
                              lambda k: states.append(trained_state(nets[-1])))
        with mock.patch.object(utils, "init_whitening_conv", init_whitening_as_ours):
            model = getattr(module, f"train{lib}")(train_loader=loader, epochs=1,
                                                   make_net=make_net, verbose=False)
        states.append(trained_state(model))
    return {"probe": probe, "losses": record.step_losses, "states": states,
            "whitening": whiten}


def compare_parity(ours: dict, ref: dict) -> dict:
    """The per-step table and the first forward pass, gradient and update, side by side."""
    import numpy as np

    po, pr = ours["probe"], ref["probe"]
    rows = []
    for k, (lo, lr) in enumerate(zip(ours["losses"], ref["losses"]), start=1):
        w, name = max_rel_diff(ours["states"][k - 1], ref["states"][k - 1])
        rows.append({"step": k, "ours": lo, "airbench": lr, "rel_diff": rel(lo, lr),
                     "weights_rel_diff": w, "weights_worst": name})
    worst = max(rows, key=lambda r: r["rel_diff"])
    grad, grad_name = max_rel_diff(po["grads"], pr["grads"])
    grad_norm, grad_norm_name = max_rel_diff(po["grads"], pr["grads"], norm=True)
    return {
        "rows": rows, "max_rel_diff": worst["rel_diff"], "at_step": worst["step"],
        "target": PARITY_TARGET, "meets_target": worst["rel_diff"] <= PARITY_TARGET,
        "steps_compared": len(rows),
        "before_any_step": {
            "inputs_max_abs_diff": float(np.abs(po["inputs"] - pr["inputs"]).max()),
            "logits_rel_diff": float(np.abs(po["logits"] - pr["logits"]).max()
                                     / np.abs(pr["logits"]).max()),
            "loss_ours": po["loss"], "loss_airbench": pr["loss"],
            "loss_rel_diff": rel(po["loss"], pr["loss"]),
            "grad_rel_diff": grad, "grad_worst": grad_name,
            "grad_norm_rel_diff": grad_norm, "grad_norm_worst": grad_norm_name,
            "pool_ties": po["pool_ties"], "pool_maxima": po["pool_maxima"],
            "grads_compared": sorted(set(po["grads"]) & set(pr["grads"])),
            "grads_missing": sorted(set(po["grads"]) ^ set(pr["grads"]))},
        "whitening": ref["whitening"]}


def one_ulp_apart(start: dict, seed: int = 1) -> dict:
    """The same initial weights with every conv and linear weight moved by one float32 ulp,
    up or down at random: float32 rounding's own size, for the noise floor."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for name, v in start.items():
        if v.ndim > 1 and name != "0.weight":  # the whitening filters are data, not drawn
            up = rng.random(v.shape) < 0.5
            v = np.where(up, np.nextafter(v, np.inf), np.nextafter(v, -np.inf)).astype(v.dtype)
        out[name] = v
    return out


def noise_floor(ref: dict, again: dict) -> dict:
    """airbench against itself from weights one ulp apart: how far float32 rounding alone
    moves the per-step losses (what a port can be expected to match at best)."""
    diffs = [rel(a, r) for a, r in zip(again["losses"], ref["losses"])]
    k = max(range(len(diffs)), key=diffs.__getitem__)
    return {"max_rel_diff": diffs[k], "at_step": k + 1, "rel_diffs": diffs}


def run_parity(flagfile: str, data_dir: str, steps: int, batch: int, seed: int,
               floor: bool = True, lib: str = "94", repo: str | None = None) -> dict:
    """Both sides over `steps` batches of our stream, compared (compare_parity); `floor`:
    also airbench against itself from weights one ulp apart (noise_floor)."""
    from research.data import pipeline
    from research.training.model import DATA_INIT_IMAGES

    with tempfile.TemporaryDirectory(prefix="parity-") as run_dir:
        cfg, schedule = parity_config(flagfile, data_dir, run_dir, steps, batch, seed)
        batches = parity_batches(cfg, steps)
        start = time.perf_counter()
        ours = parity_ours(cfg, batches)
        ours_s = time.perf_counter() - start
    # the images our init_model_from_data whitened from (the run excludes no class)
    assert not cfg.exclude_classes
    whiten_images = pipeline.take_examples(cfg.data_dir, "train", DATA_INIT_IMAGES)["image"]
    start = time.perf_counter()
    ref = parity_reference(ours, batches, whiten_images,
                           pipeline.load_manifest(cfg.data_dir)["class_names"], lib, repo)
    ref_s = time.perf_counter() - start
    if len(ref["losses"]) != steps:
        raise RuntimeError(f"airbench took {len(ref['losses'])} steps, not {steps}")
    out = compare_parity(ours, ref)
    if floor:
        again = parity_reference({**ours, "start": one_ulp_apart(ours["start"])}, batches,
                                 whiten_images,
                                 pipeline.load_manifest(cfg.data_dir)["class_names"], lib,
                                 repo)
        out["noise_floor"] = noise_floor(ref, again)
        out["meets_noise_floor"] = out["max_rel_diff"] <= max(
            PARITY_TARGET, 2 * out["noise_floor"]["max_rel_diff"])
    out.update(steps=steps, batch_size=cfg.batch_size,
               seconds={"ours": ours_s, "airbench": ref_s},
               schedule={**schedule, "airbench_peak": AIRBENCH_PEAK,
                         "ours_warmup_epochs": cfg.warmup_epochs,
                         "ours_learning_rate": cfg.learning_rate},
               lookahead_every=ours["lookahead_every"], config=dataclasses.asdict(cfg))
    return out


def run_parity_muon(flagfile: str, data_dir: str, steps: int, batch: int, seed: int,
                    repo: str, floor: bool = True) -> dict:
    """run_parity for --recipe=airbench94_muon: our Muon recipe against airbench94_muon.py's
    main() (airbench_scripts.muon_parity_reference), the same comparison and noise floor."""
    from research.benchmarks import airbench_scripts as scripts
    from research.data import pipeline
    from research.training.model import DATA_INIT_IMAGES

    with tempfile.TemporaryDirectory(prefix="parity-") as run_dir:
        cfg, schedule = scripts.muon_parity_config(ours_config, flagfile, data_dir, run_dir,
                                                   steps, batch, seed)
        batches = parity_batches(cfg, steps)
        start = time.perf_counter()
        ours = parity_ours(cfg, batches)
        ours_s = time.perf_counter() - start
    assert not cfg.exclude_classes
    whiten_images = pipeline.take_examples(cfg.data_dir, "train", DATA_INIT_IMAGES)["image"]
    classes = pipeline.load_manifest(cfg.data_dir)["class_names"]

    def reference(ours_side):
        return scripts.muon_parity_reference(repo, ours_side, batches, whiten_images, classes,
                                             schedule["loader_len"], ReferenceRecord(),
                                             CpuEvent, is_trained, whitening_difference)

    start = time.perf_counter()
    ref = reference(ours)
    ref_s = time.perf_counter() - start
    if len(ref["losses"]) != steps:
        raise RuntimeError(f"airbench94_muon took {len(ref['losses'])} steps, not {steps}")
    out = compare_parity(ours, ref)
    if floor:
        again = reference({**ours, "start": one_ulp_apart(ours["start"])})
        out["noise_floor"] = noise_floor(ref, again)
        out["meets_noise_floor"] = out["max_rel_diff"] <= max(
            PARITY_TARGET, 2 * out["noise_floor"]["max_rel_diff"])
    out.update(steps=steps, batch_size=cfg.batch_size,
               seconds={"ours": ours_s, "airbench": ref_s},
               schedule={**schedule, "ours_learning_rate": cfg.learning_rate,
                         "ours_weight_decay": cfg.weight_decay},
               lookahead_every=0, config=dataclasses.asdict(cfg))
    return out


def format_parity(p: dict) -> str:
    lines = [f"parity: {p['steps']} steps of {p['batch_size']}, the same initial weights and "
             f"batches; {p['what']}",
             f"{'step':>4}  {'ours loss':>12}  {'airbench loss':>13}  {'rel diff':>9}  "
             f"{'weights rel diff after the step (worst)':<40}"]
    for r in p["rows"]:
        lines.append(f"{r['step']:>4}  {r['ours']:>12.7f}  {r['airbench']:>13.7f}  "
                     f"{r['rel_diff']:>9.2e}  {r['weights_rel_diff']:.2e} "
                     f"({r['weights_worst']})")
    verdict = "meets" if p["meets_target"] else "DOES NOT meet"
    b, w, s = p["before_any_step"], p["whitening"], p["schedule"]
    lines += [f"max relative loss difference {p['max_rel_diff']:.2e} at step {p['at_step']}: "
              f"{verdict} the target <= {p['target']:g}"]
    if "noise_floor" in p:
        f = p["noise_floor"]
        lines += [f"noise floor: airbench against itself from weights one float32 ulp apart: "
                  f"max relative loss difference {f['max_rel_diff']:.2e} at step "
                  f"{f['at_step']}; ours against airbench is "
                  + ("within" if p["meets_noise_floor"] else "OUTSIDE")
                  + " the target or twice that floor"]
    lines += [
              f"before any step (batch 1): normalised inputs max abs diff "
              f"{b['inputs_max_abs_diff']:.1e}; logits rel diff {b['logits_rel_diff']:.1e}; "
              f"loss rel diff {b['loss_rel_diff']:.1e}; gradient rel diff: max element "
              f"{b['grad_rel_diff']:.1e} (worst {b['grad_worst']}), norm "
              f"{b['grad_norm_rel_diff']:.1e} (worst {b['grad_norm_worst']}); exact ties in "
              f"our global max pool: {b['pool_ties']} of {b['pool_maxima']:,} maxima",
              f"whitening: airbench's own init on the same 5,000 images vs ours: max rel diff "
              f"{w['max_rel_diff']:.1e} (filter {w['worst_filter']}; {w['sign_flips']} of "
              f"{w['filters']} eigenvectors of opposite sign); airbench's net then set to ours",
              (f"schedule: both warm up int({s['airbench_peak']} x {p['steps']}) = "
               f"{s['warmup_steps']} steps (ours: --warmup_epochs={s['ours_warmup_epochs']:.6g}"
               f" x {s['steps_per_epoch']} steps/epoch), --learning_rate="
               f"{s['ours_learning_rate']:g}; lookahead every {p['lookahead_every']} steps"
               ) if "airbench_peak" in s else (
               f"schedule: every rate lr0 (1 - step / {p['steps']}), the whitening bias's "
               f"over {s['whiten_bias_steps']} steps (main()'s loader of "
               f"{s['loader_len']} batches per epoch, 8 epochs); ours --learning_rate="
               f"{s['ours_learning_rate']:g}, --weight_decay={s['ours_weight_decay']:.6g}"),
              f"seconds: ours {p['seconds']['ours']:.0f}, airbench {p['seconds']['airbench']:.0f};"
              f" {machine.vector_flags_line(p['machine']['lscpu'])}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The table.


def _acc(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _num(x, fmt="{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_table(results: dict, ran_now: set, timing: dict | None) -> str:
    """One table of both sides: per-epoch test accuracy, final TTA accuracy, train seconds
    and img/s of the full runs, and the back-to-back timing if any."""
    from research.machine import banner

    ref, ours = results.get("reference"), results.get("ours")
    lines = [banner()]

    def source(side, r):
        if r is None:
            return f"{side}: no results (run --sides={side})"
        when = "run now" if side in ran_now else "SAVED, reused (not re-run)"
        return (f"{side}: {when}, {r['finished']}, {r['train_images']:,} train images "
                f"({'+'.join(r['train_splits'])}), {r['test_images']:,} test, "
                f"{r['epochs']:g} epochs, {r['steps']} steps of {r['batch_size']}; "
                f"{r['what']}; {machine.vector_flags_line(r['machine']['lscpu'])}")

    lines += [source("reference", ref), source("ours", ours), ""]
    w = 44
    lines.append(f"{'':<{w}}{'reference':>10}  {'ours':>10}")
    n = max(len(r["per_epoch"]) for r in (ref, ours) if r) if (ref or ours) else 0
    for i in range(n):
        row = [r["per_epoch"][i]["test_acc"] if r and i < len(r["per_epoch"]) else None
               for r in (ref, ours)]
        lines.append(f"{f'test acc after epoch {i + 1} (no TTA)':<{w}}{_acc(row[0]):>10}  "
                     f"{_acc(row[1]):>10}")
    get = lambda r, k: r.get(k) if r else None  # noqa: E731
    lines += [f"{'test acc, final, TTA (mirror + 1px shifts)':<{w}}"
              f"{_acc(get(ref, 'final_tta_acc')):>10}  {_acc(get(ours, 'final_tta_acc')):>10}",
              f"{'train seconds (full run)':<{w}}{_num(get(ref, 'train_seconds')):>10}  "
              f"{_num(get(ours, 'train_seconds')):>10}",
              f"{'img/s (full run, its own timer)':<{w}}"
              f"{_num(get(ref, 'img_per_s'), '{:,.1f}'):>10}  "
              f"{_num(get(ours, 'img_per_s'), '{:,.1f}'):>10}"]
    if timing:
        r, o = timing["reference"], timing["ours"]
        lines.append(f"{'img/s (timing: ' + str(r['steps']) + ' steps, back to back)':<{w}}"
                     f"{r['img_per_s']:>10,.1f}  {o['img_per_s']:>10,.1f}")
        lines.append(f"timing ({timing['finished']}, one process, warm-up {r['warmup']} steps): "
                     f"ours / reference = {o['img_per_s'] / r['img_per_s']:.2f}; "
                     f"{machine.vector_flags_line(timing['machine']['lscpu'])}")
    lines.append("full-run img/s: the reference's timer covers the whitening init and the "
                 "train epochs, ours the train-loop calls (the first one traces the step); "
                 "either run may have shared the machine.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parity_mode(info: dict, results_dir: str) -> None:
    """--parity_steps: the step-by-step comparison, printed and saved as parity.json."""
    data_dir = training_data_dir(FLAGS.data_dir, FLAGS.train_splits, results_dir)
    if recipe().script:
        out = run_parity_muon(flagfile(), data_dir, FLAGS.parity_steps, FLAGS.parity_batch,
                              FLAGS.seed, FLAGS.reference_repo, floor=FLAGS.parity_noise_floor)
        reference = f"{recipe().script} (Newton-Schulz in bfloat16)"
    else:
        r = recipe()
        repo = FLAGS.reference_repo if r.lib_from_repo else None
        out = run_parity(flagfile(), data_dir, FLAGS.parity_steps, FLAGS.parity_batch,
                         FLAGS.seed, floor=FLAGS.parity_noise_floor, lib=r.lib, repo=repo)
        reference = (f"train{r.lib} of {repo}/airbench/lib_airbench{r.lib}.py (on airbench "
                     f"{{airbench}}'s utils" if repo else f"airbench.train{r.lib} ({{airbench}}")
    out.update(what=(f"ours {flagfile()} float32 vs {reference}, torch {{torch}}, float32, "
                     "{torch_threads} threads)").format(**info), finished=utc_now(),
               machine=machine_record(),
               data_dir=FLAGS.data_dir, train_splits=FLAGS.train_splits, **info)
    files.write_json(os.path.join(results_dir, "parity.json"), out)
    print(format_parity(out))
    print(f"saved {os.path.join(results_dir, 'parity.json')}")


def recipe() -> Recipe:
    return RECIPES[FLAGS.recipe]


def flagfile() -> str:
    return FLAGS.ours_flagfile or recipe().flagfile


def recipe_problem(sides, timing: bool, parity: bool) -> str | None:
    """One line on what this --recipe cannot do (checked before any work), or None."""
    r = recipe()
    if not os.path.isfile(flagfile()):
        return (f"--recipe={FLAGS.recipe}: our recipe {flagfile()} does not exist (not "
                "ported yet)" if not FLAGS.ours_flagfile else
                f"--ours_flagfile: {flagfile()} not found")
    needs_reference = timing or parity or "reference" in sides
    if needs_reference and r.script is None and FLAGS.recipe != "airbench94" and not (
            parity and not timing):
        return (f"--recipe={FLAGS.recipe}: only our side (--sides=ours) and --parity_steps "
                f"are implemented; the reference's full run and timing "
                f"(airbench.train{r.lib}) are not yet")
    if parity and r.lib_from_repo:
        if not FLAGS.reference_repo:
            return (f"--recipe={FLAGS.recipe} needs --reference_repo, a checkout of "
                    f"github.com/KellerJordan/cifar10-airbench (its airbench/lib_airbench"
                    f"{r.lib}.py)")
        path = os.path.join(FLAGS.reference_repo, "airbench", f"lib_airbench{r.lib}.py")
        if not os.path.isfile(path):
            return f"--reference_repo: {path} not found"
    if needs_reference and r.script is not None:
        if not FLAGS.reference_repo:
            return (f"--recipe={FLAGS.recipe} needs --reference_repo, a checkout of "
                    f"github.com/KellerJordan/cifar10-airbench (its {r.script})")
        if not os.path.isfile(os.path.join(FLAGS.reference_repo, r.script)):
            return f"--reference_repo: {os.path.join(FLAGS.reference_repo, r.script)} not found"
        if timing:
            return f"--recipe={FLAGS.recipe}: --timing_steps is not implemented for it"
        if "reference" in sides and FLAGS.epochs not in (None, r.epochs):
            return (f"--epochs={FLAGS.epochs:g}: {r.script} trains {r.epochs:g} epochs, "
                    "fixed in its main()")
    return None


def main(argv):
    del argv
    sides = list(dict.fromkeys(FLAGS.sides))
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        sys.exit(f"error: --sides: unknown side(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(SIDES)}")
    timing = FLAGS.timing_steps > 0
    parity = FLAGS.parity_steps > 0
    problem = recipe_problem(sides, timing, parity)
    if problem:
        sys.exit(f"error: {problem}")
    if timing or parity or "reference" in sides:  # first, before anything heavy is imported
        missing = missing_reference_packages(recipe().packages)
        if missing:
            sys.exit(INSTALL_HINT.format(", ".join(missing)))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "reference" in sides or timing or parity:  # torch before TensorFlow
        info = setup_torch(FLAGS.torch_threads, FLAGS.seed, package=recipe().script is None)
    results_dir = FLAGS.results_dir or recipe().results_dir
    epochs = FLAGS.epochs or recipe().epochs
    print(machine_record()["cpu"], flush=True)
    print(machine.vector_flags_line(machine.vector_flags()), flush=True)

    if parity:
        return parity_mode(info, results_dir)

    splits = FLAGS.train_splits
    ours_dir = os.path.join(results_dir, "ours")
    cfg = None
    if "ours" in sides or timing:
        cfg = ours_config(flagfile(), training_data_dir(FLAGS.data_dir, splits, results_dir),
                          ours_dir, epochs=epochs, precision=FLAGS.precision,
                          seed=FLAGS.seed)
    train = test = classes = None
    if "reference" in sides or timing:
        images, labels, classes = read_splits(FLAGS.data_dir, splits)
        train = (images, labels)
        test = read_splits(FLAGS.data_dir, ["test"])[:2]
        print(f"reference data: {len(train[0]):,} train images ({'+'.join(splits)}), "
              f"{len(test[0]):,} test, from {FLAGS.data_dir}", flush=True)

    if timing:
        n, w = FLAGS.timing_steps, FLAGS.timing_warmup
        out = {"reference": {**time_reference(train, test, classes, n, w), **info},
               "ours": {**time_ours(cfg, n, w), "precision": cfg.precision},
               "finished": utc_now(), "machine": machine_record()}
        files.write_json(os.path.join(results_dir, "timing.json"), out)
        print(format_table(load_results(results_dir), set(), out))
        return

    reference_name = (f"{recipe().script} of {FLAGS.reference_repo}" if recipe().script
                      else "airbench.train94 ({airbench}")
    what = {"reference": lambda: (reference_name + ", torch {torch}, float32, "
                                  "{torch_threads} threads)").format(**info),
            "ours": lambda: f"{flagfile()}, {cfg.precision}"}
    for side in sides:
        started = utc_now()
        print(f"{side}: training from {started}", flush=True)
        if side == "reference":
            if recipe().script:
                from research.benchmarks.airbench_scripts import run_muon_reference

                r = {**run_muon_reference(FLAGS.reference_repo, train, test, classes,
                                          ReferenceRecord(), CpuEvent), **info}
            else:
                r = {**run_reference(train, test, classes, epochs), **info}
            n_train, n_test = len(train[0]), len(test[0])
        else:
            r = run_ours(cfg)
            from research.data.pipeline import load_manifest

            manifest = load_manifest(cfg.data_dir)
            n_train = manifest["splits"]["train"]["num_examples"]
            n_test = manifest["splits"]["test"]["num_examples"]
        r.update(side=side, what=what[side](), started=started, finished=utc_now(),
                 epochs=epochs, recipe=FLAGS.recipe, train_splits=splits, train_images=n_train,
                 test_images=n_test, data_dir=FLAGS.data_dir, machine=machine_record())
        files.write_json(os.path.join(results_dir, f"{side}.json"), r)
        print(f"{side}: saved {os.path.join(results_dir, side + '.json')}", flush=True)
    print(format_table(load_results(results_dir), set(sides),
                       read_json(os.path.join(results_dir, "timing.json"))))


def load_results(results_dir: str) -> dict:
    return {side: r for side in SIDES
            if (r := read_json(os.path.join(results_dir, f"{side}.json"))) is not None}


if __name__ == "__main__":
    app.run(main)
