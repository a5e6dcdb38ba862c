"""Losses and the compiled steps: the train loop (`steps_per_loop` replica steps per call) and
the eval step. Metrics are updated inside the replica functions."""

from __future__ import annotations

import keras
import tensorflow as tf

from research.detector import detector_scores, positive_scores
from research.training.config import ConfigError, TrainConfig
from research.training.loss_scale import DynamicLossScaleOptimizer, batch_clock
from research.training.state import TrainState

from research.training.muon import sgd_lr_scale, takes_l2


def per_example_loss(cfg: TrainConfig, batch: dict, logits: tf.Tensor,
                     weights: dict | None) -> tf.Tensor:
    logits = tf.cast(logits, tf.float32)
    if cfg.objective == "binary":
        y = tf.cast(batch["label"], tf.float32)[:, None]
        loss = keras.losses.binary_crossentropy(y, logits, from_logits=True,
                                                label_smoothing=cfg.label_smoothing)
        w = None if weights is None else tf.gather(weights["binary"], batch["label"])
    else:
        y = tf.one_hot(batch["class_id"], tf.shape(logits)[-1])
        loss = keras.losses.categorical_crossentropy(y, logits, from_logits=True,
                                                     label_smoothing=cfg.label_smoothing)
        w = None if weights is None else tf.gather(weights["multiclass"], batch["class_id"])
    return loss if w is None else loss * w


def is_bn_shift(variable) -> bool:
    """A BatchNorm shift (beta): the variables --bias_lr_scale speeds up."""
    return variable.name == "beta"


def l2_penalty(cfg: TrainConfig, variables) -> tf.Tensor:
    """--optimizer=sgd_l2's (and muon's) weight decay as a loss term, sum of wd_v / 2 ||v||^2
    over every trained variable (muon: but its filters): its gradient adds wd_v v to each
    variable's gradient (PyTorch's SGD weight_decay). wd_v is wd / the variable's
    sgd_lr_scale (--bias_lr_scale, --logits_lr_scale): once its gradient is scaled up, its
    decay per step equals everyone's (airbench's weight_decay=wd/lr_biases)."""
    terms = []
    for v in variables:
        if not takes_l2(cfg, v):
            continue
        wd = cfg.weight_decay / sgd_lr_scale(cfg, v)
        terms.append(0.5 * wd * tf.reduce_sum(tf.square(tf.cast(v, tf.float32))))
    return tf.add_n(terms)


def update_metrics(metrics: dict, batch: dict, per_example: tf.Tensor, scores: tf.Tensor,
                   logits: tf.Tensor) -> None:
    """`scores` (p(positive)) is None for a classifier, whose metrics read the logits only."""
    metrics["loss"].update_state(per_example)
    for name in ("accuracy", "roc_auc"):
        if name in metrics:
            metrics[name].update_state(batch["label"], scores)
    for name in ("class_accuracy", "top5_class_accuracy"):
        if name in metrics:
            metrics[name].update_state(batch["class_id"], logits)


def make_train_loop(cfg: TrainConfig, state: TrainState, positive_id: int | None,
                    weights: dict | None, device=None):
    """A tf.function that runs `num_steps` distributed steps from `iterator` (`positive_id`
    None: a classifier). `device` (research.training.inputs.DeviceData, --input=device): the
    iterator gives positions, and each replica's step builds its batch from its device's
    copy of the training split."""
    strategy, model, optimizer = state.strategy, state.model, state.active_optimizer
    replicas = strategy.num_replicas_in_sync

    # XLA compiles the forward and backward pass; the iterator, the all-reduce and the
    # optimizer update stay outside (XLA has no kernel for IteratorGetNext). Without XLA it
    # is not a nested tf.function: synchronised BatchNorm all-reduces inside it.
    def forward_backward(batch):
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            logits = model(batch["image"], training=True)
            per_ex = per_example_loss(cfg, batch, logits, weights)
            loss = tf.nn.compute_average_loss(per_ex, global_batch_size=cfg.batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            if cfg.optimizer in ("sgd_l2", "muon") and cfg.weight_decay:
                loss += tf.nn.scale_regularization_loss(l2_penalty(cfg, variables))
            scaled = optimizer.scale_loss(loss)
        return tape.gradient(scaled, variables), per_ex, logits

    if cfg.jit_compile:
        if replicas > 1:
            raise ConfigError("--jit_compile needs a single replica: synchronised BatchNorm "
                              "all-reduces inside the compiled step")
        forward_backward = tf.function(forward_backward, jit_compile=True)

    proxy = state.proxy
    if proxy is not None and replicas > 1:
        raise ConfigError("--proxy_widths needs a single replica: the reference keeps the "
                          "hardest examples of the whole batch")

    def replica_step(batch, resident=None):
        if device is not None:
            batch = device.batch(batch, resident)
        if proxy is not None:  # airbench96_faster: train on the hardest part of the batch
            batch = proxy.select(batch, optimizer.iterations)
        grads, per_ex, logits = forward_backward(batch)
        if cfg.clip_norm:
            # Clip the global (all-replica) gradient; Keras would clip per replica. Its own
            # all-reduce then sums the 1/replicas shares back to the clipped total.
            ctx = tf.distribute.get_replica_context()
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            if isinstance(optimizer, DynamicLossScaleOptimizer):
                grads = [g / optimizer.dynamic_scale for g in grads]
                grads, _ = tf.clip_by_global_norm(grads, cfg.clip_norm)
                grads = [g * optimizer.dynamic_scale for g in grads]
            else:
                grads, _ = tf.clip_by_global_norm(grads, cfg.clip_norm)
            grads = [g / replicas for g in grads]
        if cfg.bias_lr_scale != 1.0 or cfg.logits_lr_scale != 1.0:
            # SGD is linear in the gradient: scaling the BN shifts' (logits kernel's)
            # gradients scales their learning rate, momentum included (their L2 term, if
            # any, was divided by it).
            scales = [sgd_lr_scale(cfg, v) for v in model.trainable_variables]
            grads = [g * s if s != 1.0 else g for g, s in zip(grads, scales)]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        scores = (None if positive_id is None
                  else positive_scores(logits, cfg.objective, positive_id))
        update_metrics(state.train_metrics, batch, per_ex, scores, logits)

    lookahead = state.lookahead

    def train_loop(iterator, num_steps):
        for _ in tf.range(num_steps):
            args = (next(iterator),) if device is None else (next(iterator), device.values)
            strategy.run(replica_step, args=args)
            if lookahead is not None:
                clock = batch_clock(optimizer)  # once per batch, skipped steps included
                if lookahead.due(clock):  # a tf.cond under tf.function
                    lookahead.update(clock)

    # --run_eagerly: the same Python, run op by op (tf.range iterates eagerly too).
    return train_loop if cfg.run_eagerly else tf.function(train_loop)


def make_eval_step(cfg: TrainConfig, strategy: tf.distribute.Strategy, model: keras.Model,
                   metrics: dict, positive_id: int | None, element_spec):
    """A tf.function scoring one distributed batch; returns the gathered outputs (a
    classifier's, `positive_id` None, without scores). `element_spec`: the distributed
    dataset's, whose batch size is unknown (no eval batch is dropped), so the step is traced
    once for every batch of every split fed with that spec (reduce_retracing traced the first
    batch's size and again the first other size)."""

    outputs = model.output_shape[-1]

    def score(images):
        scores, logits = detector_scores(model, images, cfg.objective, positive_id, cfg.tta,
                                         cfg.tta_shifts)
        return logits if scores is None else (scores, logits)

    def nothing():
        logits = tf.zeros([0, outputs], tf.float32)
        return logits if positive_id is None else (tf.zeros([0], tf.float32), logits)

    def replica_step(batch):
        # A replica whose share of the last batch is empty scores nothing: oneDNN's fused
        # convolutions fail on an empty batch ("input depth must be evenly divisible").
        out = tf.cond(tf.shape(batch["image"])[0] > 0, lambda: score(batch["image"]), nothing)
        scores, logits = (None, out) if positive_id is None else out
        update_metrics(metrics, batch, per_example_loss(cfg, batch, logits, None), scores,
                       logits)
        out = {"label": batch["label"], "class_id": batch["class_id"], "index": batch["index"],
               "logits": tf.cast(logits, tf.float32)}
        return out if scores is None else {**out, "score": scores}

    def eval_step(dist_batch):
        out = strategy.run(replica_step, args=(dist_batch,))
        return {k: strategy.gather(v, axis=0) for k, v in out.items()}

    if cfg.run_eagerly:
        return eval_step
    return tf.function(eval_step, input_signature=[element_spec])
