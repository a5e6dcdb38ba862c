"""The lab's dataset card stage: per split counts and colour statistics of the lab's
TFRecords, its report section, reused while the TFRecords and its settings stay."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from research.data import pipeline
from research.lab import report
from research.lab.lab import Lab, run_stage
from research.lab.settings import LabSettings
from research.lab.stages import BY_NAME


def test_the_card_counts_and_measures_each_split_and_is_reused(syn, tmp_path):
    lab = Lab(LabSettings(workdir=str(tmp_path), quick=True), "x", "")
    shutil.copytree(syn, lab.s.data_dir)
    rec = run_stage(lab, BY_NAME["card"])
    assert not rec.reused and rec.flags == {"card_images": 200}
    card = json.loads(open(rec.outputs["json"]).read())
    manifest = pipeline.load_manifest(lab.s.data_dir)
    assert [r["split"] for r in card["splits"]] == list(manifest["splits"])
    test = card["splits"][-1]
    assert (test["images"], test["measured"]) == (50, 50)
    x = pipeline.take_examples(lab.s.data_dir, "test")["image"] / 255.0
    np.testing.assert_allclose(test["mean"], x.mean(axis=(0, 1, 2)), atol=1e-4)
    assert run_stage(lab, BY_NAME["card"]).reused
    md = open(report.write_report(lab, {"card": rec})[1]).read()
    assert "## Dataset card" in md and f"| test | 50 | {test['positives']} |" in md
    os.remove(rec.outputs["json"])  # the report says so, and the stage runs again
    md = open(report.write_report(lab, {"card": rec})[1]).read()
    assert "The card stage has not run." in md
    assert not run_stage(lab, BY_NAME["card"]).reused
