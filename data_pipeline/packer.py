"""The bin-packing algorithm: documents into rows of exactly `seq_len` positions with a segment table.

A document is a list of units: text (token ids, splittable anywhere), image (one latent,
P+2 positions with BOI/EOI, never split) and pair (caption tokens + one latent, laid out caption-
or image-first at load time, P+4 positions + caption incl. BOS/EOS, never split). Each row is
filled by (1) the continuations of documents split at the end of earlier rows, (2) a subset of
whole documents from a look-ahead buffer chosen by subset-sum to fill the row as exactly as
possible, (3) a prefix of the oldest buffered document that starts with text (the rest continues
in the next row). Only what is left is padding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from contract.positions import image_positions, pair_positions

TEXT, IMAGE, PAIR = 0, 1, 2


@dataclass
class Unit:
    """One unit of a document: TEXT (tokens), IMAGE (latent) or PAIR (caption tokens + latent)."""

    kind: int
    tokens: list[int] = field(default_factory=list)
    latent: np.ndarray | None = None  # (C, h, w)


@dataclass
class Row:
    """One packed sequence: concatenated text tokens, segments (doc, kind, ntok, image), latents."""

    seq_len: int
    P: int
    tokens: list[int] = field(default_factory=list)
    segs: list[tuple[int, int, int, int]] = field(default_factory=list)
    latents: list[np.ndarray] = field(default_factory=list)
    used: int = 0
    docs: int = 0

    @property
    def remaining(self) -> int:
        return self.seq_len - self.used

    def add_unit(self, doc: int, u: Unit) -> None:
        n = unit_len(u, self.P)
        assert n <= self.remaining
        img = -1
        if u.kind != TEXT:
            img = len(self.latents)
            self.latents.append(u.latent)
        self.tokens += u.tokens
        self.segs.append((doc, u.kind, len(u.tokens), img))
        self.used += n


def unit_len(u: Unit, P: int) -> int:
    """Positions a unit takes: text = its tokens; image = BOI + P + EOI; pair = caption + BOS/EOS + P + 2."""
    return positions_of(u.kind, len(u.tokens), P)


def positions_of(kind: int, ntok: int, P: int) -> int:
    """Positions of a unit of `kind` with `ntok` text tokens (see unit_len)."""
    if kind == TEXT:
        return ntok
    return ntok + image_positions(P) if kind == IMAGE else pair_positions(P, ntok)


def doc_len(doc: list[Unit], P: int) -> int:
    return sum(unit_len(u, P) for u in doc)


def place_prefix(row: Row, doc: list[Unit]) -> list[Unit]:
    """Put as many leading units of `doc` into `row` as fit (splitting text); return the rest."""
    d = row.docs
    placed = False
    i = 0
    while i < len(doc) and row.remaining > 0:
        u = doc[i]
        n = unit_len(u, row.P)
        if n <= row.remaining:
            row.add_unit(d, u)
        elif u.kind == TEXT:
            k = row.remaining
            row.add_unit(d, Unit(TEXT, u.tokens[:k]))
            doc = [Unit(TEXT, u.tokens[k:])] + doc[i + 1 :]
            i = -1
            placed = True
            break
        else:
            break
        placed = True
        i += 1
    if placed:
        row.docs += 1
    return doc if i == -1 else doc[i:]


def best_subset(lengths: list[int], cap: int) -> list[int]:
    """Indices of a subset of `lengths` with the largest sum <= cap, preferring earlier items."""
    reach = [1]  # reach[k]: bitset of sums reachable with items[:k]
    mask = (1 << (cap + 1)) - 1
    for n in lengths:
        r = reach[-1]
        reach.append((r | (r << n)) & mask if n <= cap else r)
    best = reach[-1].bit_length() - 1
    picked, s = [], best
    for k in range(len(lengths), 0, -1):
        if not (reach[k - 1] >> s) & 1:  # not reachable without item k-1: take it
            picked.append(k - 1)
            s -= lengths[k - 1]
    return picked[::-1]


class Packer:
    """Streams documents in, rows out; `efficiency` = real positions / all positions so far."""

    def __init__(self, seq_len: int, patches_per_image: int, lookahead: int = 64):
        if pair_positions(patches_per_image) > seq_len:
            raise ValueError(f"an image needs {pair_positions(patches_per_image)} positions, more than "
                             f"seq_len={seq_len}")
        self.seq_len, self.P, self.lookahead = seq_len, patches_per_image, lookahead
        self.buffer: deque[list[Unit]] = deque()
        self.pending: deque[list[Unit]] = deque()
        self.rows = 0
        self.real = 0
        self.causal_pairs = 0  # sum over documents (and padding) of n(n+1)/2: causal attention pairs

    @property
    def efficiency(self) -> float:
        return self.real / max(1, self.rows * self.seq_len)

    def pack(self, docs: Iterable[list[Unit]]) -> Iterator[Row]:
        """Rows of exactly seq_len positions (the last may be partly padding)."""
        for doc in docs:
            if (row := self.push(doc)) is not None:
                yield row
        yield from self.drain()

    def push(self, doc: list[Unit]) -> Row | None:
        """Take one document; return the row it completes, if any (the streaming form of `pack`)."""
        if doc:
            self.buffer.append(self._clip(doc))
        return self._fill() if len(self.buffer) >= self.lookahead else None

    def drain(self) -> Iterator[Row]:
        """The rows left once every document has been pushed (the last may be partly padding)."""
        while self.buffer or self.pending:
            yield self._fill()

    def _clip(self, doc: list[Unit]) -> list[Unit]:
        """Truncate pair captions that would not fit in a row with their image."""
        cap = self.seq_len - pair_positions(self.P)
        return [Unit(u.kind, u.tokens[:cap], u.latent) if u.kind == PAIR else u for u in doc]

    def _fill(self) -> Row:
        row = Row(self.seq_len, self.P)
        for _ in range(len(self.pending)):  # continuations first, in order
            rest = place_prefix(row, self.pending.popleft())
            if rest:
                self.pending.append(rest)
        progress = True
        while row.remaining > 0 and self.buffer and progress:
            progress = self._fill_whole(row) or self._fill_split(row)
        self.rows += 1
        self.real += row.used
        self.causal_pairs += row_causal_pairs(row)
        return row

    def _fill_whole(self, row: Row) -> bool:
        """Place the subset of whole buffered documents that fills the row best."""
        docs = list(self.buffer)
        lens = [doc_len(d, self.P) for d in docs]
        pick = best_subset(lens, row.remaining)
        if not pick:
            return False
        chosen = set(pick)
        for i in pick:
            rest = place_prefix(row, docs[i])
            assert not rest
        self.buffer = deque(d for i, d in enumerate(docs) if i not in chosen)
        return True

    def _fill_split(self, row: Row) -> bool:
        """Start the oldest buffered document that begins with text; its rest continues next row."""
        for i, d in enumerate(self.buffer):
            if d[0].kind == TEXT:
                del self.buffer[i]
                rest = place_prefix(row, d)
                if rest:
                    self.pending.append(rest)
                return True
        return False


def row_causal_pairs(row: Row) -> int:
    """Query-key pairs a causal mask allows within each document of `row` (padding counted as one document).

    The pretrain estimate adds the bidirectional pairs of each image to this (pretrain/plan/estimate.py).
    """
    lens: dict[int, int] = {}
    for doc, kind, ntok, _ in row.segs:
        lens[doc] = lens.get(doc, 0) + positions_of(kind, ntok, row.P)
    pad = row.seq_len - row.used
    return sum(n * (n + 1) // 2 for n in [*lens.values(), pad])


def row_arrays(row: Row) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(tokens int32, segs (S, 4) int32, latents (N, C, h, w) or None) of a row for MDS."""
    toks = np.asarray(row.tokens, dtype=np.int32)
    segs = np.asarray(row.segs, dtype=np.int32).reshape(-1, 4)
    lat = np.stack(row.latents) if row.latents else None
    return toks, segs, lat
