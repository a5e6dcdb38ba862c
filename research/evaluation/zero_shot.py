"""Zero-shot scoring: a classifier trained on one dataset scores a two-class dataset whose
classes it knows by other names, e.g. our CIFAR-10 detector (cat, dog, ... at 32 px) on the
dogs-vs-cats photos (cats, dogs at 64 px), with no training:

    score = p(CLASS) / (p(CLASS) + p(OTHER))   (= sigmoid(z[CLASS] - z[OTHER]) of its logits)

where the class map names CLASS (what the data's positive class is called in the run) and
OTHER (the data's other class). The model is the transfer model `--head_from` builds: the
run's network resized to its own input size, its logits folded into one (so the same model,
fine-tuned, is the photo recipe's starting point); val chooses the threshold, as everywhere.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from research import runs
from research.data import pipeline
from research.errors import UserError
from research.evaluation.run import native_source, score_model
from research.model_options import OWN_NETWORKS
from research.models import backbones
from research.training.config import TrainConfig, load_run_config
from research.training.model import make_model


class ClassMapError(UserError):
    """A class map that does not name the data's two classes; the message names the flag."""


def parse_class_map(text: str | list) -> dict[str, str]:
    """'cats:cat,dogs:dog' (or its list) -> {data class: run class}."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = {}
    for item in items:
        data_class, colon, run_class = item.partition(":")
        if not colon or not data_class or not run_class:
            raise ClassMapError(f"--class_map: {item!r} is not DATA_CLASS:RUN_CLASS")
        out[data_class] = run_class
    return out


def zero_shot_config(checkpoint_dir: str, run_name: str, data_dir: str,
                     class_map: dict[str, str], **overrides) -> TrainConfig:
    """The scoring config: the run's network as a backbone of `data_dir`'s images, with the
    one-logit head of its CLASS vs OTHER; `overrides`: tta, tta_shifts, eval_batch_size."""
    source = load_run_config(checkpoint_dir, run_name)
    manifest = pipeline.load_manifest(data_dir)
    names = manifest["class_names"]
    if len(names) != 2 or manifest.get("positive_class") is None:
        raise ClassMapError(f"--data_dir={data_dir}: zero-shot scoring needs two classes and a "
                            f"positive one; it has {', '.join(names)} (positive: "
                            f"{manifest.get('positive_class')})")
    unmapped = [c for c in names if c not in class_map]
    extra = [c for c in class_map if c not in names]
    if unmapped or extra:
        raise ClassMapError(f"--class_map: map each class of {data_dir} ({', '.join(names)}) "
                            "to a class of the run" + (f"; unmapped: {', '.join(unmapped)}"
                                                       if unmapped else "")
                            + (f"; not in the data: {', '.join(extra)}" if extra else ""))
    if source.model not in OWN_NETWORKS or source.transfer != "none":
        raise ClassMapError(f"--run_name={run_name}: zero-shot scoring takes a run of "
                            f"--model={' or '.join(OWN_NETWORKS)} (no transfer); it trained "
                            f"--model={source.model} --transfer={source.transfer}")
    positive = manifest["positive_class"]
    other = next(c for c in names if c != positive)
    src_manifest = runs.read_metadata(runs.exported_model_path(checkpoint_dir, run_name),
                                      f"--run_name={run_name}")
    options = {"weights": run_name, "head_units": (),
               "head": backbones.source_pooling(checkpoint_dir, run_name),
               "head_from": (class_map[positive], class_map[other]),
               "image_size": src_manifest["image_shape"][0]}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    keep = {k: getattr(source, k) for k in ("tta", "tta_shifts", "eval_batch_size",
                                            "precision")}
    cfg = TrainConfig(**{**keep, **overrides}, data_dir=data_dir,
                      run_name=f"{run_name}_zero_shot", checkpoint_dir=checkpoint_dir,
                      model=source.model, transfer="frozen", objective="binary",
                      model_options=options, progress=False, gradcam_images=0)
    return dataclasses.replace(cfg, scale=cfg.input_scale)  # raw pixels: the model rescales


def report_path(checkpoint_dir: str, run_name: str, data_dir: str, split: str,
                views: str = "") -> str:
    """<run>/zero_shot_<data folder name>_<split>.json: beside the run's own reports;
    `views` (native-aspect windows' tta_mode) adds _<views>."""
    name = os.path.basename(os.path.normpath(data_dir))
    return os.path.join(runs.run_dir(checkpoint_dir, run_name),
                        f"zero_shot_{name}_{split}{'_' + views if views else ''}.json")


def score_zero_shot(cfg: TrainConfig, split: str, progress: bool = True,
                    native=None) -> tuple[dict, dict]:
    """(report, raw arrays) of the zero-shot model on val (the threshold) and `split`;
    `native`: windows of the original photos (research.evaluation.native)."""
    manifest = pipeline.load_manifest(cfg.data_dir)
    for name in {"val", split}:
        pipeline.shard_paths(cfg.data_dir, manifest, name)
    source = native_source(cfg, manifest, native)
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model: keras.Model = make_model(cfg, manifest)
    opts = cfg.model_options
    return score_model(cfg, model, manifest, strategy, split, progress, {
        "zero_shot": {"run": opts["weights"], "score": f"p({opts['head_from'][0]}) / "
                      f"(p({opts['head_from'][0]}) + p({opts['head_from'][1]}))",
                      "image_size": opts["image_size"]},
        "checkpoint": runs.exported_model_path(cfg.checkpoint_dir, opts["weights"]),
        "step": None}, native, source)
