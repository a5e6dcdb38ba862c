"""Where a finished run's detector lives: the one spelling of the export path (training writes
it; predict, explain, compare, the lab and transfer from a run read it)."""

from __future__ import annotations

import os


def export_dir(checkpoint_dir: str, run_name: str) -> str:
    """checkpoints/<run>/export: model.keras and metadata.json."""
    return os.path.join(checkpoint_dir, run_name, "export")


def exported_model_path(checkpoint_dir: str, run_name: str) -> str:
    return os.path.join(export_dir(checkpoint_dir, run_name), "model.keras")
