"""research/recipes/airbench95.flags against lib_airbench95.py's hyp (airbench==0.1.8), whose
whole diff against lib_airbench94.py is the widths, the learning rate and the epochs: the
same conversion as the fast recipe's (tests/test_recipe_parity.py checks that one's pieces)."""

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
