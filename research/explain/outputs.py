"""What the explain command writes, as library calls: the images to explain (files or TFRecord
examples), their top classes, the maps of each method with their figures and JSON sidecars,
the faithfulness scores, the class comparison, activation grids, filter patterns and dreams.
The explain app strings them together; the lab uses the same functions."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from keras.applications.imagenet_utils import decode_predictions

from research import files, plots
from research.data import pipeline
from research.data.imaging import (DEFAULT_RESIZE_POLICY, ImageDecodeError, crop_window,
                                   decode_image, encode_image, resize_image)
from research.errors import UserError
from research.explain import (activations, core, dream, faithfulness, loading, methods, render,
                              sanity)
from research.explain.options import ExplainOptions

EXAMPLE_FILTERS = {"all": (0, 1), "positive": (1,), "negative": (0,)}
# Filters that need the run's scores and threshold: (true label, decision), the most
# confident first (highest score for a "cat" decision, lowest for "not cat").
OUTCOME_FILTERS = {"false_positive": (0, 1), "false_negative": (1, 0),
                   "true_positive": (1, 1), "true_negative": (0, 0)}


@dataclasses.dataclass
class Item:
    name: str                  # file name for the outputs
    original: np.ndarray       # uint8, the part of the image the model sees, at its own size
    model_input: np.ndarray    # float32 0..255 at the model's input size
    label: str | None = None   # the true class of a TFRecord example
    photo: np.ndarray | None = None  # a file's whole photo, with `window` the part seen
    window: tuple | None = None      # (top, left, height, width) in the photo


def model_input(ex: core.Explainer, image: np.ndarray, policy: str = DEFAULT_RESIZE_POLICY
                ) -> np.ndarray:
    """The image at the model's input size under `policy` (imaging.resize_image: what
    make_tfrecords and predict do), float32 0..255."""
    return resize_image(image, ex.input_size, policy).astype(np.float32)


def image_items(ex: core.Explainer, paths, policy: str = DEFAULT_RESIZE_POLICY
                ) -> tuple[list[Item], list[str]]:
    """(items, errors): the photos that decode, resized under `policy` (the run's), and one
    message for each that does not. An item's `original` is the window the model sees (the
    centre crop), so that its maps overlay what was scored."""
    items, errors = [], []
    for path in paths or []:
        try:
            with open(path, "rb") as f:
                original = decode_image(f.read(), path)
        except (OSError, ImageDecodeError) as e:
            errors.append(str(e) if isinstance(e, ImageDecodeError)
                          else f"{path}: cannot read ({e})")
            continue
        top, left, h, w = crop_window(original.shape, ex.input_size, policy)
        items.append(Item(os.path.basename(path), original[top:top + h, left:left + w],
                          model_input(ex, original, policy), photo=original,
                          window=(top, left, h, w)))
    return items, errors


def check_example_filter(example_filter: str, meta: dict | None) -> None:
    """UserError (one line) for a filter that is unknown or needs a threshold the model lacks."""
    if example_filter not in EXAMPLE_FILTERS and example_filter not in OUTCOME_FILTERS:
        raise UserError(f"--example_filter: {example_filter!r} is not one of "
                        f"{', '.join([*EXAMPLE_FILTERS, *OUTCOME_FILTERS])}")
    if example_filter in OUTCOME_FILTERS and (
            meta is None or meta.get("classifier") or meta.get("threshold") is None):
        what = ("a keras.applications model" if meta is None else
                "a classifier" if meta.get("classifier") else "a run without a threshold")
        raise UserError(f"--example_filter={example_filter} needs a detector run with a "
                        f"threshold (--run_name); this is {what}")


def score_split(ex: core.Explainer, meta: dict, data_dir: str, split: str,
                batch_size: int = 256, limit: int | None = None) -> tuple[dict, np.ndarray]:
    """(the split's examples as take_examples gives them, the first `limit` if given,
    p(positive) of each as predict scores it: research.detector.Detector, mirror averaging
    as the run's metadata says)."""
    from research.detector import Detector

    model = ex.model if ex.model.dtype_policy.name == "float32" else loading.with_policy(
        ex.model, "float32")
    det = Detector(model, meta)
    found = pipeline.take_examples(data_dir, split, limit)
    scores = np.concatenate([det.score_batch(found["image"][i:i + batch_size])[0]
                             for i in range(0, len(found["image"]), batch_size)])
    return found, scores


def pick_outcome(ex: core.Explainer, found: dict, scores: np.ndarray, threshold: float,
                 names: list[str], split: str, num: int, example_filter: str
                 ) -> tuple[list[Item], int]:
    """(items, how many matched): the `num` most confident examples whose outcome at
    `threshold` is `example_filter` (OUTCOME_FILTERS)."""
    label, decision = OUTCOME_FILTERS[example_filter]
    said = scores >= threshold
    match = np.flatnonzero((found["label"] == label) & (said == bool(decision)))
    match = match[np.argsort(-scores[match] if decision else scores[match], kind="stable")]
    items = []
    for i in match[:num]:
        cid, idx = int(found["class_id"][i]), int(found["index"][i])
        img = found["image"][i]
        items.append(Item(f"{split}_{idx:05d}_{names[cid]}_p{scores[i]:.2f}.png", img,
                          model_input(ex, img), names[cid]))
    return items, len(match)


def outcome_items(ex: core.Explainer, meta: dict, data_dir: str, split: str, num: int,
                  example_filter: str, batch_size: int = 256) -> tuple[list[Item], int]:
    """(items, how many matched): the `num` most confident examples of `split` whose outcome
    at the run's threshold is `example_filter` (OUTCOME_FILTERS), scored as predict does."""
    check_example_filter(example_filter, meta)
    found, scores = score_split(ex, meta, data_dir, split, batch_size)
    names = pipeline.load_manifest(data_dir)["class_names"]
    return pick_outcome(ex, found, scores, meta["threshold"], names, split, num,
                        example_filter)


def example_items(ex: core.Explainer, data_dir: str, split: str, num: int,
                  example_filter: str = "all") -> list[Item]:
    """The first `num` examples of `split` that pass `example_filter`, in split order."""
    if example_filter not in EXAMPLE_FILTERS:
        raise UserError(f"--example_filter: {example_filter!r} is not one of "
                        f"{', '.join(EXAMPLE_FILTERS)}")
    names = pipeline.load_manifest(data_dir)["class_names"]
    found = pipeline.take_examples(data_dir, split, num, filter=example_filter)
    return [Item(f"{split}_{idx:05d}_{names[cid]}.png", img, model_input(ex, img), names[cid])
            for img, cid, idx in zip(found["image"], found["class_id"], found["index"])]


def class_index_of(ex: core.Explainer, name: str, flag: str) -> int:
    names = ex.class_names or []
    if name not in names:
        raise UserError(f"--{flag}={name!r} is not a class of this model"
                        + (f"; classes: {', '.join(names[:20])}" if names else ""))
    return names.index(name)


def logits_of(ex: core.Explainer, batch: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(ex.logits(batch[i:i + batch_size]))
                           for i in range(0, len(batch), batch_size)])


def top_classes(ex: core.Explainer, logits: np.ndarray, k: int = 3
                ) -> list[list[tuple[str, float]]]:
    """The k most likely classes of each image (ImageNet names for a 1,000-class model)."""
    probs = ex.probabilities(logits)
    if ex.class_names and len(ex.class_names) == 1000:
        return [[(n, float(p)) for _, n, p in row] for row in decode_predictions(probs, top=k)]
    return loading.top_k(ex, logits, k)


def explain_batched(ex: core.Explainer, method: str, batch: np.ndarray, class_index,
                    options: ExplainOptions, layer: str | None = None) -> core.Explanation:
    """methods.explain over `options.batch_size` chunks, merged into one Explanation."""
    bs = options.batch_size
    per_image = np.ndim(class_index) == 1  # one class per image: sliced with the batch
    results = [methods.explain(ex, method, batch[i:i + bs],
                               np.asarray(class_index)[i:i + bs] if per_image else class_index,
                               layer=layer, **options.method_params(method))
               for i in range(0, len(batch), bs)]
    first = results[0]
    return core.Explanation(*(np.concatenate([getattr(r, f) for r in results]) for f in
                              ("maps", "classes", "logits", "probabilities")),
                            first.method, first.layer, first.params,
                            extras={k: np.concatenate([r.extras[k] for r in results])
                                    for k in first.extras})


def title_classes(ex: core.Explainer, logits: np.ndarray
                  ) -> list[list[tuple[str, float]]] | None:
    """The top-3 classes of each image for the figures' titles and sidecars, for models of
    three or more classes (ImageNet's 1,000 by name); None for detectors."""
    if logits.ndim != 2 or logits.shape[1] < 3:
        return None
    return top_classes(ex, logits)


def save_lime_top(res: core.Explanation, j: int, item: Item, out_dir: str, k: int) -> str:
    """lime_top<k>_<stem>.png: the image with only its k best superpixels."""
    img = render.top_superpixels(item.original, res.extras["segments"][j],
                                 res.extras["superpixel_weights"][j], k)
    dest = os.path.join(out_dir, f"lime_top{k}_{os.path.splitext(item.name)[0]}.png")
    return files.write_bytes(dest, encode_image(img, dest), "LIME's top superpixels")


def save_method(ex: core.Explainer, res: core.Explanation, items: list[Item], out_dir: str,
                about: dict, options: ExplainOptions, tops: list | None = None) -> list[dict]:
    """Per image: the overlay, the bare map, the three-panel figure and the JSON sidecar
    (render.save_explanation); `about` goes into every sidecar (model, precision, ...);
    `tops` (title_classes) into the titles and sidecars; a method's per-image numbers
    (integrated gradients' completeness) into the sidecars; LIME's top superpixels too."""
    out = []
    for j, item in enumerate(items):
        extra = {k: float(v[j]) for k, v in res.extras.items() if v.ndim == 1}
        if tops is not None:
            extra["top_classes"] = [[n, p] for n, p in tops[j]]
        if "superpixel_weights" in res.extras:
            extra["lime_top"] = save_lime_top(res, j, item, out_dir, options.lime_top)
        if item.window is not None:
            extra["window"] = list(item.window)
        record = {**about, "method": res.method, "layer": res.layer,
                  "class_index": int(res.classes[j]),
                  "class_name": ex.class_name(int(res.classes[j])),
                  "logit": float(res.logits[j]), "probability": float(res.probabilities[j]),
                  "params": res.params, "seed": options.seed, "true_class": item.label,
                  "image_size": list((item.original if item.photo is None
                                      else item.photo).shape[:2]),
                  "input_size": list(ex.input_size), **extra}
        if item.photo is None:
            out.append(render.save_explanation(out_dir, item.name, item.original, res.maps[j],
                                               record, options.alpha))
        else:
            out.append(render.save_explanation(out_dir, item.name, item.photo, res.maps[j],
                                               record, options.alpha, item.window))
    return out


def save_faithfulness(scores: dict, out_dir: str) -> str:
    return files.write_json(os.path.join(out_dir, "faithfulness.json"), scores,
                            "the faithfulness scores")


def faithfulness_of(ex: core.Explainer, batch: np.ndarray, res: core.Explanation,
                    seed: int = 0) -> dict:
    """Deletion/insertion, ROAD, MuFidelity, Average Drop / Increase in Confidence."""
    return faithfulness.all_scores(ex, batch, res, seed=seed)


def faithfulness_table(scores: dict, num_images: int) -> list[str]:
    """The faithfulness scores of each method as printed lines (a header first)."""
    cols = faithfulness.SCORE_COLUMNS
    w = max([18] + [len(m) + 2 for m in scores])
    lines = [f"{'method':<{w}}" + "".join(f"{name:>13}" for _, name, _ in cols)
             + f"   ({num_images} images)",
             f"{'':<{w}}" + "".join(f"{better + ' best':>13}" for _, _, better in cols)]
    for m, s in scores.items():
        lines.append(f"{m:<{w}}" + "".join(f"{s[k]:>13.4f}" for k, _, _ in cols))
    return lines


def save_class_comparison(ex: core.Explainer, items: list[Item], method: str, classes,
                          options: ExplainOptions, out_dir: str,
                          layer: str | None = None, model_desc: str | None = None) -> str:
    """compare_classes.png: per image, the image and `method`'s map for each class, titled
    with `model_desc` (the explained model) and the method."""
    batch = np.stack([it.model_input for it in items])
    per_class = [explain_batched(ex, method, batch, c, options, layer) for c in classes]
    titles = [[f"{ex.class_name(c)} p={p:.2f}" for p in r.probabilities]
              for c, r in zip(classes, per_class)]
    fig = render.class_comparison_figure([it.original for it in items],
                                         [r.maps for r in per_class], titles, options.alpha,
                                         title=(f"{model_desc}: " if model_desc else "")
                                         + f"{method} of each class")
    return plots.save_figure(fig, os.path.join(out_dir, "compare_classes.png"))


def save_methods_figure(results: dict, items: list[Item], out_dir: str, options: ExplainOptions,
                        model_desc: str | None = None, num_images: int = 2) -> str:
    """all_methods.png: the first `num_images` images, each with every method's map of
    `results` ({method: Explanation over `items`}) side by side."""
    shown = items[:num_images]
    titles = [[f"{m} ({ex_.layer.split(' ')[0]})" if ex_.layer else m for _ in shown]
              for m, ex_ in results.items()]
    fig = render.class_comparison_figure([it.original for it in shown],
                                         [r.maps[:len(shown)] for r in results.values()],
                                         titles, options.alpha,
                                         title=(f"{model_desc}: " if model_desc else "")
                                         + "every method, each image's explained class")
    return plots.save_figure(fig, os.path.join(out_dir, "all_methods.png"))


def save_activations(ex: core.Explainer, items: list[Item], layers: list[str], out_dir: str,
                     options: ExplainOptions, model_desc: str | None = None) -> list[str]:
    """One grid of feature maps per image and layer, titled with `model_desc` (the explained
    model) and the image."""
    paths = []
    for item in items:
        stem = os.path.splitext(item.name)[0]
        paths += activations.save_activation_grids(ex, item.model_input, layers, out_dir,
                                                   f"activations_{stem}",
                                                   f"{model_desc}: {item.name}" if model_desc
                                                   else item.name,
                                                   options.max_channels)
    return paths


def save_filters(ex: core.Explainer, layers: list[str], out_dir: str, title: str,
                 options: ExplainOptions, name: str = "filters") -> list[str]:
    return activations.save_filter_grids(ex, layers, out_dir, name, title, options.num_filters,
                                         seed=options.seed, steps=options.filter_steps,
                                         step_size=options.filter_step_size)


def save_dreams(ex: core.Explainer, items: list[Item], layers: list[str], out_dir: str,
                options: ExplainOptions) -> list[tuple[str, dream.Dream]]:
    out = []
    for item in items:
        d = dream.dream(ex, item.model_input, layers, **options.dream_params())
        dest = os.path.join(out_dir, f"dream_{os.path.splitext(item.name)[0]}.png")
        files.write_bytes(dest, encode_image(d.image, dest), "a dream")
        out.append((dest, d))
    return out


# ---------------------------------------------------------------------------------------------
# Sanity checks (research.explain.sanity).

def sanity_checks(ex: core.Explainer, batch: np.ndarray, names: list[str], checks,
                  options: ExplainOptions, class_index=None, layer: str | None = None,
                  independent: bool = True) -> dict:
    """{method: {check: result}} of `checks` (sanity.CHECKS) for each method on `batch`, the
    class fixed to each image's explained one (its top class unless `class_index`);
    `independent`: also each layer randomised alone."""
    classes = np.asarray(ex.class_indices(len(batch), class_index))
    if np.any(classes < 0):
        classes = np.argmax(logits_of(ex, batch, options.batch_size), -1)
    out = {}
    for method in names:
        def explain(ex_, images, cls, _m=method):
            return explain_batched(ex_, _m, images, np.asarray(cls), options, layer).maps

        res = {}
        if "model_randomization" in checks:
            res["model_randomization"] = sanity.model_randomization(
                ex, explain, batch, classes, options.seed, independent=independent)
        if "random_logit" in checks and not methods.find(method).class_agnostic:
            res["random_logit"] = sanity.random_logit(
                ex, explain, batch, classes, int(ex.model.output.shape[-1]), options.seed)
        out[method] = res
    return out


def sanity_json(results: dict) -> dict:
    return {m: {c: sanity.without_maps(r) for c, r in per.items()} for m, per in
            results.items()}


def sanity_figures(results: dict, image: np.ndarray, out_dir: str, title: str,
                   max_columns: int = 8, alpha: float = 0.4) -> list[str]:
    """sanity_maps.png (per method: the original map of the first image, then the map after
    each cascading step, at most `max_columns` steps evenly spaced) and sanity_curves.png
    (Spearman and SSIM against the layers randomised, cascading solid, independent dashed)."""
    from matplotlib.figure import Figure

    from research.explain.render import HEATMAP_CMAP, overlay_heatmap

    runs = {m: r["model_randomization"] for m, r in results.items()
            if "model_randomization" in r}
    paths = []
    if runs:
        first = next(iter(runs.values()))
        n = len(first["layers"])
        steps = sorted(set(np.linspace(0, n - 1, min(n, max_columns)).round().astype(int)))
        fig, axes = plots.grid_figure(len(runs), 1 + len(steps), cell=1.5, title_lines=2,
                                      suptitle_lines=2, colorbar=True)
        big = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        for i, (m, r) in enumerate(runs.items()):
            cells = [("original", r["maps"]["original"][0])] + [
                (f"top {s + 1} random\n{r['layers'][s].split('/')[-1][:16]}",
                 r["maps"]["cascading"][s][0]) for s in steps]
            for j, (name, heat) in enumerate(cells):
                axes[i, j].imshow(overlay_heatmap(big, heat, alpha)[1])
                axes[i, j].set_title(f"{m}: {name}" if j == 0 else name, fontsize=7)
        fig.suptitle(f"{title}\ncascading model randomisation, from the logits down", fontsize=9)
        plots.add_colorbar(fig, axes, HEATMAP_CMAP)
        paths.append(plots.save_figure(fig, os.path.join(out_dir, "sanity_maps.png")))
        fig = Figure(figsize=(11, 4))
        axes = fig.subplots(1, 2)
        for ax, key in zip(axes, ("spearman", "ssim")):
            for m, r in runs.items():
                x = np.arange(1, len(r["layers"]) + 1)
                line, = ax.plot(x, [c[key] for c in r["cascading"]], marker=".", label=m)
                if r["independent"]:
                    ax.plot(x, [c[key] for c in r["independent"]], ls="--",
                            color=line.get_color())
            ax.axhline(sanity.PASS_BELOW if key == "spearman" else 0, color="grey", lw=0.5)
            ax.set(xlabel="layers from the top (cascading: 1..j random; dashed: j alone)",
                   ylabel=key, title=f"{key} with the original map", ylim=(-1.05, 1.05))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        paths.append(plots.save_figure(fig, os.path.join(out_dir, "sanity_curves.png")))
    return paths


def save_sanity(results: dict, out_dir: str) -> str:
    return files.write_json(os.path.join(out_dir, "sanity.json"), sanity_json(results),
                            "the sanity checks")


def sanity_rows(results: dict) -> list[list[str]]:
    """[method, check, spearman, ssim, verdict]: the cascade's end for model randomisation."""
    rows = []
    for m, per in results.items():
        for c, r in per.items():
            last = r["cascading"][-1] if c == "model_randomization" else r
            rows.append([m, c, f"{last['spearman']:.3f}", f"{last['ssim']:.3f}", r["verdict"]])
    return rows
