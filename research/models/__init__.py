"""Model registry: name -> builder(image_shape, num_outputs, dtype, **options). Each model's
options dataclass (the one home of its defaults; the train app's flags) and the check of its
options are in research.model_options, which needs no Keras.

`import research.models` also registers our custom layers with Keras, so a model.keras
holding them (an export written before research.export made exports Keras-only) loads with
`keras.models.load_model` after that one import.
"""

from __future__ import annotations

import functools
from typing import Callable

import keras

from research.models import layers  # noqa: F401  (registers the custom layers)
from research.models.backbones import build_transfer_model
from research.models.dense import build_dense
from research.models.fast import build_fast_cnn
from research.models.mnist_convnet import build_mnist_convnet
from research.model_options import BACKBONES, MODEL_NAMES, OWN_NETWORKS
from research.models.scratch import build_scratch_cnn
from research.models.small_convnet import build_small_convnet

MODELS: dict[str, Callable[..., keras.Model]] = {
    "scratch": build_scratch_cnn,
    "fast": build_fast_cnn,
    "small_convnet": build_small_convnet,
    "dense": build_dense,
    "mnist_convnet": build_mnist_convnet,
    **{name: functools.partial(build_transfer_model, name) for name in BACKBONES
       if name not in OWN_NETWORKS},
}
assert tuple(sorted(MODELS)) == MODEL_NAMES, "every model needs its options (options.py)"


def build_model(name: str, image_shape, num_outputs: int, dtype: str | None = None,
                **options) -> keras.Model:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](image_shape=tuple(image_shape), num_outputs=num_outputs, dtype=dtype,
                        **options)
