"""Sanity checks for saliency maps (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

Model randomisation: the layers with a kernel (convolutions and dense layers, nested
backbones included) are re-drawn, kernel ~ N(0, std of the trained kernel) and bias 0,
seeded, *cascading* from the logits down (after step j the top j layers are random) and
*independently* (one layer at a time, the others trained). Random logit: the map of a random
other class against the map of the explained class. Each time the map is compared with the
original by the Spearman rank correlation (average ranks for ties, as scipy's rankdata) and
SSIM (tf.image.ssim on the [0, 1] maps). The explained class stays the original's.

A method *passes* model randomisation when its maps stop resembling the original once the
network is random: the mean Spearman after the whole cascade is below PASS_BELOW (Adebayo
et al.'s guided backprop stays near 1 there). It passes random logit when the other class's
map differs just as clearly. The model's weights are restored afterwards, always.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from research.errors import UserError
from research.explain import methods
from research.explain.core import Explainer, iter_layers

CHECKS = ("model_randomization", "random_logit")
PASS_BELOW = 0.5


def check_request(checks, names, num_outputs: int | None) -> None:
    """UserError (one line, naming the flag and method) for checks that cannot be run."""
    for c in checks:
        if c not in CHECKS:
            raise UserError(f"--sanity: {c!r} is not one of {', '.join(CHECKS)}")
    if "random_logit" in checks:
        if num_outputs is not None and num_outputs < 2:
            raise UserError("--sanity=random_logit needs a model with two or more classes; "
                            "this one has a single output")
        for m in names:
            if m in methods.BY_NAME and methods.BY_NAME[m].class_agnostic:
                raise UserError(f"--sanity=random_logit: --method={m} does not depend on the "
                                "class, so another class's map is the same map")


def _kernel(layer):
    for name in ("kernel", "depthwise_kernel"):
        try:
            var = getattr(layer, name, None)
        except (AttributeError, ValueError):  # an unbuilt layer
            var = None
        if var is not None:
            return var
    return None


def kernel_layers(model) -> list[tuple[str, object]]:
    """(path, layer) of every layer with a kernel (dense, convolutions, depthwise ones),
    input to output (nested models included)."""
    return [(p, layer) for p, layer in iter_layers(model)
            if not hasattr(layer, "layers") and _kernel(layer) is not None]


@contextlib.contextmanager
def randomized(layers, seed: int):
    """Re-draws the layers' kernels (N(0, std of the kernel)) and zeroes their biases for the
    duration of the block; restores the trained values after."""
    saved = []
    rng = np.random.default_rng(seed)
    try:
        for layer in layers:
            kernel = _kernel(layer)
            value = keras.ops.convert_to_numpy(kernel)
            saved.append((kernel, value))
            kernel.assign(rng.normal(0.0, float(value.std()) or 1e-2, value.shape
                                     ).astype(value.dtype))
            bias = getattr(layer, "bias", None)
            if bias is not None:
                value = keras.ops.convert_to_numpy(bias)
                saved.append((bias, value))
                bias.assign(np.zeros_like(value))
        yield
    finally:
        for var, value in saved:
            var.assign(value)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) Spearman rank correlation of each pair of maps (0 where one is constant)."""
    out = []
    for x, y in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
        den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
        out.append(float((rx * ry).sum() / den) if den > 0 else 0.0)
    return np.asarray(out)


def pearson(a, b) -> np.ndarray:
    """(N,) Pearson correlation of each pair of maps: 1 where both are constant (they agree),
    0 where only one is; NaNs count as 0."""
    a = np.nan_to_num(np.asarray(a, np.float64).reshape(len(a), -1))
    b = np.nan_to_num(np.asarray(b, np.float64).reshape(len(b), -1))
    flat_a, flat_b = np.ptp(a, axis=1) == 0, np.ptp(b, axis=1) == 0
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    r = np.divide((a * b).sum(1), den, out=np.zeros(len(a)), where=~(flat_a | flat_b))
    return np.where(flat_a & flat_b, 1.0, r)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) SSIM of each pair of [0, 1] maps (tf.image.ssim, Gaussian window of 11 or the
    map's side if smaller)."""
    h, w = a.shape[1:3]
    size = min(11, h, w)
    return tf.image.ssim(tf.constant(a[..., None], tf.float32),
                         tf.constant(b[..., None], tf.float32), max_val=1.0,
                         filter_size=size).numpy().astype(np.float64)


def _compare(ref: np.ndarray, maps: np.ndarray) -> dict:
    s, q = spearman(ref, maps), ssim(ref, maps)
    flat = maps.reshape(len(maps), -1)
    return {"spearman": float(s.mean()), "ssim": float(q.mean()),
            "empty_maps": int((flat.max(axis=1) == flat.min(axis=1)).sum()),
            "per_image": {"spearman": s.tolist(), "ssim": q.tolist()}}


def verdict(compared: dict) -> str:
    """pass when the mean Spearman is below PASS_BELOW, else fail. A constant ("empty") map
    has no ranks, so its Spearman counts as 0: a pass that only says the map vanished (e.g.
    Grad-CAM's ReLU zeroing everything) is marked so, not passed silently."""
    result = "pass" if compared["spearman"] < PASS_BELOW else "fail"
    empty, n = compared.get("empty_maps", 0), len(compared["per_image"]["spearman"])
    return result + (f" ({empty} of {n} maps empty)" if empty else "")


def model_randomization(ex: Explainer, explain: Callable, images, classes, seed: int = 0,
                        keep_maps: int = 1, independent: bool = True) -> dict:
    """Cascading and independent randomisation of `ex.model` for one method.

    `explain(ex, images, classes)` -> maps (N, H, W) with `classes` fixed. Returns
    {"layers": top-down paths, "cascading": [{spearman, ssim, per_image}] per step,
    "independent": [...] per layer (empty without `independent`: it doubles the cost),
    "maps": {"original", "cascading"} of the first `keep_maps` images (for the figure),
    "verdict"}."""
    layers = kernel_layers(ex.model)[::-1]
    if not layers:
        raise UserError(f"--sanity=model_randomization: {ex.model.name} has no layer with a "
                        "kernel to randomise")
    original = explain(ex, images, classes)
    cascading, alone, shown = [], [], []
    for j in range(1, len(layers) + 1):
        with randomized([layer for _, layer in layers[:j]], seed):
            maps = explain(ex, images, classes)
        cascading.append(_compare(original, maps))
        shown.append(maps[:keep_maps])
    for j, (_, layer) in enumerate(layers if independent else []):
        with randomized([layer], seed + 1 + j):
            alone.append(_compare(original, explain(ex, images, classes)))
    return {"layers": [p for p, _ in layers], "cascading": cascading,
            "independent": alone, "pass_below": PASS_BELOW,
            "verdict": verdict(cascading[-1]),
            "maps": {"original": original[:keep_maps], "cascading": np.stack(shown, 0)}}


def other_classes(classes: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """A uniformly drawn class other than each image's own."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, num_classes, len(classes))
    return (np.asarray(classes) + shift) % num_classes


def random_logit(ex: Explainer, explain: Callable, images, classes, num_classes: int,
                 seed: int = 0) -> dict:
    """The map of a random other class against the original's; pass when Spearman is below
    PASS_BELOW."""
    original = explain(ex, images, classes)
    others = other_classes(classes, num_classes, seed)
    out = _compare(original, explain(ex, images, others))
    out["other_classes"] = others.tolist()
    out["verdict"] = verdict(out)
    return out


def without_maps(result: dict) -> dict:
    """`result` without its arrays, for the JSON."""
    return {k: v for k, v in result.items() if k != "maps"}
