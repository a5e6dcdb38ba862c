"""The train state: how long the run is (its Plan), the optimizer, the metrics, and the state
itself (model, optimizer, metrics, checkpoint), all created inside `strategy.scope()`.

The global step is the batches the optimizers have consumed (`optimizer.iterations`, plus
the steps a float16 loss scale skipped); the learning rate is a function of `iterations`, so
a run killed at any checkpoint resumes onto the same trajectory.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from research.data import pipeline
from research.metrics import TOP_K
from research.training import checkpoints
from research.training.config import TrainConfig
from research.training.lookahead import Lookahead
from research.training.loss_scale import batches_consumed
from research.training.model import apply_phase, init_model_from_data, make_model
from research.training.optimizers import make_optimizer
from research.training.proxy import ProxySelector
from research.training.schedule import learning_rate_schedule


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long the run is, in optimizer steps (fine_tune: phase 1 is `head_steps` long)."""
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    head_steps: int | None = None


def plan_steps(cfg: TrainConfig, manifest: dict, num_train: int | None = None) -> Plan:
    """`num_train`: the run's training examples when it trains on a subset."""
    per_epoch = pipeline.steps_per_epoch(manifest, cfg.batch_size, num_examples=num_train)
    head = None
    if cfg.transfer == "fine_tune":
        head = max(1, int(round(cfg.head_epochs * per_epoch)))
        total = head + max(1, int(round(cfg.fine_tune_epochs * per_epoch)))
    else:
        total = cfg.train_steps or max(1, int(round(cfg.epochs * per_epoch)))
    eval_every = cfg.eval_every_steps or per_epoch
    return Plan(per_epoch, total, eval_every, cfg.checkpoint_every_steps or eval_every, head)


@dataclasses.dataclass
class TrainState:
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    best_manager: tf.train.CheckpointManager
    epoch: tf.Variable
    best_metric: tf.Variable
    bad_evals: tf.Variable
    train_metrics: dict
    fine_tune_optimizer: keras.optimizers.Optimizer | None = None  # fine_tune phase 2
    phase: tf.Variable | None = None                                # fine_tune: 1 or 2
    lookahead: Lookahead | None = None                               # --lookahead_every
    # Sums of the train metrics (x steps) since the last evaluation, and the step count: in
    # the checkpoint, so history.jsonl's train averages mean the same in a resumed run.
    since_eval: tf.Variable | None = None
    proxy: ProxySelector | None = None                               # --proxy_widths

    @property
    def in_phase_2(self) -> bool:
        return self.phase is not None and int(self.phase.numpy()) == 2

    @property
    def active_optimizer(self) -> keras.optimizers.Optimizer:
        return self.fine_tune_optimizer if self.in_phase_2 else self.optimizer

    @property
    def step(self) -> int:
        """The global step, in batches consumed: phase 2's optimizer counts from 0 where
        phase 1's stopped, and a step a float16 loss scale skipped counts (it consumed its
        batch), so the input stream resumes where it stopped."""
        step = batches_consumed(self.optimizer)
        if self.fine_tune_optimizer is not None:
            step += batches_consumed(self.fine_tune_optimizer)
        return step


def make_metrics(cfg: TrainConfig, training: bool, classifier: bool = False) -> dict:
    """The streaming metrics of the train steps (with a bucketed ROC-AUC) or of an
    evaluation pass (whose exact metrics are computed from all scores afterwards; it adds
    the top-5 accuracy). A classifier (no positive class) has no detector metric."""
    metrics = {"loss": keras.metrics.Mean(name="loss")}
    if not classifier:
        metrics["accuracy"] = keras.metrics.BinaryAccuracy(name="accuracy")
        if training:
            metrics["roc_auc"] = keras.metrics.AUC(curve="ROC", num_thresholds=500,
                                                   name="roc_auc")
    if cfg.objective == "multiclass":
        metrics["class_accuracy"] = keras.metrics.SparseCategoricalAccuracy("class_accuracy")
        if not training:
            metrics["top5_class_accuracy"] = keras.metrics.SparseTopKCategoricalAccuracy(
                k=TOP_K, name="top5_class_accuracy")
    return metrics


def since_eval_keys(cfg: TrainConfig) -> tuple[str, ...]:
    """The train metrics whose sums since the last evaluation the checkpoint keeps
    (TrainState.since_eval, then the step count), in that order: a detector's names for
    either kind of run, so a classifier's checkpoint has the layout a source task's had
    before classifiers dropped the detector metrics, and such a run resumes (a classifier's
    sums of the detector metrics stay 0)."""
    return tuple(sorted(["accuracy", "loss", "roc_auc"] +
                        (["class_accuracy"] if cfg.objective == "multiclass" else [])))


def create_train_state(cfg: TrainConfig, strategy: tf.distribute.Strategy, manifest: dict,
                       plan: Plan, model: keras.Model | None = None) -> TrainState:
    """Model (unless given, already built in this scope), optimizer, metrics and checkpoint,
    all created inside strategy.scope()."""
    with strategy.scope():
        if model is None:
            model = make_model(cfg, manifest)
            init_model_from_data(cfg, model, manifest)
        head_steps = plan.head_steps or plan.total_steps
        schedule = learning_rate_schedule(
            cfg, cfg.head_lr or cfg.learning_rate, int(cfg.warmup_epochs * plan.steps_per_epoch),
            head_steps)
        optimizer = make_optimizer(cfg, schedule, steps_per_epoch=plan.steps_per_epoch)
        extra = {}
        if cfg.transfer == "fine_tune":
            # Phase 2's optimizer is built now, on phase 2's variables, so a checkpoint of
            # either phase restores into the same objects.
            apply_phase(cfg, model, 2)
            fine_tune = make_optimizer(cfg, learning_rate_schedule(
                cfg, cfg.fine_tune_lr, 0, plan.total_steps - head_steps))
            fine_tune.build(model.trainable_variables)
            extra = {"fine_tune_optimizer": fine_tune,
                     "phase": tf.Variable(1, dtype=tf.int64, trainable=False, name="phase")}
        apply_phase(cfg, model, 1)
        optimizer.build(model.trainable_variables)
        lookahead = (Lookahead.create(model, cfg.lookahead_every, cfg.lookahead_decay,
                                      plan.total_steps) if cfg.lookahead_every else None)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        best = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_val")
        bad = tf.Variable(0, dtype=tf.int64, trainable=False, name="evals_without_gain")
        train_metrics = make_metrics(cfg, training=True,
                                     classifier=cfg.positive_class(manifest) is None)
        # Keras seed-generator states (dropout masks) are not tracked through the model by
        # tf.train.Checkpoint; without them a resumed run would replay the first masks.
        rng_states = [v for v in model.non_trainable_variables if "seed_generator" in v.path]
        slow = {"lookahead_slow": lookahead.slow} if lookahead else {}
        proxy = (ProxySelector.create(cfg, manifest, model, schedule) if cfg.proxy_widths
                 else None)
        if proxy is not None:
            slow.update(proxy.checkpointed())
        since_eval = tf.Variable(tf.zeros([len(since_eval_keys(cfg)) + 1], tf.float64),
                                 trainable=False, name="since_eval")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch,
                                         best_metric=best, bad_evals=bad, rng_states=rng_states,
                                         since_eval=since_eval, **extra, **slow)
        manager = tf.train.CheckpointManager(checkpoint, cfg.run_dir,
                                             max_to_keep=cfg.keep_checkpoints,
                                             step_counter=optimizer.iterations)
        best_manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(cfg.run_dir, checkpoints.BEST), max_to_keep=1,
            checkpoint_name="best", step_counter=optimizer.iterations)
    return TrainState(strategy, model, optimizer, checkpoint, manager, best_manager, epoch, best,
                      bad, train_metrics, lookahead=lookahead, since_eval=since_eval,
                      proxy=proxy, **extra)
