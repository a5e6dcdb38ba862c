"""Published recipes as TrainConfig settings: a recipe is a flagfile of train flags
(research/recipes/*.flags, the one home of its values), read here into the settings a
library caller (the lab) passes to TrainConfig, exactly as the train app would parse it
(tests/test_training.py checks the two agree).

    settings = load_recipe(FAST_CIFAR10)   # {"model": "fast", "epochs": 10.0, ...,
                                           #  "model_options": {"bn_momentum": 0.6, ...}}
"""

from __future__ import annotations

import dataclasses
import os
import typing

from research.errors import UserError
from research.fields import base_type
from research.model_options import options_class
from research.training.config import TrainConfig

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "recipes")
FAST_CIFAR10 = os.path.join(RECIPES_DIR, "fast_cifar10.flags")
FAST_CIFAR10_MUON = os.path.join(RECIPES_DIR, "fast_cifar10_muon.flags")
AIRBENCH95 = os.path.join(RECIPES_DIR, "airbench95.flags")
AIRBENCH96 = os.path.join(RECIPES_DIR, "airbench96.flags")
PHOTOS_FROM_CIFAR = os.path.join(RECIPES_DIR, "photos_from_cifar.flags")

# airbench93 (lib_airbench93.py of airbench==0.1.8; its whole diff against lib_airbench94.py):
# the fast recipe with the last two groups at 128 channels instead of 256 and 11 epochs
# instead of 9.9, the triangle's peak still at 23% of the run. airbench says "roughly 1/4 of
# the FLOPs"; by our count (research.models.flops) it is 0.46 of them per image (training
# step 0.324 vs 0.708 GFLOP: the first group, unchanged at 64 channels on the 31x31 map,
# carries most of the cost), 0.51 per run with the longer schedule.
AIRBENCH93_WIDTHS = (64, 128, 128)
AIRBENCH93_EPOCHS = 11.0

TRUE, FALSE = ("true", "t", "1", "yes"), ("false", "f", "0", "no")


class RecipeError(UserError):
    """A recipe file that does not read as train flags; the message names the file and line."""


def _convert(hint, text: str, where: str):
    base, elem = base_type(hint)
    try:
        if base is bool:
            if text.lower() not in TRUE + FALSE:
                raise ValueError(f"not a boolean: {text!r}")
            return text.lower() in TRUE
        if base is tuple:
            return tuple(elem(v) for v in text.split(",") if v != "")
        if text.lower() == "none" and typing.get_origin(hint) is not None:
            return None
        return base(text)
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e


def _lines(path: str) -> list[tuple[str, str, str]]:
    """(name, value or None, where) per flag line; comments and blank lines skipped."""
    if not os.path.isfile(path):
        raise RecipeError(f"recipe {path}: no such file")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{n}"
            if not line.startswith("--"):
                raise RecipeError(f"{where}: not a flag: {line!r}")
            name, eq, value = line[2:].partition("=")
            out.append((name, value if eq else None, where))
    return out


def load_recipe(path: str) -> dict:
    """The recipe's settings: TrainConfig fields, and its model's options under
    "model_options" (only the flags the file gives)."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    lines = _lines(path)
    settings: dict = {}
    pending = []
    for name, value, where in lines:
        if name == "flagfile":
            raise RecipeError(f"{where}: a recipe cannot include another (--flagfile)")
        key = name[2:] if value is None and name.startswith("no") and name[2:] in fields \
            else name
        if key in fields:
            if value is None:  # --flag / --noflag: booleans
                value = "false" if key != name else "true"
            settings[key] = _convert(hints[key], value, where)
        else:
            pending.append((name, value, where))
    model = settings.get("model", TrainConfig.__dataclass_fields__["model"].default)
    cls = options_class(model, TrainConfig(data_dir="", run_name="",
                                           **settings).uses_backbone)
    opts_hints = typing.get_type_hints(cls) if cls else {}
    options = {}
    for name, value, where in pending:
        key = name[2:] if value is None and name.startswith("no") and name[2:] in opts_hints \
            else name
        if key not in opts_hints:
            raise RecipeError(f"{where}: --{name} is neither a train flag nor an option of "
                              f"--model={model}")
        if value is None:
            value = "false" if key != name else "true"
        options[key] = _convert(opts_hints[key], value, where)
    if options:
        settings["model_options"] = options
    return settings


def stretched(settings: dict, epochs: float) -> dict:
    """The recipe run for `epochs`, its schedule's shape kept: the warmup is the same fraction
    of the run (what airbench's triangle fixes); per-epoch settings such as
    whiten_bias_epochs stay as they are."""
    base = settings.get("epochs", TrainConfig.__dataclass_fields__["epochs"].default)
    warmup = settings.get("warmup_epochs",
                          TrainConfig.__dataclass_fields__["warmup_epochs"].default)
    return {**settings, "epochs": float(epochs), "warmup_epochs": warmup * epochs / base}


def rebatched(settings: dict, batch_size: int) -> dict:
    """The recipe at another global batch size with the same step per example: airbench's
    hyperparameters are per example of a summed loss, so the learning rate of our mean loss
    scales with the batch (the weight decay is an L2 coefficient relative to the learning
    rate and stays)."""
    if settings.get("optimizer") == "muon":
        raise RecipeError(f"a Muon recipe has no rule to rescale to --batch_size={batch_size}: "
                          "its Muon step is normalised, not per example (airbench94_muon "
                          "sets its rates for its own batch only)")
    base = settings.get("batch_size", TrainConfig.__dataclass_fields__["batch_size"].default)
    lr = settings.get("learning_rate",
                      TrainConfig.__dataclass_fields__["learning_rate"].default)
    return {**settings, "batch_size": batch_size, "learning_rate": lr * batch_size / base}


def airbench93() -> dict:
    """airbench93 as settings: the fast recipe with AIRBENCH93_WIDTHS, AIRBENCH93_EPOCHS.
    The train app runs it as
    `--flagfile=research/recipes/fast_cifar10.flags --widths=64,128,128 --epochs=11
    --warmup_epochs=2.53`."""
    fast = load_recipe(FAST_CIFAR10)
    out = stretched(fast, AIRBENCH93_EPOCHS)
    out["model_options"] = {**fast.get("model_options", {}), "widths": AIRBENCH93_WIDTHS}
    return out
