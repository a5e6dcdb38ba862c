"""A recipe flagfile read by the library is what the train app parses from it."""

from __future__ import annotations

import pytest
from absl import flags

from research.apps import config_flags
from research.model_options import MODEL_OPTIONS, options_class
from research.training.config import TrainConfig
from research.training import recipes
from research.training.recipes import FAST_CIFAR10, RecipeError, load_recipe


def parsed_by_absl(path: str) -> tuple[dict, dict]:
    fv = flags.FlagValues()
    config_flags.define_flags(TrainConfig, flag_values=fv, module_name="test")
    for cls in dict.fromkeys(MODEL_OPTIONS.values()):
        config_flags.define_flags(cls, flag_values=fv, module_name="test")
    fv(["prog", f"--flagfile={path}", "--data_dir=d", "--run_name=r"])
    cfg = config_flags.values_from_flags(TrainConfig, fv)
    opts = config_flags.values_from_flags(options_class(cfg["model"]), fv)
    return cfg, opts


def test_the_fast_recipe_reads_as_the_train_app_parses_it():
    recipe = load_recipe(FAST_CIFAR10)
    cfg, opts = parsed_by_absl(FAST_CIFAR10)
    assert recipe["model"] == "fast" and recipe["epochs"] == 10.0
    for key, value in recipe.items():
        if key != "model_options":
            assert cfg[key] == value, key
    for key, value in recipe["model_options"].items():
        assert opts[key] == value, key
    # every flag the app sees as changed from its default is in the recipe
    defaults = TrainConfig(data_dir="d", run_name="r")
    changed = {k for k, v in cfg.items() if getattr(defaults, k) != v}
    changed -= {"data_dir", "run_name"}
    assert changed <= set(recipe), changed - set(recipe)


def test_a_bad_recipe_line_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.flags"
    bad.write_text("# ok\n--model=fast\n--no_such_flag=3\n")
    with pytest.raises(RecipeError, match=r"bad.flags:3: --no_such_flag"):
        load_recipe(str(bad))
    bad.write_text("--epochs=ten\n")
    with pytest.raises(RecipeError, match=r"bad.flags:1"):
        load_recipe(str(bad))
    bad.write_text("--model=fast\n--nologits_bias\n--tta_shifts\n--widths=8,16\n")
    assert load_recipe(str(bad)) == {"model": "fast", "tta_shifts": True, "model_options": {
        "logits_bias": False, "widths": (8, 16)}}


def test_airbench93_is_the_fast_recipe_with_its_two_changes_and_the_documented_command():
    fast, ab93 = load_recipe(FAST_CIFAR10), recipes.airbench93()
    changed = {k for k in set(fast) | set(ab93) if fast.get(k) != ab93.get(k)}
    assert changed == {"epochs", "warmup_epochs", "model_options"}
    assert ab93["epochs"] == 11.0
    assert ab93["warmup_epochs"] / ab93["epochs"] == pytest.approx(fast["warmup_epochs"] / 10)
    assert ab93["model_options"] == {**fast["model_options"], "widths": (64, 128, 128)}
    # the train app's command in airbench93's docstring parses to the same settings
    fv = flags.FlagValues()
    config_flags.define_flags(TrainConfig, flag_values=fv, module_name="test")
    for cls in dict.fromkeys(MODEL_OPTIONS.values()):
        config_flags.define_flags(cls, flag_values=fv, module_name="test")
    fv(["prog", f"--flagfile={FAST_CIFAR10}", "--widths=64,128,128", "--epochs=11",
        "--warmup_epochs=2.53", "--data_dir=d", "--run_name=r"])
    cfg = config_flags.values_from_flags(TrainConfig, fv)
    assert all(cfg[k] == pytest.approx(v) for k, v in ab93.items() if k != "model_options")
    opts = config_flags.values_from_flags(options_class("fast"), fv)
    assert all(opts[k] == v for k, v in ab93["model_options"].items())


def test_rebatched_keeps_the_step_per_example_and_stretched_the_schedule_shape():
    fast = load_recipe(FAST_CIFAR10)
    r = recipes.rebatched(fast, 256)
    assert r["batch_size"] == 256 and r["learning_rate"] == pytest.approx(1.5 / 4)
    assert r["weight_decay"] == fast["weight_decay"]  # relative to the learning rate
    s = recipes.stretched(fast, 40)
    assert s["epochs"] == 40 and s["warmup_epochs"] == pytest.approx(2.3 * 4)
    assert s["whiten_bias_epochs"] == fast["whiten_bias_epochs"]  # per epoch, as airbench


def test_the_few_labels_pair_trains_both_at_one_batch_and_fraction():
    from research.lab import profiles
    from research.lab.stages import BY_NAME
    p = profiles.CPU
    pair = BY_NAME["few_labels"].settings_for("cpu", False, profiles.Overrides())
    scratch, transfer = profiles.few_labels_pair(pair, p.scratch, p.transfer("lab_src_nocat"))
    assert scratch["train_fraction"] == transfer["train_fraction"] == profiles.FEW_LABELS
    assert scratch["batch_size"] == transfer["batch_size"] == 256
    assert scratch["learning_rate"] == pytest.approx(p.scratch["learning_rate"] / 4)
    assert transfer["head_epochs"] + transfer["fine_tune_epochs"] == profiles.FEW_LABELS_EPOCHS
    assert transfer["head_epochs"] / transfer["fine_tune_epochs"] == pytest.approx(
        p.transfer_fallback["head_epochs"] / p.transfer_fallback["fine_tune_epochs"])
    assert scratch["epochs"] == profiles.FEW_LABELS_EPOCHS
