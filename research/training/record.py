"""What a run leaves behind: the run record (config, flags, versions, train_summary.json),
TensorBoard summaries, and the exported model."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import tensorflow as tf
from absl import logging

from research import machine, plots
from research.data import pipeline
from research.runs import exported_model_path
from research.training import metrics as detmetrics
from research.training.config import TrainConfig

SUMMARY = "train_summary.json"
HISTORY = "history.jsonl"
CURVES = "curves.png"


def write_run_record(cfg: TrainConfig, flagfile: str | None = None) -> None:
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json())
    with open(os.path.join(cfg.run_dir, "versions.json"), "w") as f:
        json.dump(machine.versions(), f, indent=1)
    if flagfile is not None:
        with open(os.path.join(cfg.run_dir, "flags.txt"), "w") as f:
            f.write(flagfile)


def read_summary(cfg: TrainConfig) -> dict:
    path = os.path.join(cfg.run_dir, SUMMARY)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_summary(cfg: TrainConfig, summary: dict) -> None:
    with open(os.path.join(cfg.run_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=1)


class Writers:
    """The run's TensorBoard writers: logs/<run>/train and logs/<run>/eval."""

    def __init__(self, tb_dir: str):
        os.makedirs(tb_dir, exist_ok=True)
        self.train = tf.summary.create_file_writer(os.path.join(tb_dir, "train"))
        self.eval = tf.summary.create_file_writer(os.path.join(tb_dir, "eval"))

    def flush(self) -> None:
        self.train.flush()
        self.eval.flush()


def image_summary(name: str, fig, step: int) -> None:
    png = plots.figure_to_png(fig)
    tf.summary.image(name, tf.image.decode_png(png)[None], step=step)


def log_train(writer, values: dict, learning_rate: float, steps: int, seconds: float,
              batch_size: int, step: int) -> None:
    with writer.as_default(step=step):
        for k, v in values.items():
            tf.summary.scalar(k, v)
        tf.summary.scalar("learning_rate", learning_rate)
        tf.summary.scalar("steps_per_sec", steps / seconds)
        tf.summary.scalar("images_per_sec", steps * batch_size / seconds)


def log_eval(writer, result, report: dict, step: int, names) -> None:
    with writer.as_default(step=step):
        tf.summary.scalar("loss", result.loss)
        tf.summary.scalar("accuracy", result.accuracy)
        if result.class_accuracy is not None:
            tf.summary.scalar("class_accuracy", result.class_accuracy)
        for k in ("roc_auc", "pr_auc", "precision", "recall", "f1", "threshold"):
            tf.summary.scalar(k, report[k])
        tf.summary.scalar("f1_at_0.5", report["at_0.5"]["f1"])
        image_summary("confusion_matrix", detmetrics.confusion_figure(
            report["confusion_matrix"], names, f"{result.split} at t={report['threshold']:.3f}"),
            step)
        image_summary("roc_pr_curves", detmetrics.curves_figure(
            result.labels, result.scores, f"{result.split}, step {step}"), step)


def log_sample_inputs(cfg: TrainConfig, manifest: dict, writer) -> None:
    ds = pipeline.make_dataset(cfg.data_dir, "train", 16, training=True, seed=cfg.seed,
                               scale="uint8", augment=cfg.augment, affine=cfg.affine)
    batch = next(iter(ds))
    names = manifest["class_names"]
    fig = plots.image_grid(batch["image"].numpy(),
                           [names[c] for c in batch["class_id"].numpy()], ncols=8,
                           title="augmented training inputs")
    with writer.as_default(step=0):
        image_summary("sample_inputs", fig, 0)


def log_hparams(cfg: TrainConfig, writer, summary: dict) -> None:
    from tensorboard.plugins.hparams import api as hp

    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
               for k, v in dataclasses.asdict(cfg).items() if v is not None}
    with writer.as_default(step=summary["final_step"]):
        hp.hparams(hparams, trial_id=cfg.run_name)
        for k, v in summary.get("final_val", {}).items():
            tf.summary.scalar(f"hparams/val_{k}", v)


def export_model(model: keras.Model, cfg: TrainConfig, manifest: dict, threshold: float) -> str:
    """Saves the model as .keras plus the metadata `predict` needs."""
    path = exported_model_path(cfg.checkpoint_dir, cfg.run_name)
    out = os.path.dirname(path)
    os.makedirs(out, exist_ok=True)
    model.save(path)
    meta = {"objective": cfg.objective, "positive_class": manifest["positive_class"],
            "positive_class_id": manifest["positive_class_id"],
            "class_names": manifest["class_names"], "image_shape": manifest["image_shape"],
            "scale": cfg.scale, "threshold": threshold, "tta": cfg.tta,
            "tta_shifts": cfg.tta_shifts}
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return path


def log_model_summary(cfg: TrainConfig, model: keras.Model) -> str:
    """Logs the model summary (layers, output shapes, parameters, trainable parameters) and
    keeps it in the run record as model_summary.txt."""
    lines = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=100,
                  expand_nested=True)
    text = "\n".join(lines)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "model_summary.txt"), "w") as f:
        f.write(text + "\n")
    logging.info("Model %s:\n%s", model.name, text)
    return text


def log_devices(strategy: tf.distribute.Strategy) -> None:
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    logging.info("Devices: %d CPU logical device(s), %d GPU(s)%s; %s with %d replica(s) in "
                 "use", len(tf.config.list_logical_devices("CPU")), len(gpus),
                 f" ({', '.join(names)})" if names else "", type(strategy).__name__,
                 strategy.num_replicas_in_sync)


def read_history(cfg: TrainConfig, up_to_step: int) -> list[dict]:
    """The per-eval rows of earlier sessions, up to the step this session resumes from."""
    path = os.path.join(cfg.run_dir, HISTORY)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["step"] <= up_to_step]


def write_history(cfg: TrainConfig, rows: list[dict], steps_per_epoch: int) -> str:
    """history.jsonl and curves.png beside the checkpoints."""
    with open(os.path.join(cfg.run_dir, HISTORY), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    path = os.path.join(cfg.run_dir, CURVES)
    plots.save_figure(curves_figure(rows, steps_per_epoch, cfg.run_name), path)
    return path


def curves_figure(rows: list[dict], steps_per_epoch: int, title: str):
    """Train and val loss, accuracy, and val ROC-AUC / PR-AUC per epoch, one panel each."""
    from matplotlib.figure import Figure

    epochs = [r["step"] / steps_per_epoch for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    panels = (("loss", [("train_loss", "train"), ("val_loss", "val")]),
              ("accuracy", [("train_accuracy", "train"), ("val_accuracy", "val")]),
              ("val ROC-AUC and PR-AUC", [("val_roc_auc", "ROC-AUC"),
                                          ("val_pr_auc", "PR-AUC")]))
    for ax, (name, series) in zip(axes, panels):
        for key, label in series:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, [float("nan") if v is None else v for v in values], "o-",
                        label=label, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.split(" ")[0] if name != "val ROC-AUC and PR-AUC" else "AUC")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    accuracy = rows[-1].get("accuracy_kind", "accuracy") if rows else "accuracy"
    axes[1].set_title(accuracy)
    fig.suptitle(f"{title}: training curves", fontsize=11)
    fig.tight_layout()
    return fig
