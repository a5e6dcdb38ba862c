"""make_tfrecords --split_counts=TRAIN,VAL,TEST: exact images per class in every split, on
tiny image folders made here (the Kaggle flat layout without a test split, class folders with
train/ and test/)."""

import json
import os
import sys

import numpy as np
import pytest

import helpers
import warm
from helpers import write_tfrecords as write
from research.data import pipeline, tfrecords


def flat_folder(root, cats=10, dogs=7):
    """Kaggle names, no test split: `cats` cat.<i>.jpg and `dogs` dog.<i>.jpg."""
    helpers.make_flat_folder(str(root), n_per_class=max(cats, dogs))
    for c, n in (("cat", cats), ("dog", dogs)):
        for i in range(n, max(cats, dogs)):
            os.remove(root / f"{c}.{i}.jpg")
    return root


def test_exact_counts_land_in_each_split_and_the_rest_is_left_out(tmp_path):
    src = flat_folder(tmp_path / "flat", cats=10, dogs=7)
    _, m = write(src, tmp_path / "out", positive_class="cat", split_counts=(3, 2, 2))
    for split, k in (("train", 3), ("val", 2), ("test", 2)):
        assert m["splits"][split]["class_counts"] == {"cat": k, "dog": k}, split
    assert m["split_counts"] == {"train": 3, "val": 2, "test": 2, "test_from": "train"}
    assert m["val_fraction"] is None and m["test_fraction"] is None  # replaced, not applied
    assert m["left_out"] == {"train": {"cat": 3, "dog": 0}}
    ids = {s: pipeline.read_source_ids(tmp_path / "out", s) for s in ("train", "val", "test")}
    used = [i for s in ids.values() for i in s]
    assert len(used) == len(set(used)) == 14  # no image in two splits
    table = tfrecords.summary_table(m)
    assert ("--split_counts=3,2,2: train 3 + val 2 + test 2 of every class cut from the "
            "source's images (seed 0; it has no test split)") in table
    assert "left out (in no split): cat 3, dog 0 of the source; 3 images in all" in table


def test_selection_is_seeded_stratified_and_train_first():
    ids = np.repeat(np.arange(3), [9, 6, 12])
    tr, va, te, rest = tfrecords.stratified_counts(ids, (4, 1, 1), 3, seed=5)
    for part, k in ((tr, 4), (va, 1), (te, 1)):
        assert np.bincount(ids[part], minlength=3).tolist() == [k, k, k]
    assert np.bincount(ids[rest], minlength=3).tolist() == [3, 0, 6]
    assert sorted(np.concatenate([tr, va, te, rest]).tolist()) == list(range(len(ids)))
    again = tfrecords.stratified_counts(ids, (4, 1, 1), 3, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(again, (tr, va, te, rest)))
    other = tfrecords.stratified_counts(ids, (4, 1, 1), 3, seed=6)
    assert not np.array_equal(other[0], tr)
    # Train is cut first: asking for other val and test counts leaves train as it was.
    assert np.array_equal(tfrecords.stratified_counts(ids, (4, 2, 0), 3, seed=5)[0], tr)


def test_impossible_count_names_the_class_and_its_count_before_writing(tmp_path):
    src = flat_folder(tmp_path / "flat", cats=10, dogs=7)
    with pytest.raises(ValueError) as e:
        write(src, tmp_path / "out", positive_class="cat", split_counts=(4, 2, 2))
    assert str(e.value) == ("--split_counts=4,2,2: class dog has 7 images, train + val + test "
                            "ask for 8")
    assert os.listdir(tmp_path) == ["flat"]  # no output, no temporary folder
    with pytest.raises(ValueError, match="three whole numbers >= 1"):
        tfrecords.check_split_counts((3, 0, 2))


def test_a_source_test_split_gives_the_test_count_train_gives_train_and_val(tmp_path):
    root = tmp_path / "imgs"
    helpers.make_class_folders(str(root))  # train: cat 9 (+1 corrupt), dog 6, frog 6; test: 3
    data, m = write(root, tmp_path / "out", split_counts=(4, 2, 2))
    for split, k in (("train", 4), ("val", 2), ("test", 2)):
        assert set(m["splits"][split]["class_counts"].values()) == {k}, split
    assert m["split_counts"]["test_from"] == "test"
    assert m["left_out"] == {"train": {"cat": 3, "dog": 0, "frog": 0},
                             "test": {"cat": 1, "dog": 1, "frog": 1}}
    assert all(i.startswith("test/") for i in pipeline.read_source_ids(tmp_path / "out", "test"))
    assert all(i.startswith("train/") for s in ("train", "val")
               for i in pipeline.read_source_ids(tmp_path / "out", s))
    table = tfrecords.summary_table(m)
    assert ("train 4 + val 2 of every class cut from the source's train split (seed 0), test "
            "2 from its own test split (seed 1)") in table
    assert ("left out (in no split): cat 3, dog 0, frog 0 of the source's train split; 1 of "
            "every class of the source's test split; 6 images in all") in table
    # Test never borrows from train: 4 test images per class is too many, though the train
    # split has them to spare.
    with pytest.raises(ValueError) as e:
        tfrecords.make_splits(data, tfrecords.WriteConfig("unused", split_counts=(1, 1, 4)))
    assert str(e.value) == (
        "--split_counts=1,1,4: class cat has 3 images in the source's test split, test asks "
        "for 4; class dog has 3 images in the source's test split, test asks for 4; class "
        "frog has 3 images in the source's test split, test asks for 4")


def run_app(*args):
    return warm.run([sys.executable, "-m", "research.apps.make_tfrecords", *args,
                     "--sample_grid=0"])


def test_cli_counts_print_what_was_cut_and_refuse_a_fraction_flag(tmp_path):
    src = flat_folder(tmp_path / "flat", cats=10, dogs=7)
    out = tmp_path / "out"
    res = run_app(f"--source={src}", f"--out_dir={out}", "--split_counts=5,1,1",
                  "--val_fraction=0.2")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines()[-1] == (
        "error: --split_counts and --val_fraction both given: --split_counts replaces "
        "--val_fraction and --test_fraction, give one or the other")
    assert "Reading" not in res.stderr and not out.exists()  # refused before any work
    res = run_app(f"--source={src}", f"--out_dir={out}", "--split_counts=5,1,1", "--seed=3")
    assert res.returncode == 0, res.stderr
    assert "--split_counts=5,1,1: train 5 + val 1 + test 1 of every class" in res.stdout
    assert "left out (in no split): cat 3, dog 0 of the source; 3 images in all" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["split_counts"]["train"] == 5 and m["flags"]["split_counts"] == ["5", "1", "1"]
    assert {s: v["num_examples"] for s, v in m["splits"].items()} == {
        "train": 10, "val": 2, "test": 2}
