"""Accelerator facts: dense bf16 peak FLOP/s and memory per GPU (the one home of these numbers).

Peaks are NVIDIA/AMD datasheet dense (no sparsity) bf16 tensor-core rates of the SXM/OAM parts;
memory is what `nvidia-smi` reports as total (MiB), of which a run can use nearly all.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """One accelerator model: `match` is a substring of torch.cuda.get_device_name()."""

    key: str  # CLI name, e.g. h100-80gb
    match: str
    bf16_flops: float  # dense bf16 peak, FLOP/s
    memory_bytes: int  # total device memory


#: CLI key -> Gpu. Sources: A100 datasheet (312 TFLOP/s, 40/80 GB), H100 SXM datasheet (989 TFLOP/s
#: dense, 80 GB), H200 datasheet (989 TFLOP/s dense, 141 GB), B200 (2.25 PFLOP/s dense), MI300X (1307).
GPUS: dict[str, Gpu] = {
    g.key: g
    for g in (
        Gpu("a100-40gb", "A100-SXM4-40GB", 312e12, 40_960 * MIB),
        Gpu("a100-80gb", "A100", 312e12, 81_920 * MIB),
        Gpu("h100-80gb", "H100", 989e12, 81_559 * MIB),
        Gpu("h200", "H200", 989e12, 143_771 * MIB),
        Gpu("gh200", "GH200", 989e12, 97_871 * MIB),
        Gpu("h800", "H800", 989e12, 81_559 * MIB),
        Gpu("b200", "B200", 2250e12, 183_359 * MIB),
        Gpu("l40s", "L40S", 362e12, 46_068 * MIB),
        Gpu("a10g", "A10G", 70e12, 23_028 * MIB),
        Gpu("l4", "L4", 121e12, 23_034 * MIB),
        Gpu("v100", "V100", 125e12, 32_768 * MIB),
        Gpu("mi300x", "MI300X", 1307e12, 196_592 * MIB),
    )
}


def detect_gpu(device_name: str) -> Gpu | None:
    """The table entry whose `match` is the longest substring of `device_name` (GH200 before H200)."""
    hits = [g for g in GPUS.values() if g.match in device_name]
    return max(hits, key=lambda g: len(g.match)) if hits else None
