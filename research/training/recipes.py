"""Published recipes as TrainConfig settings: a recipe is a flagfile of train flags
(research/recipes/*.flags, the one home of its values), read here into the settings a
library caller (the lab) passes to TrainConfig. It is read by absl's own parser with the train
app's own flag definitions (`define_train_flags`), on a private FlagValues, so it means what
the train app would parse from it (tests/training/test_recipes.py checks the two agree);
sweep spaces (research/sweep/space.py) read their values the same way (`read_value`).

    settings = load_recipe(FAST_CIFAR10)   # {"model": "fast", "epochs": 10.0, ...,
                                           #  "model_options": {"bn_momentum": 0.6, ...}}
"""

from __future__ import annotations

import os
import typing

from absl import flags

from research import dataclass_flags
from research.errors import UserError
from research.fields import default_of
from research.model_options import MODEL_OPTIONS, options_class
from research.training.config import TrainConfig

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "recipes")
FAST_CIFAR10 = os.path.join(RECIPES_DIR, "fast_cifar10.flags")
FAST_CIFAR10_MUON = os.path.join(RECIPES_DIR, "fast_cifar10_muon.flags")
AIRBENCH95 = os.path.join(RECIPES_DIR, "airbench95.flags")
AIRBENCH96 = os.path.join(RECIPES_DIR, "airbench96.flags")
AIRBENCH96_FASTER = os.path.join(RECIPES_DIR, "airbench96_faster.flags")
PHOTOS_FROM_CIFAR = os.path.join(RECIPES_DIR, "photos_from_cifar.flags")

# airbench93 (lib_airbench93.py of airbench==0.1.8; its whole diff against lib_airbench94.py):
# the fast recipe with the last two groups at 128 channels instead of 256 and 11 epochs
# instead of 9.9, the triangle's peak still at 23% of the run. airbench says "roughly 1/4 of
# the FLOPs"; by our count (research.models.flops) it is 0.46 of them per image (training
# step 0.324 vs 0.708 GFLOP: the first group, unchanged at 64 channels on the 31x31 map,
# carries most of the cost), 0.51 per run with the longer schedule.
AIRBENCH93_WIDTHS = (64, 128, 128)
AIRBENCH93_EPOCHS = 11.0


class RecipeError(UserError):
    """A recipe file that does not read as train flags; the message names the file and line."""


def define_train_flags(flag_values: flags.FlagValues, module_name: str) -> None:
    """Every train flag on `flag_values`: TrainConfig's fields, then every model's options
    (the train app's, on absl's FLAGS, and this reader's, on its own)."""
    # --log_dir is absl.logging's own flag on FLAGS (where absl would put log files, which it
    # does not do unless asked); define_flags only sets its default, and it serves as the
    # TensorBoard parent.
    dataclass_flags.define_flags(TrainConfig, flag_values, module_name=module_name)
    for options in dict.fromkeys(MODEL_OPTIONS.values()):  # once each, in order
        dataclass_flags.define_flags(options, flag_values, module_name=module_name)


def config_from_flags(flag_values: flags.FlagValues) -> TrainConfig:
    """The TrainConfig the train flags describe (its model's options from their flags)."""
    cfg = TrainConfig(**dataclass_flags.values_from_flags(TrainConfig, flag_values))
    options_cls = options_class(cfg.model, cfg.uses_backbone)
    cfg.model_options = (dataclass_flags.values_from_flags(options_cls, flag_values)
                         if options_cls else {})
    return cfg


def _train_flags() -> flags.FlagValues:
    flag_values = flags.FlagValues()
    define_train_flags(flag_values, "research.apps.train")
    return flag_values


def _parse_line(flag_values: flags.FlagValues, text: str, where: str) -> str:
    """Parses one flag line with absl's parser; returns the name of the flag it sets."""
    before = {name: flag_values[name].present for name in flag_values}
    try:
        flag_values(["recipe", text])
    except flags.UnrecognizedFlagError:
        raise RecipeError(f"{where}: {text.split('=')[0]} is neither a train flag nor a "
                          "model's option") from None
    except flags.Error as e:
        raise RecipeError(f"{where}: {e}") from None
    return next(name for name in flag_values if flag_values[name].present != before[name])


def read_value(name: str, text: str, where: str, hint) -> object:
    """`text` as a value of train's flag --`name`, read by that flag's own absl parser and
    typed as its field (`hint`): what `--name=text` gives the train app."""
    flag_values = _train_flags()
    try:
        value = flag_values[name].parser.parse(text)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from None
    try:
        return dataclass_flags.typed(name, value, hint)
    except dataclass_flags.FlagValueError as e:
        raise RecipeError(f"{where}: {e}") from None


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
    flag_values = _train_flags()
    given = {}
    for name, value, where in _lines(path):
        if name == "flagfile":
            raise RecipeError(f"{where}: a recipe cannot include another (--flagfile)")
        text = f"--{name}" if value is None else f"--{name}={value}"
        given[_parse_line(flag_values, text, where)] = where
    train_fields = {f.name for f, _, _ in dataclass_flags.flag_fields(TrainConfig)}
    read = dataclass_flags.values_from_flags(TrainConfig, flag_values)
    settings = {k: read[k] for k in given if k in train_fields}
    model = settings.get("model", default_of(TrainConfig, "model"))
    cls = options_class(model, TrainConfig(data_dir="", run_name="", **settings).uses_backbone)
    hints = typing.get_type_hints(cls) if cls else {}
    options = {}
    for key, where in given.items():
        if key in train_fields:
            continue
        if key not in hints:
            raise RecipeError(f"{where}: --{key} is neither a train flag nor an option of "
                              f"--model={model}")
        try:
            options[key] = dataclass_flags.typed(key, flag_values[key].value, hints[key])
        except dataclass_flags.FlagValueError as e:
            raise RecipeError(f"{where}: {e}") from None
    if options:
        settings["model_options"] = options
    return settings


def stretched(settings: dict, epochs: float) -> dict:
    """The recipe run for `epochs`, its schedule's shape kept: the warmup is the same fraction
    of the run (what airbench's triangle fixes); per-epoch settings such as
    whiten_bias_epochs stay as they are."""
    base = settings.get("epochs", default_of(TrainConfig, "epochs"))
    warmup = settings.get("warmup_epochs", default_of(TrainConfig, "warmup_epochs"))
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
    base = settings.get("batch_size", default_of(TrainConfig, "batch_size"))
    lr = settings.get("learning_rate", default_of(TrainConfig, "learning_rate"))
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
