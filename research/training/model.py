"""The run's network: built from its config (a registered network, a backbone with a new
head, or the features recipe's head), set up from training data where a layer needs it, and
its trainable layers per transfer phase."""

from __future__ import annotations

import keras
import numpy as np
from absl import logging

from research.data import pipeline
from research.detector import scale_images
from research.models import backbones, build_model
from research.models.layers import data_initialised, init_from_data
from research.training import feature_cache
from research.training.config import TrainConfig


def num_outputs(cfg: TrainConfig, manifest: dict) -> int:
    return len(manifest["class_names"]) if cfg.objective == "multiclass" else 1


def make_model(cfg: TrainConfig, manifest: dict, compute_features: bool = True,
               **overrides) -> keras.Model:
    """The run's network (call inside the strategy scope): a registered network, a backbone
    with a new head, or (features recipe) the head alone on the cached features (computed
    first if need be, unless `compute_features` is False: then only their shape is taken
    from the backbone, without running it)."""
    dtype = None if cfg.precision == "float32" else cfg.precision
    options = {**cfg.model_options, **overrides}
    if cfg.transfer == "features":
        shape = (feature_cache.open_cache(cfg).feature_shape if compute_features
                 else feature_cache.feature_shape(cfg, manifest))
        return backbones.head_model(shape,
                                    num_outputs(cfg, manifest), dtype=dtype, **options)
    if cfg.uses_backbone:
        return backbones.build_transfer_model(
            cfg.model, manifest["image_shape"], num_outputs(cfg, manifest), dtype=dtype,
            checkpoint_dir=cfg.checkpoint_dir, **options)
    return build_model(cfg.model, manifest["image_shape"], num_outputs(cfg, manifest),
                       dtype=dtype, **options)


DATA_INIT_IMAGES = 5000  # training images that set a data-initialised layer (fast CNN)


def init_model_from_data(cfg: TrainConfig, model: keras.Model, manifest: dict) -> None:
    """Sets the layers that start from training-data statistics (the fast CNN's patch
    whitening) from the first DATA_INIT_IMAGES training images the run may see (its
    --exclude_classes left out; labels unused). Deterministic, so a resumed run computes the
    same values before the checkpoint restores them."""
    if not data_initialised(model) or cfg.uses_backbone:
        return  # a backbone's whitening comes with its weights, from its source run
    d = pipeline.take_examples(cfg.data_dir, "train", DATA_INIT_IMAGES + 1000 * len(
        cfg.exclude_classes))
    excluded = [manifest["class_names"].index(c) for c in cfg.exclude_classes]
    images = d["image"][~np.isin(d["class_id"], excluded)][:DATA_INIT_IMAGES]
    names = init_from_data(model, scale_images(images, cfg.input_scale).numpy())
    logging.info("Initialised %s from %d training images", ", ".join(names), len(images))


def whiten_bias_steps(cfg: TrainConfig, steps_per_epoch: int) -> int | None:
    """The step from which the fast CNN's whitening bias is frozen (--whiten_bias_epochs;
    airbench unfreezes it for the first 3 epochs), or None."""
    if cfg.whiten_bias_epochs is None:
        return None
    return max(1, int(round(cfg.whiten_bias_epochs * steps_per_epoch)))


def freeze_whitening_bias(model: keras.Model) -> list[str]:
    """Stops training the whitening layers' bias (their filters never train): the layers
    drop out of the trainable variables, so neither gradient, momentum nor weight decay
    moves them any more. Returns their names."""
    frozen = []
    for layer in data_initialised(model):
        if layer.trainable:
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def apply_phase(cfg: TrainConfig, model: keras.Model, phase: int) -> None:
    """Which backbone layers train: none (frozen, features, fine_tune phase 1), those from
    --fine_tune_from / the last --fine_tune_layers (phase 2), or all (transfer none).
    In the transfer recipes BatchNorm layers of the base never train (inference mode)."""
    if not cfg.uses_backbone or cfg.transfer == "features":
        return
    base = backbones.backbone_of(model)
    if cfg.transfer == "frozen" or (cfg.transfer == "fine_tune" and phase == 1):
        backbones.set_trainable_from(base, None)
    elif cfg.transfer == "fine_tune":
        if cfg.fine_tune_layers:
            weighted = [i for i, layer in enumerate(base.layers) if layer.weights]
            start = weighted[-min(cfg.fine_tune_layers, len(weighted))]
        else:
            name = cfg.fine_tune_from or backbones.BACKBONES[cfg.model].blocks[-1]
            start = backbones.block_start(base, name, cfg.model)
        backbones.set_trainable_from(base, start)
    else:  # transfer none: the whole network trains, BatchNorm in training mode too
        base.trainable = True
