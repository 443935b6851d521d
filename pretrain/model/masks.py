"""Transfusion attention masks: causal across the sequence, bidirectional inside each image.

Query q may attend to key k iff they are in the same document AND (k <= q OR both are patches
of the same image). Three interchangeable forms: a dense boolean mask for SDPA, a FlexAttention
BlockMask (built by a compiled `create_block_mask`, which skips fully masked blocks), and
`DocumentBlocks`, which cuts a packed row into its documents so that SDPA scores each document
on its own (variable-length or "varlen" attention, as FlashAttention's `flash_attn_varlen_func`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = None  # type: ignore[assignment]

_compiled_create_block_mask: Callable | None = None


@dataclass(frozen=True)
class DocumentBlocks:
    """A packed batch cut into its documents, for per-document SDPA (model.attention=sdpa_varlen).

    Each document (a run of one doc id in a row) is padded to a bucket size S (the next power of two,
    at least `MIN_BUCKET`, at most L) and scored only against itself, so a row of n documents costs
    sum(S_i^2) scores instead of L^2 (the demo's rows of ~8 documents: about a third). One entry per
    bucket size present:
      index: (n, S) int64 flat positions into B*L (padding slots repeat the document's first position);
      mask: (n, 1, S, S) additive float mask: the Transfusion rule inside the document, padded keys
        masked, padded queries free to attend (their outputs are dropped);
    and inverse (B*L,) int64: each position's slot in the buckets' outputs, flattened and concatenated.
    The result equals dense SDPA under `dense_mask` (tests/test_model.py checks values and gradients).
    """

    index: tuple[torch.Tensor, ...]
    mask: tuple[torch.Tensor, ...]
    inverse: torch.Tensor


#: what attention layers take: an additive float mask (B, 1, L, L) for SDPA, a FlexAttention BlockMask,
#: or DocumentBlocks (per-document SDPA)
AttentionMask = Union[torch.Tensor, "BlockMask", DocumentBlocks]

#: smallest bucket of DocumentBlocks: shorter documents are padded to it (fewer, larger SDPA calls)
MIN_BUCKET = 16


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as SDPA's additive form in `dtype`: 0 where allowed, -inf elsewhere (same shape)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def same_image(img_q: torch.Tensor, img_k: torch.Tensor) -> torch.Tensor:
    """True where query and key are patches of one image: image ids equal and not -1 (text). Broadcasts."""
    return (img_q == img_k) & (img_q >= 0)


def allowed(same_doc: torch.Tensor, key_not_after_query: torch.Tensor, img_q: torch.Tensor,
            img_k: torch.Tensor) -> torch.Tensor:
    """The Transfusion rule, elementwise (broadcasts): same document AND (causal OR same image).

    Every mask form below (dense, FlexAttention, per-document buckets, the KV cache's) calls this.
    """
    return same_doc & (key_not_after_query | same_image(img_q, img_k))


def dense_mask(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True where attention is allowed."""
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()  # (L, L)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, L, L)
    return allowed(same_doc, causal, image_ids[:, :, None], image_ids[:, None, :]).unsqueeze(1)  # (B, 1, L, L)


def _mask_mod(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> Callable:
    def mask_mod(b, h, q, kv):  # noqa: ANN001 - FlexAttention's signature
        return allowed(doc_ids[b, q] == doc_ids[b, kv], kv <= q, image_ids[b, q], image_ids[b, kv])

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


def document_blocks(doc_ids: torch.Tensor, image_ids: torch.Tensor, dtype: torch.dtype) -> DocumentBlocks:
    """Cut a packed batch into per-document buckets (see DocumentBlocks); masks in `dtype`.

    doc_ids, image_ids: (B, L) as in TransfusionBatch. Raises ValueError when a row's doc ids do not
    form contiguous runs (a document split in two), which the dense rule would join but buckets cannot.
    """
    B, L = doc_ids.shape
    dev = doc_ids.device
    new = torch.ones(B, L, dtype=torch.bool, device=dev)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, L) a document starts here
    ids = doc_ids.sort(1).values  # (B, L)
    distinct = 1 + (ids[:, 1:] != ids[:, :-1]).sum(1)  # (B,) ids in the row
    if bool((new.sum(1) != distinct).any()):  # more runs than ids: some id comes back
        raise ValueError("model.attention=sdpa_varlen needs each document to be one contiguous run of doc_ids "
                         "in its row; this batch splits one. Use model.attention=sdpa or flex.")
    starts = new.flatten().nonzero().squeeze(1)  # (n_docs,) flat start positions
    lengths = torch.diff(starts, append=torch.tensor([B * L], device=dev))  # (n_docs,) runs end at row ends
    cap = 1 << (L - 1).bit_length()
    bucket = (2 ** torch.ceil(torch.log2(lengths.double()))).long().clamp(MIN_BUCKET, cap).clamp(max=L)  # (n_docs,)
    img_flat = image_ids.flatten()  # (B*L,)
    index, mask, inverse, offset = [], [], torch.empty(B * L, dtype=torch.long, device=dev), 0
    for S in bucket.unique().tolist():
        sel = bucket == S
        st, ln = starts[sel], lengths[sel]  # (n,)
        j = torch.arange(S, device=dev)  # (S,)
        valid = j[None, :] < ln[:, None]  # (n, S)
        idx = torch.where(valid, st[:, None] + j[None, :], st[:, None])  # (n, S)
        img = torch.where(valid, img_flat[idx], -1)  # (n, S)
        causal = j[None, :] <= j[:, None]  # (S, S) key <= query
        # one document per bucket row: same_doc is "the key is real" (key 0 keeps every query row non-empty)
        ok = allowed(valid[:, None, :], causal, img[:, :, None], img[:, None, :])  # (n, S, S)
        index.append(idx)
        mask.append(additive(ok, dtype).unsqueeze(1))  # (n, 1, S, S)
        slots = offset + torch.arange(idx.numel(), device=dev).view_as(idx)  # (n, S)
        inverse[idx[valid]] = slots[valid]
        offset += idx.numel()
    return DocumentBlocks(tuple(index), tuple(mask), inverse)
