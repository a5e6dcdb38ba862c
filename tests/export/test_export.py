"""The export fits the ecosystem: model.keras is Keras' own layers (every model kind, same
names, same outputs) and loads in a Python that cannot import `research`; the SavedModel's
uint8 signature gives the Detector's probability there too; saved_model_cli lists it; its
TFLite conversion agrees; exports with our custom layers still load with our package."""

import errno
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import warm
from research import detector, export, files, runs
from research.explain import loading
from research.model_options import BACKBONES, OWN_NETWORKS, SAVEDMODEL, TransferOptions
from research.models import build_model
from research.models.backbones import BackbonePreprocess, build_base, build_transfer_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SCRATCH = {"widths": (8, 16), "res_blocks": (1, 0), "stem_width": 8}
TINY_HEAD = {"weights": "none", "image_size": 32, "head_units": (8,)}
# kind -> (model, image shape, outputs, options); the backbones cut early to stay small
KINDS = {
    "scratch": ("scratch", (32, 32, 3), 1, TINY_SCRATCH),
    "fast": ("fast", (32, 32, 3), 10, {"widths": (8, 8, 16)}),
    "small_convnet": ("small_convnet", (48, 48, 3), 1, {}),
    "vgg16_gray": ("vgg16", (32, 32, 1), 1, {**TINY_HEAD, "cut_at": "block1_pool"}),
    "resnet50": ("resnet50", (32, 32, 3), 1, {**TINY_HEAD, "cut_at": "conv1_relu"}),
    "mobilenet_v2": ("mobilenet_v2", (32, 32, 3), 1,
                     {**TINY_HEAD, "cut_at": "block_1_project_BN"}),
    "efficientnetb0": ("efficientnetb0", (32, 32, 3), 2,
                       {**TINY_HEAD, "cut_at": "block1a_project_bn"}),
    "scratch_transfer": ("scratch", (32, 32, 3), 1, TINY_HEAD),
}
# kind -> the metadata of its SavedModel (objective, scale, TTA as a run would set them)
SERVED = {
    "fast": {"objective": "multiclass", "scale": "unit", "tta": True, "tta_shifts": True},
    "scratch": {"objective": "binary", "scale": "unit", "tta": True, "tta_shifts": False},
    "vgg16_gray": {"objective": "binary", "scale": "raw", "tta": False, "tta_shifts": False},
}
# Run with `python -c` in a fresh process: `research` cannot be imported, whatever the
# editable install says; then load every export and score the inputs.
BLOCKED = """
import importlib.abc, json, sys
class NoResearch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'research' or name.startswith('research.'):
            raise ModuleNotFoundError('research is blocked here')
sys.meta_path.insert(0, NoResearch())
try:
    import research
    sys.exit('research was importable')
except ModuleNotFoundError:
    pass
import numpy as np, keras, tensorflow as tf
data = np.load('inputs.npz')
out = {}
for kind in json.load(open('kinds.json')):
    model = keras.models.load_model(f'{kind}/model.keras')
    out[f'keras/{kind}'] = model.predict(data[f'x/{kind}'], verbose=0)
    if kind in json.load(open('served.json')):
        sig = tf.saved_model.load(f'{kind}/saved_model').signatures['serving_default']
        for key, value in sig(images=tf.constant(data[f'u8/{kind}'])).items():
            out[f'served/{kind}/{key}'] = value.numpy()
out['loaded_research'] = np.array(any(m.split('.')[0] == 'research' for m in sys.modules))
np.savez('outputs.npz', **out)
"""


def build(kind: str, dtype=None) -> keras.Model:
    name, shape, outputs, options = KINDS[kind]
    if kind == "scratch_transfer":
        return build_transfer_model(name, shape, outputs, dtype=dtype,
                                    scratch_options=TINY_SCRATCH, **options)
    return build_model(name, shape, outputs, dtype=dtype, **options)


def randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """Trained-looking weights: BN statistics and shifts off their initial values, the
    zero-initialised logits and whitening bias random."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if hasattr(layer, "moving_variance"):
            c = layer.moving_variance.shape
            for v, value in ((layer.moving_mean, rng.normal(0, 0.3, c)),
                             (layer.moving_variance, rng.uniform(0.5, 2, c)),
                             (layer.beta, rng.normal(0, 0.3, c)),
                             (layer.gamma, rng.uniform(0.5, 1.5, c))):
                if v is not None:
                    v.assign(value.astype(np.float32))
        elif layer.name in ("logits", "whiten"):
            for v in layer.weights:
                if v.trainable:
                    v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    return model


def inputs_of(kind: str, n: int = 4, seed: int = 1) -> np.ndarray:
    """Random float inputs in the model's range ([0, 1] for ours, raw pixels for transfer)."""
    name, shape, _, options = KINDS[kind]
    top = 255.0 if "weights" in options else 1.0
    return np.random.default_rng(seed).uniform(0, top, (n, *shape)).astype(np.float32)


def meta_of(kind: str) -> dict:
    _, shape, outputs, _ = KINDS[kind]
    names = [f"class{i}" for i in range(max(outputs, 2))]
    return {"positive_class": names[1], "positive_class_id": 1, "class_names": names,
            "image_shape": list(shape), "threshold": 0.375, **SERVED[kind]}


def all_layers(model):
    return [layer for layer in model._flatten_layers() if layer is not model]


def test_every_kind_becomes_keras_layers_with_the_same_names_and_outputs():
    for kind in KINDS:
        model = randomize(build(kind))
        stock = export.keras_only(model)
        assert [x.name for x in all_layers(stock)] == [x.name for x in all_layers(model)], kind
        assert {type(x).__module__.split(".")[0] for x in all_layers(stock)} == {"keras"}
        x = inputs_of(kind)
        diff = np.abs(model(x, training=False).numpy() - stock(x, training=False).numpy())
        assert diff.max() < 1e-5, (kind, diff.max())


@pytest.mark.parametrize("backbone", [b for b in BACKBONES
                                      if b not in (*OWN_NETWORKS, SAVEDMODEL)])
def test_the_preprocess_conv_is_the_backbones_preprocess_input(backbone):
    for channels in (1, 3):
        x = np.random.default_rng(channels).uniform(0, 255, (2, 5, 5, channels))
        ours = BackbonePreprocess(backbone)
        ours(keras.Input((5, 5, channels)))  # in a graph, as in a model
        stock, weights = export.stock_layer(ours)
        stock.build(x.shape)
        stock.set_weights(weights)
        assert np.abs(ours(x).numpy() - stock(x).numpy()).max() < 1e-5, (backbone, channels)


def test_a_mixed_precision_model_exports_float32():
    model = randomize(build("fast", "mixed_bfloat16"))
    stock = export.keras_only(model)
    assert {x.dtype_policy.name for x in all_layers(stock)} == {"float32"}
    twin = build("fast")
    twin.set_weights(model.get_weights())
    x = inputs_of("fast")
    assert np.abs(twin(x).numpy() - stock(x).numpy()).max() < 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every kind's model.keras (and three SavedModels) written as training writes them, the
    inputs, our own outputs, and the outputs of a fresh Python without `research`."""
    root = tmp_path_factory.mktemp("exports")
    data, ours = {}, {}
    for kind in KINDS:
        model = randomize(build(kind))
        path = str(root / kind / runs.MODEL_FILE)
        stock = export.save_keras_only(model, path)
        data[f"x/{kind}"] = inputs_of(kind)
        ours[f"keras/{kind}"] = model(data[f"x/{kind}"], training=False).numpy()
        if kind in SERVED:
            meta = meta_of(kind)
            meta["serving"] = export.serving_contract(meta)
            runs.write_metadata(path, meta)
            export.write_saved_model(stock, meta, runs.saved_model_path(path),
                                     runs.metadata_path(path))
            data[f"u8/{kind}"] = np.random.default_rng(2).integers(
                0, 256, (5, *KINDS[kind][1]), dtype=np.uint8)
            ours[f"original/{kind}"] = detector.Detector(model, meta).score_batch(
                data[f"u8/{kind}"])[0]
            ours[f"model/{kind}"] = model
    np.savez(root / "inputs.npz", **data)
    (root / "kinds.json").write_text(json.dumps(list(KINDS)))
    (root / "served.json").write_text(json.dumps(list(SERVED)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", BLOCKED], cwd=root, env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return root, ours, dict(np.load(root / "outputs.npz"))


@pytest.mark.slow
@pytest.mark.xdist_group("exported")  # one module fixture, built once
def test_model_keras_loads_and_predicts_without_our_package(exported):
    _, ours, theirs = exported
    assert not theirs["loaded_research"]
    for kind in KINDS:
        diff = np.abs(theirs[f"keras/{kind}"] - ours[f"keras/{kind}"]).max()
        assert diff < 1e-5, (kind, diff)


@pytest.mark.slow
@pytest.mark.xdist_group("exported")  # one module fixture, built once
def test_the_saved_model_gives_the_detectors_probability_without_our_package(exported):
    root, ours, theirs = exported
    for kind in SERVED:
        path = str(root / kind / runs.MODEL_FILE)
        meta = runs.read_metadata(path)
        scores, _ = detector.load_detector(path, meta).score_batch(
            np.load(root / "inputs.npz")[f"u8/{kind}"])
        p = theirs[f"served/{kind}/probability"]
        assert p.dtype == np.float32 and p.shape == (5,)
        assert np.abs(p - scores).max() < 1e-6, kind
        assert np.abs(p - ours[f"original/{kind}"]).max() < 1e-5, kind
        assert theirs[f"served/{kind}/logits"].shape == (5, KINDS[kind][2])
        assert np.all(theirs[f"served/{kind}/threshold"] == np.float32(0.375))
        assert os.path.isfile(os.path.join(runs.saved_model_path(path), "assets",
                                           runs.METADATA))


@pytest.mark.slow
@pytest.mark.xdist_group("exported")  # one module fixture, built once
def test_saved_model_cli_lists_the_uint8_input(exported):
    root, _, _ = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    cmd = [cli] if os.path.exists(cli) else [sys.executable, "-m",
                                             "tensorflow.python.tools.saved_model_cli"]
    res = subprocess.run(cmd + ["show", "--dir", str(root / "fast" / runs.SAVED_MODEL),
                                "--tag_set", "serve", "--signature_def", "serving_default"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "inputs['images']" in out and "dtype: DT_UINT8" in out
    assert "shape: (-1, 32, 32, 3)" in out
    for name in export.OUTPUTS:
        assert f"outputs['{name}']" in out


@pytest.mark.slow
@pytest.mark.xdist_group("exported")  # one module fixture, built once
def test_tflite_equals_the_saved_model(exported):
    root, _, _ = exported
    saved = str(root / "fast" / runs.SAVED_MODEL)
    path = export.convert_to_tflite(saved, runs.tflite_path(str(root / "fast" / "model.keras")))
    images = np.load(root / "inputs.npz")["u8/fast"][:4]
    want = tf.saved_model.load(saved).signatures["serving_default"](images=tf.constant(images))
    got = export.run_tflite(path, images)
    for name in export.OUTPUTS:
        assert np.abs(got[name] - want[name].numpy()).max() < 1e-4, name


@pytest.mark.slow
@pytest.mark.xdist_group("exported")  # one module fixture, built once
def test_exports_with_our_layers_still_load_with_our_package(exported, tmp_path):
    root, ours, _ = exported
    model = ours["model/fast"]
    old = str(tmp_path / runs.MODEL_FILE)
    model.save(old)  # what export_model wrote before: FusedBatchNorm, PatchWhitening
    meta = runs.read_metadata(str(root / "fast" / runs.MODEL_FILE))
    runs.write_metadata(old, meta)
    images = np.load(root / "inputs.npz")["u8/fast"]
    scores, _ = detector.load_detector(old, meta).score_batch(images)
    assert np.abs(scores - ours["original/fast"]).max() < 1e-6
    # explain's loader and --weights=<run> take the new export too
    run = tmp_path / "ck" / "run"
    (run / runs.EXPORT).mkdir(parents=True)
    for name in (runs.MODEL_FILE, runs.METADATA):
        os.link(root / "scratch" / name, run / runs.EXPORT / name)
    ex, _ = loading.load_run(str(tmp_path / "ck"), "run")
    x = inputs_of("scratch")
    assert np.abs(ex.model(x).numpy() - ours["keras/scratch"]).max() < 1e-5
    files.write_json(str(run / runs.CONFIG), {"model": "scratch", "transfer": "none",
                                              "model_options": TINY_SCRATCH})
    base = build_base("scratch", TransferOptions(weights="run"), (32, 32, 3),
                      str(tmp_path / "ck"))
    donor = ex.model.get_layer("stem_bn")
    assert type(base.get_layer("stem_bn")).__name__ == "FusedBatchNorm"
    for a, b in zip(base.get_layer("stem_bn").get_weights(), donor.get_weights()):
        np.testing.assert_array_equal(a, b)


def app(*args):
    return warm.run([sys.executable, "-m", "research.apps.export", *args], cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": ROOT}, timeout=180)


@pytest.mark.slow
@pytest.mark.xdist_group("exported")  # one module fixture, built once
def test_the_export_app_rewrites_an_old_export_and_adds_tflite(exported, tmp_path):
    root, ours, _ = exported
    meta = runs.read_metadata(str(root / "fast" / runs.MODEL_FILE))
    del meta["serving"]
    path = runs.exported_model_path(str(tmp_path / "ck"), "old")
    os.makedirs(os.path.dirname(path))
    ours["model/fast"].save(path)  # an export from before: our custom layers
    runs.write_metadata(path, meta)
    res = app("--run_name=old", f"--checkpoint_dir={tmp_path / 'ck'}", "--tflite")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == [path, runs.metadata_path(path), runs.saved_model_path(path),
                                  runs.tflite_path(path)]
    model = keras.models.load_model(path)
    assert {type(x).__module__.split(".")[0] for x in all_layers(model)} == {"keras"}
    assert runs.read_metadata(path)["serving"]["inputs"]["images"]["dtype"] == "uint8"
    images = np.load(root / "inputs.npz")["u8/fast"]
    got = export.run_tflite(runs.tflite_path(path), images)["probability"]
    assert np.abs(got - ours["original/fast"]).max() < 1e-4


def test_the_export_app_names_a_missing_export_in_one_line(tmp_path):
    res = app(f"--model={tmp_path / 'model.keras'}")
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error: --model: no such file ") and str(tmp_path) in res.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("exported")  # one module fixture, built once
def test_a_full_disk_leaves_the_previous_saved_model(exported, tmp_path, monkeypatch):
    root, _, _ = exported
    stock = keras.models.load_model(str(root / "scratch" / runs.MODEL_FILE))
    meta = runs.read_metadata(str(root / "scratch" / runs.MODEL_FILE))
    target = str(tmp_path / runs.SAVED_MODEL)
    export.write_saved_model(stock, meta, target)
    before = sorted(os.listdir(target))

    def full(module, path, *a, **kw):
        (open(os.path.join(path, "saved_model.pb"), "wb")).write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", full)
    with pytest.raises(files.OutOfSpaceError, match="writing the SavedModel to "):
        export.write_saved_model(stock, meta, target)
    assert sorted(os.listdir(target)) == before
    assert os.listdir(tmp_path) == [runs.SAVED_MODEL]  # no temporary folder left
    monkeypatch.undo()
    assert tf.saved_model.load(target).signatures["serving_default"]
