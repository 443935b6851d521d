"""The batch contract between the data pipeline and the model (`data_pipeline.loader` builds it, `pretrain.model` reads
it).

A batch is B packed sequences of exactly L positions. Every position carries a token id, the
document it belongs to, the image it belongs to (or -1) and its RoPE position. Images are
numbered 0..N-1 in row-major (b, l) order of their first patch; the P = (H/p)*(W/p) patches of
image i occupy P contiguous positions in raster order. Randomness (timesteps, noise) is part of
the batch so that a run is reproducible and a resumed run sees exactly what an uninterrupted
one saw.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from contract.positions import patches_per_image

#: target id of positions without an LM loss (torch.nn.functional.cross_entropy's default ignore_index)
IGNORE_INDEX = -100


@dataclass
class TransfusionBatch:
    """B packed sequences plus the N images they hold (see module docstring)."""

    tokens: torch.Tensor  # (B, L) int64, token ids; pad id at patch and padding positions
    targets: torch.Tensor  # (B, L) int64, next-token target per position, IGNORE_INDEX = no LM loss
    doc_ids: torch.Tensor  # (B, L) int64, document index within its row (padding: its own id)
    image_ids: torch.Tensor  # (B, L) int64, image index 0..N-1 at patch positions, -1 elsewhere
    positions: torch.Tensor  # (B, L) int64, RoPE position (position within its document)
    latents: torch.Tensor  # (N, C, H, W) float, clean unit-variance VAE latents
    noise: torch.Tensor  # (N, C, H, W) float, the epsilon added to each latent
    timesteps: torch.Tensor  # (N,) int64 in [0, T), diffusion timestep per image
    # Optional, precomputed on the host by the loader so the model's step needs no host sync
    # (torch.nonzero on a GPU tensor waits for the GPU). None: the model computes them.
    patch_index: torch.Tensor | None = None  # (N*P,) int64, flat b*L+l positions of the patches, image order
    text_index: torch.Tensor | None = None  # (Nt,) int64, flat positions that carry a next-token target

    @property
    def num_images(self) -> int:
        """Number of images N in the batch."""
        return int(self.latents.shape[0])

    @property
    def num_text_targets(self) -> int:
        """Number of positions that carry an LM loss."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TransfusionBatch":
        """Move every tensor to `device`."""
        return TransfusionBatch(**{
            f.name: None if getattr(self, f.name) is None
            else getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        })

    def with_indices(self) -> "TransfusionBatch":
        """This batch with patch_index and text_index filled in (call on the host, e.g. in collate)."""
        return replace(self, patch_index=self.patch_positions(), text_index=self.text_positions())

    def patch_positions(self) -> torch.Tensor:
        """(N*P,) flat positions of the image patches: the precomputed index, else torch.nonzero (a host sync)."""
        if self.patch_index is not None:
            return self.patch_index
        return torch.nonzero(self.image_ids.reshape(-1) >= 0).squeeze(1)

    def text_positions(self) -> torch.Tensor:
        """(Nt,) flat positions with a next-token target: precomputed, else torch.nonzero (a host sync)."""
        if self.text_index is not None:
            return self.text_index
        return torch.nonzero(self.targets.reshape(-1) != IGNORE_INDEX).squeeze(1)

    def validate(self, patch_size: int) -> None:
        """Raise ValueError if the batch breaks the contract (shapes, image layout)."""
        B, L = self.tokens.shape
        for name in ("targets", "doc_ids", "image_ids", "positions"):
            t = getattr(self, name)
            if t.shape != (B, L):
                raise ValueError(f"batch.{name} has shape {tuple(t.shape)}, expected {(B, L)}")
        for name, computed in (("patch_index", lambda: replace(self, patch_index=None).patch_positions()),
                               ("text_index", lambda: replace(self, text_index=None).text_positions())):
            given = getattr(self, name)
            if given is not None and not torch.equal(given, computed()):
                raise ValueError(f"batch.{name} does not list the positions its masks give; rebuild it with "
                                 f"with_indices()")
        N = self.num_images
        if self.noise.shape != self.latents.shape:
            raise ValueError(f"batch.noise shape {tuple(self.noise.shape)} != latents {tuple(self.latents.shape)}")
        if self.timesteps.shape != (N,):
            raise ValueError(f"batch.timesteps has shape {tuple(self.timesteps.shape)}, expected {(N,)}")
        if N == 0:
            if (self.image_ids >= 0).any():
                raise ValueError("batch.image_ids marks patch positions but the batch holds no latents")
            return
        H, W = self.latents.shape[-2:]
        P = patches_per_image(H, W, patch_size)
        flat = self.image_ids.reshape(-1)
        ids = flat[flat >= 0]
        expected = torch.arange(N, device=ids.device).repeat_interleave(P)
        if ids.numel() != N * P or not torch.equal(ids, expected):
            raise ValueError(
                f"batch.image_ids must list images 0..{N - 1} in order with {P} contiguous patches each"
            )
        for b in range(B):
            row = self.image_ids[b]
            starts = torch.nonzero((row >= 0) & torch.cat([row.new_ones(1, dtype=torch.bool), row[1:] != row[:-1]]))
            for s in starts.flatten().tolist():
                if not bool((row[s : s + P] == row[s]).all()):
                    raise ValueError(f"image {int(row[s])} in row {b} is not {P} contiguous positions")
