"""Train the VAE recipe of one image size on synthetic shapes and measure its reconstructions.

    python bench/vae_recipe_quality.py --size 32 [--images 1437] [--steps N] [--threads 1] [--out DIR]
        [--downsample D --width W --latent-channels C --batch-size B --latent-noise T]   # a variant of the recipe

Trains `data_pipeline.vae.train_vae` with `recipe_for(--size)` (fg_weight 10, as the demo) on
`--images` synthetic draws, then encodes and decodes 162 fresh draws (other seed) and prints: the
pixel judge's accuracy on the originals (the judge's own ceiling at this size), on the
reconstructions (`pretrain.evaluation.evaluate.vae_ceiling`, seen and held-out combinations), the
reconstructions' PSNR (dB, pixels in [0, 255]), and the training wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline import vae as V  # noqa: E402
from pretrain.evaluation import evaluate as E  # noqa: E402
from pretrain.evaluation.judge import judge  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) over images of two (N, 3, H, W) batches in [-1, 1], peak 255 after to_uint8."""
    x, y = E.to_uint8(a).astype(np.float64), E.to_uint8(b).astype(np.float64)  # (N, H, W, 3)
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)  # (N,)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, help="(default: %(default)s)")
    ap.add_argument("--images", type=int, default=1437, help="training images (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--threads", type=int, default=None, help="default: data_pipeline.vae.default_threads()")
    ap.add_argument("--out", type=Path, default=None, help="keep the VAE here (default: a temporary directory)")
    for flag in ("downsample", "width", "latent_channels", "batch_size"):
        ap.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--latent-noise", type=float, default=None, help="default: the recipe's")
    a = ap.parse_args()
    r = V.recipe_for(a.size)
    over = {k: getattr(a, k) for k in ("steps", "downsample", "width", "latent_channels", "batch_size", "latent_noise")}
    r = dataclasses.replace(r, **{k: v for k, v in over.items() if v is not None})
    threads = a.threads or V.default_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    data = E.fresh_images(E.random_scenes(a.images, False, rng), a.size, rng)  # (N, 3, size, size)
    out = a.out or Path(tempfile.mkdtemp(prefix="vae_recipe_"))
    t0 = time.time()
    V.train_vae(data, out, V.VaeTrainSettings.from_recipe(r, fg_weight=10.0))
    seconds = time.time() - t0
    vae = V.load_vae(out)
    ceiling = E.vae_ceiling(vae, 162, a.size, seed=0)
    rng = np.random.default_rng([E.EVAL_SEED, 0, 1])
    scenes = E.random_scenes(162, False, rng)
    x = E.fresh_images(scenes, a.size, rng)
    rec = V.decode(vae, V.encode(vae, x))
    originals = E.score([judge(im) for im in E.to_uint8(x)], scenes)
    row = {"size": a.size, "steps": r.steps, "batch_size": r.batch_size, "latent_noise": r.latent_noise,
           "width": r.width, "downsample": r.downsample,
           "channels": r.latent_channels,
           "threads": threads, "train_seconds": round(seconds), "load_average": round(os.getloadavg()[0], 1),
           "judge_on_originals": round(100 * originals["all_three"], 1),
           "recon_seen_all_three": round(100 * ceiling["seen"]["all_three"], 1),
           "recon_held_out_all_three": round(100 * ceiling["held_out"]["all_three"], 1),
           "recon_seen_shape": round(100 * ceiling["seen"]["shape"], 1),
           "recon_seen_color": round(100 * ceiling["seen"]["color"], 1),
           "psnr_db": round(psnr(x, rec), 2)}
    print("| " + " | ".join(row) + " |\n" + "|---" * len(row) + "|\n| "
          + " | ".join(str(v) for v in row.values()) + " |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
