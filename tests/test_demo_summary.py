"""The summary `make demo` ends with: where everything is, evaluation figures, wall time per stage."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain import demo


def test_demo_summary_lists_outputs_figures_and_times(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "eval").mkdir()
    for name in ("grid.png", "prompt_1.png"):
        (tmp_path / "eval" / name).write_bytes(b"png")
    monkeypatch.setattr(demo, "STAGE_SECONDS", {"data": 12.0, "train": 250.4})
    run_dir, export = tmp_path / "run", tmp_path / "export"
    text = demo.summary(tmp_path, run_dir, export)
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in text and str(export) in text
    assert "2 in" in text and "prompt_1.png" in text
    assert "data 12s, train 250s; total 262s" in text and "evaluation" not in text
    report = {"vae": {}, "captions": {}, "text_to_image": {"held_out": {"all_three": 0.5, "n": 8}},
              "text": {"loss": 2.25, "tokens": 100}}
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    text = demo.summary(tmp_path, run_dir, export)
    assert "eval/text_to_image/held_out/all_three 0.5" in text and "eval/text/loss 2.25" in text
