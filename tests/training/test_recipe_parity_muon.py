"""The Muon recipe (research/recipes/fast_cifar10_muon.flags) against airbench94_muon.py
(KellerJordan/cifar10-airbench), piece by piece, without torch: each piece of ours beside a
numpy transcription of the reference's own code, written the way it is written there
(PyTorch's conventions: a summed loss, OIHW filters, torch.optim.SGD's update, its Muon
class and zeropower_via_newtonschulz5), so that a port that drifts in one piece fails here."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.data import pipeline
from research.models import build_model
from research.training import inputs, muon, recipes, state as train_state
from research.training.config import ConfigError, TrainConfig
from research.training.schedule import learning_rate_schedule
from research.training.steps import make_train_loop, per_example_loss

MUON_RECIPE = recipes.FAST_CIFAR10_MUON

# airbench94_muon.py's main() and Muon
BATCH, BIAS_LR, HEAD_LR, WD_PER_EXAMPLE = 2000, 0.053, 0.67, 2e-6
SGD_MOMENTUM, MUON_LR, MUON_MOMENTUM, SMOOTHING = 0.85, 0.24, 0.6, 0.2
EPOCHS, WHITEN_BIAS_EPOCHS = 8, 3


# ------------------------------------------------------------------- the reference, in numpy

def bf16(x):
    """Rounds float32 to the nearest bfloat16 (ties to even), kept as float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def ref_zeropower(G, steps=3, eps=1e-7, bfloat16=True):
    """zeropower_via_newtonschulz5: X = G.bfloat16(); X /= X.norm() + eps; transposed if
    tall; `steps` times A = X X^T, B = b A + c A @ A, X = a X + B X. Each bfloat16 op rounds
    its float32 result once (`r`)."""
    r = bf16 if bfloat16 else (lambda x: np.asarray(x, np.float32))
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = r(G)
    X = r(X / r(r(np.linalg.norm(X.astype(np.float64))) + eps))
    if G.shape[0] > G.shape[1]:
        X = X.T
    for _ in range(steps):
        A = r(X @ X.T)
        B = r(r(b * A) + r(r(c * A) @ A))   # b * A + c * A @ A: (c * A) @ A
        X = r(r(a * X) + r(B @ X))
    if G.shape[0] > G.shape[1]:
        X = X.T
    return X


def ref_triangle_lr(lr0, step, total):
    """main(): group["lr"] = group["initial_lr"] * (1 - step / total)."""
    return lr0 * (1 - step / total)


class RefOptimizers:
    """main()'s optimizer1 (torch SGD, momentum 0.85, Nesterov; the whitening bias, BN
    biases and head with their lr and weight_decay=wd/lr) and optimizer2 (Muon on the
    filters), on numpy parameters in torch layouts, stepped with summed-loss gradients."""

    def __init__(self, params, kinds, batch, total, whiten_total, bfloat16=True):
        self.p, self.kinds, self.buf = params, kinds, {}
        self.wd = WD_PER_EXAMPLE * batch
        self.total, self.whiten_total, self.bfloat16 = total, whiten_total, bfloat16

    def step(self, grads, step):
        for name, g in grads.items():
            kind, p = self.kinds[name], self.p[name]
            if kind == "muon":
                buf = self.buf.get(name, np.zeros_like(g))
                buf = self.buf[name] = MUON_MOMENTUM * buf + g
                g = g + MUON_MOMENTUM * buf
                p = p * (len(p) ** 0.5 / np.linalg.norm(p))
                update = ref_zeropower(g.reshape(len(g), -1),
                                       bfloat16=self.bfloat16).reshape(g.shape)
                self.p[name] = p - ref_triangle_lr(MUON_LR, step, self.total) * update
                continue
            lr0 = HEAD_LR if kind == "head" else BIAS_LR
            total = self.whiten_total if kind == "whiten_bias" else self.total
            lr = ref_triangle_lr(lr0, step, total)
            d_p = g + (self.wd / lr0) * p
            buf = self.buf[name] = (d_p.copy() if name not in self.buf
                                    else SGD_MOMENTUM * self.buf[name] + d_p)
            self.p[name] = p - lr * (d_p + SGD_MOMENTUM * buf)


def torch_layout(v):
    v = np.asarray(v)
    return v.transpose(3, 2, 0, 1) if v.ndim == 4 else (v.T if v.ndim == 2 else v)


def ref_kind(path):
    """Which of main()'s parameter lists holds a parameter, from its role."""
    if path == "whiten/bias":
        return "whiten_bias"
    if path == "logits/kernel":
        return "head"
    if path.endswith("/beta"):
        return "norm_bias"
    if path.endswith("/kernel") and "conv" in path:
        return "muon"
    raise AssertionError(f"not a parameter of airbench94_muon's CifarNet: {path}")


# ------------------------------------------------------------------- the pieces

def test_newton_schulz_coefficients_and_steps_are_the_references():
    assert muon.NS_COEFFICIENTS == (3.4445, -4.7750, 2.0315)
    assert muon.NS_STEPS == 3 and muon.NS_EPS == 1e-7 and muon.NS_DTYPE == "bfloat16"


@pytest.mark.parametrize("shape", [(8, 72), (16, 144), (64, 216), (40, 12)])
def test_newton_schulz_matches_the_references_formula(shape):
    """float32: the same numbers to float32 rounding; bfloat16: the reference's roundings,
    up to a few bfloat16 ulps where a sum's order differs (max 3 ulps of the largest)."""
    g = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    ours32 = muon.newton_schulz(tf.constant(g), dtype="float32").numpy()
    np.testing.assert_allclose(ours32, ref_zeropower(g, bfloat16=False), rtol=0,
                               atol=2e-5 * np.abs(ours32).max())
    ours = tf.cast(muon.newton_schulz(tf.constant(g)), tf.float32).numpy()
    ref = ref_zeropower(g)
    assert np.array_equal(ours, bf16(ours))  # every value is a bfloat16
    assert np.abs(ours - ref).max() <= 3 * 2 ** -8 * np.abs(ref).max()
    assert np.mean(ours == ref) > 0.9
    # and it orthogonalises: the singular values land in about (0.5, 1.5), as its doc says
    s = np.linalg.svd(ours32, compute_uv=False)
    assert s.min() > 0.3 and s.max() < 1.6


def test_muon_update_reshapes_a_kernel_as_the_reference_a_filter():
    """A Keras (kh, kw, in, out) kernel's update is the reference's on the (out, in, kh, kw)
    filter reshaped to out rows."""
    k = np.random.default_rng(1).normal(size=(3, 3, 4, 8)).astype(np.float32)
    ours = muon.orthogonalised_update(tf.constant(k), dtype="float32").numpy()
    t = torch_layout(k)
    ref = ref_zeropower(t.reshape(len(t), -1), bfloat16=False).reshape(t.shape)
    np.testing.assert_allclose(torch_layout(ours), ref, atol=2e-5 * np.abs(ref).max())


def _recipe_config(tmp_path, data_dir, **overrides):
    settings = recipes.load_recipe(MUON_RECIPE)
    return TrainConfig(data_dir=data_dir, run_name="m", checkpoint_dir=str(tmp_path / "ck"),
                       log_dir=str(tmp_path / "logs"), **{**settings, **overrides})


def test_muon_recipe_rates_batch_and_schedule_are_the_references(syn, tmp_path):
    """The flag file's numbers against main()'s: per mean loss = per summed example x 2000;
    8 epochs of 2000 = ceil(8 * 22) steps on 45,000 images, the whitening bias 66; every
    rate lr0 (1 - step / total)."""
    s = recipes.load_recipe(MUON_RECIPE)
    assert s["batch_size"] == BATCH and s["recipe_batch_size"] == BATCH
    assert s["epochs"] == EPOCHS and s["optimizer"] == "muon"
    assert s["learning_rate"] == pytest.approx(BIAS_LR * BATCH, rel=1e-12)
    assert s["learning_rate"] * s["logits_lr_scale"] == pytest.approx(HEAD_LR * BATCH,
                                                                      rel=1e-9)
    # L2 per mean loss: torch's weight_decay = 2e-6 * batch / lr on the summed loss
    assert s["weight_decay"] == pytest.approx(WD_PER_EXAMPLE * BATCH / BIAS_LR / BATCH,
                                              rel=1e-7)
    assert s["weight_decay"] / s["logits_lr_scale"] == pytest.approx(
        WD_PER_EXAMPLE / HEAD_LR, rel=1e-7)
    assert (s["muon_lr"], s["muon_momentum"]) == (MUON_LR, MUON_MOMENTUM)
    assert s["momentum"] == SGD_MOMENTUM
    assert s["label_smoothing"] == SMOOTHING and s["whiten_bias_epochs"] == WHITEN_BIAS_EPOCHS
    assert s["whiten_bias_decay"] and not s.get("lookahead_every")
    opts = s["model_options"]
    assert opts["feature_scale"] == 1 / 256 and opts["logits_init"] == "uniform_unit_std"
    assert not opts["logits_bias"]
    cfg = _recipe_config(tmp_path, syn)
    manifest = {"splits": {"train": {"num_examples": 45000}}}
    plan = train_state.plan_steps(cfg, manifest)
    per_epoch = 45000 // BATCH  # the reference's CifarLoader drops the last partial batch
    assert plan.total_steps == math.ceil(EPOCHS * per_epoch) == 176
    from research.training.model import whiten_bias_steps

    assert whiten_bias_steps(cfg, per_epoch) == math.ceil(WHITEN_BIAS_EPOCHS * per_epoch)
    sched = learning_rate_schedule(cfg, cfg.learning_rate, 0, plan.total_steps)
    steps = np.arange(plan.total_steps)
    ours = np.array([float(sched(k)) for k in steps])
    np.testing.assert_allclose(ours, ref_triangle_lr(BIAS_LR * BATCH, steps, 176), rtol=1e-6)
    opt = muon.make_muon_optimizer(cfg, sched, per_epoch)
    whiten = opt.own_schedules[muon.WHITENING_BIAS]
    np.testing.assert_allclose([float(whiten(k)) for k in range(66)],
                               ref_triangle_lr(BIAS_LR * BATCH, np.arange(66), 66),
                               rtol=1e-6, atol=1e-4)
    assert opt.muon_lr_ratio * float(sched(10)) == pytest.approx(
        ref_triangle_lr(MUON_LR, 10, 176), rel=1e-6)


def test_muon_and_sgd_take_the_references_variables():
    """Muon: every trained 4-D filter (the reference's filter_params); SGD: the whitening
    bias, the BN shifts, the head; the whitening filters train on neither. The head's SGD
    rate is --logits_lr_scale times, its L2 divided by it; Muon's filters take no L2."""
    s = recipes.load_recipe(MUON_RECIPE)
    model = build_model("fast", (32, 32, 3), 10, **{**s["model_options"], "widths": (8, 16)})
    cfg = TrainConfig(data_dir="", run_name="m", **{k: v for k, v in s.items()
                                                    if k != "model_options"})
    kinds = {v.path: ref_kind(v.path) for v in model.trainable_variables}
    assert sorted(p for p, k in kinds.items() if k == "muon") == [
        f"group{g}_conv{i}/kernel" for g in range(2) for i in (1, 2)]
    assert "whiten/kernel" not in kinds and kinds["whiten/bias"] == "whiten_bias"
    for v in model.trainable_variables:
        assert muon.is_muon_variable(v) == (kinds[v.path] == "muon")
        assert muon.takes_l2(cfg, v) == (kinds[v.path] != "muon")
        want = s["logits_lr_scale"] if kinds[v.path] == "head" else 1.0
        assert muon.sgd_lr_scale(cfg, v) == want


def test_muon_recipe_head_init_is_unit_std():
    """reset(): nn.Linear's uniform init, then w *= 1 / w.std()."""
    model = build_model("fast", (32, 32, 3), 10, widths=(8, 16), logits_bias=False,
                        logits_init="uniform_unit_std")
    w = model.get_layer("logits").kernel.numpy()
    assert w.std(ddof=1) == pytest.approx(1.0, rel=1e-5)
    keras.utils.set_random_seed(3)
    u = np.asarray(muon_free_uniform := keras.initializers.VarianceScaling(
        1 / 3, "fan_in", "uniform", seed=7)((256, 10)))
    keras.utils.set_random_seed(3)
    from research.models.scratch import UnitStdUniform

    np.testing.assert_allclose(np.asarray(UnitStdUniform(seed=7)((256, 10))),
                               u / u.std(ddof=1), rtol=1e-5)
    assert muon_free_uniform is not None


def _probe_grads(cfg, model, batch):
    """The gradient of the mean loss (no L2: torch's SGD adds it in the step), the model
    left as it was (training mode moves the BN statistics)."""
    saved = [v.numpy() for v in model.weights]
    with tf.GradientTape() as tape:
        logits = model(batch["image"], training=True)
        loss = tf.reduce_mean(per_example_loss(cfg, batch, logits, None))
    grads = tape.gradient(loss, model.trainable_variables)
    for v, s in zip(model.weights, saved):
        v.assign(s)
    return {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}


@pytest.mark.parametrize("ns_dtype,muon_tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_muon_step_is_the_references(syn, tmp_path, monkeypatch, ns_dtype, muon_tol):
    """6 steps of our train loop with the recipe (rates rescaled to a batch of 32 as per
    mean loss, the whitening bias decaying over 1 epoch of 9 steps) against main()'s two
    optimizers in numpy, each step from our weights before it: the SGD variables to 1e-4,
    the Muon filters' update (after the renormalisation) to `muon_tol` of its norm."""
    monkeypatch.setattr(muon, "NS_DTYPE", ns_dtype)
    batch, steps = 32, 6
    cfg = _recipe_config(tmp_path, syn, batch_size=batch, recipe_batch_size=None,
                         learning_rate=BIAS_LR * batch, train_steps=steps,
                         whiten_bias_epochs=1.0, augment=False, steps_per_loop=1,
                         precision="float32", progress=False, gradcam_images=0,
                         eval_batch_size=16)
    cfg.model_options = {**cfg.model_options, "widths": (8, 16)}
    manifest = pipeline.load_manifest(syn)
    keras.utils.set_random_seed(0)
    plan = train_state.plan_steps(cfg, manifest)
    state = train_state.create_train_state(cfg, tf.distribute.get_strategy(), manifest, plan)
    assert isinstance(state.optimizer, muon.MuonSGD)
    model = state.model
    ds = pipeline.make_dataset(syn, "train", batch, True, stream=inputs.train_stream(cfg))
    batches = [{k: v.numpy() for k, v in b.items()} for b in ds.take(steps)]
    it = iter(tf.data.Dataset.from_tensor_slices(
        {k: np.stack([b[k] for b in batches]) for k in batches[0]}))
    loop_fn = make_train_loop(cfg, state, manifest["positive_class_id"], None)
    variables = {v.path: v for v in model.trainable_variables}
    kinds = {p: ref_kind(p) for p in variables}
    ref = RefOptimizers({}, kinds, batch, plan.total_steps, plan.steps_per_epoch,
                        bfloat16=ns_dtype == "bfloat16")
    for step, b in enumerate(batches):
        before = {p: torch_layout(v.numpy()) for p, v in variables.items()}
        grads = _probe_grads(cfg, model, {k: tf.constant(v) for k, v in b.items()})
        ref.p = dict(before)
        ref.step({p: batch * torch_layout(g) for p, g in grads.items()}, step)
        loop_fn(it, tf.constant(1))
        for p, v in variables.items():
            ours = torch_layout(v.numpy())
            if kinds[p] == "muon":
                start = before[p] * (len(before[p]) ** 0.5 / np.linalg.norm(before[p]))
                want, got = ref.p[p] - start, ours - start
                assert np.linalg.norm(got - want) <= muon_tol * np.linalg.norm(want), (p, step)
            else:
                np.testing.assert_allclose(ours, ref.p[p], rtol=1e-4, atol=1e-6,
                                           err_msg=f"{p} at step {step}")
    assert int(state.optimizer.iterations.numpy()) == steps


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_muon_resume_is_bit_exact(syn, tmp_path, precision):
    """The Muon recipe (a tiny net, batch 32) stopped at step 4 and resumed ends bit for bit
    where an unbroken run ends, weights and both optimizers' buffers (and, in mixed_float16,
    the loss scale and its counters)."""
    from helpers import whole_and_resumed

    def run(name, **kw):
        cfg = _recipe_config(tmp_path / name, syn, batch_size=32, recipe_batch_size=None,
                             learning_rate=BIAS_LR * 32, train_steps=8, steps_per_loop=2,
                             eval_every_steps=4, whiten_bias_epochs=0.5, precision=precision,
                             progress=False, gradcam_images=0, eval_batch_size=16,
                             deterministic=True, **kw)
        cfg.model_options = {**cfg.model_options, "widths": (8, 16)}
        return cfg

    a, b, names = whole_and_resumed(run("whole"), run("broken"), 4, ("model/", "optimizer/"))
    assert any("momentum_buffer" in k or "optimizer/_variables" in k for k in names)
    if precision == "mixed_float16":
        assert any("dynamic_scale" in k for k in names), names
    for k in names:
        np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)


def test_muon_recipe_refuses_another_batch_size_in_one_line(syn, tmp_path):
    cfg = _recipe_config(tmp_path, syn, batch_size=1024)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--batch_size: 1024") and "2000" in msg
    with pytest.raises(recipes.RecipeError, match="Muon"):
        recipes.rebatched(recipes.load_recipe(MUON_RECIPE), 256)
    # stretched keeps its shape: no warm-up, the whitening bias's 3 epochs
    s = recipes.stretched(recipes.load_recipe(MUON_RECIPE), 4)
    assert (s["epochs"], s["warmup_epochs"], s["whiten_bias_epochs"]) == (4.0, 0.0, 3.0)


def test_muon_recipe_takes_mixed_float16_under_the_agreed_loss_scale(syn, tmp_path):
    """The GPU box's default precision: the Muon step inside DynamicLossScaleOptimizer."""
    from research.training.loss_scale import DynamicLossScaleOptimizer
    from research.training.muon import MuonSGD
    from research.training.optimizers import make_optimizer

    cfg = _recipe_config(tmp_path, syn, precision="mixed_float16")
    cfg.validate()
    opt = make_optimizer(cfg, 0.1, steps_per_epoch=22)
    assert isinstance(opt, DynamicLossScaleOptimizer)
    assert isinstance(opt.inner_optimizer, MuonSGD)


@pytest.mark.parametrize("override,flag", [
    ({"optimizer": "sgd_l2"}, "--whiten_bias_decay"),
    ({"optimizer": "adamw", "whiten_bias_decay": False}, "--logits_lr_scale"),
])
def test_muon_recipe_with_a_breaking_flag_says_so_in_one_line(syn, tmp_path, override, flag):
    with pytest.raises(ConfigError) as e:
        _recipe_config(tmp_path, syn, **override).validate()
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)
