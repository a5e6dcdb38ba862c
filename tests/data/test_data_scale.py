"""make_tfrecords at scale: memory bounded by a window of images, not by the data set;
reduced JPEG decoding; archives read member by member (docs/data_at_scale.md)."""

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import cv2
import numpy as np
import pytest
from PIL import Image

import helpers
from research import machine
from research.benchmarks import generated
from research.data import imaging, sources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Converts a folder in a fresh process and prints its peak RSS (KB), so that the pixels of
# one conversion cannot hide in another's allocator.
CONVERT = """
import resource, sys
from research.data import sources, tfrecords
data = sources.load_source(sys.argv[1], image_size=(224, 224))
tfrecords.write_tfrecords(data, tfrecords.WriteConfig(sys.argv[2], positive_class='cats'),
                          sys.argv[1])
print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_photos(root: str, n: int, size=(240, 320)) -> None:
    """n smooth random JPEGs in <root>/{cats,dogs}/, fast to encode."""
    generated.generate_photos(root, n, size, noise=0)


def peak_rss_mb(folder, out) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run([sys.executable, "-c", CONVERT, str(folder), str(out)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("peak_rss_kb")][-1]
    return int(line.split()[1]) / 1024


@pytest.mark.slow  # two fresh TensorFlow processes: 20 s idle, minutes on a busy machine
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    # 60 and 600 photos at 224 px: the 540 more hold 81 MB of pixels (and 1-2 MB of JPEG
    # bytes); holding a split in memory, as before, grew peak RSS by more than that.
    make_photos(str(tmp_path / "small"), 60)
    make_photos(str(tmp_path / "large"), 600)
    small = peak_rss_mb(tmp_path / "small", tmp_path / "o1")
    large = peak_rss_mb(tmp_path / "large", tmp_path / "o2")
    pixels = 540 * 224 * 224 * 3 / 2**20
    assert large - small < 0.3 * pixels, (small, large, pixels)


def test_reduced_decode_picks_the_largest_reduction_that_still_shrinks():
    # 500x375 to 64 center_crop is resized to 85x64 first: 1/4 (125x94) is enough, 1/8 not.
    assert imaging.reduction(500, 375, (64, 64)) == 4
    assert imaging.reduction(500, 375, (224, 224)) == 1   # 1/2 would be 250x188 < 299x224
    assert imaging.reduction(500, 375, (64, 64), "stretch") == 4
    assert imaging.reduction(1024, 1024, (64, 64)) == 8
    assert imaging.reduction(128, 128, (64, 64)) == 2


def test_reduced_decode_is_close_to_full_and_off_is_bit_identical():
    smooth = cv2.resize(np.random.default_rng(0).integers(0, 256, (6, 8, 3), np.uint8),
                        (400, 300), interpolation=cv2.INTER_LINEAR)
    data = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    full = imaging.resize_image(imaging.decode_image(data), (48, 48))
    off = imaging.decode_resized(data, "x.jpg", (48, 48), reduced=False)
    on = imaging.decode_resized(data, "x.jpg", (48, 48), reduced=True)
    np.testing.assert_array_equal(off, full)
    assert on.shape == full.shape and on.dtype == np.uint8
    assert not np.array_equal(on, full)  # it did decode reduced
    assert np.abs(on.astype(int) - full.astype(int)).mean() < 2.0
    png = helpers.encode(Image.fromarray(smooth[:, :, ::-1]), "PNG")
    np.testing.assert_array_equal(  # other formats are decoded at full size
        imaging.decode_resized(png, "x.png", (48, 48), reduced=True),
        imaging.decode_resized(png, "x.png", (48, 48)))


def test_a_rotated_jpeg_is_decoded_full_when_reduced_would_be_too_small():
    # EXIF orientation 6 turns a 200x64 JPEG into 64x200: for 48x48 the header's sides allow
    # 1/2, but the turned 32-pixel width would need enlarging, so it decodes in full.
    img = np.random.default_rng(1).integers(0, 256, (64, 200, 3), np.uint8)
    plain = helpers.encode(Image.fromarray(img), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", exif=exif.tobytes())
    rotated = buf.getvalue()
    assert imaging.decode_image(rotated).shape == (200, 64, 3)
    assert imaging.reduction(*imaging.image_size(plain), (48, 48)) == 1
    assert imaging.reduction(*imaging.image_size(rotated), (24, 24)) == 2
    np.testing.assert_array_equal(
        imaging.decode_resized(rotated, "r.jpg", (48, 48), reduced=True),
        imaging.decode_resized(rotated, "r.jpg", (48, 48)))


def test_archives_are_indexed_not_read_and_a_tar_gz_is_spilled_once(tmp_path):
    root = tmp_path / "imgs"
    helpers.make_flat_folder(str(root))
    tgz = helpers.tar_folder(str(root), str(tmp_path / "imgs.tar.gz"))
    plain = tmp_path / "imgs.tar"
    with gzip.open(tgz, "rb") as src, open(plain, "wb") as dst:
        dst.write(src.read())
    zipped = helpers.zip_folder(str(root), str(tmp_path / "imgs.zip"))
    spill = tmp_path / "spill"
    spill.mkdir()
    trees = [sources.FileTree(str(root)), sources.FileTree(str(plain)),
             sources.FileTree(zipped), sources.FileTree(tgz, spill_dir=str(spill))]
    assert len(os.listdir(spill)) == 1  # the .tar.gz's uncompressed copy, and only it
    for tree in trees:
        assert tree.names() == sorted(os.listdir(root))
        assert not any(isinstance(v, bytes) for v in tree._files.values())
        for n in tree.names():
            assert tree.read(n) == (root / n).read_bytes()
            assert tree.read(n, 10) == (root / n).read_bytes()[:10]
    trees[-1].close()
    assert os.listdir(spill) == []
    with tarfile.open(plain) as t:  # a member cut short in a plain tar names the archive
        offset = [m for m in t.getmembers() if m.isfile()][-1].offset_data
    with open(plain, "r+b") as f:
        f.truncate(offset + 3)
    with pytest.raises(sources.SourceError, match="imgs.tar: truncated or corrupt"):
        tree = sources.FileTree(str(plain))
        [tree.read(n) for n in tree.names()]


def test_a_file_whose_header_reads_but_pixels_do_not_is_listed_and_left_out(tmp_path):
    root = tmp_path / "imgs"
    helpers.make_flat_folder(str(root))
    good = (root / "cat.0.jpg").read_bytes()
    sof = good.index(b"\xff\xc0")
    end = sof + 2 + int.from_bytes(good[sof + 2:sof + 4], "big")
    (root / "cat.0.jpg").write_bytes(good[:end] + b"\xff\xd9")  # a frame header, no scan
    assert imaging.image_size(good[:end]) == (60, 50)
    data, manifest = helpers.write_tfrecords(root, tmp_path / "out", positive_class="cat")
    [listed] = manifest["skipped"]
    assert listed["file"].endswith("cat.0.jpg") and "not a decodable image" in listed["reason"]
    splits = manifest["splits"]
    assert sum(s["num_examples"] for s in splits.values()) == 15  # 16 listed, 1 left out
    assert sum(s["class_counts"]["cat"] for s in splits.values()) == 7


def test_conversion_benchmark_prints_its_ratio_to_the_decode_limit(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "research.benchmarks.conversion", "--generate=40",
         "--image_size=16", "--limit_images=20",
         "--parallel=processes", "--workers=2", "--repeats=2", "--sample_runnable",
         f"--ratios_json={tmp_path / 'r.json'}"],
        env={**os.environ, "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path)}, cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    generated = re.search(r"generated 40 500x375 JPEGs in (\S+) in", res.stdout)
    assert generated and not os.path.exists(generated[1])  # removed at the end
    assert f"40 images of {generated[1]}" in res.stdout and "reduced JPEG decoding" in res.stdout
    assert "2 worker processes" in res.stdout and "load average" in res.stdout
    assert "from listing to the manifest in place" in res.stdout  # what the timer covers
    cpu = [float(ln.split(" CPU ms per image")[0].split()[-1])
           for ln in res.stdout.splitlines() if ln.startswith("conversion ")]
    assert len(cpu) == 2 and all(c > 0 for c in cpu)  # the workers' CPU is counted
    assert res.stdout.count("threads wanting a core:") == 2
    assert "ratio conversion / (cores x limit):" in res.stdout and "CPU ratio" in res.stdout
    together = re.search(r"all-cores decode limit: ([\d,]+) images/s \(\d+ threads", res.stdout)
    assert together and int(together[1].replace(",", "")) > 0, res.stdout
    assert "ratio conversion / all-cores limit:" in res.stdout
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 2 and rows[1]["name"].startswith("make_tfrecords / all-cores decode")


def test_the_generated_photos_are_the_same_bytes_for_the_same_seed(tmp_path):
    for name in ("a", "b"):
        generated.generate_photos(str(tmp_path / name), 3)
    names = ["cats/cats.0.jpg", "dogs/dogs.1.jpg", "cats/cats.2.jpg"]
    assert sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*.jpg")
                  ) == sorted(names)
    for name in names:
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes()
        assert imaging.image_size(data) == (500, 375)
    generated.generate_photos(str(tmp_path / "c"), 1, seed=1)
    assert (tmp_path / "c/cats/cats.0.jpg").read_bytes() != (tmp_path / "a" / names[0]
                                                             ).read_bytes()


def test_the_cpu_of_processes_started_by_processes_is_counted():
    # The conversion's worker processes are a forkserver's children, not the benchmark's,
    # and the forkserver lives on: a live child's waited-for child is counted too.
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'sum(range(3 * 10**7))']); print('done', flush=True); sys.stdin.read()")
    start = machine.tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        assert machine.tree_cpu_seconds() - start > 0.2  # ~0.5 s of the grandchild's sum
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def test_runnable_threads_counts_the_busy_threads_of_a_tree_not_the_sleeping():
    code = "import sys, time; print('ready', flush=True); "
    busy = subprocess.Popen([sys.executable, "-c", code + "exec('while True: pass')"],
                            stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", code + "time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline() == idle.stdout.readline() == "ready\n"
        time.sleep(0.1)  # the sleeper asleep
        assert {busy.pid, idle.pid} <= set(machine.process_tree(os.getpid()))
        # Running, or waiting for a core on a loaded machine: R either way.
        assert [machine.runnable_threads([busy.pid]) for _ in range(10)] == [1] * 10
        assert [machine.runnable_threads([idle.pid]) for _ in range(10)] == [0] * 10
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
