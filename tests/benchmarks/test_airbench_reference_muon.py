"""`airbench_reference --recipe=airbench94_muon` without torch: the recipe picks our flag file
and epochs, bad combinations are one line before any work, and the pieces of the parity run
against airbench94_muon.py that need no torch (names, the loader's epochs)."""

import os
import subprocess
import sys

import pytest

from research.benchmarks import airbench_reference as ref
from research.benchmarks import airbench_scripts as scripts
from research.training import recipes

HAS_TORCH = not ref.missing_reference_packages(("torch",))


def _run(tmp_path, *args):
    out = subprocess.run([sys.executable, "-m", "research.benchmarks.airbench_reference",
                          f"--results_dir={tmp_path / 'results'}", *args],
                         capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).strip().splitlines()
    return out.returncode, lines


def test_muon_recipe_picks_our_muon_flag_file_and_its_epochs():
    r = ref.RECIPES["airbench94_muon"]
    assert os.path.abspath(r.flagfile) == recipes.FAST_CIFAR10_MUON
    assert recipes.load_recipe(r.flagfile)["epochs"] == r.epochs == scripts.MUON_EPOCHS
    assert r.script == scripts.MUON_SCRIPT and r.packages == ("torch",)
    assert ref.RECIPES["airbench94"].flagfile.endswith("fast_cifar10.flags")
    assert len({x.results_dir for x in ref.RECIPES.values()}) == len(ref.RECIPES)
    for name in ("airbench95", "airbench96"):  # their flag files' epochs
        r = ref.RECIPES[name]
        assert recipes.load_recipe(r.flagfile)["epochs"] == r.epochs, name


@pytest.mark.parametrize("args,needle", [
    (["--sides=reference"], "--reference_repo"),
    (["--sides=", "--parity_steps=16"], "--reference_repo"),
    (["--sides=reference", "--reference_repo=REPO", "--epochs=10"], "fixed in its main()"),
    (["--timing_steps=3", "--reference_repo=REPO"], "--timing_steps"),
])
def test_muon_recipe_bad_combination_is_one_line(tmp_path, args, needle):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / scripts.MUON_SCRIPT).write_text("")
    args = [a.replace("REPO", str(repo)) for a in args]
    code, lines = _run(tmp_path, "--recipe=airbench94_muon", *args)
    assert code != 0 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert not (tmp_path / "results").exists()


def test_airbench95_reference_side_is_not_there_yet_in_one_line(tmp_path):
    code, lines = _run(tmp_path, "--recipe=airbench95", "--sides=reference")
    assert code != 0 and len(lines) == 1 and "not yet" in lines[0], lines


@pytest.mark.parametrize("args,needle", [
    ([], "needs --reference_repo"),
    (["--reference_repo=REPO"], "lib_airbench96.py not found"),
])
def test_airbench96_parity_needs_the_checkouts_lib_in_one_line(tmp_path, args, needle):
    """--recipe=airbench96's parity runs lib_airbench96.py of a checkout (f1c599c: the one
    airbench96.flags ports, not airbench==0.1.8's)."""
    assert ref.RECIPES["airbench96"].lib_from_repo and ref.RECIPES["airbench95"].lib == "95"
    args = [a.replace("REPO", str(tmp_path)) for a in args]
    code, lines = _run(tmp_path, "--recipe=airbench96", "--sides=", "--parity_steps=2", *args)
    assert code != 0 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0]


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed here: the command would train")
def test_muon_recipe_without_torch_names_only_torch(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / scripts.MUON_SCRIPT).write_text("")
    code, lines = _run(tmp_path, "--recipe=airbench94_muon", "--sides=reference",
                       f"--reference_repo={repo}")
    assert code != 0 and len(lines) == 1, lines
    assert "(missing: torch)" in lines[0]


def test_muon_names_are_cifarnets_state_dict_keys():
    """airbench94's make_net94 keys (what our weights map onto) as airbench94_muon's
    CifarNet names them: whiten, layers.1-3 (ConvGroups after the GELU), head."""
    assert scripts.muon_name("0.weight") == "whiten.weight"
    assert scripts.muon_name("0.bias") == "whiten.bias"
    assert scripts.muon_name("2.conv1.weight") == "layers.1.conv1.weight"
    assert scripts.muon_name("4.norm2.running_var") == "layers.3.norm2.running_var"
    assert scripts.muon_name("7.weight") == "head.weight"


def test_muon_parity_loader_serves_the_batches_over_eight_epochs():
    """main() trains ceil(8 len(loader)) steps, one pass of the loader per epoch: each pass
    serves the next len() batches, and after_step(k) runs before batch k (k > 0)."""
    calls = []
    loader = scripts.MuonParityLoader("images", "normalize", list(range(16)), 2, calls.append)
    assert len(loader) == 2
    served = [b for _ in range(8) for b in loader]
    assert served == list(range(16)) and calls == list(range(1, 16))
    assert list(loader) == []


def test_recipe_speed_table_gives_each_recipes_run_time_and_ratio():
    from research.benchmarks import recipe_speed

    rows = [{"recipe": "a/fast_cifar10.flags", "batch_size": 1024, "run_steps": 430,
             "img_per_s": 200.0, "seconds_per_step": 5.12, "run_train_seconds": 2201.6},
            {"recipe": "a/fast_cifar10_muon.flags", "batch_size": 2000, "run_steps": 176,
             "img_per_s": 190.0, "seconds_per_step": 10.5, "run_train_seconds": 1848.0}]
    text = recipe_speed.format_rows(rows, "CPU")
    assert "fast_cifar10_muon.flags" in text and "0.84" in text and "2202" in text
