"""`python -m research.benchmarks.airbench_reference` without torch (the main venv and CI):
one line on how to install the extra, a non-zero exit, and no heavy import before it."""

import subprocess
import sys

import pytest

from research.benchmarks import airbench_reference as ref

HAS_REFERENCE = not ref.missing_reference_packages()


@pytest.mark.skipif(HAS_REFERENCE, reason="torch and airbench are installed here: the command "
                    "would train")
@pytest.mark.parametrize("args", [[], ["--sides=reference"], ["--timing_steps=2"]])
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


def test_results_json_is_written_atomically_and_read_back(tmp_path):
    path = tmp_path / "sub" / "reference.json"
    ref.write_json_atomic(str(path), {"a": 1})
    ref.write_json_atomic(str(path), {"a": 2})
    assert ref.read_json(str(path)) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["reference.json"]  # no temp file left
    assert ref.read_json(str(tmp_path / "none.json")) is None


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
