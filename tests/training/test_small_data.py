"""The small-data regime: affine augmentation, the reference's small convnet, curves.png,
the model summary and --run_eagerly."""

import os

import numpy as np
import pytest
import tensorflow as tf

import helpers
from research.data import pipeline
from research.data.augmentation import FILL_MODES, Affine
from research.models import build_model
from research.training import inputs
from research.training import state as train_state
from research.training.config import ConfigError
from research.training.loop import train_and_evaluate
from research.training.steps import make_train_loop

TINY = {"widths": (8, 16), "res_blocks": (1, 0), "stem_width": 8}


def _images():
    img = np.zeros((4, 32, 32, 3), np.uint8)
    img[:, 6:26, 12:20] = 200
    img[:, 10:14, 4:28] = 90
    return tf.constant(img)


@pytest.mark.parametrize("setting", [dict(rotation_range=30), dict(width_shift_range=0.2),
                                     dict(height_shift_range=0.2), dict(shear_range=20),
                                     dict(zoom_range=0.3)])
def test_each_affine_transform_changes_images_deterministically(setting):
    images = _images()
    rand = pipeline.uniform_from_index(tf.range(4, dtype=tf.int64), 3, 6)
    out = pipeline.affine_batch(images, rand, Affine(**setting))
    assert out.dtype == tf.uint8 and out.shape == images.shape
    assert all(np.any(o != i) for o, i in zip(out.numpy(), images.numpy())), setting
    again = pipeline.affine_batch(images, rand, Affine(**setting))
    np.testing.assert_array_equal(out.numpy(), again.numpy())
    other = pipeline.affine_batch(
        images, pipeline.uniform_from_index(tf.range(4, dtype=tf.int64), 4, 6),
        Affine(**setting))
    assert np.any(other.numpy() != out.numpy())  # another seed, other draws


def test_zero_strength_affine_is_the_identity():
    images = _images()
    rand = pipeline.uniform_from_index(tf.range(4, dtype=tf.int64), 0, 6)
    for fill in FILL_MODES:
        out = pipeline.affine_batch(images, rand, Affine(fill_mode=fill))
        np.testing.assert_array_equal(out.numpy(), images.numpy())
    floats = pipeline.affine_batch(tf.cast(images, tf.float32), rand, Affine())
    assert floats.dtype == tf.float32


def test_affine_in_the_training_stream(syn):
    kw = dict(training=True, seed=5, scale="uint8", augment=False)
    plain = next(iter(pipeline.make_dataset(syn, "train", 8, **kw)))["image"].numpy()
    aff = Affine(rotation_range=20, zoom_range=0.2)
    a = next(iter(pipeline.make_dataset(syn, "train", 8, affine=aff, **kw)))["image"].numpy()
    b = next(iter(pipeline.make_dataset(syn, "train", 8, affine=aff, **kw)))["image"].numpy()
    np.testing.assert_array_equal(a, b)
    assert np.any(a != plain) and a.shape == plain.shape and a.dtype == plain.dtype


def test_small_convnet_has_the_reference_parameter_count():
    assert build_model("small_convnet", (150, 150, 3), 1).count_params() == 3_453_121
    with_dropout = build_model("small_convnet", (150, 150, 3), 1, dropout=0.5)
    assert with_dropout.count_params() == 3_453_121
    assert any(layer.name == "dropout" for layer in with_dropout.layers)


def config(syn, tmp_path, **kw):
    return helpers.tiny_config(syn, tmp_path, **{
        "run_name": "c", "model_options": dict(TINY), "eval_batch_size": 50,
        "learning_rate": 0.05, "warmup_epochs": 1.0, "steps_per_loop": 3, "train_steps": 12,
        "eval_every_steps": 4, **kw})


@pytest.mark.slow
def test_curves_summary_and_resume(syn, tmp_path):
    cfg = config(syn, tmp_path, stop_at_step=8, rotation_range=10, fill_mode="reflect")
    train_and_evaluate(cfg)
    run = tmp_path / "ck" / "c"
    assert (run / "curves.png").exists() and (run / "model_summary.txt").exists()
    assert "Total params" in (run / "model_summary.txt").read_text()
    assert "Receptive field at the last conv" in (run / "model_summary.txt").read_text()
    first = (run / "curves.png").stat().st_mtime_ns
    rows = (run / "history.jsonl").read_text().splitlines()
    assert len(rows) == 2
    train_and_evaluate(config(syn, tmp_path, rotation_range=10, fill_mode="reflect"))
    rows = [r for r in (run / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and '"step": 12' in rows[-1]
    assert (run / "curves.png").stat().st_mtime_ns > first
    with pytest.raises(ConfigError, match="--rotation_range"):
        config(syn, tmp_path, rotation_range=-5).validate()


def test_run_eagerly_matches_graph(syn, tmp_path):
    losses = {}
    manifest = pipeline.load_manifest(syn)
    for eager in (False, True):
        cfg = config(syn, tmp_path, run_eagerly=eager)
        tf.keras.utils.set_random_seed(0)
        plan = train_state.plan_steps(cfg, manifest)
        strategy = tf.distribute.get_strategy()
        state = train_state.create_train_state(cfg, strategy, manifest, plan)
        loop = make_train_loop(cfg, state, manifest["positive_class_id"], None)
        it = iter(strategy.distribute_datasets_from_function(inputs.train_input_fn(cfg, 0)))
        out = []
        for _ in range(3):
            loop(it, tf.constant(1))
            out.append(float(state.train_metrics["loss"].result()))
            state.train_metrics["loss"].reset_state()
        losses[eager] = out
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert not os.path.exists(tmp_path / "ck" / "c" / "checkpoint")


def test_input_memory_feeds_the_same_batches(syn, tmp_path):
    disk = config(syn, tmp_path, rotation_range=15)
    mem = config(syn, tmp_path, rotation_range=15, input="memory")

    ctx = tf.distribute.InputContext()
    a = next(iter(inputs.train_input_fn(disk, 3)(ctx)))
    b = next(iter(inputs.train_input_fn(mem, 3)(ctx)))
    for k in ("image", "label", "class_id"):
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    with pytest.raises(ConfigError, match="--input: memory"):
        config(syn, tmp_path, input="memory", rebalance=True).validate()


def test_sharding_by_files_gives_each_pipeline_its_own_shards(syn):
    manifest = pipeline.load_manifest(syn)
    seen = []
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i)
        ds = pipeline.make_dataset(syn, "train", 8, training=True, global_batch_size=16,
                                   input_context=ctx, shard_by="files", augment=False,
                                   scale="uint8")
        n = sum(sh["num_examples"] for sh in manifest["splits"]["train"]["shards"][i::2])
        images = np.concatenate([b["image"].numpy() for b in ds.take(n // 8)])
        seen.append({img.tobytes() for img in images})
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint shards, nothing twice
    with pytest.raises(pipeline.DataError, match="shards for 4 input pipelines"):
        pipeline.make_dataset(syn, "val", 8, training=True, shard_by="files",
                              input_context=tf.distribute.InputContext(4, 0))
