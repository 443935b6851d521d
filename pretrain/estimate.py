"""Exact parameter count of a config, built on the meta device (no memory, seconds even for 7B).

    python -m pretrain.estimate --config configs/transfusion_7b.yaml [model.patch_encoder=unet ...]
"""

from __future__ import annotations

import argparse
import sys

import torch

from pretrain.config import load_config
from pretrain.configlib import ConfigError
from pretrain.model import ModelConfig, Transfusion


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part: total, embedding, backbone, lm_head, patch_encoder, patch_decoder."""
    with torch.device("meta"):
        model = Transfusion(cfg)

    def n(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return {
        "total": n(model),
        "embedding": n(model.tok_embeddings),
        "backbone": n(model.layers) + n(model.norm),
        "lm_head": n(model.output),
        "patch_encoder": n(model.patch_encoder),
        "patch_decoder": n(model.patch_decoder),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: print `parameters: N` and the breakdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = count_parameters(cfg.model)
    print(f"parameters: {counts['total']}")
    for k, v in counts.items():
        if k != "total":
            print(f"  {k:14s} {v:>15,d}  ({v / counts['total']:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
