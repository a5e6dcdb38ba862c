"""How a detector is fed and read, in one place: input scaling, the positive-class score, the
mirror average used at test time, and `Detector`, an exported model with its metadata.

Every stage that runs a trained detector (the training loop's eval step, predict, explain,
the TensorBoard Grad-CAM hook, the benchmarks) goes through these functions, so they all see
the same numbers. The export is `model.keras` plus `metadata.json` beside it (research.runs):
Keras' own layers (research.export), so it loads with plain `keras.models.load_model`; an
older export with our custom layers loads too once `research.models` is imported (here).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import research.models  # noqa: F401  (registers the custom layers for load_model)
from research import runs

SCALES = ("unit", "raw", "uint8")


def scale_images(images, scale: str):
    """uint8 (or float 0..255) pixels to model inputs: 'unit' float32 in [0, 1], 'raw' float32
    in [0, 255] (for a backbone's own preprocess_input), or 'uint8' unchanged."""
    if scale == "unit":
        # Not `/ 255.0`: inside a tf.function grappler's constant folding turns a division by
        # a constant into a product with its reciprocal, 1 ulp off for a third of the pixel
        # values, so a train step (--input=device) would scale differently from tf.data and
        # eager; DivNoNan is an exact division it leaves alone.
        return tf.math.divide_no_nan(tf.cast(images, tf.float32), 255.0)
    if scale == "raw":
        return tf.cast(images, tf.float32)
    if scale == "uint8":
        return images
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def preprocess_fn(scale: str):
    """The scaling as a one-argument function (for an Explainer)."""
    return lambda images: scale_images(images, scale)


def positive_scores(logits, objective: str, positive_id: int) -> tf.Tensor:
    """The detector's probability of the positive class, from its float logits."""
    logits = tf.cast(logits, tf.float32)
    if objective == "binary":
        return tf.sigmoid(logits[:, 0])
    return tf.nn.softmax(logits, axis=-1)[:, positive_id]


def mirror(images) -> tf.Tensor:
    """Left-right flip of NHWC images."""
    return tf.reverse(images, axis=[2])


def shifted(images, dy: int, dx: int) -> tf.Tensor:
    """NHWC images moved by (dy, dx) pixels (|d| <= 1), reflect-padded at the edges."""
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    return padded[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


def tta_views(tta: bool, shifts: bool = False) -> list[tuple[int, int, bool, float]]:
    """The test-time views as (dy, dx, mirrored, weight), weights summing to 1: the image;
    with `tta` its mirror too; with `shifts` also both shifted one pixel down-right and
    up-left (with their mirrors), at half the weight in all (the fast recipes' TTA)."""
    flips = (False, True) if tta else (False,)
    offsets = [(0, 0, 1.0)]
    if tta and shifts:
        offsets = [(0, 0, 0.5), (1, 1, 0.25), (-1, -1, 0.25)]
    return [(dy, dx, f, w / len(flips)) for dy, dx, w in offsets for f in flips]


def detector_scores(model, images, objective: str, positive_id: int | None, tta: bool,
                    shifts: bool = False):
    """(positive-class scores, logits), each the weighted mean over `tta_views`: with `tta`
    the image and its mirror, with `shifts` also one-pixel shifts of both. The logits are
    what the N-class accuracy reads. `images` are already scaled model inputs. A classifier
    (`positive_id` None) has no scores: (None, logits).

    `images` of rank 5, (batch, windows, H, W, C): the windows of each image at its native
    aspect (research.data.imaging.native_windows), each scored with those views; scores and
    logits are the plain mean over the windows."""
    if images.shape.rank == 5:
        k = images.shape[1] if images.shape[1] is not None else tf.shape(images)[1]
        flat = tf.reshape(images, [-1, *images.shape[2:]])  # (h, w, c) stay known to Keras
        scores, logits = detector_scores(model, flat, objective, positive_id, tta, shifts)

        def per_image(x):  # (batch * windows, ...) -> the mean over each image's windows
            return tf.reduce_mean(tf.reshape(x, [-1, k, *x.shape[1:]]), 1)

        return (None if scores is None else per_image(scores)), per_image(logits)
    scores = logits = 0.0
    for dy, dx, flip, weight in tta_views(tta, shifts):
        view = shifted(images, dy, dx) if dy or dx else images
        out = tf.cast(model(mirror(view) if flip else view, training=False), tf.float32)
        if positive_id is not None:
            scores += weight * positive_scores(out, objective, positive_id)
        logits += weight * out
    return (None if positive_id is None else scores), logits


def tta_mode(tta: bool, shifts: bool = False, windows: int = 1) -> str:
    """The test-time views in one word, as reports and predict name them: none, flip,
    flip_shifts; with windows at the native aspect native<K> (K > 1), native<K>_flip, ..."""
    views = ("flip_shifts" if shifts else "flip") if tta else ""
    if windows > 1:
        return f"native{windows}" + (f"_{views}" if views else "")
    return views or "none"


class Detector:
    """An exported model with its metadata and a compiled batch scorer. A classifier's export
    (metadata `classifier`: trained without a positive class) has class probabilities only."""

    def __init__(self, model, meta: dict):
        self.model, self.meta = model, meta
        h, w, c = meta["image_shape"]
        objective = meta["objective"]
        positive_id = None if self.classifier else meta["positive_class_id"]
        multiclass = objective == "multiclass"

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8)])
        def score(images):
            scores, logits = detector_scores(model, scale_images(images, meta["scale"]),
                                             objective, positive_id, meta["tta"],
                                             meta.get("tta_shifts", False))
            probs = tf.nn.softmax(tf.cast(logits, tf.float32)) if multiclass else logits[:, :0]
            if scores is None:  # a classifier: no p(positive)
                scores = tf.fill(tf.shape(images)[:1], float("nan"))
            return scores, probs

        @tf.function(input_signature=[tf.TensorSpec([None, None, h, w, c], tf.uint8)])
        def score_windows(windows):  # (batch, windows, h, w, c): the mean over the windows
            scores, logits = detector_scores(model, scale_images(windows, meta["scale"]),
                                             objective, positive_id, meta["tta"],
                                             meta.get("tta_shifts", False))
            probs = tf.nn.softmax(tf.cast(logits, tf.float32)) if multiclass else logits[:, :0]
            if scores is None:
                scores = tf.fill(tf.shape(windows)[:1], float("nan"))
            return scores, probs

        self._score, self._score_windows = score, score_windows

    @property
    def classifier(self) -> bool:
        return bool(self.meta.get("classifier"))

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.meta["image_shape"][:2])

    @property
    def positive_class(self) -> str | None:
        """The class it detects; None for a classifier."""
        return None if self.classifier else self.meta["positive_class"]

    def decision(self, score: float, threshold: float) -> str:
        return self.positive_class if score >= threshold else f"not {self.positive_class}"

    def score_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p(positive) per image (NaN for a classifier), the class probabilities: softmax of
        the logits averaged over the test-time views, as evaluation reads them; shape (n, 0)
        for binary models). `images` (n, k, h, w, c): k windows of each image at its native
        aspect, averaged (detector_scores)."""
        scores, probs = (self._score_windows if np.ndim(images) == 5 else self._score)(images)
        return scores.numpy(), probs.numpy()


def load_detector(model_path: str, meta: dict | None = None, flag: str = "--model") -> Detector:
    """Loads an export; the model's output width must match its metadata."""
    meta = meta or runs.read_metadata(model_path, flag)
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as e:  # Keras raises many types for a bad archive
        raise runs.RunError(f"{flag}: {model_path}: cannot load ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from e
    want = len(meta["class_names"]) if meta["objective"] == "multiclass" else 1
    got = model.output_shape[-1]
    if got != want:
        raise runs.RunError(f"{flag}: {model_path} outputs {got} values but its metadata "
                            f"({meta['objective']}, {len(meta['class_names'])} classes) "
                            f"needs {want}")
    return Detector(model, meta)
