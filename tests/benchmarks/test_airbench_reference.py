"""`python -m research.benchmarks.airbench_reference` without torch (the main venv and CI):
one line on how to install the extra, a non-zero exit, and no heavy import before it."""

import subprocess
import sys

import pytest

from research.benchmarks import airbench_reference as ref

HAS_REFERENCE = not ref.missing_reference_packages()


@pytest.mark.skipif(HAS_REFERENCE, reason="torch and airbench are installed here: the command "
                    "would train")
@pytest.mark.parametrize("args", [[], ["--sides=reference"], ["--timing_steps=2"],
                                  ["--sides=", "--parity_steps=2"]])
def test_without_torch_one_line_says_how_to_install_the_extra(args, tmp_path):
    out = subprocess.run([sys.executable, "-m", "research.benchmarks.airbench_reference",
                          f"--results_dir={tmp_path}", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    assert "pip install -e '.[reference]'" in lines[0] and lines[0].startswith("error: ")
    assert not list(tmp_path.iterdir())  # nothing was written


def test_the_check_imports_nothing_heavy():
    code = ("import sys; from research.benchmarks import airbench_reference as r; "
            "r.missing_reference_packages(); "
            "print(sorted(m for m in ('tensorflow', 'keras', 'torch', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _side(accs, tta, seconds):
    lscpu = {"model_name": "AMD EPYC", "AVX2": True, "AVX512F": False}
    return {"per_epoch": [{"epoch": i + 1, "test_acc": a} for i, a in enumerate(accs)],
            "final_tta_acc": tta, "train_seconds": seconds, "img_per_s": 430 * 1024 / seconds,
            "steps": 430, "batch_size": 1024, "epochs": 10.0, "train_splits": ["train"],
            "train_images": 45000, "test_images": 10000, "finished": "2026-12-02 09:00:00 UTC",
            "what": "w", "machine": {"lscpu": lscpu}}


def test_table_merges_a_saved_side_and_says_so():
    results = {"reference": _side([0.5, 0.9], 0.93, 4000.0), "ours": _side([0.4], 0.89, 5000.0)}
    table = ref.format_table(results, ran_now={"ours"}, timing=None)
    lines = table.splitlines()
    assert lines[0].startswith("CPU: ")
    assert "reference: SAVED, reused (not re-run)" in table and "ours: run now" in table
    row = next(x for x in lines if x.startswith("test acc after epoch 2"))
    assert row.split()[-2:] == ["0.9000", "-"]
    row = next(x for x in lines if x.startswith("test acc, final, TTA"))
    assert row.split()[-2:] == ["0.9300", "0.8900"]
    assert "AVX512F no" in table
    only = ref.format_table({"reference": results["reference"]}, ran_now=set(), timing=None)
    assert "ours: no results (run --sides=ours)" in only


# make_net94's state_dict keys, in order, without BN's num_batches_tracked
AIRBENCH94_KEYS = ["0.weight", "0.bias"] + [
    f"{g}.{name}" for g in (2, 3, 4) for i in (1, 2)
    for name in (f"conv{i}.weight", f"norm{i}.weight", f"norm{i}.bias",
                 f"norm{i}.running_mean", f"norm{i}.running_var")] + ["7.weight"]


def _windows(x_nchw, k, pad):
    import numpy as np

    x = np.pad(x_nchw, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # n c h w k k


def test_our_weights_map_onto_make_net94_by_layer_order():
    """Keras HWIO kernels as torch OIHW (checked by a convolution in torch's layout), Dense
    (in, out) as nn.Linear's (out, in), BN's as weight/bias/running_*; no torch needed."""
    import numpy as np

    from research.models import build_model

    model = build_model("fast", (32, 32, 3), 10, widths=(8, 8, 16), logits_bias=False,
                        logits_init="uniform")
    state = ref.airbench_state(model)
    assert list(state) == AIRBENCH94_KEYS
    shapes = {"0.weight": (24, 3, 2, 2), "2.conv1.weight": (8, 24, 3, 3),
              "4.conv1.weight": (16, 8, 3, 3), "4.norm2.running_var": (16,),
              "7.weight": (10, 16)}
    assert {k: state[k].shape for k in shapes} == shapes
    rng = np.random.default_rng(0)
    whiten = model.get_layer("whiten")
    whiten.bias.assign(rng.normal(size=24).astype(np.float32))
    state = ref.airbench_state(model)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    want = whiten(x).numpy().transpose(0, 3, 1, 2)
    got = np.einsum("nchwij,ocij->nohw", _windows(x.transpose(0, 3, 1, 2), 2, 0),
                    state["0.weight"]) + state["0.bias"][None, :, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    x = rng.normal(size=(2, 5, 5, 24)).astype(np.float32)
    want = model.get_layer("group0_conv1")(x).numpy().transpose(0, 3, 1, 2)
    got = np.einsum("nchwij,ocij->nohw", _windows(x.transpose(0, 3, 1, 2), 3, 1),
                    state["2.conv1.weight"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    f = rng.normal(size=(2, 16)).astype(np.float32)
    np.testing.assert_allclose(f @ state["7.weight"].T, model.get_layer("logits")(f).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state["2.norm1.weight"], 1.0)
    grads = {model.get_layer("logits").kernel.path: np.ones((16, 10), np.float32)}
    assert list(ref.airbench_state(model, grads)) == ["7.weight"]
    assert [k for k in state if ref.is_trained(k)][:4] == [
        "0.weight", "0.bias", "2.conv1.weight", "2.norm1.bias"]


def test_our_weights_map_onto_make_net96_with_its_third_conv():
    """lib_airbench96's ConvGroup has conv3/norm3: by layer order, group i's third conv and
    BN are <2 + i>.conv3 and <2 + i>.norm3 (the parity run of --recipe=airbench96)."""
    from research.models import build_model

    model = build_model("fast", (32, 32, 3), 10, widths=(8, 8, 16), group_convs=3,
                        logits_bias=False, logits_init="uniform")
    names = ref.airbench_names(model)
    bn = ("weight", "bias", "running_mean", "running_var")
    assert [k for k, _ in names] == ["0.weight", "0.bias"] + [
        f"{g}.{part}" for g in (2, 3, 4) for i in (1, 2, 3)
        for part in [f"conv{i}.weight"] + [f"norm{i}.{t}" for t in bn]] + ["7.weight"]
    by_name = dict(names)
    assert by_name["3.conv3.weight"] is model.get_layer("group1_conv3").kernel
    assert by_name["4.norm3.bias"] is model.get_layer("group2_3_bn").beta
    assert by_name["2.conv2.weight"] is model.get_layer("group0_conv2").kernel


@pytest.mark.parametrize("model,options", [
    ("fast", {"widths": (8, 8, 16), "logits_bias": True}), ("scratch", {})])
def test_a_network_not_shaped_as_airbench94_is_refused(model, options):
    from research.models import build_model

    with pytest.raises(ValueError):
        ref.airbench_names(build_model(model, (32, 32, 3), 10, **options))


def test_whitening_compared_up_to_each_eigenvectors_sign():
    import numpy as np

    ours = np.random.default_rng(0).normal(size=(6, 3, 2, 2))
    ours[3:] = -ours[:3]
    own = ours.copy()
    own[[1, 4]] = own[[4, 1]]  # eigenvector 1 came out with the other sign
    own[0] *= 1.001
    d = ref.whitening_difference(own, ours)
    assert d["sign_flips"] == 1 and d["worst_filter"] == 0 and d["filters"] == 3
    assert d["max_rel_diff"] == pytest.approx(0.001)


def _parity_side(losses, scale):
    import numpy as np

    w = {"0.weight": np.ones((2, 3, 2, 2)), "7.weight": np.full((10, 4), scale)}
    probe = {"inputs": np.zeros((1, 3, 2, 2)), "logits": np.full((1, 10), scale),
             "loss": losses[0], "grads": {"7.weight": np.full((10, 4), scale)},
             "pool_ties": 0, "pool_maxima": 40}
    return {"losses": losses, "states": [w] * len(losses), "probe": probe,
            "whitening": {"max_rel_diff": 1e-3, "worst_filter": 0, "sign_flips": 0,
                          "filters": 1}}


def test_parity_table_holds_the_target_and_names_the_step():
    ours, theirs = _parity_side([2.3, 2.2, 2.0], 1.0), _parity_side([2.3, 2.2, 2.01], 1.01)
    p = ref.compare_parity(ours, theirs)
    assert p["at_step"] == 3 and p["max_rel_diff"] == pytest.approx(0.01 / 2.01)
    assert not p["meets_target"]
    assert p["before_any_step"]["grad_rel_diff"] == pytest.approx(0.01 / 1.01)
    p.update(steps=3, batch_size=8, what="w", seconds={"ours": 1.0, "airbench": 2.0},
             schedule={"airbench_peak": 0.23, "warmup_steps": 0, "ours_warmup_epochs": 0.1,
                       "steps_per_epoch": 5, "ours_learning_rate": 0.1}, lookahead_every=5,
             machine={"lscpu": {"model_name": "AMD EPYC", "AVX2": True}})
    text = ref.format_parity(p)
    assert "DOES NOT meet the target <= 0.001" in text and "at step 3" in text
    ok = ref.compare_parity(ours, _parity_side([2.3, 2.2, 2.0000001], 1.0))
    assert ok["meets_target"] and ok["before_any_step"]["grad_rel_diff"] == 0


def test_noise_floor_weights_are_one_ulp_apart_and_its_table():
    import numpy as np

    start = {"0.weight": np.ones((4, 3, 2, 2), np.float32),
             "2.conv1.weight": np.random.default_rng(0).normal(size=(8, 4, 3, 3)).astype(
                 np.float32), "2.norm1.bias": np.zeros(8, np.float32)}
    moved = ref.one_ulp_apart(start)
    np.testing.assert_array_equal(moved["0.weight"], start["0.weight"])  # the data's filters
    np.testing.assert_array_equal(moved["2.norm1.bias"], start["2.norm1.bias"])
    w, m = start["2.conv1.weight"], moved["2.conv1.weight"]
    assert (w != m).all() and (np.abs(m - w) == np.spacing(np.abs(w))).mean() > 0.4
    assert (np.abs(m - w) <= np.spacing(np.abs(w)) * 1.0000001).all()
    floor = ref.noise_floor({"losses": [2.0, 1.5, 1.0]}, {"losses": [2.0, 1.5015, 1.0001]})
    assert floor["at_step"] == 2 and floor["max_rel_diff"] == pytest.approx(0.001)
