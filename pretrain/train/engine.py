"""DeepSpeed set-up: model, optimizer, engine, from the batch plan and DeepSpeed config of `pretrain.plan.batch`.

The model is built inside `deepspeed.zero.Init`, so under ZeRO-3 no rank ever holds the whole model.
`train.init_from` weights come in through a reader the entry point passes (`pretrain.train.hooks`),
so this room never imports the export or Hugging Face code.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint

from pretrain.config import Config
from pretrain.model import Transfusion
from pretrain.plan.batch import BatchPlan, derive_ds_config, effective_precision

log = logging.getLogger(__name__)


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
    """Weight decay on every parameter of ndim >= 2 (the linear weights and the 2-D embedding table), none on
    1-d ones (norm scales, biases)."""
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


def apply_optim_config(optimizer: Any, cfg: Config, lr: float) -> list[dict[str, Any]]:
    """Write this launch's optim.* into every parameter group of `optimizer` (a DeepSpeed engine's optimizer or a
    torch one) and return the groups' settings as the optimizer now holds them: [{lr, betas, eps, weight_decay}].

    A DeepSpeed checkpoint load restores the saved groups' betas, eps and weight decay (torch
    `Optimizer.load_state_dict`; the universal load copies group 0's into all, stage3.py
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`), so a resume calls this after loading:
    optim.* changed on resume then takes effect on every resume path. Group order is `param_groups`'s:
    [decay (optim.weight_decay), no decay (0.0)]. Raises ValueError on any other number of groups.
    """
    o = cfg.optim
    groups = optimizer.param_groups
    if len(groups) != 2:
        raise ValueError(f"expected the 2 parameter groups of pretrain.train.engine.param_groups, found {len(groups)}")
    for g, wd in zip(groups, (o.weight_decay, 0.0)):
        g["lr"], g["betas"], g["eps"], g["weight_decay"] = lr, tuple(o.betas), o.eps, wd
    return [{"lr": g["lr"], "betas": list(g["betas"]), "eps": g["eps"], "weight_decay": g["weight_decay"]}
            for g in groups]


def build_optimizer(model: torch.nn.Module, cfg: Config, on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed FusedAdam on GPU, DeepSpeedCPUAdam on CPU (or with optimizer offload), else torch AdamW."""
    from pretrain.train.distributed import use_env_torch_extensions

    use_env_torch_extensions()  # cpu_adam is built and loaded from this environment's own directory
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


InitialTensors = Callable[[Path, Config], Iterator[tuple[str, torch.Tensor]]]


def copy_into(param: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """param[:len(src)] = src (all of it when shapes agree; a smaller vocabulary fills the first rows).

    Raises ValueError naming `name` on any other shape mismatch.
    """
    if src.shape[1:] != param.shape[1:] or src.shape[0] > param.shape[0]:
        raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not fit ours {tuple(param.shape)}")
    param.data[: src.shape[0]].copy_(src.to(param.dtype))


def load_initial_weights(model: torch.nn.Module, cfg: Config, read: InitialTensors) -> int:
    """Overwrite parameters with `train.init_from`'s tensors, one parameter at a time; returns how many.

    Under ZeRO-3 each parameter is gathered alone (`GatheredParameters(modifier_rank=0)`), written on
    rank 0 and re-partitioned on exit, so no rank holds more than one full tensor beyond its partition.
    Every rank reads the same tensors in the same order (the gathers are collective).
    """
    import deepspeed

    params = dict(model.named_parameters())
    n = 0
    for name, t in read(Path(cfg.train.init_from), cfg):
        if name not in params:
            raise ValueError(f"train.init_from={cfg.train.init_from}: tensor {name} is not a parameter of this model")
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
            copy_into(params[name], t, name)
        n += 1
    return n


def build_engine(cfg: Config, plan: BatchPlan, init_weights: InitialTensors | None = None,
                 load_universal: bool = False):
    """Model (+ `train.init_from` weights read by `init_weights`; None, e.g. when a checkpoint follows: none)
    + optimizer wrapped by `deepspeed.initialize`; returns (engine, ds_config).

    `load_universal`: the checkpoint to resume is a DeepSpeed universal one (another world size saved it).
    """
    import deepspeed

    on_gpu = torch.cuda.is_available()
    ds_config = derive_ds_config(cfg, plan, on_gpu)
    if cfg.train.precision == "auto":
        log.info("train.precision=auto: %s on this %s", effective_precision(cfg, on_gpu),
                 "GPU" if on_gpu else "CPU (bf16_autocast only where it has native bf16: AVX-512 BF16 or AMX)")
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    model = build_model(cfg, ds_config)
    if init_weights is not None and cfg.train.init_from:
        n = load_initial_weights(model, cfg, init_weights)
        log.info("initialised %d parameter tensors from train.init_from=%s (fresh optimizer and schedule)",
                 n, cfg.train.init_from)
    optimizer = build_optimizer(model, cfg, on_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config
