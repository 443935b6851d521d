"""Leaf layers that initialise their own weights in their constructor.

DeepSpeed's `zero.Init` partitions a module's parameters as soon as that module's own
`__init__` returns, so weight initialisation must happen inside it: a later `model.apply(init)`
would touch empty partitions. These subclasses draw from torch's global RNG, so the same seed
gives the same weights in a plain process and under ZeRO-3 (which broadcasts rank 0's draw).
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    """nn.Linear with N(0, std) weights (std=0 gives zeros) and zero bias."""

    def __init__(self, in_features: int, out_features: int, std: float, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        _normal_or_zero(self.weight, std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding with N(0, std) rows."""

    def __init__(self, num_embeddings: int, dim: int, std: float) -> None:
        super().__init__(num_embeddings, dim)
        _normal_or_zero(self.weight, std)


class Conv2d(nn.Conv2d):
    """3x3 (or kxk) convolution; std=None keeps PyTorch's default, std=0 zero-inits."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, std: float | None = None) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=kernel // 2)
        if std is not None:
            _normal_or_zero(self.weight, std)
            nn.init.zeros_(self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Llama's pre-norm)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _normal_or_zero(t: torch.Tensor, std: float) -> None:
    if std == 0.0:
        nn.init.zeros_(t)
    else:
        nn.init.normal_(t, mean=0.0, std=std)
