"""The custom loop: learning, replica equivalence, exact resume, NaN stop, bad flags."""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
import warm
from research.data import pipeline
from research.model_options import MODEL_OPTIONS
from research.models import MODELS
from research import metrics
from research.training import inputs, loop, state as train_state
from research.training.actions import NonFiniteLossError
from research.training.evaluator import Evaluator
from research.training.lookahead import Lookahead
from research.training.schedule import WarmupCosine
from research.training.steps import make_train_loop
from research.training.config import ConfigError

TINY = helpers.TINY_NET
config = helpers.tiny_config


def step_losses(cfg, strategy, steps):
    """Per-step training losses from the real train loop, one step per call."""
    manifest = pipeline.load_manifest(cfg.data_dir)
    plan = train_state.plan_steps(cfg, manifest)
    keras.utils.set_random_seed(cfg.seed)
    state = train_state.create_train_state(cfg, strategy, manifest, plan)
    train_loop = make_train_loop(cfg, state, manifest["positive_class_id"], None)
    it = iter(strategy.distribute_datasets_from_function(inputs.train_input_fn(cfg, 0)))
    losses = []
    for _ in range(steps):
        train_loop(it, tf.constant(1))
        losses.append(float(state.train_metrics["loss"].result()))
        state.train_metrics["loss"].reset_state()
    return losses, state


def test_loss_falls(syn, tmp_path):
    cfg = config(syn, tmp_path, learning_rate=0.1)
    losses, _ = step_losses(cfg, tf.distribute.get_strategy(), 40)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["multiclass", "binary"])
def test_two_replicas_match_one(syn, tmp_path, objective, two_replicas):
    cfg = config(syn, tmp_path, objective=objective, eval_batch_size=14)  # val 30: 14+14+2
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = two_replicas
    l1, s1 = step_losses(cfg, one, 6)
    l2, s2 = step_losses(cfg, two, 6)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    pid = pipeline.load_manifest(syn)["positive_class_id"]
    ev1, ev2 = Evaluator(cfg, one, s1.model, pid), Evaluator(cfg, two, s2.model, pid)
    for split in ("val", "test"):
        e1, e2 = ev1.evaluate(split), ev2.evaluate(split)
        n = pipeline.load_manifest(syn)["splits"][split]["num_examples"]
        assert len(e1.scores) == len(e2.scores) == n
        np.testing.assert_array_equal(e1.labels, e2.labels)
        np.testing.assert_allclose(e2.scores, e1.scores, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e2.loss, e1.loss, rtol=1e-5)
        assert e1.accuracy == e2.accuracy
    for ev in (ev1, ev2):  # both splits' batches, the partial last ones too: one trace
        assert [step.experimental_get_tracing_count() for _, step in ev._steps] == [1]


@pytest.mark.slow
def test_lookahead_two_replicas_match_one(syn, tmp_path, two_replicas):
    """The lookahead's pulls (cross-replica, between steps) give the same training and the
    same slow copies on 2 replicas as on 1."""
    cfg = config(syn, tmp_path, lookahead_every=2, lookahead_decay=0.9)
    l1, s1 = step_losses(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"), 6)
    l2, s2 = step_losses(cfg, two_replicas, 6)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(s1.lookahead.slow + s1.model.weights, s2.lookahead.slow + s2.model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.name)
    for state in (s1, s2):  # step 6 pulled: the model sits on its slow copies
        for s, f in zip(state.lookahead.slow, state.lookahead.fast):
            np.testing.assert_array_equal(f.numpy(), s.numpy())


def test_eval_counts_every_example_once(syn, tmp_path):
    cfg = config(syn, tmp_path, eval_batch_size=7)
    _, state = step_losses(cfg, tf.distribute.get_strategy(), 1)
    manifest = pipeline.load_manifest(syn)
    evaluator = Evaluator(cfg, tf.distribute.get_strategy(), state.model,
                          manifest["positive_class_id"])
    for split in ("train", "val", "test"):
        r = evaluator.evaluate(split)
        s = manifest["splits"][split]
        assert r.index.tolist() == list(range(s["num_examples"]))
        assert int(r.labels.sum()) == s["num_positive"]


def test_warmup_cosine_schedule():
    sched = WarmupCosine(1.0, 10, 110, final_fraction=0.1)
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(9)) == pytest.approx(1.0)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.55)
    assert float(sched(110)) == pytest.approx(0.1)


def run_train(syn, tmp_path, *extra):
    cmd = [sys.executable, "-m", "research.apps.train", f"--data_dir={syn}", "--run_name=r",
           f"--checkpoint_dir={tmp_path}/ck", f"--log_dir={tmp_path}/logs", "--batch_size=32",
           "--widths=8,16", "--res_blocks=1,0", "--stem_width=8", "--learning_rate=0.03",
           "--steps_per_loop=3", "--eval_every_steps=6", "--gradcam_images=0",
           "--progress=false", "--precision=float32", "--deterministic", *extra]
    return warm.run(cmd, timeout=300)


def checkpoint_values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "save_counter" not in k}


@pytest.mark.slow
def test_kill_and_resume_is_exact(syn, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_train(syn, a, "--train_steps=18", "--dropout=0.2")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_train(syn, b, "--train_steps=18", "--dropout=0.2", "--stop_at_step=9")
    assert res.returncode == 0, res.stderr[-3000:]
    assert tf.train.latest_checkpoint(f"{b}/ck/r").endswith("-9")
    res = run_train(syn, b, "--train_steps=18", "--dropout=0.2")  # a fresh process resumes
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resumed" in res.stderr and "at step 9" in res.stderr
    summary = json.loads((b / "ck" / "r" / "train_summary.json").read_text())
    assert summary["start_step"] == 9 and summary["final_step"] == 18
    assert [(s["start_step"], s["final_step"]) for s in summary["sessions"]] == [(0, 9), (9, 18)]
    assert summary["best_val_metric"] == "pr_auc" and 0.0 < summary["best_val"] <= 1.0
    res = run_train(syn, b, "--train_steps=18", "--dropout=0.2")  # finished: nothing to do
    assert res.returncode == 0 and "already finished" in res.stderr
    assert json.loads((b / "ck" / "r" / "train_summary.json").read_text()) == summary
    va = checkpoint_values(tf.train.latest_checkpoint(f"{a}/ck/r"))
    vb = checkpoint_values(tf.train.latest_checkpoint(f"{b}/ck/r"))
    assert va.keys() == vb.keys()
    slots = [k for k in va if k.startswith("optimizer/") and "iterations" not in k]
    assert slots, "optimizer slots are checkpointed"
    assert any("iterations" in k for k in va) and any(k.startswith("epoch") for k in va)
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k], err_msg=k)


class NanAfter(keras.layers.Layer):
    """Turns its input into NaN once it has been called `k` times in training."""

    def __init__(self, k, **kw):
        super().__init__(**kw)
        self.k = k

    def build(self, shape):
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=False):
        if training:
            self.calls.assign_add(1.0)
        return x + tf.where(self.calls > self.k, np.nan, 0.0)  # NaN-free gradients before k


def test_nan_stops_cleanly_and_keeps_checkpoint(syn, tmp_path, monkeypatch):
    def nan_model(image_shape, num_outputs, dtype=None, **opts):
        base = MODELS["scratch"](image_shape=image_shape, num_outputs=num_outputs, **TINY)
        return keras.Sequential([base, NanAfter(12)])

    monkeypatch.setitem(MODELS, "nan", nan_model)
    monkeypatch.setitem(MODEL_OPTIONS, "nan", None)  # a model with no options of its own
    cfg = config(syn, tmp_path, model="nan", model_options={}, train_steps=30,
                 checkpoint_every_steps=5, eval_every_steps=100)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is kept.*ckpt-10"):
        loop.train_and_evaluate(cfg)
    assert tf.train.latest_checkpoint(cfg.run_dir).endswith("ckpt-10")
    values = checkpoint_values(tf.train.latest_checkpoint(cfg.run_dir))
    floats = [v for v in values.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    assert floats and all(np.all(np.isfinite(v)) for v in floats)


@pytest.mark.slow
def test_bad_flags_fail_before_work(syn, tmp_path, two_replicas):
    two = two_replicas
    with pytest.raises(ConfigError, match="--batch_size=33 is not divisible by the 2"):
        loop.train_and_evaluate(config(syn, tmp_path, batch_size=33), strategy=two)
    assert not os.path.exists(tmp_path / "ck")
    with pytest.raises(ConfigError, match="--data_dir.*no manifest.json"):
        config(str(tmp_path / "nope"), tmp_path).validate()
    with pytest.raises(ConfigError, match="--model.*unknown model 'vgg99'"):
        config(syn, tmp_path, model="vgg99").validate()
    res = run_train(str(tmp_path / "missing"), tmp_path)
    assert res.returncode != 0 and "--data_dir" in res.stderr
    res = run_train(syn, tmp_path, "--cpu_replicas=2", "--batch_size=33")
    assert res.returncode != 0 and "not divisible" in res.stderr
    assert not os.path.exists(tmp_path / "ck" / "r" / "checkpoint")


def test_exact_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.1
    scores = np.round(rng.random(300) + labels * 0.5, 2)  # with ties
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert metrics.roc_auc(labels, scores) == pytest.approx(brute)
    t = metrics.best_f1_threshold(labels, scores)
    best = max(metrics.at_threshold(labels, scores, s)["f1"] for s in np.unique(scores))
    assert metrics.at_threshold(labels, scores, t)["f1"] == pytest.approx(best)
    assert metrics.pr_auc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    r = metrics.detection_report(labels, scores, 0.5)
    (tn, fp), (fn, tp) = r["confusion_matrix"]
    assert tn + fp + fn + tp == 300 and tp + fn == labels.sum()


@pytest.mark.slow
def test_early_stopping_and_profiler(syn, tmp_path):
    # A zero learning rate never improves val PR-AUC: patience 1 stops at the second eval.
    cfg = config(syn, tmp_path, learning_rate=0.0, train_steps=40, eval_every_steps=4,
                 patience=1, profile_steps=(1, 3))
    summary = loop.train_and_evaluate(cfg)
    assert summary["stopped_early"] and summary["final_step"] == 8
    assert os.path.exists(os.path.join(cfg.run_dir, "export", "model.keras"))
    traces = [f for _, _, fs in os.walk(cfg.tb_dir) for f in fs if f.endswith(".xplane.pb")]
    assert traces, "profiler trace written"


@pytest.mark.slow
@pytest.mark.parametrize("train_eval_tta", [True, False])
def test_single_view_evals_while_training_and_tta_at_the_end(syn, tmp_path, monkeypatch,
                                                             train_eval_tta):
    """--train_eval_tta=false (airbench's per-epoch evaluations): the val evals while training
    score one view, the end scores val once more with every TTA view, and that one gives the
    final numbers and the export's threshold; true: every eval is the TTA one."""
    calls = []
    original = Evaluator.evaluate

    def spy(self, split, progress=False):
        result = original(self, split, progress)
        calls.append(((self.cfg.tta, self.cfg.tta_shifts), split, result))
        return result

    monkeypatch.setattr(Evaluator, "evaluate", spy)
    cfg = config(syn, tmp_path, train_steps=8, eval_every_steps=4, tta_shifts=True,
                 train_eval_tta=train_eval_tta)
    summary = loop.train_and_evaluate(cfg)
    views = [v for v, _, _ in calls]
    assert all(split == "val" for _, split, _ in calls)
    if train_eval_tta:
        assert views == [(True, True)] * 2
    else:
        assert views == [(False, False)] * 2 + [(True, True)]
    final = calls[-1][2]
    assert summary["final_val"]["roc_auc"] == pytest.approx(
        metrics.roc_auc(final.labels, final.scores))
    with open(os.path.join(cfg.run_dir, "export", "metadata.json")) as f:
        assert json.load(f)["threshold"] == pytest.approx(summary["final_val"]["threshold"])
    history = [json.loads(line) for line in open(os.path.join(cfg.run_dir, "history.jsonl"))]
    last_in_loop = calls[1][2]  # the eval at step 8, in the loop
    assert history[-1]["val_roc_auc"] == pytest.approx(
        metrics.roc_auc(last_in_loop.labels, last_in_loop.scores))


def test_bias_lr_scale_multiplies_only_the_bn_shift_updates(syn, tmp_path):
    def two_step_deltas(scale):
        cfg = config(syn, tmp_path / str(scale), bias_lr_scale=scale, learning_rate=0.1)
        manifest = pipeline.load_manifest(syn)
        keras.utils.set_random_seed(0)
        state = train_state.create_train_state(cfg, tf.distribute.get_strategy(), manifest,
                                               train_state.plan_steps(cfg, manifest))
        before = [v.numpy().copy() for v in state.model.trainable_variables]
        step_loop = make_train_loop(cfg, state, manifest["positive_class_id"], None)
        it = iter(pipeline.make_dataset(syn, "train", 32, training=True, seed=0))
        step_loop(it, tf.constant(2))  # step 1 moves only the zero-initialised logits layer
        return {v.path: v.numpy() - b for v, b in zip(state.model.trainable_variables, before)}

    one, eight = two_step_deltas(1.0), two_step_deltas(8.0)
    betas = [k for k in one if k.endswith("/beta")]
    assert betas and any(np.abs(one[k]).max() > 0 for k in betas)
    for k in one:
        want = 8.0 * one[k] if k in betas else one[k]
        np.testing.assert_allclose(eight[k], want, rtol=1e-4, atol=1e-7, err_msg=k)
    with pytest.raises(ConfigError, match="--bias_lr_scale"):
        config(syn, tmp_path, bias_lr_scale=64.0, optimizer="adamw").validate()
    with pytest.raises(ConfigError, match="--tta_shifts.*needs --tta"):
        config(syn, tmp_path, tta=False, tta_shifts=True).validate()
    with pytest.raises(ConfigError, match="--crop_pad"):
        config(syn, tmp_path, crop_pad=-1).validate()


def test_crop_pad_reaches_the_training_input(syn, tmp_path):
    """--crop_pad=0 leaves flips only: every training image is its original or its mirror;
    the default pad moves most of them."""
    from research.training.inputs import train_input_fn

    originals = pipeline.take_examples(syn, "train")["image"].astype(np.float32) / 255.0
    views = np.concatenate([originals, originals[:, :, ::-1]])

    def unmoved(cfg):
        ds = train_input_fn(cfg, 0)(tf.distribute.InputContext())
        images = next(iter(ds))["image"].numpy()
        return [np.abs(views - image).max(axis=(1, 2, 3)).min() < 1e-6 for image in images]

    assert all(unmoved(config(syn, tmp_path, crop_pad=0)))
    assert sum(unmoved(config(syn, tmp_path))) < 16  # of 32: pad 4 leaves 1 offset in 81


def test_tta_logits_are_the_mirror_average():
    from research.detector import detector_scores

    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(4)])
    x = tf.random.stateless_uniform((5, 6, 6, 3), (1, 2))
    plain, flipped = model(x), model(x[:, :, ::-1])
    scores, logits = detector_scores(model, x, "multiclass", 2, tta=True)
    np.testing.assert_allclose(logits, 0.5 * (plain + flipped), rtol=1e-5, atol=1e-6)
    p = 0.5 * (tf.nn.softmax(plain)[:, 2] + tf.nn.softmax(flipped)[:, 2])
    np.testing.assert_allclose(scores, p, rtol=1e-5)
    _, logits = detector_scores(model, x, "multiclass", 2, tta=False)
    np.testing.assert_allclose(logits, plain, rtol=1e-6)
    # Shifts: the image moved one pixel down-right / up-left (reflected edge), and mirrors.
    padded = np.pad(x.numpy(), [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
    down_right, up_left = padded[:, :6, :6], padded[:, 2:, 2:]
    np.testing.assert_array_equal(down_right[:, 1:, 1:], x.numpy()[:, :5, :5])
    want = 0.25 * (plain + flipped) + sum(
        0.125 * (model(v) + model(v[:, :, ::-1])) for v in (down_right, up_left))
    scores, logits = detector_scores(model, x, "multiclass", 2, tta=True, shifts=True)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, 0.5 * (plain + flipped), atol=1e-4)


def test_lookahead_matches_a_step_by_step_reference(syn, tmp_path):
    """The in-graph lookahead (every 2 steps, 5 steps in one call) against the same training
    one step per call with the pulls done by hand in numpy."""
    manifest = pipeline.load_manifest(syn)

    def run(cfg, by_hand):
        keras.utils.set_random_seed(0)
        plan = train_state.Plan(10, 5, 5, 5)
        state = train_state.create_train_state(cfg, tf.distribute.get_strategy(), manifest, plan)
        loop_fn = make_train_loop(cfg, state, manifest["positive_class_id"], None)
        it = iter(pipeline.make_dataset(syn, "train", 32, training=True, seed=0))
        if not by_hand:
            loop_fn(it, tf.constant(5))
            return state
        variables = Lookahead.create(state.model, 2, 0.9, 5).fast
        slow = [v.numpy().copy() for v in variables]
        for step in range(1, 6):
            loop_fn(it, tf.constant(1))
            if step % 2 == 0 or step == 5:
                keep = 1.0 if step == 5 else 0.9 ** 2 * (step / 5) ** 3
                for i, v in enumerate(variables):
                    slow[i] = keep * slow[i] + (1 - keep) * v.numpy()
                    v.assign(slow[i])
        return state

    with_la = run(config(syn, tmp_path / "a", lookahead_every=2, lookahead_decay=0.9), False)
    ref = run(config(syn, tmp_path / "b"), True)
    assert len(with_la.lookahead.fast) > len(with_la.model.trainable_variables)  # + BN stats
    for a, b in zip(with_la.model.weights, ref.model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=1e-6, err_msg=a.path)
    saved = tf.train.list_variables(with_la.manager.save())
    assert sum(name.startswith("lookahead_slow/") for name, _ in saved) == len(
        with_la.lookahead.slow)  # resumable: the slow copies are in the checkpoint
    plain = run(config(syn, tmp_path / "c"), False)
    assert not all(np.allclose(a.numpy(), b.numpy()) for a, b in
                   zip(with_la.model.trainable_variables, plain.model.trainable_variables))
    with pytest.raises(ConfigError, match="--lookahead_every"):
        config(syn, tmp_path, lookahead_every=5, model="vgg16", model_options={},
               transfer="fine_tune").validate()
