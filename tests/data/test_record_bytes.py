"""research.data.records: Examples and TFRecord frames written without TensorFlow are byte for
byte TensorFlow's own."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from research.data import records


def tf_example(image: np.ndarray, label, class_id, class_name, coarse_id, source_id) -> bytes:
    """The Example as make_tfrecords built it through TensorFlow before records.py."""
    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    def bytes_(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    h, w, c = image.shape
    feature = {"image": bytes_(image.tobytes()), "height": ints(h), "width": ints(w),
               "channels": ints(c), "class_id": ints(class_id),
               "class_name": bytes_(class_name.encode()), "coarse_id": ints(coarse_id),
               "source_id": bytes_(source_id.encode())}
    if label is not None:
        feature["label"] = ints(label)
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
        deterministic=True)


@pytest.mark.parametrize("label", [None, 0, 1])
@pytest.mark.parametrize("coarse_id", [-1, 0, 127, 128, 19, 2**40, -2**63, 2**63 - 1])
def test_examples_are_tensorflows_bytes(label, coarse_id):
    # Every kind of value written: bytes (non-ASCII, empty pixels), int64 from 0 to the
    # 10-byte varints of negative numbers, a missing label; varints of 1, 2 and 6 bytes.
    for shape in [(5, 7, 3), (0, 0, 3), (300, 2, 1)]:
        image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
        for name, source in [("cat", "cats/1.jpg"), ("chat noir é", "x:ü/ß.png"), ("", "")]:
            ours = records.image_example(image.tobytes(), image.shape, label, 3, name,
                                         coarse_id, source)
            assert ours == tf_example(image, label, 3, name, coarse_id, source)


def test_frames_are_tfrecordwriters_and_the_sha256_is_kept_while_writing(tmp_path):
    payloads = [b"", b"x", bytes(range(256)) * 50, tf_example(
        np.zeros((4, 4, 3), np.uint8), 1, 0, "a", -1, "s")]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for p in payloads:
            w.write(p)
    with records.ShardFile(str(tmp_path / "ours.tfrecord")) as f:
        for p in payloads:
            f.write(p)
    theirs = (tmp_path / "tf.tfrecord").read_bytes()
    assert (tmp_path / "ours.tfrecord").read_bytes() == theirs
    assert f.sha256 == hashlib.sha256(theirs).hexdigest()
    assert (f.bytes, f.records) == (len(theirs), len(payloads))
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))]
    assert read == payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.tfrecord", "tf.tfrecord"]


def test_a_shard_is_in_place_only_when_whole(tmp_path):
    path = tmp_path / "s.tfrecord"
    with pytest.raises(RuntimeError):
        with records.ShardFile(str(path)) as f:
            f.write(b"abc")
            assert not path.exists() and (tmp_path / ".s.tfrecord.tmp").exists()
            raise RuntimeError("stopped mid-shard")
    assert list(tmp_path.iterdir()) == []
