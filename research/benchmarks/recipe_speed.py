r"""Our recipes' training cost side by side, measured in one process: N train steps of each
(after a few warm-up steps), back to back, then per recipe its img/s and the seconds its
whole run's training steps take at that speed (steps per run x seconds per step), and each
recipe's run time as a ratio to the first's. For when full runs shared the machine.

  python -m research.benchmarks.recipe_speed --data_dir=data/cifar10 \
      [--recipes=research/recipes/fast_cifar10.flags,research/recipes/fast_cifar10_muon.flags]
      [--steps=10] [--warmup=3] [--precision=float32|mixed_bfloat16|auto]

Exit status: 0 done; 1 an error, named in one line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

from absl import app, flags

# its --data_dir and --precision (the same meaning here) and its way of timing our side
from research import machine
from research.benchmarks.airbench_reference import ours_config, time_ours

FLAGS = flags.FLAGS
flags.DEFINE_list("recipes", ["research/recipes/fast_cifar10.flags",
                              "research/recipes/fast_cifar10_muon.flags"],
                  "Recipe flag files; the first is the baseline of the ratios.")
flags.DEFINE_integer("steps", 10, "Timed train steps per recipe.")
flags.DEFINE_integer("warmup", 3, "Untimed train steps before them (tracing).")


def measure(flagfile: str, data_dir: str, steps: int, warmup: int, precision: str) -> dict:
    from research.data import pipeline
    from research.training import examples
    from research.training.state import plan_steps

    with tempfile.TemporaryDirectory(prefix="recipe-speed-") as run_dir:
        cfg = ours_config(flagfile, data_dir, run_dir, precision=precision)
        manifest = pipeline.load_manifest(cfg.data_dir)
        plan = plan_steps(cfg, manifest, examples.num_examples(cfg, manifest, "train"))
        t = time_ours(dataclasses.replace(cfg), steps, warmup)
    seconds_per_step = t["seconds"] / steps
    return {"recipe": flagfile, "batch_size": cfg.batch_size, "run_steps": plan.total_steps,
            "epochs": cfg.epochs, "img_per_s": t["img_per_s"],
            "seconds_per_step": seconds_per_step,
            "run_train_seconds": plan.total_steps * seconds_per_step,
            "precision": cfg.precision}


def format_rows(rows: list[dict], cpu: str) -> str:
    base = rows[0]["run_train_seconds"]
    lines = [cpu, f"{'recipe':<44}{'batch':>6}{'steps/run':>10}{'img/s':>8}"
             f"{'s/step':>8}{'run s':>8}{'ratio':>7}"]
    for r in rows:
        lines.append(f"{os.path.basename(r['recipe']):<44}{r['batch_size']:>6}"
                     f"{r['run_steps']:>10}{r['img_per_s']:>8.1f}{r['seconds_per_step']:>8.2f}"
                     f"{r['run_train_seconds']:>8.0f}{r['run_train_seconds'] / base:>7.2f}")
    lines.append("run s: the run's training steps at the measured speed (no evaluation, no "
                 "input start-up); ratio: to the first recipe's")
    return "\n".join(lines)


def main(argv):
    del argv
    missing = [p for p in FLAGS.recipes if not os.path.isfile(p)]
    if missing:
        sys.exit(f"error: --recipes: {', '.join(missing)} not found")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    rows = [measure(p, FLAGS.data_dir, FLAGS.steps, FLAGS.warmup, FLAGS.precision)
            for p in FLAGS.recipes]
    cpu = machine.vector_flags_line(machine.vector_flags())
    print(format_rows(rows, f"{machine.banner()}\n{cpu}"))


if __name__ == "__main__":
    app.run(main)
