"""`run_lab`: the stages in order, each reusing its finished output, then the report."""

from __future__ import annotations

import os
import time

from research.lab import stages
from research.lab.settings import LabSettings, check, pick_source

# What each stage reads from the ones before it.
NEEDS_DETECTORS = ("compare", "explain", "visualize")


def plan(lab: stages.Lab) -> list[str]:
    """The stages to run, in order; the source task joins the transfer stage when the
    transfer detector starts from it."""
    out = []
    for name in stages.STAGE_FUNCTIONS:
        if name == "source_task":
            if "transfer" in lab.s.stages and lab.weights == lab.run_name("src_nocat"):
                out.append(name)
        elif name in lab.s.stages:
            out.append(name)
    return out


def preflight(lab: stages.Lab, order: list[str]) -> None:
    """Errors that can be found before any work: foreign TFRecords in the data folder,
    missing runs for the stages that read them."""
    problem = stages.data_mismatch(lab)
    if problem:
        raise stages.LabError(f"data: {problem}")
    if "data" not in order and not os.path.isfile(os.path.join(lab.s.data_dir,
                                                               "manifest.json")):
        raise stages.LabError(f"--stages: {lab.s.data_dir} has no TFRecords yet; include the "
                              "data stage")
    needing = [n for n in order if n in NEEDS_DETECTORS]
    if needing:
        trained = {"scratch": lab.run_name("scratch"),
                   "transfer": stages.detector_runs(lab)[1]}
        missing = [r for k, r in trained.items() if k not in order]
        try:
            stages.require_runs(lab, needing[0], missing)
        except stages.LabError as e:
            raise stages.LabError(f"{e} (or add them to --stages)") from None
    from research.data.imaging import ImageDecodeError

    try:  # an unreadable photo would otherwise surface after the training
        stages.user_images(lab.s.images)
    except (OSError, ImageDecodeError) as e:
        raise stages.LabError(f"--images: {e}") from e


def run_lab(settings: LabSettings, source: str | None = None, source_line: str = ""
            ) -> tuple[str, str]:
    """Runs the asked stages; returns the paths of report.html and report.md."""
    check(settings)
    if source is None:
        source, source_line = pick_source(settings.source, settings.data_dir)
    lab = stages.Lab(settings, source, source_line)
    if "transfer" in settings.stages or any(s in settings.stages for s in NEEDS_DETECTORS):
        stages.resolve_weights(lab)
        print(f"[lab] transfer weights: {lab.weights_note}", flush=True)
    order = plan(lab)
    preflight(lab, order)
    start = time.perf_counter()
    for name in order:
        stages.STAGE_FUNCTIONS[name](lab)
    from research.lab import report

    records = {}
    for name in stages.STAGE_FUNCTIONS:  # this invocation's, else the last one stored
        if name in lab.records:
            records[name] = lab.records[name]
        else:
            old = lab.stored(name)
            if old is not None:
                records[name] = stages.StageRecord(**old)
    if lab.weights is None:  # no stage needed it: say what the stored transfer used
        t = records.get("transfer")
        lab.weights_note = t.notes[0] if t and t.notes else ""
    paths = report.write_report(lab, records)
    print(f"[lab] all stages in {time.perf_counter() - start:.1f}s; report: {paths[0]} "
          f"(and {paths[1]})", flush=True)
    return paths
