"""Neural style transfer (Gatys, Ecker and Bethge, "A Neural Algorithm of Artistic Style",
2015), as keras.io's example (fchollet, examples/generative/neural_style_transfer.py) and
Deep Learning with Python (8.3) do it, piece by piece:

- features of a VGG19 (or VGG16) without its classifier; style from the Gram matrices of
  block1_conv1 .. block5_conv1, content from block5_conv2 (keras.io's layers);
- loss = content_weight * sum((F_gen - F_content)^2)
       + style_weight / L * sum_l sum((G_l(gen) - G_l(style))^2) / norm_l
       + tv_weight * sum((dx^2 + dy^2)^1.25), with keras.io's weights 2.5e-8, 1e-6, 1e-6;
- norm_l = 4 * 3^2 * (rows * cols)^2 as keras.io writes it (channels = 3 and the *image's*
  size for every layer: `--style_normalization=keras_io`), or Gatys' 4 N_l^2 M_l^2 (the
  layer's channels and positions: `gatys`);
- plain SGD on the image, learning rate 100 decayed by 0.96 every 100 steps, 4,000 steps, the
  image starting as the content image, rows 400 (columns to keep its aspect).

keras.io optimises the VGG-preprocessed image (BGR, mean subtracted); we keep the variable in
raw RGB 0..255 and preprocess inside the loss. That map is a channel permutation plus a shift,
so gradients, SGD steps and the total-variation term are the same; the result is clipped to
0..255 only when it is written, as keras.io's deprocess_image does. keras.io recomputes the
style and content features every step on a batch of three images; we compute them once
(they are constants), which gives the same loss.

The backbone may also be one of our own networks (`--model=scratch|fast --weights=<run>`),
rebuilt at the image's size with that run's weights (research.models.backbones.build_base):
its default layers are the last layer of each block (style) and of the last block (content).

Resumable: every `checkpoint_every` steps a tf.train.Checkpoint of the image and the
optimizer (its step counter and schedule position) is saved in <out_dir>/checkpoints; the same
command restores it and goes on; a different content, style or setting other than the length
and intervals is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from research import files
from research.data.imaging import encode_image, load_image_file
from research.errors import UserError
from research.fields import first_error, setting
from research.model_options import BACKBONES, OWN_NETWORKS, WEIGHTS_CHOICES_HELP

# Backbones whose record names style and content layers (the VGGs), then our networks.
STYLE_BACKBONES = tuple(b.name for b in BACKBONES.values() if b.style_layers)
STYLE_MODELS = STYLE_BACKBONES + OWN_NETWORKS
NORMALIZATIONS = ("keras_io", "gatys")
CONFIG = "style_transfer.json"
RESULT = "result.png"


class StyleTransferError(UserError):
    """A bad setting or input of style transfer; the message names the flag or file."""


@dataclasses.dataclass
class StyleOptions:
    """Style transfer's settings and their one set of defaults (the app's flags)."""
    model: str = setting("vgg19", f"Backbone: {' or '.join(STYLE_BACKBONES)} "
                         "(keras.applications, no classifier), or one of our networks "
                         f"({', '.join(OWN_NETWORKS)}) with --weights=<run name>.",
                         choices=STYLE_MODELS)
    weights: str = setting("imagenet", f"Backbone weights: {WEIGHTS_CHOICES_HELP}. imagenet "
                           "needs Keras' cached no-top file (~/.keras/models); none: random "
                           "weights (tests).")
    content_layer: str | None = setting(None, "Layer of the content loss (default: "
                                        "block5_conv2 for VGG, the last block's output of "
                                        "ours).")
    style_layers: tuple[str, ...] = setting((), "Layers of the style loss (default: "
                                            "block1_conv1..block5_conv1 for VGG, each block's "
                                            "output of ours).")
    content_weight: float = setting(2.5e-8, "Weight of the content loss (keras.io's).", ge=0)
    style_weight: float = setting(1e-6, "Weight of the style loss, shared by its layers "
                                  "(keras.io's).", ge=0)
    tv_weight: float = setting(1e-6, "Weight of the total-variation loss (keras.io's).", ge=0)
    style_normalization: str = setting("keras_io", "Each layer's Gram distance divided by "
                                       "4 * 3^2 * (rows * cols)^2 (keras_io: its code, the "
                                       "weights above are tuned for it) or by "
                                       "4 * channels^2 * positions^2 of the layer (gatys: the "
                                       "paper's).", choices=NORMALIZATIONS)
    image_rows: int = setting(400, "Rows of the generated image (columns keep the content "
                              "image's aspect); the style image is resized to the same.",
                              ge=8)
    steps: int = setting(4000, "SGD steps in all (a resumed run goes on to this).", ge=1,
                         resume=True)
    learning_rate: float = setting(100.0, "SGD learning rate on 0..255 pixels at step 0.",
                                   gt=0)
    lr_decay_steps: int = setting(100, "The learning rate is multiplied by --lr_decay_rate "
                                  "every this many steps (smoothly, ExponentialDecay).", ge=1)
    lr_decay_rate: float = setting(0.96, "See --lr_decay_steps.", gt=0, le=1)
    summary_every: int = setting(100, "TensorBoard image and losses every this many steps.",
                                 ge=1, resume=True)
    checkpoint_every: int = setting(100, "Checkpoint (image and optimizer) and result.png "
                                    "every this many steps.", ge=1, resume=True)
    seed: int = setting(0, "Seed of the random weights of --weights=none (a resumed run "
                        "rebuilds the same network).", ge=0)

    def validate(self) -> tuple[str, str] | None:
        if self.model in OWN_NETWORKS and self.weights == "imagenet":
            return "weights", (f"the {self.model} network has no ImageNet weights: give "
                               "--weights=<run name> (or none)")
        return first_error(self)


# ---------------------------------------------------------------------------------------------
# The losses, one small function each (keras.io's names).

def gram_matrix(features: tf.Tensor) -> tf.Tensor:
    """(H, W, C) -> (C, C): the channels' inner products over positions."""
    flat = tf.reshape(features, (-1, tf.shape(features)[-1]))
    return tf.matmul(flat, flat, transpose_a=True)


def style_norm(features_shape, image_shape, normalization: str) -> float:
    """The divisor of one layer's Gram distance (see the module docstring)."""
    if normalization == "keras_io":
        channels, size = 3, image_shape[0] * image_shape[1]
    else:
        channels, size = features_shape[-1], features_shape[0] * features_shape[1]
    return 4.0 * channels ** 2 * float(size) ** 2


def style_loss(style_gram: tf.Tensor, generated: tf.Tensor, norm: float) -> tf.Tensor:
    return tf.reduce_sum(tf.square(style_gram - gram_matrix(generated))) / norm


def content_loss(content: tf.Tensor, generated: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.square(generated - content))


def total_variation_loss(x: tf.Tensor) -> tf.Tensor:
    """keras.io's: sum over pixels of (dy^2 + dx^2)^1.25, (1, H, W, C)."""
    a = tf.square(x[:, :-1, :-1, :] - x[:, 1:, :-1, :])
    b = tf.square(x[:, :-1, :-1, :] - x[:, :-1, 1:, :])
    return tf.reduce_sum(tf.pow(a + b, 1.25))


# ---------------------------------------------------------------------------------------------
# The backbone.

def default_layers(model: str, base: keras.Model) -> tuple[str, tuple[str, ...]]:
    """(content layer, style layers) of `model` by default."""
    b = BACKBONES[model]
    if b.style_layers:
        return b.content_layer, b.style_layers
    names = [layer.name for layer in base.layers[1:]]
    ends = []
    for block in BACKBONES[model].blocks:
        inside = [n for n in names if n.startswith(block)]
        if inside:
            ends.append(inside[-1])
    return ends[-1], tuple(ends)


def feature_model(opts: StyleOptions, image_shape, checkpoint_dir: str = ""
                  ) -> tuple[keras.Model, str, tuple[str, ...]]:
    """(raw RGB 0..255 -> {layer: features}, content layer, style layers) at `image_shape`."""
    from research.model_options import TransferOptions
    from research.models.backbones import BackbonePreprocess, build_base

    keras.utils.set_random_seed(opts.seed)
    base = build_base(opts.model, TransferOptions(weights=opts.weights), tuple(image_shape),
                      checkpoint_dir)
    base.trainable = False
    content, style = default_layers(opts.model, base)
    content = opts.content_layer or content
    style = opts.style_layers or style
    names = [layer.name for layer in base.layers[1:]]
    for flag, wanted in (("content_layer", [content]), ("style_layers", style)):
        bad = [n for n in wanted if n not in names]
        if bad:
            raise StyleTransferError(f"--{flag}: no layer {', '.join(bad)} in {opts.model}; "
                                     f"its layers are: {', '.join(names)}")
    inputs = keras.Input(shape=tuple(image_shape), name="image")
    x = (keras.layers.Rescaling(1 / 255.0, name="preprocess")(inputs)
         if opts.model in OWN_NETWORKS else BackbonePreprocess(opts.model,
                                                               name="preprocess")(inputs))
    outputs = keras.Model(base.input, {n: base.get_layer(n).output
                                       for n in dict.fromkeys([content, *style])})(x)
    return keras.Model(inputs, outputs, name=f"{opts.model}_features"), content, tuple(style)


# ---------------------------------------------------------------------------------------------
# The images and the record of a run.

def image_shape_for(content: np.ndarray, rows: int) -> tuple[int, int, int]:
    h, w = content.shape[:2]
    return rows, max(1, int(round(w * rows / h))), 3


def load_pair(content_path: str, style_path: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(content, style) as float32 RGB 0..255 at (rows, cols): the content image stretched to
    that size keeping its aspect, the style image stretched to the same (keras.io's
    load_img(target_size=...))."""
    content = load_image_file(content_path)
    shape = image_shape_for(content, rows)
    style = load_image_file(style_path)
    return (load_image_file(content_path, shape[:2], "stretch").astype(np.float32),
            np.asarray(keras.ops.convert_to_numpy(tf.image.resize(
                style, shape[:2], antialias=True)), np.float32))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def record_of(opts: StyleOptions, content_path: str, style_path: str) -> dict:
    """What a run is: the inputs (by content hash) and every setting a resume may not change."""
    fixed = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
             if not f.metadata.get("resume")}
    fixed["style_layers"] = list(fixed["style_layers"])
    return {"content": _sha256(content_path), "style": _sha256(style_path), **fixed}


def check_resume(out_dir: str, record: dict) -> None:
    path = os.path.join(out_dir, CONFIG)
    if not os.path.isfile(path):
        return
    old = files.read_json(path)
    changed = [k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
    if changed:
        raise StyleTransferError(
            f"{out_dir} holds a style transfer with other {', '.join(changed)} "
            f"(see {path}); give another --out_dir, or the same settings to resume it")


# ---------------------------------------------------------------------------------------------
# The optimisation.

@dataclasses.dataclass
class StyleResult:
    image: np.ndarray          # uint8 (rows, cols, 3)
    start_step: int            # 0, or the step a resumed run restored
    final_step: int
    losses: list[dict]         # {"step", "total", "content", "style", "tv"} per summary
    seconds: float


def make_loss_fn(extractor: keras.Model, content: str, style: tuple[str, ...],
                 content_image: np.ndarray, style_image: np.ndarray, opts: StyleOptions):
    """loss(image (1, H, W, 3) raw) -> (total, content, style, tv), the targets fixed."""
    target_content = extractor(content_image[None], training=False)[content][0]
    style_features = extractor(style_image[None], training=False)
    grams = {n: gram_matrix(style_features[n][0]) for n in style}
    norms = {n: style_norm(style_features[n].shape[1:], content_image.shape, opts.
                           style_normalization) for n in style}

    def loss_fn(image):
        feats = extractor(image, training=False)
        c = content_loss(target_content, feats[content][0])
        s = tf.add_n([style_loss(grams[n], feats[n][0], norms[n]) for n in style])
        tv = total_variation_loss(image)
        total = (opts.content_weight * c + opts.style_weight / len(style) * s
                 + opts.tv_weight * tv)
        return total, c, s, tv
    return loss_fn


def to_uint8(image) -> np.ndarray:
    return np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)


def style_transfer(content_path: str, style_path: str, opts: StyleOptions, out_dir: str,
                   tb_dir: str | None = None, checkpoint_dir: str = "",
                   log=print) -> StyleResult:
    """Runs (or resumes) style transfer; writes <out_dir>/result.png, checkpoints and
    losses.json, and TensorBoard summaries to `tb_dir` (default <out_dir>/tensorboard)."""
    problem = opts.validate()
    if problem:
        raise StyleTransferError(f"--{problem[0]}: {problem[1]}")
    record = record_of(opts, content_path, style_path)
    check_resume(out_dir, record)
    content_image, style_image = load_pair(content_path, style_path, opts.image_rows)
    extractor, content, style = feature_model(opts, content_image.shape, checkpoint_dir)
    os.makedirs(out_dir, exist_ok=True)
    files.write_json(os.path.join(out_dir, CONFIG), record, "the style transfer's settings")

    image = tf.Variable(content_image[None], name="image")
    schedule = keras.optimizers.schedules.ExponentialDecay(
        opts.learning_rate, decay_steps=opts.lr_decay_steps, decay_rate=opts.lr_decay_rate)
    optimizer = keras.optimizers.SGD(schedule)
    optimizer.build([image])
    ckpt = tf.train.Checkpoint(image=image, optimizer=optimizer)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(out_dir, "checkpoints"),
                                         max_to_keep=2)
    losses_path = os.path.join(out_dir, "losses.json")
    losses: list[dict] = []
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        if os.path.isfile(losses_path):
            losses = files.read_json(losses_path)
    start = int(optimizer.iterations.numpy())
    losses = [row for row in losses if row["step"] <= start]
    if start:
        log(f"resumed from {manager.latest_checkpoint} at step {start}")
    loss_fn = make_loss_fn(extractor, content, style, content_image, style_image, opts)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            parts = loss_fn(image)
        optimizer.apply_gradients([(tape.gradient(parts[0], image), image)])
        return parts

    writer = tf.summary.create_file_writer(tb_dir or os.path.join(out_dir, "tensorboard"))
    result = os.path.join(out_dir, RESULT)

    def save(step: int) -> None:
        manager.save(checkpoint_number=step)
        files.write_bytes(result, encode_image(to_uint8(image[0]), result), "an image")
        files.write_json(losses_path, losses, "the losses")

    started = time.perf_counter()
    step = start
    while step < opts.steps:
        total, c, s, tv = (float(v) for v in train_step())
        step += 1
        if not np.isfinite(total):  # the last checkpoint and result.png stay as they were
            raise StyleTransferError(
                f"the loss is {total} at step {step}: the steps diverged; lower "
                f"--learning_rate (now {opts.learning_rate}) or the loss weights (keras.io's "
                "suit VGG's features, not every network's)")
        if step % opts.summary_every == 0 or step == opts.steps:
            row = {"step": step, "total": total, "content": c, "style": s, "tv": tv}
            losses.append(row)
            with writer.as_default(step=step):
                for k in ("total", "content", "style", "tv"):
                    tf.summary.scalar(f"style_transfer/{k}_loss", row[k])
                tf.summary.image("style_transfer/image", to_uint8(image[0])[None])
            log(f"step {step:5d} | loss {total:.4g} (content {c:.4g}, style {s:.4g}, "
                f"tv {tv:.4g})")
        if step % opts.checkpoint_every == 0 and step < opts.steps:
            save(step)
    if step > start or not os.path.isfile(result):
        save(step)
    writer.flush()
    return StyleResult(to_uint8(image[0]), start, step, losses,
                       time.perf_counter() - started)
