"""Matplotlib helpers shared by the data, training, evaluation and explain stages.

Figures are built with the object-oriented `matplotlib.figure.Figure`, never through pyplot,
so importing a library module neither picks a backend nor keeps figures alive in a global
registry; `savefig` renders them with Agg whatever the backend.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from research import files


def image_grid(images, titles=None, ncols: int = 8, title: str | None = None,
               cell: float = 1.6, title_colors=None) -> Figure:
    """A figure with one image per cell; images are HxWx3 uint8 or float in [0, 1]."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(cell * ncols, cell * nrows * 1.15 + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
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
    # Leave room for the suptitle, which tight_layout does not see.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()) if title else None)
    return fig


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str, dpi: int = 100) -> str:
    """Writes the figure as a PNG, atomically (research.files); returns `path`."""
    return files.write_bytes(path, figure_to_png(fig, dpi), "a figure")
