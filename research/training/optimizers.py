"""The optimizers a run can train with: Keras' SGD (Nesterov, decoupled weight decay of the
kernels), AdamW, `NesterovSGD` (SGD with Nesterov momentum in PyTorch's form, which the fast
CIFAR-10 recipes (airbench) are tuned for; research.training.nesterov) and Muon
(research.training.muon). With `--optimizer=sgd_l2` the weight decay is PyTorch's: an L2 term
added to the gradient (research.training.steps.l2_penalty), so it goes through the momentum.
"""

from __future__ import annotations

import keras

from research.training.config import TrainConfig
from research.training.loss_scale import DynamicLossScaleOptimizer
from research.training.muon import make_muon_optimizer
from research.training.nesterov import NesterovSGD


def make_optimizer(cfg: TrainConfig, schedule,
                   steps_per_epoch: int | None = None) -> keras.optimizers.Optimizer:
    """`steps_per_epoch`: for --optimizer=muon's per-epoch settings (--whiten_bias_decay)."""
    if cfg.optimizer == "muon":  # its L2 term as sgd_l2's (steps.py)
        opt = make_muon_optimizer(cfg, schedule, steps_per_epoch)
    elif cfg.optimizer == "sgd_l2":
        opt = NesterovSGD(schedule, momentum=cfg.momentum)  # decay: an L2 term (steps.py)
    elif cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=True,
                                   weight_decay=cfg.weight_decay or None)
    else:
        opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    if cfg.optimizer not in ("sgd_l2", "muon"):
        # Decay conv/dense kernels only, not BN scales and shifts or biases.
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if cfg.precision == "mixed_float16":
        # Agreed by every replica (loss_scale.py). Muon as any other: the inner step sees
        # the unscaled gradients (and Newton-Schulz normalises them anyway).
        opt = DynamicLossScaleOptimizer(opt)
    return opt
