"""The fast from-scratch CNN for 32x32 images, shaped like the fast CIFAR-10 training recipes
(hlb-cifar10, airbench): few, wide layers where BN and the activation are cheap.

normalise -> 2x2 patch-whitening conv (frozen filters set from training data, 24 channels for
RGB) -> activation -> for each width: conv3x3, 2x2 max-pool, BN, activation, conv3x3, BN,
activation -> global max pool, scaled by `feature_scale` -> logits (zero-initialised, or
PyTorch's uniform init without a bias, as airbench). BN has no trained scale (gamma stays 1):
the convolutions before it make it redundant.

    python -m research.apps.train --flagfile=research/recipes/fast_cifar10.flags  (the recipe)
"""

from __future__ import annotations

import keras
from keras import layers

from research.models.layers import FusedBatchNorm, PartialDirac, PatchWhitening
from research.model_options import FastOptions
from research.models.scratch import logits_head, normalized_input


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
        x = bn_layer(momentum=opts.bn_momentum, epsilon=opts.bn_epsilon, scale=False,
                     name=f"{name}_bn", dtype=dtype)(x)
        return layers.Activation(opts.activation, name=f"{name}_act", dtype=dtype)(x)

    for i, w in enumerate(opts.widths):
        x = conv(x, w, f"group{i}_conv1")
        x = layers.MaxPooling2D(2, name=f"group{i}_pool", dtype=dtype)(x)
        x = bn_act(x, f"group{i}_1")
        x0 = x
        x = bn_act(conv(x, w, f"group{i}_conv2"), f"group{i}_2")
        if opts.group_convs == 3:  # airbench96: x = act(norm3(conv3(x)) + x0)
            x = bn_layer(momentum=opts.bn_momentum, epsilon=opts.bn_epsilon, scale=False,
                         name=f"group{i}_3_bn", dtype=dtype)(conv(x, w, f"group{i}_conv3"))
            x = layers.Add(name=f"group{i}_residual", dtype=dtype)([x, x0])
            x = layers.Activation(opts.activation, name=f"group{i}_3_act", dtype=dtype)(x)
    # 32 -> 31 (the 2x2 'valid' whitening) -> 15 -> 7 -> 3: airbench's nn.MaxPool2d(3) on this
    # 3x3 map is this global max. (Where maxima tie exactly, reduce_max's gradient splits
    # between them and PyTorch's goes to the first: measured by the reference benchmark's
    # parity mode. A pooling layer of another shape would break every saved checkpoint's
    # layer order, so it stays.)
    x = layers.GlobalMaxPooling2D(name="gmp", dtype=dtype)(x)
    logits = logits_head(x, num_outputs, opts.feature_scale, opts.dropout, dtype,
                         bias=opts.logits_bias, init=opts.logits_init)
    return keras.Model(inputs, logits, name=name)
