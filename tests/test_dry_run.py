"""train.dry_run=true: the 7B config's start-up checks on CPU, and deliberate mistakes caught before
anything heavy (no process group, no DeepSpeed engine, no weights)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pretrain.train.loop import main

ROOT = Path(__file__).resolve().parents[1]


def _dry(demo_data, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["--config", f"{ROOT / 'configs/transfusion_7b.yaml'},{demo_data.config_path}",
               "train.dry_run=true", *extra])
    assert not torch.distributed.is_initialized()  # nothing heavy started
    return rc, capsys.readouterr().out


def test_dry_run_of_7b_config_passes(demo_data, capsys) -> None:
    rc, out = _dry(demo_data, capsys, "--nodes", "16", "--gpus-per-node", "8", "--gpu", "h100-80gb")
    assert rc == 0, out
    assert "batch plan: global 1024 = micro 2 x accumulation 4 x ranks 128" in out
    n = int(re.search(r"model built on the meta device: ([\d,]+) parameters", out).group(1).replace(",", ""))
    assert 6.7e9 < n < 7.2e9, n  # 7B backbone + U-Net for the demo's patches, the demo tokenizer's vocabulary
    assert '"stage": 3' in out and "verdict: FITS" in out and "dry run OK" in out


def test_dry_run_reports_every_mistake(demo_data, capsys) -> None:
    """A micro-batch that cannot fit in 80 GB, a seq_len the shards were not packed for, and a
    batch that does not divide over the ranks: all listed, exit code 2."""
    rc, out = _dry(demo_data, capsys, "data.seq_len=4096", "train.micro_batch_size=16",
                   "train.activation_checkpointing=false", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100-80gb")
    assert rc == 2, out
    assert "packed with seq_len=256 but data.seq_len=4096" in out
    assert "verdict: DOES NOT FIT" in out and "train.micro_batch_size=16:" in out
    rc, out = _dry(demo_data, capsys, "--nodes", "3", "--gpus-per-node", "8")
    assert rc == 2 and "train.global_batch_size=1024 is not a multiple" in out, out


def test_tokenizer_check_follows_the_content_not_the_path(tmp_path) -> None:
    """A data set copied elsewhere (with its tokenizer) passes; another tokenizer file at the recorded
    path's name is reported, naming the stream and the key to change."""
    import hashlib
    import json

    from pretrain.plan.dry_run import _check_tokenizer

    spm = tmp_path / "a" / "spm.model"
    spm.parent.mkdir()
    spm.write_bytes(b"tokenizer A")
    stream = tmp_path / "shards" / "pairs"
    (stream / "train").mkdir(parents=True)
    (stream / "pack.json").write_text(json.dumps({"tokenizer": "/gone/spm.model", "identity": {
        "tokenizer_sha256": hashlib.sha256(b"tokenizer A").hexdigest()}}))
    assert _check_tokenizer("data.streams[0] (pairs)", str(stream / "train"), str(spm)) == []
    other = tmp_path / "b" / "spm.model"
    other.parent.mkdir()
    other.write_bytes(b"tokenizer B")
    (problem,) = _check_tokenizer("data.streams[0] (pairs)", str(stream / "train"), str(other))
    assert problem.startswith("data.streams[0] (pairs): packed with tokenizer /gone/spm.model")
    assert "data.tokenizer=" in problem
