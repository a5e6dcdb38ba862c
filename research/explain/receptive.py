"""The effective receptive field (ERF) of a unit, by gradient, beside the theoretical one.

Luo et al., "Understanding the Effective Receptive Field in Deep Convolutional Neural
Networks" (NeurIPS 2016): set the gradient of one unit of a layer (here: the sum over the
channels at the centre of the feature map) to 1, backpropagate to the input, and average the
absolute input gradient over many images. Only pixels inside the theoretical receptive field
(research.models.receptive_field: kernel, stride and dilation of every layer on the path) can
get a non-zero gradient, but the gradient is concentrated near the centre: the ERF is much
smaller than the theoretical one. Dilation widens both at the same cost; the figure shows how
much of the wider field the gradient actually reaches.

Maps are per input pixel (the absolute gradient summed over colour channels, averaged over
the images); `mass_side` is the side of the smallest square around the unit's centre that
holds a given fraction (90%) of the gradient.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from research import plots
from research.explain.core import Explainer, capture, find_layer
from research.models.receptive_field import layer_geometry

MASS = 0.9  # the fraction of the gradient the ERF square holds


@dataclasses.dataclass
class ReceptiveField:
    layer: str
    erf: np.ndarray                # (H, W) mean |d unit / d input| over the images
    center: tuple[float, float]    # the unit's centre in input pixels (row, col)
    unit: tuple[int, int]          # the unit's position on the feature map
    map_size: tuple[int, int]      # the feature map's (h, w)
    theoretical: int | None        # side of the theoretical RF in input pixels (None: all)
    erf_side: int                  # side of the centred square holding MASS of the gradient
    outside: float                 # fraction of the gradient outside the theoretical RF
    images: int                    # how many images were averaged


def random_images(n: int, size: tuple[int, int], channels: int = 3, seed: int = 0
                  ) -> np.ndarray:
    """Uniform noise images, 0..255 float32 (Luo et al.'s random inputs)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, *size, channels)).astype(np.float32)


def _theoretical(model, path: str) -> tuple[int | None, float | None]:
    for row in layer_geometry(model):
        if row.name == path:
            return row.rf, row.jump
    return None, None


def mass_side(erf: np.ndarray, center: tuple[float, float], mass: float = MASS) -> int:
    """Side of the smallest square centred at `center` holding `mass` of `erf`'s sum."""
    total = float(erf.sum())
    if total <= 0:
        return 0
    rows = np.arange(erf.shape[0])[:, None]
    cols = np.arange(erf.shape[1])[None, :]
    dist = np.maximum(np.abs(rows - center[0]), np.abs(cols - center[1]))
    for r in np.unique(np.ceil(dist)):
        if erf[dist <= r].sum() >= mass * total - 1e-12:
            return int(2 * r + 1)
    return int(2 * dist.max() + 1)


def _square(center: tuple[float, float], side: float) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of a side x side square of pixels centred at `center`."""
    half = side / 2.0
    return center[0] - half + 0.5, center[1] - half + 0.5, center[0] + half - 0.5, \
        center[1] + half - 0.5


def effective_receptive_field(ex: Explainer, layer: str | None, images: np.ndarray,
                              mass: float = MASS) -> ReceptiveField:
    """The ERF of the centre unit of `layer` (default: the last spatial feature map) over the
    raw 0..255 `images` (N, H, W, C), beside its theoretical receptive field."""
    path, target = find_layer(ex.model, layer)
    raw = tf.convert_to_tensor(np.asarray(images, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(raw)
        with capture([target]) as store:
            ex.model(ex.preprocess(raw), training=False)
        fmap = tf.cast(store[id(target)][-1], tf.float32)
        h, w = int(fmap.shape[1]), int(fmap.shape[2])
        unit = (h // 2, w // 2)
        score = tf.reduce_sum(fmap[:, unit[0], unit[1], :])
    grad = tape.gradient(score, raw)
    if grad is None:
        raise ValueError(f"layer {path} does not depend on the input")
    erf = np.abs(grad.numpy()).sum(axis=-1).mean(axis=0)
    rf, jump = _theoretical(ex.model, path)
    big, _ = erf.shape
    # A 'same'-padded network with 2x2 pools and stride-2 convs: unit i is centred at
    # (i + 0.5) * jump - 0.5 input pixels (exact for those; an estimate for 'valid' padding).
    scale = jump if jump else big / h
    center = ((unit[0] + 0.5) * scale - 0.5, (unit[1] + 0.5) * scale - 0.5)
    outside = 0.0
    if rf is not None:
        top, left, bottom, right = _square(center, rf)
        rows = np.arange(erf.shape[0])[:, None]
        cols = np.arange(erf.shape[1])[None, :]
        inside = (rows >= top - 1e-6) & (rows <= bottom + 1e-6) & (cols >= left - 1e-6) & (
            cols <= right + 1e-6)
        total = float(erf.sum())
        outside = float(erf[~inside].sum()) / total if total > 0 else 0.0
    return ReceptiveField(path, erf, center, unit, (h, w), rf, mass_side(erf, center, mass),
                          outside, len(images))


def receptive_field_figure(fields: list[ReceptiveField], titles: list[str], title: str = ""):
    """One panel per field: the ERF (normalised to its maximum), the theoretical RF as a red
    square and the square holding 90% of the gradient in cyan."""
    from matplotlib.patches import Rectangle

    fig, axes = plots.grid_figure(1, len(fields), cell=3.0, title_lines=3,
                                  suptitle_lines=plots.text_lines([title]), colorbar=True)
    for ax, f, t in zip(axes.flat, fields, titles):
        ax.imshow(f.erf / max(float(f.erf.max()), 1e-30), cmap="inferno", vmin=0, vmax=1,
                  interpolation="nearest")
        for side, color in ((f.theoretical, "red"), (f.erf_side, "cyan")):
            if side:
                top, left, _, _ = _square(f.center, side)
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False,
                                       edgecolor=color, linewidth=1.5))
        rf = "whole input" if f.theoretical is None else f"{f.theoretical} px"
        ax.set_title(f"{t}\ntheoretical RF (red) {rf}; ERF 90% (cyan) {f.erf_side} px\n"
                     f"unit {f.unit} of {f.map_size[0]}x{f.map_size[1]}, {f.images} images",
                     fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    plots.add_colorbar(fig, axes, "inferno", "mean |gradient| (of its max)")
    return fig


def save_receptive_fields(ex: Explainer, layers: list[str | None], images: np.ndarray,
                          out_dir: str, model_desc: str) -> list[tuple[str, ReceptiveField]]:
    """receptive_field_<layer>.png per layer; returns (path, field) pairs."""
    out = []
    for name in layers:
        f = effective_receptive_field(ex, name, images)
        fig = receptive_field_figure([f], [f"{model_desc}: {f.layer}"])
        dest = os.path.join(out_dir, f"receptive_field_{f.layer.replace('/', '_')}.png")
        out.append((plots.save_figure(fig, dest), f))
    return out
