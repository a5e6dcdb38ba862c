r"""Seconds of the exact detection metrics: the vectorised `research.metrics` against
the original implementation (`_metrics_reference`), on the same scores, in one run.

  python -m research.benchmarks.metrics [--sizes=10000,100000,10000000] [--decimals=6]

Scores are float32 in [0, 1.5) rounded to --decimals (so many are tied, as with a saturated
sigmoid), with --positive_rate positives. At each size it times `roc_auc`, `pr_auc` and
`best_f1_threshold` (best of --repeats) and checks the two implementations return the same
float. The old `roc_auc` ranks ties in a Python loop, so above --old_roc_max scores it is
skipped; the old `pr_auc` and `best_f1_threshold` (a stable argsort) are timed at every size.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from research import machine
from research.benchmarks import _metrics_reference as old
from research import metrics as new

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["10000", "100000", "10000000"], "Numbers of scores to time.")
flags.DEFINE_integer("decimals", 6, "Round scores to this many decimals (ties).")
flags.DEFINE_float("positive_rate", 0.1, "Fraction of positive labels (cats are 1 in 10).")
flags.DEFINE_integer("repeats", 3, "Time each call this many times and keep the fastest.")
flags.DEFINE_integer("old_roc_max", 100_000,
                     "Largest size at which the old Python-loop roc_auc is timed.")
flags.DEFINE_integer("seed", 0, "Random seed of the scores.")

FUNCTIONS = ("roc_auc", "pr_auc", "best_f1_threshold")


def _time(fn, labels, scores, repeats: int):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(labels, scores)
        best = min(best, time.perf_counter() - start)
    return best, value


def _data(n: int, rng):
    labels = rng.random(n) < FLAGS.positive_rate
    scores = np.round(rng.random(n) + 0.5 * labels, FLAGS.decimals).astype(np.float32)
    return labels, scores


def main(argv):
    del argv
    print(machine.banner())
    print(f"numpy {np.__version__}; float32 scores rounded to {FLAGS.decimals} decimals, "
          f"{FLAGS.positive_rate:.0%} positive; seconds, best of {FLAGS.repeats}")
    rng = np.random.default_rng(FLAGS.seed)
    print(f"{'scores':>12}  {'function':<18} {'old s':>9} {'new s':>9} {'old/new':>8}  same")
    for n in (int(s) for s in FLAGS.sizes):
        labels, scores = _data(n, rng)
        distinct = len(np.unique(scores))
        for name in FUNCTIONS:
            t_new, v_new = _time(getattr(new, name), labels, scores, FLAGS.repeats)
            if name == "roc_auc" and n > FLAGS.old_roc_max:
                print(f"{n:>12,}  {name:<18} {'':>9} {t_new:9.4f} {'':>8}  "
                      f"old: skipped (O(n) Python loop); value {v_new:.6f}")
                continue
            t_old, v_old = _time(getattr(old, name), labels, scores, FLAGS.repeats)
            same = "yes" if v_old == v_new else f"NO ({v_old!r} vs {v_new!r})"
            print(f"{n:>12,}  {name:<18} {t_old:9.4f} {t_new:9.4f} {t_old / t_new:7.1f}x  {same}")
        print(f"{'':>12}  ({distinct:,} distinct scores)")


if __name__ == "__main__":
    app.run(main)
