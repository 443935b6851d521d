"""How VAE latents are stored in MDS shards: fp16, or bfloat16 bits in a uint16 column.

precompute writes them, pack reads and rewrites them, the loader reads them. A sample holds the
column `latents` (ndarray:float16) or `latents_bf16` (ndarray:uint16), never both; the values are
the normalised posterior means `(mean - shift) * scale` of `data_pipeline.vae`, shape (N, C, h, w).
"""

from __future__ import annotations

from typing import Literal, Mapping

import numpy as np
import torch

LatentDtype = Literal["fp16", "bf16"]

#: MDS column (name, encoding) per storage dtype
COLUMNS: dict[str, tuple[str, str]] = {"fp16": ("latents", "ndarray:float16"),
                                       "bf16": ("latents_bf16", "ndarray:uint16")}


def column(dtype: LatentDtype) -> str:
    """Name of the MDS column that holds latents stored as `dtype`."""
    return COLUMNS[dtype][0]


def encode(x: np.ndarray, dtype: LatentDtype) -> np.ndarray:
    """float latents (any shape) -> their stored form: float16, or bfloat16 bits (round to nearest even) as uint16."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "bf16":
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.uint16).numpy()
    return x.astype(np.float16)


def decode(sample: Mapping[str, np.ndarray]) -> np.ndarray:
    """The float32 latents of a stored sample (whichever column it holds); bf16 -> fp32 is exact."""
    if COLUMNS["fp16"][0] in sample:
        return sample[COLUMNS["fp16"][0]].astype(np.float32)
    u = sample[COLUMNS["bf16"][0]].astype(np.uint32) << 16
    return u.view(np.float32)


def placeholder(dtype: LatentDtype) -> np.ndarray:
    """The stored value of a sample without images: MDS cannot store empty arrays, so one zero (1, 1, 1, 1)."""
    return np.zeros((1, 1, 1, 1), np.uint16 if dtype == "bf16" else np.float16)
