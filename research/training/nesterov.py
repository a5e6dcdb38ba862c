"""`NesterovSGD`: SGD with Nesterov momentum in PyTorch's form, which the fast CIFAR-10 recipes
(airbench) are tuned for, and the SGD half of Muon (research.training.muon).

PyTorch and Keras agree on Nesterov SGD while the learning rate is constant and part ways when
it moves: Keras folds the learning rate into its velocity (v = m v - lr g; var += m v - lr g),
PyTorch keeps a buffer of raw gradients and scales the step by the current rate
(buf = m buf + g; var -= lr (g + m buf)).
"""

from __future__ import annotations

import keras
from keras import ops


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
