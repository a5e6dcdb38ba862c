"""The threshold policy (research.thresholds): each metric's choice is the brute-force best
over every candidate threshold, targets hold, bad policies are one line, the interval is
reproducible, and temperature scaling recovers a known temperature."""

import numpy as np
import pytest

from research import metrics, thresholds
from research.thresholds import Policy, ThresholdError


def scores(n=600, share=0.3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < share
    s = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 2)  # ties on purpose
    return y, s


def brute(y, s, name):
    """Every candidate threshold (each distinct score and 'nobody positive'), scored."""
    best = None
    for t in np.r_[np.unique(s), np.inf]:
        r = metrics.at_threshold(y, s, t)
        tn, fp = r["confusion_matrix"][0]
        spec = tn / (tn + fp)
        value = {"f1": r["f1"], "accuracy": r["accuracy"],
                 "balanced_accuracy": (r["recall"] + spec) / 2,
                 "youden": r["recall"] + spec - 1}[name]
        best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("name", ["f1", "accuracy", "balanced_accuracy", "youden"])
def test_each_metric_chooses_its_best_threshold(name):
    y, s = scores()
    t = thresholds.choose(y, s, Policy(name))
    r = metrics.at_threshold(y, s, t)
    tn, fp = r["confusion_matrix"][0]
    got = {"f1": r["f1"], "accuracy": r["accuracy"],
           "balanced_accuracy": (r["recall"] + tn / (tn + fp)) / 2,
           "youden": r["recall"] + tn / (tn + fp) - 1}[name]
    assert got == pytest.approx(brute(y, s, name))


def test_f1_policy_is_the_old_f1_threshold():
    y, s = scores(share=0.1)
    assert thresholds.choose(y, s, Policy("f1")) == metrics.best_f1_threshold(y, s)


def test_accuracy_and_f1_differ_on_a_balanced_task():
    """The issue's case: on balanced data F1 rewards recall, so its threshold is lower."""
    y, s = scores(share=0.5, seed=3)
    f1_t, acc_t = (thresholds.choose(y, s, Policy(m)) for m in ("f1", "accuracy"))
    assert f1_t < acc_t
    assert metrics.at_threshold(y, s, acc_t)["accuracy"] > metrics.at_threshold(
        y, s, f1_t)["accuracy"]


def test_targets_hold_and_are_the_best_under_them():
    y, s = scores()
    t = thresholds.choose(y, s, thresholds.parse("precision_at_recall:0.8"))
    assert metrics.at_threshold(y, s, t)["recall"] >= 0.8
    best = max(metrics.at_threshold(y, s, u)["precision"] for u in np.unique(s)
               if metrics.at_threshold(y, s, u)["recall"] >= 0.8)
    assert metrics.at_threshold(y, s, t)["precision"] == best
    t = thresholds.choose(y, s, thresholds.parse("recall_at_precision:0.7"))
    assert metrics.at_threshold(y, s, t)["precision"] >= 0.7


def test_an_unreachable_precision_names_the_best_reachable():
    y = np.array([0, 1, 0, 1, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])  # the top score is a negative
    best = thresholds.best_reachable(Policy("recall_at_precision", 0.9), y, s)
    assert best == pytest.approx(0.5)
    with pytest.raises(ThresholdError, match=r"never reaches precision 0.9; the best "
                                             r"reachable is 0\.5000"):
        thresholds.choose(y, s, Policy("recall_at_precision", 0.9))
    chosen = thresholds.decision(y, s, Policy("recall_at_precision", 0.9), "--threshold_metric")
    assert chosen["threshold_metric"] == "f1" and "so f1 instead" in chosen["threshold_reason"]


@pytest.mark.parametrize("text,match", [
    ("f2", "unknown metric 'f2'"), ("precision_at_recall", r"needs a target in \(0, 1\]"),
    ("recall_at_precision:1.5", "needs a target"), ("recall_at_precision:x", "needs a target"),
    ("accuracy:0.5", "takes no ':value'")])
def test_bad_policies_are_one_line(text, match):
    with pytest.raises(ThresholdError, match=match) as e:
        thresholds.check(text)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--threshold_metric={text}")


def test_auto_follows_the_share_of_positives():
    assert thresholds.resolve("auto", 0.1)[0] == Policy("f1")
    policy, why = thresholds.resolve("auto", 0.5)
    assert policy == Policy("accuracy") and "50.0% of train" in why
    assert thresholds.resolve("youden", 0.1)[0] == Policy("youden")


def test_the_interval_is_seeded_and_brackets_the_choice():
    y, s = scores()
    a = thresholds.bootstrap_interval(y, s, Policy("accuracy"))
    assert a == thresholds.bootstrap_interval(y, s, Policy("accuracy"))
    assert a["low"] <= thresholds.choose(y, s, Policy("accuracy")) <= a["high"]
    assert a["low"] < a["high"] and a["failed"] == 0
    one_class = thresholds.decision(np.zeros(5), np.linspace(0, 1, 5), Policy("f1"), "x")
    assert one_class["threshold"] == 0.5 and "one class only" in one_class["threshold_reason"]


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 20000)
    y = rng.random(len(z)) < 1 / (1 + np.exp(-z))  # calibrated at z
    over = 1 / (1 + np.exp(-3 * z))                 # overconfident: temperature 3
    t = thresholds.fit_temperature(y, over)
    assert t == pytest.approx(3, rel=0.05)
    before = thresholds.reliability(y, over)["ece"]
    after = thresholds.reliability(y, thresholds.apply_temperature(over, t))["ece"]
    assert after < 0.02 < before


def test_reliability_bins_count_every_score():
    y, s = scores()
    r = thresholds.reliability(y, s, bins=10)
    assert sum(r["count"]) == len(s) and len(r["positive_rate"]) == 10
