"""DeepSpeed set-up: batch plan, the DeepSpeed config derived from ours, model, optimizer, engine.

Our `Config` is the one source of truth; the DeepSpeed JSON is derived from it and the user's
`distributed.deepspeed` mapping is merged on top (for knobs we do not expose). The model is
built inside `deepspeed.zero.Init`, so under ZeRO-3 no rank ever holds the whole model.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.utils.checkpoint

from pretrain.config import Config
from pretrain.configlib import deep_merge
from pretrain.model import Transfusion

log = logging.getLogger(__name__)


class BatchSizeError(ValueError):
    """The global batch does not split into micro-batches x accumulation x ranks."""


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch (in sequences) is split."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int


def plan_batch(cfg: Config, world_size: int) -> BatchPlan:
    """global = micro x accumulation x ranks; raise an error that says what to change if it does not divide."""
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_step = m * world_size
    if g <= 0 or m <= 0 or g % per_step:
        lo, hi = max(per_step, (g // per_step) * per_step), (g // per_step + 1) * per_step
        divisors = [d for d in range(1, g + 1) if g % (d * world_size) == 0][:8]
        raise BatchSizeError(
            f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={m} x {world_size} ranks "
            f"= {per_step}. Set train.global_batch_size to {lo} or {hi}, or train.micro_batch_size to one of "
            f"{divisors or 'none (change the number of ranks)'}."
        )
    return BatchPlan(g, m, g // per_step, world_size)


def use_bf16(cfg: Config, on_gpu: bool) -> bool:
    """DeepSpeed's bf16 mode: on GPU under `auto`, or when train.precision=bf16 (bf16_autocast keeps fp32 weights)."""
    if cfg.train.precision == "auto":
        return on_gpu
    return cfg.train.precision == "bf16"


def derive_ds_config(cfg: Config, plan: BatchPlan, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: ZeRO stage, precision, batch plan, clipping, offload, user extras."""
    d = cfg.distributed
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": on_gpu,
        "stage3_gather_16bit_weights_on_model_save": False,  # export streams from the shards instead
    }
    if d.offload_optimizer and on_gpu:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params and on_gpu:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg, on_gpu)},
        "fp16": {"enabled": False},
        # fp32 weights, bf16 matmuls; no module's gradients are reduced in bf16 (empty list)
        "torch_autocast": {"enabled": cfg.train.precision == "bf16_autocast", "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    merged = deep_merge(ds, d.deepspeed)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if merged[key] != ds[key]:
            raise BatchSizeError(
                f"distributed.deepspeed.{key}={merged[key]} conflicts with the batch plan ({ds[key]}); "
                "set train.global_batch_size / train.micro_batch_size instead"
            )
    return merged


def build_model(cfg: Config, ds_config: dict[str, Any]) -> torch.nn.Module:
    """Build the Transfusion model from the seed, partitioned at construction by `zero.Init` under ZeRO-3."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    if ds_config["zero_optimization"]["stage"] == 3:
        # dtype comes from ds_config's bf16 flag; an explicit dtype= is ignored on CPU (DeepSpeed 0.19
        # _set_dtype precedence bug picks bf16 whenever fp16 is unsupported)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = Transfusion(cfg.model)
    else:
        model = Transfusion(cfg.model)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def _checkpointed_forward(forward, *args, **kwargs):
    """Run a block under non-reentrant activation checkpointing (works with ZeRO-3's gather hooks)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block in backward; parameter names stay unchanged."""
    for block in model.layers:
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (ndim >= 2), none on norms, biases and embeddings' 1-d params."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned params are flat; ds_shape is the real one
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: Config, on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed FusedAdam on GPU, DeepSpeedCPUAdam on CPU (or with optimizer offload), else torch AdamW."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if on_gpu and not cfg.distributed.offload_optimizer:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    except Exception as e:  # the op JIT-builds; a machine without a compiler cannot build it
        if cfg.distributed.offload_optimizer and on_gpu:
            raise RuntimeError(f"distributed.offload_optimizer needs DeepSpeedCPUAdam, which failed to build: {e}")
        log.warning("DeepSpeedCPUAdam unavailable (%s); using torch.optim.AdamW", e)
        return torch.optim.AdamW(groups, **kw)


def initial_tensors(path: Path, cfg: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """(our parameter name, tensor) pairs from `train.init_from`: an export of ours or a HF Llama dir.

    An export must have the same model.* keys (model.attention aside) as this run; a HF Llama dir
    must match the backbone shape (pretrain.hf_llama.check_hf_config). Errors name the differing keys.
    """
    from pretrain.config import config_changes, load_config
    from pretrain.export import export_tensors, is_export
    from pretrain.hf_llama import check_hf_config, from_hf, read_hf_dir

    if is_export(path) and (path / "config.yaml").is_file():
        fixed, _ = config_changes(load_config(path / "config.yaml", [f"data.tokenizer={path / 'tokenizer.model'}"]), cfg)
        wrong = {k: v for k, v in fixed.items() if k.startswith("model.")}
        if wrong:
            raise ValueError(f"train.init_from={path}: the export's model differs from this run's: "
                             + "; ".join(f"{k} export {a!r}, run {b!r}" for k, (a, b) in wrong.items()))
        yield from export_tensors(path)
    elif (path / "config.json").is_file():
        hf, read = read_hf_dir(path)
        check_hf_config(hf, cfg.model, f"train.init_from={path}")
        yield from from_hf(read, hf, cfg.model)
    else:
        raise FileNotFoundError(f"train.init_from={path}: neither an export (export.json + config.yaml) nor a Hugging "
                                "Face Llama directory (config.json)")


def load_initial_weights(model: torch.nn.Module, cfg: Config) -> int:
    """Overwrite parameters with `train.init_from`'s tensors, one parameter at a time; returns how many.

    Under ZeRO-3 each parameter is gathered alone (`GatheredParameters(modifier_rank=0)`), written on
    rank 0 and re-partitioned on exit, so no rank holds more than one full tensor beyond its partition.
    Every rank reads the same tensors in the same order (the gathers are collective).
    """
    import deepspeed

    from pretrain.hf_llama import copy_into

    params = dict(model.named_parameters())
    n = 0
    for name, t in initial_tensors(Path(cfg.train.init_from), cfg):
        if name not in params:
            raise ValueError(f"train.init_from={cfg.train.init_from}: tensor {name} is not a parameter of this model")
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
            copy_into(params[name], t, name)
        n += 1
    return n


def build_engine(cfg: Config, plan: BatchPlan, init_weights: bool = True, load_universal: bool = False):
    """Model (+ `train.init_from` weights unless `init_weights` is False, e.g. when a checkpoint follows)
    + optimizer wrapped by `deepspeed.initialize`; returns (engine, ds_config).

    `load_universal`: the checkpoint to resume is a DeepSpeed universal one (another world size saved it).
    """
    import deepspeed

    on_gpu = torch.cuda.is_available()
    ds_config = derive_ds_config(cfg, plan, on_gpu)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    model = build_model(cfg, ds_config)
    if init_weights and cfg.train.init_from:
        n = load_initial_weights(model, cfg)
        log.info("initialised %d parameter tensors from train.init_from=%s (fresh optimizer and schedule)",
                 n, cfg.train.init_from)
    optimizer = build_optimizer(model, cfg, on_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config
