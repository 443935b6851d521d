"""Exact mid-epoch resumption with 2 ranks (gloo) and 2 dataloader workers each, across an epoch end."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os

import pytest
import torch

from contract.dist_env import free_port
from data_pipeline.loader import build_loader

K_BEFORE, N_AFTER, MBS = 30, 14, 2  # ~38 steps per epoch here: the continuation crosses into epoch 1


def _rank_main(rank: int, port: int, demo, phase: str, state: dict | None, q) -> None:
    """One rank: build the loader; 'full' runs K+N steps and records state after K; 'resume' loads it, runs N."""
    mp.set_start_method("fork", force=True)  # dataloader workers fork, as under torchrun/deepspeed (spawned
    # ranks would otherwise start every worker by spawn, re-importing torch each epoch)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = dataclasses.replace(demo.data_config, num_workers=2, cache_dir=str(demo.root / f"cache-{phase}"))
        ld = build_loader(cfg, "train", micro_batch_size=MBS, seed=7, patch_size=demo.patch_size,
                          latent_shape=demo.latent_shape, diffusion_steps=1000)
        if state is not None:
            ld.load_state_dict(state)
        steps = K_BEFORE + N_AFTER if phase == "full" else N_AFTER
        out, sd = [], None
        for i, b in enumerate(ld):
            b.validate(demo.patch_size)
            assert b.tokens.shape[0] == MBS
            out.append({k: getattr(b, k).numpy().copy() for k in ("tokens", "targets", "image_ids", "positions", "latents", "noise", "timesteps")})
            if phase == "full" and i + 1 == K_BEFORE:
                sd = ld.state_dict()
            if i + 1 == steps:
                break
        q.put((phase, rank, sd, out[-N_AFTER:]))
    finally:
        torch.distributed.destroy_process_group()


def _run(demo, phase: str, state: dict | None) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, demo, phase, state, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = {}
    for _ in procs:
        phase_, rank, sd, batches = q.get(timeout=300)
        res[rank] = (sd, batches)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return res


@pytest.mark.slow
def test_resume_two_ranks_two_workers_is_exact(demo_data):
    full = _run(demo_data, "full", None)
    state = full[0][0]
    assert state is not None and isinstance(state["sample_in_epoch"], int)
    json.dumps(state)  # plain data
    resumed = _run(demo_data, "resume", state)
    for rank in range(2):
        want, got = full[rank][1], resumed[rank][1]
        assert len(want) == len(got) == N_AFTER
        for i, (w, g) in enumerate(zip(want, got)):
            for k in w:
                assert (w[k] == g[k]).all() and w[k].shape == g[k].shape, f"rank {rank} step {i}: {k} differs after resume"
    # the two ranks see different sequences
    assert not (full[0][1][0]["tokens"] == full[1][1][0]["tokens"]).all()


K_SHARED = 84  # the case: job A resumes at sample 84 of the epoch


def _wait_for(path, timeout: float = 240.0) -> None:
    import time
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def _job(name: str, demo, state: dict | None, sync, q) -> None:
    """One single-rank job on this node: A resumes mid-epoch and waits for B to set up before reading; B sets up."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), TF_CLEAN_SHM="1")
    cfg = dataclasses.replace(demo.data_config, num_workers=0, streams=[demo.data_config.streams[0]])
    if name == "B":
        _wait_for(sync / "A_ready")  # A's resume state sits in shared memory now
    ld = build_loader(cfg, "train", micro_batch_size=1, seed=7, patch_size=demo.patch_size,
                      latent_shape=demo.latent_shape, diffusion_steps=1000)  # cleans stale shared memory
    if name == "A":
        ld.load_state_dict(state)
        (sync / "A_ready").touch()
        _wait_for(sync / "B_ready")
        q.put(("A", next(iter(ld)).tokens.numpy().copy()))
        (sync / "A_done").touch()
    else:
        next(iter(ld))
        (sync / "B_ready").touch()
        q.put(("B", None))
        _wait_for(sync / "A_done")  # B stays alive (its segments live) while A reads


@pytest.mark.slow
def test_two_jobs_on_one_node_keep_their_loader_state(demo_data, tmp_path):
    """Issue 10: job B starting beside a resuming job A wiped A's shared memory; A restarted at sample 0."""
    cfg = dataclasses.replace(demo_data.data_config, num_workers=0, streams=[demo_data.data_config.streams[0]])
    ref = build_loader(cfg, "train", micro_batch_size=1, seed=7, patch_size=demo_data.patch_size,
                       latent_shape=demo_data.latent_shape, diffusion_steps=1000)
    assert ref.dataset.epoch_size > K_SHARED + 1
    it = iter(ref)
    for _ in range(K_SHARED):
        next(it)
    state = ref.state_dict()
    expected = next(it).tokens.numpy()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_job, args=(n, demo_data, state if n == "A" else None, tmp_path, q)) for n in ("A", "B")]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert (got["A"] == expected).all(), "job A did not continue at the sample where its checkpoint stopped"
