"""The small convnet of Chollet's dogs-vs-cats chapter (the small-data regime):

  conv 32 -> pool -> conv 64 -> pool -> conv 128 -> pool -> conv 128 -> pool -> flatten ->
  [dropout] -> dense 512 (ReLU) -> logits

3x3 valid convolutions with ReLU, 2x2 max-pooling. At 150x150x3 with one logit it has the
reference's 3,453,121 parameters. Inputs are float images in [0, 1] (scale 'unit'); the
network outputs logits (one for --objective=binary, the reference's sigmoid unit).
"""

from __future__ import annotations

import keras
from keras import layers

from research.model_options import SmallConvnetOptions


def build_small_convnet(image_shape=(150, 150, 3), num_outputs: int = 1,
                        dtype: str | None = None, name: str = "small_convnet",
                        **options) -> keras.Model:
    opts = SmallConvnetOptions(**options)
    inputs = keras.Input(shape=tuple(image_shape), name="image")
    x = inputs
    for i, filters in enumerate((32, 64, 128, 128)):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{i}", dtype=dtype)(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}", dtype=dtype)(x)
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    if opts.dropout:
        x = layers.Dropout(opts.dropout, name="dropout", dtype=dtype)(x)
    x = layers.Dense(512, activation="relu", name="dense", dtype=dtype)(x)
    logits = layers.Dense(num_outputs, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
