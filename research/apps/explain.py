r"""See what a CNN sees: Grad-CAM, Grad-CAM++, Score-CAM, CAM, saliency, SmoothGrad, guided
backprop, guided Grad-CAM, integrated gradients, occlusion, LIME, feature maps and filter
patterns, for ImageNet models or our own detectors (docs/explain.md).

  python -m research.apps.explain --model=vgg16 --weights=imagenet --images=cat.jpg \
      --method=gradcam --out_dir=explain/
  python -m research.apps.explain --run_name=scratch --data_dir=data/cifar10 \
      --num_examples=8 --example_filter=positive --method=gradcam,saliency
  python -m research.apps.explain --run_name=scratch --images=cat.jpg \
      --visualize=activations,filters,dream --layers=stage0_relu,stage2_res0_add
  python -m research.apps.explain --run_name=scratch --data_dir=data/cifar10 \
      --num_examples=6 --compare_classes=cat,dog
  python -m research.apps.explain --run_name=scratch --data_dir=data/cifar10 \
      --num_examples=2 --method=all --faithfulness      # all_methods.png
  python -m research.apps.explain --run_name=scratch --visualize=filters  # no images needed
  python -m research.apps.explain --run_name=scratch --visualize=receptive_field  # ERF vs RF

The knobs of the methods and pictures are fields of research.explain.options.ExplainOptions;
the work is research.explain.outputs.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags

from research import runs
from research.apps import config_flags
from research.data import imaging
from research.errors import UserError
from research.explain import source_values
from research.explain.options import PRECISIONS, ExplainOptions
from research.model_options import APPLICATIONS, BACKBONES, SAVEDMODEL, SavedModelOptions

# The names the flags offer, read from the modules' source: TensorFlow loads only once the flags
# and files are known good (the modules are imported in main).
METHODS = source_values.record_names("methods", "METHODS")
EXAMPLE_FILTERS = source_values.keys("outputs", "EXAMPLE_FILTERS")
OUTCOME_FILTERS = source_values.keys("outputs", "OUTCOME_FILTERS")
SANITY_CHECKS = source_values.constant("sanity", "CHECKS")

VISUALIZATIONS = ("activations", "filters", "dream", "receptive_field")
NO_IMAGES = {"filters", "receptive_field"}  # pictures that need no image
SHOWN = 4  # images whose activations and dreams are drawn

FLAGS = flags.FLAGS
config_flags.define_max_image_pixels()
flags.DEFINE_string("model", None, "A keras.applications model: "
                    + ", ".join(APPLICATIONS) + ", or savedmodel (--savedmodel_dir). "
                    "Exclusive with --run_name.")
flags.DEFINE_string("weights", "imagenet", "imagenet | none | path to a weights file.")
flags.DEFINE_enum("precision", "auto", list(PRECISIONS),
                  "auto: mixed_bfloat16 on CPUs with AMX or AVX512-BF16, else float32. "
                  "Gradients and maps are float32 either way.")
flags.DEFINE_string("run_name", None, "One of our training runs (its exported model).")
flags.DEFINE_string("checkpoint_dir", runs.CHECKPOINT_DIR, "Parent folder of runs.")
config_flags.define_image_flags("Image files (JPEG/PNG/..., any size, gray or RGBA).")
flags.DEFINE_string("data_dir", None, "With --num_examples: TFRecords to take examples from.")
config_flags.define_integer("num_examples", 0, "Explain the first N examples of --split.",
                            ge=0)
flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split for --num_examples.")
flags.DEFINE_enum("example_filter", "all", [*EXAMPLE_FILTERS, *OUTCOME_FILTERS],
                  "Which examples --num_examples takes: the first of a label (all, positive, "
                  "negative), or a detector's outcome at the run's threshold, most confident "
                  "first (false_positive, ...: the split is scored as predict scores it).")
flags.DEFINE_enum("resize_policy", None, list(imaging.RESIZE_POLICIES),
                  "How --images are fitted to the network (default: the run's recorded "
                  "policy, as predict; center_crop for --model). The maps are drawn on the "
                  "whole photo with the network's window framed.")
flags.DEFINE_list("method", ["gradcam"], ", ".join(METHODS) + " (several: one "
                  "sub-folder each, and all_methods.png); all: every method that fits the "
                  "model (cam needs a GlobalAveragePooling2D + Dense head).")
flags.DEFINE_string("layer", None, "Target layer for CAMs (default: the last spatial feature "
                    "map, searched inside nested sub-models). 'backbone/block5_conv3' works.")
flags.DEFINE_string("class_name", None, "Explain this class for every image (default: each "
                    "image's top prediction).")
config_flags.define_integer("class_index", None, "Explain this class index for every image.",
                            ge=0)
flags.DEFINE_list("compare_classes", [], "Class names: one figure, compare_classes.png, with "
                  "the first --method's map of each class side by side for every image.")
flags.DEFINE_list("visualize", [], "Any of " + ", ".join(VISUALIZATIONS) + ", for --layers.")
flags.DEFINE_list("layers", [], "Layers for --visualize (default: the CAM layer, i.e. the "
                  "last spatial feature map).")
flags.DEFINE_bool("faithfulness", False, "Also score each method's faithfulness: deletion/"
                  "insertion AUCs, ROAD (MoRF, LeRF), MuFidelity, Average Drop and Increase "
                  "in Confidence -> faithfulness.json and a table.")
flags.DEFINE_list("sanity", [], "Sanity checks of each --method (Adebayo et al. 2018): "
                  + ", ".join(SANITY_CHECKS) + " -> sanity.json, sanity_maps.png, "
                  "sanity_curves.png (docs/explain.md).")
flags.DEFINE_string("out_dir", "explain", "Output folder.")
config_flags.define_flags(ExplainOptions)
config_flags.define_flags(SavedModelOptions)
config_flags.define_device_flags()
# What a SavedModel (run whole in one TFSMLayer) cannot give: an inner feature map or ReLUs.
SAVEDMODEL_WHY = ("a SavedModel runs whole in one keras.layers.TFSMLayer, with no inner "
                  "feature map or ReLU to reach: use saliency, smoothgrad, "
                  "integrated_gradients, occlusion or lime")


def inside_methods() -> tuple:
    """The methods that need the model's inside (call once TensorFlow may load)."""
    from research.explain import methods

    return tuple(m.name for m in methods.METHODS if m.needs_inside)


def cam_layer() -> str | None:
    """--layer, else the backbone record's Grad-CAM layer for --model (the last feature map,
    which core.find_layer would pick), else None (find_layer's default)."""
    if FLAGS.layer or FLAGS.model not in APPLICATIONS:
        return FLAGS.layer
    return BACKBONES[FLAGS.model].cam_layer


def check_flags() -> None:
    """Flag and file errors that need no model, before TensorFlow loads."""
    if bool(FLAGS.model) == bool(FLAGS.run_name):
        raise UserError("give exactly one of --model and --run_name")
    if FLAGS.model and FLAGS.model not in (*APPLICATIONS, SAVEDMODEL):
        raise UserError(f"--model: unknown model {FLAGS.model!r}; choose one of "
                        f"{', '.join((*APPLICATIONS, SAVEDMODEL))}")
    if FLAGS.model == SAVEDMODEL and not FLAGS.savedmodel_dir:
        raise UserError("--model=savedmodel needs --savedmodel_dir")
    if FLAGS.run_name:
        model_path = runs.exported_model_path(FLAGS.checkpoint_dir, FLAGS.run_name)
        if os.path.isfile(model_path):  # else load_run says what the run lacks
            runs.read_metadata(model_path, "--run_name")
    for m in FLAGS.method:
        if m not in METHODS and m != "all":
            raise UserError(f"--method: unknown method {m!r}; choose from "
                            f"{', '.join(METHODS)}")
    for v in FLAGS.visualize:
        if v not in VISUALIZATIONS:
            raise UserError(f"--visualize: {v!r} is not one of {', '.join(VISUALIZATIONS)}")
    if FLAGS.compare_classes and len(FLAGS.compare_classes) < 2:
        raise UserError("--compare_classes needs at least two class names")
    if FLAGS.num_examples and not FLAGS.data_dir:
        raise UserError("--num_examples needs --data_dir")
    for path in config_flags.image_paths():
        if not os.path.isfile(path):
            raise UserError(f"--images: no such file {path}")


def load():
    """(explainer, its description, precision, the run's export metadata or None) of --model
    or --run_name."""
    from research.explain import loading

    precision = loading.resolve_precision(FLAGS.precision)
    if FLAGS.model == SAVEDMODEL:  # float32: the SavedModel's own graph and dtypes
        from research.explain import core
        from research.models.savedmodel import savedmodel_model

        opts = SavedModelOptions(**config_flags.values_from_flags(SavedModelOptions))
        return (core.Explainer(savedmodel_model(opts)), f"SavedModel {opts.savedmodel_dir}",
                "float32", None)
    if FLAGS.model:
        return (loading.load_application(FLAGS.model, FLAGS.weights, precision),
                f"{FLAGS.model} (weights={FLAGS.weights})", precision, None)
    ex, meta = loading.load_run(FLAGS.checkpoint_dir, FLAGS.run_name, precision)
    return ex, f"run {FLAGS.run_name}", precision, meta


def detector_lines(ex, meta: dict, items) -> list[str]:
    """The run's score of each image exactly as predict gives it (mirror averaging as its
    metadata says, float32), and the decision at the run's threshold."""
    from research.detector import Detector  # TensorFlow is loaded by now
    from research.explain import loading

    model = ex.model if ex.model.dtype_policy.name == "float32" else loading.with_policy(
        ex.model, "float32")
    det = Detector(model, meta)
    scores, _ = det.score_batch(np.stack([it.model_input for it in items]).astype(np.uint8))
    return [f"  {it.name}: p({det.positive_class})={s:.4f} (as predict)\t"
            f"{det.decision(s, meta['threshold'])} at threshold {meta['threshold']:.4f}"
            for it, s in zip(items, scores)]


def chosen_methods(ex) -> list[str]:
    """--method with 'all' expanded (a method whose record `requires` what the model lacks,
    such as cam's head, only where the model has it); a method the model cannot have is a
    one-line error."""
    from research.explain import methods

    names = []
    for m in FLAGS.method:
        for name in (methods.NAMES if m == "all" else [m]):
            if FLAGS.model == SAVEDMODEL and name in inside_methods():  # only with all
                print(f"  --method=all: {name} skipped ({SAVEDMODEL_WHY})")
                continue
            requires = methods.BY_NAME[name].requires
            if requires is not None:
                try:
                    requires(ex.model)
                except UserError as e:
                    if m != "all":
                        raise UserError(f"--method={name}: {e}") from None
                    print(f"  --method=all: {name} skipped ({e})")
                    continue
            if name not in names:
                names.append(name)
    return names


def explain_methods(ex, items, batch, class_index, about, options, names, tops) -> None:
    from research.explain import outputs

    scores, results = {}, {}
    for method in names:
        out = FLAGS.out_dir if len(names) == 1 else os.path.join(FLAGS.out_dir, method)
        res = outputs.explain_batched(ex, method, batch, class_index, options, cam_layer())
        results[method] = res
        saved = outputs.save_method(ex, res, items, out, about, options, tops)
        for j, paths in enumerate(saved):
            if j < 3 or j == len(saved) - 1:
                print(f"  [{method}] {paths['overlay']}")
        if FLAGS.faithfulness:
            scores[method] = outputs.faithfulness_of(ex, batch, res, options.seed)
            print(f"  [{method}] deletion AUC {scores[method]['deletion_auc']:.4f} (lower is "
                  f"better), insertion AUC {scores[method]['insertion_auc']:.4f} (higher is "
                  f"better), ROAD MoRF {scores[method]['road_morf']:.4f} / LeRF "
                  f"{scores[method]['road_lerf']:.4f}")
    if len(results) > 1:
        dest = outputs.save_methods_figure(results, items, FLAGS.out_dir, options,
                                           about["model"])
        print(f"  all methods: {dest}")
    if scores:
        outputs.save_faithfulness(scores, FLAGS.out_dir)
        for line in outputs.faithfulness_table(scores, len(items)):
            print(line)


def visualize(ex, items, layers, options, model_desc: str) -> None:
    from research.explain import outputs

    if "activations" in FLAGS.visualize:
        for dest in outputs.save_activations(ex, items[:SHOWN], layers, FLAGS.out_dir, options,
                                             model_desc):
            print(f"  activations: {dest}")
    if "filters" in FLAGS.visualize:
        for dest in outputs.save_filters(ex, layers, FLAGS.out_dir, f"{model_desc}: filters",
                                         options):
            print(f"  filters: {dest}")
    if "dream" in FLAGS.visualize:
        for dest, d in outputs.save_dreams(ex, items[:SHOWN], layers, FLAGS.out_dir, options):
            print(f"  dream: {dest} (mean activation of {', '.join(d.layers)}: "
                  f"{d.start_activation:.3f} -> {d.final_activation:.3f})")
    if "receptive_field" in FLAGS.visualize:  # the given images, else Luo et al.'s noise
        from research.explain import receptive

        images = (np.stack([it.model_input for it in items]) if items else
                  receptive.random_images(16, ex.input_size, ex.model.input.shape[-1],
                                          options.seed))
        for dest, f in receptive.save_receptive_fields(ex, layers, images, FLAGS.out_dir,
                                                       model_desc):
            print(f"  receptive field: {dest} ({f.layer}: theoretical "
                  f"{f.theoretical or 'whole input'} px, effective (90% of the gradient) "
                  f"{f.erf_side} px, over {f.images} images)")


def example_items(ex, meta) -> list:
    """--num_examples examples of --split under --example_filter; for an outcome filter, says
    how many matched (fewer than asked, even none, is not an error)."""
    from research.explain import outputs

    if FLAGS.example_filter not in OUTCOME_FILTERS:
        return outputs.example_items(ex, FLAGS.data_dir, FLAGS.split, FLAGS.num_examples,
                                     FLAGS.example_filter)
    items, matched = outputs.outcome_items(ex, meta, FLAGS.data_dir, FLAGS.split,
                                           FLAGS.num_examples, FLAGS.example_filter)
    print(f"--example_filter={FLAGS.example_filter}: {matched} of {FLAGS.split} matched at "
          f"threshold {meta['threshold']:.4f}; explaining the {len(items)} most confident")
    return items


def run_sanity(ex, batch, names, class_index, options, model_desc: str) -> None:
    from research.explain import outputs, sanity

    results = outputs.sanity_checks(ex, batch, names, FLAGS.sanity, options, class_index,
                                    cam_layer())
    print(f"  sanity: {outputs.save_sanity(results, FLAGS.out_dir)}")
    for dest in outputs.sanity_figures(results, batch[0], FLAGS.out_dir,
                                       f"{model_desc}: sanity checks", alpha=options.alpha):
        print(f"  sanity: {dest}")
    rows = outputs.sanity_rows(results)
    w = max([len("method")] + [len(r[0]) for r in rows]) + 2
    print(f"{'method':<{w}}{'check':<21}{'spearman':>9}{'ssim':>8}  verdict "
          f"(pass: spearman < {sanity.PASS_BELOW} once random)")
    for m, c, sp, ss, v in rows:
        print(f"{m:<{w}}{c:<21}{sp:>9}{ss:>8}  {v}")


def main(argv):
    del argv
    try:
        check_flags()
        options = ExplainOptions(**config_flags.values_from_flags(ExplainOptions))
    except UserError as e:
        config_flags.fail(e)
    config_flags.setup_devices()
    # the heavy imports, once the input is good
    from research.explain import core, methods, outputs, sanity

    try:
        # The checks that need the explanation modules, before any model is loaded.
        if FLAGS.model and FLAGS.example_filter in OUTCOME_FILTERS:
            outputs.check_example_filter(FLAGS.example_filter, None)
        sanity.check_request(FLAGS.sanity, [m for m in FLAGS.method if m != "all"], None)
        inside = [m for m in FLAGS.method if m in inside_methods()]
        if FLAGS.model == SAVEDMODEL and inside:
            raise UserError(f"--method={inside[0]}: {SAVEDMODEL_WHY}")
        ex, model_desc, precision, meta = load()
        compare = [outputs.class_index_of(ex, c, "compare_classes")
                   for c in FLAGS.compare_classes]
        class_index = FLAGS.class_index
        if class_index is None and FLAGS.class_name is not None:
            class_index = outputs.class_index_of(ex, FLAGS.class_name, "class_name")
        for name in (cam_layer() or "").split(","):
            if name:
                core.find_layer(ex.model, name)  # fail early, listing the candidates
        layers = [core.find_layer(ex.model, n)[0] for n in FLAGS.layers or [None]
                  ] if FLAGS.visualize or FLAGS.layers else []
        if FLAGS.example_filter in OUTCOME_FILTERS:
            outputs.check_example_filter(FLAGS.example_filter, meta)
        names = chosen_methods(ex)
        need_layer = [m for m in names if methods.BY_NAME[m].layer]
        if need_layer and not FLAGS.layer and not core.spatial_layers(ex.model):
            raise UserError(f"--method={need_layer[0]} needs a 4-D (N, H, W, C) layer and "
                            f"{ex.model.name} has none")
        sanity.check_request(FLAGS.sanity, [], int(ex.model.output.shape[-1]))
        items, errors = outputs.image_items(ex, config_flags.image_paths(),
                                            FLAGS.resize_policy or (
                                                imaging.DEFAULT_RESIZE_POLICY if meta is None
                                                else imaging.recorded_policy(meta)))
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if FLAGS.num_examples:
            items += example_items(ex, meta)
    except (UserError, core.LayerNotFoundError) as e:
        config_flags.fail(e)
    if not items and not errors and set(FLAGS.visualize) <= NO_IMAGES and FLAGS.visualize \
            and not compare:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        print(f"{model_desc} at {precision}: no images, {', '.join(FLAGS.visualize)} only -> "
              f"{FLAGS.out_dir}")
        visualize(ex, items, layers, options, model_desc)
        return
    if not items and FLAGS.example_filter in OUTCOME_FILTERS and FLAGS.num_examples:
        return  # none matched: said above, not an error
    if not items:  # each unreadable image has had its line
        sys.exit(1 if errors else "error: no images to explain (give --images or "
                 "--num_examples)")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    print(f"{model_desc} at {precision}: {len(items)} image(s) -> {FLAGS.out_dir}")
    batch = np.stack([it.model_input for it in items])
    logits = outputs.logits_of(ex, batch, options.batch_size)
    for item, preds in zip(items, outputs.top_classes(ex, logits)):
        print(f"  {item.name}: " + ", ".join(f"{c} {p:.3f}" for c, p in preds))
    if meta is not None and not meta.get("classifier"):  # a detector: its score as predict
        for line in detector_lines(ex, meta, items):
            print(line)
    about = {"model": model_desc, "precision": precision}
    explain_methods(ex, items, batch, class_index, about, options, names,
                    outputs.title_classes(ex, logits))
    if compare:
        dest = outputs.save_class_comparison(ex, items, names[0], compare, options,
                                             FLAGS.out_dir, cam_layer(), model_desc)
        print(f"  compare classes ({names[0]}): {dest}")
    if FLAGS.sanity:
        run_sanity(ex, batch, names, class_index, options, model_desc)
    visualize(ex, items, layers, options, model_desc)
    if errors:
        sys.exit(f"error: {len(errors)} image(s) could not be read; the others were explained")


if __name__ == "__main__":
    config_flags.run(main)
