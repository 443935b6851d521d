"""contract.positions and contract.fileio: the one home of the image-position rule and of atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from contract.fileio import write_atomic, write_json_atomic
from contract.positions import image_positions, pair_positions, patches_per_image


def test_positions_rule_against_its_users_and_by_hand() -> None:
    """P = (H/p)(W/p); a pair is caption + P + 4 (BOS, BOI, EOI, EOS), an image P + 2: the packer, the model
    config and the run config's seq_len check all give the same numbers."""
    from data_pipeline.packer import IMAGE, PAIR, TEXT, positions_of
    from pretrain.config import load_config
    from pretrain.model.config import ModelConfig

    assert patches_per_image(32, 32, 2) == 256 and patches_per_image(8, 4, 2) == 8
    assert ModelConfig(latent_size=32, patch_size=2).patches_per_image == 256
    assert pair_positions(256, 30) == 290 and image_positions(256) == 258
    assert positions_of(PAIR, 30, 256) == 290 and positions_of(IMAGE, 0, 256) == 258 and positions_of(TEXT, 7, 256) == 7
    with pytest.raises(ValueError, match="not divisible"):
        patches_per_image(8, 6, 4)
    tiny = load_config(Path(__file__).resolve().parents[1] / "configs/tiny.yaml")
    P = tiny.model.patches_per_image
    load_config(None, [f"data.seq_len={pair_positions(P)}", f"model.latent_size={tiny.model.latent_size}",
                       f"model.patch_size={tiny.model.patch_size}"])  # exactly fits
    with pytest.raises(ValueError, match=f"{pair_positions(P)} positions"):
        load_config(None, [f"data.seq_len={pair_positions(P) - 1}", f"model.latent_size={tiny.model.latent_size}",
                           f"model.patch_size={tiny.model.patch_size}"])


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    """Text, bytes and JSON land whole; a failing write leaves the old file and no temporary beside it."""
    f = tmp_path / "report.json"
    write_json_atomic(f, {"a": 1})
    assert f.read_text() == '{\n  "a": 1\n}\n'
    write_atomic(f, b"\x00\x01", durable=True)
    assert f.read_bytes() == b"\x00\x01"
    with pytest.raises(TypeError):
        write_atomic(f, 3)  # type: ignore[arg-type]  # not text nor bytes: fails inside the write
    assert f.read_bytes() == b"\x00\x01" and sorted(os.listdir(tmp_path)) == ["report.json"]
