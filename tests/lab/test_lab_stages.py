"""The lab's stage records (research.lab.stages) and the bookkeeping written once for all of
them (research.lab.lab.run_stage): the one list gives --stages its choices and order, the
runner its plan and checks, the report its sections and every stage its settings per
profile; a stage with a key is reused whole from its marker, and runs again when an input
or a figure changed."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

import pytest

from research.lab import profiles, runner
from research.lab.lab import Lab, run_stage
from research.lab.settings import LabError, LabSettings, check
from research.lab.stage import Done, Stage
from research.lab.stages import BY_NAME, CHOICES, STAGES


def test_every_record_names_functions_that_exist_and_stages_it_knows():
    for stage in STAGES:
        for f in (stage.run, stage.key, stage.ready, stage.check, stage.joins,
                  *stage.sections):
            if f is not None:
                module, _, name = f.path.partition(":")
                assert callable(getattr(importlib.import_module(module), name)), f.path
        assert set(stage.needs) <= set(BY_NAME), stage.name
        order = [s.name for s in STAGES]
        assert all(order.index(n) < order.index(stage.name) for n in stage.needs), stage.name
    # --stages: the names and order of before the records (new stages may come between).
    before = ("data", "scratch", "transfer", "compare", "few_labels", "explain", "visualize",
              "photos", "memory_check")
    assert [c for c in CHOICES if c in before] == list(before)
    with pytest.raises(LabError, match="--stages: source_task: choose from data,"):
        check(LabSettings(stages=("source_task",)))


def test_stage_settings_per_profile_quick_and_overrides():
    def settings(**kw):
        return Lab(LabSettings(**kw), "x", "").stage_settings("visualize")

    assert settings() == {"visualize_layers": 2, "num_filters": 16, "filter_steps": 40}
    assert settings(profile="gpu") == {"visualize_layers": 2, "num_filters": 32,
                                       "filter_steps": 60}
    assert settings(profile="gpu", quick=True)["num_filters"] == 8
    assert settings(quick=True, overrides=profiles.Overrides(num_filters=3)) == {
        "visualize_layers": 2, "num_filters": 3, "filter_steps": 10}
    explain = Lab(LabSettings(profile="gpu"), "x", "").stage_settings("explain")
    assert explain["explain_per_class"] == 8 and explain["methods"] == profiles.METHODS


def _toy(calls: list, figure: str, value: dict) -> Stage:
    def run(lab):
        calls.append(1)
        for path in (figure, figure + ".json"):
            with open(path, "w") as f:
                f.write("{}")
        return Done(["python -m toy"], {"n": value["n"]},
                    {"figures": [figure], "files": [figure + ".json"]}, ["a note"])

    return Stage("toy", "A toy stage", run, key=lambda lab: dict(value))


def test_a_keyed_stage_is_reused_until_an_input_or_a_figure_changes(tmp_path):
    lab = Lab(LabSettings(workdir=str(tmp_path)), "x", "")
    calls, figure, value = [], str(tmp_path / "toy.png"), {"n": 1}
    stage = _toy(calls, figure, value)
    first = run_stage(lab, stage)
    assert (len(calls), first.reused, first.title) == (1, False, "A toy stage")
    again = run_stage(lab, stage)
    assert (len(calls), again.reused) == (1, True)
    assert (again.commands, again.flags, again.notes) == (["python -m toy"], {"n": 1},
                                                          ["a note"])
    stored = json.loads(open(lab.record_path("toy")).read())
    assert stored["reused"] is True and stored["ran_seconds"] is not None
    value["n"] = 2  # an input changed
    assert not run_stage(lab, stage).reused and len(calls) == 2
    os.remove(figure)  # a figure is gone
    assert not run_stage(lab, stage).reused and len(calls) == 3
    os.remove(figure + ".json")  # another file it lists
    assert not run_stage(lab, stage).reused and len(calls) == 4
    assert run_stage(lab, stage).reused and len(calls) == 4
    # A marker written before the records ({"key", "outputs"}): reused, its commands and
    # flags from the stage's stored record.
    marker = os.path.join(lab.out_dir("toy"), "done.json")
    with open(marker, "w") as f:
        json.dump({"key": {"n": 2}, "outputs": {"figures": [figure]}}, f)
    old = run_stage(lab, stage)
    assert old.reused and len(calls) == 4 and old.commands == ["python -m toy"]


def test_a_stage_whose_key_is_not_there_yet_runs_and_writes_no_marker(tmp_path):
    lab = Lab(LabSettings(workdir=str(tmp_path)), "x", "")
    calls = []
    stage = Stage("toy", "Toy", lambda lab: calls.append(1) or Done([], {}, {"skipped": "no"}),
                  key=lambda lab: None)
    assert not run_stage(lab, stage).reused and not run_stage(lab, stage).reused
    assert len(calls) == 2 and not os.path.exists(os.path.join(lab.out_dir("toy"), "done.json"))


def test_the_plan_and_the_checks_come_from_the_needs(tmp_path, monkeypatch):
    from research.lab import weights

    def lab_for(stages, w="source_task"):
        return Lab(LabSettings(workdir=str(tmp_path), stages=stages, weights=w), "x", "")

    monkeypatch.setattr(weights, "fetch_imagenet", lambda backbone: None)  # "downloaded"
    # The source task joins the stages that train from its backbone, only those.
    assert runner.plan(lab_for(("transfer", "explain"))) == ["source_task", "transfer",
                                                             "explain"]
    assert runner.plan(lab_for(("compare",))) == ["compare"]
    assert runner.plan(lab_for(("few_labels",), "imagenet")) == ["few_labels"]
    assert runner.plan(lab_for(("memory_check", "data"))) == ["data", "memory_check"]
    # A need left out of --stages must be on disk: the data first, then the runs.
    lab = lab_for(("compare",))
    with pytest.raises(LabError, match=r"--stages: .*cifar10 has no TFRecords yet; include "
                                       r"the data stage$"):
        runner.preflight(lab, ["compare"])
    monkeypatch.setitem(BY_NAME, "data", dataclasses.replace(BY_NAME["data"],
                                                             ready=lambda lab: None))
    with pytest.raises(LabError, match=r"--stages: the finished run lab_scratch is not in "
                                       r".*checkpoints; include the scratch stage$"):
        runner.preflight(lab, ["compare"])
    runner.preflight(lab, ["data", "scratch", "source_task", "transfer", "compare"])


def test_the_report_is_the_records_sections_in_order(tmp_path):
    from research.lab import report

    lab = Lab(LabSettings(workdir=str(tmp_path)), "x", "")
    lab.weights_note = "w"
    md = open(report.write_report(lab, {})[1]).read()
    headings = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    # The sections of before the records, in their order (a new stage's come between).
    before = ["Data", "Training curves", "Comparison on the test set",
              "Few labels: where transfer pays",
              "Errors: confusion matrices, worst false positives and negatives",
              "What the detectors look at", "Inside the networks: activations and filter patterns",
              "Real photos: dogs vs cats", "Reading from disk vs from memory", "Stages"]
    assert [h for h in headings if h in before] == before and headings[-1] == "Stages"


def test_stage_records_are_frozen_plain_values():
    stage = BY_NAME["explain"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.name = "x"
    assert stage.settings_for("cpu", False, profiles.Overrides(explain_per_class=5))[
        "explain_per_class"] == 5
