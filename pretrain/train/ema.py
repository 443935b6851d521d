"""EMA of the weights for sampling, kept where ZeRO-3 keeps the weights: each rank holds the fp32
EMA of its own partition of every parameter, so the EMA costs 4 bytes per parameter / world size
per rank and no communication.

    ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t,   d_t = min(decay, (1 + t) / (10 + t))

(the decay warm-up of tf.train.ExponentialMovingAverage with num_updates; Polyak & Juditsky 1992).
Under ZeRO-3 a parameter's partition is `param.ds_tensor`: the flattened parameter cut into
`ceil(numel / world)` elements per rank in rank order, the last one zero-padded (DeepSpeed
`partition_parameters.py`, `_partition_param`); without ZeRO-3 it is the whole parameter.

On disk: `ema_rank{r}.safetensors` in the checkpoint directory, one per rank, holding that rank's
partitions under the parameter names and each full shape in the metadata; `load_full` joins them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch

from pretrain.config import check_ema_decay

FILE = "ema_rank{rank}.safetensors"


def local_partition(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's slice of `p`, flat: the ZeRO-3 partition `p.ds_tensor`, else the whole parameter."""
    t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
    return t.view(-1)


def master_partition(p: torch.nn.Parameter) -> torch.Tensor:
    """`local_partition(p)` in fp32 from the optimizer's fp32 master weights, flat, shape (partition numel,).

    Under train.precision=bf16 the module's weights are bf16 copies; the optimizer keeps the fp32 master
    weights (what the update is applied to, and what a raw export consolidates). ZeRO-3: this rank's fp32
    partition (DeepSpeed `get_local_fp32_param`, a view; no communication). ZeRO-1/2 and bf16 at stage 0:
    the whole fp32 parameter joined from every rank's fragment (`safe_get_full_fp32_param`, an all-reduce:
    collective, every rank calls it in the same order). fp32 weights are their own master: `p` itself.
    """
    t = local_partition(p)
    if t.dtype == torch.float32:
        return t
    if hasattr(p, "ds_id") and getattr(p, "_z3_optimizer", None) is not None:
        return p._z3_optimizer.get_local_fp32_param(p).view(-1)
    if getattr(p, "_hp_mapping", None) is not None or hasattr(p, "get_full_hp_param"):
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p)
        if full is not None:
            return full.view(-1)
    return t.float()


def full_shape(p: torch.nn.Parameter) -> list[int]:
    """The parameter's whole shape (ZeRO-3 keeps it in `ds_shape` while `p.data` is empty)."""
    return list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)


class ShardedEMA:
    """fp32 EMA of this rank's partitions of `named_params` (name -> parameter); `update` after each applied step.

    Kept from the fp32 master weights (`master_partition`), so under train.precision=bf16 the EMA, and an
    fp32 export of it, is not an average of bf16-rounded copies. Build it after `deepspeed.initialize`."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float) -> None:
        check_ema_decay(decay, enabled=True)
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {n: master_partition(p).detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    def current_decay(self) -> float:
        """d_t of the next update (module docstring)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow towards the current weights (call after an optimizer step that was applied)."""
        d = self.current_decay()
        for n, p in self.params.items():
            self.shadow[n].lerp_(master_partition(p).float(), 1.0 - d)
        self.updates += 1

    def save(self, ckpt_dir: Path, rank: int) -> Path:
        """Write this rank's shadows to CKPT/ema_rank{rank}.safetensors (full shapes and update count in the
        metadata)."""
        from safetensors.torch import save_file

        meta = {"shapes": json.dumps({n: full_shape(p) for n, p in self.params.items()}),
                "updates": str(self.updates), "decay": str(self.decay)}
        path = Path(ckpt_dir) / FILE.format(rank=rank)
        save_file({n: s.contiguous() for n, s in self.shadow.items()}, str(path), metadata=meta)
        return path

    def load(self, ckpt_dir: Path, rank: int, world_size: int) -> bool:
        """Restore this rank's shadows from CKPT/ema_rank*.safetensors; False when the checkpoint has none.

        Saved by the same world size: each rank reads its own file. Saved by another: the whole EMA is
        joined from every file (`iter_full`) and this rank's ZeRO-3 slice cut from it (`partition_of`).
        Raises ValueError when a parameter is missing or its partition does not fit this rank.
        """
        ckpt_dir = Path(ckpt_dir)
        if not has_ema(ckpt_dir):
            return False
        if _saved_ranks(ckpt_dir) == world_size:
            self._load_own(ckpt_dir / FILE.format(rank=rank))
        else:
            full = dict(iter_full(ckpt_dir))
            missing = set(self.shadow) - set(full)
            if missing:
                raise ValueError(f"{ckpt_dir}: no EMA for parameters {sorted(missing)[:5]}; was it saved by another "
                                 f"model?")
            for n, s in self.shadow.items():
                s.copy_(partition_of(full[n], rank, world_size, s.numel()))
            self.updates = _updates(ckpt_dir / FILE.format(rank=0))
        return True

    def _load_own(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            missing = set(self.shadow) - set(f.keys())
            if missing:
                raise ValueError(f"{path}: no EMA for parameters {sorted(missing)[:5]}; was it saved by another model?")
            for n in self.shadow:
                t = f.get_tensor(n)
                if t.shape != self.shadow[n].shape:
                    raise ValueError(f"{path}: EMA of {n} has {tuple(t.shape)} elements, this rank holds "
                                     f"{tuple(self.shadow[n].shape)}; was it saved by another model?")
                self.shadow[n].copy_(t)
        self.updates = _updates(path)


def partition_of(full: torch.Tensor, rank: int, world_size: int, numel: int) -> torch.Tensor:
    """Rank `rank`'s flat ZeRO-3 slice of `full`: `numel` elements from rank * numel, zero past the end
    (DeepSpeed `_partition_param`); `numel == full.numel()` without partitioning. Shape (numel,)."""
    flat = full.reshape(-1).float()
    if numel == flat.numel():
        return flat
    out = torch.zeros(numel)
    part = flat[rank * numel : (rank + 1) * numel]
    out[: part.numel()] = part
    return out


def _saved_ranks(ckpt_dir: Path) -> int:
    return len(list(Path(ckpt_dir).glob("ema_rank*.safetensors")))


def _updates(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["updates"])


def has_ema(ckpt_dir: Path) -> bool:
    """Whether checkpoint directory `ckpt_dir` holds an EMA (rank 0's file)."""
    return (Path(ckpt_dir) / FILE.format(rank=0)).is_file()


def load_full(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The whole EMA weights (name -> fp32 tensor of its full shape) from every rank's file."""
    return dict(iter_full(ckpt_dir))


class LazyFull:
    """One parameter's whole EMA, read from every rank's file only when `contiguous()` is called
    (`.shape` first: what the export's streaming writer plans a shard from)."""

    def __init__(self, name: str, shape: list[int], handles: list, ckpt_dir: Path) -> None:
        self.name, self.shape, self.handles, self.ckpt_dir = name, tuple(shape), handles, ckpt_dir

    def contiguous(self) -> torch.Tensor:
        """The full fp32 tensor, shape `self.shape`; ValueError when the partitions do not add up."""
        numel, world = math.prod(self.shape), len(self.handles)
        parts = [h.get_tensor(self.name) for h in self.handles]
        if parts[0].numel() != numel and any(p.numel() != math.ceil(numel / world) for p in parts):
            raise ValueError(f"{self.ckpt_dir}: EMA partitions of {self.name} ({[p.numel() for p in parts]}) do not "
                             f"split {numel} elements over {world} ranks")
        whole = parts[0].numel() == numel  # no ZeRO-3 (or one rank): every rank holds the whole parameter
        flat = parts[0] if whole else torch.cat(parts)
        return flat[:numel].view(self.shape)


def iter_lazy(ckpt_dir: Path) -> Iterator[tuple[str, LazyFull]]:
    """(name, LazyFull) per parameter: the export materialises one tensor at a time.

    Raises FileNotFoundError naming a missing rank file.
    """
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("ema_rank*.safetensors"), key=lambda f: int(f.stem.removeprefix("ema_rank")))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no ema_rank*.safetensors (was train.ema_decay set?)")
    for r, f in enumerate(files):
        if f.name != FILE.format(rank=r):
            raise FileNotFoundError(f"{ckpt_dir / FILE.format(rank=r)} is missing ({len(files)} EMA files found)")
    handles = [safe_open(str(f), "pt") for f in files]
    for n, shape in json.loads(handles[0].metadata()["shapes"]).items():
        yield n, LazyFull(n, shape, handles, ckpt_dir)


def iter_full(ckpt_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 EMA tensor), one parameter at a time.

    Raises FileNotFoundError naming a missing rank file, ValueError when the partitions do not add up.
    """
    for n, lazy in iter_lazy(ckpt_dir):
        yield n, lazy.contiguous()
