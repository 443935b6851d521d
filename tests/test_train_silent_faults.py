"""Checkpoint lineage, optim.* changed on resume and a launch already past train.steps, with the real trainer
(`python -m pretrain.train`, DeepSpeed ZeRO-3 on 2 gloo CPU ranks, tiny config; helpers of test_train_e2e.py).

The input is the rollback of issue 27: train to step 6 with checkpoint.every=2; roll back to step 2 with a lower
optim.lr; the job is killed after step 4 (PRETRAIN_FAULT); the requeue (`checkpoint.resume=auto`, what
cluster/train.slurm passes) must resume the rollback's step 4, not the abandoned step 6.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.train.schedule import lr_at
from test_train_e2e import config_arg, launch, log_tail, train_rows

pytestmark = pytest.mark.slow

QUIET = ["checkpoint.every=2", "checkpoint.keep_last=5", "logging.val_every=0", "logging.sample_every=0"]


def launch_log(demo_data, run_dir: Path, launcher: str, *overrides: str, **kw) -> tuple[int, str]:
    """`launch` and this launch's part of run_dir/<launcher>.log (the file collects every launch)."""
    f = run_dir / f"{launcher}.log"
    before = f.stat().st_size if f.is_file() else 0
    rc = launch(launcher, demo_data, run_dir, *overrides, **kw).returncode
    with open(f, "rb") as fh:
        fh.seek(before)
        return rc, fh.read().decode(errors="replace")


def optimizer_after_resume(log: str) -> list[dict]:
    """The parameter groups the trainer's optimizer holds after its last resume in `log` (its own log line)."""
    lines = re.findall(r"optimizer after resume: (\[.*\])", log)
    assert lines, "no 'optimizer after resume' line in the log"
    return json.loads(lines[-1])


def test_rollback_then_requeue_follows_the_new_lineage_and_optim_changes_apply(demo_data, tmp_path):
    ck = tmp_path / "checkpoints"
    p = launch("torchrun", demo_data, tmp_path, "train.steps=6", *QUIET)
    assert p.returncode == 0, log_tail(tmp_path, "torchrun")
    assert all((ck / f"step_0000000{s}/COMPLETE").is_file() for s in (2, 4, 6))
    old_rows = train_rows(tmp_path)

    # rollback to step 2 with a lower learning rate; killed (kill -9) right after saving step 4
    rc, log = launch_log(demo_data, tmp_path, "deepspeed", "train.steps=6", *QUIET,
                         f"checkpoint.resume={ck / 'step_00000002'}", "optim.lr=1.0e-3", fault="kill_after_step=4")
    assert rc != 0, log[-3000:]
    abandoned = ck / "abandoned/rollback_to_step_00000002"
    assert "rollback to step 2" in log and str(abandoned) in log, log[-3000:]
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_00000004", "step_00000006"]
    assert (abandoned / "step_00000006/COMPLETE").is_file()
    assert (ck / "step_00000004/COMPLETE").is_file() and not (ck / "step_00000006").exists()
    assert (ck / "latest").read_text() == "step_00000004"
    assert not list(ck.glob("*.tmp"))

    # the requeue: auto follows `latest` (the rollback's step 4), with optim.* changed once more (issue 27, item 2)
    changed = ["optim.lr=1.0e-3", "optim.weight_decay=0.0", "optim.betas=[0.5,0.6]", "optim.eps=1.0e-3"]
    rc, log = launch_log(demo_data, tmp_path, "torchrun", "train.steps=6", *QUIET, "checkpoint.resume=auto", *changed)
    assert rc == 0, log[-3000:]
    assert f"resumed from {ck / 'step_00000004'} at step 4" in log, log[-3000:]
    assert "config change on resume: optim.weight_decay 0.1 -> 0.0" in log
    cfg = load_config(config_arg(demo_data), ["optim.warmup_steps=2", *changed])
    lr = lr_at(4, cfg.optim, 6)
    # same world size: DeepSpeed's own load restored the saved groups; each changed key must be this launch's
    groups = optimizer_after_resume(log)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert [g["betas"] for g in groups] == [[0.5, 0.6]] * 2
    assert [g["eps"] for g in groups] == [1.0e-3] * 2
    assert [g["lr"] for g in groups] == pytest.approx([lr] * 2)
    rows = train_rows(tmp_path)
    assert sorted(rows) == list(range(1, 7))
    assert rows[5]["digest"] == old_rows[5]["digest"]  # the same data as the abandoned line's step 5 ...
    assert rows[5]["loss"] != old_rows[5]["loss"]  # ... on the rollback's weights
    assert (ck / "latest").read_text() == "step_00000006"

    # one rank (DeepSpeed's universal checkpoint) with train.steps below the checkpoint: the optimizer
    # still takes this launch's settings, and the launch says it has nothing to train (exit 0, issue 27 item 7)
    changed = ["optim.lr=5.0e-4", "optim.weight_decay=0.05", "optim.betas=[0.8,0.9]", "optim.eps=1.0e-6"]
    rc, log = launch_log(demo_data, tmp_path, "torchrun", "train.steps=5", *QUIET, *changed, nproc=1)
    assert rc == 0, log[-3000:]
    assert "saved by 2 ranks, this job has 1" in log
    assert "nothing to train: the resumed checkpoint is at step 6, past train.steps=5" in log, log[-3000:]
    groups = optimizer_after_resume(log)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [g["betas"] for g in groups] == [[0.8, 0.9]] * 2
    assert [g["eps"] for g in groups] == [1.0e-6] * 2
    cfg = load_config(config_arg(demo_data), ["optim.warmup_steps=2", *changed])
    assert [g["lr"] for g in groups] == pytest.approx([lr_at(6, cfg.optim, 5)] * 2)
    assert sorted(train_rows(tmp_path)) == list(range(1, 7))  # nothing trained


def val_rows(run_dir: Path) -> dict[int, dict]:
    """The validation rows of metrics.jsonl by step."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val/lm_loss" in r:
            rows[r["step"]] = r
    return rows


def test_validation_loss_is_the_same_for_one_and_two_ranks(demo_data, tmp_path):
    """Validation at step 1 on 1 rank and on 2 ranks, the same data, 3 micro-batches per val stream (an odd count:
    the ranks hold 2 and 1 batches, rank 1 runs one dropped forward). Each figure must agree to 1e-5 relative:
    one step's weights differ between the two runs only by the order of the gradient reduction (~1e-7);
    before, each rank read its own 3 batches and all were cut to the fewest (2 ranks: twice the set)."""
    got = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"ranks{nproc}"
        p = launch("torchrun", demo_data, run_dir, "train.steps=1", "checkpoint.every=0", "logging.val_every=1",
                   "logging.val_batches=3", "logging.sample_every=0", "train.ema_decay=0", nproc=nproc)
        assert p.returncode == 0, log_tail(run_dir, "torchrun")
        got[nproc] = val_rows(run_dir)[1]
    keys = {k for k in got[1] if k.startswith("val/")}
    assert keys == {k for k in got[2] if k.startswith("val/")} and "val/diffusion_loss" in keys, (got[1], got[2])
    for k in sorted(keys):
        assert got[2][k] == pytest.approx(got[1][k], rel=1e-5), (k, got[1][k], got[2][k])


def test_bf16_ema_and_its_fp32_export_come_from_the_fp32_master_weights(demo_data, tmp_path):
    """train.precision=bf16 (DeepSpeed bf16 ZeRO-3: bf16 module weights, fp32 master partitions in the optimizer),
    EMA on, 2 steps with a checkpoint after each. The step-2 EMA must be lerp(EMA_1, W_2, 1 - d_1) with W_2 the
    optimizer's fp32 partitions (what `--weights raw` consolidates from the optimizer states: DeepSpeed's
    zero_to_fp32) and d_1 = min(decay, 2/11) (pretrain/train/ema.py). Kept from the bf16 copies instead, it is
    off by up to 2^-9 relative; the fp32 export of the EMA carries exactly the EMA."""
    from safetensors.torch import load_file

    from pretrain.artifacts.export import ExportOptions, export
    from pretrain.train.ema import load_full

    p = launch("torchrun", demo_data, tmp_path, "train.precision=bf16", "train.steps=2", "checkpoint.every=1",
               "logging.val_every=0", "logging.sample_every=0", "train.ema_decay=0.9")
    assert p.returncode == 0, log_tail(tmp_path, "torchrun")
    ck = tmp_path / "checkpoints"
    assert list(ck.glob("step_00000002/bf16_zero_pp_rank_*_optim_states.pt"))  # really DeepSpeed's bf16 mode
    ema1 = load_full(ck / "step_00000001")
    raw = load_file(export(tmp_path, tmp_path / "raw", ExportOptions(step=2, weights="raw")) / "model.safetensors")
    out = export(tmp_path, tmp_path / "ema", ExportOptions(step=2))
    got = load_file(out / "model.safetensors")
    assert json.loads((out / "export.json").read_text())["dtype"] == "fp32"
    d1 = min(0.9, 2 / 11)
    off_bf16 = sum(int((t != t.bfloat16().float()).sum()) for t in raw.values()) / sum(t.numel() for t in raw.values())
    assert off_bf16 > 0.5, off_bf16  # the master weights are not bf16 values: the input tells the two apart
    for n, w in raw.items():
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], ema1[n].lerp(w, 1 - d1), rtol=1e-6, atol=1e-8, msg=lambda m: f"{n}: {m}")
