"""The run config: one typed dataclass per section, loaded from YAML with CLI dot-overrides.

`load_config("configs/tiny.yaml", ["optim.lr=1e-4"])` gives a `Config`; unknown keys and wrong
types are errors that name the field. `__post_init__` checks say what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.config import DataConfig
from pretrain import configlib

PatchEncoder = Literal["linear", "unet"]
AttentionImpl = Literal["flex", "sdpa"]


@dataclass
class ModelConfig:
    """Transformer backbone, image patching and diffusion settings."""

    dim: int = 768
    n_layers: int = 16
    n_heads: int = 12
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    ffn_dim: int | None = None  # None = Llama rule: 2/3 * 4 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256
    vocab_size: int = 32000  # overwritten from the tokenizer metadata when data.tokenizer is set
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    init_std: float = 0.02
    attention: AttentionImpl = "flex"
    # image path
    latent_channels: int = 8
    latent_size: int = 32  # latent side (256 px image / 8x VAE)
    patch_size: int = 2
    patch_encoder: PatchEncoder = "linear"
    unet_channels: tuple[int, ...] = ()  # per resolution level, len log2(p)+1; () = paper-sized default
    unet_res_blocks: int = 2
    timestep_freq_dim: int = 256
    # diffusion
    diffusion_steps: int = 1000
    diffusion_loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_DDPM

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model.dim / model.n_heads = {self.head_dim} must be even for RoPE")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.kv_heads}")
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
        if self.patches_per_image + 2 > self.max_seq_len:
            raise ValueError(
                f"an image takes {self.patches_per_image} positions + BOI/EOI, more than model.max_seq_len={self.max_seq_len}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
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
        return (self.latent_size // self.patch_size) ** 2

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


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (paper defaults)."""

    lr: float = 3e-4
    min_lr: float = 1.5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 4000
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class TrainConfig:
    """Steps, batch sizing, precision and the seed."""

    steps: int = 250000
    global_batch_size: int = 512  # sequences of data.seq_len positions per optimizer step
    micro_batch_size: int = 1  # sequences per rank per forward pass
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops
    run_dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    """When to save, how many to keep, and how to resume."""

    every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # "auto", "none", or a checkpoint directory


@dataclass
class LoggingConfig:
    """Console and TensorBoard logging."""

    every: int = 10
    val_every: int = 1000
    val_batches: int = 4
    sample_every: int = 5000
    sample_prompts: list[str] = field(
        default_factory=lambda: ["a red circle at the top left", "a blue square at the bottom right",
                                 "a green triangle in the center", "a yellow circle at the top right"]
    )
    sample_steps: int = 50  # DDIM steps for the logged samples (generation default: 250)
    sample_cfg_scale: float = 3.0
    sample_vae: str = ""  # diffusers AutoencoderKL dir to decode samples; "" logs latent channels 0-2
    tensorboard: bool = True
    peak_flops: float | None = None  # per device; None = detect the GPU (unknown: MFU not shown)


@dataclass
class DistributedConfig:
    """DeepSpeed ZeRO-3 settings; `deepspeed` entries are merged into the derived config."""

    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_minutes: int = 30
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def load_config(path: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then YAML at `path` (several: a list or comma-separated, later ones win), then
    `section.key=value` overrides; raises ConfigError naming the file and field."""
    try:
        return configlib.load(Config, path, overrides)
    except ValueError as e:  # __post_init__ checks
        if isinstance(e, configlib.ConfigError):
            raise
        raise configlib.ConfigError(f"{path}: {e}" if path else str(e)) from e


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the merged config as YAML."""
    configlib.dump(cfg, path)
