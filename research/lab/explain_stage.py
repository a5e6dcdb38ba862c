"""The lab's explanations: the cheap methods of profiles.METHODS (Grad-CAM, Grad-CAM++,
saliency, integrated gradients, guided Grad-CAM, occlusion; the stage's `methods` setting)
of the cat score of both detectors, side by side on the same test cats and non-cats (and on
the user's photos), with deletion and insertion AUCs per method; reused (research.lab.lab.
run_stage) when the runs' exports and the settings are those of the marker on disk."""

from __future__ import annotations

import os
import time

import numpy as np
from keras.applications.imagenet_utils import decode_predictions

from research import plots, runs
from research.data import pipeline
from research.data.imaging import ImageDecodeError, decode_image, resize_image
from research.data.manifest import sha256_file
from research.explain import faithfulness, loading, methods, outputs, sanity
from research.explain.options import ExplainOptions
from research.lab import figures
from research.lab.detectors import detector_runs, require_runs
from research.lab.lab import SPLIT, Lab, command
from research.lab.profiles import EXPLAIN_OPTIONS
from research.lab.settings import LabError
from research.lab.stage import Done
from research.model_options import BACKBONES
from research.models.backbones import keras_models_dir


# Sanity checks (Adebayo et al. 2018) of the lab's methods plus guided backprop (the method
# the paper found passing a random network's map off as the real one), on the first
# SANITY_PER_CLASS test cats and non-cats; cascading randomisation only (the verdict's; the
# independent one doubles the time: VGG16's 15 layers, 31 maps per method instead of 16).
SANITY_EXTRA = ("guided_backprop",)
SANITY_PER_CLASS = 2
MISTAKES_SHOWN = 4  # the worst false positives and as many false negatives, with Grad-CAM
# ... among the first MISTAKES_SCORED test images: scoring all 10,000 through VGG16 at 64 px
# took 846 s on the 2-core EPYC under load (the fast CNN's: 67-125 s).
MISTAKES_SCORED = 2000
MUFIDELITY_SAMPLES = 64  # forward passes per image (xplique: 200; the library: 128)
FAITHFULNESS_KEYS = ("deletion_auc", "insertion_auc", "road_morf", "road_lerf", "mu_fidelity",
                     "average_drop", "increase_in_confidence", "num_images", "steps")


def export_key(lab: Lab, names) -> dict:
    """What a figure stage's output depends on: the exports of the runs it draws."""
    return {r: sha256_file(runs.exported_model_path(lab.s.checkpoint_dir, r)) for r in names}


def fixed_examples(lab: Lab) -> dict:
    """The same test cats and non-cats for every detector: the first of each in split
    order."""
    per_class = lab.stage_settings("explain")["explain_per_class"]
    return pipeline.take_examples(lab.s.data_dir, SPLIT, 2 * per_class, filter="balanced")


def user_images(paths) -> list[tuple[str, np.ndarray]]:
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append((os.path.basename(path), decode_image(f.read(), path)))
    return out


def load_explainer(lab: Lab, run: str):
    """(explainer, export metadata, index of the positive class) of one of the lab's runs."""
    ex, meta = loading.load_run(lab.s.checkpoint_dir, run, "float32")
    positive = meta["positive_class"]
    index = ex.class_names.index(positive) if positive in (ex.class_names or []) else 0
    return ex, meta, index


def imagenet_top3(lab: Lab, images: np.ndarray) -> list[str] | None:
    """Top-3 ImageNet classes of the full VGG16 (with its classifier) when the transfer
    detector is an ImageNet model and those weights are at hand; else None."""
    if lab.weights != "imagenet":
        return None
    top = BACKBONES["vgg16"].top_weights_file
    if not os.path.isfile(os.path.join(keras_models_dir(), top)):
        return None
    ex = loading.load_application("vgg16", "imagenet", "float32")
    big = np.stack([resize_image(np.asarray(i, np.uint8), ex.input_size, "stretch")
                    for i in images]).astype(np.float32)
    probs = ex.probabilities(np.asarray(ex.logits(big)))
    return [", ".join(f"{n} {p:.2f}" for _, n, p in row)
            for row in decode_predictions(probs, top=3)]


def _commands(lab: Lab, names, out_dir: str) -> list[str]:
    p = lab.stage_settings("explain")
    return [command("research.apps.explain", {
        "run_name": r, "checkpoint_dir": lab.s.checkpoint_dir, "data_dir": lab.s.data_dir,
        "num_examples": p["explain_per_class"], "example_filter": f,
        "method": ",".join(p["methods"]), "class_name": "cat", "faithfulness": True,
        **EXPLAIN_OPTIONS, "out_dir": os.path.join(out_dir, r, f)}) for r in names
        for f in ("positive", "negative")] + [command("research.apps.explain", {
            "run_name": r, "checkpoint_dir": lab.s.checkpoint_dir, "data_dir": lab.s.data_dir,
            "num_examples": SANITY_PER_CLASS, "example_filter": f,
            "method": ",".join(sanity_methods(p)), "class_name": "cat",
            "sanity": "model_randomization", **EXPLAIN_OPTIONS,
            "out_dir": os.path.join(out_dir, r, f"sanity_{f}")}) for r in names
        for f in ("positive", "negative")] + [command("research.apps.explain", {
            "run_name": r, "checkpoint_dir": lab.s.checkpoint_dir, "data_dir": lab.s.data_dir,
            "num_examples": MISTAKES_SHOWN, "example_filter": f, "method": "gradcam",
            "class_name": "cat", "out_dir": os.path.join(out_dir, r, f)}) for r in names
        for f in ("false_positive", "false_negative")]


def sanity_methods(p) -> list[str]:
    return list(p["methods"]) + [m for m in SANITY_EXTRA if m not in p["methods"]]


def _mistakes_figure(lab: Lab, run: str, out_dir: str) -> str:
    """<run>/mistakes.png: the run's most confident false positives and false negatives
    among the first MISTAKES_SCORED test images (scored as predict, at the run's
    threshold), each with Grad-CAM of the cat score."""
    ex, meta, cat = load_explainer(lab, run)
    found, scores = outputs.score_split(ex, meta, lab.s.data_dir, SPLIT,
                                        limit=MISTAKES_SCORED)
    names = pipeline.load_manifest(lab.s.data_dir)["class_names"]
    items, rows = [], []
    for kind in ("false_positive", "false_negative"):
        picked, matched = outputs.pick_outcome(ex, found, scores, meta["threshold"], names,
                                               SPLIT, MISTAKES_SHOWN, kind)
        items += picked
        rows += [f"{kind.replace('_', ' ')} ({matched} in all)\n{it.name}" for it in picked]
    if not items:
        return ""
    batch = np.stack([it.model_input for it in items])
    res = methods.explain(ex, "gradcam", batch, cat)
    fig = figures.side_by_side([it.original for it in items], rows, {run: res}, "gradcam",
                               f"its most confident mistakes among the first "
                               f"{len(scores):,} {SPLIT} images at threshold "
                               f"{meta['threshold']:.3f}")
    return plots.save_figure(fig, os.path.join(out_dir, run, "mistakes.png"))


def _sanity_run(lab: Lab, run: str, batch: np.ndarray, out_dir: str) -> tuple[dict, list]:
    """(sanity JSON of every method, its figures) of one run: model randomisation, and random
    logit where the detector has two or more outputs."""
    ex, _, cat = load_explainer(lab, run)
    checks = ["model_randomization"]
    if int(ex.model.output.shape[-1]) >= 2:
        checks.append("random_logit")
    options = ExplainOptions(**EXPLAIN_OPTIONS)
    results = outputs.sanity_checks(ex, batch, sanity_methods(lab.stage_settings("explain")),
                                    checks, options, class_index=cat, independent=False)
    outputs.save_sanity(results, os.path.join(out_dir, run))
    figs = outputs.sanity_figures(results, batch[0], os.path.join(out_dir, run),
                                  f"{run}: sanity checks of the cat score")
    print(f"[lab] sanity of {run}: " + ", ".join(
        f"{m} {c} {v}" for m, c, _, _, v in outputs.sanity_rows(results)), flush=True)
    return outputs.sanity_json(results), figs


def _explain_run(lab: Lab, run: str, batch: np.ndarray, photos) -> tuple[dict, dict]:
    """({method: deletion/insertion scores}, {method: {"test": maps[, "photos": maps]}})."""
    p = lab.stage_settings("explain")
    ex, _, cat = load_explainer(lab, run)
    photo_batch = (np.stack([outputs.model_input(ex, ph) for _, ph in photos])
                   if photos else None)
    scores, maps = {}, {}
    options = ExplainOptions(**EXPLAIN_OPTIONS)
    for method in p["methods"]:
        params = options.method_params(method)
        res = methods.explain(ex, method, batch, cat, **params)
        scores[method] = faithfulness.all_scores(ex, batch, res, steps=p["faithfulness_steps"],
                                                 mufidelity_samples=MUFIDELITY_SAMPLES,
                                                 seed=options.seed)
        maps[method] = {"test": res}
        if photo_batch is not None:
            maps[method]["photos"] = methods.explain(ex, method, photo_batch, cat, **params)
    print(f"[lab] explained {run}: " + ", ".join(
        f"{m} del {s['deletion_auc']:.3f} ins {s['insertion_auc']:.3f}"
        for m, s in scores.items()), flush=True)
    return scores, maps


def _figures(lab: Lab, names, examples, labels, photos, top3, maps, out_dir) -> list[str]:
    """One side-by-side figure per method of both detectors on the test images (and on the
    user's photos)."""
    p = lab.stage_settings("explain")
    short = dict(zip(names, ("scratch", "transfer")))  # column titles stay legible
    legend = ", ".join(f"{v} = {k}" for k, v in short.items())
    paths = []
    for method in p["methods"]:
        rows = labels if top3 is None else [
            f"{lab_}\nImageNet VGG16: {t}" for lab_, t in zip(labels, top3)]
        fig = figures.side_by_side(examples["image"], rows, {
            short[r]: maps[r][method]["test"] for r in names}, method,
            f"{len(labels)} fixed test images ({p['explain_per_class']} cats, then non-cats): "
            + legend)
        paths.append(plots.save_figure(fig, os.path.join(out_dir, f"{method}_test.png")))
        if photos:
            rows = [n for n, _ in photos] if top3 is None else [
                f"{n}\nImageNet VGG16: {t}" for (n, _), t in zip(photos, top3[len(labels):])]
            fig = figures.side_by_side([ph for _, ph in photos], rows, {
                short[r]: maps[r][method]["photos"] for r in names}, method,
                "your photos (--images): " + legend)
            paths.append(plots.save_figure(fig, os.path.join(out_dir, f"{method}_photos.png")))
    return paths


def check_images(lab: Lab) -> None:
    """An unreadable photo would otherwise surface after the training."""
    try:
        user_images(lab.s.images)
    except (OSError, ImageDecodeError) as e:
        raise LabError(f"--images: {e}") from e


def explain_key(lab: Lab) -> dict:
    names = detector_runs(lab)
    require_runs(lab, "explain", names)
    p = lab.stage_settings("explain")
    return {"exports": export_key(lab, names), "methods": list(p["methods"]),
            "options": EXPLAIN_OPTIONS,
            "per_class": p["explain_per_class"], "steps": p["faithfulness_steps"],
            "sanity": {"methods": sanity_methods(p), "per_class": SANITY_PER_CLASS,
                       "pass_below": sanity.PASS_BELOW, "independent": False},
            "mistakes": {"shown": MISTAKES_SHOWN, "scored": MISTAKES_SCORED,
                         "file": "<run>/mistakes.png"},
            "faithfulness": list(FAITHFULNESS_KEYS), "mufidelity": MUFIDELITY_SAMPLES,
            "images": [os.path.abspath(i) for i in lab.s.images]}


def stage_explain(lab: Lab) -> Done:
    names = detector_runs(lab)
    require_runs(lab, "explain", names)
    out_dir = lab.out_dir("explain")
    p = lab.stage_settings("explain")
    flags = {"runs": names, "method": list(p["methods"]),
             "num_examples": 2 * p["explain_per_class"], "class_name": "cat",
             "faithfulness": True, "faithfulness_steps": p["faithfulness_steps"],
             **EXPLAIN_OPTIONS, "images": list(lab.s.images)}
    commands = _commands(lab, names, out_dir)
    examples = fixed_examples(lab)
    classes = pipeline.load_manifest(lab.s.data_dir)["class_names"]
    labels = [f"test #{i}: {classes[c]}"
              for i, c in zip(examples["index"], examples["class_id"])]
    photos = user_images(lab.s.images)
    top3 = imagenet_top3(lab, list(examples["image"]) + [ph for _, ph in photos])
    batch = examples["image"].astype(np.float32)
    scores, maps, sane, seconds = {}, {}, {}, {"sanity": {}, "mistakes": {}}
    for run in names:
        scores[run], maps[run] = _explain_run(lab, run, batch, photos)
    paths = _figures(lab, names, examples, labels, photos, top3, maps, out_dir)
    few = pipeline.take_examples(lab.s.data_dir, SPLIT, 2 * SANITY_PER_CLASS,
                                 filter="balanced")["image"].astype(np.float32)
    mistakes = {}
    for run in names:
        t = time.perf_counter()
        sane[run], figs = _sanity_run(lab, run, few, out_dir)
        seconds["sanity"][run] = time.perf_counter() - t
        paths += figs
        t = time.perf_counter()
        mistakes[run] = _mistakes_figure(lab, run, out_dir)
        seconds["mistakes"][run] = time.perf_counter() - t
    outputs.save_faithfulness(scores, out_dir)
    result = {"figures": paths, "faithfulness": {r: {m: {k: s[k] for k in FAITHFULNESS_KEYS}
                                                     for m, s in per.items()}
                                                 for r, per in scores.items()},
              "num_images": len(labels), "photos": len(photos), "top3": top3 is not None,
              "sanity": {r: {m: {c: {"spearman": (v["cascading"][-1] if c ==
                                                  "model_randomization" else v)["spearman"],
                                     "ssim": (v["cascading"][-1] if c ==
                                              "model_randomization" else v)["ssim"],
                                     "verdict": v["verdict"]} for c, v in per.items()}
                             for m, per in sane[r].items()} for r in names},
              "sanity_images": 2 * SANITY_PER_CLASS, "seconds": seconds,
              "mistakes": mistakes}
    return Done(commands, flags, result)
