"""Checkpoint health, fallback and resolution: which checkpoint of a run to restore, read
whole first, so that a truncated or half-written file is found before it is restored.

- `checkpoint_problem`: reads every tensor of a checkpoint (size and CRC checks).
- `latest_good_checkpoint`: the newest readable checkpoint of a run; a bad one is moved to
  `<run>/corrupt/` (never deleted) and the previous one is tried.
- `resolve_checkpoint`: best | latest | a prefix, to the checkpoint to score.
"""

from __future__ import annotations

import os
import re
import time

import tensorflow as tf
from absl import logging

from research import files
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


INDEX = "checkpoint"  # TensorFlow's index of a run's rolling checkpoints


def _step(prefix: str) -> int:
    tail = prefix.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _listed(run_dir: str) -> list[str] | None:
    """The checkpoints the index lists, oldest first; None when the index is missing or
    cannot be read."""
    try:
        state = tf.train.get_checkpoint_state(run_dir)
    except Exception as e:  # a truncated or hand-edited text proto: say so, then rebuild it
        logging.warning("The checkpoint index %s cannot be read (%s)",
                        os.path.join(run_dir, INDEX), str(e).splitlines()[0] if str(e) else e)
        return None
    if state is None:
        return None
    paths = list(state.all_model_checkpoint_paths)
    if state.model_checkpoint_path and state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    return paths


def write_index(run_dir: str, paths: list[str]) -> None:
    """The index of `paths` (oldest first; the last is the latest), with each file's time as
    its timestamp: a CheckpointManager rotates only the checkpoints whose timestamps it
    knows, so an index written without them would keep those forever."""
    paths = sorted(paths, key=_step)
    times = [os.path.getmtime(p + ".index") if os.path.exists(p + ".index") else time.time()
             for p in paths]
    quiet, level = tf.get_logger(), tf.get_logger().level
    quiet.setLevel("ERROR")  # its deprecation notice is for hand-edited protos
    try:
        tf.compat.v1.train.update_checkpoint_state(run_dir, paths[-1], paths,
                                                   all_model_checkpoint_timestamps=times)
    finally:
        quiet.setLevel(level)


def latest_good_checkpoint(run_dir: str, move_aside: bool = True) -> str | None:
    """The newest readable checkpoint of the run (None: no checkpoint), from its index and
    from the files on disk: checkpoints the index does not list (a lost or unreadable index)
    are found and the index is rebuilt, with a warning naming them. Unreadable newer ones
    are logged and, with `move_aside`, moved into `<run_dir>/corrupt/`; the good ones stay
    in the index (with their timestamps, so they rotate as usual). Raises CheckpointError
    naming them all if none can be read."""
    listed = _listed(run_dir)
    found = on_disk(run_dir)
    paths = sorted(set(listed or []) | set(found), key=_step)
    if not paths:
        return None
    unlisted = [p for p in found if p not in (listed or [])]
    bad, good = [], None
    for path in reversed(paths):
        problem = checkpoint_problem(path)
        if problem is None:
            good = path
            break
        bad.append((path, problem))
        logging.warning("Checkpoint %s cannot be read (%s); trying the previous one", path,
                        problem)
    if good is None:
        shown = "; ".join(f"{p} ({why})" for p, why in bad)
        raise CheckpointError(f"--run_name: no readable checkpoint in {run_dir}: {shown}. "
                              "Move them away to start anew, or pass --restart")
    if not move_aside:
        return good
    for path, _ in bad:
        dest = _move_aside(path, run_dir)
        logging.warning("Moved the unreadable checkpoint %s to %s", path, dest)
    if bad or unlisted:
        keep = [p for p in paths if _step(p) <= _step(good)]
        write_index(run_dir, keep)
        if unlisted:
            logging.warning("The index %s %s; rebuilt it from the checkpoints on disk (%s): "
                            "resuming from %s", os.path.join(run_dir, INDEX),
                            "did not list " + ", ".join(os.path.basename(p) for p in unlisted)
                            if listed else "is missing or unreadable",
                            ", ".join(os.path.basename(p) for p in keep), good)
    return good


def save(manager: tf.train.CheckpointManager, step: int) -> str:
    """manager.save at `step`; a full disk is one line (OutOfSpaceError: the checkpoints
    already there survive, and a half-written one's temporary files are removed)."""
    try:
        return manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
        if not files.is_out_of_space(e):
            raise
        for leftover in tf.io.gfile.glob(os.path.join(manager.directory, f"*-{step}_temp*")):
            if tf.io.gfile.isdir(leftover):
                tf.io.gfile.rmtree(leftover)
            else:
                tf.io.gfile.remove(leftover)
        raise files.out_of_space(f"checkpoint {step}", manager.directory) from None


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


def restore_model(model, path: str) -> None:
    """The model's weights from checkpoint `path` (the optimizer's and the rest of the train
    state are left out), every one of them: a checkpoint that does not hold a variable of
    `model` (another network, or a layer added since) is an error naming it, never a model
    scored or trained with that variable left at its initial value."""
    status = tf.train.Checkpoint(model=model).restore(path)
    status.expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        text = str(e)
        if text.startswith("Found 1 Python objects") and "save_counter" in text:
            return  # a checkpoint written with .write(): no save counter, every weight there
        missing = sorted(set(re.findall(r"path=([^,\s]+)", text))) or [text.splitlines()[0]]
        raise CheckpointError(f"{path}: does not hold every weight of {model.name} (a network "
                              f"built differently from the one that was trained?): missing "
                              f"{', '.join(missing)}") from None
