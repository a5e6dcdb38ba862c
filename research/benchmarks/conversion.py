r"""make_tfrecords' images/s against the decode limit of the machine, in one run.

  python -m research.benchmarks.conversion --source=../shared/data/dogs-vs-cats-2000.tar \
      --image_size=64 [--reduced_decode=false] [--threads=N]

The limit is measured on the same images: one thread decodes and resizes them from bytes
already in memory (OpenCV held to one thread), which is what one core can do; times the
cores, that is the most a conversion could reach. Then the conversion itself runs (list,
check headers, decode, serialize, write, hash) into a temporary folder, and the ratio of
its images/s to cores x limit is printed (target >= 0.8). See docs/data_at_scale.md.
"""

from __future__ import annotations

import os
import tempfile
import time

import cv2
from absl import app, flags

from research.benchmarks.ratios import Ratios
from research.data import imaging, sources, tfrecords
from research.machine import banner

FLAGS = flags.FLAGS
flags.DEFINE_string("source", "../shared/data/dogs-vs-cats-2000.tar", "An image folder or "
                    "archive (as make_tfrecords --source).")
flags.DEFINE_integer("image_size", 64, "Target height and width.")
flags.DEFINE_bool("reduced_decode", True, "As make_tfrecords --reduced_decode.")
flags.DEFINE_integer("threads", None, "Decoding threads (default: one per core).")
flags.DEFINE_integer("limit_images", 2000, "Images the one-core limit is measured on.")


def one_core_rate(files: sources.ImageFiles, n: int) -> float:
    """Images/s of decode + resize on one thread, bytes already in memory."""
    blobs = [(files.tree.read(name), name) for name in files.names[:n]]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        start = time.perf_counter()
        for data, name in blobs:
            imaging.decode_resized(data, name, files.size, files.policy, files.reduced)
        return len(blobs) / (time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)


def main(argv):
    del argv
    print(banner())
    cores = len(os.sched_getaffinity(0))
    size = (FLAGS.image_size, FLAGS.image_size)
    data = sources.load_source(FLAGS.source, image_size=size, num_threads=FLAGS.threads,
                               reduced_decode=FLAGS.reduced_decode)
    if not all(isinstance(s.images, sources.ImageFiles) for s in data.splits.values()):
        raise app.UsageError(f"--source={FLAGS.source}: not an image folder or archive")
    files = data.splits["train"].images
    limit = one_core_rate(files, FLAGS.limit_images)
    n = sum(len(s) for s in data.splits.values())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = sources.load_source(FLAGS.source, image_size=size, num_threads=FLAGS.threads,
                                   reduced_decode=FLAGS.reduced_decode)
        listed = time.perf_counter() - start
        tfrecords.write_tfrecords(data, tfrecords.WriteConfig(os.path.join(tmp, "o"),
                                                              positive_class=None),
                                  FLAGS.source)
        seconds = time.perf_counter() - start
    rate = n / seconds
    ratio = rate / (cores * limit)
    what = "reduced" if FLAGS.reduced_decode else "full"
    print(f"{n:,} images of {FLAGS.source} to {FLAGS.image_size} px, {what} JPEG decoding, "
          f"{FLAGS.threads or cores} threads")
    print(f"decode limit: {limit:,.0f} images/s on one core (decode + resize from memory, "
          f"{min(n, FLAGS.limit_images):,} images); x {cores} cores = {cores * limit:,.0f}")
    print(f"conversion:   {rate:,.0f} images/s ({seconds:.1f}s: listing and header checks "
          f"{listed:.1f}s, decode + write + hash {seconds - listed:.1f}s)")
    print(f"ratio conversion / (cores x limit): {ratio:.2f}   target >= 0.8")
    ratios = Ratios("conversion")
    ratios.add(f"make_tfrecords / ({cores} cores x one-core decode limit), {what} decoding, "
               f"{FLAGS.image_size} px", ratio, ">= 0.8",
               f"{rate:,.0f} vs {cores} x {limit:,.0f} img/s")
    ratios.write()


if __name__ == "__main__":
    app.run(main)
