"""The manifest.json that make_tfrecords writes beside its shards, and reading it back.

Kept apart from the writer so that readers (the input pipeline, evaluate, explain) import
neither the writer nor OpenCV.
"""

from __future__ import annotations

import hashlib
import json
import os

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class DataError(ValueError):
    """A manifest or shard is missing, from another schema version, or corrupt."""


def manifest_path(data_dir: str) -> str:
    return os.path.join(data_dir, MANIFEST)


def has_manifest(data_dir: str | None) -> bool:
    return bool(data_dir) and os.path.isfile(manifest_path(data_dir))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: --data_dir must be a folder written by "
                        "`python -m research.apps.make_tfrecords`")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {version!r}, but this code reads version "
                        f"{SCHEMA_VERSION}; rebuild the data with research.apps.make_tfrecords")
    return manifest
