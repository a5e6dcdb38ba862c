"""The vectorised exact metrics return what the original implementation did, bit for bit.

`research/benchmarks/_metrics_reference.py` is the original module (rank-and-loop ROC-AUC,
stable-argsort PR-AUC and threshold search), kept verbatim as the reference.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from research.benchmarks import _metrics_reference as ref
from research import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALARS = ("roc_auc", "pr_auc", "best_f1_threshold")


def _same(a, b) -> bool:
    """Equal floats, NaN equal to NaN, and the same sign of zero."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b and np.signbit(a) == np.signbit(b)


def assert_identical(labels, scores):
    for name in SCALARS:
        old, new = getattr(ref, name)(labels, scores), getattr(metrics, name)(labels, scores)
        assert _same(old, new), (name, old, new)
    for name in ("roc_curve", "pr_curve"):
        old, new = getattr(ref, name)(labels, scores), getattr(metrics, name)(labels, scores)
        for a, b in zip(old, new):
            np.testing.assert_array_equal(a, b)
    for threshold in (None, 0.5):
        old = ref.detection_report(labels, scores, threshold)
        new = metrics.detection_report(labels, scores, threshold)
        assert repr(old) == repr(new)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [2, 17, 300, 5000])
@pytest.mark.parametrize("decimals", [0, 1, 2, 6])
def test_identical_on_random_scores_with_ties(seed, n, decimals):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.05, 0.95)
    scores = np.round(rng.random(n) + 0.3 * labels, decimals)
    assert_identical(labels, scores)
    assert_identical(labels.astype(np.int64), scores.astype(np.float32))
    assert_identical(labels.astype(np.float32).tolist(), scores.tolist())


@pytest.mark.parametrize("scores", [
    np.float16([0.1, 0.2, 0.2, 0.3, 0.9, 0.9]),
    np.int64([3, 1, 1, 2, 3, 3]),
    np.array([True, False, True, True, False, False]),
    np.array([2**60, 2**60 + 1, 5, 5, 2**60, 7], np.int64),  # distinct ints, equal as floats
])
def test_identical_for_other_score_dtypes(scores):
    assert_identical(np.array([1, 0, 1, 0, 0, 1]), scores)


@pytest.mark.parametrize("labels, scores", [
    ([0, 1, 0, 1, 1], [0.4] * 5),  # all scores equal
    ([0, 0, 0, 1, 0], [0.1, 0.9, 0.3, 0.5, 0.5]),  # a single positive
    ([1, 1, 0, 1], [0.2, 0.2, 0.2, 0.7]),  # a single negative, tied
    ([0, 0, 0], [0.1, 0.5, 0.5]),  # no positives: NaN AUCs, threshold 0.5
    ([1, 1, 1], [0.1, 0.5, 0.5]),  # no negatives
    ([1], [0.3]),
    ([0], [0.3]),
    ([1, 0, 1, 0, 1, 0], [0.0, -0.0, 0.0, -0.0, 0.5, 0.5]),  # the threshold keeps -0.0
    ([1, 0, 1, 0, 1, 0], [-0.0, 0.0, -0.0, 0.0, -0.5, 0.5]),
    ([1, 0, 1, 0, 1, 0], [np.inf, np.inf, 0.2, -np.inf, -np.inf, 0.2]),
    ([1, 0, 1, 0, 1, 0], [np.nan, 0.3, np.nan, np.nan, 0.3, 0.1]),
    ([2, 0, 1, 0, 0, 1], [0.9, 0.1, 0.5, 0.5, 0.2, 0.7]),  # the old code weighted a label 2
])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the reference's inf - inf
def test_identical_on_degenerate_inputs(labels, scores):
    assert_identical(labels, scores)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_identical_on_random_non_finite_scores():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        labels = rng.random(n) < 0.4
        scores = rng.choice([0.0, -0.0, 0.25, 1.0, np.inf, -np.inf, np.nan], n)
        assert_identical(labels, scores)


def test_empty_input_behaves_as_before():
    assert math.isnan(metrics.roc_auc([], [])) and math.isnan(ref.roc_auc([], []))
    for name in ("pr_auc", "best_f1_threshold"):
        with pytest.raises(IndexError):
            getattr(ref, name)([], [])
        with pytest.raises(IndexError):
            getattr(metrics, name)([], [])


def _mann_whitney_auc(labels, scores):
    """AUC from average ranks found with np.unique, independent of both implementations."""
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    pos = labels.sum()
    neg = len(labels) - pos
    return (average_rank[inverse][labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg)


def _python_lines(fn, *args) -> int:
    """How many lines of research/metrics.py run during fn(*args)."""
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if frame.f_code.co_filename == metrics.__file__:
            lines += event == "line"
            return tracer
        return None

    sys.settrace(tracer)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
    return lines


def test_200k_scores_without_a_python_loop():
    rng = np.random.default_rng(7)
    n = 200_000
    labels = rng.random(n) < 0.1
    scores = np.round(rng.random(n) + 0.4 * labels, 3).astype(np.float32)  # 1,401 values
    assert metrics.roc_auc(labels, scores) == pytest.approx(
        _mann_whitney_auc(labels, scores), rel=1e-12)
    assert metrics.pr_auc(labels, scores) == ref.pr_auc(labels, scores)
    assert metrics.best_f1_threshold(labels, scores) == ref.best_f1_threshold(labels, scores)
    # The work is in numpy: a constant number of Python lines, whatever n is (the old
    # roc_auc ran several lines per score).
    for name in SCALARS:
        assert _python_lines(getattr(metrics, name), labels, scores) < 100, name
    assert _python_lines(metrics.detection_report, labels, scores) < 300
    with_nan = scores.copy()
    with_nan[::1000] = np.nan  # the stable-argsort path is loop-free too
    assert _python_lines(metrics.roc_auc, labels, with_nan) < 100
    assert metrics.roc_auc(labels, with_nan) == ref.roc_auc(labels, with_nan)


def test_figures_are_backend_free_and_labelled():
    code = """
import io, sys
import numpy as np
from matplotlib.figure import Figure
from research import metrics
rng = np.random.default_rng(0)
labels = rng.random(400) < 0.2
scores = rng.random(400) + 0.3 * labels
fig = metrics.roc_pr_figure(labels, scores, title="val")
cm = metrics.confusion_figure([[50, 3], [4, 9]], ("other", "cat"), title="test")
assert isinstance(fig, Figure) and isinstance(cm, Figure)
roc, pr = fig.axes
assert roc.get_title().startswith("ROC (AUC ") and pr.get_title().startswith("PR (AP ")
assert (roc.get_xlabel(), roc.get_ylabel()) == ("false positive rate", "true positive rate")
assert (pr.get_xlabel(), pr.get_ylabel()) == ("recall", "precision")
assert fig.get_suptitle() == "val"
ax, = cm.axes
assert ax.get_title() == "test" and (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
assert [t.get_text() for t in ax.get_xticklabels()] == ["other", "cat"]
assert [t.get_text() for t in ax.get_yticklabels()] == ["other", "cat"]
for f in (fig, cm):
    buf = io.BytesIO()
    f.savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\\x89PNG")
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr
