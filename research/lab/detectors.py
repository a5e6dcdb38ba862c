"""The lab's trainings: the from-scratch detector, the source task (the fallback backbone)
and the transfer detector, each trained (or resumed, or reused when finished) through the
same library calls as the train app, then evaluated on the whole test set as `evaluate`
does."""

from __future__ import annotations

from research import runs
from research.data import pipeline
from research.evaluation import run as scoring
from research.explain.hooks import gradcam_actions
from research.lab.lab import SPLIT, Lab, Preempted, changed_flags, command
from research.lab.settings import LabError
from research.lab.stage import Done
from research.lab.weights import transfer_settings
from research.training import checkpoints, loop, resume
from research.training.actions import best_metric
from research.training.config import TrainConfig, load_run_config
from research.training.preemption import Preemption


def train_config(lab: Lab, key: str, settings: dict) -> TrainConfig:
    s = lab.s
    return TrainConfig(data_dir=s.data_dir, run_name=lab.run_name(key),
                       checkpoint_dir=s.checkpoint_dir, log_dir=s.log_dir,
                       progress=s.progress, **settings)


def finished(cfg: TrainConfig) -> dict | None:
    """The run's summary if it has finished training with these settings (its export
    written), else None. A resume that would change the network or the data is refused
    here, before any work."""
    run = loop.prepare_config(cfg)
    resume.check_resume(run)
    return loop.finished_summary(run)


def train(lab: Lab, cfg: TrainConfig) -> tuple[dict, bool]:
    """(summary, reused): trains or resumes the run, or reuses it when it has finished."""
    summary = finished(cfg)
    if summary is not None:
        return summary, True
    actions = [] if cfg.exclude_classes else gradcam_actions(cfg)  # a source task: no cats
    print(f"[lab] training {cfg.run_name}: {command('research.apps.train', changed_flags(cfg))}",
          flush=True)
    with Preemption() as preemption:
        summary = loop.train_and_evaluate(cfg, actions=actions + [preemption])
    if preemption.stopped_at is not None:
        raise Preempted(preemption.message(cfg, "the same lab command"))
    return summary, False


def evaluate(lab: Lab, run_name: str, figures: bool = True) -> tuple[dict, bool]:
    """(test report, reused): `evaluate --split=test` of the run's best checkpoint, written
    to checkpoints/<run>/eval_test.json with its figures beside it (as `make evaluate`);
    reused when that report scored the same checkpoint."""
    cfg = load_run_config(lab.s.checkpoint_dir, run_name, lab.s.data_dir)
    best = checkpoints.resolve_checkpoint(cfg.run_dir, "best")
    report = scoring.saved_report(cfg, SPLIT, best, figures)
    if report is not None:
        return report, True
    report, _ = scoring.evaluate_and_save(cfg, SPLIT, best, figures=figures,
                                          progress=lab.s.progress, verified=True)
    print(summary_line(report), flush=True)  # the whole report: in the file and the page
    return report, False


def summary_line(report: dict) -> str:
    """One line of a test report for the lab's output."""
    n = f"{report['num_examples']:,} images"
    if report.get("classifier"):
        return (f"[lab] {report['run_name']} on {report['split']} ({n}): "
                f"{report.get('num_classes', '?')}-class accuracy {report['class_accuracy']:.4f}")
    line = (f"[lab] {report['run_name']} on {report['split']} ({n}): ROC-AUC "
            f"{report['roc_auc']:.4f}, PR-AUC {report['pr_auc']:.4f}, F1 {report['f1']:.4f}")
    if report.get("class_accuracy") is not None:
        line += f", {report.get('num_classes', '?')}-class {report['class_accuracy']:.4f}"
    return line


def eval_command(lab: Lab, run_name: str) -> str:
    return command("research.apps.evaluate", {
        "run_name": run_name, "checkpoint_dir": lab.s.checkpoint_dir, "data_dir": lab.s.data_dir,
        "split": SPLIT, "output": runs.eval_report_path(runs.run_dir(lab.s.checkpoint_dir,
                                                                     run_name), SPLIT)})


def run_summary(cfg: TrainConfig, summary: dict, *more: str) -> dict:
    """What the report shows of a run's train_summary.json (a run trained before the summary
    named its best-checkpoint metric has only best_val_pr_auc, which held that metric)."""
    out = {k: summary.get(k) for k in ("final_step", "train_seconds", "best_val_metric",
                                       "best_val", *more)}
    if "best_val_pr_auc" in summary and out["best_val"] is None:
        out["best_val"] = summary["best_val_pr_auc"]
        out["best_val_metric"] = best_metric(cfg, pipeline.load_manifest(cfg.data_dir))
    return out


def resume_notes(*summaries: dict) -> list[str]:
    """Each training interrupted and resumed: its time over all sessions, since the stage's
    wall time is the last session's."""
    notes = []
    for summary in summaries:
        sessions = summary.get("sessions") or []
        if len(sessions) < 2:
            continue
        steps = ", ".join(f"{x['start_step']:,}" for x in sessions[1:])
        run = f"{summary['run_name']}, " if summary.get("run_name") else ""
        notes.append(f"Trained in {len(sessions)} sessions ({run}interrupted, then resumed "
                     f"from its checkpoints at steps {steps}): {summary['train_seconds']:,.1f}"
                     f" s in the train steps in all; the stage's wall time is the last "
                     f"session's.")
    return notes


def detector_stage(lab: Lab, key: str, settings: dict, notes=()) -> Done:
    """Train (or resume, or reuse) one detector, then evaluate it on the whole test set."""
    cfg = train_config(lab, key, settings)
    summary, trained_before = train(lab, cfg)
    report, eval_reused = evaluate(lab, cfg.run_name)
    flags = changed_flags(cfg)
    outputs = {"run_name": cfg.run_name, "run_dir": cfg.run_dir, "tb_dir": cfg.tb_dir,
               "summary": run_summary(cfg, summary, "final_val"),
               "eval": runs.eval_report_path(cfg.run_dir, SPLIT),
               "figures": report.get("figures", [])}
    return Done([command("research.apps.train", flags), eval_command(lab, cfg.run_name)],
                flags, outputs, [*notes, *resume_notes(summary)],
                reused=trained_before and eval_reused,
                ran_seconds=summary.get("train_seconds"))


def stage_scratch(lab: Lab) -> Done:
    return detector_stage(lab, "scratch", lab.profile.scratch)


def stage_source_task(lab: Lab) -> Done:
    """The fallback backbone: a network trained on every class but cat, a plain
    classifier (its final val numbers: N-class and top-5 accuracy)."""
    cfg = train_config(lab, "src_nocat", lab.profile.source_task)
    summary, reused = train(lab, cfg)
    flags = changed_flags(cfg)
    outputs = {"run_name": cfg.run_name, "run_dir": cfg.run_dir, "tb_dir": cfg.tb_dir,
               "summary": run_summary(cfg, summary, "final_val")}
    return Done([command("research.apps.train", flags)], flags, outputs,
                resume_notes(summary), reused=reused, ran_seconds=summary.get("train_seconds"))


def stage_transfer(lab: Lab) -> Done:
    key, settings = transfer_settings(lab)
    return detector_stage(lab, key, settings, notes=[lab.weights_note])


# ----------------------------------------------------------------------------- comparison

def detector_runs(lab: Lab) -> list[str]:
    return [lab.run_name("scratch"), lab.run_name(transfer_settings(lab)[0])]


def _missing_runs(lab: Lab, names) -> str | None:
    missing = [r for r in names if not runs.is_exported(lab.s.checkpoint_dir, r)]
    if missing:
        return f"the finished run {', '.join(missing)} is not in {lab.s.checkpoint_dir}"
    return None


def scratch_ready(lab: Lab) -> str | None:
    return _missing_runs(lab, [lab.run_name("scratch")])


def transfer_ready(lab: Lab) -> str | None:
    return _missing_runs(lab, detector_runs(lab)[1:])


def require_runs(lab: Lab, stage: str, names) -> None:
    missing = [r for r in names if not runs.is_exported(lab.s.checkpoint_dir, r)]
    if missing:
        raise LabError(f"--stages={stage}: needs the finished run(s) {', '.join(missing)} in "
                       f"{lab.s.checkpoint_dir}; run the scratch and transfer stages first")
