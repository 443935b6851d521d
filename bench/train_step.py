"""Training-step throughput of the model on CPU (fp32), against this machine's fp32 matmul rate.

Shape (issue 2): width 256, 2 layers, 4 heads of 64, vocab 1024, linear patching; batch of 8
sequences, each 32 text tokens, BOI, one 32x32x8 latent in 2x2 patches (256 positions), EOI.
Prints positions/s for forward + backward + AdamW step on both attention paths, and the achieved
share of the measured matmul rate (6 * N * positions/s, attention counted, see pretrain.plan.estimate).

    python bench/train_step.py [--threads 2] [--steps 20] [--modality-experts]

--modality-experts adds each path with model.modality_experts=true (Mixture-of-Transformers: the same
FLOPs per position, twice the backbone's weights, a gather each way around attention) and a column of
its rate over the dense model's on the same path, in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from contract.batch import IGNORE_INDEX, TransfusionBatch
from pretrain.plan.estimate import flops_breakdown, mix_of_batch
from pretrain.model import ModelConfig, Transfusion

TEXT, P = 32, 256


def bench_batch(cfg: ModelConfig, batch_size: int = 8, seed: int = 0) -> TransfusionBatch:
    """8 x (32 text, BOI, 256 patches, EOI) = 8 x 290 positions, one document per row."""
    g = torch.Generator().manual_seed(seed)
    L = TEXT + P + 2
    tokens = torch.randint(5, cfg.vocab_size, (batch_size, L), generator=g)  # (B, L)
    tokens[:, TEXT] = 3  # BOI
    tokens[:, TEXT + 1 : TEXT + 1 + P] = 0  # patch placeholders
    tokens[:, -1] = 4  # EOI
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:, :TEXT] = tokens[:, 1 : TEXT + 1]  # text predicts the next text token and BOI
    image_ids = torch.full_like(tokens, -1)
    image_ids[:, TEXT + 1 : TEXT + 1 + P] = torch.arange(batch_size)[:, None]
    C, S = cfg.latent_channels, cfg.latent_size
    return TransfusionBatch(
        tokens=tokens,
        targets=targets,
        doc_ids=torch.zeros_like(tokens),
        image_ids=image_ids,
        positions=torch.arange(L).expand(batch_size, L).contiguous(),
        latents=torch.randn(batch_size, C, S, S, generator=g),
        noise=torch.randn(batch_size, C, S, S, generator=g),
        timesteps=torch.randint(0, cfg.diffusion_steps, (batch_size,), generator=g),
    )


def matmul_rate(n: int = 1024, reps: int = 30) -> float:
    """Measured fp32 FLOP/s of an n x n matmul on the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def step_rate(cfg: ModelConfig, steps: int, warmup: int, compile_blocks: bool = False) -> float:
    """Positions/s of forward + backward + AdamW step, after `warmup` untimed steps."""
    torch.manual_seed(0)
    model = Transfusion(cfg)
    if compile_blocks:
        for block in model.layers:
            block.compile(dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batch = bench_batch(cfg)
    positions = batch.tokens.numel()

    def one_step() -> None:
        out = model(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    t = time.perf_counter()
    for _ in range(steps):
        one_step()
    return positions * steps / (time.perf_counter() - t)


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modality-experts", action="store_true", help="also time model.modality_experts=true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = dict(dim=256, n_layers=2, n_heads=4, vocab_size=1024, latent_size=32, patch_size=2)
    peak = matmul_rate()
    print(f"threads: {args.threads}   fp32 matmul rate (1024^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'path':20s} {'positions/s':>12s} {'GFLOP/s':>9s} {'share of matmul':>16s}"
          + (f" {'x dense':>8s}" if args.modality_experts else ""))
    for attn in ("sdpa", "flex"):
        for compiled in (False, True):
            dense_rate = None
            for experts in (False, True) if args.modality_experts else (False,):
                cfg = ModelConfig(**base, attention=attn, modality_experts=experts)
                rate = step_rate(cfg, args.steps, args.warmup, compiled)
                dense_rate = dense_rate or rate
                flops = flops_breakdown(cfg, mix_of_batch(bench_batch(cfg))).total * rate
                name = attn + (" +compile" if compiled else "") + (" MoT" if experts else "")
                print(f"{name:20s} {rate:12,.0f} {flops / 1e9:9.1f} {flops / peak:16.1%}"
                      + (f" {rate / dense_rate:8.2f}" if args.modality_experts else ""))


if __name__ == "__main__":
    main()
