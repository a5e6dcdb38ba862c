"""TFRecord shards written without TensorFlow: the `tf.train.Example` bytes encoded by hand
and framed as TFRecordWriter frames them.

Why by hand: the conversion's worker processes decode and write whole shards, and a process
that imports TensorFlow takes seconds and 0.5 GB to start; in one process, building each
Example through TensorFlow's Python protobuf classes costs about as much as a tenth of the
reduced decode at 64 px. The bytes are those of `Example.SerializeToString(deterministic=
True)` (map entries sorted by key), checked against TensorFlow's own serialization in
tests/data/test_records.py for every kind of value written here (bytes, int64 >= 0 and < 0).

TFRecord framing (tensorflow/core/lib/io/record_writer.cc): the length as a little-endian
uint64, the masked crc32c of those 8 bytes, the data, the masked crc32c of the data.
"""

from __future__ import annotations

import hashlib
import os
import struct

import google_crc32c  # C: a pure-Python crc32c of a 64 px record takes longer than its decode

_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's masked crc32c: rotated right by 15 bits plus a constant, so that a crc of
    data holding crcs stays well distributed."""
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord: length, its masked crc, the data, its masked crc."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", masked_crc(length)), data,
                     struct.pack("<I", masked_crc(data))))


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 on the wire: two's complement, a negative one is 10 bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bytes_feature(value: bytes) -> bytes:
    """Feature{bytes_list (1): BytesList{value (1): [value]}}."""
    return _field(1, _field(1, value))


def int64_feature(value: int) -> bytes:
    """Feature{int64_list (3): Int64List{value (1, packed): [value]}}."""
    return _field(3, _field(1, _varint(value)))


def example(features: dict[str, bytes]) -> bytes:
    """Example{features (1): Features{feature (1): map<string, Feature>}} from encoded
    Features (`bytes_feature`, `int64_feature`), entries in key order as deterministic
    serialization writes them (keys here are ASCII: sorted str = sorted UTF-8 bytes)."""
    entries = b"".join(_field(1, _field(1, key.encode()) + _field(2, features[key]))
                       for key in sorted(features))
    return _field(1, entries)


def image_example(image: bytes, shape: tuple[int, int, int], label: int | None,
                  class_id: int, class_name: str, coarse_id: int, source_id: str) -> bytes:
    """The Example make_tfrecords writes per image (research.data.tfrecords): the raw uint8
    pixels `image` of `shape` (height, width, channels); `label` None: no binary label."""
    h, w, c = shape
    features = {
        "image": bytes_feature(image),
        "height": int64_feature(h), "width": int64_feature(w), "channels": int64_feature(c),
        "class_id": int64_feature(class_id),
        "class_name": bytes_feature(class_name.encode()),
        "coarse_id": int64_feature(coarse_id),
        "source_id": bytes_feature(source_id.encode()),
    }
    if label is not None:
        features["label"] = int64_feature(label)
    return example(features)


class ShardFile:
    """A TFRecord file written under a temporary name beside `path` and renamed onto it by
    `close` (so a killed run never leaves a shard that looks whole), its sha256 and size
    kept as it is written, so nothing reads it back. Used as a context manager: an error
    removes the temporary file."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        self._file = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.records = 0

    def write(self, data: bytes) -> None:
        record = frame(data)
        self._file.write(record)
        self._sha.update(record)
        self.bytes += len(record)
        self.records += 1

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        self._file.close()
        os.replace(self.tmp, self.path)

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
            return
        self._file.close()
        try:
            os.remove(self.tmp)
        except OSError:
            pass
