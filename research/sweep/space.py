"""A sweep's search space: a file of train flags, each with a distribution, read by the same
reader as the recipe files (research.training.recipes), comments allowed:

    # research/recipes/photos_from_cifar.space
    --learning_rate=loguniform(1e-4, 3e-3)
    --rotation_range=int(0, 40)
    --head=choice(max, gap)

Distributions: uniform(a, b), loguniform(a, b) (a > 0), int(a, b) (inclusive; `int(a, b,
step)` too), choice(v1, v2, ...) (values as the flag's own type). A flag is a TrainConfig field
or an option of the fixed part's model. Every mistake is one line naming file:line.
"""

from __future__ import annotations

import dataclasses
import re
import typing

from research.errors import UserError
from research.fields import base_type
from research.model_options import options_class
from research.training import recipes
from research.training.config import TrainConfig

KINDS = ("uniform", "loguniform", "int", "choice")
_DISTRIBUTION = re.compile(r"^(\w+)\((.*)\)$")


class SpaceError(UserError):
    """A space file that does not read; the message names file:line and the flag."""


@dataclasses.dataclass(frozen=True)
class Param:
    name: str            # the train flag, without --
    kind: str            # one of KINDS
    args: tuple          # (low, high[, step]) or the choices, in the flag's type
    option: bool         # a model option (TrainConfig.model_options) rather than a field
    where: str           # file:line

    def describe(self) -> str:
        return f"--{self.name}={self.kind}({', '.join(map(str, self.args))})"


def _number(text: str, where: str, name: str, integer: bool = False):
    try:
        return int(text) if integer else float(text)
    except ValueError:
        what = "an integer" if integer else "a number"
        raise SpaceError(f"{where}: --{name}: {text!r} is not {what}") from None


def parse_line(name: str, value: str | None, where: str, hint) -> tuple[str, tuple]:
    """(kind, args) of one line's distribution, its values in the flag's type (`hint`)."""
    m = _DISTRIBUTION.match((value or "").strip())
    if not m:
        raise SpaceError(f"{where}: --{name}: give a distribution, one of "
                         f"{', '.join(k + '(...)' for k in KINDS)}; got {value!r}")
    kind, inner = m.group(1), m.group(2)
    if kind not in KINDS:
        raise SpaceError(f"{where}: --{name}: unknown distribution {kind!r}; use one of "
                         f"{', '.join(KINDS)}")
    items = [v.strip() for v in inner.split(",")] if inner.strip() else []
    base, _ = base_type(hint)
    if kind == "choice":
        if not items or any(v == "" for v in items):
            raise SpaceError(f"{where}: --{name}: choice() needs at least one value")
        try:
            values = tuple(recipes.read_value(name, v, f"{where}: --{name}", hint) for v in items)
        except recipes.RecipeError as e:
            raise SpaceError(str(e)) from None
        if len(set(values)) != len(values):
            raise SpaceError(f"{where}: --{name}: choice() repeats a value")
        return kind, values
    if base not in (int, float):
        raise SpaceError(f"{where}: --{name} is not a number flag: use choice(...)")
    if kind == "int" and base is not int:
        raise SpaceError(f"{where}: --{name} takes a float: use uniform or loguniform")
    if len(items) not in ((2, 3) if kind == "int" else (2,)):
        raise SpaceError(f"{where}: --{name}: {kind}(low, high{', step' if kind == 'int' else ''})"
                         f" takes {'2 or 3' if kind == 'int' else '2'} numbers, got {len(items)}")
    nums = tuple(_number(v, where, name, integer=kind == "int") for v in items)
    low, high = nums[0], nums[1]
    if not low < high:
        raise SpaceError(f"{where}: --{name}: {kind}({low}, {high}) is empty: low must be below "
                         "high")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: --{name}: loguniform needs low > 0, got {low}")
    if kind == "int" and len(nums) == 3 and nums[2] < 1:
        raise SpaceError(f"{where}: --{name}: int() step must be at least 1")
    if base is int and kind != "int":
        raise SpaceError(f"{where}: --{name} takes an integer: use int(low, high)")
    return kind, nums


def load_space(path: str, fixed: TrainConfig) -> tuple[Param, ...]:
    """The space file's parameters, checked against train's flags (the fixed part's model's
    options among them)."""
    lines = recipes._lines(path)
    if not lines:
        raise SpaceError(f"{path}: no parameter to search (one --flag=distribution per line)")
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cls = options_class(fixed.model, fixed.uses_backbone)
    option_hints = typing.get_type_hints(cls) if cls else {}
    out, seen = [], set()
    for name, value, where in lines:
        if name in seen:
            raise SpaceError(f"{where}: --{name} is given twice")
        seen.add(name)
        if name in ("run_name", "data_dir", "checkpoint_dir", "log_dir", "flagfile",
                    "restart"):
            raise SpaceError(f"{where}: --{name} is the sweep's to set, not a parameter")
        if name in fields:
            hint, option = hints[name], False
        elif name in option_hints:
            hint, option = option_hints[name], True
        else:
            raise SpaceError(f"{where}: --{name} is neither a train flag nor an option of "
                             f"--model={fixed.model}")
        kind, args = parse_line(name, value, where, hint)
        out.append(Param(name, kind, args, option, where))
    return tuple(out)


def suggest(trial, params: tuple[Param, ...]) -> dict:
    """{flag: value} drawn for `trial` (an optuna.Trial)."""
    values = {}
    for p in params:
        if p.kind == "uniform":
            values[p.name] = trial.suggest_float(p.name, p.args[0], p.args[1])
        elif p.kind == "loguniform":
            values[p.name] = trial.suggest_float(p.name, p.args[0], p.args[1], log=True)
        elif p.kind == "int":
            step = p.args[2] if len(p.args) == 3 else 1
            values[p.name] = trial.suggest_int(p.name, p.args[0], p.args[1], step=step)
        else:
            choices = [list(c) if isinstance(c, tuple) else c for c in p.args]
            picked = trial.suggest_categorical(p.name, choices)
            values[p.name] = tuple(picked) if isinstance(picked, list) else picked
    return values


def grid(params: tuple[Param, ...]) -> dict:
    """optuna's GridSampler search space: every choice, every int, uniform's two ends."""
    out = {}
    for p in params:
        if p.kind == "choice":
            out[p.name] = [list(c) if isinstance(c, tuple) else c for c in p.args]
        elif p.kind == "int":
            step = p.args[2] if len(p.args) == 3 else 1
            out[p.name] = list(range(p.args[0], p.args[1] + 1, step))
        else:
            out[p.name] = [p.args[0], p.args[1]]
    return out


def fingerprint(params: tuple[Param, ...]) -> str:
    """The space as one line, kept with the study: a space changed since is refused."""
    return "; ".join(p.describe() for p in params)


def apply(fixed: TrainConfig, params: tuple[Param, ...], values: dict,
          run_name: str) -> TrainConfig:
    """The trial's config: the fixed part with the drawn values (model options merged)."""
    fields = {p.name: values[p.name] for p in params if not p.option}
    options = {p.name: values[p.name] for p in params if p.option}
    return dataclasses.replace(fixed, run_name=run_name, **fields,
                               model_options={**fixed.model_options, **options})
