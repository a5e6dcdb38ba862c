"""Model registry: name -> builder(image_shape, num_outputs, dtype, **options)."""

from __future__ import annotations

from typing import Callable

import keras

from research.models.scratch import build_scratch_cnn

MODELS: dict[str, Callable[..., keras.Model]] = {
    "scratch": build_scratch_cnn,
}


def build_model(name: str, image_shape, num_outputs: int, dtype: str | None = None,
                **options) -> keras.Model:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](image_shape=tuple(image_shape), num_outputs=num_outputs, dtype=dtype,
                        **options)
