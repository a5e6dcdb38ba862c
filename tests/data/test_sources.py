"""Reproducible conversions, empty class folders, CIFAR-100 label sets, the unpaired
trainA/trainB layout, zip archives and MNIST, on tiny fixtures made here (no network)."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import helpers
from helpers import write_tfrecords as write
from research.data import pipeline, sources, tfrecords


def read_records(data_dir, split):
    """Every record of a split as {source_id: (image, class_id, class_name, coarse_id, label)}."""
    manifest = pipeline.load_manifest(str(data_dir))
    out = {}
    for path in pipeline.shard_paths(str(data_dir), manifest, split):
        for rec in tf.data.TFRecordDataset(path):
            f = tf.train.Example.FromString(rec.numpy()).features.feature
            img = np.frombuffer(f["image"].bytes_list.value[0], np.uint8).reshape(
                manifest["image_shape"])
            ints = {k: f[k].int64_list.value[0] for k in ("class_id", "coarse_id", "label")}
            out[f["source_id"].bytes_list.value[0].decode()] = (
                img, ints["class_id"], f["class_name"].bytes_list.value[0].decode(),
                ints["coarse_id"], ints["label"])
    return out


def make_folders_with_empty_classes(root):
    """Class folders where train/dog/ is empty (dog still has test images) and bird/ is empty
    in both splits (no images anywhere)."""
    helpers.make_class_folders(str(root))
    shutil.rmtree(root / "train" / "dog")
    for d in ("train/dog", "train/bird", "test/bird"):
        (root / d).mkdir(parents=True)


# --- 1. reproducibility ------------------------------------------------------------------------

def test_examples_serialize_in_sorted_key_order():
    # Map order otherwise follows Python's per-process string hash (PYTHONHASHSEED).
    b = tfrecords.serialize_example(np.zeros((2, 2, 3), np.uint8), 1, 3, "cat", -1, "x/1.png")
    assert tf.train.Example.FromString(b).SerializeToString(deterministic=True) == b


@pytest.mark.slow
def test_same_source_and_flags_give_byte_identical_output(tmp_path):
    root = tmp_path / "imgs"
    make_folders_with_empty_classes(root)
    outs, stdouts = [tmp_path / "out1", tmp_path / "out2"], []
    for hash_seed, out in zip(("1", "2"), outs):  # two processes, two string-hash orders
        res = subprocess.run(
            [sys.executable, "-m", "research.apps.make_tfrecords", f"--source={root}",
             f"--out_dir={out}", "--sample_grid=8", "--train_shards=3"],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert res.returncode == 0, res.stderr
        stdouts.append(res.stdout)
    files = sorted(os.listdir(outs[0]))
    assert files == sorted(os.listdir(outs[1]))
    assert "manifest.json" in files and "samples.png" in files and len(files) == 3 + 2 + 4 + 2
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert "seconds" not in manifest and "out_dir" not in manifest["flags"]
    # The empty class folders are in the printed summary, with the decision taken.
    out = stdouts[0]
    assert "empty class folders: 3" in out
    assert f"empty class folder {root / 'train' / 'dog'}/: no image files; class 'dog' kept" in out
    assert f"empty class folder {root / 'train' / 'bird'}/: no image files; class 'bird' " \
           "dropped (no images in any split)" in out
    assert "CPU:" in out and "wrote" in out


# --- 2. empty class folders --------------------------------------------------------------------

def test_empty_class_folders_are_reported_kept_or_dropped(tmp_path):
    root = tmp_path / "imgs"
    make_folders_with_empty_classes(root)
    (root / "test" / "frog" / "001.png").write_bytes(b"not a png")  # frog/test: 3 files, 1 bad
    for fmt, src in (("folder", root),
                     ("tar", helpers.tar_folder(str(root), str(tmp_path / "imgs.tar.gz"))),
                     ("zip", helpers.zip_folder(str(root), str(tmp_path / "imgs.zip")))):
        data = sources.load_source(str(src))
        assert data.class_names == ["cat", "dog", "frog"], fmt  # bird dropped, dog kept
        got = {(e["split"], e["class"]): (e["reason"], e["kept"]) for e in data.empty_classes}
        assert got == {("train", "dog"): ("no image files", True),
                       ("train", "bird"): ("no image files", False),
                       ("test", "bird"): ("no image files", False)}, fmt
        where = {e["class"] + e["split"]: e["folder"] for e in data.empty_classes}
        assert where["dogtrain"].endswith("imgs/train/dog/"), where
    _, manifest = write(root, tmp_path / "out")
    assert len(manifest["empty_classes"]) == 3
    assert manifest["splits"]["train"]["class_counts"]["dog"] == 0
    assert manifest["splits"]["test"]["class_counts"] == {"cat": 3, "dog": 3, "frog": 2}
    with pytest.raises(ValueError, match="'bird' is not a class.*cat, dog, frog.*dropped, no "
                                         "images: bird"):
        write(root, tmp_path / "out2", positive_class="bird")
    with pytest.raises(ValueError, match="'dog' has no train images"):
        write(root, tmp_path / "out2", positive_class="dog")


def test_class_folder_of_undecodable_images_is_empty(tmp_path):
    root = tmp_path / "imgs"
    helpers.make_class_folders(str(root), classes=("cat", "dog"))
    shutil.rmtree(root / "test")
    for f in (root / "train" / "dog").iterdir():
        f.write_bytes(b"junk")
    data = sources.load_source(str(root))  # train/ alone is a wrapper: <class>/<img> layout
    assert data.class_names == ["cat"]
    [entry] = data.empty_classes
    assert entry["folder"] == str(root / "train" / "dog") + "/"
    assert entry["reason"] == "none of its 6 images could be decoded" and not entry["kept"]
    assert "class 'dog' dropped" in sources.describe_empty_class(entry)
    assert sum("dog/" in s["file"] for s in data.skipped) == 6


# --- 3. CIFAR-100 fine or coarse ---------------------------------------------------------------

def test_cifar100_coarse_labels_round_trip(tmp_path):
    src = tmp_path / "c100.tar.gz"
    helpers.make_cifar100_python(str(src))
    with pytest.raises(ValueError) as e:
        write(src, tmp_path / "out", load={"label_set": "coarse"}, positive_class="leopard")
    msg = str(e.value)
    assert "\n" not in msg and "(coarse labels)" in msg and "20 classes" in msg
    assert "coarse0, coarse1" in msg and "coarse19" in msg
    data, manifest = write(src, tmp_path / "out", load={"label_set": "coarse"},
                           positive_class="coarse0", val_fraction=0.25)
    assert manifest["label_set"] == "coarse" and data.class_names == [f"coarse{i}" for i in
                                                                      range(20)]
    assert manifest["class_names"] == manifest["coarse_class_names"]
    fine = sources.load_source(str(src))
    assert fine.label_set == "fine" and len(fine.class_names) == 100
    fine_ids = {f"{s}/{i}": fine.splits[s].class_ids[i] for s in ("train", "test")
                for i in range(400)}
    seen = 0
    for split in ("train", "val", "test"):
        for sid, (_, cid, cname, coarse, label) in read_records(tmp_path / "out", split).items():
            want = fine_ids["/".join(sid.split("/")[:2])] // 5  # the maker's coarse = fine // 5
            assert cid == coarse == want and cname == f"coarse{want}" and label == int(want == 0)
            seen += 1
    assert seen == 800
    assert manifest["splits"]["test"]["num_positive"] == int(np.sum(
        fine.splits["test"].class_ids // 5 == 0))


def test_coarse_needs_cifar100(tmp_path):
    helpers.make_cifar10_python(str(tmp_path / "c10.tar.gz"))
    with pytest.raises(sources.SourceError, match="--label=coarse needs.*CIFAR-100"):
        sources.load_source(str(tmp_path / "c10.tar.gz"), label_set="coarse")


# --- 4. unpaired trainA/trainB -----------------------------------------------------------------

def test_unpaired_two_folder_layout(tmp_path):
    root = tmp_path / "horse2zebra"
    arrays = helpers.make_unpaired_folder(str(root))
    (root / "trainA" / "README.txt").write_text("x")
    for src in (root, helpers.tar_folder(str(root), str(tmp_path / "h2z.tar.gz")),
                helpers.zip_folder(str(root), str(tmp_path / "h2z.zip"))):
        data = sources.load_source(str(src), image_size=(24, 20), class_names=["horse", "zebra"])
        assert data.format == "image_folder:unpaired_ab"
        assert data.class_names == ["horse", "zebra"]  # A first, whatever the alphabet says
        for split, a, b in (("train", "trainA", "trainB"), ("test", "testA", "testB")):
            s = data.splits[split]
            assert np.bincount(s.class_ids).tolist() == [len(arrays[a]), len(arrays[b])]
            i = s.source_ids.index(f"{b}/n{list(arrays).index(b)}_001.png")
            np.testing.assert_array_equal(s.images[i], arrays[b][1])  # at size: bit for bit
        assert [os.path.basename(x["file"]) for x in data.skipped] == ["README.txt"]
    default = sources.load_source(str(root))
    assert default.class_names == ["A", "B"]
    _, manifest = write(root, tmp_path / "out", load={"class_names": ["horse", "zebra"]},
                        positive_class="zebra", val_fraction=0.2)
    assert manifest["splits"]["test"]["class_counts"] == {"horse": 3, "zebra": 2}
    assert manifest["test_fraction"] is None  # testA/testB are the test split
    with pytest.raises(sources.SourceError, match="two distinct class names"):
        sources.load_source(str(root), class_names=["horse"])
    helpers.make_flat_folder(str(tmp_path / "flat"))
    with pytest.raises(sources.SourceError, match="--class_names only applies"):
        sources.load_source(str(tmp_path / "flat"), class_names=["horse", "zebra"])


def test_unpaired_without_test_folders_holds_test_out(tmp_path):
    root = tmp_path / "ab"
    helpers.make_unpaired_folder(str(root), counts={"trainA": 8, "trainB": 8})
    data, manifest = write(root, tmp_path / "out", load={"class_names": ["horse", "zebra"]},
                           positive_class="horse", test_fraction=0.25, val_fraction=0.2)
    assert list(data.splits) == ["train"] and manifest["test_fraction"] == 0.25
    assert manifest["splits"]["test"]["class_counts"] == {"horse": 2, "zebra": 2}


def test_zip_with_path_traversal_is_refused(tmp_path):
    path = tmp_path / "trav.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../escaped.jpg", b"abcd")
    with pytest.raises(sources.UnsafeArchiveError, match="escaped.jpg.*path traversal"):
        sources.load_source(str(path))


# --- 5. MNIST ----------------------------------------------------------------------------------

def test_mnist_npz_round_trip_as_28x28x1(tmp_path):
    src = tmp_path / "mnist.npz"
    arrays = helpers.make_mnist_npz(str(src))
    data = sources.load_source(str(src))
    assert data.format == "mnist-npz" and data.class_names == [str(d) for d in range(10)]
    assert data.splits["train"].images.shape == (60, 28, 28, 1)
    with pytest.raises(ValueError) as e:
        write(src, tmp_path / "out")
    assert "'cat' is not a class" in str(e.value)
    assert "10 classes are: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in str(e.value)
    _, manifest = write(src, tmp_path / "out", positive_class="7", val_fraction=0.2)
    assert manifest["image_shape"] == [28, 28, 1]
    assert manifest["splits"]["test"]["num_positive"] == int(np.sum(arrays["y_test"] == 7))
    seen = 0
    for split in ("train", "val", "test"):
        for sid, (img, cid, cname, _, label) in read_records(tmp_path / "out", split).items():
            which, i = sid.split("/")
            np.testing.assert_array_equal(img[..., 0], arrays[which][int(i)])  # raw pixels
            assert cid == arrays["y" + which[1:]][int(i)] and cname == str(cid)
            assert label == int(cid == 7)
            seen += 1
    assert seen == 80
    batch = next(iter(pipeline.make_dataset(str(tmp_path / "out"), "test", 4, training=False,
                                            scale="uint8")))
    assert batch["image"].shape == (4, 28, 28, 1)


def test_mnist_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x_train=np.array([helpers.Evil(str(tmp_path / "pwned"))], dtype=object),
             y_train=np.zeros(1), x_test=np.zeros(1), y_test=np.zeros(1))
    with pytest.raises(sources.SourceError, match="evil.npz.*allow_pickle"):
        sources.load_source(str(path))
    assert not (tmp_path / "pwned").exists()
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(sources.SourceError, match="partial.npz: missing arrays y_train"):
        sources.load_source(str(tmp_path / "partial.npz"))


def test_mnist_download_offline_and_hand_placed(tmp_path, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    downloads = tmp_path / "downloads"
    with pytest.raises(sources.SourceError) as e:
        sources.load_source("mnist", download_dir=str(downloads))
    msg = str(e.value)
    mnist = sources.downloads()["mnist"]
    assert mnist.download.origin in msg and "network is unreachable" in msg
    assert f"put mnist.npz (sha256 {mnist.download.sha256}) into the folder " \
           f"{downloads}" in msg
    # A hand-placed file must be the official one.
    helpers.make_mnist_npz(str(downloads / "mnist.npz"))
    with pytest.raises(sources.SourceError, match="mnist.npz: sha256 .* official"):
        sources.load_source("mnist", download_dir=str(downloads))
    here = dataclasses.replace(mnist.download,
                               sha256=tfrecords.sha256_file(str(downloads / "mnist.npz")))
    monkeypatch.setattr(sources, "SOURCES", [dataclasses.replace(s, download=here)
                                             if s is mnist else s for s in sources.SOURCES])
    data = sources.load_source("mnist", download_dir=str(downloads))
    assert len(data.splits["test"]) == 20


def test_corrupt_zip_names_the_file(tmp_path):
    root = tmp_path / "imgs"
    helpers.make_flat_folder(str(root))
    raw = bytearray(open(helpers.zip_folder(str(root), str(tmp_path / "a.zip")), "rb").read())
    raw[200:260] = b"\0" * 60  # inside the first member's data
    (tmp_path / "a.zip").write_bytes(bytes(raw))
    with pytest.raises(sources.SourceError, match="a.zip: truncated or corrupt"):
        sources.load_source(str(tmp_path / "a.zip"))


def test_tar_member_types(tmp_path):
    # A symlink in a tar is listed as skipped, never followed.
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        img = helpers.encode(Image.fromarray(helpers.rgb(8, 8)), "PNG")
        for name in ("cat/1.png", "dog/1.png", "cat/2.png", "dog/2.png"):
            info = tarfile.TarInfo(name)
            info.size = len(img)
            tar.addfile(info, io.BytesIO(img))
        link = tarfile.TarInfo("cat/evil.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    data = sources.load_source(str(path), image_size=(8, 8))
    assert data.class_names == ["cat", "dog"]
    assert data.skipped[0]["reason"] == "not a regular file (link or device)"


def _tar(path, members, fmt=tarfile.PAX_FORMAT):
    """A tar of (name, type, data) members in `fmt`."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            if kind == tarfile.SYMTYPE:
                info.linkname, info.size = "/etc/passwd", 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


def _patched(path, offset, edit):
    """The tar at `path` with its header at `offset` edited by `edit(bytearray)` and its
    checksum made right again, as an old or odd tar writes it."""
    raw = bytearray(path.read_bytes())
    head = raw[offset:offset + 512]
    edit(head)
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    raw[offset:offset + 512] = head
    path.write_bytes(bytes(raw))
    return path


def test_the_fast_tar_index_reads_what_tarfile_reads_or_leaves_it_to_tarfile(tmp_path):
    # The plain-header parser (_plain_tar_members) either yields exactly tarfile's members
    # or gives up (_NotPlain: then tarfile reads the archive): compared on every kind of
    # archive we met, and a FileTree of one it gives up on midway holds tarfile's index.
    img, reg, dirt = b"x" * 1000, tarfile.REGTYPE, tarfile.DIRTYPE
    plain = [("photos/", dirt, b""), ("photos/cat/", dirt, b""), ("photos/cat/1.jpg", reg, img),
             ("photos/cat/.hidden.jpg", reg, img), ("photos/dog/2.jpg", reg, b""),
             ("photos/dog/3.jpg", reg, img * 3)]
    accented = ("photos/d\u00e9j\u00e0.jpg", reg, img)  # GNU: UTF-8 bytes; pax: a pax header
    deep = "photos/" + "d" * 90 + "/" + "e" * 60 + ".jpg"  # ustar: in prefix and name
    archives = {
        "pax": (_tar(tmp_path / "pax.tar", plain), True),
        "gnu": (_tar(tmp_path / "gnu.tar", plain + [accented], tarfile.GNU_FORMAT), True),
        "pax accented": (_tar(tmp_path / "paxutf.tar", plain + [accented]), False),
        "ustar prefix": (_tar(tmp_path / "ustar.tar", plain + [(deep, reg, img)],
                              tarfile.USTAR_FORMAT), True),
        "gnu long name": (_tar(tmp_path / "long.tar", plain + [("a" * 120 + ".jpg", reg, img)],
                               tarfile.GNU_FORMAT), False),
        "pax long name": (_tar(tmp_path / "paxlong.tar",
                               plain + [("b" * 120 + ".jpg", reg, img)]), False),
        "symlink": (_tar(tmp_path / "link.tar",
                         plain + [("photos/evil.jpg", tarfile.SYMTYPE, b"")]), False),
        "empty": (_tar(tmp_path / "empty.tar", []), False),
    }
    # An old tar's regular file and folder (type NUL; a folder's name ends in "/").
    old = _tar(tmp_path / "old.tar", plain, tarfile.GNU_FORMAT)
    with tarfile.open(old) as tar:
        heads = [m.offset for m in tar]  # photos/, photos/cat/, photos/cat/1.jpg, ...
    for offset in heads[:3]:
        _patched(old, offset, lambda h: h.__setitem__(slice(156, 157), b"\0"))
    archives["old types"] = (old, True)
    # A header whose checksum is wrong ends the archive for tarfile, silently.
    bad = _tar(tmp_path / "bad.tar", plain)
    raw = bytearray(bad.read_bytes())
    raw[heads[3] + 10] ^= 1  # in .hidden.jpg's name (the same offsets: the same members)
    bad.write_bytes(bytes(raw))
    archives["bad checksum"] = (bad, False)
    # Cut inside the last member's data: tarfile's "unexpected end of data".
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "pax.tar").read_bytes()[:-1024 - 1536])
    archives["cut"] = (cut, False)
    for label, (path, plain_only) in archives.items():
        fd = os.open(path, os.O_RDONLY)
        try:
            fast = list(sources._plain_tar_members(fd))
        except sources._NotPlain:
            fast = None
        finally:
            os.close(fd)
        assert (fast is not None) == plain_only, label
        try:
            slow = list(sources._tar_members(str(path)))
        except tarfile.TarError:
            slow = "error"
        if fast is not None:
            assert fast == slow, label
    tree = sources.FileTree(str(archives["ustar prefix"][0]))
    assert deep.removeprefix("photos/") in tree.names()
    assert tree.read("cat/1.jpg") == img and tree.read("dog/2.jpg") == b""
    # Given up on at its last member, after a name it listed as ignored: listed once.
    mixed = _tar(tmp_path / "mixed.tar", plain + [("photos/bad\udcff.jpg", reg, img),
                                                  ("photos/evil.jpg", tarfile.SYMTYPE, b"")],
                 tarfile.GNU_FORMAT)
    tree = sources.FileTree(str(mixed))
    assert sorted(tree.names()) == ["cat/1.jpg", "dog/2.jpg", "dog/3.jpg"]
    assert [e["reason"] for e in tree.ignored] == ["member name is not valid UTF-8",
                                                   "not a regular file (link or device)"]


def test_no_positive_class_is_data_for_classifiers(tmp_path):
    """--positive_class=none: null in the manifest, no binary label in the records (the
    pipeline reads 0), CIFAR-100's 100 fine classes and MNIST alike; a summary without one."""
    c100, mnist = tmp_path / "c100.tar.gz", tmp_path / "mnist.npz"
    helpers.make_cifar100_python(str(c100))
    helpers.make_mnist_npz(str(mnist))
    for src, classes in ((c100, 100), (mnist, 10)):
        out = tmp_path / src.name.split(".")[0]
        _, manifest = write(src, out, positive_class=None, val_fraction=0.2)
        assert manifest["positive_class"] is None and manifest["positive_class_id"] is None
        assert len(manifest["class_names"]) == classes
        assert all(s["num_positive"] == 0 for s in manifest["splits"].values())
        path = pipeline.shard_paths(str(out), pipeline.load_manifest(str(out)), "train")[0]
        rec = next(iter(tf.data.TFRecordDataset(path)))
        assert "label" not in tf.train.Example.FromString(rec.numpy()).features.feature
        batch = next(iter(pipeline.make_dataset(str(out), "test", 500, training=False)))
        assert not batch["label"].numpy().any()
        assert len(np.unique(batch["class_id"].numpy())) == classes
        table = tfrecords.summary_table(manifest)
        assert "positive class: none" in table and "num_positive" not in table
        assert "binary" not in pipeline.class_weights(manifest)


def test_every_source_is_one_record_and_the_help_reads_them():
    # A new source is one record in SOURCES: load_source detects with it, downloads with it,
    # and make_tfrecords' --source help (built by sources.source_help) names it.
    help_text = sources.source_help()
    for s in sources.SOURCES:
        assert s.help in help_text
        if s.download:
            assert s.download.keyword in help_text
            assert len(s.download.sha256) == 64 and s.download.origin.startswith("https://")
    assert sources.SOURCES[-1].name == "image_folder"  # last: it detects anything
    assert set(sources.downloads()) == {"cifar10", "cifar10_binary", "cifar100", "mnist"}


def test_a_reused_read_is_the_file_whatever_its_size(tmp_path):
    """The decoding threads' reads into a kept buffer (1 MB at first, grown while a file
    fills it) give every byte of a folder's file and of a tar's member, at and around the
    buffer's size, and a read after a larger one is not padded by its leftovers."""
    sizes = [3 << 20, 0, 1000, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 5]
    folder = tmp_path / "f"
    folder.mkdir()
    blobs = {f"x{i}.bin": np.random.default_rng(i).integers(0, 256, n, np.uint8).tobytes()
             for i, n in enumerate(sizes)}
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    archive = tmp_path / "f.tar"
    with tarfile.open(archive, "w") as tar:
        for name in blobs:
            tar.add(folder / name, arcname=name)
    for root in (folder, archive):
        tree = sources.FileTree(str(root))
        for name, data in blobs.items():  # in the order written: large, then small
            got = tree.read_at(tree.locator(name), name, reuse=True)
            assert bytes(got) == data, (root, name)
        tree.close()
