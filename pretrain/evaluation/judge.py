"""A pixel judge for the synthetic shapes task, independent of any model.

`judge(image)` reads an RGB image (H, W, 3) uint8 and says what it shows, by measurement only:

- **objects**: connected components (8-neighbourhood) of the pixels that differ from the background
  (the median colour of the image border) by more than `FG_THRESHOLD` in some channel; specks under
  `MIN_OBJECT_AREA` of the image are ignored, and a component larger than `MAX_OBJECT_AREA` (more
  than two grid cells: the largest synthetic shape covers 0.64 of one) is no object but a smear.
- **colour**: the palette colour (`data_pipeline.synthetic.COLORS`) nearest, in RGB, to the median
  colour of the largest component (the median ignores the blurred rim a VAE leaves).
- **shape**: by geometry of the largest component that rotation does not change and the rounded
  corners of a VAE's reconstruction change little. Triangle: the overlap (IoU) of the shape with
  itself turned 180 degrees about its centroid is 1/2 for a triangle (a hexagon of 2/3 its area)
  and 1 for a circle or square: below `TRIANGLE_IOU` (halfway) it is a triangle. Circle or square:
  the radial extent, (largest distance of a pixel's edge from the centroid) / sqrt(area), is
  1/sqrt(pi) = 0.564 for a circle and 1/sqrt(2) = 0.707 for a square: below `SQUARE_EXTENT`
  (halfway) it is a circle.
- **place**: the 3x3 grid cell holding the centroid of the largest component.

The generator's own images are judged right >= 99% in every attribute and noise images at chance
level (tests/test_evaluate.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from data_pipeline.synthetic import COLORS, PLACES, SHAPES

FG_THRESHOLD = 80  # 0-255: a foreground pixel differs this much from the background in some channel
MIN_OBJECT_AREA = 0.004  # share of the image: smaller components are specks (64 px image: 16 pixels)
MAX_OBJECT_AREA = 2 / 9  # share of the image: larger components are smears (two of the 3x3 cells)
#: thresholds halfway between the ideal values (geometry, not fitted)
TRIANGLE_IOU = 0.75  # IoU with itself turned 180 degrees: triangle 0.5, circle and square 1
SQUARE_EXTENT = (1 / math.sqrt(math.pi) + 1 / math.sqrt(2)) / 2  # radial extent: circle 0.564, square 0.707
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (6, 3)
_CELL_TO_PLACE = {cell: name for name, cell in PLACES.items()}


@dataclass(frozen=True)
class Verdict:
    """What the judge sees in one image; colour/shape/place are None when it finds no object."""

    color: str | None
    shape: str | None
    place: str | None
    objects: int  # components between MIN_OBJECT_AREA and MAX_OBJECT_AREA
    smears: int  # components larger than MAX_OBJECT_AREA
    sym180: float  # IoU of the main object with itself turned 180 degrees (0 without one)
    extent: float  # radial extent of the main object (0 without one)

    @property
    def one_object(self) -> bool:
        """Exactly one object and no smear."""
        return self.objects == 1 and self.smears == 0


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels (H, W) int64 (0 = background, 1..n) of the 8-connected components of a bool mask (H, W)."""
    H, W = mask.shape
    big = H * W + 1
    lab = np.where(mask, np.arange(1, H * W + 1).reshape(H, W), big)  # (H, W)
    while True:  # propagate the smallest label through each component
        pad = np.pad(lab, 1, constant_values=big)  # (H+2, W+2)
        nb = np.min([pad[dy : dy + H, dx : dx + W] for dy in range(3) for dx in range(3)], axis=0)  # (H, W)
        new = np.where(mask, np.minimum(lab, nb), big).ravel()  # (H*W,)
        new[mask.ravel()] = new[new[mask.ravel()] - 1]  # pointer jump: a label is a member pixel's index + 1
        new = new.reshape(H, W)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, dense = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((H, W), dtype=np.int64)
    out[mask] = dense + 1
    return out, len(roots)


def turned_iou(mask: np.ndarray, degrees: float) -> float:
    """IoU of a bool mask (H, W) with itself turned by `degrees` about its centroid (nearest-pixel lookup)."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    gy, gx = np.mgrid[:H, :W]  # (H, W) each: every pixel asks where it came from
    a = math.radians(degrees)
    sy = np.rint(cy - (gx - cx) * math.sin(a) + (gy - cy) * math.cos(a)).astype(np.int64)
    sx = np.rint(cx + (gx - cx) * math.cos(a) + (gy - cy) * math.sin(a)).astype(np.int64)
    inside = (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
    turned = np.zeros_like(mask)
    turned[inside] = mask[sy[inside], sx[inside]]
    return float((mask & turned).sum() / (mask | turned).sum())


def radial_extent(ys: np.ndarray, xs: np.ndarray) -> float:
    """(Largest distance of a pixel's far edge from the centroid) / sqrt(pixel count) for pixels at (ys, xs)."""
    r = np.hypot(ys - ys.mean(), xs - xs.mean()).max() + 0.5  # + half a pixel: to its edge, not its centre
    return float(r / math.sqrt(len(ys)))


def background(img: np.ndarray) -> np.ndarray:
    """Median colour (3,) of the image border."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2H+2W, 3)
    return np.median(border, axis=0)


def judge(img: np.ndarray) -> Verdict:
    """Judge one RGB image (H, W, 3) uint8: the main object's colour, shape, place, and the object count."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"judge expects an (H, W, 3) RGB image, got shape {img.shape}")
    H, W, _ = img.shape
    x = img.astype(np.float64)
    fg = np.abs(x - background(x)).max(axis=2) > FG_THRESHOLD  # (H, W)
    labels, n = connected_components(fg)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,)
    lo, hi = MIN_OBJECT_AREA * H * W, MAX_OBJECT_AREA * H * W
    objects = int(((areas >= lo) & (areas <= hi)).sum())
    smears = int((areas > hi).sum())
    if n == 0 or areas.max() < lo:
        return Verdict(None, None, None, objects, smears, 0.0, 0.0)
    main = labels == int(areas.argmax()) + 1  # (H, W)
    ys, xs = np.nonzero(main)
    rgb = np.median(x[ys, xs], axis=0)  # (3,)
    color = list(COLORS)[int(((_PALETTE - rgb) ** 2).sum(axis=1).argmin())]
    sym180, extent = turned_iou(main, 180.0), radial_extent(ys.astype(np.float64), xs.astype(np.float64))
    shape = "triangle" if sym180 < TRIANGLE_IOU else "square" if extent > SQUARE_EXTENT else "circle"
    cell = (min(int((xs.mean() + 0.5) * 3 / W), 2), min(int((ys.mean() + 0.5) * 3 / H), 2))  # pixel centres at +0.5
    return Verdict(color, shape, _CELL_TO_PLACE[cell], objects, smears, sym180, extent)


_PLACE_RE = re.compile(r"\b(?:in the center|at the (top left|top right|bottom left|bottom "
                       r"right|top|bottom|left|right))\b")


def parse_caption(text: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, place) named by a caption, by words; None for what it does not name.

    The first palette colour word, the first shape word, and the first place phrase
    ('in the center' or 'at the <place>') count.
    """
    words = re.findall(r"[a-z]+", text.lower())
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    m = _PLACE_RE.search(" ".join(words))
    place = None if m is None else (m.group(1) or "center")
    return color, shape, place
