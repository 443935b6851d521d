"""The Transfusion model: one transformer, next-token loss on text, epsilon-prediction on image latents
(or, with model.objective=flow, velocity prediction on the rectified-flow path).

L = sum(CE over text targets) / text_denom + lambda * sum(per-image MSE) / image_denom. The
denominators default to the local counts; a trainer passes global counts so the gradient does not
depend on how the global batch is split over ranks and micro-batches. Every module runs on every
call: a batch without images pushes a zero-weight dummy latent through the patch encoder and
decoder, so ZeRO-3 ranks always gather the same parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from contract.batch import TransfusionBatch
from pretrain.model import masks
from pretrain.model.backbone import ModalityExpertsBlock, ModalityRoute, TransformerBlock, rope_tables
from pretrain.model.config import ModelConfig, check_sampler
from pretrain.model.diffusion import (DenoiserFn, add_flow_noise, add_noise, cosine_alpha_bar, flow_time,
                                      sample_latents,
                                      timestep_loss_weights)
from pretrain.model.export_layout import read_model_config, weight_files
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


class CachedChunk(NamedTuple):
    """The l positions `Transfusion.forward_cached` runs after a KV cache, for B rows at once.

    tokens, image_ids, valid: (B, l) token ids (ignored at patches), each position's image index 0..N-1
    (row-major, P contiguous patches each) or -1 (text), and whether the slot holds a real position.
    x_t (N, C, H, W), t (N,): the chunk's images and their noise level t in the objective's units
    (`Transfusion.t_from_timesteps`; t = 0 is a clean image for both objectives); None when the chunk has none.
    """

    tokens: torch.Tensor
    image_ids: torch.Tensor
    valid: torch.Tensor
    x_t: torch.Tensor | None = None
    t: torch.Tensor | None = None


class Transfusion(nn.Module):
    """Llama backbone + text embedding/head + latent patch encoder/decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)
        self.patch_encoder, self.patch_decoder = build_patching(cfg)
        block = ModalityExpertsBlock if cfg.modality_experts else TransformerBlock
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.modality_experts:
            self.image_norm = RMSNorm(cfg.dim, cfg.norm_eps)  # the image expert's final norm
        self.output = Linear(cfg.dim, cfg.vocab_size, cfg.init_std)
        self._alpha_bar: dict[torch.device, torch.Tensor] = {}
        self._t_weight: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "Transfusion":
        """The model of an export directory (`python -m pretrain.artifacts.export`), in eval mode.

        Reads `config.yaml` (its `model` section, export_layout.read_model_config) and the safetensors
        weights (one file or sharded with an index). `dtype` None keeps fp32 (bf16 exports are upcast).
        Raises FileNotFoundError naming the missing file, ValueError naming the model keys of a config
        written by another version of the code (unknown or missing).
        """
        from safetensors.torch import load_file

        root = Path(path)
        cfg = read_model_config(root)
        state: dict[str, torch.Tensor] = {}
        for f in weight_files(root):
            state.update(load_file(f, device=str(device)))
        with torch.device("meta"):
            model = cls(cfg)
        want = dtype or torch.float32
        model.load_state_dict({k: v.to(want) for k, v in state.items()}, assign=True, strict=True)
        return model.eval()

    def alpha_bar(self, device: torch.device) -> torch.Tensor:
        """The cosine schedule (T,) on `device`, cached (not a parameter, so ZeRO-3 never shards it)."""
        if device not in self._alpha_bar:
            self._alpha_bar[device] = cosine_alpha_bar(self.cfg.diffusion_steps, device=device)
        return self._alpha_bar[device]

    def timestep_weights(self, device: torch.device) -> torch.Tensor:
        """Per-timestep eps-MSE weights (T,) of model.diffusion_loss_weighting, cached like alpha_bar."""
        if device not in self._t_weight:
            cfg = self.cfg
            self._t_weight[device] = timestep_loss_weights(
                self.alpha_bar(device), cfg.diffusion_loss_weighting, cfg.diffusion_weight_cap)
        return self._t_weight[device]

    def attention_mask(self, batch: TransfusionBatch) -> masks.AttentionMask:
        """The batch's Transfusion mask, shared by all layers and heads.

        sdpa: an additive float mask (B, 1, L, L), 0 where attention is allowed and -inf elsewhere, in
        the model's dtype; sdpa_varlen: masks.DocumentBlocks (each document attends on its own); flex: a
        FlexAttention BlockMask. All from the same rule (masks.py).
        """
        if self.cfg.attention == "sdpa_varlen":
            return masks.document_blocks(batch.doc_ids, batch.image_ids, self.tok_embeddings.weight.dtype)
        if self.cfg.attention == "sdpa":
            allowed = masks.dense_mask(batch.doc_ids, batch.image_ids)  # (B, 1, L, L) bool
            # additive form, built once for all layers (SDPA would convert a bool mask in every call)
            return masks.additive(allowed, self.tok_embeddings.weight.dtype)
        return masks.block_mask(batch.doc_ids, batch.image_ids)

    def backbone(self, x: torch.Tensor, batch: TransfusionBatch) -> torch.Tensor:
        """Run the blocks over embedded positions (B, L, D) and the final norm."""
        rope = rope_tables(batch.positions, self.cfg.head_dim, self.cfg.rope_theta)
        patch_pos = batch.patch_positions() if self.cfg.modality_experts else None  # dense: no lookup, no sync
        return self._blocks(x, rope, self.attention_mask(batch), patch_pos)  # (B, L, D)

    def _blocks(self, x: torch.Tensor, rope: torch.Tensor, mask: masks.AttentionMask, patch_pos: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Every block and the final norm: (B, L, D) -> (B, L, D). patch_pos (N,) are the flat image positions,
        which route rows to the image expert under model.modality_experts (ModalityExpertsBlock; unused
        by a dense model)."""
        if not self.cfg.modality_experts:
            for i, layer in enumerate(self.layers):
                x = layer(x, rope, mask, cache, i)  # (B, L, D)
            return self.norm(x)  # (B, L, D)
        route = ModalityRoute.of(patch_pos, x.shape[0], x.shape[1])
        g = route.to_grouped(x)  # (B*L, D), [text | image] rows
        for i, layer in enumerate(self.layers):
            g = layer(g, rope, mask, route, cache, i)  # (B*L, D)
        text, image = g.split(route.sizes)
        return route.to_sequence(torch.cat([self.norm(text), self.image_norm(image)]))  # (B, L, D)

    def forward(
        self,
        batch: TransfusionBatch,
        text_denom: float | None = None,
        image_denom: float | None = None,
    ) -> TransfusionOutput:
        """Noise the batch's latents at its timesteps, run the model, and return the losses.

        loss = sum of text-target CE / text_denom + diffusion_loss_weight * sum of per-image eps MSE /
        image_denom (objective=flow: the velocity MSE, x_t = (1-t) x0 + t eps, v = eps - x0, t from
        `t_from_timesteps`). text_denom / image_denom default to this batch's counts (a mean); the trainer passes
        the step's global counts divided by (accumulation steps x ranks), so that DeepSpeed's averaging
        gives d(sum / global count) however the global batch is split (pretrain.train.global_denominators).
        """
        latents, noise, timesteps, img_weight = self._images_or_dummy(batch)
        t = self.t_from_timesteps(timesteps)  # (N,): the timestep (ddpm) or flow time in (0, 1) (flow)
        x_t = self._add_noise(latents, noise, t)  # (N, C, H, W)
        h, out = self._hidden_and_output(batch, x_t, t)  # (B*L, D), (N, C, H, W)

        lm_sum, n_text = self._lm_loss(h, batch)
        target = self._diffusion_target(latents, noise, t)  # (N, C, H, W)
        per_image = (out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (N,)
        diff_sum = (per_image * img_weight * self.timestep_weights(latents.device)[timesteps]).sum()

        n_img = batch.num_images
        text_denom = float(max(n_text, 1)) if text_denom is None else text_denom
        image_denom = float(max(n_img, 1)) if image_denom is None else image_denom
        loss = lm_sum / text_denom + self.cfg.diffusion_loss_weight * diff_sum / image_denom
        return TransfusionOutput(loss, lm_sum.detach(), diff_sum.detach(), n_text, n_img)

    def hidden_and_sampler_input(self, batch: TransfusionBatch, x_t: torch.Tensor,
                                 t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole model over a batch: final hidden states (B*L, D) and the sampler input (N, C, H, W).

        x_t (N, C, H, W) are the batch's latents noised at noise levels `t` (N,) in the objective's
        units (`t_from_timesteps`: the integer timestep in [0, diffusion_steps) for ddpm, flow time in
        [0, 1] for flow); the patch encoder puts them at
        the batch's patch positions, the backbone runs over all positions, the patch decoder reads the
        patch positions back. Text generation takes `lm_logits` of the hidden states, image generation
        the sampler input (`sampler_input`: epsilon for ddpm, the velocity for flow). When the batch holds
        no image, x_t/t is one dummy image, which bypasses the backbone (its output is meaningless;
        ZeRO-3 still gathers every module).
        """
        h, out = self._hidden_and_output(batch, x_t, t)  # (B*L, D), (N, C, H, W)
        return h, self.sampler_input(out, x_t, t)

    def t_from_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise level t (N,) in the objective's units, which every other method takes, of the loader's
        integer timesteps (N,) in [0, diffusion_steps): the timestep itself (ddpm), or flow time t in (0, 1)
        float32, t = 1 pure noise (flow; diffusion.flow_time's quantile map)."""
        if self.cfg.objective == "ddpm":
            return timesteps
        c = self.cfg
        return flow_time(timesteps, c.diffusion_steps, c.flow_logit_mean, c.flow_logit_std,
                         c.flow_shift).to(timesteps.device)

    def _add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 (N, C, H, W) noised at `t` (N,): the cosine-schedule DDPM forward process, or the flow path."""
        if self.cfg.objective == "flow":
            return add_flow_noise(x0, noise, t)
        return add_noise(x0, noise, t, self.alpha_bar(x0.device))

    def _time_input(self, t: torch.Tensor) -> torch.Tensor:
        """What the timestep embedder sees (N,): t (ddpm), or t * diffusion_steps (flow: the same range, continuous)."""
        return t.float() * self.cfg.diffusion_steps if self.cfg.objective == "flow" else t

    def sampler_input(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the configured objective's sampler steps on (N, C, H, W): epsilon (ddpm, eps_from_output)
        or the predicted velocity v = eps - x0 (flow: the decoder's output itself); t (N,) as x_t's noise
        level (`t_from_timesteps`)."""
        if self.cfg.objective == "flow":
            return out
        return self.eps_from_output(out, x_t, t)

    def sample_latents(self, fn: DenoiserFn, noise: torch.Tensor, steps: int, sampler: str,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (N, C, H, W) from noise: fn(x_t, t) is the model's sampler input (with CFG) at noise
        levels t (N,) in this model's units (`t_from_timesteps`); DDPM/DDIM on the cosine schedule or Euler
        with model.flow_shift. Raises ValueError when `sampler` does not fit model.objective."""
        check_sampler(self.cfg.objective, sampler)
        ab = self.alpha_bar(noise.device)  # (T,), unused by euler
        return sample_latents(fn, noise, steps, sampler, ab, self.cfg.flow_shift, generator)  # type: ignore[arg-type]

    def eps_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted epsilon (N, C, H, W) from the patch decoder's output under model.diffusion_prediction,
        for x_t at integer DDPM timesteps t (N,) in [0, diffusion_steps).

        "eps": the output is epsilon. "v": the output is v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho
        2022, "Progressive distillation", sec. 4), so eps = sqrt(1-ab) x_t + sqrt(ab) v. Samplers always
        receive epsilon; every path that runs the patch decoder (cached generation too) goes through here.
        """
        if self.cfg.diffusion_prediction == "eps":
            return out
        ab = self.alpha_bar(x_t.device)[t].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        return ((1 - ab).sqrt() * x_t.float() + ab.sqrt() * out.float()).to(out.dtype)

    def _diffusion_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the patch decoder regresses (N, C, H, W): eps, or v = sqrt(ab) eps - sqrt(1-ab) x0; flow: eps - x0."""
        if self.cfg.objective == "flow":
            return noise - x0
        if self.cfg.diffusion_prediction == "eps":
            return noise
        ab = self.alpha_bar(x0.device)[t].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def _hidden_and_output(self, batch: TransfusionBatch, x_t: torch.Tensor,
                           t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (B*L, D) and the patch decoder's raw output (N, C, H, W): eps or v."""
        B, L = batch.tokens.shape
        D = self.cfg.dim
        t = self._time_input(t)  # (N,)
        patches, ctx = self.patch_encoder(x_t.to(self.tok_embeddings.weight.dtype), t)  # (N, P, D)
        x = self.tok_embeddings(batch.tokens).view(B * L, D)  # (B*L, D)
        patch_pos = batch.patch_positions()  # (N*P,), precomputed by the loader: no host sync
        if batch.num_images > 0:
            x = x.index_copy(0, patch_pos, patches.reshape(-1, D))
        h = self.backbone(x.view(B, L, D), batch).view(B * L, D)  # (B*L, D)
        h_img = h[patch_pos].view_as(patches) if batch.num_images > 0 else patches  # (N, P, D)
        return h, self.patch_decoder(h_img, t, ctx)  # (B*L, D), (N, C, H, W)

    def forward_cached(self, cache: KVCache, chunk: CachedChunk,
                       commit: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run a chunk of positions after those in `cache` (generation): hidden states (B, l, D) and the sampler
        input (N, C, H, W) of the chunk's images, or None when it has none.

        The sampler input is epsilon (objective ddpm) or the velocity (flow), see `sampler_input`.
        commit=False leaves the cache as it was (a denoising step); see kv_cache.py for the mask.
        Attention always runs as SDPA here.
        """
        tokens, image_ids, valid, x_t = chunk.tokens, chunk.image_ids, chunk.valid, chunk.x_t
        B, l = tokens.shape  # noqa: E741 - l: the chunk length, as in the shape comments
        D = self.cfg.dim
        x = self.tok_embeddings(tokens)  # (B, l, D)
        patch_pos = torch.nonzero(image_ids.reshape(-1) >= 0).squeeze(1)  # (N*P,)
        if x_t is not None:
            if chunk.t is None:
                raise ValueError("CachedChunk.x_t needs its noise level (t, (N,))")
            time_in = self._time_input(chunk.t)  # (N,) the embedder's input
            patches, ctx = self.patch_encoder(x_t.to(x.dtype), time_in)  # (N, P, D)
            x = x.reshape(B * l, D).index_copy(0, patch_pos, patches.reshape(-1, D)).view(B, l, D)
        positions, mask = cache.begin(valid, image_ids)  # (B, l), (B, 1, l, Lc + l)
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        h = self._blocks(x, rope, mask, patch_pos, cache)  # (B, l, D)
        if commit:
            cache.commit(valid)
        if x_t is None:
            return h, None
        out = self.patch_decoder(h.reshape(B * l, D)[patch_pos].view_as(patches), time_in, ctx)  # (N, C, H, W)
        return h, self.sampler_input(out, x_t, chunk.t)  # eps (ddpm) or velocity (flow)

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

    def _lm_loss(self, h: torch.Tensor, batch: TransfusionBatch) -> tuple[torch.Tensor, int]:
        """Summed next-token CE over positions with a target; logits only where needed."""
        sel = batch.text_positions()  # (Nt,), precomputed by the loader: no host sync
        logits = self.output(h[sel])  # (Nt, V)
        lm_sum = F.cross_entropy(logits.float(), batch.targets.view(-1)[sel], reduction="sum")
        return lm_sum, sel.numel()

