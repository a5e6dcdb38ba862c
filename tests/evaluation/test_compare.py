"""compare: two tiny runs scored as evaluate scores them, the table, the figure, bad input."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import helpers
import warm
from research.data import pipeline
from research.evaluation import compare
from research.evaluation import run as evaluation
from research.training import loop
from research.training.config import ConfigError, TrainConfig, load_run_config

TINY = {"widths": (8, 16), "res_blocks": (1, 0), "stem_width": 8}
STEPS, BATCH = 10, 32
# One xdist group: the two trainings of `runs` are then made on one worker, not on both
# (tests of one module otherwise alternate between the workers of `-n 2 --dist loadgroup`).
pytestmark = pytest.mark.xdist_group("compare_runs")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(checkpoint_dir, data_dir): runs 'multi' (multiclass) and 'bin' (binary objective)."""
    root = tmp_path_factory.mktemp("compare")
    data = str(root / "data")
    helpers.make_synthetic_tfrecords(data, n_train=120, n_test=40)
    ck = str(root / "ck")
    for name, objective in (("multi", "multiclass"), ("bin", "binary")):
        loop.train_and_evaluate(TrainConfig(
            data_dir=data, run_name=name, objective=objective, checkpoint_dir=ck,
            log_dir=str(root / "logs"), model_options=dict(TINY), batch_size=BATCH,
            eval_batch_size=64, train_steps=STEPS, steps_per_loop=STEPS, eval_every_steps=STEPS,
            learning_rate=0.03, progress=False, precision="float32", gradcam_images=0))
    return ck, data


@pytest.fixture(scope="module")
def compared(runs):
    ck, _ = runs
    return compare.compare_runs(ck, ["multi", "bin"], "test", progress=False)


def test_rows_equal_evaluate(runs, compared):
    ck, _ = runs
    result, raw = compared
    assert list(result["runs"]) == ["multi", "bin"]
    assert result["num_examples"] == 40 and result["num_classes"] == 10
    for name, row in result["runs"].items():
        report, want = evaluation.evaluate_run(load_run_config(ck, name), "test",
                                               progress=False)
        for key, value in report.items():
            assert row[key] == value, (name, key)
        np.testing.assert_array_equal(raw[name]["scores"], want["scores"])
        summary = json.load(open(os.path.join(ck, name, "train_summary.json")))
        assert row["images_seen"] == STEPS * BATCH == row["final_step"] * row["batch_size"]
        assert row["train_seconds"] == summary["train_seconds"] > 0
        assert row["images_per_sec"] == pytest.approx(STEPS * BATCH / summary["train_seconds"])
        assert row["params_source"] == "export"
        model, _, _ = evaluation.restore_for_eval(load_run_config(ck, name), row["checkpoint"])
        assert row["params"] == model.count_params() > row["trainable_params"] > 0
    assert "class_accuracy" in result["runs"]["multi"]
    assert "class_accuracy" not in result["runs"]["bin"]


def test_table_and_figure(compared, tmp_path):
    result, raw = compared
    prefix = str(tmp_path / "out" / "cmp")
    md, js = compare.write_table(result, prefix)
    png = compare.write_figure(result, raw, prefix)
    assert (md, js, png) == (prefix + ".md", prefix + ".json", prefix + ".png")
    saved = json.load(open(js))
    assert saved["split"] == "test" and list(saved["runs"]) == ["multi", "bin"]
    for row in saved["runs"].values():
        assert {"num_examples", "num_positive", "roc_auc", "pr_auc", "f1", "precision",
                "recall", "threshold", "params", "trainable_params", "images_seen",
                "train_seconds", "images_per_sec"} <= set(row)
    lines = [ln for ln in open(md).read().splitlines() if ln.startswith("|")]
    assert "10-class acc" in lines[0] and len(lines) == 2 + 2
    multi, bin_ = lines[2].split(" | "), lines[3].split(" | ")
    col = lines[0].split(" | ").index("10-class acc")
    assert multi[col] == f"{result['runs']['multi']['class_accuracy']:.4f}"
    assert bin_[col] == compare.DASH
    assert f"{result['runs']['bin']['roc_auc']:.4f}" in lines[3]
    with Image.open(png) as img:
        img.load()
        assert img.size[0] > 500 and img.size[1] > 300


def test_bad_runs_fail_before_scoring(runs, tmp_path):
    ck, _ = runs
    with pytest.raises(ConfigError, match=r"no training run named nope; runs in .*: bin, multi"):
        compare.load_runs(ck, ["multi", "nope"], "test")
    with pytest.raises(ConfigError, match="listed more than once"):
        compare.load_runs(ck, ["multi", "multi"], "test")
    empty = os.path.join(ck, "empty")  # a config but no checkpoint
    os.makedirs(empty)
    shutil.copy(os.path.join(ck, "bin", "config.json"), empty)
    try:
        with pytest.raises(ConfigError, match=r"run empty has no checkpoint.*bin, empty, multi"):
            compare.load_runs(ck, ["multi", "empty"], "test")
        with open(os.path.join(empty, "config.json"), "w") as f:
            f.write("{not json")
        with pytest.raises(ConfigError, match=r"run empty: unreadable .*config.json"):
            compare.load_runs(ck, ["multi", "empty"], "test")
    finally:
        shutil.rmtree(empty)


def test_different_data_refused(runs, tmp_path):
    ck, data = runs
    other = str(tmp_path / "other")
    helpers.make_synthetic_tfrecords(other, n_train=60, n_test=40, seed=5)
    moved = os.path.join(ck, "moved")
    shutil.copytree(os.path.join(ck, "bin"), moved)
    try:
        cfg = load_run_config(ck, "moved")
        cfg.data_dir = other
        with open(os.path.join(moved, "config.json"), "w") as f:
            f.write(cfg.to_json())
        with pytest.raises(pipeline.DataError, match=r"multi and moved read different test "
                                                     r"data .*other shards"):
            compare.load_runs(ck, ["multi", "moved"], "test")
        # One folder for all runs is fine.
        assert len(compare.load_runs(ck, ["multi", "moved"], "test", data_dir=data)) == 2
    finally:
        shutil.rmtree(moved)


def test_cli(runs, tmp_path):
    ck, _ = runs
    prefix = str(tmp_path / "new" / "cmp")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    res = warm.run([sys.executable, "-m", "research.apps.compare", "--runs=bin,multi",
                    f"--checkpoint_dir={ck}", f"--output={prefix}", "--split=val"],
                   cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    for ext in (".md", ".json", ".png"):
        assert os.path.isfile(prefix + ext) and prefix + ext in res.stdout
    assert "| bin |" in res.stdout and "| multi |" in res.stdout
    assert json.load(open(prefix + ".json"))["split"] == "val"


def test_fallbacks_without_export_or_summary(runs, compared, tmp_path):
    ck, data = runs
    result, _ = compared
    cfg = load_run_config(ck, "multi")
    cfg.checkpoint_dir = str(tmp_path)  # no export there: counted on the config's network
    counts = evaluation.count_params(cfg, pipeline.load_manifest(data))
    row = result["runs"]["multi"]
    assert counts["params_source"].startswith("config")
    assert (counts["params"], counts["trainable_params"]) == (row["params"],
                                                              row["trainable_params"])
    cost = compare.training_cost(cfg, {})
    assert cost["images_seen"] is None and cost["images_per_sec"] is None
    table = compare.format_table({**result, "runs": {"multi": {**row, **counts, **cost}}})
    assert f"| {compare.DASH} | {compare.DASH} | {compare.DASH} |" in table
    assert "No train_summary.json for multi" in table and "Parameters of multi" in table


@pytest.mark.parametrize("prefix", ["", "out/", "out/cmp.json"])
def test_bad_output_prefix(tmp_path, prefix):
    os.makedirs(tmp_path / "out")
    with pytest.raises(ConfigError, match="--output: want a path prefix"):
        compare.check_output_prefix(str(tmp_path / prefix) if prefix else prefix)
