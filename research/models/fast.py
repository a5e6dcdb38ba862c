"""The fast from-scratch CNN for 32x32 images, shaped like the fast CIFAR-10 training recipes
(hlb-cifar10, airbench): few, wide layers where BN and the activation are cheap.

normalise -> 2x2 patch-whitening conv (frozen filters set from training data, 24 channels for
RGB) -> activation -> for each width: conv3x3, 2x2 max-pool, BN, activation, conv3x3, BN,
activation -> global max pool, scaled by `feature_scale` -> logits (zero-initialised). BN has no
trained scale (gamma stays 1): the convolutions before it make it redundant.

    python -m research.apps.train --model=fast ...   (the recipe: README, "The fast recipe")
"""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import layers

from research.models.layers import FusedBatchNorm, PartialDirac, PatchWhitening
from research.models.scratch import logits_head, normalized_input

ACTIVATIONS = ("gelu", "relu")


@dataclasses.dataclass
class FastOptions:
    """The fast network's options and their one set of defaults (the train app's flags)."""
    widths: tuple[int, ...] = dataclasses.field(
        default=(64, 256, 256), metadata={"help": "Fast CNN: channels per conv group."})
    whiten_kernel: int = dataclasses.field(
        default=2, metadata={"help": "Fast CNN: patch size of the whitening conv "
                             "(2 k^2 C channels)."})
    activation: str = dataclasses.field(
        default="gelu", metadata={"help": "Fast CNN: activation.", "choices": ACTIVATIONS})
    bn_momentum: float = dataclasses.field(
        default=0.4, metadata={"help": "Fast CNN: BN moving-average momentum (Keras "
                               "convention; 0.4 keeps 60% of each batch: short runs)."})
    feature_scale: float = dataclasses.field(
        default=1 / 9, metadata={"help": "Fast CNN: multiply the pooled features by this "
                                 "before the logits layer."})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "Dropout before the "
                                                              "logits."})
    dirac_init: bool = dataclasses.field(
        default=True, metadata={"help": "Fast CNN: start each conv as the identity on its "
                                "input channels (the rest uniform, +-1/sqrt(fan_in)) instead "
                                "of He-normal."})

    def validate(self) -> tuple[str, str] | None:
        """(flag, message) for the first bad option, else None."""
        if not self.widths or min(self.widths) < 1:
            return "widths", f"channels must be positive, got {self.widths}"
        if self.whiten_kernel < 1:
            return "whiten_kernel", f"must be positive, got {self.whiten_kernel}"
        if self.activation not in ACTIVATIONS:
            return "activation", f"must be one of {ACTIVATIONS}, got {self.activation!r}"
        if not 0.0 <= self.bn_momentum < 1.0:
            return "bn_momentum", f"must be in [0, 1), got {self.bn_momentum}"
        if not (math.isfinite(self.feature_scale) and self.feature_scale > 0):
            return "feature_scale", f"must be positive, got {self.feature_scale}"
        if not 0.0 <= self.dropout < 1.0:
            return "dropout", f"must be in [0, 1), got {self.dropout}"
        return None


def build_fast_cnn(image_shape=(32, 32, 3), num_outputs: int = 1, dtype: str | None = None,
                   name: str = "fast_cnn", bn_layer=FusedBatchNorm, **options) -> keras.Model:
    """Builds the CNN; `options` are `FastOptions` fields. Inputs are float images scaled to
    [0, 1]; outputs are float32 logits. The whitening filters are random until
    `research.models.layers.init_from_data` sets them (training does, from the train split)."""
    opts = FastOptions(**options)
    problem = opts.validate()
    if problem:
        raise ValueError(f"{problem[0]}: {problem[1]}")
    inputs, x = normalized_input(image_shape, dtype)
    x = PatchWhitening(opts.whiten_kernel, name="whiten", dtype=dtype)(x)
    x = layers.Activation(opts.activation, name="whiten_act", dtype=dtype)(x)

    def conv(x, w, name):
        init = PartialDirac() if opts.dirac_init else "he_normal"
        return layers.Conv2D(w, 3, padding="same", use_bias=False, name=name,
                             kernel_initializer=init, dtype=dtype)(x)

    def bn_act(x, name):
        x = bn_layer(momentum=opts.bn_momentum, epsilon=1e-5, scale=False, name=f"{name}_bn",
                     dtype=dtype)(x)
        return layers.Activation(opts.activation, name=f"{name}_act", dtype=dtype)(x)

    for i, w in enumerate(opts.widths):
        x = conv(x, w, f"group{i}_conv1")
        x = layers.MaxPooling2D(2, name=f"group{i}_pool", dtype=dtype)(x)
        x = bn_act(x, f"group{i}_1")
        x = bn_act(conv(x, w, f"group{i}_conv2"), f"group{i}_2")
    x = layers.GlobalMaxPooling2D(name="gmp", dtype=dtype)(x)
    logits = logits_head(x, num_outputs, opts.feature_scale, opts.dropout, dtype)
    return keras.Model(inputs, logits, name=name)
