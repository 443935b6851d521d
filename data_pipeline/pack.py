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
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from streaming import MDSWriter
from streaming.base.format import reader_from_json
from tqdm import tqdm

from data_pipeline import sources
from data_pipeline.packing import IMAGE, PAIR, TEXT, Packer, Unit, row_arrays
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


def _latents_of(sample: dict) -> np.ndarray:
    """Latents of a precompute sample as float32 (fp16, or bf16 bits in uint16)."""
    if "latents" in sample:
        return sample["latents"].astype(np.float32)
    return (sample["latents_bf16"].astype(np.uint32) << 16).view(np.float32)


def image_docs(root: str, tok: Tokenizer) -> Iterator[list[Unit]]:
    """Documents from a precompute output: pairs as one PAIR unit, interleaved as text/image units."""
    ids = tok.ids
    for s in read_mds(root):
        lat = _latents_of(s)
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


def write_rows(packer: Packer, docs, out: Path, bf16: bool, shard_size: int) -> tuple[int, int]:
    """Pack `docs` and write every row to an MDS dataset at `out`; returns (rows, images)."""
    cols = dict(PACKED_COLUMNS, **({"latents_bf16": "ndarray:uint16"} if bf16 else {"latents": "ndarray:float16"}))
    n = n_img = 0
    with MDSWriter(out=str(out), columns=cols, size_limit=shard_size) as w:
        for row in tqdm(packer.pack(docs), desc=f"pack {out.name}", unit="seq", disable=None):
            toks, segs, lat = row_arrays(row)
            if lat is None:  # MDS cannot store empty arrays: a 1-element placeholder (segs say 0 images)
                lat = np.zeros((1, 1, 1, 1), np.uint16 if bf16 else np.float16)
            elif bf16:
                lat = torch.from_numpy(lat.astype(np.float32)).to(torch.bfloat16).view(torch.uint16).numpy()
            else:
                lat = lat.astype(np.float16)  # exact: the values came from fp16
            if len(toks) == 0:
                toks = np.zeros(1, np.int32)
            w.write({"tokens": toks, "segs": segs, "n_real": row.used, ("latents_bf16" if bf16 else "latents"): lat})
            n += 1
            n_img += len(row.latents)
    return n, n_img


def _split(docs: Iterator[list[Unit]], val_every: int, want_val: bool) -> Iterator[list[Unit]]:
    for i, d in enumerate(docs):
        if val_every > 0 and (i % val_every == val_every - 1) == want_val:
            yield d
        elif val_every <= 0 and not want_val:
            yield d


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.pack", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--kind", choices=("text", "pairs", "interleaved"), required=True)
    ap.add_argument("--input", nargs="+", required=True,
                    help="text: .jsonl/.txt files or folders; pairs/interleaved: precompute output directories")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model (special ids in <model>.json)")
    ap.add_argument("--out", required=True, help="output directory: OUT/train, OUT/val, OUT/pack.json")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=0, help="every N-th document goes to OUT/val (0: no val)")
    ap.add_argument("--lookahead", type=int, default=64, help="documents considered when filling a row")
    ap.add_argument("--shard-size", type=int, default=1 << 26, help="bytes per MDS shard")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first bad text line (default: skip it, count and name it in pack.json)")
    return ap


def _image_meta(inputs: list[str]) -> dict:
    metas = [json.loads((Path(p) / "latents.json").read_text()) for p in inputs]
    if any(m["latent_shape"] != metas[0]["latent_shape"] or m["dtype"] != metas[0]["dtype"] for m in metas):
        raise ValueError(f"{inputs}: precompute outputs disagree on latent_shape/dtype; pack them separately")
    return metas[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack_identity(args: argparse.Namespace) -> dict:
    """What a finished pack must match to be reused: inputs, tokenizer and every option that shapes the rows."""
    if args.kind == "text":
        inputs = [sources.file_stamp(f) for f in sources.text_files(args.input)]
    else:
        inputs = [[str(Path(p).resolve()), _sha256(Path(p) / "index.json"), _sha256(Path(p) / "latents.json")]
                  for p in args.input]
    return {"kind": args.kind, "inputs": inputs, "tokenizer_sha256": _sha256(Path(args.tokenizer)),
            **{k: getattr(args, k) for k in ("seq_len", "patch_size", "val_every", "lookahead", "shard_size")}}


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


def run(args: argparse.Namespace) -> dict:
    """Pack one source into OUT/train (+ OUT/val); returns the pack report (an identical finished pack is reused)."""
    t0 = time.time()
    tok = Tokenizer(args.tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = pack_identity(args)
    if (rep := _previous(out, identity)) is not None:
        print(f"[pack] {out}: already packed from the same inputs and options; nothing to do")
        return rep
    meta = {"kind": args.kind, "seq_len": args.seq_len, "patch_size": args.patch_size, "latent_shape": None, "dtype": "fp16"}
    P = 0
    if args.kind != "text":
        im = _image_meta(args.input)
        C, h, w = im["latent_shape"]
        if h % args.patch_size or w % args.patch_size:
            raise ValueError(f"latent {h}x{w} is not divisible by --patch-size {args.patch_size}")
        P = (h // args.patch_size) * (w // args.patch_size)
        meta.update(latent_shape=[C, h, w], dtype=im["dtype"])

    skips = sources.SkipLog()

    def docs() -> Iterator[list[Unit]]:
        nonlocal skips
        if args.kind == "text":
            skips = sources.SkipLog()  # each split re-reads the input: count its bad lines once
            return text_docs(args.input, tok, skips=skips, strict=args.strict)
        return (d for p in args.input for d in image_docs(p, tok))

    report = dict(meta)
    for split in ("train", "val") if args.val_every > 0 else ("train",):
        packer = Packer(args.seq_len, P, args.lookahead)
        rows, n_img = write_rows(packer, _split(docs(), args.val_every, split == "val"), out / split,
                                 meta["dtype"] == "bf16", args.shard_size)
        report[split] = {"rows": rows, "images": n_img, "positions": rows * args.seq_len, "real_positions": packer.real,
                         "image_positions": n_img * P, "efficiency": round(packer.efficiency, 6)}
        (out / split / "pack.json").write_text(json.dumps({**meta, **report[split]}, indent=2) + "\n")
    report["skipped_documents"] = dict(sorted(skips.counts.items()))
    report["named"], report["named_left_out"] = skips.named, skips.named_left_out
    report["tokenizer"] = str(Path(args.tokenizer).resolve())
    report["seconds"] = round(time.time() - t0, 2)
    report["identity"] = identity
    tmp = out / "pack.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "pack.json")  # the done marker, written last
    print(json.dumps({k: v for k, v in report.items() if k not in ("identity", "named")}))
    return report


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
