"""The lab's data stage: TFRecords of the source in <workdir>/data/cifar10, reused when the
manifest's source and settings match (other TFRecords there are an error naming the
difference), and a figure of training examples by class."""

from __future__ import annotations

import os

import numpy as np

from research import plots
from research.data import pipeline, sources, tfrecords
from research.data.manifest import has_manifest
from research.lab.lab import Lab, command
from research.lab.settings import LabError
from research.lab.stage import Done


def _same_source(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def data_wanted(lab: Lab) -> dict:
    w = tfrecords.WriteConfig(out_dir=lab.s.data_dir)
    return {"source": lab.source, "positive_class": w.positive_class, "seed": w.seed,
            "val_fraction": w.val_fraction, "shards": dict(lab.stage_settings("data")["shards"])}


def data_mismatch(lab: Lab) -> str | None:
    """Why the existing TFRecords are not the ones this lab asks for (None: they are, or
    there are none)."""
    if not has_manifest(lab.s.data_dir):
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


def check_data(lab: Lab) -> None:
    problem = data_mismatch(lab)
    if problem:
        raise LabError(f"data: {problem}")


def data_ready(lab: Lab) -> str | None:
    if not has_manifest(lab.s.data_dir):
        return f"{lab.s.data_dir} has no TFRecords yet"
    return None


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


def stage_data(lab: Lab) -> Done:
    s, want = lab.s, data_wanted(lab)
    flags = {"source": lab.source, "out_dir": s.data_dir, "download_dir": s.download_dir,
             **{f"{k}_shards": v for k, v in want["shards"].items()}}
    reused = has_manifest(s.data_dir)
    check_data(lab)
    if not reused and os.path.isdir(s.data_dir) and os.listdir(s.data_dir):
        # TFRecords are written whole (renamed into place), so this is no lab's half.
        raise LabError(f"--workdir: {s.data_dir} holds files but no TFRecords manifest (not "
                       "written by the lab); nothing was deleted: move them away, or choose "
                       "another --workdir")
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
    return Done([command("research.apps.make_tfrecords", flags)], flags, outputs,
                reused=reused)
