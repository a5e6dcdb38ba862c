"""Scoring a finished run on every example of a split: the model alone is restored from its
checkpoint (no optimizer is built), val is scored to choose the threshold (by the run's
--threshold_metric, research.thresholds), and the split is scored with that threshold
unchanged.

`evaluate_and_save` is what `apps/evaluate`, `compare` and the lab call: score, write
eval_<split>.json and its figures, return the report.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from research import runs, thresholds
from research.data import pipeline
from research import metrics as detmetrics
from research.detector import tta_mode
from research.evaluation import native as native_tta
from research.evaluation import report as reporting
from research.training import checkpoints, record
from research.training.config import ConfigError, TrainConfig
from research.training.evaluator import Evaluator
from research.training.model import make_model


def restore_for_eval(cfg: TrainConfig, checkpoint: str, strategy=None, manifest=None):
    """(model, manifest, strategy): the run's network with the checkpoint's weights."""
    strategy = strategy or tf.distribute.get_strategy()
    manifest = manifest or pipeline.load_manifest(cfg.data_dir)
    with strategy.scope():
        model = make_model(cfg, manifest)
    checkpoints.restore_model(model, checkpoint)
    return model, manifest, strategy


def check_data(cfg: TrainConfig, split: str) -> dict:
    """The run's data for scoring `split`, checked before any scoring: the shards of val and
    the split (size and sha256), and that the data holds the classes the run was trained
    on. Returns the manifest."""
    manifest = pipeline.load_manifest(cfg.data_dir)
    for name in {"val", split}:  # a missing or corrupt shard fails here
        pipeline.shard_paths(cfg.data_dir, manifest, name)
    runs.check_export_matches(cfg.checkpoint_dir, cfg.run_name, manifest, cfg.data_dir)
    return manifest


def evaluate_run(cfg: TrainConfig, split: str, checkpoint: str = "best",
                 progress: bool = True, verified: bool = False,
                 native: native_tta.NativeTTA | None = None) -> tuple[dict, dict]:
    """Scores val (to choose the threshold) and `split`; returns (report, raw arrays). A
    classifier (no positive class) is scored on `split` alone: its report has the N-class
    and top-5 accuracy, per-class accuracy and confusion matrix, and no detection metric.
    `verified`: `checkpoint` is a prefix already resolved and read whole (compare checks
    every run's before scoring any), so it is not read twice. `native` with windows > 1:
    val and the split are scored on windows of the original photos at their own aspect
    (research.evaluation.native), the photo source checked before the model is built."""
    path = checkpoint if verified else checkpoints.resolve_checkpoint(cfg.run_dir, checkpoint)
    manifest = check_data(cfg, split)
    source = native_source(cfg, manifest, native)
    model, manifest, strategy = restore_for_eval(cfg, path, manifest=manifest)
    step = path.rsplit("-", 1)[-1]
    return score_model(cfg, model, manifest, strategy, split, progress, {
        "checkpoint": path, "step": int(step) if step.isdigit() else None}, native, source)


def native_source(cfg: TrainConfig, manifest: dict,
                  native: native_tta.NativeTTA | None) -> str | None:
    """The photo source native windows read (checked: research.evaluation.native
    .resolve_source), or None when there are none to score."""
    if native is None or not native.active:
        return None
    return native_tta.resolve_source(manifest, cfg.data_dir, native, cfg.transfer)


def score_model(cfg: TrainConfig, model: keras.Model, manifest: dict, strategy, split: str,
                progress: bool = True, about: dict | None = None,
                native: native_tta.NativeTTA | None = None,
                source: str | None = None) -> tuple[dict, dict]:
    """(report, raw arrays) of `model` on val and `split` as evaluate_run describes;
    `about` (where the weights came from) goes into the report; `native` and its checked
    `source` (native_source): score windows of the original photos."""
    classifier = cfg.positive_class(manifest) is None
    evaluator = Evaluator(cfg, strategy, model, cfg.positive_id(manifest))
    windows = native.windows if native is not None and native.active else 1
    checked: dict[str, dict] = {}

    def score(name):
        if windows == 1:
            return evaluator.evaluate(name, progress=progress)
        res, checked[name] = native_tta.evaluate_windows(evaluator, name, native, source,
                                                         progress)
        return res

    val = None if classifier and split != "val" else score("val")
    res = val if split == "val" else score(split)
    report = {"split": split, "run_name": cfg.run_name,
              "num_classes": len(manifest["class_names"]), **(about or {}),
              "classifier": classifier, "tta": cfg.tta, "tta_shifts": cfg.tta_shifts,
              "tta_windows": windows, "tta_mode": tta_mode(cfg.tta, cfg.tta_shifts, windows),
              "objective": cfg.objective, "split_size": manifest["splits"][split]["num_examples"],
              "eval_fraction": cfg.eval_fraction}
    if windows > 1:
        report["native_windows"] = {"photo_source": source, "centre_check": checked}
    raw = {"labels": res.labels, "class_ids": res.class_ids, "index": res.index}
    if classifier:  # no threshold to choose: val is not scored for it
        report.update(detmetrics.classification_report(res.class_ids, res.logits,
                                                       manifest["class_names"]))
        report["num_positive"] = 0  # there is no positive class
        report["loss"] = res.loss
        return report, {**raw, "logits": res.logits}
    report.update(choose_and_score(cfg, manifest, val, res))
    report["loss"] = res.loss
    if res.class_accuracy is not None:
        report["class_accuracy"] = res.class_accuracy
        report["top5_class_accuracy"] = res.top5_class_accuracy
        pred = res.logits.argmax(-1)
        k = len(manifest["class_names"])
        report["class_confusion_matrix"] = np.bincount(
            res.class_ids * k + pred, minlength=k * k).reshape(k, k).tolist()
    return report, {**raw, "scores": res.scores}


def choose_and_score(cfg: TrainConfig, manifest: dict, val, res) -> dict:
    """The threshold chosen on val by the run's policy (with its bootstrap interval),
    `res`'s detection metrics there and at 0.5, and calibration: the expected calibration
    error and reliability bins of `res`'s scores, and with --calibrate those of the scores
    under the temperature fitted on val (decisions unchanged: the temperature is monotone,
    so the threshold is chosen on the raw scores)."""
    policy, why = cfg.threshold_policy(manifest)
    chosen = thresholds.decision(val.labels, val.scores, policy, why)
    report = detmetrics.detection_report(res.labels, res.scores, chosen["threshold"])
    report.update(chosen)
    report["threshold_source"] = f"val ({policy})"
    report["calibration"] = {"raw": thresholds.reliability(res.labels, res.scores)}
    if cfg.calibrate:
        t = thresholds.fit_temperature(val.labels, val.scores)
        report["temperature"] = t
        report["calibration"]["calibrated"] = thresholds.reliability(
            res.labels, thresholds.apply_temperature(res.scores, t))
    return report


def evaluate_and_save(cfg: TrainConfig, split: str, checkpoint: str = "best",
                      output: str | None = None, figures_dir: str | None = None,
                      figures: bool = True, progress: bool = True,
                      verified: bool = False, tb_dir: str | None = "",
                      native: native_tta.NativeTTA | None = None) -> tuple[dict, dict]:
    """Scores the run (evaluate_run), writes its figures (ROC/PR, confusion matrix, worst
    mistakes) and the report to `output` (default <run>/eval_<split>.json, figures in
    figures_<split>/ beside it); returns (report, raw arrays). A test split's metrics go to
    TensorBoard under `tb_dir` ("": the run's own log folder when it exists; None: nowhere),
    and report["tensorboard"] says where. `native`: evaluate_run's."""
    output = output or runs.eval_report_path(cfg.run_dir, split)
    report, raw = evaluate_run(cfg, split, checkpoint, progress=progress, verified=verified,
                               native=native)
    if figures:
        report["figures"] = reporting.write_figures(
            cfg, report, raw, figures_dir or runs.eval_figures_dir(output, split))
    runs.write_eval_report(output, report)
    if tb_dir == "":
        tb_dir = cfg.tb_dir if tf.io.gfile.isdir(cfg.tb_dir) else None
    report["tensorboard"] = None
    if split == "test" and tb_dir:  # the run's HParams row
        report["tensorboard"] = os.path.join(tb_dir, "test")
        writer = tf.summary.create_file_writer(report["tensorboard"])
        record.log_hparam_metrics(writer, "test", report, report.get("step") or 0)
        writer.flush()
    return report, raw


def saved_report(cfg: TrainConfig, split: str, checkpoint: str,
                 figures: bool = True) -> dict | None:
    """The run's eval_<split>.json if it scored exactly `checkpoint` (and its figures are
    all there when wanted), else None: a finished evaluation need not be done again."""
    report = runs.read_eval_report(runs.eval_report_path(cfg.run_dir, split))
    if not report or report.get("checkpoint") != checkpoint:
        return None
    if report.get("tta_windows", 1) != 1:  # scored on other views than the run's
        return None
    paths = report.get("figures", [])
    if figures and (not paths or not all(tf.io.gfile.exists(p) for p in paths)):
        return None
    return report


def count_params(cfg: TrainConfig, manifest: dict) -> dict:
    """Parameters and trainable parameters, counted without running anything: from the
    export if there is one (Keras saves each layer's `trainable` flag, so a transfer run
    counts what its last phase trained), else from the network the config builds (for the
    features recipe the head on the backbone's feature shape: the cache is not computed)."""
    path = runs.exported_model_path(cfg.checkpoint_dir, cfg.run_name)
    if tf.io.gfile.exists(path):
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as e:  # zip, h5, config or layer errors alike: one line
            raise ConfigError(f"run {cfg.run_name}: cannot load {path}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        source = "export"
    else:
        model = make_model(cfg, manifest, compute_features=False)
        source = "config (no export; trainable flags as built)"
    return {"params": int(model.count_params()),
            "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
            "params_source": source}
