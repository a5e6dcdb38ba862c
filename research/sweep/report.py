"""The study page: `<checkpoint_dir>/<study>_report/report.html` (self-contained, as the
lab's) and report.md: the trials' states, the best trials, Optuna's optimisation history,
parameter importances and parallel coordinates (its matplotlib plots), and, when asked
(`test_top`), `compare` of the best K trials on test: the choice is made on val, test only
reports it."""

from __future__ import annotations

import collections
import os
import warnings

import optuna

from research import plots
from research.lab.report import Doc, num
from research.sweep.study import RUN_ATTR

MIN_TRIALS_FOR_IMPORTANCE = 4


def best_trials(study: optuna.Study, k: int) -> list:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: t.value, reverse=reverse)[:k]


def _figure(doc: Doc, out_dir: str, name: str, alt: str, draw) -> str | None:
    """Draws one of Optuna's matplotlib plots into `name`.png; None, or why it could not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            return str(e).splitlines()[0] if str(e) else type(e).__name__
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    path = os.path.join(out_dir, f"{name}.png")
    fig.set_size_inches(9, 5)
    fig.tight_layout()
    plots.save_figure(fig, path)
    import matplotlib.pyplot as plt  # Optuna draws with pyplot: close what it opened

    plt.close(fig)
    doc.image(path, alt)
    return None


def write_report(study: optuna.Study, checkpoint_dir: str, test_top: int = 0,
                 top: int = 10) -> str:
    """Writes the study page; returns its path."""
    out_dir = os.path.join(checkpoint_dir, f"{study.study_name}_report")
    os.makedirs(out_dir, exist_ok=True)
    doc = Doc(out_dir)
    doc.heading(f"Study {study.study_name}", 1)
    states = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
    doc.facts([("direction", study.direction.name.lower()),
               ("metric", study.user_attrs.get("metric", "best_val")),
               ("space", study.user_attrs.get("space", "")),
               ("fixed train flags", study.user_attrs.get("fixed", "")),
               ("trials", ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))])
    best = best_trials(study, top)
    doc.heading("Best trials (val)")
    if best:
        names = sorted({k for t in best for k in t.params})
        doc.table(["trial", "run", "val", *[f"--{n}" for n in names]],
                  [[t.number, t.user_attrs.get(RUN_ATTR, "")
                    + (" (baseline: the fixed flags)" if t.user_attrs.get("baseline") else ""),
                    num(t.value), *[t.params.get(n, "") for n in names]] for t in best])
    else:
        doc.para("No trial has completed yet.")
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    if pruned:
        doc.heading("Pruned trials")
        doc.table(["trial", "run", "pruned at step", "last val reported"],
                  [[t.number, t.user_attrs.get(RUN_ATTR, ""), t.last_step,
                    num(t.intermediate_values.get(t.last_step))] for t in pruned])
    doc.heading("Optimisation history")
    note = _figure(doc, out_dir, "history", "optimisation history",
                   lambda: optuna.visualization.matplotlib.plot_optimization_history(study))
    if note:
        doc.para(f"(not drawn: {note})")
    doc.heading("Parameter importances")
    if len(best) < MIN_TRIALS_FOR_IMPORTANCE:
        doc.para(f"Skipped: {len(best)} complete trial(s); importances need at least "
                 f"{MIN_TRIALS_FOR_IMPORTANCE}.")
    else:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        note = _figure(doc, out_dir, "importances", "parameter importances (PED-ANOVA)",
                       lambda: optuna.visualization.matplotlib.plot_param_importances(
                           study, evaluator=evaluator))
        if note:
            doc.para(f"(not drawn: {note})")
    doc.heading("Parallel coordinates")
    note = _figure(doc, out_dir, "parallel", "parallel coordinates",
                   lambda: optuna.visualization.matplotlib.plot_parallel_coordinate(study))
    if note:
        doc.para(f"(not drawn: {note})")
    if test_top:
        _test_section(doc, study, checkpoint_dir, best[:test_top], out_dir)
    path = os.path.join(out_dir, "report.html")
    doc.write(path, os.path.join(out_dir, "report.md"), f"Study {study.study_name}")
    return path


def _test_section(doc: Doc, study, checkpoint_dir: str, trials: list, out_dir: str) -> None:
    from research.evaluation import compare  # scores on test: only when asked

    names = [t.user_attrs[RUN_ATTR] for t in trials]
    doc.heading(f"The best {len(names)} on test")
    doc.para("Chosen on val; test only reports them.")
    result, raw = compare.compare_runs(checkpoint_dir, names, "test")
    prefix = os.path.join(out_dir, "test_top")
    compare.write_table(result, prefix)
    doc.pre(compare.format_table(result))
    doc.image(compare.write_figure(result, raw, prefix), "the best trials on test")
