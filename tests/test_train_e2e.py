"""End-to-end trainer tests: real DeepSpeed ZeRO-3 over 2 gloo CPU ranks, the 2-layer model, synthetic MDS shards.

Two kinds of runs:
- a worker (this file run under torchrun: `python tests/test_train_e2e.py worker ...`) that builds the trainer's
  ZeRO-3 engine with `train.init_from` and runs the model on a fixed batch, to compare with a plain process;
- the real entry point `python -m pretrain.train` under the deepspeed launcher, torchrun and accelerate launch,
  with kill -9 (PRETRAIN_FAULT makes a rank SIGKILL itself at an exact point) and auto-resume.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contract.dist_env import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 420  # a hang (e.g. ranks gathering different parameters) fails the test instead of blocking CI

pytestmark = pytest.mark.slow


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("PRETRAIN_FAULT", None)
    env.update(extra)
    return env


def config_arg(demo_data) -> str:
    return f"{REPO / 'configs/tiny.yaml'},{demo_data.config_path}"


# Small, fast and deterministic: 4 sequences per step (micro 1 x accumulation 2 x 2 ranks), one data worker.
RUN_OVERRIDES = [
    "train.steps=10", "train.global_batch_size=4", "train.micro_batch_size=1", "optim.warmup_steps=2",
    "optim.lr=2.0e-3", "checkpoint.every=5", "checkpoint.keep_last=3", "logging.every=1", "logging.val_every=5",
    "logging.val_batches=1", "logging.sample_every=10", "logging.sample_steps=4", "data.num_workers=1",
    "distributed.timeout_minutes=3", "train.ema_decay=0.9",
]


def launch(launcher: str, demo_data, run_dir: Path, *overrides: str, fault: str = "",
           nproc: int = 2) -> subprocess.CompletedProcess:
    """Run the training job on `nproc` ranks under `launcher`; stdout+stderr go to run_dir/<launcher>.log."""
    port = str(free_port())
    entry = ["-m", "pretrain.train"] if launcher != "deepspeed" else ["--module", "pretrain.train"]
    args = [*entry, "--config", config_arg(demo_data), f"train.run_dir={run_dir}",
            f"data.cache_dir={run_dir}/cache", *RUN_OVERRIDES, *overrides]
    cmd = {
        "deepspeed": [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                     port],
        "accelerate": [str(VENV_BIN / "accelerate"), "launch", "--config_file",
                       str(REPO / "configs/accelerate/zero3.yaml"),
                       "--num_processes", str(nproc), "--main_process_port", port],
    }[launcher] + args
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = {"PRETRAIN_FAULT": fault} if fault else {}
    with open(run_dir / f"{launcher}.log", "a") as log:
        return subprocess.run(cmd, cwd=REPO, env=run_env(**extra), stdout=log, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT)


def train_rows(run_dir: Path) -> dict[int, dict]:
    """Per-step training rows of metrics.jsonl (a resumed run appends; the last row of a step wins)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = r
    return rows


def log_tail(run_dir: Path, launcher: str) -> str:
    return (run_dir / f"{launcher}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def straight(demo_data, tmp_path_factory):
    """10 steps without interruption under the deepspeed launcher: the reference run (evaluated at step 10)."""
    run_dir = tmp_path_factory.mktemp("straight")
    p = launch("deepspeed", demo_data, run_dir, "logging.eval_every=10")  # data.vae: the demo data's VAE
    assert p.returncode == 0, log_tail(run_dir, "deepspeed")
    return run_dir


def test_two_ranks_train_loss_falls_and_tensorboard_has_everything(straight):
    rows = train_rows(straight)
    assert sorted(rows) == list(range(1, 11))
    first = sum(rows[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(rows[s]["loss"] for s in (8, 9, 10)) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert all(r["applied"] and math.isfinite(r["grad_norm"]) for r in rows.values())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(straight / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    expected = {"train/loss", "train/lm_loss", "train/diffusion_loss", "train/lr", "train/grad_norm",
                "perf/text_tokens_per_s", "perf/image_patches_per_s", "perf/step_time_s", "time/data_s",
                "time/forward_s", "time/backward_s", "time/optimizer_s", "memory/rss_gib", "val/lm_loss",
                "val/diffusion_loss", "val/pairs/diffusion_loss", "val/text/lm_loss"}
    assert expected <= set(tags["scalars"]), expected - set(tags["scalars"])
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 11))
    assert "samples/images" in tags["images"]
    img = ea.Images("samples/images")[-1]
    assert img.step == 10 and img.width > 0 and img.encoded_image_string[:4] == b"\x89PNG"
    assert (straight / "samples" / "step_0000010.png").is_file()
    # the synthetic-task evaluation (pretrain.evaluation.evaluate) ran on both ranks at step 10; rank 0 logged it
    evals = {"eval/text_to_image/seen/color", "eval/text_to_image/held_out/all_three", "eval/captions/seen/place",
             "eval/vae/seen/all_three", "eval/text/perplexity"}
    assert evals <= set(tags["scalars"]), evals - set(tags["scalars"])
    report = json.loads((straight / "eval" / "step_0000010" / "report.json").read_text())
    assert [e.step for e in ea.Scalars("eval/captions/seen/color")] == [10]
    assert ea.Scalars("eval/text/perplexity")[0].value == pytest.approx(report["text"]["perplexity"], rel=1e-5)
    assert report["text_to_image"]["seen"]["n"] == 154 and report["text_to_image"]["held_out"]["n"] == 8


def test_exact_resume_after_kill_9_and_requeue_signal(straight, demo_data, tmp_path):
    """kill -9 after step 5 (torchrun); auto-resume (deepspeed launcher) until SIGUSR1 on rank 1 -> exit 75 after
    saving step 8; resume again (torchrun) and finish.

    Every step must consume the same sequences as the straight run. Losses: bit-identical up to and including
    the first step after the first resume (step 6: the weights and data reload exactly); afterwards within
    1e-6. Why not bit for bit: DeepSpeedCPUAdam (C++) keeps beta^t as a float running product that a restart
    recomputes with std::pow (ops/csrc/includes/cpu_adam.h, IncrementStep), a ~1e-7 relative change of the
    bias correction; FusedAdam on GPU and torch AdamW recompute it from the step and resume bit for bit.
    """
    p = launch("torchrun", demo_data, tmp_path, fault="kill_after_step=5")
    assert p.returncode != 0 and (tmp_path / "checkpoints/step_00000005/COMPLETE").is_file(), \
        log_tail(tmp_path, "torchrun")
    assert not (tmp_path / "checkpoints/step_00000010").exists()
    # the signal lands after step 7; the ranks agree on it during step 8, save it and exit 75
    p = launch("deepspeed", demo_data, tmp_path, fault="sigusr1_rank1_after_step=7")
    assert p.returncode == 75, log_tail(tmp_path, "deepspeed")
    assert (tmp_path / "checkpoints/step_00000008/COMPLETE").is_file()
    assert "resumed from" in (tmp_path / "deepspeed.log").read_text()
    p = launch("torchrun", demo_data, tmp_path)
    assert p.returncode == 0, log_tail(tmp_path, "torchrun")
    ref, got = train_rows(straight), train_rows(tmp_path)
    assert sorted(got) == list(range(1, 11))
    for s in range(1, 11):
        assert got[s]["digest"] == ref[s]["digest"], f"step {s} consumed different sequences"
        if s <= 6:
            assert got[s]["loss"] == ref[s]["loss"], f"step {s}: {got[s]['loss']!r} != {ref[s]['loss']!r}"
            assert got[s]["grad_norm"] == ref[s]["grad_norm"]
        assert abs(got[s]["loss"] - ref[s]["loss"]) <= 1e-6, f"step {s}: {got[s]['loss']!r} != {ref[s]['loss']!r}"
        assert abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) <= 1e-6 * ref[s]["grad_norm"]
    # the EMA (train.ema_decay) was saved at steps 5 and 8 and restored by each resume: a restarted EMA
    # would differ by far more (its decay warm-up starts again at 0.1)
    from pretrain.train.ema import load_full

    ema_ref = load_full(straight / "checkpoints/step_00000010")
    ema_got = load_full(tmp_path / "checkpoints/step_00000010")
    for n, e in ema_ref.items():
        torch.testing.assert_close(ema_got[n], e, rtol=0, atol=1e-5, msg=lambda m: f"EMA {n}: {m}")


def test_resume_on_one_rank_then_two_then_one(straight, demo_data, tmp_path):
    """1 rank (accumulation 4) killed after step 5 -> resumed on 2 ranks (accumulation 2) until SIGUSR1 saves
    step 8 -> resumed on 1 rank to step 10, each change of world size through DeepSpeed's universal checkpoint.

    Against the straight 2-rank run: every step consumed the same sequences (the order-independent digest of
    the step's sequences; streaming's global order does not depend on the ranks at a fixed
    num_canonical_nodes), and the losses, gradient norms and the EMA follow it. Tolerances: losses 2e-6
    absolute (~2.5e-7 relative) and gradient norms 1e-5 relative: one rank sums the step's gradients and
    losses in another order than two (measured: up to 4.3e-7 on losses of ~8); EMA 1e-5 absolute: Adam divides
    the gradient by its own running scale, so where an embedding row's gradient is near zero (a token the step
    barely saw) the two summation orders give updates that differ far more than the gradients do (measured
    4.7e-6 on one element of the demo data's 359-token embedding after its tokenizer began to see the
    interleaved texts too). A lost or mis-sliced EMA partition on resume differs by ~lr (2e-3), 200x more.
    """
    p = launch("torchrun", demo_data, tmp_path, fault="kill_after_step=5", nproc=1)
    assert p.returncode != 0 and (tmp_path / "checkpoints/step_00000005/COMPLETE").is_file(), \
        log_tail(tmp_path, "torchrun")
    p = launch("deepspeed", demo_data, tmp_path, fault="sigusr1_rank1_after_step=7")
    assert p.returncode == 75, log_tail(tmp_path, "deepspeed")
    assert "saved by 1 ranks, this job has 2" in (tmp_path / "deepspeed.log").read_text()
    assert (tmp_path / "checkpoints/step_00000005/universal/COMPLETE").is_file()
    p = launch("torchrun", demo_data, tmp_path, nproc=1)
    assert p.returncode == 0, log_tail(tmp_path, "torchrun")
    text = (tmp_path / "torchrun.log").read_text()
    assert "saved by 2 ranks, this job has 1" in text and "global batch 4 = micro 1 x accumulation 4 x ranks 1" in text
    ref, got = train_rows(straight), train_rows(tmp_path)
    assert sorted(got) == list(range(1, 11))
    for s in range(1, 11):
        assert got[s]["sequence_digest"] == ref[s]["sequence_digest"], f"step {s} consumed different sequences"
        assert abs(got[s]["loss"] - ref[s]["loss"]) <= 2e-6, f"step {s}: {got[s]['loss']!r} != {ref[s]['loss']!r}"
        assert abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) <= 1e-5 * ref[s]["grad_norm"], s
    from pretrain.train.ema import load_full

    ema_ref = load_full(straight / "checkpoints/step_00000010")
    ema_got = load_full(tmp_path / "checkpoints/step_00000010")
    for n, e in ema_ref.items():
        torch.testing.assert_close(ema_got[n], e, rtol=0, atol=1e-5, msg=lambda m: f"EMA {n}: {m}")


def test_export_writes_the_ema_weights(straight, tmp_path):
    """`pretrain.artifacts.export` of a run with train.ema_decay writes the EMA (joined from both ranks' partitions),
    `--weights raw` the trained weights (DeepSpeed's zero_to_fp32); they differ."""
    from safetensors.torch import load_file

    from pretrain.train.ema import load_full
    from pretrain.artifacts.export import ExportOptions, export

    ema = load_full(straight / "checkpoints/step_00000010")
    out_ema = export(straight, tmp_path / "ema")
    out_raw = export(straight, tmp_path / "raw", ExportOptions(weights="raw"))
    got, raw = load_file(out_ema / "model.safetensors"), load_file(out_raw / "model.safetensors")
    assert json.loads((out_ema / "export.json").read_text())["weights"] == "ema"
    assert set(got) == set(raw) == set(ema)
    assert all(torch.equal(got[n], ema[n]) for n in ema)
    assert any(not torch.equal(got[n], raw[n]) for n in ema)


def assert_follows_straight(straight: Path, run_dir: Path) -> None:
    """Run `run_dir` consumed the straight run's sequences at all 10 steps, with its losses (2e-6 absolute, on
    losses of ~8) and gradient norms (1e-5 relative) up to the order of the gradient reduction."""
    ref, got = train_rows(straight), train_rows(run_dir)
    assert sorted(got) == list(range(1, 11))
    for s in range(1, 11):
        assert got[s]["digest"] == ref[s]["digest"], f"step {s} consumed different sequences"
        assert abs(got[s]["loss"] - ref[s]["loss"]) <= 2e-6, f"step {s}: {got[s]['loss']!r} != {ref[s]['loss']!r}"
        assert abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) <= 1e-5 * ref[s]["grad_norm"], (s, got[s], ref[s])


def test_zero2_follows_zero3_resumes_exactly_and_exports(straight, demo_data, tmp_path):
    """distributed.zero_stage=2 (the demo's stage: configs/demo.yaml), killed after step 5 and resumed.

    Against the straight ZeRO-3 run: the same sequences every step, and the same losses and gradient norms
    up to the order of the gradient reduction (2e-6 absolute on losses of ~8, 1e-5 relative on norms).
    Export of the ZeRO-2 checkpoint: `--weights raw` (DeepSpeed's consolidation of the rank's fp32 optimizer
    partitions) equals the whole module DeepSpeed saved beside them (mp_rank_00_model_states.pt, this
    test's own file), and the default export is the EMA, which every rank holds whole at stage 2.
    """
    p = launch("torchrun", demo_data, tmp_path, "distributed.zero_stage=2", fault="kill_after_step=5")
    assert p.returncode != 0 and (tmp_path / "checkpoints/step_00000005/COMPLETE").is_file(), \
        log_tail(tmp_path, "torchrun")
    p = launch("torchrun", demo_data, tmp_path, "distributed.zero_stage=2")
    assert p.returncode == 0, log_tail(tmp_path, "torchrun")
    assert_follows_straight(straight, tmp_path)
    from safetensors.torch import load_file

    from pretrain.train.ema import load_full
    from pretrain.artifacts.export import ExportOptions, export

    ckpt = tmp_path / "checkpoints/step_00000010"
    assert not list(ckpt.glob("zero_pp_rank_*_model_states.pt"))  # really stage 2: no parameter partitions
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    raw = load_file(export(tmp_path, tmp_path / "raw", ExportOptions(weights="raw")) / "model.safetensors")
    assert set(raw) == set(module) and all(torch.equal(raw[n], module[n]) for n in raw)
    ema = load_full(ckpt)
    got_ema = load_file(export(tmp_path, tmp_path / "ema") / "model.safetensors")
    assert set(got_ema) == set(ema) and all(torch.equal(got_ema[n], ema[n]) for n in ema)
    assert any(not torch.equal(got_ema[n], raw[n]) for n in ema)
    # EMA against the ZeRO-3 run: 1e-4 absolute. Adam divides a near-zero gradient by its own running scale,
    # so the two reduction orders (stage 2's buckets, stage 3's partitions) can flip the update of a rarely
    # seen token's embedding: measured 4.0e-5 on one element of 45,952, tok_embeddings (323, 113), the
    # element that differs in the 1->2->1-rank test too. A lost or stale EMA differs by ~lr (2e-3) broadly.
    ema_ref = load_full(straight / "checkpoints/step_00000010")
    for n, e in ema_ref.items():
        torch.testing.assert_close(ema[n], e, rtol=0, atol=1e-4, msg=lambda m: f"EMA {n}: {m}")


def test_zero0_logs_the_gradient_norm_and_exports_its_ema(straight, demo_data, tmp_path):
    """distributed.zero_stage=0 (plain data parallel): DeepSpeed keeps no gradient norm at stage 0, so the
    trainer measures it before the step; it equals the ZeRO-3 run's (same sequences, 1e-5 relative). The
    EMA exports; the raw weights, only in DeepSpeed's pickled module file, are refused with the reason."""
    p = launch("torchrun", demo_data, tmp_path, "distributed.zero_stage=0")
    assert p.returncode == 0, log_tail(tmp_path, "torchrun")
    # NaN before the trainer measured it
    assert all(math.isfinite(r["grad_norm"]) for r in train_rows(tmp_path).values())
    assert_follows_straight(straight, tmp_path)
    from pretrain.train.ema import load_full
    from pretrain.artifacts.export import ExportError, ExportOptions, export

    out = export(tmp_path, tmp_path / "ema")
    assert json.loads((out / "export.json").read_text())["weights"] == "ema"
    assert (set(load_full(tmp_path / "checkpoints/step_00000010"))
            == set(load_full(straight / "checkpoints/step_00000010")))
    with pytest.raises(ExportError, match="ZeRO stage 0"):
        export(tmp_path, tmp_path / "raw", ExportOptions(weights="raw"))
    assert not (tmp_path / "raw").exists()


def test_killed_during_save_resumes_from_previous_checkpoint(straight, demo_data, tmp_path):
    """accelerate launch; SIGKILL after the shards of step 10 are written but before its COMPLETE marker."""
    p = launch("accelerate", demo_data, tmp_path, fault="kill_in_save=10")
    assert p.returncode != 0, log_tail(tmp_path, "accelerate")
    ck = tmp_path / "checkpoints"
    # the save writes into a fresh step_N.tmp/ renamed after its marker: nothing claims step 10
    assert (ck / "step_00000010.tmp").is_dir() and not (ck / "step_00000010.tmp/COMPLETE").exists()
    assert not (ck / "step_00000010").exists()
    assert (ck / "latest").read_text() == "step_00000005"
    p = launch("accelerate", demo_data, tmp_path)
    assert p.returncode == 0, log_tail(tmp_path, "accelerate")
    assert "step_00000005 at step 5" in (tmp_path / "accelerate.log").read_text()
    assert (ck / "step_00000010/COMPLETE").is_file() and (ck / "latest").read_text() == "step_00000010"
    assert not (ck / "step_00000010.tmp").exists()
    ref, got = train_rows(straight), train_rows(tmp_path)
    assert [got[s]["digest"] for s in range(1, 11)] == [ref[s]["digest"] for s in range(1, 11)]
    assert [got[s]["loss"] for s in range(1, 7)] == [ref[s]["loss"] for s in range(1, 7)]  # see the test above
    assert all(abs(got[s]["loss"] - ref[s]["loss"]) <= 1e-6 for s in range(7, 11))


@pytest.mark.slow
def test_epochs_roll_over_with_workers_and_validation(demo_data, tmp_path):
    """Several epochs with 2 loader workers and validation every 3 steps (one process).

    Regression: validation loaders used to fork workers while the prefetch thread was inside the
    train loader; the train workers then died at the next epoch ("DataLoader worker exited").
    """
    cmd = [sys.executable, "-m", "pretrain.train", "--config", config_arg(demo_data), f"train.run_dir={tmp_path}",
           f"data.cache_dir={tmp_path}/cache", "train.steps=40", "train.global_batch_size=8",
           "train.micro_batch_size=2",
           "data.num_workers=2", "logging.val_every=3", "logging.val_batches=1", "logging.sample_every=0",
           "checkpoint.every=0", "logging.every=1"]
    with open(tmp_path / "run.log", "w") as log:
        p = subprocess.run(cmd, cwd=REPO, env=run_env(), stdout=log, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    assert p.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    rows = train_rows(tmp_path)
    assert sorted(rows) == list(range(1, 41))
    rows_per_epoch = sum(json.loads((Path(s.local) / "pack.json").read_text())["rows"]
                         for s in demo_data.data_config.streams)
    assert 40 * 8 > 2 * rows_per_epoch, "the run must cross at least two epoch boundaries"


# ------------------------------------------------------------------ train.init_from and from_pretrained parity


def model_outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token logits (B*L, V), predicted eps (N, C, H, W)) of `model` on `batch` at its own noise and timesteps."""
    from pretrain.model.diffusion import add_noise

    with torch.no_grad():
        ab = model.alpha_bar(batch.latents.device)  # (T,)
        x_t = add_noise(batch.latents, batch.noise, batch.timesteps, ab)  # (N, C, H, W)
        h, eps = model.hidden_and_sampler_input(batch, x_t, batch.timesteps)  # (B*L, D), (N, C, H, W)
        return model.lm_logits(h), eps


def init_worker(config: str, batch_path: str, out_path: str, *overrides: str) -> None:
    """On each rank under torchrun: the trainer's engine (`build_engine`, which loads train.init_from under
    ZeRO-3), its gathered weights before any step, and its logits and eps on the batch; rank 0 saves them."""
    import deepspeed

    from contract.batch import TransfusionBatch
    from pretrain.train import distributed
    from pretrain.config import load_config
    from pretrain.plan.batch import plan_batch
    from pretrain.train.engine import build_engine
    from pretrain.artifacts.init_from import initial_tensors

    env = distributed.init_distributed("gloo", timeout_minutes=3)
    cfg = load_config(config, [*RUN_OVERRIDES, *overrides])
    engine, _ = build_engine(cfg, plan_batch(cfg, env.world_size), init_weights=initial_tensors)
    model = engine.module.eval()
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits, eps = model_outputs(model, TransfusionBatch(**torch.load(batch_path, weights_only=True)))
    if env.rank == 0:
        torch.save({"weights": weights, "logits": logits, "eps": eps}, out_path)


def fixed_batch(demo_data, cfg):
    """The first micro-batch of 2 sequences with an image from the real loader (one process)."""
    from dataclasses import replace

    from data_pipeline.loader import build_loader

    m = cfg.model
    loader = build_loader(replace(cfg.data, num_workers=0), "val", micro_batch_size=2, seed=1, patch_size=m.patch_size,
                          latent_shape=(m.latent_channels, m.latent_size, m.latent_size),
                          diffusion_steps=m.diffusion_steps)
    return next(b for b in loader if b.num_images > 0 and b.num_text_targets > 0)


def test_init_from_export_under_zero3_matches_from_pretrained(straight, demo_data, tmp_path):
    """An export of the straight run, loaded two ways:
    - the trainer's ZeRO-3 engine on 2 gloo ranks with train.init_from (worker above): before any step its
      gathered weights equal the export's tensors bit for bit, and its logits and eps on a fixed batch equal
      those of `Transfusion.from_pretrained(export)` in this plain process within 1e-5 (fp32; same kernels, so
      expected equal up to thread-count-dependent summation order);
    - the real entry point (deepspeed launcher) with train.init_from: a fresh run (no checkpoint resumed, step 1
      at the warm-up's first learning rate, the data from its start: straight's step-1 digest) whose first loss
      is far below straight's first loss (the trained weights were loaded, not a fresh init)."""
    from dataclasses import asdict

    from pretrain.config import load_config
    from pretrain.artifacts.export import export, export_tensors
    from pretrain.model import Transfusion
    from pretrain.train.schedule import lr_at

    exp = export(straight, tmp_path / "export")  # the EMA weights of step 10
    cfg = load_config(config_arg(demo_data), RUN_OVERRIDES)
    batch = fixed_batch(demo_data, cfg)
    torch.save(asdict(batch), tmp_path / "batch.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "worker", config_arg(demo_data), str(tmp_path / "batch.pt"), str(tmp_path / "engine.pt"),
           f"train.init_from={exp}"]
    p = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    got = torch.load(tmp_path / "engine.pt", weights_only=True)

    tensors = dict(export_tensors(exp))
    assert set(got["weights"]) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(got["weights"][n], t), n
    model = Transfusion.from_pretrained(exp)
    logits, eps = model_outputs(model, batch)
    assert eps.shape == (batch.num_images, *demo_data.latent_shape) and logits.shape[-1] == cfg.model.vocab_size
    d_logits, d_eps = float((got["logits"] - logits).abs().max()), float((got["eps"] - eps).abs().max())
    print(f"engine vs from_pretrained: max |logit diff| {d_logits:.2e}, max |eps diff| {d_eps:.2e}")
    torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["eps"], eps, rtol=1e-5, atol=1e-5)

    run_dir = tmp_path / "run"
    p = launch("deepspeed", demo_data, run_dir, f"train.init_from={exp}", "train.steps=2", "checkpoint.every=0",
               "logging.val_every=0", "logging.sample_every=0")
    assert p.returncode == 0, log_tail(run_dir, "deepspeed")
    log = (run_dir / "deepspeed.log").read_text()
    assert f"initialised {len(tensors)} parameter tensors from train.init_from={exp}" in log
    assert "resumed from" not in log and "starting from scratch" in log
    rows, ref = train_rows(run_dir), train_rows(straight)
    assert sorted(rows) == [1, 2]
    assert rows[1]["lr"] == pytest.approx(lr_at(0, cfg.optim, 2)) and rows[1]["lr"] < cfg.optim.lr  # warm-up's first
    assert rows[1]["digest"] == ref[1]["digest"]
    assert rows[1]["loss"] < ref[1]["loss"] - 0.3, (rows[1]["loss"], ref[1]["loss"])


def test_hf_llama_export_of_a_zero3_checkpoint_and_init_from_it_under_zero3(straight, demo_data, tmp_path):
    """`export --hf-llama` end to end on the straight run's real ZeRO-3 checkpoint (2 ranks' partitions), then
    `train.init_from` that Hugging Face directory in the trainer's ZeRO-3 engine on 2 gloo ranks:
    - the HF directory loads in transformers (LlamaForCausalLM, its config.json) and, converted back
      (`from_hf`), equals the raw export of the same checkpoint bit for bit on every text-tower tensor (fp32);
    - the engine's gathered weights before any step equal those tensors bit for bit, and the image-side
      parameters (patch encoder/decoder), which a Llama does not have, are not the trained ones (left at init)."""
    from dataclasses import asdict

    import transformers

    from pretrain.artifacts.export import ExportOptions, export, export_hf_llama, export_tensors
    from pretrain.artifacts.hf_llama import from_hf, read_hf_dir
    from pretrain.config import load_config

    cfg = load_config(config_arg(demo_data), RUN_OVERRIDES)
    assert cfg.distributed.zero_stage == 3
    hf_dir = export_hf_llama(straight, tmp_path / "hf")
    assert json.loads((hf_dir / "export.json").read_text())["format"] == "hf-llama"
    llama = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    assert llama.config.num_hidden_layers == cfg.model.n_layers and llama.config.vocab_size == cfg.model.vocab_size
    raw = dict(export_tensors(export(straight, tmp_path / "raw", ExportOptions(weights="raw"))))
    hf, read = read_hf_dir(hf_dir)
    text = dict(from_hf(read, hf, cfg.model))
    assert text and set(text) < set(raw)
    for n, t in text.items():
        assert torch.equal(t, raw[n]), n

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "worker", config_arg(demo_data), str(tmp_path / "batch.pt"), str(tmp_path / "engine.pt"),
           f"train.init_from={hf_dir}"]
    torch.save(asdict(fixed_batch(demo_data, cfg)), tmp_path / "batch.pt")
    p = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    got = torch.load(tmp_path / "engine.pt", weights_only=True)["weights"]
    assert set(got) == set(raw)
    for n, t in text.items():
        assert torch.equal(got[n], t), n
    image_side = [n for n in got if n.startswith(("patch_encoder.", "patch_decoder."))]
    trained = [n for n in image_side if raw[n].abs().sum() > 0]  # the trained run moved them off their init
    assert trained and all(not torch.equal(got[n], raw[n]) for n in trained)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    init_worker(*sys.argv[2:])
