"""DDPM pieces: the cosine schedule (Nichol & Dhariwal), noising, timestep embedding, DDPM/DDIM samplers."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from pretrain.model.config import Sampler
from pretrain.model.layers import Linear


def cosine_alpha_bar(steps: int, s: float = 0.008, device: torch.device | str = "cpu") -> torch.Tensor:
    """Cumulative signal level alpha_bar_t for t = 0..steps-1, (steps,) fp64 -> fp32.

    Follows Nichol & Dhariwal: betas from the cosine curve, clipped at 0.999, then cumprod.
    """
    t = torch.arange(steps + 1, dtype=torch.float64, device=device) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # (steps+1,)
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # (steps,)
    return torch.cumprod(1 - betas, dim=0).to(torch.float32)  # (steps,)


def timestep_loss_weights(alpha_bar: torch.Tensor, weighting: str, cap: float) -> torch.Tensor:
    """Per-timestep weights (T,) of the eps-MSE, mean 1 over t (so the loss weight lambda keeps its meaning).

    "eps": all 1 (the paper's plain eps-prediction loss). "v_trunc": min(1/alpha_bar_t, cap), then
    divided by its mean. ||v_hat - v||^2 = ||eps_hat - eps||^2 / alpha_bar_t for v = sqrt(ab) eps -
    sqrt(1-ab) x0 (Salimans & Ho 2022, "SNR+1" weighting: 1 + 1/SNR = 1/alpha_bar), so this is the
    v-prediction loss of an eps-prediction model, truncated at `cap`: it weights the high-noise steps
    where only the caption can tell what the image is (under uniform eps-loss their error in x0
    costs alpha_bar/(1-alpha_bar) times less, so a small model learns to ignore the caption).
    """
    if weighting == "eps":
        return torch.ones_like(alpha_bar)
    if weighting == "v_trunc":
        w = (1.0 / alpha_bar).clamp(max=cap)  # (T,)
        return w / w.mean()
    raise ValueError(f"unknown diffusion loss weighting {weighting!r}: use 'eps' or 'v_trunc'")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for (N, C, H, W) latents and (N,) timesteps."""
    ab = alpha_bar[t].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)  # (N, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise  # (N, C, H, W)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t -> MLP -> width `dim` (as in DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256, std: float = 0.02) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = Linear(freq_dim, dim, std, bias=True)
        self.fc2 = Linear(dim, dim, std, bias=True)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.to(torch.float32)[:, None] * freqs[None]  # (N, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1).to(self.fc1.weight.dtype)  # (N, freq_dim)
        return self.fc2(nn.functional.silu(self.fc1(emb)))  # (N, dim)


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]




def make_scheduler(alpha_bar: torch.Tensor, sampler: Sampler, num_steps: int, clip_x0: float | None = 5.0) -> object:
    """A diffusers DDPMScheduler (ancestral) or DDIMScheduler (eta=0) on our schedule, set to `num_steps`.

    The betas are handed over from `alpha_bar` (T,), so sampling uses exactly the training schedule
    (diffusers' own "squaredcos_cap_v2" agrees to fp32 rounding, see tests). Timesteps are spaced
    "trailing": the first step is t = T-1 (pure noise), as in our training. DDPM uses the posterior
    variance ("fixed_small", Ho et al. eq. 7) between the strided timesteps. The x0 estimate is
    clamped to +-clip_x0 (latents are unit-variance): at t = T-1 the cosine schedule has
    alpha_bar ~ 2e-9, so x0 = (x - sqrt(1-ab) eps) / sqrt(ab) multiplies any error in eps by ~2e4.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    ab = alpha_bar.double().cpu()
    betas = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])  # (T,)
    common = dict(num_train_timesteps=ab.shape[0], trained_betas=betas.numpy(), prediction_type="epsilon",
                  timestep_spacing="trailing", clip_sample=clip_x0 is not None, clip_sample_range=clip_x0 or 1.0)
    if sampler == "ddpm":
        sched = DDPMScheduler(variance_type="fixed_small", **common)
    elif sampler == "ddim":
        sched = DDIMScheduler(set_alpha_to_one=True, **common)
    else:
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    sched.set_timesteps(num_steps)
    return sched


def diffusion_sample(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
    num_steps: int,
    sampler: Sampler = "ddim",
    clip_x0: float | None = 5.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """From pure noise (N, C, H, W) to x0 in `num_steps` steps of DDPM (ancestral) or DDIM (eta=0).

    eps_fn(x_t, t) predicts epsilon for timesteps t (N,); classifier-free guidance belongs in eps_fn.
    `generator` (CPU) draws DDPM's per-step noise, so a seed fixes the sample. See make_scheduler.
    """
    sched = make_scheduler(alpha_bar, sampler, num_steps, clip_x0)
    x = noise
    for t in sched.timesteps.tolist():
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (N,)
        eps = eps_fn(x, tt)  # (N, C, H, W)
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x


def ddim_sample(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
    num_steps: int,
    clip_x0: float | None = 5.0,
) -> torch.Tensor:
    """Deterministic DDIM (eta=0); diffusion_sample(..., sampler="ddim")."""
    return diffusion_sample(eps_fn, noise, alpha_bar, num_steps, "ddim", clip_x0)
