"""The data plan (pretrain.plan.data_plan): bytes, hours and rates against hand-computed references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.plan.data_plan import Corpus, make_data_plan, vae_encoder_flops
from pretrain.plan.hardware import GPUS

ROOT = Path(__file__).resolve().parents[1]
PAPER = Corpus(text_tokens=1e12, images=3.5e9)  # DESIGN.md §8: the 2T run


def test_paper_corpus_bytes_and_positions_by_hand() -> None:
    p = make_data_plan(PAPER, 10_000.0, 8, GPUS["h100-80gb"], {}, precompute_rate=1000.0, pack_rate=1e6)
    assert PAPER.latent_bytes == 8 * 32 * 32 * 2 == 16 * 1024  # 16 KiB per 256 px image (DESIGN.md §8)
    assert p.latent_bytes == pytest.approx(3.5e9 * 16384)  # ~57 TB
    assert p.image_positions == pytest.approx(3.5e9 * (30 + 256 + 4))  # caption + BOS BOI P EOI EOS
    assert p.positions == pytest.approx(1e12 + 3.5e9 * 290)
    text = (1e12 + 3.5e9 * 30) * 4 + (1e12 / 1000 + 3.5e9) * 16
    assert p.text_bytes == pytest.approx(text)
    assert p.shards == pytest.approx((text + 3.5e9 * 16384) / 2**26)
    assert p.precompute_gpu_hours == pytest.approx(3.5e9 / 1000 / 3600)
    assert p.pack_cpu_hours == pytest.approx(p.positions / 1e6 / 3600)
    # 8 GPUs at 10k positions/s read 80k positions/s of (bytes / positions) each
    assert p.read_bytes_per_s_per_node == pytest.approx(80_000 * (text + 3.5e9 * 16384) / p.positions)


def test_rates_file_is_used_and_named_and_no_rate_is_an_error(tmp_path: Path) -> None:
    rates = {"pack_positions_per_s": 2.5e5, "precompute_gpu_images_per_s": 4000.0,
             "precompute_gpu_device": "NVIDIA H100 80GB HBM3"}
    p = make_data_plan(PAPER, 1.0, 8, GPUS["h100-80gb"], rates)
    assert p.pack_rate == 2.5e5 and "measured" in p.pack_source  # no pairs rate: the text rate for both
    both = make_data_plan(PAPER, 1.0, 8, GPUS["h100-80gb"], {**rates, "pack_pairs_positions_per_s": 1e5})
    pair_positions = 3.5e9 * 290
    assert both.pack_cpu_hours == pytest.approx((1e12 / 2.5e5 + pair_positions / 1e5) / 3600)
    assert p.precompute_rate == 4000.0 and "H100" in p.precompute_source
    with pytest.raises(ValueError, match="bench/data_throughput.py"):
        make_data_plan(PAPER, 1.0, 8, GPUS["h100-80gb"], {})


def test_unmeasured_gpu_rate_is_a_named_assumption_from_the_encoder_flops() -> None:
    small = Corpus(text_tokens=1e6, images=1e3, image_size=64)
    flops = vae_encoder_flops(64, 8)
    # the encoder's FLOPs grow with the pixels: 4x the pixels, ~4x the FLOPs
    assert vae_encoder_flops(128, 8) == pytest.approx(4 * flops, rel=0.05)
    p = make_data_plan(small, 1.0, 8, GPUS["h100-80gb"], {"pack_positions_per_s": 1e6}, assumed_vae_mfu=0.5)
    assert p.precompute_rate == pytest.approx(0.5 * 989e12 / flops)
    assert p.precompute_source.startswith("ASSUMED")


def test_cli_prints_the_plan(tmp_path: Path) -> None:
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"pack_positions_per_s": 1e6}))
    r = subprocess.run([sys.executable, "-m", "pretrain.plan.data_plan", "--config", "configs/tiny.yaml",
                        "--text-tokens", "1e9", "--images", "1e6", "--rates", str(rates), "--nodes", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for want in ("latents", "shards of 64 MiB", "GPU-hours", "CPU-process-hours", "MB/s per node", "measured"):
        assert want in r.stdout, (want, r.stdout)
    bad = subprocess.run([sys.executable, "-m", "pretrain.plan.data_plan", "--config", "configs/tiny.yaml",
                          "--text-tokens", "1e9", "--images", "1e6", "--rates", str(tmp_path / "none.json")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "no pack rate" in bad.stderr
