"""The photos stage's pieces: the class map, the heatmap drawn on the original photo's crop
window, and the skip when there are no photos."""

from __future__ import annotations

import dataclasses

import numpy as np

from research.data import imaging
from research.explain import render
from research.lab import photos_stage
from research.lab.lab import Lab
from research.lab.settings import LabSettings

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"]


def test_photo_classes_map_to_the_detectors_by_name_or_singular():
    assert photos_stage.class_map(["cats", "dogs"], CIFAR) == {"cats": "cat", "dogs": "dog"}
    assert photos_stage.class_map(["Cat", "dog"], CIFAR) == {"Cat": "cat", "dog": "dog"}
    assert photos_stage.class_map(["lions", "dogs"], CIFAR) == {"dogs": "dog"}


def test_the_heatmap_goes_on_the_window_the_network_saw():
    photo = np.full((120, 200, 3), 100, np.uint8)  # landscape: center_crop keeps the middle
    window = imaging.crop_window(photo.shape, (64, 64))
    t, lft, h, w = window
    assert (t, h) == (0, 120) and abs(lft - 40) <= 1 and w == 120
    heat = np.zeros((64, 64), np.float32)
    heat[:, 32:] = 1.0  # the right half of what the network saw
    out = render.overlay_on_original(photo, heat, window)
    assert out.shape == photo.shape  # the original's own resolution
    assert (out[5:-5, 5:lft - 5] == 100).all()  # outside the window: the photo untouched
    assert (out[5:-5, lft + w + 5:-5] == 100).all()
    left, right = out[10:-10, lft + 10:lft + 50], out[10:-10, lft + w - 50:lft + w - 10]
    assert not np.array_equal(left.mean((0, 1)), right.mean((0, 1)))  # jet 0 vs jet 1
    assert (out[t, lft:lft + w] == 255).all()  # the window's frame


def test_without_photos_the_stage_is_skipped_and_says_why(tmp_path):
    s = LabSettings(workdir=str(tmp_path))
    lab = Lab(s, "x", "")
    lab.profile = dataclasses.replace(lab.profile, photos={
        **lab.profile.photos, "source": str(tmp_path / "missing.tar")})
    rec = photos_stage.stage_photos(lab)
    assert "missing.tar is not there and no --photo_source" in rec.outputs["skipped"]
