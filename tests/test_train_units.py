"""Fast trainer units: launcher detection, batch plan, DeepSpeed config derivation, LR schedule, checkpoint picking."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain.train import checkpoint
from pretrain.config import load_config
from contract.dist_env import detect_env, expand_nodelist, tasks_per_node
from pretrain.plan.batch import BatchSizeError, derive_ds_config, plan_batch
from pretrain.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[1-2],b3,c[9-10]", ["a1", "a2", "b3", "c9", "c10"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_plain_srun_env_is_derived_from_slurm_variables():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "12345"}
    d = detect_env(env)
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size) == (3, 1, 4, 2)
    assert d.master_addr == "gpu07" and d.master_port == 20000 + 12345 % 20000 and d.launcher == "srun"


@pytest.mark.parametrize(
    "spec, counts",
    [("4(x2),3", [4, 4, 3]), ("2,1", [2, 1]), ("8(x16)", [8] * 16), ("2", [2]), ("1(x2),3(x3)", [1, 1, 3, 3, 3])],
)
def test_tasks_per_node_expands_slurms_compressed_counts(spec, counts):
    assert tasks_per_node(spec) == counts
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE='4x2'"):
        tasks_per_node("4x2")


@pytest.mark.parametrize(
    "per_node, node, procid, local_world",
    [("4(x2),3", "2", "9", 3), ("4(x2),3", "1", "5", 4), ("2,1", "1", "2", 1), ("2,1", "0", "1", 2)],
)
def test_plain_srun_local_world_size_is_this_nodes_count(per_node, node, procid, local_world):
    """Regression: only the first entry of SLURM_TASKS_PER_NODE was read, so with 4(x2),3 the third node's ranks
    believed they had 4 local ranks (and with 2,1 the second node's rank believed it had 2)."""
    world = str(sum(tasks_per_node(per_node)))
    env = {"SLURM_PROCID": procid, "SLURM_LOCALID": "0", "SLURM_NTASKS": world, "SLURM_TASKS_PER_NODE": per_node,
           "SLURM_NODEID": node, "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_ID": "7"}
    assert detect_env(env).local_world_size == local_world
    del env["SLURM_NODEID"]  # without it: the node whose block of ranks holds this rank (Slurm's block distribution)
    assert detect_env(env).local_world_size == local_world
    # the step's own layout wins over the job's (a step may use fewer tasks)
    step = dict(env, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_PROCID="1", SLURM_NODEID="1")
    assert (detect_env(step).world_size, detect_env(step).local_world_size) == (2, 1)


def test_inconsistent_launcher_variables_are_errors():
    with pytest.raises(ValueError, match=r"rank 4 is outside \[0, world size 4\)"):
        detect_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_torch_variables_win_over_slurm_ones():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
           "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    d = detect_env(env)
    assert (d.rank, d.world_size, d.master_addr, d.master_port, d.launcher) == (1, 2, "h", 1234, "torchrun")
    assert detect_env({"RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}).launcher == "accelerate"
    assert detect_env({}).world_size == 1


def test_batch_plan_and_its_error_says_what_to_change():
    cfg = load_config("configs/tiny.yaml", ["train.global_batch_size=8", "train.micro_batch_size=2"])
    p = plan_batch(cfg, 2)
    assert (p.micro_batch, p.grad_accum, p.world_size) == (2, 2, 2)
    with pytest.raises(BatchSizeError, match=r"train.global_batch_size to 6 or 12"):
        plan_batch(cfg, 3)


def test_deepspeed_config_is_derived_and_user_keys_merge_on_top():
    cfg = load_config("configs/tiny.yaml", [
        "train.global_batch_size=8", "train.micro_batch_size=1",
        "distributed.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}, gradient_clipping: 0.5}",
    ])
    ds = derive_ds_config(cfg, plan_batch(cfg, 2), on_gpu=False)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    gpu = load_config("configs/tiny.yaml", ["train.precision=auto", "distributed.offload_optimizer=true"])
    ds_gpu = derive_ds_config(gpu, plan_batch(gpu, 2), on_gpu=True)
    assert ds_gpu["bf16"]["enabled"] is True and ds_gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["torch_autocast"]["enabled"] is False and ds_gpu["torch_autocast"]["enabled"] is False
    amp = load_config("configs/tiny.yaml", ["train.precision=bf16_autocast"])
    ds_amp = derive_ds_config(amp, plan_batch(amp, 2), on_gpu=True)  # fp32 weights, autocast forward
    assert ds_amp["bf16"]["enabled"] is False and ds_amp["torch_autocast"]["enabled"] is True
    autocast = ds_amp["torch_autocast"]
    assert autocast["dtype"] == "bfloat16" and autocast["lower_precision_safe_modules"] == []
    from pretrain.plan import batch

    for native, want in ((True, "bf16_autocast"), (False, "fp32")):  # auto on CPU: autocast only where bf16 is native
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(batch, "cpu_has_native_bf16", lambda native=native: native)
            cpu = derive_ds_config(gpu, plan_batch(gpu, 2), on_gpu=False)
            assert batch.effective_precision(gpu, on_gpu=False) == want and cpu["bf16"]["enabled"] is False
            assert cpu["torch_autocast"]["enabled"] is (want == "bf16_autocast")
            assert batch.effective_precision(gpu, on_gpu=True) == "bf16"
            assert batch.effective_precision(amp, on_gpu=False) == "bf16_autocast"  # a set value stays
    bad = load_config("configs/tiny.yaml", ["distributed.deepspeed={train_batch_size: 3}"])
    with pytest.raises(BatchSizeError, match="train.global_batch_size"):
        derive_ds_config(bad, plan_batch(bad, 2), on_gpu=False)


def test_lr_warmup_then_cosine_to_floor():
    o = load_config(None, ["optim.lr=1.0e-3", "optim.min_lr=1.0e-4", "optim.warmup_steps=10"]).optim
    assert lr_at(0, o, 110) == pytest.approx(1e-4)
    assert lr_at(9, o, 110) == pytest.approx(1e-3)
    assert lr_at(60, o, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, o, 110) == pytest.approx(1e-4) and lr_at(500, o, 110) == pytest.approx(1e-4)
    assert all(lr_at(s, o, 110) >= lr_at(s + 1, o, 110) for s in range(10, 120))


def test_resume_auto_picks_newest_complete_and_prune_keeps_last_k(tmp_path):
    root = checkpoint.checkpoint_root(tmp_path)
    for step in (5, 10, 15, 20):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
    for step in (5, 10, 15):
        (root / checkpoint.tag_for(step) / checkpoint.MARKER).write_text(str(step))
    # step 20 was killed mid-save: no marker
    assert checkpoint.find_resume("auto", tmp_path) == root / "step_00000015"
    assert checkpoint.find_resume("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        checkpoint.find_resume(str(root / "step_00000020"), tmp_path)
    checkpoint.prune(root, keep_last=2)
    left = [p.name for _, p in checkpoint.list_checkpoints(root)]
    assert left == ["step_00000010", "step_00000015", "step_00000020"]  # the newer incomplete one is not ours to judge


def test_bad_steps_are_counted_and_too_many_in_a_row_stop_with_advice():
    from dataclasses import replace
    from types import SimpleNamespace

    from pretrain.train.metrics import StepStats
    from pretrain.train.loop import TrainingDiverged, check_bad_step

    run = SimpleNamespace(cfg=load_config("configs/tiny.yaml", ["train.max_bad_steps=2"]), bad_in_row=0, bad_total=0)
    ok = StepStats(step=1, loss=3.0, lm_loss=2.0, diffusion_loss=0.2, lr=1e-3, grad_norm=1.0, text_tokens=10,
                   images=1, applied=True)
    bad = replace(ok, loss=float("nan"), grad_norm=float("inf"), applied=False)
    check_bad_step(run, bad)
    check_bad_step(run, ok)
    assert (run.bad_in_row, run.bad_total) == (0, 1)
    check_bad_step(run, bad)
    with pytest.raises(TrainingDiverged, match=r"2 NaN/Inf steps in a row.*optim.lr.*train.precision=fp32"):
        check_bad_step(run, bad)
    assert run.bad_total == 3


def _checkpoint_with_config(run_dir, step, cfg):
    from pretrain.config import save_config

    path = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    save_config(cfg, path / checkpoint.CONFIG)
    (path / checkpoint.MARKER).write_text(str(step))
    return path


def test_resume_refuses_changed_model_or_data_keys_and_logs_schedule_changes(tmp_path, caplog):
    """The checkpoint's own config.yaml decides; the error lists every fixed key with both values."""
    from pretrain.train.distributed import DistEnv
    from pretrain.train.loop import ResumeError, check_resume

    saved = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}"])
    ckpt = _checkpoint_with_config(tmp_path, 4, saved)
    env = DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "single")
    changed = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}", "model.dim=64", "data.seq_len=128",
                                                "train.global_batch_size=16", "train.steps=99"])
    with pytest.raises(ResumeError) as e:
        check_resume(changed, env)
    msg = str(e.value)
    assert str(ckpt) in msg
    for line in ("model.dim: checkpoint 128, this launch 64", "data.seq_len: checkpoint 4096, this launch 128",
                 "train.global_batch_size: checkpoint 8, this launch 16"):
        assert line in msg
    assert "train.steps" not in msg  # schedule keys may change
    ok = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}", "train.steps=99", "model.attention=flex",
                                           "logging.every=1"])
    with caplog.at_level("INFO", logger="pretrain"):
        assert check_resume(ok, env) == ckpt
    assert "config change on resume: train.steps 50 -> 99" in caplog.text
    assert "model.attention 'sdpa' -> 'flex'" in caplog.text


def test_resume_on_another_world_size_keeps_the_global_batch_or_says_what_to_set(tmp_path, caplog):
    """A checkpoint saved by 2 ranks resumes on 4 (accumulation 4 -> 2: the global batch of 8 stays); on 3 ranks
    the fixed global batch of 8 cannot split, and the error names the micro-batch sizes that would."""
    from pretrain.train.distributed import DistEnv
    from pretrain.train.loop import ResumeError, check_resume, plan_for

    cfg = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}", "train.micro_batch_size=1"])
    ckpt = _checkpoint_with_config(tmp_path, 4, cfg)
    for r in range(2):
        (ckpt / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoint.saved_world_size(ckpt) == 2
    four = DistEnv(0, 0, 4, 4, "127.0.0.1", 1, "torchrun")
    with caplog.at_level("INFO", logger="pretrain"):
        assert check_resume(cfg, four) == ckpt
    assert "saved by 2 ranks, this job has 4: resuming through DeepSpeed's universal checkpoint" in caplog.text
    plan = plan_for(cfg, four, ckpt)
    assert (plan.global_batch, plan.micro_batch, plan.grad_accum, plan.world_size) == (8, 1, 2, 4)
    three = DistEnv(0, 0, 3, 3, "127.0.0.1", 1, "torchrun")
    with pytest.raises(ResumeError, match=r"global_batch_size=8, which a resume keeps.*3 ranks.*one of none, or use a "
                                          r"number of ranks that divides 8"):
        plan_for(cfg, three, ckpt)
    micro3 = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}", "train.micro_batch_size=3"])
    with pytest.raises(ResumeError, match=r"Set train.micro_batch_size to one of \[1, 2\]\."):
        plan_for(micro3, four, ckpt)


def test_universal_conversion_of_a_broken_checkpoint_fails_cleanly(tmp_path):
    """DeepSpeed's converter fails on unreadable shards: the error names the checkpoint and the world size
    that saved it, and no half-made universal directory is left (a later resume would trust it)."""
    ckpt = _checkpoint_with_config(tmp_path, 4, load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}"]))
    for r in range(2):
        for kind in ("model", "optim"):
            (ckpt / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt").write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=r"(?s)step_00000004: DeepSpeed's universal-checkpoint conversion failed.*"
                                           r"Resume with the world size that saved it \(2 ranks\)"):
        checkpoint.to_universal(ckpt)
    assert sorted(p.name for p in ckpt.iterdir() if "universal" in p.name) == []


def test_config_changes_splits_fixed_and_free_keys():
    from pretrain.config import config_changes

    a = load_config("configs/tiny.yaml")
    b = load_config("configs/tiny.yaml", ["model.n_kv_heads=2", "data.shuffle=false", "train.seed=1",
                                          "optim.lr=1e-4", "data.num_workers=0"])
    fixed, free = config_changes(a, b)
    assert fixed == {"model.n_kv_heads": (None, 2), "data.shuffle": (True, False), "train.seed": (0, 1)}
    assert free == {"optim.lr": (1e-3, 1e-4), "data.num_workers": (2, 0)}
    assert config_changes(a, a) == ({}, {})


def test_ema_saved_by_two_ranks_resumes_on_one_and_three(tmp_path):
    """An EMA saved as 2 ZeRO-3 ranks' partitions (ceil(numel/2) per rank, the last zero-padded) loads on
    1 rank as the whole parameter and on 3 ranks as DeepSpeed's 3-way partitions of it."""
    from pretrain.train.ema import ShardedEMA

    torch.manual_seed(0)
    full = {"a": torch.randn(5, 3), "b": torch.randn(7)}  # 15 and 7 elements: both padded on 2 and on 3 ranks

    class FakeZero3(torch.nn.Parameter):  # what ZeRO-3 leaves on a parameter: ds_tensor (this rank's slice), ds_shape
        pass

    def ranks(world: int) -> list[dict[str, torch.nn.Parameter]]:
        out = []
        for r in range(world):
            named = {}
            for n, t in full.items():
                k = -(-t.numel() // world)
                p = FakeZero3(torch.empty(0))
                padded = torch.cat([t.reshape(-1), torch.zeros(k * world - t.numel())])
                p.ds_tensor, p.ds_shape = padded[r * k:(r + 1) * k].clone(), t.shape
                named[n] = p
            out.append(named)
        return out

    for r, named in enumerate(ranks(2)):
        ShardedEMA(named.items(), 0.9).save(tmp_path, r)  # the shadows start as the weights
    for world in (1, 3):
        for r, named in enumerate(ranks(world)):
            for p in named.values():
                p.ds_tensor = torch.full_like(p.ds_tensor, float("nan"))  # this run's weights differ from the EMA
            ema = ShardedEMA(named.items(), 0.9)
            assert ema.load(tmp_path, r, world)
            for n, t in full.items():
                k = -(-t.numel() // world)
                want = torch.cat([t.reshape(-1), torch.zeros(k * world - t.numel())])[r * k:(r + 1) * k]
                assert torch.equal(ema.shadow[n], want), (world, r, n)


def test_ema_update_save_and_resume_against_the_formula(tmp_path):
    """pretrain.train.ema on a plain module: the EMA follows d_t = min(decay, (1+t)/(10+t)) written out here;
    a saved EMA restores exactly (shadows and update count) and joins back to the full shapes."""
    from pretrain.train.ema import ShardedEMA, load_full

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ema = ShardedEMA(model.named_parameters(), 0.9)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        ref = {n: d * ref[n] + (1 - d) * p.detach() for n, p in model.named_parameters()}
    for n, e in ref.items():
        torch.testing.assert_close(ema.shadow[n].view(e.shape), e, rtol=1e-6, atol=1e-6)
    ema.save(tmp_path, 0)
    again = ShardedEMA(model.named_parameters(), 0.9)
    assert again.load(tmp_path, 0, 1) and again.updates == 30
    assert all(torch.equal(again.shadow[n], ema.shadow[n]) for n in ref)
    full = load_full(tmp_path)
    assert {n: tuple(t.shape) for n, t in full.items()} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert not ShardedEMA(model.named_parameters(), 0.9).load(tmp_path / "none", 0, 1)  # no EMA saved there
    with pytest.raises(ValueError, match="ema_decay"):
        ShardedEMA(model.named_parameters(), 1.0)


def test_resume_auto_follows_latest_and_a_rollback_moves_the_line_ahead_aside(tmp_path, caplog):
    """Complete 2, 4, 6 and `latest` -> 4 (a rollback line): auto resumes 4, not the newer 6, and says why;
    `abandon_ahead` (what the trainer does after an explicit resume of 2) moves 4, 6 and a killed save's
    step_8.tmp into checkpoints/abandoned/, keeps 2 and points `latest` at it."""
    root = checkpoint.checkpoint_root(tmp_path)
    for step in (2, 4, 6):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        (root / checkpoint.tag_for(step) / checkpoint.MARKER).write_text(str(step))
    (root / "step_00000008.tmp").mkdir()
    (root / "latest").write_text("step_00000004")
    with caplog.at_level("WARNING", logger="pretrain"):
        assert checkpoint.find_resume("auto", tmp_path) == root / "step_00000004"
    assert "not resuming the newer ['step_00000006']" in caplog.text
    (root / "latest").unlink()  # runs from before `latest`: the newest complete one
    assert checkpoint.find_resume("auto", tmp_path) == root / "step_00000006"
    moved = checkpoint.abandon_ahead(tmp_path, root / "step_00000002", 2)
    assert moved == root / "abandoned/rollback_to_step_00000002"
    assert sorted(p.name for p in moved.iterdir()) == ["step_00000004", "step_00000006", "step_00000008.tmp"]
    assert [p.name for _, p in checkpoint.list_checkpoints(root)] == ["step_00000002"]
    assert checkpoint.find_resume("auto", tmp_path) == root / "step_00000002"
    assert (root / "latest").read_text() == "step_00000002"


@pytest.mark.slow  # a fresh process that imports DeepSpeed and loads the op: ~10 s, 30 s on a loaded machine
def test_deepspeed_ops_build_in_this_environment_not_the_shared_home_cache(tmp_path):
    """A fresh process with no TORCH_EXTENSIONS_DIR and an empty HOME builds the trainer's optimizer
    (`build_optimizer`: DeepSpeedCPUAdam, JIT-built cpu_adam): the op loads from sys.prefix/torch_extensions
    (ci/build_deepspeed_ops.py builds it there; `make install`), and nothing is written to ~/.cache. A user's
    own TORCH_EXTENSIONS_DIR is kept."""
    import os
    import subprocess
    import sys

    code = (
        "import os, sys, torch\n"
        "from pretrain.config import Config\n"
        "from pretrain.train.engine import build_optimizer\n"
        "opt = build_optimizer(torch.nn.Linear(4, 4), Config(), on_gpu=False)\n"
        "print(type(opt).__name__, os.environ['TORCH_EXTENSIONS_DIR'], opt.ds_opt_adam.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    (tmp_path / "home").mkdir()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    name, where, so = p.stdout.split()[-3:]
    want = os.path.join(sys.prefix, "torch_extensions")
    assert name == "DeepSpeedCPUAdam" and where == want and so.startswith(want + os.sep), p.stdout
    assert not (tmp_path / "home/.cache/torch_extensions").exists()

    from pretrain.train.distributed import use_env_torch_extensions

    env = dict(os.environ)
    try:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "mine")
        assert use_env_torch_extensions() == str(tmp_path / "mine")
    finally:
        os.environ.clear()
        os.environ.update(env)
