"""Evaluation: one ordered pass over a whole split (no example dropped), and evaluating a
finished run from its checkpoint (the model alone is restored; no optimizer is built)."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf

from research import plots
from research.data import pipeline
from research.training import inputs
from research.training import metrics as detmetrics
from research.training.config import ConfigError, TrainConfig
from research.training.state import make_model
from research.training.steps import make_eval_step


@dataclasses.dataclass
class EvalResult:
    split: str
    scores: np.ndarray
    labels: np.ndarray
    class_ids: np.ndarray
    index: np.ndarray
    logits: np.ndarray
    loss: float
    accuracy: float
    class_accuracy: float | None


def make_eval_metrics(cfg: TrainConfig) -> dict:
    metrics = {"loss": keras.metrics.Mean(name="loss"),
               "accuracy": keras.metrics.BinaryAccuracy(name="accuracy")}
    if cfg.objective == "multiclass":
        metrics["class_accuracy"] = keras.metrics.SparseCategoricalAccuracy("class_accuracy")
    return metrics


class Evaluator:
    """Scores whole splits with `model` under `strategy` (orbit's evaluator, as one class)."""

    def __init__(self, cfg: TrainConfig, strategy: tf.distribute.Strategy, model: keras.Model,
                 positive_id: int):
        self.cfg, self.strategy = cfg, strategy
        with strategy.scope():
            self.metrics = make_eval_metrics(cfg)
        self.eval_step = make_eval_step(cfg, strategy, model, self.metrics, positive_id)

    def evaluate(self, split: str, progress: bool = False) -> EvalResult:
        cfg = self.cfg
        for metric in self.metrics.values():
            metric.reset_state()
        ds, expected = inputs.eval_dataset(cfg, split)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        dist = self.strategy.experimental_distribute_dataset(ds.with_options(options))
        bar = keras.utils.Progbar(len(expected), unit_name="image") if progress else None
        parts = []
        for batch in dist:
            out = {k: v.numpy() for k, v in self.eval_step(batch).items()}
            parts.append(out)
            if bar:
                bar.add(len(out["score"]))
        outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(outputs["index"])
        outputs = {k: v[order] for k, v in outputs.items()}
        if not np.array_equal(outputs["index"], expected):
            raise RuntimeError(f"evaluation of {split} saw {len(outputs['index'])} examples, "
                               f"the run's examples of it are {len(expected)}")
        m = self.metrics
        return EvalResult(split, outputs["score"], outputs["label"], outputs["class_id"],
                          outputs["index"], outputs["logits"], float(m["loss"].result()),
                          float(m["accuracy"].result()),
                          float(m["class_accuracy"].result()) if "class_accuracy" in m
                          else None)


def resolve_checkpoint(cfg: TrainConfig, which: str) -> str:
    """'best', 'latest' or a path, to a checkpoint prefix."""
    if which in ("best", "latest"):
        folder = os.path.join(cfg.run_dir, "best") if which == "best" else cfg.run_dir
        path = tf.train.latest_checkpoint(folder)
        if path is None and which == "best":
            path = tf.train.latest_checkpoint(cfg.run_dir)
        if path is None:
            raise ConfigError(f"--checkpoint={which}: no checkpoint in {folder}")
    elif not tf.io.gfile.exists(which + ".index"):
        raise ConfigError(f"--checkpoint: {which!r} is not a checkpoint prefix "
                          f"({which}.index not found)")
    else:
        path = which
    from research.training.faults import checkpoint_problem

    problem = checkpoint_problem(path)  # a truncated file is named here, not in a traceback
    if problem:
        raise ConfigError(f"--checkpoint={which}: {path} cannot be read ({problem})")
    return path


def restore_for_eval(cfg: TrainConfig, checkpoint: str, strategy=None, manifest=None):
    """(model, manifest, strategy): the run's network with the checkpoint's weights."""
    strategy = strategy or tf.distribute.get_strategy()
    manifest = manifest or pipeline.load_manifest(cfg.data_dir)
    with strategy.scope():
        model = make_model(cfg, manifest)
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
    return model, manifest, strategy


def evaluate_run(cfg: TrainConfig, split: str, checkpoint: str = "best",
                 progress: bool = True) -> tuple[dict, dict]:
    """Scores val (to choose the threshold) and `split`; returns (report, raw arrays)."""
    path = resolve_checkpoint(cfg, checkpoint)
    manifest = pipeline.load_manifest(cfg.data_dir)
    for name in {"val", split}:  # a corrupt shard fails here, before any scoring
        pipeline.shard_paths(cfg.data_dir, manifest, name)
    model, manifest, strategy = restore_for_eval(cfg, path, manifest=manifest)
    evaluator = Evaluator(cfg, strategy, model, manifest["positive_class_id"])
    val = evaluator.evaluate("val", progress=progress)
    threshold = detmetrics.best_f1_threshold(val.labels, val.scores)
    res = val if split == "val" else evaluator.evaluate(split, progress=progress)
    report = {"split": split, "run_name": cfg.run_name,
              "num_classes": len(manifest["class_names"]), "checkpoint": path,
              "step": int(path.rsplit("-", 1)[-1]) if path.rsplit("-", 1)[-1].isdigit() else None,
              "threshold_source": "val (max F1)", "tta": cfg.tta, "tta_shifts": cfg.tta_shifts,
              "objective": cfg.objective}
    report.update(detmetrics.detection_report(res.labels, res.scores, threshold))
    report["loss"] = res.loss
    if res.class_accuracy is not None:
        report["class_accuracy"] = res.class_accuracy
        pred = res.logits.argmax(-1)
        k = len(manifest["class_names"])
        report["class_confusion_matrix"] = np.bincount(
            res.class_ids * k + pred, minlength=k * k).reshape(k, k).tolist()
    return report, {"scores": res.scores, "labels": res.labels, "class_ids": res.class_ids,
                    "index": res.index}


def format_report(r: dict) -> str:
    rows = [f"{r['run_name']} on {r['split']}: {r['num_examples']:,} images, "
            f"{r['num_positive']:,} positive  (checkpoint {os.path.basename(r['checkpoint'])})",
            f"  ROC-AUC   {r['roc_auc']:.4f}     PR-AUC  {r['pr_auc']:.4f}",
            f"  threshold {r['threshold']:.4f} (chosen on val)   precision {r['precision']:.4f}"
            f"   recall {r['recall']:.4f}   F1 {r['f1']:.4f}   accuracy {r['accuracy']:.4f}",
            f"  at 0.5:   precision {r['at_0.5']['precision']:.4f}   recall "
            f"{r['at_0.5']['recall']:.4f}   F1 {r['at_0.5']['f1']:.4f}"]
    (tn, fp), (fn, tp) = r["confusion_matrix"]
    rows.append(f"  confusion: TN {tn:,}  FP {fp:,}  FN {fn:,}  TP {tp:,}")
    if "class_accuracy" in r:
        rows.append(f"  {r.get('num_classes', '?')}-class accuracy {r['class_accuracy']:.4f}")
    return "\n".join(rows)


def write_figures(cfg: TrainConfig, report: dict, raw: dict, out_dir: str,
                  worst: int = 16) -> list[str]:
    """ROC/PR curves, the confusion matrix, and grids of the worst false positives/negatives."""
    os.makedirs(out_dir, exist_ok=True)
    split = report["split"]
    manifest = pipeline.load_manifest(cfg.data_dir)
    names = manifest["class_names"]
    paths = [plots.save_figure(detmetrics.curves_figure(raw["labels"], raw["scores"],
                                                        f"{cfg.run_name} / {split}"),
                               os.path.join(out_dir, f"{split}_roc_pr.png")),
             plots.save_figure(detmetrics.confusion_figure(
                 report["confusion_matrix"], ["other", manifest["positive_class"]],
                 f"{split} at threshold {report['threshold']:.3f}"),
                 os.path.join(out_dir, f"{split}_confusion.png"))]
    labels, scores = raw["labels"].astype(bool), raw["scores"]
    fp_idx = np.flatnonzero(~labels & (scores >= report["threshold"]))
    fn_idx = np.flatnonzero(labels & (scores < report["threshold"]))
    fp_idx = fp_idx[np.argsort(-scores[fp_idx])][:worst]
    fn_idx = fn_idx[np.argsort(scores[fn_idx])][:worst]
    found = pipeline.take_examples(cfg.data_dir, split, indices=np.r_[fp_idx, fn_idx])
    images = dict(zip(found["index"].tolist(), found["image"]))
    for kind, idx in (("false_positives", fp_idx), ("false_negatives", fn_idx)):
        if len(idx) == 0:
            continue
        titles = [f"{names[raw['class_ids'][i]]} p={scores[i]:.2f}" for i in idx]
        fig = plots.image_grid([images[i] for i in idx], titles, ncols=8,
                               title=f"worst {kind.replace('_', ' ')} on {split} "
                                     f"(threshold {report['threshold']:.3f})")
        paths.append(plots.save_figure(fig, os.path.join(out_dir, f"{split}_worst_{kind}.png")))
    return paths


def save_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
