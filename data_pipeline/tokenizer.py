"""Sentencepiece tokenizer with fixed special ids (BOS, EOS, BOI, EOI, PAD) recorded beside the model.

Train one from text files, or wrap any existing sentencepiece `.model` (Llama 2's works): the
special ids live in `<model>.json` next to it (format and reader: `contract.special_ids`), which
the run config reads for `model.vocab_size`.
Run `python -m data_pipeline.tokenizer --help`.

A trained tokenizer is lossless, as Llama 2's: `decode(encode(s)) == s` for any Unicode string
(byte fallback, identity normalisation, whitespace kept). BOI/EOI/PAD are *control* symbols (or ids
appended after a wrapped model's vocabulary), so no user text can encode to them: the string
"<boi>" in a document is ordinary text and decodes back to "<boi>".
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from contract.special_ids import SpecialIds, load_special_ids, meta_path, save_special_ids
from data_pipeline import sources

BOI_PIECE, EOI_PIECE, PAD_PIECE = "<boi>", "<eoi>", "<pad>"
# sentencepiece skips training sentences longer than max_sentence_length (bytes; default 4192) without a
# word when its log is off: documents are cut into chunks of at most this many bytes instead.
MAX_CHUNK_BYTES = 8192


def _special_ids_for(sp: spm.SentencePieceProcessor) -> SpecialIds:
    """Derive special ids from a processor: BOS/EOS its own; BOI/EOI/PAD its control pieces or appended ids.

    A `<boi>`/`<eoi>`/`<pad>` piece that is not a control symbol (e.g. user-defined) is producible
    by `encode` of user text, so it stays ordinary text and the special gets a new id instead.
    """
    n = sp.get_piece_size()
    extra = n
    ids = {}
    for name, piece in (("boi_id", BOI_PIECE), ("eoi_id", EOI_PIECE), ("pad_id", PAD_PIECE)):
        pid = sp.piece_to_id(piece)
        if pid != sp.unk_id() and sp.id_to_piece(pid) == piece and sp.is_control(pid):
            ids[name] = pid
        elif name == "pad_id" and sp.pad_id() >= 0:
            ids[name] = sp.pad_id()
        else:  # not in the model (e.g. Llama 2): append new ids after the vocabulary
            ids[name] = extra
            extra += 1
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise ValueError("the sentencepiece model has no BOS/EOS ids; train it with bos_id/eos_id set")
    return SpecialIds(vocab_size=extra, bos_id=sp.bos_id(), eos_id=sp.eos_id(), **ids)


def _add_meta(model_path: str | Path, **extra: dict) -> None:
    """Add descriptive keys (what the model does, how it was trained) to `<model>.json` beside the special ids."""
    path = meta_path(model_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=2) + "\n")


def describe(model_proto: bytes) -> dict:
    """What a sentencepiece model does to text: normaliser, byte fallback, whitespace folding, lossless or not."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_proto)
    ns = m.normalizer_spec
    normalises = bool(ns.precompiled_charsmap) and ns.name != "identity"
    d = {"normalization": ns.name or "nmt_nfkc", "byte_fallback": m.trainer_spec.byte_fallback,
         "remove_extra_whitespaces": ns.remove_extra_whitespaces, "add_dummy_prefix": ns.add_dummy_prefix}
    d["lossless"] = bool(d["byte_fallback"] and not normalises and not ns.remove_extra_whitespaces)
    return d


def wrap(model_path: str | Path) -> SpecialIds:
    """Record the special ids of an existing sentencepiece model in `<model>.json`; returns them.

    The metadata also records `describe()` of the model; a lossy model (no byte fallback, a
    normaliser, or whitespace folding) is accepted with a warning saying what it changes.
    """
    raw = Path(model_path).read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=raw)
    ids = _special_ids_for(sp)
    info = describe(raw)
    if not info["lossless"]:
        warnings.warn(f"{model_path}: this tokenizer changes text ({info}): characters outside its vocabulary become "
                      "<unk> without byte_fallback, a normaliser rewrites characters, remove_extra_whitespaces folds "
                      "spaces and newlines; train one with `python -m data_pipeline.tokenizer train` for a lossless "
                      "one",
                      stacklevel=2)
    save_special_ids(ids, model_path)
    _add_meta(model_path, model=info)
    return ids


def chunk_text(text: str, max_bytes: int = MAX_CHUNK_BYTES) -> list[str]:
    """Cut `text` into pieces of at most `max_bytes` UTF-8 bytes, at a newline, else a space, else a character.

    Concatenating the pieces gives `text` back. Used so that sentencepiece trains on long documents
    (a whole .txt file is one document); linear in the length of `text`.
    """
    data = text.encode("utf-8")
    out: list[str] = []
    start = 0
    while len(data) - start > max_bytes:
        window = data[start : start + max_bytes]
        cut = max(window.rfind(b"\n"), window.rfind(b" ")) + 1  # ASCII bytes never occur inside a multi-byte character
        if cut <= 1:  # no break (or only at the start): cut before the character that crosses max_bytes
            cut = max_bytes
            while cut > 0 and data[start + cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                cut -= 1
            if cut == 0:  # max_bytes is smaller than this character: the whole character
                cut = 1
                while start + cut < len(data) and data[start + cut] & 0xC0 == 0x80:
                    cut += 1
        out.append(data[start : start + cut].decode("utf-8"))
        start += cut
    if start < len(data):
        out.append(data[start:].decode("utf-8"))
    return out


@dataclass
class TrainReport:
    """What training used: documents, chunks of long documents, skipped empty ones, pieces asked/got.

    `records_skipped`/`named`/`named_left_out`: input lines that could not be read, per reason and by
    name (`sources.SkipLog`, the same keys as precompute's report.json).
    """

    documents: int = 0
    long_documents_chunked: int = 0
    chunks: int = 0
    skipped_empty: int = 0
    vocab_asked: int = 0
    pieces: int = 0
    records_skipped: dict = field(default_factory=dict)
    named: list = field(default_factory=list)
    named_left_out: int = 0


def _chunks(texts: Iterable[str], rep: TrainReport) -> Iterator[str]:
    for t in texts:
        rep.documents += 1
        if not isinstance(t, str) or not t.strip():
            rep.skipped_empty += 1
            continue
        parts = chunk_text(t)
        rep.long_documents_chunked += len(parts) > 1
        rep.chunks += len(parts)
        yield from parts


def train(texts: Iterable[str], out_model: str | Path, vocab_size: int = 1000, seed: int = 0,
          skips: sources.SkipLog | None = None) -> SpecialIds:
    """Train a lossless unigram sentencepiece model on `texts`, write `out_model` and its metadata.

    Options as Llama 2's tokenizer was trained (byte_fallback, identity normalisation, no whitespace
    folding, split digits, whitespace-only pieces); BOI/EOI are control symbols. Long documents are
    chunked (`chunk_text`), empty ones skipped and counted; the counts go to `<model>.json` under
    `training`, with the input lines `skips` recorded while `texts` was read (`sources.iter_texts`),
    which are also summarised on stderr. Fewer pieces than `vocab_size` (the text supports no more) is
    a warning with the reason. Raises ValueError when `vocab_size` cannot hold the 256 byte pieces, the
    specials and the characters.
    """
    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    rep = TrainReport(vocab_asked=vocab_size)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts, rep), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
            character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            max_sentence_length=4 * MAX_CHUNK_BYTES, pad_id=3, unk_id=0, bos_id=1, eos_id=2,
            control_symbols=[BOI_PIECE, EOI_PIECE], num_threads=1, minloglevel=2, hard_vocab_limit=False,
        )
    except RuntimeError as e:
        raise ValueError(f"tokenizer training failed for --vocab-size {vocab_size}: {e} (with byte fallback the "
                         "vocabulary holds 256 byte pieces + 5 specials + every distinct character)") from e
    out_model.write_bytes(buf.getvalue())
    rep.pieces = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    if rep.pieces < vocab_size:
        warnings.warn(f"{out_model}: vocabulary of {rep.pieces} pieces, fewer than --vocab-size {vocab_size}: the "
                      f"training "
                      f"text ({rep.documents} documents, {rep.chunks} chunks) has no more distinct sub-words worth a "
                      "piece; give more varied text or ask for a smaller vocabulary", stacklevel=2)
    if skips is not None:
        vars(rep).update(skips.to_json("records_skipped"))  # TrainReport's fields of the same names
        if skips.counts:
            print(skips.summary(f"[tokenizer] {out_model}: input lines") + f"; all named in {meta_path(out_model)}",
                  file=sys.stderr)
    ids = wrap(out_model)
    _add_meta(out_model, training=asdict(rep))
    return ids


class Tokenizer:
    """Encode/decode text with a sentencepiece model; special ids from its metadata."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: sentencepiece model not found (data.tokenizer)")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.ids = load_special_ids(self.path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS; never a special id (BOI/EOI/PAD are control symbols)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (faster)."""
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special and appended ids are dropped."""
        n = self.sp.get_piece_size()
        skip = {self.ids.bos_id, self.ids.eos_id, self.ids.boi_id, self.ids.eoi_id, self.ids.pad_id}
        return self.sp.decode([i for i in ids if i < n and i not in skip])


def main(argv: list[str] | None = None) -> None:
    """CLI: `train` a tokenizer from text files, or `wrap` an existing .model with special ids."""
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.tokenizer", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model from .txt / .jsonl files")
    t.add_argument("--input", nargs="+", required=True,
                   help=".jsonl ({'text': ...} a line), .txt (one document a file) or folders of them, as pack reads "
                        "them")
    t.add_argument("--out", required=True, help="output .model path; <out>.json gets the special ids")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--strict", action="store_true",
                   help="stop at the first bad input line (default: skip it, count and name it in <out>.json)")
    w = sub.add_parser("wrap", help="record special ids for an existing sentencepiece .model (e.g. Llama 2)")
    w.add_argument("--model", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        skips = sources.SkipLog()
        train(sources.iter_texts(args.input, skips, args.strict), args.out, args.vocab_size, args.seed, skips)
    else:
        wrap(args.model)
    print(meta_path(args.out if args.cmd == "train" else args.model).read_text())


if __name__ == "__main__":
    main()
