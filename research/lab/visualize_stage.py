"""The lab's look inside the networks: activation grids and filter patterns of a few layers
(first to last resolution) of each detector, drawn by the same functions as
`explain --visualize=activations,filters`."""

from __future__ import annotations

import os

import keras
import numpy as np

from research.data import pipeline
from research.explain import activations, core
from research.lab.detectors import detector_runs, require_runs
from research.lab.explain_stage import export_key, load_explainer
from research.lab.lab import SPLIT, Lab, command
from research.lab.stage import Done


def pick_layers(model, n: int) -> list[str]:
    """n feature maps spread from the first to the last resolution of the network (the last
    layer at each resolution), skipping resizing, preprocessing, pooling and dropout."""
    skip = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Dropout,
            keras.layers.Resizing, keras.layers.Rescaling)
    last_at = {}
    for path, layer in core.spatial_layers(model):
        if isinstance(layer, skip) or layer.name == "preprocess":  # (a 1x1 conv in an export)
            continue
        last_at[tuple(layer.output.shape[1:3])] = path
    paths = list(last_at.values())
    if len(paths) <= n:
        return paths
    idx = np.unique(np.round(np.linspace(0, len(paths) - 1, n)).astype(int))
    return [paths[i] for i in idx]


def visualize_key(lab: Lab) -> dict:
    names = detector_runs(lab)
    require_runs(lab, "visualize", names)
    p = lab.stage_settings("visualize")
    return {"exports": export_key(lab, names), "layers": p["visualize_layers"],
            "num_filters": p["num_filters"], "filter_steps": p["filter_steps"]}


def stage_visualize(lab: Lab) -> Done:
    names = detector_runs(lab)
    require_runs(lab, "visualize", names)
    p = lab.stage_settings("visualize")
    out_dir = lab.out_dir("visualize")
    flags = {"runs": names, "visualize": "activations,filters", "num_filters": p["num_filters"],
             "filter_steps": p["filter_steps"], "layers_per_detector": p["visualize_layers"]}
    cat = pipeline.take_examples(lab.s.data_dir, SPLIT, 1, filter="positive")
    image = cat["image"][0].astype(np.float32)
    what = f"test #{int(cat['index'][0])} (cat)"
    paths, commands, layers_by_run = [], [], {}
    for run in names:
        ex, _, _ = load_explainer(lab, run)
        layers = layers_by_run[run] = pick_layers(ex.model, p["visualize_layers"])
        commands.append(command("research.apps.explain", {
            "run_name": run, "checkpoint_dir": lab.s.checkpoint_dir,
            "data_dir": lab.s.data_dir, "num_examples": 1, "example_filter": "positive",
            "visualize": "activations,filters", "layers": ",".join(layers),
            "num_filters": p["num_filters"], "filter_steps": p["filter_steps"],
            "out_dir": os.path.join(out_dir, run)}))
        paths += activations.save_activation_grids(ex, image, layers, out_dir,
                                                   f"{run}_activations", f"{run} on {what}")
        paths += activations.save_filter_grids(ex, layers, out_dir, f"{run}_filters", run,
                                               p["num_filters"], steps=p["filter_steps"])
        print(f"[lab] visualized {run}: {', '.join(layers)}", flush=True)
    return Done(commands, flags, {"figures": paths, "layers": layers_by_run})
