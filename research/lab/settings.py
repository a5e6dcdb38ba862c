"""What one invocation of the lab is asked to do (the app's flags, as plain values), and the
checks that need no TensorFlow: they run before any work, so bad input costs one line."""

from __future__ import annotations

import dataclasses
import json
import os

from research.data.manifest import has_manifest, manifest_path
from research.errors import UserError
from research.fields import field_errors
from research.lab.profiles import (PROFILES, LabProfile, Overrides, apply_overrides, per_replica,
                                   quick)
from research.lab.stages import CHOICES
# The repository's CIFAR-10 copy, relative to the repository root (where `make` runs).
LOCAL_SOURCE = os.path.join("..", "shared", "data", "cifar10-jpg.tar.gz")
OFFICIAL_SOURCE = "cifar10"
WEIGHTS_MODES = ("auto", "imagenet", "source_task")


class LabError(UserError):
    """Bad lab input; the message names the flag or file."""


@dataclasses.dataclass
class LabSettings:
    workdir: str = "."
    source: str | None = None        # None: the local copy if present, else the official one
    weights: str = "auto"            # auto | imagenet | source_task | <.h5 file>
    images: tuple = ()               # the user's own photos to explain
    photo_source: str | None = None  # the photos stage's tar or folder (None: the shared one)
    stages: tuple = CHOICES
    profile: str = "cpu"
    quick: bool = False
    overrides: Overrides = dataclasses.field(default_factory=Overrides)
    progress: bool = False
    command: str = "python -m research.apps.lab"

    @property
    def data_dir(self) -> str:
        return os.path.normpath(os.path.join(self.workdir, "data", "cifar10"))

    @property
    def download_dir(self) -> str:
        return os.path.normpath(os.path.join(self.workdir, "data", "downloads"))

    @property
    def checkpoint_dir(self) -> str:
        return os.path.normpath(os.path.join(self.workdir, "checkpoints"))

    @property
    def log_dir(self) -> str:
        return os.path.normpath(os.path.join(self.workdir, "logs"))

    @property
    def lab_dir(self) -> str:
        return os.path.join(self.log_dir, "lab")

    def lab_profile(self, replicas: int = 1) -> LabProfile:
        """The profile for `replicas` replicas (its per-replica batches made global), the
        --quick shrink and the overrides (global values) applied."""
        p = PROFILES[self.profile]
        return apply_overrides(per_replica(quick(p) if self.quick else p, replicas),
                               self.overrides)


def pick_source(source: str | None, data_dir: str | None = None) -> tuple[str, str]:
    """(source, the line that says which one and why). Without --source, TFRecords already
    in `data_dir` are kept with the source they were built from."""
    if source:
        return source, f"source: {source} (--source)"
    if has_manifest(data_dir):
        manifest = manifest_path(data_dir)
        try:
            with open(manifest) as f:
                built_from = json.load(f)["source"]
            return built_from, (f"source: {built_from} (the TFRecords already in {data_dir} "
                                "were built from it; --source to choose)")
        except (OSError, ValueError, KeyError):
            pass  # the data stage names the problem
    if os.path.isfile(LOCAL_SOURCE):
        return LOCAL_SOURCE, f"source: {LOCAL_SOURCE} (the local copy)"
    return OFFICIAL_SOURCE, (f"source: {OFFICIAL_SOURCE}, the official archive (downloaded "
                             f"once into data/downloads, sha256-checked; {LOCAL_SOURCE} is "
                             "not there)")


def check(s: LabSettings) -> None:
    """Flag errors that need no model and no data."""
    if s.profile not in PROFILES:
        raise LabError(f"--profile: {s.profile!r} is not one of {', '.join(PROFILES)}")
    unknown = [x for x in s.stages if x not in CHOICES]
    if unknown or not s.stages:
        raise LabError(f"--stages: {', '.join(unknown) or 'none given'}: choose from "
                       f"{','.join(CHOICES)}")
    if os.path.exists(s.workdir) and not os.path.isdir(s.workdir):
        raise LabError(f"--workdir: {s.workdir} is not a folder")
    if s.weights not in WEIGHTS_MODES:
        if not s.weights.endswith(".h5"):
            raise LabError(f"--weights: {s.weights!r} is not one of {', '.join(WEIGHTS_MODES)} "
                           "or a .h5 weights file of the backbone")
        if not os.path.isfile(s.weights):
            raise LabError(f"--weights: {s.weights} not found")
    if s.photo_source and not os.path.exists(s.photo_source):
        raise LabError(f"--photo_source: {s.photo_source} not found")
    for path in s.images:
        if not os.path.isfile(path):
            raise LabError(f"--images: {path} not found")
    for name, problem in field_errors(s.overrides):  # the one table: Overrides' fields
        raise LabError(f"--{name}: {problem}")
    counts = s.overrides.photo_counts
    if counts is not None and len(counts) != 3:
        raise LabError(f"--photo_counts: give TRAIN,VAL,TEST photos per class, got "
                       f"{','.join(map(str, counts))}")
