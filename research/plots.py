"""Matplotlib helpers shared by the data, training, evaluation and explain stages.

Figures are built with the object-oriented `matplotlib.figure.Figure`, never through pyplot,
so importing a library module neither picks a backend nor keeps figures alive in a global
registry; `savefig` renders them with Agg whatever the backend.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import rcParams
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.layout_engine import PlaceHolderLayoutEngine

from research import files

# Inches of figure height per line of a cell's title (7-8 pt text and its pad), and per
# line of a suptitle (9-11 pt).
TITLE_LINE = 0.15
SUPTITLE_LINE = 0.22
COLORBAR_WIDTH = 0.7  # inches: the bar, its ticks and its label


def text_lines(texts) -> int:
    """The most lines any of `texts` (None: no text) spans."""
    return max([1 + str(t).count("\n") for t in texts if t] or [0])


def grid_figure(nrows: int, ncols: int, cell: float = 1.6, title_lines: int = 1,
                suptitle_lines: int = 0, colorbar: bool = False):
    """(figure, axes[nrows, ncols]): a grid of image cells, axes off, `cell` inches wide.

    Each row is `cell` plus `title_lines` of title tall, and constrained layout places every
    cell's title in its own band, so a row's titles never run into the images above them
    (tight_layout with equal-aspect images did, whatever the height). `colorbar`: room on
    the right for one colour bar (add_colorbar)."""
    height = nrows * (cell + TITLE_LINE * title_lines + 0.08) + SUPTITLE_LINE * suptitle_lines
    fig = Figure(figsize=(cell * ncols + (COLORBAR_WIDTH if colorbar else 0.0), height + 0.1),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
        # No ticks either: an axis turned off still makes and measures its ticks at every
        # layout pass (a 56-cell figure saved in 0.9 s instead of 1.6, the same PNG bytes).
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def add_colorbar(fig: Figure, axes, cmap, label: str = "relevance", vmin: float = 0.0,
                 vmax: float = 1.0):
    """One colour bar for `axes` (a heatmap's values vmin..vmax as `cmap` colours them)."""
    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=axes, shrink=0.85,
                       fraction=0.05, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def image_grid(images, titles=None, ncols: int = 8, title: str | None = None,
               cell: float = 1.6, title_colors=None, colorbar_cmap=None,
               colorbar_label: str = "relevance") -> Figure:
    """A figure with one image per cell; images are HxWx3 uint8 or float in [0, 1].
    `colorbar_cmap`: the images are heatmaps (or overlays) coloured by it from 0 to 1; one
    colour bar labelled `colorbar_label` explains them all."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = grid_figure(nrows, ncols, cell, text_lines(titles or []), text_lines([title]),
                            colorbar=colorbar_cmap is not None)
    for i, img in enumerate(images):
        ax = axes.flat[i]
        img = np.asarray(img)
        ax.imshow(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img,
                  interpolation="nearest", cmap="gray")
        if titles is not None:
            color = title_colors[i] if title_colors is not None else "black"
            ax.set_title(titles[i], fontsize=7, color=color)
    if title:
        fig.suptitle(title, fontsize=10)
    if colorbar_cmap is not None:
        add_colorbar(fig, axes, colorbar_cmap, colorbar_label)
    return fig


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes. A figure laid out when it was built (`tight_layout`, which
    leaves a placeholder layout engine behind) loses the placeholder first: with any engine
    set, savefig draws the whole figure once more before the real draw, to lay it out, and a
    placeholder lays out nothing (the same PNG bytes; a 10-class confusion matrix saved in
    135 ms instead of 171, the training curves in 165 instead of 231)."""
    if isinstance(fig.get_layout_engine(), PlaceHolderLayoutEngine) and not (
            rcParams["figure.autolayout"] or rcParams["figure.constrained_layout.use"]):
        fig.set_layout_engine(None)  # (those rcParams would make None a new engine)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str, dpi: int = 100) -> str:
    """Writes the figure as a PNG, atomically (research.files); returns `path`."""
    return files.write_bytes(path, figure_to_png(fig, dpi), "a figure")
