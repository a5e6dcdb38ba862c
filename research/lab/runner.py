"""`run_lab`: the stages of research.lab.stages in order, each reusing its finished output,
then the report. What runs and what must already be on disk follow from the records'
`needs`."""

from __future__ import annotations

import time

from research.lab import report
from research.lab.lab import Lab, StageRecord, run_stage
from research.lab.settings import LabError, LabSettings, check, pick_source
from research.lab.stages import BY_NAME, STAGES


def plan(lab: Lab) -> list[str]:
    """The stages to run, in order: the asked ones, and a stage that is no --stages choice
    (the source task) when an asked stage needs it and it `joins`."""
    asked = set(lab.s.stages)
    wanted = {n for s in STAGES if s.name in asked for n in s.needs}
    return [s.name for s in STAGES if s.name in asked
            or (s.joins is not None and s.name in wanted and s.joins(lab))]


def _closure(names) -> list:
    """The stages `names` need, and what those need, in the lab's order."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += BY_NAME[name].needs
    return [s for s in STAGES if s.name in found]


def preflight(lab: Lab, order: list[str]) -> None:
    """Errors that can be found before any work: each stage's own checks (foreign TFRecords
    in the data folder, unreadable --images), and the outputs of a needed stage that is not
    in --stages missing from disk."""
    for stage in _closure(order):
        if stage.check is not None:
            stage.check(lab)
    for name in order:
        for need in BY_NAME[name].needs:
            needed = BY_NAME[need]
            if need in order or needed.ready is None:
                continue
            problem = needed.ready(lab)
            if problem:
                raise LabError(f"--stages: {problem}; include the {need} stage")


def run_lab(settings: LabSettings, source: str | None = None, source_line: str = ""
            ) -> tuple[str, str]:
    """Runs the asked stages; returns the paths of report.html and report.md."""
    check(settings)
    if source is None:
        source, source_line = pick_source(settings.source, settings.data_dir)
    lab = Lab(settings, source, source_line)
    order = plan(lab)
    preflight(lab, order)
    start = time.perf_counter()
    for name in order:
        run_stage(lab, BY_NAME[name])
    records = {}
    for stage in STAGES:  # this invocation's, else the last one stored
        if stage.name in lab.records:
            records[stage.name] = lab.records[stage.name]
        else:
            old = lab.stored(stage.name)
            if old is not None:
                records[stage.name] = StageRecord(**old)
    if lab.weights is None:  # no stage needed it: say what the stored transfer used
        t = records.get("transfer")
        lab.weights_note = t.notes[0] if t and t.notes else ""
    paths = report.write_report(lab, records)
    print(f"[lab] all stages in {time.perf_counter() - start:.1f}s; report: {paths[0]} "
          f"(and {paths[1]})", flush=True)
    return paths
