"""The benchmark scripts run to completion and print real tables (bench/*.py as a user runs them)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.plan.estimate import DocMix, flops_breakdown
from pretrain.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
RSS_TOLERANCE = 0.25  # measured / predicted peak RSS per rank of bench/scale_016b.py (docs/scale.md)


def _run(script: str, *args: str, timeout: int = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.stdout


def test_gpu_step_tiny_prints_a_consistent_table() -> None:
    out = _run("gpu_step.py", "--tiny", "--steps", "2", "--warmup", "1", "--attention", "flex,sdpa")
    assert "datasheet peak n/a" in out and "backward recomputes attention with dense SDPA" in out, out
    flops = float(re.search(r"([0-9.e+]+) FLOP per position", out).group(1))

    # The tiny shape's batch by hand: 1 row of 256 positions, 3 documents of caption 30 + BOI + 16 patches
    # + EOI (48 positions, 30 caption targets each), then one text document of 112 tokens (111 targets).
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, latent_size=8, patch_size=2,
                      patch_encoder="unet", unet_channels=(16, 32), attention="flex")
    assert cfg.patches_per_image == 16
    mix = DocMix(seq_len=256, images=3, text_targets=3 * 30 + 111,
                 causal_pairs=3 * 48 * 49 / 2 + 112 * 113 / 2, source="by hand")
    expected = flops_breakdown(cfg, mix).total
    assert math.isclose(flops, expected, rel_tol=1e-5), (flops, expected)

    rows = {m.group(1, 2): [float(x.replace(",", "").rstrip("%")) for x in m.group(3, 4, 5, 6, 8, 9, 10)]
            for m in re.finditer(r"^(flex|sdpa)\s+(no "
                                 r"ckpt|ckpt)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)%\s+(n/a)\s+(\S+)\s+(\S+)"
                                 r"\s+(\S+)$", out, re.M)}
    assert list(rows) == [(a, c) for a in ("flex", "sdpa") for c in ("no ckpt", "ckpt")], out
    first_pos_s = rows["flex", "no ckpt"][1]
    for name, (ms, pos_s, tflops, mfu, rss_gib, loss, ratio) in rows.items():
        assert math.isclose(ratio, pos_s / first_pos_s, abs_tol=0.01), (name, out)  # positions/s over flex no ckpt
        assert all(math.isfinite(v) and v > 0 for v in (ms, pos_s, tflops, mfu, rss_gib, loss)), (name, out)
        assert math.isclose(pos_s, 256 / (ms / 1e3), rel_tol=0.01), (name, out)  # one row of 256 per step
        assert math.isclose(tflops, flops * pos_s / 1e12, rel_tol=0.01), (name, out)
        assert 0.1 < rss_gib < 16 and loss < 20, (name, out)  # a real process; loss about ln(256) + 5 x diffusion
    for c in ("no ckpt", "ckpt"):  # same weights, batch and steps: the two attention paths train alike
        assert math.isclose(rows["flex", c][5], rows["sdpa", c][5], abs_tol=2e-3), out


@pytest.mark.slow
def test_scale_016b_bench_trains_under_zero3_and_memory_matches_the_estimate(tmp_path: Path) -> None:
    """bench/scale_016b.py at the paper's shapes (4096-position rows with 256-patch 8x32x32 images, fp32
    ZeRO-3 on 2 CPU ranks, activation checkpointing, micro-batch 1) with the 0.16B config narrowed to
    2 layers of width 128 and its U-Net patching narrowed to channels (32, 64), so it fits CI (the full
    0.16B takes about 3 minutes per step here; docs/scale.md has its figures): the loss falls on the repeated
    rows, each rank holds half of the parameters, and each rank's measured peak RSS is within RSS_TOLERANCE
    of pretrain.plan.estimate's."""
    res_path = tmp_path / "res.json"
    out = _run("scale_016b.py", "--steps", "3", "--lr", "2e-3", "--patch-encoder", "unet", "--out",
               str(tmp_path / "work"),
               "--json", str(res_path), "model.n_layers=2", "model.dim=128", "model.n_heads=2",
               "model.unet_channels=[32,64]", timeout=1200)
    res = json.loads(res_path.read_text())
    losses = res["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), out
    assert losses[-1] < losses[0], out
    half = res["total_params"] / 2
    assert sorted(res["partitions"]) == ["0", "1"], out
    for n in res["partitions"].values():
        assert abs(n - half) / half < 0.01, out  # DeepSpeed pads each parameter's partition to the world size
    for r in res["rss"].values():
        assert abs(r["ratio"] - 1) <= RSS_TOLERANCE, out


def test_vae_robustness_prints_one_row_per_sigma_for_each_vae(tmp_path: Path) -> None:
    """bench/vae_robustness.py on two VAEs: a row per sigma, 'shape / colour / all three' per VAE, each a %."""
    import torch

    from data_pipeline.vae import save_with_stats, small_vae

    data = torch.rand(16, 3, 64, 64) * 2 - 1  # (16, 3, 64, 64)
    for name in ("a", "b"):
        vae = small_vae(4, downsample=8, width=8, seed=0 if name == "a" else 1)
        save_with_stats(vae, data, tmp_path / name / "vae")
    out = _run("vae_robustness.py", "--vae", str(tmp_path / "a" / "vae"), "--vae", str(tmp_path / "b" / "vae"),
               "--n", "6", "--sigmas", "0,0.5")
    rows = [line for line in out.splitlines() if re.match(r"\s*\d\.\d\d\s", line)]
    assert [float(r.split()[0]) for r in rows] == [0.0, 0.5], out
    for r in rows:
        cells = re.findall(r"(\d+\.\d)\s*/\s*(\d+\.\d)\s*/\s*(\d+\.\d)", r)
        assert len(cells) == 2 and all(0 <= float(v) <= 100 for c in cells for v in c), out


@pytest.mark.slow
def test_zero_stage_bench_runs_the_trainer_at_each_stage(demo_data) -> None:
    """bench/zero_stage.py: one real 2-rank run per ZeRO stage; the table's totals, ratios and step counts agree."""
    out = _run("zero_stage.py", "--data", str(demo_data.root), "--stages", "3,2", "--steps", "6", "--skip", "2",
               timeout=600)
    rows = {int(m.group(1)): [float(x) for x in m.groups()[1:]]
            for m in re.finditer(r"^([0-3])\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)$", out, re.M)}
    assert sorted(rows) == [2, 3], out
    assert rows[3][4] == 1.0, out  # the baseline's ratio
    for stage, (fwd, bwd, opt, total, ratio, steps) in rows.items():
        assert 0 < fwd + bwd + opt <= total + 1e-4, (stage, out)  # total adds the data wait
        assert math.isclose(ratio, total / rows[3][3], abs_tol=0.01), (stage, out)
        assert steps == int(500 / total) or math.isclose(steps, 500 / total, rel_tol=0.01), (stage, out)


def test_precision_bench_times_each_precision_and_attention_path(demo_data) -> None:
    """bench/precision.py: four rows (fp32/bf16_autocast x sdpa/sdpa_varlen), ratios against the first."""
    out = _run("precision.py", "--data", str(demo_data.root), "--steps", "2", "--warmup", "1", timeout=600)
    rows = re.findall(r"^(fp32|bf16_autocast)\s+(sdpa|sdpa_varlen)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)
    assert [(p, a) for p, a, *_ in rows] == [("fp32", "sdpa"), ("fp32", "sdpa_varlen"),
                                             ("bf16_autocast", "sdpa"), ("bf16_autocast", "sdpa_varlen")], out
    base = float(rows[0][2])
    for _, _, ms, ratio, share in rows:
        assert float(ms) > 0 and math.isclose(float(ratio), float(ms) / base, abs_tol=0.01), out
        assert 0 < float(share) < 100, out  # the profiler saw attention kernels, and other work


def test_pack_parts_prints_efficiency_per_part_size() -> None:
    """bench/pack_parts.py: the parted efficiency never beats one part by more than rounding, and the baseline ratio is
    1."""
    out = _run("pack_parts.py", "--docs", "2000", "--sizes", "200", "1000")
    rows = re.findall(r"^\| (text|pairs|interleaved) \| (all \(baseline\)|[\d,]+) \| [\d,]+ \| ([\d.]+)% \| ([\d.]+) "
                      r"\|$",
                      out, re.M)
    assert len(rows) == 9, out
    for kind, part, eff, ratio in rows:
        assert 90 < float(eff) <= 100 and float(ratio) <= 1.0001, (kind, part, eff, ratio)
        assert part != "all (baseline)" or float(ratio) == 1.0
