"""Where a flow model of the synthetic task decides an image's shape, and where it loses it.

    python bench/shape_decision.py --model demo_out/export [--n 90] [--cfg-scale 2.5]

On n fresh draws (seen combinations) encoded by the export's VAE, with one fixed noise draw per image:
1. one step: x0 = x_s - s * v(x_s) at flow times s = 0.2 ... 0.9, with the true caption, a caption
   naming the next shape (same colour and place) and with CFG; % whose decoded x0 the judge calls the
   true / the swapped shape;
2. SDEdit: `euler_ancestral` with CFG from the noised true image at s0 = 0.4 ... 1 down to 0 (the
   demo's sampler on the demo's 100-step grid), with the true or the swapped caption; same two %.
At s0 = 1 this is text -> image; at small s0 the image already holds its shape, so what the sampler
then loses is lost in the last steps of denoising and decoding (docs/quality.md §15).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import synthetic  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402
from data_pipeline.vae import decode, encode, load_vae  # noqa: E402
from pretrain.evaluation.evaluate import EVAL_SEED, fresh_images, random_scenes, to_uint8  # noqa: E402
from pretrain.inference.generate import new_cache, prefill, cfg_combine, load_exported  # noqa: E402
from pretrain.model import CachedChunk, KVCache  # noqa: E402
from pretrain.model.diffusion import euler_ancestral_step  # noqa: E402
from pretrain.evaluation.judge import judge  # noqa: E402

SHAPES = ("circle", "square", "triangle")
VFn = Callable[[torch.Tensor, float], torch.Tensor]


def velocity_fn(model, sp, prompts: list[list[int]], cfg_scale: float) -> VFn:
    """v(x, s) (N, C, H, W) of the flow model for N captions (token ids, no BOS), CFG against no caption;
    the prefix is cached once, as `pretrain.inference.generate` does."""
    m, P = len(prompts), model.cfg.patches_per_image
    ctx = new_cache(model, m)
    prefill(model, ctx, [[sp.bos_id, *p, sp.boi_id] for p in prompts], [], sp.pad_id)
    if cfg_scale != 1.0:
        uncond = new_cache(model, m)
        prefill(model, uncond, [[sp.bos_id, sp.boi_id]] * m, [], sp.pad_id)
        ctx = KVCache.concat([ctx, uncond])
    k = ctx.batch_size // m
    tokens = torch.full((k * m, P), sp.pad_id, dtype=torch.long)  # (k*m, P)
    ids = torch.arange(k * m)[:, None].expand(k * m, P)  # (k*m, P)
    valid = torch.ones(k * m, P, dtype=torch.bool)

    def v(x: torch.Tensor, s: float) -> torch.Tensor:
        _, out = model.forward_cached(ctx, CachedChunk(tokens, ids, valid, x.repeat(k, 1, 1, 1),
                                                       torch.full((k * m,), s)),
                                     commit=False)
        return out if k == 1 else cfg_combine(*out.chunk(2), cfg_scale)

    return v


def sdedit(v: VFn, x0: torch.Tensor, noise: torch.Tensor, s0: float, steps: int, seed: int) -> torch.Tensor:
    """Latents (N, C, H, W): x at s0 on the flow path, then the ancestral steps of
    `pretrain.model.diffusion.euler_ancestral_sample` on its grid below s0 (shift 1)."""
    grid = [s0] + [s for s in torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist() if s < s0]
    g = torch.Generator().manual_seed(seed)
    x = (1 - s0) * x0 + s0 * noise  # (N, C, H, W)
    for s, s2 in zip(grid[:-1], grid[1:]):
        x = euler_ancestral_step(x, v(x, s), s, s2, g)
    return x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an export directory (pretrain.artifacts.export) of a flow model")
    ap.add_argument("--n", type=int, default=90)
    ap.add_argument("--cfg-scale", type=float, default=2.5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, sp, root = load_exported(a.model)
    if model.cfg.objective != "flow":
        raise SystemExit(f"{a.model}: model.objective={model.cfg.objective!r}; this diagnostic steps on the flow path")
    tok, vae = Tokenizer(root / "tokenizer.model"), load_vae(root / "vae")
    rng = np.random.default_rng([EVAL_SEED, a.seed, 2])
    scenes = random_scenes(a.n, False, rng)
    x0 = encode(vae, fresh_images(scenes, 64, rng))  # (n, C, h, w)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(a.seed))  # (n, C, h, w)
    swapped = [(c, SHAPES[(SHAPES.index(s) + 1) % 3], p) for c, s, p in scenes]
    true_ids = [tok.encode(synthetic.caption_for(*sc)) for sc in scenes]
    swap_ids = [tok.encode(synthetic.caption_for(*sc)) for sc in swapped]

    def pct(lat: torch.Tensor) -> str:
        said = [judge(im).shape for im in to_uint8(decode(vae, lat))]
        t = 100 * np.mean([j == sc[1] for j, sc in zip(said, scenes)])
        w = 100 * np.mean([j == sc[1] for j, sc in zip(said, swapped)])
        return f"{t:5.1f} / {w:5.1f}"

    with torch.no_grad():
        fns = {"true": velocity_fn(model, sp, true_ids, 1.0), "swapped": velocity_fn(model, sp, swap_ids, 1.0),
               f"true, CFG {a.cfg_scale:g}": velocity_fn(model, sp, true_ids, a.cfg_scale),
               f"swapped, CFG {a.cfg_scale:g}": velocity_fn(model, sp, swap_ids, a.cfg_scale)}
        print(f"{a.n} fresh draws, % judged the true / the swapped shape (decoded by the export's VAE: {pct(x0)})")
        print("one-step x0 at flow time s, caption: " + " | ".join(fns))
        for s in (0.2, 0.4, 0.6, 0.8, 0.9):
            xs = (1 - s) * x0 + s * noise
            print(f"  s = {s:.1f}   " + " | ".join(pct(xs - s * v(xs, s)) for v in fns.values()), flush=True)
        cfg_fns = list(fns.items())[2:]
        print(f"SDEdit from s0 (euler_ancestral, {a.steps}-step grid), caption: " + " | ".join(k for k, _ in cfg_fns))
        for s0 in (0.4, 0.6, 0.8, 1.0):
            cells = [pct(sdedit(v, x0, noise, s0, a.steps, a.seed + 1)) for _, v in cfg_fns]
            print(f"  s0 = {s0:.1f}  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
