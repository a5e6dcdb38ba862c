"""An export that loads without this package: the trained detector as Keras' own layers, a
SavedModel for TF Serving, and a TFLite conversion.

`keras_only(model)` rebuilds a trained model from stock Keras layers, same layer names, same
weights, float32 whatever the training precision: FusedBatchNorm becomes BatchNormalization,
PatchWhitening a 'valid' Conv2D with its kernel and bias, BackbonePreprocess a 1x1 Conv2D
doing the backbone's preprocess_input (channel order, mean, scale; gray tiled to RGB), and
the PartialDirac initializer (which no longer matters once trained) Keras' default.

`write_saved_model(model, meta, path)` writes a SavedModel whose `serving_default` takes uint8
images of `meta["image_shape"]` and returns what `research.detector.Detector` computes
(the same functions: scaling, P(positive), the TTA views); `convert_to_tflite` turns it into
a .tflite file. metadata.json's "serving" entry (`serving_contract`) describes the signature.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from research import detector, files, runs
from research.model_options import BACKBONES
from research.models.backbones import BackbonePreprocess
from research.models.layers import FusedBatchNorm, PatchWhitening
from research.models.savedmodel import CAFFE_MEAN_BGR, affine_for_mode  # noqa: F401

SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUTS = ("probability", "logits", "threshold")
CLASSIFIER_OUTPUTS = ("probabilities", "logits")  # an export without a positive class


class ExportError(ValueError):
    """A model with a layer that has no stock Keras equivalent here."""


# --------------------------------------------------------------------- Keras-only model

def preprocess_affine(backbone: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (1, 1, channels, 3), bias (3,)) of the 1x1 convolution that computes
    BackbonePreprocess(backbone) on `channels`-channel raw pixels (its record's mode: 'caffe'
    is RGB -> BGR minus the ImageNet mean, 'tf' x / 127.5 - 1, 'none' the pixels as they
    are)."""
    return affine_for_mode(BACKBONES[backbone].preprocess, channels)


def _numpy(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float32)


def _stock_config(layer) -> dict:
    """The layer's config at float32, with our initializers replaced by Keras' default."""
    config = layer.get_config()
    if "dtype" in config:
        config["dtype"] = "float32"
    for key, value in config.items():
        if key.endswith("_initializer") and isinstance(value, dict) and str(
                value.get("registered_name", "")).startswith("research>"):
            config[key] = "glorot_uniform"
    return config


def stock_layer(layer) -> tuple[keras.layers.Layer, list[np.ndarray]]:
    """(a stock Keras layer computing what `layer` does at inference, float32, same name;
    the weights to give it once built)."""
    name, trainable = layer.name, layer.trainable
    if isinstance(layer, FusedBatchNorm):  # get_weights' order follows trainability: by name
        return keras.layers.BatchNormalization(
            momentum=layer.momentum, epsilon=layer.epsilon, name=name, dtype="float32",
            trainable=trainable), [_numpy(layer.gamma), _numpy(layer.beta),
                                   _numpy(layer.moving_mean), _numpy(layer.moving_variance)]
    if isinstance(layer, PatchWhitening):
        kernel, bias = _numpy(layer.kernel), _numpy(layer.bias)
        return keras.layers.Conv2D(kernel.shape[-1], layer.kernel_size, padding="valid",
                                   name=name, dtype="float32", trainable=trainable
                                   ), [kernel, bias]
    if isinstance(layer, BackbonePreprocess):
        kernel, bias = preprocess_affine(layer.backbone, layer.input.shape[-1])
        return keras.layers.Conv2D(3, 1, name=name, dtype="float32", trainable=trainable
                                   ), [kernel, bias]
    if isinstance(layer, keras.layers.TFSMLayer):  # a SavedModel backbone: kept, by path
        return layer, layer.get_weights()
    if type(layer).__module__.startswith("research"):
        raise ExportError(f"layer {name!r} ({type(layer).__name__}) has no stock Keras "
                          "equivalent in research.export")
    return layer.__class__.from_config(_stock_config(layer)), layer.get_weights()


def keras_only(model: keras.Model) -> keras.Model:
    """A copy of `model` made of Keras' own layers only (nested models included), float32,
    with the same layer names and the same outputs: it loads with plain
    `keras.models.load_model`."""
    pairs = []

    def clone(layer):
        if isinstance(layer, keras.Model):  # a nested backbone: its own graph, cloned alike
            return _clone_graph(layer, clone)
        new, weights = stock_layer(layer)
        pairs.append((new, weights))
        return new

    copy = _clone_graph(model, clone)
    for new, weights in pairs:
        new.set_weights(weights)
    return copy


def _clone_graph(model: keras.Model, clone) -> keras.Model:
    # New inputs named after the model's input layers (clone_model's own take the tensors'
    # names, which in keras.applications are not the layers').
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype="float32" if "float" in str(
            t.dtype) else t.dtype, name=t._keras_history[0].name), model.input)
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)


def save_keras_only(model: keras.Model, path: str) -> keras.Model:
    """Writes `keras_only(model)` to `path` (a .keras file, atomically); returns it."""
    stock = keras_only(model)
    with files.atomic_path(path, "the exported model") as tmp:
        stock.save(tmp)
    return stock


# ------------------------------------------------------------------------- SavedModel

def serving_contract(meta: dict) -> dict:
    """What metadata.json says about the SavedModel's signature."""
    h, w, c = meta["image_shape"]
    k = len(meta["class_names"]) if meta["objective"] == "multiclass" else 1
    views = (f"averaged over the test-time views (tta {bool(meta['tta'])}, tta_shifts "
             f"{bool(meta.get('tta_shifts', False))})")
    inputs = {INPUT_NAME: {"dtype": "uint8", "shape": [None, h, w, c],
                           "what": "RGB (or gray) pixels 0..255 at this size (resize or crop "
                                   "first), any batch size"}}
    if meta.get("classifier"):
        return {"signature": SIGNATURE, "inputs": inputs, "outputs": {
            "probabilities": {"dtype": "float32", "shape": [None, k], "what": (
                f"softmax over the {k} classes (class_names order) of the logits {views}")},
            "logits": {"dtype": "float32", "shape": [None, k],
                       "what": "the logits, averaged over the same views"}}}
    return {
        "signature": SIGNATURE,
        "inputs": inputs,
        "outputs": {
            "probability": {"dtype": "float32", "shape": [None], "what": (
                f"P({meta['positive_class']}), averaged over the test-time views (tta "
                f"{bool(meta['tta'])}, tta_shifts {bool(meta.get('tta_shifts', False))})")},
            "logits": {"dtype": "float32", "shape": [None, k],
                       "what": "the logits, averaged over the same views"},
            "threshold": {"dtype": "float32", "shape": [None], "what": (
                f"the val-chosen threshold {meta['threshold']} on every row: "
                f"{meta['positive_class']} when probability >= threshold")}},
    }


class DetectorModule(tf.Module):
    """The SavedModel's root: the model's variables, the threshold, metadata.json as an
    asset and `serve`, the serving signature."""

    def __init__(self, model: keras.Model, meta: dict, metadata_file: str | None = None):
        super().__init__(name="detector")
        # The model's tf.Variables, not the Keras model itself: TFLite's converter freezes
        # these, while a tracked Keras model leaves them as (uninitialised) resources.
        self.model_variables = [v.value for v in model.variables]
        classifier = bool(meta.get("classifier"))
        if not classifier:
            self.threshold = tf.Variable(float(meta["threshold"]), trainable=False,
                                         dtype=tf.float32, name="threshold")
        if metadata_file:
            self.metadata = tf.saved_model.Asset(metadata_file)
        # A constant in the graph (TFLite has no initialised variables).
        threshold = None if classifier else float(meta["threshold"])
        h, w, c = meta["image_shape"]
        spec = tf.TensorSpec([None, h, w, c], tf.uint8, name=INPUT_NAME)

        @tf.function(input_signature=[spec])
        def serve(images):
            """uint8 images [batch, h, w, c] -> probability [batch] (of the positive class,
            TTA-averaged as predict does), logits [batch, k], threshold [batch]; a
            classifier's: probabilities [batch, k] (softmax of the logits), logits."""
            probability, logits = detector.detector_scores(
                model, detector.scale_images(images, meta["scale"]), meta["objective"],
                None if classifier else meta["positive_class_id"], meta["tta"],
                meta.get("tta_shifts", False))
            if classifier:
                logits = tf.cast(logits, tf.float32)
                return {"probabilities": tf.nn.softmax(logits, axis=-1), "logits": logits}
            return {"probability": tf.cast(probability, tf.float32),
                    "logits": tf.cast(logits, tf.float32),
                    "threshold": tf.fill(tf.shape(images)[:1], threshold)}

        self.serve = serve


def write_saved_model(model: keras.Model, meta: dict, path: str,
                      metadata_file: str | None = None) -> str:
    """Writes the detector's SavedModel folder at `path`, whole or not at all (a full disk:
    OutOfSpaceError). `model` should be Keras-only and float32 (keras_only)."""
    module = DetectorModule(model, meta, metadata_file)
    with files.atomic_dir(path, "the SavedModel") as tmp:
        tf.saved_model.save(module, tmp, signatures={SIGNATURE: module.serve})
    return path


# ------------------------------------------------------------------------ the export

def export_detector(model: keras.Model, meta: dict, model_path: str) -> keras.Model:
    """The export folder of a trained detector: model.keras (Keras-only), metadata.json
    (`meta` plus the serving contract) and saved_model/, each written atomically. Returns
    the Keras-only model."""
    meta = {**meta, "serving": serving_contract(meta)}
    stock = save_keras_only(model, model_path)
    runs.write_metadata(model_path, meta)
    write_saved_model(stock, meta, runs.saved_model_path(model_path),
                      runs.metadata_path(model_path))
    return stock


def refresh_export(model_path: str, tflite: bool = False, flag: str = "--model") -> list[str]:
    """Rewrites an existing export (one with our custom layers too) as `export_detector`
    writes it, and with `tflite` adds model.tflite. Returns the paths written."""
    meta = runs.read_metadata(model_path, flag)
    model = detector.load_detector(model_path, meta, flag).model
    export_detector(model, meta, model_path)
    written = [model_path, runs.metadata_path(model_path), runs.saved_model_path(model_path)]
    if tflite:
        written.append(convert_to_tflite(runs.saved_model_path(model_path),
                                         runs.tflite_path(model_path)))
    return written


# ----------------------------------------------------------------------------- TFLite

def convert_to_tflite(saved_model_dir: str, path: str) -> str:
    """Converts the SavedModel's serving signature to a .tflite file at `path` (atomically),
    with TFLite's built-in ops only (no Flex delegate needed), float32 weights."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, [SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    data = converter.convert()
    return files.write_bytes(path, data, "the TFLite model")


def run_tflite(path: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """The .tflite model's outputs on uint8 `images` (a reference for tests and users)."""
    interpreter = tf.lite.Interpreter(model_path=path)
    runner = interpreter.get_signature_runner(SIGNATURE)
    return runner(**{INPUT_NAME: np.asarray(images, np.uint8)})
