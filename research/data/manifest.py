"""The manifest.json that make_tfrecords writes beside its shards, and reading it back.

Kept apart from the writer so that readers (the input pipeline, evaluate, explain) import
neither the writer nor OpenCV.

A manifest is checked when it is read, before any work: its `digest` (a sha256 of everything
else in it, written by make_tfrecords) catches any edit, even a consistent one; its counts
must add up (shards to splits, classes to splits, the positive class); and the shards must
hold the records it lists (research.data.pipeline counts them when it verifies each shard's
sha256). A manifest from before the digest is still read, with the other checks.
"""

from __future__ import annotations

import hashlib
import json
import os

from research.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class DataError(UserError):
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
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem}; rebuild the data with research.apps.make_tfrecords")
    return manifest


def digest(manifest: dict) -> str:
    """sha256 of the manifest without its own digest (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def manifest_problem(manifest: dict) -> str | None:
    """Why the manifest cannot be what make_tfrecords wrote (an edit), else None."""
    if "digest" in manifest and manifest["digest"] != digest(manifest):
        return "edited after make_tfrecords wrote it (its digest does not match its content)"
    try:
        positive = manifest["positive_class"]
        for name, s in manifest["splits"].items():
            in_shards = sum(sh["num_examples"] for sh in s["shards"])
            in_classes = sum(s["class_counts"].values())
            if not in_shards == in_classes == s["num_examples"]:
                return (f"split {name} lists {s['num_examples']:,} examples, its shards "
                        f"{in_shards:,} and its classes {in_classes:,}")
            if s["class_counts"].get(positive, 0) != s["num_positive"]:
                return (f"split {name} lists {s['num_positive']:,} positives but "
                        f"{s['class_counts'].get(positive, 0):,} examples of {positive}")
    except (KeyError, TypeError, AttributeError) as e:
        return f"malformed ({type(e).__name__}: {e})"
    return None
