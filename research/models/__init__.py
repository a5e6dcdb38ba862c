"""Model registry: name -> builder(image_shape, num_outputs, dtype, **options), and each
model's options dataclass (the one home of its defaults; the train app's flags).

`import research.models` also registers our custom layers with Keras, so an exported
`model.keras` loads with `keras.models.load_model` after that one import.
"""

from __future__ import annotations

import functools
from typing import Callable

import keras

from research.models import layers  # noqa: F401  (registers the custom layers)
from research.models.backbones import (BACKBONES, TransferOptions, build_transfer_model,
                                       check_options)
from research.models.fast import FastOptions, build_fast_cnn
from research.models.scratch import ScratchOptions, build_scratch_cnn
from research.models.small_convnet import SmallConvnetOptions, build_small_convnet

MODELS: dict[str, Callable[..., keras.Model]] = {
    "scratch": build_scratch_cnn,
    "fast": build_fast_cnn,
    "small_convnet": build_small_convnet,
    **{name: functools.partial(build_transfer_model, name) for name in BACKBONES
       if name != "scratch"},
}
MODEL_OPTIONS: dict[str, type] = {
    "scratch": ScratchOptions,
    "fast": FastOptions,
    "small_convnet": SmallConvnetOptions,
    **{name: TransferOptions for name in BACKBONES if name != "scratch"},
}


def options_class(name: str, transfer: bool = False) -> type | None:
    """The options dataclass of model `name`; TransferOptions for any backbone in a transfer
    recipe (the scratch network too)."""
    return TransferOptions if transfer and name in BACKBONES else MODEL_OPTIONS.get(name)


def model_options_error(name: str, options: dict, transfer: bool = False,
                        image_shape=None) -> tuple[str, str] | None:
    """(flag, message) if `options` do not fit model `name`, else None."""
    cls = options_class(name, transfer)
    if cls is None:
        return None
    try:
        opts = cls(**options)
    except TypeError as e:
        return "model", f"bad options for {name!r}: {e}"
    if cls is TransferOptions:
        return check_options(name, opts, image_shape)
    return opts.validate()


def build_model(name: str, image_shape, num_outputs: int, dtype: str | None = None,
                **options) -> keras.Model:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](image_shape=tuple(image_shape), num_outputs=num_outputs, dtype=dtype,
                        **options)
