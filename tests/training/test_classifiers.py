"""Plain classifiers (issue 23): data made with make_tfrecords --positive_class=none, from a
synthetic CIFAR-100 (100 classes) and a synthetic MNIST, trains as an N-class classifier and
reports top-1, top-5 and per-class accuracy and a confusion matrix; no detection metric in
evaluate, TensorBoard, HParams, compare or predict; a binary objective is a one-line error."""

import json
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import helpers
import warm
from research import inference, runs
from research.detector import load_detector
from research.evaluation import compare, report as reporting, run as evaluation
from research.training import loop, record
from research.training.config import ConfigError, load_run_config
from helpers import event_tags

# Every test here reads one fixture that converts two sources through the make_tfrecords CLI
# and trains three runs: end to end, about a minute.
# One xdist group: under `-n 2 --dist loadgroup` the module fixture is then built on one worker,
# not on both (tests of one module otherwise alternate between the workers).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("classifiers")]

DETECTION = {"roc_auc", "pr_auc", "f1", "precision", "recall", "threshold", "accuracy_at_0.5",
             "f1_at_0.5"}


def make_tfrecords(source, out, *flags):
    res = warm.run([sys.executable, "-m", "research.apps.make_tfrecords",
                    f"--source={source}", f"--out_dir={out}", "--positive_class=none",
                    "--train_shards=2", "--val_shards=1", "--test_shards=1", *flags], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "positive class: none" in res.stdout
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """(root, data dirs): runs c100_a, c100_b on a 100-class CIFAR-100 look-alike, mnist on
    an MNIST look-alike, all made with --positive_class=none."""
    root = tmp_path_factory.mktemp("classifiers")
    helpers.make_cifar100_python(str(root / "c100.tar.gz"), n=300)
    helpers.make_mnist_npz(str(root / "mnist.npz"), n_train=80, n_test=20)
    data = {"c100": root / "c100", "mnist": root / "mnist"}
    manifest = make_tfrecords(root / "c100.tar.gz", data["c100"], "--val_fraction=0.34",
                              "--sample_grid=0")
    assert manifest["positive_class"] is None and manifest["positive_class_id"] is None
    assert len(manifest["class_names"]) == 100
    assert make_tfrecords(root / "mnist.npz", data["mnist"])["positive_class"] is None
    for run, key, seed in (("c100_a", "c100", 0), ("c100_b", "c100", 1), ("mnist", "mnist", 0)):
        cfg = helpers.tiny_config(str(data[key]), root, run_name=run, seed=seed,
                                  train_steps=4, steps_per_loop=2, eval_every_steps=2,
                                  eval_batch_size=64)
        summary = loop.train_and_evaluate(cfg)
        assert summary["best_val_metric"] == "class_accuracy"
        assert set(summary["final_val"]) == {"class_accuracy", "top5_class_accuracy"}
    return root, data


def test_checkpoint_layout_is_a_source_task_s(classifiers):
    """The train sums since the last eval keep a multiclass detector's layout (loss,
    accuracy, ROC-AUC, class accuracy, steps), so source tasks checkpointed before classifiers
    resume."""
    root, _ = classifiers
    ckpt = tf.train.latest_checkpoint(str(root / "ck" / "c100_a"))
    assert tf.train.load_variable(ckpt, "since_eval/.ATTRIBUTES/VARIABLE_VALUE").shape == (5,)


def test_binary_objective_without_positive_class_is_one_line(classifiers):
    root, data = classifiers
    cfg = helpers.tiny_config(str(data["mnist"]), root, run_name="bin", objective="binary")
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert str(e.value).startswith("--objective: binary needs a positive class")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("run", ["c100_a", "mnist"])
def test_evaluate_and_tensorboard_report_a_classifier(classifiers, run):
    root, _ = classifiers
    cfg = load_run_config(str(root / "ck"), run)
    report, _ = evaluation.evaluate_and_save(cfg, "test", progress=False)
    saved = json.loads(open(runs.eval_report_path(cfg.run_dir, "test")).read())
    assert saved["classifier"] is True and not DETECTION & set(saved)
    n = saved["num_classes"]
    assert n == (100 if run.startswith("c100") else 10)
    assert 0 <= saved["class_accuracy"] <= saved["top5_class_accuracy"] <= 1
    per = saved["per_class_accuracy"]
    assert len(per) == n and all(0 <= v <= 1 for v in per.values())
    counts = np.sum(saved["class_confusion_matrix"], axis=1)
    assert sum(per[c] * k for c, k in zip(per, counts)) == pytest.approx(
        saved["class_accuracy"] * saved["num_examples"])
    text = reporting.format_report(report)
    assert "top-5 accuracy" in text and "ROC-AUC" not in text and "threshold" not in text
    logs = root / "logs" / run
    tags = event_tags(logs / "eval")["tags"] | event_tags(logs / "train")["tags"]
    assert {"class_accuracy", "top5_class_accuracy", "loss"} <= tags
    assert not DETECTION & tags and not [t for t in tags if "auc" in t or "f1" in t], tags
    assert {"hparams/val_class_accuracy"} == {t for t in event_tags(logs / "eval")["tags"]
                                              if t.startswith("hparams/")}
    assert record.CLASSIFIER_HPARAM_METRICS == tuple(
        m for m in record.HPARAM_METRICS if "class_accuracy" in m[0])


def test_compare_two_classifiers(classifiers, tmp_path):
    root, _ = classifiers
    result, raw = compare.compare_runs(str(root / "ck"), ["c100_a", "c100_b"], "test",
                                       progress=False)
    assert "threshold_source" not in result
    for row in result["runs"].values():
        assert not DETECTION & set(row) and "top5_class_accuracy" in row
    md, _ = compare.write_table(result, str(tmp_path / "cmp"))
    table = open(md).read()
    assert "ROC-AUC" not in table and "threshold" not in table
    assert "| 100-class acc | top-5 acc |" in table and table.count("| c100_") == 2
    assert compare.write_figure(result, raw, str(tmp_path / "cmp")).endswith(".png")


def test_predict_gives_top_classes(classifiers, tmp_path):
    root, _ = classifiers
    path = runs.exported_model_path(str(root / "ck"), "c100_a")
    meta = runs.read_metadata(path)
    assert meta["classifier"] is True and meta["threshold"] is None
    assert set(meta["serving"]["outputs"]) == {"probabilities", "logits"}
    det = load_detector(path)
    photo = tmp_path / "photo.png"
    Image.fromarray(helpers.rgb(40, 30)).save(photo)
    (pred,) = inference.predict_files(det, [str(photo)], inference.PredictOptions(top_k=5))
    assert pred.score is None and pred.decision == pred.top_classes[0][0]
    assert len(pred.top_classes) == 5
    line = inference.format_line(pred, det.positive_class)
    assert "p(" not in line and "\ttop: " in line
    with pytest.raises(inference.InferenceError, match="--threshold: this model is a classifier"):
        inference.threshold_of(det, inference.PredictOptions(threshold=0.5))
    gray = load_detector(runs.exported_model_path(str(root / "ck"), "mnist"))  # 28x28x1
    (pred,) = inference.predict_files(gray, [str(photo)])  # an RGB photo, taken as gray
    assert pred.error is None and pred.score is None and len(pred.top_classes) == 3
