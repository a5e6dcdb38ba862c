"""Deletion and insertion scores (Petsiuk et al. 2018, RISE) for ranking explanation methods.

Pixels are ordered by the explanation map, most important first. Deletion replaces them, in
`steps` equal chunks, with a baseline (a heavy blur of the image) and tracks the probability of
the explained class: a faithful map makes it fall fast (low AUC is good). Insertion starts
from the blurred image and puts the pixels back in the same order: a faithful map makes the
probability rise fast (high AUC is good). AUC is the mean of the curve over [0, 1]
(trapezoid rule).
"""

from __future__ import annotations

import cv2
import numpy as np

from research.explain.core import Explainer, Explanation


def blur_baseline(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    k = max(3, (min(h, w) // 4) | 1)
    return cv2.GaussianBlur(np.asarray(image, np.float32), (k, k), 0)


def _curves(ex: Explainer, image, saliency, class_index: int, steps: int, batch_size: int):
    h, w = image.shape[:2]
    order = np.argsort(-saliency.reshape(-1), kind="stable")
    base = blur_baseline(image)
    counts = np.linspace(0, h * w, steps + 1).astype(int)
    deletion, insertion = [], []
    for start in range(0, len(counts), batch_size):
        chunk = counts[start:start + batch_size]
        dele = np.repeat(image[None].astype(np.float32), len(chunk), 0)
        ins = np.repeat(base[None], len(chunk), 0)
        for j, c in enumerate(chunk):
            idx = order[:c]
            r, q = np.unravel_index(idx, (h, w))
            dele[j, r, q] = base[r, q]
            ins[j, r, q] = image[r, q]
        for arr, out in ((dele, deletion), (ins, insertion)):
            probs = ex.probabilities(np.asarray(ex.logits(arr)))
            out.extend(probs[:, class_index])
    return np.asarray(deletion), np.asarray(insertion)


def _auc(curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def deletion_insertion(ex: Explainer, images: np.ndarray, explanation: Explanation,
                       steps: int = 32, batch_size: int = 33) -> dict:
    """Mean deletion and insertion AUC over the images, plus the per-image values."""
    dels, inss = [], []
    for img, sal, c in zip(np.asarray(images, np.float32), explanation.maps,
                           explanation.classes):
        if sal.shape != img.shape[:2]:
            sal = cv2.resize(sal.astype(np.float32), (img.shape[1], img.shape[0]))
        d, i = _curves(ex, img, sal, int(c), steps, batch_size)
        dels.append(_auc(d))
        inss.append(_auc(i))
    return {"method": explanation.method, "num_images": len(dels), "steps": steps,
            "deletion_auc": float(np.mean(dels)), "insertion_auc": float(np.mean(inss)),
            "per_image": {"deletion": dels, "insertion": inss}}
