"""Sanity checks (research.explain.sanity): randomisation is restored, the measures match
their definitions, a saliency map fails to survive a random network while a map that ignores
the model passes it off, and the explain app's flags and files."""

import json
import sys

import cv2
import keras
import numpy as np
import pytest

import warm
from research.errors import UserError
from research.explain import core, methods, outputs, sanity
from research.explain.options import ExplainOptions
from test_explain import fake_run, images


def conv_net(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12, 12, 3))
    y = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(y)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(y))
    return keras.Model(x, out)


def test_spearman_and_ssim_follow_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (3, 12, 12))
    np.testing.assert_allclose(sanity.spearman(a, a), 1.0)
    np.testing.assert_allclose(sanity.spearman(a, 1 - a), -1.0)
    np.testing.assert_allclose(sanity.spearman(a, a ** 3), 1.0)  # ranks only
    # Ties: average ranks, as scipy.stats.rankdata.
    np.testing.assert_allclose(sanity.rankdata(np.array([3.0, 1.0, 3.0, 0.0])),
                               [3.5, 2.0, 3.5, 1.0])
    np.testing.assert_allclose(sanity.ssim(a, a), 1.0, atol=1e-6)
    b = rng.uniform(0, 1, (3, 12, 12))
    assert np.all(sanity.ssim(a, b) < 0.3)


def test_pearson_is_numpys_and_says_what_constant_maps_give():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 1, (2, 4, 6, 6))
    want = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    np.testing.assert_allclose(sanity.pearson(a, b), want, rtol=1e-12)
    flat, zero = np.full((1, 6, 6), 0.3), np.zeros((1, 6, 6))
    assert sanity.pearson(flat, zero)[0] == 1.0  # both constant: they agree
    assert sanity.pearson(flat, a[:1])[0] == 0.0  # one constant: no correlation
    with_nan = a[:1].copy()
    with_nan[0, 0, 0] = np.nan
    assert np.isfinite(sanity.pearson(with_nan, a[:1])[0])


def test_randomisation_is_cascading_and_restored():
    model = conv_net()
    before = [w.copy() for w in model.get_weights()]
    layers = sanity.kernel_layers(model)
    assert [p for p, _ in layers] == ["c1", "c2", "head"]
    with sanity.randomized([layers[-1][1]], seed=0):
        changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
        assert changed[:5] == [False, False, False, False, True]  # head's kernel only
        assert not np.any(model.get_weights()[5])  # its bias zeroed
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError):
        with sanity.randomized([layers[0][1]], seed=0):
            raise RuntimeError("interrupted")
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_map_that_ignores_the_model_fails_and_gradcam_passes():
    model = conv_net(1)
    ex = core.Explainer(model)
    x = images(4, 12, 12, 3, seed=2)
    classes = np.argmax(model(x), -1)

    def edges(ex_, imgs, cls):  # an "explanation" of the image alone, as an edge detector
        g = np.abs(np.diff(np.asarray(imgs).mean(-1), axis=1, append=0))
        return g / g.max(axis=(1, 2), keepdims=True)

    def gradcam(ex_, imgs, cls):
        return methods.explain(ex_, "gradcam", imgs, cls).maps

    bad = sanity.model_randomization(ex, edges, x, classes)
    assert bad["verdict"] == "fail" and bad["cascading"][-1]["spearman"] == pytest.approx(1.0)
    good = sanity.model_randomization(ex, gradcam, x, classes)
    assert len(good["cascading"]) == len(good["independent"]) == 3
    assert good["layers"] == ["head", "c2", "c1"]
    assert good["cascading"][-1]["spearman"] < 0.5 and good["verdict"] == "pass"
    assert sanity.model_randomization(ex, gradcam, x, classes, independent=False
                                      )["independent"] == []
    logit = sanity.random_logit(ex, gradcam, x, classes, 3)
    assert np.all(np.asarray(logit["other_classes"]) != classes)
    assert set(logit) >= {"spearman", "ssim", "verdict"}


def test_bad_requests_are_one_line_each():
    with pytest.raises(UserError, match="--sanity: 'nope'"):
        sanity.check_request(["nope"], ["gradcam"], 3)
    with pytest.raises(UserError, match="single output"):
        sanity.check_request(["random_logit"], ["gradcam"], 1)
    with pytest.raises(UserError, match="--method=eigencam"):
        sanity.check_request(["random_logit"], ["eigencam"], 3)
    sanity.check_request(["model_randomization"], ["eigencam"], 1)


@pytest.mark.slow
def test_sanity_outputs_and_bad_requests_to_the_app(tmp_path):
    ex = core.Explainer(conv_net(2))
    x = images(2, 12, 12, 3, seed=3)
    res = outputs.sanity_checks(ex, x, ["gradcam", "saliency"], sanity.CHECKS,
                                ExplainOptions(batch_size=1))  # per-image classes, sliced
    paths = outputs.sanity_figures(res, x[0], str(tmp_path), "tiny")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["sanity_maps.png", "sanity_curves.png"]
    saved = json.loads(open(outputs.save_sanity(res, str(tmp_path))).read())
    first = saved["gradcam"]["model_randomization"]["cascading"][0]
    assert first.keys() >= {"spearman", "ssim"}
    assert len(outputs.sanity_rows(res)) == 4
    run = fake_run(tmp_path / "ck")
    base = [sys.executable, "-m", "research.apps.explain", f"--run_name={run}",
            f"--checkpoint_dir={tmp_path / 'ck'}", "--precision=float32"]
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), np.full((12, 12, 3), 120, np.uint8))
    out = tmp_path / "out"
    r = warm.run(base + [f"--images={photo}", "--method=eigencam",
                         "--sanity=random_logit", f"--out_dir={out}"], timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "eigencam" in lines[0]
    # A model without a 4-D layer, asked for a CAM: one line naming the method.
    flat = tmp_path / "ck" / "flat" / "export"
    flat.mkdir(parents=True)
    x = keras.Input((32, 32, 3))
    y = keras.layers.Dense(10)(keras.layers.Flatten()(x))
    keras.Model(x, y).save(flat / "model.keras")
    (flat / "metadata.json").write_text((tmp_path / "ck" / run / "export" / "metadata.json"
                                         ).read_text())
    r = warm.run(base[:3] + ["--run_name=flat", *base[4:], f"--images={photo}",
                             "--method=layercam", f"--out_dir={out}"], timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "--method=layercam" in lines[0], r.stderr


def test_a_pass_by_an_empty_map_says_so():
    ref = images(3, 6, 6, 1, seed=4)[..., 0]
    vanished = np.zeros_like(ref)
    vanished[2] = ref[2][::-1]  # one map still has content, two are constant
    compared = sanity._compare(ref, vanished)
    assert compared["empty_maps"] == 2
    assert sanity.verdict(compared) == "pass (2 of 3 maps empty)"
    assert sanity.verdict(sanity._compare(ref, ref)) == "fail"
