"""The Llama backbone: pre-RMSNorm blocks of RoPE attention and SwiGLU, no biases.

Attention takes an additive float mask (SDPA), a FlexAttention BlockMask or DocumentBlocks
(per-document SDPA); all three express the same Transfusion mask (see masks.py).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import ModelConfig
from pretrain.model.kv_cache import KVCache
from pretrain.model.layers import Linear, RMSNorm
from pretrain.model.masks import AttentionMask, DocumentBlocks

try:
    from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask, create_mask, flex_attention = None, None, None  # type: ignore[assignment,misc]

_compiled_flex: Callable | None = None


def _compiled_flex_attention() -> Callable:
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "BlockMask", gqa: bool) -> torch.Tensor:
    """Compiled flex_attention (the eager path would materialise the full score matrix).

    PyTorch has no FlexAttention backward on CPU; there the forward is the flex kernel and the
    backward recomputes attention densely from the same mask_mod (see _FlexCPUBackward).
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlexCPUBackward.apply(q, k, v, mask, gqa)
    return _compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)


def _dense_from_block_mask(mask: "BlockMask", L: int) -> torch.Tensor:
    """(B, 1, L, L) bool evaluated from the BlockMask's own mask_mod, cached on the mask object."""
    dense = getattr(mask, "_dense_cache", None)
    if dense is None:
        B = mask.kv_num_blocks.shape[0]
        dense = create_mask(mask.mask_mod, B, None, L, L, device=mask.kv_num_blocks.device)
        mask._dense_cache = dense
    return dense


class _FlexCPUBackward(torch.autograd.Function):
    """Forward: compiled flex kernel. Backward: dense SDPA recompute under the mask_mod (CPU only)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, gqa):  # noqa: ANN001, ANN205
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.gqa = mask, gqa
        return _compiled_flex_attention()(q.detach(), k.detach(), v.detach(), block_mask=mask, enable_gqa=gqa)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        dense = _dense_from_block_mask(ctx.mask, q.shape[-2])
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=ctx.gqa)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
        return dq, dk, dv, None, None


def _varlen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: DocumentBlocks,
                 gqa: bool) -> torch.Tensor:
    """SDPA per document: q (B, H, L, hd), k/v (B, Hkv, L, hd) -> (B*L, H, hd), position-major.

    Gathers each bucket's documents into (n, H, S, hd), attends under the bucket's mask, and gathers the
    outputs back into sequence order with blocks.inverse (masks.DocumentBlocks).
    """
    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])  # (B*L, heads, hd)

    qf, kf, vf = flat(q), flat(k), flat(v)
    outs = []
    for idx, mask in zip(blocks.index, blocks.mask):
        n, S = idx.shape
        qb, kb, vb = (t[idx].transpose(1, 2) for t in (qf, kf, vf))  # (n, heads, S, hd)
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=gqa)  # (n, H, S, hd)
        outs.append(y.transpose(1, 2).reshape(n * S, y.shape[1], y.shape[3]))  # (n*S, H, hd)
    return torch.cat(outs)[blocks.inverse]  # (B*L, H, hd)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Unit complex rotations for integer positions (B, L) -> (B, L, 1, head_dim/2) complex64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, L, hd/2)
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # (B, L, 1, hd/2)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate (B, L, H, hd) by complex `rot`; adjacent pairs of hd are the complex numbers (Llama's layout)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, L, H, hd/2)
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)  # (B, L, H, hd)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention with RoPE and a Transfusion mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.n_kv_heads = cfg.kv_heads_used
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # depth-scaled residual projections
        self.wqkv = Linear(cfg.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, cfg.init_std)
        self.wo = Linear(self.n_heads * self.head_dim, cfg.dim, out_std)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: AttentionMask, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); rope (B, L, 1, head_dim/2) complex rotations, mask from `masks`. With a
        cache, x is a chunk after the cached positions and `mask` its additive (B, 1, L, Lc + L) mask from
        KVCache.begin; keys/values come from cache + chunk (SDPA)."""
        return self.wo(self.attend(self.wqkv(x), rope, mask, cache, layer))  # (B, L, D)

    def attend(self, qkv: torch.Tensor, rope: torch.Tensor, mask: AttentionMask, cache: KVCache | None = None,
               layer: int = 0) -> torch.Tensor:
        """Attention between the projections: wqkv's output (B, L, (H + 2 Hkv) hd) -> wo's input (B, L, H hd).

        Holds no weights, so modality experts (ModalityExpertsBlock) project per modality and attend
        over the whole sequence here. rope, mask, cache as in `forward`.
        """
        B, L, _ = qkv.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # split (not slicing): its backward is one cat, where slices each zero-fill a full-size gradient
        qk, v = qkv.view(B, L, H + 2 * Hkv, hd).split([H + Hkv, Hkv], dim=2)  # (B, L, ., hd)
        q, k = apply_rope(qk, rope).transpose(1, 2).split([H, Hkv], dim=1)  # (B, H, L, hd), (B, Hkv, L, hd)
        v = v.transpose(1, 2)  # (B, Hkv, L, hd)
        gqa = self.n_kv_heads != self.n_heads
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, Lc + L, hd)
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU autocast (train.precision=bf16_autocast): PyTorch's bf16 flash-attention backward on CPU
            # is ~5x its fp32 one (bench/precision.py), so attention runs in fp32; the projections stay bf16
            with torch.autocast("cpu", enabled=False):
                return self._scores(q.float(), k.float(), v.float(), mask, gqa)  # (B, L, H*hd)
        return self._scores(q, k, v, mask, gqa)  # (B, L, H*hd)

    @staticmethod
    def _scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, gqa: bool) -> torch.Tensor:
        """q (B, H, L, hd), k/v (B, Hkv, Lk, hd) -> (B, L, H*hd) under any of the three mask forms."""
        B, _, L, _ = q.shape
        if isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, L, hd)
        elif isinstance(mask, DocumentBlocks):
            return _varlen_sdpa(q, k, v, mask, gqa).view(B, L, -1)  # (B, L, H*hd)
        else:
            y = _flex(q, k, v, mask, gqa)  # (B, H, L, hd)
        return y.transpose(1, 2).reshape(B, L, -1)  # (B, L, H*hd)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden_dim
        self.w13 = Linear(cfg.dim, 2 * self.hidden, cfg.init_std)
        self.w2 = Linear(self.hidden, cfg.dim, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, L, F) each
        return self.w2(F.silu(gate) * up)  # (B, L, D)


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: AttentionMask, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, mask, cache, layer)  # (B, L, D)
        return x + self.feed_forward(self.ffn_norm(x))  # (B, L, D)


class ModalityRoute(NamedTuple):
    """Where each modality's positions are: the rows of a (B, L) sequence grouped as [text | image].

    Modality experts run on contiguous row blocks of the grouped layout; only attention needs the
    sequence order, reached by one gather each way. Built from the flat image positions without a
    host sync (a stable argsort), so the training step stays sync-free.
    """

    order: torch.Tensor  # (B*L,) int64: flat sequence position of each grouped row (text rows, then image rows)
    inverse: torch.Tensor  # (B*L,) int64: grouped row of each flat sequence position
    sizes: tuple[int, int]  # (text rows, image rows)
    shape: tuple[int, int]  # (B, L)

    @classmethod
    def of(cls, image_positions: torch.Tensor, B: int, L: int) -> "ModalityRoute":
        """The route of a (B, L) sequence whose image (patch) positions are the flat `image_positions` (N,)."""
        is_image = torch.zeros(B * L, dtype=torch.uint8, device=image_positions.device)
        is_image.index_fill_(0, image_positions, 1)  # (B*L,)
        order = torch.argsort(is_image, stable=True)  # (B*L,) text positions first, each group ascending
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(B * L, device=order.device))
        n_image = image_positions.numel()
        return cls(order, inverse, (B * L - n_image, n_image), (B, L))

    def to_sequence(self, grouped: torch.Tensor) -> torch.Tensor:
        """(B*L, F) grouped rows -> (B, L, F) in sequence order."""
        return grouped[self.inverse].view(*self.shape, -1)

    def to_grouped(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L, F) in sequence order -> (B*L, F) grouped rows."""
        return seq.reshape(self.order.numel(), -1)[self.order]


class ModalityExpertsBlock(TransformerBlock):
    """A Mixture-of-Transformers block (Liang et al. 2024, arXiv 2411.04996, sec. 2): text rows run this
    block's own weights (the dense names, so the text side still maps onto a Llama), image rows run
    `self.image`, a second set (attention_norm, wqkv, wo, ffn_norm, feed_forward) drawn by the same
    init rule; attention is global over the sequence under the same mask.

    Each expert runs on its rows only, and always runs, on (0, D) rows when its modality is absent,
    so every ZeRO-3 rank gathers every parameter every step and the absent expert gets zero gradients.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.image = TransformerBlock(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: AttentionMask,  # type: ignore[override]
                route: ModalityRoute, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B*L, D) rows grouped by `route` -> (B*L, D) grouped; rope, mask, cache as TransformerBlock's."""
        experts = (self, self.image)
        qkv = torch.cat([e.attention.wqkv(e.attention_norm(r)) for e, r in zip(experts, x.split(route.sizes))])
        y = self.attention.attend(route.to_sequence(qkv), rope, mask, cache, layer)  # (B, L, H*hd)
        y = route.to_grouped(y).split(route.sizes)  # (Nt, H*hd), (Ni, H*hd)
        x = x + torch.cat([e.attention.wo(r) for e, r in zip(experts, y)])  # (B*L, D)
        return x + torch.cat([e.feed_forward(e.ffn_norm(r)) for e, r in zip(experts, x.split(route.sizes))])
