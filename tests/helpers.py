"""Tiny fixtures in every supported source format, made by the tests themselves."""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile

import numpy as np
from PIL import Image

from research.data import sources, tfrecords

TINY_NET = {"widths": (8, 16), "res_blocks": (1, 0), "stem_width": 8, "dropout": 0.0}


def tiny_config(syn: str, tmp_path, **overrides):
    """The training tests' TrainConfig: a tiny scratch network on the synthetic TFRecords,
    float32, no progress bar or Grad-CAM images; `overrides` replace any field."""
    from research.training.config import TrainConfig

    base = dict(data_dir=syn, run_name="t", checkpoint_dir=str(tmp_path / "ck"),
                log_dir=str(tmp_path / "logs"), model_options=dict(TINY_NET), batch_size=32,
                eval_batch_size=16, learning_rate=0.03, warmup_epochs=0.5, steps_per_loop=5,
                progress=False, precision="float32", gradcam_images=0)
    return TrainConfig(**{**base, **overrides})


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def tiny_export(out_dir, objective="multiclass", tta=True, threshold=0.1, seed=0):
    """A tiny scratch CNN, the same weights for the same seed, with a random head (the built
    one is zero-initialised), exported as our export app writes it (model.keras and
    metadata.json) into `out_dir`; returns the model.keras path."""
    import json

    import keras

    from research.models import build_model

    keras.utils.set_random_seed(seed)
    n_out = len(CIFAR10_CLASSES) if objective == "multiclass" else 1
    model = build_model("scratch", (32, 32, 3), n_out, widths=(8, 16), res_blocks=(1, 0),
                        stem_width=8)
    head = model.get_layer("logits").kernel
    head.assign(np.random.default_rng(seed).normal(0, 1, head.shape).astype(np.float32))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.keras")
    model.save(path)
    meta = {"objective": objective, "positive_class": "cat", "positive_class_id": 3,
            "class_names": CIFAR10_CLASSES, "image_shape": [32, 32, 3], "scale": "unit",
            "threshold": threshold, "tta": tta}
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(meta, f)
    return path


def write_tfrecords(source, out_dir, load=None, **kw):
    """(the loaded source, the manifest): `source` written to TFRecords in `out_dir` with
    WriteConfig settings `kw` (`load`: load_source's keyword arguments)."""
    data = sources.load_source(str(source), **(load or {}))
    cfg = tfrecords.WriteConfig(out_dir=str(out_dir), **kw)
    return data, tfrecords.write_tfrecords(data, cfg, str(source))


def random_cifar(n: int, num_classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(i % num_classes) for i in range(n)]
    return data, labels


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_cifar10_python(path: str, per_batch: int = 20, seed: int = 0) -> dict:
    """A cifar-10-python.tar.gz look-alike; returns {source_id prefix: (images NHWC, labels)}."""
    out = {}
    with tarfile.open(path, "w:gz") as tar:
        meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
        _add_bytes(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            data, labels = random_cifar(per_batch, seed=seed + k)
            batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                     b"filenames": [f"img_{name}_{i}.png".encode() for i in range(per_batch)]}
            _add_bytes(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch, protocol=2))
            out[name] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    return out


def make_cifar10_binary(path: str, per_batch: int = 20, seed: int = 0) -> None:
    with tarfile.open(path, "w:gz") as tar:
        _add_bytes(tar, "cifar-10-batches-bin/batches.meta.txt",
                   ("\n".join(CIFAR10_CLASSES) + "\n\n").encode())
        for k, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
            data, labels = random_cifar(per_batch, seed=seed + k)
            rec = np.concatenate([np.asarray(labels, np.uint8)[:, None], data], axis=1)
            _add_bytes(tar, f"cifar-10-batches-bin/{name}", rec.tobytes())


def make_cifar100_python(path: str, n: int = 400) -> None:
    fine = [f"fine{i}" for i in range(100)]
    fine[3] = "leopard"
    coarse = [f"coarse{i}" for i in range(20)]
    with tarfile.open(path, "w:gz") as tar:
        _add_bytes(tar, "cifar-100-python/meta", pickle.dumps(
            {b"fine_label_names": [c.encode() for c in fine],
             b"coarse_label_names": [c.encode() for c in coarse]}, protocol=2))
        for k, split in enumerate(("train", "test")):
            data, labels = random_cifar(n, num_classes=100, seed=k)
            labels = [(i * 7) % 100 for i in range(n)]
            batch = {b"data": data, b"fine_labels": labels,
                     b"coarse_labels": [lab // 5 for lab in labels],
                     b"filenames": [f"{split}_{i}.png".encode() for i in range(n)]}
            _add_bytes(tar, f"cifar-100-python/{split}", pickle.dumps(batch, protocol=2))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def refuse_listing(monkeypatch, folder: str) -> None:
    """os.scandir (what os.walk and FileTree list with) refuses `folder`, as chmod 000 would
    for a user other than root (the tests may run as root)."""
    scandir = os.scandir

    def refusing(path):
        if str(path) == folder:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)


def make_class_folders(root: str, classes=("cat", "dog", "frog"), per_class: int = 6,
                       size=(40, 48)) -> None:
    """<root>/{train,test}/<class>/*.png plus a grayscale JPEG, an RGBA PNG, a CMYK JPEG and a
    corrupt file in train/cat."""
    for split, n in (("train", per_class), ("test", max(2, per_class // 2))):
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                Image.fromarray(rgb(*size, seed=hash((split, c, i)) % 1000)).save(
                    os.path.join(d, f"{i:03d}.png"))
    cat = os.path.join(root, "train", "cat")
    base = Image.fromarray(rgb(*size, seed=7))
    with open(os.path.join(cat, "gray.jpg"), "wb") as f:
        f.write(encode(base.convert("L"), "JPEG"))
    with open(os.path.join(cat, "rgba.png"), "wb") as f:
        f.write(encode(base.convert("RGBA"), "PNG"))
    with open(os.path.join(cat, "cmyk.jpg"), "wb") as f:
        f.write(encode(base.convert("CMYK"), "JPEG"))
    with open(os.path.join(cat, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")


def make_flat_folder(root: str, n_per_class: int = 8, size=(50, 60)) -> None:
    os.makedirs(root, exist_ok=True)
    for c in ("cat", "dog"):
        for i in range(n_per_class):
            Image.fromarray(rgb(*size, seed=i + (100 if c == "dog" else 0))).save(
                os.path.join(root, f"{c}.{i}.jpg"))


def tar_folder(folder: str, path: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    return path


class Evil:
    """Pickles to a call of os.system: a crafted CIFAR batch."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_synthetic_tfrecords(out_dir: str, n_train: int = 200, n_test: int = 60, size: int = 32,
                             num_classes: int = 10, seed: int = 0) -> dict:
    """A learnable tiny CIFAR-like dataset: each class paints a coloured block at its own
    place, so a small CNN can learn 'cat' (class 3) in a few dozen steps."""
    from research.data import sources, tfrecords

    def split(n, s):
        rng = np.random.default_rng(s)
        ids = np.arange(n) % num_classes
        imgs = rng.integers(0, 80, (n, size, size, 3), dtype=np.uint8)
        for i, c in enumerate(ids):
            r, q = divmod(int(c), 4)
            y, x = 2 + r * (size // 4), 2 + q * (size // 4)
            imgs[i, y:y + size // 5, x:x + size // 5, c % 3] = 255
        return sources.Split(imgs, ids.astype(np.int64), [f"syn{s}_{i}" for i in range(n)])

    data = sources.SourceData("synthetic", CIFAR10_CLASSES[:num_classes],
                              {"train": split(n_train, seed), "test": split(n_test, seed + 1)})
    cfg = tfrecords.WriteConfig(out_dir=out_dir, shards={"train": 3, "val": 2, "test": 2},
                                seed=seed)
    return tfrecords.write_tfrecords(data, cfg, "synthetic")


def write_synthetic_folder(root: str, n_train: int = 240, n_test: int = 60) -> None:
    """Learnable synthetic classes (a coloured block per class) as PNGs in
    <root>/<split>/<class>/ folders, for the end-to-end test of the CLIs."""
    for split, n, s in (("train", n_train, 0), ("test", n_test, 1)):
        rng = np.random.default_rng(s)
        for i in range(n):
            c = i % 10
            img = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            r, q = divmod(c, 4)
            img[2 + r * 8:2 + r * 8 + 6, 2 + q * 8:2 + q * 8 + 6, c % 3] = 255
            d = os.path.join(root, split, CIFAR10_CLASSES[c])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{i:04d}.png"))


def zip_folder(folder: str, path: str) -> str:
    """Zips `folder` under its own name, folder entries included (as zip tools do)."""
    import zipfile

    base = os.path.dirname(os.path.abspath(folder))
    with zipfile.ZipFile(path, "w") as zf:
        for dirpath, dirnames, filenames in sorted(os.walk(folder)):
            dirnames.sort()
            zf.write(dirpath, os.path.relpath(dirpath, base) + "/")
            for fn in sorted(filenames):
                full = os.path.join(dirpath, fn)
                zf.write(full, os.path.relpath(full, base))
    return path


def make_unpaired_folder(root: str, counts=None, size=(24, 20)) -> dict:
    """horse2zebra-like <root>/{trainA,trainB,testA,testB}/*.png; returns {folder: [images]}."""
    counts = counts or {"trainA": 6, "trainB": 5, "testA": 3, "testB": 2}
    out = {}
    for k, (folder, n) in enumerate(counts.items()):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        out[folder] = []
        for i in range(n):
            img = rgb(*size, seed=100 * k + i)
            Image.fromarray(img).save(os.path.join(root, folder, f"n{k}_{i:03d}.png"))
            out[folder].append(img)
    return out


def make_mnist_npz(path: str, n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict:
    """An mnist.npz look-alike: x_* (N, 28, 28) uint8, y_* uint8 digits."""
    rng = np.random.default_rng(seed)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "y_train": (np.arange(n_train) % 10).astype(np.uint8),
              "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "y_test": ((np.arange(n_test) * 3) % 10).astype(np.uint8)}
    np.savez_compressed(path, **arrays)
    return arrays


# A log line of absl or TensorFlow (not our one-line messages).
LOG_LINE = re.compile(r"^([IWEF]\d{4} |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] |WARNING: )")


def event_tags(folder) -> dict:
    """The scalar tags and the plugin names of the event files directly in `folder`."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    tags, plugins = set(), set()
    for path in folder.glob("events.out.tfevents*"):
        for raw in tf.data.TFRecordDataset(str(path)):
            for v in event_pb2.Event.FromString(raw.numpy()).summary.value:
                tags.add(v.tag)
                if v.metadata.plugin_data.plugin_name:
                    plugins.add(v.metadata.plugin_data.plugin_name)
    plugins.discard("scalars")
    return {"tags": tags, "plugins": plugins}


def whole_and_resumed(whole, broken, stop_at: int, prefixes: tuple[str, ...]):
    """Train config `whole` in one go and `broken` stopped at step `stop_at` then resumed.
    Returns the readers of both final checkpoints and the variable names under `prefixes`
    (the save counter aside), for a bit-exact comparison."""
    import dataclasses

    import tensorflow as tf

    from research.training.loop import train_and_evaluate

    train_and_evaluate(whole)
    train_and_evaluate(dataclasses.replace(broken, stop_at_step=stop_at))
    train_and_evaluate(broken)
    a = tf.train.load_checkpoint(tf.train.latest_checkpoint(whole.run_dir))
    b = tf.train.load_checkpoint(tf.train.latest_checkpoint(broken.run_dir))
    names = [k for k in a.get_variable_to_shape_map()
             if k.startswith(prefixes) and "save_counter" not in k]
    return a, b, names
