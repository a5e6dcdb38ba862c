"""What machine and software a run or benchmark ran on.

Speed differs several-fold between CPUs of the same core count (AMX vs AVX512-BF16 vs
neither), so every benchmark prints `banner()` and every run records `versions()`.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{'model', 'cores', 'amx', 'avx512_bf16'} from /proc/cpuinfo (best effort elsewhere)."""
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
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def has_fast_bf16() -> bool:
    """True on CPUs whose oneDNN kernels run bfloat16 faster than float32."""
    info = cpu_info()
    return info["amx"] or info["avx512_bf16"]


def banner() -> str:
    """One line naming the CPU, e.g. 'CPU: AMD EPYC, 2 cores, AMX no, AVX512-BF16 yes'."""
    info = cpu_info()
    yn = {True: "yes", False: "no"}
    return (f"CPU: {info['model']}, {info['cores']} cores, AMX {yn[info['amx']]}, "
            f"AVX512-BF16 {yn[info['avx512_bf16']]}")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict:
    """Python and package versions, the git commit, and the CPU."""
    import cv2
    import keras
    import matplotlib
    import numpy as np
    import tensorflow as tf

    return {"python": sys.version.split()[0], "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
            "matplotlib": matplotlib.__version__, "git_commit": _git("rev-parse", "HEAD")
            or "unknown", "git_dirty": bool(_git("status", "--porcelain")),
            "cpu": banner()}
