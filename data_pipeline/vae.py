"""The image autoencoder: load any diffusers AutoencoderKL, normalise its latents, train a small one.

Latents handed to the model are `(z - shift) * scale` per the VAE config (`shift_factor`,
`scaling_factor`, or SDXL-style per-channel `latents_mean`/`latents_std`), so the model always
sees unit variance. A VAE trained here gets its shift/scale measured on the data and recorded.
Run `python -m data_pipeline.vae --help` to train one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from tqdm import tqdm

from data_pipeline import images as imglib
from data_pipeline import sources


@dataclass
class Vae:
    """A frozen AutoencoderKL with the affine map that makes its latents unit-variance."""

    model: AutoencoderKL
    shift: torch.Tensor  # (1, C, 1, 1) or scalar
    scale: torch.Tensor  # (1, C, 1, 1) or scalar

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)


def _affine(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) from a diffusers VAE config."""
    sf = float(cfg.scaling_factor)
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        return mean, sf / std
    shift = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
    return torch.tensor(shift), torch.tensor(sf)


def wrap(model: AutoencoderKL) -> Vae:
    """Freeze `model` and attach its latent normalisation."""
    model.eval().requires_grad_(False)
    shift, scale = _affine(model.config)
    return Vae(model, shift, scale)


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Vae:
    """Load a diffusers AutoencoderKL from a local directory (config.json + safetensors)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: not a diffusers AutoencoderKL directory (config.json missing)")
    model = AutoencoderKL.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True)
    return wrap(model.to(device))


def small_vae(latent_channels: int = 8, downsample: int = 8, width: int = 32, seed: int = 0) -> AutoencoderKL:
    """A small AutoencoderKL (untrained): log2(downsample)+1 blocks, `latent_channels` channels."""
    n = int(math.log2(downsample)) + 1
    chans = tuple(width * min(2 ** (i // 2), 4) for i in range(n))
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=chans,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=max(1, width // 8),  # >= 8 channels per group: one channel per group
        # normalises away the colour of a small object on a flat background
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


@dataclass(frozen=True)
class VaeRecipe:
    """How to train the small VAE for one image size, and the model keys its latents fix.

    `measured` says what was measured with this recipe (reconstructions judged right by
    `pretrain.evaluation.evaluate.vae_ceiling`, PSNR, wall time, with the machine) or "unmeasured";
    docs/data.md "VAE recipes" holds the same table and the commands that measured it.
    """

    image_size: int  # px, square
    downsample: int  # image side / latent side (2, 4, 8 or 16)
    width: int  # channels of the first block (small_vae)
    latent_channels: int
    patch_size: int  # model.patch_size: latent cells per patch side
    steps: int
    batch_size: int = 16
    lr: float = 5e-3
    latent_noise: float = 0.5  # noise_latents: the decoder learns to rebuild from a slightly-off latent
    measured: str = "unmeasured"

    @property
    def latent_size(self) -> int:
        """model.latent_size: the latent side, image_size / downsample."""
        return self.image_size // self.downsample

    @property
    def patches(self) -> int:
        """Patches (image positions) per image: (latent_size / patch_size)^2."""
        return (self.latent_size // self.patch_size) ** 2


#: one recipe per image size (docs/data.md "VAE recipes"), each measured on synthetic shapes. At 256 px the
#: paper's VAE has 8 latent channels and 8x downsampling (32x32x8 latents in 2x2 patches: 256 per image;
#: Zhou et al. 2024, Transfusion, sec. 4.1); the recipe keeps its 256 patches per image with 64x64x4
#: latents in 4x4 patches, as the 128-px 8x, 8-channel VAE lost colour where 4x, 4 channels kept it.
RECIPES: dict[int, VaeRecipe] = {r.image_size: r for r in (
    # 2x, not 4x: a 32-px shape spans ~2 cells of an 8x8 latent, and the 4x VAE rounded it (shape judged
    # right 54.9%, PSNR 21.9 dB); 16x16x4 latents keep 79.0% (25.4 dB) of the judge's own 93.8% on originals
    VaeRecipe(32, downsample=2, width=16, latent_channels=4, patch_size=4, steps=1200,
              measured="synthetic shapes: 79.0% judged right (judge on the originals: 93.8%), PSNR 25.4 dB; "
                       "358 s on 1 thread, 2-core machine at load 17 (bench/vae_recipe_quality.py)"),
    VaeRecipe(64, downsample=4, width=16, latent_channels=4, patch_size=4, steps=1600,
              measured="synthetic shapes: 98.1% of reconstructions judged right (colour, shape, place; "
                       "docs/quality.md §17), the demo's VAE"),
    # 128 px: 4x, 4 channels (32x32x4 latents, 4x4 patches: 64 per image, as 8x with 2x2 patches would give); the 8x,
    # 8-channel VAE of the same width drew red, yellow and orange all orange-brown (colour 43.2% after 1,600 steps;
    # at 3,200 steps still all orange at step 1,066) where 4x had every colour right by step 1,066
    VaeRecipe(128, downsample=4, width=16, latent_channels=4, patch_size=4, steps=1600,
              measured="synthetic shapes: 100% of reconstructions judged right (seen and held out; judge on the "
                       "originals 100%), PSNR 27.9 dB; 2,159 s on 1 thread, 2-core machine beside another 1-thread "
                       "VAE training (bench/vae_recipe_quality.py --size 128)"),
    # batch 4: a 256-px image holds 4x the pixels of a 128-px one, and batch 16 took 8.2 s a step on 2 threads
    VaeRecipe(256, downsample=4, width=16, latent_channels=4, patch_size=4, steps=1600, batch_size=4,
              measured="synthetic shapes: 89.5% of reconstructions judged right (shape 100%, colour 89.5%: blue "
                       "comes back purple; held out 75.0%, n = 32; judge on the originals 100%), PSNR 29.0 dB; "
                       "2,038 s on 2 threads, idle 2-core machine (bench/vae_recipe_quality.py --size 256)"),
)}


def recipe_for(image_size: int) -> VaeRecipe:
    """The VAE recipe for square images of `image_size` px: RECIPES' entry, or for another size the
    recipe of the nearest listed size below it (the smallest for sizes under 32) with its image size
    and a downsampling that keeps the latent side a whole number.

    Raises ValueError for a size that is not a positive multiple of 8.
    """
    if image_size <= 0 or image_size % 8:
        raise ValueError(f"--image-size {image_size}: must be a positive multiple of 8 (the VAE downsamples "
                         f"by 2 to 8; listed recipes: {sorted(RECIPES)} px)")
    if image_size in RECIPES:
        return RECIPES[image_size]
    below = [s for s in RECIPES if s < image_size]
    base = RECIPES[max(below)] if below else RECIPES[min(RECIPES)]
    ds = base.downsample if image_size % (base.downsample * base.patch_size) == 0 else 4
    patch = base.patch_size if (image_size // ds) % base.patch_size == 0 else 1
    return dataclasses.replace(base, image_size=image_size, downsample=ds, patch_size=patch,
                               measured=f"unmeasured (the {base.image_size}-px recipe at {image_size} px)")


def recipe_table() -> str:
    """RECIPES as a plain-text table (the CLI's --help epilog)."""
    rows = [f"{'px':>5} {'down':>5} {'width':>6} {'ch':>3} {'latent':>9} {'patch':>6} {'patches':>8} {'steps':>6} "
            f"{'batch':>6}  measured"]
    for r in RECIPES.values():
        rows.append(f"{r.image_size:>5} {r.downsample:>4}x {r.width:>6} {r.latent_channels:>3} "
                    f"{f'{r.latent_size}x{r.latent_size}x{r.latent_channels}':>9} {r.patch_size:>6} {r.patches:>8} "
                    f"{r.steps:>6} {r.batch_size:>6}  {r.measured}")
    return "\n".join(rows)


@torch.no_grad()
def encode(vae: Vae, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, C, H/f, W/f) normalised posterior means (fp32)."""
    p = next(vae.model.parameters())
    mean = vae.model.encode(x.to(p.device, p.dtype)).latent_dist.mean.float()  # (B, C, h, w)
    return (mean - vae.shift.to(mean.device)) * vae.scale.to(mean.device)


@torch.no_grad()
def decode(vae: Vae, z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) normalised latents -> (B, 3, H, W) images in [-1, 1]."""
    p = next(vae.model.parameters())
    raw = z.float() / vae.scale.to(z.device) + vae.shift.to(z.device)
    return vae.model.decode(raw.to(p.device, p.dtype)).sample.float().clamp(-1, 1)


def load_images(inputs: list[str], size: int, limit: int | None = None, kind: str = "pairs",
                skips: sources.SkipLog | None = None, animated_frame: int | None = None) -> torch.Tensor:
    """Every good image of pair/folder/tar inputs as a (N, 3, size, size) float32 tensor in [-1, 1].

    Unusable records (`sources` reasons: `bad_json`, `no_image_field`, ...) and images (`missing_file`,
    `images.BadImage` reasons) are skipped and, when `skips` is given, counted and named by reason, as
    precompute does; animated images are skipped unless `animated_frame` picks a frame (images.load_image).
    At most `limit` images. Raises ValueError when no image is readable.
    """
    skips = skips if skips is not None else sources.SkipLog()
    out: list[np.ndarray] = []
    for part in sources.list_parts(inputs):
        for rec in sources.read_part(part, kind):
            if rec.skipped:
                skips.add(rec.key, rec.skipped, rec.detail)
                continue
            for px in imglib.decode_images(rec.segments, size, animated_frame):
                if isinstance(px, str):
                    skips.add(rec.key, px)
                    continue
                out.append(px)
                if limit and len(out) >= limit:
                    return torch.from_numpy(np.stack(out))
    if not out:
        raise ValueError(f"{inputs}: no readable images to train the VAE on "
                         f"({skips.summary('skipped') or 'none found'})")
    return torch.from_numpy(np.stack(out))


class PatchDiscriminator(torch.nn.Module):
    """A small PatchGAN discriminator (hinge loss) for the optional adversarial term."""

    def __init__(self, width: int = 32):
        super().__init__()
        c = width
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 4, 2, 1), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(c, 2 * c, 4, 2, 1), torch.nn.GroupNorm(8, 2 * c), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(2 * c, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, H/4, W/4) logits per patch


@torch.no_grad()
def measure_stats(model: AutoencoderKL, data: torch.Tensor, batch: int = 64) -> tuple[float, float]:
    """Mean and std of the raw posterior means over `data`."""
    model.eval()
    zs = [model.encode(data[i : i + batch]).latent_dist.mean for i in range(0, len(data), batch)]
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


def _save_recon(model: AutoencoderKL, x: torch.Tensor, path: Path) -> None:
    """Originals (top row) over reconstructions (bottom row) as one PNG."""
    with torch.no_grad():
        rec = model(x, sample_posterior=False).sample.clamp(-1, 1)
    grid = torch.cat([torch.cat(list(x), dim=2), torch.cat(list(rec), dim=2)], dim=1)  # (3, 2H, n*W)
    Image.fromarray(imglib.to_uint8(grid.numpy())).save(path)


def _batches(data: torch.Tensor, bs: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data) - bs + 1, bs):
            yield data[perm[i : i + bs]]


@dataclass(frozen=True)
class VaeTrainSettings:
    """How `train_vae` trains: optimisation, losses, model shape, seed and logging.

    `latent_noise` > 0 trains the decoder on noised latents (`noise_latents`), so that it rebuilds the
    clean image from a latent that is slightly off, as a denoiser's output is (docs/quality.md §15);
    a negative value is a ValueError in `train_vae`. `threads`: torch CPU threads while training
    (None: `default_threads()`; restored afterwards).
    """

    steps: int = 300  # optimizer steps (one-cycle schedule)
    batch_size: int = 16  # images per step
    lr: float = 2e-3  # peak learning rate
    kl_weight: float = 1e-6  # weight of the KL term (per latent element)
    gan_weight: float = 0.0  # > 0 adds a patch-GAN hinge loss
    gan_start: int = 0  # step at which the GAN loss starts
    latent_channels: int = 8
    downsample: int = 8  # image side / latent side
    width: int = 32  # channels of the first block (small_vae)
    seed: int = 0  # initialisation, batch order and posterior samples
    sample_every: int = 100  # write samples/recon_STEP.png every N steps
    fg_weight: float = 1.0  # weight of pixels that differ from the image's dominant colour
    latent_noise: float = 0.0  # noise_latents' max_noise, in latent stds
    threads: int | None = None

    @classmethod
    def from_recipe(cls, recipe: VaeRecipe, **overrides) -> VaeTrainSettings:
        """The settings of `recipe` (steps, batch size, lr, latent channels, downsampling, width, latent
        noise; samples written 3 times), with `overrides` (any field) on top."""
        base = dict(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                    latent_channels=recipe.latent_channels, downsample=recipe.downsample, width=recipe.width,
                    latent_noise=recipe.latent_noise, sample_every=max(1, recipe.steps // 3))
        return cls(**{**base, **overrides})


def train_vae(data: torch.Tensor, out: str | Path, settings: VaeTrainSettings = VaeTrainSettings(),
              report: dict | None = None) -> Path:
    """Train a small AutoencoderKL with L1 + KL (+ patch GAN), save it with measured shift/scale.

    data: (N, 3, H, W) images in [-1, 1], held in memory (batches are index gathers, no loader).
    `settings`: how (`VaeTrainSettings`). Raises ValueError for a negative `settings.latent_noise`.
    `report` (e.g. the inputs' skip counts) is added to the training report `out/latent_stats.json`.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(settings.threads or default_threads())
    try:
        return _train_vae(data, out, settings, report)
    finally:
        torch.set_num_threads(prev)


def _train_vae(data: torch.Tensor, out: str | Path, s: VaeTrainSettings, report: dict | None) -> Path:
    """train_vae's work, on the current torch thread count."""
    steps, lr, latent_channels = s.steps, s.lr, s.latent_channels
    latent_noise, gan_weight = s.latent_noise, s.gan_weight
    if latent_noise < 0:
        raise ValueError(f"latent_noise={latent_noise}: must be >= 0 (0 = plain VAE training)")
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model = small_vae(latent_channels, s.downsample, s.width, s.seed).train()
    with torch.no_grad():  # start with a narrow posterior (std ~0.05): at std 1 the sampled latent drowns
        model.quant_conv.bias[latent_channels:] = -6.0  # colour and shape and early training only learns blobs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    disc = PatchDiscriminator() if gan_weight > 0 else None
    dopt = torch.optim.AdamW(disc.parameters(), lr=lr / 4, betas=(0.5, 0.9)) if disc else None
    gen = torch.Generator().manual_seed(s.seed)
    it = _batches(data, min(s.batch_size, len(data)), gen)
    bar = tqdm(range(steps), desc="vae", unit="step")
    for step in bar:
        x = next(it)  # (B, 3, H, W)
        post = model.encode(x).latent_dist
        z = noise_latents(post.sample(generator=gen), latent_noise, gen)  # (B, C, h, w)
        rec = model.decode(z).sample
        l1 = weighted_l1(rec, x, s.fg_weight)
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + s.kl_weight * kl
        use_gan = disc is not None and step >= s.gan_start
        if use_gan:
            loss = loss - gan_weight * disc(rec).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if use_gan:
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
            dopt.zero_grad(set_to_none=True)
            d_loss.backward()
            dopt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.3g}")
        if (step + 1) % s.sample_every == 0 or step + 1 == steps:
            model.eval()
            _save_recon(model, data[:8], out / "samples" / f"recon_{step + 1:06d}.png")
            model.train()
    return save_with_stats(model, data, out, {"final_l1": l1.item(), "steps": steps, "latent_noise": latent_noise,
                                              **(report or {})})


def default_threads() -> int:
    """torch CPU threads for VAE training: torch's default (one per core) less the cores other jobs keep
    busy (the 1-minute load average), at least 1.

    The small VAE's convolutions gain little from a second thread, and on a shared machine threads that
    wait for a busy core stall every step: with a load average of ~22 on 2 cores a 64-px step took 34.5 s
    with 2 threads and 3.2 s with 1 (bench/vae_train.py, docs/data.md "VAE recipes").
    """
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        busy = 0.0
    return max(1, min(torch.get_num_threads(), round((os.cpu_count() or 1) - busy)))


def noise_latents(z: torch.Tensor, max_noise: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """z (B, C, h, w) + tau * std(z) * n, n ~ N(0, I), tau ~ U(0, max_noise) drawn per image; z itself when
    max_noise is 0.

    std(z) is the batch's, detached: the encoder cannot outgrow the noise by scaling its latents up (the
    saved VAE's scaling_factor undoes any scale anyway), so it must spread what the decoder needs over a
    margin wider than the noise. Latent denoising as tokenizer training: Yang et al. 2025, "Latent
    Denoising Makes Good Visual Tokenizers", sec. 3 (they interpolate towards noise and also mask; this
    adds it).
    """
    if max_noise == 0:
        return z
    tau = max_noise * torch.rand(z.shape[0], 1, 1, 1, generator=gen).to(z.device)  # (B, 1, 1, 1)
    return z + tau * z.detach().std() * torch.randn(z.shape, generator=gen).to(z.device)  # (B, C, h, w)


def weighted_l1(rec: torch.Tensor, x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """L1 with pixels that differ from their image's dominant (median) colour weighted `fg_weight` times.

    Small objects on a flat background (the synthetic demo set) are a few percent of the pixels: plain
    L1 learns their place and shape but washes their colour out (object-pixel L1 0.67 after 600
    steps); weighting them 10x keeps it (0.017).
    """
    err = (rec - x).abs()  # (B, 3, H, W)
    if fg_weight == 1.0:
        return err.mean()
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
    w = 1.0 + (fg_weight - 1.0) * fg
    return (err * w).sum() / (w.sum() * x.shape[1])


def save_with_stats(model: AutoencoderKL, data: torch.Tensor, out: Path, extra: dict | None = None) -> Path:
    """Measure latent mean/std on `data`, record them as shift/scale, save the VAE to `out`."""
    mean, std = measure_stats(model, data)
    model.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "latent_stats.json").write_text(json.dumps({"mean": mean, "std": std, **(extra or {})}, indent=2) + "\n")
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help; an option whose default comes from the recipe says so instead of "None"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None and "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> None:
    """CLI: train a small AutoencoderKL on the images of pair/folder/tar inputs (`recipe_for(--image-size)`
    unless the shape and schedule flags are given)."""
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.vae", description=__doc__,
                                 formatter_class=_HelpFormatter,
                                 epilog="recipes (--image-size picks one; docs/data.md \"VAE recipes\"):\n"
                                        + recipe_table())
    rec = "(default: the --image-size recipe below)"
    ap.add_argument("--input", nargs="+", required=True, help="pairs .jsonl, image folders or webdataset .tar files")
    ap.add_argument("--out", required=True, help="output directory (diffusers format + samples/*.png)")
    ap.add_argument("--kind", default="pairs", choices=("pairs", "interleaved"), help="layout of .jsonl inputs")
    ap.add_argument("--image-size", type=int, default=256, help="square image side in px; picks the recipe")
    ap.add_argument("--max-images", type=int, default=20000, help="images held in memory for training")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps {rec}")
    ap.add_argument("--batch-size", type=int, default=None, help=f"images per step {rec}")
    ap.add_argument("--lr", type=float, default=None, help=f"peak learning rate (one-cycle) {rec}")
    ap.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term (per latent element)")
    ap.add_argument("--gan-weight", type=float, default=0.0, help="> 0 adds a patch-GAN hinge loss")
    ap.add_argument("--gan-start", type=int, default=0, help="step at which the GAN loss starts")
    ap.add_argument("--latent-channels", type=int, default=None, help=f"channels of the latent {rec}")
    ap.add_argument("--downsample", type=int, default=None, choices=(2, 4, 8, 16),
                    help=f"image side / latent side {rec}")
    ap.add_argument("--width", type=int, default=None, help=f"channels of the first block {rec}")
    ap.add_argument("--sample-every", type=int, default=500, help="write samples/recon_STEP.png every N steps")
    ap.add_argument("--fg-weight", type=float, default=1.0,
                    help="weight of pixels that differ from the image's dominant colour (small objects on flat "
                         "backgrounds)")
    ap.add_argument("--latent-noise", type=float, default=None,
                    help=f"train the decoder on latents noised by up to this many latent stds (robust decoding) {rec}")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: one per core not busy with other jobs, at least 1: "
                         "default_threads)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation, batch order and posterior samples")
    a = ap.parse_args(argv)
    try:
        r = recipe_for(a.image_size)
    except ValueError as e:
        ap.error(str(e))
    pick = lambda v, d: d if v is None else v  # noqa: E731
    t0 = time.time()
    skips = sources.SkipLog()
    data = load_images(a.input, a.image_size, a.max_images, a.kind, skips)
    if skips.counts:
        print(skips.summary("[vae] inputs") + f"; all named in {Path(a.out) / 'latent_stats.json'}", file=sys.stderr)
    ch, ds = pick(a.latent_channels, r.latent_channels), pick(a.downsample, r.downsample)
    settings = VaeTrainSettings(
        steps=pick(a.steps, r.steps), batch_size=pick(a.batch_size, r.batch_size), lr=pick(a.lr, r.lr),
        kl_weight=a.kl_weight, gan_weight=a.gan_weight, gan_start=a.gan_start, latent_channels=ch, downsample=ds,
        width=pick(a.width, r.width), seed=a.seed, sample_every=a.sample_every, fg_weight=a.fg_weight,
        latent_noise=pick(a.latent_noise, r.latent_noise), threads=a.threads)
    train_vae(data, a.out, settings,
              report={"images_used": len(data), "recipe": dataclasses.asdict(r), **skips.to_json("skipped")})
    print(f"saved {a.out} in {time.time() - t0:.0f}s; model keys: model.latent_channels={ch} "
          f"model.latent_size={a.image_size // ds} (patch size of the recipe: {r.patch_size})")


if __name__ == "__main__":
    main()
