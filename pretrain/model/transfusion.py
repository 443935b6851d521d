"""The Transfusion model: one transformer, next-token loss on text, epsilon-prediction on image latents.

L = sum(CE over text targets) / text_denom + lambda * sum(per-image MSE) / image_denom. The
denominators default to the local counts; a trainer passes global counts so the gradient does not
depend on how the global batch is split over ranks and micro-batches. Every module runs on every
call: a batch without images pushes a zero-weight dummy latent through the patch encoder and
decoder, so ZeRO-3 ranks always gather the same parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model import masks
from pretrain.model.backbone import TransformerBlock, rope_tables
from pretrain.model.batch import IGNORE_INDEX, TransfusionBatch
from pretrain.model.diffusion import add_noise, cosine_alpha_bar
from pretrain.model.kv_cache import KVCache
from pretrain.model.layers import Embedding, Linear, RMSNorm
from pretrain.model.patching import build_patching


class TransfusionOutput(NamedTuple):
    """Loss for backward plus detached sums and counts for logging and normalisation.

    A NamedTuple so DeepSpeed's ZeRO-3 hooks can see the tensors inside it.
    """

    loss: torch.Tensor  # scalar
    lm_loss_sum: torch.Tensor  # scalar, detached: CE summed over text targets
    diffusion_loss_sum: torch.Tensor  # scalar, detached: per-image MSE summed over images
    num_text_tokens: int
    num_images: int


class Transfusion(nn.Module):
    """Llama backbone + text embedding/head + latent patch encoder/decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)
        self.patch_encoder, self.patch_decoder = build_patching(cfg)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, cfg.init_std)
        self._alpha_bar: dict[torch.device, torch.Tensor] = {}

    def alpha_bar(self, device: torch.device) -> torch.Tensor:
        """The cosine schedule (T,) on `device`, cached (not a parameter, so ZeRO-3 never shards it)."""
        if device not in self._alpha_bar:
            self._alpha_bar[device] = cosine_alpha_bar(self.cfg.diffusion_steps, device=device)
        return self._alpha_bar[device]

    def attention_mask(self, batch: TransfusionBatch) -> object:
        """Dense bool mask (sdpa) or BlockMask (flex) for the batch's documents and images."""
        if self.cfg.attention == "sdpa":
            allowed = masks.dense_mask(batch.doc_ids, batch.image_ids)  # (B, 1, L, L) bool
            # additive form, built once for all layers (SDPA would convert a bool mask in every call)
            return torch.zeros(allowed.shape, dtype=self.tok_embeddings.weight.dtype, device=allowed.device).masked_fill_(
                ~allowed, float("-inf")
            )
        return masks.block_mask(batch.doc_ids, batch.image_ids)

    def backbone(self, x: torch.Tensor, batch: TransfusionBatch) -> torch.Tensor:
        """Run the blocks over embedded positions (B, L, D) and the final norm."""
        rope = rope_tables(batch.positions, self.cfg.head_dim, self.cfg.rope_theta)
        mask = self.attention_mask(batch)
        for layer in self.layers:
            x = layer(x, rope, mask)  # (B, L, D)
        return self.norm(x)  # (B, L, D)

    def forward(
        self,
        batch: TransfusionBatch,
        text_denom: float | None = None,
        image_denom: float | None = None,
    ) -> TransfusionOutput:
        latents, noise, t, img_weight = self._images_or_dummy(batch)
        x_t = add_noise(latents, noise, t, self.alpha_bar(latents.device))  # (N, C, H, W)
        h, eps_hat = self.denoise(batch, x_t, t)  # (B*L, D), (N, C, H, W)

        lm_sum, n_text = self._lm_loss(h, batch.targets.view(-1))
        per_image = (eps_hat.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))  # (N,)
        diff_sum = (per_image * img_weight).sum()

        n_img = batch.num_images
        text_denom = float(max(n_text, 1)) if text_denom is None else text_denom
        image_denom = float(max(n_img, 1)) if image_denom is None else image_denom
        loss = lm_sum / text_denom + self.cfg.diffusion_loss_weight * diff_sum / image_denom
        return TransfusionOutput(loss, lm_sum.detach(), diff_sum.detach(), n_text, n_img)

    def denoise(self, batch: TransfusionBatch, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B*L, D) and predicted epsilon (N, C, H, W) for noised latents x_t at timesteps t.

        When the batch holds no image, x_t/t is the dummy image, which bypasses the backbone.
        """
        B, L = batch.tokens.shape
        D = self.cfg.dim
        patches, ctx = self.patch_encoder(x_t.to(self.tok_embeddings.weight.dtype), t)  # (N, P, D)
        x = self.tok_embeddings(batch.tokens).view(B * L, D)  # (B*L, D)
        patch_pos = torch.nonzero(batch.image_ids.view(-1) >= 0).squeeze(1)  # (N*P,)
        if batch.num_images > 0:
            x = x.index_copy(0, patch_pos, patches.reshape(-1, D))
        h = self.backbone(x.view(B, L, D), batch).view(B * L, D)  # (B*L, D)
        h_img = h[patch_pos].view_as(patches) if batch.num_images > 0 else patches  # (N, P, D)
        return h, self.patch_decoder(h_img, t, ctx)  # (B*L, D), (N, C, H, W)

    def step(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        image_ids: torch.Tensor,
        valid: torch.Tensor,
        x_t: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        commit: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run a chunk of positions after those in `cache`: hidden states (B, l, D), epsilon (N, C, H, W) or None.

        tokens/image_ids/valid are (B, l): token ids (ignored at patches), the chunk's image index 0..N-1
        (row-major, P contiguous patches each) or -1, and whether the slot holds a real position. x_t
        (N, C, H, W) and t (N,) are the chunk's images. commit=False leaves the cache as it was (a
        denoising step); see kv_cache.py for the mask. Attention always runs as SDPA here.
        """
        B, l = tokens.shape
        D = self.cfg.dim
        x = self.tok_embeddings(tokens)  # (B, l, D)
        patch_pos = torch.nonzero(image_ids.reshape(-1) >= 0).squeeze(1)  # (N*P,)
        if x_t is not None:
            patches, ctx = self.patch_encoder(x_t.to(x.dtype), t)  # (N, P, D)
            x = x.reshape(B * l, D).index_copy(0, patch_pos, patches.reshape(-1, D)).view(B, l, D)
        positions, mask = cache.begin(valid, image_ids)  # (B, l), (B, 1, l, Lc + l)
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i)  # (B, l, D)
        h = self.norm(x)  # (B, l, D)
        if commit:
            cache.commit(valid)
        if x_t is None:
            return h, None
        return h, self.patch_decoder(h.reshape(B * l, D)[patch_pos].view_as(patches), t, ctx)  # (N, C, H, W)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) from final hidden states (..., D)."""
        return self.output(h)

    def _images_or_dummy(self, batch: TransfusionBatch) -> tuple[torch.Tensor, ...]:
        """(latents, noise, timesteps, weights); one zero-weight dummy image when the batch has none."""
        if batch.num_images > 0:
            w = torch.ones(batch.num_images, device=batch.latents.device)
            return batch.latents, batch.noise, batch.timesteps, w
        c, s = self.cfg.latent_channels, self.cfg.latent_size
        device = batch.tokens.device
        zeros = torch.zeros(1, c, s, s, device=device)
        return zeros, zeros, torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, device=device)

    def _lm_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token CE over positions with a target; logits only where needed."""
        sel = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)  # (Nt,)
        logits = self.output(h[sel])  # (Nt, V)
        lm_sum = F.cross_entropy(logits.float(), targets[sel], reduction="sum")
        return lm_sum, int(sel.numel())


def flops_per_position(cfg: ModelConfig, seq_len: int, num_params: int | None = None) -> float:
    """Training FLOPs per position: 6*N for the weights + 12*layers*dim*seq_len for attention scores.

    N counts every parameter except the input embedding table (a lookup, no matmul). Attention is
    counted dense (PaLM's convention), an upper bound under the block-sparse mask.
    """
    if num_params is None:
        with torch.device("meta"):
            model = Transfusion(cfg)
        num_params = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    return 6.0 * num_params + 12.0 * cfg.n_layers * cfg.dim * seq_len
