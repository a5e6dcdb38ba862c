"""The features recipe: the frozen backbone runs once over train, val and test, and its
feature maps are cached beside the TFRecords, in <data_dir>/features/<key>/.

The key hashes the data's manifest, the backbone, the values of its weights, the cut layer,
the image size and the precision, so any later run with the same key (another head, another
learning rate) reuses the cache and a changed key recomputes. The cache is per example: a run
extracts only the examples it reads (--train_fraction, --eval_fraction, ...) and a later run
that reads more adds the missing ones. Each file's sha256 is checked on open: a corrupt or
half-written cache is recomputed, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from research import files
from research.progress import Bar
from research.data import pipeline
from research.data.manifest import MANIFEST, sha256_file
from research.models import backbones
from research.training import eval_batch, examples
from research.training.config import TrainConfig

META = "features.json"
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class FeatureCache:
    path: str
    feature_shape: tuple[int, ...]
    reused: bool        # nothing had to be computed for this run
    model: keras.Model  # the extractor the features came from
    shard_sizes: dict   # split -> examples per TFRecord shard (the image stream's order)

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """The cached examples of `split`: positions (ascending), features, label, class_id."""
        return _read(os.path.join(self.path, f"{split}.npz"))


def extractor(cfg: TrainConfig, manifest: dict) -> keras.Model:
    """image -> feature map: resize, the backbone's preprocessing and the (cut) backbone.
    Seeded, so that random weights (--weights=none) are the same in every process."""
    keras.utils.set_random_seed(cfg.seed)
    return backbones.build_transfer_model(
        cfg.model, manifest["image_shape"], 1, checkpoint_dir=cfg.checkpoint_dir,
        dtype=None if cfg.precision == "float32" else cfg.precision, features_only=True,
        **cfg.model_options)


def feature_shape(cfg: TrainConfig, manifest: dict) -> tuple[int, ...]:
    """The shape of one example's features, from the extractor built but never run."""
    return tuple(extractor(cfg, manifest).output_shape[1:])


def cache_key(cfg: TrainConfig, model: keras.Model) -> tuple[str, dict]:
    opts = backbones.TransferOptions(**cfg.model_options)
    parts = {"manifest_sha256": sha256_file(os.path.join(cfg.data_dir, MANIFEST)),
             "backbone": cfg.model, "weights_sha256": backbones.weights_hash(model),
             "cut_at": opts.cut_at, "image_size": backbones.image_size_of(cfg.model, opts),
             "precision": cfg.precision}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts


def _read(path: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a cache file (`keys` only: an .npz member is read when asked for, so the
    positions alone cost nothing next to the features)."""
    with np.load(path) as f:
        out = {k: f[k] for k in (keys or f.files) if k in f.files}
        if "positions" not in f.files:  # a cache written whole, before it was per example
            out["positions"] = np.arange(len(f["label"]), dtype=np.int64)
    return out


def _valid(path: str) -> dict | None:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        for split, info in meta["files"].items():
            if sha256_file(os.path.join(path, info["file"])) != info["sha256"]:
                logging.warning("Feature cache %s: %s does not match its sha256; recomputing",
                                path, info["file"])
                return None
        return meta
    except (OSError, ValueError, KeyError) as e:
        logging.warning("Feature cache %s is unreadable (%s); recomputing", path, e)
        return None


_OPEN: dict[tuple, tuple] = {}


def open_cache(cfg: TrainConfig) -> FeatureCache:
    """The run's feature cache. Only the examples the run reads (examples.example_mask) are
    extracted; a later run that reads more adds what is missing and reuses the rest. A corrupt
    cache is recomputed. The extractor is built once per process."""
    memo = (cfg.data_dir, cfg.model, json.dumps(cfg.model_options, sort_keys=True),
            cfg.precision, cfg.checkpoint_dir)
    manifest = pipeline.load_manifest(cfg.data_dir)
    if memo not in _OPEN:
        model = extractor(cfg, manifest)
        _OPEN[memo] = (model, *cache_key(cfg, model))
    model, key, parts = _OPEN[memo]
    path = os.path.join(cfg.data_dir, "features", key)
    meta = _valid(path)
    if meta is None:
        meta = _new(path, key, parts)
    added = {}
    for split in SPLITS:
        n = manifest["splits"][split]["num_examples"]
        keep = examples.example_mask(cfg, split)
        wanted = np.arange(n) if keep is None else np.flatnonzero(keep)
        info = meta["files"].get(split)
        have = (_read(os.path.join(path, info["file"]), ("positions",))["positions"] if info
                else np.zeros(0))
        missing = np.setdiff1d(wanted, have)
        if len(missing):
            meta = add_examples(model, cfg, path, meta, split, n, missing)
            added[split] = len(missing)
    reused = not added
    if reused:
        logging.info("Feature cache %s reused (key %s)", path, key)
    else:
        logging.info("Feature cache %s (key %s, features %s): extracted %s", path, key,
                     meta["feature_shape"], ", ".join(f"{v:,} {k}" for k, v in added.items()))
    sizes = {k: [sh["num_examples"] for sh in v["shards"]]
             for k, v in manifest["splits"].items()}
    return FeatureCache(path, tuple(meta["feature_shape"]), reused, model, sizes)


def _new(path: str, key: str, parts: dict) -> dict:
    """An empty cache folder under `key` (a corrupt one is replaced whole)."""
    if os.path.exists(path):
        shutil.rmtree(path)
    try:
        os.makedirs(path)
    except OSError as e:
        if files.is_out_of_space(e):
            raise files.out_of_space("the feature cache", path) from None
        raise
    meta = {"key": key, **parts, "files": {}}
    _write_meta(path, meta)
    return meta


def _write_meta(path: str, meta: dict) -> None:
    files.write_json(os.path.join(path, META), meta, what="the feature cache index")


def _extract(model: keras.Model, cfg: TrainConfig, split: str, n: int, positions: np.ndarray
             ) -> dict[str, np.ndarray]:
    """The frozen extractor over `positions` of `split` (ascending)."""
    run = tf.function(lambda x: model(x, training=False))
    keep = np.zeros(n, bool)
    keep[positions] = True
    feats, labels, class_ids = [], [], []
    bar = Bar(len(positions), "image", label=f"features of {split}") if cfg.progress else None
    batch = eval_batch.resolve(cfg.eval_batch_size, model, tf.distribute.get_strategy())
    for b in pipeline.batches(pipeline.make_dataset(cfg.data_dir, split, batch,
                                                    training=False, scale="raw", keep=keep)):
        feats.append(np.asarray(tf.cast(run(b["image"]), tf.float16)))
        labels.append(b["label"].numpy())
        class_ids.append(b["class_id"].numpy())
        if bar:
            bar.add(len(labels[-1]))
    return {"positions": positions.astype(np.int64), "features": np.concatenate(feats),
            "label": np.concatenate(labels), "class_id": np.concatenate(class_ids)}


def add_examples(model: keras.Model, cfg: TrainConfig, path: str, meta: dict, split: str,
                 n: int, missing: np.ndarray) -> dict:
    """Extracts the `missing` positions of `split` and merges them into its file (a new file
    renamed into place, then the index: a crash between the two leaves a file whose sha256
    does not match, which is recomputed, never trusted)."""
    new = _extract(model, cfg, split, n, missing)
    info = meta["files"].get(split)
    if info:
        old = _read(os.path.join(path, info["file"]))
        order = np.argsort(np.concatenate([old["positions"], new["positions"]]), kind="stable")
        new = {k: np.concatenate([old[k], new[k]])[order] for k in new}
    file = f"{split}.npz"
    target = os.path.join(path, file)
    with files.atomic_path(target, "the feature cache") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **new)
    meta = {**meta, "feature_shape": list(new["features"].shape[1:]),
            "files": {**meta["files"], split: {"file": file, "num_examples": len(new["label"]),
                                               "sha256": sha256_file(target)}}}
    _write_meta(path, meta)
    return meta


def make_dataset(cache: FeatureCache, split: str, batch_size: int, training: bool, *,
                 stream: pipeline.Stream | None = None,
                 input_context: tf.distribute.InputContext | None = None,
                 keep: np.ndarray | None = None) -> tf.data.Dataset:
    """Like pipeline.make_dataset, over cached features: {image: features, label, class_id,
    index}. Training: the examples of the image pipeline's stream (`pipeline.train_positions`:
    the same order, the same resume point, sliced per input pipeline), gathered from the cache
    (`stream`'s augmentation cannot apply to features). Eval: ordered, whole (`keep`'s)."""
    arrays = cache.arrays(split)
    tensors = {"image": tf.constant(arrays["features"]),
               "label": tf.constant(arrays["label"].astype(np.int32)),
               "class_id": tf.constant(arrays["class_id"].astype(np.int32))}
    n = sum(cache.shard_sizes[split])
    row = np.full(n, -1, np.int64)  # position in the split -> row of the cached arrays
    row[arrays["positions"]] = np.arange(len(arrays["positions"]))
    if training:  # the stream's subset; eval: `keep`'s
        keep = stream.keep if stream is not None else None
    wanted = np.arange(n) if keep is None else np.flatnonzero(keep)
    if (row[wanted] < 0).any():
        raise ValueError(f"feature cache {cache.path}: {int((row[wanted] < 0).sum()):,} "
                         f"examples of {split} this run reads are not cached (open_cache adds "
                         "them)")
    row_t = tf.constant(row)

    def gather(index, positions):
        rows = tf.gather(row_t, positions)
        out = {k: tf.cast(tf.gather(v, rows), tf.float32) if k == "image"
               else tf.gather(v, rows) for k, v in tensors.items()}
        return {**out, "index": positions if index is None else index}

    if not training:
        positions = wanted
        ds = tf.data.Dataset.from_tensor_slices(positions.astype(np.int64)).batch(batch_size)
        return ds.map(lambda p: gather(None, p)).prefetch(tf.data.AUTOTUNE)
    return pipeline.position_batches(cache.shard_sizes[split], batch_size,
                                     stream or pipeline.Stream(), input_context
                                     ).map(gather).prefetch(tf.data.AUTOTUNE)


def full_model(cfg: TrainConfig, manifest: dict, head: keras.Model) -> keras.Model:
    """image -> logits: the extractor followed by the trained head (what is exported)."""
    features = open_cache(cfg).model
    inputs = keras.Input(shape=tuple(manifest["image_shape"]), name="image")
    return keras.Model(inputs, head(features(inputs)), name=f"{cfg.model}_features_transfer")
