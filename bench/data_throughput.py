"""Data-path throughput per process, each against a baseline in the same run.

    python bench/data_throughput.py [--docs 3000] [--images 48] [--paper-images 4] [--write docs/data_rates.json]

Measures, in one process on whatever machine runs it (the table names the device):
1. tokenise + pack (`python -m data_pipeline.pack` in process): positions/s of text documents from
   raw jsonl (tokeniser included) and of image-caption pairs from precompute output at the paper's
   latent shape, 32x32x8 in 2x2 patches (baseline: text);
2. precompute images/s (`python -m data_pipeline.precompute` in process): the demo-sized VAE at 32 px
   and a paper-shaped VAE at 256 px (SD-class AutoencoderKL: widths 128-512, 8 latent channels, 8x
   downsampling, random weights: speed only), each against a bare `vae.encode` of the same tensors;
3. S3 write and read MB/s over loopback (a moto server, `data_pipeline.storage`) against the local disk;
4. loader positions/s (`data_pipeline.loader`, 4096-position rows with 256-patch 32x32x8 images) from
   the S3 bucket through a local cache limited to about a third of the dataset, against local shards.

`--write PATH` stores the rates `pretrain.plan.data_plan` reads (pack positions/s, precompute images/s
and the device that measured them). On CPU the precompute rate is a CPU figure; the data plan uses
a GPU rate only when one was measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_pipeline import pack, precompute, storage, tokenizer  # noqa: E402
from data_pipeline import vae as vaelib  # noqa: E402
from data_pipeline.images import load_image  # noqa: E402
from data_pipeline.synthetic import text_document  # noqa: E402

import loader as loader_bench  # noqa: E402  (bench/loader.py: realistic 4096-position shards)
import precompute as precompute_bench  # noqa: E402  (bench/precompute.py: JPEG inputs, bare encode)


def timed(fn, *args, **kwargs) -> float:
    """Seconds `fn(*args, **kwargs)` takes."""
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def make_texts(root: Path, n: int) -> Path:
    """`n` synthetic prose documents as jsonl ({"text": ...})."""
    rng = np.random.default_rng(0)
    path = root / "texts.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(text_document(rng) for _ in range(8))}) + "\n")
    return path


def pack_rate(root: Path, kind: str, inputs: list[str], tok: Path, name: str) -> tuple[float, float]:
    """(positions/s, seconds) of one in-process pack of `inputs`."""
    out = root / name
    dt = timed(pack.main, ["--kind", kind, "--input", *inputs, "--tokenizer", str(tok), "--out", str(out),
                           "--seq-len", "4096", "--patch-size", "2"])
    # document positions, not padding
    positions = json.loads((out / "train" / "pack.json").read_text())["real_positions"]
    return positions / dt, dt


def paper_vae() -> torch.nn.Module:
    """An SD-class AutoencoderKL (4 levels, widths 128/256/512/512, 2 ResNet blocks, 8 latent channels), random."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(latent_channels=8, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def precompute_rates(root: Path, model: torch.nn.Module, n: int, size: int, name: str) -> tuple[float, float]:
    """(full precompute images/s, bare encode images/s) of `model` on `n` JPEGs at `size` px."""
    work = root / name
    jl = precompute_bench.make_inputs(work, n, size)
    model.save_pretrained(str(work / "vae"), safe_serialization=True)
    vae = vaelib.load_vae(work / "vae", torch.device("cpu"), torch.float32)
    x = torch.from_numpy(np.stack([load_image((work / "img" / f"{i}.jpg").read_bytes(), size) for i in range(n)]))
    batch = min(16, n)
    precompute_bench.bare_encode(vae, x[:batch], batch)  # warm-up
    bare = precompute_bench.bare_encode(vae, x, batch)
    full = timed(precompute.main, ["--input", str(jl), "--vae", str(work / "vae"), "--out", str(work / "out"),
                                   "--image-size", str(size), "--batch-size", str(batch), "--device", "cpu"])
    return n / full, n / bare


def start_moto() -> str:
    """A moto S3 server on a free loopback port; returns its endpoint and sets the standard variables."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return endpoint


def io_rates(root: Path, mib: int) -> dict[str, float]:
    """MB/s of writing and reading `mib` MiB: local disk, and S3 over loopback."""
    data = np.random.default_rng(0).integers(0, 256, mib << 20, dtype=np.uint8).tobytes()
    mb = len(data) / 1e6
    local = root / "blob.bin"
    out = {"local write": mb / timed(local.write_bytes, data), "local read": mb / timed(local.read_bytes)}
    out["s3 write"] = mb / timed(storage.write_bytes, "s3://bench/blob.bin", data)

    def read_s3() -> None:
        with storage.open_read("s3://bench/blob.bin") as f:
            while f.read(1 << 22):
                pass

    out["s3 read"] = mb / timed(read_s3)
    return out


def upload_tree(local: Path, url: str) -> int:
    """Upload every file under `local` to `url`; returns the bytes uploaded."""
    total = 0
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.upload_file(p, storage.join(url, *p.relative_to(local).parts))
            total += p.stat().st_size
    return total


def loader_rates(root: Path, rows: int, batches: int) -> tuple[float, float, int, str]:
    """(local positions/s, S3 positions/s, dataset bytes, cache limit) of the real loader, no worker processes."""
    from dataclasses import replace

    from data_pipeline.config import StreamConfig

    (root / "shards").mkdir()
    shard = 1 << 20  # small shards, so that a cache of a third of the data set holds many of them
    cfg, _ = loader_bench.build(root / "shards", rows, shard_size=shard)
    size = sum(upload_tree(Path(s.local), f"s3://bench/shards/{s.name}") for s in cfg.streams)
    limit = f"{max(size // 3, 4 * shard) // (1 << 20)}mb"  # a third of the data set, at least 4 shards
    local = loader_bench.time_loader(cfg, 0, batches, 4)
    remote = replace(cfg, streams=[StreamConfig(name=s.name, remote=f"s3://bench/shards/{s.name}",
                                                proportion=s.proportion) for s in cfg.streams],
                     cache_dir=str(root / "cache"), cache_limit=limit)
    s3 = loader_bench.time_loader(remote, 0, batches, 4)
    return local, s3, size, limit


def _num(v: float) -> str:
    return f"{v:,.3f}" if v < 10 else f"{v:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000, help="text documents to tokenise and pack (default: 3000)")
    ap.add_argument("--images", type=int, default=48, help="images for the demo-sized VAE (default: 48)")
    ap.add_argument("--pair-images", type=int, default=96,
                    help="256 px images encoded to 32x32x8 latents by a width-8 VAE, then packed (default: 96)")
    ap.add_argument("--paper-images", type=int, default=4,
                    help="256 px images for the paper-shaped VAE; 0 skips it (default: 4)")
    ap.add_argument("--io-mib", type=int, default=64, help="MiB written and read per storage (default: 64)")
    ap.add_argument("--loader-rows", type=int, default=120, help="4096-position rows for the loader (default: 120)")
    ap.add_argument("--loader-batches", type=int, default=20, help="micro-batches of 4 timed (default: 20)")
    ap.add_argument("--write", type=Path, default=None, help="store the rates for pretrain.plan.data_plan here")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, one process)"
    rows: list[tuple[str, str, float, str, float]] = []  # (what, unit, value, baseline name, baseline value)
    # ignore_cleanup_errors: streaming's download thread of the S3 loader may still be filling its cache
    # when the timing ends; the files go with the folder either way
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        texts = make_texts(root, a.docs)
        tok = root / "tok.model"
        tokenizer.main(["train", "--input", str(texts), "--out", str(tok), "--vocab-size", "4000"])
        text_pps, _ = pack_rate(root, "text", [str(texts)], tok, "packed_text")
        demo_full, demo_bare = precompute_rates(root, vaelib.small_vae(8, 8, 32), a.images, 32, "demo")
        paper_full, paper_bare = (precompute_rates(root, paper_vae(), a.paper_images, 256, "paper") if a.paper_images
                                  else (float("nan"), float("nan")))
        # pairs at the paper's shape (32x32x8 latents, 2x2 patches: 256 per image) from a width-8 VAE at 256 px
        shape_full, shape_bare = precompute_rates(root, vaelib.small_vae(8, 8, 8), a.pair_images, 256, "shape")
        pair_pps, _ = pack_rate(root, "pairs", [str(root / "shape" / "out")], tok, "packed_pairs")
        rows += [("tokenise + pack, text jsonl", "positions/s", text_pps, "-", text_pps),
                 ("pack, image-caption pairs (precomputed)", "positions/s", pair_pps, "text", text_pps),
                 ("precompute, demo VAE (width 32), 32 px", "images/s", demo_full, "bare encode", demo_bare),
                 ("precompute, paper-shaped VAE, 256 px", "images/s", paper_full, "bare encode", paper_bare),
                 ("precompute, width-8 VAE, 256 px (decode + write bound)", "images/s", shape_full, "bare encode",
                  shape_bare)]
        start_moto()
        io = io_rates(root, a.io_mib)
        rows += [("S3 write (moto, loopback)", "MB/s", io["s3 write"], "local write", io["local write"]),
                 ("S3 read (moto, loopback)", "MB/s", io["s3 read"], "local read", io["local read"])]
        local_pps, s3_pps, size, limit = loader_rates(root, a.loader_rows, a.loader_batches)
        rows.append((f"loader from S3, cache_limit {limit} of {size / 2**20:.0f} MiB", "positions/s", s3_pps,
                     "local shards", local_pps))
    print(f"device: {device}\n")
    print("| what | unit | value | baseline | baseline value | ratio |\n|---|---|---|---|---|---|")
    for what, unit, v, base, bv in rows:
        print(f"| {what} | {unit} | {_num(v)} | {base} | {_num(bv)} | {v / bv:.3g}x |")
    if a.write:
        a.write.write_text(json.dumps({
            "pack_positions_per_s": text_pps, "pack_pairs_positions_per_s": pair_pps, "pack_device": device,
            "precompute_cpu_images_per_s_256px_paper_vae": paper_full if a.paper_images else None,
            "precompute_cpu_images_per_s_32px_demo_vae": demo_full,
            "precompute_gpu_images_per_s": None, "precompute_gpu_device": None,
            "command": "python bench/data_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }, indent=2) + "\n")
        print(f"\nwrote {a.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
