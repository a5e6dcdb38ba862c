"""absl flags derived from dataclass fields, and back: name, type, default and help come from
the field (help and `choices` in its metadata), so a default lives only in its dataclass.

  bool -> DEFINE_bool; int -> DEFINE_integer; float -> DEFINE_float; str -> DEFINE_string, or
  DEFINE_enum with metadata choices; tuple[...] -> DEFINE_list (converted back to a tuple of
  the element type). `X | None` defaults to None. Fields with metadata flag=False are skipped.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from absl import flags


class FlagValueError(ValueError):
    """A list flag whose items do not convert; the message names the flag."""


def _base_type(hint):
    """(base type, element type for tuples) with `| None` removed."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is tuple:
        return tuple, typing.get_args(hint)[0]
    return hint, None


def flag_fields(cls, skip=()) -> list[tuple[dataclasses.Field, type, type | None]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("flag", True) is False:
            continue
        base, elem = _base_type(hints[f.name])
        out.append((f, base, elem))
    return out


def _model_name(cls) -> str:
    return cls.__name__.removesuffix("Options").lower()


def define_flags(cls, skip=(), flag_values=flags.FLAGS) -> list[str]:
    """Defines one flag per field of `cls`; a flag that already exists (absl's own --log_dir)
    only gets its default set. A field that two option classes share with different defaults
    (--widths of the scratch and the fast network) gets the default None, read back as "the
    model's own default", and its help lists each. Returns the names."""
    names = []
    for f, base, elem in flag_fields(cls, skip):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        names.append(f.name)
        if base is tuple and default is not None:
            default = [str(v) for v in default]
        if f.name in flag_values:
            flag = flag_values[f.name]
            owners = getattr(flag, "_option_defaults", None)
            if owners is None:  # absl's own flag, or one of TrainConfig's
                flag_values.set_default(f.name, default)
                continue
            owners[_model_name(cls)] = default
            helps = flag._helps
            if f.metadata.get("help", f.name) not in helps:
                helps.append(f.metadata.get("help", f.name))
            if len({repr(v) for v in owners.values()}) > 1:
                flag_values.set_default(f.name, None)
                flag.help = " ".join(helps) + " Default per model: " + "; ".join(
                    f"{m} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for m, v in owners.items()) + "."
            continue
        help_text = f.metadata.get("help", f.name)
        kw = dict(flag_values=flag_values)
        if base is bool:
            flags.DEFINE_bool(f.name, default, help_text, **kw)
        elif base is int:
            flags.DEFINE_integer(f.name, default, help_text, **kw)
        elif base is float:
            flags.DEFINE_float(f.name, default, help_text, **kw)
        elif base is tuple:
            flags.DEFINE_list(f.name, default, help_text, **kw)
        elif f.metadata.get("choices"):
            flags.DEFINE_enum(f.name, default, list(f.metadata["choices"]), help_text, **kw)
        else:
            flags.DEFINE_string(f.name, default, help_text, **kw)
        if cls.__name__.endswith("Options"):  # a model's options: may be shared (above)
            flag_values[f.name]._option_defaults = {_model_name(cls): default}
            flag_values[f.name]._helps = [help_text]
    return names


def values_from_flags(cls, flag_values=flags.FLAGS, skip=()) -> dict:
    """{field: value} read back from the flags, list flags converted to typed tuples. A shared
    option flag left at None (see define_flags) reads as `cls`'s own default."""
    out = {}
    for f, base, elem in flag_fields(cls, skip):
        value = flag_values[f.name].value
        if value is None and len(getattr(flag_values[f.name], "_option_defaults", ())) > 1:
            out[f.name] = (f.default if f.default is not dataclasses.MISSING
                           else f.default_factory())
            continue
        if base is tuple and value is not None:
            try:
                value = tuple(elem(v) for v in value)
            except ValueError as e:
                raise FlagValueError(f"--{f.name}: {','.join(value)!r} is not a list of "
                                     f"{elem.__name__} ({e})") from e
        out[f.name] = value
    return out


def numeric_flag_errors(rules, flag_values=flags.FLAGS) -> list[str]:
    """'--flag: must be ..., got v' for every set numeric flag outside its range
    (rules as research.training.checks.Rule), so an app can refuse them before any work."""
    from research.training.checks import numeric_errors

    class _Values:  # getattr over the flag values, None for flags this app lacks
        def __getattr__(self, name):
            return flag_values[name].value if name in flag_values else None

    return [f"--{name}: {problem}" for name, problem in numeric_errors(_Values(), rules)]


def exit_on_numeric_errors(rules, flag_values=flags.FLAGS) -> None:
    """One line per bad numeric flag, then exit 1 (no traceback), before any work."""
    import sys

    errors = numeric_flag_errors(rules, flag_values)
    if errors:
        sys.exit("\n".join(f"error: {e}" for e in errors))
