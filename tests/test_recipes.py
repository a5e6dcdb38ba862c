"""A recipe flagfile read by the library is what the train app parses from it."""

from __future__ import annotations

import pytest
from absl import flags

from research.apps import config_flags
from research.model_options import MODEL_OPTIONS, options_class
from research.training.config import TrainConfig
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
