"""Encode every image once with the VAE and write MDS shards of documents with their latents.

The input is split into fixed parts (see `sources.list_parts`); part k goes to rank k % world.
Each part is written to `OUT/part-K/` and marked done by `OUT/part-K/report.json`, which records
the part's identity (what it read: `sources.part_fingerprint`; the options that shape the output,
the VAE's checksum). A rerun skips a finished part only when that identity is unchanged, and redoes
it otherwise. Rank 0 waits for every part, then merges the index (streaming's
`merge_index`) and writes `OUT/report.json` (read, encoded, skipped per reason) and
`OUT/latents.json` (latent shape, dtype, normalisation). The result does not depend on the
number of ranks. OUT may be a remote URL (`s3://bucket/latents/pairs`, endpoint and credentials from
`S3_ENDPOINT_URL` / `AWS_*`): streaming's MDSWriter uploads each shard as it is finished, the part
reports, the merged index and latents.json are written there, and a rerun's resume check reads the
part reports from there (data_pipeline.storage). Run `python -m data_pipeline.precompute --help`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
from data_pipeline import sources, storage, vae as vaelib

#: MDS columns besides the latents (whose column depends on the storage dtype: contract.latents)
COLUMNS = {"key": "str", "kind": "str", "doc": "json"}


_COUNTS = ("records_read", "records_written", "images_read", "encoded")
_COUNTERS = ("skipped", "repaired", "converted")


@dataclass
class Stats:
    """Counters of one part (or of all parts, summed), and the skips by name.

    `skipped`: images per reason; `records_skipped`: unparseable records per reason (see sources);
    `repaired`: records repaired per kind of repair; `converted`: images decoded with a conversion
    (`icc_to_srgb`: an embedded ICC profile; `animated_frame`: the chosen frame of an animated image,
    see data_pipeline.images); `named`: the first sources.NAMED_MAX skipped
    records and images as [{"record", "reason", "detail"?}].
    """

    records_read: int = 0
    records_written: int = 0
    images_read: int = 0
    encoded: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    records: sources.SkipLog = field(default_factory=sources.SkipLog)

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in _COUNTS},
                **{k: dict(sorted(getattr(self, k).items())) for k in _COUNTERS},
                **self.records.to_json("records_skipped")}

    def add(self, d: dict) -> None:
        for k in _COUNTS:
            setattr(self, k, getattr(self, k) + d[k])
        for k in _COUNTERS:
            getattr(self, k).update(d.get(k, {}))
        self.records.counts.update(d.get("records_skipped", {}))
        self.records.merge(d.get("named", []), d.get("named_left_out", 0))


@dataclass
class Decoded:
    """A record with its images decoded (bad ones replaced by their skip reason)."""

    rec: sources.Record
    pixels: list[np.ndarray | str]  # one per image segment: (3, S, S) array or a BadImage reason
    converted: Counter = field(default_factory=Counter)  # conversions applied to its images (images.load_image)


def decode_record(rec: sources.Record, size: int, animated_frame: int | None = None) -> Decoded:
    """Decode every image of `rec`; a bad image becomes its reason string (animated ones unless `animated_frame`)."""
    notes: Counter = Counter()
    return Decoded(rec, imglib.decode_images(rec.segments, size, animated_frame, notes), notes)


def to_sample(d: Decoded, latents: list[np.ndarray], dtype: latent_codec.LatentDtype) -> dict | None:
    """MDS sample of a decoded record: doc segments ({'text'} / {'image': i}) + stacked latents.

    None for a skipped record and for a pair whose image is bad.
    """
    if d.rec.skipped:
        return None
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


def _count(stats: Stats, d: Decoded, strict: bool) -> None:
    """Count one decoded record; name its skips; with `strict`, raise ValueError at the first one."""
    stats.records_read += 1
    rec = d.rec
    bad = [(rec.skipped, rec.detail)] if rec.skipped else [(p, "image") for p in d.pixels if isinstance(p, str)]
    if strict and bad:
        raise ValueError(f"{rec.key}: {bad[0][0]} ({bad[0][1]}); --strict stops at the first skipped record or image")
    if rec.repaired:
        stats.repaired[rec.repaired] += 1
    stats.images_read += len(d.pixels)
    stats.encoded += sum(isinstance(p, np.ndarray) for p in d.pixels)
    stats.skipped.update(p for p in d.pixels if isinstance(p, str))
    stats.converted.update(d.converted)
    for reason, detail in bad:  # a skipped record is counted per reason; bad images are counted in `skipped`
        stats.records.add(rec.key, reason, detail if rec.skipped else "", count=bool(rec.skipped))


def _clear_part(out_dir: str) -> None:
    """Remove what a crashed, unfinished part left in `out_dir` (a local directory or a remote prefix)."""
    if not storage.is_remote(out_dir):
        if Path(out_dir).exists():
            shutil.rmtree(out_dir)
        return
    for name in storage.list_dir(out_dir):  # MDSWriter writes flat: shard files and index.json
        if storage.scheme(out_dir) == "s3":
            storage.delete(storage.join(out_dir, name))


def process_part(part: sources.Part, kind: sources.SourceKind, vae: vaelib.Vae, out_dir: str,
                 opts: PrecomputeOptions, bar: tqdm, identity: dict) -> dict:
    """Encode one part into `out_dir` (fresh; a local directory or a remote URL: streaming's MDSWriter
    uploads each shard as it is finished), then write its report.json (with `identity`) as the done marker."""
    _clear_part(out_dir)
    stats = Stats()
    t0 = time.time()
    records = sources.read_part(part, kind, opts.caption_fallback_encoding, parquet_columns(opts))
    with ThreadPoolExecutor(opts.decode_threads) as pool, MDSWriter(
        out=str(out_dir), columns={**COLUMNS, latent_codec.column(opts.dtype): latent_codec.COLUMNS[opts.dtype][1]},
        size_limit=opts.shard_size
    ) as w:
        decoded = _prefetch(pool, lambda r: decode_record(r, opts.image_size, opts.animated_frame), records,
                            depth=2 * opts.batch_size)
        for group in _chunks(decoded, opts.batch_size):
            lats = encode_group(vae, group, opts.batch_size)
            k = 0
            for d in group:
                n_good = sum(isinstance(p, np.ndarray) for p in d.pixels)
                _count(stats, d, opts.strict)
                sample = to_sample(d, lats[k : k + n_good], opts.dtype)
                k += n_good
                if sample is not None:
                    w.write(sample)
                    stats.records_written += 1
            bar.update(sum(len(d.pixels) for d in group))
    report = {"part": part.name, **stats.to_json(), "seconds": round(time.time() - t0, 3), "identity": identity}
    storage.write_json(storage.join(out_dir, "report.json"), report)  # atomic locally; a PUT is atomic
    return report


def part_dir(out: str | Path, k: int) -> str:
    """Where part k is written: OUT/part-KKKKK (a local path or a remote URL)."""
    return storage.join(out, f"part-{k:05d}")


def vae_fingerprint(vae_dir: str | Path) -> str:
    """sha256 over the names and bytes of a VAE directory's files (its `samples/` previews excluded)."""
    h = hashlib.sha256()
    root = Path(vae_dir)
    for p in sorted(q for q in root.rglob("*") if q.is_file() and "samples" not in q.relative_to(root).parts):
        h.update(str(p.relative_to(root)).encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def output_options(opts: PrecomputeOptions) -> dict:
    """The options that shape a part's output (its records, latents and shard files)."""
    return {"kind": opts.kind, "image_size": opts.image_size, "dtype": opts.dtype, "batch_size": opts.batch_size,
            "shard_size": opts.shard_size, "caption_fallback_encoding": opts.caption_fallback_encoding,
            "animated_frame": opts.animated_frame, "pixels_version": imglib.PIXELS_VERSION,
            "vae_sha256": vae_fingerprint(opts.vae), "parquet_columns": list(vars(parquet_columns(opts)).values())}


def parquet_columns(opts: PrecomputeOptions) -> sources.Columns:
    """The parquet column names the options give (pairs: image + caption; interleaved: texts + images lists)."""
    return sources.Columns(opts.image_column, opts.caption_column, opts.texts_column, opts.images_column)


def part_identity(part: sources.Part, options: dict) -> dict:
    """What a finished part must match to be reused: its input fingerprint and the shaping options."""
    return {"part": part.name, "input_sha256": sources.part_fingerprint(part), **options}


def identity_mismatch(out: str | Path, k: int, ident: dict) -> list[str] | None:
    """None when part k is finished with identity `ident`; else the differing fields (["unfinished"] if not done)."""
    rep = storage.join(part_dir(out, k), "report.json")
    if not storage.exists(rep):
        return ["unfinished"]
    have = storage.read_json(rep).get("identity", {})
    diff = sorted(f for f in ident if have.get(f) != ident[f])
    return diff or None


def finalize(out: str | Path, n_parts: int, meta: dict) -> dict:
    """Merge the part indexes into OUT/index.json and sum the part reports into OUT/report.json."""
    total = Stats()
    index_files = []
    for k in range(n_parts):
        d = part_dir(out, k)
        total.add(storage.read_json(storage.join(d, "report.json")))
        if storage.exists(storage.join(d, "index.json")):  # a part of only skipped records has none
            index_files.append(storage.join(d, "index.json"))
    if index_files:
        if not storage.is_remote(out):
            Path(out, "index.json").unlink(missing_ok=True)  # a rerun re-merges
        merge_index(index_files, str(out), keep_local=not storage.is_remote(out))  # a remote: merged and uploaded
    report = {"parts": n_parts, **total.to_json()}
    storage.write_json(storage.join(out, "report.json"), report)
    meta_url = storage.join(out, "latents.json")
    have = storage.read_json(meta_url) if storage.exists(meta_url) else None
    if have is None or {**have, "vae": ""} != {**meta, "vae": ""}:  # the same VAE (checksum) at another local path,
        storage.write_json(meta_url, meta)  # a rerun on another machine: kept, so packs made from it stay valid
    return report


def wait_for_parts(out: str | Path, idents: list[dict], timeout: float) -> None:
    """Block until every part has its report.json with the expected identity (other ranks still encoding)."""
    t0 = time.time()
    while missing := [k for k, ident in enumerate(idents) if identity_mismatch(out, k, ident)]:
        if time.time() - t0 > timeout:
            raise TimeoutError(
                f"{out}: parts {missing[:10]} unfinished after {timeout:.0f}s; rerun the same command "
                "(finished parts are kept) or `--merge-only` once all ranks are done"
            )
        time.sleep(1.0)


@dataclass
class PrecomputeOptions:
    """What `run` encodes and how (the CLI flags, typed); Python callers build it directly."""

    inputs: list[str]  # .jsonl, image folders, webdataset .tar, .parquet (globs, brace ranges; s3:// tar/parquet)
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
    strict: bool = False  # stop at the first skipped record or image
    caption_fallback_encoding: str | None = None  # repair non-UTF-8 caption files with this encoding
    animated_frame: int | None = None  # animated GIF/WebP/APNG: None = skip as `animated`, K = use frame K (0-based)
    image_column: str = "image"  # parquet pairs: image bytes, a {"bytes", "path"} struct or a path/URL
    caption_column: str = "caption"  # parquet pairs: the caption string
    texts_column: str = "texts"  # parquet interleaved: list of text-or-null
    images_column: str = "images"  # parquet interleaved: list of image-or-null (bytes, struct or path/URL)


def build_parser() -> argparse.ArgumentParser:
    """The CLI; its defaults are PrecomputeOptions' (dest names are its field names)."""
    d = PrecomputeOptions([], "", "")
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.precompute", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", dest="inputs", nargs="+", required=True,
                    help="pairs/interleaved .jsonl, image folders, webdataset .tar, .parquet (globs and brace "
                         "ranges ok; .tar and .parquet may be s3:// URLs, read streamed)")
    ap.add_argument("--kind", choices=("pairs", "interleaved"), default=d.kind,
                    help="layout of .jsonl and .parquet inputs")
    ap.add_argument("--image-column", default=d.image_column,
                    help="parquet pairs: column of image bytes, a {bytes, path} struct or a path/URL")
    ap.add_argument("--caption-column", default=d.caption_column, help="parquet pairs: caption column")
    ap.add_argument("--texts-column", default=d.texts_column,
                    help="parquet interleaved: list of texts (null at images)")
    ap.add_argument("--images-column", default=d.images_column,
                    help="parquet interleaved: list of images (null at texts)")
    ap.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    ap.add_argument("--out", required=True,
                    help="output directory or remote URL such as s3://bucket/prefix (MDS dataset)")
    ap.add_argument("--image-size", type=int, default=d.image_size,
                    help="square side images are resized and centre-cropped to")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="images per VAE forward")
    ap.add_argument("--part-size", type=int, default=d.part_size, help="records per part (unit of work and resumption)")
    ap.add_argument("--dtype", choices=tuple(latent_codec.COLUMNS), default=d.dtype, help="storage dtype of latents")
    ap.add_argument("--device", default=d.device, help="auto = cuda:LOCAL_RANK if present, else cpu")
    ap.add_argument("--decode-threads", type=int, default=d.decode_threads,
                    help="image-decoding threads beside the VAE")
    ap.add_argument("--shard-size", type=int, default=d.shard_size, help="bytes per MDS shard")
    ap.add_argument("--wait-timeout", type=float, default=d.wait_timeout, help="rank 0 waits this long for other ranks")
    ap.add_argument("--merge-only", action="store_true", help="only merge finished parts and write the reports")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first skipped record or image (default: skip, count and name it in report.json)")
    ap.add_argument("--caption-fallback-encoding", default=None, metavar="ENC",
                    help="repair caption files that are not UTF-8 by decoding them as ENC (e.g. cp1252, latin-1) "
                         "and count them under `repaired`; default: skip them as caption_not_utf8")
    ap.add_argument("--animated-frame", type=int, default=d.animated_frame, metavar="K",
                    help="animated GIF/WebP/APNG: encode frame K (0-based, composited over the earlier frames) and "
                         "count it under `converted`; default: skip them as `animated`")
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
    out = opts.out  # a local directory or a remote URL (s3://bucket/prefix): data_pipeline.storage
    if not storage.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    parts = sources.list_parts(opts.inputs, opts.part_size)
    dev = _device(opts.device, local_rank)
    vae = vaelib.load_vae(opts.vae, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    h = opts.image_size // vae.downsample
    meta = {"latent_shape": [vae.latent_channels, h, h], "dtype": opts.dtype, "image_size": opts.image_size,
            "vae": str(Path(opts.vae).resolve()), "vae_sha256": vae_fingerprint(opts.vae),
            "stored": "normalised posterior mean: (mean - shift) * scale", "kind": opts.kind}
    options = output_options(opts)
    idents = [part_identity(p, options) for p in parts]
    if not opts.merge_only:
        mine = [k for k in range(len(parts)) if k % world == rank]
        todo = []
        for k in mine:
            diff = identity_mismatch(out, k, idents[k])
            if diff and diff != ["unfinished"]:
                print(f"[precompute rank {rank}] {part_dir(out, k)} was made from other inputs or options "
                      f"(differs in {diff}); redoing it")
            todo += [k] if diff else []
        print(f"[precompute rank {rank}/{world}] {len(parts)} parts, {len(mine)} mine, {len(mine) - len(todo)} already "
              f"done")
        # in Slurm logs (no TTY) the bar is redrawn every 30 s instead of continuously
        with tqdm(desc=f"rank {rank}", unit="img", mininterval=0.1 if sys.stderr.isatty() else 30.0) as bar:
            for k in todo:
                process_part(parts[k], opts.kind, vae, part_dir(out, k), opts, bar, idents[k])
    if rank != 0:
        return None
    wait_for_parts(out, idents, opts.wait_timeout)
    stale = sorted(n for n in storage.list_dir(out)
                   if n.startswith("part-") and n[5:].isdigit() and int(n[5:]) >= len(parts))
    if stale:
        print(f"[precompute] {out}: {stale[:5]}... are left from a run with more parts and are not merged; "
              "remove them or use a new --out")
    report = finalize(out, len(parts), meta)
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> None:
    """CLI: encode the inputs (see --help)."""
    run(PrecomputeOptions(**vars(build_parser().parse_args(argv))))


if __name__ == "__main__":
    main()
