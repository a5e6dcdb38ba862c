"""The densely connected baseline of Chollet's part 1 (Deep Learning with Python, 2.1):

  flatten -> dense 512 (ReLU) -> [dropout] -> logits

the network his chapter 5 opens by beating with a small convnet (about 97.8% vs 99.1-99.3%
test accuracy on MNIST). Inputs are float images in [0, 1] (his x / 255); it outputs logits
(his final softmax is applied only where probabilities are wanted). 28x28x1 with 10 classes:
his 407,050 parameters.
"""

from __future__ import annotations

import keras
from keras import layers

from research.model_options import DenseOptions


def build_dense(image_shape=(28, 28, 1), num_outputs: int = 10, dtype: str | None = None,
                name: str = "dense", **options) -> keras.Model:
    opts = DenseOptions(**options)
    inputs = keras.Input(shape=tuple(image_shape), name="image")
    x = layers.Flatten(name="flatten", dtype=dtype)(inputs)
    x = layers.Dense(opts.dense_units, activation="relu", name="dense", dtype=dtype)(x)
    if opts.dropout:
        x = layers.Dropout(opts.dropout, name="dropout", dtype=dtype)(x)
    logits = layers.Dense(num_outputs, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
