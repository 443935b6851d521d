"""Decode any image PIL reads, reject bad ones with a reason, convert to RGB, resize and centre-crop.

Bad images (zero bytes, truncated, not an image, tiny, absurd aspect ratio, decompression bomb)
raise `BadImage` with a short reason that precompute counts in its report.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

MIN_SIDE = 8  # pixels; smaller images (1x1 trackers, icons) are skipped
MAX_ASPECT = 4.0  # longer/shorter side; panoramas and banners are skipped
MAX_PIXELS = 64_000_000  # decompression-bomb guard (PIL's own limit is 89M with only a warning)


class BadImage(ValueError):
    """An image that cannot or should not be used; `reason` is a short key for the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(data: bytes) -> Image.Image:
    """Open and fully decode `data`, mapping every failure to a BadImage reason."""
    if len(data) == 0:
        raise BadImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise BadImage("decompression_bomb", f"{w}x{h}")
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression_bomb", str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise BadImage("not_an_image", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise BadImage("truncated", str(e)) from e
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert CMYK, palette, greyscale and alpha images to RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1.0) * 255.0
        img = Image.fromarray(arr.astype(np.uint8))
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then take the centre `size` x `size` crop."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if s > 0.5 else 2.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(data: bytes, size: int) -> np.ndarray:
    """Bytes of any image -> (3, size, size) float32 in [-1, 1]; raises BadImage."""
    img = _open(data)
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise BadImage("too_small", f"{w}x{h}")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise BadImage("bad_aspect_ratio", f"{w}x{h}")
    img = resize_center_crop(to_rgb(img), size)
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    return arr.transpose(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8 for saving as PNG."""
    return ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
