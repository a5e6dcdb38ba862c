"""Range checks of numeric settings: one table per config, one line per error.

`TrainConfig.validate()` runs `numeric_errors(cfg, TRAIN_RULES)` before any work, so a negative
learning rate or a zero batch size stops the run with the flag named, never a traceback or a
silently odd run. Apps with their own flags check them with the same helper.
"""

from __future__ import annotations

import math

# (field, lowest, highest, lowest allowed?, highest allowed?). None fields are unset flags
# and are not checked; a bound of None is open.
Rule = tuple[str, float | None, float | None, bool, bool]

TRAIN_RULES: tuple[Rule, ...] = (
    ("eval_batch_size", 1, None, True, True),
    ("learning_rate", 0, None, True, True),  # 0 is a legal (frozen) run; negative ascends
    ("warmup_epochs", 0, None, True, True),
    ("final_lr_fraction", 0, 1, True, True),
    ("momentum", 0, 1, True, False),
    ("weight_decay", 0, None, True, True),
    ("label_smoothing", 0, 1, True, False),
    ("bias_lr_scale", 0, None, False, True),
    ("lookahead_every", 0, None, True, True),
    ("lookahead_decay", 0, 1, True, False),
    ("crop_pad", 0, 16, True, True),
    ("clip_norm", 0, None, False, True),
    ("eval_every_steps", 1, None, True, True),
    ("checkpoint_every_steps", 1, None, True, True),
    ("keep_checkpoints", 1, None, True, True),
    ("cpu_replicas", 0, None, True, True),
    ("seed", 0, 2**32 - 1, True, True),  # numpy's seed range
    ("patience", 0, None, True, True),
    ("stop_at_step", 1, None, True, True),
    ("gradcam_images", 0, None, True, True),
    ("head_epochs", 0, None, False, True),
    ("head_lr", 0, None, True, True),
    ("fine_tune_lr", 0, None, True, True),
    ("fine_tune_epochs", 0, None, False, True),
    ("fine_tune_layers", 1, None, True, True),
    ("rotation_range", 0, 180, True, True),
    ("width_shift_range", 0, 1, True, False),
    ("height_shift_range", 0, 1, True, False),
    ("shear_range", 0, 90, True, False),
    ("zoom_range", 0, 1, True, False),
)


def _wanted(lo, hi, lo_in, hi_in) -> str:
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo}"
    if lo is None:
        return f"{'<=' if hi_in else '<'} {hi}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def range_error(value, lo=None, hi=None, lo_in=True, hi_in=True) -> str | None:
    """'must be ..., got v' if `value` is outside the range (NaN and inf are never in it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {value!r}"
    ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value >= lo if lo_in else value > lo
    if ok and hi is not None:
        ok = value <= hi if hi_in else value < hi
    return None if ok else f"must be {_wanted(lo, hi, lo_in, hi_in)}, got {value}"


def numeric_errors(obj, rules=TRAIN_RULES) -> list[tuple[str, str]]:
    """[(field, message)] for every set field of `obj` outside its range; fields `obj` does
    not have are skipped (rules may name options of another version of the config)."""
    errors = []
    for name, lo, hi, lo_in, hi_in in rules:
        value = getattr(obj, name, None)
        if value is None:
            continue
        problem = range_error(value, lo, hi, lo_in, hi_in)
        if problem:
            errors.append((name, problem))
    return errors
