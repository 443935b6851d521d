"""Export a DeepSpeed checkpoint (ZeRO stage 1-3; stage 0 with its EMA) for inference: safetensors weights + config
+ tokenizer (+ VAE).

Streams tensor by tensor: DeepSpeed's lazy consolidation memory-maps each rank's fp32 partitions,
each full tensor is assembled only when written into its safetensors file (`write_safetensors`: the
header is planned from the shapes), and the mapped pages it read are then dropped, so peak memory is
about one full tensor beside the interpreter, not one shard (`--max-shard-gb`) nor the model
(bench/export.py: a quarter of DeepSpeed's zero_to_fp32 on a 0.37B checkpoint). The EMA weights
are read the same way, one parameter at a time (`ema.iter_lazy`); `--hf-llama` comes as whole
tensors, held per shard.

    python -m pretrain.artifacts.export --run-dir runs/tiny --out exports/tiny [--step N] [--dtype bf16] [--vae DIR]

Output: `model.safetensors` (or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`),
`config.yaml` (the config the checkpoint was trained with), `tokenizer.model` + `tokenizer.json`
(special ids), `vae/`, `export.json`. With `--hf-llama` the output is instead the text tower as a
Hugging Face `LlamaForCausalLM` directory (see pretrain/artifacts/hf_llama.py).

Safe: everything is written into a temporary directory beside `--out` and renamed into place at
the end, so a failure half-way leaves no directory that looks like an export, and re-exporting
replaces the whole previous export (no stale shards). A non-empty `--out` that is not an export is
refused unless `--force`. Errors (exit 2) name the file that is missing or damaged.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from pretrain.train import checkpoint
from pretrain.train import ema
from pretrain.config import Config, load_config, save_config
from pretrain.model import export_layout as layout

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
        raise FileNotFoundError(f"{root}: no complete checkpoint; train first or pass --run-dir of a run "
                                "that saved one")
    return found


class ExportError(ValueError):
    """The checkpoint or the output directory is not usable; the message says which file and what to do."""


def shard_names(ckpt: Path, zero_stage: int, ranks: int) -> list[str]:
    """The files DeepSpeed writes into checkpoint `ckpt` for `ranks` ranks at ZeRO stage `zero_stage`.

    Stage 3: each rank's parameter partitions (`zero_pp_rank_{r}_mp_rank_00_model_states.pt`) and
    optimizer partitions; stages 1-2: the whole module once (`mp_rank_00_model_states.pt`) and each rank's
    optimizer partitions (fp32 master weights and Adam moments); stage 0: the whole module and optimizer
    in `mp_rank_00_model_states.pt` (DeepSpeed `engine.save_checkpoint`, `_get_ckpt_name` / `_get_zero_ckpt_name`).
    """
    optims = sorted(ckpt.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    prefix = optims[0].name.split("zero_pp_rank_")[0] if optims else ""  # bf16_ under bf16
    optim = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)]
    if zero_stage == 3:
        return [n for r in range(ranks) for n in (f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", optim[r])]
    return ["mp_rank_00_model_states.pt"] + (optim if zero_stage > 0 else [])


def check_rank_files(ckpt: Path, zero_stage: int = 3) -> None:
    """Every file DeepSpeed wrote for the checkpoint (`shard_names`) is there and is a whole zip archive
    (torch.save format).

    Raises ExportError naming the first missing or truncated file.
    """
    meta = ckpt / checkpoint.META
    ranks = json.loads(meta.read_text())["world_size"] if meta.is_file() else None
    if ranks is None:  # checkpoints written before checkpoint.json: ranks 0..n-1 from the files present
        models = list(ckpt.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
        optims = list(ckpt.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
        ranks = max(len(models), len(optims))
    if ranks == 0:
        raise ExportError(f"{ckpt}: no ZeRO shard files (zero_pp_rank_*_states.pt) and no {checkpoint.META}; "
                          "is this a DeepSpeed checkpoint of pretrain.train?")
    for name in shard_names(ckpt, zero_stage, ranks):
        f = ckpt / name
        if not f.is_file():
            raise ExportError(f"{f} is missing (the checkpoint was written by {ranks} ranks at ZeRO stage "
                              f"{zero_stage}); copy it back from where the run wrote it, or export another step "
                              "with --step")
        if not zipfile.is_zipfile(f):
            raise ExportError(f"{f} is truncated or damaged ({f.stat().st_size} bytes, not a whole torch.save "
                              "archive); export another step with --step")


def lazy_tensors(ckpt: Path, zero_stage: int = 3) -> Iterator[tuple[str, "object"]]:
    """(name, lazy tensor) pairs of the consolidated fp32 model, in checkpoint order (ZeRO stages 1-3:
    DeepSpeed's consolidation of the fp32 partitions). Raises ExportError for stage 0, whose weights live
    only in DeepSpeed's pickled `mp_rank_00_model_states.pt`, which this export does not unpickle."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if zero_stage == 0:  # raised here, before any output is written (the caller iterates later)
        raise ExportError(f"{ckpt}: a ZeRO stage 0 checkpoint keeps its trained weights only in DeepSpeed's pickled "
                          "mp_rank_00_model_states.pt, which export does not unpickle; export the EMA (--weights "
                          "ema, a run with train.ema_decay > 0) or train with distributed.zero_stage 1, 2 or 3")
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    except Exception as e:  # DeepSpeed's own checks (partition counts, shapes) and unreadable files
        raise ExportError(f"{ckpt}: DeepSpeed could not consolidate the shards ({type(e).__name__}: {e})") from e
    return ((name, _Released(lazy, ckpt)) for name, lazy in state.items())


class _Released:
    """A DeepSpeed lazy tensor (`.shape`, `.contiguous()`) that drops the checkpoint's mapped pages once
    materialised (`_drop_mapped_pages`); the tensor it returns is a fresh copy (torch.cat of the slices)."""

    def __init__(self, lazy: object, ckpt: Path) -> None:
        self.lazy, self.ckpt, self.shape = lazy, ckpt, lazy.shape

    def contiguous(self) -> torch.Tensor:
        t = self.lazy.contiguous()
        _drop_mapped_pages(self.ckpt)
        return t


# safetensors' dtype codes (the format's spec, github.com/huggingface/safetensors#format)
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
MADV_DONTNEED = 4  # Linux <sys/mman.h>


def write_shards(tensors: Iterator[tuple[str, object]], out: Path, dtype: torch.dtype,
                 max_shard_bytes: int) -> list[Path]:
    """Write tensors into safetensors shards of at most `max_shard_bytes` each; returns the shard paths.

    `tensors` yields (name, tensor) or (name, DeepSpeed lazy tensor: `.shape`, materialised by `.contiguous()`).
    A shard is planned from the shapes alone and written one tensor at a time (`write_safetensors`), so
    lazy tensors are materialised one by one: peak memory is one full tensor, not one shard.
    """
    paths: list[Path] = []
    shard: list[tuple[str, object]] = []
    size = 0
    for name, t in tensors:
        nbytes = math.prod(t.shape) * dtype.itemsize
        if shard and size + nbytes > max_shard_bytes:
            paths.append(write_safetensors(shard, out / f"model-part{len(paths):05d}.safetensors", dtype))
            shard, size = [], 0
        shard.append((name, t))
        size += nbytes
    if shard or not paths:
        paths.append(write_safetensors(shard, out / f"model-part{len(paths):05d}.safetensors", dtype))
    return _name_shards(paths, out)


def write_safetensors(items: list[tuple[str, object]], path: Path, dtype: torch.dtype) -> Path:
    """One safetensors file of `items` cast to `dtype`, streamed: header from the shapes, then each tensor's
    bytes as it is materialised (one at a time).

    Format (safetensors spec): u64 little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}} padded with spaces to 8 bytes, then the tensors' bytes in header order.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in items:
        nbytes = math.prod(t.shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, lazy in items:
            t = lazy if isinstance(lazy, torch.Tensor) else lazy.contiguous()  # materialise this one tensor
            t = t.to(dtype).contiguous()
            if tuple(t.shape) != tuple(header[name]["shape"]):
                raise ExportError(f"{name}: materialised shape {tuple(t.shape)} differs from the declared "
                                  f"{header[name]['shape']}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    return path


def _drop_mapped_pages(ckpt: Path) -> None:
    """Drop this process's resident pages of memory-mapped `ckpt/*_optim_states.pt` files.

    DeepSpeed's lazy consolidation maps each rank's optimizer file (torch.load(mmap=True)); every page read
    stays in this process's RSS until unmapped, so a whole-model export would end holding all fp32
    partitions. MADV_DONTNEED on a file mapping nobody wrote to only discards the resident copy (a later
    read faults it back in from the page cache); it is applied only to mappings /proc/self/maps names as
    this checkpoint's optimizer files, never to anonymous memory. A no-op where /proc or madvise is missing.
    """
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    prefix = f"{Path(ckpt).resolve()}/"
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix) and fields[5].endswith("_optim_states.pt"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)


def _name_shards(paths: list[Path], out: Path) -> list[Path]:
    """One shard -> model.safetensors; several -> model-0000i-of-0000n.safetensors + index json."""
    from safetensors import safe_open

    if len(paths) == 1:
        final = out / layout.WEIGHTS
        paths[0].replace(final)
        return [final]
    n = len(paths)
    final_paths, weight_map = [], {}
    for i, p in enumerate(paths):
        final = out / layout.shard_name(i, n)
        p.replace(final)
        with safe_open(str(final), "pt") as f:
            weight_map.update({k: final.name for k in f.keys()})
        final_paths.append(final)
    (out / layout.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": weight_map}, indent=1))
    return final_paths


def is_export(path: Path) -> bool:
    """A directory written by this module (either format): it holds export.json."""
    return (path / layout.MANIFEST).is_file()


def write_atomically(out: Path, force: bool, fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp)` on a fresh temp dir beside `out`, then swap it in for `out`; returns `out`.

    Raises ExportError if `out` is a non-empty directory that is not an export (unless `force`),
    or a file. On any failure the temp dir is removed and `out` is untouched.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not is_export(out) and not force:
        raise ExportError(f"--out {out} is a non-empty directory that is not an export (no export.json); "
                          "pick another --out, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how (the CLI's flags; see `main`)."""

    step: int | None = None  # checkpoint step; None = the newest complete one
    dtype: str = "fp32"  # a key of DTYPES
    max_shard_gb: float = 5.0  # largest safetensors file, GiB
    vae: str | None = None  # VAE directory to ship; None = the run's data.vae (--hf-llama: unused)
    force: bool = False  # replace a non-empty --out that is not an earlier export
    # "ema" (the EMA of train.ema_decay, pretrain/train/ema.py), "raw" (the trained weights), or "auto"
    # (the EMA when the checkpoint holds one); --hf-llama: unused
    weights: str = "auto"


def export(run_dir: Path, out: Path, opts: ExportOptions = ExportOptions()) -> Path:
    """Export the run's checkpoint to `out` (atomically); returns `out`. Raises ExportError / FileNotFoundError."""
    step, dtype, max_shard_gb, vae, force, weights = (opts.step, opts.dtype, opts.max_shard_gb, opts.vae,
                                                      opts.force, opts.weights)
    ckpt = pick_checkpoint(run_dir, step)
    use_ema = weights == "ema" or (weights == "auto" and ema.has_ema(ckpt))
    if use_ema and not ema.has_ema(ckpt):
        raise ExportError(f"{ckpt}: --weights ema but the run kept no EMA (train.ema_decay was 0); use --weights raw")
    cfg = checkpoint.trained_config(ckpt)
    stage = cfg.distributed.zero_stage
    check_rank_files(ckpt, stage)
    tok = Path(cfg.data.tokenizer)
    if not tok.is_file() or not tok.with_suffix(".json").is_file():
        raise FileNotFoundError(f"data.tokenizer={tok} (from {ckpt / checkpoint.CONFIG}) or its .json does not exist")
    vae_dir = vae or cfg.data.vae
    tensors = ema.iter_lazy(ckpt) if use_ema else lazy_tensors(ckpt, stage)  # errors before anything is written

    def fill(tmp: Path) -> None:
        write_shards(tensors, tmp, DTYPES[dtype], int(max_shard_gb * 2**30))
        shutil.copyfile(tok, tmp / layout.TOKENIZER)
        shutil.copyfile(tok.with_suffix(".json"), tmp / layout.SPECIAL_IDS)
        if vae_dir:
            shutil.copytree(vae_dir, tmp / layout.VAE)
        cfg.data.tokenizer = str(out / layout.TOKENIZER)
        cfg.data.vae = str(out / layout.VAE) if vae_dir else ""
        save_config(cfg, tmp / layout.CONFIG)
        (tmp / layout.MANIFEST).write_text(json.dumps({"format": "transfusion", "checkpoint": str(ckpt), "dtype": dtype,
                                                     "weights": "ema" if use_ema else "raw"}, indent=1))

    return write_atomically(out, force, fill)


def read_export_config(src: Path) -> Config:
    """The run config an export directory was written with, its tokenizer path pointed at the export's copy.

    The one reader of a whole saved config (`pretrain.config.load_config`: unknown keys are errors naming
    them); the model alone is read by `Transfusion.from_pretrained` (export_layout.read_model_config).
    """
    return load_config(src / layout.CONFIG, [f"data.tokenizer={src / layout.TOKENIZER}"])


def export_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of an export directory, one safetensors shard open at a time."""
    from safetensors import safe_open

    for f in layout.weight_files(src):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                yield k, fh.get_tensor(k)


def export_hf_llama(src: Path, out: Path, opts: ExportOptions = ExportOptions()) -> Path:
    """The text tower of a run's checkpoint, or of an export dir, as a Hugging Face LlamaForCausalLM dir.

    Of `opts`, step (a run's checkpoint), dtype, max_shard_gb and force apply."""
    from pretrain.artifacts.hf_llama import hf_config_dict, hf_tensors

    step, dtype, max_shard_gb, force = opts.step, opts.dtype, opts.max_shard_gb, opts.force
    if is_export(src):
        cfg = read_export_config(src)
        tensors, origin = export_tensors(src), str(src)
    else:
        ckpt = pick_checkpoint(src, step)
        cfg, origin = checkpoint.trained_config(ckpt), str(ckpt)
        check_rank_files(ckpt, cfg.distributed.zero_stage)
        tensors = lazy_tensors(ckpt, cfg.distributed.zero_stage)
    if cfg.model.modality_experts:  # before writing anything
        raise ExportError(f"{origin}: model.modality_experts=true: a Hugging Face Llama has no image experts "
                          "(layers.0.image.attention.wqkv.weight...); export without --hf-llama and load "
                          "with Transfusion.from_pretrained")
    tok = Path(cfg.data.tokenizer)

    def fill(tmp: Path) -> None:
        write_shards(hf_tensors(tensors, cfg.model), tmp, DTYPES[dtype], int(max_shard_gb * 2**30))
        hf = hf_config_dict(cfg.model, cfg.data.seq_len)
        hf["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
        (tmp / layout.HF_CONFIG).write_text(json.dumps(hf, indent=1))
        if tok.is_file():
            shutil.copyfile(tok, tmp / layout.TOKENIZER)
        (tmp / layout.MANIFEST).write_text(json.dumps({"format": "hf-llama", "source": origin, "dtype": dtype},
                                                      indent=1))

    return write_atomically(out, force, fill)


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path,
                    help="train.run_dir of the run to export (with --hf-llama: or an export directory)")
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="dtype of the saved weights (default: %(default)s)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0,
                    help="largest safetensors file, GB (default: %(default)s)")
    ap.add_argument("--vae", default=None, help="VAE directory to ship (default: data.vae of the run)")
    ap.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier export")
    ap.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto",
                    help="auto: the EMA weights when the run kept them (train.ema_decay > 0), else the trained ones "
                         "(default: %(default)s)")
    ap.add_argument("--hf-llama", action="store_true",
                    help="write the text tower as a Hugging Face LlamaForCausalLM dir")
    a = ap.parse_args(argv)
    opts = ExportOptions(step=a.step, dtype=a.dtype, max_shard_gb=a.max_shard_gb, vae=a.vae, force=a.force,
                         weights=a.weights)
    try:
        out = export_hf_llama(a.run_dir, a.out, opts) if a.hf_llama else export(a.run_dir, a.out, opts)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
