"""The tiny end-to-end run on CPU: synthetic data -> tokenizer, VAE, shards -> 2-rank ZeRO-3 training
-> export -> evaluation (pixel-judged text->image samples, captions, text loss; a PNG grid and a
report). `make demo` runs it.

    python -m pretrain.demo --out demo_out [--steps 2800] [--launcher deepspeed|torchrun] [--fresh]

Every stage is the same command a user runs on real data; this script only chains them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from contract.dist_env import free_port

ROOT = Path(__file__).resolve().parents[1]


STAGE_SECONDS: dict[str, float] = {}  # wall time of each stage, for the summary


def run(cmd: list[str], env: dict[str, str] | None = None, stage: str = "") -> None:
    """Run one stage, echoing the command and recording its wall time; stop the demo if it fails."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    STAGE_SECONDS[stage or cmd[2]] = time.time() - t
    print(f"  ({time.time() - t:.0f}s)", flush=True)


def summary(out: Path, run_dir: Path, export_dir: Path) -> str:
    """Where everything is, the evaluation figures (OUT/eval/report.json of pretrain.evaluate) and the
    wall time of each stage."""
    ev = out / "eval"
    lines = ["", "demo done:",
             f"  run directory   {run_dir}",
             f"  TensorBoard     tensorboard --logdir {run_dir / 'tensorboard'}",
             f"  export          {export_dir}"]
    pngs = sorted(ev.glob("*.png"))
    lines.append(f"  sample PNGs     {len(pngs)} in {ev}" + "".join(f"\n                  {p.name}" for p in pngs))
    if (ev / "report.json").is_file():
        from pretrain.evaluate import flat_scalars

        figures = flat_scalars(json.loads((ev / "report.json").read_text()))
        lines.append(f"  evaluation      {ev / 'report.json'}" + "".join(f"\n                  {k} {v:.4g}" for k, v in figures.items()))
    lines.append("  wall time       " + ", ".join(f"{k} {v:.0f}s" for k, v in STAGE_SECONDS.items())
                 + f"; total {sum(STAGE_SECONDS.values()):.0f}s")
    return "\n".join(lines)


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
    ap.add_argument("--steps", type=int, default=2800)  # ~9.5 min at ~0.19 s/step (ZeRO-2, 2 CPU ranks); docs/quality.md §16
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
        run([py, "-m", "data_pipeline.demo_data", "--out", str(data)], stage="data")
    resume = "none" if a.fresh else "auto"
    module = ["--module" if a.launcher == "deepspeed" else "-m", "pretrain.train"]  # deepspeed has no -m
    run(launcher_cmd(a.launcher, a.nproc) + module + [
        "--config", f"configs/tiny.yaml,configs/demo.yaml,{data / 'data.yaml'}",  # demo.yaml: the small model's switches
        f"train.run_dir={run_dir}", f"train.steps={a.steps}",
        f"checkpoint.resume={resume}", f"checkpoint.every={max(a.steps // 3, 1)}",
        f"logging.val_every={max(a.steps // 6, 1)}", "logging.sample_every=0",  # the demo's overheads: few pauses
    ], env, stage="train")
    run([py, "-m", "pretrain.export", "--run-dir", str(run_dir), "--out", str(export_dir)], stage="export")
    run([py, "-m", "pretrain.evaluate", "--model", str(export_dir), "--out", str(out / "eval")], stage="evaluate")
    print(summary(out, run_dir, export_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
