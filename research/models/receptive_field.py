"""Each layer's output size, receptive field, jump and multiply-adds, by walking a functional
model's graph from its input.

Receptive field (RF): how many input pixels, along the height, one output unit can see. Jump:
how many input pixels apart two neighbouring output units are. A layer with kernel k, stride s
and dilation d takes (rf, jump) to (rf + d (k - 1) jump, jump s); a layer that mixes its inputs
pixel by pixel (BN, activations, Add, Concatenate) keeps the largest input RF. After global
pooling or Flatten every unit sees the whole input (RF None); a whole-image branch that joins a
local one (squeeze-excitation) is noted, and the local RF carried on. Resizing rescales the
jump. Our kernels are square, so the height tells the whole story. A nested functional model
(a transfer backbone) is walked too; a nested model without a graph is listed with a note.

Multiply-adds count the convolutions and dense layers (a kernel's weights times the positions
it is applied at), per image: the cost the pooling choice changes.
"""

from __future__ import annotations

import dataclasses
import math

import keras


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    name: str
    output_size: tuple[int, int] | None  # (H, W) of a 4-D output, else None
    rf: int | None                       # None: the whole input
    jump: float | None
    macs: int                            # multiply-adds per image
    note: str = ""


_WHOLE = (None, None)  # (rf, jump) of a unit that sees the whole input


def _first(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _spatial(shape) -> tuple[int, int] | None:
    return (shape[1], shape[2]) if len(shape) == 4 else None


def _window(layer) -> tuple[int, int, int] | None:
    """(kernel, stride, dilation) along the height of a conv or pooling layer, else None."""
    k = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None)
    if k is None:
        return None
    s = getattr(layer, "strides", None) or 1
    return _first(k), _first(s), _first(getattr(layer, "dilation_rate", 1) or 1)


def _merge(ins: list) -> tuple[tuple, str]:
    """A pixel-by-pixel layer's (rf, jump): its widest input's. An input that already sees
    the whole image (a squeeze-excitation gate) joins the local path with a note."""
    local = [v for v in ins if v[0] is not None]
    if not local:
        return _WHOLE, ""
    note = "a whole-image branch joins" if len(local) < len(ins) else ""
    return max(local, key=lambda v: (v[0], v[1])), note


def _macs(layer, in_shape, out_shape) -> int:
    """Multiply-adds per image of a conv or dense layer's kernels (0 for other layers)."""
    total = 0
    for w in layer.weights:
        if not w.name.endswith("kernel"):  # kernel, depthwise_kernel, pointwise_kernel
            continue
        size = math.prod(w.shape)
        if len(w.shape) == 4:  # a conv: applied at each output (transposed: input) position
            grid = in_shape if isinstance(layer, keras.layers.Conv2DTranspose) else out_shape
            total += size * grid[1] * grid[2]
        elif len(w.shape) == 2:  # dense: at each position of its input's leading axes
            total += size * math.prod(in_shape[1:-1])
    return int(total)


def _step(layer, ins: list, in_shape, out_shape) -> tuple[tuple, str]:
    """((rf, jump) of the layer's output, a note) from its inputs'."""
    name = type(layer).__name__
    (rf, jump), note = _merge(ins)
    if rf is None or name.startswith("Global") or name == "Flatten":
        return _WHOLE, note
    window = _window(layer)
    if window is not None and len(out_shape) == 4:
        k, s, d = window
        if isinstance(layer, keras.layers.Conv2DTranspose):
            return (rf + (k - 1) * jump / s, jump / s), "transposed"
        return (rf + d * (k - 1) * jump, jump * s), note
    before, after = _spatial(in_shape or ()), _spatial(out_shape)
    if not (before and after) or None in (*before, *after) or before[0] == after[0]:
        return (rf, jump), note
    if name.startswith(("Resizing", "UpSampling")):  # the grid is rescaled, not filtered
        return (rf, jump * before[0] / after[0]), "resampled (interpolation not counted)"
    if name.startswith(("ZeroPadding", "Cropping")):
        return (rf, jump), note
    return (rf, jump), f"{name} changes the size: RF not followed"


def _row(name, out_shape, value, macs, note) -> LayerGeometry:
    rf, jump = value
    return LayerGeometry(name, _spatial(out_shape), None if rf is None else int(math.ceil(rf)),
                         jump, macs, note)


def _graph(model: keras.Model):
    """The functional graph of `model` (a built Sequential has one inside), else None."""
    if hasattr(model, "_nodes_by_depth"):
        return model
    inner = getattr(model, "_functional", None)
    return inner if hasattr(inner, "_nodes_by_depth") else None


def _walk(graph, start: list, prefix: str, rows: list) -> list:
    """Appends the rows of the layers of functional model `graph`, its inputs at (rf, jump)
    `start`; returns its outputs' (rf, jump)."""
    state = {id(t): v for t, v in zip(graph.inputs, start)}
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            layer = node.operation
            if isinstance(layer, keras.layers.InputLayer):
                continue
            ins = [state.get(id(t), _WHOLE) for t in node.input_tensors]
            outs = node.output_tensors
            in_shape = node.input_tensors[0].shape if node.input_tensors else None
            if isinstance(layer, keras.Model) and _graph(layer) is not None:
                values = _walk(_graph(layer), ins, f"{prefix}{layer.name}/", rows)
                for t, v in zip(outs, values):
                    state[id(t)] = v
                continue
            note = ""
            if isinstance(layer, keras.Model):
                value, note = _WHOLE, "nested model without a graph: not walked"
            else:
                value, note = _step(layer, ins, in_shape, outs[0].shape)
            for t in outs:
                state[id(t)] = value
            rows.append(_row(prefix + layer.name, outs[0].shape, value,
                             _macs(layer, in_shape, outs[0].shape), note))
    return [state.get(id(t), _WHOLE) for t in graph.outputs]


def layer_geometry(model: keras.Model) -> list[LayerGeometry]:
    """One row per layer of a functional (or built Sequential) `model`, inputs first; its
    input pixels have RF 1, jump 1. No rows for a model without a graph (a subclassed one)."""
    rows: list[LayerGeometry] = []
    graph = _graph(model)
    if graph is not None:
        _walk(graph, [(1, 1)] * len(graph.inputs), "", rows)
    return rows


def last_conv(rows: list[LayerGeometry]) -> LayerGeometry | None:
    """The last conv: the last layer with multiply-adds and a 4-D output."""
    convs = [r for r in rows if r.output_size is not None and r.macs and r.rf is not None]
    return convs[-1] if convs else None


def _num(v) -> str:
    if v is None:
        return "all"
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_geometry(rows: list[LayerGeometry]) -> str:
    """The table model_summary.txt carries under Keras' own summary."""
    if not rows:
        return "Receptive field: not computed (the model has no functional graph to walk)."
    head = f"{'layer':<40} {'output':>10} {'RF':>6} {'jump':>6} {'multiply-adds':>15}  note"
    lines = ["Receptive field (RF) and jump in input pixels along the height ('all': the "
             "whole input); multiply-adds per image of the convs and dense layers.", head,
             "-" * len(head)]
    for r in rows:
        size = "x".join(map(str, r.output_size)) if r.output_size else "-"
        lines.append(f"{r.name:<40} {size:>10} {_num(r.rf):>6} {_num(r.jump):>6} "
                     f"{r.macs:>15,}  {r.note}".rstrip())
    total = sum(r.macs for r in rows)
    end = last_conv(rows)
    lines.append("-" * len(head))
    lines.append(f"Total multiply-adds per image: {total:,}")
    if end is not None:
        lines.append(f"Receptive field at the last conv ({end.name}): {end.rf} px, "
                     f"jump {_num(end.jump)}")
    return "\n".join(lines)
