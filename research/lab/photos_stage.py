"""The lab's real photos: the dogs-vs-cats photos (../shared/data/dogs-vs-cats-2000.tar, or
--photo_source=<tar|folder>) cut into exact per-class train/val/test counts at one size, the
lab's own CIFAR-10 detector scored on them zero-shot (p(cat) / (p(cat) + p(dog))), then
fine-tuned on the training photos with the photo recipe (research/recipes/
photos_from_cifar.flags) and scored on the held-out photos, with and without test-time
augmentation; Grad-CAM, Grad-CAM++ and saliency of the photo detector drawn on the original
photos at their own resolution, and its worst mistakes. Skipped, with the reason in the
report, when there are no photos. Reused when the photo data, the detector's export and the
settings are those of the marker on disk."""

from __future__ import annotations

import os
import tarfile

import numpy as np

from research import plots, runs
from research.data import imaging, pipeline, sources, tfrecords
from research.data.manifest import has_manifest, manifest_path, sha256_file
from research.evaluation import run as scoring
from research.evaluation import zero_shot
from research.explain import methods, render
from research.lab.detectors import (finished, require_runs, resume_notes, run_summary,
                                    train)
from research.lab.explain_stage import load_explainer
from research.lab.lab import SPLIT, Lab, changed_flags, command
from research.lab.settings import LabError
from research.lab.stage import Done
from research.training import checkpoints
from research.training.config import TrainConfig, load_run_config
from research.training.recipes import PHOTOS_FROM_CIFAR, load_recipe

PHOTO_METHODS = ("gradcam", "gradcam_pp", "saliency")
METRICS = ("accuracy", "roc_auc", "pr_auc", "f1", "threshold", "num_examples")


def photo_source(lab: Lab) -> tuple[str | None, str]:
    """(the photo source or None, the line that says which and why)."""
    if lab.s.photo_source:
        return lab.s.photo_source, f"photos: {lab.s.photo_source} (--photo_source)"
    local = lab.profile.photos["source"]
    if os.path.exists(local):
        return local, f"photos: {local} (the local copy)"
    return None, (f"skipped: {local} is not there and no --photo_source was given (a tar or "
                  "folder of photos with one folder per class, e.g. cats/ and dogs/)")


def photo_data_dir(lab: Lab) -> str:
    p = lab.profile.photos
    name = f"photos{p['size']}" + ("_quick" if lab.profile.quick else "")
    return os.path.normpath(os.path.join(lab.s.workdir, "data", name))


def class_map(photo_classes, run_classes) -> dict[str, str]:
    """Each photo class to the run's class of the same name or its singular (cats -> cat)."""
    out = {}
    for c in photo_classes:
        for name in (c, c.lower(), c.lower().rstrip("s")):
            if name in run_classes:
                out[c] = name
                break
    return out


def _wanted(lab: Lab, source: str) -> dict:
    p = lab.profile.photos
    return {"source": os.path.realpath(source) if os.path.exists(source) else source,
            "split_counts": list(p["split_counts"]), "image_size": p["size"]}


def make_photo_data(lab: Lab, source: str, detector_classes) -> tuple[dict, bool]:
    """(manifest, reused): the photo TFRecords, written once; other TFRecords in the folder
    are an error naming the difference."""
    out = photo_data_dir(lab)
    want = _wanted(lab, source)
    if has_manifest(out):
        m = pipeline.load_manifest(out)
        have = {"source": os.path.realpath(m["source"]) if os.path.exists(m["source"])
                else m["source"],
                "split_counts": [(m.get("split_counts") or {}).get(k) for k in
                                 ("train", "val", "test")],
                "image_size": m["image_shape"][0]}
        diffs = [f"{k} {have[k]!r} (wanted {want[k]!r})" for k in want if have[k] != want[k]]
        if diffs:
            raise LabError(f"photos: {out} holds other TFRecords: {'; '.join(diffs)}; remove "
                           "the folder to rebuild it")
        return m, True
    size = lab.profile.photos["size"]
    data = sources.load_source(source, image_size=(size, size))
    mapping = class_map(data.class_names, detector_classes)
    cats = [c for c, r in mapping.items() if r == "cat"]
    if len(data.class_names) != 2 or len(mapping) != 2 or len(cats) != 1:
        raise LabError(f"--photo_source={source}: want two classes that name the detector's "
                       f"cat and dog (e.g. cats/ and dogs/); it has "
                       f"{', '.join(data.class_names)}")
    cfg = tfrecords.WriteConfig(out_dir=out, positive_class=cats[0],
                                split_counts=tuple(lab.profile.photos["split_counts"]),
                                shards={"train": 4, "val": 1, "test": 2})
    flags = {"source": source, "out_dir": out, "image_size": size,
             "positive_class": cats[0],
             "split_counts": ",".join(map(str, lab.profile.photos["split_counts"]))}
    try:
        tfrecords.write_tfrecords(data, cfg, source, {k: v for k, v in flags.items()
                                                      if k != "out_dir"})
    except ValueError as e:  # counts the photos cannot give: the class and what it has
        raise LabError(f"photos ({source}): {e}") from e
    return pipeline.load_manifest(out), False


def recipe_settings(lab: Lab, detector: TrainConfig, mapping: dict, positive: str) -> dict:
    """The photo recipe from the lab's detector: its model as the backbone, its cat-vs-dog
    score as the new head; the profile's overrides on top."""
    settings = load_recipe(PHOTOS_FROM_CIFAR)
    over = dict(lab.profile.photos["train"])
    other = next(c for c in mapping if c != positive)
    options = {**settings.get("model_options", {}), **over.pop("model_options", {}),
               "weights": detector.run_name, "head_from": (mapping[positive], mapping[other])}
    return {**settings, **over, "model": detector.model, "model_options": options}


def _eval_no_tta(lab: Lab, run: str, data_dir: str) -> dict:
    """The photo detector's test report without test-time augmentation (beside the run's
    own report, which has it); reused when it scored the same checkpoint."""
    cfg = load_run_config(lab.s.checkpoint_dir, run, data_dir, tta=False, tta_shifts=False)
    path = os.path.join(cfg.run_dir, f"eval_{SPLIT}_no_tta.json")
    best = checkpoints.resolve_checkpoint(cfg.run_dir, "best")
    old = runs.read_eval_report(path)
    if old and old.get("checkpoint") == best:
        return old
    report, _ = scoring.evaluate_run(cfg, SPLIT, best, progress=lab.s.progress, verified=True)
    runs.write_eval_report(path, report)
    return report


def _zero_shot(lab: Lab, detector: str, data_dir: str, mapping: dict, tta: bool) -> dict:
    cfg = zero_shot.zero_shot_config(lab.s.checkpoint_dir, detector, data_dir, mapping,
                                     tta=tta, tta_shifts=tta)
    report, _ = zero_shot.score_zero_shot(cfg, SPLIT, progress=lab.s.progress)
    path = zero_shot.report_path(lab.s.checkpoint_dir, detector, data_dir,
                                 SPLIT + ("" if tta else "_no_tta"))
    runs.write_eval_report(path, report)
    return report


def _row(name: str, report: dict, seconds=None) -> dict:
    return {"run": name, **{k: report.get(k) for k in METRICS}, "train_seconds": seconds,
            "threshold_metric": report.get("threshold_metric"),
            "accuracy_at_0.5": report.get("at_0.5", {}).get("accuracy"),
            "ece": report.get("calibration", {}).get("raw", {}).get("ece"),
            "tta": bool(report.get("tta")), "tta_shifts": bool(report.get("tta_shifts"))}


# ----------------------------------------------------------------------------- figures

def read_originals(source: str, wanted: list[str]) -> dict[str, np.ndarray]:
    """The original photos of `wanted` source ids (a tar member or a file whose path ends
    with the id), decoded at their own resolution."""
    out = {}
    if os.path.isfile(source) and tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                hit = next((w for w in wanted if member.isfile() and
                            member.name.endswith("/" + w)), None)
                if hit and hit not in out:
                    out[hit] = imaging.decode_image(tar.extractfile(member).read(), member.name)
        return out
    for root, _, names in os.walk(source):
        for n in names:
            path = os.path.join(root, n)
            hit = next((w for w in wanted if path.endswith(os.sep + w)), None)
            if hit and hit not in out:
                out[hit] = imaging.load_image_file(path)
    return out


def explain_figure(lab: Lab, run: str, data_dir: str, source: str, ids: list[str],
                   out_dir: str) -> str:
    """Grad-CAM, Grad-CAM++ and saliency of the photo detector's cat score on held-out cat
    and dog photos, each drawn on the original photo."""
    n = lab.profile.photos["explain_per_class"]
    examples = pipeline.take_examples(data_dir, SPLIT, 2 * n, filter="balanced")
    wanted = [ids[i] for i in examples["index"]]
    originals = read_originals(source, wanted)
    manifest = pipeline.load_manifest(data_dir)
    policy = imaging.recorded_policy(manifest)
    ex, _, cat = load_explainer(lab, run)
    batch = examples["image"].astype(np.float32)
    maps = {m: methods.explain(ex, m, batch, cat) for m in PHOTO_METHODS}
    probs = ex.probabilities(np.asarray(ex.logits(batch)))[:, 0]
    images, titles = [], []
    for row, sid in enumerate(wanted):
        photo = originals.get(sid)
        if photo is None:
            photo = examples["image"][row]  # the source moved: the stored image instead
        window = imaging.crop_window(photo.shape, tuple(manifest["image_shape"][:2]), policy)
        images.append(photo)
        titles.append(f"{sid} ({photo.shape[1]}x{photo.shape[0]})\np(cat) {probs[row]:.2f}")
        for m in PHOTO_METHODS:
            images.append(render.overlay_on_original(photo, np.asarray(maps[m].maps[row]), window))
            titles.append(m)
    fig = plots.image_grid(images, titles, ncols=1 + len(PHOTO_METHODS), cell=2.4,
                           colorbar_cmap=render.HEATMAP_CMAP,
                           title=f"{run}: what the photo detector looks at (held-out photos, "
                                 "cats then dogs; white box: the part of the photo it sees)")
    return plots.save_figure(fig, os.path.join(out_dir, "photos_explain.png"))


def mistakes_figure(lab: Lab, run: str, data_dir: str, source: str, ids: list[str],
                    raw: dict, threshold: float, out_dir: str, k: int = 6) -> str:
    """The most confident false positives (dogs called cats) and false negatives, each as
    the original photo and beside it Grad-CAM of the cat score drawn on it (the window the
    network saw framed)."""
    scores, labels, index = raw["scores"], raw["labels"], raw["index"]
    fp = [i for i in np.argsort(-scores) if labels[i] == 0 and scores[i] >= threshold][:k]
    fn = [i for i in np.argsort(scores) if labels[i] == 1 and scores[i] < threshold][:k]
    picked = [(int(index[i]), float(scores[i]), kind) for kind, group in
              (("false positive", fp), ("false negative", fn)) for i in group]
    originals = read_originals(source, [ids[i] for i, _, _ in picked])
    images, titles = [], []
    stored = pipeline.take_examples(data_dir, SPLIT, indices=[i for i, _, _ in picked])
    by_index = dict(zip(stored["index"].tolist(), stored["image"]))
    if picked:
        manifest = pipeline.load_manifest(data_dir)
        policy = imaging.recorded_policy(manifest)
        ex, _, cat = load_explainer(lab, run)
        batch = np.stack([by_index[i] for i, _, _ in picked]).astype(np.float32)
        cams = methods.explain(ex, "gradcam", batch, cat).maps
    for row, (i, score, kind) in enumerate(picked):
        photo = originals.get(ids[i], by_index[i])
        window = imaging.crop_window(photo.shape, tuple(manifest["image_shape"][:2]), policy)
        images += [photo, render.overlay_on_original(photo, cams[row], window)]
        titles += [f"{kind}\n{ids[i]}: p(cat) {score:.2f}", "Grad-CAM of p(cat)"]
    if not images:
        images, titles = [np.zeros((8, 8, 3), np.uint8)], ["no mistakes"]
    fig = plots.image_grid(images, titles, ncols=4, cell=2.0,
                           colorbar_cmap=render.HEATMAP_CMAP if picked else None,
                           title=f"{run}: the most confident mistakes on the held-out photos "
                                 f"(threshold {threshold:.3f} from val)\neach with Grad-CAM "
                                 "of p(cat) on the part it saw (white box)")
    return plots.save_figure(fig, os.path.join(out_dir, "photos_mistakes.png"))


# ----------------------------------------------------------------------------- the stage

def _detector_classes(lab: Lab, detector_name: str) -> list:
    return runs.read_metadata(runs.exported_model_path(
        lab.s.checkpoint_dir, detector_name))["class_names"]


def _photo_config(lab: Lab, detector_name: str, manifest: dict) -> tuple[TrainConfig, dict]:
    """(the photo run's config, the photo classes mapped to the detector's)."""
    detector = load_run_config(lab.s.checkpoint_dir, detector_name, lab.s.data_dir)
    mapping = class_map(manifest["class_names"], _detector_classes(lab, detector_name))
    settings = recipe_settings(lab, detector, mapping, manifest["positive_class"])
    cfg = TrainConfig(data_dir=photo_data_dir(lab), run_name=lab.run_name("photos"),
                      checkpoint_dir=lab.s.checkpoint_dir, log_dir=lab.s.log_dir,
                      progress=lab.s.progress, **settings)
    return cfg, mapping


def photos_key(lab: Lab) -> dict | None:
    """The photo data, the photo run's flags, the detector's and the photo run's exports
    (None: no photos, or their TFRecords are not written yet)."""
    source, _ = photo_source(lab)
    data_dir = photo_data_dir(lab)
    if source is None or not has_manifest(data_dir):
        return None
    detector_name = lab.run_name("scratch")
    require_runs(lab, "photos", [detector_name])
    cfg, _ = _photo_config(lab, detector_name, pipeline.load_manifest(data_dir))
    flags = changed_flags(cfg)
    return {"data": sha256_file(manifest_path(data_dir)), "flags": {
        k: list(v) if isinstance(v, tuple) else v for k, v in flags.items()},
        "detector": sha256_file(runs.exported_model_path(lab.s.checkpoint_dir, detector_name)),
        "photo_run": (sha256_file(runs.exported_model_path(lab.s.checkpoint_dir, cfg.run_name))
                      if finished(cfg) is not None else None),
        "explain_per_class": lab.profile.photos["explain_per_class"]}


def stage_photos(lab: Lab) -> Done:
    source, line = photo_source(lab)
    if source is None:
        return Done([], {}, {"skipped": line})
    detector_name = lab.run_name("scratch")
    require_runs(lab, "photos", [detector_name])
    manifest, data_reused = make_photo_data(lab, source, _detector_classes(lab, detector_name))
    data_dir = photo_data_dir(lab)
    cfg, mapping = _photo_config(lab, detector_name, manifest)
    flags = changed_flags(cfg)
    commands = [command("research.apps.make_tfrecords", {
                    "source": source, "out_dir": data_dir, "image_size": manifest[
                        "image_shape"][0], "positive_class": manifest["positive_class"],
                    "split_counts": ",".join(map(str, lab.profile.photos["split_counts"]))}),
                *(command("research.apps.evaluate", {
                    "run_name": detector_name, "checkpoint_dir": lab.s.checkpoint_dir,
                    "data_dir": data_dir, "split": SPLIT, "tta": t, "tta_shifts": t,
                    "class_map": ",".join(f"{a}:{b}" for a, b in mapping.items())})
                  for t in (False, True)),
                command("research.apps.train", flags),
                command("research.apps.evaluate", {"run_name": cfg.run_name,
                                                   "checkpoint_dir": lab.s.checkpoint_dir,
                                                   "data_dir": data_dir, "split": SPLIT})]
    out_dir = lab.out_dir("photos")
    rows = [_row(f"zero-shot: {detector_name} (CIFAR-10, never saw a photo), "
                 + ("TTA mirror + shifts" if tta else "no TTA"),
                 _zero_shot(lab, detector_name, data_dir, mapping, tta), 0.0)
            for tta in (False, True)]
    print(f"[lab] photos: zero-shot {detector_name}: ROC-AUC {rows[1]['roc_auc']:.4f}, "
          f"accuracy {rows[1]['accuracy']:.4f} (with TTA)", flush=True)
    summary, _ = train(lab, cfg)
    best = checkpoints.resolve_checkpoint(cfg.run_dir, "best")
    run_cfg = load_run_config(lab.s.checkpoint_dir, cfg.run_name, data_dir)
    report, raw = scoring.evaluate_and_save(run_cfg, SPLIT, best, progress=lab.s.progress,
                                            verified=True)
    plain = _eval_no_tta(lab, cfg.run_name, data_dir)
    size = cfg.model_options.get("image_size")
    secs = summary.get("train_seconds")
    rows += [_row(f"fine-tuned from {detector_name} at {size} px, no TTA", plain, secs),
             _row(f"fine-tuned from {detector_name} at {size} px, TTA mirror + shifts", report,
                  secs)]
    print(f"[lab] photos: {cfg.run_name} on {SPLIT} ({report['num_examples']:,} photos): "
          f"ROC-AUC {report['roc_auc']:.4f}, accuracy {report['accuracy']:.4f}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    ids = pipeline.read_source_ids(data_dir, SPLIT)  # the originals' names, read once
    figures = [explain_figure(lab, cfg.run_name, data_dir, source, ids, out_dir),
               mistakes_figure(lab, cfg.run_name, data_dir, source, ids, raw,
                               report["threshold"], out_dir)]
    outputs = {"source_line": line, "data_dir": data_dir, "run_name": cfg.run_name,
               "detector": detector_name, "class_map": mapping,
               "summary": run_summary(cfg, summary), "rows": rows, "figures": figures,
               "data_summary": tfrecords.summary_table(manifest),
               "data_reused": data_reused, "eval_figures": report.get("figures", [])}
    return Done(commands, flags, outputs, resume_notes(summary), ran_seconds=secs)
