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
