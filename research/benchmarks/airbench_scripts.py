"""The reference scripts of KellerJordan/cifar10-airbench that are not in the airbench package
(airbench94_muon.py), run on the CPU from our data. Nothing of them is copied here: the script
is loaded from a checkout of that repository (`--reference_repo`) and patched while it runs,
reversibly (a context manager), as `airbench_reference.airbench_on_cpu` patches the package.

    with muon_on_cpu(repo, train, test, classes, record, cpu_event) as script:
        script.main(0, script.CifarNet().to(memory_format=torch.channels_last))

The patches:
  1. torch.compile is the identity (the script compiles zeropower_via_newtonschulz5 and the
     net for the GPU; on this CPU inductor would need a compiler and changes nothing we
     measure). Its Newton-Schulz iteration still runs in bfloat16, as written.
  2. torchvision: the script uses torchvision.transforms.Normalize (and downloads with
     torchvision.datasets only when cifar10/*.pt is missing, which it never is here). The
     torchvision wheels on PyPI are CUDA builds that do not load beside the CPU torch, so a
     stand-in module gives Normalize with torchvision's arithmetic ((x - mean) / std per
     channel); if a working torchvision is installed, it is used instead.
  3. data: the script reads cifar10/{train,test}.pt (relative to the working directory, with
     map_location=cuda): ours are written there in its format, in a temporary folder that is
     the working directory while it runs, and torch.load maps onto the CPU.
  4. dtype and device: Module.half / Tensor.half give float32, Module.cuda is a no-op (fp16
     convolutions are slow or missing on a CPU; the reference keeps BN in fp32).
  5. timing: torch.cuda.Event is a CPU timer, torch.cuda.synchronize a no-op.
  6. records: F.cross_entropy (the script's summed loss) records each step's mean
     per-example loss and time; print_training_details records the per-epoch rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import types

MUON_SCRIPT = "airbench94_muon.py"


def script_path(repo: str, name: str = MUON_SCRIPT) -> str:
    """The script in a checkout of KellerJordan/cifar10-airbench; one line if it is missing."""
    path = os.path.join(repo, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--reference_repo: {path} not found (a checkout of "
                                "https://github.com/KellerJordan/cifar10-airbench is needed)")
    return path


def _torchvision_stand_in():
    """A module `torchvision` with transforms.Normalize as torchvision computes it."""
    import torch

    class Normalize(torch.nn.Module):
        def __init__(self, mean, std, inplace=False):
            super().__init__()
            self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)

        def forward(self, tensor):
            mean = self.mean.to(tensor.dtype).view(-1, 1, 1)
            std = self.std.to(tensor.dtype).view(-1, 1, 1)
            return tensor.sub(mean).div(std)

    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Normalize = Normalize
    tv.datasets = types.ModuleType("torchvision.datasets")
    return {"torchvision": tv, "torchvision.transforms": tv.transforms,
            "torchvision.datasets": tv.datasets}


def _torchvision_works() -> bool:
    try:
        import torchvision.transforms  # noqa: F401
        return True
    except Exception:  # a CUDA build beside the CPU torch fails in its own ways
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        return False


@contextlib.contextmanager
def muon_on_cpu(repo: str, train_data: tuple, test_data: tuple, classes, record, cpu_event):
    """airbench94_muon.py loaded from `repo` as a module, on the CPU in float32 (its
    Newton-Schulz in bfloat16), reading our (uint8 NHWC images, int64 labels) arrays;
    `record` is an airbench_reference.ReferenceRecord, `cpu_event` its CpuEvent (passed in:
    that module is often __main__). Every patch is undone on exit."""
    from unittest import mock

    import torch
    import torch.nn.functional as F

    path = script_path(repo)
    tmp = tempfile.mkdtemp(prefix="airbench-muon-")
    os.makedirs(os.path.join(tmp, "cifar10"))
    for name, (images, labels) in (("train", train_data), ("test", test_data)):
        torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                    "classes": list(classes)}, os.path.join(tmp, "cifar10", f"{name}.pt"))

    own_load, own_ce = torch.load, F.cross_entropy

    def load_on_cpu(f, map_location=None, **kwargs):
        return own_load(f, map_location="cpu", **kwargs)

    def recording_ce(input, target, *args, **kwargs):
        out = own_ce(input, target, *args, **kwargs)
        n = len(target) if kwargs.get("reduction") == "sum" else 1
        record.step_times.append(time.perf_counter())
        record.step_batches.append(len(target))
        record.step_losses.append(float(out.detach().float()) / n)
        return out

    def identity_compile(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    stand_in = {} if _torchvision_works() else _torchvision_stand_in()

    @contextlib.contextmanager
    def stand_in_modules():
        # only these keys: mock.patch.dict(sys.modules) would also drop every module imported
        # meanwhile (torch._dynamo on the first optimizer step), and a second import of those
        # registers torch libraries twice
        sys.modules.update(stand_in)
        try:
            yield
        finally:
            for name in stand_in:
                sys.modules.pop(name, None)

    patches = [
        stand_in_modules(),
        mock.patch.object(torch, "compile", identity_compile),
        mock.patch.object(torch, "load", load_on_cpu),
        mock.patch.object(torch.nn.Module, "half", lambda self: self.float()),
        mock.patch.object(torch.Tensor, "half", lambda self, *a, **k: self.float()),
        mock.patch.object(torch.nn.Module, "cuda", lambda self, device=None: self),
        mock.patch.object(torch.cuda, "Event", cpu_event),
        mock.patch.object(torch.cuda, "synchronize", lambda device=None: None),
        mock.patch.object(F, "cross_entropy", recording_ce),
    ]
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            stack.enter_context(contextlib.chdir(tmp))
            spec = importlib.util.spec_from_file_location("airbench94_muon_reference", path)
            script = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(script)
            own_print = script.print_training_details

            def recording_print(variables, is_final_entry):
                record.epochs.append({k: variables.get(k) for k in (
                    "epoch", "train_acc", "val_acc", "tta_val_acc", "time_seconds")})
                own_print(variables, is_final_entry)
                sys.stdout.flush()

            script.print_training_details = recording_print
            yield script
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_muon_reference(repo: str, train, test, classes, record, cpu_event) -> dict:
    """airbench94_muon.py's main() once (no warm-up run: nothing is compiled here), verbose:
    its per-epoch test accuracy and final TTA accuracy, steps and times."""
    import torch

    start = time.perf_counter()
    with muon_on_cpu(repo, train, test, classes, record, cpu_event) as script:
        model = script.CifarNet().to(memory_format=torch.channels_last)
        script.print_columns(script.logging_columns_list, is_head=True)
        script.main(0, model)
    wall = time.perf_counter() - start
    rows = [r for r in record.epochs if isinstance(r["epoch"], int)]
    final = next(r for r in record.epochs if r["epoch"] == "eval")
    steps = len(record.step_losses)
    batch = max(record.step_batches)  # main()'s batch_size (2000; its loader drops the rest)
    train_seconds = rows[-1]["time_seconds"]  # its timer: whitening init + train epochs
    return {"per_epoch": [{"epoch": r["epoch"] + 1, "test_acc": r["val_acc"],
                           "train_acc_last_batch": r["train_acc"],
                           "seconds_cumulative": r["time_seconds"]} for r in rows],
            "final_tta_acc": final["tta_val_acc"], "tta_level": 2, "steps": steps,
            "batch_size": batch, "train_seconds": train_seconds,
            "img_per_s": steps * batch / train_seconds, "wall_seconds": wall,
            "step_losses": record.step_losses, "script": script_path(repo)}


# ---------------------------------------------------------------------------------------------
# Parity, step by step: airbench94_muon.py's main() from our weights, on our batches.

MUON_EPOCHS, MUON_WHITEN_BIAS_EPOCHS, MUON_BATCH = 8, 3, 2000  # main()'s


def muon_name(name: str, groups: int = 3) -> str:
    """An airbench94 make_net94 state_dict key (airbench_reference.airbench_names) as
    airbench94_muon's CifarNet names it: whiten.*, layers.<1 + g>.conv1..., head.weight."""
    if name == f"{4 + groups}.weight":
        return "head.weight"
    first, rest = name.split(".", 1)
    return f"whiten.{rest}" if first == "0" else f"layers.{int(first) - 1}.{rest}"


def muon_parity_config(ours_config, flagfile: str, data_dir: str, run_dir: str, steps: int,
                       batch: int, seed: int):
    """The Muon recipe over `steps` steps of `batch` (0: its 2000), float32, one step per
    call, with main()'s schedule over a loader of steps / 8 batches per "epoch": every rate
    falls to 0 over `steps`, the whitening bias's over ceil(3 steps / 8). main()'s rates are
    per summed example and its weight_decay 2e-6 x 2000 / lr whatever the batch: ours (per
    mean loss) are scaled by batch / 2000, our L2 coefficients by 2000 / batch."""
    import math

    from research.data import pipeline
    from research.training import examples
    from research.training.loop import prepare_config

    if steps % MUON_EPOCHS:
        raise ValueError(f"--parity_steps={steps}: airbench94_muon trains "
                         f"ceil({MUON_EPOCHS} x loader length) steps; give a multiple of "
                         f"{MUON_EPOCHS}")
    cfg = ours_config(flagfile, data_dir, run_dir, precision="float32", seed=seed,
                      train_steps=steps, steps_per_loop=1)
    batch = batch or cfg.batch_size
    manifest = pipeline.load_manifest(cfg.data_dir)
    per_epoch = pipeline.steps_per_epoch(manifest, batch,
                                         num_examples=examples.num_examples(cfg, manifest, "train"))
    loader_len = steps // MUON_EPOCHS
    whiten_steps = math.ceil(MUON_WHITEN_BIAS_EPOCHS * loader_len)
    cfg = dataclasses.replace(cfg, batch_size=batch, recipe_batch_size=None,
                              learning_rate=cfg.learning_rate * batch / MUON_BATCH,
                              weight_decay=cfg.weight_decay * MUON_BATCH / batch,
                              whiten_bias_epochs=whiten_steps / per_epoch)
    from research.training.model import whiten_bias_steps

    assert whiten_bias_steps(cfg, per_epoch) == whiten_steps
    return prepare_config(cfg), {"loader_len": loader_len, "whiten_bias_steps": whiten_steps,
                                 "steps_per_epoch": per_epoch}


class MuonParityLoader:
    """What main() reads of its train loader: len() (steps / 8: it trains ceil(8 len)
    steps), images (its whitening init takes the first 5,000) and normalize, labels; each
    iteration the next len() of `batches`, no augmentation. Before each batch after the
    first it calls `after_step(k)`: the net has then taken k steps."""

    def __init__(self, images, normalize, batches: list, per_epoch: int, after_step):
        self.images, self.normalize, self.labels = images, normalize, None
        self.batches, self.per_epoch, self.after_step = batches, per_epoch, after_step
        self.taken = 0

    def __len__(self):
        return self.per_epoch

    def __iter__(self):
        for _ in range(self.per_epoch):
            k = self.taken
            if k >= len(self.batches):
                return
            if k:
                self.after_step(k)
            self.taken += 1
            yield self.batches[k]


def muon_parity_reference(repo: str, ours: dict, batches: list, whiten_images, classes,
                          loader_len: int, record, cpu_event, is_trained,
                          whitening_difference) -> dict:
    """main() of airbench94_muon.py over `batches` (8 x `loader_len`), its net reset to our
    initial weights (ours["start"], airbench94 names), its whitening init run on the same
    5,000 images and then replaced by ours; the per-step losses and weights after each step
    (airbench94 names, as airbench_reference.compare_parity reads them), and the first
    forward pass and gradient of a net with our weights."""
    import numpy as np
    import torch

    start = {muon_name(k): v for k, v in ours["start"].items()}
    back = {muon_name(k): k for k in ours["start"]}
    labels = np.zeros(len(whiten_images), np.int64)
    with muon_on_cpu(repo, (whiten_images, labels), (whiten_images[:10], labels[:10]), classes,
                     record, cpu_event) as script:
        normalize = script.T.Normalize(script.CIFAR_MEAN, script.CIFAR_STD)
        data = [(normalize(torch.from_numpy(b["image"]).permute(0, 3, 1, 2)).contiguous(
                    memory_format=torch.channels_last),
                 torch.from_numpy(b["class_id"].astype(np.int64))) for b in batches]

        def set_ours(net):
            state = net.state_dict()
            extra = set(start) ^ {k for k in state if not k.endswith("num_batches_tracked")}
            if extra:
                raise ValueError(f"our weights and CifarNet's differ in {sorted(extra)}")
            with torch.no_grad():
                for name, value in start.items():
                    if tuple(state[name].shape) != value.shape:
                        raise ValueError(f"{name}: ours {value.shape}, CifarNet's "
                                         f"{tuple(state[name].shape)}")
                    state[name].copy_(torch.from_numpy(value))

        # Before any step: one forward pass and gradient of a net with our weights.
        net = script.CifarNet().to(memory_format=torch.channels_last)
        set_ours(net)
        net.train()
        x, y = data[0]
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2,
                                                 reduction="sum")
        loss.backward()
        probe = {"inputs": x.numpy(), "logits": logits.detach().numpy(),
                 "loss": loss.item() / len(y),
                 "grads": {back[k]: p.grad.numpy() / len(y) for k, p in
                           net.named_parameters() if p.grad is not None and k in back}}
        record.step_losses.clear()
        record.step_times.clear()
        record.step_batches.clear()

        model = script.CifarNet().to(memory_format=torch.channels_last)
        states, whiten = [], {}

        def trained_state():
            return {back[k]: v.detach().numpy().copy() for k, v in model.state_dict().items()
                    if k in back and is_trained(back[k])}

        own_init = model.init_whiten

        def init_whiten_as_ours(train_images, eps=5e-4):
            own_init(train_images, eps)  # the script's own, on the same 5,000 images
            # the script keeps eigh's ascending order, airbench94 (and ours) descending
            ours_w = start["whiten.weight"]
            n = len(ours_w) // 2
            whiten.update(whitening_difference(model.whiten.weight.detach().numpy(),
                                               np.concatenate([ours_w[:n][::-1],
                                                               ours_w[n:][::-1]])),
                          order="the script's filters are in ascending eigenvalue order, "
                                "ours descending (airbench94's); compared in one order")
            with torch.no_grad():
                model.whiten.weight.copy_(torch.from_numpy(start["whiten.weight"]))

        model.reset = lambda: set_ours(model)
        model.init_whiten = init_whiten_as_ours
        images = torch.from_numpy(whiten_images).permute(0, 3, 1, 2).float() / 255
        loader = MuonParityLoader(images, normalize, data, loader_len,
                                  lambda k: states.append(trained_state()))
        real_loader = script.CifarLoader

        def make_loader(path, train=True, batch_size=500, aug=None):
            return loader if train else real_loader(path, train, batch_size, aug)

        script.CifarLoader = make_loader
        script.evaluate = lambda *a, **k: 0.0  # no test set here: its accuracy is not compared
        script.print_training_details = lambda *a, **k: None
        script.main(0, model)
        states.append(trained_state())
    return {"probe": probe, "losses": list(record.step_losses), "states": states,
            "whitening": whiten}
