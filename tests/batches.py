"""Random packed batches in the model's batch contract, for model-level tests (no data pipeline)."""

from __future__ import annotations

import torch

from contract.batch import IGNORE_INDEX, TransfusionBatch
from pretrain.model import ModelConfig

BOI, EOI, PAD = 3, 4, 0


def random_batch(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    seed: int,
    images_per_row: int = 2,
    docs_per_row: int = 2,
) -> TransfusionBatch:
    """B rows, each `docs_per_row` documents of text with `images_per_row` images spread over them, then padding."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.patches_per_image
    rows = [_random_row(cfg, seq_len, images_per_row, docs_per_row, g) for _ in range(batch_size)]
    tokens, targets, docs, imgs, pos = (torch.stack([r[i] for r in rows]) for i in range(5))
    n = 0
    for b in range(batch_size):  # number images in row-major order
        mask = imgs[b] >= 0
        k = int(mask.sum()) // P
        imgs[b, mask] = torch.arange(n, n + k).repeat_interleave(P)
        n += k
    C, S = cfg.latent_channels, cfg.latent_size
    latents = torch.randn(n, C, S, S, generator=g)
    noise = torch.randn(n, C, S, S, generator=g)
    t = torch.randint(0, cfg.diffusion_steps, (n,), generator=g)
    return TransfusionBatch(tokens, targets, docs, imgs, pos, latents, noise, t)


def _random_row(
    cfg: ModelConfig, L: int, n_images: int, n_docs: int, g: torch.Generator
) -> tuple[torch.Tensor, ...]:
    P = cfg.patches_per_image
    text_budget = L - n_images * (P + 2) - 4
    assert text_budget > 2 * n_docs, "sequence too short for the requested images"
    tokens, kinds, docs, pos = [], [], [], []  # kind: 0 text, 1 patch
    images_left = n_images
    for d in range(n_docs):
        doc_text = text_budget // n_docs
        doc_images = images_left if d == n_docs - 1 else images_left // (n_docs - d)
        images_left -= doc_images
        pieces = torch.randint(5, cfg.vocab_size, (doc_text,), generator=g).tolist()
        cut = sorted(torch.randint(1, doc_text, (doc_images,), generator=g).tolist())
        seq: list[tuple[int, int]] = []
        prev = 0
        for c in cut + [doc_text]:
            seq += [(tok, 0) for tok in pieces[prev:c]]
            if c != doc_text:
                seq += [(BOI, 0)] + [(PAD, 1)] * P + [(EOI, 0)]
            prev = c
        for i, (tok, kind) in enumerate(seq):
            tokens.append(tok)
            kinds.append(kind)
            docs.append(d)
            pos.append(i)
    while len(tokens) < L:  # padding: its own document
        tokens.append(PAD)
        kinds.append(2)
        docs.append(n_docs)
        pos.append(len(tokens) - 1)
    tokens_t = torch.tensor(tokens)
    kinds_t = torch.tensor(kinds)
    docs_t = torch.tensor(docs)
    targets = torch.full((L,), IGNORE_INDEX)
    nxt_ok = (kinds_t[:-1] == 0) & (kinds_t[1:] == 0) & (docs_t[:-1] == docs_t[1:])
    targets[:-1] = torch.where(nxt_ok, tokens_t[1:], torch.tensor(IGNORE_INDEX))
    imgs = torch.where(kinds_t == 1, torch.tensor(0), torch.tensor(-1))
    return tokens_t, targets, docs_t, imgs, torch.tensor(pos)
