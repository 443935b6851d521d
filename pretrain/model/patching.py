"""Latent <-> patch sequence: a linear or U-Net encoder in, the mirror decoder out (predicts epsilon, v or the
flow velocity: model.diffusion_prediction, model.objective).

Patches are p x p latent cells in raster order. The linear encoder adds the timestep embedding to
every patch vector; the U-Net conditions on the timestep inside each residual block, and its
decoder takes skip connections from the encoder.

Encoder/decoder protocol: `encoder(x_t, t) -> (patches (N, P, D), ctx)` and
`decoder(h (N, P, D), t, ctx) -> eps (N, C, H, W)`, where `ctx` is what the decoder needs from the
encoder of the same images: `[]` for the linear pair; for the U-Net, the output of every encoder
residual block in the order they ran (level 0 first, each (N, c_level, H/2^level, W/2^level)),
followed by the timestep embedding (N, temb). The decoder pops the skips from the end, so its
first block takes the encoder's last one (the usual U-Net mirror), and reuses the embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import ModelConfig
from pretrain.model.diffusion import TimestepEmbedder
from pretrain.model.layers import Conv2d, Linear


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, C*p*p), patches in raster order."""
    N, C, H, W = x.shape
    x = x.view(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
    return x.reshape(N, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """(N, P, C*p*p) -> (N, C, H, W); inverse of patchify."""
    N = x.shape[0]
    x = x.view(N, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (N, C, H/p, p, W/p, p)
    return x.reshape(N, C, H, W)


class LinearPatchEncoder(nn.Module):
    """patch vector -> width D, plus the timestep embedding on every patch."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.p = cfg.patch_size
        self.proj = Linear(cfg.patch_dim, cfg.dim, cfg.init_std, bias=True)
        self.t_embed = TimestepEmbedder(cfg.dim, cfg.timestep_freq_dim, cfg.init_std)
        self.grid, self.dim, self.pos_embed = cfg.latent_size // cfg.patch_size, cfg.dim, cfg.patch_pos_embed
        self._pos: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.proj(patchify(x_t, self.p))  # (N, P, D)
        if self.pos_embed == "sincos2d":
            h = h + self.position_embedding(h.device, h.dtype)  # (N, P, D)
        return h + self.t_embed(t)[:, None, :], []  # (N, P, D)

    def position_embedding(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(P, D) fixed 2-D sin-cos embedding x 0.1 (near the patch vectors' scale), cached per device.

        Not a parameter or buffer: nothing for ZeRO-3 to partition or an export to carry.
        """
        key = (device, dtype)
        if key not in self._pos:
            self._pos[key] = (sincos_2d(self.grid, self.dim) * 0.1).to(device, dtype)
        return self._pos[key]


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos position embedding of a patch grid in raster order.

    A quarter of the channels each: sin(y w), cos(y w), sin(x w), cos(x w) with w = 1/10000^(i/q),
    i < q = dim // 4 (MAE/DiT's get_2d_sincos_pos_embed); the last dim % 4 channels are zero.
    """
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)  # (q,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    ay, ax = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega  # (P, q)
    emb = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)  # (P, 4q)
    return torch.nn.functional.pad(emb, (0, dim - 4 * q)).float()


class LinearPatchDecoder(nn.Module):
    """width D -> the prediction per patch (epsilon, v or velocity); zero-initialised so training starts from 0."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.p, self.C, self.S = cfg.patch_size, cfg.latent_channels, cfg.latent_size
        self.proj = Linear(cfg.dim, cfg.patch_dim, 0.0, bias=True)

    def forward(self, h: torch.Tensor, t: torch.Tensor, ctx: list[torch.Tensor]) -> torch.Tensor:
        return unpatchify(self.proj(h), self.p, self.C, self.S, self.S)  # (N, C, H, W)


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + timestep projection, GroupNorm-SiLU-conv (zero-init), residual."""

    def __init__(self, cin: int, cout: int, temb: int, std: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = Conv2d(cin, cout)
        self.t_proj = Linear(temb, cout, std, bias=True)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = Conv2d(cout, cout, std=0.0)
        self.skip = Conv2d(cin, cout, kernel=1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, h, w)
        h = h + self.t_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))  # (N, cout, h, w)
        return self.skip(x) + h


class UNetPatchEncoder(nn.Module):
    """U-Net down blocks: latent (N, C, H, W) -> (N, P, D), one 2x downsample per level past the first.

    Returns ctx = [every residual block's output, in order] + [timestep embedding] (module docstring).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = cfg.unet_channel_list
        temb = ch[-1]
        self.t_embed = TimestepEmbedder(temb, cfg.timestep_freq_dim, cfg.init_std)
        self.conv_in = Conv2d(cfg.latent_channels, ch[0])
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        cin = ch[0]
        for i, c in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(cfg.unet_res_blocks):
                blocks.append(ResBlock(cin, c, temb, cfg.init_std))
                cin = c
            self.levels.append(blocks)
            if i < len(ch) - 1:
                self.downs.append(Conv2d(c, c, stride=2))
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.proj_out = Conv2d(cin, cfg.dim, kernel=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        temb = self.t_embed(t)  # (N, temb)
        h = self.conv_in(x_t)  # (N, c0, H, W)
        skips = []
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h, temb)
                skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)  # (N, c, h/2, w/2)
        h = self.proj_out(F.silu(self.norm_out(h)))  # (N, D, H/p, W/p)
        return h.flatten(2).transpose(1, 2), skips + [temb]  # (N, P, D)


class UNetPatchDecoder(nn.Module):
    """U-Net up blocks with skips from the encoder: (N, P, D) -> the prediction (N, C, H, W), epsilon/v/velocity.

    `ctx` is the encoder's: its residual outputs are concatenated to this decoder's blocks in
    reverse order (one per block: unet_res_blocks per level), its last entry is the timestep embedding.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = cfg.unet_channel_list
        temb = ch[-1]
        self.grid = cfg.latent_size // cfg.patch_size
        self.proj_in = Conv2d(cfg.dim, ch[-1], kernel=1)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        cin = ch[-1]
        for i in reversed(range(len(ch))):
            blocks = nn.ModuleList()
            for _ in range(cfg.unet_res_blocks):
                blocks.append(ResBlock(cin + ch[i], ch[i], temb, cfg.init_std))
                cin = ch[i]
            self.levels.append(blocks)
            if i > 0:
                self.ups.append(Conv2d(ch[i], ch[i - 1]))
                cin = ch[i - 1]
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = Conv2d(cin, cfg.latent_channels, std=0.0)

    def forward(self, h: torch.Tensor, t: torch.Tensor, ctx: list[torch.Tensor]) -> torch.Tensor:
        *skips, temb = ctx
        N, P, D = h.shape
        x = self.proj_in(h.transpose(1, 2).reshape(N, D, self.grid, self.grid))  # (N, c_last, H/p, W/p)
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), temb)
            if i < len(self.ups):
                x = self.ups[i](F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, c_prev, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(x)))  # (N, C, H, W)


def build_patching(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair the config asks for."""
    if cfg.patch_encoder == "linear":
        return LinearPatchEncoder(cfg), LinearPatchDecoder(cfg)
    return UNetPatchEncoder(cfg), UNetPatchDecoder(cfg)
