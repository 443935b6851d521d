"""Packing efficiency lost to parts: one Packer over the whole stream (baseline) against one Packer per part.

`data_pipeline.pack` packs each part on its own (so the output is byte-identical for any number of ranks);
a row never spans two parts, so each part ends with a few rows the look-ahead could not fill. This prints
the efficiency (real positions / all positions) for the whole stream and for parts of several sizes, with
the ratio to the baseline, for paper-shaped synthetic documents (seq_len 4096, 256-patch images, text lengths
log-normal as in bench/loader.py) and, with `--demo DIR`, for the demo data's three sources through the real
`pack.run` (DIR = a `python -m data_pipeline.demo_data` output).

Run: `python bench/pack_parts.py [--docs 40000] [--demo /path/to/demo]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.packer import IMAGE, PAIR, TEXT, Packer, Unit  # noqa: E402

SEQ, P = 4096, 256
LAT = np.zeros((1, 1, 1), np.float16)  # the efficiency does not depend on latent values


def docs(kind: str, n: int, seed: int = 0) -> list[list[Unit]]:
    """Synthetic documents with the length distributions of bench/loader.py (token ids do not matter)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if kind == "text":
            out.append([Unit(TEXT, [1] * (int(rng.lognormal(6.0, 1.3)) + 2))])
        elif kind == "pairs":
            out.append([Unit(PAIR, [5] * int(rng.integers(8, 77)), LAT)])
        else:
            d = [Unit(TEXT, [1] * (int(rng.lognormal(5.0, 1.0)) + 1))]
            for _ in range(int(rng.integers(1, 5))):
                d += [Unit(IMAGE, [], LAT), Unit(TEXT, [5] * (int(rng.lognormal(4.5, 1.0)) + 2))]
            out.append(d)
    return out


def efficiency(stream: list[list[Unit]], part_docs: int | None) -> tuple[float, int]:
    """(real / all positions, rows) packing `stream` whole (part_docs None) or cut into parts of `part_docs`."""
    parts = [stream] if part_docs is None else [stream[i : i + part_docs] for i in range(0, len(stream), part_docs)]
    real = rows = 0
    for part in parts:
        pk = Packer(SEQ, P)
        for _ in pk.pack(part):
            pass
        real, rows = real + pk.real, rows + pk.rows
    return real / (rows * SEQ), rows


def synthetic(n_docs: int, sizes: list[int]) -> None:
    print(f"## synthetic, seq_len {SEQ}, {P}-patch images, {n_docs:,} documents per source\n")
    print("| source | part (documents) | rows | efficiency | vs one part |\n|---|---|---|---|---|")
    for kind in ("text", "pairs", "interleaved"):
        stream = docs(kind, n_docs)
        base, base_rows = efficiency(stream, None)
        print(f"| {kind} | all (baseline) | {base_rows:,} | {base:.4%} | 1.0000 |")
        for size in sizes:
            eff, rows = efficiency(stream, size)
            print(f"| {kind} | {size:,} | {rows:,} | {eff:.4%} | {eff / base:.4f} |")


def demo(root: Path, part_bytes: list[int], part_docs: list[int]) -> None:
    from data_pipeline import pack

    print(f"\n## demo data ({root}), seq_len 256, through data_pipeline.pack\n")
    print("| source | parts | train rows | train efficiency | vs one part |\n|---|---|---|---|---|")
    seq = 256
    for kind in ("text", "pairs", "interleaved"):
        inp = str(root / "raw" / "texts.jsonl") if kind == "text" else str(root / "latents" / kind)
        base = None
        for size in [None, *(part_bytes if kind == "text" else part_docs)]:
            with tempfile.TemporaryDirectory() as tmp:
                extra = {} if size is None else ({"part_bytes": size} if kind == "text" else {"part_docs": size})
                opts = pack.PackOptions(kind, [inp], str(root / "tokenizer" / "spm.model"), tmp, seq_len=seq,
                                        patch_size=2, val_every=10, **extra)
                rep = pack.run(opts, (0, 1))
            eff = rep["train"]["efficiency"]
            base = eff if base is None else base
            label = ("1 (default)" if size is None
                     else f"{rep['parts']} ({size:,} {'bytes' if kind == 'text' else 'docs'})")
            print(f"| {kind} | {label} | {rep['train']['rows']} | {eff:.4%} | {eff / base:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=40_000, help="synthetic documents per source")
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2_000, 10_000], help="part sizes in documents")
    ap.add_argument("--demo", type=Path, default=None, help="a demo_data output directory (optional)")
    a = ap.parse_args()
    t0 = time.time()
    synthetic(a.docs, a.sizes)
    if a.demo is not None:
        demo(a.demo, [32_000, 16_000], [100, 50])
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
