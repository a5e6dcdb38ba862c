"""The lab's stages, in the order they run: one function each, in a module of its own. Every
stage first looks at what is already on disk (the manifest, a run's train_summary.json and
export, an eval JSON, the comparison JSON, a done-marker keyed by the runs' exports) and
reuses it when it matches; otherwise it does the work through the same library calls as the
apps. Each returns a `StageRecord` (research.lab.lab)."""

from __future__ import annotations

from research.lab.compare_stage import stage_compare
from research.lab.data_stage import stage_data
from research.lab.detectors import stage_scratch, stage_source_task, stage_transfer
from research.lab.explain_stage import stage_explain
from research.lab.few_labels import stage_few_labels
from research.lab.memory_check import stage_memory_check
from research.lab.photos_stage import stage_photos
from research.lab.visualize_stage import stage_visualize

STAGE_FUNCTIONS = {
    "data": stage_data, "scratch": stage_scratch, "source_task": stage_source_task,
    "transfer": stage_transfer, "compare": stage_compare, "few_labels": stage_few_labels,
    "explain": stage_explain,
    "visualize": stage_visualize, "photos": stage_photos, "memory_check": stage_memory_check,
}
