"""`python -m research.benchmarks.all`: every ratio benchmark runs, and one table of ratios,
headed by the CPU banner, collects their rows (smoke settings: it measures nothing here)."""

import json
import re
import subprocess
import sys

import pytest

from research.benchmarks import ratios


@pytest.mark.slow
def test_all_benchmarks_print_one_ratio_table(syn, tmp_path):
    out = subprocess.run([sys.executable, "-m", "research.benchmarks.all", f"--data_dir={syn}",
                          "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout[out.stdout.rindex("\nCPU: "):]
    lines = table.strip().splitlines()
    assert lines[0].startswith("CPU: ") and "cores" in lines[0]
    assert lines[1].split()[:3] == ["benchmark", "ratio", "value"]
    rows = {}
    for line in lines[3:-1]:
        rows.setdefault(line.split()[0], []).append(line)
    assert set(rows) == {"input_pipeline", "train_step", "gradcam"}
    measured = ["TFRecord / in-memory input, augment=False", "custom loop / model.fit",
                "fast CNN / scratch CNN", "Grad-CAM scratch: ours(float32) / keras.io loop",
                "scratch: fraction of FP32 peak", "fast: fraction of FP32 peak",
                "gradcam scratch: fraction of FP32 peak"]
    for name in measured:  # the ratio column starts with the name
        line = next((x for x in lines[3:-1] if re.split(r"\s{2,}", x)[1].startswith(name)), None)
        assert line, f"no row {name!r} in\n{table}"
        assert float(re.split(r"\s{2,}", line)[2]) > 0, table  # the value column
    assert lines[-1].startswith("seconds per benchmark:") and "--quick" in lines[-1]


def test_missing_tfrecords_are_a_skipped_row_not_a_failure(tmp_path):
    out = subprocess.run([sys.executable, "-m", "research.benchmarks.all", "--quick",
                          f"--data_dir={tmp_path / 'none'}", "--only=input_pipeline"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipped: no TFRecords in --data_dir=" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "research.benchmarks.all", "--only=nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--only: unknown benchmark(s) ['nope']" in bad.stderr


def test_ratio_rows_round_trip(tmp_path):
    path = tmp_path / "r.json"
    r = ratios.Ratios("demo")
    r.add("a / b", 2.5, ">= 1.0", "note")
    r.add("c / d", None, "", "skipped: why")
    r.write(str(path))
    assert json.loads(path.read_text())["benchmark"] == "demo"
    name, rows = ratios.read(str(path))
    assert name == "demo" and rows[0].value == 2.5 and rows[1].value is None
