"""Precompute overhead: images/s of the full path (read, decode, crop, encode, MDS write, report)
against a bare VAE encode of the same, already decoded tensors in the same process.

Run: `python bench/precompute.py [--n 128] [--image-size 128] [--width 32] [--device auto]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import precompute, vae as vaelib  # noqa: E402
from data_pipeline.images import load_image  # noqa: E402
from data_pipeline.synthetic import caption_for, draw_shape, random_scene  # noqa: E402


def make_inputs(root: Path, n: int, size: int) -> Path:
    """`n` JPEG images (shapes with a noisy background, 1.25x larger than `size`) and a pairs jsonl."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        c, s, p = random_scene(rng)
        img = np.asarray(draw_shape(c, s, p, int(size * 1.25)), dtype=np.int16)
        img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        from PIL import Image
        Image.fromarray(img).save(root / "img" / f"{i}.jpg", quality=90)
        lines.append(json.dumps({"image": f"img/{i}.jpg", "caption": caption_for(c, s, p)}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def bare_encode(vae: vaelib.Vae, x: torch.Tensor, batch: int) -> float:
    """Seconds to encode the decoded tensors `x` (N, 3, S, S) in batches, nothing else."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        vaelib.encode(vae, x[i : i + batch]).cpu()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32, help="VAE width (random init; 128 ~ an SD-class VAE)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--decode-threads", type=int, default=4)
    a = ap.parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(auto if a.device == "auto" else a.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jl = make_inputs(root, a.n, a.image_size)
        model = vaelib.small_vae(8, 8, a.width)
        model.save_pretrained(str(root / "vae"), safe_serialization=True)
        vae = vaelib.load_vae(root / "vae", dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        paths = [root / "img" / f"{i}.jpg" for i in range(a.n)]
        x = torch.from_numpy(np.stack([load_image(p.read_bytes(), a.image_size) for p in paths])).to(dev)
        bare_encode(vae, x[: a.batch_size], a.batch_size)  # warm-up
        bare = bare_encode(vae, x, a.batch_size)
        opts = precompute.PrecomputeOptions([str(jl)], str(root / "vae"), str(root / "out"), image_size=a.image_size,
                                            batch_size=a.batch_size, device=str(dev), decode_threads=a.decode_threads)
        t0 = time.perf_counter()
        precompute.run(opts, rank_and_world=(0, 1))
        full = time.perf_counter() - t0
    print("\n| device | images | size | bare encode img/s | full precompute img/s | overhead "
          "|\n|---|---|---|---|---|---|")
    print(f"| {dev} | {a.n} | {a.image_size} | {a.n / bare:,.1f} | {a.n / full:,.1f} | {full / bare - 1:+.1%} |")


if __name__ == "__main__":
    main()
