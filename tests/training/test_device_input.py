"""--input=device and --input=auto: the uint8 training split on each replica's device,
augmented inside the train step, gives the tf.data path's batches; the rule auto chooses by;
the refusals (affine augmentation, subsets, data larger than the device) in one line."""

import json

import numpy as np
import pytest
import tensorflow as tf

import helpers
from research.data import pipeline
from research.training import inputs, state as train_state
from research.training.config import ConfigError
from research.training.steps import make_train_loop

# The augmentations of the fast recipe (alternating flips, translate 2) and airbench96's
# cutout, and the defaults (random flips, crop_pad 4).
AUGMENTATIONS = [dict(flip="alternate", crop_pad=2, cutout=5), dict()]


def config(syn, tmp_path, **kw):
    return helpers.tiny_config(syn, tmp_path, **kw)


def replica_batches(cfg, strategy, start_step, steps):
    """Per step, each replica's {image, label, class_id} as the train step receives it."""
    feed = inputs.train_input_fn(cfg, start_step)
    it = iter(strategy.distribute_datasets_from_function(feed))
    if cfg.input == "device":
        device = inputs.device_data(cfg, strategy)
        step = tf.function(lambda feed: strategy.run(device.batch, args=(feed, device.values)))
    else:
        step = tf.function(lambda batch: batch)
    out = []
    for _ in range(steps):
        batch = step(next(it))
        out.append({k: [t.numpy() for t in strategy.experimental_local_results(batch[k])]
                    for k in ("image", "label", "class_id")})
    return out


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_device_gives_the_tfrecord_batches_on_two_replicas(syn, tmp_path, two_replicas,
                                                           augment):
    """From step 7 (a resumed stream) across the end of the first epoch (300 examples: step
    9 holds its last 12 and the next epoch's first 20): every replica's pixels, labels and
    class ids equal."""
    disk = replica_batches(config(syn, tmp_path, **augment), two_replicas, 7, 3)
    dev = replica_batches(config(syn, tmp_path, input="device", **augment), two_replicas, 7, 3)
    for a, b in zip(disk, dev):
        for k in a:
            assert len(a[k]) == len(b[k]) == 2
            for x, y in zip(a[k], b[k]):
                assert x.dtype == y.dtype and x.shape == y.shape == (16, *x.shape[1:])
                np.testing.assert_array_equal(x, y, err_msg=k)
    assert not np.array_equal(disk[0]["image"][0], disk[0]["image"][1])


def test_device_resident_copy_per_replica(syn, tmp_path, two_replicas):
    device = inputs.device_data(config(syn, tmp_path, input="device"), two_replicas)
    images = two_replicas.experimental_local_results(device.values["image"])
    assert [t.device.split(":")[-2:] for t in images] == [["CPU", "0"], ["CPU", "1"]]
    arrays = pipeline.take_examples(syn, "train")
    np.testing.assert_array_equal(images[1].numpy(), inputs.pack_images(arrays["image"]))


@pytest.mark.parametrize("shape", [(32, 32, 3), (5, 7, 3), (3, 3, 1)])
def test_pack_and_unpack_are_inverse(shape):
    images = np.random.default_rng(0).integers(0, 256, (4, *shape), dtype=np.uint8)
    packed = inputs.pack_images(images)
    assert packed.dtype == np.int64 and packed.shape == (4, -(-int(np.prod(shape)) // 8))
    back = inputs.unpack_images(tf.gather(tf.constant(packed), [2, 0]), shape)
    np.testing.assert_array_equal(back.numpy(), images[[2, 0]])


@pytest.mark.slow
def test_training_from_the_device_equals_tfrecords(syn, tmp_path, two_replicas):
    """The real train loop on 2 replicas: the same losses and weights, bit for bit."""
    manifest = pipeline.load_manifest(syn)
    runs = {}
    for source in ("tfrecords", "device"):
        cfg = config(syn, tmp_path, input=source, flip="alternate", cutout=4)
        tf.keras.utils.set_random_seed(0)
        state = train_state.create_train_state(cfg, two_replicas, manifest,
                                               train_state.plan_steps(cfg, manifest))
        device = inputs.device_data(cfg, two_replicas) if source == "device" else None
        loop = make_train_loop(cfg, state, manifest["positive_class_id"], None, device)
        feed = inputs.train_input_fn(cfg, 0)
        it = iter(two_replicas.distribute_datasets_from_function(feed))
        losses = []
        for _ in range(2):
            loop(it, tf.constant(2))
            losses.append(float(state.train_metrics["loss"].result()))
        runs[source] = losses, [w.numpy() for w in state.model.weights]
    assert runs["device"][0] == runs["tfrecords"][0]
    for a, b in zip(runs["device"][1], runs["tfrecords"][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("flag", ["rotation_range", "width_shift_range", "height_shift_range",
                                  "shear_range", "zoom_range"])
def test_device_refuses_affine_augmentation_naming_the_flag(syn, tmp_path, flag):
    with pytest.raises(ConfigError, match=f"^--{flag}: 0.1 with --input=device: .*tf.data"):
        config(syn, tmp_path, input="device", **{flag: 0.1}).validate()
    config(syn, tmp_path, input="tfrecords", **{flag: 0.1}).validate()


def test_device_keeps_memory_restrictions(syn, tmp_path):
    for kw in (dict(rebalance=True), dict(train_fraction=0.5), dict(exclude_classes=("dog",))):
        with pytest.raises(ConfigError, match="^--input: device replays the plain"):
            config(syn, tmp_path, input="device", **kw).validate()
        with pytest.raises(ConfigError, match="^--input: memory replays the plain"):
            config(syn, tmp_path, input="memory", **kw).validate()
        config(syn, tmp_path, input="auto", **kw).validate()
    with pytest.raises(ConfigError, match="^--input_sharding: files .* --input=device replays"):
        config(syn, tmp_path, input="device", input_sharding="files").validate()


def test_the_auto_rule():
    gb = 2 ** 30
    cifar = 50_000 * 32 * 32 * 3
    assert inputs.choose_input("auto", cifar, 16 * gb, on_gpu=True)[0] == "device"
    choice, why = inputs.choose_input("auto", 5 * gb, 16 * gb, on_gpu=True)
    assert choice == "tfrecords" and "31.2% of the GPU's 16,384.0 MB" in why
    assert inputs.choose_input("auto", 4 * gb, 16 * gb, on_gpu=True)[0] == "device"  # 25%
    choice, why = inputs.choose_input("auto", cifar, 64 * gb, on_gpu=False)
    assert choice == "tfrecords" and "no GPU" in why
    choice, why = inputs.choose_input("auto", cifar, None, on_gpu=True)
    assert choice == "tfrecords" and "unknown" in why
    choice, why = inputs.choose_input("auto", cifar, 16 * gb, True, problem="--zoom_range: x")
    assert choice == "tfrecords" and "--zoom_range" in why
    assert inputs.choose_input("memory", 5 * gb, 1, on_gpu=True)[0] == "memory"
    assert inputs.choose_input("device", cifar, None, on_gpu=True)[0] == "device"
    with pytest.raises(ConfigError, match=r"^--input=device: the training split is 146.5 MB "
                                          r"as uint8, more than the 100.0 MB of GPU"):
        inputs.choose_input("device", cifar, 100 * 2 ** 20, on_gpu=True)


def test_resolve_input_with_a_tiny_budget(syn, tmp_path):
    """The data does not fit a (given) 10 KB device: device is one line with both sizes,
    auto reads the TFRecords; a split that fits a quarter of it goes to the device."""
    manifest = pipeline.load_manifest(syn)
    need = inputs.train_split_bytes(manifest)
    assert need == manifest["splits"]["train"]["num_examples"] * 32 * 32 * 3
    with pytest.raises(ConfigError, match=r"--input=device: the training split is 0.\d MB "
                                          r"as uint8, more than the 0.0 MB of GPU"):
        inputs.resolve_input(config(syn, tmp_path, input="device"), manifest, on_gpu=True,
                             device_bytes=10_000)
    auto = config(syn, tmp_path, input="auto")
    assert inputs.resolve_input(auto, manifest, True, device_bytes=10_000) == "tfrecords"
    assert inputs.resolve_input(auto, manifest, True, device_bytes=4 * need) == "device"
    assert inputs.resolve_input(auto, manifest, False, device_bytes=4 * need) == "tfrecords"
    zoom = config(syn, tmp_path, input="auto", zoom_range=0.1)
    assert inputs.resolve_input(zoom, manifest, True, device_bytes=4 * need) == "tfrecords"


@pytest.mark.slow
def test_device_input_kill_and_resume_is_exact(syn, tmp_path):
    """train --input=device --cpu_replicas=2, stopped at step 6 and resumed in a fresh
    process, ends bit-equal to an uninterrupted --input=tfrecords run."""
    from test_training import checkpoint_values, run_train

    a, b = tmp_path / "a", tmp_path / "b"
    flags = ("--train_steps=12", "--cpu_replicas=2", "--flip=alternate", "--cutout=4")
    res = run_train(syn, a, *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_train(syn, b, *flags, "--input=device", "--stop_at_step=6")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "input: device (" in res.stderr
    res = run_train(syn, b, *flags, "--input=device")
    assert res.returncode == 0 and "at step 6" in res.stderr, res.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in res.stderr
    summary = json.loads((b / "ck" / "r" / "train_summary.json").read_text())
    assert [(s["start_step"], s["final_step"]) for s in summary["sessions"]] == [(0, 6), (6, 12)]
    assert json.loads((b / "ck" / "r" / "config.json").read_text())["input"] == "device"
    va = checkpoint_values(tf.train.latest_checkpoint(f"{a}/ck/r"))
    vb = checkpoint_values(tf.train.latest_checkpoint(f"{b}/ck/r"))
    assert va.keys() == vb.keys()
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k], err_msg=k)


def test_auto_on_the_cpu_trains_from_the_tfrecords(syn, tmp_path):
    from research.training.loop import prepare_config

    assert prepare_config(config(syn, tmp_path, input="auto")).input == "tfrecords"
    assert prepare_config(config(syn, tmp_path, input="device")).input == "device"
