"""Generation speed on CPU (fp32): caption tokens/s and seconds per image, with and without the KV cache.

Baseline ("recompute"): what pretrain.inference.generate did before the cache, one full forward over the whole
sequence per new token and per denoising step (cond and uncond rows). Cached: pretrain.inference.generate.
Random-init models (speed does not depend on the weights):
  tiny: configs/tiny.yaml's model (width 128, 2 layers, 8x8x8 latents -> 16 patches)
  wide: width 512, 4 layers, 8 heads, 32x32x8 latents -> 256 patches (the paper's patch count)
Caption: `BOS BOI image EOI` + --tokens new tokens (greedy; no EOS id, so every run decodes them all).
Image: a --caption-len token caption, --steps DDIM steps (Euler with --objective flow), CFG 3 (2 rows per
image), --batch images.

    python bench/generate.py [--threads 2] [--tokens 16] [--steps 10] [--batch 2] [--configs tiny,wide]
                             [--objective flow]
"""

from __future__ import annotations

import argparse
import time

import torch

from contract.special_ids import SpecialIds
from pretrain.model.config import ModelConfig
from pretrain.inference.generate import ImageSampling, packed_batch, cfg_combine, generate_images, generate_text
from pretrain.model import Transfusion

# no EOS: every run decodes --tokens tokens
SP = SpecialIds(vocab_size=97, bos_id=1, eos_id=-1, boi_id=3, eoi_id=4, pad_id=0)
CONFIGS = {
    "tiny": dict(dim=128, n_layers=2, n_heads=4, latent_size=8),
    "wide": dict(dim=512, n_layers=4, n_heads=8, latent_size=32),
}


def build(name: str, objective: str = "ddpm") -> Transfusion:
    cfg = ModelConfig(vocab_size=1024, attention="sdpa", patch_size=2, timestep_freq_dim=64, objective=objective,
                      **CONFIGS[name])
    torch.manual_seed(0)
    return Transfusion(cfg).eval()


@torch.no_grad()
def caption_recompute(model: Transfusion, image: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens after `BOS BOI image EOI`, one full forward over everything per token."""
    P = model.cfg.patches_per_image
    row, t = [SP.bos_id, SP.boi_id, *[None] * P, SP.eoi_id], torch.zeros(1, dtype=torch.long)
    new: list[int] = []
    for _ in range(n):
        h, _ = model.hidden_and_sampler_input(packed_batch(model, [row + new], image, t, SP.pad_id), image, t)  # (L, D)
        new.append(int(model.lm_logits(h[len(row) + len(new) - 1]).argmax()))
    return new


@torch.no_grad()
def image_recompute(model: Transfusion, prompts: list[list[int]], steps: int, scale: float) -> torch.Tensor:
    """DDIM (Euler for objective=flow) with CFG, the prefix recomputed at every step (cond and uncond rows)."""
    cfg, P = model.cfg, model.cfg.patches_per_image
    rows = ([[SP.bos_id, *p, SP.boi_id] + [None] * P for p in prompts]
            + [[SP.bos_id, SP.boi_id] + [None] * P] * len(prompts))

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs, ts = x.repeat(2, 1, 1, 1), t.repeat(2)
        _, eps = model.hidden_and_sampler_input(packed_batch(model, rows, xs, ts, SP.pad_id), xs, ts)
        return cfg_combine(*eps.chunk(2), scale)

    noise = torch.randn(len(prompts), cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return model.sample_latents(eps_fn, noise, steps, sampler_of(model))


def sampler_of(model: Transfusion) -> str:
    """The deterministic sampler of the model's objective: DDIM, or Euler for flow."""
    return "euler" if model.cfg.objective == "flow" else "ddim"


def timed(fn, reps: int = 2) -> float:  # noqa: ANN001
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--caption-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--configs", default="tiny,wide")
    ap.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm", help="model.objective of the models")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print("| config | patches | caption tok/s recompute | cached | ratio | s/image recompute | cached | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.configs.split(","):
        model = build(name, a.objective)
        cfg = model.cfg
        g = torch.Generator().manual_seed(0)
        image = torch.randn(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
        ref = caption_recompute(model, image, a.tokens)
        got = generate_text(model, [[]], SP, a.tokens, images=image)[0]
        assert got == ref, f"cached caption {got} != recomputed {ref}"
        tc = timed(lambda: caption_recompute(model, image, a.tokens))
        tk = timed(lambda: generate_text(model, [[]], SP, a.tokens, images=image))
        prompts = [torch.randint(5, cfg.vocab_size, (a.caption_len,), generator=g).tolist() for _ in range(a.batch)]
        ic = timed(lambda: image_recompute(model, prompts, a.steps, 3.0), reps=1) / a.batch
        sampler = sampler_of(model)
        ik = timed(lambda: generate_images(model, prompts, SP, ImageSampling(a.steps, 3.0, sampler)), reps=1) / a.batch
        print(f"| {name} | {cfg.patches_per_image} | {a.tokens / tc:.1f} | {a.tokens / tk:.1f} | {tc / tk:.2f}x "
              f"| {ic:.3f} | {ik:.3f} | {ic / ik:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
