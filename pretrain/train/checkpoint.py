"""DeepSpeed-native checkpoints that survive a crash mid-save, and `resume: auto`.

Layout: RUN_DIR/checkpoints/step_00001000/ holds DeepSpeed's per-rank shards plus our client
state (step, loader state, RNG states, merged config) and `config.yaml`, the config this
checkpoint was trained with (export ships that one; resume compares against it). Every rank joins every save (ZeRO-3
saving is collective). After all ranks have written, rank 0 writes the `COMPLETE` marker
(atomically, last) and only then updates `latest`. A save writes into a fresh `step_N.tmp/` that rank 0
renames to `step_N/` after writing the marker, so no save ever writes into a directory that claims to
be complete, and a process killed while saving leaves the previous checkpoint in charge.

Lineage: `resume: auto` follows `latest`, the run's current line of checkpoints (the newest complete
directory only when `latest` is missing, e.g. runs from before it). A rollback (`checkpoint.resume=`
an earlier step) moves every checkpoint ahead of its resume point into `checkpoints/abandoned/` and
says so in the log (`abandon_ahead`), so a requeue with `auto` continues the rollback, not the
abandoned line.

A checkpoint's ZeRO-3 shards are tied to the world size that wrote them. Resuming on another
number of ranks goes through DeepSpeed's universal checkpoint: `to_universal` runs DeepSpeed's
`ds_to_universal` once into `step_N/universal/` (per-parameter fp32 weights and Adam moments), and
the engine re-partitions them on load (`"checkpoint": {"load_universal": true}`; DeepSpeed docs,
"Universal Checkpointing"). `python -m pretrain.train.checkpoint to-universal CKPT` does the conversion
ahead of a resume (a large model's conversion is better done once on a CPU node than at start-up).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from contract.fileio import write_atomic
from pretrain.config import Config, load_config, save_config
from pretrain.train.distributed import barrier

log = logging.getLogger("pretrain")

MARKER = "COMPLETE"
CONFIG = "config.yaml"  # inside each checkpoint directory
META = "checkpoint.json"  # {"step", "world_size"}: what export checks the rank files against
UNIVERSAL = "universal"  # inside a checkpoint: its DeepSpeed universal form, for a resume on another world size
_TAG = re.compile(r"^step_(\d{8,})$")
_TMP = re.compile(r"^step_(\d{8,})\.tmp$")  # a save in progress (or one killed while saving)
ABANDONED = "abandoned"  # checkpoints/abandoned/<rollback>/step_N: ahead of a rollback's resume point
LATEST = "latest"


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


def latest(root: Path) -> Path | None:
    """The checkpoint `root/latest` names when it is complete, else None."""
    f = root / LATEST
    if not f.is_file():
        return None
    path = root / f.read_text().strip()
    return path if _TAG.match(path.name) and is_complete(path) else None


def find_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: "none" -> None, else that dir; "auto" -> the one `latest` names (the
    run's current lineage), or without a usable `latest` the newest complete one (or None).

    Complete checkpoints newer than `latest` (only a save killed between its marker and `latest`, since a
    rollback moves the abandoned line aside) are logged and not used."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        complete = [p for _, p in list_checkpoints(root) if is_complete(p)]
        head = latest(root)
        if head is None:
            return complete[-1] if complete else None
        ahead = [p.name for p in complete if p.name > head.name]
        if ahead:
            log.warning("checkpoint.resume=auto: %s names %s; not resuming the newer %s (not in the run's current "
                        "lineage; name one with checkpoint.resume=PATH to use it)", root / LATEST, head.name, ahead)
        return head
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(
            f"checkpoint.resume={resume}: not a complete checkpoint (no {MARKER} marker); "
            f"pick a step_* directory that has one, or use checkpoint.resume=auto"
        )
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file, fsync, rename: readers see the old file or the whole new one (contract.fileio)."""
    write_atomic(path, text, durable=True)


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


def _remove(path: Path) -> None:
    """Delete a checkpoint directory, its marker first (it never claims completeness while half-deleted)."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def save(engine, cfg: Config, step: int, client_state: dict[str, Any],
         extra: Callable[[Path], None] | None = None) -> Path:
    """Collective save of step `step` on every rank into a fresh `step_N.tmp/` (shards, `extra(dir)` on every
    rank, e.g. the EMA, and `config.yaml`), then (rank 0) marker, rename to `step_N/`, `latest`, pruning."""
    root = checkpoint_root(cfg.train.run_dir)
    tag = tag_for(step)
    tmp = root / f"{tag}.tmp"
    if engine.global_rank == 0:  # a killed save's leftovers, or a directory of an older line: never write into them
        _remove(tmp)
        _remove(root / tag)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state, save_latest=False)
    if extra is not None:
        extra(tmp)
    if engine.global_rank == 0:
        save_config(cfg, tmp / CONFIG)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        _write_atomic(tmp / META, json.dumps({"step": step, "world_size": world}))
    barrier()  # every rank's shards are on disk before the marker says so
    fault_point("kill_in_save", step)
    if engine.global_rank == 0:
        _write_atomic(tmp / MARKER, f"{step}\n")
        os.replace(tmp, root / tag)
        _write_atomic(root / LATEST, tag)
        prune(root, cfg.checkpoint.keep_last)
    barrier()
    return root / tag


def abandon_ahead(run_dir: str | Path, resumed: Path, step: int) -> Path | None:
    """A rollback: move every checkpoint of `run_dir` ahead of `step` (complete or not) into
    checkpoints/abandoned/rollback_to_step_N[_k]/ and point `latest` at `resumed` when it is this run's.

    Returns the folder they went to (None when none was ahead). Call on one rank, after the resume loaded.
    """
    root = checkpoint_root(run_dir)
    ahead = [(s, p) for s, p in list_checkpoints(root) if s > step]
    ahead += [(int(m.group(1)), p) for p in root.iterdir() if (m := _TMP.match(p.name)) and int(m.group(1)) > step]
    dest = None
    if ahead:
        dest = root / ABANDONED / f"rollback_to_{tag_for(step)}"
        k = 1
        while dest.exists():
            k += 1
            dest = root / ABANDONED / f"rollback_to_{tag_for(step)}_{k}"
        dest.mkdir(parents=True)
        for _, p in sorted(ahead):
            os.replace(p, dest / p.name)
    if resumed.resolve().parent == root.resolve():
        _write_atomic(root / LATEST, resumed.name)
    return dest


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
            _remove(path)
    for path in root.iterdir():  # saves killed before their rename
        if (m := _TMP.match(path.name)) and int(m.group(1)) <= newest:
            _remove(path)


def trained_config(ckpt: Path) -> Config:
    """The config checkpoint `ckpt` was trained with; checkpoints older than that file: the run's config.yaml."""
    for path in (ckpt / CONFIG, ckpt.parent.parent / CONFIG):
        if path.is_file():
            return load_config(path)
    raise FileNotFoundError(f"{ckpt}: no {CONFIG} in the checkpoint nor in its run directory {ckpt.parent.parent}")


def saved_world_size(ckpt: Path) -> int:
    """The number of ranks that wrote checkpoint `ckpt` (its ZeRO-3 model-state files; else checkpoint.json)."""
    n = len(list(Path(ckpt).glob("zero_pp_rank_*_model_states.pt")))
    if n:
        return n
    meta = Path(ckpt) / META
    return int(json.loads(meta.read_text())["world_size"]) if meta.is_file() else 1


def to_universal(ckpt: Path, workers: int = 2) -> Path:
    """CKPT/universal: DeepSpeed's universal checkpoint of `ckpt`, converted once (later calls reuse it).

    Runs `python -m deepspeed.checkpoint.ds_to_universal` into a temporary directory, then renames it
    with a COMPLETE marker, so an interrupted conversion is redone, never half-used. Raises
    RuntimeError with the converter's last output when it fails (the checkpoint itself is untouched).
    """
    ckpt = Path(ckpt)
    out, tmp = ckpt / UNIVERSAL, ckpt / f"{UNIVERSAL}.tmp"
    if is_complete(out):
        return out
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    (ckpt / "latest_universal").unlink(missing_ok=True)  # the converter's pointer, written beside its output
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{ckpt}: DeepSpeed's universal-checkpoint conversion failed (exit {p.returncode}):\n"
                           f"{(p.stdout + p.stderr)[-3000:]}\nResume with the world size that saved it "
                           f"({saved_world_size(ckpt)} ranks).")
    _write_atomic(tmp / MARKER, f"{saved_world_size(ckpt)}\n")
    os.replace(tmp, out)
    return out


def load(engine, path: Path, universal: bool = False) -> dict[str, Any]:
    """Load model and optimizer shards and return the client state (every rank must call it).

    `universal`: load `path`/universal (see `to_universal`; the engine was built with
    `load_universal`), re-partitioned over this job's ranks; every rank then gets rank 0's client state.
    """
    load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    groups = engine.optimizer.optimizer.param_groups if universal else []
    decay = [g["weight_decay"] for g in groups]
    load_path, client = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {path} (see the log above)")
    # DeepSpeed's ZeRO-3 universal load copies the first group's hyperparameters into every group
    # (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3): norms and biases would get weight decay.
    for g, wd in zip(groups, decay):
        g["weight_decay"] = wd
    return client


def main(argv: list[str] | None = None) -> int:
    """`python -m pretrain.train.checkpoint to-universal CKPT`: convert ahead of a resume on another world size."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pretrain.train.checkpoint", description=main.__doc__)
    p.add_argument("command", choices=["to-universal"])
    p.add_argument("ckpt", type=Path, help="a complete checkpoint, e.g. RUN_DIR/checkpoints/step_00001000")
    p.add_argument("--workers", type=int, default=2,
                   help="DeepSpeed's extract/merge worker processes (default: %(default)s)")
    a = p.parse_args(argv)
    if not is_complete(a.ckpt):
        print(f"{a.ckpt}: not a complete checkpoint (no {MARKER} marker)", file=sys.stderr)
        return 2
    print(to_universal(a.ckpt, a.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
