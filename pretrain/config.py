"""The run config: the model's and the data's sections plus the trainer's, loaded from YAML with CLI dot-overrides.

`load_config("configs/tiny.yaml", ["optim.lr=1e-4"])` gives a `Config`; unknown keys and wrong
types are errors that name the field. `__post_init__` checks say what to change. The sections
live with their owners: `model` is `pretrain.model.config.ModelConfig`, `data` is
`data_pipeline.config.DataConfig`; this module composes them and adds the trainer's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from contract.fileio import write_atomic
from contract.positions import pair_positions
from contract.special_ids import load_special_ids
from data_pipeline.config import DataConfig
from pretrain import configlib
from pretrain.model.config import ModelConfig, Sampler, check_sampler

__all__ = ["CheckpointConfig", "Config", "DataConfig", "DistributedConfig", "LoggingConfig", "ModelConfig",
           "OptimConfig", "TrainConfig", "load_config", "save_config"]

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
    # auto: bf16 on GPU; on CPU bf16_autocast where the CPU has native bf16 (AVX-512 BF16 or AMX), else fp32
    # (pretrain.plan.batch.effective_precision). bf16: DeepSpeed's bf16 mode (bf16 weights, fp32 master copy).
    # bf16_autocast: fp32 weights and gradients, torch.autocast(bf16) around the forward (DeepSpeed's
    # torch_autocast): matmuls in bf16, attention in fp32 on CPU (its bf16 backward is slower there)
    precision: Literal["auto", "bf16", "bf16_autocast", "fp32"] = "auto"
    activation_checkpointing: bool = False
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops
    run_dir: str = "runs/default"
    dry_run: bool = False  # check config, batch plan, data, model and memory plan, then exit (pretrain/plan/dry_run.py)
    # start from weights (fresh optimizer and schedule): an export dir, or a Hugging Face Llama dir for
    # the text backbone; ignored when the run resumes from its own checkpoint
    init_from: str = ""
    # EMA of the weights for sampling and export (pretrain/train/ema.py), e.g. 0.9999 for long runs; 0 = off.
    # Kept per rank on its ZeRO-3 partition; export writes it unless --weights raw.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        check_ema_decay(self.ema_decay)


def check_ema_decay(decay: float, enabled: bool = False) -> None:
    """The one range check of train.ema_decay: [0, 1), 0 = no EMA; enabled=True (an EMA being built) excludes 0.

    Raises ValueError naming the key and a usual value."""
    if not 0.0 <= decay < 1.0 or (enabled and decay == 0.0):
        raise ValueError(f"train.ema_decay={decay} must lie in [0, 1): 0 = no EMA"
                         + (" (and an EMA is being built)" if enabled else "") + ", e.g. 0.999")


@dataclass
class CheckpointConfig:
    """When to save, how many to keep, and how to resume."""

    every: int | None = None  # None = auto: every train.steps // 5 steps (AUTO_EVERY); 0 = only at the end
    keep_last: int = 3
    resume: str = "auto"  # "auto", "none", or a checkpoint directory


@dataclass
class LoggingConfig:
    """Console and TensorBoard logging."""

    moved: ClassVar[dict[str, tuple[str, str]]] = {
        "sample_vae": ("data.vae", "the VAE defines the latent space of the data; export ships it with the model"),
    }

    every: int = 10
    val_every: int | None = None  # None = auto: every train.steps // 10 steps; 0 = never
    val_batches: int = 4
    sample_every: int | None = None  # None = auto: every train.steps // 4 steps; 0 = never
    sample_prompts: list[str] = field(
        default_factory=lambda: ["a red circle at the top left", "a blue square at the bottom right",
                                 "a green triangle in the center", "a yellow circle at the top right"]
    )
    # sampler of the logged samples, of the evaluation and (recorded in the export) of generation; None = the
    # objective's own (pretrain.model.config.default_sampler): DDPM ancestral (the paper's) for ddpm, Euler for
    # flow. The deterministic DDIM drew the demo model's images with 20-30 points less colour and shape
    # (docs/quality.md)
    sample_sampler: Sampler | None = None
    sample_steps: int = 100
    sample_cfg_scale: float = 3.0
    # synthetic-task evaluation (pretrain.evaluation.evaluate) every N steps; 0 = never; needs data.vae
    eval_every: int = 0
    tensorboard: bool = True
    peak_flops: float | None = None  # per device; None = detect the GPU (unknown: MFU not shown)
    # step-time breakdown: events = CUDA events, one wait per step (no effect on the step); sync = the old
    # timer, torch.cuda.synchronize() around every phase (serialises the step; for comparison). CPU: same
    timer: Literal["events", "sync"] = "events"


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

    def __post_init__(self) -> None:
        resolve_cadence(self)
        P = self.model.patches_per_image
        if pair_positions(P) > self.data.seq_len:  # a caption-image pair: BOS, BOI, P patches, EOI, EOS
            raise ValueError(f"an image takes {P} patches + BOS/BOI/EOI/EOS = {pair_positions(P)} positions, more than "
                             f"data.seq_len={self.data.seq_len}; raise data.seq_len or model.patch_size")
        if self.logging.sample_sampler is not None:
            check_sampler(self.model.objective, self.logging.sample_sampler, "logging.sample_sampler")


#: the cadences that follow train.steps unless set: key -> how many times a run does it (every steps // N)
AUTO_EVERY = {"checkpoint.every": 5, "logging.val_every": 10, "logging.sample_every": 4}


def resolve_cadence(cfg: Config) -> None:
    """Set each AUTO_EVERY key left at None to max(1, train.steps // N): a 50-step run checkpoints every 10
    steps, a 3,000-step run every 600, whatever the config was written for. Raises ValueError for a negative one."""
    for key, times in AUTO_EVERY.items():
        section, name = key.split(".")
        sec = getattr(cfg, section)
        value = getattr(sec, name)
        if value is None:
            setattr(sec, name, max(1, cfg.train.steps // times))
        elif value < 0:
            raise ValueError(f"{key}={value}: must be >= 0 (0 = never), or null to follow train.steps (every "
                             f"train.steps // {times})")


def load_config(path: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then YAML at `path` (several: a list or comma-separated, later ones win), then
    `section.key=value` overrides, then `model.vocab_size` from the tokenizer (`set_vocab_size`).

    Every entry point loads its config here, so all see the same vocabulary. Raises ConfigError
    naming the file and field.
    """
    try:
        data = configlib.merged_data(Config, path, overrides)
        cfg = configlib.load_data(Config, data, path)
        return set_vocab_size(cfg, explicit="vocab_size" in data.get("model", {}))
    except ValueError as e:  # __post_init__ checks
        if isinstance(e, configlib.ConfigError):
            raise
        raise configlib.ConfigError(f"{path}: {e}" if path else str(e)) from e


def set_vocab_size(cfg: Config, explicit: bool) -> Config:
    """`model.vocab_size` = the tokenizer's (pieces + BOI/EOI/PAD, from `<data.tokenizer>.json`) when data.tokenizer is
    set.

    The tokenizer is the one source of the vocabulary; an explicitly configured model.vocab_size that
    disagrees with it is an error (drop the key). Without a tokenizer the configured value stays.
    Raises ConfigError when the tokenizer metadata cannot be read.
    """
    if not cfg.data.tokenizer:
        return cfg
    try:
        n = load_special_ids(cfg.data.tokenizer).vocab_size
    except (OSError, ValueError) as e:
        raise configlib.ConfigError(f"data.tokenizer={cfg.data.tokenizer}: {e} (the model's vocab_size comes from it; "
                                    "to count parameters without a tokenizer set data.tokenizer= "
                                    "model.vocab_size=N)") from e
    if explicit and cfg.model.vocab_size != n:
        raise configlib.ConfigError(f"model.vocab_size={cfg.model.vocab_size} disagrees with data.tokenizer "
                                    f"({cfg.data.tokenizer}: {n} ids incl. BOI/EOI/PAD); drop model.vocab_size, "
                                    "the tokenizer sets it")
    cfg.model.vocab_size = n
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the merged config as YAML (via a temp file and a rename: never a half-written file)."""
    write_atomic(path, configlib.dumps(cfg))


#: Keys a resumed run may not change: the model's shape and what decides which sequences come next
#: (the loader's saved position is only meaningful for the same streams, order, sequence length,
#: global batch and seed). `model.attention` picks a kernel for the same weights, so it may change.
RESUME_FIXED = ("model.", "data.seq_len", "data.streams", "data.shuffle", "data.num_canonical_nodes",
                "data.image_position_share", "train.global_batch_size", "train.seed")
RESUME_FREE = ("model.attention",)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    return {prefix.rstrip("."): d}


def config_changes(saved: Config, new: Config) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Keys that differ between a checkpoint's config and this launch's: (fixed, free), each key -> (saved, new).

    A non-empty `fixed` means the run cannot resume (see RESUME_FIXED); `free` keys (schedule,
    logging, workers...) may change and should be logged.
    """
    a, b = _flatten(configlib.to_dict(saved)), _flatten(configlib.to_dict(new))
    fixed, free = {}, {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        is_fixed = any(key == f or (f.endswith(".") and key.startswith(f)) or key.startswith(f + ".")
                       for f in RESUME_FIXED) and key not in RESUME_FREE
        (fixed if is_fixed else free)[key] = (a.get(key), b.get(key))
    return fixed, free
