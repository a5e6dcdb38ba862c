"""Settings that carry everything known about themselves: a dataclass field with its help, its
allowed choices, its numeric range and whether a resumed run may change it, all in the field's
metadata.

The apps derive their flags from these fields (research.apps.config_flags), `validate()`
methods check the choices and ranges from them, and the resume check reads which fields may
change, so a new setting is one field:

    learning_rate: float = setting(0.2, "Peak learning rate.", ge=0, resume=True)

Ranges: `ge`/`gt` (>=, >) and `le`/`lt` (<=, <). A tuple value is checked element by element;
None (an unset optional setting) is never checked. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Iterable

Range = tuple  # (low, high, low included?, high included?); a bound of None is open


def base_type(hint):
    """(base type, element type for tuples) of a field's type hint, `| None` removed."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return base_type(args[0])
    if origin is tuple:
        return tuple, typing.get_args(hint)[0]
    return hint, None


def setting(default: Any, help: str, *, choices: Iterable[str] | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, resume: bool = False, flag: bool = True,
            **metadata) -> Any:
    """A dataclass field. `resume=True`: a resumed run may change it (lengths, intervals,
    learning-rate settings); otherwise it is part of what the run is (network, data) and a
    resume that changes it is refused. `flag=False`: no command-line flag."""
    meta = {"help": help, "resume": resume, "flag": flag, **metadata}
    if choices is not None:
        meta["choices"] = tuple(choices)
    r = bounds(ge=ge, gt=gt, le=le, lt=lt)
    if r is not None:
        meta["range"] = r
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def bounds(ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Range | None:
    """The range of ge/gt (>=, >) and le/lt (<=, <); None when no bound is given."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise ValueError("give one lower and one upper bound at most")
    if all(b is None for b in (ge, gt, le, lt)):
        return None
    return (ge if gt is None else gt, le if lt is None else lt, gt is None, lt is None)


def describe_range(r: Range) -> str:
    lo, hi, lo_in, hi_in = r
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo}"
    if lo is None:
        return f"{'<=' if hi_in else '<'} {hi}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def range_error(value, r: Range) -> str | None:
    """'must be ..., got v' if `value` (a number, or each number of a tuple) is outside `r`;
    NaN and infinities are never inside a range."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    lo, hi, lo_in, hi_in = r
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {value!r}"
        ok = math.isfinite(v)
        if ok and lo is not None:
            ok = v >= lo if lo_in else v > lo
        if ok and hi is not None:
            ok = v <= hi if hi_in else v < hi
        if not ok:
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            return f"must be {describe_range(r)}, got {shown}"
    return None


def field_errors(obj) -> list[tuple[str, str]]:
    """[(field, message)] for every set field of dataclass `obj` outside its choices or
    range."""
    errors = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            errors.append((f.name, f"{value!r} is not one of {', '.join(choices)}"))
        elif "range" in f.metadata:
            problem = range_error(value, f.metadata["range"])
            if problem:
                errors.append((f.name, problem))
    return errors


def first_error(obj) -> tuple[str, str] | None:
    errors = field_errors(obj)
    return errors[0] if errors else None


def resumable(cls) -> frozenset[str]:
    """The fields of `cls` a resumed run may change."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume"))


def default_of(cls, name: str):
    """A field's default (its factory's value for lists and dicts)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()
