"""Turning explanation maps into overlays, figures and JSON sidecars."""

from __future__ import annotations

import os

import cv2
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from research import files, machine, plots
from research.data.imaging import encode_image

# OpenCV's jet, the colours overlay_heatmap gives a map's 0..1, for the figures' colour bars.
HEATMAP_CMAP = ListedColormap(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None],
                                                cv2.COLORMAP_JET)[:, 0, ::-1] / 255.0,
                              name="opencv_jet")


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(jet-coloured heatmap, overlay), both RGB uint8 at the image's own resolution.

    `heatmap` in [0, 1] at any size is resized to the image with bilinear interpolation.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    hm = cv2.resize(np.asarray(heatmap, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    hm = np.uint8(np.clip(hm, 0.0, 1.0) * 255)
    colored = cv2.applyColorMap(hm, cv2.COLORMAP_JET)[:, :, ::-1]  # BGR -> RGB
    overlay = cv2.addWeighted(colored, alpha, image, 1.0 - alpha, 0.0)
    return colored, overlay


def overlay_on_original(photo: np.ndarray, heat: np.ndarray, window, alpha: float = 0.4
                        ) -> np.ndarray:
    """The heatmap (the network's view, low to high = 0..1) upsampled onto the part of the
    photo the network saw, `window` = (top, left, height, width) marked in white."""
    t, lft, h, w = window
    out = np.clip(np.asarray(photo), 0, 255).astype(np.uint8).copy()
    out[t:t + h, lft:lft + w] = overlay_heatmap(out[t:t + h, lft:lft + w], heat, alpha)[1]
    thick = max(2, round(max(photo.shape[:2]) / 150))
    cv2.rectangle(out, (lft, t), (lft + w - 1, t + h - 1), (255, 255, 255), thick)
    return out


def three_panel_figure(image, heatmap, overlay, title: str):
    """Original, heatmap and overlay side by side, readable at a glance; `heatmap` and
    `overlay` are overlay_heatmap's, and one colour bar gives their 0..1 scale."""
    fig, axes = plots.grid_figure(1, 3, cell=3.4, suptitle_lines=plots.text_lines([title]),
                                  colorbar=True)
    names = ("original", "heatmap", "overlay")
    for ax, img, name in zip(axes[0], (image, heatmap, overlay), names):
        ax.imshow(img, interpolation="bilinear")
        ax.set_title(name, fontsize=11)
    fig.suptitle(title, fontsize=11)
    plots.add_colorbar(fig, axes, HEATMAP_CMAP, "relevance (heatmap and overlay)")
    return fig


def save_explanation(out_dir: str, name: str, image: np.ndarray, heatmap: np.ndarray,
                     record: dict, alpha: float = 0.4, window=None) -> dict:
    """Writes heatmap_<name> (the overlay), map_<name> (the heatmap alone, no photo under
    it), <stem>_<method>.png (3 panels) and heatmap_<name>.json (the record); returns the
    paths. A record's `top_classes` ([name, probability] pairs) go into the title too.
    With `window` (top, left, height, width), `image` is the whole photo: the overlay is
    drawn on the part the network saw, framed in white, the rest of the photo around it;
    map_<name> is the window's heatmap."""
    base = os.path.basename(name)
    stem, ext = os.path.splitext(base)
    if ext.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
        base, ext = stem + ".png", ".png"
    if window is None:
        colored, overlay = overlay_heatmap(image, heatmap, alpha)
    else:
        t, lft, h, w = window
        colored = overlay_heatmap(np.asarray(image)[t:t + h, lft:lft + w], heatmap, alpha)[0]
        overlay = overlay_on_original(image, heatmap, window, alpha)
    overlay_path = os.path.join(out_dir, f"heatmap_{base}")
    files.write_bytes(overlay_path, encode_image(overlay, overlay_path), "an explanation")
    map_path = os.path.join(out_dir, f"map_{base}")
    files.write_bytes(map_path, encode_image(colored, map_path), "an explanation's heatmap")
    top = record.get("top_classes")
    title = (f"{record['model']}: " if record.get("model") else "") + (
             f"{base}: {record['method']} for '{record['class_name']}' "
             f"(p={record['probability']:.3f}, logit={record['logit']:.2f})"
             + (f"\nlayer {record['layer']}" if record.get("layer") else "")
             + (f"\ntop-{len(top)}: " + ", ".join(f"{n} {p:.3f}" for n, p in top)
                if top else ""))
    figure_path = os.path.join(out_dir, f"{stem}_{record['method']}.png")
    plots.save_figure(three_panel_figure(image, colored, overlay, title), figure_path)
    record = {**record, "image": name, "overlay": overlay_path, "map": map_path,
              "figure": figure_path, "alpha": alpha, "versions": machine.versions()}
    sidecar = os.path.join(out_dir, f"heatmap_{base}.json")
    files.write_json(sidecar, record, "an explanation's record")
    return {"overlay": overlay_path, "map": map_path, "figure": figure_path,
            "sidecar": sidecar}


def top_superpixels(image: np.ndarray, segments: np.ndarray, weights: np.ndarray, k: int
                    ) -> np.ndarray:
    """`image` (uint8, any size) with only the k superpixels of highest positive weight
    shown, the rest grey (LIME's picture); `segments` at any size are resized (nearest)."""
    image = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    seg = cv2.resize(np.asarray(segments, np.int32).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_NEAREST).astype(np.int32)
    weights = np.asarray(weights)[:int(seg.max()) + 1]
    best = [s for s in np.argsort(-weights, kind="stable")[:k] if weights[s] > 0]
    keep = np.isin(seg, best)
    return np.where(keep[..., None], image, np.uint8(128))


def overlay_grid(images, maps, titles, alpha: float = 0.4, upscale: int = 96,
                 title: str | None = None):
    """One figure of overlays (images upscaled so 32x32 inputs stay visible)."""
    cells = []
    for img, m in zip(images, maps):
        img = np.asarray(img)
        if img.shape[0] < upscale:
            img = cv2.resize(np.clip(img, 0, 255).astype(np.uint8), (upscale, upscale),
                             interpolation=cv2.INTER_NEAREST)
        cells.append(overlay_heatmap(img, m, alpha)[1])
    return plots.image_grid(cells, titles, ncols=8, title=title, colorbar_cmap=HEATMAP_CMAP,
                            colorbar_label="relevance (overlay colour)")


def class_comparison_figure(images, maps, titles, alpha: float = 0.4, upscale: int = 96,
                            title: str | None = None) -> Figure:
    """Rows are images; columns the image, then one overlay per class (one colour bar).

    `maps[c][i]` is class c's map of image i; `titles[c][i]` its cell title."""
    fig, axes = plots.grid_figure(len(images), 1 + len(maps), cell=2.2,
                                  title_lines=plots.text_lines(sum(map(list, titles), [])),
                                  suptitle_lines=plots.text_lines([title]), colorbar=True)
    for i, img in enumerate(images):
        img = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        f = -(-upscale // min(img.shape[:2]))  # whole-pixel zoom: 32x32 inputs stay visible
        if f > 1:
            img = cv2.resize(img, (img.shape[1] * f, img.shape[0] * f),
                             interpolation=cv2.INTER_NEAREST)
        cells = [img] + [overlay_heatmap(img, m[i], alpha)[1] for m in maps]
        names = ["image"] + [t[i] for t in titles]
        for ax, cell, name in zip(axes[i], cells, names):
            ax.imshow(cell, interpolation="nearest")
            ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    plots.add_colorbar(fig, axes, HEATMAP_CMAP, "relevance (overlay colour)")
    return fig
