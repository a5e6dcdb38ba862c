"""What a run reads: the TFRecords (or, for the features recipe, the cached backbone
features), restricted to the examples the run trains and evaluates on (which ones:
training/examples.py, so training, evaluation, the feature cache and the step plan agree on
the counts); or the uint8 training split kept on every replica's device and augmented inside
the train step (`DeviceData`, --input=device), and the rule --input=auto chooses by
(`choose_input`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from research import devices
from research.data import pipeline
from research.training import feature_cache
from research.training.config import ConfigError, TrainConfig
from research.training.examples import example_mask

# --input=auto reads from the device when the uint8 training split takes at most this share
# of one GPU's memory: CIFAR-10 (150 MB) fits a 16 GB card 25 times over, and the rest stays
# for the model, its activations and the allocator's rounding.
DEVICE_SHARE = 0.25


def train_stream(cfg: TrainConfig, start_step: int = 0) -> pipeline.Stream:
    """The run's training stream (seed, scaling, augmentation, subset, resume point): the one
    place it is built, for the TFRecord, in-memory and cached-features inputs alike, so they
    cannot drift apart."""
    return pipeline.Stream(seed=cfg.seed, scale=cfg.scale, augment=cfg.augment,
                           pad=cfg.crop_pad, affine=cfg.affine, rebalance=cfg.rebalance,
                           start_step=start_step, global_batch_size=cfg.batch_size,
                           keep=example_mask(cfg, "train"), shard_by=cfg.input_sharding,
                           flip=cfg.flip, cutout=cfg.cutout)


def train_input_fn(cfg: TrainConfig, start_step: int):
    """Per-replica input function for `strategy.distribute_datasets_from_function`."""
    stream = train_stream(cfg, start_step)

    def per_replica(ctx):
        return ctx.get_per_replica_batch_size(cfg.batch_size)

    if cfg.transfer == "features":
        cache = feature_cache.open_cache(cfg)
        return lambda ctx: feature_cache.make_dataset(
            cache, "train", per_replica(ctx), training=True, stream=stream, input_context=ctx)
    if cfg.input == "device":  # positions only: the step gathers and augments the pixels
        sizes = [sh["num_examples"] for sh in
                 pipeline.load_manifest(cfg.data_dir)["splits"]["train"]["shards"]]
        return lambda ctx: pipeline.position_batches(sizes, per_replica(ctx), stream, ctx).map(
            lambda index, position: {"index": index, "position": position}).prefetch(
                pipeline.AUTOTUNE)
    if cfg.input == "memory":
        arrays = pipeline.take_examples(cfg.data_dir, "train")  # one read, then from memory
        manifest = pipeline.load_manifest(cfg.data_dir)
        return lambda ctx: pipeline.make_memory_dataset(
            arrays, manifest, per_replica(ctx), stream=stream, input_context=ctx)
    return lambda ctx: pipeline.make_dataset(cfg.data_dir, "train", per_replica(ctx),
                                             training=True, stream=stream, input_context=ctx)


def eval_dataset(cfg: TrainConfig, split: str) -> tuple[tf.data.Dataset, np.ndarray]:
    """(one ordered pass over the run's examples of `split`, their expected positions)."""
    keep = example_mask(cfg, split)
    if cfg.transfer == "features":
        ds = feature_cache.make_dataset(feature_cache.open_cache(cfg), split,
                                        cfg.eval_batch_size, training=False, keep=keep)
    else:
        ds = pipeline.make_dataset(cfg.data_dir, split, cfg.eval_batch_size, training=False,
                                   scale=cfg.scale, keep=keep)
    n = pipeline.load_manifest(cfg.data_dir)["splits"][split]["num_examples"]
    return ds, (np.arange(n) if keep is None else np.flatnonzero(keep))


def train_split_bytes(manifest: dict) -> int:
    """The training split as uint8 pixels, the bytes a replica's device holds for
    --input=device."""
    return manifest["splits"]["train"]["num_examples"] * int(np.prod(manifest["image_shape"]))


def choose_input(requested: str, data_bytes: int, device_bytes: int | None, on_gpu: bool,
                 problem: str | None = None) -> tuple[str, str]:
    """(the input a run reads, why): the one rule for --input=auto, and the size check of
    --input=device. `data_bytes`: the uint8 training split; `device_bytes`: the memory of
    one replica's device (a GPU's total; on the CPU the host's available memory over the
    replicas), None if unknown; `problem`: why the run cannot gather its stream by position
    (TrainConfig.gathered_input_problem), if it cannot. --input=device on data larger than
    its device is a ConfigError with both sizes."""
    mb = f"{data_bytes / 2 ** 20:,.1f} MB"
    where = "GPU" if on_gpu else "host memory per replica"
    of = "unknown" if device_bytes is None else f"{device_bytes / 2 ** 20:,.1f} MB"
    if requested == "device":
        if device_bytes is not None and data_bytes > device_bytes:
            raise ConfigError(f"--input=device: the training split is {mb} as uint8, more than "
                              f"the {of} of {where} a replica has; use --input=tfrecords")
        return "device", f"device ({mb} of uint8 pixels on each replica's device; {of} {where})"
    if requested != "auto":
        return requested, requested
    if problem:
        return "tfrecords", f"auto: tfrecords ({problem})"
    if not on_gpu:
        return "tfrecords", ("auto: tfrecords (no GPU: on the CPU the augmentation costs the "
                             "same cores either way, and tf.data runs it beside the step)")
    if device_bytes is None:
        return "tfrecords", "auto: tfrecords (the GPU's memory is unknown: no nvidia-smi)"
    share = data_bytes / device_bytes
    if share <= DEVICE_SHARE:
        return "device", (f"auto: device (the uint8 training split, {mb}, is {share:.1%} of "
                          f"the GPU's {of}; at most {DEVICE_SHARE:.0%})")
    return "tfrecords", (f"auto: tfrecords (the uint8 training split, {mb}, is {share:.1%} of "
                         f"the GPU's {of}; more than {DEVICE_SHARE:.0%})")


def resolve_input(cfg: TrainConfig, manifest: dict, on_gpu: bool, replicas: int = 1,
                  device_bytes: int | None = None) -> str:
    """--input as the run reads it (auto resolved, device's size checked), logged when it
    was auto or device; `device_bytes` unset: measured (devices.gpu_memory, or the host's
    available memory over `replicas`)."""
    if cfg.input not in ("device", "auto"):
        return cfg.input
    if device_bytes is None:
        host = devices.host_available()
        device_bytes = devices.gpu_memory("memory.total") if on_gpu else (
            None if host is None else host // max(1, replicas))
    problem = cfg.gathered_input_problem("device")
    choice, why = choose_input(cfg.input, train_split_bytes(manifest), device_bytes, on_gpu,
                               None if problem is None else f"--{problem[0]}: {problem[1]}")
    logging.info("input: %s", why)
    return choice


# A gather moves whole values: 8 uint8 pixels packed in an int64 each, because GatherV2 has
# no uint8 kernel on GPUs (int64 lives in device memory; int32 would not).
PACK = 8


def pack_images(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] uint8 -> [N, ceil(H*W*C / 8)] int64 (each row zero-padded to 8 bytes)."""
    flat = images.reshape(len(images), -1)
    pad = -flat.shape[1] % PACK
    if pad:
        flat = np.pad(flat, [(0, 0), (0, pad)])
    return np.ascontiguousarray(flat).view(np.int64)


def unpack_images(packed: tf.Tensor, image_shape) -> tf.Tensor:
    """pack_images' inverse, for a batch of rows."""
    size = int(np.prod(image_shape))
    flat = tf.reshape(tf.bitcast(packed, tf.uint8), [tf.shape(packed)[0], -1])[:, :size]
    return tf.reshape(flat, [-1, *image_shape])


@dataclasses.dataclass(frozen=True)
class DeviceData:
    """--input=device: the training split on every replica's device (`values`, per replica
    {image: packed uint8 rows, label, class_id}); the input pipeline feeds only each
    replica's (stream index, split position) pairs (`train_input_fn`), and `batch`, called
    in the train step, gathers those examples and augments them with the tf.data path's own
    `augment_and_scale` and counter-based draws: the same batches as --input=tfrecords."""
    values: object
    stream: pipeline.Stream
    num_examples: int
    image_shape: tuple

    def batch(self, feed: dict, values: dict) -> dict:
        """The replica's training batch from its positions `feed` and its `values`."""
        position = feed["position"]
        images = unpack_images(tf.gather(values["image"], position), self.image_shape)
        # Flips and crops move pixels, so they give the same values on float32 as on uint8,
        # and float32 has the GPU kernels (MirrorPad and GatherV2 have none for uint8).
        out = {"image": tf.cast(images, tf.float32), "position": position,
               **{k: tf.cast(tf.gather(values[k], position), tf.int32)
                  for k in ("label", "class_id")}}
        out = pipeline.augment_and_scale(out, feed["index"], self.stream, self.num_examples)
        if self.stream.scale == "uint8":
            out["image"] = tf.cast(out["image"], tf.uint8)
        return out


def device_data(cfg: TrainConfig, strategy: tf.distribute.Strategy) -> DeviceData:
    """The training split read once and placed on each replica's device."""
    manifest = pipeline.load_manifest(cfg.data_dir)
    arrays = pipeline.take_examples(cfg.data_dir, "train")
    n = len(arrays["label"])
    if n != manifest["splits"]["train"]["num_examples"]:
        raise pipeline.DataError(f"{cfg.data_dir}: read {n} training examples, the manifest "
                                 f"lists {manifest['splits']['train']['num_examples']}")
    host = {"image": pack_images(arrays["image"]), "label": arrays["label"],
            "class_id": arrays["class_id"]}  # int64: in device memory, with a GPU kernel
    try:
        local = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: TensorFlow's default device
        local = None

    def on_replica(ctx):
        if local is None:
            return {k: tf.identity(v) for k, v in host.items()}
        with tf.device(local[ctx.replica_id_in_sync_group % len(local)]):
            return {k: tf.identity(v) for k, v in host.items()}

    values = strategy.experimental_distribute_values_from_function(on_replica)
    return DeviceData(values, train_stream(cfg), n, tuple(manifest["image_shape"]))
