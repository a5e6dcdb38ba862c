"""Hostile and odd input, round three: decompression bombs (refused from the header, before
decoding), names that are not UTF-8 and links out of a source's tree, paths with commas, one
lab per workdir, one line instead of a traceback (traversal, read-only folders, a shard
damaged while training, a truncated export), checks before TensorFlow loads, leftovers of
killed writes, evaluate's TensorBoard folder and portable run names."""

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import cv2
import numpy as np
import pytest

import helpers
import warm
from helpers import LOG_LINE
from research import files, runs
from research.data import imaging, sources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# absl's and TensorFlow's log lines (I1206 12:00:00.000 ..., and the C++ ones).


def write_bomb(path, w, h, level=1):
    """An all-black 8-bit gray PNG of w x h pixels: a few hundred KB that decode to w*h*3."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    z, rows = zlib.compressobj(level), bytes((w + 1) * 1000)  # filter byte 0 + w zeros
    idat = b"".join([z.compress(rows) for _ in range(h // 1000)] + [z.flush()])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return str(path)


def run_app(app, *args, cwd=ROOT, timeout=300):
    return warm.run([sys.executable, "-m", f"research.apps.{app}", *map(str, args)],
                    timeout=timeout, cwd=cwd)


def stderr_lines(res):
    """stderr without absl's and TensorFlow's log lines."""
    return [x for x in res.stderr.splitlines()
            if x.strip() and not LOG_LINE.match(x) and not x.startswith("import time:")]


# ----------------------------------------------------------------------- 1. image headers

def _encoded(ext, img, params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def _big_tiff(w, h):
    """A minimal little-endian BigTIFF header with ImageWidth (LONG8) and ImageLength."""
    entries = [struct.pack("<HHQQ", 256, 16, 1, w), struct.pack("<HHQQ", 257, 4, 1, h)]
    return b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 2) + b"".join(entries)


def test_every_extension_has_its_size_read_from_the_header():
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)
    rgba = np.dstack([rgb, np.full((37, 53), 200, np.uint8)])
    cases = {
        "png": _encoded(".png", rgb), "jpeg": _encoded(".jpg", rgb),
        "progressive jpeg": _encoded(".jpg", rgb, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
        "bmp": _encoded(".bmp", rgb), "tiff": _encoded(".tif", rgb),
        "webp lossy": _encoded(".webp", rgb, (cv2.IMWRITE_WEBP_QUALITY, 80)),
        "webp lossless": _encoded(".webp", rgb, (cv2.IMWRITE_WEBP_QUALITY, 101)),
        "webp alpha": _encoded(".webp", rgba, (cv2.IMWRITE_WEBP_QUALITY, 80)),
        "gif": helpers.encode(__import__("PIL.Image").Image.fromarray(rgb), "GIF"),
        "bigtiff": _big_tiff(53, 37),
    }
    for what, data in cases.items():
        assert imaging.image_size(data, what) == (53, 37), what
    exts = {e.lstrip(".") for e in imaging.IMAGE_EXTENSIONS}
    assert exts == {"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"}
    for bad, why in ((b"", "not a PNG"), (b"hello world, not an image", "not a PNG, JPEG"),
                     (cases["png"][:14], "unreadable PNG header"),
                     (b"\xff\xd8\xff\xe0\x00\x10JFIF", "unreadable JPEG header"),
                     (cases["tiff"][:10], "unreadable TIFF header")):
        with pytest.raises(imaging.ImageDecodeError, match=why):
            imaging.image_size(bad, "x")


def test_a_bomb_is_refused_from_its_header_near_the_baseline_memory(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png", 12000, 12000)  # 144 M pixels, 432 MB as RGB
    assert os.path.getsize(bomb) < 1_000_000
    code = ("import resource, sys; from research.data import imaging; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    imaging.load_image_file(sys.argv[1])\n"
            "except imaging.ImageTooLargeError as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    res = subprocess.run([sys.executable, "-c", code, bomb], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    message, grown_kb = res.stdout.splitlines()
    assert message == (f"{bomb}: 12000 x 12000 = 144,000,000 pixels, above the limit of "
                       "89,478,485 (--max_image_pixels)")
    assert int(grown_kb) < 50_000  # the file is read (a few hundred KB), never decoded
    with pytest.raises(imaging.ImageTooLargeError, match="2,000 pixels, above the limit of 1,999"):
        imaging.check_image_pixels(_encoded(".png", np.zeros((40, 50), np.uint8)), "s.png",
                                   limit=1999)


def test_a_bomb_in_a_folder_source_is_skipped_and_listed(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    helpers.make_class_folders(str(root), classes=("cat", "dog"), per_class=4)
    monkeypatch.setattr(imaging, "MAX_IMAGE_PIXELS", 10_000)  # what --max_image_pixels sets
    big = np.zeros((120, 100, 3), np.uint8)
    cv2.imwrite(str(root / "train" / "cat" / "big.png"), big)
    data = sources.load_source(str(root))
    assert len(data.splits["train"]) == 11  # 8, and gray, RGBA and CMYK JPEG headers read
    reasons = {os.path.basename(s["file"]): s["reason"] for s in data.skipped}
    assert reasons["big.png"].endswith("100 x 120 = 12,000 pixels, above the limit of 10,000 "
                                       "(--max_image_pixels)")


# ----------------------------------------------------------------------- 2. odd names

def test_names_that_are_not_utf8_and_links_out_of_the_tree_are_skipped(tmp_path):
    root = tmp_path / "src"
    helpers.make_class_folders(str(root), classes=("cat", "dog"), per_class=4)
    outside = tmp_path / "elsewhere"
    os.makedirs(outside / "more")
    cv2.imwrite(str(outside / "secret.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(outside / "more" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    raw = os.path.join(os.fsencode(str(root / "train" / "cat")), b"caf\xe9.png")
    with open(raw, "wb") as f:
        f.write(_encoded(".png", np.zeros((8, 8, 3), np.uint8)))
    os.makedirs(os.path.join(os.fsencode(str(root / "train")), b"d\xffg"))
    train = root / "train"
    os.symlink(outside / "secret.png", train / "dog" / "link.png")
    os.symlink(outside / "more", train / "cat" / "linked_folder")
    os.symlink(sorted((train / "dog").iterdir())[0], train / "dog" / "inside.png")  # kept
    data, manifest = helpers.write_tfrecords(root, tmp_path / "out", test_fraction=0.25)
    why = {s["file"]: s["reason"] for s in data.skipped}
    assert why[f"{train}/cat/caf\\xe9.png"] == "file name is not valid UTF-8"
    assert why[f"{train}/d\\xffg"] == "folder name is not valid UTF-8"
    assert why[f"{train}/dog/link.png"].startswith(f"symbolic link to {outside}/secret.png")
    assert why[f"{train}/cat/linked_folder"].startswith(f"symbolic link to {outside}/more")
    assert sum(len(s) for s in data.splits.values()) == 16  # 15 + the link inside the tree
    assert len(manifest["skipped"]) == 5  # these 4 and the helper's corrupt.jpg


def test_a_folder_that_cannot_be_listed_is_skipped_and_says_why(tmp_path, monkeypatch):
    root = tmp_path / "src"
    helpers.make_class_folders(str(root), classes=("cat", "dog"), per_class=4)
    locked = str(root / "train" / "dog")
    helpers.refuse_listing(monkeypatch, locked)
    data = sources.load_source(str(root))
    assert {"file": locked, "reason": "folder cannot be listed (Permission denied)"} in (
        data.skipped)
    names = data.splits["train"].images.names
    assert names and not any(n.startswith("train/dog/") for n in names)
    assert data.class_names == ["cat", "dog"]  # dog has test images


def test_a_tar_member_name_that_is_not_utf8_is_skipped(tmp_path):
    root = tmp_path / "src"
    helpers.make_class_folders(str(root), classes=("cat", "dog"), per_class=4)
    path = str(tmp_path / "src.tar")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        tar.add(root, arcname="src")
        data = _encoded(".png", np.zeros((8, 8, 3), np.uint8))
        info = tarfile.TarInfo("src/train/cat/caf\xe9.png")
        info.size = len(data)
        tar.addfile(info, __import__("io").BytesIO(data))
    data = sources.load_source(path)
    bad = [s for s in data.skipped if "UTF-8" in s["reason"]]
    assert [s["reason"] for s in bad] == ["member name is not valid UTF-8"]
    assert bad[0]["file"] == f"{path}:src/train/cat/caf\\xe9.png"


# ----------------------------------------------------------------------- predict: 1, 2, 5

@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return helpers.tiny_export(str(tmp_path_factory.mktemp("export")), tta=False)


def test_predict_refuses_a_bomb_and_reads_a_comma_path_from_a_file(export, tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png", 12000, 12000)
    comma = tmp_path / "a,b.png"
    cv2.imwrite(str(comma), np.zeros((40, 40, 3), np.uint8))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{comma}\n\n{bomb}\n")
    res = run_app("predict", f"--model={export}", f"--images_from={listing}")
    assert res.returncode == 1, res.stderr[-3000:]
    out = res.stdout.splitlines()
    assert len(out) == 2 and out[0].startswith(f"{comma}\tp(cat)=")
    assert out[1] == (f"{bomb}\terror: {bomb}: 12000 x 12000 = 144,000,000 pixels, above "
                      "the limit of 89,478,485 (--max_image_pixels)")
    assert "scored 1, unreadable 1" in res.stderr


def test_predict_checks_its_input_before_tensorflow_loads(export, tmp_path):
    for args, line in (
            ([f"--model={export}", f"--images={tmp_path}/nosuch.jpg"],
             f"error: --images: no such file or folder: {tmp_path}/nosuch.jpg"),
            ([f"--model={tmp_path}/nosuch.keras", "--images=x.jpg"],
             f"error: --model: no such file {tmp_path}/nosuch.keras (an export holds "
             "model.keras and metadata.json)"),
            ([f"--model={export}", f"--images_from={tmp_path}/nosuch.txt"],
             f"error: --images_from: cannot read {tmp_path}/nosuch.txt (No such file or "
             "directory)")):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "research.apps.predict",
                              *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert res.returncode == 1
        assert [x for x in res.stderr.splitlines() if not x.startswith("import time:")] == [line]
        assert not any(x.endswith("| tensorflow") for x in res.stderr.splitlines())


def test_explain_checks_its_input_before_tensorflow_loads(export, tmp_path):
    from research.explain import methods
    from research.model_options import APPLICATIONS

    ck = tmp_path / "ck"
    os.makedirs(ck / "run" / "export")
    for name in ("model.keras", "metadata.json"):
        os.link(os.path.join(os.path.dirname(export), name), ck / "run" / "export" / name)
    run = ["--run_name=run", f"--checkpoint_dir={ck}"]
    for args, line in (
            ([*run, f"--images={tmp_path}/nosuch.jpg"],
             f"error: --images: no such file {tmp_path}/nosuch.jpg"),
            ([*run, "--method=gradcam,nosuch", f"--images={export}"],
             "error: --method: unknown method 'nosuch'; choose from "
             + ", ".join(methods.NAMES)),
            (["--model=vgg17", f"--images={export}"],
             "error: --model: unknown model 'vgg17'; choose one of "
             + ", ".join((*APPLICATIONS, "savedmodel")))):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "research.apps.explain",
                              *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert res.returncode == 1
        assert [x for x in res.stderr.splitlines() if not x.startswith("import time:")] == [line]
        assert not any(x.endswith("| tensorflow") for x in res.stderr.splitlines())


def test_the_explain_flags_read_from_source_equal_the_imported_values():
    import importlib
    import inspect

    from research.explain import options, source_values  # noqa: F401  (its defaults read)

    source_values.record_names("methods", "METHODS")  # what the explain app reads
    source_values.keys("outputs", "EXAMPLE_FILTERS")
    kinds = {k for k, *_ in source_values.READ}
    assert kinds == {"default", "constant", "keys", "record_names"}
    assert len(source_values.READ) > 25
    for kind, where, name in source_values.READ:
        if kind == "default":
            module, function = where.split(".")
            fn = getattr(importlib.import_module(f"research.explain.{module}"), function)
            assert source_values.default(where, name) == \
                inspect.signature(fn).parameters[name].default, (where, name)
        else:
            value = getattr(importlib.import_module(f"research.explain.{where}"), name)
            got = getattr(source_values, kind)(where, name)
            want = (tuple(value) if kind == "keys" else
                    tuple(r.name for r in value) if kind == "record_names" else value)
            assert got == want, (where, name)


# ----------------------------------------------------------------------- 3. one lab per workdir

def test_a_second_lab_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    from research.apps.lab import workdir_lock

    with workdir_lock(str(tmp_path)):
        res = run_app("lab", f"--workdir={tmp_path}", "--stages=data")
    assert res.returncode == 1
    lines = stderr_lines(res)
    assert len(lines) == 1 and lines[0].startswith(
        f"error: --workdir: {tmp_path} is in use by another lab, by pid {os.getpid()} on "
        f"{socket.gethostname()} since ")
    assert res.stdout == ""  # refused before anything else, the source line included


def test_the_lock_of_a_dead_lab_is_taken_over(tmp_path):
    from research.apps.lab import workdir_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "lab.lock").write_text(f'{{"pid": {dead}, "host": "{socket.gethostname()}"}}')
    with workdir_lock(str(tmp_path)) as lock:
        assert files.read_json(lock.path)["pid"] == os.getpid()
    assert not os.path.exists(tmp_path / "lab.lock")


# ----------------------------------------------------------------------- 4. one line, app and lab

@contextlib.contextmanager
def read_only(folder):
    """`folder` made read-only, for root too (chattr +i) where the file system allows it."""
    os.makedirs(folder, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
        undo = ["chattr", "-i", str(folder)]
    try:
        yield str(folder)
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.slow  # the lab loads TensorFlow before its data stage: about 25 s
def test_a_traversal_member_is_one_line_through_the_app_and_the_lab(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        helpers._add_bytes(tar, "../evil.png", _encoded(".png", np.zeros((8, 8, 3), np.uint8)))
    line = (f"error: {path}: member '../evil.png' escapes the archive root (path traversal); "
            "refusing to read this archive")
    res = run_app("make_tfrecords", f"--source={path}", f"--out_dir={tmp_path}/out")
    assert (res.returncode, stderr_lines(res)) == (1, [line])
    res = run_app("lab", f"--workdir={tmp_path}/lab", f"--source={path}", "--stages=data")
    assert (res.returncode, stderr_lines(res)) == (1, [line]), res.stderr[-3000:]
    assert res.stdout.splitlines() == [f"source: {path} (--source)"]


def test_read_only_folders_are_one_line_before_anything_is_written(syn, tmp_path):
    ck = tmp_path / "ck"
    with read_only(tmp_path / "logs"):
        res = run_app("train", f"--data_dir={syn}", f"--checkpoint_dir={ck}",
                      f"--log_dir={tmp_path}/logs", "--run_name=r")
    assert res.returncode == 1
    assert len(stderr_lines(res)) == 1 and re.fullmatch(
        f"error: --log_dir: cannot write in {tmp_path}/logs \\((Operation not permitted|"
        "Permission denied)\\); give a folder you can write to", stderr_lines(res)[0])
    assert not os.path.exists(ck / "r")  # no config.json half a run
    with read_only(tmp_path / "lab"):
        res = run_app("lab", f"--workdir={tmp_path}/lab", "--stages=data")
    assert res.returncode == 1 and len(stderr_lines(res)) == 1
    assert stderr_lines(res)[0].startswith(f"error: --workdir: cannot write in {tmp_path}/lab")


@pytest.mark.slow  # a tiny training: 16-26 s
def test_a_shard_damaged_while_training_is_named_and_the_checkpoint_kept(syn, tmp_path):
    import shutil

    from research.data import pipeline
    from research.training.loop import train_and_evaluate

    data = tmp_path / "data"
    shutil.copytree(syn, data)
    shard = pipeline.shard_paths(str(data), pipeline.load_manifest(str(data)), "train")[0]

    class Damage:  # after the first loop (and its checkpoint), flip bytes of a train shard
        def next_boundary(self, ctx):
            return None

        def before(self, ctx):
            pass

        def __call__(self, ctx):
            if ctx.step >= 10 and not getattr(self, "done", False):
                self.done = True
                with open(shard, "r+b") as f:
                    f.seek(100)
                    f.write(b"\xff" * 64)

        def end(self, ctx):
            pass

    cfg = helpers.tiny_config(str(data), tmp_path, epochs=3, checkpoint_every_steps=10)
    with pytest.raises(pipeline.DataError) as e:
        train_and_evaluate(cfg, actions=[Damage()])
    message = str(e.value)
    assert message.startswith(f"--data_dir: {os.path.abspath(shard)}: sha256 does not match ")
    kept = re.search(r"\(damaged during training\); the last good checkpoint (\S+) is kept; "
                     r"rebuild the data \(python -m research.apps.make_tfrecords", message)
    assert kept and "\n" not in message
    assert os.path.isfile(kept.group(1) + ".index")


def test_a_truncated_export_is_damaged_not_missing(export, tmp_path):
    folder = tmp_path / "export"
    os.makedirs(folder)
    for name in ("model.keras", "metadata.json"):
        with open(os.path.join(os.path.dirname(export), name), "rb") as f:
            data = f.read()
        (folder / name).write_bytes(data[:len(data) // 2] if name == "model.keras" else data)
    res = run_app("predict", f"--model={folder}/model.keras", "--images=x.png")
    assert res.returncode == 1
    assert stderr_lines(res) == [
        f"error: --model: {folder}/model.keras is damaged (not a whole .keras archive: "
        "truncated or overwritten); delete it and run the run's `python -m "
        "research.apps.train` command again, which exports a finished run"]


# ----------------------------------------------------------------------- 6. leftovers, names

def test_leftovers_of_killed_writes_are_removed_at_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    stale = tmp_path / f".report.{host}~{dead}~x1.tmp.json"
    live = tmp_path / f".report.{host}~{os.getpid()}~x2.tmp.json"
    other = tmp_path / f".report.elsewhere~{dead}~x3.tmp.json"
    stale_dir = tmp_path / f".export.tmp-{host}~{dead}~abc"
    for p in (stale, live, other):
        p.write_text("half")
    os.makedirs(stale_dir / "inner")
    files.write_json(str(tmp_path / "report.json"), {"a": 1})
    assert not stale.exists() and live.exists() and other.exists()
    with files.atomic_dir(str(tmp_path / "export")) as tmp:
        assert os.path.basename(tmp).startswith(f".export.tmp-{host}~{os.getpid()}~")
    assert not stale_dir.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["report.json", "export", live.name, other.name])


def test_run_names_are_portable_file_names():
    from research.training.config import ConfigError, TrainConfig

    for name in ("a b", "x/y", "..", "naïve", "semi;colon", ""):
        with pytest.raises(ConfigError, match="^--run_name: "):
            TrainConfig(run_name=name, data_dir="nowhere").validate()
    assert runs.name_error("lab_scratch-2.v1") is None


def test_evaluate_resolves_the_runs_log_folder_as_train_did(tmp_path):
    rec = {"checkpoint_dir": "checkpoints", "log_dir": "logs"}
    assert runs.recorded_log_dir(rec, str(tmp_path / "checkpoints")) == str(tmp_path / "logs")
    assert runs.recorded_log_dir(rec, str(tmp_path / "moved")) is None
    assert runs.recorded_log_dir({**rec, "log_dir": "/abs/logs"}, "anything") == "/abs/logs"
    assert runs.recorded_log_dir({"checkpoint_dir": ".", "log_dir": "tb"}, str(tmp_path)
                                 ) == str(tmp_path / "tb")


# ----------------------------------------------------------------------- 3. hints that exist

def _defined_flags() -> set[str]:
    """Every flag an app defines: DEFINE_* and define_integer/_float calls in research/apps,
    the fields of the dataclasses apps derive flags from, and absl's own."""
    import dataclasses
    import glob

    from research.explain.options import ExplainOptions
    from research.inference import PredictOptions
    from research.lab.profiles import Overrides
    from research.model_options import MODEL_OPTIONS
    from research.training.config import TrainConfig

    names = {"flagfile", "log_dir", "help", "helpfull", "max_image_pixels", "images_from",
             "images", "model", "run_name", "checkpoint_dir"}
    for path in glob.glob(os.path.join(ROOT, "research", "apps", "*.py")):
        with open(path) as f:
            names |= set(re.findall(r"(?:DEFINE_\w+|define_integer|define_float)\(\s*\"(\w+)\"",
                                    f.read()))
    for cls in (ExplainOptions, PredictOptions, Overrides, TrainConfig,
                *set(MODEL_OPTIONS.values())):
        if cls is not None:
            names |= {f.name for f in dataclasses.fields(cls)}
    return names


def test_every_flag_a_lab_message_names_exists():
    import ast
    import glob

    defined = _defined_flags() | {"logdir"}  # `tensorboard --logdir`, TensorBoard's own
    named = {}
    for path in [*glob.glob(os.path.join(ROOT, "research", "lab", "*.py")),
                 os.path.join(ROOT, "research", "apps", "lab.py")]:
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    for flag in re.findall(r"(?<![\w-])--(\w+)", node.value):
                        named.setdefault(flag, os.path.basename(path))
    assert "workdir" in named and "overwrite" not in named
    assert {f: where for f, where in named.items() if f not in defined} == {}


def _train_until_then_damage(cmd, shards, after: str, timeout=600):
    """Runs `cmd`; once it logs `after`, flips bytes in every shard of `shards`. Returns
    (status, stderr lines that are not log lines, all output)."""
    proc = warm.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                      cwd=ROOT)
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if after in line:
            for shard in shards():
                with open(shard, "r+b") as f:
                    f.seek(100)
                    f.write(b"\xff" * 64)
            break
    lines += proc.communicate(timeout=timeout)[0].splitlines(keepends=True)
    said = [x.rstrip("\n") for x in lines if x.strip() and not LOG_LINE.match(x)
            and not x.startswith(("[lab]", "source: "))]  # the lab's own lines on stdout
    return proc.returncode, said, "".join(lines)


@pytest.mark.slow  # a training through the app, then through the lab
def test_a_shard_damaged_while_training_is_one_line_through_the_app_and_the_lab(syn, tmp_path):
    import glob
    import shutil

    data = tmp_path / "data"
    shutil.copytree(syn, data)
    cmd = [sys.executable, "-m", "research.apps.train", f"--data_dir={data}", "--run_name=r",
           f"--checkpoint_dir={tmp_path}/ck", f"--log_dir={tmp_path}/logs", "--epochs=60",
           "--batch_size=32", "--widths=8,16", "--res_blocks=1,0", "--stem_width=8",
           "--steps_per_loop=5", "--checkpoint_every_steps=5", "--eval_every_steps=1000",
           "--gradcam_images=0", "--progress=false", "--precision=float32"]
    code, said, out = _train_until_then_damage(
        cmd, lambda: glob.glob(str(data / "train-*")), "train | step     10")
    assert code == 1, out[-3000:]
    assert len(said) == 1 and said[0].startswith("error: --data_dir: ") and (
        "(damaged during training); the last good checkpoint" in said[0]), out[-3000:]

    archive = tmp_path / "cifar-10-python.tar.gz"
    helpers.make_cifar10_python(str(archive), per_batch=40)
    work = tmp_path / "lab"
    cmd = [sys.executable, "-m", "research.apps.lab", f"--workdir={work}", f"--source={archive}",
           "--stages=data,scratch", "--train_steps=2000", "--batch_size=16",
           "--eval_every_steps=1000", "--widths=8,16,16", "--precision=float32",
           "--gradcam_images=0"]
    code, said, out = _train_until_then_damage(
        cmd, lambda: glob.glob(str(work / "data" / "cifar10" / "train-*")), "train | step ")
    assert code == 1, out[-3000:]
    assert len(said) == 1 and said[0].startswith("error: --data_dir: ") and (
        "(damaged during training)" in said[0]), out[-3000:]
