"""A/B of one VAE training step of the 64-px recipe: threads, channels_last, bf16 autocast.

    python bench/vae_step_variants.py [base,t1,cl,bf16] [ROUNDS]

Variants (each its own model and optimizer, rounds interleaved so that a shared machine's load hits
all alike; 3 steps per round, the first not timed): base = 2 threads fp32; t1 = 1 thread; cl =
channels_last memory format; bf16 = torch.autocast("cpu", bfloat16) around the forward. Prints the
running medians after each round and, at the end, each variant's median ms/step and ratio to the first.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline import vae as V  # noqa: E402
from pretrain.evaluation.evaluate import fresh_images, random_scenes  # noqa: E402

size, width, ds, ch, bs = 64, 16, 4, 4, 16  # the 64-px recipe, batch 16
rng = np.random.default_rng(0)
data = fresh_images(random_scenes(256, False, rng), size, rng)  # (256, 3, 64, 64)


def make(variant: str):
    m = V.small_vae(ch, ds, width).train()
    if "cl" in variant:
        m = m.to(memory_format=torch.channels_last)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


variants = (sys.argv[1] if len(sys.argv) > 1 else "base,t1,cl,bf16").split(",")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
state = {v: make(v) for v in variants}
gen = torch.Generator().manual_seed(0)
T: dict[str, list[float]] = {v: [] for v in variants}
for rnd in range(rounds):
    for v in variants:
        m, opt = state[v]
        torch.set_num_threads(1 if "t1" in v else 2)
        for s in range(3):
            x = data[torch.randint(0, len(data), (bs,), generator=gen)]  # (16, 3, 64, 64)
            if "cl" in v:
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in v):
                post = m.encode(x).latent_dist
                z = V.noise_latents(post.sample(generator=gen), 0.5, gen)
                rec = m.decode(z).sample
            loss = V.weighted_l1(rec.float(), x, 10.0) + 1e-6 * post.kl().mean() / x[0].numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if s:
                T[v].append(time.perf_counter() - t0)
    print(rnd, {k: round(1000 * float(np.median(a))) for k, a in T.items() if a}, flush=True)
for v in variants:
    a = np.array(T[v])
    print(f"{v:12s} median {1000 * np.median(a):.0f} ms/step  (n={len(a)})  ratio "
          f"{np.median(a) / np.median(T[variants[0]]):.2f}")
