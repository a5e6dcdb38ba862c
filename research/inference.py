"""Scoring image files with an exported detector (research.detector.Detector).

`expand_images` turns files, folders and globs into an ordered list of files; `predict_files`
decodes them in a thread pool while the model scores the previous batch, and yields one
`Prediction` per file in that order, unreadable files included (with their error).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import glob
import os
from typing import TYPE_CHECKING, Iterable, Iterator, TextIO

import numpy as np

from research.data import imaging
from research.data.imaging import is_hidden_name as _hidden
from research.errors import UserError
from research.evaluation.native import TTA_WINDOWS_HELP, NativeTTA
from research.fields import default_of, first_error, setting

if TYPE_CHECKING:  # the scorer is TensorFlow; this module stays light for predict's flags
    from research.detector import Detector

CSV_COLUMNS = ("path", "score", "decision", "top_classes", "error")


class InferenceError(UserError):
    """Bad input; the message names the flag, file or value."""


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How predict scores; the predict app's flags are derived from these fields."""
    batch_size: int = setting(64, "Images scored per batch.", ge=1)
    top_k: int = setting(3, "Classes listed per image in the CSV (multiclass models, at most "
                         "their class count; softmax of the logits averaged over the "
                         "run's test-time views); a classifier prints them too.", ge=0)
    threshold: float | None = setting(None, "Decision threshold (default: the run's "
                                      "val-chosen one).", ge=0, le=1)
    tta: bool | None = setting(None, "Override the export's mirror averaging (its "
                               "metadata.json `tta`); false also drops its shifted views.")
    tta_windows: int = setting(default_of(NativeTTA, "tta_windows"), TTA_WINDOWS_HELP, ge=1)
    decode_threads: int | None = setting(None, "Image decoding threads (default: one per "
                                         "core).", ge=1)
    prefetch_batches: int = setting(2, "Batches decoded ahead of the one being scored.", ge=0,
                                    flag=False)

    def validate(self) -> None:
        problem = first_error(self)
        if problem:
            raise InferenceError(f"--{problem[0]}: {problem[1]}")


@dataclasses.dataclass(frozen=True)
class Prediction:
    path: str                         # as given (folder entries: the folder as given + name)
    score: float | None               # p(positive class); None when unreadable or a classifier
    decision: str                     # '<class>', 'not <class>', a classifier's top class;
    #                                   '' when unreadable
    top_classes: tuple[tuple[str, float], ...] = ()
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Expansion:
    paths: list[str]
    skipped: list[tuple[str, str]]    # (path, reason): not images, hidden, duplicates


# ---------------------------------------------------------------------------------------------
# Inputs

def _walk_folder(root: str, skipped: list) -> list[str]:
    found = []

    def unlisted(e: OSError) -> None:  # os.walk would leave the folder out without a word
        skipped.append((e.filename, f"folder cannot be listed ({e.strerror or e})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted):
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
        raise InferenceError("--images: no files, folders or globs given (nor --images_from)")
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
# Scoring

def _load(path: str, size: tuple[int, int], policy: str, channels: int = 3, windows: int = 1):
    """(the image as the model takes it, None) or (None, why not); `windows` > 1: its
    (windows, h, w, c) native-aspect windows (imaging.native_windows)."""
    try:
        if windows > 1:
            return np.stack([imaging.to_channels(w, channels) for w in imaging.native_windows(
                imaging.load_image_file(path), size, windows)]), None
        return imaging.to_channels(imaging.load_image_file(path, size, policy), channels), None
    except imaging.ImageDecodeError as e:
        return None, str(e)


def views_meta(meta: dict, options: PredictOptions) -> dict:
    """The export's metadata with the test-time views `options` ask for, checked before any
    image is read: --tta overrides its mirror averaging; --tta_windows needs a model whose
    photos were centre-cropped (the windows extend that crop along the long side)."""
    policy = imaging.recorded_policy(meta)
    if options.tta_windows > 1 and policy != "center_crop":
        raise InferenceError(f"--tta_windows={options.tta_windows}: this model's images were "
                             f"resized with --resize_policy={policy}, which already keeps the "
                             "whole photo; native-aspect windows apply to center_crop models")
    if options.tta is None:
        return meta
    return {**meta, "tta": options.tta, "tta_shifts": options.tta and meta.get("tta_shifts",
                                                                               False)}


def _decoded_batches(paths: list[str], size, policy: str, options: PredictOptions,
                     channels: int = 3) -> Iterator[list]:
    """Batches of (path, image or None, error or None), decoded `prefetch_batches` ahead
    (as `channels`-channel images: 1 for a grayscale model such as MNIST's; with
    options.tta_windows > 1, each the stack of its native-aspect windows). OpenCV
    releases the GIL, so the threads decode while TensorFlow scores."""
    bs = options.batch_size
    with concurrent.futures.ThreadPoolExecutor(options.decode_threads or os.cpu_count()) as pool:
        pending = collections.deque()
        for start in range(0, len(paths), bs):
            batch = paths[start:start + bs]
            pending.append((batch, [pool.submit(_load, p, size, policy, channels,
                                                options.tta_windows) for p in batch]))
            if len(pending) > options.prefetch_batches:
                batch, futures = pending.popleft()
                yield [(p, *f.result()) for p, f in zip(batch, futures)]
        while pending:
            batch, futures = pending.popleft()
            yield [(p, *f.result()) for p, f in zip(batch, futures)]


def threshold_of(detector: Detector, options: PredictOptions) -> tuple[float | None, str]:
    """(the decision threshold, where it comes from); a classifier has none."""
    if detector.classifier:
        if options.threshold is not None:
            raise InferenceError("--threshold: this model is a classifier (trained without a "
                                 "positive class): it gives top classes, not a score to "
                                 "threshold")
        return None, "a classifier: no threshold"
    if options.threshold is not None:
        return options.threshold, "--threshold"
    meta = detector.meta
    policy = meta.get("threshold_metric", "f1")  # exports before the policy were all F1's
    return (meta["threshold"], f"the run's, chosen on val by {policy}"
            + (f" ({meta['threshold_reason']})" if meta.get("threshold_reason") else "")
            + " (metadata.json)")


def predict_files(detector: Detector, paths: list[str],
                  options: PredictOptions = PredictOptions()) -> Iterator[Prediction]:
    """One Prediction per path, in order; unreadable files carry their error."""
    options.validate()
    threshold, _ = threshold_of(detector, options)
    names = detector.meta["class_names"]
    for batch in _decoded_batches(paths, detector.image_size,
                                  imaging.recorded_policy(detector.meta), options,
                                  detector.meta["image_shape"][-1]):
        ok = [i for i, (_, img, _) in enumerate(batch) if img is not None]
        scores, probs = (detector.score_batch(np.stack([batch[i][1] for i in ok])) if ok
                         else (np.zeros(0), np.zeros((0, 0))))
        j = 0  # row of the next readable image in scores and probs
        for path, _, error in batch:
            if error is not None:
                yield Prediction(path, None, "", (), error)
                continue
            order = np.argsort(-probs[j], kind="stable")
            top = tuple((names[k], float(probs[j, k])) for k in order[:options.top_k])
            if detector.classifier:
                yield Prediction(path, None, names[order[0]], top)
            else:
                p = float(scores[j])
                yield Prediction(path, p, detector.decision(p, threshold), top)
            j += 1


def format_line(pred: Prediction, positive_class: str | None) -> str:
    """The standard-output line scripts read: '<path>\\tp(<class>)=<score>\\t<decision>'; a
    classifier's (`positive_class` None): '<path>\\t<top class>\\ttop: <class> <p>, ...'."""
    if pred.error is not None:
        return f"{pred.path}\terror: {pred.error}"
    if positive_class is None:
        top = ", ".join(f"{name} {p:.4f}" for name, p in pred.top_classes)
        return f"{pred.path}\t{pred.decision}\ttop: {top}"
    return f"{pred.path}\tp({positive_class})={pred.score:.4f}\t{pred.decision}"


def csv_row(pred: Prediction) -> list[str]:
    top = ";".join(f"{name}:{p:.4f}" for name, p in pred.top_classes)
    score = "" if pred.score is None else f"{pred.score:.6f}"
    return [pred.path, score, pred.decision, top, pred.error or ""]


@dataclasses.dataclass
class Counts:
    scored: int = 0
    unreadable: int = 0


def write_predictions(predictions: Iterable[Prediction], positive_class: str | None,
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
