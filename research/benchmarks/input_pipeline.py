r"""Images/s of the TFRecord pipeline against an in-memory numpy pipeline, in one run; and
how many host cores the training input needs per GPU.

  python -m research.benchmarks.input_pipeline --data_dir=data/cifar10 \
      [--data_dir_224=data/dvc224] [--source=../shared/data/cifar10-jpg.tar.gz]

Both pipelines batch, scale to float and prefetch the same images; the numpy one starts from
arrays already in memory (`from_tensor_slices`), the best case tf.data can do. With --source it
also times a full write of that source to TFRecords (read, decode, shard, hash).

Per core: the training stream (read + parse + flip and crop + scale) of --data_dir (32 px)
and of --data_dir_224 (224 px, the transfer path's size) runs on one tf.data thread and on
all of them; the cores a GPU needs is its training rate over the one-thread rate.
--gpu_rate_32 is airbench94's published rate (94% in 3.83 s on one A100: about 130,000
images/s); the 224 px rate is whatever the GPU's transfer run measures (--gpu_rate_224).
Beside it, the device path (--input=device) on this CPU: the split held as a tensor, and per
batch the step's own gather + flip and crop + scale (`inputs.DeviceData.batch`) in a
tf.function on all cores, fed its positions by tf.data as in training.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from research.benchmarks.ratios import Ratios
from research.data import pipeline, sources, tfrecords
from research.detector import scale_images
from research.machine import banner
from research.training import inputs

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "data/cifar10", "TFRecords written by make_tfrecords.")
flags.DEFINE_string("split", "train", "Split to read.")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("batches", 400, "Batches timed per pipeline (after 20 warm-up batches).")
flags.DEFINE_string("source", None, "If set, also time writing this source to TFRecords.")
flags.DEFINE_string("data_dir_224", None, "TFRecords at 224 px for the per-core table, e.g. "
                    "make_tfrecords --source=../shared/data/dogs-vs-cats-2000.tar "
                    "--image_size=224 --positive_class=cats --out_dir=data/dvc224.")
flags.DEFINE_float("gpu_rate_32", 130_000, "Training images/s of one GPU at 32 px (default: "
                   "airbench94's published 3.83 s to 94% on an A100).")
flags.DEFINE_float("gpu_rate_224", None, "Training images/s of one GPU at 224 px (the "
                   "transfer recipe on your GPU); unset: the cores column is left empty.")


def _rate(ds, batches: int, batch_size: int, step=lambda batch: batch) -> float:
    it = iter(ds)
    for _ in range(20):
        step(next(it))
    start = time.perf_counter()
    for _ in range(batches):
        step(next(it))
    return batches * batch_size / (time.perf_counter() - start)


def one_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` on one tf.data thread and one op thread: what one host core does."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def device_rate(data_dir: str, batches: int, bs: int) -> float:
    """Images/s of --input=device's batch building on this CPU: the training split as one
    tensor, each batch gathered, flipped, cropped and scaled by the train step's own code."""
    manifest = pipeline.load_manifest(data_dir)
    arrays = pipeline.take_examples(data_dir, "train")
    stream = pipeline.Stream(augment=True, global_batch_size=bs)
    device = inputs.DeviceData({"image": tf.constant(inputs.pack_images(arrays["image"])),
                                "label": tf.constant(arrays["label"]),
                                "class_id": tf.constant(arrays["class_id"])},
                               stream, len(arrays["label"]), tuple(manifest["image_shape"]))
    sizes = [sh["num_examples"] for sh in manifest["splits"]["train"]["shards"]]
    feed = pipeline.position_batches(sizes, bs, stream).map(
        lambda index, position: {"index": index, "position": position}).prefetch(
            pipeline.AUTOTUNE)
    step = tf.function(lambda f: device.batch(f, device.values)["image"])
    return _rate(feed, batches, bs, step)


def per_core_table(batches: int, bs: int) -> Ratios:
    """Images/s of the training stream on one thread and on all, per image size, the host
    cores one GPU's rate needs, and the device path's images/s on this CPU."""
    cores = len(os.sched_getaffinity(0))
    rows = []
    for size, d, gpu in ((32, FLAGS.data_dir, FLAGS.gpu_rate_32),
                         (224, FLAGS.data_dir_224, FLAGS.gpu_rate_224)):
        if not d:
            continue
        train = pipeline.make_dataset(d, "train", bs, True, augment=True)
        one, every = _rate(one_thread(train), batches, bs), _rate(train, batches, bs)
        dev = device_rate(d, batches, bs)
        shape = pipeline.load_manifest(d)["image_shape"]
        rows.append((f"{shape[0]}x{shape[1]}", one, every, dev, gpu))
    print(f"training input (read + parse + flip/crop + scale), batch {bs}; device: the "
          f"same augmentation in a step (--input=device) on this CPU:")
    print(f"{'size':<9}{'1 core img/s':>14}{f'{cores} cores img/s':>16}"
          f"{'device img/s':>14}{'GPU img/s':>13}{'cores per GPU':>15}")
    ratios = Ratios("input_pipeline_per_core")
    for size, one, every, dev, gpu in rows:
        need = f"{gpu / one:>15.1f}" if gpu else f"{'-':>15}"
        rate = f"{gpu:>13,.0f}" if gpu else f"{'(not given)':>13}"
        print(f"{size:<9}{one:>14,.0f}{every:>16,.0f}{dev:>14,.0f}{rate}{need}")
        ratios.add(f"training input at {size}: {cores} cores / 1 core", every / one,
                   "", f"{one:,.0f} img/s per core")
        ratios.add(f"training input at {size}: device (in-step) / tf.data, {cores} cores",
                   dev / every, "", f"{dev:,.0f} vs {every:,.0f} img/s")
    return ratios


def main(argv):
    del argv
    print(banner())
    d, bs = FLAGS.data_dir, FLAGS.batch_size
    manifest = pipeline.load_manifest(d)
    evalds = pipeline.make_dataset(d, FLAGS.split, 1024, training=False, scale="uint8")
    images = np.concatenate([b["image"].numpy() for b in evalds])
    labels = np.concatenate([b["label"].numpy() for b in evalds])
    print(f"{len(images):,} images from {d}/{FLAGS.split}, batch {bs}, {FLAGS.batches} batches")

    def numpy_ds(augment):
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        ds = ds.shuffle(16384, seed=0).repeat().batch(bs, drop_remainder=True)
        if augment:
            def aug(b):
                rand = tf.random.uniform([tf.shape(b["image"])[0], 3])
                return {**b, "image": pipeline.augment_batch(b["image"], rand)}
            ds = ds.map(aug, num_parallel_calls=pipeline.AUTOTUNE)
        ds = ds.map(lambda b: {**b, "image": scale_images(b["image"], "unit")},
                    num_parallel_calls=pipeline.AUTOTUNE)
        return ds.prefetch(pipeline.AUTOTUNE)

    rows = []
    for augment in (False, True):
        tfr = _rate(pipeline.make_dataset(d, FLAGS.split, bs, True, augment=augment),
                    FLAGS.batches, bs)
        mem = _rate(numpy_ds(augment), FLAGS.batches, bs)
        rows.append((augment, tfr, mem))
    print(f"{'augment':<9}{'tfrecord img/s':>16}{'numpy img/s':>14}{'ratio':>8}")
    ratios = Ratios("input_pipeline")
    for augment, tfr, mem in rows:
        print(f"{str(augment):<9}{tfr:>16,.0f}{mem:>14,.0f}{tfr / mem:>8.2f}")
        ratios.add(f"TFRecord / in-memory input, augment={augment}", tfr / mem,
                   "" if augment else ">= 0.5", f"{tfr:,.0f} vs {mem:,.0f} img/s")
    print("target: ratio >= 0.5 without augmentation")

    if FLAGS.source:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            data = sources.load_source(FLAGS.source)
            t_read = time.perf_counter() - start
            m = tfrecords.write_tfrecords(data, tfrecords.WriteConfig(os.path.join(tmp, "o")),
                                          FLAGS.source)
            total = time.perf_counter() - start
        n = sum(s["num_examples"] for s in m["splits"].values())
        print(f"write {n:,} images of {FLAGS.source} to TFRecords: {total:.1f}s "
              f"(read+decode {t_read:.1f}s, shard+write+hash {total - t_read:.1f}s); target <= 60s")
    per_core = per_core_table(FLAGS.batches, bs)
    ratios.rows += per_core.rows
    ratios.write()
    del manifest


if __name__ == "__main__":
    app.run(main)
