"""Key/value cache for generation: every layer's keys and values of the positions already seen.

One cache holds B rows that advance together by *chunks* of l positions (a prompt, one text token,
an image's P patches). Rows that have nothing to add in a chunk mark their slots invalid: nobody
attends to an invalid slot and it does not advance the row's RoPE position, so rows of different
lengths (left-padded prompts, a row that makes an image while the others wait) share one tensor.

A chunk either *commits* (its keys/values stay: prompt, text token, finished image) or not (a
denoising step: the patches attend to the cache and to each other, and the next step overwrites
their slots). The buffers grow by doubling, so decoding never concatenates the whole cache.

Mask (the Transfusion mask of masks.py for a single document): a chunk query attends to every
valid cached slot, and inside the chunk to earlier valid positions and to the patches of its own
image (bidirectional). An invalid query attends only to itself (keeps softmax finite).
"""

from __future__ import annotations

import torch

from pretrain.model.config import ModelConfig
from pretrain.model import masks
from pretrain.model.masks import additive


class KVCache:
    """Per-layer keys/values (n_layers, B, Hkv, capacity, hd) plus per-slot validity and RoPE positions."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, capacity: int = 64) -> None:
        shape = (cfg.n_layers, batch_size, cfg.kv_heads_used, capacity, cfg.head_dim)  # (layers, B, Hkv, cap, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (nl, B, Hkv, cap, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (nl, B, Hkv, cap, hd)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # (B, cap)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.length = 0  # committed slots
        self._chunk = 0  # length of the chunk being run

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def begin(self, valid: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a chunk: (B, l) validity and image ids (-1 = text) -> RoPE positions (B, l), additive mask.

        The mask is (B, 1, l, length + l) float, 0 where attention is allowed and -inf elsewhere.
        """
        B, l = valid.shape  # noqa: E741 - l: the chunk length, as in the shape comments
        self._reserve(self.length + l)
        self._chunk = l
        positions = self.next_pos[:, None] + valid.long().cumsum(1) - 1  # (B, l)
        causal = torch.ones(l, l, dtype=torch.bool, device=valid.device).tril()  # (l, l)
        real = valid[:, None, :] & valid[:, :, None]  # (B, l, l): one document, real query and key
        inner = masks.allowed(real, causal, image_ids[:, :, None], image_ids[:, None, :])  # (B, l, l)
        inner |= torch.eye(l, dtype=torch.bool, device=valid.device)
        past = self.valid[:, None, : self.length].expand(B, l, self.length) & valid[:, :, None]  # (B, l, Lc)
        allowed = torch.cat([past, inner], dim=2)  # (B, l, Lc + l)
        return positions.clamp_min(0), additive(allowed, self.k.dtype)[:, None]  # (B, l), (B, 1, l, Lc + l)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's (B, Hkv, l, hd) keys/values of `layer`; return all of them (B, Hkv, Lc + l, hd)."""
        end = self.length + self._chunk
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, valid: torch.Tensor) -> None:
        """Keep the chunk just run: its valid (B, l) slots become attendable, RoPE positions advance."""
        end = self.length + valid.shape[1]
        self.valid[:, self.length : end] = valid
        self.next_pos += valid.long().sum(1)
        self.length = end

    def select(self, rows: torch.Tensor | list[int]) -> "KVCache":
        """A new cache holding only `rows` (a copy)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k[:, rows, :, : self.length].clone(), self.v[:, rows, :, : self.length].clone()
        out.valid, out.next_pos = self.valid[rows, : self.length].clone(), self.next_pos[rows].clone()
        out.length, out._chunk = self.length, 0
        return out

    @staticmethod
    def concat(caches: list["KVCache"]) -> "KVCache":
        """Stack caches along the batch; shorter ones are right-padded with invalid slots."""
        n = max(c.length for c in caches)
        for c in caches:
            c._reserve(n)
        out = KVCache.__new__(KVCache)
        out.k = torch.cat([c.k[:, :, :, :n] for c in caches], dim=1)  # (nl, sum B, Hkv, n, hd)
        out.v = torch.cat([c.v[:, :, :, :n] for c in caches], dim=1)
        out.valid = torch.cat([torch.cat([c.valid[:, : c.length], c.valid.new_zeros(c.batch_size, n - c.length)], 1)
                               for c in caches])  # (sum B, n)
        out.next_pos = torch.cat([c.next_pos for c in caches])
        out.length, out._chunk = n, 0
        return out

    def _reserve(self, n: int) -> None:
        """Grow the buffers (doubling) so that `n` slots fit."""
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        grow = cap - self.capacity
        pad = (0, 0, 0, grow)  # pad dim -2 (slots)
        self.k = torch.nn.functional.pad(self.k, pad)
        self.v = torch.nn.functional.pad(self.v, pad)
        self.valid = torch.nn.functional.pad(self.valid, (0, grow))
