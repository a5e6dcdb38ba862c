"""FLOPs per image of a Keras model's forward pass, training step and Grad-CAM, counted by hand
from its layers: the walk of research.models.receptive_field (the functional graph, nested
models included) gives each layer's multiply-adds, here 2 FLOPs each.

Counted: the kernels of convolutions (Conv2D with any padding, strides, dilation and groups;
DepthwiseConv2D, SeparableConv2D, Conv2DTranspose; our PatchWhitening) and of Dense layers.
Ignored: biases, BN, activations, pooling, adds, resizing, the loss and the optimizer update,
elementwise work of a few FLOPs per value against 2 k^2 C_in per output value of a conv.

Training step, per conv or dense layer with forward cost F:
- weight gradient: F, when its kernel is trainable;
- input gradient: F, unless no layer before it (in the walk's topological order) has
  trainable weights: then nothing upstream needs a gradient (the first conv of a network
  trained from scratch, a frozen backbone) and TensorFlow prunes it.
So a network trained from scratch costs 3x its forward pass, less its first layer's input
gradient. `tests/models/test_flops.py` checks this against TensorFlow's own count of the gradient
graph after pruning.

Grad-CAM (research.explain.cams.grad_cam): the forward pass, the input gradients of the
layers after the target layer (the class score's gradient flows from the logits back to the
target's output; no weight gradients, nothing before the target) and the CAM's weighted sum
of the target's channels (h w K multiply-adds). "After" is the walk's order: the layers
downstream of the target, for a target on the network's single path (the last conv map).
"""

from __future__ import annotations

import dataclasses

import keras

from research.models.receptive_field import layer_geometry


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    name: str
    forward: int
    weight_grad: int
    input_grad: int


@dataclasses.dataclass(frozen=True)
class Flops:
    """Per image."""
    forward: int
    train_step: int  # forward + backward


@dataclasses.dataclass(frozen=True)
class GradCamFlops:
    """Per image."""
    forward: int
    backward: int  # the score's gradient, back to the target layer's output
    cam: int       # sum_k alpha_k A_k

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.cam


def _layers_by_path(model: keras.Model, prefix: str = "") -> dict:
    """{path: layer}, nested models' layers as 'outer/inner' (the walk's row names)."""
    out = {}
    for layer in model.layers:
        out[prefix + layer.name] = layer
        if isinstance(layer, keras.Model):
            out.update(_layers_by_path(layer, f"{prefix}{layer.name}/"))
    return out


def layer_flops(model: keras.Model) -> list[LayerFlops]:
    """One row per layer of the walk (research.models.receptive_field), inputs first."""
    layers = _layers_by_path(model)
    rows, upstream_trains = [], False
    for g in layer_geometry(model):
        layer = layers.get(g.name)
        trainable = [] if layer is None else layer.trainable_weights
        f = 2 * g.macs
        kernel = any(w.name.endswith("kernel") for w in trainable)
        rows.append(LayerFlops(g.name, f, f if kernel else 0, f if upstream_trains else 0))
        upstream_trains = upstream_trains or bool(trainable)
    return rows


def count_flops(model: keras.Model) -> Flops:
    """Forward and training-step FLOPs per image (the conventions above)."""
    rows = layer_flops(model)
    forward = sum(r.forward for r in rows)
    return Flops(forward, forward + sum(r.weight_grad + r.input_grad for r in rows))


def gradcam_flops(model: keras.Model, layer: str) -> GradCamFlops:
    """Grad-CAM's FLOPs per image at `layer`, a path as research.explain.core.find_layer
    returns it ('block5_conv3', 'vgg16/block5_conv3')."""
    rows = layer_flops(model)
    names = [r.name for r in rows]
    if layer not in names:
        raise ValueError(f"no layer {layer!r} in the walk of {model.name!r}")
    i = len(names) - 1 - names[::-1].index(layer)  # its last call
    _, h, w, k = _layers_by_path(model)[layer].output.shape
    return GradCamFlops(sum(r.forward for r in rows), sum(r.forward for r in rows[i + 1:]),
                        2 * h * w * k)
