"""Process-group set-up and collectives: one code path under every launcher.

Where this process sits in the job comes from `contract.dist_env` (torch-style variables from
deepspeed/torchrun/accelerate, or SLURM_* under plain `srun`); `init_distributed` exports the
torch names (streaming and DeepSpeed read them) and joins the group. A bare `python -m
pretrain.train` is a world of one.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch

from contract.dist_env import DistEnv, detect_env, export_env

#: exit code of a run that stopped on SIGUSR1/SIGTERM after saving (EX_TEMPFAIL): requeue it.
EXIT_REQUEUE = 75


def torch_extensions_dir() -> Path | None:
    """Where this environment keeps DeepSpeed's JIT-built ops: PREFIX/torch_extensions (PREFIX = sys.prefix, the
    venv), or None when the prefix is not writable (a system Python: torch's default ~/.cache applies).

    torch builds ops into $TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions shared by every venv of
    the user: two checkouts or venvs (other torch/DeepSpeed builds) rebuilt the op for each other at every
    launch and raced when launched together (torch.utils.cpp_extension._get_build_directory)."""
    import sys

    prefix = Path(sys.prefix)
    return prefix / "torch_extensions" if os.access(prefix, os.W_OK) else None


def use_env_torch_extensions() -> str | None:
    """Set TORCH_EXTENSIONS_DIR to `torch_extensions_dir()` unless the user set it; returns the value in force.

    Called before any DeepSpeed op loads (`init_distributed`, `pretrain.train.engine.build_optimizer`,
    ci/build_deepspeed_ops.py), so `make install` builds where the trainer loads."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        d = torch_extensions_dir()
        if d is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = str(d)
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def resolve_backend(backend: str) -> str:
    """"auto" means nccl when CUDA is there, gloo otherwise (CPU runs, tests)."""
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Detect the launcher, export the torch variables, pick the device and join the process group."""
    use_env_torch_extensions()  # before DeepSpeed loads its CPU ops (shm_comm here, cpu_adam later)
    import deepspeed

    d = detect_env()
    export_env(d)
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    else:
        remove_shm_buffer(d)  # a killed job with the same address:port left it; reusing it corrupts all-reduces
        # DeepSpeed's CPU accelerator answers device_count() from LOCAL_SIZE, else by running `numactl`
        # in a subprocess on every ZeRO-3 gradient reduction. That fork raced the data workers forked by
        # the prefetch thread (a worker inherited the exec pipe and the step hung forever).
        os.environ.setdefault("LOCAL_SIZE", str(d.local_world_size))
    try:
        deepspeed.init_distributed(
            dist_backend=resolve_backend(backend),
            auto_mpi_discovery=False,
            timeout=timedelta(minutes=timeout_minutes),
            rank=d.rank,
            world_size=d.world_size,
        )
    except BaseException:
        remove_shm_buffer(d)  # the CPU backend creates it while joining; a failed join must not leave it
        raise
    return d


def shm_buffer_path(d: DistEnv) -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce creates for this rank (named by uid, master address, port)."""
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{d.master_addr}_{d.master_port}_{d.rank}")


def remove_shm_buffer(d: DistEnv) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment (at start: a dead job's; at exit: ours)."""
    try:
        shm_buffer_path(d).unlink(missing_ok=True)
    except OSError:
        pass


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64 keeps integer counts exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def device() -> torch.device:
    """This rank's compute device: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()
