"""The tiny end-to-end run on CPU: synthetic data -> tokenizer, VAE, shards -> 2-rank ZeRO-3 training
-> export -> evaluation (pixel-judged text->image samples, captions, text loss; a PNG grid and a
report). `make demo` runs it.

    python -m pretrain.demo --out demo_out [--steps 3000] [--launcher deepspeed|torchrun] [--fresh]

Every stage is the same command a user runs on real data; this script only chains them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from contract.dist_env import free_port

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run one stage, echoing the command; stop the demo if it fails."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    print(f"  ({time.time() - t:.0f}s)", flush=True)


def launcher_cmd(launcher: str, nproc: int) -> list[str]:
    """The multi-process launch prefix for `-m pretrain.train`."""
    port = str(free_port())
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", port]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]


def main(argv: list[str] | None = None) -> int:
    """Chain the stages; print where the outputs are."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", type=Path)
    ap.add_argument("--steps", type=int, default=3000)  # ~8 min on 2 idle CPU ranks (0.16 s/step); colour follows the caption from ~2000 (docs/quality.md)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    ap.add_argument("--fresh", action="store_true", help="rebuild the data and restart training from scratch")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    data, run_dir, export_dir = out / "data", out / "run", out / "export"
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PATH": f"{Path(py).parent}:{os.environ.get('PATH', '')}"}
    if a.fresh or not (data / "data.yaml").is_file():
        run([py, "-m", "data_pipeline.demo_data", "--out", str(data)])
    resume = "none" if a.fresh else "auto"
    module = ["--module" if a.launcher == "deepspeed" else "-m", "pretrain.train"]  # deepspeed has no -m
    run(launcher_cmd(a.launcher, a.nproc) + module + [
        "--config", f"configs/tiny.yaml,{data / 'data.yaml'}",
        f"train.run_dir={run_dir}", f"train.steps={a.steps}",
        f"checkpoint.resume={resume}", f"checkpoint.every={max(a.steps // 3, 1)}",
        f"logging.val_every={max(a.steps // 6, 1)}", "logging.sample_every=0",  # the demo's overheads: few pauses
        "model.diffusion_loss_weighting=v_trunc",  # a tiny model ignores the caption under the plain eps-loss
    ], env)
    run([py, "-m", "pretrain.export", "--run-dir", str(run_dir), "--out", str(export_dir)])
    run([py, "-m", "pretrain.evaluate", "--model", str(export_dir), "--out", str(out / "eval")])
    print(f"\ndemo done: TensorBoard logs in {run_dir / 'tensorboard'}, export in {export_dir}, "
          f"evaluation (report.json, grid.png of prompts and samples) in {out / 'eval'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
