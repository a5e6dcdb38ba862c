"""research.data.shards: threads and worker processes write the shards TensorFlow's writer
wrote before, byte for byte; workers never start TensorFlow; their errors are one line."""

import concurrent.futures
import concurrent.futures.process
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

import cv2
import numpy as np
import pytest
import tensorflow as tf

from research.data import shards, sources, tfrecords
from research import files
from research.data.shards import (PROCESS_MIN_IMAGES, Shard, ShardJob, _write_job, largest_first,
                                  shard_items, submit, use_processes, worker_pool)
from test_record_bytes import tf_example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_jpegs(root, n: int, size=(60, 80), seed: int = 0) -> None:
    """n smooth JPEGs in <root>/{cats,dogs}/ (large enough for reduced decoding at 16 px),
    and one whose header reads but whose pixels do not."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = ("cats", "dogs")[i % 2]
        os.makedirs(os.path.join(root, c), exist_ok=True)
        img = cv2.resize(rng.integers(0, 256, (6, 8, 3), np.uint8), size[::-1],
                         interpolation=cv2.INTER_LINEAR)
        data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        if i == 5:  # a frame header and no scan: listed, then skipped while writing
            sof = data.index(b"\xff\xc0")
            data = data[:sof + 2 + int.from_bytes(data[sof + 2:sof + 4], "big")] + b"\xff\xd9"
        with open(os.path.join(root, c, f"{c}.{i}.jpg"), "wb") as f:
            f.write(data)


def tf_reference(data, cfg) -> tuple[dict, list[dict]]:
    """Shard file -> (bytes, sha256, records) and the skipped files, as the writer before
    research.data.shards made them: each split's seeded permutation cut into shards, each
    image decoded on its own, serialized by tf.train.Example, written by TFRecordWriter."""
    splits, _ = tfrecords.make_splits(data, cfg)
    positive = data.class_names.index(cfg.positive_class)
    shards, skipped = {}, []
    for k, name in enumerate(tfrecords.SPLITS):
        split = splits[name]
        num = max(1, min(cfg.shards[name], len(split)))
        order = np.random.default_rng(cfg.seed + 100 + k).permutation(len(split))
        for s, idx in enumerate(np.array_split(order, num)):
            path = os.path.join(cfg.out_dir + "-ref", f"{name}-{s:05d}-of-{num:05d}.tfrecord")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            n = 0
            with tf.io.TFRecordWriter(path) as w:
                for i in idx:
                    try:
                        image = split.images[i]
                    except Exception as e:  # noqa: BLE001 - the old writer listed these
                        skipped.append({"file": split.images.where(i), "reason": str(e)})
                        continue
                    cid = int(split.class_ids[i])
                    w.write(tf_example(image, int(cid == positive), cid, data.class_names[cid],
                                       -1, split.source_ids[i]))
                    n += 1
            raw = open(path, "rb").read()
            shards[os.path.basename(path)] = (raw, hashlib.sha256(raw).hexdigest(), n)
    return shards, skipped


def convert(source, out, parallel: str, reduced: bool):
    data = sources.load_source(str(source), image_size=(16, 16), reduced_decode=reduced,
                               num_threads=2)
    cfg = tfrecords.WriteConfig(str(out), positive_class="cats", parallel=parallel,
                                shards={"train": 5, "val": 2, "test": 3})
    listed = list(data.skipped)
    return data, cfg, listed, tfrecords.write_tfrecords(data, cfg, str(source))


@pytest.mark.slow  # worker pools and TensorFlow's writer, 8 conversions: ~10 s idle
@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_threads_and_processes_write_tensorflows_shards_byte_for_byte(tmp_path, kind):
    make_jpegs(tmp_path / "photos", 41)
    source = tmp_path / "photos"
    if kind == "tar":
        source = tmp_path / "photos.tar"
        with tarfile.open(source, "w") as t:
            t.add(tmp_path / "photos", arcname="photos")
    for reduced in (False, True):
        outs = {}
        for parallel in ("threads", "processes"):
            out = tmp_path / f"{parallel}-{reduced}"
            data, cfg, listed, manifest = convert(source, out, parallel, reduced)
            outs[parallel] = out
            if parallel == "threads":
                ref, ref_skipped = tf_reference(sources.load_source(
                    str(source), image_size=(16, 16), reduced_decode=reduced), cfg)
            entries = [sh for s in manifest["splits"].values() for sh in s["shards"]]
            assert sorted(e["file"] for e in entries) == sorted(ref)
            for e in entries:
                raw, sha, n = ref[e["file"]]
                assert (out / e["file"]).read_bytes() == raw, (parallel, reduced, e["file"])
                assert (e["sha256"], e["bytes"], e["num_examples"]) == (sha, len(raw), n)
            # Counts in = counts out: every listed image is in a shard or skipped once.
            assert [s["file"] for s in manifest["skipped"][len(listed):]] == [
                s["file"] for s in ref_skipped] and len(ref_skipped) == 1
            assert sum(s["num_examples"] for s in manifest["splits"].values()) == 40
        assert ((outs["threads"] / "manifest.json").read_bytes()
                == (outs["processes"] / "manifest.json").read_bytes())


# A __main__ that imports TensorFlow, as make_tfrecords' does: multiprocessing would run it
# again in every worker unless shards.submit hides it.
MAIN_WITH_TENSORFLOW = """
import json
import tensorflow
from research.data import shards
if __name__ == "__main__":
    with shards.worker_pool(2) as pool:
        print(json.dumps([shards.submit(pool, shards.worker_info).result() for _ in range(3)]))
"""


@pytest.mark.slow  # a fresh process that imports TensorFlow
def test_workers_never_start_tensorflow_and_decode_on_one_thread(tmp_path):
    script = tmp_path / "main_with_tf.py"
    script.write_text(MAIN_WITH_TENSORFLOW)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(info) == 3 and not any(i["tensorflow"] for i in info)
    assert {i["cv2_threads"] for i in info} == {1}


@pytest.mark.slow  # a worker pool
def test_an_archive_cut_short_mid_shard_is_one_line_naming_it(tmp_path):
    make_jpegs(tmp_path / "photos", 41)
    tar = tmp_path / "photos.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "photos", arcname="photos")
    data = sources.load_source(str(tar), image_size=(16, 16))  # listed whole, then cut
    with tarfile.open(tar) as t:
        last = [m for m in t.getmembers() if m.isfile()][-1]
    with open(tar, "r+b") as f:
        f.truncate(last.offset_data + 10)
    cfg = tfrecords.WriteConfig(str(tmp_path / "out"), positive_class="cats",
                                parallel="processes")
    with pytest.raises(sources.SourceError) as e:
        tfrecords.write_tfrecords(data, cfg, str(tar))
    assert f"{tar}: truncated or corrupt archive" in str(e.value)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["photos", "photos.tar"]  # no output, no temporary


@pytest.mark.slow  # a worker pool
def test_a_file_gone_after_listing_is_skipped_by_a_worker_and_named(tmp_path):
    make_jpegs(tmp_path / "photos", 41)
    data = sources.load_source(str(tmp_path / "photos"), image_size=(16, 16))
    gone = tmp_path / "photos" / "dogs" / "dogs.7.jpg"
    gone.unlink()
    cfg = tfrecords.WriteConfig(str(tmp_path / "out"), positive_class="cats",
                                parallel="processes")
    manifest = tfrecords.write_tfrecords(data, cfg, str(tmp_path / "photos"))
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert str(gone) in reasons and "No such file" in reasons[str(gone)]
    assert sum(s["num_examples"] for s in manifest["splits"].values()) == 39
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


@pytest.mark.slow  # a worker pool
def test_a_full_disk_in_a_worker_is_the_out_of_space_error(tmp_path):
    # /dev/full fails every write with ENOSPC, as a full disk does; the worker's OSError
    # reaches the main process with its errno, which write_tfrecords turns into one line.
    (tmp_path / ".s.tfrecord.tmp").symlink_to("/dev/full")
    make_jpegs(tmp_path / "photos", 4)
    data = sources.load_source(str(tmp_path / "photos"), image_size=(16, 16))
    split = data.splits["train"]
    job = ShardJob(str(tmp_path / "s.tfrecord"),
                   shard_items(split, np.arange(3), data.class_names, 0),
                   split.images.tree.member_reader(), (16, 16), "center_crop", False, 2)
    with worker_pool(1) as pool:
        with pytest.raises(OSError) as e:
            submit(pool, _write_job, job).result()
    assert files.is_out_of_space(e.value)
    assert not (tmp_path / "s.tfrecord").exists()


def test_processes_from_the_measured_crossover_and_the_largest_shards_first():
    assert not use_processes("auto", PROCESS_MIN_IMAGES - 1)
    assert use_processes("auto", PROCESS_MIN_IMAGES)
    assert use_processes("processes", 1) and not use_processes("threads", 10**7)
    with pytest.raises(ValueError, match="parallel must be one of"):
        use_processes("fork", 1)
    plan = [Shard("val", "v0", np.arange(3)), Shard("train", "t0", np.arange(5)),
            Shard("train", "t1", np.arange(4)), Shard("test", "s0", np.arange(5))]
    assert [s.file for s in largest_first(plan)] == ["t0", "s0", "t1", "v0"]


def test_the_last_shard_of_each_worker_is_written_in_parts_the_smallest_last():
    plan = [Shard("train", f"t{k}", np.arange(10 * k, 10 * k + 9)) for k in range(3)]
    plan += [Shard("val", "v0", np.arange(8)), Shard("test", "s0", np.arange(1))]
    jobs, parts = shards.split_tail(plan, workers=2)
    # The 2 smallest shards are the tail; a shard of one image has no parts.
    assert list(parts) == ["v0"] and [p.file for p in parts["v0"]] == [
        f".v0.part{k}" for k in range(shards.TAIL_PARTS)]
    assert all(p.part_of is plan[3] for p in parts["v0"]) and not any(j.part for j in jobs[:4])
    assert np.array_equal(np.concatenate([p.indices for p in parts["v0"]]), np.arange(8))
    assert [j.file for j in jobs] == ["t0", "t1", "t2", "s0", *(p.file for p in parts["v0"])]
    assert [len(j.indices) for j in jobs] == [9, 9, 9, 1, 2, 2, 2, 2]
    jobs, parts = shards.split_tail(plan[:1], workers=4)  # fewer shards than workers
    assert jobs == parts["t0"] and [len(j.indices) for j in jobs] == [3, 2, 2, 2]


def test_a_shard_joined_from_parts_is_the_whole_shards_bytes_and_result(tmp_path):
    items = [shards.Item(f"f{i}", None, None, i % 2, i % 2, "ab"[i % 2], -1, f"f{i}")
             for i in range(7)]

    def results(chosen):
        for item in chosen:
            image = np.full((2, 2, 3), int(item.source_id[1:]), np.uint8)
            yield (shards.encoded(item, lambda image=image: image) if item.source_id != "f3"
                   else (item, None, "f3: not decodable"))

    whole = shards.write_records(str(tmp_path / "whole"), results(items), 2)
    cuts = [items[:3], items[3:5], items[5:]]
    shard = Shard("train", "s", np.arange(7))
    part_shards = [Shard("train", f".s.part{k}", np.arange(len(c)), part_of=shard)
                   for k, c in enumerate(cuts)]
    written = [(p, shards.write_records(str(tmp_path / p.file), results(c), 2, sync=False))
               for p, c in zip(part_shards, cuts)]
    joined = shards.join_parts(str(tmp_path), shard, written)
    assert (tmp_path / "s").read_bytes() == (tmp_path / "whole").read_bytes()
    assert joined == whole and joined.skipped == [{"file": "f3", "reason": "f3: not decodable"}]
    assert sorted(os.listdir(tmp_path)) == ["s", "whole"]  # the parts are gone


def test_ordered_map_reads_a_generator_only_a_window_ahead():
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i

    out = sources.ordered_map(lambda x: 2 * x, items(), threads=2, chunk=8)
    assert [next(out) for _ in range(3)] == [0, 2, 4]
    assert len(pulled) <= (2 * 2 + 1) * 8  # the window, not the 10,000
    assert list(out) == [2 * i for i in range(3, 10_000)]


def test_threads_decode_the_next_shards_while_one_is_written(tmp_path, monkeypatch):
    # One window over the whole plan: when the first shard is written, images of later
    # shards have been decoded already (a window per shard would drain at each shard's end).
    make_jpegs(tmp_path / "photos", 41)
    data = sources.load_source(str(tmp_path / "photos"), image_size=(16, 16), num_threads=2)
    decoded = []
    original = shards.decode_file
    monkeypatch.setattr(shards, "decode_file",
                        lambda *args: decoded.append(args[2]) or original(*args))
    at_first_shard = []
    cfg = tfrecords.WriteConfig(str(tmp_path / "out"), positive_class="cats",
                                parallel="threads", shards={"train": 8, "val": 2, "test": 4})
    manifest = tfrecords.write_tfrecords(data, cfg, str(tmp_path / "photos"),
                                         progress=lambda k: at_first_shard.append(
                                             (k, len(decoded))))
    first_shard, decoded_by_then = at_first_shard[0]
    assert decoded_by_then > first_shard + 8  # images of the second shard and beyond
    assert len(decoded) == 41 and sum(s["num_examples"] for s in manifest["splits"].values()) == 40


def test_a_worker_keeps_one_archive_open_and_closes_it_for_another(tmp_path):
    make_jpegs(tmp_path / "photos", 4)
    tar, zipped = tmp_path / "photos.tar", tmp_path / "photos.zip"
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "photos", arcname="photos")
    shutil.make_archive(str(tmp_path / "photos"), "zip", tmp_path, "photos")
    trees = {p: sources.FileTree(str(p)) for p in (tar, zipped)}

    def open_fds(path):
        return [fd for fd in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{fd}") == str(path)]

    before = {p: len(open_fds(p)) for p in trees}  # each FileTree's own
    try:
        for path, other in ((tar, zipped), (zipped, tar), (tar, zipped)):
            tree, reader = trees[path], trees[path].member_reader()
            for name in tree.names():  # as a worker reads them
                assert reader.read_at(tree.locator(name), name) == tree.read(name)
            assert len(open_fds(path)) == before[path] + 1
            assert len(open_fds(other)) == before[other]  # closed when this one was opened
    finally:
        sources._OPEN_ARCHIVE.close()
    assert {p: len(open_fds(p)) for p in trees} == before


@pytest.mark.slow  # a worker pool
def test_shards_written_here_while_the_workers_start_are_the_same_bytes(tmp_path, monkeypatch):
    make_jpegs(tmp_path / "photos", 41)
    started = shards._started

    class Slow:  # workers that take three shards' time to start
        def __init__(self, future):
            self.future, self.checks = future, 0

        def done(self):
            self.checks += 1
            return self.checks > 3

        def result(self):
            return self.future.result()

    monkeypatch.setattr(shards, "_started", lambda pool: Slow(started(pool)))
    here = []
    in_threads = shards._in_threads
    monkeypatch.setattr(shards, "_in_threads",
                        lambda plan, *args: here.extend(plan) or in_threads(plan, *args))
    data, cfg, _, manifest = convert(tmp_path / "photos", tmp_path / "p", "processes", True)
    splits, _ = tfrecords.make_splits(data, cfg)
    plan = [sh for k, name in enumerate(tfrecords.SPLITS)
            for sh in tfrecords.plan_split(splits[name], name, cfg.shards[name],
                                           cfg.seed + 100 + k)]
    jobs, _ = shards.split_tail(plan, 2)
    # This process wrote the last three jobs, the smallest: parts of the smallest shards.
    assert [s.file for s in here] == [j.file for j in jobs[:-4:-1]] and all(s.part for s in here)
    convert(tmp_path / "photos", tmp_path / "t", "threads", True)
    assert sorted(os.listdir(tmp_path / "p")) == sorted(os.listdir(tmp_path / "t"))
    for name in os.listdir(tmp_path / "t"):
        assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()


def test_a_worker_that_dies_as_it_starts_is_one_line(tmp_path, monkeypatch):
    make_jpegs(tmp_path / "photos", 41)
    broken = concurrent.futures.Future()
    broken.set_exception(concurrent.futures.process.BrokenProcessPool("killed"))
    monkeypatch.setattr(shards, "_started", lambda pool: broken)
    with pytest.raises(shards.WorkerDiedError, match="ended as it started") as e:
        convert(tmp_path / "photos", tmp_path / "out", "processes", True)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # no output, no temporary folder
