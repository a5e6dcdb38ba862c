"""The exact detection metrics as they were before vectorisation (commit c7e2229), kept as
the reference that `tests/evaluation/test_metrics.py` and `research.benchmarks.metrics` compare
`research.metrics` against. Not for use elsewhere: `roc_auc` ranks ties in a Python
loop, one interpreted step per score.
"""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties count one half)."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s), np.float64)
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    return float((r[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _sorted_counts(labels, scores):
    """Cumulative TP/FP when predicting positive for score >= each distinct threshold."""
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return s[last], tp.astype(np.float64), fp.astype(np.float64), float(y.sum())


def pr_auc(labels, scores) -> float:
    """Average precision: sum over thresholds of (R_k - R_{k-1}) * P_k."""
    _, tp, fp, pos = _sorted_counts(labels, scores)
    if pos == 0:
        return float("nan")
    precision = tp / (tp + fp)
    recall = tp / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(labels, scores) -> float:
    """The score threshold (predict positive when score >= t) that maximises F1."""
    thr, tp, fp, pos = _sorted_counts(labels, scores)
    if pos == 0:
        return 0.5
    f1 = 2 * tp / (tp + fp + pos)
    return float(thr[int(np.argmax(f1))])


def at_threshold(labels, scores, threshold: float) -> dict:
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp = int(np.sum(pred & labels))
    fp = int(np.sum(pred & ~labels))
    fn = int(np.sum(~pred & labels))
    tn = int(np.sum(~pred & ~labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / max(1, len(labels)),
            "confusion_matrix": [[tn, fp], [fn, tp]]}


def detection_report(labels, scores, threshold: float | None = None) -> dict:
    """All detector metrics; `threshold` is the one chosen on val (None: pick it here)."""
    labels = np.asarray(labels)
    chosen = best_f1_threshold(labels, scores) if threshold is None else threshold
    report = {
        "num_examples": int(len(labels)),
        "num_positive": int(np.sum(labels)),
        "roc_auc": roc_auc(labels, scores),
        "pr_auc": pr_auc(labels, scores),
        "at_0.5": at_threshold(labels, scores, 0.5),
    }
    report.update(at_threshold(labels, scores, chosen))
    return report


def roc_curve(labels, scores):
    _, tp, fp, pos = _sorted_counts(labels, scores)
    neg = len(labels) - pos
    return np.r_[0.0, fp / max(neg, 1)], np.r_[0.0, tp / max(pos, 1)]


def pr_curve(labels, scores):
    _, tp, fp, pos = _sorted_counts(labels, scores)
    return tp / max(pos, 1), tp / (tp + fp)
