"""airbench96_faster's proxy selection (research/training/proxy.py,
research/recipes/airbench96_faster.flags) held against a numpy transcription of
airbench96_faster.py at KellerJordan/cifar10-airbench f1c599c: which examples are kept, the
proxy's own training step (every 4th, on the kept examples' summed loss, its SGD in PyTorch's
units and get_lr), its architecture, and the recipe's numbers against its hyp."""

import numpy as np
import pytest

from research.training import recipes

# airbench96_faster.hyp
LR, WD, MOMENTUM, BIAS_SCALER, SMOOTHING = 9.0, 0.012, 0.85, 64.0, 0.2
BATCH, BATCH_MASKED, EPOCHS = 1024, 512, 45.0
PROXY_WIDTHS, NET_WIDTHS, TRAIN_EVERY = (32, 64, 64), (128, 384, 512), 4
KILOSTEP = 1024 * (1 + 1 / (1 - MOMENTUM))
REF_LR = LR / KILOSTEP                # per summed example
REF_WD = WD * BATCH / KILOSTEP        # SGD's weight_decay is this / the group's lr
MANIFEST = {"image_shape": [32, 32, 3], "class_names": [f"c{i}" for i in range(10)]}


def ref_get_lr(step: int, total: int) -> float:
    """main() and train_proxy()'s get_lr (LambdaLR's factor at `step`)."""
    warmup = int(total * 0.1)
    if step < warmup:
        frac = step / warmup
        return 0.2 * (1 - frac) + 1.0 * frac
    return (total - step) / (total - warmup)


def ref_mask(losses, keep: int):
    """mask[loss1.argsort()[-keep:]] = True."""
    mask = np.zeros(len(losses), bool)
    mask[np.argsort(losses, kind="stable")[-keep:]] = True
    return mask


def ref_sgd(p, g, buf, step: int, total: int, bn_shift: bool):
    """torch.optim.SGD(nesterov=True, momentum) on one parameter of the group [norm biases:
    lr x bias_scaler, weight_decay wd / that lr] or [the rest: lr, wd / lr], at LambdaLR's
    rate of `step`. `buf` None before its first step. Returns (p, buf)."""
    lr = REF_LR * BIAS_SCALER if bn_shift else REF_LR
    d = g + (REF_WD / lr) * p
    buf = d if buf is None else MOMENTUM * buf + d
    return p - lr * ref_get_lr(step, total) * (d + MOMENTUM * buf), buf


def ref_losses(logits, class_id):
    """nn.CrossEntropyLoss(label_smoothing=0.2, reduction='none')."""
    import tensorflow as tf

    logp = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    onehot = tf.one_hot(class_id, logp.shape[-1])
    return -((1 - SMOOTHING) * tf.reduce_sum(onehot * logp, -1)
             + SMOOTHING * tf.reduce_mean(logp, -1))


def recipe_config(**overrides):
    from research.training.config import TrainConfig

    s = recipes.load_recipe(recipes.AIRBENCH96_FASTER)
    return TrainConfig(**{"data_dir": "", "run_name": "proxy", "precision": "float32", **s,
                          **overrides})


def test_proxy_recipe_is_airbench96_fasters_hyp():
    """lr 9.0 and wd 0.012 per 1024 examples (as airbench96's), 45 epochs, get_lr (0.2 -> 1
    over 10% of the steps, then down to 0), the proxy's widths, 512 of 1024 kept, trained
    every 4th step; the whitening bias never frozen (main()'s swap condition never holds)."""
    from research.training.schedule import LinearWarmupDecay

    ours = recipes.load_recipe(recipes.AIRBENCH96_FASTER)
    a96 = recipes.load_recipe(recipes.AIRBENCH96)
    assert ours["epochs"] == EPOCHS and ours["batch_size"] == BATCH
    assert ours["learning_rate"] == pytest.approx(LR / (1 + 1 / (1 - MOMENTUM)), rel=1e-8)
    assert ours["weight_decay"] == pytest.approx(WD / LR, rel=1e-5)
    assert ours["proxy_widths"] == PROXY_WIDTHS and ours["proxy_train_every"] == TRAIN_EVERY
    assert round(ours["proxy_keep"] * BATCH) == BATCH_MASKED
    assert ours["model_options"]["widths"] == NET_WIDTHS
    assert ours["model_options"]["group_convs"] == 3
    assert "whiten_bias_epochs" not in ours
    changed = {k for k in set(ours) | set(a96) if ours.get(k) != a96.get(k)}
    assert changed == {"epochs", "warmup_epochs", "final_lr_fraction", "whiten_bias_epochs",
                       "proxy_widths", "proxy_keep", "proxy_train_every"}
    assert ours["model_options"] == a96["model_options"]
    # the schedule over the whole run, on 45,000 (ours) and 50,000 (the reference's) images;
    # InfiniteCifarLoader: steps_per_epoch = n // 1024, total = ceil(45 steps_per_epoch)
    for n in (45000, 50000):
        per_epoch = n // BATCH
        total = int(np.ceil(per_epoch * EPOCHS))
        assert total == int(round(EPOCHS * per_epoch))  # research.training.state.plan_steps
        sched = LinearWarmupDecay(1.0, int(ours["warmup_epochs"] * per_epoch), total,
                                  ours["initial_lr_fraction"], ours["final_lr_fraction"])
        steps = np.arange(total)
        np.testing.assert_allclose(sched(steps).numpy(),
                                   [ref_get_lr(int(s), total) for s in steps],
                                   rtol=1e-5, atol=1e-6)


def test_proxy_keeps_the_hardest_half_in_batch_order():
    """hardest(): the indices of mask[loss1.argsort()[-512:]] = True, i.e. inputs[mask]'s
    rows in batch order."""
    import tensorflow as tf

    from research.training import proxy

    losses = np.random.default_rng(0).gamma(2.0, size=BATCH).astype(np.float32)
    idx = proxy.hardest(tf.constant(losses), BATCH_MASKED).numpy()
    np.testing.assert_array_equal(idx, np.flatnonzero(ref_mask(losses, BATCH_MASKED)))
    assert proxy.kept_count(recipe_config(), BATCH) == BATCH_MASKED


def _selector(cfg, images=None, manifest=MANIFEST):
    import keras

    from research.models.layers import init_from_data
    from research.training.model import make_model
    from research.training.proxy import ProxySelector
    from research.training.schedule import learning_rate_schedule

    keras.utils.set_random_seed(0)
    main = make_model(cfg, manifest)
    if images is not None:
        init_from_data(main, images)
    sched = learning_rate_schedule(cfg, cfg.learning_rate, 2, 20)
    return main, ProxySelector.create(cfg, manifest, main, sched)


def test_proxy_architecture_is_make_net_of_hyp_proxy():
    """make_net(hyp['proxy']): widths 32/64/64, depth 2 (no third conv, no residual), the
    main net's whitening filters with the bias frozen (requires_grad False), BatchNorm
    without weight, momentum 0.1 (Keras 0.9), eps 1e-12, Linear(64, 10, bias=False) x 1/9."""
    from research.models.layers import data_initialised

    main, sel = _selector(recipe_config())
    m = sel.model
    convs = [x for x in m.layers if x.name.startswith("group") and "_conv" in x.name]
    assert [tuple(x.kernel.shape) for x in convs] == [
        (3, 3, 24, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64), (3, 3, 64, 64),
        (3, 3, 64, 64)]
    assert not any("residual" in x.name or "conv3" in x.name for x in m.layers)
    (w,), (w_main,) = data_initialised(m), data_initialised(main)
    np.testing.assert_array_equal(w.kernel.numpy(), w_main.kernel.numpy())
    assert not w.trainable and w_main.trainable
    np.testing.assert_array_equal(w.bias.numpy(), 0.0)
    bns = [x for x in m.layers if x.name.endswith("_bn")]
    assert len(bns) == 6 and not any(x.scale or x.gamma.trainable for x in bns)
    assert all(x.momentum == pytest.approx(0.9) and x.epsilon == 1e-12 for x in bns)
    dense = m.get_layer("logits")
    assert dense.bias is None and tuple(dense.kernel.shape) == (64, 10)
    assert m.get_layer("feature_scale").scale == pytest.approx(1 / 9)
    trained = {v.path.split("/")[0] for v in m.trainable_variables}
    assert "whiten" not in trained and len(m.trainable_variables) == 6 + 6 + 1
    assert len(sel.buffers) == len(m.trainable_variables)


def test_proxy_step_is_airbench96_fasters_train_proxy():
    """5 steps of the proxy on batches of 1024 (a tiny proxy on 16x16 images, the recipe's
    rates unchanged)
    against train_proxy() in numpy, each step from our weights before it: the kept examples
    are mask[loss1.argsort()[-512:]] of the proxy's losses before its step; at steps 0 and 4
    the proxy takes torch's SGD step on (loss1 * mask).sum() at lr 9 / kilostep_scale x
    get_lr(step) (BN biases x 64, weight decay wd / the group's lr); at the others it does
    not move."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    cfg = recipe_config(proxy_widths=(8, 16), precision="float32")
    cfg.model_options = {**cfg.model_options, "widths": (8, 16)}
    images = rng.uniform(size=(256, 16, 16, 3)).astype(np.float32)
    _, sel = _selector(cfg, images, {**MANIFEST, "image_shape": [16, 16, 3]})
    variables = sel.model.trainable_variables
    bufs = [None] * len(variables)
    total = 20  # _selector's schedule: 2 warm-up steps of 20, as get_lr(total=20)
    for step in range(5):
        x = rng.uniform(size=(BATCH, 16, 16, 3)).astype(np.float32)
        y = rng.integers(0, 10, size=BATCH)
        batch = {"image": tf.constant(x), "class_id": tf.constant(y),
                 "label": tf.constant((y == 3).astype(np.int64)),
                 "index": tf.constant(np.arange(BATCH))}
        before = [v.numpy() for v in variables]
        with tf.GradientTape() as tape:
            loss1 = ref_losses(sel.model(batch["image"], training=True), batch["class_id"])
            mask = ref_mask(loss1.numpy(), BATCH_MASKED)
            loss = tf.reduce_sum(loss1 * mask.astype(np.float32))
        grads = tape.gradient(loss, variables)
        want = before
        if step % TRAIN_EVERY == 0:
            want = []
            for i, (v, p, g) in enumerate(zip(variables, before, grads)):
                p, bufs[i] = ref_sgd(p, g.numpy(), bufs[i], step, total, v.name == "beta")
                want.append(p)
        kept = sel.select(batch, tf.constant(step, tf.int64))
        np.testing.assert_array_equal(kept["index"].numpy(), np.flatnonzero(mask))
        np.testing.assert_array_equal(kept["image"].numpy(), x[mask])
        for v, w, p in zip(variables, want, before):
            if step % TRAIN_EVERY:
                np.testing.assert_array_equal(v.numpy(), p)
            else:
                np.testing.assert_allclose(v.numpy(), w, rtol=1e-4,
                                           atol=1e-5 * np.abs(w).max(),
                                           err_msg=f"{v.path} at step {step}")
                assert not np.allclose(w, p), v.path  # the step moved it


@pytest.mark.parametrize("bad,message", [
    (dict(optimizer="sgd"), "--optimizer=sgd_l2"),
    (dict(model="scratch", model_options={}), "--model=fast"),
    (dict(precision="mixed_float16"), "mixed_float16 is not supported with --proxy_widths"),
])
def test_proxy_refuses_what_it_is_not_defined_for(syn, bad, message):
    from research.training.config import ConfigError

    recipe_config(data_dir=syn).validate()
    with pytest.raises(ConfigError, match=message):
        recipe_config(data_dir=syn, **bad).validate()


def _loop_config(tmp_path, data_dir, **overrides):
    cfg = recipe_config(**{**dict(
        data_dir=data_dir, checkpoint_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "logs"),
        batch_size=32, proxy_widths=(4, 8), augment=False, steps_per_loop=1, progress=False,
        gradcam_images=0, eval_batch_size=16), **overrides})
    cfg.model_options = {**cfg.model_options, "widths": (8, 16)}
    return cfg


@pytest.mark.slow  # 110 s on 2 shared cores at load 14 (tf.function traces the loop)
def test_proxy_in_the_train_loop_trains_the_network_on_the_kept_half(syn, tmp_path):
    """One step of our train loop with the proxy: the network's loss is the mean over
    mask[proxy loss1.argsort()[-16:]] of 32, its BatchNorm on those 16 only (main() trains on
    inputs[mask]); the proxy took its step 0; both networks and the proxy's buffers are in
    the checkpoint."""
    import keras
    import tensorflow as tf

    from research.data import pipeline
    from research.training import inputs
    from research.training import state as train_state
    from research.training.steps import make_train_loop

    cfg = _loop_config(tmp_path, syn, train_steps=4)
    manifest = pipeline.load_manifest(syn)
    keras.utils.set_random_seed(0)
    plan = train_state.plan_steps(cfg, manifest)
    state = train_state.create_train_state(cfg, tf.distribute.get_strategy(), manifest, plan)
    ds = pipeline.make_dataset(syn, "train", 32, True, stream=inputs.train_stream(cfg))
    b = {k: v.numpy() for k, v in next(iter(ds)).items()}
    models = (state.model, state.proxy.model)
    saved = [[v.numpy() for v in m.weights] for m in models]
    loss1 = ref_losses(state.proxy.model(b["image"], training=True), b["class_id"]).numpy()
    mask = ref_mask(loss1, 16)
    want = float(np.mean(ref_losses(state.model(b["image"][mask], training=True),
                                    b["class_id"][mask])))
    plain = float(np.mean(ref_losses(state.model(b["image"][:16], training=True),
                                     b["class_id"][:16])))
    assert abs(plain - want) > 1e-4  # the subset matters
    for m, s in zip(models, saved):
        for v, x in zip(m.weights, s):
            v.assign(x)
    it = iter(tf.data.Dataset.from_tensor_slices({k: v[None] for k, v in b.items()}))
    make_train_loop(cfg, state, manifest["positive_class_id"], None)(it, tf.constant(1))
    assert float(state.train_metrics["loss"].result()) == pytest.approx(want, rel=1e-5)
    moved = [not np.array_equal(v.numpy(), x) for v, x in
             zip(state.proxy.model.trainable_variables, saved[1])]
    assert all(moved)
    path = state.manager.save()
    names = [n for n, _ in tf.train.list_variables(path)]
    assert any(n.startswith("proxy/") for n in names)
    assert sum(n.startswith("proxy_buffers/") for n in names) == len(state.proxy.buffers)


@pytest.mark.slow
def test_proxy_run_resumes_bit_exact(syn, tmp_path):
    """The proxy recipe (tiny nets, batch 32) stopped at step 4 and resumed ends bit for bit
    where an unbroken run of 8 steps ends: the network, its optimizer, the proxy and its
    buffers (the proxy trains at steps 0 and 4: the resumed half starts with a proxy step)."""
    from helpers import whole_and_resumed

    def run(name):
        return _loop_config(tmp_path / name, syn, train_steps=8, steps_per_loop=2,
                            eval_every_steps=4, deterministic=True)

    a, b, names = whole_and_resumed(run("whole"), run("broken"), 4,
                                    ("model/", "optimizer/", "proxy/", "proxy_buffers/"))
    assert any(k.startswith("proxy_buffers/") for k in names)
    assert any(k.startswith("proxy/") for k in names)
    for k in names:
        np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)
