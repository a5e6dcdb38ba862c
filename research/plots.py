"""Matplotlib helpers shared by the data, training, evaluation and explain stages."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: every figure goes to a file or to TensorBoard
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images, titles=None, ncols: int = 8, title: str | None = None,
               cell: float = 1.6, title_colors=None):
    """A figure with one image per cell; images are HxWx3 uint8 or float in [0, 1]."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows * 1.15 + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(np.asarray(img), interpolation="nearest")
        if titles is not None:
            color = title_colors[i] if title_colors is not None else "black"
            ax.set_title(titles[i], fontsize=7, color=color)
    if title:
        fig.suptitle(title, fontsize=10)
    # Leave room for the suptitle, which tight_layout does not see.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()) if title else None)
    return fig


def figure_to_png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str, dpi: int = 100) -> str:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
