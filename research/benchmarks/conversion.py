r"""make_tfrecords' images/s against the decode limit of the machine, in one run.

  python -m research.benchmarks.conversion --source=../shared/data/dogs-vs-cats-2000.tar \
      --image_size=64 [--reduced_decode=false] [--workers=N] [--parallel=processes] \
      [--repeats=3]
  python -m research.benchmarks.conversion --generate=20000   # docs/data_at_scale.md's folder

The limit is measured on the same images: one thread decodes and resizes them from bytes
already in memory (OpenCV held to one thread), which is what one core can do; times the
cores, that is the most a conversion could reach. Beside it, the same decode in one thread
per core at once (the all-cores limit): on a virtual machine the cores together can give
less than cores x one core, and the second ratio, against that, says how much of the gap is
the machine's rather than the conversion's. Every image file is read once first (into the
page cache, where each repeat then finds it: a first conversion could otherwise time the
disk). Then the conversion itself runs --repeats times, each in a new process (as every
make_tfrecords run is) into a new temporary folder, timed from the first listing of the
source to the manifest renamed into place (list, check headers, plan, start the worker
processes if any, read, decode, resize, encode, write, hash, fsync; not the interpreter's
start or its imports). Both limits are measured again just before every repeat, and each
repeat's ratios are taken against the limits measured just before it: a virtual machine's
speed drifts from minute to minute (one-core limits of 1,493 and 1,063 images/s a minute
apart for the same images), and a limit measured once, minutes away from a conversion, moves
the ratio by 0.1-0.15. The median repeat's ratio of its images/s to cores x limit is printed
(target >= 0.8). CPU time per image is printed beside both, counted over this process and
every process it started (worker processes and the forkserver they are forked from): on a
machine shared with other work the wall-clock ratio is off, and the CPU ratio (the limit's
CPU per image over the conversion's) says how much of the conversion's CPU is the decode
itself. --sample_runnable adds, per repeat, how many of the conversion's threads wanted a
core (running or waiting for one) on average and how often at least one per core did: the
cores it could keep busy, which a shared machine's wall time cannot show. See
docs/data_at_scale.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from research import machine
from research.benchmarks import generated
from research.benchmarks.ratios import Ratios
from research.data import imaging, shards, sources, tfrecords

FLAGS = flags.FLAGS
flags.DEFINE_string("source", "../shared/data/dogs-vs-cats-2000.tar", "An image folder or "
                    "archive (as make_tfrecords --source).")
flags.DEFINE_integer("generate", None, "Instead of --source: this many generated 500x375 "
                     "JPEGs (research.benchmarks.generated: the folder docs/data_at_scale.md "
                     "measures), "
                     "written into a temporary folder first, outside the timings.")
flags.register_validator("generate", lambda n: n is None or n > 0,
                         "--generate must be a number of images, at least 1")
flags.DEFINE_integer("image_size", 64, "Target height and width.")
flags.DEFINE_bool("reduced_decode", True, "As make_tfrecords --reduced_decode.")
flags.DEFINE_integer("workers", None, "Decoding threads or worker processes (default: one "
                     "per core).")
flags.DEFINE_enum("parallel", "auto", shards.PARALLEL, "auto: threads below "
                  f"{shards.PROCESS_MIN_IMAGES:,} image files, worker processes from there "
                  "(as make_tfrecords); threads or processes: that one.")
flags.DEFINE_integer("repeats", 3, "Conversions timed; the ratio uses the median.")
flags.DEFINE_integer("limit_images", 2000, "Images the one-core limit is measured on.")
flags.DEFINE_bool("one_conversion", False, "Only run one conversion and print its wall and "
                  "CPU seconds (what each repeat runs, in a new process).")
flags.DEFINE_bool("sample_runnable", False, "Also sample, every 5 ms, how many of each "
                  "conversion's threads want a core (machine.runnable_threads, all its "
                  "processes): the cores it could keep busy, which a shared machine's wall "
                  "time cannot show. The sampling costs this process some CPU.")


@contextlib.contextmanager
def generated_source():
    """--generate's temporary folder (removed at the end), or None."""
    if not FLAGS.generate:
        yield None
        return
    root = tempfile.mkdtemp(prefix="conversion-generated-")
    try:
        start = time.perf_counter()
        generated.generate_photos(root, FLAGS.generate)
        print(f"generated {FLAGS.generate:,} 500x375 JPEGs in {root} in "
              f"{time.perf_counter() - start:.1f}s")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def limit_images(files: sources.ImageFiles, n: int) -> list[tuple[bytes, str]]:
    """The first `n` images' bytes and names, read into memory once for both limits."""
    return [(files.tree.read(name), name) for name in files.names[:n]]


def read_every_file(data: sources.SourceData) -> float:
    """Seconds to read every image file of `data` once, which leaves them in the page cache
    for every repeat alike: a first conversion whose files had left the cache read them from
    the disk (11.7 s against 8.3 for the repeats after it, 20,000 generated photos, this
    2-core AMD EPYC), which is the disk's speed, not the conversion's."""
    start = time.perf_counter()
    for split in data.splits.values():
        files = split.images
        for name in files.names:
            files.tree.read(name)
    return time.perf_counter() - start


def _decode_all(files: sources.ImageFiles, blobs: list[tuple[bytes, str]]) -> None:
    for data, name in blobs:
        imaging.decode_resized(data, name, files.size, files.policy, files.reduced)


def one_core_rate(files: sources.ImageFiles, blobs: list[tuple[bytes, str]]
                  ) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of decode + resize on one thread, bytes already in
    memory."""
    with imaging.one_opencv_thread():
        start, cpu = time.perf_counter(), time.thread_time()
        _decode_all(files, blobs)
        return (len(blobs) / (time.perf_counter() - start),
                (time.thread_time() - cpu) / len(blobs))


def all_cores_rate(files: sources.ImageFiles, blobs: list[tuple[bytes, str]],
                   cores: int) -> float:
    """Images/s of the same decode + resize from memory in `cores` threads at once, one image
    in `cores` each (OpenCV releases the GIL): what the cores give together, which on a
    virtual machine can be less than cores x one core (shared caches, a busy host)."""
    workers = [threading.Thread(target=_decode_all, args=(files, blobs[k::cores]))
               for k in range(cores)]
    with imaging.one_opencv_thread():
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return len(blobs) / (time.perf_counter() - start)


def convert_once() -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one conversion into a new temporary folder."""
    size = (FLAGS.image_size, FLAGS.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        print("timing", flush=True)  # for --sample_runnable, in the process that started this
        cpu, start = machine.tree_cpu_seconds(), time.perf_counter()
        data = sources.load_source(FLAGS.source, image_size=size, num_threads=FLAGS.workers,
                                   reduced_decode=FLAGS.reduced_decode)
        tfrecords.write_tfrecords(data, tfrecords.WriteConfig(
            os.path.join(tmp, "o"), positive_class=None, parallel=FLAGS.parallel), FLAGS.source)
        return time.perf_counter() - start, machine.tree_cpu_seconds() - cpu


def convert_in_new_process() -> tuple[float, float, list[int]]:
    """convert_once in a new process, as each make_tfrecords run is: its worker processes'
    forkserver starts inside the timer every time, as it does there. Also the samples of
    its runnable threads (--sample_runnable; else none)."""
    args = [f"--{name}={FLAGS[name].value}" for name in
            ("source", "image_size", "reduced_decode", "parallel", "workers")
            if FLAGS[name].value is not None]
    child = subprocess.Popen([sys.executable, "-m", __spec__.name, *args, "--one_conversion"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lambda out=out, pipe=pipe: out.extend(pipe), daemon=True)
               for out, pipe in ((lines, child.stdout), (errors, child.stderr))]
    for reader in readers:
        reader.start()
    samples, tree, listed = [], [child.pid], 0.0
    while FLAGS.sample_runnable and child.poll() is None:
        if "timing\n" in lines:
            if time.monotonic() - listed > 0.05:  # walking all of /proc takes milliseconds
                tree, listed = machine.process_tree(child.pid), time.monotonic()
            samples.append(machine.runnable_threads(tree))
        time.sleep(0.005)
    child.wait()
    for reader in readers:
        reader.join()
    if child.returncode:
        raise RuntimeError(f"the conversion failed: {''.join(errors)[-2000:]}")
    seconds, cpu = lines[-1].split()
    return float(seconds), float(cpu), samples[:-1]  # the last may be after the timer


def runnable_summary(samples: list[int], cores: int) -> str:
    if not samples:
        return ""
    busy = sum(k >= cores for k in samples) / len(samples)
    return (f"; threads wanting a core: {statistics.mean(samples):.2f} on average, "
            f">= {cores} in {busy:.0%} of {len(samples)} samples")


def main(argv):
    del argv
    if FLAGS.one_conversion:
        print(*convert_once())
        return
    print(machine.banner())
    with generated_source() as root:
        if root:
            FLAGS.source = root
        benchmark()


def benchmark() -> None:
    cores = len(os.sched_getaffinity(0))
    data = sources.load_source(FLAGS.source, image_size=(FLAGS.image_size, FLAGS.image_size),
                               reduced_decode=FLAGS.reduced_decode)
    if not all(isinstance(s.images, sources.ImageFiles) for s in data.splits.values()):
        raise app.UsageError(f"--source={FLAGS.source}: not an image folder or archive")
    n = sum(len(s) for s in data.splits.values())
    processes = shards.use_processes(FLAGS.parallel, n)
    train = data.splits["train"].images
    blobs = limit_images(train, FLAGS.limit_images)
    what = "reduced" if FLAGS.reduced_decode else "full"
    print(f"{n:,} images of {FLAGS.source} to {FLAGS.image_size} px, {what} JPEG decoding, "
          f"{FLAGS.workers or cores} {'worker processes' if processes else 'threads'}; "
          f"load average {os.getloadavg()[0]:.2f} on {cores} cores; the limits decode "
          f"{len(blobs):,} of the images from memory, before each conversion")
    print(f"every file read once first, so that each conversion finds it in the page cache: "
          f"{read_every_file(data):.2f}s")
    runs = []  # (images/s, CPU s per image, one-core limit, its CPU s per image, all cores)
    for k in range(FLAGS.repeats):
        limit, limit_cpu = one_core_rate(train, blobs)
        together = all_cores_rate(train, blobs, cores)
        print(f"decode limit {k + 1}: {limit:,.0f} images/s on one core, {limit_cpu * 1e3:.3f} "
              f"CPU ms per image, x {cores} cores = {cores * limit:,.0f} images/s; all-cores "
              f"decode limit: {together:,.0f} images/s ({cores} threads decoding from memory "
              f"at once: {together / limit:.2f} x one core)")
        seconds, cpu, samples = convert_in_new_process()
        runs.append((n / seconds, cpu / n, limit, limit_cpu, together))
        print(f"conversion {k + 1}: {n / seconds:,.0f} images/s ({seconds:.2f}s from listing to "
              f"the manifest in place), {cpu / n * 1e3:.3f} CPU ms per image (all processes), "
              f"load average {os.getloadavg()[0]:.2f}; ratio {n / seconds / (cores * limit):.2f} "
              f"(to all cores {n / seconds / together:.2f})" + runnable_summary(samples, cores))
    # The median repeat by its ratio (of an even number, the lower middle one).
    rate, cpu, limit, limit_cpu, together = sorted(runs, key=lambda r: r[0] / r[2])[
        (len(runs) - 1) // 2]
    ratio = rate / (cores * limit)
    print(f"ratio conversion / (cores x limit): {ratio:.2f} (the median of {len(runs)} repeats, "
          "each against the limit measured just before it)   target >= 0.8")
    print(f"ratio conversion / all-cores limit: {rate / together:.2f} (what the cores give at "
          "once, measured; not the target's measure)")
    print(f"CPU ratio (limit's CPU per image / the conversion's): {limit_cpu / cpu:.2f}")
    ratios = Ratios("conversion")
    ratios.add(f"make_tfrecords / ({cores} cores x one-core decode limit), {what} decoding, "
               f"{FLAGS.image_size} px", ratio, ">= 0.8",
               f"{rate:,.0f} vs {cores} x {limit:,.0f} img/s, "
               f"{'processes' if processes else 'threads'}")
    ratios.add(f"make_tfrecords / all-cores decode limit ({cores} threads at once), {what} "
               f"decoding, {FLAGS.image_size} px", rate / together, "",
               f"{rate:,.0f} vs {together:,.0f} img/s")
    ratios.write()


if __name__ == "__main__":
    app.run(main)
