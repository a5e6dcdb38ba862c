"""The lab's dataset card: what the detectors learn from and are scored on, split by split:
images, cats and their share, and the mean and spread of each colour channel over the first
`card_images` images (a split drawn from other photos than the rest shows here first)."""

from __future__ import annotations

import os

from research import files
from research.data import pipeline
from research.data.manifest import has_manifest, manifest_path, sha256_file
from research.lab.lab import Lab
from research.lab.stage import Done


def card_key(lab: Lab) -> dict | None:
    """The TFRecords and the settings (None: no TFRecords yet)."""
    if not has_manifest(lab.s.data_dir):
        return None
    return {"manifest": sha256_file(manifest_path(lab.s.data_dir)),
            **lab.stage_settings("card")}


def stage_card(lab: Lab) -> Done:
    n = lab.stage_settings("card")["card_images"]
    manifest = pipeline.load_manifest(lab.s.data_dir)
    rows = []
    for split, info in manifest["splits"].items():
        x = pipeline.take_examples(lab.s.data_dir, split, n)["image"] / 255.0
        rows.append({"split": split, "images": info["num_examples"],
                     "positives": info["num_positive"], "measured": len(x),
                     "mean": x.mean(axis=(0, 1, 2)).round(4).tolist(),
                     "std": x.std(axis=(0, 1, 2)).round(4).tolist()})
    card = {"source": manifest["source"], "positive_class": manifest["positive_class"],
            "image_shape": manifest["image_shape"], "splits": rows}
    path = files.write_json(lab.out_dir("card") + ".json", card, "the dataset card")
    print(f"[lab] card: {path}", flush=True)
    return Done([], {"card_images": n}, {"json": path, "files": [path], **card})


def card_section(doc, lab: Lab, records: dict) -> None:
    doc.heading("Dataset card")
    rec = records.get("card")
    if rec is None or not os.path.isfile(rec.outputs["json"]):
        doc.para("The card stage has not run.")
        return
    o = rec.outputs
    doc.para(f"{o['source']}: {'x'.join(map(str, o['image_shape']))} images, positive class "
             f"{o['positive_class']}. Colour statistics (R, G, B in [0, 1]) over the first "
             "images of each split.")
    doc.table(["split", "images", "cats", "cat share", "measured", "mean R, G, B",
               "std R, G, B"],
              [[r["split"], f"{r['images']:,}", f"{r['positives']:,}",
                f"{r['positives'] / max(r['images'], 1):.1%}", f"{r['measured']:,}",
                ", ".join(f"{v:.3f}" for v in r["mean"]),
                ", ".join(f"{v:.3f}" for v in r["std"])] for r in o["splits"]])
