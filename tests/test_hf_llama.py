"""Hugging Face Llama in and out, against `transformers`' own LlamaForCausalLM (the independent reference).

A small random LlamaForCausalLM (GQA 4 heads / 2 KV heads, and plain 4 / 4) is saved with
save_pretrained; our model takes its text tower (`train.init_from` code path, single process) and
must give HF's logits on the same tokens; ours exported with `to_hf` must load in transformers and
give ours. Tolerance (fp32): max |diff| <= 1e-4 on logits of std ~1.5 (measured <= 6e-6 both ways, GQA
and not: only the
summation order and the RoPE formula (complex product vs rotate_half) differ).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # the optional extra [hf]; CI pins it (ci/requirements.txt)

from pretrain.config import Config, ModelConfig
from pretrain.artifacts.init_from import initial_tensors
from pretrain.train.engine import copy_into
from pretrain.artifacts.export import write_shards
from pretrain.artifacts.hf_llama import HFConversionError, hf_config_dict, hf_tensors, permute, unpermute
from pretrain.model import IGNORE_INDEX, Transfusion, TransfusionBatch

HF_VOCAB, OUR_VOCAB = 96, 100  # ours = HF's + 4 special tokens
TOL = 1e-4


def _hf_model(tmp: Path, kv_heads: int) -> tuple[Path, "transformers.LlamaForCausalLM"]:
    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
        tie_word_embeddings=False, initializer_range=0.2,  # large weights: a wrong mapping shows clearly
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp / "hf", safe_serialization=True)
    return tmp / "hf", model


def _our_config(kv_heads: int) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, ffn_dim=96, vocab_size=OUR_VOCAB,
                            attention="sdpa", latent_channels=4, latent_size=4, patch_size=2)
    return cfg


def _text_logits(model: Transfusion, tokens: torch.Tensor) -> torch.Tensor:
    """Our logits (B, L, V) for text-only rows (one document per row, positions 0..L-1)."""
    B, L = tokens.shape
    c = model.cfg
    batch = TransfusionBatch(
        tokens=tokens, targets=torch.full_like(tokens, IGNORE_INDEX), doc_ids=torch.zeros_like(tokens),
        image_ids=torch.full_like(tokens, -1), positions=torch.arange(L).expand(B, L).contiguous(),
        latents=torch.zeros(0, c.latent_channels, c.latent_size, c.latent_size), noise=torch.zeros(0, c.latent_channels,
        c.latent_size, c.latent_size), timesteps=torch.zeros(0, dtype=torch.long),
    )
    x = model.tok_embeddings(tokens)  # (B, L, D)
    return model.lm_logits(model.backbone(x, batch))  # (B, L, V)


def test_permute_is_the_rope_convention_change_and_unpermute_inverts_it() -> None:
    """permute maps interleaved-pair rotation to half rotation: checked on the rotation itself."""
    from pretrain.model.backbone import apply_rope, rope_tables

    hd, H, D = 8, 2, 5
    w = torch.randn(H * hd, D)
    x = torch.randn(D)
    pos = torch.tensor([[3]])
    ours = apply_rope((w @ x).view(1, 1, H, hd), rope_tables(pos, hd, 10000.0)).view(-1)  # interleaved pairs
    from transformers.models.llama.modeling_llama import rotate_half

    inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.cat([3 * inv, 3 * inv])  # HF's cos/sin layout (hd,)
    hq = (permute(w, H) @ x).view(H, hd)
    theirs = hq * ang.cos() + rotate_half(hq) * ang.sin()
    assert torch.allclose(permute(ours.view(H * hd, 1), H).view(-1), theirs.view(-1), atol=1e-6)
    assert torch.equal(unpermute(permute(w, H), H), w)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_llama_in_gives_hf_logits_and_out_loads_in_transformers(tmp_path: Path, kv_heads: int) -> None:
    hf_dir, hf_model = _hf_model(tmp_path, kv_heads)
    cfg = _our_config(kv_heads)
    torch.manual_seed(0)
    ours = Transfusion(cfg.model).eval()
    fresh_special = ours.tok_embeddings.weight[HF_VOCAB:].detach().clone()
    fresh_patch = {k: v.clone() for k, v in ours.patch_encoder.state_dict().items()}
    params = dict(ours.named_parameters())
    names = []
    for name, t in initial_tensors(hf_dir, cfg):
        copy_into(params[name], t, name)
        names.append(name)
    assert len(names) == 2 + 6 * 2 + 1  # embeddings, 6 tensors per layer, norm, head
    tokens = torch.randint(0, HF_VOCAB, (2, 24))
    with torch.no_grad():
        ref = hf_model(tokens).logits  # (B, L, HF_VOCAB)
        got = _text_logits(ours, tokens)  # (B, L, OUR_VOCAB)
    assert ref.std() > 0.5  # a real signal, not near-zero logits
    assert (got[..., :HF_VOCAB] - ref).abs().max() <= TOL
    # special-token rows and image modules keep their fresh initialisation
    assert torch.equal(ours.tok_embeddings.weight[HF_VOCAB:], fresh_special)
    assert all(torch.equal(v, fresh_patch[k]) for k, v in ours.patch_encoder.state_dict().items())

    # out: our text tower as a LlamaForCausalLM dir, loaded by transformers itself
    out = tmp_path / "out"
    out.mkdir()
    write_shards(hf_tensors(iter(ours.state_dict().items()), cfg.model), out, torch.float32, 2**30)
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg.model)))
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, OUR_VOCAB, (2, 24))  # special ids too
    with torch.no_grad():
        assert (back(tokens).logits - _text_logits(ours, tokens)).abs().max() <= TOL


def test_mismatched_llama_config_names_the_fields(tmp_path: Path) -> None:
    hf_dir, _ = _hf_model(tmp_path, 2)
    cfg = _our_config(4)
    cfg.model.ffn_dim = 128
    with pytest.raises(HFConversionError, match=r"num_key_value_heads=2 \(ours 4\).*intermediate_size=96 \(ours 128\)"):
        list(initial_tensors(hf_dir, cfg))


def test_llama2_config_without_rope_theta_takes_transformers_defaults(tmp_path: Path) -> None:
    """A config.json as Meta's Llama-2 releases ship it (no rope_theta, no head_dim; the early ones no
    num_key_value_heads either): the missing keys take transformers' LlamaConfig defaults, the import gives
    the logits of transformers loading the same directory, and a mismatch names the key and the default."""
    from pretrain.artifacts.hf_llama import LLAMA_DEFAULTS

    reference = transformers.LlamaConfig().to_dict()  # the independent reference for the defaults
    assert {k: reference[k] for k in LLAMA_DEFAULTS} == LLAMA_DEFAULTS
    hf_dir, _ = _hf_model(tmp_path, 4)
    hf = json.loads((hf_dir / "config.json").read_text())
    for key in ("rope_theta", "head_dim", "num_key_value_heads", "rope_parameters"):
        hf.pop(key, None)
    (hf_dir / "config.json").write_text(json.dumps(hf))
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    cfg = _our_config(4)
    ours = Transfusion(cfg.model).eval()
    params = dict(ours.named_parameters())
    for name, t in initial_tensors(hf_dir, cfg):
        copy_into(params[name], t, name)
    tokens = torch.randint(0, HF_VOCAB, (2, 24))
    with torch.no_grad():
        assert (hf_model(tokens).logits - _text_logits(ours, tokens)[..., :HF_VOCAB]).abs().max() <= TOL
    cfg.model.rope_theta = 500000.0
    with pytest.raises(HFConversionError, match=r"rope_theta missing from config\.json, transformers' default "
                                                r"10000\.0 \(ours 500000\.0\)"):
        list(initial_tensors(hf_dir, cfg))
