"""Gradient-based explanations for any Keras model, nested sub-models included.

The usual recipe, `keras.Model(model.inputs, [model.get_layer(name).output, model.output])`,
fails with "Graph disconnected" when the layer lives inside a nested backbone, and only works
for functional models. We instead run the model itself and *capture* the target layer's
output as it is produced (the layer's `call` is wrapped for the duration of the forward
pass). The captured tensor is the one the rest of the network consumes, so
`tape.gradient(score, captured)` is exact at any nesting depth, for functional, Sequential
and subclassed models alike, eagerly or inside `tf.function`.

All methods take raw images (float, 0..255, HxWx3 RGB) and an `Explainer` that knows how to
preprocess them for its model and where its pre-softmax scores are.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

_POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
            keras.layers.GlobalMaxPooling2D, keras.layers.GlobalAveragePooling2D)


class LayerNotFoundError(ValueError):
    pass


class DisconnectedLayerError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Layers, searched through nested sub-models.

def iter_layers(model: keras.Model, prefix: str = "") -> Iterable[tuple[str, keras.layers.Layer]]:
    """(path, layer) for every layer, depth first, in the order the model lists them."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, prefix=path + "/")


def spatial_layers(model: keras.Model) -> list[tuple[str, keras.layers.Layer]]:
    """Layers with a 4-D (N, H, W, C) output and H, W > 1: the candidates for CAMs."""
    out = []
    for path, layer in iter_layers(model):
        if isinstance(layer, (keras.layers.InputLayer, keras.Model)):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and (shape[1] is None or shape[1] > 1) and (
                shape[2] is None or shape[2] > 1):
            out.append((path, layer))
    return out


def find_layer(model: keras.Model, name: str | None = None) -> tuple[str, keras.layers.Layer]:
    """The named layer ('block5_conv3' or 'vgg16/block5_conv3'), or by default the last
    spatial feature map that is not a pooling layer."""
    candidates = spatial_layers(model)
    if name is None:
        for path, layer in reversed(candidates):
            if not isinstance(layer, _POOLING + (keras.layers.Dropout,)):
                return path, layer
        raise LayerNotFoundError(f"model {model.name!r} has no spatial (4-D) layer to explain")
    for path, layer in iter_layers(model):
        if path == name or layer.name == name:
            return path, layer
    raise LayerNotFoundError(
        f"no layer named {name!r} in model {model.name!r}; spatial layers are: "
        + ", ".join(p for p, _ in candidates))


@contextlib.contextmanager
def capture(layers: list[keras.layers.Layer], inputs: bool = False):
    """Records each layer's outputs (or with `inputs`, its first input) while the block runs:
    {id(layer): [tensors...]}."""
    store: dict = {id(layer): [] for layer in layers}
    patched = []
    for layer in layers:
        if "call" in layer.__dict__:
            raise RuntimeError(f"layer {layer.name} is already being captured")
        original = layer.call

        def wrapper(*args, _orig=original, _key=id(layer), **kwargs):
            out = _orig(*args, **kwargs)
            store[_key].append(args[0] if inputs else out)
            return out

        object.__setattr__(layer, "call", wrapper)
        patched.append(layer)
    try:
        yield store
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")


def _final_activation_layer(model: keras.Model):
    """The last layer whose activation is softmax or sigmoid, if any."""
    last = None
    for _, layer in iter_layers(model):
        act = getattr(layer, "activation", None)
        if act is not None and getattr(act, "__name__", "") in ("softmax", "sigmoid"):
            last = layer
    return last


@contextlib.contextmanager
def linear_head(model: keras.Model):
    """Temporarily removes a final softmax/sigmoid so the model returns pre-activation scores."""
    layer = _final_activation_layer(model)
    if layer is None:
        yield None
        return
    original = layer.activation
    layer.activation = keras.activations.linear
    try:
        yield original.__name__
    finally:
        layer.activation = original


# Rectifier-like activations whose backward pass guided backpropagation replaces.
RECTIFIERS = ("relu", "relu6", "leaky_relu", "elu", "gelu", "silu")
_RECTIFIER_LAYERS = (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU)


def guided_backward(fn: Callable) -> Callable:
    """`fn` unchanged forward, with guided backpropagation's rule backward: the incoming
    gradient g passes, unscaled, where g > 0, the activation's input x > 0 and the activation
    is not saturated there (f'(x) > 0: ReLU6 above 6); elsewhere 0. For ReLU that is Springenberg
    et al.'s rule exactly; GELU and SiLU get the same gate (x > 0 and g > 0), not their own
    slope, so a positive unit passes its gradient as a ReLU would."""
    @tf.custom_gradient
    def guided(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        slope = tape.gradient(y, x)

        def backward(g):
            gate = (x > 0) & (g > 0) & (slope > 0)
            return g * tf.cast(gate, g.dtype)

        return y, backward

    return guided


@contextlib.contextmanager
def guided_activations(model: keras.Model):
    """Gives every rectifier of the model (activation functions of layers, and ReLU-type
    layers), nested sub-models included, the guided backward pass while the block runs."""
    swapped, patched = [], []
    for _, layer in iter_layers(model):
        act = getattr(layer, "activation", None)
        if act is not None and getattr(act, "__name__", "") in RECTIFIERS:
            layer.activation = guided_backward(act)
            swapped.append((layer, act))
        elif isinstance(layer, _RECTIFIER_LAYERS):
            if "call" in layer.__dict__:
                raise RuntimeError(f"layer {layer.name} is already patched")
            object.__setattr__(layer, "call", guided_backward(layer.call))
            patched.append(layer)
    try:
        yield len(swapped) + len(patched)
    finally:
        for layer, act in swapped:
            layer.activation = act
        for layer in patched:
            object.__delattr__(layer, "call")


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Explainer:
    """A model plus how to feed it: `preprocess` maps raw 0..255 images to model inputs.

    `output` says what the model's scores are turned into probabilities with: 'softmax',
    'sigmoid', or 'auto' (a final softmax/sigmoid layer is detected; otherwise one output
    means sigmoid and several mean softmax).
    """
    model: keras.Model
    preprocess: Callable[[tf.Tensor], tf.Tensor] = lambda x: x
    class_names: list[str] | None = None
    output: str = "auto"

    def __post_init__(self):
        final = _final_activation_layer(self.model)
        if self.output == "auto":
            if final is not None:
                self.output = final.activation.__name__
            else:
                self.output = "sigmoid" if self.model.output.shape[-1] == 1 else "softmax"
        self._compiled: dict = {}

    @property
    def input_size(self) -> tuple[int, int]:
        shape = self.model.input.shape
        return int(shape[1]), int(shape[2])

    def class_name(self, index: int) -> str:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)

    def forward(self, raw):
        with linear_head(self.model):
            return tf.cast(self.model(self.preprocess(raw), training=False), tf.float32)

    def compiled(self, key, fn):
        """`fn` of tensors, compiled once per `key` and per shape past the first axis: the
        batch axis is left open, so any batch size reuses one trace (one per model, which is
        what TensorFlow's retracing warning expects)."""
        if key not in self._compiled:
            self._compiled[key] = _open_batch(fn)
        return self._compiled[key]

    def logits(self, raw) -> tf.Tensor:
        """Pre-activation float32 scores of raw 0..255 images; compiled."""
        return self.compiled(("logits",), self.forward)(tf.convert_to_tensor(raw, tf.float32))

    def probabilities(self, logits) -> np.ndarray:
        logits = np.asarray(logits, np.float64)
        if self.output == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def class_indices(self, n: int, class_index) -> np.ndarray:
        """Per-image class: given (int or per-image list), or -1 for the top prediction, which
        the compiled functions resolve from the same forward pass."""
        if class_index is None:
            return np.full(n, -1, np.int32)
        idx = np.broadcast_to(np.asarray(class_index, np.int32), (n,)).copy()
        try:
            num = int(self.model.output.shape[-1])
        except (AttributeError, ValueError, TypeError):  # subclassed: no symbolic output
            num = None
        if np.any(idx < 0) or (num is not None and np.any(idx >= num)):
            raise ValueError(f"class index {class_index} outside [0, {num})")
        return idx

    def gradients(self, layer: keras.layers.Layer, raw: tf.Tensor, classes: tf.Tensor,
                  path: str | None = None):
        """(A, dS/dA, logits, classes) for the layer, compiled once per layer."""
        def fn(raw, classes):
            with tf.GradientTape() as tape:
                with capture([layer]) as store:
                    logits = self.forward(raw)
                if not store[id(layer)]:
                    raise DisconnectedLayerError(
                        f"layer {path or layer.name} was not called in the forward pass "
                        f"of {self.model.name}")
                acts = store[id(layer)][-1]
                classes, score = class_scores(logits, classes)
            grads = tape.gradient(score, acts)
            if grads is None:
                raise DisconnectedLayerError(
                    f"the gradient of the score with respect to layer {path or layer.name} "
                    f"is None: the layer is not connected to {self.model.name}'s output")
            return tf.cast(acts, tf.float32), tf.cast(grads, tf.float32), logits, classes

        return self.compiled(("grad", id(layer)), fn)(raw, classes)

    def input_gradients(self, raw: tf.Tensor, classes: tf.Tensor, guided: bool = False):
        """(dS/d raw, logits, classes), compiled; `guided`: through guided_activations."""
        def fn(raw, classes):
            with tf.GradientTape() as tape:
                tape.watch(raw)
                if guided:
                    with guided_activations(self.model):
                        logits = self.forward(raw)
                else:
                    logits = self.forward(raw)
                classes, score = class_scores(logits, classes)
            return tf.cast(tape.gradient(score, raw), tf.float32), logits, classes

        return self.compiled(("input", guided), fn)(raw, classes)

    def scores(self, raw: tf.Tensor, classes: tf.Tensor) -> tf.Tensor:
        """The pre-activation score of each image's (resolved) class; compiled."""
        return tf.gather(self.logits(raw), classes, axis=1, batch_dims=1)

    def masked_scores(self, raw: tf.Tensor, masks: tf.Tensor, owner: tf.Tensor,
                      classes: tf.Tensor) -> tf.Tensor:
        """Score of each image's class on raw[owner[j]] times masks[j] (upsampled to the
        image), for j over the batch of masks; compiled."""
        def fn(raw, masks, owner, classes):
            up = upsample(masks, tf.shape(raw)[1:3])
            logits = self.forward(tf.gather(raw, owner) * up[..., None])
            return tf.gather(logits, tf.gather(classes, owner), axis=1, batch_dims=1)

        return self.compiled(("masked",), fn)(raw, masks, owner, classes)


def _open_batch(fn):
    traced: dict = {}

    def call(*args):
        shapes = tuple((tuple(a.shape[1:]), a.dtype) for a in args)
        if shapes not in traced:
            traced[shapes] = tf.function(fn, autograph=False, input_signature=[
                tf.TensorSpec([None, *a.shape[1:]], a.dtype) for a in args])
        return traced[shapes](*args)

    return call


def class_scores(logits, classes):
    """(classes with -1 replaced by the top class, the score of each image's class)."""
    classes = tf.where(classes < 0, tf.argmax(logits, -1, output_type=tf.int32), classes)
    return classes, tf.gather(logits, classes, axis=1, batch_dims=1)


@dataclasses.dataclass
class Explanation:
    maps: np.ndarray          # (N, H, W) in [0, 1], at the model's input size
    classes: np.ndarray       # (N,) explained class per image
    logits: np.ndarray        # (N,) pre-activation score of that class
    probabilities: np.ndarray  # (N,) its probability
    method: str
    layer: str | None
    params: dict
    low_res: np.ndarray | None = None  # CAM methods: the normalised map at the layer's size
    # Per-image arrays (first axis N) a method adds: 1-D ones go into the JSON sidecars.
    extras: dict = dataclasses.field(default_factory=dict)


def normalize_maps(maps: tf.Tensor) -> tf.Tensor:
    """Scales each map to [0, 1] by its max; an all-zero map stays zero (never NaN)."""
    peak = tf.reduce_max(maps, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(maps, peak)


def upsample(maps: tf.Tensor, size) -> tf.Tensor:
    return tf.image.resize(maps[..., None], size, method="bilinear")[..., 0]


def finish(ex: Explainer, maps, classes, logits, method, layer, params, low_res=None,
           extras: dict | None = None) -> Explanation:
    """The Explanation of `maps` (N, H, W) for `classes`, from the images' full logits."""
    classes = np.asarray(classes)
    logits = np.asarray(logits)
    chosen = logits[np.arange(len(classes)), classes]
    probs = ex.probabilities(logits)[np.arange(len(classes)), classes]
    return Explanation(np.asarray(maps), classes, chosen, probs, method, layer, params,
                       None if low_res is None else np.asarray(low_res),
                       {k: np.asarray(v) for k, v in (extras or {}).items()})


def prepare(ex: Explainer, images, class_index):
    raw = tf.convert_to_tensor(np.asarray(images, np.float32))
    if raw.shape.rank != 4:
        raise ValueError(f"images must be (N, H, W, 3), got {raw.shape}")
    return raw, tf.constant(ex.class_indices(raw.shape[0], class_index))


def saliency(ex: Explainer, images, class_index=None) -> Explanation:
    """Vanilla saliency: |dS/dx|, max over colour channels."""
    raw, classes = prepare(ex, images, class_index)
    grads, logits, classes = ex.input_gradients(raw, classes)
    maps = normalize_maps(tf.reduce_max(tf.abs(grads), axis=-1))
    return finish(ex, maps, classes.numpy(), logits, "saliency", None, {})


def saliency_positive(ex: Explainer, images, class_index=None) -> Explanation:
    """Saliency from positive evidence only: max over colour channels of max(dS/dx, 0), the
    pixels whose brightening raises the score."""
    raw, classes = prepare(ex, images, class_index)
    grads, logits, classes = ex.input_gradients(raw, classes)
    maps = normalize_maps(tf.reduce_max(tf.nn.relu(grads), axis=-1))
    return finish(ex, maps, classes.numpy(), logits, "saliency_positive", None, {})


def smoothgrad(ex: Explainer, images, class_index=None, n: int = 25, noise: float = 0.15,
               seed: int = 0) -> Explanation:
    """SmoothGrad (Smilkov et al. 2017): the vanilla saliency map averaged over `n` copies of
    the image with Gaussian noise of std `noise` x (max - min) of that image; the paper finds
    10-20% best. We average |dS/dx| (max over channels) rather than signed gradients, so
    opposite-signed evidence does not cancel."""
    raw, classes = prepare(ex, images, class_index)
    logits = ex.logits(raw)  # the class and score reported are those of the clean image
    classes, _ = class_scores(logits, classes)
    rng = tf.random.Generator.from_seed(seed)
    span = tf.reduce_max(raw, axis=[1, 2, 3], keepdims=True) - tf.reduce_min(
        raw, axis=[1, 2, 3], keepdims=True)
    total = tf.zeros(raw.shape[:3])
    for _ in range(n):
        noisy = raw + rng.normal(raw.shape) * noise * span
        grads, _, _ = ex.input_gradients(noisy, classes)
        total += tf.reduce_max(tf.abs(grads), axis=-1)
    maps = normalize_maps(total / n)
    return finish(ex, maps, classes.numpy(), logits, "smoothgrad", None,
                  {"n": n, "noise": noise, "seed": seed})
