"""Diffusion pieces: the cosine schedule (Nichol & Dhariwal), noising, timestep embedding, DDPM/DDIM samplers,
and the flow-matching alternative (`model.objective=flow`): its time map, noising and Euler samplers.

The noise level is `t` throughout: the integer DDPM timestep in [0, T) (t = 0 nearly clean, T - 1 nearly
pure noise) for objective=ddpm, the flow time in [0, 1] (x_t = (1 - t) x0 + t eps: 0 clean, 1 pure noise)
for objective=flow."""

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
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for (N, C, H, W) latents and (N,) integer timesteps t in [0, T)."""
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


#: fn(x_t (N, C, H, W), t (N,)) -> epsilon (ddpm, integer timesteps t) or velocity (flow, flow times t)
DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    eps_fn: DenoiserFn,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
    num_steps: int,
    sampler: Sampler,
    clip_x0: float | None = 5.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """From pure noise (N, C, H, W) to x0 in `num_steps` steps of DDPM (ancestral) or DDIM (eta=0).

    eps_fn(x_t, t) predicts epsilon for timesteps t (N,); classifier-free guidance belongs in eps_fn.
    `sampler` has no default here: callers pass the model's (`default_sampler`, or what the export recorded).
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
    eps_fn: DenoiserFn,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
    num_steps: int,
    clip_x0: float | None = 5.0,
) -> torch.Tensor:
    """Deterministic DDIM (eta=0); diffusion_sample(..., sampler="ddim")."""
    return diffusion_sample(eps_fn, noise, alpha_bar, num_steps, "ddim", clip_x0)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift of flow time t in [0, 1]: shift * t / (1 + (shift - 1) * t), same shape.

    Esser et al. 2024 ("Scaling Rectified Flow Transformers", sec. 5.3.2): shift > 1 moves time towards
    noise (t = 1), as larger images need; shift = 1 is the identity. Monotone, fixes 0 and 1.
    """
    return shift * t / (1 + (shift - 1) * t)


def flow_time(timesteps: torch.Tensor, steps: int, mean: float = 0.0, std: float = 1.0,
              shift: float = 1.0) -> torch.Tensor:
    """Flow time t in (0, 1) (t = 1 pure noise) of the loader's integer timesteps k in [0, steps), float32, same shape.

    The loader draws k uniform on 0..steps-1 (its draws fix exact resume and the sequence digests, so the
    flow objective reuses them); u = (k + 0.5) / steps is then uniform on (0, 1) and the quantile map
    z = Phi^{-1}(u), t = shift_time(sigmoid(mean + std * z), shift) turns it into SD3's logit-normal
    time with a shift (Esser et al. 2024, sec. 3.1 and sec. 5.3.2; keys model.flow_logit_mean,
    flow_logit_std, flow_shift), discretised to `steps` quantiles. The map is increasing in k, so the
    image-first noise cap k <= data.image_first_max_timestep becomes a cap on t: k <= 500 of T = 1000 is
    u <= 0.5005, the median of the time distribution. With the defaults (mean 0, shift 1) that median is
    t = 0.5, signal (1 - t) = noise t, SNR = ((1 - t) / t)^2 = 1: the same "SNR >= 1" as the paper's cap,
    where the cosine schedule has alpha_bar(500) ~ 0.5, SNR ~ 1. A mean > 0 or shift > 1 moves the median,
    and so the cap, to t > 0.5 (SNR < 1); set data.image_first_max_timestep lower to keep SNR >= 1 there.
    """
    u = (timesteps.double() + 0.5) / steps  # (N,) uniform quantiles in (0, 1)
    t = torch.sigmoid(mean + std * torch.special.ndtri(u))  # (N,) logit-normal
    return shift_time(t, shift).float()


def add_flow_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps for (N, C, H, W) latents and flow times t (N,) in [0, 1]: the rectified-flow
    path (Liu et al. 2022; Lipman et al. 2022), whose velocity dx_t/dt = eps - x0 the model predicts."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)  # (N, 1, 1, 1)
    return (1 - t) * x0 + t * noise  # (N, C, H, W)


def euler_sample(v_fn: DenoiserFn, noise: torch.Tensor, num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """From pure noise (N, C, H, W) at t = 1 to x0 at t = 0 in `num_steps` Euler steps on the velocity.

    v_fn(x_t, t) predicts v = eps - x0 for flow times t (N,) in [0, 1]; classifier-free guidance belongs
    in v_fn (v = v_u + w (v_c - v_u)). The grid is t_i = shift_time(linspace(1, 0, n + 1), shift), the
    training shift applied to the sampling times (SD3); each step is x <- x + (t_{i+1} - t_i) v. Uses
    diffusers' FlowMatchEulerDiscreteScheduler (its `shift` is the same formula, its sigmas our t), handed
    the unshifted grid; its last sigma is 0. Deterministic: no per-step noise.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, num_steps + 1)[:-1].tolist(), device=noise.device)
    x = noise
    for i, sched_t in enumerate(sched.timesteps):
        t = sched.sigmas[i].expand(x.shape[0]).to(x.device)  # (N,)
        x = sched.step(v_fn(x, t), sched_t, x).prev_sample  # (N, C, H, W) fp32
    return x.to(noise.dtype)


def euler_ancestral_sample(v_fn: DenoiserFn, noise: torch.Tensor, num_steps: int, shift: float = 1.0,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM ancestral sampling on the rectified-flow path: from noise (N, C, H, W) at t = 1 to x0 at t = 0.

    Same grid and v_fn as `euler_sample`. A step from t to t' < t estimates x0 = x - t v and
    eps = x + (1 - t) v, then draws x_{t'} from the Gaussian posterior q(x_{t'} | x_t, x0) of the path
    x_t = a_t x0 + b_t eps (a = 1 - t, b = t): its variance is
    sigma^2 = sigma_{t|t'}^2 * b_{t'}^2 / b_t^2 with sigma_{t|t'}^2 = b_t^2 - (a_t b_{t'} / a_{t'})^2, the
    forward transition's variance (the posterior q(z_s | z_t, x) of Kingma et al. 2021, "Variational
    Diffusion Models", for any Gaussian path), and
    x_{t'} = a_{t'} x0 + sqrt(b_{t'}^2 - sigma^2) eps + sigma z: DDIM with eta = 1 (Song et al. 2021,
    eq. 12 and 16) written for this path. The last step returns the x0 estimate. Deterministic given
    `generator` (CPU draws, moved to the latents' device).
    """
    grid = shift_time(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift).tolist()
    x = noise.float()  # (N, C, H, W)
    for t, t_next in zip(grid[:-1], grid[1:]):
        v = v_fn(x.to(noise.dtype), torch.full((x.shape[0],), t, device=x.device)).float()  # (N, C, H, W)
        x = euler_ancestral_step(x, v, t, t_next, generator)
    return x.to(noise.dtype)


def euler_ancestral_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of `euler_ancestral_sample` from flow time t to t_next < t: x and the velocity v (N, C, H, W)
    -> x at t_next (N, C, H, W), or the x0 estimate x - t v when t_next <= 0 (the formula is in that docstring)."""
    x0, eps = x - t * v, x + (1 - t) * v  # (N, C, H, W) each
    if t_next <= 0:
        return x0
    a, b, a2, b2 = 1 - t, t, 1 - t_next, t_next
    var = max(b * b - (a * b2 / a2) ** 2, 0.0) * b2 * b2 / (b * b)
    z = torch.randn(x.shape, generator=generator).to(x.device)  # (N, C, H, W)
    return a2 * x0 + math.sqrt(max(b2 * b2 - var, 0.0)) * eps + math.sqrt(var) * z


def sample_latents(
    fn: DenoiserFn,
    noise: torch.Tensor,
    num_steps: int,
    sampler: Sampler,
    alpha_bar: torch.Tensor | None = None,
    flow_shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents (N, C, H, W) from noise with `sampler`: "euler"/"euler_ancestral" (flow; fn(x_t, t) gives the
    velocity at flow times t in [0, 1]) or "ddpm"/"ddim" (fn(x_t, t) gives epsilon at integer timesteps t in
    [0, T), `alpha_bar` the schedule). See
    euler_sample, euler_ancestral_sample and diffusion_sample; `Transfusion.sample_latents` fills the
    objective's arguments."""
    if sampler == "euler":
        return euler_sample(fn, noise, num_steps, flow_shift)
    if sampler == "euler_ancestral":
        return euler_ancestral_sample(fn, noise, num_steps, flow_shift, generator)
    if alpha_bar is None:
        raise ValueError(f"sampler={sampler!r} needs the DDPM schedule alpha_bar")
    return diffusion_sample(fn, noise, alpha_bar, num_steps, sampler, generator=generator)
