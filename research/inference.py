"""Scoring image files with an exported detector.

`expand_images` turns files, folders and globs into an ordered list of files; `predict_files`
decodes them in a thread pool while the model scores the previous batch, and yields one
`Prediction` per file in that order, unreadable files included (with their error).

The export is `model.keras` plus `metadata.json` beside it (written by
`research.training.record.export_model`). It loads with `keras.models.load_model` once
`research.models` is imported, which registers the custom layers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import glob
import json
import os
from typing import Iterable, Iterator, TextIO

import numpy as np

from research.data import imaging
from research.runs import exported_model_path  # noqa: F401  (predict, explain, compare)

METADATA_KEYS = ("objective", "positive_class", "positive_class_id", "class_names",
                 "image_shape", "scale", "threshold", "tta")
CSV_COLUMNS = ("path", "score", "decision", "top_classes", "error")


class InferenceError(ValueError):
    """Bad input; the message names the flag, file or value."""


def _opt(default, help_text, **metadata):
    return dataclasses.field(default=default, metadata={"help": help_text, **metadata})


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How predict scores; the predict app's flags are derived from these fields."""
    batch_size: int = _opt(64, "Images scored per batch.")
    top_k: int = _opt(3, "Classes listed per image in the CSV (multiclass models, at most their "
                      "class count; probabilities of the image as given, not mirror-averaged).")
    threshold: float | None = _opt(None, "Decision threshold (default: the run's val-chosen "
                                   "one).")
    decode_threads: int | None = _opt(None, "Image decoding threads (default: one per core).")
    prefetch_batches: int = _opt(2, "Batches decoded ahead of the one being scored.",
                                 flag=False)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise InferenceError(f"--batch_size: must be >= 1, got {self.batch_size}")
        if self.top_k < 0:
            raise InferenceError(f"--top_k: must be >= 0, got {self.top_k}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InferenceError(f"--threshold: must be in [0, 1], got {self.threshold}")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise InferenceError(f"--decode_threads: must be >= 1, got {self.decode_threads}")


@dataclasses.dataclass(frozen=True)
class Prediction:
    path: str                         # as given (folder entries: the folder as given + name)
    score: float | None               # p(positive class); None when unreadable
    decision: str                     # '<class>' or 'not <class>'; '' when unreadable
    top_classes: tuple[tuple[str, float], ...] = ()
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Expansion:
    paths: list[str]
    skipped: list[tuple[str, str]]    # (path, reason): not images, hidden, duplicates


# ---------------------------------------------------------------------------------------------
# Inputs

def _hidden(name: str) -> bool:
    # The rule research.data.sources.FileTree applies to image folders.
    return name.startswith(".") or name == "__MACOSX"


def _walk_folder(root: str, skipped: list) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if _hidden(d):
                skipped.append((os.path.join(dirpath, d), "hidden folder"))
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        for fn in filenames:
            full = os.path.join(dirpath, fn)
            if _hidden(fn):
                skipped.append((full, "hidden file"))
            elif imaging.is_image_name(fn):
                found.append(os.path.relpath(full, root))
            else:
                skipped.append((full, "not an image file extension"))
    return [os.path.join(root, rel) for rel in sorted(found)]


def expand_images(entries: Iterable[str]) -> Expansion:
    """Files as given; folders recursively (image extensions, sorted by relative path); globs
    (`**` included, sorted). The first occurrence of a file wins. An entry that names nothing,
    or a folder or glob without images, raises InferenceError."""
    entries = [e for e in entries if e]
    if not entries:
        raise InferenceError("--images: no files, folders or globs given")
    paths, skipped, seen = [], [], {}
    for entry in entries:
        found, before = [], len(skipped)
        if any(c in entry for c in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise InferenceError(f"--images: {entry!r} matches no files")
            for m in matches:
                if os.path.isdir(m):
                    found += _walk_folder(m, skipped)
                elif imaging.is_image_name(m):
                    found.append(m)
                else:
                    skipped.append((m, "not an image file extension"))
            # `a/**` matches a folder and its files: one entry's repeats are not user input.
            found = list(dict.fromkeys(found))
            skipped[before:] = list(dict.fromkeys(skipped[before:]))
        elif os.path.isdir(entry):
            found = _walk_folder(entry, skipped)
        elif os.path.exists(entry):
            found = [entry]  # named explicitly: tried whatever its extension
        else:
            raise InferenceError(f"--images: no such file or folder: {entry}")
        if not found:
            raise InferenceError(f"--images: {entry!r} holds no image files "
                                 f"({len(skipped) - before} other files)")
        for path in found:
            key = os.path.realpath(path)
            if key in seen:
                skipped.append((path, f"duplicate of {seen[key]}"))
            else:
                seen[key] = path
                paths.append(path)
    return Expansion(paths, skipped)


def check_output(path: str) -> None:
    """A .csv path whose folder exists (it is made here) and is writable."""
    if not path.endswith(".csv"):
        raise InferenceError(f"--output: want a .csv path, got {path}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InferenceError(f"--output: cannot make folder {folder} ({e.strerror})") from e
    if not os.access(folder, os.W_OK) or os.path.isdir(path):
        raise InferenceError(f"--output: cannot write {path}")


# ---------------------------------------------------------------------------------------------
# The detector

def read_metadata(model_path: str, flag: str = "--model") -> dict:
    """metadata.json beside `model_path`, checked for the keys predict needs; errors name
    `flag`."""
    meta_path = os.path.join(os.path.dirname(model_path), "metadata.json")
    for path in (model_path, meta_path):
        if not os.path.isfile(path):
            raise InferenceError(f"{flag}: no such file {path} (an export holds model.keras "
                                 "and metadata.json)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InferenceError(f"{flag}: {meta_path}: not readable JSON ({e})") from e
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise InferenceError(f"{flag}: {meta_path} lacks {', '.join(missing)}")
    if meta["objective"] not in ("binary", "multiclass"):
        raise InferenceError(f"{flag}: {meta_path}: unknown objective {meta['objective']!r}")
    if len(meta["image_shape"]) != 3:
        raise InferenceError(f"{flag}: {meta_path}: image_shape {meta['image_shape']} is not "
                             "[height, width, channels]")
    return meta


class Detector:
    """An exported model with its metadata and a compiled batch scorer."""

    def __init__(self, model, meta: dict):
        import tensorflow as tf

        from research.detector import detector_scores, scale_images

        self.model, self.meta = model, meta
        h, w, c = meta["image_shape"]
        objective, positive_id = meta["objective"], meta["positive_class_id"]
        multiclass = objective == "multiclass"

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8)])
        def score(images):
            scores, logits = detector_scores(model, scale_images(images, meta["scale"]),
                                             objective, positive_id, meta["tta"],
                                             meta.get("tta_shifts", False))
            probs = tf.nn.softmax(tf.cast(logits, tf.float32)) if multiclass else logits[:, :0]
            return scores, probs

        self._score = score

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.meta["image_shape"][:2])

    @property
    def positive_class(self) -> str:
        return self.meta["positive_class"]

    def decision(self, score: float, threshold: float) -> str:
        return self.positive_class if score >= threshold else f"not {self.positive_class}"

    def score_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p(positive) per image, class probabilities of the image as given: the top classes
        are not mirror-averaged; shape (n, 0) for binary models)."""
        scores, probs = self._score(images)
        return scores.numpy(), probs.numpy()


def load_detector(model_path: str, meta: dict | None = None, flag: str = "--model") -> Detector:
    """Loads an export; the model's output width must match its metadata."""
    import keras

    import research.models  # noqa: F401  (registers the custom layers)

    meta = meta or read_metadata(model_path, flag)
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as e:  # Keras raises many types for a bad archive
        raise InferenceError(f"{flag}: {model_path}: cannot load ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from e
    want = len(meta["class_names"]) if meta["objective"] == "multiclass" else 1
    got = model.output_shape[-1]
    if got != want:
        raise InferenceError(f"{flag}: {model_path} outputs {got} values but its metadata "
                             f"({meta['objective']}, {len(meta['class_names'])} classes) "
                             f"needs {want}")
    return Detector(model, meta)


# ---------------------------------------------------------------------------------------------
# Scoring

def _load(path: str, size: tuple[int, int]):
    try:
        return imaging.load_image_file(path, size), None
    except imaging.ImageDecodeError as e:
        return None, str(e)


def _decoded_batches(paths: list[str], size, options: PredictOptions) -> Iterator[list]:
    """Batches of (path, image or None, error or None), decoded `prefetch_batches` ahead.
    OpenCV releases the GIL, so the threads decode while TensorFlow scores."""
    bs = options.batch_size
    with concurrent.futures.ThreadPoolExecutor(options.decode_threads or os.cpu_count()) as pool:
        pending = collections.deque()
        for start in range(0, len(paths), bs):
            batch = paths[start:start + bs]
            pending.append((batch, [pool.submit(_load, p, size) for p in batch]))
            if len(pending) > options.prefetch_batches:
                batch, futures = pending.popleft()
                yield [(p, *f.result()) for p, f in zip(batch, futures)]
        while pending:
            batch, futures = pending.popleft()
            yield [(p, *f.result()) for p, f in zip(batch, futures)]


def predict_files(detector: Detector, paths: list[str],
                  options: PredictOptions = PredictOptions()) -> Iterator[Prediction]:
    """One Prediction per path, in order; unreadable files carry their error."""
    options.validate()
    threshold = detector.meta["threshold"] if options.threshold is None else options.threshold
    names = detector.meta["class_names"]
    for batch in _decoded_batches(paths, detector.image_size, options):
        ok = [i for i, (_, img, _) in enumerate(batch) if img is not None]
        scores, probs = (detector.score_batch(np.stack([batch[i][1] for i in ok])) if ok
                         else (np.zeros(0), np.zeros((0, 0))))
        j = 0  # row of the next readable image in scores and probs
        for path, _, error in batch:
            if error is not None:
                yield Prediction(path, None, "", (), error)
                continue
            p = float(scores[j])
            top = np.argsort(-probs[j], kind="stable")[:options.top_k]
            yield Prediction(path, p, detector.decision(p, threshold),
                             tuple((names[k], float(probs[j, k])) for k in top))
            j += 1


def format_line(pred: Prediction, positive_class: str) -> str:
    """The standard-output line scripts read: '<path>\\tp(<class>)=<score>\\t<decision>'."""
    if pred.error is not None:
        return f"{pred.path}\terror: {pred.error}"
    return f"{pred.path}\tp({positive_class})={pred.score:.4f}\t{pred.decision}"


def csv_row(pred: Prediction) -> list[str]:
    top = ";".join(f"{name}:{p:.4f}" for name, p in pred.top_classes)
    score = "" if pred.score is None else f"{pred.score:.6f}"
    return [pred.path, score, pred.decision, top, pred.error or ""]


@dataclasses.dataclass
class Counts:
    scored: int = 0
    unreadable: int = 0


def write_predictions(predictions: Iterable[Prediction], positive_class: str,
                      stdout: TextIO, csv_file: TextIO | None = None) -> Counts:
    """Prints each line as it is scored and, with `csv_file`, writes the CSV row."""
    writer = csv.writer(csv_file) if csv_file else None
    if writer:
        writer.writerow(CSV_COLUMNS)
    counts = Counts()
    for pred in predictions:
        print(format_line(pred, positive_class), file=stdout)
        if writer:
            writer.writerow(csv_row(pred))
        if pred.error is None:
            counts.scored += 1
        else:
            counts.unreadable += 1
    return counts
