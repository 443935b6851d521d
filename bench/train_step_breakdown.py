"""Where a training step's time goes: the tiny config on 2 CPU ranks (or any config/launcher you pass).

    python bench/train_step_breakdown.py --data DEMO_DIR [--steps 40] [--workers 2] [key=value ...]

Makes the synthetic demo data when DEMO_DIR has none, runs `python -m pretrain.train` under torchrun with
2 ranks, then prints the mean step-time breakdown (data wait, forward, backward, optimizer), the share of
the step spent waiting for data, and text tokens/s, from RUN_DIR/metrics.jsonl (the first step is skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.train.metrics import summary_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="demo data dir (made with data_pipeline.demo_data if missing)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2, help="data.num_workers per rank")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    data = Path(a.data)
    if not (data / "data.yaml").is_file():
        subprocess.run([sys.executable, "-m", "data_pipeline.demo_data", "--out", str(data), "--fast"], cwd=REPO,
                       check=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), "-m", "pretrain.train",
           "--config", f"configs/tiny.yaml,{data / 'data.yaml'}", f"train.run_dir={run_dir}", f"train.steps={a.steps}",
           f"data.num_workers={a.workers}", f"data.cache_dir={run_dir}/cache", "checkpoint.every=0",
           "logging.val_every=0", "logging.sample_every=0", "logging.every=10", *a.overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "times" in r]
    print(f"tiny config, {a.nproc} CPU ranks, {a.steps} steps, data.num_workers={a.workers}, run dir {run_dir}")
    print(summary_table(rows))


if __name__ == "__main__":
    main()
