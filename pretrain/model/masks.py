"""Transfusion attention masks: causal across the sequence, bidirectional inside each image.

Query q may attend to key k iff they are in the same document AND (k <= q OR both are patches
of the same image). Two interchangeable forms: a dense boolean mask for SDPA, and a FlexAttention
BlockMask (built by a compiled `create_block_mask`, which skips fully masked blocks).
"""

from __future__ import annotations

from typing import Callable, Union

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = None  # type: ignore[assignment]

_compiled_create_block_mask: Callable | None = None

#: what attention layers take: an additive float mask (B, 1, L, L) for SDPA, or a FlexAttention BlockMask
AttentionMask = Union[torch.Tensor, "BlockMask"]


def dense_mask(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True where attention is allowed."""
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()  # (L, L)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, L, L)
    same_img = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)  # (B, L, L)
    return (same_doc & (causal | same_img)).unsqueeze(1)  # (B, 1, L, L)


def _mask_mod(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> Callable:
    def mask_mod(b, h, q, kv):  # noqa: ANN001 - FlexAttention's signature
        same_doc = doc_ids[b, q] == doc_ids[b, kv]
        img_q = image_ids[b, q]
        same_img = (img_q == image_ids[b, kv]) & (img_q >= 0)
        return same_doc & ((kv <= q) | same_img)

    return mask_mod


def block_mask(doc_ids: torch.Tensor, image_ids: torch.Tensor, compiled: bool = True) -> "BlockMask":
    """FlexAttention BlockMask for a packed batch (shared by all heads and layers)."""
    global _compiled_create_block_mask
    if create_block_mask is None:
        raise RuntimeError("model.attention=flex needs torch>=2.5 (FlexAttention); use model.attention=sdpa")
    B, L = doc_ids.shape
    fn = create_block_mask
    if compiled:
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(create_block_mask, dynamic=False)
        fn = _compiled_create_block_mask
    return fn(_mask_mod(doc_ids, image_ids), B, None, L, L, device=doc_ids.device)
