"""The data plan of a corpus: bytes, shards, precompute GPU-hours, pack CPU-hours, read rate per node.

    python -m pretrain.plan.data_plan --config configs/transfusion_7b.yaml --text-tokens 1e12 --images 3.5e9 \\
        --nodes 16 --gpus-per-node 8 --gpu h100-80gb [--rates docs/data_rates.json] [--mfu 0.4]

What it computes, and from what:

- positions: text tokens as they are; each image-caption pair `caption + P + 4` positions
  (`contract.positions.pair_positions`: BOS, BOI, P patches, EOI, EOS), P = (latent side / patch)^2;
  rows = positions / (seq_len x packing efficiency);
- bytes of the packed MDS shards: 4 bytes per text token (int32 `tokens`), C x h x w x 2 bytes per
  latent (fp16 or bf16 bits, `contract.latents`), a 16-byte segment entry per document unit (int32 x 4
  `segs`); precompute writes the latents once more before packing (its own MDS output);
- shard counts at `--shard-size` bytes (pack's default, 64 MiB);
- precompute GPU-hours at an images/s per GPU: the `precompute_gpu_images_per_s` a GPU run measured
  into the rates file, or else an assumption derived from the VAE encoder's FLOPs per image at
  `--assumed-vae-mfu` of the GPU's dense bf16 peak, named as such in the output;
- pack CPU-hours at the tokenise + pack positions/s of one process that `bench/data_throughput.py`
  measured (the rates file: text documents and image-caption pairs each at their own rate; the
  printed rate is their blend), else `--pack-positions-per-s` for both;
- the read rate per node the trainer needs: the estimate's positions/s per GPU at `--mfu`
  (`pretrain.plan.estimate`) x GPUs per node x the shards' bytes per position.

Every rate's source is printed beside it; nothing is silently assumed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from contract.positions import pair_positions, patches_per_image
from pretrain.config import load_config
from pretrain.configlib import ConfigError
from pretrain.plan.estimate import make_plan
from pretrain.plan.hardware import GPUS, Gpu

TOKEN_BYTES = 4  # int32 `tokens` column (data_pipeline.packer.row_arrays)
SEGMENT_BYTES = 16  # one (doc, kind, ntok, image) int32 row of `segs` per unit
LATENT_ELEMENT_BYTES = 2  # fp16, or bf16 bits in uint16 (contract.latents)
DEFAULT_RATES = Path(__file__).resolve().parents[2] / "docs" / "data_rates.json"


@dataclass(frozen=True)
class Corpus:
    """A corpus to prepare: text tokens, image-caption pairs and their shapes."""

    text_tokens: float
    images: float
    caption_tokens: float = 30.0  # mean caption length (tokens)
    text_doc_tokens: float = 1000.0  # mean text document length (tokens): one segment entry each
    image_size: int = 256  # pixels
    latent_channels: int = 8
    downsample: int = 8  # VAE spatial factor: latent side = image_size / downsample
    patch_size: int = 2
    seq_len: int = 4096
    packing_efficiency: float = 0.99  # real positions / row positions

    @property
    def latent_side(self) -> int:
        return self.image_size // self.downsample

    @property
    def patches_per_image(self) -> int:
        return patches_per_image(self.latent_side, self.latent_side, self.patch_size)

    @property
    def latent_bytes(self) -> int:
        """Bytes of one stored latent (C x h x w x 2)."""
        return self.latent_channels * self.latent_side**2 * LATENT_ELEMENT_BYTES


@dataclass(frozen=True)
class DataPlan:
    """The figures `format_data_plan` prints; bytes are bytes, rates per second, hours are hours."""

    positions: float
    image_positions: float
    rows: float
    text_bytes: float
    latent_bytes: float
    shard_bytes: float
    shards: float
    precompute_gpu_hours: float
    precompute_rate: float
    precompute_source: str
    pack_cpu_hours: float
    pack_rate: float
    pack_source: str
    positions_per_s_per_gpu: float
    read_bytes_per_s_per_node: float


def vae_encoder_flops(image_size: int, latent_channels: int, width: int = 128, downsample: int = 8) -> float:
    """Forward FLOPs of a diffusers `AutoencoderKL` encoder (SD-class: widths width x (1, 2, 4, 4), two
    ResNet blocks per level) on one `image_size` image, counted by torch's FlopCounterMode on the meta device."""
    import math

    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    levels = int(math.log2(downsample)) + 1
    mult = (1, 2, 4, 4, 4, 4)[:levels]
    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                            down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels,
                            block_out_channels=tuple(width * m for m in mult), layers_per_block=2)
        x = torch.empty(1, 3, image_size, image_size)
        with FlopCounterMode(display=False) as fc:
            vae.encode(x)
    return float(fc.get_total_flops())


def load_rates(path: Path | None) -> dict:
    """The measured rates of `bench/data_throughput.py --write PATH` ({} when there is no file)."""
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a rates file written by bench/data_throughput.py --write ({e})") from e


def make_data_plan(corpus: Corpus, positions_per_s_per_gpu: float, gpus_per_node: int, gpu: Gpu, rates: dict,
                   precompute_rate: float | None = None, pack_rate: float | None = None,
                   assumed_vae_mfu: float = 0.3, vae_width: int = 128, shard_size: int = 1 << 26) -> DataPlan:
    """Bytes, shard counts, hours and the read rate for `corpus` (see the module docstring for each formula).

    Raises ValueError when no pack rate is known (neither measured into `rates` nor given).
    """
    c = corpus
    P = c.patches_per_image
    image_positions = c.images * pair_positions(P, round(c.caption_tokens))
    positions = c.text_tokens + image_positions
    rows = positions / (c.seq_len * c.packing_efficiency)
    text_docs = c.text_tokens / c.text_doc_tokens
    text_bytes = (c.text_tokens + c.images * c.caption_tokens) * TOKEN_BYTES + (text_docs + c.images) * SEGMENT_BYTES
    latent_bytes = c.images * c.latent_bytes
    shard_bytes = text_bytes + latent_bytes
    if precompute_rate is not None:
        pre_src = "given (--precompute-images-per-s)"
    elif rates.get("precompute_gpu_images_per_s"):
        precompute_rate = float(rates["precompute_gpu_images_per_s"])
        pre_src = f"measured on {rates.get('precompute_gpu_device', 'a GPU')} (rates file)"
    else:
        flops = vae_encoder_flops(c.image_size, c.latent_channels, vae_width, c.downsample)
        precompute_rate = assumed_vae_mfu * gpu.bf16_flops / flops
        pre_src = (f"ASSUMED, not measured: {flops / 1e9:.0f} GFLOP per {c.image_size} px image (SD-class encoder, "
                   f"width {vae_width}) at {assumed_vae_mfu:.0%} of {gpu.key}'s {gpu.bf16_flops / 1e12:.0f} TFLOP/s")
    pair_rate = pack_rate
    if pack_rate is not None:
        pack_src = "given (--pack-positions-per-s)"
    elif rates.get("pack_positions_per_s"):
        pack_rate = float(rates["pack_positions_per_s"])
        pair_rate = float(rates.get("pack_pairs_positions_per_s") or pack_rate)
        pack_src = (f"measured, one process on {rates.get('pack_device', 'CPU')} (rates file): text "
                    f"{pack_rate:,.0f}, pairs {pair_rate:,.0f} positions/s")
    else:
        raise ValueError("no pack rate: run `python bench/data_throughput.py --write docs/data_rates.json` "
                         "or give --pack-positions-per-s")
    per_node = positions_per_s_per_gpu * gpus_per_node
    return DataPlan(
        positions=positions, image_positions=image_positions, rows=rows, text_bytes=text_bytes,
        latent_bytes=latent_bytes, shard_bytes=shard_bytes, shards=shard_bytes / shard_size,
        precompute_gpu_hours=c.images / precompute_rate / 3600, precompute_rate=precompute_rate,
        precompute_source=pre_src, pack_rate=positions / (c.text_tokens / pack_rate + image_positions / pair_rate),
        pack_cpu_hours=(c.text_tokens / pack_rate + image_positions / pair_rate) / 3600,
        pack_source=pack_src, positions_per_s_per_gpu=positions_per_s_per_gpu,
        read_bytes_per_s_per_node=per_node * shard_bytes / positions,
    )


def _tb(n: float) -> str:
    return f"{n / 1e12:,.1f} TB"


def format_data_plan(p: DataPlan, c: Corpus, shard_size: int, nodes: int, gpus_per_node: int, mfu: float,
                     pack_processes_per_node: int = 32) -> str:
    """The human-readable data plan (what the CLI prints)."""
    gpus = nodes * gpus_per_node
    return "\n".join([
        f"corpus: {c.text_tokens:.3g} text tokens + {c.images:.3g} image-caption pairs at {c.image_size} px "
        f"-> latents {c.latent_channels}x{c.latent_side}x{c.latent_side} ({c.latent_bytes:,} B each), "
        f"{c.patches_per_image} patches per image",
        f"positions: {p.positions:.3g} ({p.image_positions / p.positions:.1%} in image-caption pairs); "
        f"{p.rows:.3g} rows of {c.seq_len} at {c.packing_efficiency:.1%} packing efficiency",
        "packed MDS shards:",
        f"  text (tokens + segment tables)  {_tb(p.text_bytes):>12}",
        f"  latents                         {_tb(p.latent_bytes):>12}",
        f"  total                           {_tb(p.shard_bytes):>12}  = {p.shards:,.0f} shards of "
        f"{shard_size / 2**20:.0f} MiB ({p.shard_bytes / p.positions:,.1f} B per position)",
        f"  precompute output before packing: {_tb(p.latent_bytes)} more (its latents MDS; deletable after pack)",
        f"precompute: {p.precompute_gpu_hours:,.0f} GPU-hours at {p.precompute_rate:,.0f} images/s per GPU "
        f"[{p.precompute_source}]; {p.precompute_gpu_hours / gpus:,.1f} h on the {gpus} training GPUs",
        f"tokenise + pack: {p.pack_cpu_hours:,.0f} CPU-process-hours at {p.pack_rate:,.0f} positions/s per process "
        f"[{p.pack_source}]; {p.pack_cpu_hours / (nodes * pack_processes_per_node):,.1f} h at "
        f"{pack_processes_per_node} processes per node on {nodes} nodes (python -m data_pipeline.pack, one rank each)",
        f"training read rate at MFU {mfu:.0%} ({p.positions_per_s_per_gpu:,.0f} positions/s per GPU, "
        f"pretrain.plan.estimate): {p.read_bytes_per_s_per_node / 1e6:,.1f} MB/s per node "
        f"({gpus_per_node} GPUs), {p.read_bytes_per_s_per_node * nodes / 1e9:,.2f} GB/s for {nodes} nodes",
    ])


def main(argv: list[str] | None = None) -> int:
    """CLI: print the data plan of a corpus on a cluster shape."""
    d = Corpus(0, 0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config (the model whose training speed sets the read rate)")
    ap.add_argument("--text-tokens", type=float, required=True, help="text tokens in the corpus, e.g. 1e12")
    ap.add_argument("--images", type=float, required=True, help="image-caption pairs, e.g. 3.5e9")
    for name in ("caption_tokens", "text_doc_tokens", "image_size", "latent_channels", "downsample", "patch_size",
                 "seq_len", "packing_efficiency"):
        v = getattr(d, name)
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(v), default=v, help=f"(default: {v})")
    ap.add_argument("--shard-size", type=int, default=1 << 26, help="bytes per MDS shard (default: pack's, 64 MiB)")
    ap.add_argument("--nodes", type=int, default=16, help="(default: 16)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="(default: 8)")
    ap.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="(default: h100-80gb)")
    ap.add_argument("--pack-processes-per-node", type=int, default=32, help="pack ranks per node (default: 32)")
    ap.add_argument("--mfu", type=float, default=0.4, help="training MFU for the read rate (default: 0.4)")
    ap.add_argument("--rates", type=Path, default=DEFAULT_RATES,
                    help=f"measured rates from bench/data_throughput.py --write (default: {DEFAULT_RATES})")
    ap.add_argument("--precompute-images-per-s", type=float, default=None, help="per GPU; overrides the rates file")
    ap.add_argument("--pack-positions-per-s", type=float, default=None, help="per process; overrides the rates file")
    ap.add_argument("--assumed-vae-mfu", type=float, default=0.3,
                    help="VAE encoder utilisation assumed when no GPU rate was measured (default: 0.3)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run config")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    corpus = Corpus(a.text_tokens, a.images, a.caption_tokens, a.text_doc_tokens, a.image_size, a.latent_channels,
                    a.downsample, a.patch_size, a.seq_len, a.packing_efficiency)
    gpu = GPUS[a.gpu]
    train_plan = make_plan(cfg, a.nodes, a.gpus_per_node, gpu)
    per_gpu = a.mfu * gpu.bf16_flops / train_plan.flops.total
    try:
        plan = make_data_plan(corpus, per_gpu, a.gpus_per_node, gpu, load_rates(a.rates), a.precompute_images_per_s,
                              a.pack_positions_per_s, a.assumed_vae_mfu, shard_size=a.shard_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_data_plan(plan, corpus, a.shard_size, a.nodes, a.gpus_per_node, a.mfu, a.pack_processes_per_node))
    return 0


if __name__ == "__main__":
    sys.exit(main())
