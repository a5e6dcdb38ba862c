"""absl flags derived from dataclass fields, and back: name, type, default and help come from
the field (help and `choices` in its metadata), so a default lives only in its dataclass.

  bool -> DEFINE_bool; int -> DEFINE_integer; float -> DEFINE_float; str -> DEFINE_string, or
  DEFINE_enum with metadata choices; tuple[...] -> DEFINE_list (converted back to a tuple of
  the element type). `X | None` defaults to None. Fields with metadata flag=False are skipped.

Every function takes the FlagValues to define on or read from: the apps pass absl's global
FLAGS (research/apps/config_flags.py), a library its own private FlagValues (the recipe
reader, research/training/recipes.py), so no library touches FLAGS.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from absl import flags

from research.errors import UserError
from research.fields import base_type, default_of


class FlagValueError(UserError):
    """A list flag whose items do not convert; the message names the flag."""


def flag_fields(cls, skip=()) -> list[tuple[dataclasses.Field, type, type | None]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("flag", True) is False:
            continue
        base, elem = base_type(hints[f.name])
        out.append((f, base, elem))
    return out


def _model_name(cls) -> str:
    return cls.__name__.removesuffix("Options").lower()


def define_flags(cls, flag_values: flags.FlagValues, skip=(),
                 module_name: str | None = None) -> list[str]:
    """Defines one flag per field of `cls`; a flag that already exists (absl's own --log_dir)
    only gets its default set. A field that two option classes share with different defaults
    (--widths of the scratch and the fast network) gets the default None, read back as "the
    model's own default", and its help lists each. The flags belong to the calling app
    (`module_name`), so its --help lists them. Returns the names."""
    module_name = module_name or _module_name(sys._getframe(1))
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
        kw = dict(flag_values=flag_values, module_name=module_name)
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
        if "range" in f.metadata and base in (int, float):  # lists: checked once converted
            flag_values[f.name]._range = f.metadata["range"]
        if cls.__name__.endswith("Options"):  # a model's options: may be shared (above)
            flag_values[f.name]._option_defaults = {_model_name(cls): default}
            flag_values[f.name]._helps = [help_text]
    return names


def values_from_flags(cls, flag_values: flags.FlagValues, skip=()) -> dict:
    """{field: value} read back from the flags, list flags converted to typed tuples. A shared
    option flag left at None (see define_flags) reads as `cls`'s own default."""
    out, hints = {}, typing.get_type_hints(cls)
    for f, base, elem in flag_fields(cls, skip):
        value = flag_values[f.name].value
        if value is None and len(getattr(flag_values[f.name], "_option_defaults", ())) > 1:
            out[f.name] = default_of(cls, f.name)
            continue
        out[f.name] = typed(f.name, value, hints[f.name])
    return out


def typed(name: str, value, hint):
    """A value as absl's parser gives it (a list flag: strings), in the field's type: list
    flags become tuples of the element type."""
    base, elem = base_type(hint)
    if base is tuple and value is not None:
        try:
            return tuple(elem(v) for v in value)
        except ValueError as e:
            raise FlagValueError(f"--{name}: {','.join(value)!r} is not a list of "
                                 f"{elem.__name__} ({e})") from e
    return value


def _module_name(frame) -> str:
    """absl's name for the module of `frame` (the main module goes by sys.argv[0])."""
    name = frame.f_globals["__name__"]
    return sys.argv[0] if name == "__main__" else name
