"""SimCLR pretraining (train --objective=simclr): the NT-Xent loss against a NumPy transcription
of the reference's add_contrastive_loss, the paired views, exact resume, 2 replicas == 1, and
the backbone as --weights=<run>."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
from research.training import loop, simclr
from research.training.config import ConfigError

LARGE_NUM = 1e9


def numpy_nt_xent(hidden, temperature, replicas=1):
    """google-research/simclr tf2/objective.py add_contrastive_loss, in NumPy: the global
    batch split over `replicas`, each replica's loss the mean over its anchors; returns the
    reference's loss as our convention averages it (sum of replica losses / replicas)."""
    h = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
    h1, h2 = np.split(h, 2)
    big = len(h1)
    b = big // replicas
    total = 0.0
    for r in range(replicas):
        a1, a2 = h1[r * b:(r + 1) * b], h2[r * b:(r + 1) * b]
        idx = np.arange(b) + r * b
        labels = np.eye(2 * big)[idx]
        masks = np.eye(big)[idx]
        aa = a1 @ h1.T / temperature - masks * LARGE_NUM
        bb = a2 @ h2.T / temperature - masks * LARGE_NUM
        ab, ba = a1 @ h2.T / temperature, a2 @ h1.T / temperature

        def xent(logits):
            logits = logits - logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            return -(labels * logp).sum(1)

        total += np.mean(xent(np.concatenate([ab, aa], 1)) + xent(np.concatenate([ba, bb], 1)))
    return total / replicas


def test_nt_xent_equals_the_reference_formula():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(12, 5)).astype(np.float32)
    for t in (0.1, 0.5, 1.0):
        per_ex, logits_ab, idx = simclr.nt_xent(tf.constant(hidden), t)
        assert per_ex.shape == (6,) and logits_ab.shape == (6, 6)
        np.testing.assert_allclose(float(tf.reduce_mean(per_ex)), numpy_nt_xent(hidden, t),
                                   rtol=1e-5)
        np.testing.assert_array_equal(idx.numpy(), np.arange(6))
    # The mask: an image's view against itself is never a candidate. Views that are equal
    # and orthogonal to the rest make the loss 2 log(1 + (2B-2) e^{-1/t} / e^{1/t}) ...
    # rather than counting the self-similarity e^{1/t} in the denominator.
    eye = np.eye(4, dtype=np.float32)
    per_ex, _, _ = simclr.nt_xent(tf.constant(np.concatenate([eye, eye])), 0.5)
    want = 2 * np.log(1 + 6 * np.exp(-2.0))
    np.testing.assert_allclose(per_ex.numpy(), want, rtol=1e-5)


@pytest.mark.slow
def test_views_differ_but_stay_paired():
    """view1[i] and view2[i] are two different augmentations of the same pool image (the
    pool's images at two sizes): same index, different pixels, the image's own colour."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (10, 8, 8, 3), np.uint8).repeat(4, 1).repeat(4, 2)
    large = rng.integers(0, 256, (6, 16, 16, 3), np.uint8).repeat(4, 1).repeat(4, 2)
    pool = simclr.Pool((small, large), ("a", "b"))
    batch = next(iter(simclr.pair_dataset(pool, 32, 0.5, seed=1, global_batch=16)))
    assert sorted(batch["index"].numpy().tolist()) == list(range(16))
    v1, v2 = batch["view1"].numpy(), batch["view2"].numpy()
    assert v1.shape == v2.shape == (16, 32, 32, 3)
    assert v1.min() >= 0 and v1.max() <= 1
    assert all(np.abs(v1[i] - v2[i]).mean() > 1e-3 for i in range(16))
    # Plain-coloured images without colour jitter: every view is its own image's colour (or
    # that colour's gray), so a view paired with the wrong image would show.
    colours = rng.integers(0, 256, (16, 3)).astype(np.uint8)
    flat = simclr.Pool((np.broadcast_to(colours[:10, None, None], (10, 32, 32, 3)).copy(),
                        np.broadcast_to(colours[10:, None, None], (6, 64, 64, 3)).copy()),
                       ("a", "b"))
    batch = next(iter(simclr.pair_dataset(flat, 32, 0.0, seed=2, global_batch=16)))
    for views in (batch["view1"].numpy(), batch["view2"].numpy()):
        for view, index in zip(views, batch["index"].numpy()):
            c = colours[index] / 255
            gray = np.dot([0.2989, 0.587, 0.114], c)
            got = view.reshape(-1, 3)
            assert (np.allclose(got, c, atol=2e-3) or np.allclose(got, gray, atol=2e-3))


def test_the_stream_resumes_exactly():
    rng = np.random.default_rng(0)
    pool = simclr.Pool((rng.integers(0, 256, (20, 32, 32, 3), np.uint8),), ("a",))
    whole = iter(simclr.pair_dataset(pool, 32, 0.5, seed=3, global_batch=8))
    batches = [next(whole) for _ in range(6)]  # 48 positions: over two epochs of 20
    resumed = next(iter(simclr.pair_dataset(pool, 32, 0.5, seed=3, global_batch=8,
                                            start_step=4)))
    for k in ("index", "view1", "view2"):
        np.testing.assert_array_equal(resumed[k].numpy(), batches[4][k].numpy())
    assert set(np.concatenate([b["index"].numpy() for b in batches[:2]])) < set(range(20))


def simclr_config(syn, tmp_path, **overrides):
    base = dict(objective="simclr", model="fast", model_options={"widths": (8, 16, 16)},
                batch_size=16, train_steps=6, steps_per_loop=2, checkpoint_every_steps=2,
                optimizer="sgd_l2", learning_rate=0.05, weight_decay=5e-4, deterministic=True)
    return helpers.tiny_config(syn, tmp_path, **{**base, **overrides})


@pytest.mark.slow
def test_resume_is_exact(syn, tmp_path):
    """Stopped at step 2 and resumed, the run ends on the same weights as in one go."""
    cfg = simclr_config(syn, tmp_path)
    whole = loop.train_and_evaluate(cfg)
    assert whole["final_step"] == 6 and whole["objective"] == "simclr"
    assert os.path.isfile(whole["export"])
    split = dataclasses.replace(cfg, run_name="s", stop_at_step=2)
    assert loop.train_and_evaluate(split)["final_step"] == 2
    loop.train_and_evaluate(dataclasses.replace(split, stop_at_step=None))
    m1 = keras.models.load_model(whole["export"], compile=False)
    m2 = keras.models.load_model(os.path.join(tmp_path, "ck", "s", "export", "model.keras"),
                                 compile=False)
    for w1, w2 in zip(m1.weights, m2.weights):
        np.testing.assert_array_equal(np.asarray(w1), np.asarray(w2))
    tags = helpers.event_tags(tmp_path / "logs" / "t" / "train")["tags"]
    assert {"contrastive_loss", "contrastive_acc"} <= tags
    meta = json.load(open(os.path.join(os.path.dirname(whole["export"]), "metadata.json")))
    assert meta["backbone_only"] and meta["threshold"] is None
    # Its logits never trained: --head_from (a zero-shot head from them) is one line.
    from research.model_options import TransferOptions
    from research.models.backbones import BackboneError, head_from_run
    with pytest.raises(BackboneError, match="--head_from: the run t is a backbone only"):
        head_from_run(None, TransferOptions(weights="t", head_from=("cat", "dog")),
                      cfg.checkpoint_dir)
    from research import runs  # ... and predict, evaluate, explain refuse it as a detector
    with pytest.raises(runs.RunError, match="a backbone only"):
        runs.read_metadata(whole["export"])


def test_two_replicas_equal_one(two_replicas):
    """The loss gathers the negatives across replicas: on 2 logical CPU devices the loss and
    the gradients of a step equal one replica's on the whole batch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype(np.float32)  # 4 images, 2 views, stacked per view

    def run(strategy, weights=None):
        with strategy.scope():
            head = simclr.projection_head(6, 2, 3)
            if weights is not None:
                head.set_weights(weights)
        v1, v2 = x[:4], x[4:]
        data = tf.data.Dataset.from_tensor_slices({"view1": v1, "view2": v2}).batch(4)
        batch = next(iter(strategy.experimental_distribute_dataset(data)))

        def step(b):
            with tf.GradientTape() as tape:
                per_ex, _, _ = simclr.nt_xent(
                    head(tf.concat([b["view1"], b["view2"]], 0), training=True), 0.5)
                loss = tf.nn.compute_average_loss(per_ex, global_batch_size=4)
            return loss, tape.gradient(loss, head.trainable_variables)

        loss, grads = tf.function(lambda b: strategy.run(step, args=(b,)))(batch)
        total = sum(float(v) for v in strategy.experimental_local_results(loss))
        return total, [sum(np.asarray(v) for v in strategy.experimental_local_results(g))
                       for g in grads], head.get_weights()

    l1, g1, weights = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
    l2, g2, _ = run(two_replicas, weights)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_settings_are_one_line(syn, tmp_path):
    with pytest.raises(ConfigError, match="--objective: simclr pretrains the fast CNN"):
        simclr_config(syn, tmp_path, model="scratch", model_options={}).validate()
    with pytest.raises(ConfigError, match="--simclr_extra_data: .* no manifest"):
        simclr_config(syn, tmp_path, simclr_extra_data=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="--simclr_extra_data: only with"):
        helpers.tiny_config(syn, tmp_path, simclr_extra_data=syn).validate()
