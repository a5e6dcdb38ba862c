"""Evaluating a trained run: restore a checkpoint, score val and a split, write the report."""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from research import plots
from research.data import pipeline
from research.training import metrics as detmetrics
from research.training.config import ConfigError, TrainConfig
from research.training.loop import create_train_state, evaluate, plan_steps


def resolve_checkpoint(cfg: TrainConfig, which: str) -> str:
    """'best', 'latest' or a path, to a checkpoint prefix."""
    if which in ("best", "latest"):
        folder = os.path.join(cfg.run_dir, "best") if which == "best" else cfg.run_dir
        path = tf.train.latest_checkpoint(folder)
        if path is None and which == "best":
            path = tf.train.latest_checkpoint(cfg.run_dir)
        if path is None:
            raise ConfigError(f"--checkpoint={which}: no checkpoint in {folder}")
        return path
    if not tf.io.gfile.exists(which + ".index"):
        raise ConfigError(f"--checkpoint: {which!r} is not a checkpoint prefix "
                          f"({which}.index not found)")
    return which


def restore_for_eval(cfg: TrainConfig, checkpoint: str, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    manifest = pipeline.load_manifest(cfg.data_dir)
    spe, total = plan_steps(cfg, manifest)
    state = create_train_state(cfg, strategy, manifest, total, spe)
    tf.train.Checkpoint(model=state.model).restore(checkpoint).expect_partial()
    return state, manifest


def evaluate_run(cfg: TrainConfig, split: str, checkpoint: str = "best",
                 progress: bool = True) -> tuple[dict, dict]:
    """Scores val (to choose the threshold) and `split`; returns (report, raw arrays)."""
    path = resolve_checkpoint(cfg, checkpoint)
    state, manifest = restore_for_eval(cfg, path)
    positive_id = manifest["positive_class_id"]
    val = evaluate(cfg, state, "val", positive_id, progress=progress)
    threshold = detmetrics.best_f1_threshold(val.labels, val.scores)
    res = val if split == "val" else evaluate(cfg, state, split, positive_id, progress=progress)
    report = {"split": split, "run_name": cfg.run_name, "checkpoint": path,
              "step": int(path.rsplit("-", 1)[-1]) if path.rsplit("-", 1)[-1].isdigit() else None,
              "threshold_source": "val (max F1)", "tta": cfg.tta, "objective": cfg.objective}
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
        rows.append(f"  10-class accuracy {r['class_accuracy']:.4f}")
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
    images = load_split_images(cfg.data_dir, split, np.r_[fp_idx, fn_idx])
    for kind, idx in (("false_positives", fp_idx), ("false_negatives", fn_idx)):
        if len(idx) == 0:
            continue
        titles = [f"{names[raw['class_ids'][i]]} p={scores[i]:.2f}" for i in idx]
        fig = plots.image_grid([images[i] for i in idx], titles, ncols=8,
                               title=f"worst {kind.replace('_', ' ')} on {split} "
                                     f"(threshold {report['threshold']:.3f})")
        paths.append(plots.save_figure(fig, os.path.join(out_dir, f"{split}_worst_{kind}.png")))
    return paths


def load_split_images(data_dir: str, split: str, indices) -> dict[int, np.ndarray]:
    """uint8 images of a split at the given positions (one ordered pass)."""
    wanted = set(int(i) for i in indices)
    out = {}
    if not wanted:
        return out
    for b in pipeline.make_dataset(data_dir, split, 1000, training=False, scale="uint8"):
        for i, img in zip(b["index"].numpy(), b["image"].numpy()):
            if int(i) in wanted:
                out[int(i)] = img
        if len(out) == len(wanted):
            break
    return out


def save_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
