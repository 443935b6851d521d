"""Export a ZeRO-3 checkpoint for inference: safetensors weights + config + tokenizer (+ VAE).

Streams tensor by tensor: DeepSpeed's lazy consolidation memory-maps each rank's fp32 partitions
and each full tensor is assembled only when written, and written shards are released, so peak
memory is about one shard (`--max-shard-gb`), never the whole model several times over.

    python -m pretrain.export --run-dir runs/tiny --out exports/tiny [--step N] [--dtype bf16] [--vae DIR]

Output: `model.safetensors` (or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`),
`config.yaml` (the run's merged config), `tokenizer.model` + `tokenizer.json` (special ids), `vae/`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from pretrain import checkpoint
from pretrain.config import load_config, save_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The newest complete checkpoint of `run_dir`, or the one of `step`; clear errors otherwise."""
    root = checkpoint.checkpoint_root(run_dir)
    if step is not None:
        path = root / checkpoint.tag_for(step)
        if not checkpoint.is_complete(path):
            raise FileNotFoundError(f"{path}: no complete checkpoint for step {step} (missing {checkpoint.MARKER})")
        return path
    found = checkpoint.find_resume("auto", run_dir)
    if found is None:
        raise FileNotFoundError(f"{root}: no complete checkpoint; train first or pass --run-dir of a run that saved one")
    return found


def lazy_tensors(ckpt: Path) -> Iterator[tuple[str, "object"]]:
    """(name, lazy tensor) pairs of the consolidated fp32 model, in checkpoint order."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    yield from state.items()


def write_shards(tensors: Iterator[tuple[str, object]], out: Path, dtype: torch.dtype, max_shard_bytes: int) -> list[Path]:
    """Write tensors into safetensors shards of at most `max_shard_bytes` each; returns the shard paths."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    paths: list[Path] = []
    size = 0

    def flush() -> None:
        nonlocal size
        path = out / f"model-part{len(paths):05d}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        paths.append(path)
        shards[-1] = {}
        size = 0

    for name, lazy in tensors:
        t = lazy.contiguous() if not isinstance(lazy, torch.Tensor) else lazy  # materialise this one tensor
        t = t.to(dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = t
        size += nbytes
    if shards[-1] or not paths:
        flush()
    return _name_shards(paths, out)


def _name_shards(paths: list[Path], out: Path) -> list[Path]:
    """One shard -> model.safetensors; several -> model-0000i-of-0000n.safetensors + index json."""
    from safetensors import safe_open

    if len(paths) == 1:
        final = out / "model.safetensors"
        paths[0].replace(final)
        return [final]
    n = len(paths)
    final_paths, weight_map = [], {}
    for i, p in enumerate(paths):
        final = out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        p.replace(final)
        with safe_open(str(final), "pt") as f:
            weight_map.update({k: final.name for k in f.keys()})
        final_paths.append(final)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    return final_paths


def export(run_dir: Path, out: Path, step: int | None, dtype: str, max_shard_gb: float, vae: str | None) -> Path:
    """Export the run's checkpoint to `out`; returns `out`."""
    ckpt = pick_checkpoint(run_dir, step)
    cfg = load_config(run_dir / "config.yaml")
    out.mkdir(parents=True, exist_ok=True)
    write_shards(lazy_tensors(ckpt), out, DTYPES[dtype], int(max_shard_gb * 2**30))
    tok = Path(cfg.data.tokenizer)
    if not tok.is_file():
        raise FileNotFoundError(f"data.tokenizer={tok} (from {run_dir / 'config.yaml'}) does not exist")
    shutil.copyfile(tok, out / "tokenizer.model")
    shutil.copyfile(tok.with_suffix(".json"), out / "tokenizer.json")
    vae_dir = vae or cfg.data.vae
    if vae_dir:
        shutil.copytree(vae_dir, out / "vae", dirs_exist_ok=True)
    cfg.data.tokenizer = str(out / "tokenizer.model")
    cfg.data.vae = str(out / "vae") if vae_dir else ""
    save_config(cfg, out / "config.yaml")
    (out / "export.json").write_text(json.dumps({"checkpoint": str(ckpt), "dtype": dtype}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path, help="train.run_dir of the run to export")
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file")
    ap.add_argument("--vae", default=None, help="VAE directory to ship (default: data.vae of the run)")
    a = ap.parse_args(argv)
    try:
        out = export(a.run_dir, a.out, a.step, a.dtype, a.max_shard_gb, a.vae)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
