"""Step time of the real trainer at each DeepSpeed ZeRO stage, against the first stage given (the baseline).

    python bench/zero_stage.py --data DEMO_DIR [--stages 3,2,1,0] [--steps 200] [--skip 50] [key=value ...]

Runs `pretrain.train` under the deepspeed launcher on 2 CPU ranks (one thread each) with the demo's configs
(configs/tiny.yaml + configs/demo.yaml + DEMO_DIR/data.yaml; makes the fast demo data when DEMO_DIR has none)
once per stage, with `distributed.zero_stage` set, no checkpoints, validation or samples; then prints the
mean forward / backward / optimizer / total seconds per step over the steps after `--skip`, each total's
ratio to the baseline's, and how many steps fit in 500 s. Why the demo trains at stage 2: at the demo's
0.66 M parameters nothing needs partitioning, and ZeRO-3's per-module gather and release hooks are most of
its step (docs/quality.md §16).
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

from contract.dist_env import free_port  # noqa: E402

PHASES = ("forward", "backward", "optimizer")


def run_stage(data: Path, stage: int, steps: int, overrides: list[str]) -> list[dict]:
    """metrics.jsonl step rows of one `steps`-step run at ZeRO stage `stage`."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench_zero{stage}_"))
    venv_bin = Path(sys.executable).parent
    cmd = [str(venv_bin / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "pretrain.train", "--config", f"configs/tiny.yaml,configs/demo.yaml,{data / 'data.yaml'}",
           f"train.run_dir={run_dir}", f"train.steps={steps}", f"distributed.zero_stage={stage}",
           f"data.cache_dir={run_dir}/cache", "checkpoint.every=0", "logging.val_every=0", "logging.sample_every=0",
           *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PATH=f"{venv_bin}:{os.environ.get('PATH', '')}")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"ZeRO stage {stage}: training failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "times" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="demo data dir (made with --fast if missing)")
    ap.add_argument("--stages", default="3,2,1,0", help="ZeRO stages, the first is the baseline")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--skip", type=int, default=50, help="warm-up steps left out of the means")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    a = ap.parse_args()
    if not (a.data / "data.yaml").is_file():
        subprocess.run([sys.executable, "-m", "data_pipeline.demo_data", "--out", str(a.data), "--fast"], cwd=REPO,
                       check=True)
    stages = [int(s) for s in a.stages.split(",")]
    print(f"configs/tiny.yaml + configs/demo.yaml, 2 CPU ranks, {a.steps} steps (means over steps "
          f"{a.skip + 1}-{a.steps})")
    print(f"{'ZeRO stage':<11}" + "".join(f"{p:>10}" for p in PHASES) + f"{'s/step':>9}{'ratio':>8}{'steps/500s':>12}")
    base = None
    for stage in stages:
        rows = run_stage(a.data, stage, a.steps, a.overrides)[a.skip:]
        if not rows:
            raise SystemExit(f"--skip {a.skip} leaves no steps of {a.steps}")
        mean = {p: sum(r["times"][p] for r in rows) / len(rows) for p in PHASES}
        total = sum(sum(r["times"].values()) for r in rows) / len(rows)
        base = base or total
        print(f"{stage:<11}" + "".join(f"{mean[p]:>10.4f}" for p in PHASES)
              + f"{total:>9.4f}{total / base:>8.2f}{int(500 / total):>12}")


if __name__ == "__main__":
    main()
