"""Image bytes -> arrays, the one preprocessing definition, and heatmap storage.

Everything that turns stored bytes into model input lives here, so training and
attribution preprocess identically.

Heatmap encoding (``encode_heatmap`` / ``decode_heatmap``)
----------------------------------------------------------
A stored heatmap only has to reproduce the map's *pixel ranking* (deletion and
insertion metrics depend on nothing else), so we store that ranking exactly and
losslessly instead of lossy float values.

Ranking: a stable descending sort of the flattened map; ties are broken by the
lower flat index first (the same rule as ``l2r.ranking.hard_order``). The rank of
a pixel is its position in that order (0 = most important).

Byte layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"L2RH"
    4       1     version (1)
    5       1     rank dtype width in bytes: 2 (uint16, when H*W <= 65536) or 4 (uint32)
    6       4     H (uint32)
    10      4     W (uint32)
    14      ...   zlib(rank of every pixel, row-major, as uint16/uint32)

Decoding gives ``(H*W - rank) / (H*W)`` as float32: values in (0, 1], all
distinct, larger = more important, so re-ranking the decoded map (with any tie
rule) reproduces the original ranking exactly. ``decode_heatmap_ranks`` returns
the integer ranks themselves.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we accept; restricting the decoder also keeps exotic parsers out of the path.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")

HEATMAP_MAGIC = b"L2RH"
HEATMAP_VERSION = 1
_HEADER = struct.Struct("<4sBBII")
# float32 keeps (N - rank) / N distinct (with margin) while the spacing 1/N is >= 2 ulps near 1.
_MAX_HEATMAP_PIXELS = 1 << 23
# Decoded images are resized to a few hundred pixels; a header announcing more than this (a
# decompression bomb: a few KB of PNG that decode to gigabytes) is refused before decoding. Pillow's
# own limit (89M pixels, an error only past twice that) still lets ~170M pixels decode.
MAX_IMAGE_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """Image bytes could not be turned into an RGB array; the message says why."""


def _open_image(data: bytes, what: str) -> Image.Image:
    if data is None or len(data) == 0:
        raise ImageDecodeError(f"empty {what} data")
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=ACCEPTED_FORMATS)
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageDecodeError(f"{what} too large: {width}x{height} pixels announced, at most "
                                   f"{MAX_IMAGE_PIXELS} are decoded (a decompression bomb?)")
        img.load()
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a recognised {what} (expected {'/'.join(ACCEPTED_FORMATS)}), {len(data)} bytes"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{what} too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncation and corrupt streams as OSError ("image file is truncated").
        raise ImageDecodeError(f"truncated or corrupt {what}: {exc}") from None
    return img


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes to a uint8 RGB array (H, W, 3).

    Grayscale, palette, CMYK and 16-bit inputs are converted to RGB; an alpha
    channel is dropped (the colour under it is kept, as torchvision/timm do).
    EXIF orientation is applied so the array matches what a viewer shows.
    Raises ``ImageDecodeError`` with the reason.
    """
    img = _open_image(data, "image")
    if "exif" in img.info:  # parsing EXIF costs time; most images have none
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block should not lose an otherwise good image
            pass
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16-bit / 32-bit grayscale: Pillow's RGB conversion would clip; scale to 8 bits instead.
        arr = np.asarray(img).astype(np.float64)
        if img.mode != "F":
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def decode_mask(data: bytes) -> np.ndarray:
    """Decode a mask image (e.g. ``mask.png``) to bool (H, W): True where the value is >= 128."""
    img = _open_image(data, "mask")
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img) >= 128


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _resized_shape(h: int, w: int, size, crop_pct: float) -> tuple[int, int]:
    """Shape after scaling (h, w) to cover size / crop_pct while keeping the aspect ratio."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    out_h, out_w = _pair(size)
    cover_h = max(out_h, math.floor(out_h / crop_pct))
    cover_w = max(out_w, math.floor(out_w / crop_pct))
    scale = max(cover_h / h, cover_w / w)
    return max(cover_h, round(h * scale)), max(cover_w, round(w * scale))


def _center_crop(arr: np.ndarray, size) -> np.ndarray:
    out_h, out_w = _pair(size)
    top = (arr.shape[0] - out_h) // 2
    left = (arr.shape[1] - out_w) // 2
    return arr[top : top + out_h, left : left + out_w]


def resize_and_crop(arr: np.ndarray, size, crop_pct: float = 1.0) -> np.ndarray:
    """Resize keeping the aspect ratio so the image covers size / crop_pct, then centre-crop to size.

    For a square ``size`` this is timm's eval transform: shorter side to
    ``floor(size / crop_pct)`` (bilinear; Pillow antialiases when shrinking),
    then a centre crop. ``size`` is an int or (H, W). Returns uint8 (H, W, 3).
    """
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    new_h, new_w = _resized_shape(arr.shape[0], arr.shape[1], size, crop_pct)
    if (new_h, new_w) != arr.shape[:2]:
        img = Image.fromarray(np.ascontiguousarray(arr)).resize((new_w, new_h), Image.BILINEAR)
        arr = np.asarray(img)
    return np.ascontiguousarray(_center_crop(arr, size))


def resize_and_crop_mask(mask: np.ndarray, size, crop_pct: float = 1.0) -> np.ndarray:
    """The same geometry as ``resize_and_crop`` for a bool (H, W) mask (bilinear, then >= 0.5)."""
    mask = np.asarray(mask, dtype=bool)
    new_h, new_w = _resized_shape(mask.shape[0], mask.shape[1], size, crop_pct)
    if (new_h, new_w) != mask.shape:
        img = Image.fromarray(mask.astype(np.uint8) * 255).resize((new_w, new_h), Image.BILINEAR)
        mask = np.asarray(img) >= 128
    return np.ascontiguousarray(_center_crop(mask, size))


def to_tensor(images):
    """uint8 NHWC (numpy or torch; a single HWC also works) -> float32 NCHW in [0, 1]."""
    import torch

    if isinstance(images, np.ndarray):
        # Copy: Ray batches are read-only views and torch.from_numpy would warn.
        images = torch.from_numpy(np.array(images, copy=True))
    if images.ndim == 3:
        return images.permute(2, 0, 1).float().div_(255.0).contiguous()
    if images.ndim != 4:
        raise ValueError(f"expected NHWC or HWC, got shape {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def heatmap_ranks(heatmap) -> np.ndarray:
    """Rank of every pixel (0 = most important): stable descending sort, ties to the lower flat index."""
    values = np.asarray(heatmap)
    if hasattr(heatmap, "detach"):  # a torch tensor
        values = heatmap.detach().cpu().numpy()
    if values.ndim != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {values.shape}")
    flat = values.reshape(-1)
    if flat.dtype.kind == "f":
        if np.isnan(flat).any():
            raise ValueError("heatmap contains NaN: its ranking is undefined")
        keys = -flat.astype(np.float64)
    else:
        keys = -flat.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(values.shape)


def encode_heatmap(heatmap) -> bytes:
    """Store the exact pixel ranking of a (H, W) map; see the module docstring for the layout."""
    ranks = heatmap_ranks(heatmap)
    h, w = ranks.shape
    if h * w > _MAX_HEATMAP_PIXELS:
        raise ValueError(f"heatmap has {h * w} pixels; at most {_MAX_HEATMAP_PIXELS} are supported")
    width = 2 if h * w <= 65536 else 4
    dtype = np.dtype("<u2") if width == 2 else np.dtype("<u4")
    header = _HEADER.pack(HEATMAP_MAGIC, HEATMAP_VERSION, width, h, w)
    return header + zlib.compress(ranks.astype(dtype).tobytes(), level=6)


def decode_heatmap_ranks(data: bytes) -> np.ndarray:
    """The stored ranks as int64 (H, W) (0 = most important)."""
    if len(data) < _HEADER.size:
        raise ValueError(f"heatmap data too short ({len(data)} bytes)")
    magic, version, width, h, w = _HEADER.unpack_from(data)
    if magic != HEATMAP_MAGIC:
        raise ValueError(f"not an encoded heatmap (magic {magic!r})")
    if version != HEATMAP_VERSION:
        raise ValueError(f"unsupported heatmap version {version}")
    if width not in (2, 4):
        raise ValueError(f"unsupported rank width {width}")
    dtype = np.dtype("<u2") if width == 2 else np.dtype("<u4")
    raw = zlib.decompress(data[_HEADER.size :])
    ranks = np.frombuffer(raw, dtype=dtype)
    if ranks.size != h * w:
        raise ValueError(f"heatmap payload has {ranks.size} ranks, header says {h}x{w}")
    return ranks.astype(np.int64).reshape(h, w)


def decode_heatmap(data: bytes) -> np.ndarray:
    """float32 (H, W) with the stored ranking: (H*W - rank) / (H*W), all distinct, larger = more important."""
    ranks = decode_heatmap_ranks(data)
    n = ranks.size
    return ((n - ranks) / n).astype(np.float32)
