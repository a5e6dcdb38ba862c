"""The lab's stages, one function each. Every stage first looks at what is already on disk
(the manifest, a run's train_summary.json and export, an eval JSON, the comparison JSON, a
done-marker keyed by the runs' exports) and reuses it when it matches; otherwise it does the
work through the same library calls as the apps. Each returns a `StageRecord`, also kept in
<workdir>/logs/lab/stages/ so that a later invocation's report can show it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time

import numpy as np
from absl import logging

from research import machine, plots
from research.data import pipeline
from research.data.manifest import sha256_file
from research.runs import exported_model_path
from research.lab import memory_check
from research.lab.profiles import LabProfile
from research.lab.settings import LabError, LabSettings
from research.training.config import TrainConfig

SPLIT = "test"


@dataclasses.dataclass
class StageRecord:
    name: str
    title: str
    commands: list
    flags: dict
    reused: bool
    wall_seconds: float          # this invocation
    ran_seconds: float | None    # when the stage did its work
    versions: dict
    outputs: dict
    notes: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Lab:
    """One invocation: the settings, the profile, and the records of the stages run."""

    def __init__(self, settings: LabSettings, source: str, source_line: str):
        self.s, self.source, self.source_line = settings, source, source_line
        self.profile: LabProfile = settings.lab_profile()
        self.records: dict[str, StageRecord] = {}
        self._versions = None
        self.weights, self.weights_note = None, ""

    @property
    def versions(self) -> dict:
        if self._versions is None:
            self._versions = machine.versions()
        return self._versions

    def run_name(self, key: str) -> str:
        return self.profile.run_prefix + key

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.s.lab_dir, "stages")

    def record_path(self, stage: str) -> str:
        return os.path.join(self.stage_dir, f"{self.profile.run_prefix}{stage}.json")

    def stored(self, stage: str) -> dict | None:
        path = self.record_path(stage)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def save(self, rec: StageRecord) -> StageRecord:
        os.makedirs(self.stage_dir, exist_ok=True)
        with open(self.record_path(rec.name), "w") as f:
            json.dump(rec.to_json(), f, indent=1)
        self.records[rec.name] = rec
        return rec

    def finish(self, name, title, start, reused, commands, flags, outputs, notes=(),
               ran_seconds=None) -> StageRecord:
        """The stage's record: a reused stage keeps the versions and time of the run that
        did the work."""
        wall = time.perf_counter() - start
        before = self.stored(name) if reused else None
        versions = (before or {}).get("versions") or self.versions
        ran = (before or {}).get("ran_seconds") if reused else wall
        if ran is None:
            ran = ran_seconds
        rec = StageRecord(name, title, list(commands), flags, reused, round(wall, 1),
                          None if ran is None else round(ran, 1), versions, outputs,
                          list(notes))
        word = "reused" if reused else "done"
        print(f"[lab] {name}: {word} in {wall:.1f}s", flush=True)
        return self.save(rec)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def changed_flags(cfg: TrainConfig) -> dict:
    """The train flags that differ from TrainConfig's defaults, plus the model options."""
    defaults = TrainConfig()
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("flag", True) is False:
            continue
        v = getattr(cfg, f.name)
        if v != getattr(defaults, f.name):
            out[f.name] = v
    out.update(cfg.model_options)
    return out


def command(module: str, flags: dict) -> str:
    return " ".join(["python -m " + module] +
                    [shlex.quote(f"--{k}={_fmt(v)}") for k, v in flags.items()])


# ------------------------------------------------------------------------------------ data

def _same_source(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def data_wanted(lab: Lab) -> dict:
    from research.data.tfrecords import WriteConfig

    w = WriteConfig(out_dir=lab.s.data_dir)
    return {"source": lab.source, "positive_class": w.positive_class, "seed": w.seed,
            "val_fraction": w.val_fraction, "shards": dict(lab.profile.shards)}


def data_mismatch(lab: Lab) -> str | None:
    """Why the existing TFRecords are not the ones this lab asks for (None: they are, or
    there are none)."""
    path = os.path.join(lab.s.data_dir, "manifest.json")
    if not os.path.isfile(path):
        return None
    m = pipeline.load_manifest(lab.s.data_dir)
    want = data_wanted(lab)
    have = {"source": m["source"], "positive_class": m["positive_class"], "seed": m["seed"],
            "val_fraction": m["val_fraction"],
            "shards": {k: len(v["shards"]) for k, v in m["splits"].items()}}
    diffs = [f"{k} {have[k]!r} (wanted {want[k]!r})" for k in want
             if (not _same_source(have[k], want[k]) if k == "source" else have[k] != want[k])]
    if not diffs:
        return None
    return (f"{lab.s.data_dir} holds other TFRecords: {'; '.join(diffs)}; remove the folder "
            "to rebuild it, or give another --workdir")


def sample_figure(data_dir: str, per_class: int = 6):
    """The first `per_class` train images of every class, one row per class."""
    manifest = pipeline.load_manifest(data_dir)
    names = manifest["class_names"]
    batch = pipeline.take_examples(data_dir, "train", per_class * len(names) * 3)
    images, titles = [], []
    for c, name in enumerate(names):
        idx = np.flatnonzero(batch["class_id"] == c)[:per_class]
        for i in idx:
            images.append(batch["image"][i])
            titles.append(name + (" (positive)" if name == manifest["positive_class"] else ""))
    return plots.image_grid(images, titles, ncols=per_class, cell=1.2,
                            title=f"{manifest['source']}: train examples by class "
                                  f"(positive class: {manifest['positive_class']})")


def stage_data(lab: Lab) -> StageRecord:
    from research.data import sources, tfrecords

    start = time.perf_counter()
    s, want = lab.s, data_wanted(lab)
    flags = {"source": lab.source, "out_dir": s.data_dir, "download_dir": s.download_dir,
             **{f"{k}_shards": v for k, v in want["shards"].items()}}
    reused = os.path.isfile(os.path.join(s.data_dir, "manifest.json"))
    problem = data_mismatch(lab)
    if problem:
        raise LabError(f"data: {problem}")
    if not reused:
        data = sources.load_source(lab.source, download_dir=s.download_dir)
        cfg = tfrecords.WriteConfig(out_dir=s.data_dir, shards=dict(want["shards"]))
        tfrecords.write_tfrecords(data, cfg, lab.source, {k: v for k, v in flags.items()
                                                          if k != "out_dir"})
    manifest = pipeline.load_manifest(s.data_dir)
    fig_path = os.path.join(s.lab_dir, "figures", "data_samples.png")
    if not os.path.isfile(fig_path) or not reused:
        os.makedirs(os.path.dirname(fig_path), exist_ok=True)
        plots.save_figure(sample_figure(s.data_dir), fig_path)
    outputs = {"data_dir": s.data_dir, "summary": tfrecords.summary_table(manifest),
               "sample_figure": fig_path, "source_line": lab.source_line}
    return lab.finish("data", "TFRecords", start, reused,
                      [command("research.apps.make_tfrecords", flags)], flags, outputs)


# -------------------------------------------------------------------------------- training

def train_config(lab: Lab, key: str, settings: dict) -> TrainConfig:
    s = lab.s
    return TrainConfig(data_dir=s.data_dir, run_name=lab.run_name(key),
                       checkpoint_dir=s.checkpoint_dir, log_dir=s.log_dir,
                       progress=s.progress, **settings)


def finished(cfg: TrainConfig) -> dict | None:
    """The run's summary if it has finished training with these settings (its export
    written), else None. A resume that would change the network or the data is refused
    here, before any work."""
    from research.training import faults, inputs, record
    from research.training.loop import prepare_config
    from research.training.state import plan_steps

    run = prepare_config(cfg)
    faults.check_resume(run)
    summary = record.read_summary(run)
    export = exported_model_path(run.checkpoint_dir, run.run_name)
    if not summary or not os.path.isfile(export):
        return None
    manifest = pipeline.load_manifest(run.data_dir)
    plan = plan_steps(run, manifest, inputs.num_examples(run, manifest, "train"))
    done = summary.get("final_step", -1) >= plan.total_steps or summary.get("stopped_early")
    return summary if done else None


def train(lab: Lab, cfg: TrainConfig) -> tuple[dict, bool]:
    """(summary, reused): trains or resumes the run, or reuses it when it has finished."""
    from research.training import faults
    from research.training.loop import train_and_evaluate

    summary = finished(cfg)
    if summary is not None:
        return summary, True
    actions = []
    if not cfg.exclude_classes:  # a source task has no cats to map
        from research.explain.hooks import gradcam_actions

        actions += gradcam_actions(cfg)
    print(f"[lab] training {cfg.run_name}: {command('research.apps.train', changed_flags(cfg))}",
          flush=True)
    with faults.Preemption() as preemption:
        summary = train_and_evaluate(cfg, actions=actions + [preemption])
    if preemption.stopped_at is not None:
        raise Preempted(preemption.message(cfg, "the same lab command"))
    return summary, False


class Preempted(RuntimeError):
    """A signal ended a training run resumably; the same lab command resumes it."""


def evaluate(lab: Lab, run_name: str, figures: bool = True) -> tuple[dict, bool]:
    """(test report, reused): `evaluate --split=test` of the run's best checkpoint, written
    to checkpoints/<run>/eval_test.json with its figures beside it (as `make evaluate`)."""
    from research.training import evaluation
    from research.training.config import load_run_config

    cfg = load_run_config(lab.s.checkpoint_dir, run_name)
    cfg.checkpoint_dir, cfg.run_name = lab.s.checkpoint_dir, run_name
    cfg.data_dir = lab.s.data_dir
    out = os.path.join(cfg.run_dir, f"eval_{SPLIT}.json")
    best = evaluation.resolve_checkpoint(cfg, "best")
    if os.path.isfile(out):
        with open(out) as f:
            report = json.load(f)
        if report.get("checkpoint") == best and all(
                os.path.isfile(p) for p in report.get("figures", [])) and (
                report.get("figures") or not figures):
            return report, True
    report, raw = evaluation.evaluate_run(cfg, SPLIT, "best", progress=lab.s.progress)
    if figures:
        report["figures"] = evaluation.write_figures(
            cfg, report, raw, os.path.join(cfg.run_dir, f"figures_{SPLIT}"))
    evaluation.save_report(report, out)
    print(evaluation.format_report(report), flush=True)
    return report, False


def _eval_command(lab: Lab, run_name: str) -> str:
    return command("research.apps.evaluate", {
        "run_name": run_name, "checkpoint_dir": lab.s.checkpoint_dir, "data_dir": lab.s.data_dir,
        "split": SPLIT, "output": os.path.join(lab.s.checkpoint_dir, run_name,
                                               f"eval_{SPLIT}.json")})


def run_summary(cfg: TrainConfig, summary: dict, *more: str) -> dict:
    """What the report shows of a run's train_summary.json (a run trained before the summary
    named its best-checkpoint metric has only best_val_pr_auc, which held that metric)."""
    from research.training.actions import best_metric

    out = {k: summary.get(k) for k in ("final_step", "train_seconds", "best_val_metric",
                                       "best_val", *more)}
    if "best_val_pr_auc" in summary and out["best_val"] is None:
        out["best_val"] = summary["best_val_pr_auc"]
        out["best_val_metric"] = best_metric(
            cfg, pipeline.load_manifest(cfg.data_dir)["positive_class"])
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


def detector_stage(lab: Lab, name: str, title: str, key: str, settings: dict,
                   notes=()) -> StageRecord:
    """Train (or resume, or reuse) one detector, then evaluate it on the whole test set."""
    start = time.perf_counter()
    cfg = train_config(lab, key, settings)
    summary, trained_before = train(lab, cfg)
    report, eval_reused = evaluate(lab, cfg.run_name)
    flags = changed_flags(cfg)
    outputs = {"run_name": cfg.run_name, "run_dir": cfg.run_dir, "tb_dir": cfg.tb_dir,
               "summary": run_summary(cfg, summary, "final_val"),
               "eval": os.path.join(cfg.run_dir, f"eval_{SPLIT}.json"),
               "figures": report.get("figures", [])}
    return lab.finish(name, title, start, trained_before and eval_reused,
                      [command("research.apps.train", flags), _eval_command(lab, cfg.run_name)],
                      flags, outputs, [*notes, *resume_notes(summary)],
                      ran_seconds=summary.get("train_seconds"))


def stage_scratch(lab: Lab) -> StageRecord:
    return detector_stage(lab, "scratch", "From-scratch detector", "scratch",
                          lab.profile.scratch)


def stage_source_task(lab: Lab) -> StageRecord:
    """The fallback backbone: the scratch network trained on every class but cat."""
    start = time.perf_counter()
    cfg = train_config(lab, "src_nocat", lab.profile.source_task)
    summary, reused = train(lab, cfg)
    flags = changed_flags(cfg)
    outputs = {"run_name": cfg.run_name, "run_dir": cfg.run_dir, "tb_dir": cfg.tb_dir,
               "summary": run_summary(cfg, summary)}
    return lab.finish("source_task", "Source task (no cats): the fallback backbone", start,
                      reused, [command("research.apps.train", flags)], flags, outputs,
                      resume_notes(summary), ran_seconds=summary.get("train_seconds"))


# ------------------------------------------------------------------------ transfer weights

def imagenet_file(backbone: str = "vgg16") -> str:
    from research.models import backbones

    return os.path.join(backbones.keras_models_dir(), backbones.BACKBONES[backbone].weights_file)


def fetch_imagenet(backbone: str) -> None:
    """Gets the backbone's ImageNet weights into Keras' cache (a download when they are not
    there); BackboneError names the file and the folder when that fails."""
    from research.models import backbones

    backbones.build_base(backbone, backbones.TransferOptions(weights="imagenet"),
                         (backbones.BACKBONES[backbone].min_size,) * 2 + (3,))


def resolve_weights(lab: Lab) -> None:
    """Sets lab.weights (imagenet, a .h5 file, or the source-task run) and the note the
    report shows; --weights=imagenet without the file and without network stops here."""
    mode = lab.s.weights
    backbone = lab.profile.transfer_imagenet["model"]
    path = imagenet_file(backbone)
    if mode.endswith(".h5"):
        lab.weights, lab.weights_note = mode, f"{backbone} weights from {mode} (--weights)"
        return
    if mode == "source_task":
        lab.weights = lab.run_name("src_nocat")
        lab.weights_note = (f"--weights=source_task: the transfer detector starts from the "
                            f"source-task backbone {lab.weights} (the scratch network trained "
                            "without cats, a stage of its own)")
        return
    from research.models.backbones import BackboneError

    have = os.path.isfile(path)
    try:
        if not have:
            fetch_imagenet(backbone)  # --weights=imagenet stops here with the file's name
        lab.weights = "imagenet"
        lab.weights_note = (f"ImageNet weights of {backbone}: {path}" +
                            ("" if have else " (downloaded now into Keras' cache)"))
        return
    except BackboneError:
        if mode == "imagenet":
            raise
    lab.weights = lab.run_name("src_nocat")
    lab.weights_note = (f"Fallback: the ImageNet weights of {backbone} could not be had "
                        f"({os.path.basename(path)} is not in {os.path.dirname(path)}/ and "
                        f"could not be downloaded), so the transfer detector starts from the "
                        f"source-task backbone {lab.weights}: the scratch network trained on "
                        "the 9 other classes, a stage of its own.")


def transfer_settings(lab: Lab) -> tuple[str, dict]:
    settings = lab.profile.transfer(lab.weights)
    recipe = f"{settings['model']}_{settings.get('transfer', 'none')}"
    if lab.weights == "imagenet":
        key = f"transfer_{recipe}_imagenet"
    elif lab.weights.endswith(".h5"):
        key = f"transfer_{recipe}_file"
    else:
        key = f"transfer_{recipe}_src"
    return key, settings


def stage_transfer(lab: Lab) -> StageRecord:
    key, settings = transfer_settings(lab)
    return detector_stage(lab, "transfer", "Transfer detector", key, settings,
                          notes=[lab.weights_note])


# ----------------------------------------------------------------------------- comparison

def detector_runs(lab: Lab) -> list[str]:
    return [lab.run_name("scratch"), lab.run_name(transfer_settings(lab)[0])]


def require_runs(lab: Lab, stage: str, runs) -> None:
    missing = [r for r in runs if not os.path.isfile(
        exported_model_path(lab.s.checkpoint_dir, r))]
    if missing:
        raise LabError(f"--stages={stage}: needs the finished run(s) {', '.join(missing)} in "
                       f"{lab.s.checkpoint_dir}; run the scratch and transfer stages first")


def _best(lab: Lab, run: str) -> str:
    from research.training import evaluation
    from research.training.config import load_run_config

    cfg = load_run_config(lab.s.checkpoint_dir, run)
    cfg.checkpoint_dir, cfg.run_name = lab.s.checkpoint_dir, run
    return evaluation.resolve_checkpoint(cfg, "best")


def stage_compare(lab: Lab) -> StageRecord:
    from research.training import compare

    start = time.perf_counter()
    runs = detector_runs(lab)
    require_runs(lab, "compare", runs)
    prefix = os.path.join(lab.s.lab_dir, f"{lab.profile.run_prefix}compare")
    flags = {"runs": runs, "split": SPLIT, "data_dir": lab.s.data_dir,
             "checkpoint_dir": lab.s.checkpoint_dir, "output": prefix}
    reused = False
    if all(os.path.isfile(prefix + ext) for ext in (".md", ".json", ".png")):
        with open(prefix + ".json") as f:
            old = json.load(f)
        reused = list(old.get("runs", {})) == runs and all(
            old["runs"][r].get("checkpoint") == _best(lab, r) for r in runs)
    if not reused:
        result, raw = compare.compare_runs(lab.s.checkpoint_dir, runs, SPLIT,
                                           data_dir=lab.s.data_dir, progress=lab.s.progress)
        compare.write_table(result, prefix)
        compare.write_figure(result, raw, prefix)
        print(compare.format_table(result), flush=True)
    outputs = {"json": prefix + ".json", "markdown": prefix + ".md", "figure": prefix + ".png"}
    return lab.finish("compare", "Comparison on the full test set", start, reused,
                      [command("research.apps.compare", flags)], flags, outputs)


# ----------------------------------------------------------------------------- explanations

def export_key(lab: Lab, runs) -> dict:
    return {r: sha256_file(exported_model_path(lab.s.checkpoint_dir, r))
            for r in runs}


def _marker(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def fixed_examples(lab: Lab) -> dict:
    """The same test cats and non-cats for every detector: the first of each in split
    order."""
    return pipeline.take_examples(lab.s.data_dir, SPLIT, 2 * lab.profile.explain_per_class,
                                  filter="balanced")


def user_images(paths) -> list[tuple[str, np.ndarray]]:
    from research.data.imaging import decode_image

    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append((os.path.basename(path), decode_image(f.read(), path)))
    return out


def load_detector(lab: Lab, run: str):
    from research.explain import loading

    ex, meta = loading.load_run(lab.s.checkpoint_dir, run, "float32")
    positive = meta["positive_class"]
    index = ex.class_names.index(positive) if positive in (ex.class_names or []) else 0
    return ex, meta, index


def imagenet_top3(lab: Lab, images: np.ndarray) -> list[str] | None:
    """Top-3 ImageNet classes of the full VGG16 (with its classifier) when the transfer
    detector is an ImageNet model and those weights are at hand; else None."""
    if lab.weights != "imagenet":
        return None
    from research.explain import loading

    if not os.path.isfile(os.path.join(loading.keras_models_dir(),
                                       loading.KERAS_WEIGHTS["vgg16"])):
        return None
    from keras.applications.imagenet_utils import decode_predictions

    from research.data.imaging import resize_image

    ex = loading.load_application("vgg16", "imagenet", "float32")
    big = np.stack([resize_image(np.asarray(i, np.uint8), ex.input_size, "stretch")
                    for i in images]).astype(np.float32)
    probs = ex.probabilities(np.asarray(ex.logits(big)))
    return [", ".join(f"{n} {p:.2f}" for _, n, p in row)
            for row in decode_predictions(probs, top=3)]


def stage_explain(lab: Lab) -> StageRecord:
    from research.explain import core, faithfulness
    from research.data.imaging import resize_image
    from research.lab import figures

    start = time.perf_counter()
    runs = detector_runs(lab)
    require_runs(lab, "explain", runs)
    out_dir = os.path.join(lab.s.lab_dir, f"{lab.profile.run_prefix}explain")
    p = lab.profile
    key = {"exports": export_key(lab, runs), "methods": list(p.methods),
           "per_class": p.explain_per_class, "steps": p.faithfulness_steps,
           "images": [os.path.abspath(i) for i in lab.s.images]}
    marker = os.path.join(out_dir, "done.json")
    flags = {"runs": runs, "method": list(p.methods), "num_examples": 2 * p.explain_per_class,
             "class_name": "cat", "faithfulness": True, "faithfulness_steps": p.faithfulness_steps,
             "images": list(lab.s.images)}
    commands = [command("research.apps.explain", {
        "run_name": r, "checkpoint_dir": lab.s.checkpoint_dir, "data_dir": lab.s.data_dir,
        "num_examples": p.explain_per_class, "example_filter": f,
        "method": ",".join(p.methods), "class_name": "cat", "faithfulness": True,
        "out_dir": os.path.join(out_dir, r, f)}) for r in runs for f in ("positive", "negative")]
    old = _marker(marker)
    if old is not None and old.get("key") == key and all(
            os.path.isfile(f) for f in old["outputs"]["figures"]):
        return lab.finish("explain", "Explanations", start, True, commands, flags,
                          old["outputs"])
    examples = fixed_examples(lab)
    manifest = pipeline.load_manifest(lab.s.data_dir)
    names = manifest["class_names"]
    labels = [f"test #{i}: {names[c]}" for i, c in zip(examples["index"], examples["class_id"])]
    photos = user_images(lab.s.images)
    top3 = imagenet_top3(lab, list(examples["image"]) + [ph for _, ph in photos])
    os.makedirs(out_dir, exist_ok=True)
    scores, maps = {}, {}
    for run in runs:
        ex, meta, cat = load_detector(lab, run)
        batch = examples["image"].astype(np.float32)
        photo_batch = (np.stack([resize_image(ph, ex.input_size, "stretch") for _, ph in photos]
                                ).astype(np.float32) if photos else None)
        scores[run], maps[run] = {}, {}
        for method in p.methods:
            res = core.explain(ex, method, batch, cat)
            scores[run][method] = faithfulness.deletion_insertion(
                ex, batch, res, steps=p.faithfulness_steps)
            maps[run][method] = {"test": res}
            if photo_batch is not None:
                maps[run][method]["photos"] = core.explain(ex, method, photo_batch, cat)
        print(f"[lab] explained {run}: " + ", ".join(
            f"{m} del {s['deletion_auc']:.3f} ins {s['insertion_auc']:.3f}"
            for m, s in scores[run].items()), flush=True)
    paths = []
    short = dict(zip(runs, ("scratch", "transfer")))  # column titles stay legible
    for method in p.methods:
        rows = labels if top3 is None else [
            f"{lab_}\nImageNet VGG16: {t}" for lab_, t in zip(labels, top3)]
        fig = figures.side_by_side(examples["image"], rows, {
            short[r]: maps[r][method]["test"] for r in runs}, method,
            f"{len(labels)} fixed test images ({p.explain_per_class} cats, then non-cats): "
            + ", ".join(f"{v} = {k}" for k, v in short.items()))
        paths.append(plots.save_figure(fig, os.path.join(out_dir, f"{method}_test.png")))
        if photos:
            rows = [n for n, _ in photos] if top3 is None else [
                f"{n}\nImageNet VGG16: {t}" for (n, _), t in zip(photos, top3[len(labels):])]
            fig = figures.side_by_side([ph for _, ph in photos], rows, {
                short[r]: maps[r][method]["photos"] for r in runs}, method,
                "your photos (--images): " + ", ".join(f"{v} = {k}" for k, v in short.items()))
            paths.append(plots.save_figure(fig, os.path.join(out_dir, f"{method}_photos.png")))
    with open(os.path.join(out_dir, "faithfulness.json"), "w") as f:
        json.dump(scores, f, indent=1)
    outputs = {"figures": paths, "faithfulness": {r: {m: {k: s[k] for k in (
        "deletion_auc", "insertion_auc", "num_images", "steps")} for m, s in per.items()}
        for r, per in scores.items()}, "num_images": len(labels), "photos": len(photos),
        "top3": top3 is not None}
    with open(marker, "w") as f:
        json.dump({"key": key, "outputs": outputs}, f, indent=1)
    return lab.finish("explain", "Explanations", start, False, commands, flags, outputs)


def pick_layers(model, n: int) -> list[str]:
    """n feature maps spread from the first to the last resolution of the network (the last
    layer at each resolution), skipping resizing, preprocessing, pooling and dropout."""
    import keras

    from research.explain import core

    skip = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Dropout,
            keras.layers.Resizing, keras.layers.Rescaling)
    last_at = {}
    for path, layer in core.spatial_layers(model):
        if isinstance(layer, skip) or type(layer).__name__ == "BackbonePreprocess":
            continue
        last_at[tuple(layer.output.shape[1:3])] = path
    paths = list(last_at.values())
    if len(paths) <= n:
        return paths
    idx = np.unique(np.round(np.linspace(0, len(paths) - 1, n)).astype(int))
    return [paths[i] for i in idx]


def stage_visualize(lab: Lab) -> StageRecord:
    from research.explain import features

    start = time.perf_counter()
    runs = detector_runs(lab)
    require_runs(lab, "visualize", runs)
    p = lab.profile
    out_dir = os.path.join(lab.s.lab_dir, f"{lab.profile.run_prefix}visualize")
    key = {"exports": export_key(lab, runs), "layers": p.visualize_layers,
           "num_filters": p.num_filters, "filter_steps": p.filter_steps}
    marker = os.path.join(out_dir, "done.json")
    flags = {"runs": runs, "visualize": "activations,filters", "num_filters": p.num_filters,
             "filter_steps": p.filter_steps, "layers_per_detector": p.visualize_layers}
    old = _marker(marker)
    commands_old = (old or {}).get("outputs", {}).get("commands")
    if old is not None and old.get("key") == key and all(
            os.path.isfile(f) for f in old["outputs"]["figures"]):
        return lab.finish("visualize", "Activations and filters", start, True, commands_old,
                          flags, old["outputs"])
    os.makedirs(out_dir, exist_ok=True)
    cat = pipeline.take_examples(lab.s.data_dir, SPLIT, 1, filter="positive")
    image = cat["image"][0].astype(np.float32)
    what = f"test #{int(cat['index'][0])} (cat)"
    paths, commands, layers_by_run = [], [], {}
    for run in runs:
        ex, _, _ = load_detector(lab, run)
        layers = pick_layers(ex.model, p.visualize_layers)
        layers_by_run[run] = layers
        commands.append(command("research.apps.explain", {
            "run_name": run, "checkpoint_dir": lab.s.checkpoint_dir,
            "data_dir": lab.s.data_dir, "num_examples": 1, "example_filter": "positive",
            "visualize": "activations,filters", "layers": ",".join(layers),
            "num_filters": p.num_filters, "filter_steps": p.filter_steps,
            "out_dir": os.path.join(out_dir, run)}))
        for path, fmap in features.layer_outputs(ex, image, layers).items():
            fig = features.activation_grid(fmap, f"{run} on {what}, layer {path}")
            paths.append(plots.save_figure(fig, os.path.join(
                out_dir, f"{run}_activations_{path.replace('/', '_')}.png")))
        for layer in layers:
            from research.explain.core import find_layer

            path, lyr = find_layer(ex.model, layer)
            n = min(p.num_filters, int(lyr.output.shape[-1]))
            patterns = [features.visualize_filter(ex, layer, k, steps=p.filter_steps, seed=k)
                        for k in range(n)]
            fig = features.filter_grid(patterns, f"{run}, layer {path}: patterns that excite "
                                                 f"its first {n} filters (mean activation "
                                                 "start->end)")
            paths.append(plots.save_figure(fig, os.path.join(
                out_dir, f"{run}_filters_{path.replace('/', '_')}.png")))
        print(f"[lab] visualized {run}: {', '.join(layers)}", flush=True)
    outputs = {"figures": paths, "layers": layers_by_run, "commands": commands}
    with open(marker, "w") as f:
        json.dump({"key": key, "outputs": outputs}, f, indent=1)
    return lab.finish("visualize", "Activations and filters", start, False, commands, flags,
                      outputs)


# --------------------------------------------------------------------------- memory check

METRICS = ("roc_auc", "pr_auc", "f1", "precision", "recall", "class_accuracy", "loss")


def stage_memory_check(lab: Lab) -> StageRecord:
    start = time.perf_counter()
    settings = lab.profile.memory_check
    disk = train_config(lab, "mem_tfrecords", settings)
    mem = dataclasses.replace(train_config(lab, "mem_memory", settings), input="memory")
    memory_check.check_supported(disk)
    out = os.path.join(lab.s.lab_dir, f"{lab.profile.run_prefix}memory_check.json")
    flags = changed_flags(disk)
    commands = [command("research.apps.train", flags),
                command("research.apps.train", changed_flags(mem)),
                _eval_command(lab, disk.run_name), _eval_command(lab, mem.run_name)]
    notes = ["`train --input=memory` reads the whole training split once and feeds the loop "
             "the same batches from memory (checked element by element below)."]
    d_summary, d_reused = train(lab, disk)
    m_summary = finished(mem)
    m_reused = m_summary is not None
    if not m_reused:
        m_summary, _ = train(lab, mem)
    d_report, d_eval = evaluate(lab, disk.run_name, figures=False)
    m_report, m_eval = evaluate(lab, mem.run_name, figures=False)
    old = _marker(out)
    if old and d_reused and m_reused and d_eval and m_eval and "same_batches" in old:
        same = old["same_batches"]
    else:
        same = same_batches(lab, disk)
    result = {"runs": {"tfrecords": disk.run_name, "memory": mem.run_name},
              "settings": flags, "same_batches": same,
              "test": {}, "train_seconds": {"tfrecords": d_summary.get("train_seconds"),
                                            "memory": m_summary.get("train_seconds")}}
    for k in METRICS:
        a, b = d_report.get(k), m_report.get(k)
        if a is not None and b is not None:
            result["test"][k] = {"tfrecords": a, "memory": b, "difference": b - a}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    diff = result["test"].get("roc_auc", {}).get("difference")
    print(f"[lab] memory check: same batches {same}; test ROC-AUC difference (memory - "
          f"tfrecords) {diff:+.4f}" if diff is not None else "[lab] memory check done",
          flush=True)
    reused = d_reused and m_reused and d_eval and m_eval
    return lab.finish("memory_check", "Reading from disk vs from memory", start, reused,
                      commands, flags, {"json": out, **result},
                      notes + resume_notes(d_summary, m_summary),
                      ran_seconds=(d_summary.get("train_seconds") or 0)
                      + (m_summary.get("train_seconds") or 0))


def same_batches(lab: Lab, cfg: TrainConfig, num_batches: int = 3) -> bool:
    """The first batches of both streams compared element for element."""
    from research.training.inputs import augmentation
    from research.training.loop import prepare_config

    run = prepare_config(cfg)
    manifest = pipeline.load_manifest(run.data_dir)
    arrays = memory_check.load_train_split(run.data_dir)
    a = pipeline.make_dataset(run.data_dir, "train", run.batch_size, training=True,
                              **augmentation(run))
    b = memory_check.memory_dataset(arrays, manifest, run.batch_size, **augmentation(run))
    for x, y in zip(a.take(num_batches), b.take(num_batches)):
        for k in ("image", "label", "class_id"):
            if not np.array_equal(x[k].numpy(), y[k].numpy()):
                logging.warning("memory check: batches differ in %s", k)
                return False
    return True


STAGE_FUNCTIONS = {
    "data": stage_data, "scratch": stage_scratch, "source_task": stage_source_task,
    "transfer": stage_transfer, "compare": stage_compare, "explain": stage_explain,
    "visualize": stage_visualize, "memory_check": stage_memory_check,
}
