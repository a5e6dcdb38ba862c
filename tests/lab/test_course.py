"""The course's last pieces (issue 43): the dense baseline and Chollet's MNIST convnet, dilated
and dropout-between-convolution scratch CNNs, the effective receptive field, neural style
transfer, and a SavedModel / TF-Hub folder as a backbone, in predict and in explain."""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import tiny_config
import warm
from research.explain import core, methods, receptive
from research.explain import style_transfer as st
from research.model_options import ScratchOptions, TransferOptions, model_options_error
from research.models import build_model
from research.models.receptive_field import last_conv, layer_geometry
from research.training.config import ConfigError, TrainConfig

NONE_NET = dict(widths=(4, 4, 4), res_blocks=(1, 0, 1), stem_width=4, downsample="none")


# --------------------------------------------------------------------- dense vs convnet

def test_dense_and_mnist_convnet_have_chollets_parameter_counts():
    assert build_model("dense", (28, 28, 1), 10).count_params() == 407_050
    assert build_model("mnist_convnet", (28, 28, 1), 10).count_params() == 93_322
    for name in ("dense", "mnist_convnet"):  # and on CIFAR, one logit or ten
        model = build_model(name, (32, 32, 3), 1, dropout=0.5)
        assert model.output_shape == (None, 1) and model.get_layer("dropout").rate == 0.5
        assert model.get_layer("logits").dtype_policy.name == "float32"


@pytest.mark.slow
def test_dense_model_trains_and_the_gradcam_hook_steps_aside(syn, tmp_path):
    from research.explain.hooks import gradcam_actions
    from research.training.loop import train_and_evaluate

    cfg = tiny_config(syn, tmp_path, model="dense", model_options={"dense_units": 16},
                      train_steps=4, eval_every_steps=4, gradcam_images=2,
                      optimizer="adamw", learning_rate=1e-3)
    summary = train_and_evaluate(cfg, actions=gradcam_actions(cfg))  # no feature map: no CAM
    assert summary["final_step"] == 4 and os.path.isfile(summary["export"])


# ----------------------------------------------------- dilation and dropout between convs

def test_stage_dilation_dilates_every_conv_of_its_stage_and_widens_the_field():
    model = build_model("scratch", (32, 32, 3), 10, stage_dilation=(1, 2, 4), **NONE_NET)
    rates = {layer.name: layer.dilation_rate[0] for layer in model.layers
             if isinstance(layer, keras.layers.Conv2D)}
    assert rates == {"stem_conv": 1, "stage0_conv": 1, "stage0_res0a_conv": 1,
                     "stage0_res0b_conv": 1, "stage1_conv": 2, "stage2_conv": 4,
                     "stage2_res0a_conv": 4, "stage2_res0b_conv": 4}
    plain = build_model("scratch", (32, 32, 3), 10, **NONE_NET)
    # 8 convs of 3x3: 1 + 2 * 8 = 17 px; dilated, 1 + 2 (1 + 1 + 1 + 1 + 2 + 4 + 4 + 4) = 37
    assert last_conv(layer_geometry(plain)).rf == 17
    assert last_conv(layer_geometry(model)).rf == 37
    assert model.count_params() == plain.count_params()


def test_default_scratch_network_is_unchanged_by_the_new_options():
    keras.utils.set_random_seed(1)
    a = build_model("scratch", (32, 32, 3), 10, widths=(8, 16), res_blocks=(1, 0))
    keras.utils.set_random_seed(1)
    b = build_model("scratch", (32, 32, 3), 10, widths=(8, 16), res_blocks=(1, 0),
                    stage_dilation=(1, 1), conv_dropout=0.0)
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    for u, v in zip(a.weights, b.weights):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_conv_dropout_plain_drops_units_spatial_drops_whole_channels():
    for kind, cls in (("plain", keras.layers.Dropout),
                      ("spatial", keras.layers.SpatialDropout2D)):
        model = build_model("scratch", (32, 32, 3), 10, widths=(8, 16), res_blocks=(1, 0),
                            conv_dropout=0.5, conv_dropout_type=kind)
        drops = [layer for layer in model.layers if layer.name.endswith("_dropout")]
        assert [d.name for d in drops] == ["stage0_dropout", "stage1_dropout"]
        assert all(type(d) is cls for d in drops)
    keras.utils.set_random_seed(0)
    out = np.asarray(keras.layers.SpatialDropout2D(0.5)(np.ones((4, 6, 6, 16), np.float32),
                                                        training=True))
    per_channel = out.reshape(4, 36, 16)
    assert np.all(per_channel.min(axis=1) == per_channel.max(axis=1))  # all or nothing
    assert 0 < (per_channel[:, 0] == 0).mean() < 1


def test_dilation_and_conv_dropout_options_are_checked():
    assert model_options_error("scratch", {"stage_dilation": (1, 2)}) == (
        "stage_dilation", "2 rates for 3 stages: give one per stage")
    flag, message = model_options_error("scratch", {"stage_dilation": (1, 2, 1),
                                                    "downsample": "stride"})
    assert flag == "stage_dilation" and "stride-2 conv, which cannot be dilated" in message
    assert model_options_error("scratch", {"stage_dilation": (1, 0, 1)})[0] == "stage_dilation"
    assert model_options_error("scratch", {"conv_dropout": 1.0})[0] == "conv_dropout"
    assert model_options_error("scratch", {"stage_dilation": (2, 1, 1),
                                           "downsample": "stride"}) is None  # stage 0: no stride
    assert "--downsample=none" in ScratchOptions.__dataclass_fields__[
        "stage_dilation"].metadata["help"]


# ------------------------------------------------------------------ effective receptive field

def test_effective_receptive_field_stays_inside_the_theoretical_one(tmp_path):
    images = receptive.random_images(4, (32, 32), seed=1)
    fields = []
    for dilation in ((), (1, 2, 4)):
        keras.utils.set_random_seed(0)
        model = build_model("scratch", (32, 32, 3), 10, stage_dilation=dilation, **NONE_NET)
        ex = core.Explainer(model, lambda x: x / 255.0)
        f = receptive.effective_receptive_field(ex, None, images)
        assert f.layer == "stage2_res0_add" and f.unit == (16, 16) and f.center == (16, 16)
        assert f.outside == 0.0  # no gradient reaches a pixel the unit cannot see
        assert f.erf.shape == (32, 32) and 1 <= f.erf_side <= f.theoretical
        fields.append(f)
    assert [f.theoretical for f in fields] == [17, 37]
    assert fields[1].erf_side > fields[0].erf_side
    paths = receptive.save_receptive_fields(ex, ["stage0_relu"], images, str(tmp_path), "x")
    assert os.path.isfile(paths[0][0]) and paths[0][1].theoretical == 5


def test_mass_side_is_the_smallest_centred_square_holding_the_mass():
    erf = np.zeros((9, 9))
    erf[4, 4], erf[4, 6], erf[0, 0] = 8.0, 1.0, 1.0
    assert receptive.mass_side(erf, (4.0, 4.0), 0.8) == 1
    assert receptive.mass_side(erf, (4.0, 4.0), 0.9) == 5
    assert receptive.mass_side(erf, (4.0, 4.0), 1.0) == 9


# ------------------------------------------------------------------------- style transfer

def test_style_losses_match_their_formulas():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 4, 5)).astype(np.float32)
    flat = f.reshape(-1, 5)
    np.testing.assert_allclose(st.gram_matrix(tf.constant(f)), flat.T @ flat, rtol=1e-5)
    assert st.style_norm((3, 4, 5), (40, 60, 3), "keras_io") == 4 * 9 * (40 * 60) ** 2
    assert st.style_norm((3, 4, 5), (40, 60, 3), "gatys") == 4 * 25 * (3 * 4) ** 2
    x = rng.uniform(0, 255, (1, 5, 6, 3)).astype(np.float32)
    a = (x[:, :-1, :-1] - x[:, 1:, :-1]) ** 2
    b = (x[:, :-1, :-1] - x[:, :-1, 1:]) ** 2
    np.testing.assert_allclose(st.total_variation_loss(tf.constant(x)),
                               np.sum((a + b) ** 1.25), rtol=1e-5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("style")
    yy, xx = np.mgrid[0:48, 0:60]
    content = np.stack([xx * 4, yy * 5, 255 - xx * 4], -1).clip(0, 255).astype(np.uint8)
    stripes = (((xx + yy) // 4) % 2 * 255).astype(np.uint8)
    style = np.stack([stripes, 255 - stripes, stripes // 2], -1)
    Image.fromarray(content).save(d / "content.png")
    Image.fromarray(style).save(d / "style.jpg")
    return str(d / "content.png"), str(d / "style.jpg")


def test_style_transfer_random_vgg_shapes_loss_and_resume(pair, tmp_path):
    """weights=None VGG16 at 32 rows: the image keeps its size, the loss falls, and 3 + 3
    resumed steps give the image and losses of 6 in one go."""
    opts = st.StyleOptions(model="vgg16", weights="none", image_rows=32, steps=6,
                           summary_every=1, checkpoint_every=3)
    whole = st.style_transfer(*pair, opts, str(tmp_path / "a"), log=lambda s: None)
    assert whole.image.shape == (32, 40, 3) and whole.final_step == 6
    totals = [row["total"] for row in whole.losses]
    assert len(totals) == 6 and totals[-1] < totals[0]
    first = st.style_transfer(*pair, st.StyleOptions(**{**opts.__dict__, "steps": 3}),
                              str(tmp_path / "b"), log=lambda s: None)
    assert first.final_step == 3
    resumed = st.style_transfer(*pair, opts, str(tmp_path / "b"), log=lambda s: None)
    assert resumed.start_step == 3 and resumed.final_step == 6
    np.testing.assert_allclose(resumed.image.astype(int), whole.image.astype(int), atol=1)
    np.testing.assert_allclose([r["total"] for r in resumed.losses], totals, rtol=1e-4)
    saved = np.asarray(Image.open(tmp_path / "b" / st.RESULT))
    np.testing.assert_array_equal(saved, resumed.image)
    assert any(n.startswith("events") for n in os.listdir(tmp_path / "b" / "tensorboard"))
    with pytest.raises(st.StyleTransferError, match="other image_rows"):
        st.style_transfer(*pair, st.StyleOptions(**{**opts.__dict__, "image_rows": 40}),
                          str(tmp_path / "b"))
    with pytest.raises(st.StyleTransferError, match="--style_layers: no layer nope"):
        st.style_transfer(*pair, st.StyleOptions(**{**opts.__dict__, "style_layers": ("nope",)}
                                                 ), str(tmp_path / "c"))


# ---------------------------------------------------------------- a SavedModel as a backbone

@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Two SavedModels the test writes itself (tf.saved_model.save of Keras models): a
    feature extractor (a 4-D feature map) and a 5-way classifier (logits)."""
    d = tmp_path_factory.mktemp("sm")
    keras.utils.set_random_seed(3)
    x = keras.Input((24, 24, 3))
    y = keras.layers.Conv2D(6, 3, activation="relu")(x)
    tf.saved_model.save(keras.Model(x, keras.layers.Conv2D(8, 3, strides=2)(y)),
                        str(d / "features"))
    z = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(y))
    classifier = keras.Model(x, z)
    tf.saved_model.save(classifier, str(d / "classifier"))
    return str(d / "features"), str(d / "classifier"), classifier


def by_shape(arrays):
    return sorted((np.asarray(a) for a in arrays), key=lambda a: (a.shape, float(a.sum())))


def sm_cfg(syn, tmp_path, sm, transfer, **kw):
    from research.training.loop import prepare_config

    opts = {"savedmodel_dir": sm, "image_size": 24, "savedmodel_preprocess": "tf",
            "head_units": (8,)}
    return prepare_config(tiny_config(syn, tmp_path, model="savedmodel", transfer=transfer,
                                      model_options=opts, **kw))


@pytest.mark.slow
def test_savedmodel_backbone_trains_its_head_in_features_and_frozen_modes(syn, tmp_path,
                                                                          saved_models):
    from research.detector import load_detector
    from research.savedmodel_predict import export_detector
    from research.training.loop import train_and_evaluate

    features_dir = saved_models[0]
    original = keras.layers.TFSMLayer(features_dir, call_endpoint="serving_default"
                                      ).get_weights()
    for transfer in ("features", "frozen"):
        cfg = sm_cfg(syn, tmp_path, features_dir, transfer, run_name=f"sm_{transfer}",
                     train_steps=4,  # bf16 around a float32 SavedModel, float32 alone
                     precision="mixed_bfloat16" if transfer == "frozen" else "float32",
                     tta=transfer == "frozen")  # p(cat) averaged over views, as the export
        summary = train_and_evaluate(cfg)
        assert summary["final_step"] == 4
        det = load_detector(summary["export"])  # model.keras: the SavedModel by its path
        base = [layer for _, layer in core.iter_layers(det.model)
                if isinstance(layer, keras.layers.TFSMLayer)][0]
        for v, w in zip(by_shape(base.weights), by_shape(original), strict=True):
            np.testing.assert_array_equal(v, w)  # never trained
        images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        from_folder = export_detector(os.path.join(os.path.dirname(summary["export"]),
                                                   "saved_model"))
        np.testing.assert_allclose(from_folder.score_batch(images)[0],
                                   det.score_batch(images)[0], atol=1e-5)
    with pytest.raises(ConfigError, match="--transfer=features or frozen"):
        TrainConfig(data_dir=syn, run_name="x", model="savedmodel", transfer="fine_tune",
                    model_options={"savedmodel_dir": features_dir}).validate()


def test_savedmodel_preprocess_conv_is_keras_preprocess_input():
    from keras.applications import imagenet_utils
    from research.models.savedmodel import preprocess_layer

    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    for mode, want in (("none", x), ("unit", x / 255.0),
                       ("tf", imagenet_utils.preprocess_input(x.copy(), mode="tf")),
                       ("caffe", imagenet_utils.preprocess_input(x.copy(), mode="caffe"))):
        layer = preprocess_layer(mode, 3)
        assert not layer.trainable
        np.testing.assert_allclose(layer(x), want, atol=1e-4)
    gray = preprocess_layer("unit", 1)(x[..., :1])
    np.testing.assert_allclose(gray, np.repeat(x[..., :1] / 255.0, 3, -1), atol=1e-6)


def test_savedmodel_settings_that_cannot_work_are_one_line(tmp_path, saved_models):
    assert model_options_error("savedmodel", {"savedmodel_dir": str(tmp_path)}) == (
        "savedmodel_dir", f"{tmp_path}: no saved_model.pb in that folder")
    assert model_options_error("vgg16", {"savedmodel_dir": saved_models[0]})[0] == \
        "savedmodel_dir"
    assert model_options_error("savedmodel", {"savedmodel_dir": saved_models[0],
                                              "cut_at": "x"})[0] == "cut_at"
    assert "savedmodel_dir" in TransferOptions.__dataclass_fields__


def test_any_savedmodel_explained_by_gradients_and_predicted_by_its_outputs(
        saved_models, tmp_path):
    from research.inference import PredictOptions
    from research.model_options import SavedModelOptions
    from research.models.savedmodel import savedmodel_model
    from research.savedmodel_predict import predict_any

    _, folder, classifier = saved_models
    opts = SavedModelOptions(savedmodel_dir=folder, savedmodel_preprocess="tf")
    model = savedmodel_model(opts)
    assert model.input_shape == (None, 24, 24, 3)  # from its signature
    raw = np.random.default_rng(1).uniform(0, 255, (2, 24, 24, 3)).astype(np.float32)
    want = classifier(raw / 127.5 - 1.0)
    np.testing.assert_allclose(model(raw), want, atol=1e-4)
    res = methods.explain(core.Explainer(model), "saliency", raw, 2)
    assert res.maps.shape == (2, 24, 24) and np.all(res.maps >= 0) and res.maps.max() > 0
    paths = []
    for i, img in enumerate(raw.astype(np.uint8)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    preds = list(predict_any(folder, paths + [str(tmp_path / "missing.png")], opts,
                             PredictOptions(top_k=2)))
    direct = np.asarray(model(raw.astype(np.uint8).astype(np.float32)))
    assert [p.decision for p in preds[:2]] == [str(int(k)) for k in direct.argmax(1)]
    assert len(preds[0].top_classes) == 2 and preds[2].error


@pytest.mark.slow
def test_the_apps_take_a_savedmodel_and_draw_receptive_fields(saved_models, tmp_path):
    """explain --model=savedmodel: Grad-CAM refused in one line, saliency written; predict
    --model=<folder>; explain --visualize=receptive_field on a run, no images needed."""
    _, folder, _ = saved_models
    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
                    ).save(photo)
    base = [sys.executable, "-m", "research.apps.explain", "--model=savedmodel",
            f"--savedmodel_dir={folder}", f"--images={photo}", f"--out_dir={tmp_path / 'o'}"]
    res = warm.run(base + ["--method=gradcam"], timeout=600)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert "--method=gradcam: a SavedModel runs whole" in res.stderr
    res = warm.run(base + ["--method=saliency"], timeout=600)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / "heatmap_p.png").exists()
    res = warm.run([sys.executable, "-m", "research.apps.predict", f"--model={folder}",
                    f"--images={photo}", "--top_k=1"], timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{photo}\t") and "top:" in res.stdout
    ck = tmp_path / "ck"
    export = ck / "tiny" / "export"
    export.mkdir(parents=True)
    build_model("scratch", (32, 32, 3), 10, widths=(4, 8), res_blocks=(1, 0), stem_width=4,
                stage_dilation=(1, 2)).save(export / "model.keras")
    (export / "metadata.json").write_text(json.dumps(
        {"objective": "multiclass", "positive_class": "cat", "positive_class_id": 3,
         "class_names": [str(i) for i in range(10)], "image_shape": [32, 32, 3],
         "scale": "unit", "threshold": 0.5, "tta": False}))
    res = warm.run([sys.executable, "-m", "research.apps.explain", "--run_name=tiny",
                    f"--checkpoint_dir={ck}", "--visualize=receptive_field",
                    "--precision=float32", f"--out_dir={tmp_path / 'rf'}"], timeout=600)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "rf" / "receptive_field_stage1_relu.png").exists()
    assert "theoretical 24 px" in res.stdout, res.stdout
