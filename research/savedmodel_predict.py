"""predict --model=<a SavedModel folder>: the folder is recognised by its saved_model.pb.

- Our own export's saved_model/ (it carries metadata.json as an asset): its uint8
  `serving_default` signature already does the scaling and the test-time views, so the
  lines are the same as predict prints for model.keras (the logits come from the signature).
- Any other SavedModel (a TF-Hub classifier, a Keras `model.export`): run through
  keras.layers.TFSMLayer with --savedmodel_preprocess / _endpoint / _output, at its
  signature's input size (224 when it has none); each image prints its top --top_k output
  indices with the values as the model returns them (logits or probabilities: a SavedModel
  does not say which, so nothing is applied to them).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tensorflow as tf

from research import files, runs
from research.data import imaging
from research.detector import Detector
from research.inference import (InferenceError, Prediction, PredictOptions,
                                _decoded_batches)
from research.model_options import SavedModelOptions

METADATA_ASSET = os.path.join("assets", runs.METADATA)  # research.export puts it there


def is_savedmodel_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb"))


class ExportDetector(Detector):
    """A Detector whose scores come from our export's uint8 `serving_default` signature: its
    `probability` (p(positive) averaged over the test-time views, as Detector computes it) and
    the softmax of its view-averaged `logits` (Detector's class probabilities)."""

    def __init__(self, path: str, meta: dict):
        self.meta = meta
        self.model = None
        self._loaded = tf.saved_model.load(path)  # owns the variables the signature reads

    def score_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._loaded.signatures["serving_default"](images=tf.constant(images, tf.uint8))
        n = len(images)
        if self.classifier:
            return np.full(n, np.nan, np.float32), out["probabilities"].numpy()
        probs = (tf.nn.softmax(out["logits"]).numpy() if self.meta["objective"] == "multiclass"
                 else np.zeros((n, 0), np.float32))
        return out["probability"].numpy(), probs


def export_detector(path: str) -> Detector | None:
    """A Detector over our export's SavedModel folder, or None for any other SavedModel."""
    meta_path = os.path.join(path, METADATA_ASSET)
    if not os.path.isfile(meta_path):
        return None
    return ExportDetector(path, files.read_json(meta_path))


def predict_any(path: str, paths: list[str], opts: SavedModelOptions,
                options: PredictOptions) -> Iterator[Prediction]:
    """Top --top_k outputs of any SavedModel per image (see the module docstring)."""
    from research.models.savedmodel import savedmodel_model

    model = savedmodel_model(SavedModelOptions(**{**opts.__dict__, "savedmodel_dir": path}))
    size = tuple(int(v) for v in model.input.shape[1:3])
    for batch in _decoded_batches(paths, size, imaging.DEFAULT_RESIZE_POLICY, options):
        ok = [i for i, (_, img, _) in enumerate(batch) if img is not None]
        out = (np.asarray(model(np.stack([batch[i][1] for i in ok]).astype(np.float32),
                                training=False)) if ok else np.zeros((0, 0)))
        if out.ndim != 2 and ok:
            raise InferenceError(f"--model={path}: outputs shape {out.shape[1:]} per image, "
                                 "not a vector of scores")
        j = 0
        for p, _, error in batch:
            if error is not None:
                yield Prediction(p, None, "", (), error)
                continue
            order = np.argsort(-out[j], kind="stable")[:max(1, options.top_k)]
            yield Prediction(p, None, str(order[0]),
                             tuple((str(k), float(out[j, k])) for k in order))
            j += 1
