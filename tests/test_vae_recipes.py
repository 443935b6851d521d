"""Issue 29.4: one VAE recipe per image size, used by `python -m data_pipeline.vae` unless flags override it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import synthetic, vae


def test_listed_recipes_are_measured_and_keep_the_papers_256_patches_at_256_px() -> None:
    assert sorted(vae.RECIPES) == [32, 64, 128, 256]
    for size, r in vae.RECIPES.items():
        assert r.image_size == size and r.latent_size * r.downsample == size
        assert r.latent_size % r.patch_size == 0 and r.patches == (size // r.downsample // r.patch_size) ** 2
    # Transfusion sec. 4.1: a 256-px image is 256 patches (32x32x8 latents in 2x2 patches); the recipe's
    # 64x64x4 latents in 4x4 patches keep that count
    assert vae.recipe_for(256).patches == 256
    assert all(not r.measured.startswith("unmeasured") for r in vae.RECIPES.values())
    demo = vae.recipe_for(64)  # the demo's VAE (data_pipeline.demo_data.DemoSizes)
    from data_pipeline.demo_data import DemoSizes

    d = DemoSizes()
    assert (demo.downsample, demo.width, demo.latent_channels, demo.patch_size, demo.steps) == (
        d.vae_downsample, d.vae_width, d.latent_channels, d.patch_size, d.vae_steps)


@pytest.mark.parametrize("size", [8, 16, 48, 96, 160, 384, 512])
def test_unlisted_sizes_get_a_whole_latent_and_patch_grid(size: int) -> None:
    r = vae.recipe_for(size)
    assert r.image_size == size and size % r.downsample == 0 and r.latent_size % r.patch_size == 0
    assert r.measured.startswith("unmeasured")


@pytest.mark.parametrize("size", [0, -64, 30, 100])
def test_a_size_that_is_no_multiple_of_8_is_refused_with_the_listed_sizes(size: int) -> None:
    with pytest.raises(ValueError, match=r"--image-size .*multiple of 8.*\[32, 64, 128, 256\]"):
        vae.recipe_for(size)


def test_cli_trains_the_recipe_of_its_image_size_and_flags_override_it(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        synthetic.draw_shape(*synthetic.random_scene(rng), 32).save(tmp_path / f"im{i}.png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": f"im{i}.png", "caption": "a shape"}) + "\n" for i in range(4)))
    out = tmp_path / "vae"
    vae.main(["--input", str(pairs), "--out", str(out), "--image-size", "32", "--steps", "1", "--batch-size", "2"])
    cfg = json.loads((out / "config.json").read_text())
    r = vae.recipe_for(32)
    assert cfg["latent_channels"] == r.latent_channels and cfg["block_out_channels"][0] == r.width
    assert 2 ** (len(cfg["block_out_channels"]) - 1) == r.downsample
    report = json.loads((out / "latent_stats.json").read_text())
    assert report["steps"] == 1 and report["latent_noise"] == r.latent_noise and report["recipe"]["image_size"] == 32
    assert f"model.latent_size={r.latent_size}" in capsys.readouterr().out
    vae.main(["--input", str(pairs), "--out", str(tmp_path / "v2"), "--image-size", "32", "--steps", "1",
              "--batch-size", "2", "--latent-channels", "3", "--width", "8"])
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert cfg["latent_channels"] == 3 and cfg["block_out_channels"][0] == 8


def test_cli_refuses_an_image_size_without_a_recipe(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        vae.main(["--input", str(tmp_path), "--out", str(tmp_path / "v"), "--image-size", "30"])
    assert "multiple of 8" in capsys.readouterr().err


def test_training_threads_follow_the_free_cores_and_are_restored(tmp_path: Path, monkeypatch) -> None:
    import os

    import torch

    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))  # every core busy
    assert vae.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine: torch's default
    assert vae.default_threads() == torch.get_num_threads()
    seen = []
    real = vae._train_vae
    monkeypatch.setattr(vae, "_train_vae", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    vae.train_vae(torch.zeros(4, 3, 16, 16), tmp_path / "v",
                  vae.VaeTrainSettings(steps=1, batch_size=2, latent_channels=4, downsample=4, width=8, threads=1))
    assert seen == [1] and torch.get_num_threads() == before


@pytest.mark.slow  # 97 s at load average 22 on 2 cores (it builds and steps the 4 M-parameter old default)
def test_bench_vae_train_prints_a_phase_table_with_ratios_to_the_old_default() -> None:
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, str(root / "bench" / "vae_train.py"), "--size", "16", "--images", "32",
                        "--batch-size", "4", "--steps", "2", "--rounds", "1"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 4 and rows[0].endswith("| 1.00 |"), r.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        phases, step = [float(c) for c in cells[2:8]], float(cells[8])
        assert abs(sum(phases) - step) <= 0.05 * step + 8, row  # medians of the parts ~ the step's median
    assert re.search(r"\| old default, 1 thread \| 3,96\d,\d{3} \|", r.stdout)
