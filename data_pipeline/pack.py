"""The tokenise + pack stage: documents into `seq_len` rows written as MDS shards (one dataset per source),
parallel across ranks and nodes. The bin-packing algorithm itself is `data_pipeline.packer`.

Text sources read raw .jsonl/.txt (local or remote, brace ranges and globs); pairs and interleaved
sources read the output of `data_pipeline.precompute` (documents with their latents). Writes
`OUT/train` (and `OUT/val` with `--val-every N`: every N-th document of a part goes to validation)
plus `OUT/pack.json` with the packing efficiency. OUT may be a local directory or a remote URL
(`s3://bucket/prefix`, through `data_pipeline.storage` and streaming's uploaders).
Run `python -m data_pipeline.pack --help`.

Parallel as precompute is: the inputs are cut into deterministic *parts* (text: about `--part-bytes`
of input, a jsonl line belonging to the byte range holding its first byte; precompute outputs:
`--part-docs` documents), part k goes to rank k % world (contract.dist_env: RANK/WORLD_SIZE or
SLURM_*), and each part is packed on its own into `OUT/<split>/part-K/` and marked done by
`OUT/parts/part-K.json` (its identity: what it read, the tokenizer's checksum, the shaping options).
Rank 0 waits for every part, merges the part indexes into `OUT/<split>/index.json` (streaming's
`merge_index`) and writes `OUT/<split>/pack.json` and `OUT/pack.json`. A row never spans two parts, so
the shards and the index are byte-identical for any number of ranks; each part's last row may be
partly padding (docs/data.md gives the measured cost).

`OUT/pack.json` is written last and records the pack's identity. A rerun with the same identity does
nothing; with another identity it stops and asks for a new `--out`; an unfinished run (no pack.json)
resumes: parts whose marker holds the same identity are kept, the others are packed again.
"""


from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from streaming import MDSWriter
from streaming.base.format import reader_from_json
from streaming.base.util import merge_index
from tqdm import tqdm

from contract import latents as latent_codec
from contract.dist_env import detect_env
from contract.positions import patches_per_image
from data_pipeline import sources, storage
from data_pipeline.packer import IMAGE, PAIR, TEXT, Packer, Unit, row_arrays
from data_pipeline.tokenizer import Tokenizer

PACKED_COLUMNS = {"tokens": "ndarray:int32", "segs": "ndarray:int32", "n_real": "int"}
_STAT_KEYS = ("rows", "images", "real_positions", "causal_pairs")


def _mds_shards(root: str) -> list[dict]:
    index = storage.join(root, "index.json")
    if not storage.exists(index):
        raise FileNotFoundError(f"{index}: not an MDS dataset (run data_pipeline.precompute first)")
    return storage.read_json(index)["shards"]


def read_mds(root: str | Path, start: int = 0, stop: int = -1) -> Iterator[dict]:
    """Samples [start, stop) (stop=-1: to the end) of an MDS dataset, local or remote, in index order.

    A remote dataset's shards are streamed one at a time through a temporary directory (only the shards
    overlapping the range are fetched). A corrupt shard's error names it.
    """
    root = str(root)
    first = 0
    with tempfile.TemporaryDirectory(prefix="pack-read-") as tmp:
        for shard in _mds_shards(root):
            n = shard["samples"]
            lo, hi = max(start - first, 0), n if stop < 0 else min(stop - first, n)
            first += n
            if lo >= hi:
                if stop >= 0 and first >= stop:
                    return
                continue
            name = shard["raw_data"]["basename"]
            base = root
            if storage.is_remote(root):
                local = Path(tmp, name)
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(storage.read_bytes(storage.join(root, name)))
                base = tmp
            reader = reader_from_json(base, None, shard)
            for i in range(lo, hi):
                try:
                    yield reader.get_item(i)
                except Exception as e:  # noqa: BLE001 - re-raised with the shard's name
                    raise ValueError(f"{storage.join(root, name)}: corrupt shard (sample {i}): {e}") from e
            if storage.is_remote(root):
                Path(tmp, name).unlink()


def _text_units(texts: Iterable[str], tok: Tokenizer, batch: int = 256) -> Iterator[list[Unit]]:
    """Each text as one text unit: BOS + tokens + EOS (tokenised `batch` at a time)."""
    ids = tok.ids
    buf: list[str] = []
    for text in texts:
        buf.append(text)
        if len(buf) == batch:
            yield from ([Unit(TEXT, [ids.bos_id, *t, ids.eos_id])] for t in tok.encode_batch(buf))
            buf = []
    if buf:
        yield from ([Unit(TEXT, [ids.bos_id, *t, ids.eos_id])] for t in tok.encode_batch(buf))


def text_docs(inputs: list[str], tok: Tokenizer, batch: int = 256, skips: sources.SkipLog | None = None,
              strict: bool = False) -> Iterator[list[Unit]]:
    """Each text document as one text unit: BOS + tokens + EOS; bad input lines go to `skips` (see iter_texts)."""
    return _text_units(sources.iter_texts(inputs, skips, strict), tok, batch)


def image_docs(root: str, tok: Tokenizer, start: int = 0, stop: int = -1) -> Iterator[list[Unit]]:
    """Documents [start, stop) of a precompute output: pairs as one PAIR unit, interleaved as text/image units."""
    ids = tok.ids
    for s in read_mds(root, start, stop):
        lat = latent_codec.decode(s)  # (n, C, h, w) float32
        if s["kind"] == "pairs":
            cap = " ".join(seg["text"] for seg in s["doc"] if "text" in seg)
            yield [Unit(PAIR, tok.encode(cap), lat[0])]
            continue
        units: list[Unit] = [Unit(TEXT, [ids.bos_id])]
        for seg in s["doc"]:
            if "text" in seg:
                units.append(Unit(TEXT, tok.encode(seg["text"])))
            else:
                units.append(Unit(IMAGE, [], lat[seg["image"]]))
        units.append(Unit(TEXT, [ids.eos_id]))
        merged: list[Unit] = []
        for u in units:  # merge adjacent text units
            if merged and u.kind == TEXT and merged[-1].kind == TEXT:
                merged[-1] = Unit(TEXT, merged[-1].tokens + u.tokens)
            elif u.kind != TEXT or u.tokens:
                merged.append(u)
        yield merged


class _SplitWriter:
    """One split of one part: a Packer feeding an MDSWriter (local directory or remote URL)."""

    def __init__(self, out: str, seq_len: int, P: int, lookahead: int, dtype: latent_codec.LatentDtype,
                 shard_size: int):
        key, encoding = latent_codec.COLUMNS[dtype]
        self.key, self.dtype, self.images = key, dtype, 0
        self.packer = Packer(seq_len, P, lookahead)
        if not storage.is_remote(out) and os.path.exists(out):
            shutil.rmtree(out)  # left by a run killed inside this part
        self.w = MDSWriter(out=out, columns=dict(PACKED_COLUMNS, **{key: encoding}), size_limit=shard_size,
                           exist_ok=True)

    def write(self, row) -> None:
        toks, segs, lat = row_arrays(row)
        # exact: the values came from this dtype; a row without images stores a placeholder (segs say 0 images)
        lat = latent_codec.placeholder(self.dtype) if lat is None else latent_codec.encode(lat, self.dtype)
        if len(toks) == 0:
            toks = np.zeros(1, np.int32)
        self.w.write({"tokens": toks, "segs": segs, "n_real": row.used, self.key: lat})
        self.images += len(row.latents)

    def push(self, doc: list[Unit]) -> None:
        if (row := self.packer.push(doc)) is not None:
            self.write(row)

    def finish(self) -> dict:
        for row in self.packer.drain():
            self.write(row)
        self.w.finish()
        p = self.packer
        return {"rows": p.rows, "images": self.images, "real_positions": p.real, "causal_pairs": p.causal_pairs}


def write_rows(packer: Packer, docs: Iterable[list[Unit]], out: Path, dtype: latent_codec.LatentDtype,
               shard_size: int) -> tuple[int, int]:
    """Pack `docs` and write every row to an MDS dataset at `out`, latents stored as `dtype`; returns (rows, images)."""
    sw = _SplitWriter(str(out), packer.seq_len, packer.P, packer.lookahead, dtype, shard_size)
    sw.packer = packer
    for row in tqdm(packer.pack(docs), desc=f"pack {Path(out).name}", unit="seq", disable=None):
        sw.write(row)
    sw.w.finish()
    return packer.rows, sw.images


def split_stats(seq_len: int, P: int, counts: dict) -> dict:
    """The statistics of a split from its summed counts (rows, images, real_positions, causal_pairs): adds
    positions, image_positions and efficiency (real / all positions), what the loader's mix and
    pretrain.plan.estimate read."""
    rows, real = counts["rows"], counts["real_positions"]
    return {"rows": rows, "images": counts["images"], "positions": rows * seq_len, "real_positions": real,
            "image_positions": counts["images"] * P, "efficiency": round(real / max(1, rows * seq_len), 6),
            "causal_pairs": counts["causal_pairs"]}


def pack_split(packer: Packer, docs: Iterable[list[Unit]], out: Path, meta: dict, shard_size: int) -> dict:
    """Pack `docs` into the MDS dataset `out` (one process, no parts) and write `out/pack.json` (meta + the
    split's statistics, see split_stats). `meta` holds kind, seq_len, patch_size, latent_shape and dtype."""
    rows, n_img = write_rows(packer, docs, out, meta["dtype"], shard_size)
    stats = split_stats(packer.seq_len, packer.P, {"rows": rows, "images": n_img, "real_positions": packer.real,
                                                   "causal_pairs": packer.causal_pairs})
    (Path(out) / "pack.json").write_text(json.dumps({**meta, **stats}, indent=2) + "\n")
    return stats


@dataclass
class PackOptions:
    """What `run` packs and how (the CLI flags, typed); Python callers build it directly."""

    kind: Literal["text", "pairs", "interleaved"]
    inputs: list[str]  # text: .jsonl/.txt files or folders; pairs/interleaved: precompute output directories
    tokenizer: str  # sentencepiece .model (special ids in <model>.json)
    out: str  # output directory or remote URL: OUT/train, OUT/val, OUT/pack.json
    seq_len: int = 4096
    patch_size: int = 2
    val_every: int = 0  # every N-th document of a part goes to OUT/val (0: no val)
    lookahead: int = 64  # documents considered when filling a row
    shard_size: int = 1 << 26  # bytes per MDS shard
    strict: bool = False  # stop at the first bad text line
    part_bytes: int = 1 << 30  # text: bytes of input per part (the unit of work, resumption and row ends)
    part_docs: int = 200_000  # pairs/interleaved: documents per part
    wait_timeout: float = 6 * 3600  # rank 0 waits this long for other ranks' parts
    merge_only: bool = False  # only merge finished parts and write pack.json


def build_parser() -> argparse.ArgumentParser:
    """The CLI; its defaults are PackOptions' (dest names are its field names)."""
    d = PackOptions("text", [], "", "")
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.pack", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--kind", choices=("text", "pairs", "interleaved"), required=True)
    ap.add_argument("--input", dest="inputs", nargs="+", required=True,
                    help="text: .jsonl/.txt files or folders (globs, brace ranges, s3:// URLs); "
                         "pairs/interleaved: precompute output directories or URLs")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model (special ids in <model>.json)")
    ap.add_argument("--out", required=True, help="output directory or URL: OUT/train, OUT/val, OUT/pack.json")
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help="positions per packed row (data.seq_len)")
    ap.add_argument("--patch-size", type=int, default=d.patch_size,
                    help="latent cells per patch side (model.patch_size)")
    ap.add_argument("--val-every", type=int, default=d.val_every,
                    help="every N-th document of each part goes to OUT/val (0: no val)")
    ap.add_argument("--lookahead", type=int, default=d.lookahead, help="documents considered when filling a row")
    ap.add_argument("--shard-size", type=int, default=d.shard_size, help="bytes per MDS shard")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first bad text line (default: skip it, count and name it in pack.json)")
    ap.add_argument("--part-bytes", type=int, default=d.part_bytes,
                    help="text: bytes of input per part (unit of work and resumption; a row never spans parts)")
    ap.add_argument("--part-docs", type=int, default=d.part_docs, help="pairs/interleaved: documents per part")
    ap.add_argument("--wait-timeout", type=float, default=d.wait_timeout, help="rank 0 waits this long for other ranks")
    ap.add_argument("--merge-only", action="store_true", help="only merge finished parts and write pack.json")
    return ap


def _image_meta(inputs: list[str]) -> dict:
    metas = [storage.read_json(storage.join(p, "latents.json")) for p in inputs]
    if any(m["latent_shape"] != metas[0]["latent_shape"] or m["dtype"] != metas[0]["dtype"] for m in metas):
        raise ValueError(f"{inputs}: precompute outputs disagree on latent_shape/dtype; pack them separately")
    return metas[0]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, local or remote (what pack.json's identity records for the tokenizer and
    inputs)."""
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _text_stamp(fp: str) -> list:
    return [fp] if storage.is_remote(fp) else sources.file_stamp(fp)


def _source_ids(opts: PackOptions) -> list:
    """What the inputs are: text files' stamps (a remote file: its URL), or precompute outputs' checksums."""
    if opts.kind == "text":
        return [_text_stamp(f) for f in sources.text_files(opts.inputs)]
    return [[p if storage.is_remote(p) else str(Path(p).resolve()), file_sha256(storage.join(p, "index.json")),
             file_sha256(storage.join(p, "latents.json"))] for p in opts.inputs]


def _shaping(opts: PackOptions) -> dict:
    """The options that shape the rows (and so the part outputs)."""
    keys = ("seq_len", "patch_size", "val_every", "lookahead", "shard_size",
            "part_bytes" if opts.kind == "text" else "part_docs")
    return {k: getattr(opts, k) for k in keys}


def pack_identity(opts: PackOptions, source_ids: list | None = None) -> dict:
    """What a finished pack must match to be reused: inputs, tokenizer and every option that shapes the rows."""
    return {"kind": opts.kind, "inputs": _source_ids(opts) if source_ids is None else source_ids,
            "tokenizer_sha256": file_sha256(opts.tokenizer), **_shaping(opts)}


def list_pack_parts(opts: PackOptions) -> list[list[sources.Part]]:
    """The parts of the inputs in a fixed order (independent of the number of ranks); a part is a list of pieces.

    text: byte-range pieces of at most `part_bytes` (sources.text_pieces), consecutive pieces grouped until
    a group holds `part_bytes` (a remote file, whose size is unknown here, ends its group);
    pairs/interleaved: `part_docs` documents of one precompute output, Part(root, start, stop).
    """
    if opts.part_bytes < 1 or opts.part_docs < 1:
        raise ValueError("--part-bytes and --part-docs must be positive")
    parts: list[list[sources.Part]] = []
    if opts.kind == "text":
        group: list[sources.Part] = []
        size = 0
        for piece in sources.text_pieces(opts.inputs, opts.part_bytes):
            n = sources.piece_bytes(piece)
            group.append(piece)
            size += n
            if size >= opts.part_bytes or storage.is_remote(piece.path):
                parts.append(group)
                group, size = [], 0
        return parts + ([group] if group else [])
    for root in opts.inputs:
        n = sum(s["samples"] for s in _mds_shards(root))
        parts += [[sources.Part(root, s, min(s + opts.part_docs, n))] for s in range(0, n, opts.part_docs)]
    return parts


def _piece_id(piece: sources.Part, source_ids: dict) -> list:
    """A piece and the evidence that its input is unchanged (file stamp, or the precompute output's checksums)."""
    return [piece.path, piece.start, piece.stop, source_ids[piece.path]]


def part_identity(k: int, part: list[sources.Part], opts: PackOptions, source_ids: dict, tok_sha: str) -> dict:
    """What a finished part must match to be reused: its pieces (with their inputs' evidence) and the shaping."""
    return {"part": k, "kind": opts.kind, "pieces": [_piece_id(p, source_ids) for p in part],
            "tokenizer_sha256": tok_sha, **_shaping(opts)}


def _marker(out: str, k: int) -> str:
    return storage.join(out, "parts", f"part-{k:05d}.json")


def _part_out(out: str, split: str, k: int) -> str:
    return storage.join(out, split, f"part-{k:05d}")


def part_mismatch(out: str, k: int, ident: dict) -> list[str] | None:
    """None when part k is finished with identity `ident`; else the differing fields (["unfinished"] if not done)."""
    if not storage.exists(_marker(out, k)):
        return ["unfinished"]
    have = storage.read_json(_marker(out, k)).get("identity", {})
    return sorted(f for f in ident if have.get(f) != ident[f]) or None


def _splits(opts: PackOptions) -> tuple[str, ...]:
    return ("train", "val") if opts.val_every > 0 else ("train",)


def pack_part(k: int, part: list[sources.Part], opts: PackOptions, tok: Tokenizer, P: int, dtype: str,
              identity: dict, bar: tqdm) -> dict:
    """Tokenise and pack one part into OUT/<split>/part-K (fresh), then write its marker OUT/parts/part-K.json
    (identity, per-split counts, skipped documents) last."""
    t0 = time.time()
    skips = sources.SkipLog()
    writers = {s: _SplitWriter(_part_out(opts.out, s, k), opts.seq_len, P, opts.lookahead, dtype, opts.shard_size)
               for s in _splits(opts)}
    if opts.kind == "text":
        texts = (t for piece in part for t in sources.read_text_piece(piece, skips, opts.strict))
        docs = _text_units(texts, tok)
    else:
        docs = (d for piece in part for d in image_docs(piece.path, tok, piece.start, piece.stop))
    for i, doc in enumerate(docs):
        to_val = opts.val_every > 0 and i % opts.val_every == opts.val_every - 1
        writers["val" if to_val else "train"].push(doc)
        bar.update(1)
    report = {"part": k, "splits": {s: w.finish() for s, w in writers.items()}, **skips.to_json("skipped_documents"),
              "seconds": round(time.time() - t0, 3), "identity": identity}
    storage.write_json(_marker(opts.out, k), report)
    return report


def wait_for_parts(out: str, idents: list[dict], timeout: float) -> None:
    """Block until every part has its marker with the expected identity (other ranks still packing)."""
    t0 = time.time()
    while missing := [k for k, ident in enumerate(idents) if part_mismatch(out, k, ident)]:
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{out}: parts {missing[:10]} unfinished after {timeout:.0f}s; rerun the same command "
                               "(finished parts are kept) or `--merge-only` once all ranks are done")
        time.sleep(1.0)


def finalize(opts: PackOptions, n_parts: int, meta: dict, P: int) -> dict:
    """Merge the part indexes of each split, write OUT/<split>/pack.json; returns the summed report (without
    identity)."""
    out = opts.out
    reps = [storage.read_json(_marker(out, k)) for k in range(n_parts)]
    report = dict(meta)
    for split in _splits(opts):
        counts = {key: sum(r["splits"][split][key] for r in reps) for key in _STAT_KEYS}
        index_files = [storage.join(_part_out(out, split, k), "index.json") for k in range(n_parts)]
        index_files = [f for f in index_files if storage.exists(f)]
        merged = storage.join(out, split, "index.json")
        if not storage.is_remote(out):
            Path(merged).unlink(missing_ok=True)  # a rerun re-merges
        merge_index(index_files, storage.join(out, split), keep_local=not storage.is_remote(out))
        report[split] = split_stats(opts.seq_len, P, counts)
        storage.write_bytes(storage.join(out, split, "pack.json"),
                            (json.dumps({**meta, **report[split]}, indent=2) + "\n").encode())
    skips = sources.SkipLog()
    for r in reps:
        skips.counts.update(r.get("skipped_documents", {}))
        skips.merge(r.get("named", []), r.get("named_left_out", 0))
    report["parts"] = n_parts
    report["skipped_documents"] = dict(sorted(skips.counts.items()))
    report["named"], report["named_left_out"] = skips.named, skips.named_left_out
    return report


def _previous(out: str, identity: dict) -> dict | None:
    """The report of a finished identical pack in `out`; ValueError for another pack; None to (re)pack."""
    done = storage.join(out, "pack.json")
    if storage.exists(done):
        rep = storage.read_json(done)
        diff = sorted(k for k in identity if rep.get("identity", {}).get(k) != identity[k])
        if not diff:
            return rep
        raise ValueError(f"{out}: holds a pack of other inputs or options (differs in {diff}); use a new --out, "
                         f"or delete {out} to repack there")
    if storage.list_dir(storage.join(out, "parts")) or any(storage.exists(storage.join(out, s))
                                                           for s in ("train", "val")):
        print(f"[pack] {out}: left by an unfinished run (no pack.json); keeping its finished parts whose identity "
              "matches and packing the rest")
    return None


def run(opts: PackOptions, rank_and_world: tuple[int, int] | None = None) -> dict | None:
    """Pack this rank's parts; on rank 0 wait for all, merge and write pack.json. Returns the pack report on
    rank 0 (an identical finished pack is reused), None on the other ranks.

    `rank_and_world` defaults to the launcher's (contract.dist_env: RANK/WORLD_SIZE or SLURM_*).
    """
    t0 = time.time()
    if rank_and_world is None:
        env = detect_env()
        rank, world = env.rank, env.world_size
    else:
        rank, world = rank_and_world
    tok = Tokenizer(opts.tokenizer)
    if not storage.is_remote(opts.out):
        Path(opts.out).mkdir(parents=True, exist_ok=True)
    source_list = _source_ids(opts)
    identity = pack_identity(opts, source_list)
    if (rep := _previous(opts.out, identity)) is not None:
        print(f"[pack] {opts.out}: already packed from the same inputs and options; nothing to do")
        return rep if rank == 0 else None
    meta = {"kind": opts.kind, "seq_len": opts.seq_len, "patch_size": opts.patch_size, "latent_shape": None,
            "dtype": "fp16"}
    P = 0
    if opts.kind != "text":
        im = _image_meta(opts.inputs)
        C, h, w = im["latent_shape"]
        if h % opts.patch_size or w % opts.patch_size:
            raise ValueError(f"latent {h}x{w} is not divisible by --patch-size {opts.patch_size}")
        P = patches_per_image(h, w, opts.patch_size)
        meta.update(latent_shape=[C, h, w], dtype=im["dtype"])
    Packer(opts.seq_len, P)  # fail early (every rank) when an image cannot fit a row
    files = sources.text_files(opts.inputs) if opts.kind == "text" else opts.inputs
    by_path = {f: s for f, s in zip(files, source_list)}
    parts = list_pack_parts(opts)
    if not parts:
        raise ValueError(f"{opts.inputs}: nothing to pack (the inputs are empty); check --input")
    idents = [part_identity(k, p, opts, by_path, identity["tokenizer_sha256"]) for k, p in enumerate(parts)]
    if not opts.merge_only:
        mine = [k for k in range(len(parts)) if k % world == rank]
        todo = []
        for k in mine:
            diff = part_mismatch(opts.out, k, idents[k])
            if diff and diff != ["unfinished"]:
                print(f"[pack rank {rank}] part-{k:05d} was packed from other inputs or options (differs in {diff}); "
                      "redoing it")
            todo += [k] if diff else []
        print(f"[pack rank {rank}/{world}] {len(parts)} parts, {len(mine)} mine, {len(mine) - len(todo)} already done",
              flush=True)
        with tqdm(desc=f"pack rank {rank}", unit="doc", mininterval=0.1 if sys.stderr.isatty() else 30.0,
                  disable=None) as bar:
            for k in todo:
                pack_part(k, parts[k], opts, tok, P, meta["dtype"], idents[k], bar)
    if rank != 0:
        return None
    wait_for_parts(opts.out, idents, opts.wait_timeout)
    report = finalize(opts, len(parts), meta, P)
    report["tokenizer"] = opts.tokenizer if storage.is_remote(opts.tokenizer) else str(Path(opts.tokenizer).resolve())
    report["seconds"] = round(time.time() - t0, 2)
    report["identity"] = identity
    storage.write_bytes(storage.join(opts.out, "pack.json"), (json.dumps(report, indent=2) + "\n").encode())  # last
    print(json.dumps({k: v for k, v in report.items() if k not in ("identity", "named")}))
    return report


def main(argv: list[str] | None = None) -> None:
    """CLI: pack one source (see --help)."""
    run(PackOptions(**vars(build_parser().parse_args(argv))))


if __name__ == "__main__":
    main()
