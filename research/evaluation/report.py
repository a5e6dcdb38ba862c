"""What an evaluation shows: the printed report, and its figures (ROC and PR curves, the
confusion matrix, grids of the worst false positives and false negatives)."""

from __future__ import annotations

import os

import numpy as np

from research import plots, thresholds
from research.data import pipeline
from research import metrics as detmetrics
from research.training.config import TrainConfig


PER_CLASS_LINES = 10  # beyond this many classes, the lowest and highest five are listed


def format_classifier_report(r: dict, subset: str = "") -> str:
    """A classifier's lines: top-1 and top-5 accuracy, then per-class accuracy."""
    rows = [f"{r['run_name']} on {r['split']}: {r['num_examples']:,} images{subset}, "
            f"{r['num_classes']}-class classifier  (checkpoint "
            f"{os.path.basename(r['checkpoint'])})",
            f"  {r['num_classes']}-class accuracy {r['class_accuracy']:.4f}   top-5 accuracy "
            f"{r['top5_class_accuracy']:.4f}"]
    per = list(r["per_class_accuracy"].items())  # class order
    if len(per) > PER_CLASS_LINES:
        per = sorted(per, key=lambda kv: (kv[1], kv[0]))
        half = PER_CLASS_LINES // 2
        rows.append(f"  per class ({len(per)} present; lowest and highest {half}):")
        per = per[:half] + [("...", None)] + per[-half:]
    else:
        rows.append(f"  per class ({len(per)} present):")
    rows += ["    ..." if acc is None else f"    {name:<20} {acc:.4f}" for name, acc in per]
    return "\n".join(rows)


def format_report(r: dict) -> str:
    subset = (f" (a subset of the {r['split_size']:,}: --eval_fraction={r['eval_fraction']})"
              if r.get("eval_fraction") else "")
    if r.get("classifier"):
        return format_classifier_report(r, subset)
    rows = [f"{r['run_name']} on {r['split']}: {r['num_examples']:,} images{subset}, "
            f"{r['num_positive']:,} positive  (checkpoint {os.path.basename(r['checkpoint'])})",
            f"  ROC-AUC   {r['roc_auc']:.4f}     PR-AUC  {r['pr_auc']:.4f}",
            f"  threshold {r['threshold']:.4f} (chosen on val by "
            f"{r.get('threshold_metric', 'f1')})   precision {r['precision']:.4f}"
            f"   recall {r['recall']:.4f}   F1 {r['f1']:.4f}   accuracy {r['accuracy']:.4f}",
            f"  at 0.5:   precision {r['at_0.5']['precision']:.4f}   recall "
            f"{r['at_0.5']['recall']:.4f}   F1 {r['at_0.5']['f1']:.4f}   accuracy "
            f"{r['at_0.5']['accuracy']:.4f}"]
    rows.append(f"  test-time views: {views_text(r)}")
    if "threshold_reason" in r:
        rows.append(f"  threshold policy: {r['threshold_reason']}; 95% bootstrap interval "
                    f"{thresholds.interval_text(r.get('threshold_interval'))}")
    calibration = r.get("calibration", {})
    if calibration:
        rows.append("  expected calibration error "
                    f"{calibration['raw']['ece']:.4f} ({calibration['raw']['bins']} bins)" + (
                        f", {calibration['calibrated']['ece']:.4f} at temperature "
                        f"{r['temperature']:.3f} (fitted on val)" if "calibrated" in
                        calibration else ""))
    (tn, fp), (fn, tp) = r["confusion_matrix"]
    rows.append(f"  confusion: TN {tn:,}  FP {fp:,}  FN {fn:,}  TP {tp:,}")
    if "class_accuracy" in r:
        top5 = r.get("top5_class_accuracy")
        rows.append(f"  {r.get('num_classes', '?')}-class accuracy {r['class_accuracy']:.4f}"
                    + ("" if top5 is None else f"   top-5 accuracy {top5:.4f}"))
    return "\n".join(rows)


def views_text(r: dict) -> str:
    """The report's test-time views in words: its tta_mode and what that means."""
    parts = []
    windows = r.get("tta_windows", 1)
    if windows > 1:
        check = r.get("native_windows", {}).get("centre_check", {}).get(r["split"], {})
        parts.append(f"{windows} square windows along each photo's long side, from "
                     f"{r['native_windows']['photo_source']}" + (
                         f" (centre crop identical to the record for {check['identical']:,} "
                         f"of {check['photos']:,} photos)" if check else ""))
    else:
        parts.append("the stored centre crop")
    if r.get("tta"):
        parts.append("with its mirror" + (" and one-pixel shifts" if r.get("tta_shifts")
                                          else ""))
    mode = r.get("tta_mode") or ("flip" if r.get("tta") else "none")
    return f"{mode} ({', '.join(parts)})"


def eval_figures(cfg: TrainConfig, report: dict, raw: dict, worst: int = 16) -> dict:
    """{file name: figure}: ROC/PR curves, the confusion matrix, and grids of the worst false
    positives/negatives, every one titled with the run's name and the split (a classifier:
    its N x N confusion matrix alone)."""
    split, run = report["split"], cfg.run_name
    manifest = pipeline.load_manifest(cfg.data_dir)
    names = manifest["class_names"]
    if report.get("classifier"):
        return {f"{split}_confusion.png": detmetrics.confusion_figure(
            report["class_confusion_matrix"], names, f"{run} / {split}\n"
            f"{len(names)}-class accuracy {report['class_accuracy']:.4f}")}
    figs = {f"{split}_roc_pr.png": detmetrics.roc_pr_figure(raw["labels"], raw["scores"],
                                                            f"{run} / {split}"),
            f"{split}_confusion.png": detmetrics.confusion_figure(
                report["confusion_matrix"], ["other", manifest["positive_class"]],
                f"{run} / {split}\nat threshold {report['threshold']:.3f}")}
    if report.get("calibration"):
        figs[thresholds.RELIABILITY_FIGURE.format(split=split)] = thresholds.reliability_figure(
            report["calibration"], f"{run} / {split}: reliability")
    labels, scores = raw["labels"].astype(bool), raw["scores"]
    fp_idx = np.flatnonzero(~labels & (scores >= report["threshold"]))
    fn_idx = np.flatnonzero(labels & (scores < report["threshold"]))
    fp_idx = fp_idx[np.argsort(-scores[fp_idx])][:worst]
    fn_idx = fn_idx[np.argsort(scores[fn_idx])][:worst]
    # rows of the scored arrays -> positions in the split (they differ when the run reads a
    # subset: --eval_fraction, --exclude_classes)
    position = np.asarray(raw["index"])
    found = pipeline.take_examples(cfg.data_dir, split,
                                   indices=position[np.r_[fp_idx, fn_idx].astype(int)])
    images = dict(zip(found["index"].tolist(), found["image"]))
    for kind, idx in (("false_positives", fp_idx), ("false_negatives", fn_idx)):
        if len(idx) == 0:
            continue
        titles = [f"{names[raw['class_ids'][i]]} p={scores[i]:.2f}" for i in idx]
        figs[f"{split}_worst_{kind}.png"] = plots.image_grid(
            [images[position[i]] for i in idx], titles, ncols=8,
            title=f"{run}: worst {kind.replace('_', ' ')} on {split} "
                  f"(threshold {report['threshold']:.3f})")
    return figs


def write_figures(cfg: TrainConfig, report: dict, raw: dict, out_dir: str,
                  worst: int = 16) -> list[str]:
    """Writes eval_figures into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [plots.save_figure(fig, os.path.join(out_dir, name))
            for name, fig in eval_figures(cfg, report, raw, worst).items()]
