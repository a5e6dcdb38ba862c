"""A run folder, `checkpoints/<run>/`: the one module that knows its files, reads them and
writes them (atomically, research.files). Training writes a run; evaluate, compare, predict,
explain, the lab and transfer from a run read it, all through here.

    config.json          the run's TrainConfig, written once when it starts
    flags.txt            the flagfile it was started with; versions.json
    sessions.jsonl       one line per session (start step, settings it changed, data digest)
    train_summary.json   steps, train seconds per session, best val, final val, the export
    history.jsonl        one row per evaluation; curves.png drawn from it
    model_summary.txt    layers, output shapes, parameters, receptive fields, multiply-adds
    ckpt-<step>.*        rolling checkpoints (+ `checkpoint`, the index); best/ the best one
    export/model.keras   the finished detector (Keras' own layers); export/metadata.json how
                         to feed and read it; export/saved_model/ the same detector for TF
                         Serving (uint8 images in, P(positive) out); export/model.tflite
                         when converted (research.export)
    eval_<split>.json    what evaluate reported (figures_<split>/ beside it)

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import zipfile

from research import files
from research.errors import UserError

CHECKPOINT_DIR = "checkpoints"  # the one default of every app's --checkpoint_dir
LOG_DIR = "logs"                # ... and of --log_dir (TensorBoard)

CONFIG = "config.json"
FLAGS = "flags.txt"
VERSIONS = "versions.json"
SESSIONS = "sessions.jsonl"
SUMMARY = "train_summary.json"
HISTORY = "history.jsonl"
CURVES = "curves.png"
MODEL_SUMMARY = "model_summary.txt"
EXPORT = "export"
MODEL_FILE = "model.keras"
METADATA = "metadata.json"
SAVED_MODEL = "saved_model"
TFLITE_FILE = "model.tflite"
# What predict, explain and compare need of an export's metadata.json.
METADATA_KEYS = ("objective", "positive_class", "positive_class_id", "class_names",
                 "image_shape", "scale", "threshold", "tta")
# The metadata keys that must match the data a run is scored on.
DATA_KEYS = ("class_names", "positive_class", "image_shape")


class RunError(UserError):
    """A run folder that is missing, unfinished or unreadable; the message names the file."""


# A run's (or a sweep study's) name becomes folder and file names, and is pasted into shell
# commands: letters, digits and ._- only (POSIX's portable file name characters).
PORTABLE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def name_error(name) -> str | None:
    """Why `name` is not a portable file name (None: it is)."""
    if not name:
        return "give a name"
    if not PORTABLE_NAME.match(name) or set(name) == {"."}:
        return (f"{name!r} is not a portable file name: use letters, digits and . _ - only "
                "(no spaces, no slashes, not just dots)")
    return None


def recorded_log_dir(recorded: dict, checkpoint_dir: str) -> str | None:
    """A run's recorded --log_dir (config.json) as train resolved it: a relative one against
    the folder train ran in, found from where its recorded relative --checkpoint_dir is now
    (`checkpoint_dir`); None when that cannot be told (a run moved to another name)."""
    log_dir, ck = recorded.get("log_dir"), recorded.get("checkpoint_dir")
    if not log_dir or os.path.isabs(log_dir):
        return log_dir or None
    if not ck or os.path.isabs(ck):
        return None
    now, rec = os.path.abspath(checkpoint_dir), os.path.normpath(ck)
    if rec == ".":
        return os.path.join(now, log_dir)
    if now.endswith(os.sep + rec):
        return os.path.join(now[:-len(rec) - 1], log_dir)
    return None


def run_dir(checkpoint_dir: str, run_name: str) -> str:
    return os.path.join(checkpoint_dir, run_name)


def list_runs(checkpoint_dir: str) -> list[str]:
    """Names of the folders in `checkpoint_dir` that hold a run's config.json."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(d for d in os.listdir(checkpoint_dir)
                  if os.path.isfile(os.path.join(checkpoint_dir, d, CONFIG)))


def _read_json(path: str, what: str):
    try:
        return files.read_json(path)
    except (OSError, ValueError) as e:
        raise RunError(f"unreadable {what} {path} ({e})") from e


# ---------------------------------------------------------------------- the run record

def has_config(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG))


def read_config(folder: str, flag: str = "--run_name") -> dict:
    """config.json as a dict (research.training.config.load_run_config makes it a
    TrainConfig)."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise RunError(f"{flag}: no training run at {folder} (config.json missing)")
    return _read_json(path, "run config")


def write_record(folder: str, config_json: str, versions: dict, flagfile: str | None) -> None:
    """The record a fresh run writes once: config.json, versions.json, flags.txt."""
    files.write_text(os.path.join(folder, CONFIG), config_json, "the run config")
    files.write_json(os.path.join(folder, VERSIONS), versions, "the run's versions")
    if flagfile is not None:
        files.write_text(os.path.join(folder, FLAGS), flagfile, "the run's flags")


def read_sessions(folder: str) -> list[dict]:
    path = os.path.join(folder, SESSIONS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_session(folder: str, entry: dict) -> None:
    files.append_line(os.path.join(folder, SESSIONS), json.dumps(entry), "the sessions log")


def read_summary(folder: str) -> dict:
    """train_summary.json ({} before the first session ends)."""
    path = os.path.join(folder, SUMMARY)
    return _read_json(path, "training summary") if os.path.isfile(path) else {}


def write_summary(folder: str, summary: dict) -> None:
    files.write_json(os.path.join(folder, SUMMARY), summary, "the training summary")


def is_finished(summary: dict, total_steps: int, restored_step: int | None = None) -> bool:
    """The one rule for a finished training: train_summary.json says it reached its last
    step, or that early stopping ended it; with `restored_step` (the step of the checkpoint
    a resume restored), that checkpoint must also be the one it ended at (an older one, after
    a corrupt newest was moved aside, trains on)."""
    if not summary:
        return False
    final = summary.get("final_step", -1)
    done = final >= total_steps or bool(summary.get("stopped_early"))
    return done and (restored_step is None or restored_step >= final)


def read_history(folder: str, up_to_step: int | None = None) -> list[dict]:
    """The per-eval rows, up to `up_to_step` (the step a resumed session starts from)."""
    path = os.path.join(folder, HISTORY)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if up_to_step is None else [r for r in rows if r["step"] <= up_to_step]


def write_history(folder: str, rows: list[dict]) -> None:
    files.write_text(os.path.join(folder, HISTORY), "".join(json.dumps(r) + "\n" for r in rows),
                     "the training history")


def write_model_summary(folder: str, text: str) -> None:
    files.write_text(os.path.join(folder, MODEL_SUMMARY), text + "\n", "the model summary")


# --------------------------------------------------------------------------- the export

def export_dir(checkpoint_dir: str, run_name: str) -> str:
    """checkpoints/<run>/export: model.keras and metadata.json."""
    return os.path.join(checkpoint_dir, run_name, EXPORT)


def exported_model_path(checkpoint_dir: str, run_name: str) -> str:
    return os.path.join(export_dir(checkpoint_dir, run_name), MODEL_FILE)


def is_exported(checkpoint_dir: str, run_name: str) -> bool:
    return os.path.isfile(exported_model_path(checkpoint_dir, run_name))


def metadata_path(model_path: str) -> str:
    return os.path.join(os.path.dirname(model_path), METADATA)


def saved_model_path(model_path: str) -> str:
    """The SavedModel folder beside an export's model.keras."""
    return os.path.join(os.path.dirname(model_path), SAVED_MODEL)


def tflite_path(model_path: str) -> str:
    """Where the TFLite conversion of an export goes: model.tflite beside its model.keras."""
    return os.path.join(os.path.dirname(model_path), TFLITE_FILE)


def write_metadata(model_path: str, meta: dict) -> None:
    files.write_json(metadata_path(model_path), meta, "the export's metadata")


def read_metadata(model_path: str, flag: str = "--model") -> dict:
    """metadata.json beside `model_path`, checked for the keys predict, explain and compare
    need; errors name `flag`."""
    meta_path = metadata_path(model_path)
    for path in (model_path, meta_path):
        if not os.path.isfile(path):
            raise RunError(f"{flag}: no such file {path} (an export holds model.keras and "
                           "metadata.json)")
    if model_path.endswith(".keras") and not zipfile.is_zipfile(model_path):
        raise RunError(f"{flag}: {model_path} is damaged (not a whole .keras archive: "
                       "truncated or overwritten); delete it and run the run's `python -m "
                       "research.apps.train` command again, which exports a finished run")
    try:
        meta = files.read_json(meta_path)
    except (OSError, ValueError) as e:
        raise RunError(f"{flag}: {meta_path}: not readable JSON ({e})") from e
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise RunError(f"{flag}: {meta_path} lacks {', '.join(missing)}")
    if meta.get("backbone_only"):
        raise RunError(f"{flag}: {meta_path}: a backbone only ({meta['objective']} "
                       "pretraining: its logits never trained), not a detector; train one "
                       "from it with `train --weights=<its run>`")
    if meta["objective"] not in ("binary", "multiclass"):
        raise RunError(f"{flag}: {meta_path}: unknown objective {meta['objective']!r}")
    if len(meta["image_shape"]) != 3:
        raise RunError(f"{flag}: {meta_path}: image_shape {meta['image_shape']} is not "
                       "[height, width, channels]")
    return meta


def check_export_matches(checkpoint_dir: str, run_name: str, manifest: dict,
                         data_dir: str) -> None:
    """The data a run is scored on must hold the classes (and image shape) it was trained on
    (its export's metadata says which); no export yet: nothing to check."""
    model = exported_model_path(checkpoint_dir, run_name)
    if not os.path.isfile(metadata_path(model)):
        return
    meta = _read_json(metadata_path(model), "export metadata")

    def listed(v):
        return list(v) if isinstance(v, (list, tuple)) else [v]

    for key in DATA_KEYS:
        if key in meta and listed(meta[key]) != listed(manifest[key]):
            raise RunError(f"run {run_name} was trained with {key} {meta[key]} (its "
                           f"{metadata_path(model)}), but {data_dir} has {manifest[key]}")


# ------------------------------------------------------------------------ evaluations

def eval_report_path(folder: str, split: str, views: str = "") -> str:
    """<folder>/eval_<split>.json; `views` (evaluate's native-aspect tta_mode, e.g.
    native3_flip): eval_<split>_<views>.json, beside the run's own report, not over it."""
    return os.path.join(folder, f"eval_{split}{'_' + views if views else ''}.json")


def eval_figures_dir(report_path: str, split: str, views: str = "") -> str:
    return os.path.join(os.path.dirname(os.path.abspath(report_path)),
                        f"figures_{split}{'_' + views if views else ''}")


def read_eval_report(path: str) -> dict | None:
    return _read_json(path, "evaluation report") if os.path.isfile(path) else None


def write_eval_report(path: str, report: dict) -> None:
    files.write_json(path, report, "the evaluation report")
