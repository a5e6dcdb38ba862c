"""What a training writes as it goes, beside the run folder's files (research.runs): its
TensorBoard summaries, the training curves, the model summary, and the exported model."""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from matplotlib.figure import Figure
from tensorboard.plugins.hparams import api as hp

from research import devices, export, plots, runs
from research.data import imaging, pipeline
from research.models import receptive_field
from research import metrics as detmetrics
from research.training import inputs
from research.training.config import TrainConfig


class Writers:
    """The run's TensorBoard writers: logs/<run>/train and logs/<run>/eval, and logs/<run>
    itself for the HParams session (its metrics live in the eval and test folders)."""

    def __init__(self, tb_dir: str):
        os.makedirs(tb_dir, exist_ok=True)
        self.train = tf.summary.create_file_writer(os.path.join(tb_dir, "train"))
        self.eval = tf.summary.create_file_writer(os.path.join(tb_dir, "eval"))
        self.session = tf.summary.create_file_writer(tb_dir)

    def flush(self) -> None:
        for w in (self.train, self.eval, self.session):
            w.flush()


def image_summary(name: str, fig, step: int) -> None:
    png = plots.figure_to_png(fig)
    tf.summary.image(name, tf.image.decode_png(png)[None], step=step)


def log_train(writer, values: dict, learning_rate: float, steps: int, seconds: float,
              batch_size: int, step: int) -> None:
    with writer.as_default(step=step):
        for k, v in values.items():  # the detector's accuracy is at 0.5: its tag says so
            tf.summary.scalar("accuracy_at_0.5" if k == "accuracy" else k, v)
        tf.summary.scalar("learning_rate", learning_rate)
        tf.summary.scalar("steps_per_sec", steps / seconds)
        tf.summary.scalar("images_per_sec", steps * batch_size / seconds)


def log_eval(writer, result, report: dict, step: int, names, run_name: str = "") -> None:
    """The val numbers and the confusion matrix titled with `run_name`: a detector's
    (`report` from metrics.detection_report: its 2 x 2 matrix at the val threshold and the
    ROC/PR curves too) or a classifier's (metrics.classification_report: N-class and top-5
    accuracy, the N x N matrix over `names`; no detection metric)."""
    run = f"{run_name} / " if run_name else ""
    with writer.as_default(step=step):
        tf.summary.scalar("loss", result.loss)
        if result.accuracy is not None:
            tf.summary.scalar("accuracy_at_0.5", result.accuracy)  # the detector's, at 0.5
        for k in ("class_accuracy", "top5_class_accuracy"):
            if getattr(result, k, None) is not None:
                tf.summary.scalar(k, getattr(result, k))
        if "roc_auc" not in report:  # a classifier
            image_summary("confusion_matrix", detmetrics.confusion_figure(
                report["class_confusion_matrix"], names, f"{run}{result.split}"), step)
            return
        for k in ("roc_auc", "pr_auc", "precision", "recall", "f1", "threshold"):
            tf.summary.scalar(k, report[k])
        tf.summary.scalar("f1_at_0.5", report["at_0.5"]["f1"])
        image_summary("confusion_matrix", detmetrics.confusion_figure(
            report["confusion_matrix"], names,
            f"{run}{result.split}\nat t={report['threshold']:.3f}"), step)
        image_summary("roc_pr_curves", detmetrics.roc_pr_figure(
            result.labels, result.scores, f"{run}{result.split}, step {step}"), step)


def log_sample_inputs(cfg: TrainConfig, manifest: dict, writer) -> None:
    ds = pipeline.make_dataset(cfg.data_dir, "train", 16, training=True,
                               stream=dataclasses.replace(inputs.train_stream(cfg),
                                                          scale="uint8", global_batch_size=16))
    batch = next(iter(ds))
    names = manifest["class_names"]
    fig = plots.image_grid(batch["image"].numpy(),
                           [names[c] for c in batch["class_id"].numpy()], ncols=8,
                           title=f"{cfg.run_name}: augmented training inputs")
    with writer.as_default(step=0):
        image_summary("sample_inputs", fig, 0)


# TensorBoard's HParams view: the settings that tell runs apart, and the numbers to compare
# them by (val from training, test from `evaluate`; under hparams/ so no other chart has
# them twice).
HPARAMS = ("model", "optimizer", "learning_rate", "batch_size", "epochs", "precision",
           "transfer", "weights")
HPARAM_METRICS = tuple((f"hparams/{split}_{m}", group, f"{split} {name}")
                       for split, group in (("val", "eval"), ("test", "test"))
                       for m, name in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"),
                                       ("f1", "F1"), ("class_accuracy", "N-class accuracy")))
# A classifier (no positive class) has no detection metric: its HParams rows compare the
# N-class accuracy only.
CLASSIFIER_HPARAM_METRICS = tuple(m for m in HPARAM_METRICS if m[0].endswith("class_accuracy"))


def hparam_values(cfg: TrainConfig, plan_epochs: float) -> dict:
    """The run's values of HPARAMS, as readable scalars and strings."""
    weights = cfg.model_options.get("weights") if cfg.uses_backbone else None
    return {"model": cfg.model, "optimizer": cfg.optimizer,
            "learning_rate": float(cfg.head_lr or cfg.learning_rate),
            "batch_size": int(cfg.batch_size), "epochs": round(float(plan_epochs), 2),
            "precision": cfg.precision, "transfer": cfg.transfer,
            "weights": "" if weights is None else str(weights)}


def log_hparams_config(cfg: TrainConfig, writers: "Writers", plan_epochs: float,
                       classifier: bool = False, extra: dict | None = None) -> None:
    """The HParams experiment (what the view lists) and this run's session, at its start;
    `extra`: more hyperparameters of the run (a sweep trial's drawn values)."""
    metrics = CLASSIFIER_HPARAM_METRICS if classifier else HPARAM_METRICS
    values = hparam_values(cfg, plan_epochs)
    for k, v in (extra or {}).items():
        values[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    with writers.session.as_default():
        hp.hparams_config(hparams=[hp.HParam(k) for k in values],
                          metrics=[hp.Metric(tag, group=group, display_name=name)
                                   for tag, group, name in metrics])
        hp.hparams({hp.HParam(k): v for k, v in values.items()}, trial_id=cfg.run_name)


def log_hparam_metrics(writer, split: str, report: dict, step: int) -> None:
    """The HParams view's numbers of one split (val: at the end of training; test: by
    `evaluate`)."""
    with writer.as_default(step=step):
        for key in ("roc_auc", "pr_auc", "f1", "class_accuracy"):
            v = report.get(key)
            if v is not None and np.isfinite(v):
                tf.summary.scalar(f"hparams/{split}_{key}", v)


def export_model(model: keras.Model, cfg: TrainConfig, manifest: dict,
                 val: dict) -> str:
    """Saves the detector as model.keras (Keras' own layers, float32: loads without this
    package), the metadata `predict` needs, and the SavedModel (research.export). `val` is
    the final val report: its threshold and the policy that chose it go into the metadata.
    Returns model.keras' path. A classifier (no threshold in `val`) is recorded as one:
    `classifier` true, no threshold; `positive_class` stays the data's (what the export is
    checked against)."""
    threshold = val.get("threshold")
    policy = {k: val[k] for k in ("threshold_metric", "threshold_reason", "temperature")
              if k in val}
    path = runs.exported_model_path(cfg.checkpoint_dir, cfg.run_name)
    export.export_detector(model, {
        "classifier": cfg.positive_class(manifest) is None,
        "objective": cfg.objective, "positive_class": manifest["positive_class"],
        "positive_class_id": manifest["positive_class_id"],
        "class_names": manifest["class_names"], "image_shape": manifest["image_shape"],
        "scale": cfg.scale, "threshold": threshold, "tta": cfg.tta,
        "tta_shifts": cfg.tta_shifts, "resize_policy": imaging.recorded_policy(manifest),
        **policy},
        path)
    return path


def log_model_summary(cfg: TrainConfig, model: keras.Model) -> str:
    """Keeps the model summary (layers, output shapes, parameters, trainable parameters) in
    the run record as model_summary.txt, with each layer's output size, receptive field,
    jump and multiply-adds under it (research.models.receptive_field); the log says where
    (the tables themselves with -v 1)."""
    lines = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=100,
                  expand_nested=True)
    lines += ["", receptive_field.format_geometry(receptive_field.layer_geometry(model))]
    text = "\n".join(lines)
    runs.write_model_summary(cfg.run_dir, text)
    logging.info("Model %s: %s parameters (%s trainable); layers in %s", model.name,
                 f"{model.count_params():,}",
                 f"{sum(int(np.prod(v.shape)) for v in model.trainable_weights):,}",
                 os.path.join(cfg.run_dir, runs.MODEL_SUMMARY))
    logging.vlog(1, "Model %s:\n%s", model.name, text)
    return text


def log_devices(strategy: tf.distribute.Strategy, precision: str) -> None:
    found = devices.current()
    logging.info("Devices: %d CPU logical device(s), %d GPU(s)%s; %s with %d replica(s) in "
                 "use; precision %s (%s)", len(tf.config.list_logical_devices("CPU")),
                 len(found.gpus), f" ({', '.join(found.gpus)})" if found.gpus else "",
                 type(strategy).__name__, strategy.num_replicas_in_sync, precision,
                 devices.precision_note(found))


def write_history(cfg: TrainConfig, rows: list[dict], steps_per_epoch: int) -> str:
    """history.jsonl and curves.png beside the checkpoints."""
    runs.write_history(cfg.run_dir, rows)
    path = os.path.join(cfg.run_dir, runs.CURVES)
    plots.save_figure(training_curves_figure(rows, steps_per_epoch, cfg.run_name), path)
    return path


def training_curves_figure(rows: list[dict], steps_per_epoch: int, title: str):
    """Train and val loss, accuracy, and val ROC-AUC / PR-AUC per epoch, one panel each (a
    classifier's third panel: its val top-5 accuracy)."""
    epochs = [r["step"] / steps_per_epoch for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    detector = any(r.get("val_roc_auc") is not None for r in rows)
    panels = (("loss", [("train_loss", "train"), ("val_loss", "val")]),
              ("accuracy", [("train_accuracy", "train"), ("val_accuracy", "val")]),
              ("val ROC-AUC and PR-AUC", [("val_roc_auc", "ROC-AUC"), ("val_pr_auc", "PR-AUC")])
              if detector else ("val top-5 accuracy", [("val_top5_accuracy", "top-5")]))
    for ax, (name, series) in zip(axes, panels):
        for key, label in series:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, [float("nan") if v is None else v for v in values], "o-",
                        label=label, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel({"val ROC-AUC and PR-AUC": "AUC",
                       "val top-5 accuracy": "accuracy"}.get(name, name))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    accuracy = rows[-1].get("accuracy_kind", "accuracy") if rows else "accuracy"
    axes[1].set_title(accuracy)
    fig.suptitle(f"{title}: training curves", fontsize=11)
    fig.tight_layout()
    return fig
