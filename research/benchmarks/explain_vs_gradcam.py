r"""Our CAM family against pytorch-grad-cam's on the same network, images and classes: the
per-image Pearson correlation of the maps and images/s of each at the same batch size, for
every method both have. Prints one table (docs/explain.md keeps a copy).

pytorch-grad-cam is PyTorch-only, so its side runs in a venv of its own with torch and no
TensorFlow (the `reference` extra's packages, never needed by CI or the tests):

  python3 -m venv /work/scratch/explain/venv
  /work/scratch/explain/venv/bin/pip install torch==2.13.0 grad-cam==1.5.5
  PYTHONPATH=. python -m research.benchmarks.explain_vs_gradcam \
      --reference_python=/work/scratch/explain/venv/bin/python [--images=64] [--batch_size=32]

This process (the project's venv) builds our fast CNN (research.models.fast, airbench94's
shape: 32x32 input, patch whitening, three conv groups of 64/256/256, GELU, global max pool),
untrained with random BN statistics and a random head so that every map is non-trivial, and
explains random images with ours; it writes the weights, images, classes and our maps to an
.npz and runs `--side=reference` under --reference_python, which rebuilds the same network in
PyTorch layer by layer (Keras HWIO kernels -> OIHW), checks that its logits match ours, and
explains the same images with pytorch-grad-cam at the same layer (the last conv group's
output, 3x3). Where the definitions differ the table says how.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from research.benchmarks.fast_torch import network_arrays, torch_network

FLAGS = flags.FLAGS
flags.DEFINE_string("reference_python", None, "A python with torch and grad-cam (not TF).")
flags.DEFINE_integer("images", 64, "Images explained by each implementation.")
flags.DEFINE_integer("batch_size", 32, "Batch size of both.")
flags.DEFINE_integer("repeats", 2, "Timed repeats (the best is kept), after a warm-up.")
flags.DEFINE_enum("side", "ours", ["ours", "reference"], "Internal: which side this is.")
flags.DEFINE_string("npz", None, "Internal: the shared arrays.")

LIBRARY = "pytorch-grad-cam"  # the key of Method.references (research.explain.methods)
# How the definitions differ, where they do ("" where they agree); ablationcam_zero is theirs
# given an ablation layer that zeroes the channel (compared with our ablationcam).
NOTES = {
    "eigencam": "the component's sign: theirs is the SVD's (arbitrary), ours makes the map "
                "correlate with the channel sum; r against ours with the sign that matches "
                "theirs",
    "eigengradcam": "the sign, as EigenCAM",
    "ablationcam": "theirs sets an ablated channel to min - 1e7 when the layer has negative "
                   "values (GELU here), ours to 0 as the paper",
    "ablationcam_zero": "theirs given an ablation layer that zeroes the channel, as the paper "
                        "and ours",
}


def compared() -> dict[str, tuple[str, str]]:
    """ours -> (pytorch-grad-cam class, how the definitions differ): every method whose record
    names its pytorch-grad-cam class (read on our side; the reference side gets it in the
    .npz, as it has no TensorFlow)."""
    from research.explain import methods

    out = {}
    for m in methods.METHODS:
        if LIBRARY in m.references:
            out[m.name] = (m.references[LIBRARY], NOTES.get(m.name, ""))
            if m.name == "ablationcam":
                out["ablationcam_zero"] = (m.references[LIBRARY], NOTES["ablationcam_zero"])
    return out


SIGNLESS = ("eigencam", "eigengradcam")


# ---------------------------------------------------------------------------------------------
# Our side.

def build_network(classes: int = 10, seed: int = 0):
    import keras

    from research.models import build_model

    keras.utils.set_random_seed(seed)
    model = build_model("fast", (32, 32, 3), classes)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if hasattr(layer, "moving_variance"):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.2, c).astype(np.float32))
    head = model.get_layer("logits")
    head.kernel.assign(rng.normal(0, 1, head.kernel.shape).astype(np.float32))
    return model


def best_time(fn, repeats: int) -> float:
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best


def ours(model, images, classes, pairs: dict) -> tuple[dict, dict, str]:
    from research import detector
    from research.explain import cams, core, methods

    ex = core.Explainer(model, detector.preprocess_fn("unit"))
    layer = core.find_layer(model)[0]
    b = FLAGS.batch_size
    chunks = [(images[i:i + b], classes[i:i + b]) for i in range(0, len(images), b)]
    params = {"scorecam": {"max_channels": 10 ** 6, "batch_size": 256},
              "ablationcam": {"batch_size": 256}}
    maps, seconds = {}, {}
    for m in pairs:
        if m.endswith("_zero"):
            continue

        def run(m=m):
            return np.concatenate([methods.explain(ex, m, x, c, **params.get(m, {})).maps
                                   for x, c in chunks])
        maps[m] = run()  # also the warm-up
        seconds[m] = best_time(run, FLAGS.repeats)
    maps["ablationcam_zero"], seconds["ablationcam_zero"] = maps["ablationcam"], seconds[
        "ablationcam"]
    for m in SIGNLESS:  # the other sign of the component, for the comparison only
        v = methods.find(m).cam
        flipped = dataclasses.replace(v, weights=lambda a, g, f=v.weights: -f(a, g))
        maps[m + "_flipped"] = np.concatenate([cams.run_cam(ex, flipped, m + "_flipped", x,
                                                            c).maps for x, c in chunks])
    return maps, seconds, layer


# ---------------------------------------------------------------------------------------------
# Their side (torch and pytorch-grad-cam only).

def reference(npz: str) -> None:
    from importlib.metadata import version

    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class ZeroAblation(AblationLayer):
        """Their ablation layer with the paper's ablation: the channel set to 0."""
        def __call__(self, x):
            output = self.activations
            for i in range(output.size(0)):
                output[i, self.indices[i], :] = 0
            return output

    torch.set_num_threads(os.cpu_count() or 1)
    a = dict(np.load(npz))
    net = torch_network(a)
    x = torch.from_numpy(np.ascontiguousarray(a["images"].transpose(0, 3, 1, 2) / 255.0
                                              ).astype(np.float32))
    with torch.no_grad():
        logits = net(x).numpy()
    out = {"logits_max_abs_diff": float(np.abs(logits - a["logits"]).max()),
           "logits_scale": float(np.abs(a["logits"]).max()),
           "versions": {"torch": torch.__version__,
                        "grad-cam": version("grad-cam")}}
    layer = [net.groups[-1].act2]
    b = int(a["batch_size"])
    classes = a["classes"].tolist()
    maps, seconds = {}, {}
    for ours_name, (cls, _) in json.loads(str(a["pairs"])).items():
        kwargs = {"batch_size": 256} if cls == "AblationCAM" else {}
        if ours_name == "ablationcam_zero":
            kwargs["ablation_layer"] = ZeroAblation()
        cam = getattr(pytorch_grad_cam, cls)(model=net, target_layers=layer, **kwargs)
        if cls == "ScoreCAM":
            cam.batch_size = 256

        def run(cam=cam):
            return np.concatenate([cam(input_tensor=x[i:i + b], targets=[
                ClassifierOutputTarget(c) for c in classes[i:i + b]]) for i in range(
                0, len(x), b)])
        maps[ours_name] = run()  # also the warm-up
        seconds[ours_name] = best_time(run, int(a["repeats"]))
    np.savez(npz + ".theirs.npz", **maps)
    out["seconds"] = seconds
    with open(npz + ".theirs.json", "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------------------------------


def main(argv):
    del argv
    if FLAGS.side == "reference":
        reference(FLAGS.npz)
        return
    if not FLAGS.reference_python or not os.path.isfile(FLAGS.reference_python):
        sys.exit("error: --reference_python: give a python with torch and grad-cam "
                 "(see this module's docstring)")
    from research.machine import banner

    print(banner())
    model = build_network()
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (FLAGS.images, 32, 32, 3)).astype(np.float32)
    from research import detector
    from research.explain import sanity

    logits = np.asarray(model(detector.preprocess_fn("unit")(images), training=False))
    classes = logits.argmax(-1).astype(np.int32)
    pairs = compared()
    maps, seconds, layer = ours(model, images, classes, pairs)
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "shared.npz")
        np.savez(npz, images=images, classes=classes, logits=logits,
                 batch_size=np.array(FLAGS.batch_size), repeats=np.array(FLAGS.repeats),
                 pairs=np.array(json.dumps(pairs)),
                 **network_arrays(model))
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        res = subprocess.run([FLAGS.reference_python, "-m", __spec__.name, "--side=reference",
                              f"--npz={npz}"], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"error: the reference side failed:\n{res.stderr[-3000:]}")
        theirs = dict(np.load(npz + ".theirs.npz"))
        with open(npz + ".theirs.json") as f:
            info = json.load(f)
    print(f"pytorch-grad-cam {info['versions']['grad-cam']}, torch {info['versions']['torch']}"
          f"; the same network (logits agree to {info['logits_max_abs_diff']:.2e} of "
          f"{info['logits_scale']:.2f}), {FLAGS.images} random 32x32 images, batch "
          f"{FLAGS.batch_size}, layer {layer} (theirs: groups[-1].act2)")
    print("| method | Pearson r, mean (min) | ours img/s | theirs img/s | ours / theirs | "
          "definitions |")
    print("|---|---|---|---|---|---|")
    for m, (cls, note) in pairs.items():
        r = sanity.pearson(maps[m], theirs[m])
        if m in SIGNLESS:
            r = np.maximum(r, sanity.pearson(maps[m + "_flipped"], theirs[m]))
        ours_ips = FLAGS.images / seconds[m]
        their_ips = FLAGS.images / info["seconds"][m]
        print(f"| {m} ({cls}) | {r.mean():.4f} ({r.min():.4f}) | {ours_ips:.1f} | "
              f"{their_ips:.1f} | {ours_ips / their_ips:.2f} | {note or 'the same'} |")


if __name__ == "__main__":
    app.run(main)
