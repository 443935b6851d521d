"""Step time of the demo model on one CPU thread: precision x attention path, against fp32 dense SDPA.

    python bench/precision.py --data DEMO_DIR [--steps 25] [--warmup 5] [--threads 1]

Builds the demo's model (configs/tiny.yaml + configs/demo.yaml + DEMO_DIR/data.yaml; makes the fast
demo data when DEMO_DIR has none), draws real micro-batches (train.micro_batch_size rows of the
loader), and times forward + backward + AdamW step for each combination of
  precision: fp32, or bf16_autocast (torch.autocast(bf16) around the forward, fp32 weights; the model
             keeps CPU attention in fp32, pretrain/model/backbone.py), and
  attention: sdpa (one dense (L, L) mask per row) or sdpa_varlen (each document on its own, masks.py).
Prints ms per micro-step, its ratio to the first row (fp32, sdpa) and the share of attention in the
step (torch.profiler's self time of the SDPA kernels). The same micro-batches feed every row.
Why the demo trains with bf16_autocast and sdpa_varlen: docs/quality.md §17; the 2-rank trainer's
figure for the same switches: bench/zero_stage.py --stages 2 model.attention=... train.precision=...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contract.batch import TransfusionBatch  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.model import Transfusion  # noqa: E402

ROWS = (("fp32", "sdpa"), ("fp32", "sdpa_varlen"), ("bf16_autocast", "sdpa"), ("bf16_autocast", "sdpa_varlen"))


def batches(data: Path, n: int, cache: Path) -> tuple[object, list[TransfusionBatch]]:
    """The demo config and n micro-batches of its train loader."""
    for k, v in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    cfg = load_config(f"{REPO / 'configs/tiny.yaml'},{REPO / 'configs/demo.yaml'},{data / 'data.yaml'}",
                      ["data.num_workers=1", f"data.cache_dir={cache}"])
    m = cfg.model
    loader = build_loader(cfg.data, "train", cfg.train.micro_batch_size, cfg.train.seed, m.patch_size,
                          (m.latent_channels, m.latent_size, m.latent_size), m.diffusion_steps)
    it = iter(loader)
    return cfg, [next(it) for _ in range(n)]


def time_row(cfg: object, data: list[TransfusionBatch], precision: str, attention: str,
             warmup: int) -> tuple[float, float]:
    """(seconds per micro-step, attention's share of the profiled steps) for one combination."""
    import dataclasses

    torch.manual_seed(0)
    model = Transfusion(dataclasses.replace(cfg.model, attention=attention))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b: TransfusionBatch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
            out = model(b)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    for b in data[:warmup]:
        step(b)
    t = time.perf_counter()
    for b in data[warmup:]:
        step(b)
    per_step = (time.perf_counter() - t) / (len(data) - warmup)
    with torch.profiler.profile() as prof:
        for b in data[warmup:warmup + 5]:
            step(b)
    events = prof.key_averages()
    attn = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    total = sum(e.self_cpu_time_total for e in events)
    return per_step, attn / max(total, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path,
                    help="demo data dir (made with data_pipeline.demo_data --fast if missing)")
    ap.add_argument("--steps", type=int, default=25, help="timed micro-steps per row")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo's ranks use 1 each)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not (a.data / "data.yaml").is_file():
        from data_pipeline.demo_data import make_demo_data

        make_demo_data(a.data, fast=True)
    cfg, data = batches(a.data, a.warmup + max(a.steps, 5), a.data / "bench_cache")
    L = cfg.data.seq_len
    print(f"demo model, micro-batch {cfg.train.micro_batch_size} x {L} positions, {a.threads} thread(s), "
          f"forward + backward + AdamW, mean of {a.steps} micro-steps")
    print(f"{'precision':<15}{'attention':<13}{'ms/step':>9}{'ratio':>8}{'attention %':>13}")
    base = None
    for precision, attention in ROWS:
        s, share = time_row(cfg, data, precision, attention, a.warmup)
        base = base or s
        print(f"{precision:<15}{attention:<13}{s * 1e3:>9.1f}{s / base:>8.2f}{share * 100:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
