r"""Images/s of the TFRecord pipeline against an in-memory numpy pipeline, in one run.

  python -m research.benchmarks.input_pipeline --data_dir=data/cifar10 \
      [--source=../shared/data/cifar10-jpg.tar.gz]

Both pipelines batch, scale to float and prefetch the same images; the numpy one starts from
arrays already in memory (`from_tensor_slices`), the best case tf.data can do. With --source it
also times a full write of that source to TFRecords (read, decode, shard, hash).
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

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "data/cifar10", "TFRecords written by make_tfrecords.")
flags.DEFINE_string("split", "train", "Split to read.")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("batches", 400, "Batches timed per pipeline (after 20 warm-up batches).")
flags.DEFINE_string("source", None, "If set, also time writing this source to TFRecords.")


def _rate(ds, batches: int, batch_size: int) -> float:
    it = iter(ds)
    for _ in range(20):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


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
    ratios.write()
    del manifest


if __name__ == "__main__":
    app.run(main)
