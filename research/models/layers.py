"""Layers the Keras built-ins do not cover well on our hardware."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="research")
class FusedBatchNorm(keras.layers.Layer):
    """Batch normalisation over the last axis of NHWC tensors.

    Keras 3's BatchNormalization computes moments with separate ops; TensorFlow's fused kernel
    is ~3x faster per conv block on CPU (measured by research.benchmarks.train_step). Under a
    tf.distribute strategy with several replicas the batch moments are all-reduced (synchronised
    BN), so N replicas compute exactly what one replica computes on the global batch.
    Statistics and parameters stay float32 under mixed precision.
    """

    def __init__(self, momentum: float = 0.9, epsilon: float = 1e-3, scale: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum
        self.epsilon = epsilon
        self.scale = scale  # False: gamma stays 1 (not trained), only the shift beta learns

    def build(self, input_shape):
        c = input_shape[-1]
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma",
                                     trainable=self.scale, autocast=False)
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta", autocast=False)
        self.moving_mean = self.add_weight(shape=(c,), initializer="zeros", name="moving_mean",
                                           trainable=False, autocast=False)
        self.moving_variance = self.add_weight(shape=(c,), initializer="ones",
                                               name="moving_variance", trainable=False,
                                               autocast=False)

    def _update(self, mean, var):
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))

    def call(self, x, training=False):
        gamma, beta = tf.convert_to_tensor(self.gamma), tf.convert_to_tensor(self.beta)
        # As Keras' BatchNormalization: a frozen layer runs in inference mode (Keras 3 passes
        # the outer training flag down through nested models, whatever they were called with).
        if not training or not self.trainable:
            return tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon,
                is_training=False)[0]
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            xf = tf.cast(x, tf.float32)
            axes = list(range(len(x.shape) - 1))
            count = tf.cast(tf.reduce_prod(tf.shape(xf)[:-1]), tf.float32)
            s, ss, n = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [
                tf.reduce_sum(xf, axes), tf.reduce_sum(tf.square(xf), axes), count])
            mean = s / n
            var = tf.maximum(ss / n - tf.square(mean), 0.0)
            y = (xf - mean) * (tf.math.rsqrt(var + self.epsilon) * gamma) + beta
            self._update(mean, var)
            return tf.cast(y, x.dtype)
        y, mean, var = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=self.epsilon,
                                                        is_training=True)[:3]
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        self._update(mean, var * (n - 1.0) / tf.maximum(n, 2.0))  # fused var is Bessel-corrected
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon,
                "scale": self.scale}


@keras.saving.register_keras_serializable(package="research")
class PatchWhitening(keras.layers.Layer):
    """A k x k 'valid' convolution whose 2 k^2 C filters whiten the training images' k x k
    patches: the eigenvectors of the patch covariance over sqrt(eigenvalue + eps), and their
    negatives (so a ReLU-like activation after it loses nothing). The filters are frozen; the
    bias trains. From the fast CIFAR-10 recipes (hlb-cifar10, airbench): the first layer starts
    as a decorrelated view of the pixels rather than noise.

    `init_from_data(x)` sets the filters from this layer's inputs `x` (a few thousand training
    images suffice); until then they are random. They are a variable, so checkpoints carry them.
    """

    def __init__(self, kernel_size: int = 2, eps: float = 5e-4, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.eps = eps

    def build(self, input_shape):
        k, c = self.kernel_size, input_shape[-1]
        n = k * k * c
        self.kernel = self.add_weight(shape=(k, k, c, 2 * n), initializer="glorot_uniform",
                                      name="kernel", trainable=False, autocast=False)
        self.bias = self.add_weight(shape=(2 * n,), initializer="zeros", name="bias",
                                    autocast=False)

    def call(self, x):
        y = tf.nn.conv2d(x, tf.cast(self.kernel, x.dtype), 1, "VALID")
        return tf.nn.bias_add(y, tf.cast(self.bias, x.dtype))

    def whitening_kernel(self, x) -> np.ndarray:
        """The (k, k, C, 2 k^2 C) filters that whiten the k x k patches of `x` (N, H, W, C),
        strongest direction first."""
        k = self.kernel_size
        x = np.asarray(x, np.float64)
        n = k * k * x.shape[-1]
        cov, count = np.zeros((n, n)), 0
        for i in range(0, len(x), 256):  # patches of 256 images at a time: bounded memory
            p = np.lib.stride_tricks.sliding_window_view(x[i:i + 256], (k, k), axis=(1, 2))
            p = p.transpose(0, 1, 2, 4, 5, 3).reshape(-1, n)  # (patch, k*k*C) in kernel order
            cov += p.T @ p
            count += len(p)
        values, vectors = np.linalg.eigh(cov / count)  # ascending
        scaled = vectors[:, ::-1] / np.sqrt(np.maximum(values[::-1], 0.0) + self.eps)
        return np.concatenate([scaled, -scaled], axis=1).reshape(k, k, x.shape[-1], 2 * n)

    def init_from_data(self, x) -> None:
        self.kernel.assign(self.whitening_kernel(x).astype(np.float32))

    def compute_output_shape(self, input_shape):
        k, c = self.kernel_size, input_shape[-1]
        return (input_shape[0], None if input_shape[1] is None else input_shape[1] - k + 1,
                None if input_shape[2] is None else input_shape[2] - k + 1, 2 * k * k * c)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "eps": self.eps}


def data_initialised(model: keras.Model) -> list:
    """The layers of `model` that set themselves from training data (`init_from_data`)."""
    return [layer for layer in model._flatten_layers() if hasattr(layer, "init_from_data")]


def init_from_data(model: keras.Model, images) -> list[str]:
    """Runs `init_from_data` of every such layer of `model` on what reaches it when `images`
    (already scaled as the model's inputs) go in. Returns the layers' names."""
    names = []
    for layer in data_initialised(model):
        feed = keras.Model(model.input, layer.input)
        layer.init_from_data(np.concatenate([feed(images[i:i + 500], training=False).numpy()
                                             for i in range(0, len(images), 500)]))
        names.append(layer.name)
    return names


@keras.saving.register_keras_serializable(package="research")
class PartialDirac(keras.initializers.Initializer):
    """A conv kernel [kh, kw, in, out] whose first min(in, out) filters pass their input
    channel through unchanged (a 1 at the centre tap) and whose other filters are uniform in
    +-1/sqrt(fan_in) (PyTorch's default conv init), as in hlb-cifar10 and airbench: a deep
    stack starts close to the identity."""

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        kh, kw, cin, cout = shape
        base = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform", seed=self.seed)
        w = base(shape, dtype=dtype)
        n = min(cin, cout)
        eye = np.zeros((kh, kw, cin, n), np.float32)
        eye[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        return keras.ops.concatenate([keras.ops.cast(eye, w.dtype), w[..., n:]], axis=-1)

    def get_config(self):
        return {"seed": self.seed}
