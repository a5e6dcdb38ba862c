"""The lab's report: <workdir>/logs/lab/report.html, one self-contained page (every image
embedded as a base64 PNG, no network needed to view it), and report.md beside it (the same
text, images linked as files). Its sections are the stages' (each record's `sections`, in
the lab's order), `(doc, lab, records) -> None`, then the table of the stages."""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import re

from research import files, machine, plots, thresholds
from research.explain import methods
from research.lab import figures, photo_steps
from research.lab.lab import SPLIT
from research.lab.profiles import QUICK_EVAL_FRACTION
from research.lab.stages import STAGES

DASH = "\u2014"
METRIC_NAMES = {"pr_auc": "PR-AUC", "class_accuracy": "class accuracy"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;
margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
table.facts th,table.facts td{text-align:left}table.facts th{font-weight:600;white-space:nowrap}
table.facts td{word-break:break-word}
details{margin:.3em 0}summary{cursor:pointer}
td.cmd{text-align:left;font-family:monospace;font-size:.85em;word-break:break-all;
white-space:pre-wrap}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.quick{background:#fff3cd;border:1px solid #e0c060;padding:.5em .8em}
.note{background:#eef5ff;border:1px solid #9bbbe0;padding:.5em .8em}
"""


class Doc:
    """Builds the HTML page and the markdown file side by side."""

    def __init__(self, md_dir: str):
        self.html: list[str] = []
        self.md: list[str] = []
        self.md_dir = md_dir

    def heading(self, text: str, level: int = 2) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", text.lower().split(":")[0]).strip("-")
        self.html.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
        self.md.append(f"\n{'#' * level} {text}\n")

    def para(self, text: str, cls: str | None = None) -> None:
        attr = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{attr}>{html.escape(text)}</p>")
        self.md.append(("> " if cls else "") + text + "\n")

    def pre(self, text: str) -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md.append(f"```\n{text}\n```\n")

    def table(self, header: list[str], rows: list[list], cmd_cols=(), info: bool = False
              ) -> None:
        """`info`: a table of facts, not of numbers (the report's tests tell them apart)."""
        h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
        body = []
        for row in rows:
            cells = "".join(
                f'<td{" class=cmd" if i in cmd_cols else ""}>{html.escape(str(c))}</td>'
                for i, c in enumerate(row))
            body.append(f"<tr>{cells}</tr>")
        cls = ' class="info"' if info else ""
        self.html.append(f"<table{cls}><thead><tr>{h}</tr></thead><tbody>{''.join(body)}"
                         "</tbody></table>")
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self.md.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "<br>")
                                             for c in row) + " |")
        self.md.append("")

    def facts(self, rows: list[tuple[str, object]], summary: str | None = None) -> None:
        """A key/value table, left-aligned with no header row (markdown: a list), or, given
        a `summary`, the table folded in a <details> block under it (markdown: the summary,
        then `key = value` lines in a fenced block)."""
        body = "".join(f'<tr><th scope="row">{html.escape(str(k))}</th>'
                       f"<td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        table = f'<table class="facts"><tbody>{body}</tbody></table>'
        if summary:
            self.html.append(f"<details><summary>{html.escape(summary)}</summary>{table}"
                             "</details>")
            self.md.append(f"{summary}:\n```\n" + "\n".join(f"{k} = {v}" for k, v in rows)
                           + "\n```\n")
        else:
            self.html.append(table)
            self.md += [f"- **{k}**: " + str(v).replace("\n", " ") for k, v in rows] + [""]

    def image(self, path: str, alt: str) -> None:
        if not path or not os.path.isfile(path):
            self.para(f"({alt}: not available)")
            return
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        self.html.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">')
        self.md.append(f"![{alt}]({os.path.relpath(path, self.md_dir)})\n")

    def write(self, html_path: str, md_path: str, title: str) -> None:
        page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
                + "\n".join(self.html) + "\n</body></html>\n")
        files.write_text(html_path, page, "the lab report")
        files.write_text(md_path, "\n".join(self.md) + "\n", "the lab report")


def best_val(summary: dict) -> str:
    """The best val number a run's best checkpoint was chosen by, and its name."""
    metric = summary.get("best_val_metric")
    return num(summary.get("best_val")) + (f" ({METRIC_NAMES.get(metric, metric)})"
                                           if metric else "")


def num(v, digits: int = 4) -> str:
    if v is None:
        return DASH
    if isinstance(v, (int,)) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def seconds(v) -> str:
    if v is None:
        return DASH
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def flag_value(v) -> str:
    """A stage flag as one reads it: lists comma-joined, mappings and the rest as JSON."""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
        return ",".join(str(x) for x in v)
    return json.dumps(v, default=str)


def _load(path: str) -> dict | None:
    return files.read_json(path) if path and os.path.isfile(path) else None


def data_section(doc: Doc, lab, records: dict) -> None:
    data = records.get("data")
    doc.heading("Data")
    if data:
        doc.pre(data.outputs["summary"])
        doc.image(data.outputs.get("sample_figure"), "train examples by class")
    else:
        doc.para("The data stage has not run.")


def training_section(doc: Doc, lab, records: dict) -> None:
    dets = [records.get(k) for k in ("scratch", "transfer")]
    doc.heading("Training curves")
    runs = {r.outputs["run_name"]: r.outputs["tb_dir"] for r in dets if r}
    src = records.get("source_task")
    if src:
        runs[src.outputs["run_name"] + " (source task, no cats)"] = src.outputs["tb_dir"]
    if runs:
        path = plots.save_figure(figures.tensorboard_curves_figure(
            runs, "Training of the lab's detectors (TensorBoard scalars)"),
            os.path.join(lab.s.lab_dir, "figures", f"{lab.profile.run_prefix}curves.png"))
        doc.image(path, "training curves")
        rows = [[f"{r.outputs['run_name']} ({r.title.lower()})",
                 num(r.outputs["summary"].get("final_step")),
                 seconds(r.outputs["summary"].get("train_seconds")),
                 best_val(r.outputs["summary"])]
                for r in dets + [src] if r]
        doc.table(["run", "steps", "time in train steps", "best val"], rows)
        doc.para("The best checkpoint is chosen by val PR-AUC; the source task has no cats, "
                 "so by its val class accuracy.")
        if src:
            final = src.outputs["summary"].get("final_val") or {}
            doc.para(f"The source task {src.outputs['run_name']} is a plain classifier of every "
                     "class but cat (no positive class: no ROC-AUC, PR-AUC or F1): final val "
                     f"class accuracy {num(final.get('class_accuracy'))}, top-5 accuracy "
                     f"{num(final.get('top5_class_accuracy'))}.")
    else:
        doc.para("No detector has been trained yet.")


def comparison_section(doc: Doc, lab, records: dict) -> None:
    doc.heading("Comparison on the test set")
    comp = records.get("compare")
    result = _load(comp.outputs["json"]) if comp else None
    if result:
        n_cls = result.get("num_classes")
        doc.para(f"{result['num_examples']:,} test images, {result['num_positive']:,} cats. "
                 "Each detector's threshold is chosen on its own val split by its declared "
                 "policy (F1 for the 10% of cats), applied unchanged to test.")
        rows = []
        for name, r in result["runs"].items():
            rows.append([name, num(r["roc_auc"]), num(r["pr_auc"]), num(r["f1"]),
                         num(r["threshold"]), num(r.get("class_accuracy")),
                         num(r["params"]), num(r["trainable_params"]),
                         seconds(r.get("train_seconds"))])
        doc.table(["run", "test ROC-AUC", "test PR-AUC", "F1 at val threshold", "threshold",
                   f"{n_cls}-class accuracy", "parameters", "trainable", "wall time (train)"],
                  rows)
        doc.image(comp.outputs["figure"], "ROC and PR curves of both detectors")
    else:
        doc.para("The compare stage has not run.")


def few_labels_section(doc: Doc, lab, records: dict) -> None:
    doc.heading("Few labels: where transfer pays")
    rec = records.get("few_labels")
    if not rec:
        doc.para("The few-labels stage has not run.")
        return
    o = rec.outputs
    doc.para(f"The lab's scratch recipe and its transfer detector, each trained on "
             f"{o['fraction']:.0%} of the train split (stratified, the same images) for "
             f"{num(o['epochs'], 1)} epochs of it at the same batch size, so at equal steps; "
             "beside them the full-data pair. Every row is scored on the whole test set, "
             "its threshold from its own val split.")
    rows = [[r["run"], r["labels"], num(r["steps"]), num(r["roc_auc"]), num(r["pr_auc"]),
             num(r["f1"]), seconds(r["train_seconds"])] for r in o["rows"] + o["full"]]
    doc.table(["run", "train labels", "steps", "test ROC-AUC", "test PR-AUC",
               "F1 at val threshold", "time in train steps"], rows)
    if o.get("weights_note"):
        doc.para(f"Transfer weights: {o['weights_note']}")


def errors_section(doc: Doc, lab, records: dict) -> None:
    dets = [records.get(k) for k in ("scratch", "transfer")]
    doc.heading("Errors: confusion matrices, worst false positives and negatives")
    for r in dets:
        if not r:
            continue
        for fig in r.outputs.get("figures", []):
            if fig.endswith("_roc_pr.png"):
                continue
            doc.image(fig, f"{r.outputs['run_name']}: {os.path.basename(fig)}")


def _sanity_table(doc: Doc, outputs: dict) -> None:
    """The sanity checks' verdicts (older markers have none)."""
    if not outputs.get("sanity"):
        return
    doc.para(f"Sanity checks (Adebayo et al. 2018) on {outputs['sanity_images']} test images: "
             "every layer with a kernel re-drawn at random from the logits down (cascading); "
             "Spearman rank correlation and SSIM of the map with the original's once the "
             "whole network is random, and of another class's map (random logit, detectors "
             "with two or more outputs). A method passes when Spearman falls below 0.5. "
             "Time: " + ", ".join(f"{r} {seconds(t)}" for r, t in
                                  outputs.get("seconds", {}).get("sanity", {}).items()) + ".")
    rows = []
    for run, per in outputs["sanity"].items():
        for method, checks in per.items():
            for check, v in checks.items():
                rows.append([f"{run}: {methods.display_name(method)}, "
                             f"{check.replace('_', ' ')}: {v['verdict']}",
                             num(v["spearman"]), num(v["ssim"])])
    doc.table(["run: method, check: verdict", "Spearman", "SSIM"], rows)


def explain_section(doc: Doc, lab, records: dict) -> None:
    doc.heading("What the detectors look at")
    exp = records.get("explain")
    if exp:
        doc.para(f"{exp.outputs['num_images']} fixed test images (cats first, then non-cats); "
                 "each map explains the detector's cat score. "
                 + ("Row labels give the top-3 ImageNet classes of VGG16 with its classifier."
                    if exp.outputs.get("top3") else
                    "Titles give each detector's cat probability."))
        for fig in exp.outputs["figures"]:
            doc.image(fig, os.path.basename(fig))
        doc.para("Deletion: pixels removed most-important first, the cat probability should "
                 "fall fast (lower is better). Insertion: pixels restored in the same order "
                 "onto a blurred image, it should rise fast (higher is better). ROAD (Rong et "
                 "al. 2022): 10..90% of the pixels removed and filled by noisy linear "
                 "imputation, most relevant first (MoRF, lower is better) or least relevant "
                 "first (LeRF, higher is better), mean cat probability. MuFidelity: "
                 "correlation of the map's mass on random cells with the probability drop "
                 "when they are zeroed (higher is better). Average drop / increase in "
                 "confidence: the image times its map against the image (Grad-CAM++'s "
                 "measures, %).")
        rows = []
        for run, per in exp.outputs["faithfulness"].items():
            for method, sc in per.items():
                rows.append([f"{run}: {methods.display_name(method)}",
                             num(sc["deletion_auc"]), num(sc["insertion_auc"])]
                            + [num(sc[k]) if k in sc else "" for k in (
                                "road_morf", "road_lerf", "mu_fidelity", "average_drop",
                                "increase_in_confidence")]
                            + [num(sc["num_images"]), num(sc["steps"])])
        doc.table(["run: method", "deletion AUC", "insertion AUC", "ROAD MoRF", "ROAD LeRF",
                   "MuFidelity", "avg drop %", "incr. conf. %", "images", "steps"], rows)
        _sanity_table(doc, exp.outputs)
        for run, fig in exp.outputs.get("mistakes", {}).items():
            if fig:
                doc.para(f"{run}: Grad-CAM of its worst false positives and false negatives "
                         "(the most confident among the first test images, scored as "
                         "predict scores them).")
                doc.image(fig, os.path.basename(fig))
    else:
        doc.para("The explain stage has not run.")


def visualize_section(doc: Doc, lab, records: dict) -> None:
    doc.heading("Inside the networks: activations and filter patterns")
    vis = records.get("visualize")
    if vis:
        for fig in vis.outputs["figures"]:
            doc.image(fig, os.path.basename(fig))
    else:
        doc.para("The visualize stage has not run.")


# The textbook's numbers on 2,000 Kaggle photos (Chollet, Deep Learning with Python, ch. 5:
# 1,000 / 500 / 500 photos per class; accuracy on its held-out photos).
CHOLLET = (("small convnet from scratch", "~0.70"),
           ("small convnet + augmentation + dropout", "~0.82"),
           ("VGG16 (ImageNet) feature extraction + augmentation", "~0.90"),
           ("VGG16 (ImageNet) fine-tuned", "~0.97"))


def photos_section(doc: Doc, lab, records: dict) -> None:
    doc.heading("Real photos: dogs vs cats")
    rec = records.get("photos")
    if rec is None:
        doc.para("The photos stage has not run.")
        return
    o = rec.outputs
    if o.get("skipped"):
        doc.para(f"The photos stage was skipped: {o['skipped'][len('skipped: '):]}.")
        return
    mapped = ", ".join(f"{a} -> {b}" for a, b in o["class_map"].items())
    doc.para(f"{o['source_line']}; TFRecords in {o['data_dir']}. The lab's CIFAR-10 detector "
             f"{o['detector']} (32 px, never trained on a photo) scored zero-shot as p(cat) / "
             f"(p(cat) + p(dog)) (classes mapped {mapped}),"
             f" then fine-tuned on the training photos ({o['run_name']}: the photo recipe, "
             "research/recipes/photos_from_cifar.flags, its head starting at that zero-shot "
             "score). Every row is scored on the same held-out photos, the threshold chosen "
             "on val by the run's declared policy (docs/thresholds.md: accuracy for these "
             "balanced classes); accuracy at that threshold and at 0.5 side by side, and the "
             "expected calibration error of the scores.")
    doc.pre(o["data_summary"])
    rows = [[r["run"], num(r["accuracy"]),
             f"{num(r['threshold'])} ({r.get('threshold_metric') or 'f1'})",
             num(r.get("accuracy_at_0.5")), num(r["roc_auc"]),
             num(r["pr_auc"]), num(r["f1"]), num(r.get("ece")), num(r["num_examples"]),
             seconds(r["train_seconds"])] for r in o["rows"]]
    doc.table(["run", "accuracy at threshold", "threshold (policy)", "accuracy at 0.5",
               "ROC-AUC", "PR-AUC", "F1", "ECE", "test photos", "photo training (s)"], rows)
    for fig in o.get("eval_figures", []):
        if os.path.basename(fig) == thresholds.RELIABILITY_FIGURE.format(split=SPLIT):
            doc.image(fig, "Reliability of the fine-tuned detector's scores on the held-out "
                      "photos")
    doc.para("Beside them, Chollet's chapter-5 numbers (Deep Learning with Python) on 2,000 "
             "Kaggle photos (1,000 / 500 / 500 per class), accuracy on his held-out photos; "
             "his VGG16 rows start from ImageNet weights, which this lab cannot download.")
    doc.table(["textbook setup (Chollet, ch. 5)", "accuracy"], [list(r) for r in CHOLLET])
    doc.para("What else was tried on this detector, one change at a time on the same held-out "
             f"photos (issue 42; measured {photo_steps.MEASURED}, not by this run; "
             "docs/results.md, \"Issue 42, step by step\"):")
    doc.table(list(photo_steps.REPORT_HEADER), photo_steps.report_rows())
    doc.para(f"Not run: {photo_steps.not_run()}.")
    for fig in o["figures"]:
        doc.image(fig, os.path.basename(fig))
    for n in rec.notes:
        doc.para(n, "note")


def memory_section(doc: Doc, lab, records: dict) -> None:
    doc.heading("Reading from disk vs from memory")
    mem = records.get("memory_check")
    if mem:
        o = mem.outputs
        same = "identical" if o["same_batches"] else "DIFFERENT"
        doc.para(f"The same network, seed and steps trained twice: {o['runs']['tfrecords']} "
                 f"from the TFRecords, {o['runs']['memory']} from the whole training split "
                 "held in memory, fed the same batches (the first batches of both streams "
                 f"compared element for element: {same}).")
        rows = [[k, num(v["tfrecords"]), num(v["memory"]), f"{v['difference']:+.4f}"]
                for k, v in o["test"].items()]
        t = o["train_seconds"]
        rows.append(["time in train steps (s)", num(t["tfrecords"], 1), num(t["memory"], 1),
                     f"{(t['memory'] or 0) - (t['tfrecords'] or 0):+.1f}"])
        doc.table(["test metric", "from TFRecords", "from memory", "memory - TFRecords"], rows)
        roc = o["test"].get("roc_auc", {}).get("difference")
        if roc is not None:
            doc.para(f"Difference in test ROC-AUC: {roc:+.4f}"
                     + (" (none: identical results)." if abs(roc) < 1e-12 else
                        "; with identical batches, what remains is the run-to-run noise of "
                        "floating-point reduction order."))
        for n in mem.notes:
            doc.para(n, "note")
    else:
        doc.para("The memory_check stage has not run.")


def _stages_section(doc: Doc, records: dict) -> None:
    doc.heading("Stages")
    rows = []
    for r in records.values():
        rows.append([r.name, "reused" if r.reused else "ran", seconds(r.wall_seconds),
                     seconds(r.ran_seconds), "\n".join(r.commands)])
    doc.table(["stage", "this time", "wall time now", "time when it ran", "command"], rows,
              cmd_cols=(4,), info=True)
    for r in records.values():
        v = r.versions
        doc.para(f"{r.name}: TensorFlow {v.get('tensorflow')}, Keras {v.get('keras')}, Python "
                 f"{v.get('python')}, git {str(v.get('git_commit'))[:10]}"
                 f"{' (dirty)' if v.get('git_dirty') else ''}; {v.get('cpu')}")
        doc.facts([(k, flag_value(x)) for k, x in r.flags.items()] or [("flags", "none")],
                  summary=f"{r.name}: flags")
        for n in r.notes:
            if r.name != "memory_check":
                doc.para(n, "note")


def write_report(lab, records: dict) -> tuple[str, str]:
    """Writes report.html and report.md from the stage records; returns their paths."""
    s, p = lab.s, lab.profile
    out_dir = s.lab_dir
    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    doc = Doc(out_dir)
    title = "Cat-detector lab" + (" (quick)" if p.quick else "")
    doc.heading(title, 1)
    if p.quick:
        doc.para("QUICK RUN (--quick): every stage was shrunk for a smoke test: tiny step "
                 "counts, 5% of the training images for transfer, and val and test scored on "
                 f"{QUICK_EVAL_FRACTION:.0%} of each class (--eval_fraction). These numbers say "
                 "nothing about the detectors.", "quick")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.facts([("written", now), ("profile", p.name + (" + quick" if p.quick else "")),
               ("machine", machine.banner()), ("command", s.command),
               ("workdir", os.path.abspath(s.workdir)), ("data", lab.source_line),
               ("transfer weights", lab.weights_note or DASH)])
    doc.para("TensorBoard shows every run of the lab side by side: "
             f"tensorboard --logdir {s.log_dir}  (then open http://localhost:6006).")

    for stage in STAGES:  # each stage's sections, in the lab's order
        for section in stage.sections:
            section(doc, lab, records)
    _stages_section(doc, records)
    html_path = os.path.join(out_dir, "report.html")
    md_path = os.path.join(out_dir, "report.md")
    doc.write(html_path, md_path, title)
    return html_path, md_path
