r"""Our sanity check (model parameter randomisation) and ROAD against Quantus' MPRT and ROAD, on
the same trained network and images. Prints one table (docs/explain.md keeps a copy).

Quantus runs in a venv of its own with torch and no TensorFlow (the `reference` extra's
packages, never needed by CI or the tests), on our fast CNN rebuilt in PyTorch layer by layer
as explain_vs_gradcam does (research.benchmarks.fast_torch; the logits are checked):

  python3 -m venv /work/scratch/quantus38/venv
  /work/scratch/quantus38/venv/bin/pip install torch==2.14.1 grad-cam==1.5.7 quantus==0.6.0 \
      absl-py
  PYTHONPATH=. python -m research.benchmarks.explain_vs_quantus \
      --reference_python=/work/scratch/quantus38/venv/bin/python \
      --checkpoint_dir=<dir> --run_name=<a fast-CNN run> --data_dir=data/cifar10 [--images=16]

MPRT. Ours: research.explain.sanity.model_randomization, cascading from the logits down, the
Spearman correlation of each step's maps with the original's. Theirs: quantus.MPRT
(layer_order="top_down", Spearman, its defaults normalise=True, abs=True) given the same
method on the PyTorch network (Grad-CAM and Grad-CAM++: pytorch-grad-cam at the same layer;
saliency: torch autograd; guided backprop: our rule (core.guided_backward) transcribed in
torch, since pytorch-grad-cam's replaces only ReLU modules and this network has GELU).
Quantus randomises every module with a `reset_parameters` (PyTorch's default init, and
BatchNorm reset to the identity); ours draws kernel ~ N(0, std of the trained kernel), bias 0,
and leaves BatchNorm alone. The table's "Quantus" column gives Quantus with our draw (its
modules' `reset_parameters` made ours, BatchNorm given none, so both walk the same 8 layers);
the last column gives Quantus as it comes (its own draw, BatchNorm too). A constant map has
Spearman 0 in ours and NaN in scipy (Quantus): counted as 0.

ROAD. Ours: research.explain.faithfulness.road (10..90% of the pixels removed, noisy linear
imputation, noise 0.01 of the range); theirs: quantus.ROAD with the same percentages and
noise. Both given our maps, in our order: Quantus gets each pixel's rank in our stable order
(ties broken the same way), repeated over the colour channels; Quantus ranks channel entries
and its noisy_linear_imputation takes pixel indices, so its perturb_func option gets
`whole_pixels` (a pixel is removed when any of its channel entries is: Quantus' int() of
3 x p x H x W entries against our round(p x H x W) pixels leaves one pixel of 1,024 more at
10% and 60%). LeRF is Quantus' ROAD on the reversed ranks. Quantus scores accuracy (the top
class still the explained one), ours the probability as well: the table compares accuracy.
Quantus does not clip the noisy imputation to the pixel range, ours does.

"Within noise": the randomisation (MPRT) and the imputation noise (ROAD) are drawn with
--seeds seeds on each side; the noise of a number is the largest spread between two seeds of
one side; the two sides agree when their seed means differ by at most 2 x that noise +
FLOOR at every layer or percentage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

from research.benchmarks.fast_torch import network_arrays, torch_network
from research.benchmarks.quantus_compare import (  # noqa: F401 (the comparison's names)
    FLOOR, agreement, curve, mprt_verdict, nan_as_zero, rank_maps, road_verdict, table,
    whole_pixels)

FLAGS = flags.FLAGS
flags.DEFINE_string("reference_python", None, "A python with torch, grad-cam and quantus.")
flags.DEFINE_string("checkpoint_dir", "checkpoints", "Where the run's folder is.")
flags.DEFINE_string("run_name", None, "A fast-CNN run (its export/model.keras).")
flags.DEFINE_string("data_dir", "data/cifar10", "The TFRecords whose test images are used.")
flags.DEFINE_integer("images", 16, "Test images (the first ones of the split).")
flags.DEFINE_integer("seeds", 2, "Seeds of the randomisation and imputation noise per side.")
flags.DEFINE_list("methods", ["gradcam", "gradcam_pp", "saliency", "guided_backprop"],
                  "Methods compared (those the reference side knows: REFERENCE_METHODS).")
flags.DEFINE_string("work_dir", None, "Keep the shared arrays and the reference's answer "
                    "here (default: a temporary folder).")
flags.DEFINE_enum("side", "ours", ["ours", "reference"], "Internal: which side this is.")
flags.DEFINE_string("npz", None, "Internal: the shared arrays.")

REFERENCE_METHODS = ("gradcam", "gradcam_pp", "saliency", "guided_backprop")
PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # faithfulness.ROAD_PERCENTAGES
NOISE = 0.01
NAMES = {"morf": "MoRF", "lerf": "LeRF"}


# ---------------------------------------------------------------------------------------------
# Our side.

def ours(ex, images, classes, method_names, seeds: int) -> dict:
    from research.explain import faithfulness, methods, sanity

    out = {"layers": [p for p, _ in sanity.kernel_layers(ex.model)[::-1]]}
    for m in method_names:
        def explain(e, x, c, m=m):
            return methods.explain(e, m, x, c).maps
        out[m] = {"mprt": [], "morf": [], "lerf": []}
        for s in range(seeds):
            res = sanity.model_randomization(ex, explain, images, classes, seed=s,
                                             keep_maps=0, independent=False)
            out[m]["mprt"].append([step["spearman"] for step in res["cascading"]])
        explanation = methods.explain(ex, m, images, classes)
        out[m]["maps"] = np.asarray(explanation.maps)
        for s in range(seeds):
            r = faithfulness.road(ex, images, explanation, percentages=PERCENTAGES,
                                  noise=NOISE, seed=s)
            out[m]["morf"].append(r["morf_accuracy_curve"])
            out[m]["lerf"].append(r["lerf_accuracy_curve"])
    return out


# ---------------------------------------------------------------------------------------------
# Their side (torch, pytorch-grad-cam and Quantus only).

def reference(npz: str) -> None:
    import copy
    from importlib.metadata import version

    import pytorch_grad_cam
    import quantus
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from quantus.functions.perturb_func import noisy_linear_imputation
    from torch import nn

    torch.set_num_threads(1)  # nothing is timed here; spinning threads starve on a busy machine
    a = dict(np.load(npz))
    net = torch_network(a)
    x = np.ascontiguousarray(a["images"].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    y = a["classes"].astype(np.int64)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    info = {"logits_max_abs_diff": float(np.abs(logits - a["logits"]).max()),
            "logits_scale": float(np.abs(a["logits"]).max()),
            "versions": {k: version(k) for k in ("torch", "grad-cam", "quantus")}}

    class GuidedGELU(torch.autograd.Function):  # core.guided_backward's rule for GELU
        @staticmethod
        def forward(ctx, v):
            ctx.save_for_backward(v)
            return nn.functional.gelu(v)

        @staticmethod
        def backward(ctx, g):
            (v,) = ctx.saved_tensors
            return g * ((v > 0) & (g > 0)).to(g.dtype)

    class Guided(nn.Module):
        def forward(self, v):
            return GuidedGELU.apply(v)

    def input_gradient(model, inputs, targets):
        v = torch.from_numpy(np.asarray(inputs, np.float32)).requires_grad_(True)
        out = model(v)
        out[torch.arange(len(v)), torch.as_tensor(np.asarray(targets))].sum().backward()
        return np.abs(v.grad.numpy()).max(1)

    def cam(cls):
        def run(model, inputs, targets, **_):
            c = getattr(pytorch_grad_cam, cls)(model=model,
                                               target_layers=[model.groups[-1].act2])
            return c(input_tensor=torch.from_numpy(np.asarray(inputs, np.float32)),
                     targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return run

    def saliency(model, inputs, targets, **_):
        return input_gradient(model, inputs, targets)

    def guided(model, inputs, targets, **_):
        model = copy.deepcopy(model)
        for parent in model.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.GELU):
                    setattr(parent, name, Guided())
        return input_gradient(model, inputs, targets)

    explainers = {"gradcam": cam("GradCAM"), "gradcam_pp": cam("GradCAMPlusPlus"),
                  "saliency": saliency, "guided_backprop": guided}

    class OurDraw:  # sanity.randomized's draw as a module's reset_parameters
        def reset_parameters(self):
            with torch.no_grad():
                std = float(self.weight.std(unbiased=False)) or 1e-2
                self.weight.normal_(0.0, std)
                if self.bias is not None:
                    self.bias.zero_()

    class OurConv(OurDraw, nn.Conv2d):
        pass

    class OurLinear(OurDraw, nn.Linear):
        pass

    class KeptBatchNorm(nn.BatchNorm2d):  # not randomised (no reset_parameters for Quantus)
        @property
        def reset_parameters(self):
            raise AttributeError("reset_parameters")

    ours_drawn = copy.deepcopy(net)
    for mod in ours_drawn.modules():
        for cls, new in ((nn.Conv2d, OurConv), (nn.Linear, OurLinear),
                         (nn.BatchNorm2d, KeptBatchNorm)):
            if type(mod) is cls:
                mod.__class__ = new
    seeds = int(a["seeds"])
    out = {"info": info}
    for m in json.loads(str(a["methods"])):
        print(f"{m}: MPRT", file=sys.stderr, flush=True)
        fn = explainers[m]
        mine = fn(net, x, y)
        res = {"maps": np.asarray(mine).tolist(), "mprt": [], "mprt_default": [],
               "morf": [], "lerf": [], "nan": 0}
        for model, key in ((ours_drawn, "mprt"), (net, "mprt_default")):
            for s in range(seeds):
                metric = quantus.MPRT(layer_order="top_down", seed=s, disable_warnings=True,
                                      display_progressbar=False)
                scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None,
                                explain_func=fn, channel_first=True, device="cpu",
                                batch_size=len(x))
                steps = []
                for layer, v in scores.items():
                    if layer == "original":
                        continue
                    v, bad = nan_as_zero(v)
                    res["nan"] += bad
                    steps.append(float(v.mean()))
                res[key].append(steps)
                res[key + "_layers"] = [k for k in scores if k != "original"]
        maps = a[f"maps_{m}"]
        h, w = maps.shape[1:]

        def perturb(arr, indices, noise=NOISE, **kwargs):
            return noisy_linear_imputation(arr, whole_pixels(indices, arr.shape[0], h * w),
                                           noise=noise)

        print(f"{m}: ROAD", file=sys.stderr, flush=True)
        for key, least in (("morf", False), ("lerf", True)):
            ranks = np.repeat(rank_maps(maps, least)[:, None], x.shape[1], 1)
            for s in range(seeds):
                np.random.seed(s)  # noisy_linear_imputation draws from numpy's global RNG
                metric = quantus.ROAD(percentages=[round(100 * p) for p in PERCENTAGES],
                                      noise=NOISE, perturb_func=perturb,
                                      disable_warnings=True, display_progressbar=False)
                scores = metric(model=net, x_batch=x, y_batch=y, a_batch=ranks,
                                channel_first=True, device="cpu", batch_size=len(x),
                                softmax=False)  # it takes the argmax: logits alike
                res[key].append([float(scores[round(100 * p)]) for p in PERCENTAGES])
        out[m] = res
    with open(npz + ".theirs.json", "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------------------------------


def main(argv):
    del argv
    if FLAGS.side == "reference":
        reference(FLAGS.npz)
        return
    if not FLAGS.reference_python or not os.path.isfile(FLAGS.reference_python):
        sys.exit("error: --reference_python: give a python with torch, grad-cam and quantus "
                 "(see this module's docstring)")
    if not FLAGS.run_name:
        sys.exit("error: --run_name: give a trained fast-CNN run (MPRT and ROAD of an "
                 "untrained network say nothing)")
    unknown = [m for m in FLAGS.methods if m not in REFERENCE_METHODS]
    if unknown:
        sys.exit(f"error: --methods: {', '.join(unknown)} not among {REFERENCE_METHODS}")
    from research.data.pipeline import take_examples
    from research.explain import loading, sanity
    from research.machine import banner

    ex, _ = loading.load_run(FLAGS.checkpoint_dir, FLAGS.run_name, "float32")
    if ex.model.name != "fast_cnn":
        sys.exit(f"error: --run_name={FLAGS.run_name}: a {ex.model.name}, not the fast CNN "
                 "the reference rebuilds in PyTorch")
    print(banner())
    images = take_examples(FLAGS.data_dir, "test", FLAGS.images)["image"].astype(np.float32)
    logits = np.asarray(ex.logits(images))
    classes = logits.argmax(-1).astype(np.int32)
    mine = ours(ex, images, classes, FLAGS.methods, FLAGS.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(FLAGS.work_dir or tmp, "shared.npz")
        np.savez(npz, images=images, classes=classes, logits=logits,
                 seeds=np.array(FLAGS.seeds), methods=np.array(json.dumps(FLAGS.methods)),
                 **{f"maps_{m}": mine[m]["maps"] for m in FLAGS.methods},
                 **network_arrays(ex.model))
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        res = subprocess.run([FLAGS.reference_python, "-m", __spec__.name, "--side=reference",
                              f"--npz={npz}"], env=env)
        if res.returncode != 0:
            sys.exit("error: the reference side failed (its messages above)")
        with open(npz + ".theirs.json") as f:
            theirs = json.load(f)
    info = theirs["info"]
    v = info["versions"]
    print(f"Quantus {v['quantus']}, pytorch-grad-cam {v['grad-cam']}, torch {v['torch']}; the "
          f"same network ({FLAGS.run_name}; logits agree to {info['logits_max_abs_diff']:.1e}"
          f" of {info['logits_scale']:.1f}), the first {FLAGS.images} test images of "
          f"{FLAGS.data_dir}, each explained for its top class; {FLAGS.seeds} seeds a side")
    print("MPRT steps (cascading, top down): " + ", ".join(mine["layers"]))
    rows = []
    for m in FLAGS.methods:
        t = theirs[m]
        r = sanity.pearson(mine[m]["maps"], np.asarray(t["maps"]))
        print(f"{m}: the reference side's maps against ours on the trained network: Pearson r "
              f"{r.mean():.4f} (min {r.min():.4f}); Quantus NaN Spearman (constant maps) "
              f"counted 0: {t['nan']}; Quantus' own randomisation walks "
              f"{len(t['mprt_default_layers'])} modules")
        ag = agreement(mine[m]["mprt"], t["mprt"])
        default = np.mean(t["mprt_default"], 0)
        rows.append({"method": m, "measure": f"MPRT Spearman, {len(mine['layers'])} steps",
                     "agreement": ag,
                     "verdicts": (mprt_verdict(ag["ours"], sanity.PASS_BELOW),
                                  mprt_verdict(ag["theirs"], sanity.PASS_BELOW)),
                     "default": f"last {default[-1]:.2f}: "
                                f"{mprt_verdict(default, sanity.PASS_BELOW)}"})
        road_ours = (np.mean(mine[m]["morf"], 0), np.mean(mine[m]["lerf"], 0))
        road_theirs = (np.mean(t["morf"], 0), np.mean(t["lerf"], 0))
        verdicts = (road_verdict(*road_ours), road_verdict(*road_theirs))
        for key in ("morf", "lerf"):
            rows.append({"method": m, "measure": f"ROAD {NAMES[key]} accuracy, 10..90%",
                         "agreement": agreement(mine[m][key], t[key]), "verdicts": verdicts})
    print("\n".join(table(rows)))


if __name__ == "__main__":
    app.run(main)
