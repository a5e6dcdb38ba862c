"""One invocation of the lab, and its bookkeeping: the records of the stages it ran (kept in
<workdir>/logs/lab/stages/ so that a later invocation's report can show them), the exact
command of each stage, and the done-markers of the stages that write figures."""

from __future__ import annotations

import dataclasses
import os
import shlex
import time

from research import devices, files, machine
from research.lab.profiles import LabProfile
from research.lab.settings import LabSettings
from research.training.config import TrainConfig

SPLIT = "test"  # what the lab reports on


class Preempted(RuntimeError):
    """A signal ended a training run resumably; the same lab command resumes it."""


@dataclasses.dataclass
class StageRecord:
    name: str
    title: str
    commands: list
    flags: dict
    reused: bool
    wall_seconds: float          # this invocation
    ran_seconds: float | None    # when the stage did its work
    versions: dict
    outputs: dict
    notes: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Lab:
    """One invocation: the settings, the profile, and the records of the stages run."""

    def __init__(self, settings: LabSettings, source: str, source_line: str):
        self.s, self.source, self.source_line = settings, source, source_line
        # The replicas every run trains on (the devices were placed by the lab app).
        self.profile: LabProfile = settings.lab_profile(
            devices.replicas(settings.overrides.cpu_replicas or 0))
        self.records: dict[str, StageRecord] = {}
        self._versions = None
        self.weights, self.weights_note = None, ""

    @property
    def versions(self) -> dict:
        if self._versions is None:
            self._versions = machine.versions()
        return self._versions

    def run_name(self, key: str) -> str:
        return self.profile.run_prefix + key

    def out_dir(self, stage: str) -> str:
        """<workdir>/logs/lab/<prefix><stage>: a stage's figures and its done-marker."""
        return os.path.join(self.s.lab_dir, f"{self.profile.run_prefix}{stage}")

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.s.lab_dir, "stages")

    def record_path(self, stage: str) -> str:
        return os.path.join(self.stage_dir, f"{self.profile.run_prefix}{stage}.json")

    def stored(self, stage: str) -> dict | None:
        return read_marker(self.record_path(stage))

    def save(self, rec: StageRecord) -> StageRecord:
        files.write_json(self.record_path(rec.name), rec.to_json(), "the lab's stage record")
        self.records[rec.name] = rec
        return rec

    def finish(self, name, title, start, reused, commands, flags, outputs, notes=(),
               ran_seconds=None) -> StageRecord:
        """The stage's record: a reused stage keeps the versions and time of the run that
        did the work."""
        wall = time.perf_counter() - start
        before = self.stored(name) if reused else None
        versions = (before or {}).get("versions") or self.versions
        ran = (before or {}).get("ran_seconds") if reused else wall
        if ran is None:
            ran = ran_seconds
        rec = StageRecord(name, title, list(commands), flags, reused, round(wall, 1),
                          None if ran is None else round(ran, 1), versions, outputs,
                          list(notes))
        word = "reused" if reused else "done"
        print(f"[lab] {name}: {word} in {wall:.1f}s", flush=True)
        return self.save(rec)


def read_marker(path: str) -> dict | None:
    """A stage's JSON marker or record (None: not written yet)."""
    return files.read_json(path) if os.path.isfile(path) else None


def write_marker(path: str, key: dict, outputs: dict) -> None:
    """What a figure stage did and for which inputs (`key`): reused when the key matches."""
    files.write_json(path, {"key": key, "outputs": outputs}, "the stage's marker")


def reusable(marker: dict | None, key: dict) -> bool:
    """The marker was written for `key` and every figure it lists is still there."""
    return marker is not None and marker.get("key") == key and all(
        os.path.isfile(f) for f in marker["outputs"]["figures"])


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def changed_flags(cfg: TrainConfig) -> dict:
    """The train flags that differ from TrainConfig's defaults, plus the model options."""
    defaults = TrainConfig()
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("flag", True) is False:
            continue
        v = getattr(cfg, f.name)
        if v != getattr(defaults, f.name):
            out[f.name] = v
    out.update(cfg.model_options)
    return out


def command(module: str, flags: dict) -> str:
    return " ".join(["python -m " + module] +
                    [shlex.quote(f"--{k}={_fmt(v)}") for k, v in flags.items()])
