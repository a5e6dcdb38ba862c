"""One invocation of the lab, and its bookkeeping, written once for every stage (`run_stage`):
the records of the stages it ran (kept in <workdir>/logs/lab/stages/ so that a later
invocation's report can show them), the exact command of each stage, and the done-markers
of the stages that write figures, keyed by their inputs."""

from __future__ import annotations

import dataclasses
import os
import shlex
import time

from research import devices, files, machine
from research.lab.profiles import LabProfile
from research.lab.settings import LabSettings
from research.lab.stage import Done, Stage
from research.lab.stages import BY_NAME
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

    def stage_settings(self, name: str) -> dict:
        """Stage `name`'s settings (its record's) on this profile, --quick and the overrides
        applied."""
        return BY_NAME[name].settings_for(self.s.profile, self.s.quick, self.s.overrides)

    def finish(self, stage: Stage, start: float, done: Done) -> StageRecord:
        """The stage's record: a reused stage keeps the versions and time of the run that
        did the work."""
        wall = time.perf_counter() - start
        before = self.stored(stage.name) if done.reused else None
        versions = (before or {}).get("versions") or self.versions
        ran = (before or {}).get("ran_seconds") if done.reused else wall
        if ran is None:
            ran = done.ran_seconds
        rec = StageRecord(stage.name, stage.title, list(done.commands), done.flags, done.reused,
                          round(wall, 1), None if ran is None else round(ran, 1), versions,
                          done.outputs, list(done.notes))
        word = "reused" if done.reused else "done"
        print(f"[lab] {stage.name}: {word} in {wall:.1f}s", flush=True)
        return self.save(rec)


def run_stage(lab: Lab, stage: Stage) -> StageRecord:
    """Runs one stage and keeps its record. A stage with a key is reused whole when its
    done-marker was written for the same key and its figures are still there; otherwise it
    runs (its own code reuses finished trainings and resumes interrupted ones) and, once
    done, its marker is written for the key as it is then (its own outputs may be among its
    inputs)."""
    start = time.perf_counter()
    marker = os.path.join(lab.out_dir(stage.name), "done.json")
    if stage.key is not None:
        key, old = stage.key(lab), read_marker(marker)
        if key is not None and reusable(old, key):
            return lab.finish(stage, start, Done(reused=True, **_marker_done(lab, stage, old)))
    done = stage.run(lab)
    key = stage.key(lab) if stage.key is not None and not done.reused else None
    if key is not None:
        write_marker(marker, key, done)
    return lab.finish(stage, start, done)


def read_marker(path: str) -> dict | None:
    """A stage's JSON marker or record (None: not written yet)."""
    return files.read_json(path) if os.path.isfile(path) else None


def write_marker(path: str, key: dict, done: Done) -> None:
    """What a figure stage did and for which inputs (`key`): reused when the key matches."""
    kept = {k: v for k, v in dataclasses.asdict(done).items() if k != "reused"}
    files.write_json(path, {"key": key, "done": kept}, "the stage's marker")


def reusable(marker: dict | None, key: dict) -> bool:
    """The marker was written for `key` and every file its outputs list (under "figures"
    and "files") is still there."""
    if marker is None or marker.get("key") != key:
        return False
    outputs = marker["done"]["outputs"] if "done" in marker else marker["outputs"]
    return all(os.path.isfile(f) for k in ("figures", "files") for f in outputs.get(k, []))


def _marker_done(lab: Lab, stage: Stage, marker: dict) -> dict:
    """The Done a marker keeps; a marker of an older lab kept only the outputs, and the
    stage's stored record the rest."""
    if "done" in marker:
        return marker["done"]
    rec = lab.stored(stage.name) or {}
    return {"commands": rec.get("commands", []), "flags": rec.get("flags", {}),
            "outputs": marker["outputs"], "notes": rec.get("notes", [])}


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
