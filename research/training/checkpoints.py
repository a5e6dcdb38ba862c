"""Checkpoint health, fallback and resolution: which checkpoint of a run to restore, read
whole first, so that a truncated or half-written file is found before it is restored.

- `checkpoint_problem`: reads every tensor of a checkpoint (size and CRC checks).
- `latest_good_checkpoint`: the newest readable checkpoint of a run; a bad one is moved to
  `<run>/corrupt/` (never deleted) and the previous one is tried.
- `resolve_checkpoint`: best | latest | a prefix, to the checkpoint to score.
"""

from __future__ import annotations

import os
import time

import tensorflow as tf
from absl import logging

from research.training.config import ConfigError


BEST = "best"  # <run>/best/: the best checkpoint by the run's selection metric


class CheckpointError(ConfigError):
    """No checkpoint of the run can be read."""


def checkpoint_problem(prefix: str) -> str | None:
    """Why the checkpoint at `prefix` cannot be restored (every tensor is read, so sizes
    and checksums are checked), or None."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError, OSError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def _move_aside(prefix: str, run_dir: str) -> str:
    dest = os.path.join(run_dir, "corrupt")
    tf.io.gfile.makedirs(dest)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in tf.io.gfile.glob(prefix + ".*"):
        target = os.path.join(dest, os.path.basename(path))
        if tf.io.gfile.exists(target):
            target = os.path.join(dest, f"{stamp}-{os.path.basename(path)}")
        tf.io.gfile.rename(path, target)
    return dest


def latest_good_checkpoint(run_dir: str, move_aside: bool = True) -> str | None:
    """The newest readable checkpoint listed in `run_dir`'s state file (None: no
    checkpoint). Unreadable newer ones are logged and, with `move_aside`, moved into
    `<run_dir>/corrupt/` and dropped from the state file. Raises CheckpointError naming them
    all if none can be read."""
    state = tf.train.get_checkpoint_state(run_dir)
    if state is None:
        return None
    paths = list(state.all_model_checkpoint_paths)
    if state.model_checkpoint_path and state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    bad, good = [], None
    for path in reversed(paths):
        problem = checkpoint_problem(path)
        if problem is None:
            good = path
            break
        bad.append((path, problem))
        logging.warning("Checkpoint %s cannot be read (%s); trying the previous one", path,
                        problem)
    if not bad:
        return good
    if good is None:
        listed = "; ".join(f"{p} ({why})" for p, why in bad)
        raise CheckpointError(f"--run_name: no readable checkpoint in {run_dir}: {listed}. "
                              "Move them away to start anew, or pass --restart")
    if move_aside:
        for path, _ in bad:
            dest = _move_aside(path, run_dir)
        keep = paths[:paths.index(good) + 1]
        quiet, level = tf.get_logger(), tf.get_logger().level
        quiet.setLevel("ERROR")  # its deprecation notice is for hand-edited protos
        try:
            tf.compat.v1.train.update_checkpoint_state(run_dir, good, keep)
        finally:
            quiet.setLevel(level)
        logging.warning("Moved %d unreadable checkpoint(s) to %s; resuming from %s", len(bad),
                        dest, good)
    return good


def on_disk(run_dir: str) -> list[str]:
    """The prefixes of the rolling checkpoints in `run_dir` (ckpt-<step>, whether or not the
    index lists them), oldest first."""
    found = []
    for path in tf.io.gfile.glob(os.path.join(run_dir, "ckpt-*.index")):
        step = os.path.basename(path)[len("ckpt-"):-len(".index")]
        if step.isdigit():
            found.append((int(step), path[:-len(".index")]))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(run_dir: str, which: str, verify: bool = True) -> str:
    """'best', 'latest' or a path, to a checkpoint prefix; with `verify`, every tensor is
    read first, so a truncated file is named here, not in a traceback."""
    if which in ("best", "latest"):
        folder = os.path.join(run_dir, BEST) if which == "best" else run_dir
        path = tf.train.latest_checkpoint(folder)
        if path is None and which == "best":
            path = tf.train.latest_checkpoint(run_dir)
        if path is None:
            raise ConfigError(f"--checkpoint={which}: no checkpoint in {folder}")
    elif not tf.io.gfile.exists(which + ".index"):
        raise ConfigError(f"--checkpoint: {which!r} is not a checkpoint prefix "
                          f"({which}.index not found)")
    else:
        path = which
    problem = checkpoint_problem(path) if verify else None
    if problem:
        raise ConfigError(f"--checkpoint={which}: {path} cannot be read ({problem})")
    return path
