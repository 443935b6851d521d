"""Exact mid-epoch resumption: 2 ranks (gloo) x 2 dataloader workers across an epoch end; two jobs on one node."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
from pathlib import Path

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
            keys = ("tokens", "targets", "image_ids", "positions", "latents", "noise", "timesteps")
            out.append({k: getattr(b, k).numpy().copy() for k in keys})
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
                assert (w[k] == g[k]).all() and w[k].shape == g[k].shape, \
                    f"rank {rank} step {i}: {k} differs after resume"
    # the two ranks see different sequences
    assert not (full[0][1][0]["tokens"] == full[1][1][0]["tokens"]).all()


K_SHARED = 84  # the case: job A resumes at sample 84 of the epoch
WAIT_S = 300.0


def _job(name: str, demo, state: dict | None, clean_shm: str, node_tmp, ev: dict, q) -> None:
    """One single-rank job on this node, in its own process; `ev` orders A and B exactly (no sleeps).

    A: builds its loader, loads the mid-epoch state (streaming writes it to shared memory), signals
    `a_set_up`, waits for `b_set_up`, then reads one batch. B: waits for `a_set_up`, builds its loader
    (the old loader ran streaming's global clean here), signals `b_set_up`, stays alive until `a_read`.
    Both use `node_tmp` as the node's temp dir (streaming's file locks), as two jobs on one node share /tmp.
    """
    import tempfile

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), TRANSFUSION_CLEAN_SHM=clean_shm, TMPDIR=str(node_tmp))
    tempfile.tempdir = str(node_tmp)  # gettempdir() may have been cached before TMPDIR was set
    cfg = dataclasses.replace(demo.data_config, num_workers=0, streams=[demo.data_config.streams[0]])
    try:
        if name == "B" and not ev["a_set_up"].wait(WAIT_S):
            raise TimeoutError("job A never set up")
        ld = build_loader(cfg, "train", micro_batch_size=1, seed=7, patch_size=demo.patch_size,
                          latent_shape=demo.latent_shape, diffusion_steps=1000)
        prefix = ld.dataset._shm_prefix_int  # streaming's shared-memory prefix of this job
        if name == "B":
            ev["b_set_up"].set()
            q.put(("B", prefix, None, None))
            if not ev["a_read"].wait(WAIT_S):  # B's loader (and its segments) stay live while A reads
                raise TimeoutError("job A never read")
            return
        ld.load_state_dict(state)
        ev["a_set_up"].set()
        if not ev["b_set_up"].wait(WAIT_S):
            raise TimeoutError("job B never set up")
        resume_kept = (Path("/dev/shm") / f"{prefix:06}_resume").exists()
        q.put(("A", prefix, resume_kept, next(iter(ld)).tokens.numpy().copy()))
    finally:
        for e in ev.values():  # never leave the other job waiting on a failed one
            e.set()


@pytest.mark.slow
@pytest.mark.parametrize("clean_shm", ["0", "1"])
def test_two_jobs_on_one_node_keep_their_loader_state(demo_data, tmp_path, clean_shm):
    """Issue 10: job B setting up beside job A (resumed at sample 84, not yet reading) must leave A's state.

    The old loader (3d3b7ff) called streaming's `clean_stale_shared_memory()` in every job: it unlinks
    every prefix from 000000 up to the first unused one, A's live segments (resume state) included, and
    B then registered A's prefix; A restarted its epoch at sample 0. The jobs get a fresh node temp dir:
    leftover file locks of earlier jobs in /tmp would push A's prefix past a gap where streaming's clean
    stops, hiding the fault. `TRANSFUSION_CLEAN_SHM=0` (the issue's case, docs/cluster.md) must switch cleaning
    off in the loader; `1` must clean only segments no live process maps.
    """
    cfg = dataclasses.replace(demo_data.data_config, num_workers=0, streams=[demo_data.data_config.streams[0]])
    ref = build_loader(cfg, "train", micro_batch_size=1, seed=7, patch_size=demo_data.patch_size,
                       latent_shape=demo_data.latent_shape, diffusion_steps=1000)  # A alone, uninterrupted
    assert ref.dataset.epoch_size > K_SHARED + 1
    it = iter(ref)
    epoch_start = next(it).tokens.numpy()
    for _ in range(K_SHARED - 1):
        next(it)
    state = ref.state_dict()
    assert state["sample_in_epoch"] == K_SHARED
    expected = next(it).tokens.numpy()
    assert not (expected == epoch_start).all()  # a restart at sample 0 would be told apart
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ev = {k: ctx.Event() for k in ("a_set_up", "b_set_up", "a_read")}
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    procs = [ctx.Process(target=_job, args=(n, demo_data, state if n == "A" else None, clean_shm, node_tmp, ev, q))
             for n in ("A", "B")]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            name, prefix, resume_kept, tokens = q.get(timeout=2 * WAIT_S)
            got[name] = (prefix, resume_kept, tokens)
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    (a_prefix, resume_kept, tokens), (b_prefix, _, _) = got["A"], got["B"]
    faults = [msg for ok, msg in [
        ((tokens == expected).all(), f"job A did not continue at sample {K_SHARED} where its checkpoint stopped"),
        (resume_kept, f"job B's setup removed job A's resume state /dev/shm/{a_prefix:06}_resume"),
        (b_prefix != a_prefix, f"job B registered job A's live shared-memory prefix {a_prefix:06}"),
    ] if not ok]
    assert not faults, "; ".join(faults)
