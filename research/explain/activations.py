"""What the layers compute: feature-map grids and filter patterns by gradient ascent."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from research import plots
from research.explain.core import Explainer, capture, find_layer


def standardize_channels(fmap: np.ndarray) -> np.ndarray:
    """(H, W, C) -> uint8 for display: each channel to zero mean, unit std, then 128 +- 64*z.

    Dead channels (constant) come out uniformly 0 (blank), never NaN."""
    f = np.asarray(fmap, np.float64)
    mean = f.mean(axis=(0, 1), keepdims=True)
    std = f.std(axis=(0, 1), keepdims=True)
    dead = std[0, 0] < 1e-8
    z = np.divide(f - mean, std, out=np.zeros_like(f), where=std > 1e-8)
    out = np.clip(128.0 + 64.0 * z, 0, 255).astype(np.uint8)
    out[:, :, dead] = 0
    return out


def layer_outputs(ex: Explainer, raw_image: np.ndarray, layer_names: list[str]) -> dict:
    """{path: (H, W, C) float32} for the named layers, from one forward pass."""
    targets = [find_layer(ex.model, n) for n in layer_names]
    raw = tf.convert_to_tensor(np.asarray(raw_image, np.float32)[None])
    with capture([layer for _, layer in targets]) as store:
        ex.model(ex.preprocess(raw), training=False)
    return {path: np.asarray(tf.cast(store[id(layer)][-1], tf.float32))[0]
            for path, layer in targets}


def activation_grid(fmap: np.ndarray, title: str, max_channels: int = 64, ncols: int = 16):
    """A figure of the first `max_channels` standardised channels of one layer."""
    if fmap.ndim != 3:
        raise ValueError(f"{title}: expected a (H, W, C) feature map, got shape {fmap.shape}")
    img = standardize_channels(fmap)
    c = min(max_channels, img.shape[-1])
    dead = int(np.sum(np.asarray(fmap).std(axis=(0, 1)) < 1e-8))
    fig = plots.image_grid([img[:, :, i] for i in range(c)], [str(i) for i in range(c)],
                           ncols=ncols, cell=0.9,
                           title=f"{title}: {c} of {img.shape[-1]} channels, "
                                 f"{fmap.shape[0]}x{fmap.shape[1]}, {dead} dead (blank)")
    for ax in fig.axes[:c]:
        ax.images[0].set_cmap("viridis")
        ax.images[0].set_clim(0, 255)
    return fig


@dataclasses.dataclass
class FilterPattern:
    layer: str
    filter_index: int
    image: np.ndarray          # uint8 HxWx3, deprocessed for display
    start_activation: float
    final_activation: float


def visualize_filter(ex: Explainer, layer_name: str | None, filter_index: int,
                     steps: int = 40, step_size: float = 2.0, border: int = 2, seed: int = 0,
                     size: tuple[int, int] | None = None) -> FilterPattern:
    """Gradient ascent in raw-pixel space (0..255) on the mean activation of one filter,
    leaving out `border` cells on each side of the feature map (edge effects dominate
    there). The gradient is L2-normalised, so each step changes the pixels by `step_size`
    (root-mean-square, in 0..255 units) whatever the layer's scale."""
    path, layer = find_layer(ex.model, layer_name)
    h, w = size or ex.input_size
    rng = np.random.default_rng(seed)
    start = (128.0 + 20.0 * rng.standard_normal((1, h, w, 3))).astype(np.float32)
    img = tf.Variable(start)

    @tf.function(autograph=False)
    def activation_and_grad():
        with tf.GradientTape() as tape:
            with capture([layer]) as store:
                ex.model(ex.preprocess(img), training=False)
            a = tf.cast(store[id(layer)][-1], tf.float32)
            if a.shape.rank != 4:
                raise ValueError(f"layer {path} has no spatial output to visualise")
            hh, ww = a.shape[1], a.shape[2]
            b = border if hh is not None and hh > 2 * border + 1 and ww > 2 * border + 1 else 0
            a = a[:, b:(hh - b) if b else None, b:(ww - b) if b else None, filter_index]
            value = tf.reduce_mean(a)
        return value, tape.gradient(value, img)

    first, _ = activation_and_grad()
    for _ in range(steps):
        _, g = activation_and_grad()
        g = g / (tf.norm(g) + 1e-8)
        img.assign(tf.clip_by_value(img + step_size * np.sqrt(h * w * 3) * g, 0.0, 255.0))
    final, _ = activation_and_grad()
    return FilterPattern(path, filter_index, deprocess(img.numpy()[0]), float(first),
                         float(final))


def deprocess(x: np.ndarray) -> np.ndarray:
    """Centre, scale to std 0.15 of the range, clip: a displayable uint8 image."""
    x = np.asarray(x, np.float64)
    x = x - x.mean()
    x = x / (x.std() + 1e-8) * 0.15 + 0.5
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def filter_grid(patterns: list[FilterPattern], title: str):
    titles = [f"#{p.filter_index}: {p.start_activation:.2f}->{p.final_activation:.2f}"
              for p in patterns]
    return plots.image_grid([p.image for p in patterns], titles, ncols=8, cell=1.5,
                            title=title)


def _file_part(layer_path: str) -> str:
    return layer_path.replace("/", "_")


def save_activation_grids(ex: Explainer, raw_image: np.ndarray, layers: list[str], out_dir: str,
                          name: str, title: str, max_channels: int = 64) -> list[str]:
    """One grid of feature maps per layer, from one forward pass of `raw_image`:
    <out_dir>/<name>_<layer>.png, titled '<title>, layer <layer>'. Returns the paths."""
    paths = []
    for path, fmap in layer_outputs(ex, raw_image, layers).items():
        fig = activation_grid(fmap, f"{title}, layer {path}", max_channels=max_channels)
        paths.append(plots.save_figure(fig, os.path.join(out_dir,
                                                         f"{name}_{_file_part(path)}.png")))
    return paths


def save_filter_grids(ex: Explainer, layers: list[str], out_dir: str, name: str, title: str,
                      num_filters: int, seed: int = 0, **ascent) -> list[str]:
    """The gradient-ascent patterns of the first `num_filters` filters of each layer (filter
    k seeded with seed + k; `ascent`: visualize_filter's steps and step_size):
    <out_dir>/<name>_<layer>.png. Returns the paths."""
    paths = []
    for layer in layers:
        path, lyr = find_layer(ex.model, layer)
        n = min(num_filters, int(lyr.output.shape[-1]))
        patterns = [visualize_filter(ex, layer, k, seed=seed + k, **ascent) for k in range(n)]
        fig = filter_grid(patterns, f"{title}, layer {path}: patterns that excite its first "
                                    f"{n} filters (mean activation start->end)")
        paths.append(plots.save_figure(fig, os.path.join(out_dir,
                                                         f"{name}_{_file_part(path)}.png")))
    return paths
