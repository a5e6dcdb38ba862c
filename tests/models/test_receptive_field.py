"""The receptive-field walk (research.models.receptive_field) against hand-computed values:
kernels, strides, dilation, pooling, a residual add, global pooling, a nested model."""

import keras
from keras import layers

from research.models import build_model
from research.models.receptive_field import format_geometry, layer_geometry

SMALL = {"widths": (8, 16, 32), "res_blocks": (1, 0, 1), "stem_width": 8}


def by_name(model):
    return {r.name: r for r in layer_geometry(model)}


def test_receptive_field_of_a_tiny_stack_by_hand():
    x = inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(x)    # RF 3, jump 1
    x = layers.MaxPooling2D(2, name="p1")(x)                  # 3 + 1*1 = 4, jump 2
    x = layers.Conv2D(8, 3, padding="same", name="c2")(x)    # 4 + 2*2 = 8
    y = layers.Conv2D(8, 1, name="skip")(x)                   # 8
    x = layers.Add(name="add")([x, layers.Conv2D(8, 3, padding="same", name="c3")(x), y])
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="c4")(x)   # 12 + 2*2 = 16, j 4
    x = layers.Conv2D(8, 3, dilation_rate=2, padding="same", name="c5")(x)  # 16 + 2*2*4 = 32
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    rows = by_name(keras.Model(inputs, layers.Dense(1, name="out")(x)))
    assert [(rows[n].rf, rows[n].jump) for n in ("c1", "p1", "c2", "skip", "c3", "add", "c4",
                                                 "c5")] == [
        (3, 1), (4, 2), (8, 2), (8, 2), (12, 2), (12, 2), (16, 4), (32, 4)]
    assert rows["c2"].output_size == (16, 16) and rows["c4"].output_size == (8, 8)
    assert rows["gap"].rf is None and rows["out"].rf is None  # the whole image
    assert rows["c1"].macs == 32 * 32 * 3 * 3 * 3 * 8 and rows["p1"].macs == 0
    assert rows["out"].macs == 8


def test_nested_model_is_walked_from_its_input():
    inner_in = keras.Input((16, 16, 4))
    inner = keras.Model(inner_in, layers.Conv2D(4, 3, padding="same", name="ic")(
        layers.MaxPooling2D(2, name="ip")(inner_in)), name="inner")
    x = inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same", name="c1")(x)   # RF 3, jump 2
    x = inner(x)                                                        # 5, jump 4; 13
    rows = by_name(keras.Model(inputs, x))
    assert (rows["inner/ip"].rf, rows["inner/ip"].jump) == (5, 4)
    assert (rows["inner/ic"].rf, rows["inner/ic"].jump) == (13, 4)


def test_sequential_is_walked_and_a_subclassed_model_is_named_not_walked():
    base = build_model("scratch", (32, 32, 3), 1, **SMALL)
    seq = keras.Sequential([keras.Input((32, 32, 3)), base, layers.Activation("sigmoid")])
    rows = by_name(seq)
    assert rows["scratch_cnn/stage2_res0b_conv"].rf == 64

    class Plain(keras.Model):
        def call(self, x):
            return x

    assert layer_geometry(Plain()) == []
    assert "not computed" in format_geometry([])
