"""Where this process sits in the job: rank, local rank, world size, master address, launcher.

The one implementation of rank detection, used by the trainer (`pretrain.train.distributed`), precompute
and every Slurm task (`cluster/srun_task.sh` runs `python -m contract.dist_env CMD...`, which exports
the torch-style variables and execs CMD). `deepspeed`, `torchrun` and `accelerate launch` export
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; plain `srun` only SLURM_* variables, from which the torch ones
are derived. Standard library only (no torch): it runs before every Slurm task.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, MutableMapping


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

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world size {self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} is outside [0, local world size {self.local_world_size})")


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


def tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's compressed per-node task counts: "4(x2),3" -> [4, 4, 3]; "2,1" -> [2, 1].

    Raises ValueError naming the spec when it is not of that form (SLURM_TASKS_PER_NODE's format).
    """
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r}: expected counts like '4(x2),3'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _slurm_node_tasks(env: Mapping[str, str], rank: int) -> int:
    """Tasks of this job step on this task's node (SLURM_STEP_TASKS_PER_NODE, else SLURM_TASKS_PER_NODE).

    The node is SLURM_NODEID; without it, the node whose block of ranks holds `rank` (Slurm's
    default block distribution).
    """
    counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
    if env.get("SLURM_NODEID"):
        node = int(env["SLURM_NODEID"])
    else:
        ends = [sum(counts[: i + 1]) for i in range(len(counts))]
        node = next((i for i, e in enumerate(ends) if rank < e), len(counts) - 1)
    if node >= len(counts):
        raise ValueError(f"SLURM_NODEID={node} but the step's tasks per node {counts} list {len(counts)} nodes")
    return counts[node]


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it; another process may take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def from_torch(env: Mapping[str, str]) -> DistEnv:
    """The torch-style variables a launcher (deepspeed, torchrun, accelerate, srun_task.sh) exported."""
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


def node_addr(node: str, path: str | None = None) -> str:
    """The address other nodes reach Slurm node `node` at: its NodeAddr (`scontrol show node`), else `node`.

    Node names need not resolve (docs: DESIGN §6, a cluster of network namespaces), so the address
    slurm.conf gives is the one to dial; without scontrol (on `path`, default PATH) or a NodeAddr, the
    name itself. The same rule as cluster/common.sh's tf_rendezvous (tests/test_slurm_scripts.py
    checks that both give the same master).
    """
    exe = shutil.which("scontrol", path=path)
    if exe is None:
        return node
    try:
        out = subprocess.run([exe, "show", "node", node], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return node
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else node


def from_slurm(env: Mapping[str, str]) -> DistEnv:
    """A Slurm task's place from SLURM_* variables (of the job step when set).

    The master is MASTER_ADDR, else the first node's NodeAddr (`node_addr`, as cluster/common.sh's
    tf_rendezvous takes it); the port is MASTER_PORT, else 20000 + job id mod 20000 (as tf_rendezvous).
    """
    rank = int(env["SLURM_PROCID"])
    nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1")
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    return DistEnv(
        rank=rank,
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
        local_world_size=_slurm_node_tasks(env, rank),
        master_addr=env.get("MASTER_ADDR") or node_addr(nodes[0], env.get("PATH")),
        master_port=int(env.get("MASTER_PORT") or 20000 + job % 20000),
        launcher="srun",
    )


def detect_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Torch-style variables (RANK, WORLD_SIZE, ...) first, then Slurm's, else a single process.

    Raises ValueError when the variables contradict each other (a rank outside the world).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return from_torch(env)
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
        return from_slurm(env)
    return DistEnv(0, 0, 1, 1, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT") or free_port()),
                   "single")


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


def main(argv: list[str] | None = None) -> None:
    """`python -m contract.dist_env CMD [ARGS...]` inside a Slurm task: export RANK & co. from SLURM_*, exec CMD.

    TRANSFUSION_TASK_VERBOSE=1 prints one line per task (rank, node, master) to stderr.
    """
    cmd = sys.argv[1:] if argv is None else argv
    if not cmd:
        sys.exit("usage: python -m contract.dist_env CMD [ARGS...]  (inside a Slurm task)")
    try:
        d = from_slurm(os.environ)
    except (KeyError, ValueError) as e:
        sys.exit(f"contract.dist_env: cannot place this Slurm task ({type(e).__name__}: {e})")
    export_env(d)
    if os.environ.get("TRANSFUSION_TASK_VERBOSE") == "1":
        print(f"[srun_task] rank {d.rank}/{d.world_size} local {d.local_rank}/{d.local_world_size} node "
              f"{os.environ.get('SLURMD_NODENAME', '?')} master {d.master_addr}:{d.master_port} gloo_if "
              f"{os.environ.get('GLOO_SOCKET_IFNAME', 'auto')}", file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
