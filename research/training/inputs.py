"""What a run reads: the TFRecords (or, for the features recipe, the cached backbone
features), restricted to the examples the run trains and evaluates on (which ones:
training/examples.py, so training, evaluation, the feature cache and the step plan agree on
the counts)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from research.data import pipeline
from research.training import feature_cache
from research.training.config import TrainConfig
from research.training.examples import example_mask


def train_stream(cfg: TrainConfig, start_step: int = 0) -> pipeline.Stream:
    """The run's training stream (seed, scaling, augmentation, subset, resume point): the one
    place it is built, for the TFRecord, in-memory and cached-features inputs alike, so they
    cannot drift apart."""
    return pipeline.Stream(seed=cfg.seed, scale=cfg.scale, augment=cfg.augment,
                           pad=cfg.crop_pad, affine=cfg.affine, rebalance=cfg.rebalance,
                           start_step=start_step, global_batch_size=cfg.batch_size,
                           keep=example_mask(cfg, "train"), shard_by=cfg.input_sharding,
                           flip=cfg.flip, cutout=cfg.cutout)


def train_input_fn(cfg: TrainConfig, start_step: int):
    """Per-replica input function for `strategy.distribute_datasets_from_function`."""
    stream = train_stream(cfg, start_step)

    def per_replica(ctx):
        return ctx.get_per_replica_batch_size(cfg.batch_size)

    if cfg.transfer == "features":
        cache = feature_cache.open_cache(cfg)
        return lambda ctx: feature_cache.make_dataset(
            cache, "train", per_replica(ctx), training=True, stream=stream, input_context=ctx)
    if cfg.input == "memory":
        arrays = pipeline.take_examples(cfg.data_dir, "train")  # one read, then from memory
        manifest = pipeline.load_manifest(cfg.data_dir)
        return lambda ctx: pipeline.make_memory_dataset(
            arrays, manifest, per_replica(ctx), stream=stream, input_context=ctx)
    return lambda ctx: pipeline.make_dataset(cfg.data_dir, "train", per_replica(ctx),
                                             training=True, stream=stream, input_context=ctx)


def eval_dataset(cfg: TrainConfig, split: str) -> tuple[tf.data.Dataset, np.ndarray]:
    """(one ordered pass over the run's examples of `split`, their expected positions)."""
    keep = example_mask(cfg, split)
    if cfg.transfer == "features":
        ds = feature_cache.make_dataset(feature_cache.open_cache(cfg), split,
                                        cfg.eval_batch_size, training=False, keep=keep)
    else:
        ds = pipeline.make_dataset(cfg.data_dir, split, cfg.eval_batch_size, training=False,
                                   scale=cfg.scale, keep=keep)
    n = pipeline.load_manifest(cfg.data_dir)["splits"][split]["num_examples"]
    return ds, (np.arange(n) if keep is None else np.flatnonzero(keep))
