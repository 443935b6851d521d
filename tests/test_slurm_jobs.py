"""The Slurm templates against real daemons: training, preemption + requeue, precompute, pack, export,
and a true two-node run (two network namespaces) with ZeRO-3 over gloo.

The one-node cluster is started by `bash cluster/local_cluster.sh start` (make test / .ci/run do
it); a missing cluster fails these tests with that instruction, it never skips them. The two-node
cluster is this module's own: it is started and torn down around its test.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CPU_RANKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
STEPS = 40  # tiny, but long enough to signal twice mid-run
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@dataclass
class Slurm:
    """Client side of one running cluster (its slurm.conf)."""

    conf: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def cmd(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, cwd=REPO, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r.stdout

    def sbatch(self, script: str, args: list[str], opts: list[str], log: Path, **env: str) -> int:
        """Submit from the repository root; returns the job id."""
        r = subprocess.run(["sbatch", "--parsable", f"--output={log}", *opts, script, *args], env=self.env(**env),
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        return int(r.stdout.strip().split(";")[0])

    def job(self, jid: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(jid))
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, jid: int, log: Path, timeout: float = 700) -> dict[str, str]:
        """Block until the job ends for good (a requeued job passes through PENDING again)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            info = self.job(jid)
            if info["JobState"] in TERMINAL:
                return info
            time.sleep(2)
        self.cmd("scancel", str(jid), check=False)
        raise AssertionError(f"job {jid} still {info['JobState']} after {timeout:.0f}s; log:\n{tail(log)}")


def tail(path: Path, n: int = 60) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else ["(no log)"]
    return "\n".join(lines[-n:])


def losses(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Per step: the last training row of metrics.jsonl (a resumed run appends)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def assert_same_trajectory(got: dict[int, dict], ref: dict[int, dict]) -> None:
    """Same steps, same data consumed (digests) and the same losses as the reference run."""
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step]["digest"] == ref[step]["digest"], f"step {step}: different data"
        for key in ("loss", "lm_loss", "diffusion_loss"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), f"step {step} {key}"


@pytest.fixture(scope="session")
def slurm() -> Slurm:
    """The one-node cluster of cluster/local_cluster.sh; fails (not skips) when it is down."""
    r = subprocess.run(["bash", "cluster/local_cluster.sh", "status"], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail("the local Slurm cluster is not up: run `bash cluster/local_cluster.sh start` first "
                    f"(make test does)\n{r.stdout}{r.stderr}")
    conf = re.search(r"SLURM_CONF=(\S+)", r.stdout)
    assert conf, r.stdout
    return Slurm(Path(conf.group(1)))


@pytest.fixture(scope="module")
def train_config(demo_data, tmp_path_factory) -> Path:
    """configs/tiny.yaml + the demo data, STEPS steps, a checkpoint every 8, a metrics row every step."""
    from pretrain.configlib import deep_merge

    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    cfg = deep_merge(cfg, yaml.safe_load(demo_data.config_path.read_text()))
    cfg = deep_merge(cfg, {"train": {"steps": STEPS}, "checkpoint": {"every": 8},
                           "logging": {"every": 1, "val_every": 0, "sample_every": 0}})
    path = tmp_path_factory.mktemp("slurm_cfg") / "tiny_demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Job:
    jid: int
    info: dict[str, str]
    run_dir: Path
    log: Path


@pytest.fixture(scope="module")
def reference_run(slurm: Slurm, train_config: Path, tmp_path_factory) -> Job:
    """An uninterrupted `sbatch cluster/train.slurm` on 2 CPU ranks: the trajectory others must match."""
    d = tmp_path_factory.mktemp("slurm_ref")
    log = d / "job.out"
    jid = slurm.sbatch("cluster/train.slurm", [str(train_config), f"train.run_dir={d / 'run'}"], CPU_RANKS, log)
    return Job(jid, slurm.wait(jid, log), d / "run", log)


def test_train_job_completes_with_checkpoint_and_tensorboard(reference_run: Job) -> None:
    """The job ends COMPLETED; the final checkpoint is complete; TensorBoard has every step's loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job, run = reference_run, reference_run.run_dir
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", tail(job.log)
    text = job.log.read_text()
    assert "tasks 2, GPUs per node 0" in text and "training finished" in text
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").is_file(), sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(list(final.glob("*model_states.pt"))) == 2  # one ZeRO-3 shard per rank
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert losses(run)[STEPS]["loss"] < losses(run)[1]["loss"]  # it learned something


def _wait_for_step(run_dir: Path, step: int, jid: int, slurm: Slurm, log: Path, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        if slurm.job(jid)["JobState"] in TERMINAL:
            raise AssertionError(f"job ended before step {step}:\n{tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} after {timeout}s:\n{tail(log)}")


def test_preempted_job_saves_requeues_and_resumes_on_the_same_trajectory(
        slurm: Slurm, train_config: Path, reference_run: Job, tmp_path: Path) -> None:
    """Preempted twice mid-run, it saves, requeues, resumes and ends on the reference trajectory.

    First USR1 to the batch script only (`scancel --batch`: the --signal=B:USR1@120 path of a time
    limit), which must forward it to the ranks; then, after the requeued job has resumed and
    trained on, USR1 to the ranks directly (`scancel --signal=USR1`). Each time the trainer saves
    and exits 75 and train.slurm requeues the job.
    """
    log = tmp_path / "job.out"
    run = tmp_path / "run"
    jid = slurm.sbatch("cluster/train.slurm", [str(train_config), f"train.run_dir={run}"], CPU_RANKS, log)
    _wait_for_step(run, 3, jid, slurm, log)
    slurm.cmd("scancel", "--batch", "--signal=USR1", str(jid))
    first = _wait_for_stop(log, 1)
    _wait_for_step(run, first + 3, jid, slurm, log)  # resumed from `first` and trained on
    slurm.cmd("scancel", "--signal=USR1", str(jid))
    info = slurm.wait(jid, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert info["Restarts"] == "2", tail(log)
    assert text.count("got SIGUSR1; forwarding") == 1, tail(log)  # only the --batch signal went via the script
    stops = [int(k) for k in re.findall(r"\[rank0\] stopped at step (\d+) on signal", text)]
    assert len(stops) == 2 and stops[0] < stops[1] < STEPS, tail(log)
    assert text.count(f"requeueing job {jid}") == 2
    for k in stops:
        assert re.search(rf"resumed from \S+step_{k:08d} at step {k}\b", text), tail(log)
    assert_same_trajectory(losses(run), losses(reference_run.run_dir))


def _wait_for_stop(log: Path, n: int, timeout: float = 300) -> int:
    """Step at which the n-th signal stop happened, once the log shows it."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        stops = re.findall(r"\[rank0\] stopped at step (\d+) on signal", log.read_text() if log.exists() else "")
        if len(stops) >= n:
            return int(stops[n - 1])
        time.sleep(0.5)
    raise AssertionError(f"no stop #{n} after {timeout}s:\n{tail(log)}")


def test_cancelled_job_is_not_requeued(slurm: Slurm, train_config: Path, tmp_path: Path) -> None:
    """`scancel JOB` mid-run: the trainer saves and exits 75, but the job must stay cancelled."""
    log, run = tmp_path / "job.out", tmp_path / "run"
    jid = slurm.sbatch("cluster/train.slurm", [str(train_config), f"train.run_dir={run}"], CPU_RANKS, log)
    _wait_for_step(run, 2, jid, slurm, log)
    slurm.cmd("scancel", str(jid))
    t0 = time.time()
    while slurm.cmd("squeue", "-h", "-j", str(jid), check=False).strip() and time.time() - t0 < 120:
        time.sleep(1)  # until the batch script has ended (it would requeue before that)
    time.sleep(3)
    info = slurm.job(jid)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info['JobState']}\n{tail(log)}"
    assert "not requeueing" in log.read_text(), tail(log)


def single_vs_job(slurm: Slurm, module: str, template: str, args: list[str], tmp_path: Path) -> tuple[Path, Path, list]:
    """Run `python -m module ARGS --out single` in one process and `template` with 2 Slurm tasks into `slurm`;
    assert the job completed on two ranks and wrote the same file names; returns (single, multi, files)."""
    single, multi, log = tmp_path / "single", tmp_path / "slurm", tmp_path / "job.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([str(REPO / ".venv/bin/python"), "-m", module, *args, "--out", str(single)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    jid = slurm.sbatch(template, [*args, "--out", str(multi)], CPU_RANKS, log)
    info = slurm.wait(jid, log)
    assert info["JobState"] == "COMPLETED", tail(log)
    assert f"[{module.rsplit('.', 1)[1]} rank 1/2]" in log.read_text()  # really two ranks
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(multi) for p in multi.rglob("*") if p.is_file())
    return single, multi, files


def test_precompute_job_matches_the_single_process_command(slurm: Slurm, demo_data, tmp_path: Path) -> None:
    """precompute.slurm with 2 tasks writes the same shards, index and counts as one process."""
    args = ["--input", str(demo_data.root / "raw" / "pairs.jsonl"), "--kind", "pairs", "--vae", str(demo_data.vae),
            "--image-size", "64", "--batch-size", "16", "--part-size", "60", "--decode-threads", "1"]
    single, multi, files = single_vs_job(slurm, "data_pipeline.precompute", "cluster/precompute.slurm", args,
                                         tmp_path)
    assert len([f for f in files if f.suffix == ".mds"]) >= 4  # 240 pairs / 60 per part
    for f in files:
        if f.name == "report.json":  # timings differ; the counts must not
            a, b = (json.loads((root / f).read_text()) for root in (single, multi))
            a.pop("seconds", None), b.pop("seconds", None)
            assert a == b, f
        else:
            assert (single / f).read_bytes() == (multi / f).read_bytes(), f"{f} differs"


def test_pack_job_matches_the_single_process_command(slurm: Slurm, demo_data, tmp_path: Path) -> None:
    """pack.slurm with 2 tasks writes the same shards, index and pack.json counts as one process."""
    args = ["--kind", "text", "--input", str(demo_data.root / "raw" / "texts.jsonl"), "--tokenizer",
            str(demo_data.tokenizer), "--seq-len", "256", "--val-every", "10", "--part-bytes", "16000"]
    single, multi, files = single_vs_job(slurm, "data_pipeline.pack", "cluster/pack.slurm", args, tmp_path)
    assert len([f for f in files if f.parent.name == "parts"]) >= 4  # 96 kB of text / 16 kB per part
    for f in files:
        if f.suffix == ".json" and (f.parent.name == "parts" or f == Path("pack.json")):  # timings differ
            a, b = (json.loads((root / f).read_text()) for root in (single, multi))
            a.pop("seconds", None), b.pop("seconds", None)
            assert a == b, f
        else:
            assert (single / f).read_bytes() == (multi / f).read_bytes(), f"{f} differs"


def test_export_job_writes_safetensors(slurm: Slurm, reference_run: Job, tmp_path: Path) -> None:
    """export.slurm turns the reference run's last checkpoint into loadable safetensors + config."""
    from safetensors import safe_open

    from pretrain.config import load_config
    from pretrain.plan.estimate import count_parameters

    log, out = tmp_path / "job.out", tmp_path / "export"
    jid = slurm.sbatch("cluster/export.slurm", ["--run-dir", str(reference_run.run_dir), "--out", str(out)],
                       ["--gpus-per-node=0", "--cpus-per-task=1"], log)
    info = slurm.wait(jid, log)
    assert info["JobState"] == "COMPLETED", tail(log)
    files = sorted(out.glob("*.safetensors"))
    assert files and (out / "config.yaml").is_file() and (out / "tokenizer.model").is_file()
    numel = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            numel += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    assert numel == count_parameters(load_config(out / "config.yaml").model)["total"]


# ---------------------------------------------------------------- two nodes, two network namespaces


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[Slurm]:
    """cluster/netns_cluster.sh: nodes n1/n2 at 10.200.0.11/.12, each in its own namespace; torn down after."""
    state = "/tmp/transfusion-slurm-netns-test"
    env = {**os.environ, "TRANSFUSION_NETNS_DIR": state}
    script = ["bash", "cluster/netns_cluster.sh"]
    subprocess.run([*script, "stop"], cwd=REPO, env=env, capture_output=True)  # leftovers of a killed run
    r = subprocess.run([*script, "start"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert r.returncode == 0, f"two-node cluster did not start:\n{r.stderr}"
        yield Slurm(Path(state) / "slurm.conf")
    finally:
        s = subprocess.run([*script, "stop"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert s.returncode == 0, s.stderr
        assert "tfn1" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_two_node_zero3_over_gloo_matches_one_node(two_node_cluster: Slurm, slurm: Slurm, train_config: Path,
                                                   reference_run: Job, tmp_path: Path) -> None:
    """train.slurm on 2 nodes x 1 CPU rank: rendezvous at the first node's NodeAddr, gloo over the
    veth (tfnet0), ZeRO-3 across the namespaces; same losses as the 2-rank one-node run."""
    log, run = tmp_path / "job.out", tmp_path / "run"
    jid = two_node_cluster.sbatch(
        "cluster/train.slurm", [str(train_config), f"train.run_dir={run}"],
        ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0"], log,
        GLOO_SOCKET_IFNAME="tfnet0", TRANSFUSION_TASK_VERBOSE="1")
    info = two_node_cluster.wait(jid, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert "nodes n[1-2] (2)" in text and "master 10.200.0.11:" in text, tail(log)
    assert re.search(r"rank 0/2 local 0/1 node n1 master 10\.200\.0\.11", text), tail(log)
    assert re.search(r"rank 1/2 local 0/1 node n2 master 10\.200\.0\.11", text), tail(log)
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    assert_same_trajectory(losses(run), losses(reference_run.run_dir))
