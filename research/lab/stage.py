"""A lab stage declared once: the `Stage` record (what the stage is: its run, the stages it
reads, its report sections, its settings per profile) and `Done` (what one run of it
produced). The records themselves are the list in research.lab.stages; the bookkeeping every
stage shares (its record on disk, the done-marker keyed by its inputs, the reuse) is
research.lab.lab.run_stage.

This module loads no TensorFlow: the lab app reads the stage names and settings before its
flags are checked, and a record names its functions by `later("module:function")`, imported
when the stage first runs."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

PROFILE_BASE = "cpu"  # every profile's stage settings are changes to this one's


@dataclasses.dataclass(frozen=True)
class Done:
    """What a stage's run returns (research.lab.lab.run_stage turns it into the stage's
    record)."""
    commands: list                  # the commands that do the same by hand
    flags: dict                     # the settings it ran with, as the report shows them
    outputs: dict                   # what the report reads back
    notes: list = dataclasses.field(default_factory=list)
    reused: bool = False            # everything it shows was on disk already
    ran_seconds: float | None = None  # the work's own time when the wall time is not it


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the lab.

    `run(lab) -> Done` does the work (reusing what it finds finished: a trained run, its
    manifest); with a `key`, the stage is a figure stage: `key(lab)` is what its outputs
    depend on (None: an input is not there yet), and a done-marker written for the same key
    whose files are all still there (the outputs' "figures" and "files" lists) makes the
    lab reuse the stage whole without calling `run`. `sections` are its parts of the report,
    `(doc, lab, records) -> None`, in order.
    `needs` are the stages whose finished outputs it reads: a need left out of --stages must
    be on disk already (`ready(lab)` of the needed stage says what is missing); a stage with
    `joins` is not a --stages choice but runs with a stage that needs it when
    `joins(lab)`. `check(lab)` raises a LabError for input found bad before any work.
    `settings`: {"cpu": {...}, "gpu": {changes}, "quick": {changes under --quick}}; a
    setting named as a field of research.lab.profiles.Overrides takes that flag's value
    when it is given. The stage reads them as `lab.stage_settings(name)`."""
    name: str
    title: str
    run: Callable
    sections: tuple = ()
    needs: tuple = ()
    key: Callable | None = None
    ready: Callable | None = None
    joins: Callable | None = None
    check: Callable | None = None
    settings: dict = dataclasses.field(default_factory=dict)

    def settings_for(self, profile: str, quick: bool, overrides) -> dict:
        """The stage's settings on `profile`, shrunk by --quick, with the lab's overrides."""
        out = {**self.settings.get(PROFILE_BASE, {})}
        if profile != PROFILE_BASE:
            out.update(self.settings.get(profile, {}))
        if quick:
            out.update(self.settings.get("quick", {}))
        for name in out:
            value = getattr(overrides, name, None)
            if value is not None:
                out[name] = value
        return out


def later(path: str) -> Callable:
    """The function at "module:name", imported on its first call."""
    module, _, name = path.partition(":")
    found = []

    def call(*args, **kwargs):
        if not found:
            found.append(getattr(importlib.import_module(module), name))
        return found[0](*args, **kwargs)

    call.__qualname__ = call.__name__ = name
    call.path = path
    return call
