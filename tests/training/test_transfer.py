"""Transfer learning: backbones, weights from a file or one of our runs, surgery, the three
recipes (features cache, frozen, fine_tune phases and their resume), source tasks and
training subsets."""

import json
import logging
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.data import pipeline
from research.models import backbones
from research.evaluation import run as evaluation
from research.training import feature_cache as features
from research.training import examples, inputs, state as train_state
from research.training.actions import PhaseSwitch
from research.training.config import ConfigError, TrainConfig
from research.training.loop import prepare_config, train_and_evaluate
from research.training.steps import make_train_loop

TINY = {"widths": (8, 16), "res_blocks": (1, 0), "stem_width": 8}


def config(syn, ck, **kw):
    base = dict(data_dir=syn, run_name="t", checkpoint_dir=str(ck), log_dir=str(ck / "logs"),
                batch_size=16, eval_batch_size=50, learning_rate=0.05, warmup_epochs=0.0,
                steps_per_loop=4, progress=False, precision="float32", gradcam_images=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def source(syn, tmp_path_factory):
    """A tiny scratch run trained without cats: the source task of a transfer."""
    ck = tmp_path_factory.mktemp("ck")
    cfg = config(syn, ck, run_name="src", model_options=dict(TINY), train_steps=8,
                 exclude_classes=("cat",))
    summary = train_and_evaluate(cfg)
    return ck, cfg, summary


def transfer_cfg(syn, ck, **kw):
    opts = {"weights": "src", "head_units": (8,)}
    opts.update(kw.pop("model_options", {}))
    return prepare_config(config(syn, ck, model="scratch", model_options=opts, **kw))


@pytest.mark.xdist_group("transfer_source")  # its fixture trains once
def test_source_task_leaves_the_class_out_and_selects_by_accuracy(source, syn):
    ck, cfg, summary = source
    manifest = pipeline.load_manifest(syn)
    cat = manifest["class_names"].index("cat")
    val = manifest["splits"]["val"]
    report, raw = evaluation.evaluate_run(prepare_config(cfg), "val", "best", progress=False)
    assert report["num_examples"] == val["num_examples"] - val["class_counts"]["cat"]
    assert cat not in raw["class_ids"] and report["num_positive"] == 0
    # The best checkpoint is the one of the best val class accuracy, not of a NaN PR-AUC,
    # and the summary names that metric.
    history = [json.loads(x) for x in open(os.path.join(ck, "src", "history.jsonl"))]
    assert summary["best_val_metric"] == "class_accuracy"
    assert summary["best_val"] == pytest.approx(max(h["val_accuracy"] for h in history))
    assert "class_accuracy" in report


def test_train_fraction_is_stratified_and_val_stays_whole(syn, tmp_path):
    cfg = config(syn, tmp_path, train_fraction=0.2)
    manifest = pipeline.load_manifest(syn)
    mask = examples.example_mask(cfg, "train")
    ids = pipeline.split_class_ids(syn, "train")
    for c, n in enumerate(np.bincount(ids)):
        assert mask[ids == c].sum() == round(0.2 * n)
    assert examples.example_mask(cfg, "val") is None
    np.testing.assert_array_equal(mask, examples.example_mask(cfg, "train"))  # deterministic
    plan = train_state.plan_steps(cfg, manifest, examples.num_examples(cfg, manifest, "train"))
    assert plan.steps_per_epoch == int(mask.sum()) // 16
    per = examples.example_mask(config(syn, tmp_path, train_per_class=3), "train")
    assert per.sum() == 3 * len(np.unique(ids))
    batches = pipeline.make_dataset(syn, "train", 16, training=True, keep=mask)
    seen = {int(i) for b in batches.take(20) for i in b["class_id"].numpy()}
    assert seen == set(range(10))


def _snapshot(layers):
    return {f"{layer.name}/{w.path}": np.array(w) for layer in layers for w in layer.weights}


def _changed(before, after):
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.xdist_group("transfer_source")  # its fixture trains once
def test_fine_tune_phases_freeze_what_they_should(source, syn):
    ck, _, _ = source
    cfg = transfer_cfg(syn, ck, run_name="ft", transfer="fine_tune", head_epochs=0.2,
                       fine_tune_epochs=0.2, fine_tune_from="stage1", fine_tune_lr=0.02)
    manifest = pipeline.load_manifest(syn)
    plan = train_state.plan_steps(cfg, manifest)
    strategy = tf.distribute.get_strategy()
    state = train_state.create_train_state(cfg, strategy, manifest, plan)
    base = backbones.backbone_of(state.model)
    src = keras.models.load_model(str(ck / "src" / "export" / "model.keras"))
    for layer in base.layers:  # the run name loaded the source run's weights
        if layer.weights:
            for a, b in zip(layer.get_weights(), src.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
    head = [layer for layer in state.model.layers if layer.name.startswith(("head", "logits"))]
    it = iter(strategy.distribute_datasets_from_function(inputs.train_input_fn(cfg, 0)))
    base0, head0 = _snapshot(base.layers), _snapshot(head)
    make_train_loop(cfg, state, manifest["positive_class_id"], None)(it, tf.constant(
        plan.head_steps))
    assert not _changed(base0, _snapshot(base.layers)), "phase 1 leaves the base alone"
    assert _changed(head0, _snapshot(head)), "phase 1 trains the head"

    class Ctx:  # what PhaseSwitch reads
        pass

    ctx = Ctx()
    ctx.cfg, ctx.state, ctx.plan, ctx.step, ctx.rebuild = cfg, state, plan, state.step, False
    PhaseSwitch()(ctx)
    assert ctx.rebuild and state.in_phase_2
    base1 = _snapshot(base.layers)
    make_train_loop(cfg, state, manifest["positive_class_id"], None)(it, tf.constant(2))
    changed = _changed(base1, _snapshot(base.layers))
    assert any(k.startswith("stage1_conv") for k in changed)
    assert not any(k.startswith(("stem", "stage0")) for k in changed), changed
    assert not any("moving" in k or "gamma" in k or "beta" in k for k in changed), changed
    lr = float(state.active_optimizer.learning_rate)
    expected = float(state.fine_tune_optimizer.learning_rate)
    assert state.active_optimizer is state.fine_tune_optimizer and lr == expected
    assert 0 < lr <= 0.02


@pytest.mark.slow
@pytest.mark.xdist_group("transfer_source")  # its fixture trains once
def test_resume_in_phase_2_continues_exactly(source, syn):
    ck, _, _ = source
    kw = dict(transfer="fine_tune", head_epochs=0.2, fine_tune_epochs=0.4,
              fine_tune_layers=3, checkpoint_every_steps=2, eval_every_steps=100)
    whole = train_and_evaluate(transfer_cfg(syn, ck, run_name="ft_whole", **kw))
    head_steps = train_state.plan_steps(transfer_cfg(syn, ck, **kw),
                                        pipeline.load_manifest(syn)).head_steps
    stop = head_steps + 2
    part = train_and_evaluate(transfer_cfg(syn, ck, run_name="ft_part", stop_at_step=stop, **kw))
    assert part["final_step"] == stop and "export" not in part
    ckpt = tf.train.load_checkpoint(str(ck / "ft_part" / f"ckpt-{stop}"))
    assert ckpt.get_tensor("phase/.ATTRIBUTES/VARIABLE_VALUE") == 2
    resumed = train_and_evaluate(transfer_cfg(syn, ck, run_name="ft_part", **kw))
    assert resumed["start_step"] == stop and resumed["final_step"] == whole["final_step"]

    def values(run):
        r = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ck / run)))
        return {k: r.get_tensor(k) for k in r.get_variable_to_shape_map()
                if "save_counter" not in k and "OBJECT_GRAPH" not in k}

    a, b = values("ft_whole"), values("ft_part")
    assert a.keys() == b.keys()
    assert any(k.startswith("fine_tune_optimizer/") and "iterations" not in k for k in a)
    for k in a:
        if np.asarray(a[k]).dtype.kind == "f":
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.xdist_group("transfer_source")  # its fixture trains once
def test_feature_cache_reused_rekeyed_and_rebuilt_when_corrupt(source, syn, caplog):
    ck, _, _ = source
    features._OPEN.clear()
    cfg = transfer_cfg(syn, ck, run_name="fx", transfer="features", train_steps=4)
    first = features.open_cache(cfg)
    assert not first.reused and first.feature_shape == (8, 8, 16)
    features._OPEN.clear()
    again = features.open_cache(transfer_cfg(syn, ck, run_name="fx2", transfer="features",
                                             model_options={"head_units": (4,)}))
    assert again.reused and again.path == first.path  # another head: same key
    features._OPEN.clear()
    cut = features.open_cache(transfer_cfg(syn, ck, transfer="features",
                                           model_options={"cut_at": "stage0_relu"}))
    assert cut.path != first.path and cut.feature_shape == (16, 16, 8)
    with open(os.path.join(first.path, "train.npz"), "r+b") as f:
        f.truncate(100)
    features._OPEN.clear()
    rebuilt = features.open_cache(cfg)
    assert rebuilt.path == first.path and not rebuilt.reused
    summary = train_and_evaluate(cfg)  # the head trains on the features; the export sees images
    model = keras.models.load_model(summary["export"])
    assert model.input_shape == (None, 32, 32, 3)


def test_weights_file_and_surgery(tmp_path):
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path / "vgg16.weights.h5")
    base.save_weights(path)
    model = backbones.build_transfer_model("vgg16", (32, 32, 3), 10, weights=path,
                                           image_size=32)
    for a, b in zip(backbones.backbone_of(model).get_weights(), base.get_weights()):
        np.testing.assert_array_equal(a, b)
    cut = backbones.build_transfer_model("vgg16", (32, 32, 3), 1, weights="none",
                                         image_size=64, cut_at="block3_pool", head="flatten")
    assert backbones.backbone_of(cut).output.shape == (None, 8, 8, 256)
    assert cut.get_layer("resize").output.shape == (None, 64, 64, 3)
    with pytest.raises(backbones.BackboneError, match="no layer 'block9'.*block3_pool"):
        backbones.build_transfer_model("vgg16", (32, 32, 3), 1, weights="none", cut_at="block9")


def test_bad_settings_fail_before_work(syn, tmp_path):
    with pytest.raises(ConfigError, match="--image_size: 16 is below vgg16's minimum"):
        config(syn, tmp_path, model="vgg16", transfer="frozen",
               model_options={"weights": "none", "image_size": 16}).validate()
    with pytest.raises(ConfigError, match="--train_steps: does not apply"):
        config(syn, tmp_path, model="vgg16", transfer="fine_tune", train_steps=5,
               model_options={"weights": "none"}).validate()
    with pytest.raises(backbones.BackboneError, match="--fine_tune_from: no block.*block1, "
                       "block2"):
        model = backbones.build_transfer_model("vgg16", (32, 32, 3), 1, weights="none",
                                               image_size=32)
        backbones.block_start(backbones.backbone_of(model), "block9", "vgg16")
    assert not os.path.exists(tmp_path / "t")


def test_imagenet_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(backbones.BackboneError) as e:
        backbones.build_transfer_model("vgg16", (32, 32, 3), 1, weights="imagenet",
                                       image_size=32)
    msg = str(e.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(tmp_path / "keras" / "models") in msg
    models = tmp_path / "keras" / "models"
    assert not models.exists() or not [p for p in models.iterdir() if p.suffix != ".json"]


@pytest.mark.slow
@pytest.mark.xdist_group("transfer_source")  # its fixture trains once
def test_gradcam_on_a_transfer_run(source, syn):
    from research.explain.cams import grad_cam
    from research.explain.loading import load_run

    ck, _, _ = source
    summary = train_and_evaluate(transfer_cfg(syn, ck, run_name="frozen", transfer="frozen",
                                              train_steps=4))
    assert summary["export"]
    ex, meta = load_run(str(ck), "frozen")
    images = pipeline.take_examples(syn, "test", 2, filter="positive")["image"]
    out = grad_cam(ex, images.astype(np.float32), meta["positive_class_id"])
    assert out.layer.startswith("scratch/") and out.maps.shape[0] == 2
    assert np.isfinite(out.maps).all() and out.maps.max() > 0


@pytest.mark.slow
@pytest.mark.xdist_group("transfer_source")  # its fixture trains once
def test_a_transfer_run_serves_as_a_backbone(source, syn):
    ck, _, _ = source
    train_and_evaluate(transfer_cfg(syn, ck, run_name="hop1", transfer="frozen", train_steps=2))
    model = backbones.build_transfer_model("scratch", (32, 32, 3), 10, weights="hop1",
                                           checkpoint_dir=str(ck), head_units=(4,))
    donor = backbones.backbone_of(keras.models.load_model(
        str(ck / "hop1" / "export" / "model.keras")))
    for a, b in zip(backbones.backbone_of(model).get_weights(), donor.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_gradcam_hook_feeds_a_backbone_raw_pixels(syn, tmp_path):
    from research.explain.hooks import gradcam_actions

    backbone = config(syn, tmp_path, model="vgg16", transfer="frozen", gradcam_images=4,
                      model_options={"weights": "none"})
    assert gradcam_actions(backbone)[0].fn.scale == "raw"  # the model preprocesses itself
    assert gradcam_actions(backbone)[0].fn.run_name == backbone.run_name  # in its title
    assert gradcam_actions(config(syn, tmp_path, gradcam_images=4))[0].fn.scale == "unit"
    assert gradcam_actions(config(syn, tmp_path, model="vgg16", transfer="features",
                                  gradcam_images=4)) == []


@pytest.mark.xdist_group("transfer_source")  # its fixture trains once
def test_feature_cache_extracts_only_what_the_run_reads_and_adds_the_rest(source, syn,
                                                                          caplog):
    """Per example: 25% of train and half of val/test first; a run on 50% of train extracts
    only the missing quarter and keeps the first features as they were; a corrupt file is
    recomputed whole."""
    ck, _, _ = source
    opts = {"cut_at": "stage0_relu"}
    small = transfer_cfg(syn, ck, transfer="features", train_fraction=0.25, eval_fraction=0.5,
                         model_options=opts)
    features._OPEN.clear()
    shutil.rmtree(features.open_cache(small).path)  # this key's cache from an earlier test
    first = features.open_cache(small)
    assert not first.reused
    manifest = pipeline.load_manifest(syn)
    for split in ("train", "val", "test"):
        want = np.flatnonzero(examples.example_mask(small, split))
        np.testing.assert_array_equal(first.arrays(split)["positions"], want)
        assert len(want) < manifest["splits"][split]["num_examples"]
    before = first.arrays("train")
    larger = transfer_cfg(syn, ck, transfer="features", train_fraction=0.5, eval_fraction=0.5,
                          model_options=opts)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):  # absl's own level, whatever ran before
        second = features.open_cache(larger)
    added = len(np.setdiff1d(np.flatnonzero(examples.example_mask(larger, "train")),
                             before["positions"]))
    assert not second.reused and added > 0
    assert f"extracted {added:,} train" in caplog.text and " val" not in caplog.text.split(
        "extracted")[-1]
    after = second.arrays("train")
    rows = np.searchsorted(after["positions"], before["positions"])
    np.testing.assert_array_equal(after["features"][rows], before["features"])
    assert features.open_cache(larger).reused and features.open_cache(small).reused
    batch = next(iter(features.make_dataset(second, "val", 1000, training=False,
                                            keep=examples.example_mask(larger, "val"))))
    np.testing.assert_array_equal(batch["index"].numpy(),
                                  np.flatnonzero(examples.example_mask(larger, "val")))
    with pytest.raises(ValueError, match="not cached"):
        features.make_dataset(second, "val", 10, training=False)  # the whole split: not there


@pytest.fixture(scope="module")
def fast_source(syn, tmp_path_factory):
    """A tiny fast-CNN run on all 10 classes: a CIFAR detector serving as a backbone."""
    ck = tmp_path_factory.mktemp("ckfast")
    cfg = config(syn, ck, run_name="fastsrc", model="fast", train_steps=6,
                 model_options={"widths": (8, 8, 16), "logits_bias": False,
                                "logits_init": "uniform"})
    train_and_evaluate(cfg)
    return ck


@pytest.mark.slow
@pytest.mark.xdist_group("transfer_fast_source")  # its fixture trains once
def test_a_fast_run_serves_as_a_backbone_whitening_included(fast_source, syn):
    ck = fast_source
    train_and_evaluate(config(syn, ck, run_name="fromfast", model="fast", transfer="fine_tune",
                              head_epochs=0.2, fine_tune_epochs=0.2, fine_tune_from="group1",
                              model_options={"weights": "fastsrc", "head_units": (),
                                             "head": "max"}))
    donor = keras.models.load_model(str(ck / "fastsrc" / "export" / "model.keras"))
    model = backbones.build_transfer_model("fast", (32, 32, 3), 1, weights="fastsrc",
                                           checkpoint_dir=str(ck), head_units=())
    base = backbones.backbone_of(model)
    by_name = {layer.name: layer for layer in donor.layers}
    for layer in base.layers:
        given = {w.name: w for w in by_name[layer.name].weights} if layer.weights else {}
        for w in layer.weights:  # by name: the export's stock layers order them their way
            np.testing.assert_array_equal(w.numpy(), given[w.name].numpy(), err_msg=layer.name)
    assert "whiten" in {layer.name for layer in base.layers if layer.weights}
    with pytest.raises(backbones.BackboneError, match="--weights"):
        backbones.build_transfer_model("fast", (32, 32, 3), 1, weights="none")


@pytest.mark.slow
@pytest.mark.xdist_group("transfer_fast_source")  # its fixture trains once
def test_the_zero_shot_head_is_p_cat_over_p_cat_plus_p_dog(fast_source, syn):
    ck = fast_source
    donor = keras.models.load_model(str(ck / "fastsrc" / "export" / "model.keras"))
    # a bigger photo: the transfer model resizes it to the backbone's 32 px as its first layer
    model = backbones.build_transfer_model("fast", (48, 48, 3), 1, weights="fastsrc",
                                           checkpoint_dir=str(ck), head_units=(), head="max",
                                           head_from=("cat", "dog"), image_size=32)
    images = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3)).astype(np.float32)
    # training=False: called with training=None, Keras 3 runs the BN layers after a Resizing
    # layer in training mode (measured here), as it never does without one
    score = tf.sigmoid(model(images, training=False)[:, 0]).numpy()
    small = keras.layers.Resizing(32, 32)(images) / 255.0
    p = tf.nn.softmax(donor(small, training=False), -1).numpy()
    cat, dog = 3, 5
    np.testing.assert_allclose(score, p[:, cat] / (p[:, cat] + p[:, dog]), rtol=1e-4, atol=1e-6)
    with pytest.raises(backbones.BackboneError, match="--head=max"):
        backbones.build_transfer_model("fast", (32, 32, 3), 1, weights="fastsrc",
                                       checkpoint_dir=str(ck), head_units=(),
                                       head_from=("cat", "dog"))
    with pytest.raises(backbones.BackboneError, match="cats is not a class"):
        backbones.build_transfer_model("fast", (32, 32, 3), 1, weights="fastsrc",
                                       checkpoint_dir=str(ck), head_units=(), head="max",
                                       head_from=("cats", "dog"))


def two_class_photos(out_dir: str, size: int = 48, n: int = 24, seed: int = 0) -> dict:
    """A cats/dogs TFRecord folder of `size` px random photos (the photo data's names)."""
    from research.data import sources, tfrecords

    def split(s):
        rng = np.random.default_rng(s)
        return sources.Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                             (np.arange(n) % 2).astype(np.int64),
                             [f"p{s}_{i}" for i in range(n)])

    data = sources.SourceData("photos", ["cats", "dogs"], {"train": split(seed),
                                                           "test": split(seed + 1)})
    return tfrecords.write_tfrecords(data, tfrecords.WriteConfig(
        out_dir=out_dir, positive_class="cats", shards={"train": 1, "val": 1, "test": 1},
        val_fraction=0.25), "synthetic")


@pytest.mark.slow
@pytest.mark.xdist_group("transfer_fast_source")  # its fixture trains once
def test_zero_shot_scores_the_formula_on_every_photo(fast_source, tmp_path):
    from research.evaluation import zero_shot

    ck = fast_source
    photos = str(tmp_path / "photos")
    two_class_photos(photos)
    with pytest.raises(zero_shot.ClassMapError, match="unmapped: dogs"):
        zero_shot.zero_shot_config(str(ck), "fastsrc", photos, {"cats": "cat"})
    cfg = zero_shot.zero_shot_config(str(ck), "fastsrc", photos,
                                     zero_shot.parse_class_map("cats:cat,dogs:dog"),
                                     tta=False, tta_shifts=False)
    report, raw = zero_shot.score_zero_shot(cfg, "test", progress=False)
    assert report["num_examples"] == 24 and report["zero_shot"]["image_size"] == 32
    donor = keras.models.load_model(str(ck / "fastsrc" / "export" / "model.keras"))
    test = pipeline.take_examples(photos, "test")
    order = np.argsort(test["index"]) if "index" in test else np.arange(len(test["image"]))
    images = test["image"][order].astype(np.float32)
    p = tf.nn.softmax(donor(keras.layers.Resizing(32, 32)(images) / 255.0, training=False),
                      -1).numpy()
    np.testing.assert_allclose(raw["scores"], p[:, 3] / (p[:, 3] + p[:, 5]), rtol=1e-4,
                               atol=1e-6)
