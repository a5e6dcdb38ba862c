"""The in-loop evaluator: one ordered pass over a whole split (no example dropped), scored
with the model as it trains (orbit's evaluator, as one class)."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from research.data import pipeline
from research.progress import Bar
from research.training import eval_batch, inputs
from research.training.config import TrainConfig
from research.training.state import make_metrics
from research.training.steps import make_eval_step


@dataclasses.dataclass
class EvalResult:
    """A classifier's (no positive class) has no `scores` and no binary `accuracy`."""
    split: str
    scores: np.ndarray | None
    labels: np.ndarray
    class_ids: np.ndarray
    index: np.ndarray
    logits: np.ndarray
    loss: float
    accuracy: float | None
    class_accuracy: float | None
    top5_class_accuracy: float | None = None


class Evaluator:
    """Scores whole splits with `model` under `strategy` (orbit's evaluator, as one class)."""

    def __init__(self, cfg: TrainConfig, strategy: tf.distribute.Strategy, model: keras.Model,
                 positive_id: int | None):
        """`positive_id` None: a classifier."""
        cfg = dataclasses.replace(cfg, eval_batch_size=eval_batch.resolve(
            cfg.eval_batch_size, model, strategy))
        self.cfg, self.strategy = cfg, strategy
        with strategy.scope():
            self.metrics = make_metrics(cfg, training=False, classifier=positive_id is None)
        # One traced step per kind of batch (the distributed dataset's element spec, batch
        # size unknown): every split's batches, the last partial one included, share one
        # trace; another data's (evaluate's rank-5 windows) get their own.
        self._steps: list = []  # (element spec, its step); a spec is a dict: not hashable
        self._make_step = lambda spec: make_eval_step(cfg, strategy, model, self.metrics,
                                                      positive_id, spec)

    def _step(self, spec):
        for known, step in self._steps:
            if known == spec:
                return step
        self._steps.append((spec, self._make_step(spec)))
        return self._steps[-1][1]

    def evaluate(self, split: str, progress: bool = False, data=None) -> EvalResult:
        """`data`: a function (cfg, split) -> (dataset, expected positions) in place of
        inputs.eval_dataset (evaluate's native-aspect windows, research.evaluation.native);
        it is given this evaluator's cfg, its eval batch size resolved."""
        cfg = self.cfg
        for metric in self.metrics.values():
            metric.reset_state()
        ds, expected = (data or inputs.eval_dataset)(cfg, split)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        dist = self.strategy.experimental_distribute_dataset(ds.with_options(options))
        step = self._step(dist.element_spec)
        bar = Bar(len(expected), "image", label=f"scoring {split}") if progress else None
        parts = []
        for batch in pipeline.batches(dist):
            out = {k: v.numpy() for k, v in step(batch).items()}
            parts.append(out)
            if bar:
                bar.add(len(out["index"]))
        outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(outputs["index"])
        outputs = {k: v[order] for k, v in outputs.items()}
        if not np.array_equal(outputs["index"], expected):
            raise RuntimeError(f"evaluation of {split} saw {len(outputs['index'])} examples, "
                               f"the run's examples of it are {len(expected)}")
        m = self.metrics

        def value(name):
            return float(m[name].result()) if name in m else None

        return EvalResult(split, outputs.get("score"), outputs["label"], outputs["class_id"],
                          outputs["index"], outputs["logits"], value("loss"), value("accuracy"),
                          value("class_accuracy"), value("top5_class_accuracy"))
