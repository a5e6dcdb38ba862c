"""`run_lab`: the stages in order, each reusing its finished output, then the report."""

from __future__ import annotations

import time

from research.data.imaging import ImageDecodeError
from research.data.manifest import has_manifest
from research.lab import report
from research.lab.data_stage import data_mismatch
from research.lab.detectors import detector_runs, require_runs
from research.lab.explain_stage import user_images
from research.lab.lab import Lab, StageRecord
from research.lab.settings import LabError, LabSettings, check, pick_source
from research.lab.stages import STAGE_FUNCTIONS
from research.lab.weights import resolve_weights

# What each stage reads from the ones before it.
NEEDS_DETECTORS = ("compare", "explain", "visualize")
# The stages that train from the transfer detector's weights.
NEEDS_WEIGHTS = ("transfer", "few_labels")


def plan(lab: Lab) -> list[str]:
    """The stages to run, in order; the source task joins the transfer and few-labels
    stages when the transfer detector starts from it."""
    out = []
    for name in STAGE_FUNCTIONS:
        if name == "source_task":
            if (any(s in lab.s.stages for s in NEEDS_WEIGHTS)
                    and lab.weights == lab.run_name("src_nocat")):
                out.append(name)
        elif name in lab.s.stages:
            out.append(name)
    return out


def preflight(lab: Lab, order: list[str]) -> None:
    """Errors that can be found before any work: foreign TFRecords in the data folder,
    missing runs for the stages that read them."""
    problem = data_mismatch(lab)
    if problem:
        raise LabError(f"data: {problem}")
    if "data" not in order and not has_manifest(lab.s.data_dir):
        raise LabError(f"--stages: {lab.s.data_dir} has no TFRecords yet; include the data "
                       "stage")
    needing = [n for n in order if n in NEEDS_DETECTORS]
    if needing:
        trained = {"scratch": lab.run_name("scratch"), "transfer": detector_runs(lab)[1]}
        missing = [r for k, r in trained.items() if k not in order]
        try:
            require_runs(lab, needing[0], missing)
        except LabError as e:
            raise LabError(f"{e} (or add them to --stages)") from None
    if "photos" in order and "scratch" not in order:
        try:
            require_runs(lab, "photos", [lab.run_name("scratch")])
        except LabError as e:
            raise LabError(f"{e} (or add scratch to --stages)") from None
    try:  # an unreadable photo would otherwise surface after the training
        user_images(lab.s.images)
    except (OSError, ImageDecodeError) as e:
        raise LabError(f"--images: {e}") from e


def run_lab(settings: LabSettings, source: str | None = None, source_line: str = ""
            ) -> tuple[str, str]:
    """Runs the asked stages; returns the paths of report.html and report.md."""
    check(settings)
    if source is None:
        source, source_line = pick_source(settings.source, settings.data_dir)
    lab = Lab(settings, source, source_line)
    if any(s in settings.stages for s in NEEDS_WEIGHTS + NEEDS_DETECTORS):
        resolve_weights(lab)
        print(f"[lab] transfer weights: {lab.weights_note}", flush=True)
    order = plan(lab)
    preflight(lab, order)
    start = time.perf_counter()
    for name in order:
        STAGE_FUNCTIONS[name](lab)
    records = {}
    for name in STAGE_FUNCTIONS:  # this invocation's, else the last one stored
        if name in lab.records:
            records[name] = lab.records[name]
        else:
            old = lab.stored(name)
            if old is not None:
                records[name] = StageRecord(**old)
    if lab.weights is None:  # no stage needed it: say what the stored transfer used
        t = records.get("transfer")
        lab.weights_note = t.notes[0] if t and t.notes else ""
    paths = report.write_report(lab, records)
    print(f"[lab] all stages in {time.perf_counter() - start:.1f}s; report: {paths[0]} "
          f"(and {paths[1]})", flush=True)
    return paths
