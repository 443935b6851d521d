"""Rank and world size of an offline job: torchrun-style RANK/WORLD_SIZE, else Slurm's SLURM_PROCID/SLURM_NTASKS."""

from __future__ import annotations

import os


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when run alone."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            rank, world = int(os.environ[r]), int(os.environ[w])
            if not 0 <= rank < world:
                raise ValueError(f"{r}={rank} is outside [0, {w}={world})")
            return rank, world
    return 0, 1
