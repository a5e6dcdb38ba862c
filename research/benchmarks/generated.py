"""Generated photos: a folder of JPEGs anyone can make again, byte for byte, to measure the
conversion on more images than the shared data has (docs/data_at_scale.md's 20,000 are
`generate_photos(root, 20000)`: `python -m research.benchmarks.conversion --generate=20000`).
"""

from __future__ import annotations

import os

import cv2
import numpy as np


def generate_photos(root: str, n: int, size: tuple[int, int] = (375, 500), seed: int = 0,
                    noise: int = 12) -> None:
    """`n` JPEGs (quality 90) of `size` (height, width) in <root>/cats and <root>/dogs,
    alternately: a random 6x8 image scaled up smoothly, plus up to +-`noise` levels of
    noise per pixel, so that each decodes like a photo of its size rather than a flat
    image. The same arguments give the same bytes."""
    rng = np.random.default_rng(seed)
    for c in ("cats", "dogs"):
        os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = cv2.resize(small, size[::-1], interpolation=cv2.INTER_LINEAR)
        if noise:
            img = np.clip(img.astype(np.int16) + rng.integers(-noise, noise + 1, img.shape,
                                                              dtype=np.int16), 0, 255)
        c = ("cats", "dogs")[i % 2]
        data = cv2.imencode(".jpg", img.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        with open(os.path.join(root, c, f"{c}.{i}.jpg"), "wb") as f:
            f.write(data.tobytes())
