"""Chollet's MNIST convnet (Deep Learning with Python, 5.1):

  conv 32 -> pool -> conv 64 -> pool -> conv 64 -> flatten -> dense 64 (ReLU) -> [dropout]
  -> logits

3x3 valid convolutions with ReLU, 2x2 max-pooling. 28x28x1 with 10 classes: his 93,322
parameters. Inputs are float images in [0, 1]; it outputs logits.
"""

from __future__ import annotations

import keras
from keras import layers

from research.model_options import MnistConvnetOptions


def build_mnist_convnet(image_shape=(28, 28, 1), num_outputs: int = 10,
                        dtype: str | None = None, name: str = "mnist_convnet",
                        **options) -> keras.Model:
    opts = MnistConvnetOptions(**options)
    inputs = keras.Input(shape=tuple(image_shape), name="image")
    x = inputs
    for i, filters in enumerate((32, 64, 64)):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{i}", dtype=dtype)(x)
        if i < 2:
            x = layers.MaxPooling2D(2, name=f"pool{i}", dtype=dtype)(x)
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    x = layers.Dense(64, activation="relu", name="dense", dtype=dtype)(x)
    if opts.dropout:
        x = layers.Dropout(opts.dropout, name="dropout", dtype=dtype)(x)
    logits = layers.Dense(num_outputs, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
