"""The CPU rehearsal of the GPU session: `bash bench/gpu_session.sh --rehearse` runs every step at a tiny shape
under the import guard (only the GPU image's packages and the carried wheels), and each step's output says
what the GPU run will report (docs/gpu.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(3000)  # about 3 min of CPU; 17 min of wall time on a shared 2-core machine at load 15
def test_gpu_session_rehearsal_runs_every_step_on_cpu(demo_data, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, "GPU_DATA": str(Path(demo_data.config_path).parent),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "bench/gpu_session.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=2900)
    summary = (out / "summary.txt").read_text()
    files = {f.name: f.read_text() for f in out.iterdir()}
    tails = "\n".join(f"--- {n}\n{t[-2500:]}" for n, t in sorted(files.items()))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{tails}"
    assert sorted(files) == ["0_setup.txt", "1_tests.txt", "2_train.txt", "3_gpu_step.txt", "4_scale016b.txt",
                             "summary.txt"], sorted(files)  # the device tool returns at most 8 files
    assert [line.split(":")[0] for line in summary.splitlines()[:5]] == [
        "0_setup", "1_tests", "2_train", "3_gpu_step", "4_scale016b"], summary
    assert all(": ok (exit 0)" in line for line in summary.splitlines()[:5]), summary

    setup = files["0_setup.txt"]
    assert "trainer imports ok" in setup and "available False" in setup, setup
    tests = files["1_tests.txt"]  # without CUDA every test of the gpu group is reported skipped, none fails
    n_skipped = int(re.search(r"(\d+) skipped", tests).group(1))
    assert n_skipped >= 8 and "passed" not in tests and "failed" not in tests and "needs CUDA" in tests, tests
    train = files["2_train.txt"]
    assert "PASS: sequences identical on all 4 steps" in train, train
    assert "resumed from the checkpoint of step 2: True" in train, train
    assert re.search(r"^events\s+\d", train, re.M) and re.search(r"^sync\s+\d", train, re.M), train
    step = files["3_gpu_step.txt"]
    assert [m for m in re.findall(r"^(flex|sdpa)\s+(no ckpt|ckpt)\s", step, re.M)] == [
        ("flex", "no ckpt"), ("flex", "ckpt"), ("sdpa", "no ckpt"), ("sdpa", "ckpt")], step
    scale = files["4_scale016b.txt"]
    assert "one rank on CPU" in scale and "logging.timer=events: 2 steps" in scale, scale
    assert "logging.timer=sync: 2 steps" in scale and re.search(r"^sync\s+\d", scale, re.M), scale
