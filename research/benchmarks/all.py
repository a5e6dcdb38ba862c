r"""Every speed benchmark whose result is a ratio, in one command, and one table of ratios
headed by the CPU banner:

  python -m research.benchmarks.all [--data_dir=data/cifar10] [--quick]

It runs the input-pipeline, train-step and Grad-CAM benchmarks one after another, each in its
own process (so one's threads and caches do not slow the next), shows their own output as it
comes, then prints the table. Ratios are measured within one process on one machine, so they
compare; the absolute images/s beside them do not travel between machines. A benchmark that
cannot run here (no TFRecords, tf-keras-vis not installed, no native bf16) says "skipped" and
why, in its row. --quick shrinks every benchmark to seconds: a smoke test, not a measurement.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from research.benchmarks import ratios
from research.data.manifest import manifest_path
from research.machine import banner

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "data/cifar10", "TFRecords the input-pipeline benchmark reads "
                    "(make data writes them).")
flags.DEFINE_list("only", ["input_pipeline", "train_step", "gradcam"],
                  "Benchmarks to run, of input_pipeline, train_step, gradcam.")
flags.DEFINE_bool("quick", False, "Tiny settings: checks the command works, measures nothing.")

QUICK = {"input_pipeline": ["--batches=4", "--batch_size=32"],
         "train_step": ["--steps=4", "--batch_size=32", "--steps_per_loop=2", "--extras=false",
                        "--peak_matmul=512"],
         "gradcam": ["--models=scratch", "--images=4", "--batch_size=4", "--repeats=1",
                     "--peak_matmul=512"]}
BENCHMARKS = tuple(QUICK)


def command(name: str, out: str) -> list[str]:
    cmd = [sys.executable, "-m", f"research.benchmarks.{name}", f"--ratios_json={out}"]
    if name == "input_pipeline":
        cmd.append(f"--data_dir={FLAGS.data_dir}")
    return cmd + (QUICK[name] if FLAGS.quick else [])


def run(name: str, out: str) -> tuple[list[ratios.Ratio], float]:
    """Runs one benchmark, its output shown as it comes; its ratio rows (a failure is a row)."""
    cmd = command(name, out)
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    seconds = time.perf_counter() - start
    if rc != 0 or not os.path.exists(out):
        return [ratios.Ratio(name, None, "", f"FAILED (exit code {rc}; output above)")], seconds
    return ratios.read(out)[1], seconds


def table(results: dict[str, tuple[list[ratios.Ratio], float]]) -> str:

    head = ("benchmark", "ratio", "value", "target", "note")
    lines = [[name, r.name, "-" if r.value is None else f"{r.value:.2f}", r.target, r.note]
             for name, (rows, _) in results.items() for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(4)]

    def fmt(row):
        return "  ".join(c.ljust(w) if i != 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))) + "  " + row[4]

    out = [banner(), fmt(head), fmt(["-" * w for w in widths] + ["----"])]
    out += [fmt(x) for x in lines]
    out.append("seconds per benchmark: " + ", ".join(
        f"{name} {s:.0f}" for name, (_, s) in results.items()) + (
        "   (--quick: a smoke test, not a measurement)" if FLAGS.quick else ""))
    return "\n".join(out)


def main(argv):
    del argv
    unknown = [b for b in FLAGS.only if b not in BENCHMARKS]
    if unknown:
        raise app.UsageError(f"--only: unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in FLAGS.only:
            if name == "input_pipeline" and not os.path.exists(
                    manifest_path(FLAGS.data_dir)):
                results[name] = ([ratios.Ratio(
                    "TFRecord / in-memory input", None, ">= 0.5",
                    f"skipped: no TFRecords in --data_dir={FLAGS.data_dir} (make data)")], 0.0)
                continue
            results[name] = run(name, os.path.join(tmp, name + ".json"))
    print("\n" + table(results))
    if any(r.note.startswith("FAILED") for rows, _ in results.values() for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
