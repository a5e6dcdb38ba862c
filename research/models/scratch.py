"""The from-scratch CNN for 32x32 images: a compact ResNet-9-style network.

stem conv -> for each stage: conv, 2x2 max-pool, BN, ReLU (or conv-BN-ReLU-pool with
pool_before_bn=False), then `res_blocks[i]` residual blocks of two conv-BN-ReLU -> global
max+avg pooling, scaled by `feature_scale` -> dropout -> one logit (binary objective) or
one logit per class (multiclass). The network outputs logits; sigmoid/softmax is applied only
where probabilities are wanted.

`downsample` swaps each stage's max-pool for an average pool, a stride-2 stage conv, or
nothing (full resolution throughout); the default builds the same layers, names and
initial weights as before the option existed. `stage_dilation` dilates every conv of a stage
(the CS109B section's dilated convolution); `conv_dropout` puts Dropout or SpatialDropout2D
after each stage's first conv block (dropout between convolutions). Both default to off.
"""

from __future__ import annotations

import keras
from keras import layers

from research.models.layers import FusedBatchNorm
from research.model_options import ScratchOptions

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def normalized_input(image_shape, dtype) -> tuple:
    """(the model's image input, that input normalised): CIFAR-10 statistics for RGB, a generic
    centring for other channel counts (MNIST)."""
    inputs = keras.Input(shape=image_shape, name="image")
    channels = image_shape[-1]
    mean = list(CIFAR_MEAN) if channels == 3 else [0.5] * channels
    var = [s * s for s in CIFAR_STD] if channels == 3 else [0.25 ** 2] * channels
    return inputs, layers.Normalization(mean=mean, variance=var, name="normalize",
                                        dtype=dtype)(inputs)


@keras.saving.register_keras_serializable(package="research")
class UnitStdUniform(keras.initializers.VarianceScaling):
    """PyTorch's nn.Linear init (uniform in +-1/sqrt(fan_in)), then `w *= 1 / w.std()`
    (torch's std: with Bessel's correction), as airbench94_muon's CifarNet.reset()."""

    def __init__(self, seed=None):
        super().__init__(1 / 3, "fan_in", "uniform", seed=seed)

    def __call__(self, shape, dtype=None):
        w = super().__call__(shape, dtype)
        n = keras.ops.cast(keras.ops.size(w), w.dtype)
        mean = keras.ops.mean(w)
        std = keras.ops.sqrt(keras.ops.sum(keras.ops.square(w - mean)) / (n - 1))
        return w / std

    def get_config(self):
        return {"seed": self.seed}


def logits_head(x, num_outputs: int, feature_scale: float, dropout: float, dtype,
                bias: bool = True, init: str = "zeros"):
    """Pooled features -> x feature_scale -> dropout -> float32 logits. Zero-initialised by
    default: the first loss is ln(K) rather than a large random value; `init='uniform'` is
    PyTorch's nn.Linear (+-1/sqrt(fan_in)). Scaling the features before the layer equals
    scaling its logits after it (airbench's order), gradients included."""
    if feature_scale != 1.0:
        x = layers.Rescaling(feature_scale, name="feature_scale", dtype=dtype)(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout", dtype=dtype)(x)
    kernel = ("zeros" if init == "zeros" else UnitStdUniform() if init == "uniform_unit_std"
              else keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"))
    return layers.Dense(num_outputs, kernel_initializer=kernel, use_bias=bias, name="logits",
                        dtype="float32")(x)


POOLS = {"maxpool": layers.MaxPooling2D, "avgpool": layers.AveragePooling2D}


def _conv(x, filters: int, name: str, dtype, strides: int = 1, dilation: int = 1):
    return layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                         dilation_rate=dilation, name=f"{name}_conv",
                         kernel_initializer="he_normal", dtype=dtype)(x)


def _bn_relu(x, name: str, dtype, bn_layer):
    x = bn_layer(momentum=0.9, name=f"{name}_bn", dtype=dtype)(x)
    return layers.ReLU(name=f"{name}_relu", dtype=dtype)(x)


def _conv_bn_relu(x, filters: int, name: str, dtype, bn_layer, strides: int = 1,
                  dilation: int = 1):
    return _bn_relu(_conv(x, filters, name, dtype, strides, dilation), name, dtype, bn_layer)


CONV_DROPOUTS = {"plain": layers.Dropout, "spatial": layers.SpatialDropout2D}


def _stage_entry(x, filters: int, i: int, opts: ScratchOptions, dtype, bn_layer):
    """A stage's first conv and its downsampling (`opts.downsample`); layers stage{i}_conv,
    _pool (pooling choices only), _bn, _relu, then _dropout with --conv_dropout."""
    x = _stage_entry_conv(x, filters, i, opts, dtype, bn_layer)
    if opts.conv_dropout:
        x = CONV_DROPOUTS[opts.conv_dropout_type](opts.conv_dropout, name=f"stage{i}_dropout",
                                                  dtype=dtype)(x)
    return x


def _stage_entry_conv(x, filters: int, i: int, opts: ScratchOptions, dtype, bn_layer):
    pool = POOLS.get(opts.downsample)
    name, d = f"stage{i}", opts.dilation_of(i)
    if pool is None:  # stride: the conv itself halves the map; none: nothing does
        return _conv_bn_relu(x, filters, name, dtype, bn_layer,
                             strides=2 if opts.downsample == "stride" else 1, dilation=d)
    if opts.pool_before_bn:  # BN and ReLU at a quarter of the pixels: memory-bound ops
        x = _conv(x, filters, name, dtype, dilation=d)
        x = pool(2, name=f"{name}_pool", dtype=dtype)(x)
        return _bn_relu(x, name, dtype, bn_layer)
    x = _conv_bn_relu(x, filters, name, dtype, bn_layer, dilation=d)
    return pool(2, name=f"{name}_pool", dtype=dtype)(x)


def build_scratch_cnn(image_shape=(32, 32, 3), num_outputs: int = 1,
                      dtype: str | None = None, name: str = "scratch_cnn",
                      bn_layer=FusedBatchNorm, **options) -> keras.Model:
    """Builds the CNN; `options` are `ScratchOptions` fields. Inputs are float images scaled to
    [0, 1]; outputs are float32 logits.

    `dtype` is a Keras dtype policy name such as 'mixed_bfloat16'; the logits layer always
    computes in float32. `bn_layer` is the batch-norm class (the benchmark compares Keras'
    own BatchNormalization).
    """
    opts = ScratchOptions(**options)
    problem = opts.validate()
    if problem:
        raise ValueError(f"{problem[0]}: {problem[1]}")
    widths, res_blocks = opts.widths, opts.res_blocks
    inputs, x = normalized_input(image_shape, dtype)
    x = _conv_bn_relu(x, opts.stem_width, "stem", dtype, bn_layer)
    for i, (w, r) in enumerate(zip(widths, res_blocks)):
        x = _stage_entry(x, w, i, opts, dtype, bn_layer)
        for j in range(r):
            d = opts.dilation_of(i)
            y = _conv_bn_relu(x, w, f"stage{i}_res{j}a", dtype, bn_layer, dilation=d)
            y = _conv_bn_relu(y, w, f"stage{i}_res{j}b", dtype, bn_layer, dilation=d)
            x = layers.Add(name=f"stage{i}_res{j}_add", dtype=dtype)([x, y])
    x = layers.Concatenate(name="pool", dtype=dtype)([
        layers.GlobalMaxPooling2D(name="gmp", dtype=dtype)(x),
        layers.GlobalAveragePooling2D(name="gap", dtype=dtype)(x)])
    logits = logits_head(x, num_outputs, opts.feature_scale, opts.dropout, dtype)
    return keras.Model(inputs, logits, name=name)
