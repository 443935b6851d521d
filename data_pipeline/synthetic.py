"""Synthetic data, deterministic from a seed: coloured shapes at known places with matching captions,
text documents about them (long-tailed lengths) and interleaved documents.

Learnable on purpose: a caption names colour, shape and one of nine places, so a tiny model can
show text-to-image and captioning skill after minutes of CPU training. Every image is a fresh draw
(object size, offset inside its cell, a slight rotation: `Look`), so evaluation images are never
training images, and the (colour, shape, place) combinations in `HELD_OUT` never appear in any
training source (pairs, interleaved documents, text sentences): `pretrain.evaluation.evaluate` reports them
separately as compositional generalisation.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {  # name -> (column, row) in a 3x3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
#: (colour, shape, place) combinations kept out of every training source; each colour, shape and
#: place still appears in training in its other combinations (8 of 162 combinations, about 5%).
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "center"), ("green", "circle", "top left"), ("blue", "square", "bottom right"),
    ("yellow", "circle", "bottom"), ("purple", "square", "top"), ("orange", "triangle", "left"),
    ("blue", "triangle", "top right"), ("red", "circle", "bottom left"),
)
_WORDS = (
    "the of and to in is was for on that with as by at from it this be are have has an which one "
    "their more about other some time people new first year also can after two would only most "
    "picture drawing shape colour color bright small large image left right top bottom centre"
).split()


def caption_for(color: str, shape: str, place: str) -> str:
    """The caption of one synthetic image, e.g. 'a red circle at the top left'."""
    where = "in the center" if place == "center" else f"at the {place}"
    return f"a {color} {shape} {where}"


@dataclass(frozen=True)
class Look:
    """Per-image variation of one shape, in units of its grid cell's side.

    `scale`: the shape's side (circle: diameter) before rotation; `dx`, `dy`: offset of its centre
    from the cell centre (+x right, +y down); `angle`: rotation in degrees, counter-clockwise. The
    default is the fixed look of the first demo (side 0.76 of the cell, centred, upright).
    """

    scale: float = 0.76
    dx: float = 0.0
    dy: float = 0.0
    angle: float = 0.0


#: ranges of `random_look`: side 0.55-0.8 of the cell, rotation +-15 degrees, offsets that keep the
#: rotated shape inside its cell with a margin of 0.04 cell (so the place stays unambiguous).
LOOK_SCALE = (0.55, 0.8)
LOOK_MAX_ANGLE = 15.0
LOOK_MARGIN = 0.04


def _outline(shape: str, side: float, angle: float) -> np.ndarray:
    """Polygon vertices (K, 2) of a shape of side `side` centred on (0, 0), rotated by `angle` degrees."""
    h = side / 2
    if shape == "square":
        pts = np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif shape == "triangle":  # apex up, base = height = side; centred on its bounding box
        pts = np.array([(0.0, -h), (h, h), (-h, h)])
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    a = math.radians(angle)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])  # y points down: CCW on screen
    return pts @ rot.T


def random_look(rng: np.random.Generator, shape: str) -> Look:
    """A random size, rotation and in-cell offset for `shape` (ranges: LOOK_SCALE, LOOK_MAX_ANGLE, LOOK_MARGIN)."""
    scale = float(rng.uniform(*LOOK_SCALE))
    angle = 0.0 if shape == "circle" else float(rng.uniform(-LOOK_MAX_ANGLE, LOOK_MAX_ANGLE))
    half = scale / 2 if shape == "circle" else float(np.abs(_outline(shape, scale, angle)).max())
    slack = max(0.0, 0.5 - half - LOOK_MARGIN)
    dx, dy = rng.uniform(-slack, slack, size=2)
    return Look(scale, float(dx), float(dy), angle)


def draw_shape(color: str, shape: str, place: str, size: int = 64, look: Look | None = None) -> Image.Image:
    """An RGB image of one filled shape in a cell of a 3x3 grid on a white background."""
    look = look or Look()
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    col, row = PLACES[place]
    cell = size / 3
    cx, cy = (col + 0.5 + look.dx) * cell, (row + 0.5 + look.dy) * cell
    rgb = COLORS[color]
    if shape == "circle":
        r = look.scale * cell / 2
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        pts = _outline(shape, look.scale * cell, look.angle) + (cx, cy)
        d.polygon([tuple(p) for p in pts.tolist()], fill=rgb)
    return img


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding of `img`."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def random_scene(rng: np.random.Generator,
                 exclude: tuple[tuple[str, str, str], ...] = HELD_OUT) -> tuple[str, str, str]:
    """A random (colour, shape, place), uniform over the combinations not in `exclude` (default: HELD_OUT)."""
    while True:
        scene = (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), str(rng.choice(list(PLACES))))
        if scene not in exclude:
            return scene


def draw_scene(rng: np.random.Generator, scene: tuple[str, str, str], size: int) -> Image.Image:
    """`scene` drawn with a random look (a fresh draw: size, offset and rotation vary)."""
    return draw_shape(*scene, size=size, look=random_look(rng, scene[1]))


def text_document(rng: np.random.Generator) -> str:
    """A text document with a long-tailed length: sentences about shapes mixed with filler words."""
    n_sent = max(1, int(rng.lognormal(mean=1.5, sigma=1.0)))
    sents = []
    for _ in range(n_sent):
        if rng.random() < 0.6:
            c, s, p = random_scene(rng)
            sents.append(f"there is {caption_for(c, s, p)}.")
        else:
            k = int(rng.integers(4, 14))
            sents.append(" ".join(rng.choice(_WORDS, size=k)) + ".")
    return " ".join(sents)


def write_demo_sources(out: Path, seed: int, n_pairs: int, n_texts: int, n_interleaved: int, size: int) -> dict:
    """Write raw demo inputs (images + jsonl files) under `out`; returns the paths written."""
    rng = np.random.default_rng(seed)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    pairs, interleaved = out / "pairs.jsonl", out / "interleaved.jsonl"
    with open(pairs, "w") as f:
        for i in range(n_pairs):
            c, s, p = random_scene(rng)
            name = f"pair_{i:06d}.png"
            draw_scene(rng, (c, s, p), size).save(img_dir / name)
            f.write(json.dumps({"image": f"images/{name}", "caption": caption_for(c, s, p)}) + "\n")
    with open(interleaved, "w") as f:
        for i in range(n_interleaved):
            segs: list[dict] = [{"text": text_document(rng)}]
            for j in range(int(rng.integers(1, 3))):
                c, s, p = random_scene(rng)
                name = f"inter_{i:06d}_{j}.png"
                draw_scene(rng, (c, s, p), size).save(img_dir / name)
                segs += [{"text": "here is a picture:"}, {"image": f"images/{name}"},
                         {"text": f"it shows {caption_for(c, s, p)}."}]
            f.write(json.dumps({"segments": segs}) + "\n")
    texts = out / "texts.jsonl"
    with open(texts, "w") as f:
        for i in range(n_texts):
            f.write(json.dumps({"text": text_document(rng), "id": i}) + "\n")
    return {"pairs": pairs, "interleaved": interleaved, "texts": texts}
