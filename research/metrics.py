"""Exact detection metrics over all scores of a split, and their figures.

Streaming Keras AUCs bucket scores into a fixed set of thresholds; for the numbers we report
we keep every score (10,000 floats for CIFAR-10 test, millions for larger sets) and compute
ROC-AUC, average precision (PR-AUC) and the F1-maximising threshold exactly.

Everything is numpy in O(n log n): one `np.sort` of the scores (a SIMD sort, several times
faster than the stable `argsort` the first version used) finds the distinct scores, and a sort
of the rarer class plus `searchsorted` counts the positives at each. Results equal the
rank-and-loop version (`research/benchmarks/_metrics_reference.py`) to the last bit, ties
included; inputs the fast path cannot reproduce exactly (NaN or infinite scores, labels other
than 0/1) go through a stable-`argsort` path that follows the old definitions step by step.
The figures use `matplotlib.figure.Figure` directly, so importing or calling this module
never selects a matplotlib backend.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

_SORTABLE_FLOATS = (np.float16, np.float32, np.float64)  # exact in, and ordered as, float64


def _groups(positive: np.ndarray, key: np.ndarray):
    """(distinct values of `key` ascending, scores per value, positives per value).

    `key` must be NaN-free: equal values form one group (so -0.0 joins 0.0, inf joins inf).
    """
    srt = np.sort(key)
    n = len(srt)
    first = np.empty(n, bool)
    first[:1] = True
    np.not_equal(srt[1:], srt[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    values = srt[starts]
    size = np.diff(np.append(starts, n))
    num_pos = int(np.count_nonzero(positive))
    minority = positive if num_pos <= n - num_pos else ~positive
    # Every minority score is one of `values`: searchsorted finds its group exactly.
    counts = np.bincount(np.searchsorted(values, np.sort(key[minority])), minlength=len(values))
    return values, size, (counts if num_pos <= n - num_pos else size - counts)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties count one half)."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    scores = np.asarray(scores)
    if scores.dtype.kind not in "biuf" or (scores.dtype.kind == "f" and np.isnan(scores).any()):
        return _roc_auc_ranked(labels, scores, pos, neg)
    _, size, npos = _groups(labels, scores)
    nneg = size - npos
    below = np.cumsum(nneg) - nneg  # negatives scored strictly lower than each group
    # Mann-Whitney U = sum of positive ranks - pos(pos+1)/2 = sum over groups of
    # npos * (below + nneg/2); doubled it is an integer, exact in int64.
    twice_u = int(np.dot(npos, 2 * below + nneg))
    return float((twice_u / 2.0) / (pos * neg))


def _roc_auc_ranked(labels, scores, pos, neg) -> float:
    """The rank-sum definition with a stable argsort; NaNs rank last, each on its own."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    n = len(s)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # NaN != NaN: one group per NaN
    ends = np.append(starts[1:], n) - 1
    ranks = np.repeat((starts + ends) / 2.0 + 1.0, ends - starts + 1)  # average rank over ties
    return float((ranks[labels[order]].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _sorted_counts(labels, scores):
    """Cumulative TP/FP when predicting positive for score >= each distinct threshold.

    Thresholds descend. Returns (thresholds, tp, fp, positives), all float64.
    """
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(scores)
    if s.dtype.type not in _SORTABLE_FLOATS:
        s = s.astype(np.float64)
    if len(s) and y.min() >= 0 and y.max() <= 1 and np.isfinite(s).all():
        values, size, npos = _groups(y.astype(bool), s)
        thr = values[::-1].astype(np.float64)
        tp = np.cumsum(npos[::-1])
        fp = np.cumsum(size[::-1]) - tp
        zeros = np.flatnonzero(s == 0)
        if len(zeros):  # the 0 threshold keeps the sign of the last zero, as a stable sort does
            thr[len(values) - 1 - np.searchsorted(values, 0)] = s[zeros[-1]]
        return thr, tp.astype(np.float64), fp.astype(np.float64), float(tp[-1])
    # Non-finite scores or non-binary labels: the original stable-sort definition, where each
    # inf or NaN is its own threshold (their differences are NaN) and labels are weights.
    s = s.astype(np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    with np.errstate(invalid="ignore"):  # inf - inf
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
    tp = int(np.count_nonzero(pred & labels))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(labels)) - tp
    tn = len(labels) - tp - fp - fn
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


def top_k_correct(class_ids, logits, k: int) -> np.ndarray:
    """Per example: is the true class among the k highest logits (ties count in, as
    tf.math.in_top_k counts them)?"""
    logits = np.asarray(logits, np.float64)
    ids = np.asarray(class_ids, np.int64)
    true = logits[np.arange(len(ids)), ids]
    return np.sum(logits > true[:, None], axis=1) < k


TOP_K = 5  # multiclass runs report the top-5 accuracy too (1.0 by definition with <= 5 classes)


def classification_report(class_ids, logits, class_names) -> dict:
    """A classifier's metrics from its logits: N-class (top-1) and top-5 accuracy, the
    accuracy of each class present (class name -> accuracy) and the N x N confusion matrix
    (rows true, columns predicted)."""
    ids = np.asarray(class_ids, np.int64)
    n = len(class_names)
    pred = np.asarray(logits).argmax(-1)
    correct = pred == ids
    counts = np.bincount(ids, minlength=n)
    hits = np.bincount(ids, weights=correct, minlength=n)
    return {
        "num_examples": int(len(ids)),
        "class_accuracy": float(np.mean(correct)) if len(ids) else float("nan"),
        "top5_class_accuracy": (float(np.mean(top_k_correct(ids, logits, TOP_K))) if len(ids)
                                else float("nan")),
        "per_class_accuracy": {class_names[c]: float(hits[c] / counts[c])
                               for c in range(n) if counts[c]},
        "class_confusion_matrix": np.bincount(ids * n + pred, minlength=n * n).reshape(
            n, n).tolist(),
    }


def roc_curve(labels, scores):
    _, tp, fp, pos = _sorted_counts(labels, scores)
    neg = len(labels) - pos
    return np.r_[0.0, fp / max(neg, 1)], np.r_[0.0, tp / max(pos, 1)]


def pr_curve(labels, scores):
    _, tp, fp, pos = _sorted_counts(labels, scores)
    return tp / max(pos, 1), tp / (tp + fp)


def roc_pr_figure(labels, scores, title: str = ""):
    """ROC and PR curves side by side, as a backend-free `matplotlib.figure.Figure`."""
    fig = Figure(figsize=(9, 4))
    a, b = fig.subplots(1, 2)
    fpr, tpr = roc_curve(labels, scores)
    a.plot(fpr, tpr)
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set(xlabel="false positive rate", ylabel="true positive rate",
          title=f"ROC (AUC {roc_auc(labels, scores):.4f})")
    rec, prec = pr_curve(labels, scores)
    b.plot(rec, prec)
    b.axhline(np.mean(labels), color="k", ls=":", lw=0.8)
    b.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02),
          title=f"PR (AP {pr_auc(labels, scores):.4f})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


LABELLED_CLASSES = 20  # a larger confusion matrix is drawn without counts and class names


def confusion_figure(matrix, class_names=("other", "cat"), title: str = ""):
    """A confusion matrix as a backend-free `matplotlib.figure.Figure` (beyond
    LABELLED_CLASSES classes: colours only, ticks every tenth class id)."""
    m = np.asarray(matrix)
    side = min(len(m), LABELLED_CLASSES)
    fig = Figure(figsize=(3.6 + 0.25 * side, 3.2 + 0.25 * side))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    if len(m) <= LABELLED_CLASSES:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:,}", ha="center", va="center",
                    color="white" if v > m.max() / 2 else "black", fontsize=8)
        ax.set_xticks(range(len(m)), class_names, rotation=45 if len(m) > 2 else 0)
        ax.set_yticks(range(len(m)), class_names)
    else:
        ax.set_xticks(range(0, len(m), 10))
        ax.set_yticks(range(0, len(m), 10))
    ax.set(xlabel="predicted" + (" class id" if len(m) > LABELLED_CLASSES else ""),
           ylabel="true" + (" class id" if len(m) > LABELLED_CLASSES else ""))
    ax.set_title(title, fontsize=10)  # a long run name fits the narrow figure
    fig.tight_layout()
    return fig
