"""Loader throughput: positions/s per worker process for 4096-position rows with 256-patch 32x32x8 images.

Builds a realistic mix in a temp dir (long-tailed text lengths, caption-image pairs, interleaved
docs), reports the packing efficiency per source, then times the real loader (streaming + row
layout + per-sample noise + collate). Run: `python bench/loader.py [--rows 400] [--workers 0 2]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.special_ids import SpecialIds, save_special_ids  # noqa: E402
from data_pipeline.config import DataConfig, StreamConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.pack import write_rows  # noqa: E402
from data_pipeline.packer import IMAGE, PAIR, TEXT, Packer, Unit  # noqa: E402

SEQ, C, H, PATCH = 4096, 8, 32, 2
P = (H // PATCH) ** 2


def _docs(kind: str, n: int, rng: np.random.Generator):
    """Synthetic documents: random tokens (vocab 32000), random fp16 latents."""
    def lat():
        return rng.standard_normal((C, H, H), dtype=np.float32).astype(np.float16)

    for _ in range(n):
        if kind == "text":
            yield [Unit(TEXT, [1, *rng.integers(10, 32000, int(rng.lognormal(6.0, 1.3))).tolist(), 2])]
        elif kind == "pairs":
            yield [Unit(PAIR, rng.integers(10, 32000, int(rng.integers(8, 77))).tolist(), lat())]
        else:
            d = [Unit(TEXT, [1, *rng.integers(10, 32000, int(rng.lognormal(5.0, 1.0))).tolist()])]
            for _ in range(int(rng.integers(1, 5))):
                d += [Unit(IMAGE, [], lat()),
                      Unit(TEXT, rng.integers(10, 32000, int(rng.lognormal(4.5, 1.0)) + 1).tolist())]
            d[-1].tokens.append(2)
            yield d


def build(root: Path, rows: int, shard_size: int = 1 << 26) -> tuple[DataConfig, dict]:
    """Pack text / pairs / interleaved streams under `root`; returns the DataConfig and efficiencies."""
    rng = np.random.default_rng(0)
    save_special_ids(SpecialIds(vocab_size=32003, bos_id=1, eos_id=2, boi_id=32000, eoi_id=32001, pad_id=32002),
                     root / "tok.model")
    per_doc = {"text": 1000, "pairs": 300, "interleaved": 1500}
    eff, streams = {}, []
    for kind, share in (("text", 0.4), ("pairs", 0.4), ("interleaved", 0.2)):
        n_docs = int(rows * share * SEQ / per_doc[kind]) + 64
        packer = Packer(SEQ, P)
        n, n_img = write_rows(packer, _docs(kind, n_docs, rng), root / kind, "fp16", shard_size)
        eff[kind] = (n, packer.real, packer.efficiency)
        (root / kind / "pack.json").write_text(json.dumps(
            {"rows": n, "positions": n * SEQ, "image_positions": n_img * P, "efficiency": packer.efficiency}))
        streams.append(StreamConfig(name=kind, local=str(root / kind)))
    cfg = DataConfig(tokenizer=str(root / "tok.model"), seq_len=SEQ, streams=streams, cache_dir=str(root / "cache"))
    return cfg, eff


def time_loader(cfg: DataConfig, workers: int, batches: int, mbs: int) -> float:
    """Positions/s of the loader with `workers` worker processes (0 = in the main process)."""
    cfg = DataConfig(**{**cfg.__dict__, "num_workers": workers})
    ld = build_loader(cfg, "train", micro_batch_size=mbs, seed=0, patch_size=PATCH, latent_shape=(C, H, H),
                      diffusion_steps=1000)
    it = iter(ld)
    for _ in range(max(2, workers * 2)):  # warm-up: worker start, shard open
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    dt = time.perf_counter() - t0
    b.validate(PATCH)
    return batches * mbs * SEQ / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=400, help="packed rows to generate (all sources)")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, eff = build(Path(tmp), a.rows)
        tot_rows = sum(v[0] for v in eff.values())
        tot_real = sum(v[1] for v in eff.values())
        print("| source | rows | packing efficiency |\n|---|---|---|")
        for k, (n, _, e) in eff.items():
            print(f"| {k} | {n} | {e:.4%} |")
        print(f"| all | {tot_rows} | {tot_real / (tot_rows * SEQ):.4%} |\n")
        print("| worker processes | positions/s (total) | positions/s per process |\n|---|---|---|")
        for w in a.workers:
            pps = time_loader(cfg, w, a.batches, a.micro_batch_size)
            print(f"| {w if w else '0 (main process)'} | {pps:,.0f} | {pps / max(1, w):,.0f} |")


if __name__ == "__main__":
    main()
