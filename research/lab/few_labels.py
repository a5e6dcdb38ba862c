"""Where transfer pays: the lab's scratch recipe and its transfer detector trained side by
side on a few labels (profiles.FEW_LABELS of the train split), at equal steps and batch size
(profiles.few_labels_pair), each scored on the whole test set beside the full-data pair."""

from __future__ import annotations

from research import runs
from research.data import pipeline
from research.lab.detectors import (eval_command, evaluate, resume_notes, run_summary, train,
                                    train_config)
from research.lab.lab import SPLIT, Lab, changed_flags, command
from research.lab.profiles import few_labels_pair
from research.lab.stage import Done
from research.lab.weights import transfer_settings
from research.training import examples
from research.training.state import plan_steps

METRICS = ("roc_auc", "pr_auc", "f1", "class_accuracy")
# Only the pair's test numbers matter: no TensorBoard Grad-CAM, and EVALS validations per run
# (the best checkpoint is chosen among them); flags the lab is given override both.
QUIET = {"gradcam_images": 0}
EVALS = 5


def _row(name: str, labels: str, summary: dict, report: dict) -> dict:
    return {"run": name, "labels": labels, "steps": summary.get("final_step"),
            "train_seconds": summary.get("train_seconds"),
            **{k: report.get(k) for k in METRICS}}


def _full_row(lab: Lab, key: str, labels: str) -> dict | None:
    """The full-data detector's row, when its test report is on disk."""
    name = lab.run_name(key)
    path = runs.eval_report_path(runs.run_dir(lab.s.checkpoint_dir, name), SPLIT)
    report = runs.read_eval_report(path)
    if report is None:
        return None
    summary = runs.read_summary(runs.run_dir(lab.s.checkpoint_dir, name))
    return _row(name, labels, summary, report)


def stage_few_labels(lab: Lab) -> Done:
    key, transfer = transfer_settings(lab)
    pair = lab.stage_settings("few_labels")
    scratch_s, transfer_s = few_labels_pair(pair, lab.profile.scratch, transfer)
    pct = f"{pair['few_labels']:.0%}"
    manifest = pipeline.load_manifest(lab.s.data_dir)
    tcfg = train_config(lab, f"few_{key}", {**QUIET, **transfer_s})
    # Equal steps exactly: the transfer's phases round their steps separately.
    plan = plan_steps(tcfg, manifest, examples.num_examples(tcfg, manifest, "train"))
    every = {"eval_every_steps": -(-plan.total_steps // EVALS)}
    tcfg = train_config(lab, f"few_{key}", {**QUIET, **every, **transfer_s})
    scfg = train_config(lab, "few_scratch", {**QUIET, **every, **scratch_s,
                                             "train_steps": plan.total_steps})
    rows, commands, flags, summaries, reused = [], [], {}, [], True
    for role, cfg in (("scratch", scfg), ("transfer", tcfg)):
        summary, trained_before = train(lab, cfg)
        report, eval_reused = evaluate(lab, cfg.run_name, figures=False)
        reused = reused and trained_before and eval_reused
        n = examples.num_examples(cfg, manifest, "train")
        labels = f"{pct} ({n:,} images)"
        rows.append(_row(cfg.run_name, labels, summary, report))
        summaries.append(summary)
        commands += [command("research.apps.train", changed_flags(cfg)),
                     eval_command(lab, cfg.run_name)]
        flags.update({f"{role} {k}": v for k, v in changed_flags(cfg).items()})
    full = [r for r in (_full_row(lab, "scratch", "100%"), _full_row(lab, key, "100%")) if r]
    outputs = {"rows": rows, "full": full, "fraction": pair["few_labels"],
               "epochs": pair["few_labels_epochs"], "weights_note": lab.weights_note,
               "summaries": [run_summary(c, x) for c, x in zip((scfg, tcfg), summaries)]}
    return Done(commands, flags, outputs, resume_notes(*summaries), reused=reused,
                ran_seconds=sum(s.get("train_seconds") or 0 for s in summaries))
