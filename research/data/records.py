"""TFRecord shards written without TensorFlow: the `tf.train.Example` bytes encoded by hand
and framed as TFRecordWriter frames them.

Why by hand: the conversion's worker processes decode and write whole shards, and a process
that imports TensorFlow takes seconds and 0.5 GB to start; in one process, building each
Example through TensorFlow's Python protobuf classes costs about as much as a tenth of the
reduced decode at 64 px. The bytes are those of `Example.SerializeToString(deterministic=
True)` (map entries sorted by key), checked against TensorFlow's own serialization in
tests/data/test_record_bytes.py for every kind of value written here (bytes, int64 >= 0 and < 0).

TFRecord framing (tensorflow/core/lib/io/record_writer.cc): the length as a little-endian
uint64, the masked crc32c of those 8 bytes, the data, the masked crc32c of the data.
"""

from __future__ import annotations

import functools
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
    if 0 <= n < 0x80:
        return _SMALL[n]
    n &= 0xFFFFFFFFFFFFFFFF  # int64 on the wire: two's complement, a negative one is 10 bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((n,)) for n in range(0x80)]


def _head(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def _field(number: int, payload: bytes) -> bytes:
    return _head(number, len(payload)) + payload


def bytes_feature(value: bytes) -> bytes:
    """Feature{bytes_list (1): BytesList{value (1): [value]}}."""
    return _field(1, _field(1, value))


def int64_feature(value: int) -> bytes:
    """Feature{int64_list (3): Int64List{value (1, packed): [value]}}."""
    return _field(3, _field(1, _varint(value)))


def _entry(key: str, feature: bytes) -> bytes:
    """One map<string, Feature> entry of Features (field 1): key (1), value (2)."""
    return _field(1, _field(1, key.encode()) + _field(2, feature))


# The entries whose values repeat from image to image (shape, class, label), encoded once:
# with them encoding and framing a 64 px image takes 20 us instead of 50 (measured).
@functools.lru_cache(maxsize=4096)
def _int_entry(key: str, value: int) -> bytes:
    return _entry(key, int64_feature(value))


@functools.lru_cache(maxsize=4096)
def _name_entry(key: str, value: str) -> bytes:
    return _entry(key, bytes_feature(value.encode()))


@functools.lru_cache(maxsize=64)
def _bytes_entry_head(key: str, size: int) -> bytes:
    """A bytes entry's tags and lengths up to its value, which only the key and the value's
    length decide: an image's pixels follow it as they are, not copied into each enclosing
    field in turn (encoding and framing a 64 px image: 7 us instead of 13, measured)."""
    head = _head(1, size)                                      # BytesList.value
    head = _head(1, len(head) + size) + head                   # Feature.bytes_list
    head = _field(1, key.encode()) + _head(2, len(head) + size) + head  # entry: key, value
    return _head(1, len(head) + size) + head                   # Features.feature


def image_example(image: bytes, shape: tuple[int, int, int], label: int | None,
                  class_id: int, class_name: str, coarse_id: int, source_id: str) -> bytes:
    """The Example make_tfrecords writes per image (research.data.tfrecords): the raw uint8
    pixels `image` of `shape` (height, width, channels); `label` None: no binary label.
    Entries in key order, as deterministic serialization writes a map (the keys are ASCII:
    sorted str = sorted UTF-8 bytes)."""
    h, w, c = shape
    entries = {
        "image": (_bytes_entry_head("image", len(image)), image),
        "height": (_int_entry("height", h),), "width": (_int_entry("width", w),),
        "channels": (_int_entry("channels", c),),
        "class_id": (_int_entry("class_id", class_id),),
        "class_name": (_name_entry("class_name", class_name),),
        "coarse_id": (_int_entry("coarse_id", coarse_id),),
        "source_id": (_entry("source_id", bytes_feature(source_id.encode())),),
    }
    if label is not None:
        entries["label"] = (_int_entry("label", label),)
    parts = [part for key in sorted(entries) for part in entries[key]]
    return b"".join((_head(1, sum(map(len, parts))), *parts))  # Example.features


class ShardFile:
    """A TFRecord file written under a temporary name beside `path`, synced and renamed onto
    it by `close` (so a killed run never leaves a shard that looks whole), its sha256 and size
    kept as it is written, so nothing reads it back. Used as a context manager: an error
    removes the temporary file. `sync=False`: not synced (a part of a shard, read back and
    removed when the shard it is joined into is written, and that is synced)."""

    def __init__(self, path: str, sync: bool = True):
        self.path = path
        self.sync = sync
        self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        # 1 MB buffer: a 64 px record is 12 KB, which the default 8 KB buffer writes through
        # one system call each (8 us per record against 3, measured).
        self._file = open(self.tmp, "wb", buffering=1 << 20)
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.records = 0

    def write(self, data: bytes) -> None:
        """One record: `data` framed and written."""
        self.write_framed([frame(data)])

    def write_framed(self, framed: list[bytes]) -> None:
        """Records already framed (`frame`, by the threads that decoded them), written and
        hashed as one block: the writing thread takes the GIL back once for them all, not
        after each record's write and hash (both release it), while other threads decode."""
        self._write(b"".join(framed))  # one record: the record itself, not a copy
        self.records += len(framed)

    def append_file(self, path: str, records: int) -> None:
        """Another file of framed records (a part of this shard), appended and hashed."""
        with open(path, "rb", buffering=0) as part:
            while block := part.read(1 << 20):
                self._write(block)
        self.records += records

    def _write(self, block: bytes) -> None:
        self._file.write(block)
        self._sha.update(block)
        self.bytes += len(block)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        # Synced here, by the process that wrote it while the others still decode, rather
        # than in the final fsync of the output folder, which the conversion waits for.
        self._file.flush()
        if self.sync:
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            try:
                self.close()
                return
            except BaseException:  # a full disk shows at the last flush
                self._discard()
                raise
        self._discard()

    def _discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.remove(self.tmp)
        except OSError:
            pass
