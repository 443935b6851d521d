"""The real trainer on one GPU: ZeRO-3 (NCCL, bf16) on the demo data, a kill -9, an exact resume, and the
step time under the two step timers (logging.timer=events against the old sync timer).

    python bench/gpu_train.py [--steps 30] [--kill-after 20] [--out DIR]    # GPU: bf16, NCCL, 1 rank
    python bench/gpu_train.py --rehearse [--data DIR]                     # CPU: fp32, gloo, 4 steps

1. Data: the demo data set (data_pipeline.demo_data, fast sizes: 64 px images, 8x8x8 latents, 256-position
   rows), built here.
2. Straight run: `torchrun --nproc_per_node 1 -m pretrain.train` with configs/tiny.yaml + the demo data,
   ZeRO-3, train.precision=bf16 (GPU) or fp32 (rehearsal), `--steps` steps, a checkpoint every
   `--kill-after` steps, logging.timer=events.
3. Killed run: the same, logging.timer=sync, SIGKILLed by the trainer's own fault hook (PRETRAIN_FAULT
   kill_after_step) right after the checkpoint of step `--kill-after`; then relaunched: it resumes
   from that checkpoint and finishes.
4. Checks, printed as a table and a verdict line: every step consumed the same sequences in both runs
   (metrics.jsonl `sequence_digest` and `digest`); losses equal up to the kill and, after
   the resume, within BF16_REL (bf16: kernels with atomics are not bit-reproducible on a GPU; fp32 on
   CPU within 1e-6); the step time per timer: median wall time between consecutive steps (metrics.jsonl
   `wall`, the same clock for both) over the steps after the first 3 of each launch, and the median sum
   of the timer's phases.
Exit status 0 when the checks pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.dist_env import free_port  # noqa: E402

BF16_REL = 2e-2  # |loss_resumed - loss_straight| / loss after a resume, bf16 on GPU (8-bit mantissa: 0.4% per rounding)
FP32_ABS = 1e-6  # the same on CPU in fp32 (tests/test_train_e2e.py: DeepSpeedCPUAdam's running beta^t)
SKIP = 3  # steps after each launch left out of the step-time medians (compilation, allocator warm-up)


def launch(data_cfg: Path, run_dir: Path, steps: int, every: int, timer: str, gpu: bool, workers: int = 1,
           fault: str = "", timeout: float = 600) -> tuple[int, float]:
    """One trainer launch on 1 rank; returns (exit code, seconds). Output appends to run_dir/train.log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "-m", "pretrain.train", "--config", f"{ROOT / 'configs/tiny.yaml'},{data_cfg}",
           f"train.run_dir={run_dir}", f"data.cache_dir={run_dir}/cache", f"train.steps={steps}",
           "train.global_batch_size=8", "train.micro_batch_size=2", f"checkpoint.every={every}",
           "checkpoint.keep_last=2",
           f"train.precision={'bf16' if gpu else 'fp32'}", f"distributed.backend={'nccl' if gpu else 'gloo'}",
           "distributed.zero_stage=3", f"logging.timer={timer}", "logging.every=1", "logging.val_every=0",
           "logging.sample_every=0", "logging.eval_every=0", "logging.tensorboard=false", f"data.num_workers={workers}",
           "distributed.timeout_minutes=3"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("PRETRAIN_FAULT", None)
    if fault:
        env["PRETRAIN_FAULT"] = fault
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "train.log", "a") as log:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, time.time() - t0


def step_rows(run_dir: Path) -> list[dict]:
    """Training rows of metrics.jsonl in file order (a resumed run appends)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def step_times(rows: list[dict], skip: int = SKIP) -> tuple[float, float]:
    """Median wall seconds between consecutive steps of one launch, and median sum of the timer's phases,
    leaving out the first `skip` steps of each launch (a step number that does not follow the last one starts one)."""
    walls, timed, run, prev = [], [], [], None
    for r in rows:
        if prev is None or r["step"] != prev["step"] + 1:
            run = []
        run.append(r)
        if len(run) > skip:
            walls.append(r["wall"] - prev["wall"])
            timed.append(sum(r["times"].values()))
        prev = r
    if not walls:
        return float("nan"), float("nan")
    return statistics.median(walls), statistics.median(timed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rehearse", action="store_true", help="CPU: fp32, gloo, 4 steps, kill after 2, no data worker")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-after", type=int, default=20,
                    help="checkpoint every N steps; the killed run dies after step N")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--data", default=None, help="a demo data set already built (its folder, with data.yaml)")
    a = ap.parse_args(argv)
    if a.rehearse:
        a.steps, a.kill_after = 4, 2
    if a.out:
        return run(Path(a.out), a)
    with tempfile.TemporaryDirectory(prefix="gpu_train_") as tmp:
        return run(Path(tmp), a)


def run(root: Path, a: argparse.Namespace) -> int:
    import torch

    from data_pipeline.demo_data import make_demo_data

    gpu = torch.cuda.is_available() and not a.rehearse
    name = torch.cuda.get_device_name() if gpu else "CPU (rehearsal)"
    t0 = time.time()
    if a.data:
        data_cfg = Path(a.data) / "data.yaml"
        if not data_cfg.is_file():
            raise SystemExit(f"--data {a.data}: no data.yaml there; build it with python -m data_pipeline.demo_data")
        built = f"demo data {a.data}"
    else:
        data_cfg = make_demo_data(root / "data", seed=0, fast=True).config_path
        built = f"demo data built in {time.time() - t0:.0f} s"
    print(f"device: {name}; {built}; configs/tiny.yaml, ZeRO-3, 1 rank, "
          f"{'bf16, NCCL' if gpu else 'fp32, gloo'}; {a.steps} steps of 8 rows x 256 positions", flush=True)
    straight, killed = root / "straight", root / "killed"
    workers = 0 if a.rehearse else 1  # a worker process imports torch again: 10-30 s on a busy 2-core machine
    rc, s1 = launch(data_cfg, straight, a.steps, a.kill_after, "events", gpu, workers=workers)
    print(f"straight run (timer events): exit {rc}, {s1:.0f} s", flush=True)
    rc2, s2 = launch(data_cfg, killed, a.steps, a.kill_after, "sync", gpu, workers=workers,
                     fault=f"kill_after_step={a.kill_after}")
    ckpt = killed / "checkpoints" / f"step_{a.kill_after:08d}" / "COMPLETE"
    print(f"killed run (timer sync): exit {rc2} (SIGKILL: -9 or 137), {s2:.0f} s; checkpoint of step "
          f"{a.kill_after} complete: {ckpt.is_file()}", flush=True)
    killed_ok = rc2 != 0 and ckpt.is_file() and not (killed / "checkpoints" / f"step_{a.steps:08d}").exists()
    rc3, s3 = launch(data_cfg, killed, a.steps, a.kill_after, "sync", gpu, workers=workers)
    resumed = (f"resumed from {killed / 'checkpoints' / f'step_{a.kill_after:08d}'}"
               in (killed / "train.log").read_text())
    print(f"relaunch: exit {rc3}, {s3:.0f} s; resumed from the checkpoint of step {a.kill_after}: {resumed}",
          flush=True)
    if rc or rc3 or not killed_ok or not resumed:
        print(f"FAILED: a launch failed; logs: {straight / 'train.log'}, {killed / 'train.log'}")
        for log in (straight / "train.log", killed / "train.log"):
            print(f"--- {log} (tail)\n" + log.read_text()[-3000:])
        return 1
    ref, got_rows = step_rows(straight), step_rows(killed)
    got = {r["step"]: r for r in got_rows}  # the last row of a step wins
    refd = {r["step"]: r for r in ref}
    tol = (lambda x: BF16_REL * abs(x)) if gpu else (lambda x: FP32_ABS)
    ok = sorted(got) == sorted(refd) == list(range(1, a.steps + 1))
    print(f"\n{'step':>4} {'loss straight':>14} {'loss resumed':>13} {'rel diff':>9} {'same sequences':>15}")
    worst = 0.0
    for s in sorted(refd):
        g = got.get(s, {})
        same = g["sequence_digest"] == refd[s]["sequence_digest"] and g.get("digest") == refd[s]["digest"]
        diff = abs(g.get("loss", float("nan")) - refd[s]["loss"])
        exact_part = s <= a.kill_after
        step_ok = same and (diff == 0 if exact_part and not gpu else diff <= tol(refd[s]["loss"]))
        ok &= step_ok
        if s > a.kill_after:
            worst = max(worst, diff / abs(refd[s]["loss"]))
        print(f"{s:4d} {refd[s]['loss']:14.6f} {g.get('loss', float('nan')):13.6f} {diff / abs(refd[s]['loss']):9.2e} "
              f"{'yes' if same else 'NO':>15}{'' if step_ok else '  <- outside tolerance'}")
    skip = 1 if a.rehearse else SKIP
    (w_ev, t_ev), (w_sy, t_sy) = step_times(ref, skip), step_times(got_rows, skip)
    print(f"\nstep time (median over steps after the first {skip} of each launch):")
    print(f"{'timer':8} {'wall s/step':>12} {'timed s/step':>13} {'wall x events':>14}")
    print(f"{'events':8} {w_ev:12.4f} {t_ev:13.4f} {1.0:14.2f}")
    print(f"{'sync':8} {w_sy:12.4f} {t_sy:13.4f} {w_sy / w_ev:14.2f}")
    print(f"\n{'PASS' if ok else 'FAIL'}: sequences identical on all {a.steps} steps; losses after the resume within "
          f"{'%.0e relative' % BF16_REL if gpu else '%.0e absolute' % FP32_ABS} (worst {worst:.2e} relative)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
