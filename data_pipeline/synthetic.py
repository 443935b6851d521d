"""Synthetic data, deterministic from a seed: coloured shapes at known places with matching captions,
text documents about them (long-tailed lengths) and interleaved documents.

Learnable on purpose: a caption names colour, shape and one of nine places, so a tiny model can
show text-to-image and captioning skill after minutes of CPU training.
"""

from __future__ import annotations

import io
import json
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
_WORDS = (
    "the of and to in is was for on that with as by at from it this be are have has an which one "
    "their more about other some time people new first year also can after two would only most "
    "picture drawing shape colour color bright small large image left right top bottom centre"
).split()


def caption_for(color: str, shape: str, place: str) -> str:
    """The caption of one synthetic image, e.g. 'a red circle at the top left'."""
    where = "in the center" if place == "center" else f"at the {place}"
    return f"a {color} {shape} {where}"


def draw_shape(color: str, shape: str, place: str, size: int = 64) -> Image.Image:
    """An RGB image of one filled shape in a cell of a 3x3 grid on a white background."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    col, row = PLACES[place]
    cell = size / 3
    m = cell * 0.12
    x0, y0 = col * cell + m, row * cell + m
    x1, y1 = (col + 1) * cell - m, (row + 1) * cell - m
    rgb = COLORS[color]
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        d.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=rgb)
    return img


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding of `img`."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def random_scene(rng: np.random.Generator) -> tuple[str, str, str]:
    """A random (colour, shape, place)."""
    return (
        str(rng.choice(list(COLORS))),
        str(rng.choice(SHAPES)),
        str(rng.choice(list(PLACES))),
    )


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
            draw_shape(c, s, p, size).save(img_dir / name)
            f.write(json.dumps({"image": f"images/{name}", "caption": caption_for(c, s, p)}) + "\n")
    with open(interleaved, "w") as f:
        for i in range(n_interleaved):
            segs: list[dict] = [{"text": text_document(rng)}]
            for j in range(int(rng.integers(1, 3))):
                c, s, p = random_scene(rng)
                name = f"inter_{i:06d}_{j}.png"
                draw_shape(c, s, p, size).save(img_dir / name)
                segs += [{"text": "here is a picture:"}, {"image": f"images/{name}"}, {"text": f"it shows {caption_for(c, s, p)}."}]
            f.write(json.dumps({"segments": segs}) + "\n")
    texts = out / "texts.jsonl"
    with open(texts, "w") as f:
        for i in range(n_texts):
            f.write(json.dumps({"text": text_document(rng), "id": i}) + "\n")
    return {"pairs": pairs, "interleaved": interleaved, "texts": texts}
