r"""See what a CNN sees: Grad-CAM, Grad-CAM++, Score-CAM, saliency, SmoothGrad, feature maps
and filter patterns, for ImageNet models or our own detectors.

  python -m research.apps.explain --model=vgg16 --weights=imagenet --images=cat.jpg \
      --method=gradcam --out_dir=explain/
  python -m research.apps.explain --run_name=scratch --data_dir=data/cifar10 \
      --num_examples=8 --example_filter=positive --method=gradcam,saliency
  python -m research.apps.explain --run_name=scratch --images=cat.jpg \
      --visualize=activations,filters --layers=stage0_relu,stage2_res0_add
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A keras.applications model: vgg16, vgg19, resnet50, "
                    "mobilenet_v2. Exclusive with --run_name.")
flags.DEFINE_string("weights", "imagenet", "imagenet | none | path to a weights file.")
flags.DEFINE_string("run_name", None, "One of our training runs (its exported model).")
flags.DEFINE_string("checkpoint_dir", "checkpoints", "Parent folder of runs.")
flags.DEFINE_list("images", None, "Image files (JPEG/PNG/..., any size, gray or RGBA).")
flags.DEFINE_string("data_dir", None, "With --num_examples: TFRecords to take examples from.")
flags.DEFINE_integer("num_examples", 0, "Explain the first N examples of --split.")
flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split for --num_examples.")
flags.DEFINE_enum("example_filter", "all", ["all", "positive", "negative"],
                  "Which examples --num_examples takes.")
flags.DEFINE_list("method", ["gradcam"], "gradcam, gradcam_pp, scorecam, saliency, smoothgrad "
                  "(several: one sub-folder each).")
flags.DEFINE_string("layer", None, "Target layer for CAMs (default: the last spatial feature "
                    "map, searched inside nested sub-models). 'backbone/block5_conv3' works.")
flags.DEFINE_string("class_name", None, "Explain this class for every image (default: each "
                    "image's top prediction).")
flags.DEFINE_integer("class_index", None, "Explain this class index for every image.")
flags.DEFINE_float("alpha", 0.4, "Overlay opacity of the heatmap.")
flags.DEFINE_integer("smoothgrad_samples", 25, "SmoothGrad: noisy samples.")
flags.DEFINE_float("smoothgrad_noise", 0.15, "SmoothGrad: noise std as a fraction of the "
                   "image's value range.")
flags.DEFINE_integer("scorecam_channels", 64, "Score-CAM: channels used (highest mean first).")
flags.DEFINE_list("visualize", [], "activations and/or filters, for --layers.")
flags.DEFINE_list("layers", [], "Layers for --visualize (default: the CAM layer, i.e. the "
                  "last spatial feature map).")
flags.DEFINE_integer("num_filters", 16, "Filters per layer for --visualize=filters.")
flags.DEFINE_integer("filter_steps", 40, "Gradient-ascent steps per filter.")
flags.DEFINE_float("filter_step_size", 2.0, "RMS pixel change (0..255) per ascent step.")
flags.DEFINE_bool("faithfulness", False, "Also compute deletion/insertion AUCs per method.")
flags.DEFINE_integer("batch_size", 16, "Images explained per batch.")
flags.DEFINE_integer("seed", 0, "Seed for SmoothGrad noise and filter start images.")
flags.DEFINE_string("out_dir", "explain", "Output folder.")


def load_inputs(ex, errors):
    """[(name, original uint8 image, model-size float image, label or None)]."""
    import numpy as np

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


def resolve_class(ex):
    if FLAGS.class_index is not None:
        return FLAGS.class_index
    if FLAGS.class_name is None:
        return None
    names = ex.class_names or []
    if FLAGS.class_name not in names:
        raise ValueError(f"--class_name={FLAGS.class_name!r} is not a class of this model"
                         + (f"; classes: {', '.join(names[:20])}" if names else ""))
    return names.index(FLAGS.class_name)


def main(argv):
    del argv
    import numpy as np

    from research.explain import core, faithfulness, features, render
    from research.explain.models import ModelLoadError, load_application, load_run, top_k
    from research import plots

    if bool(FLAGS.model) == bool(FLAGS.run_name):
        sys.exit("error: give exactly one of --model and --run_name")
    for m in FLAGS.method:
        if m not in core.METHODS:
            sys.exit(f"error: --method: unknown method {m!r}; choose from "
                     f"{', '.join(core.METHODS)}")
    for v in FLAGS.visualize:
        if v not in ("activations", "filters"):
            sys.exit(f"error: --visualize: {v!r} is not activations or filters")
    try:
        if FLAGS.model:
            ex = load_application(FLAGS.model, FLAGS.weights)
            model_desc = f"{FLAGS.model} (weights={FLAGS.weights})"
        else:
            ex, _ = load_run(FLAGS.checkpoint_dir, FLAGS.run_name)
            model_desc = f"run {FLAGS.run_name}"
        errors: list[str] = []
        items = load_inputs(ex, errors)
        class_index = resolve_class(ex)
        if FLAGS.layer:
            core.find_layer(ex.model, FLAGS.layer)  # fail early, listing the candidates
    except (ModelLoadError, ValueError, core.LayerNotFoundError) as e:
        sys.exit(f"error: {e}")
    if not items:
        sys.exit("error: no images to explain (give --images or --num_examples)")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    print(f"{model_desc}: {len(items)} image(s) -> {FLAGS.out_dir}")

    batch = np.stack([it[2] for it in items])
    logits = np.concatenate([np.asarray(ex.logits(batch[i:i + FLAGS.batch_size]))
                             for i in range(0, len(batch), FLAGS.batch_size)])
    if FLAGS.model and ex.class_names and len(ex.class_names) == 1000:
        from keras.applications.imagenet_utils import decode_predictions

        top3 = [[(n, float(p)) for _, n, p in row]
                for row in decode_predictions(ex.probabilities(logits), top=3)]
    else:
        top3 = top_k(ex, logits, 3)
    for (name, *_), preds in zip(items, top3):
        print(f"  {name}: " + ", ".join(f"{c} {p:.3f}" for c, p in preds))

    scores = {}
    for method in FLAGS.method:
        out = FLAGS.out_dir if len(FLAGS.method) == 1 else os.path.join(FLAGS.out_dir, method)
        params = {"smoothgrad": {"n": FLAGS.smoothgrad_samples, "noise": FLAGS.smoothgrad_noise,
                                 "seed": FLAGS.seed},
                  "scorecam": {"max_channels": FLAGS.scorecam_channels}}.get(method, {})
        results = []
        for i in range(0, len(batch), FLAGS.batch_size):
            results.append(core.explain(ex, method, batch[i:i + FLAGS.batch_size], class_index,
                                        layer=FLAGS.layer, **params))
        maps = np.concatenate([r.maps for r in results])
        classes = np.concatenate([r.classes for r in results])
        chosen_logits = np.concatenate([r.logits for r in results])
        probs = np.concatenate([r.probabilities for r in results])
        for j, (name, original, _, label) in enumerate(items):
            record = {"model": model_desc, "method": method, "layer": results[0].layer,
                      "class_index": int(classes[j]), "class_name": ex.class_name(int(classes[j])),
                      "logit": float(chosen_logits[j]), "probability": float(probs[j]),
                      "params": results[0].params, "seed": FLAGS.seed,
                      "true_class": label, "image_size": list(original.shape[:2]),
                      "input_size": list(ex.input_size)}
            paths = render.save_explanation(out, name, original, maps[j], record, FLAGS.alpha)
            if j < 3 or j == len(items) - 1:
                print(f"  [{method}] {paths['overlay']}")
        if FLAGS.faithfulness:
            merged = core.Explanation(maps, classes, chosen_logits, probs, method,
                                      results[0].layer, results[0].params)
            scores[method] = faithfulness.deletion_insertion(ex, batch, merged)
            print(f"  [{method}] deletion AUC {scores[method]['deletion_auc']:.4f} (lower is "
                  f"better), insertion AUC {scores[method]['insertion_auc']:.4f} (higher is "
                  "better)")
    if scores:
        path = os.path.join(FLAGS.out_dir, "faithfulness.json")
        with open(path, "w") as f:
            json.dump(scores, f, indent=1)
        print(f"{'method':<12}{'deletion':>10}{'insertion':>11}   ({len(items)} images)")
        for m, s in scores.items():
            print(f"{m:<12}{s['deletion_auc']:>10.4f}{s['insertion_auc']:>11.4f}")

    try:
        if "activations" in FLAGS.visualize:
            layers = FLAGS.layers or [core.find_layer(ex.model)[0]]
            for name, _, img, _ in items[:4]:
                outs = features.layer_outputs(ex, img, layers)
                for path, fmap in outs.items():
                    fig = features.activation_grid(fmap, f"{name} / {path}")
                    dest = os.path.join(FLAGS.out_dir, f"activations_{os.path.splitext(name)[0]}"
                                        f"_{path.replace('/', '_')}.png")
                    plots.save_figure(fig, dest)
                    print(f"  activations: {dest}")
        if "filters" in FLAGS.visualize:
            layers = FLAGS.layers or [core.find_layer(ex.model)[0]]
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
    except core.LayerNotFoundError as e:
        sys.exit(f"error: {e}")
    if errors:
        sys.exit(f"error: {len(errors)} image(s) could not be read; the others were explained")


if __name__ == "__main__":
    app.run(main)
