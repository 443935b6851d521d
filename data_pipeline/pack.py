"""Tokenize documents, pack them into `seq_len` rows and write MDS shards (one dataset per source).

Text sources read raw .jsonl/.txt; pairs and interleaved sources read the output of
`data_pipeline.precompute` (documents with their latents). Writes `OUT/train` (and `OUT/val`
with `--val-every N`: every N-th document goes to validation) plus `OUT/pack.json` with the
packing efficiency. Run `python -m data_pipeline.pack --help`.

`OUT/pack.json` is written last and records the pack's identity (input files' stamps or the
precompute outputs' checksums, the tokenizer's checksum, the shaping options). A rerun with the same
identity does nothing; with another identity it stops and asks for a new `--out`; a crashed run
(split directories without pack.json) is redone.
"""


from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from streaming import MDSWriter
from streaming.base.format import reader_from_json
from tqdm import tqdm

from contract import latents as latent_codec
from contract.positions import patches_per_image
from data_pipeline import sources
from data_pipeline.packer import IMAGE, PAIR, TEXT, Packer, Unit, row_arrays
from data_pipeline.tokenizer import Tokenizer

PACKED_COLUMNS = {"tokens": "ndarray:int32", "segs": "ndarray:int32", "n_real": "int"}


def read_mds(root: str | Path) -> Iterator[dict]:
    """Every sample of a local MDS dataset, in index order; a corrupt shard's error names it."""
    root = Path(root)
    index = root / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: not an MDS dataset (run data_pipeline.precompute first)")
    for shard in json.loads(index.read_text())["shards"]:
        reader = reader_from_json(str(root), None, shard)
        name = shard["raw_data"]["basename"]
        for i in range(shard["samples"]):
            try:
                yield reader.get_item(i)
            except Exception as e:  # noqa: BLE001 - re-raised with the shard's name
                raise ValueError(f"{root / name}: corrupt shard (sample {i}): {e}") from e


def text_docs(inputs: list[str], tok: Tokenizer, batch: int = 256, skips: sources.SkipLog | None = None,
              strict: bool = False) -> Iterator[list[Unit]]:
    """Each text document as one text unit: BOS + tokens + EOS; bad input lines go to `skips` (see iter_texts)."""
    ids = tok.ids
    buf: list[str] = []
    for text in sources.iter_texts(inputs, skips, strict):
        buf.append(text)
        if len(buf) == batch:
            yield from ([Unit(TEXT, [ids.bos_id, *t, ids.eos_id])] for t in tok.encode_batch(buf))
            buf = []
    if buf:
        yield from ([Unit(TEXT, [ids.bos_id, *t, ids.eos_id])] for t in tok.encode_batch(buf))


def image_docs(root: str, tok: Tokenizer) -> Iterator[list[Unit]]:
    """Documents from a precompute output: pairs as one PAIR unit, interleaved as text/image units."""
    ids = tok.ids
    for s in read_mds(root):
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


def write_rows(packer: Packer, docs: Iterable[list[Unit]], out: Path, dtype: latent_codec.LatentDtype,
               shard_size: int) -> tuple[int, int]:
    """Pack `docs` and write every row to an MDS dataset at `out`, latents stored as `dtype`; returns (rows, images)."""
    key, encoding = latent_codec.COLUMNS[dtype]
    cols = dict(PACKED_COLUMNS, **{key: encoding})
    n = n_img = 0
    with MDSWriter(out=str(out), columns=cols, size_limit=shard_size) as w:
        for row in tqdm(packer.pack(docs), desc=f"pack {out.name}", unit="seq", disable=None):
            toks, segs, lat = row_arrays(row)
            # exact: the values came from this dtype; a row without images stores a placeholder (segs say 0 images)
            lat = latent_codec.placeholder(dtype) if lat is None else latent_codec.encode(lat, dtype)
            if len(toks) == 0:
                toks = np.zeros(1, np.int32)
            w.write({"tokens": toks, "segs": segs, "n_real": row.used, key: lat})
            n += 1
            n_img += len(row.latents)
    return n, n_img


def pack_split(packer: Packer, docs: Iterable[list[Unit]], out: Path, meta: dict, shard_size: int) -> dict:
    """Pack `docs` into the MDS dataset `out` and write `out/pack.json` (meta + the split's statistics).

    `meta` holds kind, seq_len, patch_size, latent_shape and dtype (the latent storage dtype). Returns the
    statistics: rows, images, positions, real_positions, image_positions, efficiency and causal_pairs (what
    the loader's mix and pretrain.plan.estimate read)."""
    rows, n_img = write_rows(packer, docs, out, meta["dtype"], shard_size)
    stats = {"rows": rows, "images": n_img, "positions": rows * packer.seq_len, "real_positions": packer.real,
             "image_positions": n_img * packer.P, "efficiency": round(packer.efficiency, 6),
             "causal_pairs": packer.causal_pairs}
    (out / "pack.json").write_text(json.dumps({**meta, **stats}, indent=2) + "\n")
    return stats


def _split(docs: Iterator[list[Unit]], val_every: int, want_val: bool) -> Iterator[list[Unit]]:
    for i, d in enumerate(docs):
        if val_every > 0 and (i % val_every == val_every - 1) == want_val:
            yield d
        elif val_every <= 0 and not want_val:
            yield d


@dataclass
class PackOptions:
    """What `run` packs and how (the CLI flags, typed); Python callers build it directly."""

    kind: Literal["text", "pairs", "interleaved"]
    inputs: list[str]  # text: .jsonl/.txt files or folders; pairs/interleaved: precompute output directories
    tokenizer: str  # sentencepiece .model (special ids in <model>.json)
    out: str  # output directory: OUT/train, OUT/val, OUT/pack.json
    seq_len: int = 4096
    patch_size: int = 2
    val_every: int = 0  # every N-th document goes to OUT/val (0: no val)
    lookahead: int = 64  # documents considered when filling a row
    shard_size: int = 1 << 26  # bytes per MDS shard
    strict: bool = False  # stop at the first bad text line


def build_parser() -> argparse.ArgumentParser:
    """The CLI; its defaults are PackOptions' (dest names are its field names)."""
    d = PackOptions("text", [], "", "")
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.pack", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--kind", choices=("text", "pairs", "interleaved"), required=True)
    ap.add_argument("--input", dest="inputs", nargs="+", required=True,
                    help="text: .jsonl/.txt files or folders; pairs/interleaved: precompute output directories")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model (special ids in <model>.json)")
    ap.add_argument("--out", required=True, help="output directory: OUT/train, OUT/val, OUT/pack.json")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--patch-size", type=int, default=d.patch_size)
    ap.add_argument("--val-every", type=int, default=d.val_every, help="every N-th document goes to OUT/val (0: no val)")
    ap.add_argument("--lookahead", type=int, default=d.lookahead, help="documents considered when filling a row")
    ap.add_argument("--shard-size", type=int, default=d.shard_size, help="bytes per MDS shard")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first bad text line (default: skip it, count and name it in pack.json)")
    return ap


def _image_meta(inputs: list[str]) -> dict:
    metas = [json.loads((Path(p) / "latents.json").read_text()) for p in inputs]
    if any(m["latent_shape"] != metas[0]["latent_shape"] or m["dtype"] != metas[0]["dtype"] for m in metas):
        raise ValueError(f"{inputs}: precompute outputs disagree on latent_shape/dtype; pack them separately")
    return metas[0]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (what pack.json's identity records for the tokenizer and inputs)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack_identity(opts: PackOptions) -> dict:
    """What a finished pack must match to be reused: inputs, tokenizer and every option that shapes the rows."""
    if opts.kind == "text":
        inputs = [sources.file_stamp(f) for f in sources.text_files(opts.inputs)]
    else:
        inputs = [[str(Path(p).resolve()), file_sha256(Path(p) / "index.json"), file_sha256(Path(p) / "latents.json")]
                  for p in opts.inputs]
    return {"kind": opts.kind, "inputs": inputs, "tokenizer_sha256": file_sha256(Path(opts.tokenizer)),
            **{k: getattr(opts, k) for k in ("seq_len", "patch_size", "val_every", "lookahead", "shard_size")}}


def _previous(out: Path, identity: dict) -> dict | None:
    """The report of a finished identical pack in `out`; clears a crashed one; ValueError for another pack."""
    done = out / "pack.json"
    if done.is_file():
        rep = json.loads(done.read_text())
        diff = sorted(k for k in identity if rep.get("identity", {}).get(k) != identity[k])
        if not diff:
            return rep
        raise ValueError(f"{out}: holds a pack of other inputs or options (differs in {diff}); use a new --out, "
                         f"or delete {out} to repack there")
    for split in ("train", "val"):
        if (out / split).exists():
            print(f"[pack] {out / split}: left by an unfinished run (no pack.json); redoing it")
            shutil.rmtree(out / split)
    return None


def run(opts: PackOptions) -> dict:
    """Pack one source into OUT/train (+ OUT/val); returns the pack report (an identical finished pack is reused)."""
    t0 = time.time()
    tok = Tokenizer(opts.tokenizer)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = pack_identity(opts)
    if (rep := _previous(out, identity)) is not None:
        print(f"[pack] {out}: already packed from the same inputs and options; nothing to do")
        return rep
    meta = {"kind": opts.kind, "seq_len": opts.seq_len, "patch_size": opts.patch_size, "latent_shape": None, "dtype": "fp16"}
    P = 0
    if opts.kind != "text":
        im = _image_meta(opts.inputs)
        C, h, w = im["latent_shape"]
        if h % opts.patch_size or w % opts.patch_size:
            raise ValueError(f"latent {h}x{w} is not divisible by --patch-size {opts.patch_size}")
        P = patches_per_image(h, w, opts.patch_size)
        meta.update(latent_shape=[C, h, w], dtype=im["dtype"])

    skips = sources.SkipLog()

    def docs() -> Iterator[list[Unit]]:
        nonlocal skips
        if opts.kind == "text":
            skips = sources.SkipLog()  # each split re-reads the input: count its bad lines once
            return text_docs(opts.inputs, tok, skips=skips, strict=opts.strict)
        return (d for p in opts.inputs for d in image_docs(p, tok))

    report = dict(meta)
    for split in ("train", "val") if opts.val_every > 0 else ("train",):
        report[split] = pack_split(Packer(opts.seq_len, P, opts.lookahead),
                                   _split(docs(), opts.val_every, split == "val"), out / split, meta, opts.shard_size)
    report["skipped_documents"] = dict(sorted(skips.counts.items()))
    report["named"], report["named_left_out"] = skips.named, skips.named_left_out
    report["tokenizer"] = str(Path(opts.tokenizer).resolve())
    report["seconds"] = round(time.time() - t0, 2)
    report["identity"] = identity
    tmp = out / "pack.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "pack.json")  # the done marker, written last
    print(json.dumps({k: v for k, v in report.items() if k not in ("identity", "named")}))
    return report


def main(argv: list[str] | None = None) -> None:
    """CLI: pack one source (see --help)."""
    run(PackOptions(**vars(build_parser().parse_args(argv))))


if __name__ == "__main__":
    main()
