"""How much latent error a VAE's decoder tolerates before the judge sees another shape or colour.

    python bench/vae_robustness.py --vae demo_out/data/vae [--vae OTHER_VAE ...] [--n 162] [--sigmas 0,0.1,0.2,0.3,0.5]

Encodes n fresh synthetic draws of the seen combinations, adds sigma * N(0, I) to the unit-variance
latents the model works in (the VAE's own shift/scale), decodes and judges the pixels
(`pretrain.evaluation.evaluate.vae_ceiling`, `pretrain.evaluation.judge`). A denoiser's final latent is never
exact; a decoder that turns circles into squares under an error of 0.2 latent stds caps what any model sampled through
it can draw (docs/quality.md §15). Prints one row per sigma with shape / colour / all three, % judged
right, for each VAE; the same draws and noise for every VAE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.vae import load_vae  # noqa: E402
from pretrain.evaluation.evaluate import vae_ceiling  # noqa: E402


def row(vae_dirs: list[str], sigma: float, n: int, seed: int) -> list[str]:
    """'shape / colour / all three' (%) of each VAE's decodes of the noised latents of the seen draws."""
    cells = []
    for d in vae_dirs:
        s = vae_ceiling(load_vae(d), n, 64, seed, latent_noise=sigma)["seen"]
        cells.append(f"{100 * s['shape']:5.1f} / {100 * s['color']:5.1f} / {100 * s['all_three']:5.1f}")
    return cells


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", action="append", required=True, help="a VAE directory (diffusers format); repeatable")
    ap.add_argument("--n", type=int, default=162, help="fresh draws of the seen combinations")
    ap.add_argument("--sigmas", default="0,0.1,0.2,0.3,0.5", help="latent noise levels, in latent stds")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{a.n} fresh draws; % judged right: shape / colour / all three")
    print("sigma  " + "  ".join(f"{Path(v).parent.name + '/' + Path(v).name:>25}" for v in a.vae))
    for sigma in (float(s) for s in a.sigmas.split(",")):
        print(f"{sigma:5.2f}  " + "  ".join(f"{c:>25}" for c in row(a.vae, sigma, a.n, a.seed)), flush=True)


if __name__ == "__main__":
    main()
