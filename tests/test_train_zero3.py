"""ZeRO-3 step-level tests: partitioning, parity with plain PyTorch, split invariance, no hang, NaN skip.

The test (parent) cuts fixed micro-batches from the real loader, then runs this file as a worker under
torchrun with 2 ranks (micro 1 x accumulation 2 x 2 ranks) and with 1 rank (micro 1 x accumulation 4):
the worker drives the trainer's own `global_denominators` and `forward_backward` on a real ZeRO-3 engine.
The 1-rank run also turns on activation checkpointing. The parent replays the same steps in a single-process PyTorch
loop (torch AdamW, clipping 1.0, same
schedule, loss = sum / global count) and compares.

Tolerance (fp32): losses and pre-clip gradient norms within rel 1e-5; parameters after 3 steps within
abs 1e-5 between 1 and 2 ranks (measured 3e-7) and abs 5e-5 against plain PyTorch (measured 1e-5, i.e.
0.5% of one lr=2e-3 step). What differs is the summation order (per-rank partial gradients,
reduce-scatter) and DeepSpeedCPUAdam's fused update against torch's AdamW, whose m/(sqrt(v)+eps) is
sensitive to rounding where gradients are near eps.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from contract.dist_env import free_port

REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # normal steps; then one step with a NaN latent
EMA_DECAY = 0.5  # large moves in 3 steps (with the warm-up d_t = min(decay, (1+t)/(10+t)): 0.1, 0.18, 0.25)
GLOBAL = 4  # sequences per optimizer step
pytestmark = pytest.mark.slow


def _overrides(world: int) -> list[str]:
    return [
        f"train.global_batch_size={GLOBAL}", "train.micro_batch_size=1", "optim.warmup_steps=2", "optim.lr=2.0e-3",
        "train.steps=10", "distributed.timeout_minutes=3",
        # keep even tiny parameters partitioned so the test sees every parameter split
        "distributed.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ]


# ----------------------------------------------------------------------------------------------- worker


def worker(config: str, batches_path: str, out_path: str, *extra: str) -> None:
    """Runs on every rank under torchrun; rank 0 writes the results."""
    import deepspeed

    from pretrain.train import distributed
    from pretrain.config import load_config
    from pretrain.plan.batch import plan_batch
    from pretrain.train.engine import build_engine
    from pretrain.train.metrics import StepTimer
    from contract.batch import TransfusionBatch
    from pretrain.train.schedule import lr_at, set_lr
    from pretrain.train.ema import ShardedEMA
    from pretrain.train.loop import forward_backward, global_denominators

    env = distributed.init_distributed("gloo", timeout_minutes=3)
    cfg = load_config(config, _overrides(env.world_size) + list(extra))
    plan = plan_batch(cfg, env.world_size)
    engine, _ = build_engine(cfg, plan)
    params = list(engine.module.parameters())
    res = {"partition": partition_report(params, env.world_size)}
    ema = ShardedEMA(engine.module.named_parameters(), EMA_DECAY)  # this rank's partitions only
    with deepspeed.zero.GatheredParameters(params):
        res["init"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    steps = [[TransfusionBatch(**b) for b in step] for step in torch.load(batches_path, weights_only=True)]
    res["losses"], res["grad_norms"] = [], []

    def one_step(step: int, micro: list[TransfusionBatch]) -> None:
        mine = micro[env.rank * plan.grad_accum : (env.rank + 1) * plan.grad_accum]
        counts = global_denominators(mine, plan, env.rank)
        g_text, g_img = counts.text_targets, counts.images
        set_lr(engine.optimizer, lr_at(step, cfg.optim, cfg.train.steps))
        lm, diff, _ = forward_backward(engine, mine, counts.text_denom, counts.image_denom, StepTimer())
        lm_g, diff_g = distributed.all_reduce_sum([lm, diff])
        res["losses"].append(lm_g / g_text + cfg.model.diffusion_loss_weight * diff_g / max(g_img, 1))
        res["grad_norms"].append(float(engine.get_global_grad_norm()))
        if engine.was_step_applied():  # as pretrain.train.loop.train_step
            ema.update()

    for step in range(STEPS):
        one_step(step, steps[step])
    with deepspeed.zero.GatheredParameters(params):
        res["final"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    before = [p.ds_tensor.detach().clone() for p in params]
    one_step(STEPS, steps[STEPS])  # holds a NaN latent
    res["nan_step_applied"] = bool(engine.was_step_applied())
    res["nan_step_unchanged"] = all(torch.equal(b, p.ds_tensor) for b, p in zip(before, params))
    res["skipped_steps"] = int(engine.skipped_steps)
    ema_dir = Path(out_path + ".ema")  # saved after the NaN step: it must not have moved the EMA
    ema_dir.mkdir(exist_ok=True)
    ema.save(ema_dir, env.rank)
    if env.rank == 0:
        torch.save(res, out_path)


def partition_report(params: list, world: int) -> dict:
    """Per parameter: full size (ds_numel), this rank's shard size (ds_tensor), what is materialised (numel)."""
    rows = [(tuple(p.ds_shape), p.ds_numel, p.ds_tensor.numel(), p.data.numel()) for p in params]
    return {"rows": rows, "world": world, "held": sum(r[2] for r in rows), "total": sum(r[1] for r in rows)}


# ----------------------------------------------------------------------------------------------- parent


def _run_worker(world: int, config: str, batches: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(free_port()), __file__, "worker", config, str(batches), str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return {**torch.load(out, weights_only=True), "out": str(out)}


def _cut_batches(demo_data, cfg) -> list[list]:
    """STEPS+1 steps of GLOBAL micro-batches of one sequence from the real loader.

    Step 0 puts two text-only sequences first (rank 0's share) and two with images last (rank 1's): the
    no-hang case. The last step gets a NaN latent.
    """
    from dataclasses import replace

    from data_pipeline.loader import build_loader

    m = cfg.model
    loader = build_loader(replace(cfg.data, num_workers=0), "train", micro_batch_size=1, seed=0,
                          patch_size=m.patch_size,
                          latent_shape=(m.latent_channels, m.latent_size, m.latent_size),
                          diffusion_steps=m.diffusion_steps)
    text, image, pool = [], [], []
    for b in loader:
        (image if b.num_images else text).append(b)
        pool.append(b)
        if len(text) >= 2 and len(image) >= 2 and len(pool) >= 4 * (STEPS + 1):
            break
    steps = [text[:2] + image[:2]]
    rest = [b for b in pool if all(b is not x for x in steps[0])]
    steps += [rest[i * GLOBAL : (i + 1) * GLOBAL] for i in range(STEPS)]
    if not any(b.num_images for b in steps[-1]):  # the NaN step needs an image: swap one in from an earlier step
        s, j = next((s, j) for s in steps[1:-1] for j, b in enumerate(s) if b.num_images)
        s[j], steps[-1][0] = steps[-1][0], s[j]
    bad = next(b for b in steps[-1] if b.num_images)
    bad.latents[0, 0, 0, 0] = float("nan")
    return [[asdict(b) for b in step] for step in steps]


def _reference(cfg, steps: list[list]) -> tuple[dict, list[float], list[float], dict, dict]:
    """Single-process PyTorch: same init, loss = sum / global count over all micro-batches, AdamW, clip 1.0;
    returns (init, losses, grad norms, final weights, EMA of the weights with EMA_DECAY)."""
    from pretrain.train.engine import param_groups
    from pretrain.model import Transfusion, TransfusionBatch
    from pretrain.train.schedule import lr_at, set_lr

    torch.manual_seed(cfg.train.seed)
    model = Transfusion(cfg.model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    losses, norms = [], []
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step, micro in enumerate(steps[:STEPS]):
        micro = [TransfusionBatch(**b) for b in micro]
        g_text = sum(b.num_text_targets for b in micro)
        g_img = max(1, sum(b.num_images for b in micro))
        set_lr(opt, lr_at(step, o, cfg.train.steps))
        opt.zero_grad()
        total = 0.0
        for b in micro:
            out = model(b, text_denom=g_text, image_denom=g_img)
            out.loss.backward()
            total += float(out.loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)))
        opt.step()
        losses.append(total)
        d = min(EMA_DECAY, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            ema[n] = d * ema[n] + (1 - d) * p.detach()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return init, losses, norms, final, ema


@pytest.fixture(scope="module")
def zero3_results(demo_data, tmp_path_factory):
    from pretrain.config import load_config

    tmp = tmp_path_factory.mktemp("zero3")
    config = f"{REPO / 'configs/tiny.yaml'},{demo_data.config_path}"
    cfg = load_config(config, _overrides(2))  # model.vocab_size from the tokenizer, as the trainer loads it
    steps = _cut_batches(demo_data, cfg)
    torch.save(steps, tmp / "batches.pt")
    two = _run_worker(2, config, tmp / "batches.pt", tmp / "two.pt")
    # the 1-rank run also recomputes blocks in backward: matching it checks activation checkpointing under ZeRO-3
    one = _run_worker(1, config, tmp / "batches.pt", tmp / "one.pt", "train.activation_checkpointing=true")
    return cfg, steps, one, two


def test_each_rank_holds_only_its_partition(zero3_results):
    _, _, _, two = zero3_results
    part = two["partition"]
    assert part["world"] == 2
    for shape, full, held, materialised in part["rows"]:
        assert full == math.prod(shape)
        assert held == math.ceil(full / 2), (shape, full, held)  # this rank's shard only
        assert materialised == 0, (shape, materialised)  # nothing gathered outside forward/backward
    assert part["held"] < 0.51 * part["total"]


def test_zero3_two_ranks_match_plain_pytorch_and_one_rank(zero3_results):
    cfg, steps, one, two = zero3_results
    init, ref_losses, ref_norms, ref_final, _ = _reference(cfg, steps)
    for n, p in init.items():  # zero.Init builds the very same weights from the seed
        assert torch.equal(two["init"][n], p), n
    assert two["losses"][:STEPS] == pytest.approx(ref_losses, rel=1e-5)
    assert one["losses"][:STEPS] == pytest.approx(two["losses"][:STEPS], rel=1e-5)
    # Adam and clipping hide a constant gradient scale; the pre-clip norm does not (e.g. a missed 1/accumulation)
    assert two["grad_norms"][:STEPS] == pytest.approx(ref_norms, rel=1e-5)
    assert one["grad_norms"][:STEPS] == pytest.approx(two["grad_norms"][:STEPS], rel=1e-5)
    d_ref = max(float((two["final"][n] - p).abs().max()) for n, p in ref_final.items())
    d_split = max(float((two["final"][n] - p).abs().max()) for n, p in one["final"].items())
    d_loss = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], ref_losses))
    print(f"max |param diff| 2 ranks vs plain PyTorch {d_ref:.2e}, 2 ranks vs 1 rank {d_split:.2e}; "
          f"max loss rel diff vs plain {d_loss:.2e}")
    for n, p in ref_final.items():
        assert not torch.equal(p, init[n]) or p.abs().sum() == 0, f"{n} did not train"
        torch.testing.assert_close(two["final"][n], p, rtol=0, atol=5e-5, msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(one["final"][n], two["final"][n], rtol=0, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_ema_of_zero3_partitions_matches_plain_pytorch_ema(zero3_results, tmp_path):
    """Each rank's EMA of its own partitions, written per rank and joined by pretrain.train.ema.load_full (what
    export writes), equals an EMA of the plain PyTorch loop's full weights; the NaN step did not move it."""
    from pretrain.train.ema import load_full

    cfg, steps, one, two = zero3_results
    _, _, _, ref_final, ref_ema = _reference(cfg, steps)
    for world, res in ((2, two), (1, one)):
        got = load_full(Path(res["out"] + ".ema"))
        assert set(got) == set(ref_ema), world
        for n, e in ref_ema.items():
            assert not torch.equal(e, ref_final[n]) or e.abs().sum() == 0, n  # the EMA lags the weights
            torch.testing.assert_close(got[n], e, rtol=0, atol=5e-5, msg=lambda m: f"{world} ranks, {n}: {m}")


def test_nan_step_is_skipped_on_every_rank(zero3_results):
    _, _, one, two = zero3_results
    for res in (one, two):
        assert not math.isfinite(res["losses"][STEPS])
        assert res["nan_step_applied"] is False and res["nan_step_unchanged"] is True
        assert res["skipped_steps"] == 1


def test_modality_experts_with_a_text_only_rank_match_plain_pytorch(demo_data, tmp_path):
    """model.modality_experts=true on 2 ranks: in step 0 rank 0's micro-batches hold no image, so its image
    experts run on zero rows. No hang (a skipped gather would stall the other rank until the 3-minute
    collective timeout), and losses, gradient norms and weights match the plain PyTorch loop as above."""
    from pretrain.config import load_config

    config = f"{REPO / 'configs/tiny.yaml'},{demo_data.config_path}"
    mot = "model.modality_experts=true"
    cfg = load_config(config, _overrides(2) + [mot])
    steps = _cut_batches(demo_data, cfg)
    assert not any(b["latents"].shape[0] for b in steps[0][:2]) and all(b["latents"].shape[0] for b in steps[0][2:])
    torch.save(steps, tmp_path / "batches.pt")
    two = _run_worker(2, config, tmp_path / "batches.pt", tmp_path / "two.pt", mot)
    init, ref_losses, ref_norms, ref_final, _ = _reference(cfg, steps)
    assert any(".image." in n for n in ref_final) and "image_norm.weight" in ref_final
    assert two["losses"][:STEPS] == pytest.approx(ref_losses, rel=1e-5)
    assert two["grad_norms"][:STEPS] == pytest.approx(ref_norms, rel=1e-5)
    for n, p in ref_final.items():
        assert torch.equal(two["init"][n], init[n]), n
        assert not torch.equal(p, init[n]) or p.abs().sum() == 0, f"{n} did not train"
        torch.testing.assert_close(two["final"][n], p, rtol=0, atol=5e-5, msg=lambda m: f"{n}: {m}")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(*sys.argv[2:])
