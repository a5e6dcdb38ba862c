"""predict: input expansion, batched scoring against a per-image oracle, TTA per metadata, the
CSV and the standard-output lines, bad input, and loading an export in a fresh process."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import cv2
import keras
import numpy as np
import pytest

import helpers
import warm
from research import detector, inference, runs
from research.data.imaging import load_image_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINE = re.compile(r"^(?P<path>[^\t]+)\tp\(cat\)=(?P<score>[01]\.\d{4})\t(?P<decision>(not )?cat)$")


def write_image(path, h, w, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """7 readable images of assorted sizes and one corrupt .jpg, as a folder."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(7):
        write_image(os.path.join(root, "cats" if i % 2 else "dogs", f"p{i}.jpg" if i % 3 else
                                 f"p{i}.png"), 30 + 9 * i, 60 - 4 * i, seed=i)
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {"tta": helpers.tiny_export(str(root / "tta"), tta=True),
            "plain": helpers.tiny_export(str(root / "plain"), tta=False),
            "binary": helpers.tiny_export(str(root / "binary"), objective="binary")}


def oracle(model, meta, path):
    """One image at a time, in numpy: p(cat), mirror-averaged when the metadata says so."""
    x = load_image_file(path, (32, 32)).astype(np.float32)[None] / 255.0
    views = [x, x[:, :, ::-1]] if meta["tta"] else [x]
    ps = []
    for v in views:
        z = np.asarray(model(v, training=False), np.float64)[0]
        if meta["objective"] == "binary":
            ps.append(1 / (1 + np.exp(-z[0])))
        else:
            e = np.exp(z - z.max())
            ps.append(e[meta["positive_class_id"]] / e.sum())
    return float(np.mean(ps))


def test_expand_files_folders_globs(tmp_path):
    for rel in ("a/x.jpg", "a/sub/y.png", "a/.hidden.jpg", "b.jpg", "c/z.JPG"):
        write_image(tmp_path / rel, 8, 8, seed=0)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    t = str(tmp_path)
    got = inference.expand_images([f"{t}/b.jpg", f"{t}/a", f"{t}/a/**/*.png", f"{t}/b.jpg",
                                   f"{t}/c/*", ""])
    # Folders: sorted by relative path; the first mention of a file wins.
    assert got.paths == [f"{t}/b.jpg", f"{t}/a/sub/y.png", f"{t}/a/x.jpg", f"{t}/c/z.JPG"]
    reasons = {os.path.relpath(p, t): r for p, r in got.skipped}
    assert reasons == {"a/.hidden.jpg": "hidden file", "a/notes.txt": "not an image file "
                       "extension", "a/sub/y.png": f"duplicate of {t}/a/sub/y.png",
                       "b.jpg": f"duplicate of {t}/b.jpg"}
    # `**` matches a folder and its files: no duplicates reported within the one entry.
    every = inference.expand_images([f"{t}/**"])
    assert sorted(every.paths) == sorted(got.paths)
    assert not [r for _, r in every.skipped if r.startswith("duplicate")]
    for entries, message in (([f"{t}/nope.jpg"], "no such file or folder"),
                             ([f"{t}/*.gif"], "matches no files"),
                             ([f"{t}/a/sub", f"{t}/empty/"], "no such file")):
        with pytest.raises(inference.InferenceError, match=message):
            inference.expand_images(entries)
    os.makedirs(tmp_path / "texts")
    (tmp_path / "texts" / "readme.md").write_text("x")
    with pytest.raises(inference.InferenceError, match=r"holds no image files \(1 other"):
        inference.expand_images([f"{t}/texts"])


def test_a_folder_that_cannot_be_listed_is_skipped_and_says_why(tmp_path, monkeypatch):
    for rel in ("a/x.jpg", "a/locked/y.jpg"):
        write_image(tmp_path / rel, 8, 8, seed=0)
    locked = str(tmp_path / "a" / "locked")
    helpers.refuse_listing(monkeypatch, locked)
    got = inference.expand_images([str(tmp_path / "a")])
    assert got.paths == [str(tmp_path / "a" / "x.jpg")]
    assert got.skipped == [(locked, "folder cannot be listed (Permission denied)")]


@pytest.mark.parametrize("kind", ["tta", "plain", "binary"])
def test_batched_scores_equal_one_at_a_time(models, photos, kind):
    det = detector.load_detector(models[kind])
    paths = inference.expand_images([str(photos)]).paths
    # Batches of 3 over 8 files: several batches in flight, a partial last one, a corrupt file.
    preds = list(inference.predict_files(det, paths, inference.PredictOptions(batch_size=3)))
    assert [p.path for p in preds] == paths
    bad = [p for p in preds if p.error]
    assert [os.path.basename(p.path) for p in bad] == ["broken.jpg"]
    assert bad[0].score is None and "not a decodable image" in bad[0].error
    for p in preds:
        if p.error is None:
            assert abs(p.score - oracle(det.model, det.meta, p.path)) < 1e-6, p.path
            assert p.decision == ("cat" if p.score >= 0.1 else "not cat")
            if kind == "binary":
                assert p.top_classes == ()
            else:
                assert len(p.top_classes) == 3
                probs = [q for _, q in p.top_classes]
                assert probs == sorted(probs, reverse=True)
                assert {n for n, _ in p.top_classes} <= set(helpers.CIFAR10_CLASSES)


def test_tta_follows_the_metadata(models, photos):
    paths = [p for p in inference.expand_images([str(photos)]).paths if "broken" not in p]
    scores = {}
    for kind in ("tta", "plain"):
        det = detector.load_detector(models[kind])
        scores[kind] = np.array([p.score for p in inference.predict_files(det, paths)])
    # Same weights (same seed), so only the mirror average separates them.
    assert np.max(np.abs(scores["tta"] - scores["plain"]) / scores["plain"]) > 0.05


def test_csv_and_stdout_lines(models, photos):
    det = detector.load_detector(models["tta"])
    paths = inference.expand_images([str(photos)]).paths
    scores = sorted(p.score for p in inference.predict_files(det, paths) if p.error is None)
    threshold = (scores[3] + scores[4]) / 2  # both decisions occur, none at the threshold
    opts = inference.PredictOptions(batch_size=4, top_k=2, threshold=threshold)
    out, table = io.StringIO(), io.StringIO()
    counts = inference.write_predictions(inference.predict_files(det, paths, opts), "cat", out,
                                         table)
    assert (counts.scored, counts.unreadable) == (7, 1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 8
    rows = list(csv.DictReader(io.StringIO(table.getvalue())))
    assert list(rows[0]) == list(inference.CSV_COLUMNS) and len(rows) == 8
    for line, row, path in zip(lines, rows, paths):
        assert row["path"] == path
        if row["error"]:
            assert line == f"{path}\terror: {row['error']}"
            assert row["score"] == row["decision"] == row["top_classes"] == ""
            continue
        m = LINE.match(line)
        assert m and m["path"] == path, line
        assert abs(float(m["score"]) - float(row["score"])) <= 5e-5
        assert m["decision"] == row["decision"] == ("cat" if float(row["score"]) >= threshold
                                                    else "not cat")
        assert re.fullmatch(r"[a-z]+:0\.\d{4};[a-z]+:0\.\d{4}", row["top_classes"])
    assert {r["decision"] for r in rows} == {"cat", "not cat", ""}


def test_bad_input_is_named(models, tmp_path):
    for opts, flag in ((inference.PredictOptions(batch_size=0), "--batch_size"),
                       (inference.PredictOptions(top_k=-1), "--top_k"),
                       (inference.PredictOptions(threshold=1.5), "--threshold"),
                       (inference.PredictOptions(decode_threads=0), "--decode_threads")):
        with pytest.raises(inference.InferenceError, match=flag):
            opts.validate()
    with pytest.raises(inference.InferenceError, match="--images: no files"):
        inference.expand_images(["", ""])
    with pytest.raises(inference.InferenceError, match="--output: want a .csv"):
        inference.check_output(str(tmp_path / "out.txt"))
    with pytest.raises(runs.RunError, match="--model: no such file"):
        runs.read_metadata(str(tmp_path / "model.keras"))
    meta = json.load(open(os.path.join(os.path.dirname(models["binary"]), "metadata.json")))
    del meta["tta"]
    bad = tmp_path / "bad"
    bad.mkdir()
    os.link(models["binary"], bad / "model.keras")
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(runs.RunError, match="lacks tta"):
        runs.read_metadata(str(bad / "model.keras"))
    meta.update(tta=False, objective="multiclass")  # a 1-output model cannot be multiclass
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(runs.RunError, match="outputs 1 values"):
        detector.load_detector(str(bad / "model.keras"))


@pytest.mark.slow
def test_cli_folder_glob_and_a_corrupt_file(models, photos, tmp_path):
    ck = tmp_path / "checkpoints"
    os.makedirs(ck / "run" / "export")
    for name in ("model.keras", "metadata.json"):
        os.link(os.path.join(os.path.dirname(models["tta"]), name), ck / "run" / "export" / name)
    out = tmp_path / "scores.csv"
    res = warm.run(
        [sys.executable, "-m", "research.apps.predict", "--run_name=run",
         f"--checkpoint_dir={ck}", f"--images={photos}/dogs,{photos}/cats/*.jpg",
         f"--output={out}", "--batch_size=2"],
        timeout=120, cwd=ROOT)
    assert res.returncode == 1, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    n = len(os.listdir(photos / "dogs")) + len(list((photos / "cats").glob("*.jpg")))
    assert len(lines) == n == 7
    assert sum(bool(LINE.match(line)) for line in lines) == 6
    assert [line for line in lines if "\terror: " in line][0].startswith(f"{photos}/dogs/broken")
    assert f"scored 6, unreadable 1: listed in {out}" in res.stderr
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 7 and sum(bool(r["error"]) for r in rows) == 1


@pytest.mark.slow
def test_export_loads_after_one_import(models):
    code = ("import keras, research.models; "
            f"m = keras.models.load_model({models['tta']!r}); print(m.output_shape)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("(None, 10)")


@pytest.mark.slow
def test_predict_and_explain_give_the_same_score_for_a_photo(models, photos, tmp_path):
    """One preprocessing: the run's resize policy (centre crop) and mirror averaging in both;
    predict names its threshold and where it comes from."""
    ck = tmp_path / "checkpoints"
    os.makedirs(ck / "run" / "export")
    for name in ("model.keras", "metadata.json"):
        os.link(os.path.join(os.path.dirname(models["tta"]), name), ck / "run" / "export" / name)
    photo = str(photos / "dogs" / "p0.png")  # 30 x 60: the crop and a stretch differ
    common = ["--run_name=run", f"--checkpoint_dir={ck}", f"--images={photo}"]
    pred = warm.run([sys.executable, "-m", "research.apps.predict", *common],
                    timeout=120, cwd=ROOT)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert "threshold 0.1000 (the run's, chosen on val by f1 (metadata.json))" in pred.stderr
    expl = warm.run([sys.executable, "-m", "research.apps.explain", *common,
                     "--method=gradcam", f"--out_dir={tmp_path / 'explain'}"],
                    timeout=180, cwd=ROOT)
    assert expl.returncode == 0, expl.stderr[-3000:]
    score = LINE.match(pred.stdout.splitlines()[0])["score"]
    assert f"p0.png: p(cat)={score} (as predict)" in expl.stdout, (pred.stdout, expl.stdout)
    model = keras.models.load_model(models["tta"])
    assert abs(float(score) - oracle(model, json.load(open(os.path.join(
        os.path.dirname(models["tta"]), "metadata.json"))), photo)) < 1e-4
