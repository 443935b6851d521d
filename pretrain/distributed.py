"""Launcher detection and process-group set-up: one code path under every launcher.

`deepspeed`, `torchrun` and `accelerate launch` export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*;
plain `srun` only exports SLURM_* variables, so we derive the torch ones from them (streaming
and DeepSpeed both read the torch names). A bare `python -m pretrain.train` is a world of one.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Mapping, MutableMapping

import torch

#: exit code of a run that stopped on SIGUSR1/SIGTERM after saving (EX_TEMPFAIL): requeue it.
EXIT_REQUEUE = 75


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and which launcher started it."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed" | "torchrun" | "accelerate" | "srun" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist ("gpu[01-03,07],login1") into host names, in order."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return hosts


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks on this node from SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE ("2(x3),1")."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_TASKS_PER_NODE", "")
    first = spec.split(",")[0]
    m = re.match(r"(\d+)", first)
    return int(m.group(1)) if m else int(env.get("SLURM_NTASKS", "1"))


def _launcher_name(env: Mapping[str, str]) -> str:
    """Name the launcher from the variables it leaves behind (for logs only)."""
    if any(k.startswith("ACCELERATE_") for k in env):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env and "DS_ACCELERATOR" not in env and "CROSS_RANK" not in env:
        return "torchrun"
    if "CROSS_RANK" in env or "DS_ACCELERATOR" in env or "PDSH_RCMD_TYPE" in env:
        return "deepspeed"
    if "SLURM_PROCID" in env:
        return "srun"  # cluster/srun_task.sh exported RANK & co. from Slurm's variables
    return "torchrun"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def detect_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables: torch-style (RANK...) first, then Slurm, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher=_launcher_name(env),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=int(env["SLURM_NTASKS"]),
            local_world_size=_slurm_tasks_on_node(env),
            master_addr=env.get("MASTER_ADDR") or nodes[0],
            master_port=int(env.get("MASTER_PORT") or 20000 + job % 20000),
            launcher="srun",
        )
    return DistEnv(0, 0, 1, 1, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT") or _free_port()), "single")


def export_env(d: DistEnv, env: MutableMapping[str, str] | None = None) -> None:
    """Write the torch-style variables that DeepSpeed, torch.distributed and streaming read."""
    env = os.environ if env is None else env
    env.update(
        RANK=str(d.rank),
        LOCAL_RANK=str(d.local_rank),
        WORLD_SIZE=str(d.world_size),
        LOCAL_WORLD_SIZE=str(d.local_world_size),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(d.master_port),
    )


def resolve_backend(backend: str) -> str:
    """"auto" means nccl when CUDA is there, gloo otherwise (CPU runs, tests)."""
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Detect the launcher, export the torch variables, pick the device and join the process group."""
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
    deepspeed.init_distributed(
        dist_backend=resolve_backend(backend),
        auto_mpi_discovery=False,
        timeout=timedelta(minutes=timeout_minutes),
        rank=d.rank,
        world_size=d.world_size,
    )
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
