"""Writing a conversion's shards: each image decoded, resized, encoded as a tf.train.Example
(research.data.records) and framed into its shard, in this process's threads for a small
source, or in worker processes that each decode and write whole shards for a large one (the
last few in parts, joined: `split_tail`).

Threads: OpenCV releases the GIL while it decodes and resizes, so threads decode in
parallel, but reading and encoding hold it for a while in each thread, and one thread writes
all the shards in order. Processes: each worker does all of a shard's work alone and returns
only its counts and sha256, so nothing serialises them; but a pool costs a fresh
interpreter (`forkserver`: it never imports TensorFlow, which the main process has usually
loaded, and forks each worker from one process that has imported this module once).
`PROCESS_MIN_IMAGES` is where processes start to win (docs/data_at_scale.md, Speed).
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import sys
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from research.data import imaging, records
from research.data.sources import (ImageFiles, MemberReader, Split, decode_file,
                                   decoded_or_reason, ordered_map)
from research.errors import UserError

PARALLEL = ("auto", "threads", "processes")
PROCESS_MIN_IMAGES = 4000  # auto: image files from which worker processes are used


class WorkerDiedError(UserError):
    """A worker process ended without a result (killed, out of memory, a decoder crashed);
    the message names the shards it may have been writing."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a shard: what its record holds besides the pixels, and where its bytes
    are (an image file: `name` and `locator` in its FileTree; else None)."""
    where: str
    name: str | None
    locator: object
    label: int | None
    class_id: int
    class_name: str
    coarse_id: int
    source_id: str


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard of the plan: the split positions it holds, in the order they are written.
    Or a part of one (`part_of`: its file is joined into that shard's, then removed)."""
    split: str
    file: str
    indices: np.ndarray
    part_of: "Shard | None" = None

    @property
    def part(self) -> bool:
        return self.part_of is not None


@dataclasses.dataclass
class ShardResult:
    num_examples: int
    sha256: str
    bytes: int
    class_counts: list[int]
    skipped: list[dict]       # files whose pixels did not decode, in the shard's order


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What a worker process needs to write one shard of image files."""
    path: str
    items: list[Item]
    reader: MemberReader
    size: tuple[int, int]
    policy: str
    reduced: bool
    num_classes: int
    sync: bool = True  # a part of a shard is not synced: the shard it is joined into is


def shard_items(split: Split, idx: np.ndarray, class_names: list[str],
                positive_id: int | None) -> list[Item]:
    """The records' fields of split positions `idx` (label None: no positive class)."""
    files = split.images if isinstance(split.images, ImageFiles) else None
    items = []
    for i in idx:
        cid = int(split.class_ids[i])
        name = None if files is None else files.names[i]
        items.append(Item(
            where=split.source_ids[i] if files is None else files.where(i), name=name,
            locator=None if files is None else files.tree.locator(name),
            label=None if positive_id is None else int(cid == positive_id), class_id=cid,
            class_name=class_names[cid],
            coarse_id=-1 if split.coarse_ids is None else int(split.coarse_ids[i]),
            source_id=split.source_ids[i]))
    return items


def encoded(item: Item, decode: Callable[[], np.ndarray]
            ) -> tuple[Item, bytes | None, str | None]:
    """(item, its record framed, None), or (item, None, why its image cannot be decoded): what
    a decoding thread or a worker process hands the shard's writer (`write_records`)."""
    image, error = decoded_or_reason(decode)
    if error is not None:
        return item, None, error
    return item, records.frame(records.image_example(
        image.tobytes(), image.shape, item.label, item.class_id, item.class_name,
        item.coarse_id, item.source_id)), None


def write_records(path: str, results: Iterable[tuple[Item, bytes | None, str | None]],
                  num_classes: int, block: int = 32, sync: bool = True) -> ShardResult:
    """Writes one shard atomically (records.ShardFile) from `encoded` results in order: each
    framed record, `block` at a time; an item whose image did not decode is listed in
    `skipped` and left out."""
    counts = [0] * num_classes
    skipped, pending = [], []
    with records.ShardFile(path, sync) as f:
        for item, record, error in results:
            if error is not None:
                skipped.append({"file": item.where, "reason": error})
                continue
            pending.append(record)
            counts[item.class_id] += 1
            if len(pending) == block:
                f.write_framed(pending)
                pending = []
        if pending:
            f.write_framed(pending)
    return ShardResult(f.records, f.sha256, f.bytes, counts, skipped)


def _write_job(job: ShardJob) -> ShardResult:
    """A worker process's whole shard: read, decode, resize, encode, write, hash."""
    results = (encoded(item, lambda: decode_file(job.reader, item.locator, item.name,
                                                 item.where, job.size, job.policy,
                                                 job.reduced))
               for item in job.items)
    return write_records(job.path, results, job.num_classes, sync=job.sync)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool is the parallelism: OpenCV's own threads would contend


def worker_info() -> dict:
    """What a worker process has loaded (tests/data/test_shards.py checks it never starts
    TensorFlow)."""
    return {"pid": os.getpid(), "tensorflow": "tensorflow" in sys.modules,
            "cv2_threads": cv2.getNumThreads()}


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Fresh worker processes that never import TensorFlow: forked from a `forkserver`
    (started once per main process) that has imported this module and OpenCV, not from the
    main process, whose TensorFlow is neither fork-safe nor needed."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                                  initializer=_init_worker)


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """multiprocessing runs the parent's __main__ again in every process it starts (for the
    functions defined there); make_tfrecords' and the benchmark's __main__ import TensorFlow
    and ours live in this module, so workers are started with __main__'s name and file
    hidden from it."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def submit(pool: concurrent.futures.ProcessPoolExecutor, fn: Callable, *args
           ) -> concurrent.futures.Future:
    """pool.submit, which starts the pool's workers as they are needed, in this thread: with
    __main__ hidden from them."""
    with _main_hidden():
        return pool.submit(fn, *args)


def use_processes(parallel: str, num_files: int) -> bool:
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    return parallel == "processes" or (parallel == "auto" and num_files >= PROCESS_MIN_IMAGES)


def largest_first(shards: list[Shard]) -> list[Shard]:
    """The order workers take shards in: the largest first (stable), so that the last
    shards to finish are the small ones and no worker idles long at the end."""
    return sorted(shards, key=lambda s: -len(s.indices))


def write_shards(plan: list[Shard], splits: dict[str, Split], out_dir: str,
                 class_names: list[str], positive_id: int | None, parallel: str = "auto",
                 progress: Callable[[int], None] | None = None) -> dict[str, ShardResult]:
    """Writes every shard of `plan` into `out_dir`; returns shard file -> result. Worker
    processes when `use_processes` says so and the splits are image files; else threads."""
    files = [s.images for s in splits.values() if isinstance(s.images, ImageFiles)]
    num_files = sum(len(f) for f in files)
    if len(files) == len(splits) and use_processes(parallel, num_files):
        workers = files[0].threads or os.cpu_count() or 2
        written = _in_processes(plan, splits, out_dir, class_names, positive_id, workers)
    else:
        written = _in_threads(plan, splits, out_dir, class_names, positive_id)
    results = {}
    for shard, result in written:
        results[shard.file] = result
        if progress:
            progress(len(shard.indices))
    return results


def _in_threads(plan: list[Shard], splits: dict[str, Split], out_dir: str,
                class_names: list[str], positive_id: int | None
                ) -> Iterator[tuple[Shard, ShardResult]]:
    """Shard after shard in this process: threads decode and encode a bounded window ahead of
    the writer (`_encoded_in_order`), which writes and hashes. OpenCV's own threads are held
    to one meanwhile: the decoding threads are the parallelism (10% less CPU per image
    measured)."""
    with imaging.one_opencv_thread():
        results = _encoded_in_order(plan, splits, class_names, positive_id)
        try:
            for shard in plan:
                yield shard, write_records(os.path.join(out_dir, shard.file),
                                           itertools.islice(results, len(shard.indices)),
                                           len(class_names), sync=not shard.part)
        finally:
            results.close()  # an error mid-plan: its threads stop here, not when collected


def _encoded_in_order(plan: list[Shard], splits: dict[str, Split], class_names: list[str],
                      positive_id: int | None
                      ) -> Iterator[tuple[Item, bytes | None, str | None]]:
    """`encoded` for every image of the plan, shard after shard. Image files: one window of
    threads over the whole plan (sources.ordered_map) rather than one per shard, so the next
    shard's first images are decoding while this shard's last are written, and no core idles
    at each shard's end (OpenCV releases the GIL while it decodes and resizes); the threads
    encode and frame too, which leaves the writer little to do with the GIL held."""
    positions = ((splits[shard.split].images, i, item) for shard in plan
                 for i, item in zip(shard.indices, shard_items(
                     splits[shard.split], shard.indices, class_names, positive_id)))
    if not all(isinstance(s.images, ImageFiles) for s in splits.values()):
        return (encoded(item, lambda: images[i]) for images, i, item in positions)  # arrays

    def encode(position: tuple[ImageFiles, int, Item]):
        files, _, item = position
        return encoded(item, lambda: decode_file(files.tree, item.locator, item.name,
                                                 item.where, files.size, files.policy,
                                                 files.reduced))

    return ordered_map(encode, positions, next(iter(splits.values())).images.threads)


def _job(shard: Shard, split: Split, out_dir: str, class_names: list[str],
         positive_id: int | None) -> ShardJob:
    files = split.images
    return ShardJob(os.path.join(out_dir, shard.file),
                    shard_items(split, shard.indices, class_names, positive_id),
                    files.tree.member_reader(), files.size, files.policy, files.reduced,
                    len(class_names), sync=not shard.part)


TAIL_PARTS = 4  # the last shards of a process plan are written in this many parts each


def split_tail(plan: list[Shard], workers: int) -> tuple[list[Shard], dict[str, list[Shard]]]:
    """The order worker processes take the plan's shards in, and the parts of the shards
    split into parts (shard file -> its parts, in order). The largest shards first, so the
    last ones are small; and the last `workers` shards split in `TAIL_PARTS` parts each: a
    worker that takes no new shard idles until the others finish theirs, and that wait is a
    part's time, not a shard's (0.53 s of a 7.8 s conversion with whole shards: 20,000
    photos at 64 px, 12 + 4 + 2 shards, 2 workers). Each part (`part_of` its shard) is its
    own file, joined into the shard's file once every part of it is written (`join_parts`):
    the same bytes as a whole shard, since a TFRecord file is its records one after another."""
    order = largest_first(plan)
    cut = max(len(order) - workers, 0)
    jobs, parts = order[:cut], {}
    for shard in order[cut:]:
        pieces = [idx for idx in np.array_split(shard.indices, TAIL_PARTS) if len(idx)]
        if len(pieces) == 1:
            jobs.append(shard)
            continue
        parts[shard.file] = [Shard(shard.split, f".{shard.file}.part{k}", idx, part_of=shard)
                             for k, idx in enumerate(pieces)]
    tail = [p for shard_parts in parts.values() for p in shard_parts]
    return jobs + largest_first(tail), parts


def join_parts(out_dir: str, shard: Shard, parts: list[tuple[Shard, ShardResult]]
               ) -> ShardResult:
    """The shard's file written (atomically, synced) from its parts' files, in order, which
    are removed; its result as if it had been written whole."""
    with records.ShardFile(os.path.join(out_dir, shard.file)) as f:
        for part, result in parts:
            f.append_file(os.path.join(out_dir, part.file), result.num_examples)
    for part, _ in parts:
        os.remove(os.path.join(out_dir, part.file))
    results = [r for _, r in parts]
    return ShardResult(f.records, f.sha256, f.bytes,
                       [sum(c) for c in zip(*(r.class_counts for r in results))],
                       [s for r in results for s in r.skipped])


class _Joiner:
    """Collects the results of shards and parts as they finish; gives each shard's result
    once it is whole (a part's: once its last part is in, joined)."""

    def __init__(self, out_dir: str, parts: dict[str, list[Shard]]):
        self.out_dir, self.parts = out_dir, parts
        self.done: dict[str, ShardResult] = {}

    def finished(self, job: Shard, result: ShardResult) -> Iterator[tuple[Shard, ShardResult]]:
        if not job.part:
            yield job, result
            return
        self.done[job.file] = result
        shard = job.part_of
        parts = self.parts[shard.file]
        if all(p.file in self.done for p in parts):
            yield shard, join_parts(self.out_dir, shard,
                                    [(p, self.done.pop(p.file)) for p in parts])


def _in_processes(plan: list[Shard], splits: dict[str, Split], out_dir: str,
                  class_names: list[str], positive_id: int | None, workers: int
                  ) -> Iterator[tuple[Shard, ShardResult]]:
    """Whole shards in `workers` processes, the largest first, the last ones in parts
    (`split_tail`); at most 2 x workers jobs are submitted ahead, so the items of a
    1.28 M-image plan are never all in memory at once. Until the first worker is up (a new
    forkserver imports numpy and OpenCV first: 0.25 s measured, which this process spent
    waiting), this process writes the smallest jobs itself, in threads: the same bytes,
    whoever writes a shard or a part."""
    jobs, parts = split_tail(plan, workers)
    todo, joiner = collections.deque(jobs), _Joiner(out_dir, parts)
    pending: dict[concurrent.futures.Future, Shard] = {}
    pool = worker_pool(workers)
    try:
        started = _started(pool)
        while todo and not started.done():
            for job, result in _in_threads([todo.pop()], splits, out_dir, class_names,
                                           positive_id):
                yield from joiner.finished(job, result)
        try:
            started.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise WorkerDiedError("a conversion worker process ended as it started (killed or "
                                  "out of memory); nothing was written") from None
        while todo or pending:
            while todo and len(pending) < 2 * workers:
                job = todo.popleft()
                pending[submit(pool, _write_job, _job(job, splits[job.split], out_dir,
                                                      class_names, positive_id))] = job
            done, _ = concurrent.futures.wait(pending,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                try:
                    result = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    shown = ", ".join(sorted({(j.part_of or j).file
                                              for j in (job, *pending.values())}))
                    raise WorkerDiedError(
                        f"a conversion worker process ended without a result (killed, out of "
                        f"memory, or its decoder crashed) while writing one of {shown}; "
                        "nothing was written") from None
                yield from joiner.finished(job, result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _started(pool: concurrent.futures.ProcessPoolExecutor) -> concurrent.futures.Future:
    """Done when the pool's first worker has run a job. Started from a thread of its own:
    starting the first worker waits for the forkserver's imports (later ones fork at once)."""
    starter = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return starter.submit(lambda: submit(pool, os.getpid).result())
    finally:
        starter.shutdown(wait=False)
