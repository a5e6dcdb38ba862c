"""Writing files so that nothing is ever half-written, and a full disk is one clear line.

Every file the project writes goes through `atomic_path` (or `write_text` / `write_json` /
`write_bytes` on top of it): the data goes to a temporary file in the same folder, is flushed
and fsync'ed, and is renamed over the target, so a crash, a kill or a full disk leaves the
previous version or nothing, never a truncated file. Folders built whole (TFRecords, feature
caches, a SavedModel) are written under a temporary name, fsync'ed with `fsync_tree` and
renamed (`atomic_dir`).

A write that runs out of space raises `OutOfSpaceError` (a UserError): what was being
written, where, how much is free, and that the command resumes once there is room. Apps exit
with OUT_OF_SPACE_EXIT (74, sysexits' EX_IOERR), distinct from a bug (1) and from preemption
(75, which a scheduler may retry in a loop). No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile

from absl import logging

from research.errors import OUT_OF_SPACE_EXIT, UserError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutOfSpaceError(UserError):
    """The disk filled up while writing; the message names what, where and the free space."""
    exit_status = OUT_OF_SPACE_EXIT


def is_out_of_space(e: BaseException) -> bool:
    """True for an OSError (or an exception whose text carries one, as TensorFlow's do) that
    says the disk or the quota is full."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def free_bytes(path: str) -> int | None:
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder or ".").free
    except OSError:
        return None


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def out_of_space(what: str, path: str, then: str = "run the same command again") -> \
        OutOfSpaceError:
    """The one-line error for a full disk while writing `what` at `path`."""
    return OutOfSpaceError(f"out of disk space writing {what} to {path} ({human(free_bytes(path))}"
                           f" free); nothing was left half-written: free some space, then "
                           f"{then}")


def fsync_dir(folder: str) -> None:
    """Makes a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str) -> None:
    """fsync every file and folder under `root` (before renaming a folder built whole)."""
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def check_writable(folder: str, flag: str) -> None:
    """Before the first write: `folder` exists (it is made here) and takes a new file, else
    one line naming `flag`, so that nothing is half written (a read-only or full folder)."""
    if "://" in folder:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if is_out_of_space(e):
            raise out_of_space("a first file", folder) from None
        raise UserError(f"{flag}: cannot write in {folder} ({e.strerror or e}); give a "
                        "folder you can write to") from None


# Temporary names carry host and pid (`.<name>.<host>~<pid>~...`), so that the next write to
# the same place can tell the leftovers of a dead writer from a live one's work in progress.
def temp_tag() -> str:
    return f"{socket.gethostname()}~{os.getpid()}~"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_leftovers(folder: str, prefix: str, suffix: str = "") -> list[str]:
    """Removes (and logs) the temporary files and folders that writes to the same place left
    when they were killed: `<prefix><host>~<pid>~...<suffix>` of this host's dead pids."""
    mine = f"{prefix}{socket.gethostname()}~"
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(mine) and name.endswith(suffix)):
            continue
        pid = name[len(mine):].split("~", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        full = os.path.join(folder, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(full)
        removed.append(full)
    if removed:
        logging.warning("Removed %d leftover(s) of interrupted writes: %s", len(removed),
                        ", ".join(removed))
    return removed


@contextlib.contextmanager
def atomic_path(path: str, what: str = "a file", then: str = "run the same command again"):
    """Yields a temporary path beside `path` for a writer that wants a file name (Keras'
    save, np.savez, savefig); on success the file is fsync'ed and renamed onto `path`, on any
    failure it is removed and `path` is left as it was. A full disk raises OutOfSpaceError.
    Temporary files that killed writes to `path` left behind are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        base, ext = os.path.splitext(os.path.basename(path))
        remove_leftovers(folder, f".{base}.", f".tmp{ext}")
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.{temp_tag()}", suffix=f".tmp{ext}", dir=folder)
        os.close(fd)
    except OSError as e:
        if is_out_of_space(e):
            raise out_of_space(what, path, then) from None
        raise
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_out_of_space(e):
            raise out_of_space(what, path, then) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str, what: str = "a folder", then: str = "run the same command again"):
    """Yields a temporary folder beside `path` for a writer that builds a folder whole (a
    SavedModel); on success it is fsync'ed and put in place of `path` (an older one is moved
    aside first and removed after), on any failure it is removed and `path` is left as it
    was. A full disk raises OutOfSpaceError."""
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        remove_leftovers(parent, f".{name}.tmp-")
        remove_leftovers(parent, f".{name}.old-")
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{temp_tag()}", dir=parent)
    except OSError as e:
        if is_out_of_space(e):
            raise out_of_space(what, path, then) from None
        raise
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-{temp_tag()}", dir=parent)
            os.replace(path, os.path.join(old, name))
        os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and not os.path.exists(path):  # put the previous folder back
            os.replace(os.path.join(old, name), path)
        if is_out_of_space(e):
            raise out_of_space(what, path, then) from None
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str, data: bytes, what: str = "a file") -> str:
    with atomic_path(path, what) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def write_text(path: str, text: str, what: str = "a file") -> str:
    return write_bytes(path, text.encode("utf-8"), what)


def write_json(path: str, obj, what: str = "a JSON file", indent: int = 1) -> str:
    return write_text(path, json.dumps(obj, indent=indent) + "\n", what)


def append_line(path: str, line: str, what: str = "a log") -> None:
    """Appends one line to a JSON-lines log: the whole file is rewritten atomically, so a
    full disk never leaves half a line (these logs stay small)."""
    old = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            old = f.read()
        if old and not old.endswith(b"\n"):
            old += b"\n"
    write_bytes(path, old + line.rstrip("\n").encode("utf-8") + b"\n", what)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
