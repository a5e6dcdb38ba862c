"""mixed_float16 loss scaling on several replicas: an overflow on any replica skips the step on
all of them, halves the scale once, leaves every weight finite and counts no step; the float16
train loop against float32; resume after a skipped step is bit-exact."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
import warm
from overflow_model import with_overflow
from research import models
from research.data import pipeline
from research.training import state as train_state
from research.training.loss_scale import DynamicLossScaleOptimizer
from research.training.steps import make_train_loop

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = models.MODELS["scratch"]


def copies(strategy, variable):
    """Every replica's copy of a Keras variable, as arrays."""
    return [c.numpy() for c in strategy.experimental_local_results(variable.value)]


@pytest.fixture
def float16_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def one_step(strategy, optimizer_cls, x, clip=False):
    """The issue's reproduction: Dense(1) under `strategy`, one strategy.run of tape ->
    scale_loss -> gradient -> apply_gradients (as our train step uses the optimizer), global
    batch 4 split over the replicas."""
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        opt = optimizer_cls(keras.optimizers.SGD(0.1))
        opt.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    data = tf.data.Dataset.from_tensor_slices((x, np.ones((4, 1), np.float32))).batch(4)
    batch = next(iter(strategy.experimental_distribute_dataset(data)))

    def step(xb, yb):
        with tf.GradientTape() as tape:
            out = tf.cast(model(xb), tf.float32)
            loss = tf.nn.compute_average_loss(tf.reduce_sum(tf.square(out - yb), 1),
                                              global_batch_size=4)
            scaled = opt.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        if clip:  # the --clip_norm path: all-reduced, so every replica sees the same
            ctx = tf.distribute.get_replica_context()
            grads = [g / ctx.num_replicas_in_sync
                     for g in ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)]
        opt.apply_gradients(zip(grads, model.trainable_variables))

    tf.function(lambda b: strategy.run(step, args=b))(batch)
    return model, opt, before


@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip"])
@pytest.mark.parametrize("rows", [(2, 3), (0, 1), (0, 3)], ids=["replica1", "replica0", "both"])
def test_loss_scale_overflow_on_any_replica_skips_the_step_everywhere(
        two_replicas, float16_policy, rows, clip):
    x = np.ones((4, 4), np.float32)
    x[list(rows)] = 60000.0  # rows 0-1 go to replica 0, 2-3 to replica 1: float16 overflows
    model, opt, before = one_step(two_replicas, DynamicLossScaleOptimizer, x, clip)
    for v, b in zip(model.trainable_variables, before):
        local = copies(two_replicas, v)
        assert len(local) == 2
        for c in local:  # every replica's copy
            np.testing.assert_array_equal(c, b)
    assert float(opt.dynamic_scale.numpy()) == 2.0 ** 14  # halved once
    assert int(opt.iterations.numpy()) == 0  # no counted step
    assert int(opt.skipped_steps.numpy()) == 1


def test_loss_scale_finite_step_applies_on_both_replicas(two_replicas, float16_policy):
    model, opt, before = one_step(two_replicas, DynamicLossScaleOptimizer,
                                  np.ones((4, 4), np.float32))
    assert int(opt.iterations.numpy()) == 1 and int(opt.skipped_steps.numpy()) == 0
    assert float(opt.dynamic_scale.numpy()) == 2.0 ** 15
    kernel = model.trainable_variables[0]
    a, b = copies(two_replicas, kernel)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, before[0])


def loop_state(syn, tmp_path, strategy, monkeypatch, steps=5, overflow=(), replicas=(0,),
               **overrides):
    """The real train loop (one step per call) of a tiny float16 network whose gradient
    overflows at `overflow` steps on `replicas`; returns (losses, state)."""
    monkeypatch.setitem(models.MODELS, "scratch",
                        with_overflow(SCRATCH, overflow, replicas))
    cfg = helpers.tiny_config(syn, tmp_path, **{"precision": "mixed_float16", **overrides})
    manifest = pipeline.load_manifest(syn)
    plan = train_state.plan_steps(cfg, manifest)
    keras.utils.set_random_seed(cfg.seed)
    state = train_state.create_train_state(cfg, strategy, manifest, plan)
    train_loop = make_train_loop(cfg, state, manifest["positive_class_id"], None)
    it = iter(strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.make_dataset(syn, "train", ctx.get_per_replica_batch_size(32),
                                          training=True, input_context=ctx)))
    losses = []
    for _ in range(steps):
        train_loop(it, tf.constant(1))
        losses.append(float(state.train_metrics["loss"].result()))
        state.train_metrics["loss"].reset_state()
    return losses, state


_CLEAN = {}


@pytest.mark.parametrize("replicas,clip_norm", [((1,), None), ((0,), 1.0), ((0, 1), None)])
def test_overflow_in_the_train_loop_skips_on_every_replica(syn, tmp_path, two_replicas,
                                                           monkeypatch, replicas, clip_norm):
    if clip_norm not in _CLEAN:  # the same run without the overflow, once per setting
        _CLEAN[clip_norm] = loop_state(syn, tmp_path / "clean", two_replicas, monkeypatch,
                                       clip_norm=clip_norm)[1]
    clean = _CLEAN[clip_norm]
    _, hit = loop_state(syn, tmp_path / "hit", two_replicas, monkeypatch, overflow=(3,),
                        replicas=replicas, clip_norm=clip_norm)
    opt, ref = hit.optimizer, clean.optimizer
    assert int(opt.skipped_steps.numpy()) == int(ref.skipped_steps.numpy()) + 1
    assert int(opt.iterations.numpy()) == int(ref.iterations.numpy()) - 1
    assert hit.step == clean.step == 5  # batches consumed: the skipped one counts
    assert float(opt.dynamic_scale.numpy()) == float(ref.dynamic_scale.numpy()) / 2
    for v in hit.model.weights:
        local = copies(two_replicas, v)
        assert len(local) == 2 and np.all(np.isfinite(local[0])), v.path
        np.testing.assert_array_equal(local[0], local[1], err_msg=v.path)


def test_loss_scale_float16_training_is_close_to_float32_on_one_and_two_replicas(
        syn, tmp_path, two_replicas, monkeypatch):
    """20 steps of the real loop: float16 finite and close to float32, and 2 replicas equal
    to 1 in float16."""
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    l32, _ = loop_state(syn, tmp_path / "a", one, monkeypatch, steps=20, precision="float32")
    l16, s16 = loop_state(syn, tmp_path / "b", one, monkeypatch, steps=20)
    l16x2, _ = loop_state(syn, tmp_path / "c", two_replicas, monkeypatch, steps=20)
    assert np.all(np.isfinite(l16)) and np.all(np.isfinite(l16x2))
    applied = int(s16.optimizer.iterations.numpy())
    assert applied >= 15, f"{20 - applied} of 20 steps skipped"
    np.testing.assert_allclose(l16, l32, rtol=0.05, atol=0.02)
    np.testing.assert_allclose(l16x2, l16, rtol=0.02, atol=0.01)


MUON = {"optimizer": "muon", "learning_rate": 0.05, "muon_lr": 0.05}


def test_muon_overflow_in_the_train_loop_skips_on_every_replica(syn, tmp_path, two_replicas,
                                                                monkeypatch):
    """--optimizer=muon under mixed_float16 (airbench94_muon on a GPU box): an overflow on
    replica 1 alone skips the Muon and the SGD updates on both replicas, halves the scale,
    and the next steps go on as the clean run's, one applied step behind."""
    _, clean = loop_state(syn, tmp_path / "clean", two_replicas, monkeypatch, **MUON)
    _, hit = loop_state(syn, tmp_path / "hit", two_replicas, monkeypatch, overflow=(3,),
                        replicas=(1,), **MUON)
    opt, ref = hit.optimizer, clean.optimizer
    assert type(opt.inner_optimizer).__name__ == "MuonSGD"
    assert int(opt.skipped_steps.numpy()) == int(ref.skipped_steps.numpy()) + 1
    assert int(opt.iterations.numpy()) == int(ref.iterations.numpy()) - 1
    assert float(opt.dynamic_scale.numpy()) == float(ref.dynamic_scale.numpy()) / 2
    for v in hit.model.weights:
        local = copies(two_replicas, v)
        assert np.all(np.isfinite(local[0])), v.path
        np.testing.assert_array_equal(local[0], local[1], err_msg=v.path)


def test_muon_float16_is_close_to_float32_and_two_replicas_equal_one(syn, tmp_path,
                                                                     two_replicas, monkeypatch):
    """12 steps of the Muon loop: mixed_float16 (loss-scaled) finite and close to float32;
    on 2 replicas as on 1."""
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    l32, _ = loop_state(syn, tmp_path / "a", one, monkeypatch, steps=12,
                        precision="float32", **MUON)
    l16, s16 = loop_state(syn, tmp_path / "b", one, monkeypatch, steps=12, **MUON)
    l16x2, _ = loop_state(syn, tmp_path / "c", two_replicas, monkeypatch, steps=12, **MUON)
    assert int(s16.optimizer.iterations.numpy()) >= 9
    assert np.all(np.isfinite(l16)) and np.all(np.isfinite(l16x2))
    np.testing.assert_allclose(l16, l32, rtol=0.05, atol=0.02)
    np.testing.assert_allclose(l16x2, l16, rtol=0.02, atol=0.01)


def run_overflow_train(root, *extra, steps="4,9"):
    cmd = [sys.executable, "-m", "overflow_model", f"--data_dir={root['syn']}", "--run_name=r",
           f"--checkpoint_dir={root['dir']}/ck", f"--log_dir={root['dir']}/logs",
           "--batch_size=32", "--widths=8,16", "--res_blocks=1,0", "--stem_width=8",
           "--learning_rate=0.03", "--steps_per_loop=2", "--eval_every_steps=6",
           "--gradcam_images=0", "--progress=false", "--precision=mixed_float16",
           "--deterministic", "--train_steps=12", "--dropout=0.2", "--lookahead_every=2",
           *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
           "OVERFLOW_STEPS": steps, "OVERFLOW_REPLICAS": "0"}
    return warm.run(cmd, timeout=300, env=env)


@pytest.mark.slow
def test_overflow_kill_and_resume_in_float16_is_bit_exact(syn, tmp_path):
    """Overflows at steps 4 and 9 (lookahead every 2 steps, on the clock of batches consumed);
    one run straight through, one stopped at step 6 and resumed by a new process: bit-equal
    checkpoints, the loss scale and the skipped steps in them."""
    from test_training import checkpoint_values

    a, b = {"syn": syn, "dir": tmp_path / "a"}, {"syn": syn, "dir": tmp_path / "b"}
    res = run_overflow_train(a)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_overflow_train(b, "--stop_at_step=6")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_overflow_train(b)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 6" in res.stderr
    summary = json.loads((b["dir"] / "ck" / "r" / "train_summary.json").read_text())
    assert [(s["start_step"], s["final_step"]) for s in summary["sessions"]] == [(0, 6), (6, 12)]
    va = checkpoint_values(tf.train.latest_checkpoint(f"{a['dir']}/ck/r"))
    vb = checkpoint_values(tf.train.latest_checkpoint(f"{b['dir']}/ck/r"))
    assert va.keys() == vb.keys()
    scale = [k for k in va if "dynamic_scale" in k]
    skipped = [k for k in va if "skipped_steps" in k]
    assert scale and skipped, sorted(va)
    assert int(va[skipped[0]]) >= 2  # both injected overflows were skipped
    iterations = [k for k in va if k.startswith("optimizer/") and "_iterations" in k
                  and "inner" in k]
    assert int(va[iterations[0]]) + int(va[skipped[0]]) == 12
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k], err_msg=k)


@pytest.mark.slow
def test_overflow_on_one_of_two_workers_skips_on_both(syn, tmp_path):
    """Two launch_local workers (MultiWorkerMirroredStrategy, one replica each), worker 1's
    gradient overflowing at step 3: both skip it (neither hangs), the run finishes, the
    chief's weights are finite and its checkpoint counts the skip."""
    from test_multiworker import FLAGS, dirs, model_weights

    flags = [f for f in FLAGS if not f.startswith(("--precision", "--train_steps"))]
    cmd = [sys.executable, "-m", "research.apps.launch_local", "--workers=2",
           "--grace_seconds=5", "--module=overflow_model", "--", f"--data_dir={syn}", *flags,
           "--precision=mixed_float16", "--train_steps=8", *dirs(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
           "OVERFLOW_STEPS": "3", "OVERFLOW_REPLICAS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    run_dir = str(tmp_path / "ck" / "r")
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    names = reader.get_variable_to_shape_map()
    skipped = int(reader.get_tensor(next(k for k in names if "skipped_steps" in k)))
    assert skipped >= 1
    assert np.all(np.isfinite(model_weights(run_dir)))
    for worker in (0, 1):  # both logged the same skips at the last step
        lines = [ln for ln in out.splitlines()
                 if ln.startswith(f"[worker {worker}]") and "train | step      8" in ln]
        assert lines and f"{skipped} skipped" in lines[-1], out[-4000:]
