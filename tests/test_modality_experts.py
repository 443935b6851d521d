"""model.modality_experts (Mixture-of-Transformers, Liang et al. 2024) on a 2-layer model, CPU, fp32.

The reference is the dense model: with the image expert's weights copied from the text expert's
(tied), MoT computes the same function, so loss, logits, epsilon and the summed expert gradients
equal the dense model's to fp32 rounding (atol 1e-5 / rtol 1e-4, as the flex-vs-SDPA test: the
grouped rows change the summation order of nothing but the gathers). The 2-rank ZeRO-3 run is in
tests/test_train_zero3.py.
"""

from __future__ import annotations

import pytest
import torch

from batches import random_batch
from contract.batch import TransfusionBatch
from pretrain.model import CachedChunk, KVCache, ModelConfig, Transfusion
from test_model import build, forward_noting_skipped_modules, tiny_cfg

L = 128
TOL = dict(atol=1e-5, rtol=1e-4)


def tied_pair(seed: int = 0, **kw: object) -> tuple[Transfusion, Transfusion]:
    """A dense model and a MoT model whose text and image experts both hold the dense weights."""
    dense = build(tiny_cfg(**kw), seed)
    with torch.no_grad():  # the epsilon layer is zero-initialised: give it weights so eps is informative
        dense.patch_decoder.proj.weight.normal_(0, 0.02)
    mot = Transfusion(tiny_cfg(modality_experts=True, **kw))
    state = dense.state_dict()
    tied = dict(state, **{"image_norm.weight": state["norm.weight"]})
    for k, v in state.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            tied[f"layers.{i}.image.{rest}"] = v.clone()
    mot.load_state_dict(tied, strict=True)
    return dense, mot


def _outputs(model: Transfusion, batch: TransfusionBatch) -> tuple[torch.Tensor, ...]:
    """Loss (with backward run), LM logits at every position (B*L, V) and epsilon (N, C, H, W)."""
    out = model(batch)
    out.loss.backward()
    x_t = torch.randn_like(batch.latents)
    with torch.no_grad():
        h, eps = model.hidden_and_sampler_input(batch, x_t, batch.timesteps)
    return out.loss.detach(), model.lm_logits(h).detach(), eps


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_tied_experts_equal_dense_model(attention: str) -> None:
    """Loss, logits, eps equal; each dense gradient = text expert's + image expert's (chain rule of tying)."""
    dense, mot = tied_pair(attention=attention)
    batch = random_batch(dense.cfg, 2, L, seed=3, images_per_row=2, docs_per_row=2)
    torch.manual_seed(5)
    ref = _outputs(dense, batch)
    torch.manual_seed(5)
    got = _outputs(mot, batch)
    for name, a, b in zip(("loss", "logits", "eps"), ref, got):
        torch.testing.assert_close(b, a, **TOL, msg=name)
    grads = dict(mot.named_parameters())
    for name, p in dense.named_parameters():
        g = grads[name].grad
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            image = grads[f"layers.{i}.image.{rest}"].grad
            assert g.abs().sum() > 0 and image.abs().sum() > 0, f"{name}: both experts get a gradient from images"
            g = g + image
        elif name == "norm.weight":
            g = g + grads["image_norm.weight"].grad
        torch.testing.assert_close(g, p.grad, **TOL, msg=f"gradient of {name}")


def test_untied_experts_differ_from_dense() -> None:
    """Image experts drawn by the same rule as the text ones (not copied) change the patch outputs and,
    through attention, the text after an image; text before any image only met the text experts."""
    fresh = build(tiny_cfg(modality_experts=True), seed=0)
    for name, w_text in fresh.layers[0].named_parameters():
        if not name.startswith("image."):
            w_img = fresh.layers[0].get_parameter(f"image.{name}")
            assert w_text.shape == w_img.shape and (w_text.ndim == 1 or not torch.equal(w_text, w_img)), name
            assert w_img.std().item() == pytest.approx(w_text.std().item(), rel=0.05, abs=1e-6), name  # the same rule
    dense, mot = tied_pair()
    mot.load_state_dict({k: v for k, v in fresh.state_dict().items() if ".image." in k}, strict=False)
    cfg = dense.cfg
    batch = random_batch(cfg, 2, L, seed=3)
    x = torch.randn(2, L, cfg.dim)
    with torch.no_grad():
        h_dense, h_mot = dense.backbone(x, batch), mot.backbone(x, batch)
    img = batch.image_ids >= 0
    assert (h_dense[img] - h_mot[img]).abs().amax() > 1e-3
    after_image = torch.zeros_like(img)
    after_image[0, int(torch.nonzero(img[0])[-1]) + 1:] = True  # text that attends to an image
    assert (h_dense[after_image] - h_mot[after_image]).abs().amax() > 1e-3
    first_text = torch.zeros_like(img)
    first_text[0, : int(torch.nonzero(img[0])[0])] = True  # text before any image: only text experts ran
    torch.testing.assert_close(h_mot[first_text], h_dense[first_text])


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_batch_without_images_gives_image_experts_zero_gradients(attention: str) -> None:
    """Every expert module still runs (ZeRO-3 gathers it on every rank) on (0, D) rows; its gradient is
    zeros, not None; the text side is the dense model's."""
    dense, mot = tied_pair(attention=attention)
    batch = random_batch(dense.cfg, 2, L, seed=4, images_per_row=0)
    out, skipped = forward_noting_skipped_modules(mot, batch)
    assert not skipped, f"modules skipped without images: {skipped}"
    out.loss.backward()
    torch.testing.assert_close(out.loss, dense(batch).loss, **TOL)
    image = {n: p.grad for n, p in mot.named_parameters() if ".image." in n or n == "image_norm.weight"}
    assert len(image) == 6 * mot.cfg.n_layers + 1
    for n, g in image.items():
        assert g is not None and torch.count_nonzero(g) == 0, n
    assert mot.layers[0].attention.wqkv.weight.grad.abs().sum() > 0


def test_cached_step_of_tied_experts_equals_dense() -> None:
    """The KV-cached generation path (prompt, a denoising chunk, a committed image, text tokens)."""
    dense, mot = tied_pair()
    dense.eval(), mot.eval()
    P = dense.cfg.patches_per_image
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 8, 8, 8, generator=g), torch.tensor([700, 30])
    prompt = torch.tensor([[1, 5, 6, 3], [1, 7, 8, 3]])
    patch_ids, pads = torch.arange(2)[:, None].expand(2, P), torch.zeros(2, P, dtype=torch.long)
    ones = lambda n: torch.ones(2, n, dtype=torch.bool)  # noqa: E731
    runs = []
    for model in (dense, mot):
        cache, seen = KVCache(model.cfg, 2), []
        with torch.no_grad():
            seen.append(model.forward_cached(cache, CachedChunk(prompt, torch.full_like(prompt, -1), ones(4)))[0])
            seen += model.forward_cached(cache, CachedChunk(pads, patch_ids, ones(P), x_t, t), commit=False)
            seen += model.forward_cached(cache, CachedChunk(pads, patch_ids, ones(P), x_t, t))
            tok = torch.tensor([[4], [4]])
            seen.append(model.forward_cached(cache, CachedChunk(tok, torch.full_like(tok, -1), ones(1)))[0])
        runs.append(seen)
    for i, (a, b) in enumerate(zip(*runs)):
        torch.testing.assert_close(b, a, **TOL, msg=f"output {i}")


def test_cached_step_of_untied_experts_equals_full_forward() -> None:
    """With distinct experts, the cached chunks route rows as the training forward does."""
    from pretrain.inference.generate import packed_batch

    model = build(tiny_cfg(modality_experts=True), seed=1).eval()
    with torch.no_grad():
        model.patch_decoder.proj.weight.normal_(0, 0.02)
    P = model.cfg.patches_per_image
    x_t, t = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([400])
    prefix, suffix = [1, 5, 6, 3], [4, 9, 10]
    with torch.no_grad():
        h_ref, eps_ref = model.hidden_and_sampler_input(packed_batch(model, [prefix + [None] * P + suffix], x_t, t, 0),
                                                        x_t, t)
        cache = KVCache(model.cfg, 1)
        tokens = torch.tensor([prefix])
        model.forward_cached(cache, CachedChunk(tokens, torch.full_like(tokens, -1),
                                                torch.ones_like(tokens, dtype=torch.bool)))
        img = (torch.zeros(1, P, dtype=torch.long), torch.zeros(1, P, dtype=torch.long),
               torch.ones(1, P, dtype=torch.bool))
        _, eps = model.forward_cached(cache, CachedChunk(*img, x_t, t))
        tokens = torch.tensor([suffix])
        h, _ = model.forward_cached(cache, CachedChunk(tokens, torch.full_like(tokens, -1),
                                                       torch.ones_like(tokens, dtype=torch.bool)))
    torch.testing.assert_close(eps, eps_ref, **TOL)
    torch.testing.assert_close(h[0], h_ref[-len(suffix):], **TOL)


def test_training_step_has_no_host_sync() -> None:
    """The routing (a stable argsort of the image positions) runs on the meta device, so it needs no host sync."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, latent_size=8, patch_size=2,
                      attention="sdpa", modality_experts=True)
    batch = random_batch(cfg, batch_size=2, seq_len=96, seed=0)
    with torch.device("meta"):
        model = Transfusion(cfg)
    out = model(batch.with_indices().to("meta"))
    out.loss.backward()
    assert out.loss.device.type == "meta" and all(p.grad is not None for p in model.parameters())


def test_config_key_from_yaml_and_parameter_count(tmp_path) -> None:
    """model.modality_experts from a YAML file; the estimate's counts equal the built model's parameters,
    the image experts are one more block per layer plus a final norm, and FLOPs per position do not grow."""
    from pretrain.config import load_config
    from pretrain.configlib import ConfigError
    from pretrain.plan.estimate import count_parameters, default_mix, flops_breakdown

    (tmp_path / "mot.yaml").write_text("model:\n  dim: 64\n  n_layers: 3\n  n_heads: 4\n  vocab_size: 97\n"
                                       "  latent_size: 8\n  modality_experts: true\n")
    cfg = load_config(tmp_path / "mot.yaml").model
    assert cfg.modality_experts is True
    with pytest.raises(ConfigError, match="modality_experts"):
        load_config(tmp_path / "mot.yaml", ["model.modality_experts=3"])
    model = Transfusion(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    d, hidden = cfg.dim, cfg.hidden_dim
    per_block = d * 3 * d + d * d + d * 2 * hidden + hidden * d + 2 * d  # wqkv, wo, w13, w2, 2 norms (by hand)
    assert counts["image_experts"] == cfg.n_layers * per_block + d
    dense_cfg = load_config(tmp_path / "mot.yaml", ["model.modality_experts=false"]).model
    dense = count_parameters(dense_cfg)
    assert counts["total"] - dense["total"] == counts["image_experts"] and dense["image_experts"] == 0
    mix = default_mix(256, cfg.patches_per_image)
    assert flops_breakdown(cfg, mix).total == flops_breakdown(dense_cfg, mix).total


def test_hf_llama_export_of_experts_is_an_error() -> None:
    from pretrain.artifacts.hf_llama import HFConversionError, hf_tensors

    model = build(tiny_cfg(modality_experts=True))
    with pytest.raises(HFConversionError, match=r"layers\.0\.image\.attention_norm\.weight.*modality_experts"):
        list(hf_tensors(iter(model.state_dict().items()), model.cfg))


def test_export_directory_round_trip(tmp_path) -> None:
    """safetensors of a MoT model + its config.yaml load back with from_pretrained to the same outputs."""
    from safetensors.torch import save_file

    from pretrain.config import Config, save_config

    model = build(tiny_cfg(modality_experts=True), seed=2)
    cfg = Config()
    cfg.model = model.cfg
    save_config(cfg, tmp_path / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    back = Transfusion.from_pretrained(tmp_path)
    assert back.cfg.modality_experts and isinstance(back.layers[1].image, torch.nn.Module)
    batch = random_batch(model.cfg, 1, L, seed=6)
    torch.testing.assert_close(back(batch).loss, model(batch).loss, atol=0, rtol=0)


def test_activation_checkpointing_recomputes_experts_exactly() -> None:
    """The trainer's per-block checkpointing (pretrain.train.engine) wraps the expert blocks: same loss and
    gradients."""
    from pretrain.train.engine import apply_activation_checkpointing

    cfg = tiny_cfg(modality_experts=True)
    batch = random_batch(cfg, 2, L, seed=8)
    runs = []
    for ckpt in (False, True):
        model = build(cfg, seed=4)
        if ckpt:
            apply_activation_checkpointing(model)
        out = model(batch)
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = runs
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
