"""--eval_batch_size unset (auto): per replica, the largest batch whose estimated activation
memory fits in half the free memory of the device it runs on (at most AUTO_CAP), times the
replicas. A scoring pass keeps a layer's input and output alive at once, so a batch needs
about the largest (input + output) over the layers, per image, times the batch; HEADROOM
doubles that for the convolutions' workspaces and the allocator's rounding. VGG16 at 224 px in
float16 needs 12.8 MB an image for block1_conv2 (25.7 MB with the headroom): 313 images an
eval batch on a 16 GB card with 15 GB free, where the old global 1,000 needed 13-15 GB.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from research import devices

AUTO_CAP = 1000  # per replica: the old global default, enough to keep a device busy
HEADROOM = 2.0


def activation_bytes(model: keras.Model, bytes_per_value: int) -> int:
    """Per image: the largest (inputs + output) of any layer, nested models included."""
    return _largest_values(model) * bytes_per_value


def _largest_values(model: keras.Model) -> int:
    largest = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            largest = max(largest, _largest_values(layer))
            continue
        try:
            ins = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
            tensors = [*ins, layer.output]
        except (AttributeError, ValueError):  # a layer never called symbolically
            continue
        values = sum(int(np.prod([d for d in t.shape[1:] if d is not None])) for t in tensors
                     if t is not None and hasattr(t, "shape"))
        largest = max(largest, values)
    return largest


def free_bytes(on_gpu: bool) -> int | None:
    """Free memory of the least free device in use: the GPUs (nvidia-smi, the ids
    CUDA_VISIBLE_DEVICES names), or the host (MemAvailable); None if unknown."""
    return devices.gpu_memory("memory.free") if on_gpu else devices.host_available()


def auto_batch(model: keras.Model, replicas: int, on_gpu: bool,
               free: int | None = None) -> tuple[int, str]:
    """(global eval batch, the line that says how it was chosen)."""
    dtype = keras.config.dtype_policy().compute_dtype if model.dtype_policy is None else (
        model.dtype_policy.compute_dtype)
    per_image = activation_bytes(model, 2 if "16" in str(dtype) else 4) * HEADROOM
    free = free_bytes(on_gpu) if free is None else free
    where = "GPU" if on_gpu else "host"
    if free is None or per_image <= 0:
        per = AUTO_CAP
        why = f"free {where} memory unknown"
    else:
        budget = free / 2 / (1 if on_gpu else replicas)  # the host's memory is shared
        per = int(max(1, min(AUTO_CAP, budget // per_image)))
        why = (f"{per_image / 2 ** 20:.1f} MB of activations an image (x{HEADROOM:g} "
               f"headroom), half of {free / 2 ** 30:.1f} GB free {where} memory")
    return per * replicas, (f"eval batch {per * replicas} (auto: {per} per replica x "
                            f"{replicas}; {why})")


def resolve(eval_batch_size: int | None, model: keras.Model,
            strategy: tf.distribute.Strategy) -> int:
    """An explicit (global) value as it is; unset: `auto_batch`, logged."""
    if eval_batch_size is not None:
        return eval_batch_size
    on_gpu = bool(devices.current().gpus)
    batch, line = auto_batch(model, strategy.num_replicas_in_sync, on_gpu)
    logging.info("%s", line)
    return batch
