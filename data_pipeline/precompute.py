"""Encode every image once with the VAE and write MDS shards of documents with their latents.

The input is split into fixed parts (see `sources.list_parts`); part k goes to rank k % world.
Each part is written to `OUT/part-K/` and marked done by `OUT/part-K/report.json`, so a rerun
skips finished parts. Rank 0 waits for every part, then merges the index (streaming's
`merge_index`) and writes `OUT/report.json` (read, encoded, skipped per reason) and
`OUT/latents.json` (latent shape, dtype, normalisation). The result does not depend on the
number of ranks. Run `python -m data_pipeline.precompute --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from streaming import MDSWriter
from streaming.base.util import merge_index
from tqdm import tqdm

from contract import latents as latent_codec
from contract.dist_env import detect_env
from data_pipeline import images as imglib
from data_pipeline import sources, vae as vaelib

#: MDS columns besides the latents (whose column depends on the storage dtype: contract.latents)
COLUMNS = {"key": "str", "kind": "str", "doc": "json"}


@dataclass
class Stats:
    """Counters of one part (or of all parts, summed)."""

    records_read: int = 0
    records_written: int = 0
    images_read: int = 0
    encoded: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in ("records_read", "records_written", "images_read", "encoded")},
                "skipped": dict(sorted(self.skipped.items()))}

    def add(self, d: dict) -> None:
        for k in ("records_read", "records_written", "images_read", "encoded"):
            setattr(self, k, getattr(self, k) + d[k])
        self.skipped.update(d["skipped"])


@dataclass
class Decoded:
    """A record with its images decoded (bad ones replaced by their skip reason)."""

    rec: sources.Record
    pixels: list[np.ndarray | str]  # one per image segment: (3, S, S) array or a BadImage reason


def decode_record(rec: sources.Record, size: int) -> Decoded:
    """Decode every image of `rec`; a bad image becomes its reason string."""
    out: list[np.ndarray | str] = []
    for kind, val in rec.segments:
        if kind != "image":
            continue
        if val is None:
            out.append("missing_file")
            continue
        try:
            out.append(imglib.load_image(val, size))  # type: ignore[arg-type]
        except imglib.BadImage as e:
            out.append(e.reason)
    return Decoded(rec, out)


def to_sample(d: Decoded, latents: list[np.ndarray], dtype: latent_codec.LatentDtype) -> dict | None:
    """MDS sample of a decoded record: doc segments ({'text'} / {'image': i}) + stacked latents."""
    doc, lats, j = [], [], 0
    good = iter(latents)
    for kind, val in d.rec.segments:
        if kind == "text":
            doc.append({"text": val})
            continue
        px = d.pixels[j]
        j += 1
        if isinstance(px, str):
            if d.rec.kind == "pairs":
                return None  # a pair without its image is dropped
            continue
        doc.append({"image": len(lats)})
        lats.append(next(good))
    val = latent_codec.encode(np.stack(lats), dtype) if lats else latent_codec.placeholder(dtype)  # (n, C, h, w)
    return {"key": d.rec.key, "kind": d.rec.kind, "doc": doc, latent_codec.column(dtype): val}


def _prefetch(pool: ThreadPoolExecutor, fn, it, depth: int) -> Iterator:
    """Ordered `map(fn, it)` on a thread pool with at most `depth` items in flight (bounded memory)."""
    q: deque = deque()
    for x in it:
        q.append(pool.submit(fn, x))
        if len(q) >= depth:
            yield q.popleft().result()
    while q:
        yield q.popleft().result()


def _chunks(it: Iterator[Decoded], batch_size: int) -> Iterator[list[Decoded]]:
    """Group decoded records so each group holds about `batch_size` images (fixed by the data only)."""
    group, n = [], 0
    for d in it:
        group.append(d)
        n += sum(isinstance(p, np.ndarray) for p in d.pixels)
        if n >= batch_size:
            yield group
            group, n = [], 0
    if group:
        yield group


def encode_group(vae: vaelib.Vae, group: list[Decoded], batch_size: int) -> list[np.ndarray]:
    """Latents of every good image in `group`, in order, encoded `batch_size` at a time."""
    pix = [p for d in group for p in d.pixels if isinstance(p, np.ndarray)]
    out: list[np.ndarray] = []
    for i in range(0, len(pix), batch_size):
        x = torch.from_numpy(np.stack(pix[i : i + batch_size]))  # (B, 3, S, S)
        out += list(vaelib.encode(vae, x).cpu().numpy())  # (B, C, h, w)
    return out


def process_part(part: sources.Part, kind: sources.SourceKind, vae: vaelib.Vae, out_dir: Path,
                 opts: PrecomputeOptions, bar: tqdm) -> dict:
    """Encode one part into `out_dir` (fresh), then write its report.json as the done marker."""
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a crashed, unfinished part
    stats = Stats()
    t0 = time.time()
    with ThreadPoolExecutor(opts.decode_threads) as pool, MDSWriter(
        out=str(out_dir), columns={**COLUMNS, latent_codec.column(opts.dtype): latent_codec.COLUMNS[opts.dtype][1]},
        size_limit=opts.shard_size
    ) as w:
        decoded = _prefetch(pool, lambda r: decode_record(r, opts.image_size), sources.read_part(part, kind),
                            depth=2 * opts.batch_size)
        for group in _chunks(decoded, opts.batch_size):
            lats = encode_group(vae, group, opts.batch_size)
            k = 0
            for d in group:
                n_good = sum(isinstance(p, np.ndarray) for p in d.pixels)
                stats.records_read += 1
                stats.images_read += len(d.pixels)
                stats.encoded += n_good
                stats.skipped.update(p for p in d.pixels if isinstance(p, str))
                sample = to_sample(d, lats[k : k + n_good], opts.dtype)
                k += n_good
                if sample is not None:
                    w.write(sample)
                    stats.records_written += 1
            bar.update(sum(len(d.pixels) for d in group))
    report = {"part": part.name, **stats.to_json(), "seconds": round(time.time() - t0, 3)}
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out_dir / "report.json")
    return report


def part_dir(out: Path, k: int) -> Path:
    return out / f"part-{k:05d}"


def finalize(out: Path, n_parts: int, meta: dict) -> dict:
    """Merge the part indexes into OUT/index.json and sum the part reports into OUT/report.json."""
    total = Stats()
    index_files = []
    for k in range(n_parts):
        d = part_dir(out, k)
        total.add(json.loads((d / "report.json").read_text()))
        if (d / "index.json").is_file():
            index_files.append(str(d / "index.json"))
    if index_files:
        (out / "index.json").unlink(missing_ok=True)  # a rerun re-merges
        merge_index(index_files, str(out), keep_local=True)
    report = {"parts": n_parts, **total.to_json()}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "latents.json").write_text(json.dumps(meta, indent=2) + "\n")
    return report


def wait_for_parts(out: Path, n_parts: int, timeout: float) -> None:
    """Block until every part has its report.json (other ranks still encoding)."""
    t0 = time.time()
    while missing := [k for k in range(n_parts) if not (part_dir(out, k) / "report.json").is_file()]:
        if time.time() - t0 > timeout:
            raise TimeoutError(
                f"{out}: parts {missing[:10]} unfinished after {timeout:.0f}s; rerun the same command "
                "(finished parts are kept) or `--merge-only` once all ranks are done"
            )
        time.sleep(1.0)


@dataclass
class PrecomputeOptions:
    """What `run` encodes and how (the CLI flags, typed); Python callers build it directly."""

    inputs: list[str]  # pairs/interleaved .jsonl, image folders, webdataset .tar (globs ok)
    vae: str  # local diffusers AutoencoderKL directory
    out: str  # output directory (MDS dataset)
    kind: sources.SourceKind = "pairs"  # layout of .jsonl inputs
    image_size: int = 256
    batch_size: int = 32  # images per VAE forward
    part_size: int = 1000  # records per part (unit of work and resumption)
    dtype: latent_codec.LatentDtype = "fp16"  # storage dtype of latents
    device: str = "auto"  # auto = cuda:LOCAL_RANK if present, else cpu
    decode_threads: int = 4
    shard_size: int = 1 << 27  # bytes per MDS shard
    wait_timeout: float = 6 * 3600  # rank 0 waits this long for other ranks
    merge_only: bool = False  # only merge finished parts and write the reports


def build_parser() -> argparse.ArgumentParser:
    """The CLI; its defaults are PrecomputeOptions' (dest names are its field names)."""
    d = PrecomputeOptions([], "", "")
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.precompute", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", dest="inputs", nargs="+", required=True,
                    help="pairs/interleaved .jsonl, image folders, webdataset .tar (globs ok)")
    ap.add_argument("--kind", choices=("pairs", "interleaved"), default=d.kind, help="layout of .jsonl inputs")
    ap.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    ap.add_argument("--out", required=True, help="output directory (MDS dataset)")
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="images per VAE forward")
    ap.add_argument("--part-size", type=int, default=d.part_size, help="records per part (unit of work and resumption)")
    ap.add_argument("--dtype", choices=tuple(latent_codec.COLUMNS), default=d.dtype, help="storage dtype of latents")
    ap.add_argument("--device", default=d.device, help="auto = cuda:LOCAL_RANK if present, else cpu")
    ap.add_argument("--decode-threads", type=int, default=d.decode_threads)
    ap.add_argument("--shard-size", type=int, default=d.shard_size, help="bytes per MDS shard")
    ap.add_argument("--wait-timeout", type=float, default=d.wait_timeout, help="rank 0 waits this long for other ranks")
    ap.add_argument("--merge-only", action="store_true", help="only merge finished parts and write the reports")
    return ap


def _device(spec: str, local_rank: int) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def run(opts: PrecomputeOptions, rank_and_world: tuple[int, int] | None = None) -> dict | None:
    """Encode this rank's parts; on rank 0 wait for all and finalize. Returns the report on rank 0.

    `rank_and_world` defaults to the launcher's (contract.dist_env: RANK/WORLD_SIZE or SLURM_*).
    """
    if rank_and_world is None:
        env = detect_env()
        rank, world, local_rank = env.rank, env.world_size, env.local_rank
    else:
        (rank, world), local_rank = rank_and_world, 0
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = sources.list_parts(opts.inputs, opts.part_size)
    dev = _device(opts.device, local_rank)
    vae = vaelib.load_vae(opts.vae, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    h = opts.image_size // vae.downsample
    meta = {"latent_shape": [vae.latent_channels, h, h], "dtype": opts.dtype, "image_size": opts.image_size,
            "vae": str(Path(opts.vae).resolve()), "stored": "normalised posterior mean: (mean - shift) * scale",
            "kind": opts.kind}
    if not opts.merge_only:
        mine = [k for k in range(len(parts)) if k % world == rank]
        todo = [k for k in mine if not (part_dir(out, k) / "report.json").is_file()]
        print(f"[precompute rank {rank}/{world}] {len(parts)} parts, {len(mine)} mine, {len(mine) - len(todo)} already done")
        # in Slurm logs (no TTY) the bar is redrawn every 30 s instead of continuously
        with tqdm(desc=f"rank {rank}", unit="img", mininterval=0.1 if sys.stderr.isatty() else 30.0) as bar:
            for k in todo:
                process_part(parts[k], opts.kind, vae, part_dir(out, k), opts, bar)
    if rank != 0:
        return None
    wait_for_parts(out, len(parts), opts.wait_timeout)
    report = finalize(out, len(parts), meta)
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> None:
    """CLI: encode the inputs (see --help)."""
    run(PrecomputeOptions(**vars(build_parser().parse_args(argv))))


if __name__ == "__main__":
    main()
