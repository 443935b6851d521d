"""bench/gpu_step.py runs end to end at its tiny CPU shape, so the script is known to work when a GPU is lent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # compiles FlexAttention and create_block_mask on CPU (~1 min)
def test_gpu_step_tiny_on_cpu() -> None:
    res = subprocess.run([sys.executable, "bench/gpu_step.py", "--tiny", "--steps", "2", "--warmup", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {l[:14].strip(): l[14:].split() for l in res.stdout.splitlines() if l.startswith(("no ckpt", "ckpt"))}
    assert set(rows) == {"no ckpt", "ckpt"}, res.stdout
    for cols in rows.values():  # ms/step, positions/s, TFLOP/s, MFU measured, MFU datasheet, peak GiB, loss
        ms, loss = float(cols[0]), float(cols[-1])
        assert ms > 0 and abs(loss) < 1e3, res.stdout  # a finite loss
    # same weights, same batch, one optimizer step per timed step: recomputation changes nothing
    assert rows["no ckpt"][-1] == rows["ckpt"][-1], res.stdout
    assert "GFLOP per position" in res.stdout and "measured matmul" in res.stdout
