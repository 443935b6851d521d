"""Sentencepiece tokenizer with fixed special ids (BOS, EOS, BOI, EOI, PAD) recorded beside the model.

Train one from text files, or wrap any existing sentencepiece `.model` (Llama 2's works): the
special ids live in `<model>.json` next to it (format and reader: `contract.special_ids`), which
the run config reads for `model.vocab_size`.
Run `python -m data_pipeline.tokenizer --help`.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from contract.special_ids import SpecialIds, load_special_ids, save_special_ids

BOI_PIECE, EOI_PIECE, PAD_PIECE = "<boi>", "<eoi>", "<pad>"


def _special_ids_for(sp: spm.SentencePieceProcessor) -> SpecialIds:
    """Derive special ids from a processor: BOS/EOS its own; BOI/EOI/PAD its pieces or appended ids."""
    n = sp.get_piece_size()
    extra = n
    ids = {}
    for name, piece in (("boi_id", BOI_PIECE), ("eoi_id", EOI_PIECE), ("pad_id", PAD_PIECE)):
        pid = sp.piece_to_id(piece)
        if pid != sp.unk_id() and sp.id_to_piece(pid) == piece:
            ids[name] = pid
        elif name == "pad_id" and sp.pad_id() >= 0:
            ids[name] = sp.pad_id()
        else:  # not in the model (e.g. Llama 2): append new ids after the vocabulary
            ids[name] = extra
            extra += 1
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise ValueError("the sentencepiece model has no BOS/EOS ids; train it with bos_id/eos_id set")
    return SpecialIds(vocab_size=extra, bos_id=sp.bos_id(), eos_id=sp.eos_id(), **ids)


def wrap(model_path: str | Path) -> SpecialIds:
    """Record the special ids of an existing sentencepiece model in `<model>.json`; returns them."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    ids = _special_ids_for(sp)
    save_special_ids(ids, model_path)
    return ids


def train(texts: Iterable[str], out_model: str | Path, vocab_size: int = 1000, seed: int = 0) -> SpecialIds:
    """Train a unigram sentencepiece model on `texts`, write `out_model` and its metadata."""
    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for t in texts if t.strip()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=3,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        user_defined_symbols=[BOI_PIECE, EOI_PIECE],
        num_threads=1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    out_model.write_bytes(buf.getvalue())
    return wrap(out_model)


class Tokenizer:
    """Encode/decode text with a sentencepiece model; special ids from its metadata."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: sentencepiece model not found (data.tokenizer)")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.ids = load_special_ids(self.path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (faster)."""
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special and appended ids are dropped."""
        n = self.sp.get_piece_size()
        skip = {self.ids.bos_id, self.ids.eos_id, self.ids.boi_id, self.ids.eoi_id, self.ids.pad_id}
        return self.sp.decode([i for i in ids if i < n and i not in skip])


def _read_text_files(paths: list[str]) -> Iterator[str]:
    """Lines of .txt files and the `text` field of .jsonl files."""
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                if p.endswith(".jsonl"):
                    if line.strip():
                        yield json.loads(line).get("text", "")
                else:
                    yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> None:
    """CLI: `train` a tokenizer from text files, or `wrap` an existing .model with special ids."""
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.tokenizer", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model from .txt / .jsonl files")
    t.add_argument("--input", nargs="+", required=True, help=".txt (one text a line) or .jsonl ({'text': ...})")
    t.add_argument("--out", required=True, help="output .model path; <out>.json gets the special ids")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--seed", type=int, default=0)
    w = sub.add_parser("wrap", help="record special ids for an existing sentencepiece .model (e.g. Llama 2)")
    w.add_argument("--model", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        ids = train(_read_text_files(args.input), args.out, args.vocab_size, args.seed)
    else:
        ids = wrap(args.model)
    print(json.dumps(asdict(ids)))


if __name__ == "__main__":
    main()
