"""Decoding image files to RGB uint8 arrays of a fixed size.

Resize policy (documented in docs/data.md):
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

import contextlib
import os
import struct

import cv2
import numpy as np

from research.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESIZE_POLICIES = ("center_crop", "stretch")
DEFAULT_RESIZE_POLICY = "center_crop"  # make_tfrecords, predict, explain and the lab alike
# The largest image decoded (width x height), as PIL's Image.MAX_IMAGE_PIXELS: a 107 KB PNG
# can claim 30000 x 30000 pixels (2.7 GB decoded). Apps set it from --max_image_pixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


class ImageDecodeError(UserError):
    """An image file could not be decoded; the message names the file."""


class ImageTooLargeError(ImageDecodeError):
    """The header claims more pixels than MAX_IMAGE_PIXELS (a decompression bomb)."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_hidden_name(name: str) -> bool:
    """A file or folder name that image folders skip (dot files, macOS zip debris); the one
    rule research.data.sources and research.inference apply."""
    return name.startswith(".") or name == "__MACOSX"


# ---------------------------------------------------------------------------------------------
# Image headers: width and height read from the first bytes, before anything is decoded.

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_size(d: bytes):
    if d[12:16] == b"IHDR":
        return struct.unpack(">II", d[16:24])
    return None


def _gif_size(d: bytes):
    return struct.unpack("<HH", d[6:10])


def _bmp_size(d: bytes):
    (header,) = struct.unpack("<I", d[14:18])
    if header == 12:  # BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", d[18:22])
    w, h = struct.unpack("<ii", d[18:26])
    return abs(w), abs(h)  # a negative height is a top-down bitmap


def _webp_size(d: bytes):
    chunk = d[12:16]
    if chunk == b"VP8X":  # extended: the canvas, 24-bit sizes minus one
        return (int.from_bytes(d[24:27], "little") + 1,
                int.from_bytes(d[27:30], "little") + 1)
    if chunk == b"VP8L" and d[20] == 0x2F:  # lossless: 14-bit sizes minus one
        (bits,) = struct.unpack("<I", d[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and d[23:26] == b"\x9d\x01\x2a":  # lossy key frame: 14-bit sizes
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _jpeg_size(d: bytes):
    i = 2
    while i + 9 < len(d):
        if d[i] != 0xFF:
            return None
        marker = d[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", d[i + 2:i + 4])
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", d[i + 5:i + 9])
            return (w, h) if h else None  # height 0: defined later (DNL), not supported
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        i += 2 + length
    return None


def _tiff_size(d: bytes):
    order = "<" if d[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", d[2:4])
    if version == 42:
        (ifd,) = struct.unpack(order + "I", d[4:8])
        count_fmt, entry_size, head = "H", 12, 2
    elif version == 43:  # BigTIFF
        (ifd,) = struct.unpack(order + "Q", d[8:16])
        count_fmt, entry_size, head = "Q", 20, 8
    else:
        return None
    (count,) = struct.unpack(order + count_fmt, d[ifd:ifd + head])
    found = {}
    for k in range(count):
        e = d[ifd + head + k * entry_size:ifd + head + (k + 1) * entry_size]
        if len(e) < entry_size:
            return None
        tag, kind = struct.unpack(order + "HH", e[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT, LONG or LONG8
            value = e[8:] if version == 42 else e[12:]
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt is None:
                return None
            found[tag] = struct.unpack(order + fmt, value[:struct.calcsize(fmt)])[0]
    return (found[256], found[257]) if len(found) == 2 else None


# (magic bytes, format, reader): every format of IMAGE_EXTENSIONS.
_HEADERS = (
    (b"\x89PNG\r\n\x1a\n", "PNG", _png_size),
    (b"\xff\xd8", "JPEG", _jpeg_size),
    (b"GIF87a", "GIF", _gif_size),
    (b"GIF89a", "GIF", _gif_size),
    (b"BM", "BMP", _bmp_size),
    (b"II*\x00", "TIFF", _tiff_size),
    (b"MM\x00*", "TIFF", _tiff_size),
    (b"II+\x00", "TIFF", _tiff_size),
    (b"MM\x00+", "TIFF", _tiff_size),
)


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) from the header of a PNG, JPEG, GIF, BMP, WebP or TIFF, without
    decoding; a header that cannot be read is an ImageDecodeError."""
    size, kind = None, None
    try:
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            kind = "WebP"
            size = _webp_size(data)
        else:
            for magic, fmt, reader in _HEADERS:
                if data[:len(magic)] == magic:  # (data may be a memoryview)
                    kind = fmt
                    size = reader(data)
                    break
    except (struct.error, IndexError, KeyError):
        size = None
    if kind is None:
        raise ImageDecodeError(f"{name}: not a decodable image (not a PNG, JPEG, GIF, BMP, WebP "
                               "or TIFF header)")
    if size is None or min(size) <= 0:
        raise ImageDecodeError(f"{name}: not a decodable image (unreadable {kind} header: "
                               "corrupt or truncated)")
    return int(size[0]), int(size[1])


def check_image_pixels(data: bytes, name: str = "<bytes>", limit: int | None = None
                       ) -> tuple[int, int]:
    """(width, height) of an image whose header is readable and within `limit` pixels
    (default MAX_IMAGE_PIXELS); else an ImageDecodeError / ImageTooLargeError naming it."""
    limit = MAX_IMAGE_PIXELS if limit is None else limit
    w, h = image_size(data, name)
    if w * h > limit:
        raise ImageTooLargeError(f"{name}: {w} x {h} = {w * h:,} pixels, above the limit of "
                                 f"{limit:,} (--max_image_pixels)")
    return w, h


def checked_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) of encoded image bytes that are not empty and whose header
    `check_image_pixels` accepts: what is checked before any decode."""
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file")
    return check_image_pixels(data, name)


def decode_image(data: bytes, name: str = "<bytes>", reduce: int = 1) -> np.ndarray:
    """Decodes encoded image bytes (or a memoryview of them) to an HxWx3 RGB uint8 array at
    its own size; the header is checked first (`checked_size`), so a decompression bomb is
    never decoded. `reduce` 2, 4 or 8: a JPEG is decoded at 1/reduce of its size (libjpeg's
    scaled IDCT, several times faster); other formats ignore it."""
    checked_size(data, name)
    return _decode_checked(data, name, reduce)


def _decode_checked(data: bytes, name: str, reduce: int) -> np.ndarray:
    """decode_image once its header is checked."""
    buf = np.frombuffer(data, dtype=np.uint8)
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    # JPEG has no alpha; IMREAD_COLOR applies EXIF orientation and converts CMYK/YCCK.
    flags = (_REDUCED_COLOR.get(reduce, cv2.IMREAD_COLOR) if is_jpeg
             else cv2.IMREAD_UNCHANGED)
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
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # 2.5x faster than numpy's [..., ::-1] copy


_REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}


def resized_size(shape: tuple[int, ...], size: tuple[int, int],
                 policy: str = DEFAULT_RESIZE_POLICY) -> tuple[int, int]:
    """(height, width) `resize_image` scales an image of `shape` to before it cuts the centre
    (the target itself under stretch)."""
    h, w = shape[:2]
    th, tw = size
    if policy == "stretch" or (h, w) == (th, tw):
        return th, tw
    scale = max(th / h, tw / w)
    return max(th, round(h * scale)), max(tw, round(w * scale))


def reduction(width: int, height: int, size: tuple[int, int],
              policy: str = DEFAULT_RESIZE_POLICY) -> int:
    """The largest JPEG reduction (8, 4, 2; else 1) that still decodes an image of width x
    height to at least what `resize_image` scales it to: the target is then at most half the
    source on both sides, and a final INTER_AREA resize does the rest."""
    nh, nw = resized_size((height, width), size, policy)
    for k in (8, 4, 2):
        if -(-height // k) >= nh and -(-width // k) >= nw:
            return k
    return 1


def decode_for_size(data: bytes, name: str, size: tuple[int, int],
                    policy: str = DEFAULT_RESIZE_POLICY, reduced: bool = False) -> np.ndarray:
    """`decode_image` as `decode_resized` decodes before it resizes: with `reduced`, a JPEG at
    least twice the target on both sides is decoded reduced (`reduction`); else at full size."""
    width, height = checked_size(data, name)  # once: the decodes below do not check again
    k = reduction(width, height, size, policy) if reduced else 1
    img = _decode_checked(data, name, k)
    if k > 1:
        nh, nw = resized_size(img.shape, size, policy)
        if img.shape[0] < nh or img.shape[1] < nw:  # EXIF turned it: the header's sides swap
            img = _decode_checked(data, name, 1)
    return img


def decode_resized(data: bytes, name: str, size: tuple[int, int],
                   policy: str = DEFAULT_RESIZE_POLICY, reduced: bool = False) -> np.ndarray:
    """`decode_image` then `resize_image`; `reduced`: a JPEG at least twice the target on
    both sides is decoded reduced (`reduction`) first. Without `reduced` the pixels are those
    of a full decode, bit for bit."""
    return resize_image(decode_for_size(data, name, size, policy, reduced), size, policy)


@contextlib.contextmanager
def one_opencv_thread():
    """OpenCV held to one thread of its own in the block (its pool is process-wide): where our
    threads are the parallelism, its pool on top of them costs CPU (10% more per image
    measured in make_tfrecords), and a one-core rate must be one core's."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


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
    return _windows(img, size, 1)[0]


def cover_scaled(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image scaled, aspect kept, so that it just covers `size` (the shorter side at the
    target; `resized_size`): what `center_crop` cuts its centre from. Shrinking uses
    INTER_AREA, enlarging INTER_LINEAR; an image at the size is returned as it is."""
    h, w = img.shape[:2]
    if (h, w) == tuple(size):
        return img
    th, tw = size
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (nw, nh), interpolation=interp)


def window_offsets(length: int, size: int, k: int) -> list[int]:
    """Where `k` windows of `size` start along a side of `length`, first at 0 and last at the
    end, evenly spaced; the middle one of an odd `k` (and the one window of k=1) is exactly
    `center_crop`'s, (length - size) // 2."""
    slack = length - size
    if k == 1:
        return [slack // 2]
    return [(j * slack) // (k - 1) for j in range(k)]


def native_windows(img: np.ndarray, size: tuple[int, int], k: int) -> np.ndarray:
    """(k, height, width, C): `k` windows of `size` covering the image at its own aspect
    (test-time augmentation at the photo's native aspect): the image scaled as `center_crop`
    scales it (`cover_scaled`), then windows slid along its long side (left to right, or top
    to bottom), centred across the short one. k=1 is `center_crop`'s crop, bit for bit; so is
    the middle window of any odd k."""
    if k < 1:
        raise ValueError(f"native_windows: k must be >= 1, got {k}")
    return np.stack(_windows(img, size, k))


def _windows(img: np.ndarray, size: tuple[int, int], k: int) -> list[np.ndarray]:
    """native_windows' windows, each its own contiguous array (one window is a crop, not
    stacked into a copy first)."""
    th, tw = size
    scaled = cover_scaled(img, size)
    nh, nw = scaled.shape[:2]
    if nh - th >= nw - tw:  # slide down the long (tall) side
        tops, lefts = window_offsets(nh, th, k), [(nw - tw) // 2] * k
    else:
        tops, lefts = [(nh - th) // 2] * k, window_offsets(nw, tw, k)
    return [np.ascontiguousarray(scaled[t:t + th, lft:lft + tw]) for t, lft in zip(tops, lefts)]


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
