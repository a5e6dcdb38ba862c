"""Resuming with other settings: settings that change the network or the data must match the
run's config.json, which is written once; each session is a line of `<run>/sessions.jsonl`
with the settings it changed. Which settings may change is in each field's metadata
(`resume=True`, research.fields); every other field (model, its options, objective,
optimizer, precision, batch size, seed, data and augmentation, new fields by default) must
match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket

from absl import logging

from research import machine, runs
from research.data.manifest import has_manifest, manifest_path
from research.fields import resumable
from research.model_options import options_with_defaults
from research.training import checkpoints
from research.training.config import ConfigError, TrainConfig
from research.training.runlock import now

MAY_CHANGE = resumable(TrainConfig)  # model options never may: they are the network


class ResumeMismatchError(ConfigError):
    """A resume with settings that change the network or the data."""


def _plain(value):
    return json.loads(json.dumps(value))


def _flat(cfg: TrainConfig) -> dict:
    """Settings by flag name (model options as their own flags, an option the record lacks
    at its default)."""
    d = _plain(dataclasses.asdict(cfg))
    options = options_with_defaults(cfg.model, d.pop("model_options"), cfg.uses_backbone)
    for k, v in _plain(options).items():
        d[k] = v
    return d


def manifest_digest(data_dir: str) -> str | None:
    if not has_manifest(data_dir):
        return None
    with open(manifest_path(data_dir), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _saved(cfg: TrainConfig) -> TrainConfig | None:
    """The run's recorded config if the run has a checkpoint to resume, else None."""
    if cfg.restart or not runs.has_config(cfg.run_dir) or not checkpoints.on_disk(
            cfg.run_dir):
        return None
    return TrainConfig.from_dict(runs.read_config(cfg.run_dir))


def resume_changes(cfg: TrainConfig) -> dict:
    """{flag: [recorded, now]} for every setting that differs from the run's config.json."""
    saved = _saved(cfg)
    if saved is None:
        return {}
    old, new = _flat(saved), _flat(cfg)
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def check_resume(cfg: TrainConfig) -> dict:
    """Refuses (before any work) a resume whose settings change the network or the data,
    listing them; returns the allowed changes."""
    changed = resume_changes(cfg)
    fixed = {k: v for k, v in changed.items() if k not in MAY_CHANGE}
    if _saved(cfg) is not None:  # the data itself, wherever it now lives
        starts = [s for s in runs.read_sessions(cfg.run_dir) if not s.get("start_step")]
        was = starts[-1].get("manifest_sha256") if starts else None
        now = manifest_digest(cfg.data_dir)
        if was and now != was:
            fixed["data_dir (manifest.json)"] = [f"sha256 {was[:12]}",
                                                 f"sha256 {now[:12]}" if now else "missing"]
    if fixed:
        listed = "; ".join(f"--{k}: {a} -> {b}" for k, a, b in
                           ((k, *v) for k, v in fixed.items()))
        raise ResumeMismatchError(
            f"--run_name={cfg.run_name}: resuming {cfg.run_dir} with settings that change the "
            f"network or the data ({listed}); use a new --run_name, or --restart to discard "
            "the run")
    if changed:
        logging.info("Resuming with changed settings: %s", ", ".join(
            f"--{k} {a} -> {b}" for k, (a, b) in changed.items()))
    return changed


class RunWouldBeLostError(ConfigError):
    """Starting the run anew would overwrite a run that cannot be resumed."""


def check_nothing_lost(cfg: TrainConfig) -> None:
    """Before a run starts from step 0 (no --restart): its folder must not hold a run it
    would overwrite. Checkpoints without the config.json that says how they were trained, or
    a record of training (train_summary.json, history.jsonl) without any checkpoint, stop
    here with one line naming them and the two ways on."""
    if cfg.restart:
        return
    found = [os.path.basename(p) for p in checkpoints.on_disk(cfg.run_dir)]
    ways = ("pass --restart to discard it and train anew, or give a new --run_name")
    if found and not runs.has_config(cfg.run_dir):
        raise RunWouldBeLostError(
            f"--run_name={cfg.run_name}: {cfg.run_dir} holds checkpoints ({', '.join(found)}) "
            f"but no {runs.CONFIG} saying how they were trained; {ways}")
    if found:
        return
    summary, history = runs.read_summary(cfg.run_dir), runs.read_history(cfg.run_dir)
    trained = max([summary.get("final_step") or 0] + [r["step"] for r in history])
    if trained > 0:
        raise RunWouldBeLostError(
            f"--run_name={cfg.run_name}: {cfg.run_dir} holds a run trained to step {trained:,} "
            f"({runs.SUMMARY}, {runs.HISTORY}) but no checkpoint to resume it from; starting "
            f"again would overwrite its record: {ways}")


def record_session(cfg: TrainConfig, flagfile: str | None, start_step: int) -> None:
    """A fresh run writes its record (config.json, flags, versions) once; every session
    appends a line to sessions.jsonl with what it changed."""
    changed = resume_changes(cfg) if start_step else {}
    versions = machine.versions()
    if not start_step:
        runs.write_record(cfg.run_dir, cfg.to_json(), versions, flagfile)
    runs.append_session(cfg.run_dir, {
        "started": now(), "host": socket.gethostname(), "pid": os.getpid(),
        "start_step": start_step, "changed": changed,
        "manifest_sha256": manifest_digest(cfg.data_dir), "versions": versions,
        "flags": flagfile})
