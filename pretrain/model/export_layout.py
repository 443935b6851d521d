"""The files of an export directory: one home for their names and for reading its model section back.

`pretrain.artifacts.export` writes them, `Transfusion.from_pretrained`, generation, evaluation and
`train.init_from` read them. It sits beside the model (not in `pretrain.artifacts`) because the
model's `from_pretrained` reads it and the model imports nothing above itself (ci/import_graph.py).

    config.yaml                       the run config the checkpoint was trained with (`pretrain.config`)
    model.safetensors                 the weights, or model-0000i-of-0000n.safetensors + the index json
    tokenizer.model, tokenizer.json   the SentencePiece model and its special ids (contract.special_ids)
    vae/                              the VAE directory (diffusers AutoencoderKL), when shipped
    export.json                       what wrote it: format, source checkpoint, dtype, weights
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pretrain.model.config import ModelConfig

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"  # also Hugging Face's name for an unsharded checkpoint
WEIGHTS_INDEX = "model.safetensors.index.json"  # Hugging Face's index of a sharded checkpoint
TOKENIZER = "tokenizer.model"
SPECIAL_IDS = "tokenizer.json"
VAE = "vae"
MANIFEST = "export.json"
HF_CONFIG = "config.json"  # a Hugging Face model directory's config (--hf-llama output, train.init_from input)


def shard_name(i: int, n: int) -> str:
    """The file of shard i (0-based) of n: model-0000{i+1}-of-0000n.safetensors (Hugging Face's pattern)."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of an export or Hugging Face directory: the index's shards, or model.safetensors.

    Raises FileNotFoundError naming the first missing file.
    """
    index = root / WEIGHTS_INDEX
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    for n in names:
        if not (root / n).is_file():
            raise FileNotFoundError(f"{root / n} missing: the export is incomplete; export again")
    return [root / n for n in names]


def model_config(section: dict[str, Any], where: str) -> ModelConfig:
    """The `model:` section of a saved config as a ModelConfig, every key accounted for.

    A saved config names every key of the ModelConfig that wrote it, so a key this checkout does not
    know, or one it expects and the file lacks, means the file comes from another version of the code:
    raises ValueError naming the keys and `where` (the file), instead of guessing defaults or a TypeError.
    Lists become tuples (YAML has no tuple).
    """
    if not isinstance(section, dict):
        raise ValueError(f"{where}: the model section is {type(section).__name__}, not a mapping of model.* keys")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown, missing = sorted(set(section) - known), sorted(known - set(section))
    if unknown or missing:
        parts = [f"unknown keys {', '.join('model.' + k for k in unknown)}" if unknown else "",
                 f"missing keys {', '.join('model.' + k for k in missing)}" if missing else ""]
        moved = [f"model.{k} is now {ModelConfig.moved[k][0]}" for k in unknown if k in ModelConfig.moved]
        raise ValueError(f"{where}: {'; '.join(p for p in parts if p)}"
                         + (f" ({'; '.join(moved)})" if moved else "")
                         + ": it was written by another version of this code; export the checkpoint again with "
                         "this checkout, or load it with the version that wrote it")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})


def read_model_config(root: Path) -> ModelConfig:
    """The ModelConfig of the export directory `root` (its config.yaml's model section, see `model_config`).

    Raises FileNotFoundError when config.yaml is missing, ValueError when its model keys differ from this code's.
    """
    import yaml

    path = root / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: point at a directory written by pretrain.artifacts.export")
    saved = yaml.safe_load(path.read_text()) or {}
    if "model" not in saved:
        raise ValueError(f"{path}: no model section; it is not a config written by pretrain.artifacts.export")
    return model_config(saved["model"], str(path))
