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
        record.step_losses.append(float(out.detach().float()) / n)
        return out

    def identity_compile(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    stand_in = {} if _torchvision_works() else _torchvision_stand_in()
    patches = [
        mock.patch.dict(sys.modules, stand_in),
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
    batch = len(train[0]) // (steps // len(rows))  # main()'s batch_size (2000)
    train_seconds = rows[-1]["time_seconds"]  # its timer: whitening init + train epochs
    return {"per_epoch": [{"epoch": r["epoch"] + 1, "test_acc": r["val_acc"],
                           "train_acc_last_batch": r["train_acc"],
                           "seconds_cumulative": r["time_seconds"]} for r in rows],
            "final_tta_acc": final["tta_val_acc"], "tta_level": 2, "steps": steps,
            "batch_size": batch, "train_seconds": train_seconds,
            "img_per_s": steps * batch / train_seconds, "wall_seconds": wall,
            "step_losses": record.step_losses, "script": script_path(repo)}
