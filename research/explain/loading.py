"""Loading the models the explain CLI works on (keras.applications or our training runs),
at the precision the explanations run in."""

from __future__ import annotations

import contextlib
import json
import os

import keras
import numpy as np

from research import detector, devices, machine, runs
from research.errors import UserError
from research.explain.core import Explainer
from research.explain.options import PRECISIONS
from research.model_options import APPLICATIONS, BACKBONES
from research.models.backbones import application, keras_models_dir, md5_note, preprocess_input


CLASS_INDEX = "imagenet_class_index.json"


class ModelLoadError(UserError):
    """A model that cannot be had (weights missing, no finished run); the message names the
    file to place or the flag."""


def imagenet_class_names() -> list[str] | None:
    """The 1,000 ImageNet class names, from Keras' cached index (downloaded if possible)."""
    try:
        path = keras.utils.get_file(
            CLASS_INDEX, "https://storage.googleapis.com/download.tensorflow.org/data/"
            "imagenet_class_index.json", cache_subdir="models",
            file_hash="c2c37ea517e94d9795004a39431a14cb")
    except Exception:
        return None
    with open(path) as f:
        index = json.load(f)
    return [index[str(i)][1] for i in range(len(index))]


def resolve_precision(precision: str) -> str:
    """The precision explanations run in: machine.resolve_precision's 'auto' without float16
    (mixed_bfloat16 on CPUs with AMX or AVX512-BF16, else float32)."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return machine.resolve_precision(precision, devices.current().capability, float16=False)


@contextlib.contextmanager
def policy_scope(policy: str):
    """Layers built inside take `policy` as their dtype policy (Keras has no public scope)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def with_policy(model: keras.Model, policy: str) -> keras.Model:
    """A copy of `model` computing under dtype policy `policy`, with the same weights.

    Every layer but the model's outputs gets the policy (nested sub-models included); the
    outputs keep their own, so the scores stay float32 as in training."""
    outputs = {id(t._keras_history[0]) for t in keras.tree.flatten(model.outputs)}

    def clone(layer):
        config = layer.get_config()
        if id(layer) not in outputs and "dtype" in config:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def load_application(name: str, weights: str = "imagenet", precision: str = "float32"
                     ) -> Explainer:
    """A keras.applications model with its own preprocess_input; weights 'imagenet', 'none'
    or a path to a weights file; `precision` one of PRECISIONS."""
    if name not in APPLICATIONS:
        raise ModelLoadError(f"--model: unknown model {name!r}; choose one of "
                             f"{', '.join(APPLICATIONS)}")
    policy = resolve_precision(precision)
    b = BACKBONES[name]
    w = None if weights in (None, "", "none") else weights
    if w not in (None, "imagenet") and not os.path.isfile(w):
        raise ModelLoadError(f"--weights: {w} not found")
    try:
        with policy_scope(policy):
            model = application(b)(weights="imagenet" if w == "imagenet" else None,
                                   input_shape=(b.native_size, b.native_size, 3))
    except Exception as e:
        raise ModelLoadError(
            f"could not get the ImageNet weights of {name} ({e}). Without network access, "
            f"place {b.top_weights_file}{md5_note(b.top_weights_md5)} in "
            f"{keras_models_dir()}/ (or pass --weights=<path> or --weights=none)") from e
    if w not in (None, "imagenet"):
        model.load_weights(w)
    names = imagenet_class_names() if w is not None else None
    return Explainer(model, lambda x: preprocess_input(b.preprocess, x), class_names=names)


def load_run(checkpoint_dir: str, run_name: str, precision: str = "float32"
             ) -> tuple[Explainer, dict]:
    """Our trained detector: the exported model.keras of the run, rebuilt under `precision`
    (one of PRECISIONS)."""
    policy = resolve_precision(precision)
    path = runs.exported_model_path(checkpoint_dir, run_name)
    if not os.path.isfile(path):
        raise ModelLoadError(f"--run_name: {path} not found; the run has not finished "
                             "training (its export is written at the end)")
    try:
        meta = runs.read_metadata(path)
    except runs.RunError as e:
        raise ModelLoadError(f"--run_name={run_name}: {str(e).removeprefix('--model: ')}"
                             ) from e
    model = keras.models.load_model(path, compile=False)
    model = with_policy(model, policy)  # also undoes a bf16 export when asked for float32
    preprocess = detector.preprocess_fn(meta["scale"])
    names = meta["class_names"] if meta["objective"] == "multiclass" else [
        meta["positive_class"]]
    return Explainer(model, preprocess, class_names=names,
                     output="softmax" if meta["objective"] == "multiclass" else "sigmoid"), meta


def top_k(ex: Explainer, logits: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    probs = ex.probabilities(logits)
    out = []
    for p in probs:
        idx = np.argsort(-p)[:k]
        out.append([(ex.class_name(int(i)), float(p[i])) for i in idx])
    return out
