"""The features recipe: the frozen backbone runs once over train, val and test, and its
feature maps are cached beside the TFRecords, in <data_dir>/features/<key>/.

The key hashes the data's manifest, the backbone, the values of its weights, the cut layer,
the image size and the precision, so any later run with the same key (another head, another
learning rate) reuses the cache and a changed key recomputes. Each file's sha256 is checked
on open: a corrupt or half-written cache is recomputed, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from research import files
from research.progress import Bar
from research.data import pipeline
from research.data.manifest import MANIFEST, sha256_file
from research.models import backbones
from research.training.config import TrainConfig

META = "features.json"
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class FeatureCache:
    path: str
    feature_shape: tuple[int, ...]
    reused: bool
    model: keras.Model  # the extractor the features came from
    shard_sizes: dict   # split -> examples per TFRecord shard (the image stream's order)

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        with np.load(os.path.join(self.path, f"{split}.npz")) as f:
            return {k: f[k] for k in f.files}


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


_OPEN: dict[tuple, FeatureCache] = {}


def open_cache(cfg: TrainConfig) -> FeatureCache:
    """The run's feature cache, computed if absent or corrupt (once per process)."""
    memo = (cfg.data_dir, cfg.model, json.dumps(cfg.model_options, sort_keys=True),
            cfg.precision, cfg.checkpoint_dir)
    if memo in _OPEN:
        return _OPEN[memo]
    manifest = pipeline.load_manifest(cfg.data_dir)
    model = extractor(cfg, manifest)
    key, parts = cache_key(cfg, model)
    path = os.path.join(cfg.data_dir, "features", key)
    meta = _valid(path)
    reused = meta is not None
    if meta is None:
        meta = compute(model, cfg, manifest, path, key, parts)
    else:
        logging.info("Feature cache %s reused (key %s)", path, key)
    sizes = {k: [sh["num_examples"] for sh in v["shards"]]
             for k, v in manifest["splits"].items()}
    _OPEN[memo] = FeatureCache(path, tuple(meta["feature_shape"]), reused, model, sizes)
    return _OPEN[memo]


def compute(model: keras.Model, cfg: TrainConfig, manifest: dict, path: str, key: str,
            parts: dict) -> dict:
    """Runs the frozen extractor once over every split; writes into a temporary folder that
    is renamed into place, so a crash never leaves a half cache under the key."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=parent)
    run = tf.function(lambda x: model(x, training=False))
    meta = {"key": key, **parts, "files": {}}
    try:
        for split in SPLITS:
            feats, labels, class_ids = [], [], []
            n = manifest["splits"][split]["num_examples"]
            bar = Bar(n, "image", label=f"features of {split}") if cfg.progress else None
            for b in pipeline.make_dataset(cfg.data_dir, split, cfg.eval_batch_size,
                                           training=False, scale="raw"):
                feats.append(np.asarray(tf.cast(run(b["image"]), tf.float16)))
                labels.append(b["label"].numpy())
                class_ids.append(b["class_id"].numpy())
                if bar:
                    bar.add(len(labels[-1]))
            file = f"{split}.npz"
            np.savez(os.path.join(tmp, file), features=np.concatenate(feats),
                     label=np.concatenate(labels), class_id=np.concatenate(class_ids))
            meta["files"][split] = {"file": file, "num_examples": n,
                                    "sha256": sha256_file(os.path.join(tmp, file))}
            meta["feature_shape"] = list(feats[0].shape[1:])
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        files.fsync_tree(tmp)
        if os.path.exists(path):  # a corrupt cache: replaced whole
            shutil.rmtree(path)
        os.replace(tmp, path)
        files.fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if files.is_out_of_space(e):
            raise files.out_of_space("the feature cache", path) from None
        raise
    logging.info("Feature cache %s written (key %s, features %s)", path, key,
                 meta["feature_shape"])
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

    def gather(index, positions):
        out = {k: tf.cast(tf.gather(v, positions), tf.float32) if k == "image"
               else tf.gather(v, positions) for k, v in tensors.items()}
        return {**out, "index": positions if index is None else index}

    if not training:
        positions = np.arange(len(arrays["label"])) if keep is None else np.flatnonzero(keep)
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
