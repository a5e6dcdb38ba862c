"""The fast CNN: its patch-whitening layer, its data initialisation in training, and its
options' flags beside the scratch network's."""

import keras
import numpy as np
import tensorflow as tf

from research.data import pipeline
from research.model_options import model_options_error
from research.models import build_model
from research.models.layers import FusedBatchNorm, PatchWhitening
from research.training import state as train_state
from research.training.config import TrainConfig

TINY = {"widths": (8, 16)}


def _correlated_images(n=64, size=12, seed=0):
    """Smooth random colour images: neighbouring pixels and channels correlate strongly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size + 1, size + 1, 3))
    x = x[:, 1:, 1:] + x[:, :-1, 1:] + x[:, 1:, :-1]  # spatial correlation
    return (x @ np.array([[1.0, 0.8, 0.6], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]])).astype(np.float32)


def test_patch_whitening_decorrelates_patches():
    x = _correlated_images()
    layer = PatchWhitening(2, eps=1e-6)
    layer.build(x.shape)
    layer.init_from_data(x)
    y = layer(x).numpy()  # bias is zero
    assert y.shape == (64, 11, 11, 24)
    half = y[..., :12].reshape(-1, 12)
    cov = half.T @ half / len(half)
    np.testing.assert_allclose(cov, np.eye(12), atol=1e-3)  # white, unit variance
    np.testing.assert_allclose(y[..., 12:], -y[..., :12], atol=1e-5)  # and the negatives
    # The input's patches were far from white: the layer did the work.
    p = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(1, 2)).reshape(-1, 12)
    assert np.abs(p.T @ p / len(p) - np.eye(12)).max() > 0.5


def test_fused_bn_without_scale_keeps_gamma_at_one():
    bn = FusedBatchNorm(scale=False)
    bn.build((None, 4, 4, 3))
    assert [w.name for w in bn.trainable_weights] == ["beta"]
    assert FusedBatchNorm.from_config(bn.get_config()).scale is False


def test_fast_model_options_and_shape():
    model = build_model("fast", (32, 32, 3), 10)
    assert model.output_shape == (None, 10)
    assert model.get_layer("whiten").output.shape[1:] == (31, 31, 24)
    assert 1.9e6 < model.count_params() < 2.1e6  # the fast recipes' 2M-parameter network
    assert model_options_error("fast", {"activation": "tanh"})[0] == "activation"
    assert model_options_error("fast", {"bn_momentum": 1.0})[0] == "bn_momentum"
    assert model_options_error("fast", {"widths": ()})[0] == "widths"


def test_training_sets_the_whitening_from_the_train_split(syn, tmp_path):
    cfg = TrainConfig(data_dir=syn, run_name="f", model="fast", model_options=dict(TINY),
                      checkpoint_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "logs"),
                      batch_size=32, precision="float32", progress=False, gradcam_images=0)
    manifest = pipeline.load_manifest(syn)
    plan = train_state.plan_steps(cfg, manifest)
    keras.utils.set_random_seed(0)
    state = train_state.create_train_state(cfg, tf.distribute.get_strategy(), manifest, plan)
    layer = state.model.get_layer("whiten")
    images = pipeline.take_examples(syn, "train")["image"].astype(np.float32) / 255.0
    normalised = state.model.get_layer("normalize")(images).numpy()
    np.testing.assert_allclose(layer.kernel.numpy(), layer.whitening_kernel(normalised),
                               rtol=1e-4, atol=1e-4)
    # Frozen: the optimizer never sees the filters; the bias trains.
    assert all(v is not layer.kernel for v in state.model.trainable_variables)
    assert any(v is layer.bias for v in state.model.trainable_variables)


def test_partial_dirac_starts_convs_as_identities():
    from research.models.layers import PartialDirac

    x = tf.random.stateless_normal((2, 5, 5, 4), (0, 1))
    square = keras.layers.Conv2D(4, 3, padding="same", use_bias=False,
                                 kernel_initializer=PartialDirac(seed=1))
    np.testing.assert_allclose(square(x), x, atol=1e-6)  # in == out: the identity
    wide = keras.layers.Conv2D(10, 3, padding="same", use_bias=False,
                               kernel_initializer=PartialDirac(seed=1))
    y = wide(x)
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)  # first 4 filters pass through
    rest = wide.kernel.numpy()[..., 4:]
    bound = 1 / np.sqrt(3 * 3 * 4)
    assert np.abs(rest).max() <= bound and rest.std() > 0.4 * bound  # uniform(+-bound)
    model = build_model("fast", (32, 32, 3), 10, widths=(8, 16))
    k = model.get_layer("group1_conv2").kernel.numpy()
    np.testing.assert_array_equal(k[1, 1], np.eye(16))
    off = build_model("fast", (32, 32, 3), 10, widths=(8, 16), dirac_init=False)
    assert not np.allclose(off.get_layer("group1_conv2").kernel.numpy()[1, 1], np.eye(16))
