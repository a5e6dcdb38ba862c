"""FusedBatchNorm against Keras BatchNormalization, and synchronised statistics across
replicas; the scratch network's options."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.model_options import model_options_error
from research.models import build_model
from research.models.layers import FusedBatchNorm


def _pair(dtype):
    ours = FusedBatchNorm(momentum=0.9, epsilon=1e-3, dtype=dtype)
    ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, dtype=dtype)
    x = tf.random.stateless_normal([8, 6, 6, 5], seed=[1, 2]) * 3.0 + 1.5
    for layer in (ours, ref):
        layer.build(x.shape)
    rng = np.random.default_rng(0)
    gamma, beta = rng.normal(1, 0.2, 5), rng.normal(0, 0.2, 5)
    for layer in (ours, ref):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return ours, ref, x


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("mixed_bfloat16", 3e-2)])
def test_fused_bn_matches_keras_bn(dtype, tol):
    ours, ref, x = _pair(dtype)
    for _ in range(3):  # training: same outputs and same moving statistics
        y1, y2 = ours(x, training=True), ref(x, training=True)
        assert y1.dtype == y2.dtype
        np.testing.assert_allclose(np.float32(y1), np.float32(y2), atol=tol, rtol=tol)
    np.testing.assert_allclose(ours.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-2
                               if dtype != "float32" else 1e-5, atol=1e-3)
    # Keras' moving variance is the biased batch variance; ours too (Bessel factor removed).
    np.testing.assert_allclose(ours.moving_variance.numpy(), ref.moving_variance.numpy(),
                               rtol=2e-2 if dtype != "float32" else 1e-5)
    y1, y2 = ours(x, training=False), ref(x, training=False)  # inference: moving statistics
    np.testing.assert_allclose(np.float32(y1), np.float32(y2), atol=tol, rtol=tol)
    assert ours.moving_mean.dtype == "float32" and ours.gamma.dtype == "float32"


def test_fused_bn_synchronises_statistics_across_replicas(two_replicas):
    strategy = two_replicas
    x = tf.random.stateless_normal([8, 4, 4, 3], seed=[3, 4])
    # Each replica sees a different half; synchronised BN must match one replica on all of x.
    x = tf.concat([x[:4] * 2.0 + 1.0, x[4:]], axis=0)
    single = FusedBatchNorm(momentum=0.5)
    y_single = single(x, training=True)
    with strategy.scope():
        mirrored = FusedBatchNorm(momentum=0.5)
        mirrored.build(x.shape)
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(8))

    @tf.function
    def step(batch):
        return strategy.run(lambda b: mirrored(b, training=True), args=(batch,))

    out = step(next(iter(dist)))
    y_mirrored = tf.concat(strategy.experimental_local_results(out), axis=0)
    np.testing.assert_allclose(y_mirrored.numpy(), y_single.numpy(), atol=1e-5)
    np.testing.assert_allclose(mirrored.moving_mean.numpy(), single.moving_mean.numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(mirrored.moving_variance.numpy(),
                               single.moving_variance.numpy(), rtol=1e-5)


def test_scratch_options_have_one_default_and_are_validated():
    model = build_model("scratch", (32, 32, 3), 10)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)  # 0.0
    assert model_options_error("scratch", {"widths": (8, 16), "res_blocks": (1,)})[0] == "widths"
    assert model_options_error("scratch", {"dropout": 1.5})[0] == "dropout"
    assert model_options_error("scratch", {"widths": (8,), "res_blocks": (0,)}) is None
    gray = build_model("scratch", (28, 28, 1), 10, widths=(8,), res_blocks=(0,), stem_width=4)
    assert gray.output_shape == (None, 10)
