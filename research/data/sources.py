"""Readers for the supported sources: CIFAR-10/100 archives and folders of images.

Every reader returns a `SourceData`: uint8 images per split, class ids and names, and the
files it could not use, each with a reason. Archives are read in memory (never extracted),
pickles go through a restricted unpickler, and tar members that try to escape the archive
root are refused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import pickle
import posixpath
import re
import tarfile
from typing import Callable, Iterable

import numpy as np

from research.data import imaging

DOWNLOADS = {
    "cifar10": dict(
        fname="cifar-10-python.tar.gz",
        origin="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    "cifar10_binary": dict(
        fname="cifar-10-binary.tar.gz",
        origin="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    "cifar100": dict(
        fname="cifar-100-python.tar.gz",
        origin="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),
}

CIFAR_RECORD_BYTES = 1 + 32 * 32 * 3


class SourceError(ValueError):
    """The source is missing, malformed or unsafe; the message names the file."""


class UnsafeArchiveError(SourceError):
    """A tar member would escape the archive root."""


@dataclasses.dataclass
class Split:
    images: np.ndarray            # (N, H, W, 3) uint8
    class_ids: np.ndarray         # (N,) int64
    source_ids: list[str]
    coarse_ids: np.ndarray | None = None  # (N,) int64, CIFAR-100 only

    def __len__(self) -> int:
        return len(self.class_ids)

    def take(self, idx: np.ndarray) -> "Split":
        return Split(self.images[idx], self.class_ids[idx], [self.source_ids[i] for i in idx],
                     None if self.coarse_ids is None else self.coarse_ids[idx])


@dataclasses.dataclass
class SourceData:
    format: str
    class_names: list[str]
    splits: dict[str, Split]
    coarse_class_names: list[str] | None = None
    skipped: list[dict] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# File trees: a folder or a tar archive, read without extracting.

class FileTree:
    """Regular files of a folder or a tar archive, by relative posix path."""

    def __init__(self, root: str):
        self.root = root
        self._files: dict[str, Callable[[], bytes]] = {}
        self.ignored: list[dict] = []
        if os.path.isdir(root):
            self._scan_dir(root)
        elif os.path.isfile(root) and tarfile.is_tarfile(root):
            self._scan_tar(root)
        elif os.path.exists(root):
            raise SourceError(f"{root}: not a folder or a .tar/.tar.gz archive")
        else:
            raise SourceError(f"{root}: no such file or folder")
        self._strip_wrapper_dirs()

    def _scan_dir(self, root: str) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            for fn in sorted(filenames):
                if _hidden(fn):
                    continue
                full = os.path.join(dirpath, fn)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                self._files[rel] = (lambda p=full: _read_file(p))

    def _scan_tar(self, path: str) -> None:
        try:
            with tarfile.open(path, "r|*") as tar:  # streaming: one pass over a .gz
                for member in tar:
                    name = _safe_member_name(path, member.name)
                    if name is None:
                        continue
                    if not member.isfile():
                        if not member.isdir():
                            self.ignored.append({"file": f"{path}:{member.name}",
                                                 "reason": "not a regular file (link or device)"})
                        continue
                    if any(_hidden(p) for p in name.split("/")):
                        continue
                    data = tar.extractfile(member).read()
                    self._files[name] = (lambda d=data: d)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise SourceError(f"{path}: truncated or corrupt archive ({e})") from e

    def _strip_wrapper_dirs(self) -> None:
        while self._files:
            tops = {n.split("/", 1)[0] for n in self._files}
            if len(tops) != 1 or any("/" not in n for n in self._files):
                return
            top = tops.pop()
            self._files = {n[len(top) + 1:]: f for n, f in self._files.items()}

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, name: str) -> bytes:
        return self._files[name]()

    def where(self, name: str) -> str:
        return f"{self.root}:{name}" if os.path.isfile(self.root) else os.path.join(self.root, name)

    def __contains__(self, name: str) -> bool:
        return name in self._files


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


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
# Image folders: <root>/[train|test]/<class>/<file> or flat Kaggle names <class>.<id>.<ext>.

_FLAT_NAME = re.compile(r"^(?P<cls>[^./]+)\.[^/]+\.[A-Za-z]+$")


def read_image_folder(tree: FileTree, image_size: tuple[int, int], resize_policy: str,
                      num_threads: int | None = None) -> SourceData:
    names = tree.names()
    skipped: list[dict] = list(tree.ignored)
    split_dirs = {n.split("/", 1)[0] for n in names if "/" in n} & {"train", "test"}
    if "train" in split_dirs:
        groups = {s: [] for s in ("train", "test") if s in split_dirs}
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

    labelled: dict[str, list[tuple[str, str]]] = {}
    layouts = set()
    for split, rels in groups.items():
        items = []
        for rel in rels:
            full = prefixes[split] + rel
            parts = rel.split("/")
            if not imaging.is_image_name(rel):
                skipped.append({"file": tree.where(full), "reason": "not an image file extension"})
            elif len(parts) == 2:
                items.append((full, parts[0]))
                layouts.add("class_folders")
            elif len(parts) == 1 and _FLAT_NAME.match(rel):
                items.append((full, _FLAT_NAME.match(rel).group("cls").lower()))
                layouts.add("flat_names")
            else:
                skipped.append({"file": tree.where(full), "reason":
                                "not at <class>/<file> and not named <class>.<id>.<ext>"})
        labelled[split] = items
    if not any(labelled.values()):
        raise SourceError(f"{tree.root}: no images found (expected <class>/<image> folders or "
                          "files named <class>.<id>.jpg, optionally under train/ and test/)")
    class_names = sorted({c for items in labelled.values() for _, c in items})
    class_index = {c: i for i, c in enumerate(class_names)}

    def decode(item):
        name, _ = item
        try:
            img = imaging.decode_image(tree.read(name), tree.where(name))
            return imaging.resize_image(img, image_size, resize_policy), None
        except (imaging.ImageDecodeError, OSError) as e:
            return None, str(e)

    splits = {}
    h, w = image_size
    with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 2) as pool:
        for split, items in labelled.items():
            images = np.empty((len(items), h, w, 3), np.uint8)
            keep = []
            for i, (img, err) in enumerate(pool.map(decode, items, chunksize=256)):
                if err is None:
                    images[i] = img
                    keep.append(i)
                else:
                    skipped.append({"file": tree.where(items[i][0]), "reason": err})
            if keep:
                idx = np.asarray(keep)
                ids = np.asarray([class_index[items[i][1]] for i in keep], np.int64)
                splits[split] = Split(images[idx], ids, [items[i][0] for i in keep])
    if not splits:
        raise SourceError(f"{tree.root}: none of the images could be decoded; see the reasons: "
                          + "; ".join(s["reason"] for s in skipped[:5]))
    layout = "+".join(sorted(layouts))
    return SourceData(f"image_folder:{layout}", class_names, splits, skipped=skipped)


# ---------------------------------------------------------------------------------------------

def download_archive(key: str, download_dir: str) -> str:
    """Returns the local path of an official archive, downloading it if it is not there."""
    spec = DOWNLOADS[key]
    target = os.path.join(os.path.abspath(download_dir), spec["fname"])
    if os.path.isfile(target):
        return target
    import keras  # deferred: keras import is slow and only needed to download

    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        return keras.utils.get_file(spec["fname"], origin=spec["origin"],
                                    file_hash=spec["sha256"], cache_dir=os.path.dirname(target),
                                    cache_subdir="")
    except Exception as e:
        raise SourceError(
            f"Could not download {spec['origin']} ({e}). Without network access, place "
            f"{spec['fname']} (sha256 {spec['sha256']}) at {target}, or pass "
            "--source=<path to the archive or folder>.") from e


def load_source(source: str, *, image_size: tuple[int, int] = (32, 32),
                resize_policy: str = "center_crop", download_dir: str = "data/downloads",
                num_threads: int | None = None) -> SourceData:
    """Loads `source`: 'cifar10', 'cifar10_binary', 'cifar100', or a path to a file/folder."""
    if source in DOWNLOADS:
        source = download_archive(source, download_dir)
    tree = FileTree(source)
    names = set(tree.names())
    if "data_batch_1" in names and "test_batch" in names:
        return read_cifar10_python(tree)
    if "data_batch_1.bin" in names:
        return read_cifar10_binary(tree)
    if {"train", "test", "meta"} <= names:
        return read_cifar100_python(tree)
    return read_image_folder(tree, image_size, resize_policy, num_threads)
