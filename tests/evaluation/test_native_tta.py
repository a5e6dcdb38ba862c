"""Test-time augmentation at the photo's native aspect: the windows' geometry, the score as
the mean over windows, evaluate on windows read from the original photos (the centre window
gives the plain score), predict's windows, and bad input (one line naming flag or file)."""

import json
import os
import sys
import tarfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import helpers
import warm
from helpers import LOG_LINE
from research import detector, runs
from research.data import imaging, pipeline, sources, tfrecords
from research.evaluation import native as native_tta
from research.evaluation import report as reporting
from research.evaluation import run as evaluation
from research.evaluation.native import NativeTTA, NativeTTAError
from research.inference import InferenceError, PredictOptions, predict_files, views_meta
from research.training import loop
from research.training.config import TrainConfig, load_run_config
from research.training.evaluator import Evaluator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16
# (height, width) of the photos: wide, tall, square, and already at the size.
SHAPES = [(30, 45), (45, 30), (40, 64), (24, 24), (SIZE, SIZE)]


def test_windows_geometry():
    rng = np.random.default_rng(0)
    for h, w in [*SHAPES, (17, 90), (90, 17), (5, 7)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        centre = imaging.resize_image(img, (SIZE, SIZE), "center_crop")
        scaled = imaging.cover_scaled(img, (SIZE, SIZE))
        assert min(scaled.shape[:2]) == SIZE
        for k in (1, 2, 3, 4, 5):
            win = imaging.native_windows(img, (SIZE, SIZE), k)
            assert win.shape == (k, SIZE, SIZE, 3)
            if k % 2:  # the middle window is center_crop's crop, bit for bit
                np.testing.assert_array_equal(win[k // 2], centre)
            if k > 1:  # first and last reach the two ends of the long side
                tall = scaled.shape[0] > scaled.shape[1]
                first = scaled[:SIZE, (scaled.shape[1] - SIZE) // 2:][:, :SIZE] if tall \
                    else scaled[(scaled.shape[0] - SIZE) // 2:][:SIZE, :SIZE]
                last = scaled[-SIZE:, (scaled.shape[1] - SIZE) // 2:][:, :SIZE] if tall \
                    else scaled[(scaled.shape[0] - SIZE) // 2:][:SIZE, -SIZE:]
                np.testing.assert_array_equal(win[0], first)
                np.testing.assert_array_equal(win[-1], last)
    assert imaging.window_offsets(100, 64, 3) == [0, 18, 36]
    assert imaging.window_offsets(101, 64, 3) == [0, 18, 37]  # middle: (101 - 64) // 2
    with pytest.raises(ValueError, match="k must be >= 1"):
        imaging.native_windows(np.zeros((4, 4, 3), np.uint8), (2, 2), 0)


def test_window_scores_are_the_mean_of_each_window():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    images = tf.random.uniform((3, 4, 8, 8, 3), seed=1)
    for objective, pid in (("binary", 0), ("multiclass", 1)):
        for tta, shifts in ((False, False), (True, False), (True, True)):
            scores, logits = detector.detector_scores(model, images, objective, pid, tta, shifts)
            per = [detector.detector_scores(model, images[:, j], objective, pid, tta, shifts)
                   for j in range(4)]
            np.testing.assert_allclose(scores, np.mean([s for s, _ in per], 0), atol=1e-6)
            np.testing.assert_allclose(logits, np.mean([z for _, z in per], 0), atol=1e-6)
    assert detector.tta_mode(False) == "none" and detector.tta_mode(True) == "flip"
    assert detector.tta_mode(True, True) == "flip_shifts"
    assert detector.tta_mode(False, False, 3) == "native3"
    assert detector.tta_mode(True, True, 3) == "native3_flip_shifts"


def write_photos(folder, seed=0, fmt="PNG"):
    """cat.<i> and dog.<i>, 10 each, at the SHAPES in turn (class-coloured noise, so the
    tiny run learns something and its windows score differently)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for c, tint in (("cat", (60, 0, 0)), ("dog", (0, 0, 60))):
        for i in range(10):
            h, w = SHAPES[i % len(SHAPES)]
            img = np.clip(rng.integers(0, 196, (h, w, 3)) + tint, 0, 255).astype(np.uint8)
            ext = "png" if fmt == "PNG" else "jpg"
            Image.fromarray(img).save(os.path.join(folder, f"{c}.{i}.{ext}"), fmt)


def make_tar(folder, path):
    with tarfile.open(path, "w") as tar:
        tar.add(folder, arcname="photos")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config of a tiny binary run trained on the photos, the photo tar)."""
    root = tmp_path_factory.mktemp("native")
    write_photos(str(root / "photos"))
    tar = make_tar(str(root / "photos"), str(root / "photos.tar"))
    data = str(root / "data")
    helpers.write_tfrecords(tar, data, load={"image_size": (SIZE, SIZE)}, positive_class="cat",
                            split_counts=(4, 3, 3))
    ck = str(root / "ck")
    loop.train_and_evaluate(TrainConfig(
        data_dir=data, run_name="nat", objective="binary", checkpoint_dir=ck,
        log_dir=str(root / "logs"), model_options=dict(helpers.TINY_NET), batch_size=8,
        eval_batch_size=6, train_steps=6, steps_per_loop=6, eval_every_steps=6,
        learning_rate=0.03, progress=False, precision="float32", gradcam_images=0))
    return load_run_config(ck, "nat"), tar


@pytest.fixture(scope="module")
def scored(run, tmp_path_factory):
    """The run on test: (report, raw) plain, then (report, raw) on 3 native windows, saved
    (report in <tmp>/eval.json)."""
    cfg, _ = run
    out = str(tmp_path_factory.mktemp("scored") / "eval.json")
    plain = evaluation.evaluate_run(cfg, "test", progress=False)
    windows = evaluation.evaluate_and_save(cfg, "test", output=out, figures=False,
                                           progress=False, tb_dir=None, native=NativeTTA(3))
    return plain, windows, out


def test_centre_window_reproduces_the_plain_score(run, scored):
    """K=1 windows cut again from the original photos score as the stored records do."""
    cfg, tar = run
    (plain, _), _, _ = scored
    path = evaluation.checkpoints.resolve_checkpoint(cfg.run_dir, "best")
    model, manifest, strategy = evaluation.restore_for_eval(cfg, path)
    ev = Evaluator(cfg, strategy, model, cfg.positive_id(manifest))
    want = ev.evaluate("test")
    got, checked = native_tta.evaluate_windows(ev, "test", NativeTTA(1), tar)
    np.testing.assert_array_equal(got.index, want.index)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    assert checked == {"photos": 6, "identical": 6, "max_difference": 0}
    assert plain["tta_mode"] == "flip" and plain["tta_windows"] == 1


def test_evaluate_native_windows(run, scored):
    cfg, tar = run
    (plain, plain_raw), (report, raw), out = scored
    assert report["tta_windows"] == 3 and report["tta_mode"] == "native3_flip"
    assert report["native_windows"]["photo_source"] == tar  # the manifest's source
    assert report["native_windows"]["centre_check"] == {
        s: {"photos": 6, "identical": 6, "max_difference": 0} for s in ("val", "test")}
    assert report["num_examples"] == plain["num_examples"] == 6
    np.testing.assert_array_equal(raw["index"], plain_raw["index"])
    assert 0 <= report["threshold"] <= 1 and "at_0.5" in report
    # Windows see more of the non-square photos: their scores move; the square ones' do not.
    ids = pipeline.read_source_ids(cfg.data_dir, "test")
    square = np.array([Image.open(tarfile.open(tar).extractfile("photos/" + ids[i])).size[0]
                       == Image.open(tarfile.open(tar).extractfile("photos/" + ids[i])).size[1]
                       for i in raw["index"]])
    moved = np.abs(raw["scores"] - plain_raw["scores"]) > 1e-6
    assert moved[~square].any() and not moved[square].any()
    saved = json.load(open(out))
    assert saved["tta_mode"] == "native3_flip"
    text = reporting.format_report(report)
    assert "test-time views: native3_flip (3 square windows" in text
    assert "identical to the record for 6 of 6 photos" in text
    assert runs.eval_report_path("r", "test", "native3_flip") == "r/eval_test_native3_flip.json"


def test_reduced_decoding_windows_match_the_records(tmp_path):
    """Data made with --reduced_decode: the windows are decoded the same reduced way."""
    write_photos(str(tmp_path / "p"), fmt="JPEG")
    for name in os.listdir(tmp_path / "p"):  # large enough for libjpeg's 1/2 decoding
        img = Image.open(tmp_path / "p" / name)
        img.resize((img.size[0] * 3, img.size[1] * 3)).save(tmp_path / "p" / name, "JPEG")
    data = sources.load_source(str(tmp_path / "p"), image_size=(SIZE, SIZE),
                               reduced_decode=True)
    out = str(tmp_path / "d")
    tfrecords.write_tfrecords(data, tfrecords.WriteConfig(out, positive_class="cat",
                                                          split_counts=(4, 3, 3)),
                              str(tmp_path / "p"), {"reduced_decode": True})
    cfg = TrainConfig(data_dir=out, eval_batch_size=6)
    checked = {}
    ds, expected = native_tta.native_eval_dataset(cfg, "test", NativeTTA(2),
                                                  str(tmp_path / "p"), checked)
    batches = list(ds)
    assert sum(len(b["index"]) for b in batches) == len(expected) == 6
    assert batches[0]["image"].shape[1:] == (2, SIZE, SIZE, 3)
    assert checked == {"photos": 6, "identical": 6, "max_difference": 0}


def test_bad_input_is_one_line(run, tmp_path):
    cfg, tar = run
    manifest = pipeline.load_manifest(cfg.data_dir)
    with pytest.raises(NativeTTAError, match="--photo_source: only read with --tta_windows"):
        NativeTTA(1, tar).validate()
    with pytest.raises(NativeTTAError, match="--tta_windows: must be >= 1"):
        NativeTTA(0).validate()
    with pytest.raises(NativeTTAError, match=r"--photo_source=/no/such\.tar: no such file"):
        native_tta.resolve_source(manifest, cfg.data_dir, NativeTTA(3, "/no/such.tar"), "none")
    moved = {**manifest, "source": str(tmp_path / "gone.tar")}
    with pytest.raises(NativeTTAError, match=r"gone\.tar \(the source in .*manifest\.json\), "
                       r"are not there; pass --photo_source="):
        native_tta.resolve_source(moved, cfg.data_dir, NativeTTA(3), "none")
    stretched = {**manifest, "flags": {"resize_policy": "stretch"}}
    with pytest.raises(NativeTTAError, match="--resize_policy=stretch"):
        native_tta.resolve_source(stretched, cfg.data_dir, NativeTTA(3), "none")
    with pytest.raises(NativeTTAError, match="--transfer=features"):
        native_tta.resolve_source(manifest, cfg.data_dir, NativeTTA(3), "features")
    arrays = str(tmp_path / "syn")
    helpers.make_synthetic_tfrecords(arrays, n_train=100, n_test=20)
    with pytest.raises(NativeTTAError, match="--tta_windows=3: .*syn was made from synthetic "
                       r"\(synthetic\), arrays of images .* not photos"):
        native_tta.resolve_source(pipeline.load_manifest(arrays), arrays, NativeTTA(3), "none")
    # Other photos under the same names: named, before any score is reported.
    write_photos(str(tmp_path / "other"), seed=5)
    other = make_tar(str(tmp_path / "other"), str(tmp_path / "other.tar"))
    with pytest.raises(NativeTTAError, match=r"other\.tar:photos/\w+\.\d\.png is not the photo "
                       "example"):
        evaluation.evaluate_run(cfg, "test", progress=False, native=NativeTTA(3, other))
    # Photos missing from the source.
    os.remove(tmp_path / "other" / "cat.0.png")
    for i in range(10):
        os.remove(tmp_path / "other" / f"dog.{i}.png")
    with pytest.raises(NativeTTAError, match="are not in it"):
        evaluation.evaluate_run(cfg, "test", progress=False,
                                native=NativeTTA(3, str(tmp_path / "other")))


def test_predict_windows(run, scored, tmp_path):
    """predict --tta_windows scores a photo as evaluate's windows do; --tta overrides the
    mirror; a stretch model refuses windows."""
    cfg, tar = run
    _, (report, raw), _ = scored
    with tarfile.open(tar) as t:
        t.extractall(tmp_path, filter="data")
    ids = pipeline.read_source_ids(cfg.data_dir, "test")
    paths = [str(tmp_path / "photos" / ids[i]) for i in raw["index"]]
    model_path = runs.exported_model_path(cfg.checkpoint_dir, cfg.run_name)
    meta = runs.read_metadata(model_path, "--model")
    det = detector.load_detector(model_path, meta)
    got = [p.score for p in predict_files(det, paths, PredictOptions(tta_windows=3))]
    np.testing.assert_allclose(got, raw["scores"], atol=1e-5)
    assert views_meta(meta, PredictOptions(tta=False))["tta"] is False
    assert views_meta(meta, PredictOptions()) is meta
    with pytest.raises(InferenceError, match="--tta_windows=3: .*--resize_policy=stretch"):
        views_meta({**meta, "resize_policy": "stretch"}, PredictOptions(tta_windows=3))


def test_evaluate_app_bad_input_is_one_line(run):
    """Through the app: one line naming the flag, exit 1, no report written."""
    cfg, _ = run
    base = [sys.executable, "-m", "research.apps.evaluate", "--run_name=nat",
            f"--checkpoint_dir={cfg.checkpoint_dir}", f"--log_dir={cfg.log_dir}"]
    for extra, line in (
            (["--photo_source=/no/such.tar"], "error: --photo_source: only read with "
             "--tta_windows=K (K > 1, windows of the original photos); drop it or give "
             "--tta_windows"),
            (["--tta_windows=3", "--photo_source=/no/such.tar"],
             "error: --photo_source=/no/such.tar: no such file or folder")):
        res = warm.run(base + extra, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"})
        lines = [x for x in res.stderr.splitlines() if x.strip() and not LOG_LINE.match(x)]
        assert res.returncode == 1 and lines == [line], res.stderr
    assert not os.path.exists(os.path.join(cfg.run_dir, "eval_test_native3_flip.json"))
