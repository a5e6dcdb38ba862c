"""Exact detection metrics over all scores of a split, and their figures.

Streaming Keras AUCs bucket scores into a fixed set of thresholds; for the numbers we report
we keep every score (10,000 floats for CIFAR-10 test) and compute ROC-AUC, average precision
(PR-AUC) and the F1-maximising threshold exactly.
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


def curves_figure(labels, scores, title: str = ""):
    """ROC and PR curves side by side."""
    from research.plots import plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
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


def confusion_figure(matrix, class_names=("other", "cat"), title: str = ""):
    from research.plots import plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3.6 + 0.25 * len(m), 3.2 + 0.25 * len(m)))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:,}", ha="center", va="center",
                color="white" if v > m.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(m)), class_names, rotation=45 if len(m) > 2 else 0)
    ax.set_yticks(range(len(m)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig
