"""Model tests on a 2-layer model, CPU, fp32: mask semantics, flex == SDPA, losses, split invariance."""

from __future__ import annotations

import copy

import pytest
import torch

from batches import random_batch
from contract.batch import IGNORE_INDEX, TransfusionBatch
from pretrain.model import ModelConfig, Transfusion
from pretrain.model.masks import dense_mask, document_blocks

L = 128


def tiny_cfg(**kw: object) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, latent_size=8, patch_size=2,
                unet_channels=(16, 32), timestep_freq_dim=32, attention="sdpa")
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> Transfusion:
    torch.manual_seed(seed)
    return Transfusion(cfg)


def _perturbed_hidden(model: Transfusion, batch: TransfusionBatch, where: torch.Tensor) -> torch.Tensor:
    """Backbone outputs (B, L, D) for random inputs, and for the same inputs changed at `where` (B, L)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*batch.tokens.shape, model.cfg.dim, generator=g)  # (B, L, D)
    x2 = x.clone()
    x2[where] += torch.randn(int(where.sum()), model.cfg.dim, generator=g)
    with torch.no_grad():
        return model.backbone(x, batch), model.backbone(x2, batch)


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(dim=-1) > 1e-6  # (B, L)


@pytest.mark.parametrize("attention", ["sdpa", "flex", "sdpa_varlen"])
def test_mask_semantics_on_outputs(attention: str) -> None:
    cfg = tiny_cfg(attention=attention)
    model = build(cfg)
    batch = random_batch(cfg, 2, L, seed=3, images_per_row=2, docs_per_row=2)
    img, doc = batch.image_ids[0], batch.doc_ids[0]
    # 1. Text position q: unchanged when any later position changes.
    text_pos = [int(i) for i in torch.nonzero(img < 0).flatten() if doc[i] == 0]
    q = text_pos[len(text_pos) // 2]
    where = torch.zeros_like(batch.tokens, dtype=torch.bool)
    where[0, q + 1 :] = True
    a, b = _perturbed_hidden(model, batch, where)
    assert not _changed(a, b)[0, : q + 1].any(), "a text position saw a later position"
    # 2. A patch sees a later patch of its own image, but not later text.
    pos0 = torch.nonzero(img == 0).flatten()
    first, last = int(pos0[0]), int(pos0[-1])
    where = torch.zeros_like(where)
    where[0, last] = True
    a, b = _perturbed_hidden(model, batch, where)
    assert _changed(a, b)[0, first], "a patch did not see a later patch of the same image"
    where = torch.zeros_like(where)
    where[0, last + 2] = True  # first text after EOI
    a, b = _perturbed_hidden(model, batch, where)
    assert not _changed(a, b)[0, first : last + 1].any(), "a patch saw text after its image"
    # 3. Nothing crosses a document boundary, in either direction.
    for src, dst in ((0, 1), (1, 0)):
        where = batch.doc_ids == src
        a, b = _perturbed_hidden(model, batch, where)
        assert not _changed(a, b)[batch.doc_ids == dst].any(), f"document {src} leaked into document {dst}"
        assert _changed(a, b)[batch.doc_ids == src].all()


def test_document_blocks_place_each_position_once_and_refuse_a_split_document() -> None:
    """Each position has exactly one slot, holding that position, in a bucket its document fits: a
    one-position document, a padding span between documents and a full-row document included; a
    document whose doc id comes back later in the row is refused with an error naming the fix."""
    doc = torch.tensor([[0, 1, 1, 1, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3],
                        [0] * 24])  # (2, 24): row 0 has a length-1 doc, a padding span (id 5), a 17-long doc
    img = torch.full_like(doc, -1)
    img[0, 8:12] = 0
    blocks = document_blocks(doc, img, torch.float32)
    slot_pos = torch.cat([i.flatten() for i in blocks.index])  # (slots,) the position each slot holds
    assert torch.equal(slot_pos[blocks.inverse], torch.arange(48))  # every position's slot holds it
    assert blocks.inverse.unique().numel() == 48
    sizes = sorted(i.shape[1] for i in blocks.index)
    assert sizes == [16, 24], sizes  # lengths 1-3 -> MIN_BUCKET; 17 and 24 -> 32, capped at the row (24)
    with pytest.raises(ValueError, match="contiguous run.*model.attention=sdpa"):
        document_blocks(torch.tensor([[0, 0, 1, 1, 0, 0]]), torch.full((1, 6), -1), torch.float32)


def test_cpu_autocast_runs_attention_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU autocast (train.precision=bf16_autocast) every attention call gets fp32 inputs (PyTorch's
    bf16 CPU attention backward is the slow one) while the projections run in bf16; the loss stays within
    bf16 rounding of the fp32 model's and every parameter gets a gradient."""
    import pretrain.model.backbone as backbone

    seen: list[torch.dtype] = []
    sdpa = backbone.F.scaled_dot_product_attention

    def spy(q: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        seen.append(q.dtype)
        return sdpa(q, *a, **kw)

    for attention in ("sdpa", "sdpa_varlen"):
        cfg = tiny_cfg(attention=attention)
        model = build(cfg, seed=3)
        batch = random_batch(cfg, 2, L, seed=2, images_per_row=2, docs_per_row=3)
        ref = model(batch).loss.item()
        monkeypatch.setattr(backbone.F, "scaled_dot_product_attention", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
            assert model.layers[0].attention.wqkv(torch.ones(1, cfg.dim)).dtype == torch.bfloat16
        monkeypatch.setattr(backbone.F, "scaled_dot_product_attention", sdpa)
        out.loss.backward()
        assert seen and set(seen) == {torch.float32}, seen
        assert abs(out.loss.item() - ref) < 0.02 * abs(ref), (out.loss.item(), ref)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        seen.clear()


def test_dense_mask_matches_rule_elementwise() -> None:
    """The dense mask equals the rule evaluated position by position (a slow reference)."""
    cfg = tiny_cfg()
    batch = random_batch(cfg, 1, L, seed=5)
    m = dense_mask(batch.doc_ids, batch.image_ids)[0, 0]
    d, im = batch.doc_ids[0].tolist(), batch.image_ids[0].tolist()
    ref = torch.tensor([[d[q] == d[k] and (k <= q or (im[q] >= 0 and im[q] == im[k])) for k in range(L)]
                        for q in range(L)])
    assert torch.equal(m, ref)


@pytest.mark.parametrize("other", ["flex", "sdpa_varlen"])
@pytest.mark.parametrize("patch_encoder,seq_len", [("linear", L), ("unet", L), ("linear", 100)])
def test_attention_paths_agree_with_dense_sdpa_on_outputs_and_gradients(other: str, patch_encoder: str,
                                                                         seq_len: int) -> None:
    """Same weights, same packed batch: loss and every gradient agree with dense SDPA (fp32, atol 1e-5,
    rtol 1e-4); a row length that is no power of two caps sdpa_varlen's largest bucket at the row."""
    results = []
    for attention in ("sdpa", other):
        cfg = tiny_cfg(attention=attention, patch_encoder=patch_encoder)
        model = build(cfg, seed=7)
        batch = random_batch(cfg, 3, seq_len, seed=11, images_per_row=2, docs_per_row=3)
        out = model(batch)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1.loss, o2.loss, atol=1e-5, rtol=1e-4)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize(
    "patch_encoder,patch_size,channels",
    [("linear", 1, ()), ("linear", 2, ()), ("linear", 4, ()), ("unet", 1, (16,)), ("unet", 2, (16, 32)),
     ("unet", 4, (16, 16, 32))],
)
def test_overfit_one_batch(patch_encoder: str, patch_size: int, channels: tuple[int, ...]) -> None:
    """Training on one batch drives both losses down, and every parameter gets a gradient."""
    cfg = tiny_cfg(patch_encoder=patch_encoder, patch_size=patch_size, unet_channels=channels)
    model = build(cfg)
    batch = random_batch(cfg, 2, L, seed=1, images_per_row=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(30):
        out = model(batch)
        out.loss.backward()
        if step == 0:
            # The zero-initialised epsilon layer passes no gradient below it on step 0, but learns itself.
            last = model.patch_decoder.proj if patch_encoder == "linear" else model.patch_decoder.conv_out
            assert last.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        lm, diff = out.lm_loss_sum / out.num_text_tokens, out.diffusion_loss_sum / out.num_images
        first = first or (lm.item(), diff.item())
    assert lm.item() < 0.5 * first[0], f"LM loss {first[0]:.3f} -> {lm.item():.3f}"
    assert diff.item() < 0.8 * first[1], f"diffusion loss {first[1]:.3f} -> {diff.item():.3f}"
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    out = model(batch)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), "a parameter got no gradient"


def test_same_seed_same_result() -> None:
    cfg = tiny_cfg(patch_encoder="unet")
    losses = []
    for _ in range(2):
        model = build(cfg, seed=3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = random_batch(cfg, 2, L, seed=2)
        for _ in range(3):
            out = model(batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[0] == losses[1]
    other = build(cfg, seed=4)
    assert not torch.equal(next(other.parameters()), next(build(cfg, seed=3).parameters()))


def test_zero_init_epsilon_output() -> None:
    for enc in ("linear", "unet"):
        model = build(tiny_cfg(patch_encoder=enc))
        last = model.patch_decoder.proj if enc == "linear" else model.patch_decoder.conv_out
        assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0


def _split(batch: TransfusionBatch, rows: list[int], P: int) -> TransfusionBatch:
    """Rows of a batch as a batch of its own, images renumbered."""
    img = batch.image_ids[rows]
    ids = sorted({int(i) for i in img.flatten() if i >= 0})
    remap = torch.full((batch.num_images + 1,), -1)
    remap[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
    sel = torch.tensor(ids, dtype=torch.long)
    return TransfusionBatch(
        batch.tokens[rows], batch.targets[rows], batch.doc_ids[rows], remap[img], batch.positions[rows],
        batch.latents[sel], batch.noise[sel], batch.timesteps[sel],
    )


def _grads(model: Transfusion) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def test_loss_split_invariance() -> None:
    """1 rank x 4 micro-batches == 2 ranks x 2 micro-batches == one batch of 4 (DeepSpeed-style scaling).

    Rows hold different numbers of text targets and images, so a per-micro-batch mean would differ.
    """
    cfg = tiny_cfg()
    model = build(cfg)
    rows = [random_batch(cfg, 1, L, seed=s, images_per_row=k, docs_per_row=1 + s % 2)
            for s, k in enumerate([0, 1, 2, 1])]
    full = _cat(rows)
    n_text, n_img = full.num_text_targets, full.num_images
    model(full).loss.backward()  # one batch: local counts are the global counts
    reference = _grads(model)
    for world, gas in ((1, 4), (2, 2)):
        per_rank = []
        for r in range(world):
            for m in range(gas):
                mb = rows[r * gas + m]
                out = model(mb, text_denom=n_text / (gas * world), image_denom=max(n_img, 1) / (gas * world))
                (out.loss / gas).backward()  # what DeepSpeed's engine.backward does
            per_rank.append(_grads(model))
        averaged = {n: sum(g[n] for g in per_rank) / world for n in reference}  # the data-parallel all-reduce
        for n in reference:
            torch.testing.assert_close(averaged[n], reference[n], atol=1e-6, rtol=1e-5, msg=f"{world}x{gas}: {n}")


def _cat(batches: list[TransfusionBatch]) -> TransfusionBatch:
    offset, image_ids = 0, []
    for b in batches:
        image_ids.append(torch.where(b.image_ids >= 0, b.image_ids + offset, b.image_ids))
        offset += b.num_images
    return TransfusionBatch(
        torch.cat([b.tokens for b in batches]), torch.cat([b.targets for b in batches]),
        torch.cat([b.doc_ids for b in batches]), torch.cat(image_ids), torch.cat([b.positions for b in batches]),
        torch.cat([b.latents for b in batches]), torch.cat([b.noise for b in batches]),
        torch.cat([b.timesteps for b in batches]),
    )


def forward_noting_skipped_modules(model: Transfusion, batch: TransfusionBatch):
    """model(batch), and the sorted names of the modules holding parameters whose forward did not run."""
    used: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: used.add(n)) for n, m in model.named_modules() if n]
    out = model(batch)
    for h in hooks:
        h.remove()
    leaves = {n for n, m in model.named_modules() if n and not list(m.children()) and list(m.parameters(recurse=False))}
    return out, sorted(leaves - used)


@pytest.mark.parametrize("attention", ["sdpa", "flex", "sdpa_varlen"])
@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_batch_without_images_runs_every_module(attention: str, patch_encoder: str) -> None:
    """No image in the batch: finite loss equal to the LM loss, and every parameter is in the graph."""
    cfg = tiny_cfg(attention=attention, patch_encoder=patch_encoder)
    model = build(cfg)
    batch = random_batch(cfg, 2, L, seed=4, images_per_row=0)
    assert batch.num_images == 0
    batch.validate(cfg.patch_size)
    out, skipped = forward_noting_skipped_modules(model, batch)
    assert not skipped, f"modules skipped without images: {skipped}"
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.diffusion_loss_sum == 0
    torch.testing.assert_close(out.loss, out.lm_loss_sum / out.num_text_tokens)
    assert all(p.grad is not None for p in model.parameters())


def test_timesteps_and_noise_are_inputs() -> None:
    """The batch fixes t and eps: same batch, same loss; other noise, other loss."""
    cfg = tiny_cfg()
    model = build(cfg)
    batch = random_batch(cfg, 2, L, seed=9)
    a, b = model(batch).loss, model(batch).loss
    assert a == b
    other = copy.copy(batch)
    other.noise = torch.randn_like(batch.noise)
    assert model(other).loss != a
    assert (batch.targets[batch.image_ids >= 0] == IGNORE_INDEX).all()


def test_rope_scores_depend_only_on_relative_position() -> None:
    """q.k after RoPE is unchanged when both positions shift by the same amount, and changes otherwise."""
    from pretrain.model.backbone import apply_rope, rope_tables

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 64, generator=g), torch.randn(1, 1, 1, 64, generator=g)

    def score(pq: int, pk: int) -> float:
        rq, rk = (rope_tables(torch.tensor([[p]]), 64, 10000.0) for p in (pq, pk))
        return float((apply_rope(q, rq) * apply_rope(k, rk)).sum())

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_training_step_has_no_host_sync(patch_encoder: str) -> None:
    """Forward + backward on the meta device: any data-dependent op (torch.nonzero, .item(), int(t))
    raises there, so passing proves the model's step never waits for the GPU; the loader's
    precomputed indices give exactly the old path's loss and gradients."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, latent_size=8,
                      patch_size=2, attention="sdpa", patch_encoder=patch_encoder, unet_channels=(8, 16))
    batch = random_batch(cfg, batch_size=2, seq_len=96, seed=0)
    with torch.device("meta"):
        meta_model = Transfusion(cfg)
    out = meta_model(batch.with_indices().to("meta"))
    out.loss.backward()
    assert out.loss.device.type == "meta" and out.num_text_tokens == batch.num_text_targets
    assert all(p.grad is not None for p in meta_model.parameters())
    with pytest.raises((NotImplementedError, RuntimeError)):  # the old path: torch.nonzero needs the data
        meta_model(batch.to("meta"))

    torch.manual_seed(0)
    model = Transfusion(cfg)
    results = []
    for b in (batch, batch.with_indices()):
        model.zero_grad()
        o = model(b)
        o.loss.backward()
        results.append((o.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
