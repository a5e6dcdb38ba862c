"""The whole path through the CLIs on tiny synthetic data: images -> TFRecords -> training
(with TensorBoard, checkpoints, the Grad-CAM hook) -> evaluation -> prediction -> explanation."""

import json
import os
import sys

import pytest

import helpers
import warm
from helpers import event_tags
from research.training import record


def hparams_experiment(logdir) -> tuple[list, list, dict]:
    """(hyperparameter names, metric tags, the run's session values) as TensorBoard's own
    reader sees them (event multiplexer + the hparams plugin's metadata)."""
    from tensorboard.backend.event_processing import event_multiplexer
    from tensorboard.plugins.hparams import metadata

    mux = event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    experiment = session = None
    for tags in content.values():
        if metadata.EXPERIMENT_TAG in tags:
            experiment = metadata.parse_experiment_plugin_data(tags[metadata.EXPERIMENT_TAG])
        if metadata.SESSION_START_INFO_TAG in tags:
            session = metadata.parse_session_start_info_plugin_data(
                tags[metadata.SESSION_START_INFO_TAG])
    assert experiment is not None and session is not None, content
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
              for k, v in session.hparams.items()}
    return ([h.name for h in experiment.hparam_infos],
            [m.name.tag for m in experiment.metric_infos], values)


def run(*args, timeout=300):
    res = warm.run([sys.executable, "-m", *args], timeout=timeout)
    assert res.returncode == 0, f"{args[0]} failed:\n{res.stderr[-4000:]}"
    return res


@pytest.mark.slow
def test_end_to_end(tmp_path):
    src, data = tmp_path / "images", tmp_path / "data"
    ck, logs = tmp_path / "checkpoints", tmp_path / "logs"
    helpers.write_synthetic_folder(str(src))
    run("research.apps.make_tfrecords", f"--source={src}", f"--out_dir={data}",
        "--train_shards=3", "--val_shards=1", "--test_shards=1", "--val_fraction=0.2")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["test"]["num_examples"] == 60

    run("research.apps.train", f"--data_dir={data}", "--run_name=e2e", f"--checkpoint_dir={ck}",
        f"--log_dir={logs}", "--train_steps=60", "--batch_size=32", "--learning_rate=0.03",
        "--widths=16,32", "--res_blocks=1,0", "--stem_width=8", "--eval_every_steps=20",
        "--steps_per_loop=10", "--gradcam_images=4", "--progress=false",
        "--precision=mixed_bfloat16")
    run_dir = ck / "e2e"
    for name in ("config.json", "versions.json", "flags.txt", "train_summary.json",
                 "export/model.keras", "export/metadata.json",
                 "export/saved_model/saved_model.pb"):
        assert (run_dir / name).exists(), name
    assert "--run_name=e2e" in (run_dir / "flags.txt").read_text()
    events = {p.parent.name for p in logs.rglob("events.out.tfevents*")}
    assert events == {"train", "eval", "e2e"}  # e2e: the HParams session
    session = event_tags(logs / "e2e")
    assert session["plugins"] == {"hparams"}, session
    names, metrics, values = hparams_experiment(logs)
    assert names == list(record.HPARAMS) and metrics == [m[0] for m in record.HPARAM_METRICS]
    assert values["model"] == "scratch" and values["precision"] == "mixed_bfloat16"
    assert all(isinstance(v, (str, float, bool)) for v in values.values()), values  # no JSON

    out = tmp_path / "eval_test.json"
    res = run("research.apps.evaluate", "--run_name=e2e", f"--checkpoint_dir={ck}",
              "--split=test", f"--output={out}")
    report = json.loads(out.read_text())
    for key in ("split", "num_examples", "num_positive", "roc_auc", "pr_auc", "threshold",
                "precision", "recall", "f1", "accuracy"):
        assert key in report, key
    assert report["num_examples"] == 60 and report["num_positive"] == 6
    assert report["roc_auc"] > 0.9, report  # the synthetic cat block is easy
    assert 0 <= report["class_accuracy"] <= report["top5_class_accuracy"] <= 1
    assert {"class_accuracy", "top5_class_accuracy", "roc_auc"} <= event_tags(
        logs / "e2e" / "eval")["tags"]  # a multiclass detector: its top-5 accuracy too
    assert "ROC-AUC" in res.stdout
    # TensorBoard's HParams view: the val numbers from training, the test numbers from evaluate
    assert {"hparams/val_roc_auc", "hparams/val_f1"} <= event_tags(logs / "e2e" / "eval")["tags"]
    assert {"hparams/test_roc_auc", "hparams/test_pr_auc"} <= event_tags(
        logs / "e2e" / "test")["tags"]
    figures = {os.path.basename(p) for p in report["figures"]}
    assert {"test_roc_pr.png", "test_confusion.png", "test_reliability.png"} <= figures
    # The declared policy: 10% cats in train -> auto chose f1, in the run and the export
    meta = json.loads((run_dir / "export" / "metadata.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())["final_val"]
    assert report["threshold_metric"] == meta["threshold_metric"] == "f1"
    assert "positives are 10.0% of train" in meta["threshold_reason"]
    assert meta["threshold"] == summary["threshold"]
    interval = report["threshold_interval"]
    assert interval["low"] <= interval["high"] and interval["samples"] == 200
    assert 0 <= report["calibration"]["raw"]["ece"] <= 1 and "at 0.5:" in res.stdout
    out2 = tmp_path / "eval_test_acc.json"
    res = run("research.apps.evaluate", "--run_name=e2e", f"--checkpoint_dir={ck}",
              "--split=test", f"--output={out2}", "--threshold_metric=accuracy", "--calibrate")
    report2 = json.loads(out2.read_text())
    assert report2["threshold_metric"] == "accuracy" and report2["temperature"] > 0
    assert "calibrated" in report2["calibration"] and "at temperature" in res.stdout

    cat = next((src / "test" / "cat").iterdir())
    res = run("research.apps.predict", f"--model={run_dir}/export/model.keras",
              f"--images={cat}")
    assert "p(cat)=" in res.stdout

    exp = tmp_path / "explain"
    run("research.apps.explain", "--run_name=e2e", f"--checkpoint_dir={ck}",
        f"--data_dir={data}", "--num_examples=3", "--example_filter=positive",
        "--method=gradcam,saliency", "--faithfulness", f"--out_dir={exp}",
        "--visualize=activations,filters", "--num_filters=4", "--filter_steps=5")
    overlays = sorted(p.name for p in (exp / "gradcam").glob("heatmap_*.png"))
    assert len(overlays) == 3 and all("_cat" in o for o in overlays)
    assert json.loads((exp / "faithfulness.json").read_text()).keys() == {"gradcam", "saliency"}
    assert list(exp.glob("activations_*.png")) and list(exp.glob("filters_*.png"))
