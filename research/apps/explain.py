r"""See what a CNN sees: Grad-CAM, Grad-CAM++, Score-CAM, saliency, SmoothGrad, feature maps
and filter patterns, for ImageNet models or our own detectors.

  python -m research.apps.explain --model=vgg16 --weights=imagenet --images=cat.jpg \
      --method=gradcam --out_dir=explain/
  python -m research.apps.explain --run_name=scratch --data_dir=data/cifar10 \
      --num_examples=8 --example_filter=positive --method=gradcam,saliency
  python -m research.apps.explain --run_name=scratch --images=cat.jpg \
      --visualize=activations,filters,dream --layers=stage0_relu,stage2_res0_add
  python -m research.apps.explain --run_name=scratch --data_dir=data/cifar10 \
      --num_examples=6 --compare_classes=cat,dog
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import cv2
import numpy as np
from absl import app, flags

from research.apps import config_flags

from research.explain import core, dream, features, loading, render

VISUALIZATIONS = ("activations", "filters", "dream")


def _default(fn, name):
    """The library's default, so that each default lives in one place."""
    return inspect.signature(fn).parameters[name].default


FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A keras.applications model: vgg16, vgg19, resnet50, "
                    "mobilenet_v2. Exclusive with --run_name.")
flags.DEFINE_string("weights", "imagenet", "imagenet | none | path to a weights file.")
flags.DEFINE_enum("precision", "auto", list(loading.PRECISIONS),
                  "auto: mixed_bfloat16 on CPUs with AMX or AVX512-BF16, else float32. "
                  "Gradients and maps are float32 either way.")
flags.DEFINE_string("run_name", None, "One of our training runs (its exported model).")
flags.DEFINE_string("checkpoint_dir", "checkpoints", "Parent folder of runs.")
flags.DEFINE_list("images", None, "Image files (JPEG/PNG/..., any size, gray or RGBA).")
flags.DEFINE_string("data_dir", None, "With --num_examples: TFRecords to take examples from.")
flags.DEFINE_integer("num_examples", 0, "Explain the first N examples of --split.")
flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split for --num_examples.")
flags.DEFINE_enum("example_filter", "all", ["all", "positive", "negative"],
                  "Which examples --num_examples takes.")
flags.DEFINE_list("method", ["gradcam"], ", ".join(core.METHODS) + " (several: one "
                  "sub-folder each).")
flags.DEFINE_string("layer", None, "Target layer for CAMs (default: the last spatial feature "
                    "map, searched inside nested sub-models). 'backbone/block5_conv3' works.")
flags.DEFINE_string("class_name", None, "Explain this class for every image (default: each "
                    "image's top prediction).")
flags.DEFINE_integer("class_index", None, "Explain this class index for every image.")
flags.DEFINE_list("compare_classes", [], "Class names: one figure, compare_classes.png, with "
                  "the first --method's map of each class side by side for every image.")
flags.DEFINE_float("alpha", _default(render.save_explanation, "alpha"),
                   "Overlay opacity of the heatmap.")
flags.DEFINE_integer("smoothgrad_samples", _default(core.smoothgrad, "n"),
                     "SmoothGrad: noisy samples.")
flags.DEFINE_float("smoothgrad_noise", _default(core.smoothgrad, "noise"),
                   "SmoothGrad: noise std as a fraction of the image's value range.")
flags.DEFINE_integer("scorecam_channels", _default(core.score_cam, "max_channels"),
                     "Score-CAM: channels used (highest mean first).")
flags.DEFINE_integer("scorecam_batch", _default(core.score_cam, "batch_size"),
                     "Score-CAM: masked images per forward pass (bounds the memory).")
flags.DEFINE_list("visualize", [], "Any of " + ", ".join(VISUALIZATIONS) + ", for --layers.")
flags.DEFINE_list("layers", [], "Layers for --visualize (default: the CAM layer, i.e. the "
                  "last spatial feature map).")
flags.DEFINE_integer("num_filters", 16, "Filters per layer for --visualize=filters.")
flags.DEFINE_integer("filter_steps", _default(features.visualize_filter, "steps"),
                     "Gradient-ascent steps per filter.")
flags.DEFINE_float("filter_step_size", _default(features.visualize_filter, "step_size"),
                   "RMS pixel change (0..255) per ascent step.")
flags.DEFINE_integer("dream_octaves", _default(dream.dream, "octaves"), "DeepDream: octaves.")
flags.DEFINE_float("dream_octave_scale", _default(dream.dream, "octave_scale"),
                   "DeepDream: size ratio between octaves.")
flags.DEFINE_integer("dream_steps", _default(dream.dream, "steps"),
                     "DeepDream: gradient-ascent steps per octave.")
flags.DEFINE_float("dream_step_size", _default(dream.dream, "step_size"),
                   "DeepDream: mean absolute pixel change (0..255) per step.")
flags.DEFINE_bool("faithfulness", False, "Also compute deletion/insertion AUCs per method.")
flags.DEFINE_integer("batch_size", 16, "Images explained per batch.")
flags.DEFINE_integer("seed", 0, "Seed for SmoothGrad noise, filter start images and DeepDream "
                     "jitter.")
flags.DEFINE_string("out_dir", "explain", "Output folder.")


def load_inputs(ex, errors):
    """[(name, original uint8 image, model-size float image, label or None)]."""
    from research.data.imaging import ImageDecodeError, decode_image, resize_image

    size = ex.input_size
    items = []
    for path in FLAGS.images or []:
        try:
            with open(path, "rb") as f:
                original = decode_image(f.read(), path)
        except (OSError, ImageDecodeError) as e:
            msg = e if isinstance(e, ImageDecodeError) else f"{path}: cannot read ({e})"
            print(f"error: {msg}", file=sys.stderr)
            errors.append(str(msg))
            continue
        # Stretch, not crop: the map must cover the whole original for the overlay.
        items.append((os.path.basename(path), original,
                      resize_image(original, size, "stretch").astype(np.float32), None))
    if FLAGS.num_examples:
        from research.data import pipeline

        if not FLAGS.data_dir:
            raise ValueError("--num_examples needs --data_dir")
        names = pipeline.load_manifest(FLAGS.data_dir)["class_names"]
        keep = {"all": (0, 1), "positive": (1,), "negative": (0,)}[FLAGS.example_filter]
        taken = 0
        for b in pipeline.make_dataset(FLAGS.data_dir, FLAGS.split, 500, training=False,
                                       scale="uint8"):
            for img, lab, cid, idx in zip(b["image"].numpy(), b["label"].numpy(),
                                          b["class_id"].numpy(), b["index"].numpy()):
                if taken >= FLAGS.num_examples:
                    break
                if lab not in keep:
                    continue
                name = f"{FLAGS.split}_{idx:05d}_{names[cid]}.png"
                items.append((name, img, resize_image(img, size, "stretch").astype(np.float32),
                              names[cid]))
                taken += 1
            if taken >= FLAGS.num_examples:
                break
    return items


def class_index_of(ex, name: str, flag: str) -> int:
    names = ex.class_names or []
    if name not in names:
        raise ValueError(f"--{flag}={name!r} is not a class of this model"
                         + (f"; classes: {', '.join(names[:20])}" if names else ""))
    return names.index(name)


def resolve_class(ex):
    if FLAGS.class_index is not None:
        return FLAGS.class_index
    if FLAGS.class_name is None:
        return None
    return class_index_of(ex, FLAGS.class_name, "class_name")


def explain_all(ex, method, batch, class_index):
    """core.explain over --batch_size chunks, merged into one Explanation."""
    params = {"smoothgrad": {"n": FLAGS.smoothgrad_samples, "noise": FLAGS.smoothgrad_noise,
                             "seed": FLAGS.seed},
              "scorecam": {"max_channels": FLAGS.scorecam_channels,
                           "batch_size": FLAGS.scorecam_batch}}.get(method, {})
    results = [core.explain(ex, method, batch[i:i + FLAGS.batch_size], class_index,
                            layer=FLAGS.layer, **params)
               for i in range(0, len(batch), FLAGS.batch_size)]
    first = results[0]
    return core.Explanation(*(np.concatenate([getattr(r, f) for r in results]) for f in
                              ("maps", "classes", "logits", "probabilities")),
                            first.method, first.layer, first.params)


def check_flags():
    """Flag errors that need no model, before any work."""
    if bool(FLAGS.model) == bool(FLAGS.run_name):
        raise ValueError("give exactly one of --model and --run_name")
    for m in FLAGS.method:
        if m not in core.METHODS:
            raise ValueError(f"--method: unknown method {m!r}; choose from "
                             f"{', '.join(core.METHODS)}")
    for v in FLAGS.visualize:
        if v not in VISUALIZATIONS:
            raise ValueError(f"--visualize: {v!r} is not one of {', '.join(VISUALIZATIONS)}")
    if FLAGS.scorecam_batch < 1:
        raise ValueError(f"--scorecam_batch={FLAGS.scorecam_batch} must be >= 1")
    if FLAGS.compare_classes and len(FLAGS.compare_classes) < 2:
        raise ValueError("--compare_classes needs at least two class names")


NUMERIC_RULES = (  # (flag, low, high, low allowed, high allowed)
    ("num_examples", 0, None, True, True), ("class_index", 0, None, True, True),
    ("alpha", 0, 1, True, True), ("smoothgrad_samples", 1, None, True, True),
    ("smoothgrad_noise", 0, None, True, True), ("scorecam_channels", 1, None, True, True),
    ("scorecam_batch", 1, None, True, True), ("num_filters", 1, None, True, True),
    ("filter_steps", 1, None, True, True), ("filter_step_size", 0, None, False, True),
    ("dream_octaves", 1, None, True, True), ("dream_octave_scale", 0, None, False, True),
    ("dream_steps", 1, None, True, True), ("dream_step_size", 0, None, False, True),
    ("batch_size", 1, None, True, True), ("seed", 0, 2**32 - 1, True, True),
)


def main(argv):
    del argv
    from research import plots
    from research.explain import faithfulness

    config_flags.exit_on_numeric_errors(NUMERIC_RULES)
    try:
        check_flags()
        precision = loading.resolve_precision(FLAGS.precision)
        if FLAGS.model:
            ex = loading.load_application(FLAGS.model, FLAGS.weights, precision)
            model_desc = f"{FLAGS.model} (weights={FLAGS.weights})"
        else:
            ex, _ = loading.load_run(FLAGS.checkpoint_dir, FLAGS.run_name, precision)
            model_desc = f"run {FLAGS.run_name}"
        compare = [class_index_of(ex, c, "compare_classes") for c in FLAGS.compare_classes]
        class_index = resolve_class(ex)
        if FLAGS.layer:
            core.find_layer(ex.model, FLAGS.layer)  # fail early, listing the candidates
        layers = [core.find_layer(ex.model, n)[0] for n in FLAGS.layers or [None]
                  ] if FLAGS.visualize or FLAGS.layers else []
        errors: list[str] = []
        items = load_inputs(ex, errors)
    except (loading.ModelLoadError, ValueError, core.LayerNotFoundError) as e:
        sys.exit(f"error: {e}")
    if not items:
        sys.exit("error: no images to explain (give --images or --num_examples)")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    print(f"{model_desc} at {precision}: {len(items)} image(s) -> {FLAGS.out_dir}")

    batch = np.stack([it[2] for it in items])
    logits = np.concatenate([np.asarray(ex.logits(batch[i:i + FLAGS.batch_size]))
                             for i in range(0, len(batch), FLAGS.batch_size)])
    if FLAGS.model and ex.class_names and len(ex.class_names) == 1000:
        from keras.applications.imagenet_utils import decode_predictions

        top3 = [[(n, float(p)) for _, n, p in row]
                for row in decode_predictions(ex.probabilities(logits), top=3)]
    else:
        top3 = loading.top_k(ex, logits, 3)
    for (name, *_), preds in zip(items, top3):
        print(f"  {name}: " + ", ".join(f"{c} {p:.3f}" for c, p in preds))

    scores = {}
    for method in FLAGS.method:
        out = FLAGS.out_dir if len(FLAGS.method) == 1 else os.path.join(FLAGS.out_dir, method)
        res = explain_all(ex, method, batch, class_index)
        for j, (name, original, _, label) in enumerate(items):
            record = {"model": model_desc, "method": method, "layer": res.layer,
                      "class_index": int(res.classes[j]),
                      "class_name": ex.class_name(int(res.classes[j])),
                      "logit": float(res.logits[j]), "probability": float(res.probabilities[j]),
                      "params": res.params, "seed": FLAGS.seed, "precision": precision,
                      "true_class": label, "image_size": list(original.shape[:2]),
                      "input_size": list(ex.input_size)}
            paths = render.save_explanation(out, name, original, res.maps[j], record,
                                            FLAGS.alpha)
            if j < 3 or j == len(items) - 1:
                print(f"  [{method}] {paths['overlay']}")
        if FLAGS.faithfulness:
            scores[method] = faithfulness.deletion_insertion(ex, batch, res)
            print(f"  [{method}] deletion AUC {scores[method]['deletion_auc']:.4f} (lower is "
                  f"better), insertion AUC {scores[method]['insertion_auc']:.4f} (higher is "
                  "better)")
    if scores:
        path = os.path.join(FLAGS.out_dir, "faithfulness.json")
        with open(path, "w") as f:
            json.dump(scores, f, indent=1)
        print(f"{'method':<18}{'deletion':>10}{'insertion':>11}   ({len(items)} images)")
        for m, s in scores.items():
            print(f"{m:<18}{s['deletion_auc']:>10.4f}{s['insertion_auc']:>11.4f}")

    if compare:
        method = FLAGS.method[0]
        per_class = [explain_all(ex, method, batch, c) for c in compare]
        titles = [[f"{ex.class_name(c)} p={p:.2f}" for p in r.probabilities]
                  for c, r in zip(compare, per_class)]
        fig = render.class_comparison_figure([it[1] for it in items],
                                             [r.maps for r in per_class], titles, FLAGS.alpha)
        dest = plots.save_figure(fig, os.path.join(FLAGS.out_dir, "compare_classes.png"))
        print(f"  compare classes ({method}): {dest}")

    if "activations" in FLAGS.visualize:
        for name, _, img, _ in items[:4]:
            outs = features.layer_outputs(ex, img, layers)
            for path, fmap in outs.items():
                fig = features.activation_grid(fmap, f"{name} / {path}")
                dest = os.path.join(FLAGS.out_dir, f"activations_{os.path.splitext(name)[0]}"
                                    f"_{path.replace('/', '_')}.png")
                plots.save_figure(fig, dest)
                print(f"  activations: {dest}")
    if "filters" in FLAGS.visualize:
        for layer in layers:
            path, lyr = core.find_layer(ex.model, layer)
            n = min(FLAGS.num_filters, int(lyr.output.shape[-1]))
            patterns = [features.visualize_filter(ex, layer, k, steps=FLAGS.filter_steps,
                                                  step_size=FLAGS.filter_step_size,
                                                  seed=FLAGS.seed + k) for k in range(n)]
            dest = os.path.join(FLAGS.out_dir, f"filters_{path.replace('/', '_')}.png")
            plots.save_figure(features.filter_grid(
                patterns, f"{path}: first {n} filters, mean activation start->end"), dest)
            print(f"  filters: {dest}")
    if "dream" in FLAGS.visualize:
        for name, _, img, _ in items[:4]:
            d = dream.dream(ex, img, layers, octaves=FLAGS.dream_octaves,
                            octave_scale=FLAGS.dream_octave_scale, steps=FLAGS.dream_steps,
                            step_size=FLAGS.dream_step_size, seed=FLAGS.seed)
            dest = os.path.join(FLAGS.out_dir, f"dream_{os.path.splitext(name)[0]}.png")
            cv2.imwrite(dest, d.image[:, :, ::-1])
            print(f"  dream: {dest} (mean activation of {', '.join(d.layers)}: "
                  f"{d.start_activation:.3f} -> {d.final_activation:.3f})")
    if errors:
        sys.exit(f"error: {len(errors)} image(s) could not be read; the others were explained")


if __name__ == "__main__":
    app.run(main)
