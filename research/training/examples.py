"""Which examples of each split a run reads (--exclude_classes, --train_fraction,
--train_per_class, --eval_fraction): the one rule, for the image inputs, the feature cache,
the step plan and evaluation alike."""

from __future__ import annotations

import numpy as np

from research.data import pipeline
from research.training.config import TrainConfig


def example_mask(cfg: TrainConfig, split: str) -> np.ndarray | None:
    """The run's examples of `split` (None: all). Excluded classes leave every split; the
    train subsets apply to train only, --eval_fraction to val and test."""
    train = split == "train"
    return pipeline.example_mask(cfg.data_dir, split, cfg.exclude_classes,
                                 cfg.train_fraction if train else cfg.eval_fraction,
                                 cfg.train_per_class if train else None, seed=cfg.seed)


def num_examples(cfg: TrainConfig, manifest: dict, split: str) -> int:
    mask = example_mask(cfg, split)
    return manifest["splits"][split]["num_examples"] if mask is None else int(mask.sum())
