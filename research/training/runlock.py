"""One process per run: `<checkpoint_dir>/<run>.lock` while a process trains the run (beside
the run folder, so --restart never deletes another process's lock). No TensorFlow here: the
train app takes the lock before the heavy imports, so a second process is refused at once.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time

from absl import logging

from research.training.config import ConfigError


_HELD: dict[str, int] = {}  # lock path -> how many times this process holds it


class RunLockedError(ConfigError):
    """Another live process trains this run."""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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

    def __init__(self, run_dir: str, reentrant: bool = False, subject: str | None = None):
        self.path = os.path.normpath(run_dir) + ".lock"
        self.held = False
        self.reentrant = reentrant  # this process may already hold it (the train app does)
        # What the refusal names first: the flag and what the holder does (the lab locks its
        # --workdir with this class too).
        self.subject = subject or (f"--run_name: {os.path.dirname(self.path) or '.'}/"
                                   f"{os.path.basename(self.path)[:-5]} is being trained")

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": now(),
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
        """Takes the lock. A reentrant lock may be one this process holds already (the train
        app takes the run's before its heavy imports, the loop again inside); the file goes
        with the last release."""
        if "://" in self.path:
            logging.warning("No run lock on %s (not a local path)", self.path)
            return self
        if self.reentrant and _HELD.get(self.path):
            _HELD[self.path] += 1
            self.held = True
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
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
                        f"{self.subject} by pid "
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
        _HELD[self.path] = 1
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD[self.path] = _HELD.get(self.path, 1) - 1
        if _HELD[self.path] <= 0:
            _HELD.pop(self.path, None)
            if self._read().get("pid") == os.getpid():
                os.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
