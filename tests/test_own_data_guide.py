"""docs/own-data.md, run as written: its Python block makes a folder of digit images (PIL) with captions and
texts, then each of its commands runs in order (prepare, train, export, generate, evaluate) in a fresh
directory that sees the repository's configs/. Shortened for a test, and only these ways: SHORTER."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "own-data.md"

#: the guide's text -> what the test runs instead (fewer steps; nothing else changes)
SHORTER = {
    "--seq-len 256": "--seq-len 256 --vae-steps 40",
    "train.steps=600": "train.steps=6 logging.sample_steps=4 logging.val_batches=1 data.num_workers=1",
    "--num-samples 4": "--num-samples 2",
    "--out eval": "--out eval --captions 4 --val-batches 2",
}


def guide_blocks() -> list[tuple[str, str]]:
    """(language, body) of each fenced python/bash block of the guide, in order."""
    return re.findall(r"```(python|bash)\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_has_the_whole_path() -> None:
    cmds = [line for lang, body in guide_blocks() if lang == "bash" for line in body.splitlines() if line.strip()]
    assert [c.split()[2] for c in cmds] == ["data_pipeline.prepare", "pretrain.train", "pretrain.artifacts.export",
                                           "pretrain.inference.generate", "pretrain.inference.generate",
                                           "pretrain.evaluation.own_data"]
    for old in SHORTER:
        assert sum(old in c for c in cmds) == 1, old


@pytest.mark.slow
def test_the_guide_runs_from_a_folder_of_files_to_an_evaluated_model(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    times = {}
    for lang, body in guide_blocks():
        if lang == "python":
            subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, check=True, timeout=120)
            continue
        for line in body.splitlines():
            if not line.strip():
                continue
            for old, new in SHORTER.items():
                line = line.replace(old, new)
            argv = shlex.split(line)
            argv[0] = sys.executable if argv[0] == "python" else argv[0]
            t0 = time.time()
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            times[f"{len(times) + 1}. {argv[2]}"] = round(time.time() - t0, 1)
            assert done.returncode == 0, f"{line}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    print("guide command seconds:", json.dumps(times))
    captions = {json.loads(x)["caption"] for x in (tmp_path / "mydata" / "pairs.jsonl").read_text().splitlines()}
    import yaml

    data = yaml.safe_load((tmp_path / "data" / "data.yaml").read_text())
    assert set(data["logging"]["sample_prompts"]) <= captions and len(data["logging"]["sample_prompts"]) == 4
    run_cfg = yaml.safe_load((tmp_path / "runs" / "mine" / "config.yaml").read_text())
    assert run_cfg["model"]["latent_channels"] == data["model"]["latent_channels"]
    assert run_cfg["logging"]["sample_prompts"] == data["logging"]["sample_prompts"]
    assert sorted(p.name for p in (tmp_path / "runs" / "mine" / "samples").glob("*.png"))  # the trainer's grids
    assert len(list((tmp_path / "samples").glob("a-red-digit-7_*.png"))) == 2
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert math.isfinite(rep["val"]["lm_loss"]) and math.isfinite(rep["val"]["diffusion_loss"])
    assert rep["samples"] == 4 and len(list((tmp_path / "eval" / "samples").glob("*.png"))) == 4
    lines = [json.loads(x) for x in (tmp_path / "eval" / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["reference"] in captions for x in lines)
