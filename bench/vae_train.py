"""Where a VAE training step's time goes, and the recipe and thread count against the old CLI default.

    python bench/vae_train.py [--size 32] [--images 1437] [--steps 4] [--rounds 2]

Trains each variant for `--steps` steps per round (the first step of each round is warm-up and not
timed), rounds interleaved so that a machine shared with other jobs slows every variant alike, and
prints per-phase milliseconds per step (batch, encode, decode, loss, backward, optimizer) and each
variant's step time as a ratio to the first (the old CLI default: width 64, 8x, 8 latent channels,
torch's thread count). Synthetic 1,437-image data as in issue 29 (coloured shapes, `--size` px).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline import vae as V  # noqa: E402
from pretrain.evaluation.evaluate import fresh_images, random_scenes  # noqa: E402

PHASES = ("batch", "encode", "decode", "loss", "backward", "optimizer")


def variants(size: int) -> list[tuple[str, dict]]:
    r = V.recipe_for(size)
    recipe = dict(width=r.width, downsample=r.downsample, latent_channels=r.latent_channels, noise=r.latent_noise)
    old = dict(width=64, downsample=8, latent_channels=8, noise=0.0)
    t = torch.get_num_threads()
    return [(f"old default, {t} threads", {**old, "threads": t}), ("old default, 1 thread", {**old, "threads": 1}),
            (f"recipe {size}px, {t} threads", {**recipe, "threads": t}),
            (f"recipe {size}px, 1 thread", {**recipe, "threads": 1})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, help="image side, px (default: %(default)s)")
    ap.add_argument("--images", type=int, default=1437, help="(default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=4,
                    help="steps per variant per round, 1 of them warm-up (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="(default: %(default)s)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    data = fresh_images(random_scenes(a.images, False, rng), a.size, rng)  # (N, 3, size, size)
    vs = variants(a.size)
    state = {}
    for name, v in vs:
        m = V.small_vae(v["latent_channels"], v["downsample"], v["width"]).train()
        state[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3), sum(p.numel() for p in m.parameters()))
    gen = torch.Generator().manual_seed(0)
    it = V._batches(data, a.batch_size, gen)
    times = {name: {p: [] for p in PHASES} for name, _ in vs}
    for _ in range(a.rounds):
        for name, v in vs:
            torch.set_num_threads(v["threads"])
            m, opt, _ = state[name]
            for s in range(a.steps):
                t = [time.perf_counter()]
                x = next(it)  # (B, 3, H, W)
                t.append(time.perf_counter())
                post = m.encode(x).latent_dist
                z = V.noise_latents(post.sample(generator=gen), v["noise"], gen)
                t.append(time.perf_counter())
                rec = m.decode(z).sample
                t.append(time.perf_counter())
                loss = V.weighted_l1(rec, x, 10.0) + 1e-6 * post.kl().mean() / x[0].numel()
                t.append(time.perf_counter())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t.append(time.perf_counter())
                opt.step()
                t.append(time.perf_counter())
                if s:
                    for p, a0, a1 in zip(PHASES, t, t[1:]):
                        times[name][p].append(a1 - a0)
    print(f"VAE training step at {a.size} px, batch {a.batch_size}, {a.images} synthetic images; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; median ms/step over {a.rounds * (a.steps - 1)} steps\n")
    print("| variant | params | " + " | ".join(PHASES) + " | step | ratio |")
    print("|---" * (len(PHASES) + 4) + "|")
    base = None
    for name, _ in vs:
        med = {p: 1000 * float(np.median(times[name][p])) for p in PHASES}
        step = 1000 * float(np.median(np.sum([times[name][p] for p in PHASES], axis=0)))
        base = base or step
        print(f"| {name} | {state[name][2]:,} | " + " | ".join(f"{med[p]:.0f}" for p in PHASES)
              + f" | {step:.0f} | {step / base:.2f} |")


if __name__ == "__main__":
    main()
