"""The training loader: packed MDS streams mixed by weight, per-step randomness, exact resumption.

`build_loader(cfg.data, split, micro_batch_size, seed, patch_size, latent_shape, diffusion_steps)`
returns an iterable of `TransfusionBatch` (CPU tensors); the train split is endless (re-epochs).
`state_dict()` is plain JSON data; `load_state_dict()` resumes mid-epoch exactly, also with
workers and several ranks (streaming's own sample accounting, fixed `num_canonical_nodes`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from tempfile import gettempdir
from typing import Any, Iterator

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

from contract.batch import TransfusionBatch
from contract.special_ids import load_special_ids
from data_pipeline import storage
from data_pipeline.config import DataConfig, StreamConfig
from data_pipeline.sequence import RowSpec, build_row

_CLEANED = False
_SHM_NAME = re.compile(r"(\d{6})_(%s)" % "|".join(SHM_TO_CLEAN))  # streaming's names: f"{prefix:06}_{name}"


def _mapped_shm() -> set[str]:
    """Names of /dev/shm files some live process maps (every /proc/PID/maps this user can read)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # process gone, or another user's (whose segments we cannot unlink anyway)
            continue
        names.update(m.group(1) for m in re.finditer(r"/dev/shm/(\S+)", text))
    return names


STALE_AFTER_S = 60.0  # a segment younger than this may belong to a job between creating and mapping it


def clean_stale_shm(shm_dir: Path = Path("/dev/shm"), stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Unlink streaming's shared memory of *dead* jobs only; returns the names removed.

    A streaming prefix (all segments `NNNNNN_*` of one dataset) is stale when no live process maps
    any of its segments and none was modified in the last `stale_after_s` seconds: a live loader (and
    each of its workers) keeps them mapped, and a job that has just created a segment but not yet
    mapped it is spared by its age, so another job's segments on the same node are never touched.
    streaming's own `clean_stale_shared_memory()` unlinks every prefix from 000000 up, live or not (it
    suits a prologue on an exclusive node only). The prefix's file locks in the temp dir go with it.
    Does nothing where /dev/shm does not exist.
    """
    if not shm_dir.is_dir():
        return []
    found = [(m.group(1), p) for p in shm_dir.iterdir() if (m := _SHM_NAME.fullmatch(p.name))]
    mapped = _mapped_shm()
    young = time.time() - stale_after_s
    live = set()
    for prefix, p in found:
        try:
            if p.name in mapped or p.stat().st_mtime > young:
                live.add(prefix)
        except FileNotFoundError:  # removed meanwhile (its job ended, or another cleaner)
            continue
    removed = []
    for prefix, p in found:
        if prefix not in live:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    for prefix in {prefix for prefix, _ in found} - live:
        for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):
            (Path(gettempdir()) / f"{prefix}_{lock}").unlink(missing_ok=True)
    return removed


def _clean_once() -> None:
    """Remove shared memory left by crashed runs (only provably stale segments), once per process.

    `TRANSFUSION_CLEAN_SHM=0` (docs/cluster.md) switches it off.
    """
    global _CLEANED
    if not _CLEANED and os.environ.get("TRANSFUSION_CLEAN_SHM", "1") != "0":
        clean_stale_shm()
    _CLEANED = True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stream_cache_dir(root: str | Path, name: str, remote: str) -> Path:
    """The local cache of a remote stream, bound to what it caches (issue 27: a cache must never serve
    another dataset).

    The directory is `ROOT/NAME-KEY`, KEY = sha256 of (the remote URL, its index.json's bytes, the
    pack report's bytes): a relaunch of the same job, or any later job on the same data, finds the
    same directory and downloads nothing again (a folder per job or per launcher port re-downloaded
    everything at every relaunch); another remote, or the same remote repacked in place, gets another
    directory. The remote's index.json is written into it here (streaming never re-fetches a file that
    is already local), and a local index.json that differs from the remote's (a tampered or older cache)
    is replaced. `ROOT/NAME-KEY.json` records the remote and the hashes for humans. Raises
    storage.StorageError when the remote's index.json cannot be read (its message names the URL).
    """
    index = storage.read_bytes(storage.join(remote, "index.json"))
    info = pack_info(remote)
    report = json.dumps(info, sort_keys=True).encode() if info else b""
    key = _sha256(json.dumps([remote.rstrip("/"), _sha256(index), _sha256(report)]).encode())[:16]
    d = Path(root or ".cache/streaming") / f"{name}-{key}"
    d.mkdir(parents=True, exist_ok=True)
    have = d / "index.json"
    if not have.is_file() or _sha256(have.read_bytes()) != _sha256(index):
        if have.is_file():
            print(f"[data] {have}: differs from {storage.join(remote, 'index.json')}; replaced by the remote's")
        storage.write_bytes(str(have), index)  # atomic: ranks sharing the node write the same bytes
    meta = d.with_name(d.name + ".json")
    if not meta.is_file():
        storage.write_json(str(meta), {"remote": remote, "index_sha256": _sha256(index),
                                       "pack_json_sha256": _sha256(report) if report else None})
    return d


class PackedDataset(StreamingDataset):
    """StreamingDataset of packed rows that lays each row out with (seed, epoch, sample id) randomness."""

    def __init__(self, *, spec: RowSpec, seed: int, fixed_epoch: bool = False, **kwargs: Any):
        self.spec, self.seed, self._epoch, self._fixed_epoch = spec, seed, 0, fixed_epoch
        super().__init__(**kwargs)

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, offset = super()._resume_incr_epoch()
        if not self._fixed_epoch:  # val keeps epoch 0: the same noise every evaluation
            self._epoch = epoch  # this worker's epoch, used to seed per-sample randomness
        return epoch, offset

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        try:
            return build_row(super().get_item(sample_id, retry), self.spec, self.seed, self._epoch, int(sample_id))
        except Exception as e:  # noqa: BLE001 - re-raised naming the shard
            shard_id, _ = self.spanner[sample_id]
            shard = self.shards[shard_id]
            stream = self.streams[self.stream_per_shard[shard_id]]
            name = shard.raw_data.basename
            where = Path(stream.local) / stream.split / name
            size = where.stat().st_size if where.is_file() else None
            truncated = (f"{size} of {shard.raw_data.bytes} bytes; "
                         if size is not None and size != shard.raw_data.bytes else "")
            if stream.remote:
                url = storage.join(stream.remote, stream.split, name)
                raise RuntimeError(f"{url}: corrupt or truncated shard ({truncated}{type(e).__name__}: {e}; cached "
                                   f"at {where}); re-run data_pipeline.pack to that remote, then delete the cached "
                                   "copy") from e
            raise RuntimeError(f"{where}: corrupt or unreadable shard ({truncated}{type(e).__name__}: {e}); "
                               "re-run data_pipeline.pack for this stream or remove the shard") from e


def collate(rows: list[dict]) -> TransfusionBatch:
    """Stack rows into a TransfusionBatch; images renumbered 0..N-1 in row-major order."""
    offsets = np.cumsum([0] + [len(r["timesteps"]) for r in rows])
    image_ids = [np.where(r["image_ids"] >= 0, r["image_ids"] + o, -1) for r, o in zip(rows, offsets)]

    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([r[key] for r in rows]))  # (B, L)

    def cat(key: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([r[key] for r in rows]))  # (N, ...)

    return TransfusionBatch(
        tokens=stack("tokens"), targets=stack("targets"), doc_ids=stack("doc_ids"),
        image_ids=torch.from_numpy(np.stack(image_ids)), positions=stack("positions"),
        latents=cat("latents"), noise=cat("noise"), timesteps=cat("timesteps"),
    ).with_indices()  # on the host, so the model's step has no torch.nonzero on the GPU


class _Loader(StreamingDataLoader):
    def _get_batch_size(self, batch: Any) -> int:
        return int(batch.tokens.shape[0]) if isinstance(batch, TransfusionBatch) else super()._get_batch_size(batch)


def pack_info(root: str) -> dict | None:
    """What data_pipeline.pack recorded for the packed stream at `root` (a local directory or a remote
    URL such as `s3://bucket/text/train`); the one reader of pack.json (loader, dry run, estimate).

    Returns the split's statistics (`root/pack.json`: kind, seq_len, patch_size, latent_shape, dtype,
    rows, images, positions, real_positions, image_positions, efficiency, causal_pairs) with the pack
    report's `tokenizer` and `identity` (from `root/../pack.json`, which also holds each split's
    statistics under its name, used when the split's own file is absent; when neither has the split's
    statistics, only `tokenizer` and `identity`); None when neither file exists.
    Raises storage.StorageError for an unreadable remote (missing bucket, wrong credentials).
    """
    split, report = None, None
    if storage.exists(p := storage.join(root, "pack.json")):
        split = storage.read_json(p)
    if storage.exists(p := storage.join(storage.parent(root), "pack.json")):
        report = storage.read_json(p)
    if split is None and report is not None:
        split = report.get(Path(str(root).rstrip("/")).name) or {}  # {}: only the report's tokenizer/identity
    if split is None:
        return None
    if report is not None:
        split = {**split, **{k: report[k] for k in ("tokenizer", "identity") if k in report}}
    return split


def _pack_stats(sc: StreamConfig) -> dict | None:
    """The pack information of a stream, from its remote when it has one, else from its local directory."""
    return pack_info(sc.remote or sc.local) if (sc.remote or sc.local) else None


def mix_proportions(streams: list[StreamConfig], image_share: float | None) -> list[float | None]:
    """Per-stream proportions giving `image_share` of positions as image patches (None: streaming's default).

    Streams below the share and streams above it are each weighted by size (rows), the two groups so
    that the expected share is exact. Raises ValueError when a stream has no pack.json or when no mix
    reaches the share (every stream below it, or every stream above it).
    """
    if any(s.proportion is not None for s in streams) or image_share is None or len(streams) < 2:
        return [s.proportion for s in streams]
    stats = [_pack_stats(s) for s in streams]
    if any(not st or "rows" not in st for st in stats):
        missing = [s.name for s, st in zip(streams, stats) if not st or "rows" not in st]
        raise ValueError(f"data.streams {missing}: no pack.json to derive the mix from; set `proportion` on every "
                         f"stream")
    rows = np.array([st["rows"] for st in stats], dtype=np.float64)
    share = np.array([st["image_positions"] / max(1, st["positions"]) for st in stats])
    lo, hi = share < image_share, share >= image_share
    if not lo.any() or not hi.any():
        # No mix of these streams reaches the share. Mixing by size instead (what this did before) gave
        # the demo 13% image positions for a requested 50% (its pairs hold 49%, their captions the rest).
        shares = ", ".join(f"{s.name} {x:.3f}" for s, x in zip(streams, share))
        raise ValueError(
            f"data.image_position_share={image_share} cannot be reached: the streams' shares of image positions "
            f"(their pack.json) are {shares}; set it within [{share.min():.3f}, {share.max():.3f}], null to mix by "
            "size, or `proportion` on every stream")
    f_lo = (share[lo] * rows[lo]).sum() / rows[lo].sum()
    f_hi = (share[hi] * rows[hi]).sum() / rows[hi].sum()
    alpha = (image_share - f_lo) / (f_hi - f_lo)  # weight of the image-heavy group
    w = np.where(hi, alpha * rows / rows[hi].sum(), (1 - alpha) * rows / rows[lo].sum())
    return [float(x) for x in w]


def check_stream(sc: StreamConfig, cfg: DataConfig, spec: RowSpec) -> None:
    """The stream was packed for this seq_len, patch size and latent shape (when its pack.json is readable)."""
    st = _pack_stats(sc)
    if not st:
        return
    where = sc.local or sc.remote
    if st.get("seq_len", cfg.seq_len) != cfg.seq_len:
        raise ValueError(f"{where}: packed with seq_len={st['seq_len']} but data.seq_len={cfg.seq_len}; "
                         "repack or change data.seq_len")
    if st.get("latent_shape") and (st["patch_size"] != spec.patch_size
                                   or list(st["latent_shape"]) != list(spec.latent_shape)):
        raise ValueError(f"{where}: packed for patch_size={st['patch_size']}, latent_shape={st['latent_shape']} but "
                         f"the model "
                         f"uses patch_size={spec.patch_size}, latent_shape={list(spec.latent_shape)}; "
                         "repack with matching --patch-size")


def _streams(cfg: DataConfig, split: str, spec: RowSpec) -> list[Stream]:
    scs = cfg.streams if split == "train" else cfg.val_streams
    if not scs:
        raise ValueError(f"data.{'streams' if split == 'train' else 'val_streams'} is empty: list the packed MDS "
                         f"directories")
    if cfg.cache_limit and (local := [sc.name for sc in scs if not sc.remote]):
        # streaming evicts by deleting shard files: on a stream read in place that would delete the data set
        raise ValueError(f"data.cache_limit={cfg.cache_limit!r} with local streams {local} "
                         f"(data.{'streams' if split == 'train' else 'val_streams'}): streaming would evict their "
                         "shards by deleting them; give those streams a `remote` (a local directory works) or drop "
                         "data.cache_limit")
    props = mix_proportions(scs, cfg.image_position_share) if split == "train" else [None] * len(scs)
    out = []
    for i, (sc, p) in enumerate(zip(scs, props)):
        check_stream(sc, cfg, spec)
        local = str(stream_cache_dir(cfg.cache_dir, sc.name, sc.remote)) if sc.remote else sc.local
        if not sc.remote and not (Path(local) / "index.json").is_file():
            raise FileNotFoundError(f"data.{'streams' if split == 'train' else 'val_streams'}[{i}].local={local}: no "
                                    f"index.json")
        out.append(Stream(remote=sc.remote, local=local, proportion=p))
    return out


class TransfusionLoader:
    """Iterable of TransfusionBatch with JSON-able state; endless for train, one pass for val."""

    def __init__(self, cfg: DataConfig, split: str, micro_batch_size: int, seed: int, spec: RowSpec):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        _clean_once()
        self.split = split
        self.dataset = PackedDataset(
            spec=spec, seed=seed, fixed_epoch=split == "val", streams=_streams(cfg, split, spec),
            batch_size=micro_batch_size,
            shuffle=cfg.shuffle and split == "train", shuffle_seed=seed, num_canonical_nodes=cfg.num_canonical_nodes,
            cache_limit=cfg.cache_limit,
        )
        kw = {"prefetch_factor": cfg.prefetch_factor, "persistent_workers": False} if cfg.num_workers > 0 else {}
        self.loader = _Loader(self.dataset, batch_size=micro_batch_size, num_workers=cfg.num_workers,
                              collate_fn=collate, drop_last=True, **kw)

    def __iter__(self) -> Iterator[TransfusionBatch]:
        if self.split == "val":
            yield from self.loader
            return
        empty = 0
        while True:  # re-epoch forever; an epoch resumed at its very end yields nothing once
            n = 0
            for batch in self.loader:
                n += 1
                yield batch
            empty = 0 if n else empty + 1
            if empty >= 2:
                raise RuntimeError("the train streams yield no full micro-batch: fewer rows than micro_batch_size x "
                                   "ranks")

    def state_dict(self) -> dict:
        """Resumption state (plain JSON data); take it after the batch the trainer consumed last."""
        return dict(self.loader.state_dict() or {})

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly after the batch where `sd` was taken; call before iterating."""
        self.loader.load_state_dict(sd)


def build_loader(cfg: DataConfig, split: str, micro_batch_size: int, seed: int, patch_size: int,
                 latent_shape: tuple[int, int, int], diffusion_steps: int) -> TransfusionLoader:
    """The loader the trainer calls; rank and world size come from the environment (as streaming reads them)."""
    spec = RowSpec(
        ids=load_special_ids(cfg.tokenizer), seq_len=cfg.seq_len, patch_size=patch_size,
        latent_shape=tuple(int(x) for x in latent_shape), diffusion_steps=diffusion_steps,
        caption_first_prob=cfg.caption_first_prob, image_first_max_timestep=cfg.image_first_max_timestep,
        caption_dropout=cfg.caption_dropout,
    )
    return TransfusionLoader(cfg, split, micro_batch_size, seed, spec)
