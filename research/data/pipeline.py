"""tf.data input pipeline over the TFRecords written by `research.data.tfrecords`.

Training streams are infinite and a pure function of (seed, step): epoch e is shuffled with
seed (seed, e), and the augmentation of the i-th example of the stream is drawn from a
stateless RNG keyed on (seed, i). Starting at `start_step` therefore yields exactly the batches
an uninterrupted run would have seen, and 1 or N replicas see the same global batches.
Evaluation streams are finite, ordered, and never drop the remainder.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Iterable, Iterator

import numpy as np
import tensorflow as tf

from research.data.augmentation import Affine
from research.data.manifest import DataError, load_manifest, sha256_file  # noqa: F401
from research.detector import SCALES, scale_images

AUTOTUNE = tf.data.AUTOTUNE
EXAMPLE_FILTERS = ("all", "positive", "negative", "balanced")

# Data without a positive class (make_tfrecords --positive_class=none) writes no `label`:
# it reads as 0, "not of the positive class", true of every example there.
_LABEL = {"label": tf.io.FixedLenFeature([], tf.int64, default_value=0)}
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "class_id": tf.io.FixedLenFeature([], tf.int64),
    **_LABEL,
}


def release(holder: list) -> None:
    """Empties `holder`, the one list that holds a tf.data iterator (or a distributed one),
    in a thread of its own, so that the iterator is freed there.

    Freeing an iterator joins tf.data's autotuning thread, and that thread can sleep out its
    optimisation period first (which doubles up to 60 s): TensorFlow's CancellationManager
    runs the cancellation callback that wakes it before it marks itself cancelled, so the
    woken thread can find itself not cancelled and wait again (tensorflow/core/framework/
    model.cc, Model::OptimizeLoop). Measured on this repository's 2-core machine: 4.2 s after
    a 6 s training loop in 6 of 8 runs, 1.2 s after a 4 s evaluation loop in 4 of 8. The
    free releases the GIL while it waits, so the process goes on meanwhile; the thread is
    not a daemon, so a process still waits for it at exit, as it did before."""
    threading.Thread(target=holder.clear, name="release tf.data iterator").start()


def batches(dataset: Iterable) -> Iterator:
    """`for b in dataset`, its iterator freed at the end (or at a break) by `release`."""
    holder = [iter(dataset)]
    try:
        yield from holder[0]
    finally:
        release(holder)


def count_records(path: str) -> int:
    """The records of a TFRecord file, from its framing alone (each record: an 8-byte length,
    4 bytes of CRC, the data, 4 bytes of CRC): a seek per record, nothing parsed."""
    n, size = 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while f.tell() < size:
            header = f.read(12)
            if len(header) < 12:
                raise DataError(f"{path}: cut off inside record {n + 1} (truncated shard?)")
            f.seek(int.from_bytes(header[:8], "little") + 4, os.SEEK_CUR)
            n += 1
        if f.tell() != size:
            raise DataError(f"{path}: its last record runs past the end (truncated shard?)")
    return n


@functools.lru_cache(maxsize=None)
def _verified(path: str, size: int, sha256: str, num_examples: int) -> bool:
    if not os.path.isfile(path):
        raise DataError(f"{path}: shard listed in the manifest is missing")
    actual = os.path.getsize(path)
    if actual != size:
        raise DataError(f"{path}: {actual} bytes, the manifest says {size} (truncated shard?)")
    if sha256_file(path) != sha256:
        raise DataError(f"{path}: sha256 does not match the manifest (corrupt shard)")
    records = count_records(path)
    if records != num_examples:
        raise DataError(f"{path}: holds {records:,} records, the manifest says "
                        f"{num_examples:,} (an edited manifest?)")
    return True


def clear_verified() -> None:
    """Forget which shards were verified: check them again (a shard damaged since)."""
    _verified.cache_clear()


def shard_paths(data_dir: str, manifest: dict, split: str, verify: bool = True) -> list[str]:
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} not in {data_dir}; it has "
                        f"{', '.join(manifest['splits'])}")
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        path = os.path.join(data_dir, shard["file"])
        if verify:
            _verified(os.path.abspath(path), shard["bytes"], shard["sha256"],
                      shard["num_examples"])
        paths.append(path)
    return paths


def read_source_ids(data_dir: str, split: str) -> list[str]:
    """Each example's source_id (its file or index inside the source), in split position
    order (the `index` that take_examples and the eval stream give)."""
    manifest = load_manifest(data_dir)
    ids = []
    for path in shard_paths(data_dir, manifest, split):
        for record in tf.data.TFRecordDataset(path):
            ex = tf.train.Example.FromString(record.numpy())
            ids.append(ex.features.feature["source_id"].bytes_list.value[0].decode())
    return ids


def class_weights(manifest: dict, split: str = "train") -> dict[str, np.ndarray]:
    """Balanced weights n / (k * n_c): 'binary' over {neg, pos}, 'multiclass' over class ids
    (data without a positive class: 'multiclass' only)."""
    s = manifest["splits"][split]
    n, pos = s["num_examples"], s["num_positive"]
    counts = np.array([s["class_counts"][c] for c in manifest["class_names"]], np.float64)
    weights = {"multiclass": (n / (len(counts) * np.maximum(counts, 1))).astype(np.float32)}
    if 0 < pos < n:
        weights["binary"] = np.array([n / (2.0 * (n - pos)), n / (2.0 * pos)], np.float32)
    return weights


def parse_batch(serialized: tf.Tensor, image_shape) -> dict[str, tf.Tensor]:
    """Parses a batch of serialized Examples with one parse_example and one decode_raw."""
    f = tf.io.parse_example(serialized, _FEATURES)
    images = tf.io.decode_raw(f["image"], tf.uint8)
    images = tf.reshape(images, [-1, *image_shape])
    return {"image": images, "label": tf.cast(f["label"], tf.int32),
            "class_id": tf.cast(f["class_id"], tf.int32)}


def augment_batch(images: tf.Tensor, rand: tf.Tensor, pad: int = 4,
                  flip: tf.Tensor | None = None) -> tf.Tensor:
    """Random horizontal flip and pad-and-crop (reflect padding), one draw per example.

    `rand` is [B, 3] uniform in [0, 1): flip, row offset, column offset; `flip` ([B] bool),
    when given, says which images to flip instead of rand's first column.
    """
    h, w = images.shape[1], images.shape[2]
    if pad > 0:
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        span = 2 * pad + 1
        dy = tf.minimum(tf.cast(rand[:, 1] * span, tf.int32), span - 1)
        dx = tf.minimum(tf.cast(rand[:, 2] * span, tf.int32), span - 1)
        rows = dy[:, None] + tf.range(h)[None]
        cols = dx[:, None] + tf.range(w)[None]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    flip = rand[:, 0] < 0.5 if flip is None else flip
    return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def cutout_batch(images: tf.Tensor, rand: tf.Tensor, size: int, fill) -> tf.Tensor:
    """airbench's batch_cutout (utils.make_random_square_masks): per image a `size` x `size`
    square, its top-left corner uniform in [0, H - size] x [0, W - size], set to `fill` (per
    channel; airbench zeroes its normalised images, so `fill` is the normalisation's mean).
    `rand` is [B, 2] uniform in [0, 1): the corner's row, column."""
    h, w = images.shape[1], images.shape[2]
    y = tf.minimum(tf.cast(rand[:, 0] * (h - size + 1), tf.int32), h - size)
    x = tf.minimum(tf.cast(rand[:, 1] * (w - size + 1), tf.int32), w - size)
    dy = tf.range(h)[None] - y[:, None]
    dx = tf.range(w)[None] - x[:, None]
    mask = (((dy >= 0) & (dy < size))[:, :, None] & ((dx >= 0) & (dx < size))[:, None, :])
    fill = tf.cast(tf.reshape(fill, [1, 1, 1, -1]), images.dtype)
    return tf.where(mask[..., None], fill, images)


def cutout_fill(channels: int, scale: str) -> list[float]:
    """The input normalisation's mean (research.models.scratch.normalized_input) in the
    stream's scale: a cutout square is then 0 after the model's normalisation."""
    from research.models.scratch import CIFAR_MEAN

    mean = list(CIFAR_MEAN) if channels == 3 else [0.5] * channels
    return [m * 255.0 for m in mean] if scale in ("raw", "uint8") else mean


AFFINE_KEY = 7919  # seed offset of the affine draws: the flip/crop draws stay as they were
CUTOUT_KEY = 15485863  # seed offset of the cutout corners
FLIP_KEY = 104729  # seed offset of the alternating flips' draw per image
FLIPS = ("random", "alternate")


def affine_batch(images: tf.Tensor, rand: tf.Tensor, affine: Affine) -> tf.Tensor:
    """One random affine transform per image, all in one op (no per-image Python).

    `rand` is [B, 6] uniform in [0, 1): rotation, x shift, y shift, shear, x zoom, y zoom.
    Each transform is taken about the image centre; the output keeps dtype and shape.
    """
    h, w = images.shape[1], images.shape[2]
    u = 2.0 * rand - 1.0  # [-1, 1)
    theta = np.deg2rad(affine.rotation_range) * u[:, 0]
    tx, ty = affine.width_shift_range * w * u[:, 1], affine.height_shift_range * h * u[:, 2]
    shear = np.deg2rad(affine.shear_range) * u[:, 3]
    zx, zy = 1.0 + affine.zoom_range * u[:, 4], 1.0 + affine.zoom_range * u[:, 5]
    # Output pixel (x, y) samples input pixel c + A (p - c) - t, with A = R(theta) S(shear) Z:
    # the map from output to input coordinates that ImageProjectiveTransform expects.
    cos, sin = tf.cos(theta), tf.sin(theta)
    a00, a01 = cos * zx, (-sin - cos * tf.tan(shear)) * zy
    a10, a11 = sin * zx, (cos - sin * tf.tan(shear)) * zy
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    b0 = cx - a00 * cx - a01 * cy - tx
    b1 = cy - a10 * cx - a11 * cy - ty
    zeros = tf.zeros_like(a00)
    transforms = tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=transforms,
        output_shape=tf.constant([h, w]), fill_value=0.0, interpolation="BILINEAR",
        fill_mode=affine.fill_mode.upper())
    if images.dtype == tf.uint8:
        out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    return out


def _splitmix64(x: tf.Tensor) -> tf.Tensor:
    def mix(z, shift, mult):
        return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(shift, tf.uint64))
                                      ) * tf.constant(mult, tf.uint64)

    z = x + tf.constant(0x9E3779B97F4A7C15, tf.uint64)
    z = mix(z, 30, 0xBF58476D1CE4E5B9)
    z = mix(z, 27, 0x94D049BB133111EB)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


def uniform_from_index(index: tf.Tensor, seed: int, k: int) -> tf.Tensor:
    """[B, k] uniforms in [0, 1) that depend only on (seed, example index): a counter-based
    hash (splitmix64), vectorised over the batch, so draws do not depend on batching."""
    key = _splitmix64(tf.constant([seed], tf.uint64))
    idx = (tf.cast(index, tf.uint64)[:, None] * tf.constant(k, tf.uint64)
           + tf.cast(tf.range(k), tf.uint64))
    bits = tf.bitwise.right_shift(_splitmix64(idx + key), tf.constant(40, tf.uint64))
    return tf.cast(bits, tf.float32) / float(1 << 24)


def steps_per_epoch(manifest: dict, global_batch_size: int, split: str = "train",
                    num_examples: int | None = None) -> int:
    n = manifest["splits"][split]["num_examples"] if num_examples is None else num_examples
    return max(1, n // global_batch_size)


@dataclasses.dataclass(frozen=True)
class Stream:
    """How a training stream is drawn and augmented: make_dataset's options, the same for the
    TFRecord, in-memory and cached-features inputs (research.training.inputs builds it from
    the run's config).

    `scale`: 'unit' float32 in [0, 1], 'raw' float32 in [0, 255] (for a backbone's own
    preprocess_input), or 'uint8'. `augment`: random flip and reflect-pad-and-crop by `pad`
    pixels; `affine`: random rotation/shift/shear/zoom on top (training only). `keep`: a
    boolean mask over the split's positions (see `example_mask`): only those examples are
    read, and an epoch is one pass over them. `rebalance`: positives and negatives 50/50.
    `start_step` of a stream whose global batch is `global_batch_size`. `shard_by` (several
    input pipelines, e.g. workers): 'slice' reads one deterministic global stream everywhere
    and keeps this pipeline's slice of every global batch (exactly the batches of one
    process); 'files' gives each pipeline its own shards (pipeline i reads shards i, i+N, ...;
    its own shuffle and augmentation keys), so nothing is read twice; batches then differ
    from a single process. `flip`: 'random' (each image, each epoch, with probability 1/2)
    or 'alternate' (`alternate_flips`). `cutout`: with `augment`, a square of that side per
    image set to the normalisation's mean (`cutout_batch`), after the scaling; 0: off."""
    seed: int = 0
    scale: str = "unit"
    augment: bool = True
    pad: int = 4
    affine: Affine | None = None
    shuffle_buffer: int = 16384
    rebalance: bool = False
    start_step: int = 0
    global_batch_size: int | None = None
    keep: np.ndarray | None = None
    shard_by: str = "slice"
    flip: str = "random"
    cutout: int = 0


def make_dataset(data_dir: str, split: str, batch_size: int, training: bool, *,
                 stream: Stream | None = None,
                 input_context: tf.distribute.InputContext | None = None,
                 verify: bool = True, **options) -> tf.data.Dataset:
    """The dataset of dicts {image, label, class_id[, index]} for one split.

    training=True: infinite, shuffled, augmented, `batch_size` per element (drop remainder),
    drawn as `stream` (or `Stream(**options)`) says. training=False: one ordered pass, each
    element also carries `index` (position in the split), the last batch may be partial;
    only `scale` and `keep` apply.
    """
    stream = stream or Stream(**options)
    if stream.scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {stream.scale!r}")
    if stream.shard_by not in ("slice", "files"):
        raise ValueError(f"shard_by must be slice or files, got {stream.shard_by!r}")
    if stream.flip not in FLIPS or (stream.flip == "alternate" and stream.rebalance):
        raise ValueError(f"flip must be one of {FLIPS} (alternate: not with rebalance), got "
                         f"{stream.flip!r}")
    manifest = load_manifest(data_dir)
    files = shard_paths(data_dir, manifest, split, verify=verify)
    if not training:
        return _eval_dataset(files, manifest["image_shape"], batch_size, stream, input_context)
    return _train_dataset(files, manifest, split, batch_size, stream, input_context)


def _kept(ds, keep):
    """The (position, record) pairs of the kept examples."""
    if keep is None:
        return ds
    keep_t = tf.constant(np.asarray(keep, bool))
    return ds.filter(lambda i, _: tf.gather(keep_t, i))


def _eval_dataset(files, image_shape, batch_size, stream: Stream, input_context):
    ds = _kept(tf.data.TFRecordDataset(files).enumerate(), stream.keep)
    if input_context and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    ds = ds.batch(batch_size, drop_remainder=False)

    def parse_eval(index, serialized):
        out = parse_batch(serialized, image_shape)
        out["image"] = scale_images(out["image"], stream.scale)
        out["index"] = index
        return out

    return ds.map(parse_eval, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def _train_dataset(files, manifest, split, batch_size, stream: Stream, input_context):
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    global_batch_size = stream.global_batch_size or batch_size * num_pipelines
    sizes = [sh["num_examples"] for sh in manifest["splits"][split]["shards"]]
    seed = stream.seed
    if stream.shard_by == "files" and num_pipelines > 1:
        if stream.keep is not None or stream.rebalance:
            raise DataError("input sharding by files does not combine with training subsets, "
                            "--exclude_classes or --rebalance; use slice")
        if len(files) < num_pipelines:
            raise DataError(f"{split} has {len(files)} shards for {num_pipelines} input "
                            "pipelines: sharding by files needs at least one each (rebuild "
                            "with more shards, or shard by slice)")
        files, sizes = files[pipeline_id::num_pipelines], sizes[pipeline_id::num_pipelines]
        global_batch_size //= num_pipelines  # this pipeline's own stream
        seed = seed * 1_000_003 + pipeline_id
        num_pipelines = 1  # nothing left to slice
    draw = dataclasses.replace(stream, seed=seed, global_batch_size=global_batch_size)
    if stream.rebalance:
        ds = _rebalanced_records(files, sizes, manifest["image_shape"], draw)
    else:
        ds = _shuffled_records(files, sizes, manifest["image_shape"], draw)
    ds = ds.rebatch(global_batch_size, drop_remainder=True)
    ds = _pipeline_slice(ds, global_batch_size, num_pipelines, pipeline_id)
    ds = ds.rebatch(batch_size, drop_remainder=True)
    n = _num_kept(sizes, stream)
    return ds.map(lambda index, out: augment_and_scale(out, index, draw, n),
                  num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def _pipeline_slice(ds, global_batch_size: int, num_pipelines: int, pipeline_id: int):
    """Each input pipeline keeps its slice of every global batch of (index, value) pairs."""
    if num_pipelines <= 1:
        return ds
    per = global_batch_size // num_pipelines
    lo, hi = pipeline_id * per, (pipeline_id + 1) * per
    return ds.map(lambda i, r: (i[lo:hi], tf.nest.map_structure(lambda v: v[lo:hi], r)))


def alternate_flips(position: tf.Tensor, epoch: tf.Tensor, seed: int) -> tf.Tensor:
    """airbench's alternating flips: a random half of the images (a draw per image, the same
    in every epoch) is flipped in even epochs and the other half in odd ones, so every image
    is flipped in exactly one of any two consecutive epochs."""
    base = uniform_from_index(position, seed + FLIP_KEY, 1)[:, 0] < 0.5
    return tf.math.logical_xor(base, tf.equal(epoch % 2, 1))


def augment_and_scale(out: dict, index: tf.Tensor, stream: Stream, n: int) -> dict:
    """The training stream's last step, keyed on each example's stream index (and, for
    alternating flips, its position in the split and its epoch, index // n): flip and crop,
    the affine augmentation, then the input scaling."""
    out = dict(out)
    position = out.pop("position")
    if stream.augment:
        flip = (alternate_flips(position, index // n, stream.seed)
                if stream.flip == "alternate" else None)
        out["image"] = augment_batch(out["image"], uniform_from_index(index, stream.seed, 3),
                                     stream.pad, flip)
    if stream.affine is not None and stream.affine.active:
        out["image"] = affine_batch(out["image"],
                                    uniform_from_index(index, stream.seed + AFFINE_KEY, 6),
                                    stream.affine)
    out["image"] = scale_images(out["image"], stream.scale)
    if stream.augment and stream.cutout:
        image = out["image"]
        out["image"] = cutout_batch(image, uniform_from_index(index, stream.seed + CUTOUT_KEY,
                                                              2), stream.cutout,
                                    cutout_fill(image.shape[-1], stream.scale))
    return out


def _epoch_shard_order(num_shards: int, seed: int, epoch):
    """The order epoch `epoch` reads the shards in (one stateless shuffle per epoch)."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_shards), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))


def _chunk_permutation(k, seed: int, epoch, chunk_index):
    return tf.random.experimental.stateless_shuffle(
        tf.range(k), seed=tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + epoch,
                                    chunk_index]))


def _epoch_records(files, sizes, stream: Stream):
    """epoch -> that epoch's (split position, serialized record) pairs, in its shard order
    (only `keep`'s)."""
    names = tf.constant(files)
    starts = tf.constant(np.cumsum([0] + list(sizes[:-1])), tf.int64)

    def epoch_records(e):
        perm = _epoch_shard_order(len(files), stream.seed, e)
        # Sequential reads in a per-epoch file order: shards are class-mixed at write time and
        # the chunk permutation mixes ~chunk/shard_size shards; parallel interleave measured
        # slower on 2 cores. Each shard's records are numbered by their position in the split.
        pairs = tf.data.Dataset.from_tensor_slices((tf.gather(names, perm),
                                                    tf.gather(starts, perm)))
        records = pairs.flat_map(lambda path, start: tf.data.TFRecordDataset(
            path, buffer_size=1 << 20).enumerate(start))
        return _kept(records, stream.keep)

    return epoch_records


def _num_kept(sizes, stream: Stream) -> int:
    return sum(sizes) if stream.keep is None else int(np.sum(stream.keep))


def _shuffled_records(files, sizes, image_shape, stream: Stream):
    """(stream index, parsed examples) in chunks, the shuffled order `train_positions`
    describes: shards in a per-epoch order, read sequentially, cut into chunks of
    `shuffle_buffer` records, each chunk permuted (2-5x faster in tf.data than shuffling
    element by element, and a chunk can be skipped whole on resume). Example positions
    e*n + j*chunk + i are the augmentation's RNG keys."""
    n = _num_kept(sizes, stream)
    chunk = max(1, min(stream.shuffle_buffer, n))
    first_epoch, offset = divmod(stream.start_step * stream.global_batch_size, n)
    skip_chunks, skip_in_chunk = divmod(offset, chunk)
    epoch_records = _epoch_records(files, sizes, stream)

    def epoch(e):
        first = tf.equal(e, first_epoch)
        chunks = epoch_records(e).batch(chunk).enumerate()
        chunks = chunks.skip(tf.where(first, tf.constant(skip_chunks, tf.int64), 0))

        def permute(j, pairs):
            positions, records = pairs
            k = tf.shape(records, out_type=tf.int64)[0]
            perm = _chunk_permutation(k, stream.seed, e, j)
            index = e * n + j * chunk + tf.range(k)
            drop = tf.where(first & tf.equal(j, skip_chunks),
                            tf.constant(skip_in_chunk, tf.int64), 0)
            # Parse the whole chunk in one op, then permute dense tensors (cheap copies).
            parsed = {**parse_batch(records, image_shape), "position": positions}
            parsed = {key: tf.gather(v, perm)[drop:] for key, v in parsed.items()}
            return index[drop:], parsed

        return chunks.map(permute, num_parallel_calls=2)

    return tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch)


def _rebalanced_records(files, sizes, image_shape, stream: Stream):
    """(stream index, parsed examples): positives and negatives drawn 50/50 from a shuffled
    stream of the kept records."""
    def is_pos(x):
        return tf.equal(tf.io.parse_single_example(x, _LABEL)["label"], 1)

    chunk = max(1, min(stream.shuffle_buffer, _num_kept(sizes, stream)))
    records = tf.data.Dataset.range(tf.int64.max).flat_map(
        _epoch_records(files, sizes, stream)).map(lambda _, r: r)
    records = records.shuffle(chunk, seed=stream.seed)
    ds = tf.data.Dataset.sample_from_datasets(
        [records.filter(is_pos), records.filter(lambda x: tf.logical_not(is_pos(x)))],
        [0.5, 0.5], seed=stream.seed)
    start = stream.start_step * stream.global_batch_size
    ds = ds.skip(start).enumerate(start=start).batch(chunk)
    return ds.map(lambda i, r: (i, {**parse_batch(r, image_shape),
                                    "position": tf.fill(tf.shape(i), tf.constant(-1, tf.int64))}))


def train_positions(shard_sizes: list[int], stream: Stream) -> tf.data.Dataset:
    """(stream index, split position) of every example of the training stream, in the exact
    order `make_dataset(training=True)` reads the TFRecords (shards in a per-epoch order, a
    permutation per chunk of `shuffle_buffer`; only `keep`'s examples), from
    `stream.start_step` on: the one description of the order, for inputs that can gather by
    position (the whole split in memory, cached features)."""
    keep = stream.keep
    total = int(sum(shard_sizes))
    keep_t = None if keep is None else tf.constant(np.asarray(keep, bool))
    n = total if keep is None else int(np.sum(keep))
    starts = tf.constant(np.cumsum([0] + list(shard_sizes[:-1])), tf.int64)
    ends = tf.constant(np.cumsum(shard_sizes), tf.int64)
    chunk = max(1, min(stream.shuffle_buffer, n))
    num_chunks = -(-n // chunk)
    first_epoch, offset = divmod(stream.start_step * stream.global_batch_size, n)

    def epoch(e):
        order = _epoch_shard_order(len(shard_sizes), stream.seed, e)
        positions = tf.ragged.range(tf.gather(starts, order), tf.gather(ends, order)).flat_values
        if keep_t is not None:
            positions = tf.boolean_mask(positions, tf.gather(keep_t, positions))

        def permute(j):
            part = positions[j * chunk:(j + 1) * chunk]
            k = tf.shape(part, out_type=tf.int64)[0]
            return e * n + j * chunk + tf.range(k), tf.gather(part, _chunk_permutation(
                k, stream.seed, e, j))

        return tf.data.Dataset.range(num_chunks).map(permute).unbatch()

    return tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch).skip(offset)


def position_batches(shard_sizes: list[int], batch_size: int, stream: Stream,
                     input_context: tf.distribute.InputContext | None = None):
    """Batches of (stream index, split position), this input pipeline's slice of every
    global batch: what a gathering input feeds its replica."""
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    global_batch_size = stream.global_batch_size or batch_size * num_pipelines
    stream = dataclasses.replace(stream, global_batch_size=global_batch_size)
    ds = train_positions(shard_sizes, stream).batch(global_batch_size, drop_remainder=True)
    ds = _pipeline_slice(ds, global_batch_size, num_pipelines, pipeline_id)
    return ds.rebatch(batch_size, drop_remainder=True)


def make_memory_dataset(arrays: dict, manifest: dict, batch_size: int, *,
                        stream: Stream | None = None,
                        input_context: tf.distribute.InputContext | None = None,
                        **options) -> tf.data.Dataset:
    """The training stream of `make_dataset(..., training=True)` fed from `arrays` (the whole
    split in memory, `take_examples(data_dir, "train")`) instead of the shards: the same
    positions in the same order (`train_positions`) and the same per-example augmentation
    draws, so both streams give the same batches (train --input=memory; the lab's
    disk-vs-memory check). No rebalancing."""
    stream = stream or Stream(**options)
    sizes = [sh["num_examples"] for sh in manifest["splits"]["train"]["shards"]]
    if len(arrays["label"]) != sum(sizes):
        raise ValueError(f"{len(arrays['label'])} training examples in memory, the manifest "
                         f"lists {sum(sizes)}")
    images = tf.constant(arrays["image"])
    labels = tf.constant(arrays["label"], tf.int32)
    class_ids = tf.constant(arrays["class_id"], tf.int32)

    def finish(index, pos):
        out = {"image": tf.gather(images, pos), "label": tf.gather(labels, pos),
               "class_id": tf.gather(class_ids, pos), "position": pos}
        return augment_and_scale(out, index, stream, n)

    n = _num_kept(sizes, stream)

    return position_batches(sizes, batch_size, stream, input_context).map(
        finish, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def take_examples(data_dir: str, split: str, n: int | None = None, filter: str = "all",
                  indices=None) -> dict[str, np.ndarray]:
    """uint8 examples of a split, in split order, as arrays {image, label, class_id, index}.

    Either the first `n` that pass `filter` ('all', 'positive', 'negative', or 'balanced':
    n // 2 positives and the rest negatives, positives first), or those at `indices`.
    One ordered pass that stops as soon as it has them all.
    """
    if filter not in EXAMPLE_FILTERS:
        raise ValueError(f"filter must be one of {EXAMPLE_FILTERS}, got {filter!r}")
    wanted = None if indices is None else {int(i) for i in indices}
    quota = {1: n // 2, 0: n - n // 2} if filter == "balanced" else None
    keep_labels = {"all": (0, 1), "positive": (1,), "negative": (0,), "balanced": (0, 1)}[filter]
    taken: dict[str, list] = {"image": [], "label": [], "class_id": [], "index": []}

    def done() -> bool:
        if wanted is not None:
            return len(taken["index"]) == len(wanted)
        if quota is not None:
            return not any(quota.values())
        return n is not None and len(taken["index"]) >= n

    if not done():
        for b in batches(make_dataset(data_dir, split, 500, training=False, scale="uint8")):
            for img, lab, cid, idx in zip(b["image"].numpy(), b["label"].numpy(),
                                          b["class_id"].numpy(), b["index"].numpy()):
                if wanted is not None:
                    if int(idx) not in wanted:
                        continue
                elif lab not in keep_labels:
                    continue
                elif quota is not None:
                    if quota[int(lab)] == 0:
                        continue
                    quota[int(lab)] -= 1
                for key, value in zip(taken, (img, lab, cid, idx)):
                    taken[key].append(value)
                if done():
                    break
            if done():
                break
    image_shape = load_manifest(data_dir)["image_shape"]
    out = {k: np.asarray(v, np.uint8 if k == "image" else np.int64) for k, v in taken.items()}
    out["image"] = out["image"].reshape(-1, *image_shape)
    if filter == "balanced":
        order = np.argsort(-out["label"], kind="stable")  # positives first
        out = {k: v[order] for k, v in out.items()}
    return out


@functools.lru_cache(maxsize=8)
def split_class_ids(data_dir: str, split: str) -> np.ndarray:
    """The class id of every example of a split, in position order (one parse-only pass)."""
    manifest = load_manifest(data_dir)
    spec = {"class_id": tf.io.FixedLenFeature([], tf.int64)}
    ds = tf.data.TFRecordDataset(shard_paths(data_dir, manifest, split)).batch(4096).map(
        lambda r: tf.io.parse_example(r, spec)["class_id"])
    ids = np.concatenate([b.numpy() for b in ds]) if len(manifest["splits"][split]["shards"]) \
        else np.zeros(0, np.int64)
    ids.setflags(write=False)
    return ids


def example_mask(data_dir: str, split: str, exclude_classes=(), fraction: float | None = None,
                 per_class: int | None = None, seed: int = 0) -> np.ndarray | None:
    """Which examples of a split a run reads: not of `exclude_classes` (names), and, when
    `fraction` or `per_class` is given, a deterministic stratified subset of each class
    (round(fraction * n_c), or min(per_class, n_c); chosen by a seeded permutation).
    None when everything is kept."""
    if not exclude_classes and fraction is None and per_class is None:
        return None
    names = load_manifest(data_dir)["class_names"]
    unknown = [c for c in exclude_classes if c not in names]
    if unknown:
        raise DataError(f"--exclude_classes: {', '.join(unknown)} not among the classes of "
                        f"{data_dir}: {', '.join(names)}")
    ids = split_class_ids(data_dir, split)
    keep = ~np.isin(ids, [names.index(c) for c in exclude_classes])
    if fraction is not None or per_class is not None:
        rng = np.random.default_rng(seed)
        chosen = np.zeros_like(keep)
        for c in np.unique(ids[keep]):
            idx = np.flatnonzero(ids == c)
            idx = idx[rng.permutation(len(idx))]
            k = int(round(fraction * len(idx))) if fraction is not None else per_class
            chosen[idx[:max(1, min(k, len(idx)))]] = True
        keep &= chosen
    return keep
