"""The optimizers a run can train with: Keras' SGD (Nesterov, decoupled weight decay of the
kernels), AdamW, and `NesterovSGD`, SGD with Nesterov momentum in PyTorch's form, which the
fast CIFAR-10 recipes (airbench) are tuned for.

PyTorch and Keras agree on Nesterov SGD while the learning rate is constant and part ways when
it moves: Keras folds the learning rate into its velocity (v = m v - lr g; var += m v - lr g),
PyTorch keeps a buffer of raw gradients and scales the step by the current rate
(buf = m buf + g; var -= lr (g + m buf)). With `--optimizer=sgd_l2` the weight decay is
PyTorch's too: an L2 term added to the gradient (research.training.steps.l2_penalty),
so it goes through the momentum.
"""

from __future__ import annotations

import keras
from keras import ops

from research.training.config import TrainConfig
from research.training.loss_scale import DynamicLossScaleOptimizer


@keras.saving.register_keras_serializable(package="research")
class NesterovSGD(keras.optimizers.Optimizer):
    """torch.optim.SGD(momentum=m, nesterov=True, dampening=0): per variable a buffer of
    gradients, buf = m buf + g (the first step: buf = g, as PyTorch's), then
    var -= lr (g + m buf)."""

    def __init__(self, learning_rate=0.01, momentum: float = 0.9, name: str = "nesterov_sgd",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.buffers = [self.add_variable_from_reference(v, "momentum_buffer")
                        for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        m = ops.cast(self.momentum, variable.dtype)
        buf = self.buffers[self._get_variable_index(variable)]
        self.assign(buf, ops.add(ops.multiply(m, buf), g))
        self.assign_sub(variable, ops.multiply(lr, ops.add(g, ops.multiply(m, buf))))

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


def make_optimizer(cfg: TrainConfig, schedule,
                   steps_per_epoch: int | None = None) -> keras.optimizers.Optimizer:
    """`steps_per_epoch`: for --optimizer=muon's per-epoch settings (--whiten_bias_decay)."""
    if cfg.optimizer == "muon":  # its own module; its L2 term as sgd_l2's (steps.py)
        from research.training.muon import make_muon_optimizer

        return make_muon_optimizer(cfg, schedule, steps_per_epoch)
    if cfg.optimizer == "sgd_l2":
        opt = NesterovSGD(schedule, momentum=cfg.momentum)  # decay: an L2 term (steps.py)
    elif cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=True,
                                   weight_decay=cfg.weight_decay or None)
    else:
        opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "sgd_l2":
        # Decay conv/dense kernels only, not BN scales and shifts or biases.
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if cfg.precision == "mixed_float16":
        opt = DynamicLossScaleOptimizer(opt)  # agreed by every replica (loss_scale.py)
    return opt
