"""Comparing training runs on one split: a table (markdown and JSON) and their ROC and PR
curves overlaid in one figure.

Each run is scored exactly as `evaluate` scores it (research.evaluation.run.evaluate_run: its
own config, the F1-max threshold of its own val scores applied to the split), and every run
must read the same split (same example count, same shard sha256s), so the rows differ by
model only. Classifiers (no positive class) have no detection columns: their N-class and top-5
accuracy, and a figure of their accuracy per class. Every run's config, checkpoint (read
whole once) and shards are checked before any scoring.

Parameter counts come from the run's export (run.count_params: nothing is run); a run without
an export (unfinished) is counted on the network its config builds, with the trainable flags
it has at build time; `params_source` in the JSON and a note under the table say which.
Training cost comes from train_summary.json: images seen = final_step x batch_size, wall
time = its train_seconds (time in the train steps, all sessions, evaluation excluded).
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import logging
from matplotlib.figure import Figure

import research.models  # noqa: F401  (registers our layers for load_model)
from research import files, plots, runs
from research.data import pipeline
from research import metrics as detmetrics
from research.evaluation import run as scoring
from research.training import checkpoints
from research.training.config import ConfigError, TrainConfig, load_run_config

DASH = "\u2014"  # the table's "not applicable"
EXPORT_KEYS = ("class_names", "positive_class", "image_shape")  # must match the scored data


def _check_arguments(checkpoint_dir: str, names, checkpoint: str,
                     eval_batch_size: int | None) -> None:
    if not names:
        raise ConfigError("--runs: give at least one run name")
    dups = sorted({r for r in names if list(names).count(r) > 1})
    if dups:
        raise ConfigError(f"--runs: {', '.join(dups)} listed more than once")
    if checkpoint not in ("best", "latest") and len(names) > 1:
        raise ConfigError(f"--checkpoint={checkpoint}: a checkpoint path belongs to one run; "
                          "with several --runs use best or latest")
    if eval_batch_size is not None and eval_batch_size < 1:
        raise ConfigError(f"--eval_batch_size: must be positive, got {eval_batch_size}")
    if not os.path.isdir(checkpoint_dir):
        raise ConfigError(f"--checkpoint_dir: {checkpoint_dir} is not a folder")


def _bad_runs(checkpoint_dir: str, what: str) -> ConfigError:
    found = runs.list_runs(checkpoint_dir)
    return ConfigError(f"--runs: {what}; runs in {checkpoint_dir}: "
                       f"{', '.join(found) if found else 'none'}")


def load_runs(checkpoint_dir: str, names, split: str, data_dir: str | None = None,
              checkpoint: str = "best", eval_batch_size: int | None = None) -> list[dict]:
    """Each run's config (with the overrides), checkpoint path, manifest and summary; checks
    all of it, and that all runs read the same `split`, before any scoring."""
    _check_arguments(checkpoint_dir, names, checkpoint, eval_batch_size)
    missing = [r for r in names if not runs.has_config(runs.run_dir(checkpoint_dir, r))]
    if missing:
        raise _bad_runs(checkpoint_dir, f"no training run named {', '.join(missing)}")
    return _check_same_split([_load_run(checkpoint_dir, name, split, data_dir, checkpoint,
                                        eval_batch_size) for name in names], split)


def _load_run(checkpoint_dir, name, split, data_dir, checkpoint, eval_batch_size) -> dict:
    try:
        cfg = load_run_config(checkpoint_dir, name, data_dir, eval_batch_size=eval_batch_size)
        cfg.validate()
    except (ConfigError, runs.RunError) as e:
        raise ConfigError(f"run {name}: {e}") from e
    try:
        path = checkpoints.resolve_checkpoint(cfg.run_dir, checkpoint)  # read whole, once
    except ConfigError as e:
        if checkpoint in ("best", "latest"):
            raise _bad_runs(checkpoint_dir, f"run {name} has no checkpoint ({e})") from e
        raise ConfigError(f"run {name}: {e}") from e
    try:
        manifest = scoring.check_data(cfg, split)
    except pipeline.DataError as e:
        raise pipeline.DataError(f"run {name}: {e}") from e
    try:
        summary = runs.read_summary(cfg.run_dir)
    except runs.RunError as e:
        raise ConfigError(f"run {name}: {e}") from e
    return {"name": name, "cfg": cfg, "checkpoint": path, "manifest": manifest,
            "summary": summary}


def _split_signature(run: dict, split: str) -> tuple:
    s = run["manifest"]["splits"][split]
    return s["num_examples"], tuple(shard["sha256"] for shard in s["shards"])


def _check_same_split(loaded: list[dict], split: str) -> list[dict]:
    first = loaded[0]
    want = _split_signature(first, split)
    for run in loaded[1:]:
        got = _split_signature(run, split)
        if got != want:
            raise pipeline.DataError(
                f"--runs: {first['name']} and {run['name']} read different {split} data "
                f"({first['name']}: {want[0]:,} examples in {first['cfg'].data_dir}; "
                f"{run['name']}: {got[0]:,} examples in {run['cfg'].data_dir}, "
                f"{'other shards' if got[0] == want[0] else 'other count'}); "
                "pass --data_dir to score every run on one folder")
    return loaded


def training_cost(cfg: TrainConfig, summary: dict) -> dict:
    """Images seen, wall time and images/s from train_summary.json (None where it is absent)."""
    step, seconds = summary.get("final_step"), summary.get("train_seconds")
    seen = step * cfg.batch_size if step is not None else None
    return {"final_step": step, "batch_size": cfg.batch_size, "images_seen": seen,
            "train_seconds": seconds,
            "images_per_sec": seen / seconds if seen is not None and seconds else None}


def compare_runs(checkpoint_dir: str, names, split: str, data_dir: str | None = None,
                 checkpoint: str = "best", eval_batch_size: int | None = None,
                 progress: bool = True) -> tuple[dict, dict]:
    """Scores every run on `split`; returns (result, raw arrays by run). `result` is what
    write_table writes: {"split", ..., "runs": {name: evaluate's report + cost + params}}."""
    loaded = load_runs(checkpoint_dir, names, split, data_dir, checkpoint, eval_batch_size)
    extras = {run["name"]: {"data_dir": run["cfg"].data_dir,
                            **scoring.count_params(run["cfg"], run["manifest"]),
                            **training_cost(run["cfg"], run["summary"])} for run in loaded}
    first = loaded[0]
    fractions = {run["name"]: run["cfg"].eval_fraction for run in loaded}
    if len(set(fractions.values())) > 1:  # they would not score the same images
        listed = ", ".join(f"{k} {v}" for k, v in fractions.items())
        raise ConfigError(f"--runs: the runs score different subsets of the split "
                          f"(--eval_fraction: {listed})")
    s = first["manifest"]["splits"][split]
    result = {"split": split, "data_dir": first["cfg"].data_dir,
              "num_examples": s["num_examples"], "num_positive": s["num_positive"],
              "split_size": s["num_examples"], "eval_fraction": first["cfg"].eval_fraction,
              "num_classes": len(first["manifest"]["class_names"]),
              "checkpoint": checkpoint, "runs": {}}
    if not all(run["cfg"].positive_class(run["manifest"]) is None for run in loaded):
        result["threshold_source"] = "each run's val (by its --threshold_metric: the policy column)"
    raw_by_run = {}
    for i, run in enumerate(loaded):
        logging.info("Scoring %s (%d of %d) on %s", run["name"], i + 1, len(loaded), split)
        report, raw = scoring.evaluate_run(run["cfg"], split, run["checkpoint"],
                                           progress=progress, verified=True)
        result["runs"][run["name"]] = {**report, **extras[run["name"]]}
        raw_by_run[run["name"]] = raw
    scored = next(iter(result["runs"].values()))  # the same images for every run
    result["num_examples"], result["num_positive"] = scored["num_examples"], scored.get(
        "num_positive", 0)
    return result, raw_by_run


def check_output_prefix(prefix: str) -> str:
    """Makes the prefix's folder; a bad prefix fails here, before any scoring."""
    if (not prefix or prefix.endswith(("/", os.sep)) or os.path.isdir(prefix)
            or os.path.splitext(prefix)[1] in (".md", ".json", ".png")):
        raise ConfigError(f"--output: want a path prefix without extension such as "
                          f"results/compare (writes .md, .json and .png), got {prefix!r}")
    folder = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output: cannot create {folder}: {e.strerror}") from e
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--output: {folder} is not writable")
    return prefix


def _num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    return f"{v:,.{digits}f}" if digits else f"{round(v):,}"


def format_table(result: dict) -> str:
    """The markdown table: one row per run, then notes on thresholds, costs and counts.
    Detection columns only when a run is a detector; classifiers (no positive class) have
    the N-class and top-5 accuracy."""
    runs = result["runs"]
    detectors = any(not r.get("classifier") for r in runs.values())
    n_cls = any("class_accuracy" in r for r in runs.values())
    detection = ("roc_auc", "pr_auc", "f1", "precision", "recall", "accuracy", "threshold")
    head = ["run"] + (["ROC-AUC", "PR-AUC", "F1", "precision", "recall", "accuracy",
                       "threshold", "policy", "accuracy at 0.5"] if detectors else [])
    head += [f"{result['num_classes']}-class acc", "top-5 acc"] if n_cls else []
    head += ["params", "trainable", "images seen", "wall time (s)", "images/s"]
    what = (f"{result['num_positive']:,} positive; checkpoint {result['checkpoint']}; "
            f"thresholds chosen on {result['threshold_source']}." if detectors else
            f"{result['num_classes']} classes (classifiers: no positive class); checkpoint "
            f"{result['checkpoint']}.")
    subset = (f" (a subset of its {result['split_size']:,}: --eval_fraction="
              f"{result['eval_fraction']})" if result.get("eval_fraction") else "")
    lines = [f"Runs on **{result['split']}** of `{result['data_dir']}`: "
             f"{result['num_examples']:,} images{subset}, {what}", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, r in runs.items():
        row = [name.replace("|", "\\|")]
        row += [_num(r.get(k)) for k in detection] + [
            str(r.get("threshold_metric", "")), _num(r.get("at_0.5", {}).get("accuracy"))
        ] if detectors else []
        row += [_num(r.get("class_accuracy")), _num(r.get("top5_class_accuracy"))] if n_cls \
            else []
        row += [_num(r["params"], 0), _num(r["trainable_params"], 0),
                _num(r["images_seen"], 0), _num(r["train_seconds"], 1),
                _num(r["images_per_sec"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Images seen = final step x batch size; wall time = seconds in the train "
              "steps (train_summary.json, evaluation excluded)."]
    no_summary = [n for n, r in runs.items() if r["final_step"] is None]
    if no_summary:
        lines.append(f"No train_summary.json for {', '.join(no_summary)}: its training cost "
                     "is unknown.")
    from_config = [n for n, r in runs.items() if r["params_source"] != "export"]
    if from_config:
        lines.append(f"Parameters of {', '.join(from_config)} are counted on the network built "
                     "from config.json (no export yet), with its trainable flags as built.")
    return "\n".join(lines) + "\n"


def write_table(result: dict, prefix: str) -> list[str]:
    """<prefix>.md and <prefix>.json; returns their paths."""
    md, js = prefix + ".md", prefix + ".json"
    files.write_text(md, format_table(result), "the comparison table")
    files.write_json(js, result, "the comparison")
    return [md, js]


def roc_pr_overlay_figure(result: dict, raw_by_run: dict):
    """ROC and PR curves of every detector run, overlaid, as a backend-free Figure."""
    fig = Figure(figsize=(11, 4.8))
    roc, pr = fig.subplots(1, 2)
    detectors = [n for n, r in result["runs"].items() if not r.get("classifier")]
    for name in detectors:
        r = result["runs"][name]
        labels, scores = raw_by_run[name]["labels"], raw_by_run[name]["scores"]
        line, = roc.plot(*detmetrics.roc_curve(labels, scores),
                         label=f"{name} (AUC {r['roc_auc']:.4f})")
        pr.plot(*detmetrics.pr_curve(labels, scores), color=line.get_color(),
                label=f"{name} (AP {r['pr_auc']:.4f})")
    roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    roc.legend(loc="lower right", fontsize=8)
    pr.axhline(np.mean(raw_by_run[detectors[0]]["labels"]), color="k", ls=":", lw=0.8)
    pr.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02), title="precision-recall")
    pr.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{result['split']}: {result['num_examples']:,} images "
                 f"({result['num_positive']:,} positive), {len(detectors)} detector(s)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def per_class_figure(result: dict):
    """Classifiers only: each run's accuracy per class, one line per run, as a Figure."""
    fig = Figure(figsize=(11, 4.8))
    ax = fig.subplots()
    names = list(next(iter(result["runs"].values()))["per_class_accuracy"])
    for name, r in result["runs"].items():
        per = r["per_class_accuracy"]
        ax.plot(range(len(names)), [per.get(c, np.nan) for c in names], "o-", markersize=3,
                label=f"{name} ({result['num_classes']}-class acc {r['class_accuracy']:.4f}, "
                      f"top-5 {r['top5_class_accuracy']:.4f})")
    if len(names) <= 20:
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set(xlabel="class" if len(names) <= 20 else "class (in class-id order)",
           ylabel="accuracy", ylim=(-0.02, 1.02), title="accuracy per class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{result['split']}: {result['num_examples']:,} images, "
                 f"{len(result['runs'])} classifier(s)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def write_figure(result: dict, raw_by_run: dict, prefix: str) -> str:
    """<prefix>.png: the overlaid ROC and PR curves (of classifiers only: their accuracy per
    class); returns its path."""
    if all(r.get("classifier") for r in result["runs"].values()):
        return plots.save_figure(per_class_figure(result), prefix + ".png")
    return plots.save_figure(roc_pr_overlay_figure(result, raw_by_run), prefix + ".png")
