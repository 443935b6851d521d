"""bench/data_throughput.py runs end to end at a tiny size and writes the rates the data plan reads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_throughput_table_and_rates_feed_the_data_plan(tmp_path: Path) -> None:
    rates = tmp_path / "rates.json"
    r = subprocess.run([sys.executable, "bench/data_throughput.py", "--docs", "60", "--images", "4", "--paper-images",
                        "0", "--pair-images", "6", "--io-mib", "2", "--loader-rows", "12", "--loader-batches", "2",
                        "--write", str(rates)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == 8, r.stdout  # pack x2, precompute x3, S3 x2, loader x1
    for line in table:
        what, value, ratio = line.split("|")[1], line.split("|")[3], line.split("|")[6]
        if "paper-shaped" in what:
            continue  # skipped with --paper-images 0
        assert float(value.replace(",", "")) > 0 and float(ratio.strip().rstrip("x")) > 0, line
    got = json.loads(rates.read_text())
    assert got["pack_positions_per_s"] > 0 and got["precompute_gpu_images_per_s"] is None
    assert got["precompute_cpu_images_per_s_256px_paper_vae"] is None
    plan = subprocess.run([sys.executable, "-m", "pretrain.plan.data_plan", "--config", "configs/tiny.yaml",
                           "--text-tokens", "1e9", "--images", "1e6", "--rates", str(rates)],
                          capture_output=True, text=True, cwd=ROOT)
    assert plan.returncode == 0, plan.stderr
    assert (f"text {got['pack_positions_per_s']:,.0f}, pairs {got['pack_pairs_positions_per_s']:,.0f} positions/s"
            in plan.stdout)
    assert not math.isnan(got["pack_pairs_positions_per_s"])
