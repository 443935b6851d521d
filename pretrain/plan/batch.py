"""The batch plan and the DeepSpeed config derived from ours: the one home of both, for the trainer and the planners.

Our `Config` is the one source of truth; the DeepSpeed JSON is derived from it and the user's
`distributed.deepspeed` mapping is merged on top (for knobs we do not expose). Importing this
module does not import DeepSpeed, so the estimate and the dry run use it without a GPU stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pretrain.config import Config
from pretrain.configlib import deep_merge


#: DeepSpeed's ZeRO defaults for the knobs the planners read when the derived config leaves them unset
#: (deepspeed.runtime.zero.config.DeepSpeedZeroConfig; tests/test_estimate.py checks them against the
#: installed DeepSpeed). Elements, not bytes.
DEEPSPEED_ZERO_DEFAULTS: dict[str, int] = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


def zero_setting(zero: dict[str, Any], key: str) -> int:
    """`key` of a DeepSpeed `zero_optimization` mapping, or DeepSpeed's default (DEEPSPEED_ZERO_DEFAULTS)."""
    return int(zero.get(key, DEEPSPEED_ZERO_DEFAULTS[key]))


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
        divisors = micro_batch_sizes(g, world_size)[:8]
        raise BatchSizeError(
            f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={m} x {world_size} ranks "
            f"= {per_step}. Set train.global_batch_size to {lo} or {hi}, or train.micro_batch_size to one of "
            f"{divisors or 'none (change the number of ranks)'}."
        )
    return BatchPlan(g, m, g // per_step, world_size)


def micro_batch_sizes(global_batch: int, world_size: int) -> list[int]:
    """Every micro-batch size m with global_batch = m x accumulation x world_size (ascending; [] if none)."""
    return [m for m in range(1, global_batch + 1) if global_batch % (m * world_size) == 0]


def weight_bytes(cfg: Config) -> int:
    """Bytes per parameter and gradient element on a GPU: 2 under DeepSpeed's bf16 mode (`use_bf16`), else 4
    (fp32, and bf16_autocast: fp32 weights and gradients, bf16 matmuls)."""
    return 2 if use_bf16(cfg, on_gpu=True) else 4


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX tiles), as PyTorch's own CPU checks say
    (`torch.cpu._is_avx512_bf16_supported`, `torch.cpu._is_amx_tile_supported`; False where torch lacks them).

    Without them torch.autocast(bf16) on CPU is slow: the demo's 2-rank step took 1.10 s under bf16_autocast
    against 0.174 s in fp32 on an AVX2-only AMD EPYC, where the machine of docs/quality.md sec. 17 gained from
    it (AVX512-BF16: 0.078 s with bf16_autocast and sdpa_varlen against 0.099 s without).
    """
    import torch

    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def effective_precision(cfg: Config, on_gpu: bool) -> str:
    """train.precision with `auto` resolved: "bf16" on GPU; on CPU "bf16_autocast" where the CPU has native
    bf16 (`cpu_has_native_bf16`), else "fp32". A set value is returned as it is."""
    p = cfg.train.precision
    if p != "auto":
        return p
    if on_gpu:
        return "bf16"
    return "bf16_autocast" if cpu_has_native_bf16() else "fp32"


def use_bf16(cfg: Config, on_gpu: bool) -> bool:
    """DeepSpeed's bf16 mode: on GPU under `auto`, or when train.precision=bf16 (bf16_autocast keeps fp32 weights)."""
    return effective_precision(cfg, on_gpu) == "bf16"


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
        "torch_autocast": {"enabled": effective_precision(cfg, on_gpu) == "bf16_autocast", "dtype": "bfloat16",
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
