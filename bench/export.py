"""Export time and peak memory: `pretrain.artifacts.export` against DeepSpeed's own `zero_to_fp32` on the same
checkpoint.

The checkpoint is the real trainer's: `configs/transfusion_0.37b.yaml` (24 layers, width 1024, vocabulary
32000 as the config's default) trained one step by 2 gloo CPU ranks under the deepspeed launcher on small
synthetic data (the fast demo data, repacked with a 32000-piece tokenizer so that the embedding and the LM
head have the 0.37B model's shape; 8x8x8 latents and seq_len 256, which change no parameter shape).
`--ckpt RUN_DIR` reuses a run directory that holds such a checkpoint.

Each tool runs alone in a fresh child process; its peak RSS is that child's `ru_maxrss` (os.wait4), which
counts the memory-mapped checkpoint pages it touched as well as its heap; wall time is the child's.
  zero_to_fp32     python RUN_DIR/checkpoints/zero_to_fp32.py CKPTS OUT -t TAG --safe_serialization (the script
                   DeepSpeed copies beside the checkpoints, as it ships; default max_shard_size 5GB)
  export fp32      python -m pretrain.artifacts.export --weights raw --dtype fp32 (the trained weights, as zero_to_fp32)
  export bf16      python -m pretrain.artifacts.export --weights raw --dtype bf16
Checks: the fp32 export's tensors equal zero_to_fp32's bit for bit (same names, shapes, dtype), and the
bf16 export is their round-to-nearest bf16 cast bit for bit.

    python bench/export.py [--work /tmp/bench_export] [--ckpt RUN_DIR] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = REPO / "configs" / "transfusion_0.37b.yaml"
VOCAB = 32000  # the 0.37B config's model.vocab_size default (Llama 2's piece count)


def make_data(work: Path) -> Path:
    """Fast demo data repacked with a 32000-piece tokenizer; returns the data.yaml to add to the config."""
    import random

    from data_pipeline import pack, tokenizer
    from data_pipeline.demo_data import make_demo_data

    demo = make_demo_data(work / "demo", seed=0, fast=True, seq_len=256)
    rng = random.Random(0)  # random words: enough distinct sub-words for 32000 unigram pieces
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(60000)]
    tok = work / "tokenizer" / "spm32k.model"
    ids = tokenizer.train((" ".join(rng.choice(words) for _ in range(60)) for _ in range(6000)), tok, vocab_size=VOCAB)
    if ids.vocab_size != VOCAB:
        raise RuntimeError(f"{tok}: {ids.vocab_size} ids, expected {VOCAB}")
    streams = []
    for kind, src in (("text", demo.root / "raw" / "texts.jsonl"), ("pairs", demo.root / "latents" / "pairs")):
        out = work / "shards" / kind
        pack.run(pack.PackOptions(kind, [str(src)], str(tok), str(out), seq_len=256, patch_size=demo.patch_size),
                 (0, 1))
        streams.append({"name": kind, "local": str(out / "train")})
    cfg = {"data": {"tokenizer": str(tok), "vae": str(demo.vae), "seq_len": 256, "cache_dir": str(work / "cache"),
                    "streams": streams, "val_streams": [], "image_position_share": 0.45},
           "model": {"latent_channels": demo.latent_shape[0], "latent_size": demo.latent_shape[1],
                     "patch_size": demo.patch_size}}
    path = work / "data.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_one_step(work: Path, data_yaml: Path) -> Path:
    """One step of the 0.37B config on 2 gloo CPU ranks (deepspeed launcher), checkpoint saved; returns the run dir."""
    from contract.dist_env import free_port

    run_dir = work / "run"
    overrides = [f"train.run_dir={run_dir}", "train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
                 "train.precision=fp32", "optim.warmup_steps=1", "checkpoint.every=1", "logging.every=1",
                 "logging.val_every=0", "logging.sample_every=0", "data.num_workers=0"]
    cmd = [str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "pretrain.train", "--config", f"{CONFIG},{data_yaml}", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PATH=f"{Path(PY).parent}:{os.environ['PATH']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(work / "train.log", "w") as log:
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise RuntimeError(f"training failed (exit {p.returncode}); see {work / 'train.log'}")
    return run_dir


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of `cmd` run as a fresh child; raises on a non-zero exit."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage; ru_maxrss in KiB on Linux
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20


def dir_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**30


def compare(ref_dir: Path, fp32_dir: Path, bf16_dir: Path) -> tuple[int, int]:
    """Asserts the fp32 export equals zero_to_fp32 bit for bit and bf16 is its cast; returns (tensors, params)."""
    import torch
    from safetensors import safe_open

    from pretrain.artifacts.export import export_tensors

    ref = {}
    for f in sorted(ref_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            ref.update({k: f for k in fh.keys()})
    got32, got16 = dict(export_tensors(fp32_dir)), dict(export_tensors(bf16_dir))
    if set(got32) != set(ref) or set(got16) != set(ref):
        diff = sorted((set(ref) ^ set(got32)) | (set(ref) ^ set(got16)))
        raise AssertionError(f"tensor names differ from zero_to_fp32's: {diff[:5]}")
    params = 0
    for name, f in ref.items():
        with safe_open(str(f), "pt") as fh:
            r = fh.get_tensor(name)
        if r.dtype != torch.float32 or not torch.equal(got32[name], r):
            raise AssertionError(f"{name}: fp32 export differs from zero_to_fp32's")
        if got16[name].dtype != torch.bfloat16 or not torch.equal(got16[name], r.to(torch.bfloat16)):
            raise AssertionError(f"{name}: bf16 export is not zero_to_fp32's tensor cast to bf16")
        params += r.numel()
    return len(ref), params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_export"), help="data, run and outputs go here")
    ap.add_argument("--ckpt", type=Path, default=None, help="reuse this run directory's newest checkpoint")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (each tool once per round); the table shows each tool's fastest run and its peak RSS")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_dir = a.ckpt or train_one_step(a.work, make_data(a.work))
    from pretrain.artifacts.export import pick_checkpoint

    ckpt = pick_checkpoint(run_dir, None)
    print(f"checkpoint {ckpt} ({sum(f.stat().st_size for f in ckpt.iterdir()) / 2**30:.2f} GiB on disk"
          + (f", made in {time.perf_counter() - t0:.0f} s)" if a.ckpt is None else ")"))
    outs = {k: a.work / "out" / k for k in ("zero_to_fp32", "export fp32", "export bf16")}
    script = ckpt.parent / "zero_to_fp32.py"  # DeepSpeed copies its script beside the checkpoints
    ds = [PY, str(script)] if script.is_file() else [PY, "-m", "deepspeed.utils.zero_to_fp32"]
    step = str(int(ckpt.name.split("_")[-1]))
    ours = [PY, "-m", "pretrain.artifacts.export", "--run-dir", str(run_dir), "--step", step, "--weights", "raw",
            "--force"]
    cmds = {
        "zero_to_fp32": [*ds, str(ckpt.parent), str(outs["zero_to_fp32"]), "-t", ckpt.name, "--safe_serialization"],
        "export fp32": [*ours, "--dtype", "fp32", "--out", str(outs["export fp32"])],
        "export bf16": [*ours, "--dtype", "bf16", "--out", str(outs["export bf16"])],
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    for _ in range(a.repeat):  # rounds: each tool once per round, so load changes hit all tools alike
        for name, cmd in cmds.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            runs[name].append(measure(cmd))
    results = {name: min(r) for name, r in runs.items()}  # the fastest run and its RSS
    n_tensors, n_params = compare(outs["zero_to_fp32"], outs["export fp32"], outs["export bf16"])
    print(f"{n_params / 1e9:.3f}B parameters in {n_tensors} tensors; fp32 export == zero_to_fp32 bit for bit, "
          "bf16 export == its bf16 cast bit for bit")
    print(f"load average {os.getloadavg()[0]:.2f} (2 cores shared; times are not quiet-machine figures)")
    base_s, base_rss = results["zero_to_fp32"]
    print("| tool | seconds | peak RSS GiB | time vs zero_to_fp32 | RSS vs zero_to_fp32 | output GiB |")
    print("|---|---|---|---|---|---|")
    for name, (s, rss) in results.items():
        gib = dir_gib(outs[name])
        print(f"| {name} | {s:.1f} | {rss:.2f} | {s / base_s:.2f}x | {rss / base_rss:.2f}x | {gib:.2f} |")


if __name__ == "__main__":
    main()
