"""`train.init_from`: the tensors a new run starts from, read from an export of ours or a Hugging Face Llama dir.

The trainer receives `initial_tensors` through its hooks (`pretrain.train.hooks.TrainHooks.initial_tensors`)
and copies each tensor into its (ZeRO-3 partitioned) parameter one at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from pretrain.config import Config, config_changes
from pretrain.artifacts.export import export_tensors, is_export, read_export_config
from pretrain.model import export_layout as layout
from pretrain.artifacts.hf_llama import check_hf_config, from_hf, read_hf_dir


def initial_tensors(path: Path, cfg: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """(our parameter name, tensor) pairs from `train.init_from`: an export of ours or a HF Llama dir.

    An export must have the same model.* keys (model.attention aside) as this run; a HF Llama dir
    must match the backbone shape (pretrain.artifacts.hf_llama.check_hf_config). Errors name the differing keys.
    """
    if is_export(path) and (path / layout.CONFIG).is_file():
        fixed, _ = config_changes(read_export_config(path), cfg)
        wrong = {k: v for k, v in fixed.items() if k.startswith("model.")}
        if wrong:
            raise ValueError(f"train.init_from={path}: the export's model differs from this run's: "
                             + "; ".join(f"{k} export {a!r}, run {b!r}" for k, (a, b) in wrong.items()))
        yield from export_tensors(path)
    elif (path / layout.HF_CONFIG).is_file():
        hf, read = read_hf_dir(path)
        check_hf_config(hf, cfg.model, f"train.init_from={path}")
        yield from from_hf(read, hf, cfg.model)
    else:
        raise FileNotFoundError(f"train.init_from={path}: neither an export (export.json + config.yaml) nor a Hugging "
                                "Face Llama directory (config.json)")
