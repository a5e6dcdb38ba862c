"""The machine's attainable FP32 peak, measured, and the fraction of it a benchmark reaches.

The peak is a large float32 matmul (tf.linalg.matmul under tf.function, n x n with
n = --peak_matmul; one warm-up call, then the best of three) in the benchmark's own process:
what TensorFlow's kernels reach on this CPU now, not a datasheet number. A benchmark's
achieved rate is its FLOPs per image (counted by research.models.flops) times the images/s it
measured. A computation in mixed_bfloat16 is still given as a fraction of the FP32 peak, its
row saying so, with the bf16 matmul's rate beside it where the CPU runs bf16 natively.
"""

from __future__ import annotations

import dataclasses
import time

import tensorflow as tf
from absl import flags

from research.benchmarks.ratios import Ratios

flags.DEFINE_integer("peak_matmul", 4096, "Size n of the n x n matmuls that measure the "
                     "attainable peak (float32; bf16 too where the timed work runs in it).")

ROW = "{}: fraction of FP32 peak"


@dataclasses.dataclass(frozen=True)
class Peak:
    size: int                  # n of the n x n matmul
    fp32: float                # GFLOP/s
    bf16: float | None = None  # GFLOP/s; None: not timed

    def describe(self) -> str:
        n = f"{self.size}x{self.size}"
        out = f"attainable FP32 peak: {n} float32 matmul, {self.fp32:,.1f} GFLOP/s"
        if self.bf16 is not None:
            out += f"; {n} bfloat16 matmul, {self.bf16:,.1f} GFLOP/s"
        return out


@dataclasses.dataclass(frozen=True)
class Achieved:
    """One timed computation: its counted FLOPs per image and its measured rate."""
    flops_per_image: int
    images_per_s: float
    precision: str

    @property
    def gflops(self) -> float:
        return self.flops_per_image * self.images_per_s / 1e9


def matmul_gflops(n: int, dtype=tf.float32, repeats: int = 3) -> float:
    """GFLOP/s (2 n^3 FLOPs per product) of the best of `repeats` n x n matmuls."""
    a = tf.cast(tf.random.uniform([n, n]), dtype)
    b = tf.cast(tf.random.uniform([n, n]), dtype)
    matmul = tf.function(tf.linalg.matmul)
    matmul(a, b)[:1, :1].numpy()  # trace + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b)[:1, :1].numpy()  # waits for the product
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def measure_peak(size: int | None = None, bf16: bool = False) -> Peak:
    """The float32 matmul's GFLOP/s (and the bfloat16 one's with `bf16`); size: --peak_matmul."""
    size = size or flags.FLAGS.peak_matmul
    return Peak(size, matmul_gflops(size),
                matmul_gflops(size, tf.bfloat16) if bf16 else None)


def add_fraction(out: Ratios, label: str, achieved: Achieved, peak: Peak) -> str:
    """Adds the row `<label>: fraction of FP32 peak`; returns the line to print."""
    gflops = achieved.gflops
    note = (f"{gflops:,.1f} GFLOP/s ({achieved.flops_per_image / 1e9:.3f} GFLOP/img x "
            f"{achieved.images_per_s:,.1f} img/s, {achieved.precision}) vs {peak.size}x"
            f"{peak.size} fp32 matmul {peak.fp32:,.1f} GFLOP/s")
    if peak.bf16 and achieved.precision == "mixed_bfloat16":
        note += f"; {gflops / peak.bf16:.2f} of the bf16 matmul's {peak.bf16:,.1f}"
    out.add(ROW.format(label), gflops / peak.fp32, "", note)
    return f"  {ROW.format(label) + ':':<42}{gflops / peak.fp32:6.2f}   {note}"


def train_step_rows(out: Ratios, peak: Peak, loops: dict[str, Achieved]) -> list[str]:
    """research.benchmarks.train_step's rows, one per model timed in the real loop, named by
    its --model ('scratch', 'fast')."""
    return [add_fraction(out, model, achieved, peak) for model, achieved in loops.items()]


def gradcam_row(out: Ratios, peak: Peak, model: str, achieved: Achieved) -> str:
    """research.benchmarks.gradcam's row for `model` (--models: 'vgg16', 'scratch')."""
    return add_fraction(out, f"gradcam {model}", achieved, peak)
