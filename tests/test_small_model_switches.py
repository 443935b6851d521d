"""The two switches the tiny demo model needs (docs/quality.md): v-prediction and 2-D patch positions.

Each is checked against an independent computation: the v target and the eps it implies against the
DDPM identities written out here, the loss against a hand computation from the decoder's raw output,
and the 2-D position embedding against positions that the 1-D RoPE path cannot tell apart.
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.model import ModelConfig, Transfusion
from pretrain.model.diffusion import add_noise, cosine_alpha_bar
from pretrain.model.patching import LinearPatchEncoder, sincos_2d
from batches import random_batch


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=64, latent_channels=4, latent_size=8, patch_size=2,
                timestep_freq_dim=32, attention="sdpa")
    return ModelConfig(**{**base, **kw})


def test_v_target_and_the_eps_it_implies() -> None:
    """v = sqrt(ab) eps - sqrt(1-ab) x0; eps = sqrt(1-ab) x_t + sqrt(ab) v recovers the true noise at every t."""
    model = Transfusion(tiny_cfg(diffusion_prediction="v"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 200, 500, 950, 999])
    ab = cosine_alpha_bar(1000)[t].double().view(-1, 1, 1, 1)
    v = ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double()  # written out, not the model's code
    assert torch.allclose(model._diffusion_target(x0, eps, t).double(), v, atol=1e-6)
    x_t = add_noise(x0, eps, t, model.alpha_bar(x0.device))
    assert torch.allclose(model.eps_from_output(v.float(), x_t, t), eps, atol=1e-5)
    eps_model = Transfusion(tiny_cfg())
    assert torch.equal(eps_model.eps_from_output(v.float(), x_t, t), v.float())


def test_v_prediction_loss_is_the_v_mse_of_the_decoder_output() -> None:
    """The diffusion loss sum equals sum over images of mean((decoder output - v)^2), computed by hand."""
    cfg = tiny_cfg(diffusion_prediction="v", diffusion_loss_weight=1.0)
    torch.manual_seed(0)
    model = Transfusion(cfg)
    torch.nn.init.normal_(model.patch_decoder.proj.weight, std=0.05)  # a non-zero output to compare
    batch = random_batch(cfg, 2, 128, seed=1)
    out = model(batch)
    ab = model.alpha_bar(batch.latents.device)[batch.timesteps].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * batch.latents + (1 - ab).sqrt() * batch.noise
    _, raw = model._hidden_and_output(batch, x_t, batch.timesteps)
    v = ab.sqrt() * batch.noise - (1 - ab).sqrt() * batch.latents
    expected = (raw - v).pow(2).mean(dim=(1, 2, 3)).sum()
    assert torch.allclose(out.diffusion_loss_sum, expected, rtol=1e-5)
    # and the eps the samplers get is the eps this v implies
    _, eps_hat = model.hidden_and_sampler_input(batch, x_t, batch.timesteps)
    assert torch.allclose(eps_hat, (1 - ab).sqrt() * x_t + ab.sqrt() * raw, atol=1e-6)


def test_v_prediction_with_v_trunc_weighting_is_refused() -> None:
    with pytest.raises(ValueError, match="diffusion_loss_weighting=eps"):
        tiny_cfg(diffusion_prediction="v", diffusion_loss_weighting="v_trunc")


def test_sincos_2d_rows_are_distinct_and_follow_the_formula() -> None:
    emb = sincos_2d(4, 32)  # (16, 32)
    assert emb.shape == (16, 32)
    q = 8
    y, x = 2, 3  # raster index 2*4+3 = 11
    w = [1.0 / 10000 ** (i / q) for i in range(q)]
    ref = ([math.sin(y * a) for a in w] + [math.cos(y * a) for a in w] + [math.sin(x * a) for a in w]
           + [math.cos(x * a) for a in w])
    assert torch.allclose(emb[11], torch.tensor(ref), atol=1e-6)
    d = torch.cdist(emb, emb) + torch.eye(16) * 10
    assert float(d.min()) > 0.1  # every patch position has its own code


def test_patch_encoder_tells_grid_positions_apart_only_with_the_switch() -> None:
    """Identical patch content at every grid cell: without the switch all 16 patch vectors are equal (the
    model would see a patch's place only through 1-D RoPE offsets); with sincos2d they all differ."""
    x = torch.ones(1, 4, 8, 8)  # every 2x2 patch holds the same values
    t = torch.tensor([500])
    for mode, distinct in (("none", False), ("sincos2d", True)):
        torch.manual_seed(0)
        enc = LinearPatchEncoder(tiny_cfg(patch_pos_embed=mode))
        h, _ = enc(x, t)  # (1, 16, D)
        spread = float((h[0] - h[0, :1]).abs().amax().detach())
        assert (spread > 1e-3) == distinct, (mode, spread)


def test_patch_pos_embed_needs_the_linear_encoder() -> None:
    with pytest.raises(ValueError, match="patch_encoder=linear"):
        tiny_cfg(patch_pos_embed="sincos2d", patch_encoder="unet", unet_channels=(8, 16))
