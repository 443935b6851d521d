"""The tiny end-to-end run on CPU: synthetic data -> tokenizer, VAE, shards -> 2-rank ZeRO-3 training
-> export -> generated images (PNG) and captions. `make demo` runs it.

    python -m pretrain.demo --out demo_out [--steps 1500] [--launcher deepspeed|torchrun] [--fresh]

Every stage is the same command a user runs on real data; this script only chains them.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle at the top left", "a blue square at the bottom right",
           "a green triangle in the center", "a yellow square at the top right"]


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run one stage, echoing the command; stop the demo if it fails."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    print(f"  ({time.time() - t:.0f}s)", flush=True)


def launcher_cmd(launcher: str, nproc: int) -> list[str]:
    """The multi-process launch prefix for `-m pretrain.train`."""
    port = str(random.randint(20000, 40000))
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", port]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]


def main(argv: list[str] | None = None) -> int:
    """Chain the stages; print where the outputs are."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", type=Path)
    ap.add_argument("--steps", type=int, default=1500)  # ~4 min on 2 CPU ranks; captions start to follow the image
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
        f"train.run_dir={run_dir}", f"train.steps={a.steps}", f"logging.sample_vae={data / 'vae'}",
        f"checkpoint.resume={resume}",
    ], env)
    run([py, "-m", "pretrain.export", "--run-dir", str(run_dir), "--out", str(export_dir)])
    gen = [py, "-m", "pretrain.generate", "--model", str(export_dir), "--out", str(out / "samples"), "--sampler", "ddim",
           "--steps", "50"]
    for p in PROMPTS:
        gen += ["--prompt", p]
    held_out = sorted((data / "raw").glob("**/*.png"))[:3]
    for img in held_out:
        gen += ["--caption", str(img)]
    gen += ["--text", "The red"]
    run(gen)
    print(f"\ndemo done: TensorBoard logs in {run_dir / 'tensorboard'}, export in {export_dir}, "
          f"images in {out / 'samples'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
