"""Faithfulness scores for ranking explanation methods: deletion and insertion (Petsiuk et al.
2018, RISE), ROAD, MuFidelity, Average Drop and Increase in Confidence (below).

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
import tensorflow as tf

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


# ---------------------------------------------------------------------------------------------
# ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
# Methods"): RemOve And Debias. Removed pixels are filled by noisy linear imputation, so the
# fill does not leak the mask's shape: each removed pixel is the weighted mean of its 8
# neighbours (1/6 direct, 1/12 diagonal; neighbours outside the image left out), removed
# neighbours being unknowns too; the linear system is solved, then Gaussian noise added. As
# road_evaluation's NoisyLinearImputer (imputations.py), solved here by conjugate gradients on
# a batch of images at once (TensorFlow, float64) instead of scipy's spsolve per image.

ROAD_PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # pytorch-grad-cam's
NEIGHBOURS = np.array([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def _neighbour_sum(x):
    """(B, H, W, C): sum of each pixel's neighbours weighted by NEIGHBOURS (zero outside)."""
    c = x.shape[-1]
    kernel = tf.constant(np.tile(NEIGHBOURS[:, :, None, None], (1, 1, c, 1)), x.dtype)
    return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")


def _system(v, unknown, weight_sum):
    """The imputation's linear operator on the unknowns (SPD when each hole touches a known
    pixel): weight_sum * v - neighbour sum of v, both restricted to the unknowns."""
    v = v * unknown
    return unknown * (weight_sum * v - _neighbour_sum(v))


@tf.function(autograph=False, reduce_retracing=True)
def _cg_steps(sol, r, p, rs, unknown, weight_sum, scale):
    """10 conjugate-gradient steps on every (image, channel) at once; also the largest
    squared residual relative to the right-hand side."""
    for _ in range(10):
        ap = _system(p, unknown, weight_sum)
        step = tf.math.divide_no_nan(rs, tf.reduce_sum(p * ap, axis=[1, 2], keepdims=True))
        sol += step * p
        r -= step * ap
        new = tf.reduce_sum(r * r, axis=[1, 2], keepdims=True)
        p = r + tf.math.divide_no_nan(new, rs) * p
        rs = new
    return sol, r, p, rs, tf.reduce_max(rs / scale)


def linear_impute(images: np.ndarray, keep: np.ndarray, tol: float = 1e-6,
                  max_iterations: int | None = None) -> np.ndarray:
    """(B, H, W, C): `images` with the pixels where `keep` (B, H, W) is 0 replaced by the
    solution of x_i = sum_j w_ij x_j / sum_j w_ij over their valid neighbours j (known
    ones fixed), without noise."""
    x = tf.constant(np.asarray(images, np.float64))
    known = tf.constant(np.asarray(keep, np.float64)[..., None])
    unknown = 1.0 - known
    weight_sum = _neighbour_sum(tf.ones_like(x[..., :1]))              # valid neighbours
    b = unknown * _neighbour_sum(x * known)
    h, w = x.shape[1:3]
    sol = tf.zeros_like(x)
    r = p = b
    rs = tf.reduce_sum(r * r, axis=[1, 2], keepdims=True)              # per image, channel
    scale = tf.reduce_sum(b * b, axis=[1, 2], keepdims=True) + 1e-300
    for _ in range(0, max_iterations or 4 * (h + w) + 50, 10):
        sol, r, p, rs, worst = _cg_steps(sol, r, p, rs, unknown, weight_sum, scale)
        if float(worst) < tol * tol:
            break
    return (x * known + sol * unknown).numpy()


def road_keeps(saliency: np.ndarray, percentages) -> np.ndarray:
    """(2P, H, W) masks, 1 = kept: the `percentages` of pixels of highest saliency removed
    (MoRF), then those of lowest (LeRF)."""
    h, w = saliency.shape
    order = np.argsort(-saliency.reshape(-1), kind="stable")
    keeps = []
    for most in (True, False):
        for p in percentages:
            k = int(round(p * h * w))
            keep = np.ones(h * w)
            keep[order[:k] if most else order[::-1][:k]] = 0
            keeps.append(keep.reshape(h, w))
    return np.stack(keeps)


def road(ex: Explainer, images: np.ndarray, explanation: Explanation,
         percentages=ROAD_PERCENTAGES, noise: float = 0.01, seed: int = 0,
         batch_size: int = 64) -> dict:
    """ROAD: the explained class's probability after removing each percentage of pixels,
    most relevant first (MoRF, lower is better) and least relevant first (LeRF, higher is
    better), averaged over the images; `morf`/`lerf` are the curves' means. The
    `*_accuracy_curve`s give the share of images whose top class is still the explained one
    (a single output: whose p is still >= 0.5), what the ROAD paper and Quantus plot. The removed
    pixels take noisy linear imputation (`noise` x 255 std on 0..255 images: road_evaluation's
    0.01 on 0..1 ones); the imputations and forward passes run `batch_size` images at a
    time."""
    rng = np.random.default_rng(seed)
    images = np.asarray(images, np.float32)
    keeps, owner = [], []
    for i, (img, sal) in enumerate(zip(images, explanation.maps)):
        if sal.shape != img.shape[:2]:
            sal = cv2.resize(sal.astype(np.float32), (img.shape[1], img.shape[0]))
        keeps.append(road_keeps(sal, percentages))
        owner += [i] * len(keeps[-1])
    keeps, owner = np.concatenate(keeps), np.asarray(owner)
    filled = []
    for s in range(0, len(keeps), batch_size):  # one imputation for a batch of images
        k, o = keeps[s:s + batch_size], owner[s:s + batch_size]
        x = linear_impute(images[o], k)
        x += (1 - k[..., None]) * rng.normal(0, noise * 255.0, x.shape)
        filled.append(np.clip(x, 0, 255).astype(np.float32))
    filled = np.concatenate(filled)
    probs = np.concatenate([ex.probabilities(np.asarray(ex.logits(filled[s:s + batch_size])))
                            for s in range(0, len(filled), batch_size)])
    cls = np.asarray(explanation.classes)[owner]
    # accuracy: the explained class still the top one (one output: its p still >= 0.5)
    hits = (probs[:, 0] >= 0.5) if probs.shape[1] == 1 else (probs.argmax(-1) == cls)
    probs = probs[np.arange(len(filled)), cls]
    curves = probs.reshape(len(images), 2, len(percentages)).mean(0)
    accuracy = hits.reshape(len(images), 2, len(percentages)).mean(0)
    morf, lerf = curves
    return {"percentages": list(percentages), "noise": noise, "seed": seed,
            "morf_curve": morf.tolist(), "lerf_curve": lerf.tolist(),
            "road_morf": float(morf.mean()), "road_lerf": float(lerf.mean()),
            "morf_accuracy_curve": accuracy[0].tolist(),
            "lerf_accuracy_curve": accuracy[1].tolist()}


# ---------------------------------------------------------------------------------------------
# MuFidelity (Bhatt et al. 2020) as xplique's metrics.MuFidelity: random subsets of a coarse
# grid (each cell in with probability `subset`) set to `baseline`; per image, the Pearson
# correlation across subsets of the attribution summed over the subset and the drop of the
# class probability; averaged over the images (higher is better).

def mu_fidelity(ex: Explainer, images: np.ndarray, explanation: Explanation,
                grid: int = 9, subset: float = 0.2, samples: int = 128,
                baseline: float = 0.0, seed: int = 0, batch_size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    per = []
    for img, sal, c in zip(np.asarray(images, np.float32), explanation.maps,
                           explanation.classes):
        h, w = img.shape[:2]
        if sal.shape != (h, w):
            sal = cv2.resize(sal.astype(np.float32), (w, h))
        cells = (rng.uniform(size=(samples, grid, grid)) < subset).astype(np.float32)
        masks = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
                          for m in cells])
        perturbed = img[None] * (1 - masks[..., None]) + baseline * masks[..., None]
        probs = np.concatenate([ex.probabilities(np.asarray(ex.logits(
            perturbed[s:s + batch_size]))) for s in range(0, samples, batch_size)])[:, int(c)]
        clean = ex.probabilities(np.asarray(ex.logits(img[None])))[0, int(c)]
        attr = (masks * sal[None]).sum((1, 2))
        drop = clean - probs
        den = attr.std() * drop.std()
        per.append(float(((attr - attr.mean()) * (drop - drop.mean())).mean() / den)
                   if den > 0 else 0.0)
    return {"mu_fidelity": float(np.mean(per)), "grid": grid, "subset": subset,
            "samples": samples, "per_image_mu_fidelity": per}


# ---------------------------------------------------------------------------------------------
# Average Drop and Increase in Confidence (Chattopadhyay et al. 2018, Grad-CAM++ section 5.1):
# the image times its map (upsampled, [0, 1]) against the image: AD = mean of
# max(0, Y - O) / Y (%, lower is better), IC = share of images with O > Y (%, higher).

def confidence_change(ex: Explainer, images: np.ndarray, explanation: Explanation,
                      batch_size: int = 64) -> dict:
    images = np.asarray(images, np.float32)
    maps = np.stack([sal if sal.shape == img.shape[:2] else cv2.resize(
        sal.astype(np.float32), (img.shape[1], img.shape[0]))
        for img, sal in zip(images, explanation.maps)])
    idx = np.arange(len(images)), np.asarray(explanation.classes)

    def probs(x):
        return np.concatenate([ex.probabilities(np.asarray(ex.logits(x[s:s + batch_size])))
                               for s in range(0, len(x), batch_size)])[idx]

    y, o = probs(images), probs(images * maps[..., None])
    drop = np.maximum(0.0, y - o) / np.maximum(y, 1e-12)
    return {"average_drop": float(100 * drop.mean()),
            "increase_in_confidence": float(100 * np.mean(o > y))}


def all_scores(ex: Explainer, images: np.ndarray, explanation: Explanation, steps: int = 32,
               mufidelity_samples: int = 128, seed: int = 0) -> dict:
    """Deletion/insertion, ROAD, MuFidelity and Average Drop / Increase in Confidence of one
    method's maps, in one dict (the faithfulness table's row and JSON)."""
    out = deletion_insertion(ex, images, explanation, steps=steps)
    out.update(road(ex, images, explanation, seed=seed))
    out.update(mu_fidelity(ex, images, explanation, samples=mufidelity_samples, seed=seed))
    out.update(confidence_change(ex, images, explanation))
    return out


SCORE_COLUMNS = (("deletion_auc", "deletion", "lower"), ("insertion_auc", "insertion", "higher"),
                 ("road_morf", "ROAD MoRF", "lower"), ("road_lerf", "ROAD LeRF", "higher"),
                 ("mu_fidelity", "MuFidelity", "higher"),
                 ("average_drop", "avg drop %", "lower"),
                 ("increase_in_confidence", "incr. conf %", "higher"))
