"""DeepSpeed-native checkpoints that survive a crash mid-save, and `resume: auto`.

Layout: RUN_DIR/checkpoints/step_00001000/ holds DeepSpeed's per-rank shards plus our client
state (step, loader state, RNG states, merged config) and `config.yaml`, the config this
checkpoint was trained with (export ships that one; resume compares against it). Every rank joins every save (ZeRO-3
saving is collective). After all ranks have written, rank 0 writes the `COMPLETE` marker
(atomically, last) and only then updates `latest`. Resume picks the newest directory that has
the marker, so a process killed while saving leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.config import Config, load_config, save_config
from pretrain.distributed import barrier

MARKER = "COMPLETE"
CONFIG = "config.yaml"  # inside each checkpoint directory
META = "checkpoint.json"  # {"step", "world_size"}: what export checks the rank files against
_TAG = re.compile(r"^step_(\d{8,})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint directory under `root`, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found)


def find_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: "none" -> None, "auto" -> newest complete one (or None), else that dir."""
    if resume == "none":
        return None
    if resume == "auto":
        complete = [p for _, p in list_checkpoints(checkpoint_root(run_dir)) if is_complete(p)]
        return complete[-1] if complete else None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(
            f"checkpoint.resume={resume}: not a complete checkpoint (no {MARKER} marker); "
            f"pick a step_* directory that has one, or use checkpoint.resume=auto"
        )
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fault_point(name: str, step: int) -> None:
    """Test hook, off unless PRETRAIN_FAULT="name=step" is set: inject a real failure at an exact point.

    kill_after_step / kill_in_save: SIGKILL this process (kill -9); sigusr1_rank1_after_step: rank 1
    sends itself SIGUSR1 (what `scancel --signal=USR1` does), to show one rank's signal stops all ranks.
    """
    spec = os.environ.get("PRETRAIN_FAULT", "")
    if not spec or spec != f"{name}={step}":
        return
    if name.startswith("sigusr1_rank1"):
        if os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGUSR1)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict[str, Any]:
    """Every RNG a rank draws from, so a resumed run continues the same random streams."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, cfg: Config, step: int, client_state: dict[str, Any]) -> Path:
    """Collective save of step `step` on every rank (shards + `config.yaml`), then marker, `latest`, pruning (rank 0)."""
    root = checkpoint_root(cfg.train.run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if engine.global_rank == 0:
        save_config(cfg, root / tag / CONFIG)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        _write_atomic(root / tag / META, json.dumps({"step": step, "world_size": world}))
    barrier()  # every rank's shards are on disk before the marker says so
    fault_point("kill_in_save", step)
    if engine.global_rank == 0:
        _write_atomic(root / tag / MARKER, f"{step}\n")
        _write_atomic(root / "latest", tag)
        prune(root, cfg.checkpoint.keep_last)
    barrier()
    return root / tag


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and leftovers of crashed saves."""
    ckpts = list_checkpoints(root)
    complete = [s for s, p in ckpts if is_complete(p)]
    if not complete or keep_last <= 0:
        return
    keep = set(complete[-keep_last:])
    newest = complete[-1]
    for step, path in ckpts:
        if step not in keep and step <= newest:
            shutil.rmtree(path, ignore_errors=True)


def trained_config(ckpt: Path) -> Config:
    """The config checkpoint `ckpt` was trained with; checkpoints older than that file: the run's config.yaml."""
    for path in (ckpt / CONFIG, ckpt.parent.parent / CONFIG):
        if path.is_file():
            return load_config(path)
    raise FileNotFoundError(f"{ckpt}: no {CONFIG} in the checkpoint nor in its run directory {ckpt.parent.parent}")


def load(engine, path: Path) -> dict[str, Any]:
    """Load model and optimizer shards and return this rank's client state (every rank must call it)."""
    load_path, client = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {path} (see the log above)")
    return client
