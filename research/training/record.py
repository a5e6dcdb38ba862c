"""What a run leaves behind: the run record (config, flags, versions, train_summary.json),
TensorBoard summaries, and the exported model."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import tensorflow as tf

from research import machine, plots
from research.data import pipeline
from research.training import metrics as detmetrics
from research.training.config import TrainConfig

SUMMARY = "train_summary.json"


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
                               scale="uint8", augment=cfg.augment)
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
    out = os.path.join(cfg.run_dir, "export")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.keras")
    model.save(path)
    meta = {"objective": cfg.objective, "positive_class": manifest["positive_class"],
            "positive_class_id": manifest["positive_class_id"],
            "class_names": manifest["class_names"], "image_shape": manifest["image_shape"],
            "scale": cfg.scale, "threshold": threshold, "tta": cfg.tta}
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return path
