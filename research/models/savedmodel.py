"""A SavedModel / TF-Hub folder as a Keras backbone: keras.layers.TFSMLayer runs it whole
(Keras 3 loads no TF1 Hub module and no `hub.KerasLayer`; any TF2 SavedModel works), frozen.

  raw pixels -> [Resizing] -> preprocess (a frozen 1x1 conv: none | unit | tf | caffe, gray tiled
  to RGB) -> TFSMLayer -> its one output (or --savedmodel_output of several)

The preprocessing is a stock Conv2D, so an export of a model built on it holds Keras' own
layers only (research.export); the TFSMLayer itself is saved in model.keras by its folder's
path, so that folder must stay where it is for model.keras to load (the SavedModel export,
saved_model/, holds its variables and needs nothing else).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from research.errors import UserError
from research.model_options import SavedModelOptions

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # imagenet_utils' RGB


class SavedModelError(UserError):
    """A SavedModel that cannot serve as asked; the message names the flag or folder."""


def affine_for_mode(mode: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (1, 1, channels, 3), bias (3,)) of the 1x1 convolution doing keras.applications'
    preprocess_input `mode` ('caffe', 'tf', 'torch', 'none'; 'unit': x / 255) on raw pixels."""
    spread = np.ones((channels, 3)) if channels == 1 else np.eye(3)  # gray -> RGB
    if mode == "caffe":
        kernel, bias = spread[:, ::-1], -np.asarray(CAFFE_MEAN_BGR)
    elif mode == "tf":
        kernel, bias = spread / 127.5, -np.ones(3)
    elif mode == "torch":
        std = np.asarray(TORCH_STD)
        kernel, bias = spread / (255.0 * std), -np.asarray(TORCH_MEAN) / std
    elif mode == "unit":
        kernel, bias = spread / 255.0, np.zeros(3)
    elif mode in ("none", ""):
        kernel, bias = spread, np.zeros(3)
    else:
        raise ValueError(f"no affine map for preprocess mode {mode!r}")
    return kernel[None, None].astype(np.float32), bias.astype(np.float32)


def preprocess_layer(mode: str, channels: int, dtype=None, name: str = "preprocess"
                     ) -> keras.layers.Layer:
    """A frozen 1x1 Conv2D computing `mode` (built, weights set)."""
    kernel, bias = affine_for_mode(mode, channels)
    layer = keras.layers.Conv2D(3, 1, name=name, dtype=dtype, trainable=False)
    layer.build((None, None, None, channels))
    layer.set_weights([kernel, bias])
    return layer


@keras.saving.register_keras_serializable(package="research")
class SavedModelLayer(keras.layers.TFSMLayer):
    """keras.layers.TFSMLayer that a model.keras of ours reloads from its folder's path.
    Keras refuses to deserialise a TFSMLayer unless safe_mode is off for the whole file; this
    one (registered, so only where `research` is imported) reloads just the SavedModel folder
    the archive names, which must still be there."""

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _endpoint_layer(opts: SavedModelOptions, name: str) -> keras.layers.TFSMLayer:
    path = opts.savedmodel_dir
    if not os.path.isfile(os.path.join(path or "", "saved_model.pb")):
        raise SavedModelError(f"--savedmodel_dir: {path}: no saved_model.pb in that folder")
    try:
        # float32 whatever the run's policy: a SavedModel's graph takes the dtypes it was
        # saved with (mixed_bfloat16 would hand it bfloat16).
        return SavedModelLayer(os.path.abspath(path), call_endpoint=opts.savedmodel_endpoint,
                               trainable=False, name=name, dtype="float32")
    except ValueError as e:  # an endpoint it does not have: Keras lists those it has
        raise SavedModelError(f"--savedmodel_endpoint={opts.savedmodel_endpoint}: "
                              f"{str(e).splitlines()[0]}") from e


def input_spec(opts: SavedModelOptions) -> tf.TensorSpec | None:
    """The endpoint's (first) input spec, if the SavedModel declares one."""
    loaded = tf.saved_model.load(opts.savedmodel_dir)
    fn = (loaded.signatures.get(opts.savedmodel_endpoint)
          if opts.savedmodel_endpoint in loaded.signatures
          else getattr(loaded, opts.savedmodel_endpoint, None))
    if fn is None:
        return None
    try:
        args, kwargs = fn.structured_input_signature
    except AttributeError:  # a tf.function with several concrete functions
        concrete = fn.concrete_functions[0] if getattr(fn, "concrete_functions", None) else None
        if concrete is None:
            return None
        args, kwargs = concrete.structured_input_signature
    specs = [s for s in tf.nest.flatten((args, kwargs)) if isinstance(s, tf.TensorSpec)]
    return specs[0] if specs else None


def pick_output(out, opts: SavedModelOptions):
    """The endpoint's output tensor: itself, the only value of a dict, or
    --savedmodel_output."""
    if not isinstance(out, dict):
        return out
    if opts.savedmodel_output is not None:
        if opts.savedmodel_output not in out:
            raise SavedModelError(f"--savedmodel_output={opts.savedmodel_output}: the "
                                  f"endpoint returns {', '.join(sorted(out))}")
        return out[opts.savedmodel_output]
    if len(out) != 1:
        raise SavedModelError(f"--savedmodel_output: the endpoint returns {', '.join(sorted(out))}"
                              "; name one")
    return next(iter(out.values()))


def savedmodel_base(opts: SavedModelOptions, input_shape, name: str = "savedmodel"
                    ) -> keras.Model:
    """The SavedModel as a nested functional model: preprocessed RGB in, its output out."""
    inputs = keras.Input(shape=tuple(input_shape), name=f"{name}_input")
    layer = _endpoint_layer(opts, f"{name}_tfsm")
    try:
        out = layer(inputs)
    except (TypeError, ValueError) as e:
        raise SavedModelError(f"--savedmodel_dir={opts.savedmodel_dir}: its "
                              f"{opts.savedmodel_endpoint} endpoint does not take "
                              f"{tuple(input_shape)} float32 images ({str(e).splitlines()[0]})"
                              ) from e
    return keras.Model(inputs, pick_output(out, opts), name=name)


def savedmodel_model(opts: SavedModelOptions, image_size: int | None = None,
                     channels: int = 3) -> keras.Model:
    """The SavedModel alone on raw 0..255 pixels (explain, predict): preprocess, then it.
    The input size is its signature's when fixed, else `image_size` (default 224)."""
    spec = input_spec(opts)
    h = w = image_size or 224
    if spec is not None and spec.shape.rank == 4 and None not in spec.shape[1:3]:
        h, w = int(spec.shape[1]), int(spec.shape[2])
    inputs = keras.Input(shape=(h, w, channels), name="image")
    x = preprocess_layer(opts.savedmodel_preprocess, channels)(inputs)
    out = savedmodel_base(opts, (h, w, 3))(x)
    return keras.Model(inputs, out, name="savedmodel")
