"""The model keys the data fixes, checked against the shards in a second, before any process group or engine.

Packed shards fix four things about the model that reads them: the latents' channels and size (the VAE
and the image size), the patch size (pack's `--patch-size`) and the vocabulary (the tokenizer that
tokenized them), plus `data.seq_len`. `data_key_problems(cfg)` reads each stream's `pack.json` and
returns one message per disagreement naming the key to set; the trainer's setup raises them and the
dry run lists them. `small_val_streams` names validation streams too small to give every rank a batch
(the trainer logs them at start).
"""

from __future__ import annotations

from pathlib import Path

from contract.special_ids import load_special_ids
from pretrain.config import Config

__all__ = ["data_key_problems", "pack_report", "small_val_streams"]


def pack_report(local: str, remote: str | None = None) -> dict | None:
    """What pack recorded for a stream (`data_pipeline.loader.pack_info`: the split's statistics with the
    pack's `tokenizer` and `identity`), local or remote; None when there is none or the remote cannot be
    read (the loader and the dry run report that with its cause)."""
    from data_pipeline import storage
    from data_pipeline.loader import pack_info

    try:
        return pack_info(remote or local) if (remote or local) else None
    except storage.StorageError:
        return None


def _sha256(path: str) -> str | None:
    from data_pipeline.pack import file_sha256

    return file_sha256(Path(path)) if path and Path(path).is_file() else None


def _vocab_problem(where: str, cfg: Config, top: dict) -> str | None:
    """The shards' tokenizer against the model's vocabulary (data.tokenizer's, else model.vocab_size)."""
    packed = top.get("tokenizer")
    digest = top.get("identity", {}).get("tokenizer_sha256")
    if not packed and not digest:
        return None
    n_packed = None
    if packed and Path(packed).is_file():
        try:
            n_packed = load_special_ids(packed).vocab_size
        except (OSError, ValueError):
            n_packed = None
    tok = cfg.data.tokenizer
    if tok:
        mine = _sha256(tok)
        if digest and mine and digest == mine:
            return None
        if not digest and packed and Path(packed).resolve() == Path(tok).resolve():
            return None
        size = f" ({n_packed} ids)" if n_packed else ""
        return (f"{where}: tokenized with {packed}{size} (sha256 {str(digest)[:12]}), but data.tokenizer={tok} is "
                f"another "
                f"tokenizer ({cfg.model.vocab_size} ids, the model's vocabulary): set data.tokenizer={packed}")
    if n_packed is not None and n_packed != cfg.model.vocab_size:
        return (f"{where}: tokenized with {packed} ({n_packed} ids) but model.vocab_size={cfg.model.vocab_size}: "
                f"set data.tokenizer={packed} (the vocabulary comes from it)")
    return None


def data_key_problems(cfg: Config) -> list[str]:
    """One message per model or data key that disagrees with a stream's pack.json, naming the key to set
    and its value. Reads only JSON files (and hashes data.tokenizer): well under a second."""
    m, problems, seen = cfg.model, [], set()
    for section, streams in (("streams", cfg.data.streams), ("val_streams", cfg.data.val_streams)):
        for i, sc in enumerate(streams):
            st = pack_report(sc.local, sc.remote)
            if st is None:
                continue
            where = f"data.{section}[{i}] ({sc.name}: {sc.local or sc.remote})"
            found = []
            if st.get("seq_len", cfg.data.seq_len) != cfg.data.seq_len:
                found.append(f"{where}: packed with seq_len={st['seq_len']} but data.seq_len={cfg.data.seq_len}: "
                             f"set data.seq_len={st['seq_len']} (or repack with --seq-len {cfg.data.seq_len})")
            if st.get("latent_shape"):
                C, h, w = st["latent_shape"]
                if C != m.latent_channels:
                    found.append(f"{where}: latents have {C} channels (the VAE that encoded them) but "
                                 f"model.latent_channels={m.latent_channels}: set model.latent_channels={C}")
                if h != m.latent_size or w != m.latent_size:
                    found.append(f"{where}: latents are {h}x{w} (image size / the VAE's downsampling) but "
                                 f"model.latent_size={m.latent_size}: set model.latent_size={h}")
                if st.get("patch_size") != m.patch_size:
                    found.append(f"{where}: packed with patch_size={st['patch_size']} (rows hold whole images of "
                                 f"{(h // st['patch_size']) * (w // st['patch_size'])} patches) but "
                                 f"model.patch_size={m.patch_size}: set model.patch_size={st['patch_size']} "
                                 f"(or repack with data_pipeline.pack --patch-size {m.patch_size})")
            v = _vocab_problem(where, cfg, st)
            found += [v] if v else []
            for msg in found:  # train and val splits of one pack say the same: name the first only
                key = msg.split(": ", 2)[-1]
                if key not in seen:
                    seen.add(key)
                    problems.append(msg)
    return problems


def small_val_streams(cfg: Config, micro_batch: int, world_size: int) -> list[str]:
    """Validation streams whose pack holds fewer rows than one micro-batch per rank, each with its counts and
    what to change: their validation loss rests on those few sequences (or, where the loader drops partial
    batches, on none)."""
    out = []
    need = micro_batch * world_size
    for i, sc in enumerate(cfg.data.val_streams):
        rep = pack_report(sc.local, sc.remote)
        if rep is None or "rows" not in rep:
            continue
        rows = int(rep["rows"])
        if rows < need:
            out.append(f"data.val_streams[{i}] ({sc.name}) holds {rows} rows, fewer than {world_size} ranks x "
                       f"train.micro_batch_size {micro_batch} = {need}: its validation loss rests on at most {rows} "
                       "sequences. Pack more "
                       "validation documents (data_pipeline.prepare/pack --val-every N: every N-th document), "
                       "lower train.micro_batch_size, or drop the stream from data.val_streams")
    return out


def preflight(argv: list[str]) -> None:
    """The trainer's first act (`python -m pretrain.train`, before DeepSpeed and the tools are imported): load
    the config of `argv` and exit with the data-key problems when there are any. Anything else wrong with
    the command line or config is left to the trainer's own setup, which reports it in full; a dry run
    (`train.dry_run=true`) lists these problems among its others."""
    import argparse

    from pretrain import configlib
    from pretrain.config import load_config

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    known, _ = p.parse_known_args(argv)
    if not known.config:
        return
    try:
        cfg = load_config(known.config, known.overrides)
    except (configlib.ConfigError, OSError, ValueError):
        return  # the trainer's setup says it with the whole context
    if cfg.train.dry_run:
        return
    if problems := data_key_problems(cfg):
        raise SystemExit("python -m pretrain.train: the config disagrees with the data's pack.json:\n  - "
                         + "\n  - ".join(problems))
