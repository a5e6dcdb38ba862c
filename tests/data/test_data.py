"""Sources, TFRecord writing and the tf.data pipeline, on tiny fixtures made here."""

import io
import json
import os
import pickle
import sys
import tarfile
import threading
import weakref

import numpy as np
import pytest
import tensorflow as tf

import helpers
import warm
from helpers import write_tfrecords as write
from research.data import imaging, pipeline, sources, tfrecords


def read_raw(data_dir, split):
    """Every record of a split as {source_id: (image, label, class_id)} by direct parsing."""
    manifest = pipeline.load_manifest(str(data_dir))
    spec = {"image": tf.io.FixedLenFeature([], tf.string),
            "source_id": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "class_id": tf.io.FixedLenFeature([], tf.int64),
            "height": tf.io.FixedLenFeature([], tf.int64)}
    out = {}
    for path in pipeline.shard_paths(str(data_dir), manifest, split):
        for rec in tf.data.TFRecordDataset(path):
            f = tf.io.parse_single_example(rec, spec)
            img = np.frombuffer(f["image"].numpy(), np.uint8).reshape(manifest["image_shape"])
            out[f["source_id"].numpy().decode()] = (img, int(f["label"]), int(f["class_id"]))
    return out


def test_cifar10_python_round_trip_is_bit_identical(tmp_path):
    arrays = helpers.make_cifar10_python(tmp_path / "c10.tar.gz")
    data, manifest = write(tmp_path / "c10.tar.gz", tmp_path / "out", val_fraction=0.2)
    assert data.format == "cifar10-python"
    assert data.class_names == helpers.CIFAR10_CLASSES
    s = manifest["splits"]
    assert (s["train"]["num_examples"], s["val"]["num_examples"], s["test"]["num_examples"]) == (
        80, 20, 20)
    seen = 0
    for split in ("train", "val", "test"):
        for sid, (img, label, cid) in read_raw(tmp_path / "out", split).items():
            batch, i, _ = sid.split("/")
            want_img, want_labels = arrays[batch]
            np.testing.assert_array_equal(img, want_img[int(i)])
            assert cid == want_labels[int(i)]
            assert label == int(cid == 3)
            seen += 1
    assert seen == 120


def test_cifar10_binary_matches_python_layout(tmp_path):
    helpers.make_cifar10_binary(tmp_path / "bin.tar.gz")
    helpers.make_cifar10_python(tmp_path / "py.tar.gz")
    b = sources.load_source(str(tmp_path / "bin.tar.gz"))
    p = sources.load_source(str(tmp_path / "py.tar.gz"))
    assert b.format == "cifar10-binary" and b.class_names == p.class_names
    for split in ("train", "test"):
        np.testing.assert_array_equal(b.splits[split].images, p.splits[split].images)
        np.testing.assert_array_equal(b.splits[split].class_ids, p.splits[split].class_ids)


def test_cifar10_binary_bad_size_names_file(tmp_path):
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ["data_batch_1.bin", "test_batch.bin"]:
            data = b"\x00" * 3000
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(sources.SourceError, match="data_batch_1.bin.*not a multiple of 3073"):
        sources.load_source(str(path))


def test_cifar100_fine_and_coarse_labels(tmp_path):
    helpers.make_cifar100_python(tmp_path / "c100.tar.gz")
    with pytest.raises(ValueError, match="'cat' is not a class.*leopard"):
        write(tmp_path / "c100.tar.gz", tmp_path / "out")
    data, manifest = write(tmp_path / "c100.tar.gz", tmp_path / "out", positive_class="leopard",
                           val_fraction=0.25)
    assert len(manifest["class_names"]) == 100 and len(manifest["coarse_class_names"]) == 20
    np.testing.assert_array_equal(data.splits["train"].coarse_ids,
                                  data.splits["train"].class_ids // 5)
    assert manifest["splits"]["test"]["num_positive"] == sum(
        1 for i in range(400) if (i * 7) % 100 == 3)
    assert manifest["splits"]["val"]["num_examples"] == 100


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("batches.meta", "data_batch_1", "test_batch"):
            data = pickle.dumps(helpers.Evil(str(marker)), protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(sources.SourceError, match="refused to unpickle.*forbidden global"):
        sources.load_source(str(path))
    assert not marker.exists()


def test_tar_with_path_traversal_is_refused(tmp_path):
    path = tmp_path / "trav.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("../escaped.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    with pytest.raises(sources.UnsafeArchiveError, match="escaped.jpg.*path traversal"):
        sources.load_source(str(path))
    assert not (tmp_path.parent / "escaped.jpg").exists()


def test_class_folders_convert_modes_and_list_corrupt_files(tmp_path):
    root = tmp_path / "imgs"
    helpers.make_class_folders(str(root))
    for src in (root, helpers.tar_folder(str(root), str(tmp_path / "imgs.tar.gz"))):
        data = sources.load_source(str(src), image_size=(32, 32))
        assert data.class_names == ["cat", "dog", "frog"]
        train = data.splits["train"]
        assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
        # 6 pngs per class + gray, rgba, cmyk in cat; the corrupt file is listed, not dropped.
        assert len(train) == 3 * 6 + 3 and len(data.splits["test"]) == 9
        assert [os.path.basename(s["file"]) for s in data.skipped] == ["corrupt.jpg"]
        assert "not a decodable image" in data.skipped[0]["reason"]
        gray = train.images[train.source_ids.index("train/cat/gray.jpg")]
        np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    _, manifest = write(root, tmp_path / "out")
    assert manifest["skipped"][0]["file"].endswith("corrupt.jpg")
    assert sum(s["num_examples"] for s in manifest["splits"].values()) == 21 + 9


def test_decode_modes_match_rgb():
    from PIL import Image

    base = np.zeros((16, 16, 3), np.uint8)
    base[:8] = (200, 30, 30)
    base[8:] = (20, 180, 60)
    img = Image.fromarray(base)
    cmyk = imaging.decode_image(helpers.encode(img.convert("CMYK"), "JPEG"))
    assert np.abs(cmyk.astype(int) - base).max() <= 4
    rgba = np.dstack([base, np.full((16, 16), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # fully transparent pixel becomes white
    out = imaging.decode_image(helpers.encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[1:, 1:], base[1:, 1:])
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    pal = imaging.decode_image(helpers.encode(img.convert("P"), "PNG"))
    assert pal.shape == (16, 16, 3)
    with pytest.raises(imaging.ImageDecodeError, match="x.jpg"):
        imaging.decode_image(b"junk", "x.jpg")


def test_resize_policy():
    img = helpers.rgb(40, 80)
    assert imaging.resize_image(img, (40, 80)) is img
    out = imaging.resize_image(img, (20, 20))
    assert out.shape == (20, 20, 3)
    assert imaging.resize_image(img, (20, 20), "stretch").shape == (20, 20, 3)
    with pytest.raises(ValueError, match="resize policy"):
        imaging.resize_image(img, (20, 20), "squash")


def test_kaggle_flat_layout_carves_test_split(tmp_path):
    helpers.make_flat_folder(str(tmp_path / "flat"))
    (tmp_path / "flat" / "notes.txt").write_text("hi")
    data, manifest = write(tmp_path / "flat", tmp_path / "out", test_fraction=0.25,
                           val_fraction=0.2)
    assert data.class_names == ["cat", "dog"]
    assert data.skipped[0]["reason"] == "not an image file extension"
    s = manifest["splits"]
    assert s["test"]["class_counts"] == {"cat": 2, "dog": 2}
    assert s["val"]["class_counts"] == {"cat": 1, "dog": 1}
    assert s["train"]["num_examples"] == 10


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(sources.SourceError, match="no images found"):
        sources.load_source(str(tmp_path / "empty"))
    with pytest.raises(sources.SourceError, match="no such file"):
        sources.load_source(str(tmp_path / "missing"))


def test_stratified_split_is_exact_and_seeded():
    ids = np.repeat(np.arange(10), [50] * 9 + [30])
    keep, held = tfrecords.stratified_split(ids, 0.1, seed=3)
    assert np.bincount(ids[held]).tolist() == [5] * 9 + [3]
    assert len(np.intersect1d(keep, held)) == 0 and len(keep) + len(held) == len(ids)
    _, again = tfrecords.stratified_split(ids, 0.1, seed=3)
    _, other = tfrecords.stratified_split(ids, 0.1, seed=4)
    np.testing.assert_array_equal(held, again)
    assert not np.array_equal(held, other)


def test_manifest_shards_and_overwrite(tmp_path):
    helpers.make_cifar10_python(tmp_path / "c10.tar.gz")
    _, manifest = write(tmp_path / "c10.tar.gz", tmp_path / "out",
                        shards={"train": 3, "val": 2, "test": 2})
    splits = manifest["splits"]
    assert [len(splits[s]["shards"]) for s in ("train", "val", "test")] == [3, 2, 2]
    for s in splits.values():
        assert sum(sh["num_examples"] for sh in s["shards"]) == s["num_examples"]
        for sh in s["shards"]:
            assert sh["sha256"] == tfrecords.sha256_file(str(tmp_path / "out" / sh["file"]))
    assert manifest["schema_version"] == tfrecords.SCHEMA_VERSION
    with pytest.raises(tfrecords.OutputExistsError, match="--overwrite"):
        write(tmp_path / "c10.tar.gz", tmp_path / "out")
    write(tmp_path / "c10.tar.gz", tmp_path / "out", overwrite=True, seed=5)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["seed"] == 5
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_eval_dataset_counts_every_example_once(tmp_path):
    manifest = helpers.make_synthetic_tfrecords(str(tmp_path / "syn"), n_train=103, n_test=37)
    for split in ("train", "val", "test"):
        ds = pipeline.make_dataset(str(tmp_path / "syn"), split, 8, training=False)
        idx, labels, cids = [], [], []
        for b in ds:
            assert b["image"].dtype == tf.float32 and float(tf.reduce_max(b["image"])) <= 1.0
            idx += b["index"].numpy().tolist()
            labels += b["label"].numpy().tolist()
            cids += b["class_id"].numpy().tolist()
        s = manifest["splits"][split]
        assert sorted(idx) == list(range(s["num_examples"]))
        assert sum(labels) == s["num_positive"]
        counts = np.bincount(cids, minlength=10)
        assert {n: int(c) for n, c in zip(manifest["class_names"], counts)} == s["class_counts"]


def test_training_stream_is_a_function_of_the_step(tmp_path):
    helpers.make_synthetic_tfrecords(str(tmp_path / "syn"), n_train=100)
    d = str(tmp_path / "syn")
    full = [b["image"].numpy() for b in pipeline.make_dataset(d, "train", 16, True).take(14)]
    resumed = [b["image"].numpy() for b in
               pipeline.make_dataset(d, "train", 16, True, start_step=9).take(5)]
    for a, b in zip(full[9:], resumed):
        np.testing.assert_array_equal(a, b)
    # Two per-replica pipelines of 8 reproduce the global batches of 16.
    halves = [b["image"].numpy() for b in pipeline.make_dataset(
        d, "train", 8, True, global_batch_size=16).take(28)]
    np.testing.assert_array_equal(np.concatenate(halves[18:20]), full[9])
    # The epoch-1 order differs from epoch 0 (reshuffled), and augmentation is on.
    plain = [b["image"].numpy() for b in
             pipeline.make_dataset(d, "train", 16, True, augment=False).take(1)]
    assert not np.array_equal(plain[0], full[0])


def test_augment_batch_flip_and_crop():
    x = tf.reshape(tf.range(2 * 4 * 4 * 1, dtype=tf.float32), [2, 4, 4, 1])
    out = pipeline.augment_batch(x, tf.constant([[0.9, 0.5, 0.5], [0.1, 0.5, 0.5]]), pad=1)
    np.testing.assert_array_equal(out[0], x[0])  # centre crop, no flip
    np.testing.assert_array_equal(out[1], x[1, :, ::-1])
    shifted = pipeline.augment_batch(x, tf.constant([[0.9, 0.0, 0.99]] * 2), pad=1)
    # dy=0 takes the reflected row above; dx=2 shifts one column left.
    np.testing.assert_array_equal(shifted[0, 1:, :3], x[0, :3, 1:])


def test_rebalance_and_class_weights(tmp_path):
    manifest = helpers.make_synthetic_tfrecords(str(tmp_path / "syn"), n_train=200)
    ds = pipeline.make_dataset(str(tmp_path / "syn"), "train", 50, True, rebalance=True)
    labels = np.concatenate([b["label"].numpy() for b in ds.take(8)])
    assert 0.35 < labels.mean() < 0.65  # vs 0.1 unbalanced
    w = pipeline.class_weights(manifest)
    s = manifest["splits"]["train"]
    assert np.isclose(w["binary"][1] * s["num_positive"] + w["binary"][0] *
                      (s["num_examples"] - s["num_positive"]), s["num_examples"])


def test_corrupt_or_truncated_shard_names_the_file(tmp_path):
    manifest = helpers.make_synthetic_tfrecords(str(tmp_path / "syn"), n_train=60)
    shard = tmp_path / "syn" / manifest["splits"]["val"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(pipeline.DataError, match=f"{shard.name}.*corrupt"):
        pipeline.make_dataset(str(tmp_path / "syn"), "val", 4, training=False)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(pipeline.DataError, match=f"{shard.name}.*truncated"):
        pipeline.make_dataset(str(tmp_path / "syn"), "val", 4, training=False)


def test_manifest_schema_mismatch_is_refused(tmp_path):
    helpers.make_synthetic_tfrecords(str(tmp_path / "syn"), n_train=60)
    path = tmp_path / "syn" / "manifest.json"
    m = json.loads(path.read_text())
    m["schema_version"] = 99
    path.write_text(json.dumps(m))
    with pytest.raises(pipeline.DataError, match="schema_version 99.*rebuild"):
        pipeline.load_manifest(str(tmp_path / "syn"))
    with pytest.raises(pipeline.DataError, match="manifest.json not found"):
        pipeline.load_manifest(str(tmp_path))


@pytest.mark.slow
def test_make_tfrecords_cli(tmp_path):
    root = tmp_path / "imgs"
    helpers.make_class_folders(str(root))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "research.apps.make_tfrecords", f"--source={root}",
           f"--out_dir={out}", "--sample_grid=8", "--train_shards=2"]
    res = warm.run(cmd)
    assert res.returncode == 0, res.stderr
    assert "num_examples" in res.stdout and "corrupt.jpg" in res.stdout
    assert (out / "samples.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["flags"]["train_shards"] == 2
    res = warm.run(cmd)
    assert res.returncode != 0 and "--overwrite" in res.stderr


@pytest.mark.parametrize("shape,policy,window", [
    ((30, 60, 3), "center_crop", (0, 15, 30, 30)), ((60, 30, 3), "center_crop", (15, 0, 30, 30)),
    ((30, 60, 3), "stretch", (0, 0, 30, 60)), ((32, 32, 3), "center_crop", (0, 0, 32, 32))])
def test_crop_window_is_the_part_resize_keeps(shape, policy, window):
    """The window explain overlays: resizing it alone gives what resize_image gives."""
    from research.data import imaging

    assert imaging.crop_window(shape, (32, 32), policy) == window
    img = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
    top, left, h, w = window
    whole = imaging.resize_image(img, (32, 32), policy).astype(float)
    part = imaging.resize_image(img[top:top + h, left:left + w], (32, 32), "stretch")
    assert np.abs(whole - part).mean() < 2.0


@pytest.mark.parametrize("stop", [None, 1])
def test_batches_are_all_the_batches_and_their_iterator_is_freed_off_this_thread(
        stop, monkeypatch):
    # pipeline.batches hands its iterator to pipeline.release as its only reference, so it is
    # freed in the release thread (where tf.data's autotuning thread is joined), also when
    # the loop stops early; a reference left anywhere else would free it here instead.
    freed = []
    release = pipeline.release

    def watched(holder):
        ref = weakref.ref(holder[0])
        release(holder)
        for thread in threading.enumerate():
            if thread.name == "release tf.data iterator":
                thread.join()
        freed.append(ref() is None)

    monkeypatch.setattr(pipeline, "release", watched)
    seen = []
    for i, b in enumerate(pipeline.batches(tf.data.Dataset.range(10).batch(3))):
        seen.append(b.numpy().tolist())
        if i == stop:
            break
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]][:None if stop is None else stop + 1]
    assert freed == [True]
