"""The lab's comparison: both detectors on the full test set, as `compare` does; reused when
the comparison on disk scored the same checkpoints."""

from __future__ import annotations

import os

from research import files, runs
from research.evaluation import compare
from research.lab.detectors import detector_runs, require_runs
from research.lab.lab import SPLIT, Lab, command
from research.lab.stage import Done
from research.training import checkpoints


def _best(lab: Lab, run: str) -> str:
    return checkpoints.resolve_checkpoint(runs.run_dir(lab.s.checkpoint_dir, run), "best",
                                          verify=False)


def stage_compare(lab: Lab) -> Done:
    names = detector_runs(lab)
    require_runs(lab, "compare", names)
    prefix = lab.out_dir("compare")
    flags = {"runs": names, "split": SPLIT, "data_dir": lab.s.data_dir,
             "checkpoint_dir": lab.s.checkpoint_dir, "output": prefix}
    reused = False
    if all(os.path.isfile(prefix + ext) for ext in (".md", ".json", ".png")):
        old = files.read_json(prefix + ".json")
        reused = list(old.get("runs", {})) == names and all(
            old["runs"][r].get("checkpoint") == _best(lab, r) for r in names)
    if not reused:
        result, raw = compare.compare_runs(lab.s.checkpoint_dir, names, SPLIT,
                                           data_dir=lab.s.data_dir, progress=lab.s.progress)
        compare.write_table(result, prefix)
        compare.write_figure(result, raw, prefix)
        print(f"[lab] compared {', '.join(names)}: {prefix}.md", flush=True)
    outputs = {"json": prefix + ".json", "markdown": prefix + ".md", "figure": prefix + ".png"}
    return Done([command("research.apps.compare", flags)], flags, outputs, reused=reused)
