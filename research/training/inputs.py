"""What a run reads: the TFRecords (or, for the features recipe, the cached backbone
features), restricted to the examples the run trains and evaluates on (--exclude_classes,
--train_fraction, --train_per_class). One place, so training, evaluation and the step plan
agree on the counts."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from research.data import pipeline
from research.training.config import TrainConfig


def example_mask(cfg: TrainConfig, split: str) -> np.ndarray | None:
    """The run's examples of `split` (None: all). Subsets apply to train only; excluded
    classes leave every split."""
    train = split == "train"
    return pipeline.example_mask(cfg.data_dir, split, cfg.exclude_classes,
                                 cfg.train_fraction if train else None,
                                 cfg.train_per_class if train else None, seed=cfg.seed)


def num_examples(cfg: TrainConfig, manifest: dict, split: str) -> int:
    mask = example_mask(cfg, split)
    return manifest["splits"][split]["num_examples"] if mask is None else int(mask.sum())


def augmentation(cfg: TrainConfig) -> dict:
    """The training stream's seed, scaling and augmentation, as both the TFRecord and the
    in-memory pipelines take them: one place, so the two streams cannot drift apart."""
    return dict(seed=cfg.seed, scale=cfg.scale, augment=cfg.augment, pad=cfg.crop_pad,
                affine=cfg.affine)


def train_input_fn(cfg: TrainConfig, start_step: int):
    """Per-replica input function for `strategy.distribute_datasets_from_function`."""
    keep = example_mask(cfg, "train")
    if cfg.transfer == "features":
        from research.training import features

        cache = features.open_cache(cfg)
        return lambda ctx: features.make_dataset(
            cache, "train", ctx.get_per_replica_batch_size(cfg.batch_size), training=True,
            seed=cfg.seed, start_step=start_step, global_batch_size=cfg.batch_size,
            input_context=ctx, keep=keep)
    if cfg.input == "memory":
        arrays = pipeline.take_examples(cfg.data_dir, "train")  # one read, then from memory
        manifest = pipeline.load_manifest(cfg.data_dir)
        return lambda ctx: pipeline.make_memory_dataset(
            arrays, manifest, ctx.get_per_replica_batch_size(cfg.batch_size),
            start_step=start_step, global_batch_size=cfg.batch_size, input_context=ctx,
            **augmentation(cfg))
    return pipeline.make_input_fn(
        cfg.data_dir, "train", cfg.batch_size, training=True, rebalance=cfg.rebalance,
        start_step=start_step, keep=keep, shard_by=cfg.input_sharding, **augmentation(cfg))


def eval_dataset(cfg: TrainConfig, split: str) -> tuple[tf.data.Dataset, np.ndarray]:
    """(one ordered pass over the run's examples of `split`, their expected positions)."""
    keep = example_mask(cfg, split)
    if cfg.transfer == "features":
        from research.training import features

        ds = features.make_dataset(features.open_cache(cfg), split, cfg.eval_batch_size,
                                   training=False, keep=keep)
    else:
        ds = pipeline.make_dataset(cfg.data_dir, split, cfg.eval_batch_size, training=False,
                                   scale=cfg.scale, keep=keep)
    n = pipeline.load_manifest(cfg.data_dir)["splits"][split]["num_examples"]
    return ds, (np.arange(n) if keep is None else np.flatnonzero(keep))
