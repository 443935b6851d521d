"""KV cache: cached chunks (prompt, patches, one token at a time) == one uncached forward, both attention paths.

Tolerance: fp32 on CPU, hidden states and epsilon within atol 1e-5 / rtol 1e-4 (the cached path sums
attention in a different order: SDPA over cache + chunk instead of one (L, L) product, or the flex
kernel). Measured here: epsilon 9e-8 (values up to 0.6), hidden 5e-7 (values up to 3.7). Token ids
must be identical.
"""

from __future__ import annotations

import pytest
import torch

from contract.special_ids import SpecialIds
from pretrain.inference.generate import (ImageSampling, TextSampling, packed_batch, generate, generate_images,
                                         generate_text)
from pretrain.model import CachedChunk, KVCache, Transfusion
from pretrain.model.diffusion import diffusion_sample
from test_model import build, tiny_cfg

SP = SpecialIds(vocab_size=97, bos_id=1, eos_id=2, boi_id=3, eoi_id=4, pad_id=0)
TOL = dict(atol=1e-5, rtol=1e-4)


def _model(attention: str = "sdpa") -> Transfusion:
    model = build(tiny_cfg(attention=attention))
    with torch.no_grad():  # the epsilon layer is zero-initialised: give it weights so eps is informative
        model.patch_decoder.proj.weight.normal_(0, 0.02)
    return model.eval()


def _uncached(model: Transfusion, rows: list[list[int | None]], x_t: torch.Tensor, t: torch.Tensor):
    """Hidden states (B, L, D) and epsilon from one full forward over right-padded rows."""
    batch = packed_batch(model, rows, x_t, t, SP.pad_id)
    with torch.no_grad():
        h, eps = model.hidden_and_sampler_input(batch, x_t, t)
    return h.view(len(rows), -1, model.cfg.dim), eps


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_cached_chunks_equal_full_forward(attention: str) -> None:
    """Two rows of different lengths: caption prefix, image patches, then text one token at a time."""
    model = _model(attention)
    P = model.cfg.patches_per_image
    g = torch.Generator().manual_seed(0)
    prefixes = [[SP.bos_id, 5, 6, 7, 8, 9, SP.boi_id], [SP.bos_id, 10, SP.boi_id]]
    suffixes = [[SP.eoi_id, 11, 12, 13], [SP.eoi_id, 14, 15, 16]]
    rows = [p + [None] * P + s for p, s in zip(prefixes, suffixes)]
    x_t = torch.randn(2, 8, 8, 8, generator=g)
    t = torch.tensor([700, 30])
    h_ref, eps_ref = _uncached(model, rows, x_t, t)

    cache = KVCache(model.cfg, 2, capacity=4)  # small: the buffers must grow
    n = max(len(p) for p in prefixes)
    tokens = torch.full((2, n), SP.pad_id)
    valid = torch.zeros(2, n, dtype=torch.bool)
    for b, p in enumerate(prefixes):  # left-padded prefill
        tokens[b, n - len(p):], valid[b, n - len(p):] = torch.tensor(p), True
    with torch.no_grad():
        h, _ = model.forward_cached(cache, CachedChunk(tokens, torch.full_like(tokens, -1), valid))
        for b, p in enumerate(prefixes):
            torch.testing.assert_close(h[b, n - len(p):], h_ref[b, : len(p)], **TOL)
        patch_ids = torch.arange(2)[:, None].expand(2, P)
        pads = torch.full((2, P), SP.pad_id)
        for _ in range(2):  # a denoising step leaves the cache unchanged: the second one sees the same
            h, eps = model.forward_cached(cache, CachedChunk(pads, patch_ids, torch.ones(2, P, dtype=torch.bool), x_t,
                                                             t),
                                          commit=False)
            torch.testing.assert_close(eps, eps_ref, **TOL)
        model.forward_cached(cache, CachedChunk(pads, patch_ids, torch.ones(2, P, dtype=torch.bool), x_t, t))
        for i in range(len(suffixes[0])):
            tok = torch.tensor([[s[i]] for s in suffixes])
            h, _ = model.forward_cached(cache, CachedChunk(tok, torch.full_like(tok, -1),
                                                           torch.ones(2, 1, dtype=torch.bool)))
            for b, p in enumerate(prefixes):
                torch.testing.assert_close(h[b, 0], h_ref[b, len(p) + P + i], **TOL)


def _greedy_uncached(model: Transfusion, row: list[int | None], image: torch.Tensor | None, n: int) -> list[int]:
    """Reference: greedy decoding with a full forward over the whole sequence for every token."""
    lat = image[None] if image is not None else torch.zeros(0, 8, 8, 8)
    t = torch.zeros(lat.shape[0], dtype=torch.long)
    out: list[int] = []
    for _ in range(n):
        batch = packed_batch(model, [row + out], lat, t, SP.pad_id)
        x_t, tt = (lat, t) if lat.shape[0] else (torch.zeros(1, 8, 8, 8), torch.zeros(1, dtype=torch.long))
        with torch.no_grad():
            h, _ = model.hidden_and_sampler_input(batch, x_t, tt)
        tok = int(model.lm_logits(h[len(row) + len(out) - 1]).argmax())
        if tok == SP.eos_id:
            break
        out.append(tok)
    return out


def test_cached_text_and_captions_equal_uncached_greedy() -> None:
    """Batched prompts of different lengths, text-only and after an image: identical token ids."""
    model = _model()
    P = model.cfg.patches_per_image
    prompts = [[5, 6, 7, 8, 9, 10], [11], []]
    got = generate_text(model, prompts, SP, max_new_tokens=8)
    for p, ids in zip(prompts, got):
        assert ids == _greedy_uncached(model, [SP.bos_id, *p], None, 8)
    images = torch.randn(3, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    got = generate_text(model, prompts, SP, max_new_tokens=8, images=images)
    for p, img, ids in zip(prompts, images, got):
        assert ids == _greedy_uncached(model, [SP.bos_id, SP.boi_id, *[None] * P, SP.eoi_id, *p], img, 8)


def test_cached_images_equal_uncached_sampler() -> None:
    """Cached prefix + CFG: the same latents as recomputing `BOS caption BOI patches` at every step."""
    model = _model()
    P = model.cfg.patches_per_image
    prompts, scale, steps = [[5, 6, 7], [8]], 3.0, 5
    got = generate_images(model, prompts, SP, ImageSampling(steps=steps, cfg_scale=scale, sampler="ddim"), seed=3)
    rows = [[SP.bos_id, *p, SP.boi_id] + [None] * P for p in prompts] + [[SP.bos_id, SP.boi_id] + [None] * P] * 2

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, eps = _uncached(model, rows, x.repeat(2, 1, 1, 1), t.repeat(2))
        cond, uncond = eps.chunk(2)
        return uncond + scale * (cond - uncond)

    noise = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = diffusion_sample(eps_fn, noise, model.alpha_bar(torch.device("cpu")), steps, "ddim")
    torch.testing.assert_close(got, ref, **TOL)


def test_mixed_generation_is_seeded_and_reproducible() -> None:
    model = _model()
    kw = dict(max_new_tokens=6, text=TextSampling(temperature=1.0, top_k=20, top_p=0.9))
    a = generate(model, [[[5, 6]], [[7]]], SP, seed=4, **kw)
    b = generate(model, [[[5, 6]], [[7]]], SP, seed=4, **kw)
    c = generate(model, [[[5, 6]], [[7]]], SP, seed=5, **kw)
    assert a == b and a != c
