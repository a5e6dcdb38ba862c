"""Test-time augmentation at the photo's native aspect, for evaluate.

The TFRecords of a photo folder hold each photo centre-cropped to a square
(make_tfrecords' --resize_policy=center_crop): for a 500x375 photo a quarter of the picture is
never scored. Here each example of a split is scored on K square windows cut from its
original photo, read again from the source the data was made from (the manifest's `source`, or
--photo_source): decoded as make_tfrecords decoded it (its reduced decoding too), scaled as
center_crop scales it, then windows slid along the long side (research.data.imaging
.native_windows). The model's scores (with the run's mirror / shift views of each window) are
averaged over the windows (research.detector.detector_scores), val and the split alike, so the
threshold is chosen on val scored the same way.

Why from the originals rather than windows stored by make_tfrecords: every example already
records its file (`source_id`), so any TFRecords folder made from photos can be scored this
way, at any K, with no new data format and no reconversion; the record's own pixels check
that the photos are the ones the data was made from (the centre crop must match them).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from research.data import imaging
from research.errors import UserError
from research.fields import first_error, setting

# A photo whose centre crop differs from its record by more than this (mean absolute
# difference, 0..255) is not the photo the record was made from. The same decoder gives 0;
# another libjpeg build may move a few pixels by one level.
MAX_MEAN_DIFFERENCE = 1.0


class NativeTTAError(UserError):
    """Native windows cannot be scored on this run or data; the message names the flag."""


# The rule, for evaluate's and predict's --tta_windows alike.
TTA_WINDOWS_HELP = ("Test-time augmentation at the photo's native aspect: score K square "
                    "windows along each photo's long side (first, middle, last: left, centre "
                    "and right for K=3), each with the run's mirror views (--tta), and average "
                    "p(positive) over them; 1: the centre crop alone, as the run's data holds "
                    "it. Only for runs whose photos were centre-cropped (--resize_policy="
                    "center_crop).")


@dataclasses.dataclass(frozen=True)
class NativeTTA:
    """evaluate's native-aspect windows; its flags are derived from these fields."""
    tta_windows: int = setting(1, TTA_WINDOWS_HELP + " evaluate reads the original photos "
                               "(--photo_source) and scores val the same way for the "
                               "threshold.", ge=1)
    photo_source: str | None = setting(None, "With --tta_windows: the tar or folder the data "
                                       "was made from (default: the source its manifest.json "
                                       "records).")

    @property
    def windows(self) -> int:
        return self.tta_windows

    @property
    def active(self) -> bool:
        return self.tta_windows > 1

    def validate(self) -> None:
        problem = first_error(self)
        if problem:
            raise NativeTTAError(f"--{problem[0]}: {problem[1]}")
        if self.photo_source and not self.active:
            raise NativeTTAError("--photo_source: only read with --tta_windows=K (K > 1, "
                                 "windows of the original photos); drop it or give "
                                 "--tta_windows")


def resolve_source(manifest: dict, data_dir: str, native: NativeTTA, transfer: str) -> str:
    """The photo source to read, checked before any scoring: the data was made from an image
    folder at center_crop, the run reads pixels (not cached features), and the source is
    there. Any failure is one line naming the flag or file."""
    native.validate()
    where = os.path.join(data_dir, "manifest.json")
    if not str(manifest.get("source_format", "")).startswith("image_folder"):
        raise NativeTTAError(
            f"--tta_windows={native.windows}: {data_dir} was made from "
            f"{manifest.get('source')} ({manifest.get('source_format')}), arrays of images at "
            "their stored size, not photos: native-aspect windows need data made from an image "
            "folder (make_tfrecords --source=<tar or folder of photos>)")
    policy = imaging.recorded_policy(manifest)
    if policy != "center_crop":
        raise NativeTTAError(
            f"--tta_windows={native.windows}: {data_dir} was made with --resize_policy={policy}"
            ", which already keeps the whole photo; native-aspect windows apply to "
            "center_crop data")
    if transfer == "features":
        raise NativeTTAError(
            f"--tta_windows={native.windows}: this run scores cached backbone features "
            "(--transfer=features), not pixels; native-aspect windows need a run that reads "
            "images")
    source = native.photo_source or manifest["source"]
    if not os.path.exists(source):
        if native.photo_source:
            raise NativeTTAError(f"--photo_source={source}: no such file or folder")
        raise NativeTTAError(
            f"--tta_windows={native.windows}: the photos {data_dir} was made from, {source} "
            f"(the source in {where}), are not there; pass --photo_source=<that tar or folder>")
    return source


def _decode_size(manifest: dict) -> tuple[tuple[int, int], bool]:
    """((height, width), reduced decoding): how make_tfrecords decoded the data's photos."""
    h, w = manifest["image_shape"][:2]
    return (h, w), bool((manifest.get("flags") or {}).get("reduced_decode", False))


def photo_windows(tree, name: str, size: tuple[int, int], k: int,
                  reduced: bool) -> np.ndarray:
    """(k, h, w, 3) uint8: the native-aspect windows of one photo of `tree`, decoded as
    make_tfrecords decoded it (`tree`: a research.data.sources.FileTree)."""
    img = imaging.decode_for_size(tree.read(name), tree.where(name), size, "center_crop",
                                  reduced)
    return imaging.native_windows(img, size, k)


def evaluate_windows(evaluator, split: str, native: NativeTTA, source: str,
                     progress: bool = False):
    """(the research.training.evaluator.Evaluator's result on `split` scored on native
    windows, the centre-crop check: photos, identical, max_difference). A photo that fails
    while the windows stream (missing, another photo, undecodable) is its own one-line
    error, not TensorFlow's wrapping of it."""
    import tensorflow as tf

    checked: dict = {}
    failed: list = []
    try:
        res = evaluator.evaluate(split, progress=progress, data=lambda cfg, s: (
            native_eval_dataset(cfg, s, native, source, checked, failed)))
    except tf.errors.OpError:
        if failed:
            raise failed[0] from None
        raise
    return res, checked


def native_eval_dataset(cfg, split: str, native: NativeTTA, source: str,
                        checked: dict | None = None, failed: list | None = None):
    """(one ordered pass over the run's examples of `split`, their expected positions), as
    research.training.inputs.eval_dataset gives, each element's `image` being (batch, K, h,
    w, c) windows (the batch is cfg.eval_batch_size // K, so a step scores as many images
    as without windows). The centre crop of every photo is compared with its record's
    pixels as it is read; `checked` (when given) gets the counts: photos, identical,
    max_difference. A photo that is missing from the source or is another photo is a
    NativeTTAError naming it, --photo_source and the example; one raised while the dataset
    streams is also appended to `failed` (TensorFlow reraises it as its own error)."""
    import tensorflow as tf  # here: evaluate's flags are checked before TensorFlow loads

    from research.data import pipeline, sources
    from research.detector import scale_images
    from research.training.examples import example_mask

    manifest = pipeline.load_manifest(cfg.data_dir)
    size, reduced = _decode_size(manifest)
    k = native.windows
    keep = example_mask(cfg, split)
    ids = pipeline.read_source_ids(cfg.data_dir, split)
    n = manifest["splits"][split]["num_examples"]
    expected = np.arange(n) if keep is None else np.flatnonzero(keep)
    tree = sources.FileTree(source)
    missing = [ids[i] for i in expected if ids[i] not in tree]
    if missing:
        raise NativeTTAError(
            f"--photo_source={source}: {len(missing):,} of the {len(expected):,} photos of "
            f"{split} in {cfg.data_dir} are not in it (first: {missing[0]}); give the tar or "
            "folder the data was made from")
    batch = max(1, cfg.eval_batch_size // k)
    channels = manifest["image_shape"][-1]  # 3: photos decode to RGB
    stats = checked if checked is not None else {}
    stats.update(photos=0, identical=0, max_difference=0)

    def batches():
        try:
            yield from windowed()
        except UserError as e:  # a photo that cannot be decoded, or is another photo
            if failed is not None:
                failed.append(e)
            raise

    def windowed():
        records = pipeline.make_dataset(cfg.data_dir, split, batch, training=False,
                                        scale="uint8", keep=keep)
        for rec in records:
            index = rec["index"].numpy()
            windows = np.stack(list(sources.ordered_map(
                lambda i: photo_windows(tree, ids[i], size, k, reduced), list(index))))
            stored = rec["image"].numpy()
            _check_centre(windows, stored, index, ids, tree, split, cfg.data_dir, source,
                          size, reduced, stats)
            yield {"image": windows, "label": rec["label"].numpy(),
                   "class_id": rec["class_id"].numpy(), "index": index}

    h, w = size
    spec = {"image": tf.TensorSpec([None, k, h, w, channels], tf.uint8),
            "label": tf.TensorSpec([None], tf.int32),
            "class_id": tf.TensorSpec([None], tf.int32),
            "index": tf.TensorSpec([None], tf.int64)}
    ds = tf.data.Dataset.from_generator(batches, output_signature=spec)
    ds = ds.map(lambda b: {**b, "image": scale_images(b["image"], cfg.scale)})
    return ds.prefetch(1), expected


def _check_centre(windows, stored, index, ids, tree, split, data_dir, source, size, reduced,
                  stats) -> None:
    """Each photo's centre crop against its record (the middle window of an odd K is it;
    an even K cuts it again from the same scaled photo)."""
    k = windows.shape[1]
    if k % 2:
        centre = windows[:, k // 2]
    else:
        centre = np.stack([photo_windows(tree, ids[i], size, 1, reduced)[0] for i in index])
    diff = np.abs(centre.astype(np.int16) - stored.astype(np.int16))
    per_photo = diff.reshape(len(index), -1)
    stats["photos"] += len(index)
    stats["identical"] += int(np.sum(per_photo.max(1) == 0))
    stats["max_difference"] = max(stats["max_difference"], int(diff.max(initial=0)))
    bad = np.flatnonzero(per_photo.mean(1) > MAX_MEAN_DIFFERENCE)
    if len(bad):
        i = int(index[bad[0]])
        raise NativeTTAError(
            f"--photo_source={source}: {tree.where(ids[i])} is not the photo example {i} of "
            f"{split} in {data_dir} was made from (its centre crop differs from the record by "
            f"{per_photo[bad[0]].mean():.1f} levels on average); give the tar or folder the "
            "data was made from")
