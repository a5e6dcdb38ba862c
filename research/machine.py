"""What machine and software a run or benchmark ran on.

Speed differs several-fold between CPUs of the same core count (AMX vs AVX512-BF16 vs
neither), so every benchmark prints `banner()` and every run records `versions()`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys

# The precisions a run or an explanation can ask for; 'auto' is resolved per machine.
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
# From compute capability 8.0 (A100, H100, L4, RTX 30/40) a GPU runs bfloat16 as fast as
# float16, and bfloat16 needs no loss scaling.
BF16_GPU_CAPABILITY = (8, 0)


# The vector extensions that decide speed here, by their /proc/cpuinfo flag, as a benchmark
# records them beside every time (research/benchmarks/airbench_reference.py).
VECTOR_FLAGS = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_bf16": "AVX512-BF16",
                "amx_bf16": "AMX-BF16", "amx_tile": "AMX-TILE"}


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{'model', 'cores', 'amx', 'avx512_bf16', 'flags'} from /proc/cpuinfo (best effort
    elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count() or 1,
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "flags": frozenset(flags)}


def vector_flags() -> dict:
    """{'model_name': ..., 'AVX2': bool, ...}: the CPU and each of VECTOR_FLAGS."""
    info = cpu_info()
    return {"model_name": info["model"],
            **{label: name in info["flags"] for name, label in VECTOR_FLAGS.items()}}


def vector_flags_line(record: dict) -> str:
    """A vector_flags() record as one line, e.g. 'lscpu: AMD EPYC; AVX2 yes, AVX512F no'."""
    yn = {True: "yes", False: "no"}
    return (f"lscpu: {record.get('model_name') or '?'}; " +
            ", ".join(f"{k} {yn[v]}" for k, v in record.items() if k != "model_name"))


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, or its old name DNNL_MAX_CPU_ISA) below AVX512_CORE_BF16:
# under them oneDNN has no bf16 kernels at all (a bf16 convolution fails to build), whatever
# the CPU has. Higher caps, DEFAULT and ALL leave the CPU's own bf16 in use.
_ISA_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                          "AVX512_CORE_VNNI")


def onednn_isa_cap() -> str | None:
    """The ISA cap set for oneDNN in the environment, upper-cased, or None."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip() else None


def has_fast_bf16() -> bool:
    """True on CPUs whose oneDNN kernels run bfloat16 faster than float32, unless oneDNN is
    capped below its bf16 kernels (ONEDNN_MAX_CPU_ISA=AVX2, say)."""
    info = cpu_info()
    return (info["amx"] or info["avx512_bf16"]) and onednn_isa_cap() not in _ISA_CAPS_WITHOUT_BF16


def resolve_precision(precision: str, gpu_capability: tuple[int, int] | None,
                      float16: bool = True) -> str:
    """The one rule for 'auto'. On a GPU (`gpu_capability`, the lowest compute capability of
    the GPUs in use; None: no GPU): mixed_bfloat16 from capability 8.0 (A100, H100, L4, RTX
    30/40: bfloat16 as fast as float16, no loss scaling), else mixed_float16 (V100, T4), or
    float32 where float16 is not wanted (explanations, whose unscaled score gradients
    underflow in it). On a CPU: mixed_bfloat16 with AMX or AVX512-BF16 (oneDNN runs bf16
    faster), else float32. Any other value is returned as it is."""
    if precision != "auto":
        return precision
    if gpu_capability is not None:
        if tuple(gpu_capability) >= BF16_GPU_CAPABILITY:
            return "mixed_bfloat16"
        return "mixed_float16" if float16 else "float32"
    return "mixed_bfloat16" if has_fast_bf16() else "float32"


def banner() -> str:
    """One line naming the CPU, e.g. 'CPU: AMD EPYC, 2 cores, AMX no, AVX512-BF16 yes'."""
    info = cpu_info()
    yn = {True: "yes", False: "no"}
    cap = onednn_isa_cap()
    return (f"CPU: {info['model']}, {info['cores']} cores, AMX {yn[info['amx']]}, "
            f"AVX512-BF16 {yn[info['avx512_bf16']]}"
            + (f", oneDNN capped at {cap}" if cap else ""))


def _proc_stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command name (state first)."""
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stats[int(pid)] = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
    return stats


def process_tree(root: int, stats: dict[int, list[str]] | None = None) -> list[int]:
    """`root` and every live descendant (a forkserver's workers are its children, not ours)."""
    stats = _proc_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, of its children it has waited for, and of
    every live descendant with its own waited-for children: /proc, because a forkserver's
    workers are its children, not ours, and it lives on."""
    stats = _proc_stats()
    total = sum(sum(int(x) for x in stats[pid][11:15])  # utime stime cutime cstime
                for pid in process_tree(os.getpid(), stats) if pid in stats)
    return total / os.sysconf("SC_CLK_TCK")


def runnable_threads(pids: list[int]) -> int:
    """How many threads of `pids` want a core now (state R: running, or waiting for one).
    Sampled over a run, how many cores it could keep busy, whatever other work gets them:
    on a shared machine its wall time cannot say that."""
    count = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    count += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:
                continue
    return count


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# key in versions() -> the distributions that provide it (the first one installed counts)
PACKAGES = {"tensorflow": ("tensorflow", "tensorflow-cpu"), "keras": ("keras",),
            "numpy": ("numpy",), "opencv": ("opencv-python-headless", "opencv-python"),
            "matplotlib": ("matplotlib",)}


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """Python and package versions (read from the installed distributions: nothing is
    imported), the git commit, and the CPU."""
    return {"python": sys.version.split()[0],
            **{key: package_version(*names) for key, names in PACKAGES.items()},
            "git_commit": _git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(_git("status", "--porcelain")), "cpu": banner()}
