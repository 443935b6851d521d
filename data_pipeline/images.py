"""Decode any image PIL reads, reject bad ones with a reason, convert to RGB, resize and centre-crop.

Pixels are what a viewer shows: the EXIF orientation is applied first (PIL's `ImageOps.exif_transpose`,
the reference a viewer follows), an embedded ICC profile (Adobe RGB, ProPhoto, Display P3, a grey or
CMYK profile) converts the colours to sRGB (littleCMS through Pillow's `ImageCms`, perceptual intent,
which equals relative colorimetric for matrix-shaper profiles), then each PIL mode is mapped to 8-bit
RGB by its real value range (never stretched per image nor clamped). An animated image (GIF, WebP,
APNG with more than one frame) is skipped as `animated` unless a frame is chosen (`animated_frame`):
PIL composites that frame over the earlier ones by their disposal and blend rules, as a viewer shows it
when paused there. Bad images (zero bytes, truncated, not an image, tiny, absurd aspect ratio,
decompression bomb, unreadable EXIF, an unreadable ICC profile or one for another colour space than
the image's, a mode or value range with no defined mapping, animated) raise `BadImage` with a short
reason that precompute counts in its report; conversions that were applied (`icc_to_srgb`,
`animated_frame`) are counted through the `notes` Counter the decoders take.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections import Counter

import numpy as np
from PIL import Image, ImageCms, ImageOps

MIN_SIDE = 8  # pixels; smaller images (1x1 trackers, icons) are skipped
MAX_ASPECT = 4.0  # longer/shorter side; panoramas and banners are skipped
MAX_PIXELS = 64_000_000  # decompression-bomb guard (PIL's own limit is 89M with only a warning)
#: changes whenever the same bytes decode to other pixels (precompute redoes parts made by another version)
PIXELS_VERSION = 2  # 2: ICC profiles converted to sRGB, animated images skipped or a chosen frame


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


_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa")
_PLAIN = ("RGB", "L", "1", "CMYK", "YCbCr", "HSV", "RGBX")


def _grey(arr: np.ndarray) -> Image.Image:
    """(H, W) values already on the 0..255 scale -> RGB (rounded, not clamped: callers checked the range)."""
    return Image.fromarray(np.rint(arr).astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB as a viewer shows it; raises BadImage(`unsupported_mode` / `unsupported_range`).

    8-bit modes, 1-bit, CMYK, YCbCr, HSV: PIL's conversion. Palette (with or without transparency),
    RGBA, LA, PA: alpha composited on white. 16-bit grey (`I;16*`): value / 257 (65535 -> 255).
    32-bit int `I`: a 16-bit range is assumed (PNG/TIFF 16-bit grey), values outside 0..65535 are
    `unsupported_range`. Float `F`: the 0..1 range (x 255), values outside it are `unsupported_range`.
    LAB and other modes: `unsupported_mode` (their conversion needs a colour profile).
    """
    m = img.mode
    if m in _16BIT or m == "I":
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise BadImage("unsupported_range", f"mode {m} values {arr.min():.0f}..{arr.max():.0f} outside 0..65535")
        return _grey(arr / 257.0)
    if m == "F":
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        if not np.isfinite(arr).all() or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise BadImage("unsupported_range",
                           f"float image values {np.nanmin(arr):g}..{np.nanmax(arr):g} outside 0..1")
        return _grey(arr * 255.0)
    if m == "P" or m in _ALPHA:
        rgba = img.convert("RGBA")
        if m == "P" and "transparency" not in img.info:
            return rgba.convert("RGB")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if m in _PLAIN:
        return img.convert("RGB")
    raise BadImage("unsupported_mode", f"mode {m} has no defined conversion to RGB")


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
#: the profile colour space (ICC header) -> the PIL modes a transform to sRGB reads, as prepared by `to_srgb`
_ICC_IN = {"RGB": ("RGB", "RGBA"), "GRAY": ("L",), "CMYK": ("CMYK",)}


@functools.lru_cache(maxsize=64)
def _icc_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """littleCMS transform from the embedded profile `icc` (PIL `mode`) to sRGB (RGB, or RGBA keeping alpha).

    NOCACHE: lcms's one-pixel cache is shared state, so without it threads using one transform race.
    Raises BadImage `bad_icc_profile` (lcms cannot read it) or `icc_mismatch` (a profile for another colour space).
    """
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = src.profile.xcolor_space.strip()
    except (OSError, ImageCms.PyCMSError, ValueError) as e:
        raise BadImage("bad_icc_profile", str(e)) from e
    if mode not in _ICC_IN.get(space, ()):
        raise BadImage("icc_mismatch", f"a {space!r} ICC profile on a {mode} image")
    try:
        return ImageCms.buildTransform(src, _SRGB, mode, "RGBA" if mode == "RGBA" else "RGB",
                                       ImageCms.Intent.PERCEPTUAL, ImageCms.Flags.NOCACHE)
    except ImageCms.PyCMSError as e:
        raise BadImage("bad_icc_profile", str(e)) from e


def to_srgb(img: Image.Image, notes: Counter | None = None) -> Image.Image:
    """The image's colours converted from its embedded ICC profile to sRGB; unchanged without a profile.

    Modes are first brought to what the profile's colour space reads: RGB profiles take RGB or RGBA
    (palette, LA and PA images are expanded; alpha is carried through untouched), grey profiles take L
    (16-bit and float grey by `to_rgb`'s value mapping, 8-bit after it; LA keeps its alpha), CMYK
    profiles take CMYK. Returns RGB, RGBA or (grey with alpha) RGBA; adds 1 to notes["icc_to_srgb"].
    Raises BadImage `bad_icc_profile` / `icc_mismatch` (see `_icc_transform`).
    """
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    m, alpha = img.mode, None
    if m in ("P", "PA", "RGBa", "RGBX", "1"):
        img = img.convert("RGBA" if m != "1" and (m != "P" or "transparency" in img.info) else "RGB")
    elif m == "LA":
        img, alpha = img.getchannel("L"), img.getchannel("A")
    elif m in _16BIT or m in ("I", "F"):
        img = to_rgb(img).convert("L")  # exact: R = G = B
    out = _icc_transform(bytes(icc), img.mode).apply(img)
    if alpha is not None:
        out.putalpha(alpha)
    if notes is not None:
        notes["icc_to_srgb"] += 1
    return out


def pick_frame(img: Image.Image, frame: int | None, notes: Counter | None = None) -> Image.Image:
    """`img` itself when it has one frame; else frame `frame` (0-based) composited as PIL's GIF/WebP/APNG
    readers do (disposal and blending of the earlier frames), counted in notes["animated_frame"].

    Raises BadImage `animated` when `frame` is None (the default: skip) or past the last frame.
    """
    n = getattr(img, "n_frames", 1)
    if n <= 1:
        return img
    if frame is None:
        raise BadImage("animated", f"{n} frames; skipped (choose a frame with --animated-frame K)")
    if not 0 <= frame < n:
        raise BadImage("animated", f"{n} frames, frame {frame} asked")
    try:
        img.seek(frame)
        img.load()
    except (OSError, EOFError, ValueError) as e:
        raise BadImage("truncated", f"frame {frame}: {e}") from e
    if notes is not None:
        notes["animated_frame"] += 1
    return img


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (as a viewer shows it); BadImage `bad_exif` if unreadable."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - malformed EXIF blocks of every kind
        raise BadImage("bad_exif", f"{type(e).__name__}: {e}") from e


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then take the centre `size` x `size` crop."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if s > 0.5 else 2.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(data: bytes, size: int, animated_frame: int | None = None, notes: Counter | None = None) -> np.ndarray:
    """Bytes of any image -> (3, size, size) float32 in [-1, 1], as a viewer shows it; raises BadImage.

    Order: the frame (`pick_frame`: animated images are skipped unless `animated_frame` is given), the
    EXIF orientation (`upright`), size checks, the ICC profile to sRGB (`to_srgb`), the mode to RGB
    (`to_rgb`), then `resize_center_crop`. `notes` counts the conversions applied (`icc_to_srgb`, `animated_frame`).
    """
    done: Counter = Counter()  # conversions of this image, counted only once it decoded
    img = upright(pick_frame(_open(data), animated_frame, done))
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise BadImage("too_small", f"{w}x{h}")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise BadImage("bad_aspect_ratio", f"{w}x{h}")
    img = resize_center_crop(to_rgb(to_srgb(img, done)), size)
    if notes is not None:
        notes.update(done)
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    return arr.transpose(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8 for saving as PNG or judging (one image or a batch)."""
    return np.moveaxis(((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8), -3, -1)


def decode_images(segments: list[tuple[str, object]], size: int, animated_frame: int | None = None,
                  notes: Counter | None = None) -> list[np.ndarray | str]:
    """Each image segment of a record decoded by `load_image`, or its skip reason.

    Returns one entry per ("image", bytes | None) segment: a (3, size, size) float32 array in [-1, 1],
    or the reason string (`missing_file` for bytes that could not be read, else `BadImage.reason`).
    `animated_frame` and `notes` as for `load_image`.
    """
    out: list[np.ndarray | str] = []
    for kind, val in segments:
        if kind != "image":
            continue
        if val is None:
            out.append("missing_file")
            continue
        try:
            out.append(load_image(val, size, animated_frame, notes))  # type: ignore[arg-type]
        except BadImage as e:
            out.append(e.reason)
    return out
