"""airbench95 and airbench96's pieces. research/recipes/airbench95.flags against
lib_airbench95.py's hyp (airbench==0.1.8), whose whole diff against lib_airbench94.py is the
widths, the learning rate and the epochs: the same conversion as the fast recipe's
(tests/training/test_recipe_parity.py checks that one's pieces); airbench96's residual ConvGroup."""

import pytest

from research.training import recipes

# lib_airbench95.hyp (per 1024 examples of a summed loss); the rest is airbench94's
LR, EPOCHS, WIDTHS, MOMENTUM, WD, PEAK = 10.0, 15.0, (128, 384, 384), 0.85, 0.0153, 0.23


def test_airbench95_recipe_is_lib_airbench95s_hyp():
    fast = recipes.load_recipe(recipes.FAST_CIFAR10)
    ours = recipes.load_recipe(recipes.AIRBENCH95)
    assert ours["epochs"] == EPOCHS and ours["model_options"]["widths"] == WIDTHS
    # utils.train: lr / (1024 (1 + 1 / (1 - momentum))) per summed example = ours per mean
    # loss / 1024; wd / lr is the L2 coefficient
    assert ours["learning_rate"] == pytest.approx(LR / (1 + 1 / (1 - MOMENTUM)), rel=1e-8)
    assert ours["weight_decay"] == pytest.approx(WD / LR, rel=1e-8)
    assert ours["warmup_epochs"] == pytest.approx(PEAK * EPOCHS)
    changed = {k for k in set(ours) | set(fast) if ours.get(k) != fast.get(k)}
    assert changed == {"epochs", "learning_rate", "weight_decay", "warmup_epochs",
                       "model_options"}
    assert {k for k in ours["model_options"] if ours["model_options"][k] !=
            fast["model_options"].get(k)} == {"widths"}


def test_a_third_conv_per_group_is_airbench96s_residual_convgroup():
    """lib_airbench96's ConvGroup: conv1, pool, norm1, act; x0 = x; conv2, norm2, act;
    conv3, norm3; x += x0; act. Held against the same layers called by hand."""
    import keras
    import numpy as np

    from research.models import build_model

    model = build_model("fast", (32, 32, 3), 10, widths=(8, 16), group_convs=3)
    two = build_model("fast", (32, 32, 3), 10, widths=(8, 16))
    names = {x.name for x in model.layers} - {x.name for x in two.layers}
    assert names == {f"group{i}_{n}" for i in range(2)
                     for n in ("conv3", "3_bn", "residual", "3_act")}
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    L = model.get_layer
    x0 = keras.Model(model.input, L("group1_1_act").output)(x)
    h = L("group1_2_act")(L("group1_2_bn")(L("group1_conv2")(x0), training=False))
    want = L("group1_3_act")(L("group1_3_bn")(L("group1_conv3")(h), training=False) + x0)
    got = keras.Model(model.input, L("group1_3_act").output)(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def ab_square_masks(n, h, w, size, corner_y, corner_x):
    """utils.make_random_square_masks with its two randint draws given, in numpy (NHW)."""
    import numpy as np

    dy = np.arange(h).reshape(1, h, 1) - corner_y.reshape(-1, 1, 1)
    dx = np.arange(w).reshape(1, 1, w) - corner_x.reshape(-1, 1, 1)
    return ((dy >= 0) & (dy < size)) & ((dx >= 0) & (dx < size))


def test_cutout_is_airbenchs_batch_cutout():
    """A size x size square at a corner uniform in [0, H - size] (each corner reachable), set
    to the normalisation's mean, so the normalised image is 0 there as airbench's
    masked_fill(mask, 0) of its normalised images; nothing else changes."""
    import numpy as np
    import tensorflow as tf

    from research.data import pipeline
    from research.models.scratch import normalized_input

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(64, 32, 32, 3)).astype(np.float32)
    rand = rng.uniform(size=(64, 2)).astype(np.float32)
    rand[0], rand[1] = 0.0, 0.999999
    fill = pipeline.cutout_fill(3, "unit")
    out = pipeline.cutout_batch(tf.constant(images), tf.constant(rand), 12, fill).numpy()
    cy, cx = (np.floor(rand[:, 0] * 21).astype(int), np.floor(rand[:, 1] * 21).astype(int))
    assert (cy[0], cx[0], cy[1], cx[1]) == (0, 0, 20, 20)
    mask = ab_square_masks(64, 32, 32, 12, cy, cx)
    assert mask.sum(axis=(1, 2)).tolist() == [144] * 64
    np.testing.assert_array_equal(out[~mask], images[~mask])
    inputs, normalised = normalized_input((32, 32, 3), None)
    z = keras_model(inputs, normalised)(out).numpy()
    np.testing.assert_allclose(z[mask], 0.0, atol=1e-6)


def keras_model(inputs, outputs):
    import keras

    return keras.Model(inputs, outputs)


def test_cutout_in_the_training_stream_is_seeded_and_after_the_crop(syn, tmp_path):
    import numpy as np

    from research.data import pipeline

    def first(cutout, seed=0):
        stream = pipeline.Stream(seed=seed, pad=2, cutout=cutout)
        b = next(iter(pipeline.make_dataset(syn, "train", 16, True, stream=stream)))
        return b["image"].numpy()

    a, again, plain = first(12), first(12), first(0)
    np.testing.assert_array_equal(a, again)
    fill = np.array(pipeline.cutout_fill(3, "unit"), np.float32)
    square = np.all(a == fill, axis=-1)
    assert (square.sum(axis=(1, 2)) >= 144).all()
    np.testing.assert_array_equal(a[~square], plain[~square])  # the same crop and flip
    assert not np.array_equal(first(12, seed=1), a)


def test_airbench96_recipe_is_lib_airbench96s_hyp():
    """lib_airbench96.hyp at f1c599c: lr 9.0, wd 0.012, 37 epochs, widths 128/384/512,
    translate 4, cutout 12; its BatchNorm at PyTorch's default momentum (0.1 = Keras 0.9);
    its ConvGroup with a third conv and the residual."""
    fast = recipes.load_recipe(recipes.FAST_CIFAR10)
    ours = recipes.load_recipe(recipes.AIRBENCH96)
    lr, wd, epochs = 9.0, 0.012, 37.0
    assert ours["epochs"] == epochs
    assert ours["learning_rate"] == pytest.approx(lr / (1 + 1 / (1 - MOMENTUM)), rel=1e-8)
    assert ours["weight_decay"] == pytest.approx(wd / lr, rel=1e-5)
    assert ours["warmup_epochs"] == pytest.approx(PEAK * epochs)
    assert (ours["crop_pad"], ours["cutout"]) == (4, 12)
    opts = ours["model_options"]
    assert opts["widths"] == (128, 384, 512) and opts["group_convs"] == 3
    assert opts["bn_momentum"] == pytest.approx(1 - 0.1)
    changed = {k for k in set(ours) | set(fast) if ours.get(k) != fast.get(k)}
    assert changed == {"epochs", "learning_rate", "weight_decay", "warmup_epochs",
                       "crop_pad", "cutout", "model_options"}
    assert {k for k in opts if opts[k] != fast["model_options"].get(k)} == {
        "widths", "group_convs", "bn_momentum"}
