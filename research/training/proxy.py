"""airbench96_faster's proxy selection (KellerJordan/cifar10-airbench f1c599c,
airbench96_faster.py): a small proxy network (--proxy_widths, two convs per group) scores
every training batch and the main network trains on the hardest --proxy_keep of it.

The reference, step by step (its `train_proxy` runs the proxy over the whole run's batches
first and stores the masks; the proxy never sees the main network, so scoring each batch just
before the main step, as here, gives the same masks):
  - the proxy forwards the batch in training mode (BatchNorm on the batch's statistics) and
    takes each example's loss (label-smoothed cross-entropy, reduction='none');
  - it keeps `loss1.argsort()[-batch_size_masked:]` (512 of 1024): the highest losses; the
    main network trains on `inputs[mask]`, the kept examples in their batch order, its loss
    the SUM over them at the learning rate per summed example (ours: the mean over the whole
    batch, `compute_average_loss(..., global_batch_size)`, which is the same scale);
  - every 4th step (`current_steps % 4 == 0`, from 0) the proxy also trains, on the sum of
    the kept examples' losses it just computed, with the main run's optimizer and schedule
    (SGD, Nesterov momentum, BN shifts' rate x bias_scaler with their decay divided by it,
    the same warm-up-then-down `get_lr` of the global step: its scheduler steps every step,
    its optimizer every 4th); no lookahead; its whitening conv (set from the same 5,000
    images) is frozen, bias included, from the start.
Here the proxy's SGD step is PyTorch's (buf = m buf + g; p -= lr (g + m buf), the L2 term in
g), written out on its own buffers so that it can take the main run's learning rate at the
global step. Single replica only (the reference is one GPU; per-replica selection would
differ)."""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from research.training.config import ConfigError, TrainConfig


def kept_count(cfg: TrainConfig, batch_size: int) -> int:
    """How many of a batch of `batch_size` the main network trains on (512 of 1024)."""
    return max(1, int(round(cfg.proxy_keep * batch_size)))


def hardest(per_example: tf.Tensor, keep: int) -> tf.Tensor:
    """The indices of the `keep` largest per-example losses, in batch order (the reference's
    boolean mask of `argsort()[-keep:]` applied to the batch)."""
    _, idx = tf.math.top_k(per_example, k=keep, sorted=False)
    return tf.sort(idx)


def proxy_options(cfg: TrainConfig) -> dict:
    """The proxy's fast-CNN options: the main network's (BatchNorm, activation, head, feature
    scale: make_net(hyp['proxy']) differs from hyp['net'] only in widths and depth) with
    --proxy_widths and two convs per group."""
    return {**cfg.model_options, "widths": tuple(cfg.proxy_widths), "group_convs": 2}


@dataclasses.dataclass
class ProxySelector:
    """The proxy network, its momentum buffers and the run's learning-rate schedule."""
    cfg: TrainConfig
    model: keras.Model
    buffers: list
    schedule: object

    @classmethod
    def create(cls, cfg: TrainConfig, manifest: dict, main: keras.Model, schedule):
        """Inside the strategy scope, after `main`'s whitening is set from data: the proxy
        gets the same whitening filters (the reference computes them from the same 5,000
        images) and a frozen whitening bias (0)."""
        from research.models.layers import data_initialised
        from research.training.model import freeze_whitening_bias, make_model

        model = make_model(cfg, manifest, **proxy_options(cfg))
        for ours, theirs in zip(data_initialised(model), data_initialised(main)):
            ours.kernel.assign(theirs.kernel)
        freeze_whitening_bias(model)
        buffers = [tf.Variable(tf.zeros_like(v), trainable=False, name=f"proxy_buf_{i}")
                   for i, v in enumerate(model.trainable_variables)]
        return cls(cfg, model, buffers, schedule)

    def checkpointed(self) -> dict:
        return {"proxy": self.model, "proxy_buffers": self.buffers}

    def _losses(self, batch: dict) -> tf.Tensor:
        from research.training.steps import per_example_loss

        logits = self.model(batch["image"], training=True)
        return per_example_loss(self.cfg, batch, logits, None)

    def _train(self, batch: dict, keep: int, step) -> tf.Tensor:
        """One proxy step on the sum of its kept examples' losses (the mean over the global
        batch: its learning rate is per mean loss, as the main run's). Returns the losses it
        computed before the step."""
        from research.training.muon import sgd_lr_scale
        from research.training.steps import l2_penalty

        cfg, variables = self.cfg, self.model.trainable_variables
        with tf.GradientTape() as tape:
            per_ex = self._losses(batch)
            loss = tf.nn.compute_average_loss(tf.gather(per_ex, hardest(per_ex, keep)),
                                              global_batch_size=cfg.batch_size)
            if cfg.weight_decay:
                loss += tf.nn.scale_regularization_loss(l2_penalty(cfg, variables))
        grads = tape.gradient(loss, variables)
        lr = self.schedule(step)
        m = cfg.momentum
        for v, g, buf in zip(variables, grads, self.buffers):
            g = tf.cast(g, v.dtype) * sgd_lr_scale(cfg, v)
            buf.assign(m * buf + g)
            v.assign_sub(tf.cast(lr, v.dtype) * (g + m * buf))
        return per_ex

    def select(self, batch: dict, step) -> dict:
        """The kept part of `batch` (every key gathered), training the proxy first when
        `step` (the global step, from 0) is a multiple of --proxy_train_every."""
        n = batch["image"].shape[0]
        if n is None:
            raise ConfigError("--proxy_widths needs a static batch size")
        keep = kept_count(self.cfg, n)
        per_ex = tf.cond(tf.equal(step % self.cfg.proxy_train_every, 0),
                         lambda: self._train(batch, keep, step), lambda: self._losses(batch))
        idx = hardest(tf.stop_gradient(per_ex), keep)
        return {k: tf.gather(v, idx) for k, v in batch.items()}
