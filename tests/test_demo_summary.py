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


def test_time_budget_picks_whole_hundreds_of_steps_within_bounds() -> None:
    assert demo.steps_for_budget(0.08, 540) == 6400  # 540 / (0.08 * 1.05) = 6428.6 -> 6400
    assert demo.steps_for_budget(0.19, 540) == 2700  # the slower machine of docs/quality.md §16
    assert demo.steps_for_budget(5.0, 540) == demo.MIN_STEPS and demo.steps_for_budget(1e-4, 540) == demo.MAX_STEPS


def test_calibration_times_the_real_trainer_and_a_rerun_reuses_its_choice(demo_data, tmp_path: Path,
                                                                        capsys) -> None:
    """`calibrate` runs CALIBRATION_STEPS steps of the 2-rank trainer with the demo's configs; its s/step is the
    wall time between metrics.jsonl rows after the warm-up, and the summary shows the choice; a second call
    without --fresh reads OUT/steps.json instead of training again."""
    import os
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = demo.launcher_cmd("torchrun", 2) + ["-m", "pretrain.train", "--config",
                                              f"configs/tiny.yaml,configs/demo.yaml,{demo_data.config_path}",
                                              f"data.cache_dir={tmp_path / 'cache'}"]
    steps = demo.chosen_steps(tmp_path, cmd, env, budget_seconds=60.0, fresh=False)
    choice = json.loads((tmp_path / "steps.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "calibrate" / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall"] for r in rows][demo.CALIBRATION_SKIP:]
    assert len(rows) == demo.CALIBRATION_STEPS and walls == sorted(walls)
    assert abs(choice["step_seconds"] - (walls[-1] - walls[0]) / (len(walls) - 1)) < 1e-9
    assert steps == choice["steps"] == demo.steps_for_budget(choice["step_seconds"], 60.0)
    (tmp_path / "calibrate").rename(tmp_path / "calibrate_1")  # a second calibration would recreate it
    assert demo.chosen_steps(tmp_path, cmd, env, budget_seconds=60.0, fresh=False) == steps
    assert not (tmp_path / "calibrate").exists() and "from" in capsys.readouterr().out
    assert f"training steps  {steps} (calibrated" in demo.summary(tmp_path, tmp_path / "run", tmp_path / "export")
