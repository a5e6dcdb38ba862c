"""airbench94_muon's optimizer step (KellerJordan/cifar10-airbench, airbench94_muon.py):
Muon on the convolution filters, Nesterov SGD with per-group learning rates on the rest.

The reference runs two PyTorch optimizers on disjoint parameter lists, stepped together:
  - Muon(filter_params, lr=0.24, momentum=0.6, nesterov=True): per 4-D filter p with
    gradient g, buf = m buf + g; g' = g + m buf; p *= sqrt(out_channels) / ||p|| (the filter
    renormalised every step); p -= lr NS(g' as an out_channels x (in * kh * kw) matrix), NS
    being `zeropower_via_newtonschulz5`: 3 steps of a quintic Newton-Schulz iteration with
    the coefficients (3.4445, -4.7750, 2.0315), in bfloat16. No weight decay.
  - torch.optim.SGD(momentum=0.85, nesterov=True) on the whitening bias, the BatchNorm
    shifts (lr 0.053) and the head (lr 0.67), weight_decay 2e-6 * batch / lr each.
Both learning rates fall linearly, lr0 (1 - step / total); the whitening bias's falls to 0
at its own end (3 epochs), where it stops training.

Here that is one Keras optimizer, `MuonSGD`, whose update dispatches per variable: the
Muon variables (`is_muon_variable`) get the Muon step, the others `NesterovSGD`'s. One
optimizer, so the rest of the loop (its `iterations` as the global step, the checkpoint,
LossScaleOptimizer, tf.distribute's all-reduce before the update) is as for any other.
Our loss is a mean, the reference's a sum: the SGD learning rates are the reference's times
the batch, the Muon step does not depend on the gradient's scale (NS normalises it; only its
eps sees the scale, at 1e-7).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from research.training.nesterov import NesterovSGD

# zeropower_via_newtonschulz5(G, steps=3, eps=1e-7): a, b, c and its defaults
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 3
NS_EPS = 1e-7
NS_DTYPE = "bfloat16"

HEAD_KERNEL = "logits/kernel"      # the logits layer (research.models.scratch.logits_head)
WHITENING_BIAS = "whiten/bias"     # the fast CNN's PatchWhitening bias


def is_muon_variable(variable) -> bool:
    """What Muon trains: the reference's filter_params, every trained 4-D tensor (the conv
    filters; the whitening filters never train)."""
    return len(variable.shape) == 4


def newton_schulz(g: tf.Tensor, steps: int = NS_STEPS, dtype=NS_DTYPE,
                  eps: float = NS_EPS) -> tf.Tensor:
    """zeropower_via_newtonschulz5 on a 2-D `g`, in `dtype`, rounding where PyTorch rounds: a
    bfloat16 tensor times a Python float is computed in float32 and rounded once (the
    coefficient itself is not rounded to bfloat16 first, as it would be in a bfloat16 TF
    multiply); the norm is accumulated in float32; matmuls round their float32 sums."""
    a, b, c = NS_COEFFICIENTS
    dtype = tf.as_dtype(dtype)
    f32 = tf.float32

    def rnd(x):  # one rounding to `dtype`
        return tf.cast(x, dtype)

    def scale(k, x):  # k * x, computed in float32, rounded once
        return rnd(k * tf.cast(x, f32))

    x = rnd(g)
    norm = rnd(tf.norm(tf.cast(x, f32)))                 # X.norm(): a bfloat16 scalar
    x = rnd(tf.cast(x, f32) / tf.cast(rnd(tf.cast(norm, f32) + eps), f32))
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = tf.transpose(x)
    for _ in range(steps):
        A = tf.matmul(x, x, transpose_b=True)
        B = rnd(tf.cast(scale(b, A), f32) + tf.cast(tf.matmul(scale(c, A), A), f32))
        x = rnd(tf.cast(scale(a, x), f32) + tf.cast(tf.matmul(B, x), f32))
    if tall:
        x = tf.transpose(x)
    return x


def orthogonalised_update(kernel_update: tf.Tensor, steps: int = NS_STEPS,
                          dtype=NS_DTYPE) -> tf.Tensor:
    """A Keras conv kernel's update (kh, kw, in, out) through newton_schulz as the reference
    reshapes a PyTorch filter (out, in, kh, kw): a matrix of one row per output channel, its
    columns in PyTorch's (in, kh, kw) order; back in the kernel's layout and float32."""
    kh, kw, cin, cout = kernel_update.shape
    rows = tf.reshape(tf.transpose(kernel_update, (3, 2, 0, 1)), (cout, cin * kh * kw))
    u = tf.reshape(newton_schulz(rows, steps, dtype), (cout, cin, kh, kw))
    return tf.cast(tf.transpose(u, (2, 3, 1, 0)), kernel_update.dtype)


@keras.saving.register_keras_serializable(package="research")
class MuonSGD(NesterovSGD):
    """Muon for `is_muon_variable`s, NesterovSGD for the others, stepped together.

    learning_rate: the SGD learning rate (a schedule of the step); the Muon learning rate is
    `muon_lr_ratio` times it (the reference decays both by the same factor).
    own_schedules: {variable path: schedule} for SGD variables with a schedule of their own
    (the whitening bias, which decays to 0 at its freeze step)."""

    def __init__(self, learning_rate=0.01, momentum: float = 0.85,
                 muon_lr_ratio: float = 1.0, muon_momentum: float = 0.6,
                 ns_steps: int = NS_STEPS, ns_dtype: str = NS_DTYPE,
                 own_schedules: dict | None = None, name: str = "muon_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, name=name, **kwargs)
        if not 0.0 <= muon_momentum < 1.0:
            raise ValueError(f"muon_momentum must be in [0, 1), got {muon_momentum}")
        self.muon_lr_ratio = float(muon_lr_ratio)
        self.muon_momentum = float(muon_momentum)
        self.ns_steps = int(ns_steps)
        self.ns_dtype = ns_dtype
        self.own_schedules = dict(own_schedules or {})

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._is_muon = [is_muon_variable(v) for v in variables]
        self._own = [self.own_schedules.get(v.path) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        i = self._get_variable_index(variable)
        if not self._is_muon[i]:
            own = self._own[i]
            if own is not None:
                learning_rate = own(self.iterations)
            return super().update_step(gradient, variable, learning_rate)
        g = tf.cast(gradient, variable.dtype)
        m = tf.cast(self.muon_momentum, variable.dtype)
        buf = self.buffers[i]
        self.assign(buf, m * buf + g)
        g = g + m * buf                                            # Nesterov
        cout = variable.shape[-1]
        self.assign(variable, variable * (math.sqrt(cout) / tf.norm(variable)))
        lr = tf.cast(learning_rate, variable.dtype) * self.muon_lr_ratio
        self.assign_sub(variable, lr * orthogonalised_update(g, self.ns_steps, self.ns_dtype))

    def get_config(self):
        return {**super().get_config(), "muon_lr_ratio": self.muon_lr_ratio,
                "muon_momentum": self.muon_momentum, "ns_steps": self.ns_steps,
                "ns_dtype": self.ns_dtype}


def sgd_lr_scale(cfg, variable) -> float:
    """A variable's SGD learning rate as a multiple of --learning_rate: the BatchNorm shifts'
    --bias_lr_scale, the logits kernel's --logits_lr_scale, else 1. (Applied by scaling the
    gradient: SGD is linear in it; the variable's L2 coefficient is divided by it.)"""
    if variable.name == "beta":
        return cfg.bias_lr_scale
    if variable.path == HEAD_KERNEL:
        return cfg.logits_lr_scale
    return 1.0


def takes_l2(cfg, variable) -> bool:
    """--optimizer=sgd_l2 / muon's L2 term: every trained variable but Muon's (the
    reference's Muon has no weight decay: its filters are renormalised instead)."""
    return not (cfg.optimizer == "muon" and is_muon_variable(variable))


def make_muon_optimizer(cfg, schedule, steps_per_epoch: int | None):
    """--optimizer=muon: MuonSGD with the run's schedule, --muon_lr / --learning_rate,
    --muon_momentum and (--whiten_bias_decay) the whitening bias's own schedule, linear
    from --learning_rate to 0 at --whiten_bias_epochs."""
    from research.training.model import whiten_bias_steps
    from research.training.schedule import LinearWarmupDecay

    own = {}
    if cfg.whiten_bias_decay:
        if steps_per_epoch is None:
            raise ValueError("--whiten_bias_decay needs the run's steps per epoch")
        own[WHITENING_BIAS] = LinearWarmupDecay(cfg.learning_rate, 0,
                                                whiten_bias_steps(cfg, steps_per_epoch))
    return MuonSGD(schedule, momentum=cfg.momentum,
                   muon_lr_ratio=cfg.muon_lr / cfg.learning_rate,
                   muon_momentum=cfg.muon_momentum, ns_steps=NS_STEPS, ns_dtype=NS_DTYPE,
                   own_schedules=own)
