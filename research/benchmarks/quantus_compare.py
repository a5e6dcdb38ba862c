"""The comparison of research.benchmarks.explain_vs_quantus, flag-free (numpy only), so that
tests/benchmarks/test_explain_vs_quantus.py imports it beside other benchmark apps without
their absl flags colliding, and the reference side (a venv without TensorFlow) imports it too.
"""
from __future__ import annotations

import numpy as np

FLOOR = 0.02  # of Spearman or accuracy: float32 differences between TF and torch maps


def agreement(ours: np.ndarray, theirs: np.ndarray, floor: float = FLOOR) -> dict:
    """`ours`, `theirs`: (seeds, points) curves, one row per seed. The seed means, the noise
    (largest spread between two seeds of one side, per point), the largest gap of the means
    and whether every gap is within 2 x noise + floor."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape[1:] != theirs.shape[1:]:
        raise ValueError(f"the curves have {ours.shape[1]} and {theirs.shape[1]} points")
    a, b = ours.mean(0), theirs.mean(0)
    noise = np.maximum(np.ptp(ours, 0), np.ptp(theirs, 0))
    gap = np.abs(a - b)
    return {"ours": a, "theirs": b, "noise": float(noise.max()), "gap": float(gap.max()),
            "within": bool(np.all(gap <= 2 * noise + floor))}


def mprt_verdict(curve, pass_below: float) -> str:
    """sanity.model_randomization's verdict on a cascading Spearman curve."""
    return "pass" if curve[-1] < pass_below else "fail"


def road_verdict(morf, lerf) -> str:
    """A map passes ROAD when removing its most relevant pixels hurts more than removing its
    least relevant ones (mean MoRF below mean LeRF)."""
    return "pass" if np.mean(morf) < np.mean(lerf) else "fail"


def rank_maps(maps: np.ndarray, least_first: bool = False) -> np.ndarray:
    """(N, H, W): each pixel's rank in faithfulness.road_keeps' order (the stable descending
    argsort), highest for the pixel removed first (MoRF, or LeRF with `least_first`)."""
    n, h, w = maps.shape
    out = np.empty((n, h * w), np.float64)
    for i, m in enumerate(maps.reshape(n, -1)):
        order = np.argsort(-m, kind="stable")
        if least_first:
            order = order[::-1]
        out[i, order] = np.arange(h * w, 0, -1)
    return out.reshape(n, h, w)


def whole_pixels(indices, channels: int, pixels: int) -> np.ndarray:
    """Flat indices into a (channels, H, W) array -> the pixels (flat into H x W) any of whose
    channel entries they name, in order of first mention."""
    indices = np.asarray(indices).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= channels * pixels):
        raise ValueError(f"an index outside {channels} x {pixels}")
    p = indices % pixels
    _, first = np.unique(p, return_index=True)
    return p[np.sort(first)]


def nan_as_zero(x) -> tuple[np.ndarray, int]:
    x = np.asarray(x, np.float64)
    bad = int(np.isnan(x).sum())
    return np.nan_to_num(x, nan=0.0), bad


def curve(values) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def table(rows: list[dict]) -> list[str]:
    """The markdown table: per method, the MPRT cascade and ROAD's MoRF and LeRF curves."""
    out = ["| method | measure | ours (mean of seeds) | Quantus (mean of seeds) | noise | "
           "largest gap | verdict ours / Quantus | within noise | Quantus' own randomisation |",
           "|---|---|---|---|---:|---:|---|---|---|"]
    for r in rows:
        ag = r["agreement"]
        out.append(f"| {r['method']} | {r['measure']} | {curve(ag['ours'])} | "
                   f"{curve(ag['theirs'])} | {ag['noise']:.3f} | {ag['gap']:.3f} | "
                   f"{r['verdicts'][0]} / {r['verdicts'][1]} | "
                   f"{'yes' if ag['within'] and r['verdicts'][0] == r['verdicts'][1] else 'NO'}"
                   f" | {r.get('default', '')} |")
    return out
