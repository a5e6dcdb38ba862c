"""The decision threshold a run declares: which metric val maximises, how sure that choice is,
and how well the scores are calibrated.

A detector says "cat" when p(cat) >= its threshold. Which threshold is right depends on what
the user wants: CIFAR-10's cat detector (10% positives) wants the F1-max one, a balanced
photo detector wants the accuracy-max one (the F1 choice rewards recall and, on 2,000
held-out photos, cost 2 points of accuracy). The policy is a string,
`--threshold_metric=f1|accuracy|balanced_accuracy|youden|precision_at_recall:R|
recall_at_precision:P`, or `auto`: f1 when the positive class is under 25% of train, else
accuracy. `choose` applies it to val's scores, `bootstrap_interval` resamples val to say how
far the choice moves, `temperature`/`expected_calibration_error` fit and measure calibration.
Plain numpy (no TensorFlow), so the apps check a policy before importing anything heavy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from research.errors import UserError

AUTO = "auto"
METRICS = ("f1", "accuracy", "balanced_accuracy", "youden", "precision_at_recall",
           "recall_at_precision")
TARGETED = ("precision_at_recall", "recall_at_precision")  # need ":R" / ":P"
RARE_POSITIVE = 0.25  # `auto`: f1 below this share of positives in train, else accuracy
BOOTSTRAP_SAMPLES = 200
ECE_BINS = 15
RELIABILITY_FIGURE = "{split}_reliability.png"  # in an evaluation's figures folder
HELP = ("Which metric the decision threshold maximises on val: auto | "
        + " | ".join(m + (":R" if m == "precision_at_recall" else ":P"
                          if m == "recall_at_precision" else "") for m in METRICS)
        + f" (auto: f1 when the positive class is under {RARE_POSITIVE:.0%} of train, else "
        "accuracy; precision_at_recall:0.9 is the best precision with recall >= 0.9).")


class ThresholdError(UserError):
    """A policy that is malformed or that the scores cannot satisfy; one line."""


@dataclasses.dataclass(frozen=True)
class Policy:
    metric: str
    target: float | None = None  # R or P of the targeted metrics

    def __str__(self) -> str:
        return self.metric if self.target is None else f"{self.metric}:{self.target:g}"


def parse(text: str) -> Policy:
    """A policy from its flag text (not `auto`: see `resolve`)."""
    name, sep, value = str(text).strip().partition(":")
    if name not in METRICS:
        raise ThresholdError(f"--threshold_metric={text}: unknown metric {name!r}; choose "
                             f"{AUTO} or one of {', '.join(METRICS)}")
    if name not in TARGETED:
        if sep:
            raise ThresholdError(f"--threshold_metric={text}: {name} takes no ':value'")
        return Policy(name)
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if not 0.0 < target <= 1.0:  # NaN fails too
        raise ThresholdError(f"--threshold_metric={text}: {name} needs a target in (0, 1], "
                             f"e.g. {name}:0.9")
    return Policy(name, target)


def check(text: str) -> None:
    """Raises ThresholdError for a malformed policy (before any work); `auto` is fine."""
    if text != AUTO:
        parse(text)


def resolve(text: str, positive_fraction: float | None) -> tuple[Policy, str]:
    """(policy, why): `text` parsed, or `auto` decided by the share of positives in train."""
    if text != AUTO:
        return parse(text), "--threshold_metric"
    if positive_fraction is None:
        return Policy("f1"), "auto: share of positives unknown, f1"
    rare = positive_fraction < RARE_POSITIVE
    return Policy("f1" if rare else "accuracy"), (
        f"auto: positives are {positive_fraction:.1%} of train "
        f"({'under' if rare else 'at least'} {RARE_POSITIVE:.0%}), so "
        f"{'f1' if rare else 'accuracy'}")


def _curve(labels, scores):
    """(thresholds descending, tp, fp, positives, negatives), with 'nobody positive' first
    (a threshold just above the top score), so accuracy may choose to call nothing."""
    from research import metrics  # numpy and matplotlib.figure: not at config import
    thr, tp, fp, pos = metrics._sorted_counts(labels, scores)
    neg = float(len(np.asarray(labels))) - pos
    top = np.nextafter(thr[0], np.inf) if len(thr) else 0.5
    return np.r_[top, thr], np.r_[0.0, tp], np.r_[0.0, fp], pos, neg


def _objective(policy: Policy, tp, fp, pos, neg):
    """Per threshold: the value to maximise (NaN where the policy's constraint fails)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / pos if pos else np.zeros_like(tp)
        specificity = (neg - fp) / neg if neg else np.ones_like(fp)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)  # none called
        if policy.metric == "f1":
            return 2 * tp / (tp + fp + pos)
        if policy.metric == "accuracy":
            return (tp + neg - fp) / max(pos + neg, 1)
        if policy.metric == "balanced_accuracy":
            return (recall + specificity) / 2
        if policy.metric == "youden":
            return recall + specificity - 1
        if policy.metric == "precision_at_recall":
            return np.where(recall >= policy.target, precision, np.nan)
        return np.where(precision >= policy.target, recall, np.nan)  # recall_at_precision


def best_reachable(policy: Policy, labels, scores) -> float:
    """The highest recall (precision_at_recall) or precision (recall_at_precision) the scores
    reach at any threshold; for the untargeted metrics, the best value of the metric."""
    _, tp, fp, pos, neg = _curve(labels, scores)
    if policy.metric == "precision_at_recall":
        return float(tp[-1] / pos) if pos else 0.0
    if policy.metric == "recall_at_precision":
        called = tp + fp > 0
        return float(np.max(tp[called] / (tp + fp)[called])) if called.any() else 0.0
    return float(np.nanmax(_objective(policy, tp, fp, pos, neg)))


def choose(labels, scores, policy: Policy, split: str = "val") -> float:
    """The threshold (positive when score >= t) that maximises the policy's metric on these
    scores; the highest such threshold on ties. ThresholdError, naming the best reachable
    value, when a targeted policy cannot be met."""
    labels = np.asarray(labels)
    if not len(labels) or labels.min() == labels.max():
        raise ThresholdError(f"{split}: a threshold needs both classes, {split} has "
                             f"{int(np.sum(labels))} positives of {len(labels)}")
    thr, tp, fp, pos, neg = _curve(labels, scores)
    value = _objective(policy, tp, fp, pos, neg)
    if np.isnan(value).all():
        what = "recall" if policy.metric == "precision_at_recall" else "precision"
        raise ThresholdError(
            f"--threshold_metric={policy}: {split} never reaches {what} {policy.target:g}; "
            f"the best reachable is {best_reachable(policy, labels, scores):.4f}")
    return float(thr[int(np.nanargmax(value))])


def bootstrap_interval(labels, scores, policy: Policy, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> dict:
    """How far the choice moves when val is resampled with replacement: the 2.5 and 97.5
    percentiles of the chosen threshold over `samples` resamples (seeded: reproducible), and
    how many resamples could not choose (one class only, or a target out of reach)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    rng = np.random.default_rng(seed)
    chosen, failed = [], 0
    for _ in range(samples):
        idx = rng.integers(0, len(labels), len(labels))
        try:
            chosen.append(choose(labels[idx], scores[idx], policy))
        except ThresholdError:
            failed += 1
    lo, hi = (np.percentile(chosen, [2.5, 97.5]) if chosen else (float("nan"),) * 2)
    return {"low": float(lo), "high": float(hi), "level": 0.95, "samples": samples,
            "failed": failed, "seed": seed}


def decision(labels, scores, policy: Policy, why: str, interval: bool = True) -> dict:
    """What a run records about its val-chosen threshold: the value, the policy and why, and
    (`interval`) its bootstrap interval. A val split with one class only cannot choose: the
    threshold is then 0.5; a target the scores never reach falls back to F1's choice; the
    reason says so in both cases (training has finished by then: its export is not lost)."""
    labels = np.asarray(labels)
    about = {"threshold_metric": str(policy), "threshold_reason": why}
    if not len(labels) or labels.min() == labels.max():
        return {"threshold": 0.5, **about, "threshold_reason": (
            f"val has {int(np.sum(labels))} positives of {len(labels)}: one class only, "
            "so 0.5"), "threshold_interval": None}
    try:
        out = {"threshold": choose(labels, scores, policy), **about}
    except ThresholdError as e:  # a target out of reach: F1's choice, and the reason says so
        out = {"threshold": choose(labels, scores, Policy("f1")), **about,
               "threshold_metric": "f1", "threshold_reason": f"{e}; so f1 instead"}
        policy = Policy("f1")
    if interval:
        out["threshold_interval"] = bootstrap_interval(labels, scores, policy)
    return out


def interval_text(interval: dict | None) -> str:
    """The bootstrap interval in words, for logs and reports."""
    if not interval:
        return "none (val has one class)"
    failed = f", {interval['failed']} could not choose" if interval["failed"] else ""
    return (f"[{interval['low']:.4f}, {interval['high']:.4f}] over {interval['samples']} "
            f"resamples of val{failed}")


# Calibration: temperature scaling of the detector's score (Guo et al. 2017, on the logit of
# p(positive)), fitted on val by minimising the log loss; ECE over equal-width bins.

def _logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def apply_temperature(scores, temperature: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-_logit(scores) / temperature))


def fit_temperature(labels, scores) -> float:
    """The T > 0 minimising val's log loss of sigmoid(logit(p) / T): golden-section search
    on log T in [1/20, 20] (the loss is unimodal in T)."""
    y = np.asarray(labels).astype(np.float64)
    z = _logit(scores)

    def nll(log_t):
        q = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, q) - y * q))

    a, b = np.log(1 / 20), np.log(20)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(80):
        if nll(c) < nll(d):
            b, d = d, c
            c = b - g * (b - a)
        else:
            a, c = c, d
            d = a + g * (b - a)
    return float(np.exp((a + b) / 2))


def reliability(labels, scores, bins: int = ECE_BINS) -> dict:
    """Per equal-width bin of the score: count, mean score, share of positives; and the
    expected calibration error (the count-weighted mean |share - mean score|)."""
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, np.float64)
    which = np.minimum((s * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_score = np.bincount(which, s, bins) / np.maximum(count, 1)
    positive = np.bincount(which, y, bins) / np.maximum(count, 1)
    ece = float(np.sum(count * np.abs(positive - mean_score)) / max(len(s), 1))
    return {"bins": bins, "count": count.tolist(), "mean_score": mean_score.tolist(),
            "positive_rate": positive.tolist(), "ece": ece}


def reliability_figure(curves: dict, title: str):
    """The reliability diagram: share of positives against mean score per bin, one line per
    entry of `curves` (name -> `reliability(...)`), the diagonal for perfect calibration."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    for name, r in curves.items():
        keep = np.asarray(r["count"]) > 0
        ax.plot(np.asarray(r["mean_score"])[keep], np.asarray(r["positive_rate"])[keep],
                marker="o", ms=3, label=f"{name} (ECE {r['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean score in bin", ylabel="share positive",
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
