"""Hugging Face Llama <-> our text tower: start the backbone from a `LlamaForCausalLM` directory, or
export ours as one (so the text side can be evaluated with the standard tools).

Mapping (ours -> HF, layer i):
    tok_embeddings.weight                 model.embed_tokens.weight
    layers.i.attention.wqkv.weight        rows [q | k | v] -> self_attn.{q,k,v}_proj.weight (q, k permuted)
    layers.i.attention.wo.weight          self_attn.o_proj.weight
    layers.i.feed_forward.w13.weight      rows [w1 | w3] -> mlp.gate_proj.weight, mlp.up_proj.weight
    layers.i.feed_forward.w2.weight       mlp.down_proj.weight
    layers.i.attention_norm.weight        input_layernorm.weight
    layers.i.ffn_norm.weight              post_attention_layernorm.weight
    norm.weight                           model.norm.weight
    output.weight                         lm_head.weight

RoPE: ours rotates adjacent pairs (x[2j], x[2j+1]) of each head as complex numbers (Meta's Llama
layout); Hugging Face rotates the halves (x[j], x[j + hd/2]). The same function is obtained by
permuting the rows of each head of wq and wk, exactly as transformers'
`convert_llama_weights_to_hf.py` does (`permute`); `unpermute` is its inverse. Wv and the rest are
layout-independent.

Vocabulary: our vocabulary is the Llama tokenizer's plus our special tokens appended (BOI, EOI...);
importing copies the first `vocab_size(HF)` rows of the embedding and LM head and leaves the rest
as a fresh run initialises them. The image-side modules are never touched.

Modality experts (model.modality_experts): the text experts keep the names above, so importing a
Llama fills them and leaves the image experts (`layers.i.image.*`, `image_norm`) at their fresh init;
exporting such a model as a Llama is refused (HFConversionError naming the first image-expert key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from pretrain.model.config import ModelConfig
from pretrain.model import export_layout as layout

Reader = Callable[[str], torch.Tensor]


class HFConversionError(ValueError):
    """A Hugging Face checkpoint that does not map onto our model (the message names the fields)."""


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rows (ours, Meta) -> half-rotation rows (HF), per head. (H*hd, D) -> (H*hd, D)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute`: HF half-rotation rows -> our interleaved pairs. (H*hd, D) -> (H*hd, D)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config_dict(cfg: ModelConfig, max_positions: int = 4096) -> dict:
    """The `LlamaConfig` fields equivalent to our model config (text tower only); `max_positions` = data.seq_len."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads_used,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": max_positions,
        "vocab_size": cfg.vocab_size, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32",
    }


# transformers' `LlamaConfig.__init__` defaults (models/llama/configuration_llama.py, 4.45-4.57) for the keys we
# check: a config.json may omit any of them (the released Llama-2 configs have no rope_theta) and
# transformers then uses these. `llama_defaults` reads them from transformers when it is installed.
LLAMA_DEFAULTS: dict[str, object] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
}


def llama_defaults() -> dict[str, object]:
    """What transformers assumes for a key missing from a Llama config.json (`LLAMA_DEFAULTS` without transformers).

    num_key_value_heads defaults to num_attention_heads and head_dim to hidden_size // num_attention_heads
    (both derived, see `with_llama_defaults`)."""
    try:
        from transformers import LlamaConfig
    except ImportError:
        return dict(LLAMA_DEFAULTS)
    d = LlamaConfig().to_dict()
    return {k: d.get(k, v) for k, v in LLAMA_DEFAULTS.items()}


def with_llama_defaults(hf: dict) -> tuple[dict, dict[str, object]]:
    """(`hf` completed with transformers' defaults for missing keys, {key: default used} for those keys)."""
    filled: dict[str, object] = {}
    out = dict(hf)
    for k, v in llama_defaults().items():
        if k not in out:
            out[k] = filled[k] = v
    if out.get("num_key_value_heads") is None:
        filled["num_key_value_heads"] = out["num_key_value_heads"] = out["num_attention_heads"]
    if out.get("head_dim") is None:
        filled["head_dim"] = out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out, filled


def check_hf_config(hf: dict, cfg: ModelConfig, where: str) -> int:
    """Raise HFConversionError naming every HF field that does not match `cfg`; returns HF's vocab size.

    Keys missing from `hf` take transformers' LlamaConfig defaults (`with_llama_defaults`); an error about
    such a key says it was missing and which default was used."""
    want = hf_config_dict(cfg)
    hf, filled = with_llama_defaults(hf)

    def shown(key: str) -> str:
        return (f"{key} missing from config.json, transformers' default {hf[key]!r}" if key in filled
                else f"{key}={hf[key]!r}")

    wrong = []
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "rope_theta", "hidden_act"):
        got = hf[key]
        if got != want[key] and not (isinstance(got, float) and abs(got - want[key]) < 1e-12):
            wrong.append(f"{shown(key)} (ours {want[key]!r})")
    if hf["head_dim"] != cfg.head_dim:
        wrong.append(f"{shown('head_dim')} (ours {cfg.head_dim})")
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        if hf.get(key):
            wrong.append(f"{key}={hf[key]!r} (we support none)")
    if wrong:
        raise HFConversionError(f"{where}: does not match model.* of this run: " + "; ".join(wrong)
                                + ". Set the model keys to the checkpoint's (model.dim, n_layers, n_heads, "
                                "n_kv_heads, ffn_dim, norm_eps, rope_theta).")
    if hf["vocab_size"] > cfg.vocab_size:
        raise HFConversionError(f"{where}: {shown('vocab_size')} exceeds ours ({cfg.vocab_size}); train with "
                                "the checkpoint's tokenizer (data.tokenizer wrapping its tokenizer.model)")
    return int(hf["vocab_size"])


def read_hf_dir(path: Path) -> tuple[dict, Reader]:
    """config.json and a lazy tensor reader over the directory's safetensors (single file or index)."""
    from safetensors import safe_open

    cfg_file = path / layout.HF_CONFIG
    if not cfg_file.is_file():
        raise HFConversionError(f"{cfg_file} missing: point at a Hugging Face Llama directory (config.json + "
                                f"safetensors)")
    index = path / layout.WEIGHTS_INDEX
    if index.is_file():
        where = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    elif (path / layout.WEIGHTS).is_file():
        with safe_open(str(path / layout.WEIGHTS), "pt") as f:
            where = {k: path / layout.WEIGHTS for k in f.keys()}
    else:
        raise HFConversionError(f"{path}: no model.safetensors nor model.safetensors.index.json (pytorch_model.bin "
                                "is pickle and not read; convert it with transformers' save_pretrained)")

    def read(name: str) -> torch.Tensor:
        if name not in where:
            raise HFConversionError(f"{path}: tensor {name} missing from the safetensors")
        with safe_open(str(where[name]), "pt") as f:
            return f.get_tensor(name)

    return json.loads(cfg_file.read_text()), read


def _layer_from_hf(read: Reader, cfg: ModelConfig, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    p = f"model.layers.{i}."
    q = unpermute(read(p + "self_attn.q_proj.weight"), cfg.n_heads)  # (H*hd, D)
    k = unpermute(read(p + "self_attn.k_proj.weight"), cfg.kv_heads_used)  # (Hkv*hd, D)
    v = read(p + "self_attn.v_proj.weight")  # (Hkv*hd, D)
    yield f"layers.{i}.attention.wqkv.weight", torch.cat([q, k, v])
    yield f"layers.{i}.attention.wo.weight", read(p + "self_attn.o_proj.weight")
    yield f"layers.{i}.feed_forward.w13.weight", torch.cat([read(p + "mlp.gate_proj.weight"),
                                                            read(p + "mlp.up_proj.weight")])
    yield f"layers.{i}.feed_forward.w2.weight", read(p + "mlp.down_proj.weight")
    yield f"layers.{i}.attention_norm.weight", read(p + "input_layernorm.weight")
    yield f"layers.{i}.ffn_norm.weight", read(p + "post_attention_layernorm.weight")


def from_hf(read: Reader, hf: dict, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our text-tower tensors from HF ones, one at a time. The embedding and LM head come as
    (hf_vocab, D): copy them into the first rows only (see `pretrain.train.engine.copy_into`)."""
    yield "tok_embeddings.weight", read("model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        yield from _layer_from_hf(read, cfg, i)
    yield "norm.weight", read("model.norm.weight")
    yield "output.weight", read("model.embed_tokens.weight" if hf.get("tie_word_embeddings") else "lm_head.weight")


def to_hf(name: str, t: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors for one of our tensors (none for the image-side modules). Raises HFConversionError
    for an image expert's tensor (model.modality_experts): a Llama has no per-modality weights."""
    if name == "image_norm.weight" or name.startswith("layers.") and name.split(".", 3)[2] == "image":
        raise HFConversionError(f"{name}: an image expert of model.modality_experts=true; a Hugging Face Llama has "
                                "no modality experts, so this model cannot be exported as one (export it with "
                                "pretrain.artifacts.export and load it with Transfusion.from_pretrained)")
    if name == "tok_embeddings.weight":
        yield "model.embed_tokens.weight", t
    elif name == "norm.weight":
        yield "model.norm.weight", t
    elif name == "output.weight":
        yield "lm_head.weight", t
    elif name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        p = f"model.layers.{i}."
        if rest == "attention.wqkv.weight":
            q, k, v = t.split([cfg.n_heads * cfg.head_dim, cfg.kv_heads_used * cfg.head_dim,
                               cfg.kv_heads_used * cfg.head_dim])
            yield p + "self_attn.q_proj.weight", permute(q, cfg.n_heads).contiguous()
            yield p + "self_attn.k_proj.weight", permute(k, cfg.kv_heads_used).contiguous()
            yield p + "self_attn.v_proj.weight", v.contiguous()
        elif rest == "feed_forward.w13.weight":
            gate, up = t.chunk(2)
            yield p + "mlp.gate_proj.weight", gate.contiguous()
            yield p + "mlp.up_proj.weight", up.contiguous()
        else:
            yield p + {"attention.wo.weight": "self_attn.o_proj.weight",
                       "feed_forward.w2.weight": "mlp.down_proj.weight",
                       "attention_norm.weight": "input_layernorm.weight",
                       "ffn_norm.weight": "post_attention_layernorm.weight"}[rest], t


def hf_tensors(tensors: Iterator[tuple[str, object]], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Map a stream of our (name, tensor or lazy tensor) pairs to HF ones, materialising one at a time."""
    for name, lazy in tensors:
        t = lazy if isinstance(lazy, torch.Tensor) else lazy.contiguous()
        yield from to_hf(name, t, cfg)
