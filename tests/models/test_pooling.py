"""Issue 23, the pooling ablation: the scratch network's --downsample choices (sizes and
receptive fields by hand), the default's layers, and --downsample as part of what a run is."""

import json
import os

import pytest

import helpers
from research.model_options import DOWNSAMPLES, model_options_error
from research.models import build_model
from research.models.receptive_field import format_geometry, last_conv, layer_geometry
from research.training import loop, resume

SMALL = {"widths": (8, 16, 32), "res_blocks": (1, 0, 1), "stem_width": 8}


# widths 8,16,32: (RF at the last conv, its map size) per choice, by hand. maxpool and avgpool:
# stem 3, stage0 5 -> pool 6 (j2) -> res 10, 14; stage1 18 -> 20 (j4); stage2 28 -> 32 (j8)
# -> res 48, 64. stride: 3, 5 (j2), 9, 13, 17 (j4), 25 (j8), 41, 57. none: 3 + 2 per conv.
EXPECTED = {"maxpool": (64, (4, 4)), "avgpool": (64, (4, 4)), "stride": (57, (4, 4)),
            "none": (17, (32, 32))}


@pytest.mark.parametrize("downsample", DOWNSAMPLES)
def test_each_downsample_builds_with_the_expected_sizes(downsample):
    model = build_model("scratch", (32, 32, 3), 10, downsample=downsample, **SMALL)
    assert model.output_shape == (None, 10)
    rows = layer_geometry(model)
    end = last_conv(rows)
    assert end.name == "stage2_res0b_conv" and (end.rf, end.output_size) == EXPECTED[downsample]
    sizes = {r.name: r.output_size for r in rows}
    halve = downsample != "none"
    assert [sizes[f"stage{i}_relu"] for i in range(3)] == (
        [(16, 16), (8, 8), (4, 4)] if halve else [(32, 32)] * 3)
    pools = [type(x).__name__ for x in model.layers if "Pooling2D" in type(x).__name__
             and not type(x).__name__.startswith("Global")]
    assert pools == {"maxpool": ["MaxPooling2D"] * 3, "avgpool": ["AveragePooling2D"] * 3
                     }.get(downsample, [])
    strides = [model.get_layer(f"stage{i}_conv").strides for i in range(3)]
    assert strides == [(2, 2) if downsample == "stride" else (1, 1)] * 3
    text = format_geometry(rows)
    assert f"Receptive field at the last conv (stage2_res0b_conv): {EXPECTED[downsample][0]} px" \
        in text


def test_default_downsample_keeps_the_layers_and_the_cost_of_none():
    assert model_options_error("scratch", {"downsample": "blur"})[0] == "downsample"
    names = [x.name for x in build_model("scratch", (32, 32, 3), 1, **SMALL).layers]
    assert names[4:13] == ["stem_relu", "stage0_conv", "stage0_pool", "stage0_bn",
                           "stage0_relu", "stage0_res0a_conv", "stage0_res0a_bn",
                           "stage0_res0a_relu", "stage0_res0b_conv"]
    after = [x.name for x in build_model("scratch", (32, 32, 3), 1, pool_before_bn=False,
                                         **SMALL).layers]
    assert after[5:9] == ["stage0_conv", "stage0_bn", "stage0_relu", "stage0_pool"]
    macs = {d: sum(r.macs for r in layer_geometry(build_model("scratch", (32, 32, 3), 1,
                                                              downsample=d)))
            for d in ("maxpool", "none")}
    assert 17 < macs["none"] / macs["maxpool"] < 18.5  # the option's help says about 18x


@pytest.mark.slow
def test_a_run_recorded_before_downsample_resumes_and_a_change_is_refused(syn, tmp_path):
    def cfg(**options):
        return helpers.tiny_config(syn, tmp_path, train_steps=6, checkpoint_every_steps=3,
                                   steps_per_loop=3, eval_every_steps=100,
                                   model_options={**helpers.TINY_NET, **options})
    loop.train_and_evaluate(helpers.tiny_config(
        syn, tmp_path, train_steps=6, checkpoint_every_steps=3, steps_per_loop=3,
        eval_every_steps=100, stop_at_step=3, model_options=dict(helpers.TINY_NET)))
    path = os.path.join(cfg().run_dir, "config.json")
    with open(path) as f:
        recorded = json.load(f)
    recorded["model_options"].pop("downsample", None)  # as written before the option
    with open(path, "w") as f:
        json.dump(recorded, f)
    assert resume.check_resume(cfg(downsample="maxpool")) == {"stop_at_step": [3, None]}
    with pytest.raises(resume.ResumeMismatchError, match="--downsample: maxpool -> stride"):
        resume.check_resume(cfg(downsample="stride"))
    assert loop.train_and_evaluate(cfg())["final_step"] == 6
