"""Decoding image files to RGB uint8 arrays of a fixed size.

Resize policy (documented in README.md):
- An image already at the target size is kept bit-for-bit.
- `center_crop` (default): scale so the shorter side equals the target, keeping the aspect
  ratio, then cut the centre. Nothing is distorted; the edges of long images are lost.
- `stretch`: scale each side to the target independently (distorts the aspect ratio).
- Shrinking uses INTER_AREA (no aliasing); enlarging uses INTER_LINEAR.

Colour policy: grayscale is repeated to 3 channels; alpha is composited onto white;
palette, CMYK and YCCK images are converted by OpenCV's decoders; 16-bit images keep their
top 8 bits. JPEG EXIF orientation is applied.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESIZE_POLICIES = ("center_crop", "stretch")
DEFAULT_RESIZE_POLICY = "center_crop"  # make_tfrecords, predict, explain and the lab alike


class ImageDecodeError(ValueError):
    """An image file could not be decoded; the message names the file."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes to an HxWx3 RGB uint8 array at its own size."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        raise ImageDecodeError(f"{name}: empty file")
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    # JPEG has no alpha; IMREAD_COLOR applies EXIF orientation and converts CMYK/YCCK.
    flags = cv2.IMREAD_COLOR if is_jpeg else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as e:  # pragma: no cover - OpenCV mostly returns None instead
        raise ImageDecodeError(f"{name}: {e}") from e
    if img is None:
        raise ImageDecodeError(f"{name}: not a decodable image (corrupt or unsupported format)")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    channels = img.shape[2]
    if channels == 1:
        return np.repeat(img, 3, axis=2)
    if channels == 4:
        bgr = img[:, :, :3].astype(np.float32)
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = np.rint(bgr * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    elif channels != 3:
        raise ImageDecodeError(f"{name}: unsupported channel count {channels}")
    return np.ascontiguousarray(img[:, :, ::-1])


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """An RGB image as a model with `channels` input channels takes it: 3 unchanged, 1 its
    luminance (OpenCV's RGB2GRAY weights), as (H, W, 1)."""
    if channels == 3:
        return rgb
    if channels == 1:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None]
    raise ValueError(f"models take 1 or 3 channels, not {channels}")


def recorded_policy(record: dict) -> str:
    """The resize policy an export's metadata.json or a manifest (make_tfrecords' flags)
    records; the default for data that never had one (CIFAR, MNIST, older exports)."""
    return (record.get("resize_policy") or (record.get("flags") or {}).get("resize_policy")
            or DEFAULT_RESIZE_POLICY)


def crop_window(shape: tuple[int, ...], size: tuple[int, int],
                policy: str = DEFAULT_RESIZE_POLICY) -> tuple[int, int, int, int]:
    """(top, left, height, width): the part of an image of `shape` that `resize_image` turns
    into `size` under `policy` (the whole image for stretch), in the image's own pixels."""
    h, w = shape[:2]
    if policy == "stretch" or (h, w) == tuple(size):
        return 0, 0, h, w
    th, tw = size
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    top, left = (nh - th) // 2, (nw - tw) // 2
    t, lft = int(round(top / scale)), int(round(left / scale))
    return t, lft, min(h - t, int(round(th / scale))), min(w - lft, int(round(tw / scale)))


def resize_image(img: np.ndarray, size: tuple[int, int],
                 policy: str = DEFAULT_RESIZE_POLICY) -> np.ndarray:
    """Resizes an HxWxC uint8 image to `size` = (height, width) under `policy`."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"Unknown resize policy {policy!r}; expected one of {RESIZE_POLICIES}")
    th, tw = size
    h, w = img.shape[:2]
    if (h, w) == (th, tw):
        return img
    if policy == "stretch":
        interp = cv2.INTER_AREA if th * tw < h * w else cv2.INTER_LINEAR
        return cv2.resize(img, (tw, th), interpolation=interp)
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return np.ascontiguousarray(img[top:top + th, left:left + tw])


def load_image_file(path: str, size: tuple[int, int] | None = None,
                    policy: str = DEFAULT_RESIZE_POLICY) -> np.ndarray:
    """Reads and decodes one image file; resizes it when `size` is given."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read ({e.strerror})") from e
    img = decode_image(data, path)
    return resize_image(img, size, policy) if size else img


def encode_image(rgb: np.ndarray, path: str) -> bytes:
    """An RGB (or gray) uint8 image encoded in the format of `path`'s extension."""
    img = np.asarray(rgb)
    if img.ndim == 3 and img.shape[-1] == 3:
        img = img[:, :, ::-1]  # OpenCV writes BGR
    ok, buf = cv2.imencode(os.path.splitext(path)[1] or ".png", img)
    if not ok:
        raise ValueError(f"{path}: cannot encode an image of shape {img.shape}")
    return buf.tobytes()
