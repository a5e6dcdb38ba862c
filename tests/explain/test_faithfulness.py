"""ROAD's noisy linear imputation against a transcription of road_evaluation's linear system,
and ROAD, MuFidelity and Average Drop / Increase in Confidence on a linear model whose true
attribution is known."""

import keras
import numpy as np

from research.explain import core, faithfulness

W12 = [((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
       ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6)]


def reference_impute(img, keep):
    """road_evaluation's NoisyLinearImputer without noise, dense: for each missing pixel,
    -sum_valid w x_i + sum_missing w x_j = -sum_known w v_j (img (C, H, W))."""
    c, h, w = img.shape
    flat_keep, flat = keep.ravel(), img.reshape(c, -1)
    unknown = np.flatnonzero(flat_keep == 0)
    index = {p: i for i, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), c))
    for i, p in enumerate(unknown):
        y, x = divmod(p, w)
        total = 0.0
        for (dy, dx), wt in W12:
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w):
                continue
            total += wt
            q = yy * w + xx
            if flat_keep[q] > 0.5:
                b[i] -= wt * flat[:, q]
            else:
                a[i, index[q]] = wt
        a[i, i] = -total
    out = flat.copy()
    out[:, unknown] = np.linalg.solve(a, b).T
    return out.reshape(c, h, w)


def test_linear_imputation_solves_road_evaluations_system():
    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 255, (2, 9, 11, 3))
    keep = (rng.uniform(size=(2, 9, 11)) > 0.6).astype(np.float64)
    keep[1, :5, :6] = 0  # a hole touching two edges
    got = faithfulness.linear_impute(imgs, keep)
    for i in range(2):
        want = reference_impute(imgs[i].transpose(2, 0, 1), keep[i]).transpose(1, 2, 0)
        np.testing.assert_allclose(got[i], want, atol=1e-3)  # of 0..255; the noise is 2.55
    np.testing.assert_array_equal(got[keep == 1], imgs[keep == 1])


def linear_model():
    """Two-class softmax on logits (+s, -s) with s = sum_c w . x_c / 6000 on 8x8x3 images:
    the true attribution of class 0 is w * sum_c x_c."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 3))
    y = keras.layers.Dense(2, use_bias=False)(keras.layers.Flatten()(x))
    model = keras.Model(x, y)
    w = np.zeros((8, 8))
    w[:4, :4] = 1.0  # only the top-left quadrant matters
    w = np.repeat(w[..., None], 3, -1).reshape(192, 1) / 6000
    model.layers[-1].set_weights([np.concatenate([w, -w], 1).astype(np.float32)])
    return core.Explainer(model, output="softmax"), w.reshape(8, 8, 3)[..., 0]


def explanation(maps, n=3):
    return core.Explanation(np.asarray(maps, np.float32), np.zeros(n, int), np.zeros(n),
                            np.zeros(n), "test", None, {})


def test_road_mufidelity_and_confidence_rank_the_true_map_first():
    ex, w = linear_model()
    x = np.random.default_rng(1).uniform(50, 255, (3, 8, 8, 3)).astype(np.float32)
    attr = w[None] * x.sum(-1)
    true = explanation(attr / attr.max(axis=(1, 2), keepdims=True))
    wrong = explanation(1.0 - true.maps)
    good, bad = (faithfulness.all_scores(ex, x, e, steps=4, mufidelity_samples=64)
                 for e in (true, wrong))
    assert good["road_morf"] < bad["road_morf"] and good["road_lerf"] > bad["road_lerf"]
    assert len(good["morf_curve"]) == len(faithfulness.ROAD_PERCENTAGES)
    # accuracy: class 0's score stays positive whatever is imputed (positive pixels), so it
    # stays the top class; class 1 never is
    assert good["morf_accuracy_curve"] == [1.0] * len(faithfulness.ROAD_PERCENTAGES)
    loser = core.Explanation(true.maps, np.ones(3, int), np.zeros(3), np.zeros(3), "test",
                             None, {})
    assert faithfulness.road(ex, x, loser)["lerf_accuracy_curve"] == [0.0] * len(
        faithfulness.ROAD_PERCENTAGES)
    assert good["mu_fidelity"] > 0.9 > bad["mu_fidelity"]
    assert good["average_drop"] < bad["average_drop"]
    ones = faithfulness.confidence_change(ex, x, explanation(np.ones((3, 8, 8))))
    assert ones == {"average_drop": 0.0, "increase_in_confidence": 0.0}
    assert {k for k, _, _ in faithfulness.SCORE_COLUMNS} <= set(good)


def test_faithfulness_table_columns_line_up_for_long_method_names():
    from research.explain import outputs
    keys = [k for k, _, _ in faithfulness.SCORE_COLUMNS]
    scores = {"gradcam": dict.fromkeys(keys, 0.5),
              "integrated_gradients": dict.fromkeys(keys, 123.25)}
    lines = outputs.faithfulness_table(scores, 2)
    body = lines[1:]  # the header's last column is followed by the image count
    assert len({len(line) for line in body}) == 1, body
    assert lines[3].split() == ["integrated_gradients"] + ["123.2500"] * len(keys)
