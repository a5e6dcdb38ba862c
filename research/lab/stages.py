"""The lab's stages, in the order they run: one `Stage` record each (research.lab.stage),
the only list of them. `--stages` chooses among them, the runner plans and checks from their
`needs`, the report is their `sections` in this order, and each stage's settings per profile
are in its record. A stage's code is a module of its own (or a few stages' module, as the
detectors'); adding a stage is one module and one record here (docs/extending.md)."""

from __future__ import annotations

from research.lab.profiles import FEW_LABELS, FEW_LABELS_EPOCHS, METHODS
from research.lab.stage import Stage, later


def _report(name: str):
    return later(f"research.lab.report:{name}")


STAGES = (
    Stage("data", "TFRecords", later("research.lab.data_stage:stage_data"),
          sections=(_report("data_section"),),
          ready=later("research.lab.data_stage:data_ready"),
          check=later("research.lab.data_stage:check_data"),
          settings={"cpu": {"shards": {"train": 12, "val": 2, "test": 4}}}),
    Stage("card", "Dataset card", later("research.lab.card_stage:stage_card"),
          sections=(later("research.lab.card_stage:card_section"),), needs=("data",),
          key=later("research.lab.card_stage:card_key"),
          settings={"cpu": {"card_images": 2000}, "gpu": {"card_images": 10000},
                    "quick": {"card_images": 200}}),
    Stage("scratch", "From-scratch detector", later("research.lab.detectors:stage_scratch"),
          needs=("data",), ready=later("research.lab.detectors:scratch_ready")),
    # Not a --stages choice: it runs when the transfer detector starts from it.
    Stage("source_task", "Source task (no cats): the fallback backbone",
          later("research.lab.detectors:stage_source_task"), needs=("data",),
          joins=later("research.lab.weights:starts_from_source_task")),
    Stage("transfer", "Transfer detector", later("research.lab.detectors:stage_transfer"),
          sections=(_report("training_section"),), needs=("data", "source_task"),
          ready=later("research.lab.detectors:transfer_ready")),
    Stage("compare", "Comparison on the test set",
          later("research.lab.compare_stage:stage_compare"),
          sections=(_report("comparison_section"),), needs=("data", "scratch", "transfer")),
    Stage("few_labels", "Few labels: where transfer pays",
          later("research.lab.few_labels:stage_few_labels"),
          sections=(_report("few_labels_section"),), needs=("data", "source_task"),
          settings={"cpu": {"few_labels": FEW_LABELS, "few_labels_epochs": FEW_LABELS_EPOCHS},
                    "quick": {"few_labels_epochs": 2.0}}),
    # The detectors' errors come before what they look at (the explanations' own mistakes
    # figures close that section).
    Stage("explain", "Explanations", later("research.lab.explain_stage:stage_explain"),
          sections=(_report("errors_section"), _report("explain_section")),
          needs=("data", "scratch", "transfer"),
          key=later("research.lab.explain_stage:explain_key"),
          check=later("research.lab.explain_stage:check_images"),
          # Test cats (and as many non-cats) explained, with `faithfulness_steps`
          # deletion/insertion steps.
          settings={"cpu": {"methods": METHODS, "explain_per_class": 4,
                            "faithfulness_steps": 32},
                    "gpu": {"explain_per_class": 8},
                    "quick": {"explain_per_class": 2, "faithfulness_steps": 8}}),
    Stage("visualize", "Activations and filters",
          later("research.lab.visualize_stage:stage_visualize"),
          sections=(_report("visualize_section"),), needs=("data", "scratch", "transfer"),
          key=later("research.lab.visualize_stage:visualize_key"),
          # Activation grids and filter patterns of `visualize_layers` layers per detector.
          settings={"cpu": {"visualize_layers": 2, "num_filters": 16, "filter_steps": 40},
                    "gpu": {"num_filters": 32, "filter_steps": 60},
                    "quick": {"num_filters": 8, "filter_steps": 10}}),
    Stage("photos", "Real photos", later("research.lab.photos_stage:stage_photos"),
          sections=(_report("photos_section"),), needs=("data", "scratch"),
          key=later("research.lab.photos_stage:photos_key")),
    Stage("memory_check", "Reading from disk vs from memory",
          later("research.lab.memory_check:stage_memory_check"),
          sections=(_report("memory_section"),), needs=("data",)),
)

BY_NAME = {s.name: s for s in STAGES}
# What --stages chooses from, in the lab's order.
CHOICES = tuple(s.name for s in STAGES if s.joins is None)
