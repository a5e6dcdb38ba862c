"""The comparison logic of research.benchmarks.explain_vs_quantus (its flag-free
research.benchmarks.quantus_compare), without Quantus or torch: that it says NO when the two
sides differ, that Quantus is handed our removal order, and that its channel-entry indices
become the pixels ours removes."""

import numpy as np

from research.benchmarks import quantus_compare as q
from research.explain import faithfulness


def test_agreement_within_and_beyond_the_noise():
    ours = np.array([[0.9, 0.6, 0.2], [0.8, 0.5, 0.1]])     # seed spread 0.1
    near = ours + 0.15                                       # <= 2 x 0.1 + FLOOR
    far = ours + np.array([0.0, 0.0, 0.4])                   # one point far off
    assert q.agreement(ours, near)["within"]
    res = q.agreement(ours, far)
    assert not res["within"] and abs(res["gap"] - 0.4) < 1e-9
    assert abs(res["noise"] - 0.1) < 1e-9
    rows = q.table([{"method": "m", "measure": "x", "agreement": q.agreement(ours, near),
                     "verdicts": ("pass", "fail")}])
    assert rows[-1].count("| NO |") == 1                     # verdicts differ: NO
    try:
        q.agreement(ours, ours[:, :2])
    except ValueError:
        pass
    else:
        raise AssertionError("curves of different lengths compared")


def test_verdicts():
    assert q.mprt_verdict([0.9, 0.4], 0.5) == "pass"
    assert q.mprt_verdict([0.9, 0.7], 0.5) == "fail"
    assert q.road_verdict([0.2, 0.1], [0.9, 0.8]) == "pass"
    assert q.road_verdict([0.9, 0.8], [0.2, 0.1]) == "fail"
    x, bad = q.nan_as_zero([0.5, np.nan])
    assert bad == 1 and x.tolist() == [0.5, 0.0]


def _quantus_removed(ranks, p):
    """Quantus' ROAD (0.6.0) selection: a (C, H, W) attribution, argsort(-a) of the flat
    entries, the first int(a.size * p / 100), then our whole_pixels."""
    c, h, w = ranks.shape
    idx = np.argsort(-ranks.reshape(-1))[:int(ranks.size * p / 100)]
    return set(q.whole_pixels(idx, c, h * w).tolist())


def test_quantus_is_handed_our_removal_order():
    rng = np.random.default_rng(0)
    maps = rng.uniform(size=(2, 8, 8))
    maps[:, :3] = 0.0                                        # ties, broken as ours breaks them
    for least in (False, True):
        ranks = q.rank_maps(maps, least)
        for i in range(2):
            keeps = faithfulness.road_keeps(maps[i], [0.3, 0.5])
            for j, p in enumerate((30, 50)):
                removed = set(np.flatnonzero(keeps[j + (2 if least else 0)] == 0).tolist())
                assert _quantus_removed(np.repeat(ranks[i][None], 3, 0), p) == removed


def test_whole_pixels():
    # (3, 2, 2): entries 1, 5 and 9 are pixel 1's channels; 6 is pixel 2's
    assert q.whole_pixels([5, 1, 9, 6], 3, 4).tolist() == [1, 2]
    try:
        q.whole_pixels([12], 3, 4)
    except ValueError:
        pass
    else:
        raise AssertionError("an index outside the array accepted")
