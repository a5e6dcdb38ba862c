"""airbench95 and airbench96's pieces. research/recipes/airbench95.flags against
lib_airbench95.py's hyp (airbench==0.1.8), whose whole diff against lib_airbench94.py is the
widths, the learning rate and the epochs: the same conversion as the fast recipe's
(tests/test_recipe_parity.py checks that one's pieces); airbench96's residual ConvGroup."""

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
