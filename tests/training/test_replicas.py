"""The GPU box's paths, simulated on 2 logical CPU devices: synchronised BatchNorm in float16,
XLA, --clip_norm and dropout on 1 vs 2 replicas, an eval batch that leaves a replica empty,
and batches that follow the replicas (the gpu lab profile at 1-8 replicas, a global batch
that does not divide)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
from research.data import pipeline
from research.lab import profiles
from research.lab.settings import LabSettings
from research.lab.stages import BY_NAME
from research.models.layers import FusedBatchNorm
from research.training import loop
from research.training.config import ConfigError
from research.training.evaluator import Evaluator
from test_loss_scale import copies, loop_state

pytestmark = pytest.mark.gpu


def test_synchronised_batchnorm_in_float16_equals_one_replica(two_replicas):
    """Forward (batch statistics of the global batch) and input/weight gradients of a float16
    FusedBatchNorm on 2 replicas equal one replica's on the whole batch."""
    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 4, 6)).astype(np.float32)

    def run(strategy, n):
        with strategy.scope():
            bn = FusedBatchNorm(dtype="mixed_float16")
            bn.build((None, 4, 4, 6))

        def step(xb):
            with tf.GradientTape() as tape:
                tape.watch(xb)
                y = bn(tf.cast(xb, tf.float16), training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2 * tf.range(6.0)) / 8.0
            return y, tape.gradient(loss, [xb] + bn.trainable_variables)

        data = tf.data.Dataset.from_tensor_slices(x).batch(8)
        batch = next(iter(strategy.experimental_distribute_dataset(data)))
        y, grads = tf.function(lambda b: strategy.run(step, args=(b,)))(batch)
        ys = np.concatenate([np.asarray(v, np.float32) for v in
                             strategy.experimental_local_results(y)])
        dx = np.concatenate([np.asarray(v) for v in strategy.experimental_local_results(
            grads[0])])
        dw = [sum(np.asarray(v) for v in strategy.experimental_local_results(g))
              for g in grads[1:]]
        return ys, dx, dw

    y1, dx1, dw1 = run(tf.distribute.OneDeviceStrategy("/cpu:0"), 1)
    y2, dx2, dw2 = run(two_replicas, 2)
    np.testing.assert_allclose(y2, y1, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(dx2, dx1, atol=5e-3, rtol=1e-2)
    for a, b in zip(dw2, dw1):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


@pytest.fixture
def nondeterministic_ops():
    """Op determinism off for the test (another test's --deterministic run turned it on for
    the whole process): XLA has no deterministic MaxPool gradient."""
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    yield
    if was:
        tf_config.enable_op_determinism()


def test_jit_compile_equals_no_xla_on_one_replica(syn, tmp_path, monkeypatch,
                                                  nondeterministic_ops):
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    plain, s1 = loop_state(syn, tmp_path / "a", one, monkeypatch, steps=4, precision="float32")
    xla, s2 = loop_state(syn, tmp_path / "b", one, monkeypatch, steps=4, precision="float32",
                         jit_compile=True)
    np.testing.assert_allclose(xla, plain, rtol=1e-4)
    for a, b in zip(s1.model.weights, s2.model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-5, err_msg=a.path)


@pytest.mark.slow
def test_clip_norm_two_replicas_match_one(syn, tmp_path, two_replicas, monkeypatch):
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    kw = dict(steps=4, precision="float32", clip_norm=0.05)
    l1, s1 = loop_state(syn, tmp_path / "a", one, monkeypatch, **kw)
    l2, s2 = loop_state(syn, tmp_path / "b", two_replicas, monkeypatch, **kw)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(s1.model.trainable_variables, s2.model.trainable_variables):
        for c in copies(two_replicas, b):
            np.testing.assert_allclose(c, a.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)


def test_an_eval_batch_that_leaves_one_replica_empty(syn, tmp_path, two_replicas):
    """val has 30 examples: batches of 29 end with one example, so replica 1 gets none in
    the last batch; every example is scored once, as on one replica."""
    cfg = helpers.tiny_config(syn, tmp_path, eval_batch_size=29)
    manifest = pipeline.load_manifest(syn)
    with two_replicas.scope():
        from research.training.model import make_model
        model = make_model(cfg, manifest)
    pid = manifest["positive_class_id"]
    two = Evaluator(cfg, two_replicas, model, pid).evaluate("val")
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model1 = make_model(cfg, manifest)
    model1.set_weights(model.get_weights())
    one = Evaluator(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"), model1, pid).evaluate("val")
    n = manifest["splits"]["val"]["num_examples"]
    assert n % 29 == 1
    assert two.index.tolist() == list(range(n))
    np.testing.assert_allclose(two.scores, one.scores, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_dropout_on_two_replicas_resumes_exactly(syn, tmp_path):
    """Dropout masks on 2 replicas (each replica its own seed stream) and a resume: the run
    stopped at step 6 and resumed ends bit-equal to the run that was never stopped."""
    from test_training import checkpoint_values, run_train

    a, b = tmp_path / "a", tmp_path / "b"
    flags = ("--train_steps=12", "--dropout=0.3", "--cpu_replicas=2")
    assert run_train(syn, a, *flags).returncode == 0
    res = run_train(syn, b, *flags, "--stop_at_step=6")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_train(syn, b, *flags)
    assert res.returncode == 0 and "at step 6" in res.stderr, res.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in res.stderr
    summary = json.loads((b / "ck" / "r" / "train_summary.json").read_text())
    assert [(s["start_step"], s["final_step"]) for s in summary["sessions"]] == [(0, 6), (6, 12)]
    va = checkpoint_values(tf.train.latest_checkpoint(f"{a}/ck/r"))
    vb = checkpoint_values(tf.train.latest_checkpoint(f"{b}/ck/r"))
    assert va.keys() == vb.keys()
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k], err_msg=k)


def gpu_runs(replicas: int) -> dict:
    """Every training run of the full gpu profile for `replicas` replicas, with the settings
    the lab gives them (the few-labels pair derived as the lab derives it)."""
    p = LabSettings(workdir=".", profile="gpu").lab_profile(replicas)
    runs = {"scratch": p.scratch, "source_task": p.source_task, "memory_check": p.memory_check,
            "transfer_imagenet": p.transfer_imagenet, "transfer_fallback": p.transfer_fallback,
            "photos": p.photos["train"]}
    pair = BY_NAME["few_labels"].settings_for("gpu", False, profiles.Overrides())
    for name, transfer in (("imagenet", p.transfer_imagenet), ("fallback", p.transfer_fallback)):
        s, t = profiles.few_labels_pair(pair, p.scratch, transfer)
        runs[f"few_scratch_{name}"], runs[f"few_transfer_{name}"] = s, t
    return runs


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
def test_every_gpu_profile_run_divides_over_the_replicas(replicas):
    one = gpu_runs(1)
    for name, run in gpu_runs(replicas).items():
        assert run["batch_size"] % replicas == 0, (name, run["batch_size"])
        if run.get("optimizer") == "sgd_l2" and not name.startswith("few_"):
            # airbench's rule: the learning rate per example stays
            assert run["learning_rate"] / run["batch_size"] == pytest.approx(
                one[name]["learning_rate"] / one[name]["batch_size"]), name
    assert gpu_runs(2)["scratch"]["batch_size"] == 2048  # the recipe's 1,024 per replica


def test_a_global_batch_that_does_not_divide_names_the_sizes_that_work(syn, tmp_path):
    class Three:  # the replica count is all the check reads, before any work
        num_replicas_in_sync = 3

    cfg = helpers.tiny_config(syn, tmp_path, batch_size=1024)
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(cfg, strategy=Three())
    assert str(e.value) == ("--batch_size=1024 is not divisible by the 3 replicas (it is "
                            "global: 3 x the batch per replica); use 1023 or 1026")


def test_mixed_float16_without_a_gpu_says_it_is_emulated(syn, tmp_path, caplog):
    cfg = helpers.tiny_config(syn, tmp_path, precision="mixed_float16")
    with caplog.at_level("WARNING"):
        assert loop.prepare_config(cfg).precision == "mixed_float16"
    assert any("emulated on the CPU and slow" in r.getMessage() for r in caplog.records)
    keras.mixed_precision.set_global_policy("float32")


def test_eval_batch_auto_fits_vgg16_at_224_on_a_16_gb_card_and_stays_explicit():
    from research.models import build_model
    from research.training import eval_batch

    vgg = build_model("vgg16", (224, 224, 3), 1, dtype="mixed_float16", weights="none",
                      image_size=224)
    per_image = eval_batch.activation_bytes(vgg, 2)
    assert per_image == 2 * 224 * 224 * 64 * 2  # block1_conv2: its input and output, float16
    free = 15 * 2 ** 30  # a 16 GB card with 15 GB free
    batch, line = eval_batch.auto_batch(vgg, 1, on_gpu=True, free=free)
    assert 1 <= batch < 1000 and batch * per_image * eval_batch.HEADROOM <= free / 2
    assert f"eval batch {batch} (auto: {batch} per replica x 1;" in line
    two, _ = eval_batch.auto_batch(vgg, 2, on_gpu=True, free=free)
    assert two == 2 * batch  # per replica: each GPU has its own memory
    small = build_model("scratch", (32, 32, 3), 10, **helpers.TINY_NET)
    assert eval_batch.auto_batch(small, 2, on_gpu=False, free=2 ** 34)[0] == 2000  # the cap
    assert eval_batch.resolve(96, small, tf.distribute.get_strategy()) == 96  # explicit: as is
