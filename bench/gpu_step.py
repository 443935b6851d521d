"""One training step of the 7B width on one GPU: ms/step, positions/s, MFU, peak memory.

    python bench/gpu_step.py                 # GPU: bf16, width 4096, 32 heads, 4 layers, U-Net patching,
                                             # 4096-position packed rows with 8 images, compiled FlexAttention
    python bench/gpu_step.py --tiny          # CPU smoke run at a tiny shape (fp32), what the test runs
    python bench/gpu_step.py --modality-experts   # each row also with model.modality_experts=true, x dense
    python bench/gpu_step.py --attention flex,sdpa   # flex rows, then SDPA with the dense (B, 1, L, L) mask

A step is what the trainer does per micro-batch without DeepSpeed: build the Transfusion block mask
(compiled create_block_mask), forward, backward, AdamW (fused on GPU). Each configuration runs with
and without activation checkpointing; with `--attention flex,sdpa` also under SDPA with the dense boolean
mask (the reference path), and the last column gives positions/s over the first row's. Model FLOPs
per position come from pretrain.plan.estimate for the exact document mix of the batch (attention per
document under the mask; recomputation not counted, as MFU conventions require). MFU is given against
the matmul rate this script measures on the card (bf16 8192^3) and against the datasheet peak
(pretrain/plan/hardware.py).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.model import ModelConfig  # noqa: E402
from pretrain.train.engine import apply_activation_checkpointing  # noqa: E402
from pretrain.plan.estimate import flops_breakdown, mix_of_batch  # noqa: E402
from pretrain.plan.hardware import detect_gpu  # noqa: E402
from contract.batch import IGNORE_INDEX, TransfusionBatch  # noqa: E402
from pretrain.model import Transfusion  # noqa: E402

BOI, EOI, PAD = 3, 4, 0


def packed_batch(cfg: ModelConfig, rows: int, seq_len: int, images_per_row: int, caption: int = 30,
                 seed: int = 0) -> TransfusionBatch:
    """Rows of `images_per_row` caption+image documents (caption, BOI, P patches, EOI), then one
    text document filling the rest: the packed layout of data_pipeline, with host-side indices."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.patches_per_image
    doc_len = caption + P + 2
    if images_per_row * doc_len >= seq_len:
        raise ValueError(f"{images_per_row} images of {doc_len} positions do not fit in {seq_len}")
    tokens = torch.randint(5, cfg.vocab_size, (rows, seq_len), generator=g)  # (B, L)
    targets = torch.full_like(tokens, IGNORE_INDEX)
    doc_ids = torch.zeros_like(tokens)
    image_ids = torch.full_like(tokens, -1)
    positions = torch.zeros_like(tokens)
    n = 0
    for b in range(rows):
        s = 0
        for d in range(images_per_row):
            tokens[b, s + caption] = BOI
            tokens[b, s + caption + 1 : s + caption + 1 + P] = PAD
            tokens[b, s + doc_len - 1] = EOI
            image_ids[b, s + caption + 1 : s + caption + 1 + P] = n
            targets[b, s : s + caption] = tokens[b, s + 1 : s + caption + 1]  # caption predicts up to BOI
            doc_ids[b, s : s + doc_len] = d
            positions[b, s : s + doc_len] = torch.arange(doc_len)
            s, n = s + doc_len, n + 1
        doc_ids[b, s:] = images_per_row
        positions[b, s:] = torch.arange(seq_len - s)
        targets[b, s : seq_len - 1] = tokens[b, s + 1 :]
    C, S = cfg.latent_channels, cfg.latent_size
    return TransfusionBatch(
        tokens=tokens, targets=targets, doc_ids=doc_ids, image_ids=image_ids, positions=positions,
        latents=torch.randn(n, C, S, S, generator=g), noise=torch.randn(n, C, S, S, generator=g),
        timesteps=torch.randint(0, cfg.diffusion_steps, (n,), generator=g),
    ).with_indices()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 20) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on `device`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def peak_rss_bytes() -> float:
    """The process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def attention_path(device: torch.device) -> str:
    """How the model's FlexAttention runs on `device` (pretrain/model/backbone.py decides)."""
    if device.type == "cuda":
        return "compiled FlexAttention forward and backward, compiled block mask"
    return ("compiled FlexAttention forward on CPU; backward recomputes attention with dense SDPA under "
            "the same mask_mod (PyTorch has no FlexAttention backward on CPU): CPU timings are a smoke test")


def run_config(cfg: ModelConfig, batch: TransfusionBatch, device: torch.device, dtype: torch.dtype,
               checkpointing: bool, steps: int, warmup: int) -> dict[str, float]:
    """Mean seconds per training step, peak memory (GPU: max allocated; CPU: the process's peak RSS
    so far, which includes earlier configurations) and the last loss, for one configuration."""
    torch.manual_seed(0)
    model = Transfusion(cfg).to(device=device, dtype=dtype)
    if checkpointing:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    b = batch.to(device)
    b = TransfusionBatch(**{**b.__dict__, "latents": b.latents.to(dtype), "noise": b.noise.to(dtype)})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        out = model(b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        loss = out.loss.item()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"s_per_step": sum(times) / len(times), "peak_bytes": peak, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape, fp32: the CPU smoke run")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers at width 4096 (GPU)")
    ap.add_argument("--rows", type=int, default=1, help="sequences per step (micro-batch)")
    ap.add_argument("--images", type=int, default=8, help="images per 4096-position row")
    ap.add_argument("--patch-encoder", default="unet", choices=["unet", "linear"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--no-ckpt-only", action="store_true", help="skip the activation-checkpointing run")
    ap.add_argument("--attention", default="flex",
                    help="comma-separated attention paths to time, first = the baseline of the 'x first' column: "
                    "flex (compiled FlexAttention, block mask) and/or sdpa (dense boolean mask)")
    ap.add_argument("--modality-experts", action="store_true",
                     help="also run model.modality_experts=true (Mixture-of-Transformers) and print its speed "
                          "over dense")
    args = ap.parse_args(argv)
    attentions = args.attention.split(",")
    if not attentions or any(x not in ("flex", "sdpa") for x in attentions):
        ap.error(f"--attention {args.attention}: expected a comma-separated list of flex and sdpa")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, latent_size=8, patch_size=2,
                          patch_encoder=args.patch_encoder, unet_channels=(16, 32), attention="flex")
        seq_len, images, dtype, n_mm = 256, 3, torch.float32, 512
    else:
        cfg = ModelConfig(dim=4096, n_layers=args.layers, n_heads=32, vocab_size=32000, latent_size=32,
                          patch_size=2, patch_encoder=args.patch_encoder, attention="flex")
        seq_len, images, dtype, n_mm = 4096, args.images, torch.bfloat16, 8192
    batch = packed_batch(cfg, args.rows, seq_len, images)
    flops = flops_breakdown(cfg, mix_of_batch(batch)).total  # per position
    measured = matmul_rate(device, dtype, n_mm)
    gpu = detect_gpu(torch.cuda.get_device_name()) if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    sheet_peak = f"{gpu.bf16_flops / 1e12:.0f} TFLOP/s" if gpu else "n/a" if device.type == "cpu" else "unknown"
    print(f"device: {name}; {str(dtype).removeprefix('torch.')}; measured matmul {measured / 1e12:.4g} TFLOP/s "
          f"(n={n_mm}); datasheet peak {sheet_peak}")
    print(f"attention: flex = {attention_path(device)}" + ("; sdpa = scaled_dot_product_attention with the dense "
          "boolean (B, 1, L, L) Transfusion mask" if "sdpa" in attentions else ""))
    print(f"model: width {cfg.dim}, {cfg.n_heads} heads, {cfg.n_layers} layers, {cfg.patch_encoder} patching; "
          f"{args.rows} x {seq_len} positions, {batch.num_images} images; {flops:.6g} FLOP per position "
          f"(pretrain.plan.estimate)")
    peak_kind = "peak GiB" if device.type == "cuda" else "RSS GiB"
    mot = args.modality_experts
    print(f"{'attention':9s} {'config':12s} {'ms/step':>9s} {'positions/s':>12s} {'TFLOP/s':>9s} {'MFU meas.':>9s} "
           f"{'MFU sheet':>9s} {peak_kind:>9s} {'loss':>8s}" + (f" {'x dense':>8s}" if mot else "")
           + f" {'x first':>8s}")
    first_pos_s = None
    for attention in attentions:  # the same FLOPs counted for both: model FLOPs under the mask, not the kernel's
        for ck in (False,) if args.no_ckpt_only else (False, True):
            dense_pos_s = None
            for experts in (False, True) if mot else (False,):  # same FLOPs per position (pretrain.plan.estimate)
                r = run_config(replace(cfg, modality_experts=experts, attention=attention), batch, device, dtype, ck,
                               args.steps, args.warmup)
                pos_s = args.rows * seq_len / r["s_per_step"]
                dense_pos_s = dense_pos_s or pos_s
                first_pos_s = first_pos_s or pos_s
                achieved = flops * pos_s
                sheet = f"{achieved / gpu.bf16_flops:9.1%}" if gpu else f"{'n/a':>9s}"
                name = ("ckpt" if ck else "no ckpt") + (" MoT" if experts else "")
                print(f"{attention:9s} {name:12s} {1e3 * r['s_per_step']:9.1f} {pos_s:12,.0f} {achieved / 1e12:9.3g} "
                      f"{achieved / measured:9.1%} {sheet} {r['peak_bytes'] / 2**30:9.2f} {r['loss']:8.3f}"
                      + (f" {pos_s / dense_pos_s:8.2f}" if mot else "") + f" {pos_s / first_pos_s:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
