"""Pretrained CNN backbones for transfer learning, and the transfer model built on them.

Builders over keras.applications (plus our own scratch network, so a run of ours can serve
as a backbone); what each backbone is (its constructor, `preprocess_input` mode, input sizes,
blocks, the Keras cache files of its ImageNet weights) is its record in
research.model_options.BACKBONES.

The transfer model takes the TFRecords' raw pixels (float 0..255, scale 'raw'); resizing and
the backbone's own preprocessing live inside it, so evaluate, predict, explain and the
TensorBoard hook see exactly what training saw:

  image -> Resizing(image_size) -> BackbonePreprocess -> base (nested; its BatchNorm layers
  are frozen in the transfer recipes, which keeps them in inference mode) -> GAP | Flatten ->
  Dense(units, relu) + Dropout ... -> Dense(num_outputs) logits (float32)
"""

from __future__ import annotations

import hashlib
import os

import keras
import numpy as np
import tensorflow as tf

from research import files, runs
from research.errors import UserError
from research.model_options import (BACKBONES, OWN_NETWORKS, SAVEDMODEL, Backbone,
                                    TransferOptions, check_transfer_options, image_size_of)
from research.models.fast import build_fast_cnn
from research.models.savedmodel import preprocess_layer, savedmodel_base
from research.models.scratch import build_scratch_cnn


class BackboneError(UserError):
    """A bad backbone setting; the message names the flag."""


def application(b: Backbone):
    """The keras.applications constructor of record `b` (VGG16, ...)."""
    return getattr(keras.applications, b.constructor)


def applications_base(b: Backbone, input_shape, weights) -> keras.Model:
    """The keras.applications base of `b` without its classifier; weights 'imagenet' (Keras'
    download and cache, checked against the md5 the record repeats) or None."""
    return application(b)(include_top=False, weights=weights, input_shape=input_shape)


def preprocess_input(mode: str, x):
    """keras.applications' preprocess_input of imagenet_utils mode `mode` ('none': as is)."""
    if mode == "none":
        return x
    return keras.applications.imagenet_utils.preprocess_input(x, mode=mode)


@keras.saving.register_keras_serializable(package="research")
class BackbonePreprocess(keras.layers.Layer):
    """The backbone's own `preprocess_input` on raw 0..255 pixels (gray is tiled to RGB)."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, x):
        x = tf.cast(x, self.compute_dtype)
        if x.shape[-1] == 1:
            x = tf.tile(x, [1, 1, 1, 3])
        return preprocess_input(BACKBONES[self.backbone].preprocess, x)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


def keras_models_dir() -> str:
    """Where Keras caches downloaded weights (~/.keras/models, or $KERAS_HOME/models)."""
    return os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")


def _imagenet_base(b: Backbone, input_shape) -> keras.Model:
    target = os.path.join(keras_models_dir(), b.weights_file)
    try:
        return applications_base(b, input_shape, "imagenet")
    except Exception as e:
        # get_file downloads beside the target first; never leave a partial file behind.
        for leftover in (target + ".part", target + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise BackboneError(
            f"--weights=imagenet: could not get the ImageNet weights of {b.name} ({e}). "
            f"Without network access, place {b.weights_file}{md5_note(b.weights_md5)} in "
            f"{keras_models_dir()}/ (or pass --weights=<file>, --weights=<run name> or "
            "--weights=none)") from e


def md5_note(md5: str | None) -> str:
    return f" (md5 {md5})" if md5 else ""


OWN_BUILDERS = {"scratch": build_scratch_cnn, "fast": build_fast_cnn}


def _own_base(backbone: str, input_shape, model_options: dict) -> keras.Model:
    """One of our networks up to its last feature map (the model named as the backbone)."""
    full = OWN_BUILDERS[backbone](input_shape, 1, **model_options)
    return keras.Model(full.input, last_spatial_layer(full).output, name=backbone)


def last_spatial_layer(model: keras.Model) -> keras.layers.Layer:
    """The last layer with a 4-D output (the end of a CNN's feature extractor)."""
    spatial = [layer for layer in model.layers[1:] if len(layer.output.shape) == 4]
    return spatial[-1]


def load_run_model(checkpoint_dir: str, run: str) -> tuple[keras.Model, dict]:
    """(exported model, its config.json) of one of our runs."""
    path = runs.exported_model_path(checkpoint_dir, run)
    if not os.path.isfile(path):
        raise BackboneError(f"--weights={run}: {path} not found (the run has not finished, or "
                            f"is not in --checkpoint_dir={checkpoint_dir})")
    config = runs.read_config(runs.run_dir(checkpoint_dir, run), f"--weights={run}")
    return keras.models.load_model(path, compile=False), config


def _own_options_of_run(checkpoint_dir: str, run: str, backbone: str, depth: int = 0) -> dict:
    """The network options (scratch or fast) of a run, following a transfer run to its
    source."""
    folder = runs.run_dir(checkpoint_dir, run)
    if not runs.has_config(folder) or depth > 8:
        raise BackboneError(f"--weights={run}: no run config at "
                            f"{os.path.join(folder, runs.CONFIG)}")
    config = runs.read_config(folder, f"--weights={run}")
    if config.get("model") != backbone:
        raise BackboneError(f"--weights={run}: that run trained --model={config.get('model')}"
                            f", not {backbone}")
    if config.get("transfer", "none") == "none":
        return config.get("model_options", {})
    return _own_options_of_run(checkpoint_dir, config["model_options"]["weights"], backbone,
                               depth + 1)


def _weights_from_run(base: keras.Model, backbone: str, run: str, checkpoint_dir: str) -> None:
    """Copies the source run's backbone weights into `base`, layer by layer by name."""
    source, config = load_run_model(checkpoint_dir, run)
    nested = [layer for layer in source.layers if isinstance(layer, keras.Model)]
    if config.get("model") != backbone:
        raise BackboneError(f"--weights={run}: that run trained --model="
                            f"{config.get('model')}, not {backbone}")
    donor = nested[0] if nested else source
    by_name = {layer.name: layer for layer in donor.layers}
    copied = 0
    for layer in base.layers:
        if layer.weights and layer.name in by_name:
            _copy_weights(by_name[layer.name], layer, run)
            copied += 1
    if not copied:
        raise BackboneError(f"--weights={run}: no layer of its model matches {backbone}")


def _copy_weights(donor: keras.layers.Layer, layer: keras.layers.Layer, run: str) -> None:
    """Each variable of `layer` from the donor's variable of the same name (an export holds
    stock Keras layers, whose variables may come in another order than ours: a Conv2D's
    kernel, bias against PatchWhitening's bias, kernel)."""
    given = {w.name: w for w in donor.weights}
    if sorted(given) != sorted(w.name for w in layer.weights):
        raise BackboneError(f"--weights={run}: layer {layer.name} holds "
                            f"{', '.join(sorted(given))}; the backbone's holds "
                            f"{', '.join(sorted(w.name for w in layer.weights))}")
    for w in layer.weights:
        value = keras.ops.convert_to_numpy(given[w.name])
        if tuple(value.shape) != tuple(w.shape):
            raise BackboneError(f"--weights={run}: {layer.name}/{w.name} has shape "
                                f"{tuple(value.shape)}, the backbone's {tuple(w.shape)}")
        w.assign(value)


def build_base(backbone: str, opts: TransferOptions, input_shape, checkpoint_dir: str = "",
               scratch_options: dict | None = None) -> keras.Model:
    """The backbone without its classifier, with its weights, cut at `opts.cut_at`."""
    if backbone == SAVEDMODEL:  # frozen whole; its weights come with it
        return savedmodel_base(opts, input_shape)
    b = BACKBONES[backbone]
    weights = opts.weights
    if backbone in OWN_NETWORKS:
        if weights not in ("none", "") and not os.path.isfile(weights):
            scratch_options = _own_options_of_run(checkpoint_dir, weights, backbone)
        base = _own_base(backbone, input_shape, dict(scratch_options or {}))
    elif weights == "imagenet":
        base = _imagenet_base(b, input_shape)
    else:
        base = applications_base(b, input_shape, None)
    if weights not in ("imagenet", "none", ""):
        if os.path.isfile(weights):
            if not weights.endswith(".h5"):
                raise BackboneError(f"--weights={weights}: want a .h5 or .weights.h5 file")
            base.load_weights(weights)
        else:
            _weights_from_run(base, backbone, weights, checkpoint_dir)
    base.trainable = True
    if opts.cut_at:
        names = [layer.name for layer in base.layers[1:]]
        if opts.cut_at not in names:
            raise BackboneError(f"--cut_at: no layer {opts.cut_at!r} in {backbone}; its layers "
                                f"are: {', '.join(names)}")
        base = keras.Model(base.input, base.get_layer(opts.cut_at).output, name=base.name)
    return base


def build_transfer_model(backbone: str, image_shape, num_outputs: int,
                         dtype: str | None = None, checkpoint_dir: str = "",
                         scratch_options: dict | None = None, features_only: bool = False,
                         **options) -> keras.Model:
    """The detector: raw pixels in, logits out; the backbone nested under its own name.
    `features_only`: the frozen extractor (image -> feature map) for the features recipe."""
    opts = TransferOptions(**options)
    problem = check_transfer_options(backbone, opts)
    if problem:
        raise BackboneError(f"--{problem[0]}: {problem[1]}")
    size = image_size_of(backbone, opts)
    base_shape = (size, size, 3)
    if backbone in OWN_NETWORKS:
        base_shape = (size, size, image_shape[-1])
    policy = keras.config.dtype_policy()
    if dtype:
        keras.config.set_dtype_policy(dtype)  # keras.applications take the global policy
    try:
        base = build_base(backbone, opts, base_shape, checkpoint_dir, scratch_options)
        inputs = keras.Input(shape=tuple(image_shape), name="image")
        x = inputs
        if tuple(image_shape[:2]) != (size, size):
            x = keras.layers.Resizing(size, size, name="resize", dtype=dtype)(x)
        if backbone == SAVEDMODEL:  # stock layers only (the export's rule); float32 in
            x = preprocess_layer(opts.savedmodel_preprocess, image_shape[-1], "float32")(x)
        elif backbone not in OWN_NETWORKS:
            x = BackbonePreprocess(backbone, name="preprocess", dtype=dtype)(x)
        else:
            x = keras.layers.Rescaling(1 / 255.0, name="preprocess", dtype=dtype)(x)
        features = base(x)
        if features_only:
            return keras.Model(inputs, features, name=f"{backbone}_features")
        head_inputs = features
        logits = build_head(head_inputs, num_outputs, opts, dtype)
        model = keras.Model(inputs, logits, name=f"{backbone}_transfer")
    finally:
        keras.config.set_dtype_policy(policy)
    if opts.head_from:
        head_from_run(model, opts, checkpoint_dir)
    return model


POOLING = {keras.layers.GlobalMaxPooling2D: "max", keras.layers.GlobalAveragePooling2D: "gap"}


def zero_shot_head(source: keras.Model, class_names, classes) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (F, 1), bias (1,)) of the one-logit layer on the source's pooled features whose
    logit is z[CLASS] - z[OTHER] of the source's logits z, i.e. log p(CLASS)/p(OTHER): its
    sigmoid is the zero-shot score p(CLASS) / (p(CLASS) + p(OTHER)). The source's feature
    scale (a Rescaling before its logits) is folded into the kernel."""
    missing = [c for c in classes if c not in class_names]
    if missing:
        raise BackboneError(f"--head_from: {', '.join(missing)} is not a class of the source "
                            f"run (its classes: {', '.join(class_names)})")
    layer = source.get_layer("logits")
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)
    bias = (np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float64)
            if layer.use_bias else np.zeros(kernel.shape[1]))
    scale = 1.0
    for other in source.layers:
        if isinstance(other, keras.layers.Rescaling) and other.name == "feature_scale":
            scale = float(other.scale)
    i, j = (list(class_names).index(c) for c in classes)
    w = (kernel[:, i] - kernel[:, j]) * scale
    return w[:, None].astype(np.float32), np.asarray([bias[i] - bias[j]], np.float32)


def source_pooling(checkpoint_dir: str, run: str) -> str:
    """How the run's network pools its last feature map (gap or max; flatten if neither)."""
    source, _ = load_run_model(checkpoint_dir, run)
    pools = [POOLING[type(layer)] for layer in source.layers if type(layer) in POOLING]
    return pools[0] if pools else "flatten"


def head_from_run(model: keras.Model, opts: TransferOptions, checkpoint_dir: str) -> None:
    """Sets the new head's logits layer to the --weights run's zero-shot score of
    opts.head_from (CLASS, OTHER); the head must pool as the source network does."""
    if os.path.isfile(opts.weights):
        raise BackboneError(f"--head_from: needs --weights=<run name> (its logits and class "
                            f"names), not the file {opts.weights}")
    path = runs.exported_model_path(checkpoint_dir, opts.weights)
    meta = runs.metadata_path(path)
    if os.path.isfile(meta) and files.read_json(meta).get("backbone_only"):
        raise BackboneError(f"--head_from: the run {opts.weights} is a backbone only (its "
                            f"logits were never trained: --objective=simclr); drop --head_from "
                            f"and train a new head")
    source, _ = load_run_model(checkpoint_dir, opts.weights)
    pools = [POOLING[type(layer)] for layer in source.layers if type(layer) in POOLING]
    if pools != [opts.head]:
        pool = pools[0] if pools else "flatten"
        raise BackboneError(f"--head_from: the run {opts.weights} pools with {pool}; give "
                            f"--head={pool} (got --head={opts.head})")
    names = runs.read_metadata(runs.exported_model_path(checkpoint_dir, opts.weights),
                               f"--weights={opts.weights}")["class_names"]
    model.get_layer("logits").set_weights(list(zero_shot_head(source, names, opts.head_from)))


def build_head(x, num_outputs: int, opts: TransferOptions, dtype=None):
    if len(x.shape) == 2:  # a feature vector already (a TF-Hub feature-vector SavedModel)
        pass
    elif opts.head == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="head_pool", dtype=dtype)(x)
    elif opts.head == "max":
        x = keras.layers.GlobalMaxPooling2D(name="head_pool", dtype=dtype)(x)
    else:
        x = keras.layers.Flatten(name="head_flatten", dtype=dtype)(x)
    for i, units in enumerate(opts.head_units):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense{i}", dtype=dtype)(x)
    if opts.dropout:
        x = keras.layers.Dropout(opts.dropout, name="head_dropout", dtype=dtype)(x)
    return keras.layers.Dense(num_outputs, name="logits", dtype="float32")(x)


def head_model(feature_shape, num_outputs: int, dtype: str | None = None,
               **options) -> keras.Model:
    """The head alone, on cached features (the features recipe)."""
    opts = TransferOptions(**options)
    inputs = keras.Input(shape=tuple(feature_shape), name="image")
    return keras.Model(inputs, build_head(inputs, num_outputs, opts, dtype), name="head")


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone of a transfer model."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not nested:
        raise BackboneError(f"model {model.name!r} has no nested backbone")
    return nested[0]


def block_start(base: keras.Model, name: str, backbone: str) -> int:
    """Index in base.layers of the first layer of block or layer `name`."""
    for i, layer in enumerate(base.layers):
        if layer.name == name or layer.name.startswith(name + "_") or (
                layer.name.startswith(name) and name in BACKBONES[backbone].blocks
                and layer.name[len(name):len(name) + 1].isalpha()):
            return i
    blocks = ", ".join(BACKBONES[backbone].blocks)
    raise BackboneError(f"--fine_tune_from: no block or layer {name!r} in {backbone}; its "
                        f"blocks are: {blocks} (or any layer name: "
                        f"{', '.join(layer.name for layer in base.layers[1:])})")


def set_trainable_from(base: keras.Model, start: int | None) -> None:
    """Freezes the whole base (start None), or unfreezes its layers from index `start` on.
    BatchNorm layers stay frozen, which also keeps them in inference mode: their statistics
    and scales never move. start=0 with all=True: everything trains, BatchNorm included."""
    base.trainable = start is not None
    if start is None:
        return
    for i, layer in enumerate(base.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization) or "BatchNorm" in type(
            layer).__name__
        layer.trainable = i >= start and not is_bn


def weights_hash(model: keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(w.path.encode())
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()
