"""model.objective=flow: the time map, the Euler sampler, the flow loss, the cached generation path, config errors.

Each against an independent reference written out here: the logit-normal CDF from math.erf, the exact
velocity field of a Gaussian, a hand-written Euler loop, the loss from the decoder's raw output.
"""

from __future__ import annotations

import math

import pytest
import torch

from contract.special_ids import SpecialIds
from pretrain.config import load_config
from pretrain.configlib import ConfigError
from pretrain.inference.generate import ImageSampling, packed_batch, generate_images
from pretrain.model import ModelConfig, Transfusion
from pretrain.model.diffusion import euler_sample, flow_time, sample_latents
from batches import random_batch

SP = SpecialIds(vocab_size=97, bos_id=1, eos_id=2, boi_id=3, eoi_id=4, pad_id=0)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, latent_channels=4, latent_size=8, patch_size=2,
                timestep_freq_dim=32, attention="sdpa", objective="flow")
    return ModelConfig(**{**base, **kw})


def logit_normal_cdf(x: float, mean: float, std: float, shift: float) -> float:
    """P(s' <= x) for s' = shift_map(sigmoid(mean + std z)): invert the shift, then the normal CDF of the logit."""
    s = x / (shift - (shift - 1) * x)  # the inverse of s' = shift s / (1 + (shift - 1) s)
    return 0.5 * (1 + math.erf((math.log(s / (1 - s)) - mean) / (std * math.sqrt(2))))


@pytest.mark.parametrize("mean,std,shift", [(0.0, 1.0, 1.0), (0.5, 0.8, 3.0), (-1.0, 1.5, 1.0)])
def test_time_map_is_monotone_in_open_interval_and_logit_normal(mean: float, std: float, shift: float) -> None:
    t = torch.arange(1000)
    s = flow_time(t, 1000, mean, std, shift)
    assert s.dtype == torch.float32 and bool((s > 0).all()) and bool((s < 1).all())
    assert bool((s[1:] > s[:-1]).all()), "the map must be strictly increasing in t"
    # the loader's uniform draws through the map: empirical CDF vs the logit-normal CDF (KS distance)
    draws = torch.randint(0, 1000, (200_000,), generator=torch.Generator().manual_seed(0))
    s_draws = flow_time(draws, 1000, mean, std, shift).double().sort().values
    grid = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    emp = torch.searchsorted(s_draws, grid, right=True).double() / len(s_draws)
    ref = torch.tensor([logit_normal_cdf(float(x), mean, std, shift) for x in grid], dtype=torch.float64)
    # discretised to 1000 quantiles (CDF steps of 1e-3) + sampling error (~1/sqrt(2e5) = 2.2e-3)
    assert float((emp - ref).abs().max()) < 0.008
    wrong = torch.tensor([logit_normal_cdf(float(x), mean + 0.2, std, shift) for x in grid], dtype=torch.float64)
    assert float((emp - wrong).abs().max()) > 0.03, "the check must tell a shifted mean apart"


def test_image_first_cap_is_snr_one_with_default_time() -> None:
    """t <= 500 (the paper's image-first cap) maps to s <= ~0.5: signal >= noise, SNR = ((1-s)/s)^2 >= ~1."""
    s_cap = float(flow_time(torch.tensor([500]), 1000))
    assert 0.5 <= s_cap < 0.501
    assert ((1 - s_cap) / s_cap) ** 2 > 0.995


def gaussian_velocity(mu: torch.Tensor, sigma: torch.Tensor):
    """Exact v(x, s) = E[eps - x0 | x_s = x] for x0 ~ N(mu, diag sigma^2), x_s = (1-s) x0 + s eps (per dimension)."""

    def v(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.double().view(-1, 1, 1, 1)
        m, sg = mu.view(1, -1, 1, 1), sigma.view(1, -1, 1, 1)
        var = (1 - s) ** 2 * sg**2 + s**2  # Var(x_s)
        r = x.double() - (1 - s) * m  # x_s minus its mean
        x0 = m + (1 - s) * sg**2 / var * r  # E[x0 | x_s]
        eps = s / var * r  # E[eps | x_s]
        return (eps - x0).to(x.dtype)

    return v


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_recovers_a_gaussian_with_the_exact_velocity(shift: float) -> None:
    """20000 draws, 50 steps: mean within 0.04 and std within 5% of N((2, -1), (0.7, 1.5)^2); a wrong velocity fails.

    Sampling error at n = 20000: mean sigma/141 <= 0.011, std ~0.5%. Euler's own bias at 50 steps is in
    the std (the path is stiff near s = 0, where shift 3 puts fewer grid points): measured -2% (shift 1)
    and -4% (shift 3) for sigma 0.7, mean error < 0.02. A velocity for mu + 0.15 or sigma x 1.15 fails.
    """
    mu, sigma = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([0.7, 1.5], dtype=torch.float64)
    noise = torch.randn(20_000, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def close(x: torch.Tensor) -> bool:
        m, sd = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
        return bool(((m - mu).abs() < 0.04).all() and ((sd / sigma - 1).abs() < 0.05).all())

    assert close(euler_sample(gaussian_velocity(mu, sigma), noise, 50, shift))
    assert not close(euler_sample(gaussian_velocity(mu + 0.15, sigma), noise, 50, shift))
    assert not close(euler_sample(gaussian_velocity(mu, sigma * 1.15), noise, 50, shift))


def test_euler_grid_is_the_shifted_linspace() -> None:
    """The sampler asks for v at shift_time(linspace(1, 0, n+1))[:-1] and steps by their differences."""
    seen: list[float] = []

    def v(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        seen.append(float(s[0]))
        return torch.ones_like(x)

    x = euler_sample(v, torch.zeros(1, 1, 1, 1), 8, shift=3.0)
    ref = [3 * u / (1 + 2 * u) for u in torch.linspace(1, 0, 9).tolist()]
    assert seen == pytest.approx(ref[:-1], abs=1e-6)
    assert float(x) == pytest.approx(-1.0, abs=1e-6)  # x_0 = x_1 + (0 - 1) * 1


@pytest.mark.parametrize("patching", [{}, {"patch_encoder": "unet", "unet_channels": (16, 32)}])
def test_flow_loss_is_the_velocity_mse_of_the_decoder_output(patching: dict) -> None:
    """loss = LM + lambda * mean over images of mean((out - (eps - x0))^2), out at x_s = (1-s) x0 + s eps, s by hand."""
    cfg = tiny_cfg(diffusion_loss_weight=5.0, **patching)
    torch.manual_seed(0)
    model = Transfusion(cfg)
    with torch.no_grad():  # the decoder's output layers are zero-initialised: a non-zero output to compare
        for p in model.patch_decoder.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    batch = random_batch(cfg, 2, 128, seed=1)
    assert batch.num_images > 0
    out = model(batch)
    u = (batch.timesteps.double() + 0.5) / 1000
    s = 1 / (1 + torch.exp(-math.sqrt(2) * torch.erfinv(2 * u - 1)))  # sigmoid(Phi^-1(u)), mean 0, std 1
    s4 = s.float().view(-1, 1, 1, 1)
    x_s = (1 - s4) * batch.latents + s4 * batch.noise
    _, raw = model._hidden_and_output(batch, x_s, s.float())
    per_image = (raw - (batch.noise - batch.latents)).pow(2).mean(dim=(1, 2, 3))  # (N,)
    torch.testing.assert_close(out.diffusion_loss_sum, per_image.sum(), rtol=1e-5, atol=0)
    expected = out.lm_loss_sum / out.num_text_tokens + 5.0 * per_image.sum() / batch.num_images
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=0)
    # the timestep embedder sees s * T (continuous, DDPM's range), in training and from the samplers
    seen: list[torch.Tensor] = []
    model.patch_encoder.t_embed.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(batch)
    torch.testing.assert_close(seen[-1], s.float() * 1000)
    _, v = model.hidden_and_sampler_input(batch, x_s, s.float())
    assert torch.equal(v, raw), "a flow model hands the sampler its velocity unchanged"


def test_cached_flow_generation_equals_uncached_euler() -> None:
    """generate_images on a flow model (KV cache, CFG) = a hand-written Euler loop over full forwards."""
    torch.manual_seed(0)
    model = Transfusion(tiny_cfg()).eval()
    with torch.no_grad():
        model.patch_decoder.proj.weight.normal_(0, 0.05)
    P, steps, scale = model.cfg.patches_per_image, 6, 2.0
    prompts = [[5, 6, 7], [8]]
    got = generate_images(model, prompts, SP, ImageSampling(steps=steps, cfg_scale=scale, sampler="euler"), seed=3)
    rows = [[SP.bos_id, *p, SP.boi_id] + [None] * P for p in prompts] + [[SP.bos_id, SP.boi_id] + [None] * P] * 2
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    grid = torch.linspace(1, 0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            xs, ss = x.repeat(2, 1, 1, 1), torch.full((4,), float(grid[i]))
            _, v = model.hidden_and_sampler_input(packed_batch(model, rows, xs, ss, SP.pad_id), xs, ss)
            cond, uncond = v.chunk(2)
            x = x + float(grid[i + 1] - grid[i]) * (uncond + scale * (cond - uncond))
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="model.objective='flow'.*euler"):
        generate_images(model, prompts, SP, ImageSampling(steps=2, sampler="ddim"))
    # None: euler
    assert generate_images(model, prompts, SP, ImageSampling(steps=2, sampler=None)).shape == (2, 4, 8, 8)


def test_ddpm_model_refuses_euler() -> None:
    model = Transfusion(tiny_cfg(objective="ddpm")).eval()
    with pytest.raises(ValueError, match="sampler='euler'.*model.objective='ddpm'.*ddpm or ddim"):
        generate_images(model, [[5]], SP, ImageSampling(steps=2, sampler="euler"))


@pytest.mark.parametrize("key,value", [("diffusion_prediction", "v"), ("diffusion_loss_weighting", "v_trunc")])
def test_ddpm_switches_refused_under_flow(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"model.{key}='{value}' is a DDPM switch"):
        tiny_cfg(**{key: value})
    tiny_cfg(objective="ddpm", **{key: value})  # fine under ddpm


@pytest.mark.parametrize("key,value", [("flow_logit_std", 0.0), ("flow_shift", -1.0)])
def test_flow_key_ranges(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"model.{key} must be > 0"):
        tiny_cfg(**{key: value})


def test_run_config_sampler_must_fit_objective() -> None:
    with pytest.raises(ConfigError, match="logging.sample_sampler='ddpm' cannot sample.*objective='flow'.*euler"):
        load_config(overrides=["model.objective=flow", "logging.sample_sampler=ddpm"])
    with pytest.raises(ConfigError, match="logging.sample_sampler='euler' cannot sample.*objective='ddpm'"):
        load_config(overrides=["logging.sample_sampler=euler"])
    with pytest.raises(ConfigError, match="objective"):
        load_config(overrides=["model.objective=rectified"])
    cfg = load_config(overrides=["model.objective=flow", "logging.sample_sampler=euler", "model.flow_shift=3"])
    assert (cfg.model.objective, cfg.logging.sample_sampler, cfg.model.flow_shift) == ("flow", "euler", 3.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_ancestral_recovers_a_gaussian_with_the_exact_velocity(shift: float) -> None:
    """With the exact velocity of Gaussian data, the ancestral sampler lands on N(mu, tau^2) as steps grow
    (like DDPM, a finite grid draws the spread a little low: at 1000 steps < 1.2% off, measured)."""
    mu, tau = 1.5, 0.3
    noise = torch.randn(8000, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # 128k draws
    v = gaussian_velocity(torch.tensor([mu]), torch.tensor([tau]))
    x = sample_latents(v, noise, 1000, "euler_ancestral", flow_shift=shift, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - mu) < 0.01, x.mean().item()
    assert abs(x.std().item() / tau - 1) < 0.02, x.std().item()


def test_euler_ancestral_is_seeded_and_stochastic() -> None:
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    v = gaussian_velocity(torch.tensor([0.0]), torch.tensor([1.0]))

    def draw(seed: int) -> torch.Tensor:
        return sample_latents(v, noise, 10, "euler_ancestral", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.allclose(draw(1), draw(2)), "the ancestral sampler adds fresh noise at each step"
    assert torch.equal(sample_latents(v, noise, 10, "euler"), sample_latents(v, noise, 10, "euler")), "euler: no noise"


def test_euler_ancestral_step_is_ddim_eta1_in_vp_form() -> None:
    """Each ancestral step on Gaussian data, against DDIM eta = 1 (Song et al. 2021, eq. 12 and 16) written for
    the variance-preserving path x_vp = x / n, n = sqrt(a^2 + b^2), alpha_bar = a^2 / n^2: the sampler's
    output mean and spread after 8 steps equal the exact linear-Gaussian recursion of those steps."""
    mu, tau, steps = 1.5, 0.3, 8
    noise = torch.randn(20000, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # 320k draws
    v = gaussian_velocity(torch.tensor([mu]), torch.tensor([tau]))
    x = sample_latents(v, noise, steps, "euler_ancestral", generator=torch.Generator().manual_seed(1))
    m, var = 0.0, 1.0  # mean and variance of x at s = 1
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for s, s2 in zip(grid[:-1], grid[1:]):
        a, b, a2, b2 = 1 - s, s, 1 - s2, s2
        d = a * a * tau * tau + b * b  # Var(x_s)
        # x0_hat = mu + a tau^2 (x - a mu) / d and eps_hat = b (x - a mu) / d, both affine in x
        if s2 == 0:
            m, var = mu + a * tau * tau / d * (m - a * mu), (a * tau * tau / d) ** 2 * var
            break
        n, n2 = math.hypot(a, b), math.hypot(a2, b2)
        ab, ab2 = (a / n) ** 2, (a2 / n2) ** 2
        sig_vp2 = (1 - ab2) / (1 - ab) * (1 - ab / ab2)  # DDIM eq. 16, eta = 1
        k = n2 * math.sqrt(1 - ab2 - sig_vp2)  # coefficient of eps_hat back on the flow path
        gain = (a2 * a * tau * tau + k * b) / d  # d x' / d x
        m, var = a2 * mu + gain * (m - a * mu), gain * gain * var + n2 * n2 * sig_vp2
    assert abs(x.mean().item() - m) < 0.005, (x.mean().item(), m)
    assert abs(x.var().item() / var - 1) < 0.02, (x.var().item(), var)
