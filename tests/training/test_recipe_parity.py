"""The fast recipe against airbench94, piece by piece (no torch needed): each piece of ours
beside a small numpy re-derivation of the formula in airbench's own code (airbench==0.1.8,
lib_airbench94.py and utils.py), over 20 steps or more where the piece has steps.

The numpy functions below are written the way airbench writes them (PyTorch's conventions:
a summed loss, NCHW filters, torch.optim.SGD's update), not the way our code does, so that a
port that drifts in one piece fails here."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import tiny_config
from research.data import pipeline
from research.model_options import MODEL_OPTIONS
from research.models import MODELS, build_model
from research.models.layers import PatchWhitening
from research.training import inputs, state as train_state
from research.training.config import TrainConfig
from research.training.schedule import LinearWarmupDecay
from research.training.steps import make_train_loop, per_example_loss

# lib_airbench94.hyp['opt'] (per 1024 examples of a summed loss)
LR, MOMENTUM, WD, BIAS_SCALER, SMOOTHING = 11.5, 0.85, 0.0153, 64.0, 0.2


# ------------------------------------------------------------------- airbench, in numpy

def ab_triangle(steps, start=0.0, end=0.0, peak=0.5):
    """utils.train's triangle(), with numpy for torch."""
    xp = np.array([0, int(peak * steps), steps])
    fp = np.array([start, 1, end])
    x = np.arange(1 + steps)
    m = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    b = fp[:-1] - (m * xp[:-1])
    indices = np.sum(x[:, None] >= xp[None, :], 1) - 1
    indices = np.clip(indices, 0, len(m) - 1)
    return m[indices] * x + b[indices]


def ab_param_groups(batch_size):
    """utils.train's decoupled hyperparameters -> torch.optim.SGD's per group."""
    kilostep_scale = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr = LR / kilostep_scale
    wd = WD * batch_size / kilostep_scale
    lr_biases = lr * BIAS_SCALER
    return {"biases": (lr_biases, wd / lr_biases), "others": (lr, wd / lr)}


class AbSGD:
    """torch.optim.SGD(momentum, nesterov=True), dampening 0: d_p = g + wd p;
    buf = d_p (first step) or m buf + d_p; p -= lr (d_p + m buf)."""

    def __init__(self, params, groups):
        self.p, self.groups, self.buf = params, groups, {}

    def step(self, grads, lr_factor):
        for name, g in grads.items():
            lr, wd = self.groups[name]
            d_p = g + wd * self.p[name]
            self.buf[name] = d_p.copy() if name not in self.buf else (
                MOMENTUM * self.buf[name] + d_p)
            self.p[name] = self.p[name] - lr * lr_factor * (d_p + MOMENTUM * self.buf[name])


def ab_cross_entropy_sum(logits, labels, smoothing):
    """nn.CrossEntropyLoss(label_smoothing=s, reduction='none')(...).sum()."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    nll = -logp[np.arange(len(labels)), labels]
    return float(np.sum((1 - smoothing) * nll + smoothing * (-logp.mean(1))))


def ab_whitening_weight(images_nchw, k=2, eps=5e-4):
    """utils.get_patches / get_whitening_parameters / init_whitening_conv."""
    x = images_nchw
    n, c, h, w = x.shape
    patches = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # n c H W k k
    patches = patches.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c, k, k)  # unfold, transpose
    flat = patches.reshape(len(patches), -1).astype(np.float64)
    cov = flat.T @ flat / len(flat)
    values, vectors = np.linalg.eigh(cov, UPLO="U")
    values = values[::-1].reshape(-1, 1, 1, 1)
    vectors = vectors.T.reshape(c * k * k, c, k, k)[::-1]
    scaled = vectors / np.sqrt(values + eps)
    return np.concatenate([scaled, -scaled])  # (2 c k k, c, k, k), torch's OIHW


# --------------------------------------------------------------------------- the pieces

def test_triangle_schedule_is_airbenchs():
    for steps, start, end, peak in ((476, 0.2, 0.07, 0.23), (430, 0.2, 0.07, 0.23),
                                    (37, 0.0, 0.5, 0.5)):
        ours = LinearWarmupDecay(2.0, int(peak * steps), steps, start, end)
        got = np.array([float(ours(i)) for i in range(steps + 1)])
        np.testing.assert_allclose(got, 2.0 * ab_triangle(steps, start, end, peak),
                                   rtol=1e-6, atol=1e-7)


def test_label_smoothing_on_the_summed_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)) * 3
    labels = rng.integers(0, 10, 64)
    cfg = TrainConfig(label_smoothing=SMOOTHING)
    batch = {"class_id": tf.constant(labels), "label": tf.constant((labels == 3).astype(int))}
    ours = per_example_loss(cfg, batch, tf.constant(logits, tf.float32), None)
    assert float(tf.reduce_sum(ours)) == pytest.approx(
        ab_cross_entropy_sum(logits, labels, SMOOTHING), rel=1e-5)


class LinearWithShift(keras.layers.Layer):
    """logits = x W + beta: a kernel and a variable named as a BatchNorm shift (the one
    --bias_lr_scale speeds up), so both of airbench's parameter groups are exercised."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 10), name="kernel",
                                      initializer=keras.initializers.RandomNormal(0, 0.02))
        self.beta = self.add_weight(shape=(10,), name="beta",
                                    initializer=keras.initializers.RandomNormal(0, 0.02))

    def call(self, x):
        return tf.matmul(x, self.kernel) + self.beta


def _linear_model(image_shape, num_outputs, dtype=None, **options):
    inputs = keras.Input(shape=image_shape, name="image")
    x = keras.layers.Flatten()(keras.layers.AveragePooling2D(4)(inputs))
    return keras.Model(inputs, LinearWithShift(name="linear")(x))


def test_sgd_l2_is_airbenchs_nesterov_sgd(syn, tmp_path, monkeypatch):
    """24 steps of our train loop (--optimizer=sgd_l2 at the flagfile's conversion of
    airbench's lr / wd / bias scaler, the triangle schedule, label smoothing 0.2, mean
    loss) against airbench's summed loss and torch's SGD in numpy, on the same batches."""
    monkeypatch.setitem(MODELS, "linear_shift", _linear_model)
    monkeypatch.setitem(MODEL_OPTIONS, "linear_shift", None)
    batch, steps = 32, 24
    kilostep_scale = 1024 * (1 + 1 / (1 - MOMENTUM))
    cfg = tiny_config(syn, tmp_path, model="linear_shift", model_options={},
                      optimizer="sgd_l2", learning_rate=LR * batch / kilostep_scale,
                      weight_decay=WD / LR, bias_lr_scale=BIAS_SCALER, momentum=MOMENTUM,
                      label_smoothing=SMOOTHING, lr_schedule="linear",
                      initial_lr_fraction=0.2, final_lr_fraction=0.07, warmup_epochs=0.5,
                      train_steps=steps, batch_size=batch, augment=False, steps_per_loop=1)
    manifest = pipeline.load_manifest(syn)
    keras.utils.set_random_seed(0)
    plan = train_state.plan_steps(cfg, manifest)
    state = train_state.create_train_state(cfg, tf.distribute.get_strategy(), manifest, plan)
    layer = state.model.get_layer("linear")
    start = {"others": layer.kernel.numpy().copy(), "biases": layer.beta.numpy().copy()}
    warm = int(cfg.warmup_epochs * plan.steps_per_epoch)
    schedule = ab_triangle(steps, 0.2, 0.07, warm / steps)
    opt = AbSGD(dict(start), ab_param_groups(batch))
    loop_fn = make_train_loop(cfg, state, manifest["positive_class_id"], None)
    ours = iter(pipeline.make_dataset(syn, "train", batch, True,
                                      stream=inputs.train_stream(cfg)))
    theirs = iter(pipeline.make_dataset(syn, "train", batch, True,
                                        stream=inputs.train_stream(cfg)))
    losses = []
    for step in range(steps):
        b = next(theirs)
        x = tf.keras.layers.AveragePooling2D(4)(b["image"]).numpy().reshape(batch, -1)
        y = b["class_id"].numpy()
        logits = x @ opt.p["others"] + opt.p["biases"]
        losses.append(ab_cross_entropy_sum(logits, y, SMOOTHING) / batch)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        target = np.full_like(p, SMOOTHING / 10)
        target[np.arange(batch), y] += 1 - SMOOTHING
        dlogits = p - target  # d(summed loss) / d logits
        opt.step({"others": x.T @ dlogits, "biases": dlogits.sum(0)}, schedule[step])
        loop_fn(ours, tf.constant(1))
        assert float(state.train_metrics["loss"].result()) == pytest.approx(losses[-1],
                                                                            rel=1e-4)
        state.train_metrics["loss"].reset_state()
    np.testing.assert_allclose(layer.kernel.numpy(), opt.p["others"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layer.beta.numpy(), opt.p["biases"], rtol=1e-4, atol=1e-6)
    for name in start:  # both groups moved
        assert not np.allclose(opt.p[name], start[name], atol=1e-4), name
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("every,total", [(2, 5), (5, 20)])
def test_lookahead_is_airbenchs(syn, tmp_path, every, total):
    """LookaheadState.update every `every` steps with decay 0.95**every * (step/total)**3,
    then decay 1.0 at the last step, run by hand after each of our plain steps, against our
    in-graph lookahead (total a multiple of `every` and not)."""
    manifest = pipeline.load_manifest(syn)

    def run(cfg, by_hand):
        keras.utils.set_random_seed(0)
        plan = train_state.Plan(10, total, total, total)
        state = train_state.create_train_state(cfg, tf.distribute.get_strategy(), manifest, plan)
        loop_fn = make_train_loop(cfg, state, manifest["positive_class_id"], None)
        it = iter(pipeline.make_dataset(syn, "train", 32, training=True, seed=0))
        if not by_hand:
            loop_fn(it, tf.constant(total))
            return state
        fast = [v for v in state.model.weights
                if "float" in str(v.dtype) and "seed_generator" not in v.path]
        ema = [v.numpy().copy() for v in fast]
        alpha = 0.95 ** every * (np.arange(total + 1) / total) ** 3

        def update(decay):
            for i, v in enumerate(fast):
                ema[i] = ema[i] + (1 - decay) * (v.numpy() - ema[i])  # lerp_(net, 1 - decay)
                v.assign(ema[i])

        for step in range(1, total + 1):
            loop_fn(it, tf.constant(1))
            if step % every == 0:
                update(alpha[step])
            if step >= total:
                update(1.0)
        return state

    kw = dict(train_steps=total, steps_per_loop=total)
    ours = run(tiny_config(syn, tmp_path / "a", lookahead_every=every, lookahead_decay=0.95,
                           **kw), False)
    ref = run(tiny_config(syn, tmp_path / "b", **kw), True)
    for a, b in zip(ours.model.weights, ref.model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=1e-6, err_msg=a.path)


def test_whitening_init_is_airbenchs():
    """Our PatchWhitening filters against init_whitening_conv's on the same normalised
    images: the same 24 filters, strongest direction first, +/- pairs (each eigenvector's
    sign is LAPACK's choice, so a filter may come out as its pair's)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 10, 10, 3))
    x = (x + np.roll(x, 1, axis=1) + 0.5 * np.roll(x, 1, axis=2)).astype(np.float32)
    layer = PatchWhitening(2)
    layer.build(x.shape)
    layer.init_from_data(x)
    ours = layer.kernel.numpy()                                  # (k, k, C, 24) HWIO
    ref = ab_whitening_weight(x.transpose(0, 3, 1, 2)).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    for k in range(12):
        a, b = ours[..., k], ref[..., k]
        same = np.allclose(a, b, rtol=1e-4, atol=1e-5)
        assert same or np.allclose(a, -b, rtol=1e-4, atol=1e-5), k
    np.testing.assert_allclose(ours[..., 12:], -ours[..., :12])
    norms = np.linalg.norm(ours[..., :12].reshape(-1, 12), axis=0)
    assert np.all(np.diff(norms) >= -1e-6)  # 1/sqrt(eigenvalue): strongest (smallest) first


def _flipped(syn, stream, epochs=4):
    """Per example position: was it flipped, in each of `epochs` epochs of the stream?"""
    manifest = pipeline.load_manifest(syn)
    n = manifest["splits"]["train"]["num_examples"]
    originals = pipeline.take_examples(syn, "train")["image"]
    key = {o.tobytes(): (i, False) for i, o in enumerate(originals)}
    key.update({o[:, ::-1].tobytes(): (i, True) for i, o in enumerate(originals)})
    seen = np.full((epochs, n), -1)
    ds = pipeline.make_dataset(syn, "train", n, True, stream=stream)
    for e, batch in zip(range(epochs), ds):  # batches of n: epoch e is batch e
        for img in batch["image"].numpy():
            i, flipped = key[img.tobytes()]
            seen[e, i] = flipped
    assert (seen >= 0).all()
    return seen


def test_alternating_flips_flip_every_image_in_one_of_two_epochs(syn):
    stream = pipeline.Stream(scale="uint8", pad=0, flip="alternate", shuffle_buffer=64)
    seen = _flipped(syn, stream)
    np.testing.assert_array_equal(seen[1:] + seen[:-1], 1)  # every image, every two epochs
    assert 0.4 < seen[0].mean() < 0.6  # a random half in the first epoch
    plain = _flipped(syn, dataclasses.replace(stream, flip="random"))
    assert (plain[1:] + plain[:-1] != 1).any()  # random flips do not alternate
    # The in-memory stream replays the same alternation (the disk-vs-memory check holds).
    arrays = pipeline.take_examples(syn, "train")
    manifest = pipeline.load_manifest(syn)
    mem = pipeline.make_memory_dataset(arrays, manifest, 32, stream=stream)
    disk = pipeline.make_dataset(syn, "train", 32, True, stream=stream)
    for a, b in zip(disk.take(12), mem.take(12)):
        np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())


def test_fast_cnn_head_as_airbench():
    """32 -> 31 (the 2x2 valid whitening) -> 15 -> 7 -> 3: nn.MaxPool2d(3) on the 3x3 map is a
    global max; then a bias-free linear layer with PyTorch's uniform init, times 1/9."""
    model = build_model("fast", (32, 32, 3), 10, widths=(8, 8, 16), logits_bias=False,
                        logits_init="uniform")
    head = model.get_layer("logits")
    assert head.bias is None
    bound = 1 / np.sqrt(16)
    w = head.kernel.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.5 * bound
    feats = keras.Model(model.input, model.get_layer("group2_2_act").output)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    fmap = feats(x).numpy()
    assert fmap.shape == (2, 3, 3, 16)
    want = fmap.max(axis=(1, 2)) / 9 @ w
    np.testing.assert_allclose(model(x).numpy(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_whitening_bias_trains_then_freezes(syn, tmp_path):
    """--whiten_bias_epochs: the bias moves until the boundary, then never (and a resumed run
    past it keeps it frozen)."""
    from research.training.loop import train_and_evaluate

    cfg = tiny_config(syn, tmp_path, model="fast", model_options={"widths": (8, 8)},
                      train_steps=12, steps_per_loop=2, eval_every_steps=12,
                      checkpoint_every_steps=2, keep_checkpoints=10, whiten_bias_epochs=0.5)
    train_and_evaluate(dataclasses.replace(cfg, stop_at_step=8))
    bias = {}
    for step in (2, 4, 6, 8):
        reader = tf.train.load_checkpoint(f"{cfg.run_dir}/ckpt-{step}")
        # The only trained variable with 2*2*2*3 = 24 values (kept once, under the optimizer).
        (name,) = [k for k, shape in reader.get_variable_to_shape_map().items()
                   if k.startswith("optimizer/_trainable_variables/") and shape == [24]]
        bias[step] = reader.get_tensor(name)
    per_epoch = pipeline.load_manifest(syn)["splits"]["train"]["num_examples"] // 32
    frozen_at = int(round(0.5 * per_epoch))
    assert frozen_at in bias and frozen_at > 2
    assert not np.allclose(bias[frozen_at - 2], 0)       # it trained before the boundary
    assert not np.array_equal(bias[frozen_at - 2], bias[frozen_at])
    assert np.array_equal(bias[frozen_at], bias[8])      # and not after it
    train_and_evaluate(cfg)  # resumes at 8, past the boundary
    reader = tf.train.load_checkpoint(f"{cfg.run_dir}/ckpt-12")
    np.testing.assert_array_equal(reader.get_tensor(name), bias[8])
