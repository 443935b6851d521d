"""The model's own config: backbone, image patching and diffusion settings (the `model:` section).

It lives beside the model (as torchtitan keeps its model args), imports nothing of the trainer or
the data pipeline; `pretrain.config` composes it into the run config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from contract import positions

PatchEncoder = Literal["linear", "unet"]
AttentionImpl = Literal["flex", "sdpa", "sdpa_varlen"]
LossWeighting = Literal["eps", "v_trunc"]
Sampler = Literal["ddpm", "ddim", "euler", "euler_ancestral"]  # image samplers (pretrain.model.diffusion):
# ddpm/ddim need model.objective=ddpm, euler/euler_ancestral need model.objective=flow
Objective = Literal["ddpm", "flow"]

#: samplers each objective can drive: DDPM/DDIM step on epsilon, Euler (ODE or ancestral) on the velocity
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "euler_ancestral")}


def check_sampler(objective: Objective, sampler: str, key: str = "sampler") -> None:
    """Raise ValueError naming `key` when `sampler` cannot sample a model trained with `objective`."""
    if sampler not in SAMPLERS.get(objective, ()):
        raise ValueError(f"{key}={sampler!r} cannot sample a model with model.objective={objective!r}: "
                         f"use {' or '.join(SAMPLERS.get(objective, ()))}")


def default_sampler(objective: Objective) -> Sampler:
    """The sampler a model of `objective` uses unless told otherwise: DDPM ancestral (the paper's), or Euler."""
    return "euler" if objective == "flow" else "ddpm"


@dataclass
class ModelConfig:
    """Transformer backbone, image patching and diffusion settings (README "Config reference" lists each key).

    The model takes sequences of any length (RoPE positions, no table): the one sequence length of a
    run is `data.seq_len`. Raises ValueError from `__post_init__` naming the key to change.
    """

    #: keys that moved: old name -> (new key, why); configlib reports them instead of "unknown key"
    moved: ClassVar[dict[str, tuple[str, str]]] = {
        "max_seq_len": ("data.seq_len", "a run has one sequence length, that of its packed shards"),
    }

    dim: int = 768
    n_layers: int = 16
    n_heads: int = 12
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    ffn_dim: int | None = None  # None = Llama rule: 2/3 * 4 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256
    vocab_size: int = 32000  # Llama 2's; pretrain.config.load_config takes it from data.tokenizer when set
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attention: AttentionImpl = "flex"
    # Mixture-of-Transformers (Liang et al. 2024): image (patch) positions get their own attention
    # projections, FFN and norms; attention stays global. false = one dense transformer (the paper)
    modality_experts: bool = False
    # image path
    latent_channels: int = 8
    latent_size: int = 32  # latent side (256 px image / 8x VAE)
    patch_size: int = 2
    patch_encoder: PatchEncoder = "linear"
    # 2-D position of each patch, added by the linear encoder: "none" (the paper: RoPE's 1-D offsets only)
    # or "sincos2d" (fixed sin-cos over the patch grid, as DiT); the U-Net gets it from its convolutions
    patch_pos_embed: Literal["none", "sincos2d"] = "none"
    unet_channels: tuple[int, ...] = ()  # per resolution level, len log2(p)+1; () = paper-sized default
    unet_res_blocks: int = 2
    timestep_freq_dim: int = 256
    # diffusion
    diffusion_steps: int = 1000
    diffusion_loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_DDPM
    # per-timestep weight of the eps-MSE: "eps" = 1 (the paper), "v_trunc" = min(1/alpha_bar_t, cap)
    # normalised to mean 1 over t (the v-prediction loss, truncated): see docs/quality.md
    diffusion_loss_weighting: LossWeighting = "eps"
    # what the patch decoder outputs and the diffusion MSE compares: "eps" (the paper) or "v" =
    # sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022); samplers always get eps (docs/quality.md)
    diffusion_prediction: Literal["eps", "v"] = "eps"
    diffusion_weight_cap: float = 20.0  # the cap of v_trunc
    # "ddpm" (the paper: cosine schedule, the switches above) or "flow": rectified flow, x_s = (1-s) x0 + s eps,
    # the decoder predicts v = eps - x0, MSE per image, Euler sampler; s from the loader's t by a
    # logit-normal quantile map with SD3's shift (pretrain.model.diffusion.flow_time, docs/train.md)
    objective: Objective = "ddpm"
    flow_logit_mean: float = 0.0  # m in s = sigmoid(m + sd * z) (SD3, Esser et al. 2024 sec. 3.1)
    flow_logit_std: float = 1.0  # sd in the same
    flow_shift: float = 1.0  # s' = shift*s / (1 + (shift-1)*s), in training and on the sampling grid

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model.dim / model.n_heads = {self.head_dim} must be even for RoPE")
        n_kv_heads = self.kv_heads_used
        if n_kv_heads <= 0 or self.n_heads % n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={n_kv_heads}")
        if self.diffusion_weight_cap < 1:
            raise ValueError(f"model.diffusion_weight_cap={self.diffusion_weight_cap} must be >= 1")
        if self.patch_pos_embed != "none" and self.patch_encoder != "linear":
            raise ValueError(f"model.patch_pos_embed={self.patch_pos_embed!r} needs model.patch_encoder=linear "
                             "(the U-Net's convolutions already see where a patch is); set it to none")
        if self.diffusion_prediction == "v" and self.diffusion_loss_weighting != "eps":
            raise ValueError("model.diffusion_prediction=v is already the v-loss: set "
                             "model.diffusion_loss_weighting=eps")
        self._check_objective()
        if self.patch_size not in (1, 2, 4, 8):
            raise ValueError(f"model.patch_size must be 1, 2, 4 or 8, got {self.patch_size}")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"model.latent_size={self.latent_size} must be divisible by model.patch_size={self.patch_size}"
            )
        if self.patch_encoder == "unet" and self.unet_channels and len(self.unet_channels) != self.unet_levels:
            raise ValueError(
                f"model.unet_channels needs log2(patch_size)+1 = {self.unet_levels} entries "
                f"for patch_size={self.patch_size}, got {list(self.unet_channels)}"
            )

    def _check_objective(self) -> None:
        """The flow keys' ranges; the DDPM-only switches keep their defaults under objective=flow."""
        if self.flow_logit_std <= 0:
            raise ValueError(f"model.flow_logit_std must be > 0, got {self.flow_logit_std}")
        if self.flow_shift <= 0:
            raise ValueError(f"model.flow_shift must be > 0, got {self.flow_shift}")
        if self.objective != "flow":
            return
        for key, default in (("diffusion_prediction", "eps"), ("diffusion_loss_weighting", "eps")):
            if getattr(self, key) != default:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is a DDPM switch; model.objective=flow "
                                 f"predicts the velocity with a plain MSE: set model.{key}={default} or "
                                 "model.objective=ddpm")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads_used(self) -> int:
        """Key/value heads the attention really has: n_kv_heads, or n_heads when it is None (no GQA)."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width (Llama: 4096 -> 11008)."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        h = int(2 * 4 * self.dim / 3)
        return self.ffn_multiple_of * math.ceil(h / self.ffn_multiple_of)

    @property
    def patches_per_image(self) -> int:
        """P, the positions of one image's patches (contract.positions)."""
        return positions.patches_per_image(self.latent_size, self.latent_size, self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def unet_levels(self) -> int:
        return int(math.log2(self.patch_size)) + 1

    @property
    def unet_channel_list(self) -> tuple[int, ...]:
        """U-Net widths per level; the default adds about 0.27B parameters, as in the paper."""
        if self.unet_channels:
            return tuple(self.unet_channels)
        return (512, 640, 896, 1344)[-self.unet_levels :]
