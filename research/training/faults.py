"""Surviving the faults of shared machines: preemption (SIGTERM/SIGINT), corrupt or
half-written checkpoints, two processes on one run, and a resume with changed settings.

- `Preemption`: signal handlers that only set a flag; the action checks it between loop
  calls, ends the loop at that step (the Checkpoint action saves `ckpt-<step>`, `finish`
  writes the summaries), and the train app exits with `PREEMPTED_EXIT` (75, EX_TEMPFAIL:
  'temporary failure, run me again'). The same command resumes at that step.
- `latest_good_checkpoint`: reads every tensor of the latest checkpoint (size and CRC checks)
  before restoring; a bad one is moved to `<run>/corrupt/` (never deleted) and the previous
  one tried.
- `RunLock`: `<checkpoint_dir>/<run>.lock` while a process trains the run (beside the run
  folder, so --restart never deletes another process's lock).
- `check_resume` / `record_session`: settings that change the network or the data must match
  the run's config.json, which is written once; each session is a line of
  `<run>/sessions.jsonl` with the settings it changed.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import signal
import socket
import time

import tensorflow as tf
from absl import logging

from research.training import record
from research.training.actions import Action
from research.training.config import ConfigError, TrainConfig

PREEMPTED_EXIT = 75  # sysexits EX_TEMPFAIL: a scheduler may simply start the command again
SESSIONS = "sessions.jsonl"

# Settings a resumed run may change; every other field (model, its options, objective,
# optimizer, precision, batch size, seed, data and augmentation, new fields by default) must
# match the run's config.json.
MAY_CHANGE = frozenset({
    "train_steps", "epochs", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "steps_per_loop", "eval_batch_size", "tta", "tta_shifts", "patience", "stop_at_step",
    "profile_steps",
    "gradcam_images", "progress", "jit_compile", "run_eagerly", "strategy", "cpu_replicas",
    "deterministic", "restart", "init_checkpoint", "data_dir", "checkpoint_dir", "log_dir",
    "run_name", "input",
    "learning_rate", "warmup_epochs", "final_lr_fraction", "momentum", "weight_decay",
    "clip_norm",
})


class CheckpointError(ConfigError):
    """No checkpoint of the run can be read."""


class RunLockedError(ConfigError):
    """Another live process trains this run."""


class ResumeMismatchError(ConfigError):
    """A resume with settings that change the network or the data."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- preemption

class Preemption(Action):
    """SIGTERM/SIGINT end the loop at the next boundary, resumably. Use as a context manager
    around training (handlers are restored on exit) and pass it as a loop action; a second
    signal stops at once the usual way."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self.stopped_at: int | None = None  # the step the loop was ended at
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # asked twice: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: checkpointing at the end of this loop call, then exiting "
                        "with status %d (send it again to stop at once)", self.signal_name,
                        PREEMPTED_EXIT)

    def before(self, ctx):
        if self._previous and not getattr(self, "_rearmed", False):
            # MultiWorkerMirroredStrategy's coordination service installs its own SIGTERM
            # handler (which only records the signal); ours must be the one that runs.
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
            self._rearmed = True

    def request(self, name: str = "request") -> None:
        """As if a signal had arrived (tests, and callers with their own notice)."""
        self.signal_name = self.signal_name or name

    def __call__(self, ctx):
        from research.training import cluster

        asked = cluster.any_worker(ctx.state.strategy, self.signal_name is not None)
        if not asked or ctx.stop or ctx.step >= ctx.plan.total_steps or self.stopped_at:
            return  # a finishing run just finishes
        self.signal_name = self.signal_name or "a peer worker's signal"
        self.stopped_at = ctx.stop_at = ctx.step  # the Checkpoint action saves at stop_at

    def message(self, cfg: TrainConfig, resume: str = "the same command") -> str:
        return (f"preempted by {self.signal_name} at step {self.stopped_at}: saved "
                f"{os.path.join(cfg.run_dir, f'ckpt-{self.stopped_at}')}; exit status "
                f"{PREEMPTED_EXIT}, {resume} resumes it")


# -------------------------------------------------------------------------- checkpoints

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


# --------------------------------------------------------------------------------- lock

def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """`<run_dir>.lock` (O_EXCL) holding pid, host and start time while a process trains the
    run. A live holder makes the next process refuse at once, naming it; the lock of a dead
    process on this host is taken over with a warning. Remote paths (gs://) are not locked."""

    def __init__(self, run_dir: str):
        self.path = os.path.normpath(run_dir) + ".lock"
        self.held = False

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                "process_start": _process_start(os.getpid())}

    def _read(self) -> dict:
        for _ in range(20):  # the holder may be writing it right now
            try:
                with open(self.path) as f:
                    return json.load(f)
            except (OSError, ValueError):
                time.sleep(0.05)
        return {}

    def acquire(self) -> "RunLock":
        if "://" in self.path:
            logging.warning("No run lock on %s (not a local path)", self.path)
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        import fcntl

        # Same-host contenders take turns (a stale lock is taken over by one of them only):
        # an flock on the parent folder, released when the process ends whatever happens.
        guard = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                here = holder.get("host") == socket.gethostname()
                pid = holder.get("pid")
                if not (here and isinstance(pid, int) and pid != os.getpid()
                        and not _alive(pid, holder.get("process_start"))):
                    raise RunLockedError(
                        f"--run_name: {os.path.dirname(self.path) or '.'}/"
                        f"{os.path.basename(self.path)[:-5]} is being trained by pid "
                        f"{holder.get('pid', '?')} on {holder.get('host', '?')} since "
                        f"{holder.get('started', '?')} (lock {self.path}; delete it only if "
                        "that process is gone)") from None
                logging.warning("Taking over the stale lock %s of dead pid %s (started %s)",
                                self.path, pid, holder.get("started"))
                tmp = f"{self.path}.{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(self._info(), f)
                os.replace(tmp, self.path)
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(self._info(), f)
        finally:
            os.close(guard)  # also releases the flock
        self.held = True
        return self

    def release(self) -> None:
        if self.held and self._read().get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------- resume settings

def _plain(value):
    return json.loads(json.dumps(value))


def _flat(cfg: TrainConfig) -> dict:
    """Settings by flag name (model options as their own flags)."""
    d = _plain(dataclasses.asdict(cfg))
    for k, v in d.pop("model_options").items():
        d[k] = v
    return d


def manifest_digest(data_dir: str) -> str | None:
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _sessions(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, SESSIONS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _saved(cfg: TrainConfig) -> TrainConfig | None:
    """The run's recorded config if the run has a checkpoint to resume, else None."""
    path = os.path.join(cfg.run_dir, "config.json")
    if cfg.restart or not os.path.isfile(path) or tf.train.get_checkpoint_state(
            cfg.run_dir) is None:
        return None
    with open(path) as f:
        return TrainConfig.from_json(f.read())


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
        starts = [s for s in _sessions(cfg.run_dir) if not s.get("start_step")]
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


def record_session(cfg: TrainConfig, flagfile: str | None, start_step: int) -> None:
    """A fresh run writes its record (config.json, flags, versions) once; every session
    appends a line to sessions.jsonl with what it changed."""
    from research import machine

    changed = resume_changes(cfg) if start_step else {}
    if not start_step:
        record.write_run_record(cfg, flagfile)
    entry = {"started": _now(), "host": socket.gethostname(), "pid": os.getpid(),
             "start_step": start_step, "changed": changed,
             "manifest_sha256": manifest_digest(cfg.data_dir), "versions": machine.versions(),
             "flags": flagfile}
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, SESSIONS), "a") as f:
        f.write(json.dumps(entry) + "\n")
