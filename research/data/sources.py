"""Readers for the supported sources: CIFAR-10/100 archives, MNIST's mnist.npz, and folders
of images (class folders, Kaggle names, or the unpaired trainA/trainB layout), each declared
once as a `Source` record in SOURCES (how it is detected, read, and downloaded).

Every reader returns a `SourceData`: images per split, class ids and names, the files it could
not use and the class folders that held no image, each with a reason. CIFAR and MNIST are
small uint8 arrays read whole; an image folder's splits are `ImageFiles`, file names decoded
only when they are written (docs/data_at_scale.md). Archives (.tar, .tar.gz, .zip) are never
extracted: a `FileTree` indexes them and reads one member at a time; pickles go through a
restricted unpickler, .npz files are loaded with allow_pickle=False, and archive members that
try to escape the archive root are refused.
"""

from __future__ import annotations

import bz2
import collections
import concurrent.futures
import dataclasses
import functools
import gzip
import io
import itertools
import lzma
import os
import pickle
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import weakref
import zipfile
import zlib
from typing import Callable, Iterable, Iterator

import numpy as np

from research.data import imaging
from research.data.manifest import sha256_file
from research.errors import UserError

LABEL_SETS = ("fine", "coarse")
MNIST_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# Unpaired two-domain layout (CycleGAN's horse2zebra etc.): folder -> (split, class A=0/B=1).
UNPAIRED_FOLDERS = {"trainA": ("train", 0), "trainB": ("train", 1),
                    "testA": ("test", 0), "testB": ("test", 1)}

CIFAR_RECORD_BYTES = 1 + 32 * 32 * 3


class SourceError(UserError):
    """The source is missing, malformed or unsafe; the message names the file."""


class UnsafeArchiveError(SourceError):
    """A tar member would escape the archive root."""


@dataclasses.dataclass
class Split:
    # (N, H, W, C) uint8 in memory (CIFAR, MNIST: C=3, or 1 for MNIST), or the image files of
    # an image folder, decoded only when they are written (`ImageFiles`).
    images: "np.ndarray | ImageFiles"
    class_ids: np.ndarray         # (N,) int64
    source_ids: list[str]
    coarse_ids: np.ndarray | None = None  # (N,) int64, CIFAR-100 only

    def __len__(self) -> int:
        return len(self.class_ids)

    def take(self, idx: np.ndarray) -> "Split":
        images = (self.images.take(idx) if isinstance(self.images, ImageFiles)
                  else self.images[idx])
        return Split(images, self.class_ids[idx], [self.source_ids[i] for i in idx],
                     None if self.coarse_ids is None else self.coarse_ids[idx])


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """The images of one split of an image folder: their files in `tree`, decoded and resized
    one at a time (`decode`) as their shards are written, a bounded window ahead
    (research.data.shards), so that no split is ever in memory."""
    tree: "FileTree"
    names: list[str]
    size: tuple[int, int]            # (height, width)
    policy: str
    reduced: bool = False            # imaging.decode_resized's reduced JPEG decoding
    threads: int | None = None       # decoding threads; None: one per core

    dtype = np.uint8

    def __len__(self) -> int:
        return len(self.names)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.names), *self.size, 3)

    def take(self, idx) -> "ImageFiles":
        return dataclasses.replace(self, names=[self.names[i] for i in idx])

    def where(self, i: int) -> str:
        return self.tree.where(self.names[i])

    def decode(self, i: int) -> np.ndarray:
        name = self.names[i]
        return decode_file(self.tree, self.tree.locator(name), name, self.tree.where(name),
                           self.size, self.policy, self.reduced)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.decode(int(i))


def decode_file(reader: "FileTree | MemberReader", locator: object, name: str, where: str,
                size: tuple[int, int], policy: str, reduced: bool) -> np.ndarray:
    """The one way a listed image file becomes a record's pixels, in this process (`reader`
    its FileTree) or in a worker process (a MemberReader): read by its locator, decoded,
    resized (imaging.decode_resized). The bytes are read into this thread's reusable buffer
    (`_read_located`), which the decode is done with before the thread's next read."""
    return imaging.decode_resized(reader.read_at(locator, name, reuse=True), where, size,
                                  policy, reduced)


def decoded_or_reason(decode: Callable[[], np.ndarray]
                      ) -> tuple[np.ndarray | None, str | None]:
    """(decode(), None), or (None, why) for a file that cannot be decoded or read (it is then
    skipped); an archive that cannot be read (SourceError) is raised: every conversion, in
    threads or in worker processes, decides this here."""
    try:
        return decode(), None
    except (imaging.ImageDecodeError, OSError) as e:
        return None, str(e)


def ordered_map(fn: Callable, items: Iterable, threads: int | None = None,
                chunk: int = 32) -> Iterator:
    """fn(item) for every item, in order, by `threads` threads (default: one per core) that
    run at most 2 x threads chunks of `chunk` items ahead of the consumer: memory is bounded
    by that window, whatever the number of items (an executor's map would hold every result),
    and `items` is only read that far ahead, so it may be a generator of any length."""
    threads = threads or os.cpu_count() or 2
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        while part := list(itertools.islice(items, chunk)):
            pending.append(pool.submit(lambda part: [fn(x) for x in part], part))
            if len(pending) >= 2 * threads:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


@dataclasses.dataclass
class SourceData:
    format: str
    class_names: list[str]
    splits: dict[str, Split]
    coarse_class_names: list[str] | None = None
    skipped: list[dict] = dataclasses.field(default_factory=list)
    # Class folders without a decodable image: {folder, split, class, reason, kept}.
    empty_classes: list[dict] = dataclasses.field(default_factory=list)
    label_set: str | None = None  # CIFAR-100: 'fine' or 'coarse' class names


# ---------------------------------------------------------------------------------------------
# File trees: a folder, a tar or a zip archive, read without extracting.

class FileTree:
    """Regular files (and the folders) of a folder, a tar or a zip archive, by relative posix
    path. A single wrapper folder around everything is stripped.

    Scanning lists names and where each file's bytes are (a path, a tar member's offset and
    size, a zip member), never the bytes themselves: memory grows with the number of files
    (their names), not their size. `read` fetches one file; it is safe from several threads.
    A compressed tar (.tar.gz, .tgz, .tar.bz2, .tar.xz) can only be read in order, so it is
    decompressed once, in 1 MB pieces, to an uncompressed spill file (in `spill_dir`, default
    the system's temporary folder; deleted by `close` or when the tree goes away) that is then
    read by offset like a .tar."""

    def __init__(self, root: str, spill_dir: str | None = None):
        self.root = root
        # name -> locator: a path (folder), (offset, size) (tar) or a ZipInfo (zip).
        self._files: dict[str, object] = {}
        self._dirs: set[str] = set()
        self._wrapper = ""  # the stripped wrapper folders, for `where`
        self.ignored: list[dict] = []
        self._fd: int | None = None
        self._zip: zipfile.ZipFile | None = None
        self._archive: str | None = None  # the file _fd or _zip reads (a .tar.gz's spill)
        self._finalizer = None
        if os.path.isdir(root):
            self._scan_dir(root)
        elif os.path.isfile(root) and tarfile.is_tarfile(root):
            self._scan_tar(root, spill_dir)
        elif os.path.isfile(root) and zipfile.is_zipfile(root):
            self._scan_zip(root)
        elif os.path.exists(root):
            raise SourceError(f"{root}: not a folder or a .tar/.tar.gz/.zip archive")
        else:
            raise SourceError(f"{root}: no such file or folder")
        self._strip_wrapper_dirs()

    def _add_file(self, name: str, locator: object) -> None:
        self._files[name] = locator
        parts = name.split("/")
        self._dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))

    def _scan_dir(self, root: str) -> None:
        """Every folder top down, as os.walk (a symbolic link to a folder is not followed),
        but from os.scandir's entries, which know a symbolic link without an lstat per file
        (0.1 s of a 20,000-photo folder's 0.5 s listing, this 2-core AMD EPYC). A folder
        that cannot be listed is in `ignored`, with why."""
        real_root = os.path.realpath(root)
        todo = [root]
        while todo:
            dirpath = todo.pop()
            try:
                with os.scandir(dirpath) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self.ignored.append({"file": dirpath, "reason": "folder cannot be listed "
                                     f"({e.strerror or e})"})
                continue
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            if rel_dir != ".":
                self._dirs.add(rel_dir)
            # The folder's part of each name once, not a relpath per file (15 us of 30 each).
            prefix = "" if rel_dir == "." else rel_dir + "/"
            shown = [e for e in entries if not imaging.is_hidden_name(e.name)]
            folders = {e.name: e for e in shown if _is_dir(e)}
            todo.extend(reversed([e.path for e in folders.values() if self._usable(
                e, real_root, "folder") and not e.is_symlink()]))  # a link inside: not followed
            for entry in shown:
                if entry.name not in folders and self._usable(entry, real_root, "file"):
                    self._files[prefix + entry.name] = entry.path  # its folders are in _dirs

    def _usable(self, entry: os.DirEntry, real_root: str, kind: str) -> bool:
        """False (and listed in `ignored`) for a name that is not valid UTF-8 and for a
        symbolic link that leaves the source's tree."""
        if not _utf8(entry.path):
            self.ignored.append({"file": _escaped(entry.path),
                                 "reason": f"{kind} name is not valid UTF-8"})
            return False
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.commonpath([target, real_root]) != real_root:
                self.ignored.append({"file": entry.path, "reason": f"symbolic link to "
                                     f"{target}, outside the source's folder"})
                return False
        return True

    def _scan_tar(self, path: str, spill_dir: str | None) -> None:
        try:
            opener = _COMPRESSED_TAR.get(_magic(path))
            spill = self._spill(path, opener, spill_dir) if opener else None
            self._fd = os.open(spill or path, os.O_RDONLY)
            self._archive = spill or path
            self._finalizer = weakref.finalize(self, _close_fd, self._fd, spill)
            try:
                for member in _plain_tar_members(self._fd):
                    self._index_member(path, *member)
            except _NotPlain:  # tarfile reads it all, as if the parser had not begun
                self._files.clear()
                self._dirs.clear()
                self.ignored.clear()
                for member in _tar_members(spill or path):
                    self._index_member(path, *member)
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            self.close()
            raise SourceError(f"{path}: truncated or corrupt archive ({e})") from e
        except BaseException:
            self.close()
            raise

    def _spill(self, path: str, opener, spill_dir: str | None) -> str:
        fd, spill = tempfile.mkstemp(prefix=".spill-", suffix=".tar", dir=spill_dir)
        try:
            with opener(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except BaseException:
            os.unlink(spill)
            raise
        return spill

    def _index_member(self, path: str, member: str, kind: str, offset: int, size: int
                      ) -> None:
        """One tar member (`_tar_members`' fields) indexed, skipped or listed as ignored."""
        name = _safe_member_name(path, member)
        if name is None or any(imaging.is_hidden_name(p) for p in name.split("/")):
            return
        if not _utf8(name):
            self.ignored.append({"file": _escaped(f"{path}:{member}"),
                                 "reason": "member name is not valid UTF-8"})
        elif kind == "dir":
            self._dirs.add(name)
        elif kind != "file":
            self.ignored.append({"file": f"{path}:{member}",
                                 "reason": "not a regular file (link or device)"})
        else:
            self._add_file(name, (offset, size))

    def _scan_zip(self, path: str) -> None:
        try:
            self._zip = zipfile.ZipFile(path)  # holds the central directory, no member data
            self._archive = path
            self._finalizer = weakref.finalize(self, self._zip.close)
            for info in self._zip.infolist():
                name = _safe_member_name(path, info.filename)
                if name is None or any(imaging.is_hidden_name(p) for p in name.split("/")):
                    continue
                mode = info.external_attr >> 16  # unix mode, 0 from Windows zippers
                if info.is_dir():
                    self._dirs.add(name)
                elif mode and not stat.S_ISREG(mode):
                    self.ignored.append({"file": f"{path}:{info.filename}",
                                         "reason": "not a regular file (link or device)"})
                elif info.flag_bits & 0x1:
                    raise SourceError(f"{path}: member {info.filename!r} is encrypted")
                else:
                    self._add_file(name, info)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
            raise SourceError(f"{path}: truncated or corrupt archive ({e})") from e

    def close(self) -> None:
        """Closes the archive and deletes a .tar.gz's spill file; a folder has nothing open."""
        if self._finalizer is not None:
            self._finalizer()

    def _strip_wrapper_dirs(self) -> None:
        while self._files:
            tops = {n.split("/", 1)[0] for n in [*self._files, *self._dirs]}
            if len(tops) != 1 or any("/" not in n for n in self._files):
                return
            top = tops.pop()
            self._files = {n[len(top) + 1:]: f for n, f in self._files.items()}
            self._dirs = {d[len(top) + 1:] for d in self._dirs if d != top}
            self._wrapper += top + "/"

    def names(self) -> list[str]:
        return sorted(self._files)

    def dirs(self) -> list[str]:
        """Every folder, including those that hold no file."""
        return sorted(self._dirs)

    def read(self, name: str, limit: int | None = None) -> bytes:
        """The bytes of one file (its first `limit` bytes when given). A damaged archive
        member is a SourceError naming the archive, as when it is scanned."""
        return self.read_at(self._files[name], name, limit)

    def read_at(self, locator: object, name: str, limit: int | None = None,
                reuse: bool = False) -> bytes:
        """`read` by a locator already looked up (as MemberReader.read_at in a worker);
        `reuse`: a memoryview of this thread's reusable buffer (`_read_located`)."""
        return _read_located(locator, name, self._fd, self._zip, self.root, limit, reuse)

    def locator(self, name: str) -> object:
        """Where a file's bytes are (a path, a tar offset and size, a ZipInfo): with
        `member_reader`, what another process needs to read it."""
        return self._files[name]

    def member_reader(self) -> "MemberReader":
        """What another process opens to read this tree's files by `locator`."""
        return MemberReader(self.root, self._archive, self._zip is not None)

    def where(self, name: str) -> str:
        """The path of a member as the user sees it: <folder>/<path> or <archive>:<member>."""
        name = self._wrapper + name
        return (f"{self.root}:{name}" if self._archive is not None  # (set by the scan)
                else os.path.join(self.root, name))

    def __contains__(self, name: str) -> bool:
        return name in self._files


_READ_BUFFER = threading.local()  # .buffer: a thread's reusable bytearray (`_read_located`)


def _read_located(loc: object, name: str, fd: int | None, zf: "zipfile.ZipFile | None",
                  root: str, limit: int | None = None, reuse: bool = False) -> bytes:
    """FileTree.read's one way to read a file's bytes from its locator, in any process.
    `reuse`: a file or tar member is read into a buffer this thread keeps, and a memoryview
    of it is returned, valid until the thread's next `reuse` read: a new buffer per image
    costs its page faults (a 50 KB file read in 43 us, into the kept buffer in 14, measured
    on this 2-core AMD EPYC)."""
    if isinstance(loc, str):
        if reuse and limit is None:
            return _read_file_reused(loc)
        if limit is not None:  # a header: no file object (5.3 us a file against 7.4)
            handle = os.open(loc, os.O_RDONLY)
            try:
                return os.read(handle, limit)
            finally:
                os.close(handle)
        with open(loc, "rb", buffering=0) as f:  # unbuffered: one read, not a copy (25% less)
            return f.read()
    try:
        if isinstance(loc, tuple):
            offset, size = loc
            size = size if limit is None else min(size, limit)
            if reuse:
                view = _reused_buffer(size)[:size]
                got = os.preadv(fd, [view], offset)
            else:
                view = os.pread(fd, size, offset)
                got = len(view)
            if got != size:
                raise EOFError(f"member {name!r} ends early")
            return view
        with zf.open(loc) as f:
            return f.read(-1 if limit is None else limit)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise SourceError(f"{root}: truncated or corrupt archive ({e})") from e


def _reused_buffer(size: int) -> memoryview:
    """This thread's reusable buffer, at least `size` bytes (1 MB at first; grown, never
    shrunk)."""
    buffer = getattr(_READ_BUFFER, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _READ_BUFFER.buffer = bytearray(max(size, 1 << 20, 2 * len(buffer or b"")))
    return memoryview(buffer)


def _read_file_reused(path: str) -> memoryview:
    """The whole file at `path` in this thread's reusable buffer (grown while it fills)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        view = _reused_buffer(0)
        n = os.readv(fd, [view])
        while n == len(view):  # the buffer is full: the file may go on
            full, view = view, _reused_buffer(2 * n)
            view[:n] = full  # a new, larger buffer: what was read comes along
            n += os.readv(fd, [view[n:]])
        return view[:n]
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class MemberReader:
    """A FileTree's files as another process reads them (`FileTree.member_reader`): it opens
    the archive itself (a .tar.gz's spill, which the tree's own process keeps and deletes),
    so nothing open crosses the process boundary, only this and each file's locator."""
    root: str
    archive: str | None  # None: a folder, whose locators are paths
    zipped: bool

    def read_at(self, locator: object, name: str, reuse: bool = False) -> bytes:
        fd, zf = _OPEN_ARCHIVE.get(self.archive, self.zipped) if self.archive else (None, None)
        return _read_located(locator, name, fd, zf, self.root, reuse=reuse)


class _OpenArchive:
    """The one archive a worker process reads, opened once for all the shards it writes (a
    zip's central directory is parsed when it is opened: 1.28 M members take seconds); a job
    that names another archive closes this one first, so nothing stays open that no job
    reads. A worker is one thread: nothing closes an archive while it is being read."""

    def __init__(self):
        self._key: tuple[str, bool] | None = None
        self._opened: tuple[int | None, "zipfile.ZipFile | None"] = (None, None)

    def get(self, path: str, zipped: bool) -> tuple[int | None, "zipfile.ZipFile | None"]:
        if self._key != (path, zipped):
            self.close()
            self._opened = ((None, zipfile.ZipFile(path)) if zipped
                            else (os.open(path, os.O_RDONLY), None))
            self._key = (path, zipped)
        return self._opened

    def close(self) -> None:
        fd, zf = self._opened
        self._key, self._opened = None, (None, None)
        if fd is not None:
            os.close(fd)
        if zf is not None:
            zf.close()


_OPEN_ARCHIVE = _OpenArchive()


_COMPRESSED_TAR = {b"\x1f\x8b": gzip.open, b"BZ": bz2.open, b"\xfd7": lzma.open}


def _tar_members(path: str) -> Iterator[tuple[str, str, int, int]]:
    """(name, kind, data offset, size) of every member of an uncompressed tar, as tarfile
    reads them; kind is "dir", "file" (a regular, not sparse, file) or "other"."""
    with tarfile.open(path, "r:") as tar:  # seekable: headers only
        while (member := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it read; we keep ours
            kind = ("dir" if member.isdir() else
                    "file" if member.isfile() and not member.issparse() else "other")
            yield member.name, kind, member.offset_data, member.size


_TAR_BLOCK = 512
_TAR_ZEROS = bytes(_TAR_BLOCK)
_TAR_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337),
                (337, 345))  # mode, uid, gid, size, mtime, devmajor, devminor
_TAR_KINDS = {b"0": "file", b"\0": "file", b"5": "dir"}  # the types the parser reads itself


class _NotPlain(Exception):
    """What `_plain_tar_members` raises at a member it leaves to tarfile."""


def _plain_tar_members(fd: int) -> Iterator[tuple[str, str, int, int]]:
    """`_tar_members` of the uncompressed tar open as `fd`, parsed here from its 512-byte
    headers as tarfile parses them when every member is a plain file or folder: 8 us a
    member against tarfile's 21 (measured; ImageNet's 1.28 M: 11 s instead of 27).
    `_NotPlain` as soon as anything else shows (pax or GNU long-name headers, links,
    devices, sparse files, a number tarfile would read differently or reject, a bad
    checksum, a truncated archive), for `_tar_members` to read the whole archive instead:
    what this yields is what tarfile yields (tests/data/test_sources.py compares them)."""
    end = os.fstat(fd).st_size
    offset = 0
    while True:
        if offset >= end:  # tarfile: the end of the data at a header (beyond it: its error)
            if offset == end and offset:
                return
            raise _NotPlain
        head = os.pread(fd, _TAR_BLOCK, offset)
        if len(head) != _TAR_BLOCK or (head == _TAR_ZEROS and not offset):
            raise _NotPlain
        if head == _TAR_ZEROS:  # the end-of-archive blocks
            return
        kind = _TAR_KINDS.get(head[156:157])
        try:  # every number field read as tarfile reads it, though only the size is kept
            size = [_octal(head[a:b]) for a, b in _TAR_NUMBERS][3]
            checksum = _octal(head[148:156])
        except ValueError:
            raise _NotPlain from None
        if kind is None or checksum != sum(head) - sum(head[148:156]) + 8 * 32:
            raise _NotPlain
        name = head[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        if head[156:157] == b"\0" and name.endswith("/"):
            kind = "dir"  # an old tar's folder: tarfile reads it so
        if kind == "dir":
            name = name.rstrip("/")
        prefix = head[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode(tarfile.ENCODING, "surrogateescape") + "/" + name
        yield name, kind, offset + _TAR_BLOCK, size
        offset += _TAR_BLOCK + (-(-size // _TAR_BLOCK) * _TAR_BLOCK if kind == "file" else 0)


def _octal(field: bytes) -> int:
    """A tar number field as tarfile's `nti` reads a plain octal one; ValueError for the
    base-256 form and anything tarfile rejects."""
    if field[0] in (0o200, 0o377):
        raise ValueError("base-256 number")
    return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)


def _magic(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(2)


def _close_fd(fd: int, spill: str | None) -> None:
    os.close(fd)
    if spill:
        try:
            os.unlink(spill)
        except FileNotFoundError:
            pass


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, or a symbolic link to one (as os.walk sorts them)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _utf8(name: str) -> bool:
    """os.scandir and tarfile hand over undecodable bytes as lone surrogates."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _escaped(name: str) -> str:
    """A name that is not UTF-8, printable: its bad bytes as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _safe_member_name(archive: str, name: str) -> str | None:
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm in (".", ""):
        return None
    escapes = norm == ".." or norm.startswith(("/", "../")) or re.match(r"^[A-Za-z]:", norm)
    if escapes:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} escapes the archive root (path traversal); refusing "
            "to read this archive")
    return norm


# ---------------------------------------------------------------------------------------------
# Restricted unpickling: a CIFAR batch is a dict of bytes, lists, ints and numpy arrays.

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def safe_unpickle(data: bytes, where: str) -> dict:
    """Unpickles a CIFAR batch, admitting only numpy arrays and plain containers."""
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any failure of a hostile or broken pickle is the same refusal
        raise SourceError(f"{where}: refused to unpickle ({e})") from e
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(values: Iterable) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_images(data, n_labels: int, where: str) -> np.ndarray:
    arr = np.asarray(data)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3072 or len(arr) != n_labels:
        raise SourceError(f"{where}: 'data' must be uint8 of shape (N, 3072) matching the "
                          f"labels, got {arr.dtype} {arr.shape} for {n_labels} labels")
    return np.ascontiguousarray(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _check_labels(labels, num_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise SourceError(f"{where}: labels outside [0, {num_classes})")
    return labels


def _require(tree: FileTree, name: str) -> bytes:
    if name not in tree:
        raise SourceError(f"{tree.root}: missing member {name!r}")
    return tree.read(name)


def read_cifar10_python(tree: FileTree) -> SourceData:
    meta = safe_unpickle(_require(tree, "batches.meta"), tree.where("batches.meta"))
    class_names = _names(meta["label_names"])
    splits = {}
    for split, batches in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                           ("test", ["test_batch"])):
        parts = []
        for b in batches:
            where = tree.where(b)
            d = safe_unpickle(_require(tree, b), where)
            labels = _check_labels(d["labels"], len(class_names), where)
            images = _cifar_images(d["data"], len(labels), where)
            fnames = _names(d.get("filenames", [str(i) for i in range(len(labels))]))
            parts.append(Split(images, labels, [f"{b}/{i}/{f}" for i, f in enumerate(fnames)]))
        splits[split] = _concat(parts)
    return SourceData("cifar10-python", class_names, splits)


def read_cifar100_python(tree: FileTree) -> SourceData:
    meta = safe_unpickle(_require(tree, "meta"), tree.where("meta"))
    fine, coarse = _names(meta["fine_label_names"]), _names(meta["coarse_label_names"])
    splits = {}
    for split in ("train", "test"):
        where = tree.where(split)
        d = safe_unpickle(_require(tree, split), where)
        labels = _check_labels(d["fine_labels"], len(fine), where)
        coarse_ids = _check_labels(d["coarse_labels"], len(coarse), where)
        images = _cifar_images(d["data"], len(labels), where)
        fnames = _names(d.get("filenames", [str(i) for i in range(len(labels))]))
        splits[split] = Split(images, labels, [f"{split}/{i}/{f}" for i, f in enumerate(fnames)],
                              coarse_ids)
    return SourceData("cifar100-python", fine, splits, coarse_class_names=coarse)


def read_cifar10_binary(tree: FileTree) -> SourceData:
    if "batches.meta.txt" in tree:
        class_names = [c for c in tree.read("batches.meta.txt").decode().split() if c]
    else:
        class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck"]
    splits = {}
    for split, files in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]),
                         ("test", ["test_batch.bin"])):
        parts = []
        for fn in files:
            where = tree.where(fn)
            raw = np.frombuffer(_require(tree, fn), dtype=np.uint8)
            if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES:
                raise SourceError(f"{where}: size {raw.size} is not a multiple of "
                                  f"{CIFAR_RECORD_BYTES} (1 label byte + 3072 pixels)")
            rec = raw.reshape(-1, CIFAR_RECORD_BYTES)
            labels = _check_labels(rec[:, 0], len(class_names), where)
            images = _cifar_images(rec[:, 1:], len(labels), where)
            parts.append(Split(images, labels, [f"{fn}/{i}" for i in range(len(labels))]))
        splits[split] = _concat(parts)
    return SourceData("cifar10-binary", class_names, splits)


def _concat(parts: list[Split]) -> Split:
    coarse = None if parts[0].coarse_ids is None else np.concatenate([p.coarse_ids for p in parts])
    return Split(np.concatenate([p.images for p in parts]),
                 np.concatenate([p.class_ids for p in parts]),
                 [s for p in parts for s in p.source_ids], coarse)


# ---------------------------------------------------------------------------------------------
# MNIST: the mnist.npz that keras.datasets.mnist downloads, x_* (N, 28, 28) uint8, y_* digits.

def read_mnist_npz(path: str) -> SourceData:
    """Reads mnist.npz (never unpickling) into 28x28x1 uint8 images, classes '0'..'9'."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in MNIST_ARRAYS if k not in z.files]
            if missing:
                raise SourceError(f"{path}: missing arrays {', '.join(missing)}; an MNIST .npz "
                                  f"holds {', '.join(MNIST_ARRAYS)}")
            arrays = {k: z[k] for k in MNIST_ARRAYS}
    except SourceError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # ValueError includes "Object arrays cannot be loaded when allow_pickle=False".
        raise SourceError(f"{path}: not a readable MNIST .npz ({e})") from e
    class_names = [str(d) for d in range(10)]
    splits = {}
    for split in ("train", "test"):
        x, where = arrays[f"x_{split}"], f"{path}:x_{split}"
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise SourceError(f"{where}: expected uint8 grayscale images (N, H, W), got "
                              f"{x.dtype} {x.shape}")
        labels = _check_labels(arrays[f"y_{split}"], 10, f"{path}:y_{split}")
        if len(labels) != len(x):
            raise SourceError(f"{path}: {len(x)} x_{split} images but {len(labels)} labels")
        splits[split] = Split(np.ascontiguousarray(x[..., None]), labels,
                              [f"x_{split}/{i}" for i in range(len(x))])
    return SourceData("mnist-npz", class_names, splits)


# ---------------------------------------------------------------------------------------------
# Image folders: <root>/[train|test]/<class>/<file>, flat Kaggle names <class>.<id>.<ext>, or
# the unpaired <root>/{train,test}{A,B}/<file> layout. Every class folder that ends up without
# a decodable image is reported in `empty_classes`; its class is kept if another split has
# images of it, and dropped otherwise.

_FLAT_NAME = re.compile(r"^(?P<cls>[^./]+)\.[^/]+\.[A-Za-z]+$")


@dataclasses.dataclass
class _Layout:
    name: str
    items: dict[str, list[tuple[str, str]]]   # split -> [(file, class name)]
    folders: list[tuple[str, str, str]]       # class folders: (split, class name, folder)
    class_order: list[str] | None = None      # None: sorted


def _class_folder_layout(tree: FileTree, skipped: list[dict]) -> _Layout:
    names, dirs = tree.names(), tree.dirs()
    file_tops = {n.split("/", 1)[0] for n in names if "/" in n}
    if "train" in file_tops:
        # An existing but imageless test/ is kept as a group so its folders get reported.
        groups = {s: [] for s in ("train", "test") if s in file_tops or s in dirs}
        for n in names:
            top = n.split("/", 1)[0]
            if top in groups:
                groups[top].append(n[len(top) + 1:])
            else:
                skipped.append({"file": tree.where(n),
                                "reason": "outside the train/ and test/ folders"})
        prefixes = {s: s + "/" for s in groups}
    else:
        groups, prefixes = {"train": names}, {"train": ""}

    items: dict[str, list[tuple[str, str]]] = {}
    folders = []
    kinds = set()
    for split, rels in groups.items():
        prefix = prefixes[split]
        for d in dirs:
            if d.startswith(prefix) and "/" not in d[len(prefix):]:
                folders.append((split, d[len(prefix):], d))
        items[split] = []
        for rel in rels:
            full = prefix + rel
            parts = rel.split("/")
            if not imaging.is_image_name(rel):
                skipped.append({"file": tree.where(full), "reason": "not an image file extension"})
            elif len(parts) == 2:
                items[split].append((full, parts[0]))
                kinds.add("class_folders")
            elif len(parts) == 1 and _FLAT_NAME.match(rel):
                items[split].append((full, _FLAT_NAME.match(rel).group("cls").lower()))
                kinds.add("flat_names")
            else:
                skipped.append({"file": tree.where(full), "reason":
                                "not at <class>/<file> and not named <class>.<id>.<ext>"})
        if prefix and not rels and not any(f[0] == split for f in folders):
            skipped.append({"file": tree.where(split) + "/", "reason":
                            f"empty {split}/ folder (no class folders, no images)"})
    return _Layout("+".join(sorted(kinds)) or "class_folders", items, folders)


def _unpaired_layout(tree: FileTree, class_names: list[str], skipped: list[dict]) -> _Layout:
    tops = set(tree.dirs())
    has_test = bool({"testA", "testB"} & tops)
    folders = [(split, class_names[k], f) for f, (split, k) in UNPAIRED_FOLDERS.items()
               if split == "train" or has_test]
    items: dict[str, list[tuple[str, str]]] = {"train": [], "test": []} if has_test else {
        "train": []}
    for n in tree.names():
        top, _, rest = n.partition("/")
        if top not in UNPAIRED_FOLDERS:
            skipped.append({"file": tree.where(n),
                            "reason": "outside the trainA/ trainB/ testA/ testB/ folders"})
        elif "/" in rest:
            skipped.append({"file": tree.where(n), "reason": f"not directly in {top}/"})
        elif not imaging.is_image_name(rest):
            skipped.append({"file": tree.where(n), "reason": "not an image file extension"})
        else:
            split, k = UNPAIRED_FOLDERS[top]
            items[split].append((n, class_names[k]))
    return _Layout("unpaired_ab", items, folders, list(class_names))


def is_unpaired_layout(tree: FileTree) -> bool:
    return {"trainA", "trainB"} <= set(tree.dirs())


def read_image_folder(tree: FileTree, image_size: tuple[int, int], resize_policy: str,
                      num_threads: int | None = None,
                      class_names: list[str] | None = None,
                      reduced_decode: bool = False) -> SourceData:
    """Lists the images of an image folder and checks their headers (the first bytes of each
    file: not an image, truncated, too many pixels), which fixes the classes and the splits;
    the pixels are decoded later, split by split, as they are written (`ImageFiles`).
    `class_names` names the A and B classes of the unpaired trainA/trainB layout (default 'A',
    'B') and is refused for other layouts."""
    skipped: list[dict] = list(tree.ignored)
    if is_unpaired_layout(tree):
        names = list(class_names or ("A", "B"))
        if len(names) != 2 or len(set(names)) != 2 or not all(names):
            raise SourceError(f"{tree.root}: the trainA/trainB layout needs two distinct class "
                              f"names, A first (e.g. --class_names=horse,zebra); got {names}")
        layout = _unpaired_layout(tree, names, skipped)
    else:
        if class_names:
            raise SourceError(f"{tree.root}: --class_names only applies to the unpaired "
                              "trainA/ trainB/ (testA/ testB/) layout; this source names its "
                              "classes by folder or file name")
        layout = _class_folder_layout(tree, skipped)
    if not any(layout.items.values()):
        raise SourceError(f"{tree.root}: no images found (expected <class>/<image> folders, "
                          "files named <class>.<id>.jpg, optionally under train/ and test/, or "
                          "trainA/ trainB/ (testA/ testB/) folders of images)")

    def check(item):
        try:
            _check_header(tree, item[0])
            return None
        except (imaging.ImageDecodeError, OSError) as e:
            return str(e)

    kept: dict[str, list[int]] = {}
    for split, items in layout.items.items():
        kept[split] = []
        for i, err in enumerate(ordered_map(check, items, num_threads, chunk=256)):
            if err is None:
                kept[split].append(i)
            else:
                skipped.append({"file": tree.where(items[i][0]), "reason": err})

    found = {(split, layout.items[split][i][1]) for split, keep in kept.items() for i in keep}
    present = {c for _, c in found}
    if not present:
        raise SourceError(f"{tree.root}: none of the images could be decoded; see the reasons: "
                          + "; ".join(s["reason"] for s in skipped[:5]))
    order = layout.class_order or sorted(present)
    class_names_out = [c for c in order if c in present]
    class_index = {c: i for i, c in enumerate(class_names_out)}

    empty = []
    for split, cls, folder in layout.folders:
        if (split, cls) in found:
            continue
        n_images = sum(1 for n, c in layout.items[split] if c == cls)
        empty.append({
            "folder": tree.where(folder) + "/", "split": split, "class": cls,
            "reason": (f"none of its {n_images} images could be decoded" if n_images
                       else "no image files"),
            "kept": cls in present})

    splits = {}
    for split, keep in kept.items():
        if keep:
            items = layout.items[split]
            files = [items[i][0] for i in keep]
            ids = np.asarray([class_index[items[i][1]] for i in keep], np.int64)
            images = ImageFiles(tree, files, tuple(image_size), resize_policy, reduced_decode,
                                num_threads)
            splits[split] = Split(images, ids, files)
    return SourceData(f"image_folder:{layout.name}", class_names_out, splits, skipped=skipped,
                      empty_classes=empty)


def _check_header(tree: FileTree, name: str) -> None:
    """What imaging.decode_image checks before decoding, read from a file's first bytes (more
    only when its header is further in, as a JPEG's after a large EXIF block)."""
    where = tree.where(name)
    for limit in (4096, 1 << 16, None):
        data = tree.read(name, limit)
        if not data:
            raise imaging.ImageDecodeError(f"{where}: empty file")
        try:
            imaging.check_image_pixels(data, where)
            return
        except imaging.ImageTooLargeError:
            raise
        except imaging.ImageDecodeError:
            if limit is None or len(data) < limit:
                raise


def describe_empty_class(entry: dict) -> str:
    """One line for the summary: the folder, why it is empty, and whether the class stays."""
    fate = (f"class {entry['class']!r} kept, with 0 {entry['split']} images (it has images in "
            "another split)" if entry["kept"] else
            f"class {entry['class']!r} dropped (no images in any split)")
    return f"empty class folder {entry['folder']}: {entry['reason']}; {fate}"


# ---------------------------------------------------------------------------------------------
# CIFAR-100 label sets.

def select_label_set(data: SourceData, label_set: str) -> SourceData:
    """'fine' keeps the source's classes; 'coarse' makes CIFAR-100's 20 superclasses the
    classes (class_id = coarse_id)."""
    if label_set not in LABEL_SETS:
        raise SourceError(f"--label must be one of {', '.join(LABEL_SETS)}, got {label_set!r}")
    if data.coarse_class_names is None:
        if label_set == "coarse":
            raise SourceError(f"--label=coarse needs a source with coarse labels (CIFAR-100); "
                              f"this {data.format} source has none")
        return data
    if label_set == "fine":
        return dataclasses.replace(data, label_set="fine")
    splits = {k: Split(s.images, s.coarse_ids, s.source_ids, s.coarse_ids)
              for k, s in data.splits.items()}
    return dataclasses.replace(data, class_names=list(data.coarse_class_names), splits=splits,
                               label_set="coarse")


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Download:
    """An official copy of a source: `make_tfrecords --source=<keyword>` fetches `origin` into
    --download_dir as `fname` and checks its sha256 (a copy already there is checked too)."""
    keyword: str
    fname: str
    origin: str
    sha256: str


@dataclasses.dataclass
class Probe:
    """What a `Source` detects from: the path, and the file names in it (read on first use,
    for sources that are file trees)."""
    path: str
    _tree: "FileTree | None" = None

    @property
    def tree(self) -> FileTree:
        if self._tree is None:
            self._tree = FileTree(self.path)
        return self._tree

    @functools.cached_property
    def names(self) -> set[str]:
        return set(self.tree.names())


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """What `load_source` passes every reader; each takes what applies to it."""
    image_size: tuple[int, int] = (32, 32)
    resize_policy: str = imaging.DEFAULT_RESIZE_POLICY
    num_threads: int | None = None
    class_names: list[str] | None = None
    reduced_decode: bool = False


@dataclasses.dataclass(frozen=True)
class Source:
    """One kind of source, declared once: `load_source` tries the records of SOURCES in order
    and reads the path with the first whose `detect` holds; make_tfrecords' help lists them.
    `read` returns a SourceData; `class_names`: it reads --class_names (other sources refuse
    it); `download`: where an official copy comes from."""
    name: str
    help: str                                       # a phrase for make_tfrecords --source
    detect: Callable[[Probe], bool]
    read: Callable[[Probe, ReadOptions], "SourceData"]
    download: Download | None = None
    class_names: bool = False


def _is_npz(probe: Probe) -> bool:
    return os.path.isfile(probe.path) and probe.path.lower().endswith(".npz")


SOURCES: list[Source] = [
    Source("mnist-npz", "an MNIST .npz", _is_npz,
           lambda p, o: read_mnist_npz(p.path),
           # The file and hash keras.datasets.mnist.load_data uses.
           Download("mnist", "mnist.npz",
                    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
                    "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1")),
    Source("cifar10-python", "the CIFAR-10 python archive or folder",
           lambda p: {"data_batch_1", "test_batch"} <= p.names,
           lambda p, o: read_cifar10_python(p.tree),
           Download("cifar10", "cifar-10-python.tar.gz",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")),
    Source("cifar10-binary", "the CIFAR-10 binary archive or folder",
           lambda p: "data_batch_1.bin" in p.names,
           lambda p, o: read_cifar10_binary(p.tree),
           Download("cifar10_binary", "cifar-10-binary.tar.gz",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")),
    Source("cifar100-python", "the CIFAR-100 python archive or folder",
           lambda p: {"train", "test", "meta"} <= p.names,
           lambda p, o: read_cifar100_python(p.tree),
           Download("cifar100", "cifar-100-python.tar.gz",
                    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7")),
    # Last: any other folder or archive is read as images.
    Source("image_folder", "an image folder, .tar(.gz) or .zip (<class>/<img> or "
           "<class>.<id>.jpg, optionally under train/ and test/; or unpaired trainA/ trainB/ "
           "testA/ testB/ folders, see --class_names)",
           lambda p: True,
           lambda p, o: read_image_folder(p.tree, o.image_size, o.resize_policy,
                                          o.num_threads, o.class_names, o.reduced_decode),
           class_names=True),
]


def downloads() -> dict[str, Source]:
    """--source keyword -> the source it downloads."""
    return {s.download.keyword: s for s in SOURCES if s.download}


def source_help() -> str:
    """make_tfrecords' --source help, read from the records."""
    return (" | ".join(downloads()) + " (downloaded into --download_dir if absent), or a "
            "path: " + "; ".join(s.help for s in SOURCES) + ".")


def download_archive(spec: Download, download_dir: str) -> str:
    """Returns the local path of an official archive, downloading it if it is not there;
    a file already there must have the official sha256."""
    folder = os.path.abspath(download_dir)
    target = os.path.join(folder, spec.fname)
    if os.path.isfile(target):
        actual = sha256_file(target)
        if actual != spec.sha256:
            raise SourceError(f"{target}: sha256 {actual}, but the official {spec.fname} has "
                              f"{spec.sha256}; delete it (a partial or different file) and "
                              "run again, or pass --source=<path>")
        return target
    os.makedirs(folder, exist_ok=True)
    # Imported here, not at the top: the conversion's worker processes import this module and
    # must not start TensorFlow (research.data.shards).
    import keras
    try:
        return keras.utils.get_file(spec.fname, origin=spec.origin, file_hash=spec.sha256,
                                    cache_dir=folder, cache_subdir="")
    except Exception as e:
        raise SourceError(
            f"Could not download {spec.origin} ({e}). Without network access, put "
            f"{spec.fname} (sha256 {spec.sha256}) into the folder {folder} "
            "(--download_dir), or pass --source=<path to the file or folder>.") from e


def load_source(source: str, *, image_size: tuple[int, int] = (32, 32),
                resize_policy: str = imaging.DEFAULT_RESIZE_POLICY,
                download_dir: str = "data/downloads",
                num_threads: int | None = None, label_set: str = "fine",
                class_names: list[str] | None = None,
                reduced_decode: bool = False) -> SourceData:
    """Loads `source`: a keyword of SOURCES' downloads ('cifar10', 'cifar10_binary',
    'cifar100', 'mnist') or a path to a file/folder, read by the first of SOURCES that
    detects it. `label_set` picks CIFAR-100's fine or coarse classes; `class_names` names the
    two classes of an unpaired trainA/trainB folder. An image folder's pixels are not read
    here: its splits hold `ImageFiles`, decoded as they are written."""
    keyword = downloads().get(source)
    if keyword is not None:
        source = download_archive(keyword.download, download_dir)
    probe = Probe(source)
    found = next(s for s in SOURCES if s.detect(probe))
    if class_names and not found.class_names:
        raise SourceError(f"{source}: --class_names only applies to the unpaired trainA/ "
                          f"trainB/ image folder layout, not to this {found.name} source")
    options = ReadOptions(tuple(image_size), resize_policy, num_threads, class_names,
                          reduced_decode)
    return select_label_set(found.read(probe, options), label_set)
