"""Issue 29.6: the demo's figures as mean (range) over several runs, and a sample grid one can read."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import synthetic
from pretrain import demo
from pretrain.evaluation import evaluate


def _report(t2i_shape: float, caption_all: float, loss: float) -> dict:
    split = {"color": 1.0, "shape": t2i_shape, "place": 1.0, "all_three": t2i_shape, "one_object": 1.0, "n": 462}
    return {"vae": {"seen": {**split, "shape": 0.98, "all_three": 0.98}}, "text_to_image": {"seen": split},
            "captions": {"seen": {"color": 1.0, "shape": 1.0, "place": 1.0, "all_three": caption_all, "n": 243}},
            "text": {"loss": loss, "perplexity": 2.0, "tokens": 100}}


def test_summarise_gives_mean_and_range_of_each_figure_over_runs(tmp_path: Path, capsys) -> None:
    runs = []
    for i, (shape, cap, loss) in enumerate([(0.734, 0.90, 1.5), (0.820, 0.96, 1.4), (0.800, 0.93, 1.6)]):
        out = tmp_path / f"demo_{i}"
        (out / "eval").mkdir(parents=True)
        (out / "eval" / "report.json").write_text(json.dumps(_report(shape, cap, loss)))
        (out / "steps.json").write_text(json.dumps({"steps": 5000 + 100 * i}))
        runs.append(out)
    assert demo.main(["--summarise", *map(str, runs)]) == 0
    text = capsys.readouterr().out
    assert "over 3 runs" in text and "training steps: 5000, 5100, 5200" in text
    # (73.4 + 82.0 + 80.0) / 3 = 78.47
    assert "| text -> image shape | 78.5% (73.4-82.0, n=3) |" in text
    assert "| caption all three words right | 93.0% (90.0-96.0, n=3) |" in text
    assert "| text loss (nats/token) | 1.500 (1.400-1.600, n=3) |" in text
    with pytest.raises(FileNotFoundError, match="no evaluation report"):
        demo.summarise_runs([*runs, tmp_path / "unfinished"])


def test_grid_shows_one_sample_per_combination_in_its_row_and_column(tmp_path: Path) -> None:
    scenes = (evaluate.combos(False) + evaluate.combos(True)) * 3  # the evaluation's order, per_combo 3
    rng = np.random.default_rng(0)
    pixels = np.stack([rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in scenes])  # (486, 16, 16, 3)
    prompts = [synthetic.caption_for(*s) for s in scenes]
    path = evaluate.save_grid(pixels, prompts, tmp_path / "grid.png")
    sheet = np.asarray(Image.open(path).convert("RGB"))
    scale, cell, gap, left, top = 4, 64, 4, 96, 28  # 16-px samples scaled to 64-px cells
    rows = list(itertools.product(synthetic.COLORS, synthetic.SHAPES))
    places = list(synthetic.PLACES)
    assert sheet.shape == (top + len(rows) * (cell + gap), left + len(places) * (cell + gap), 3)
    for k in (0, 7, 100, 161, 170):  # seen and held-out combinations; 170 is a second sample of 8
        color, shape, place = scenes[k]
        y, x = top + rows.index((color, shape)) * (cell + gap), left + places.index(place) * (cell + gap)
        first = pixels[scenes.index(scenes[k])]  # the first sample of that combination, not a later one
        want = first.repeat(scale, axis=0).repeat(scale, axis=1)  # (64, 64, 3) nearest-neighbour
        got = sheet[y : y + cell, x : x + cell]
        inner = slice(2, cell - 2)  # held-out cells carry a 2-px red frame over the edge
        assert np.array_equal(got[inner, inner], want[inner, inner]), scenes[k]


def test_grid_of_other_prompts_puts_each_sample_over_its_prompt(tmp_path: Path) -> None:
    pixels = np.zeros((5, 32, 32, 3), np.uint8)
    path = evaluate.save_grid(pixels, ["a cat on a mat"] * 5, tmp_path / "g.png", cols=3, scale=2)
    assert Image.open(path).size == (3 * 64, 2 * (64 + 24))
