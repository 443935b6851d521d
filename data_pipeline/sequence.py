"""Turn one packed row (tokens + segment table + latents) into per-position arrays and per-image noise.

Everything random here (pair order, caption dropout, timesteps, noise) is drawn from a generator
seeded by (seed, epoch, sample id), so a resumed run sees exactly what an uninterrupted one saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contract import latents as latent_codec
from contract.batch import IGNORE_INDEX
from contract.positions import patches_per_image
from contract.special_ids import SpecialIds
from data_pipeline.packer import IMAGE, TEXT


@dataclass(frozen=True)
class RowSpec:
    """What the loader needs to lay out a row: ids, shapes and the per-step randomness settings."""

    ids: SpecialIds
    seq_len: int
    patch_size: int
    latent_shape: tuple[int, int, int]  # (C, H, W)
    diffusion_steps: int
    caption_first_prob: float
    image_first_max_timestep: int
    caption_dropout: float

    @property
    def patches(self) -> int:
        C, H, W = self.latent_shape
        return patches_per_image(H, W, self.patch_size)


class _Layout:
    """Per-position buffers of one row being written left to right."""

    def __init__(self, L: int, pad: int):
        self.tok = np.full(L, pad, dtype=np.int64)
        self.doc = np.full(L, -1, dtype=np.int64)
        self.img = np.full(L, -1, dtype=np.int64)
        self.real = np.zeros(L, dtype=bool)
        self.p = 0

    def text(self, toks: np.ndarray, d: int) -> None:
        n = len(toks)
        self.tok[self.p : self.p + n] = toks
        self.doc[self.p : self.p + n] = d
        self.real[self.p : self.p + n] = True
        self.p += n

    def image(self, im: int, d: int, P: int, boi: int, eoi: int) -> None:
        p = self.p
        self.tok[p], self.tok[p + P + 1] = boi, eoi
        self.img[p + 1 : p + 1 + P] = im
        self.doc[p : p + P + 2] = d
        self.real[p : p + P + 2] = True
        self.p += P + 2

    def skip(self, n: int) -> None:
        self.p += n  # padding (inside a row: a dropped caption)


def _finish(lay: _Layout) -> dict:
    """Doc ids for padding spans, RoPE positions and LM targets from the laid-out row."""
    L = len(lay.tok)
    doc = lay.doc
    next_id = int(doc.max()) + 1
    pad = ~lay.real
    starts = np.flatnonzero(pad & np.concatenate([[True], ~pad[:-1]]))  # each padding span: own doc id
    ends = np.flatnonzero(pad & np.concatenate([~pad[1:], [True]])) + 1
    for k, (s, e) in enumerate(zip(starts, ends)):
        doc[s:e] = next_id + k
    idx = np.arange(L)
    change = np.concatenate([[True], doc[1:] != doc[:-1]])
    positions = idx - np.maximum.accumulate(np.where(change, idx, 0))
    targets = np.full(L, IGNORE_INDEX, dtype=np.int64)
    ok = (doc[1:] == doc[:-1]) & (lay.img[1:] < 0) & (lay.img[:-1] < 0) & lay.real[1:] & lay.real[:-1]
    targets[:-1] = np.where(ok, lay.tok[1:], IGNORE_INDEX)
    return {"tokens": lay.tok, "targets": targets, "doc_ids": doc, "image_ids": lay.img, "positions": positions}


def build_row(sample: dict, spec: RowSpec, seed: int, epoch: int, sample_id: int) -> dict:
    """Per-position arrays (L,) and per-image latents/noise/timesteps of one packed sample."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, sample_id]))
    ids, P, T = spec.ids, spec.patches, spec.diffusion_steps
    toks = sample["tokens"].astype(np.int64)
    segs = sample["segs"].reshape(-1, 4)
    lay = _Layout(spec.seq_len, ids.pad_id)
    t_max = np.full(int((segs[:, 1] != TEXT).sum()), T, dtype=np.int64)  # per image: exclusive upper bound
    c = 0
    for d, kind, n, im in segs.tolist():
        if kind == TEXT:
            lay.text(toks[c : c + n], d)
        elif kind == IMAGE:
            lay.image(im, d, P, ids.boi_id, ids.eoi_id)
        else:
            _pair(lay, rng, toks[c : c + n], d, im, spec, t_max)
        c += n
    if lay.p > spec.seq_len:
        raise ValueError(f"packed row holds {lay.p} positions, more than seq_len={spec.seq_len}")
    out = _finish(lay)
    lat = latent_codec.decode(sample)  # (N, C, H, W) float32
    n_img = len(t_max)
    if n_img == 0:
        lat = np.zeros((0, *spec.latent_shape), np.float32)
    elif lat.shape[1:] != tuple(spec.latent_shape):
        raise ValueError(f"sample {sample_id}: latent shape {lat.shape[1:]} != configured {tuple(spec.latent_shape)}")
    out["latents"] = lat
    out["noise"] = rng.standard_normal(lat.shape, dtype=np.float32)  # (N, C, H, W)
    out["timesteps"] = (rng.random(n_img) * t_max).astype(np.int64)  # uniform in [0, t_max)
    return out


def _pair(lay: _Layout, rng: np.random.Generator, cap: np.ndarray, d: int, im: int, spec: RowSpec,
          t_max: np.ndarray) -> None:
    """Lay out one caption-image pair: caption first (maybe dropped) or image first (noise capped)."""
    ids = spec.ids
    caption_first = rng.random() < spec.caption_first_prob
    drop = rng.random() < spec.caption_dropout
    bos, eos = np.array([ids.bos_id]), np.array([ids.eos_id])
    if caption_first:
        lay.text(bos if drop else np.concatenate([bos, cap]), d)
        lay.image(im, d, spec.patches, ids.boi_id, ids.eoi_id)
        lay.text(eos, d)
        if drop:
            lay.skip(len(cap))
    else:
        lay.text(bos, d)
        lay.image(im, d, spec.patches, ids.boi_id, ids.eoi_id)
        lay.text(np.concatenate([cap, eos]), d)
        t_max[im] = min(spec.image_first_max_timestep + 1, spec.diffusion_steps)
