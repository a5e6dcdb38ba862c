"""The lab's own figures: explanations of two detectors side by side, and training curves
read back from TensorBoard event files."""

from __future__ import annotations

import glob
import os
import textwrap

import cv2
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from tensorflow.core.util import event_pb2

from research import plots
from research.explain import methods
from research.explain.render import HEATMAP_CMAP, overlay_heatmap


def _zoom(img: np.ndarray, size: int = 96) -> np.ndarray:
    """Whole-pixel zoom so 32x32 inputs stay visible."""
    img = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
    f = -(-size // min(img.shape[:2]))
    if f > 1:
        img = cv2.resize(img, (img.shape[1] * f, img.shape[0] * f),
                         interpolation=cv2.INTER_NEAREST)
    return img


def side_by_side(images, row_labels, explanations: dict, method: str, what: str,
                 class_name: str = "cat") -> Figure:
    """Rows: images. Columns: the image, then per detector its heatmap and overlay (the
    three-panel figure of each detector, side by side), and one colour bar for all maps.
    Cell titles give P(class)."""
    runs = list(explanations)
    cols = 1 + 2 * len(runs)
    layers = ", ".join(f"{r}: {explanations[r].layer}" for r in runs if explanations[r].layer)
    # Wrapped to the figure's width (about 14 characters of 9 pt per inch): long run names
    # would otherwise run off both edges.
    width = int(1.9 * cols * 14)
    lines = textwrap.wrap(f"{methods.display_name(method)} of the detectors' cat score, "
                          f"{what}", width) + textwrap.wrap(f"layers {layers}" if layers else "",
                                                            width)
    fig, axes = plots.grid_figure(len(images), cols, cell=1.9,
                                  title_lines=max(2, plots.text_lines(row_labels)),
                                  suptitle_lines=len(lines), colorbar=True)
    for i, img in enumerate(images):
        big = _zoom(img)
        axes[i, 0].imshow(big, interpolation="nearest")
        axes[i, 0].set_title(row_labels[i], fontsize=7)
        for j, run in enumerate(runs):
            res = explanations[run]
            colored, overlay = overlay_heatmap(big, res.maps[i])
            name = f"p({class_name})={res.probabilities[i]:.2f}"
            axes[i, 1 + 2 * j].imshow(colored, interpolation="nearest")
            axes[i, 1 + 2 * j].set_title(f"{run}\nheatmap", fontsize=7)
            axes[i, 2 + 2 * j].imshow(overlay, interpolation="nearest")
            axes[i, 2 + 2 * j].set_title(f"{run}\noverlay, {name}", fontsize=7)
    fig.suptitle("\n".join(lines), fontsize=9)
    plots.add_colorbar(fig, axes, HEATMAP_CMAP, "relevance (heatmaps and overlays)")
    return fig


def read_scalars(run_log_dir: str, tags) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} from a TensorBoard folder's event files (all sessions; the
    last value written for a step wins)."""
    found: dict[str, dict[int, float]] = {t: {} for t in tags}
    for path in sorted(glob.glob(os.path.join(run_log_dir, "events.out.tfevents*"))):
        try:
            for record in tf.data.TFRecordDataset(path):  # summary_iterator is deprecated
                event = event_pb2.Event.FromString(record.numpy())
                for v in event.summary.value:
                    if v.tag in found:
                        value = (float(tf.make_ndarray(v.tensor)) if v.HasField("tensor")
                                 else float(v.simple_value))
                        found[v.tag][int(event.step)] = value
        except tf.errors.DataLossError:  # a file cut short by a kill: keep what was read
            continue
    return {t: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)]))
            for t, d in found.items() if d}


def tensorboard_curves_figure(runs: dict[str, str], title: str) -> Figure:
    """Train loss, val N-class accuracy, val ROC-AUC and val PR-AUC against the step, one line
    per run (a run with no finite value in a panel, such as a source task without the
    positive class in the ROC-AUC panel, is left out of it).
    `runs`: {label: TensorBoard folder of the run (logs/<run>)}."""
    fig = Figure(figsize=(12, 7.4))
    axes = fig.subplots(2, 2).ravel()
    panels = (("train", "loss", "training loss (per loop)"),
              ("eval", "class_accuracy", "val class accuracy (all classes of the run)"),
              ("eval", "roc_auc", "val ROC-AUC"), ("eval", "pr_auc", "val PR-AUC"))
    for ax, (sub, tag, name) in zip(axes, panels):
        for label, tb_dir in runs.items():
            data = read_scalars(os.path.join(tb_dir, sub), [tag]).get(tag)
            if data is not None and np.isfinite(data[1]).any():
                ax.plot(*data, marker="." if len(data[0]) < 30 else None, label=label)
        ax.set(xlabel="step", ylabel=name.split(" (")[0], title=name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig
