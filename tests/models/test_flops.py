"""FLOPs counted by research.models.flops against hand-computed tiny models and TensorFlow's own
count (its profiler on the graph, pruned to what the outputs need, as TensorFlow runs it); the
fraction-of-peak rows research.benchmarks.peak builds for the train-step and Grad-CAM
benchmarks, fed fake timings."""

import keras
import pytest
import tensorflow as tf
from keras import layers

from research.benchmarks import peak, ratios
from research.explain import core
from research.models import build_model
from research.models.flops import count_flops, gradcam_flops, layer_flops


def tf_flops(fn, *specs) -> int:
    """TensorFlow's FLOP count of the convolutions and matmuls of `fn`'s graph, counting only
    the ops its outputs need (TensorFlow prunes the rest before running it)."""
    graph = tf.function(fn).get_concrete_function(*specs).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts.update(output="none", account_type_regexes=["Conv2D.*", "MatMul"])
    prof = tf.compat.v1.profiler.profile(graph=graph, options=opts)
    kept = {n.name for n in tf.compat.v1.graph_util.extract_sub_graph(
        graph.as_graph_def(), [t.op.name for t in graph.outputs]).node}

    def total(node):
        return (node.float_ops if node.name in kept else 0) + sum(map(total, node.children))
    return total(prof)


def tiny_model():
    x = inputs = keras.Input((8, 8, 8))
    x = layers.Conv2D(16, 3, padding="same", name="same")(x)
    x = layers.Conv2D(8, 3, strides=2, name="valid_s2")(x)      # 8 -> 3
    x = layers.Conv2D(8, 3, padding="same", groups=4, name="grouped")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = layers.Dense(5, name="dense")(layers.Flatten(name="flat")(x))
    return keras.Model(inputs, x)


MACS = {"same": 8 * 8 * 16 * 3 * 3 * 8, "valid_s2": 3 * 3 * 8 * 3 * 3 * 16,
        "grouped": 3 * 3 * 8 * 3 * 3 * 2, "depthwise": 3 * 3 * 8 * 3 * 3, "dense": 72 * 5}


def test_forward_and_train_step_by_hand():
    model = tiny_model()
    rows = {r.name: r for r in layer_flops(model)}
    assert {n: rows[n].forward // 2 for n in MACS} == MACS
    assert rows["relu"].forward == rows["flat"].forward == 0
    fwd = 2 * sum(MACS.values())
    # backward: weight and input gradients, but the first conv's input needs none
    assert count_flops(model).forward == fwd
    assert count_flops(model).train_step == 3 * fwd - 2 * MACS["same"]
    model.get_layer("same").trainable = False  # frozen: no weight gradient; so none upstream
    assert count_flops(model).train_step == 3 * fwd - 4 * MACS["same"] - 2 * MACS["valid_s2"]


def test_nested_model_is_counted_under_its_path():
    inner_in = keras.Input((16, 16, 4))
    inner = keras.Model(inner_in, layers.Conv2D(4, 3, padding="same", name="ic")(inner_in),
                        name="backbone")
    x = inputs = keras.Input((32, 32, 3))
    x = inner(layers.Conv2D(4, 3, strides=2, padding="same", name="c1")(x))
    x = layers.Dense(2, name="out")(layers.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inputs, x)
    rows = {r.name: r for r in layer_flops(model)}
    assert rows["backbone/ic"].forward == 2 * 16 * 16 * 4 * 3 * 3 * 4
    assert count_flops(model).forward == 2 * (16 * 16 * 4 * 27 + 16 * 16 * 4 * 36 + 4 * 2)
    inner.trainable = False  # a frozen backbone: only c1's weights and the head's need work
    f = count_flops(model)
    assert f.train_step == f.forward + 2 * 16 * 16 * 4 * 27 + 2 * 16 * 16 * 4 * 36 + 2 * 2 * 8


def test_default_networks_match_the_issues_hand_count():
    scratch = count_flops(build_model("scratch", (32, 32, 3), 10))
    fast = count_flops(build_model("fast", (32, 32, 3), 10))
    assert round(scratch.forward / 1e9, 2) == 0.19 and round(scratch.train_step / 1e9, 2) == 0.57
    assert round(fast.train_step / 1e9, 2) == 0.71


@pytest.mark.parametrize("name,options", [
    ("scratch", {"widths": (8, 16, 32), "res_blocks": (1, 0, 1), "stem_width": 8}),
    ("fast", {"widths": (8, 16, 16)})])  # frozen whitening kernel, trainable bias
def test_counts_equal_tensorflows_own(name, options):
    model = build_model(name, (32, 32, 3), 10, **options)
    spec = tf.TensorSpec([1, 32, 32, 3], tf.float32)

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    flops = count_flops(model)
    assert tf_flops(lambda x: model(x, training=False), spec) == flops.forward
    assert tf_flops(step, spec) == flops.train_step


def test_gradcam_counts_the_forward_pass_and_the_gradient_back_to_the_layer():
    x = inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", name="a")(x)
    x = layers.Conv2D(8, 3, padding="same", name="b")(x)
    x = layers.Conv2D(4, 3, strides=2, padding="same", name="c")(x)
    model = keras.Model(inputs, layers.Dense(3, name="out")(
        layers.GlobalAveragePooling2D(name="gap")(x)))
    grad_model = keras.Model(model.inputs, [model.get_layer("b").output, model.output])

    def gradients(x):  # what Explainer.gradients computes
        with tf.GradientTape() as tape:
            acts, logits = grad_model(x)
            score = logits[:, 0]
        return acts, tape.gradient(score, acts), logits

    g = gradcam_flops(model, "b")
    assert g.backward == 2 * (8 * 8 * 4 * 9 * 8 + 4 * 3)  # c's and out's input gradients
    assert g.cam == 2 * 16 * 16 * 8 and g.forward == count_flops(model).forward
    assert tf_flops(gradients, tf.TensorSpec([1, 16, 16, 3])) == g.forward + g.backward
    path, _ = core.find_layer(model)
    assert gradcam_flops(model, path).backward == 2 * (4 * 3)  # the last map: c
    with pytest.raises(ValueError, match="no layer 'nope'"):
        gradcam_flops(model, "nope")


def test_fraction_rows_from_fake_timings(tmp_path):
    out = ratios.Ratios("train_step")
    fp32 = peak.Peak(4096, 100.0, bf16=200.0)
    lines = peak.train_step_rows(out, fp32, {
        "scratch": peak.Achieved(600_000_000, 100.0, "mixed_bfloat16"),
        "fast": peak.Achieved(710_000_000, 50.0, "float32")})
    grad = ratios.Ratios("gradcam")
    lines.append(peak.gradcam_row(grad, fp32, "vgg16", peak.Achieved(31_000_000_000, 2.0,
                                                                     "float32")))
    path = tmp_path / "r.json"
    out.write(str(path))
    _, rows = ratios.read(str(path))
    assert [r.name for r in rows] == ["scratch: fraction of FP32 peak",
                                      "fast: fraction of FP32 peak"]
    assert [r.name for r in grad.rows] == ["gradcam vgg16: fraction of FP32 peak"]
    assert [r.value for r in rows + grad.rows] == pytest.approx([0.6, 0.355, 0.62])
    assert "mixed_bfloat16" in rows[0].note and "4096x4096 fp32 matmul 100.0" in rows[0].note
    assert "0.30 of the bf16 matmul's 200.0" in rows[0].note
    assert "bf16" not in rows[1].note  # a float32 loop: no bf16 comparison
    assert lines[0].split()[:5] == ["scratch:", "fraction", "of", "FP32", "peak:"]
    assert "4096x4096 bfloat16 matmul, 200.0 GFLOP/s" in fp32.describe()


def test_matmul_peak_is_measured():
    p = peak.measure_peak(64)
    assert p.size == 64 and p.fp32 > 0 and p.bf16 is None
