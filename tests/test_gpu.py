"""The GPU test group (`pytest -m gpu`, run by bench/gpu_session.sh on a GPU machine; skipped without CUDA)
and the step timer (CPU tests, run everywhere).

On CUDA: compiled FlexAttention equals dense SDPA in loss and every gradient on a packed Transfusion
batch; a bf16 step is finite and close to fp32; DeepSpeed's FusedAdam builds with nvcc and matches
torch.optim.AdamW; KV-cached greedy generation equals the uncached one; a training step (forward,
backward, fused AdamW, the trainer's event timer) makes no host sync; the event timer adds up to the
step's wall time. Tolerances are stated at each test with their reason.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from batches import random_batch
from contract.batch import TransfusionBatch
from contract.special_ids import SpecialIds
from pretrain.inference.generate import generate_text, packed_batch
from pretrain.model import ModelConfig, Transfusion
from pretrain.train.metrics import StepTimer

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA: bench/gpu_session.sh runs this group on a GPU machine")
SP = SpecialIds(vocab_size=97, bos_id=1, eos_id=2, boi_id=3, eoi_id=4, pad_id=0)


def cfg_of(**kw: object) -> ModelConfig:
    """A small model with head dim 64 (what the FlexAttention kernels are tuned for) and U-Net patching."""
    base = dict(dim=256, n_layers=2, n_heads=4, vocab_size=97, latent_size=8, patch_size=2,
                patch_encoder="unet", unet_channels=(16, 32), timestep_freq_dim=32, attention="sdpa")
    base.update(kw)
    return ModelConfig(**base)


def packed(cfg: ModelConfig, seed: int = 11) -> TransfusionBatch:
    """2 rows of 256 positions, each two documents holding two images between text, then padding; on CUDA."""
    return random_batch(cfg, 2, 256, seed=seed, images_per_row=2, docs_per_row=2).with_indices().to("cuda")


def built(cfg: ModelConfig, seed: int = 7) -> Transfusion:
    torch.manual_seed(seed)
    model = Transfusion(cfg)
    with torch.no_grad():  # the epsilon layer is zero-initialised: give it weights so every gradient flows
        for p in model.patch_decoder.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.02)
    return model.cuda()


# --- the step timer (CPU and CUDA) ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", StepTimer.MODES)
def test_step_timer_adds_wall_time_per_phase_and_resets(mode: str) -> None:
    """Both modes: a phase adds its wall time (here 20 ms of sleep; on CUDA the idle stream's event time),
    repeated phases add up (micro-batches), reset() clears; the breakdown keys are the phases run."""
    timer = StepTimer(mode)
    for _ in range(2):
        with timer.phase("forward"):
            time.sleep(0.02)
    with timer.phase("data"):
        pass
    t = timer.times
    assert set(t) == {"forward", "data"}
    assert 0.04 <= t["forward"] < 0.2 and 0 <= t["data"] < 0.01, t
    assert timer.total == pytest.approx(t["forward"] + t["data"])
    timer.reset()
    assert dict(timer.times) == {} and timer.total == 0


def test_step_timer_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="logging.timer='cuda'.*events, sync"):
        StepTimer("cuda")


def test_logging_timer_config_key_reaches_the_config_and_refuses_other_values() -> None:
    """logging.timer is events by default, sync on request; another value is refused when the config loads."""
    from pretrain.config import load_config

    assert load_config("configs/tiny.yaml", []).logging.timer == "events"
    assert StepTimer(load_config("configs/tiny.yaml", ["logging.timer=sync"]).logging.timer).mode == "sync"
    with pytest.raises(Exception, match="logging.timer"):
        load_config("configs/tiny.yaml", ["logging.timer=cuda"])


# --- the GPU group ---------------------------------------------------------------------------------------


@gpu
@needs_cuda
def test_compiled_flex_attention_equals_dense_sdpa_on_cuda() -> None:
    """Same weights, same packed batch (text, two images, two documents per row), fp32 on CUDA: compiled
    FlexAttention with the Transfusion block mask vs SDPA with the dense boolean mask. Loss and every
    gradient within atol 1e-4 / rtol 1e-3 (fp32 kernels summing in different orders over 256 positions;
    TF32 off for matmuls, PyTorch's default)."""
    results = []
    for attention in ("sdpa", "flex"):
        model = built(cfg_of(attention=attention))
        out = model(packed(model.cfg))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-3)
    assert len(g1) == len(g2) and sum(float(g.norm()) for g in g1.values()) > 0
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-4, rtol=1e-3, msg=f"gradient of {name}")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


@gpu
@needs_cuda
@pytest.mark.parametrize("attention", ["flex", "sdpa"])
def test_bf16_training_step_is_finite_and_close_to_fp32(attention: str) -> None:
    """The trainer's bf16 (weights, activations and inputs in bf16, as DeepSpeed bf16 runs the module) vs
    fp32 from the same weights: loss within 2% (bf16 keeps 8 bits of mantissa: about 0.4% per rounding),
    each weight matrix's gradient with cosine similarity > 0.98 to fp32's, and three AdamW steps stay finite."""
    model32 = built(cfg_of(attention=attention))
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    batch = packed(model32.cfg)
    b16 = TransfusionBatch(**{**batch.__dict__, "latents": batch.latents.bfloat16(), "noise": batch.noise.bfloat16()})
    o32, o16 = model32(batch), model16(b16)
    o32.loss.backward()
    o16.loss.backward()
    assert torch.isfinite(o16.loss) and all(p.dtype == torch.bfloat16 for p in model16.parameters())
    assert abs(float(o16.loss) - float(o32.loss)) <= 0.02 * abs(float(o32.loss)), (float(o16.loss), float(o32.loss))
    p32 = dict(model32.named_parameters())
    for name, p in model16.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if p.ndim >= 2 and p32[name].grad.norm() > 1e-6:
            assert _cos(p.grad, p32[name].grad) > 0.98, (name, _cos(p.grad, p32[name].grad))
    opt = torch.optim.AdamW(model16.parameters(), lr=1e-3, fused=True)
    for _ in range(3):
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = model16(b16).loss
        loss.backward()
        assert torch.isfinite(loss)


@gpu
@needs_cuda
def test_deepspeed_fused_adam_builds_with_nvcc_and_matches_torch_adamw() -> None:
    """DeepSpeed's FusedAdam (JIT-built by nvcc on first use) in AdamW mode vs torch.optim.AdamW, fp32,
    five steps of the same random gradients on a 1000 x 33 and a 7-element parameter: equal within
    atol 1e-6 / rtol 1e-5 (same formula, fused vs foreach arithmetic order)."""
    from deepspeed.ops.adam import FusedAdam

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1000, 33), (7,)]
    ref = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, foreach=False, **kw)
    opt = FusedAdam(ours, adam_w_mode=True, **kw)
    for _ in range(5):
        for a, b in zip(ref, ours):
            grad = torch.randn(a.shape, device="cuda", generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, ours):
        assert not torch.equal(a, a.new_zeros(a.shape))
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def _greedy_uncached(model: Transfusion, row: list[int], n: int) -> list[int]:
    """Reference: greedy decoding with one full forward over the whole sequence per token, on the model's device."""
    dev = next(model.parameters()).device
    x0 = torch.zeros(1, 8, 8, 8, device=dev)
    out: list[int] = []
    for _ in range(n):
        batch = packed_batch(model, [row + out], x0[:0], torch.zeros(0, dtype=torch.long, device=dev), SP.pad_id)
        with torch.no_grad():
            h, _ = model.hidden_and_sampler_input(batch, x0, torch.zeros(1, dtype=torch.long, device=dev))
        tok = int(model.lm_logits(h[len(row) + len(out) - 1]).argmax())
        if tok == SP.eos_id:
            break
        out.append(tok)
    return out


@gpu
@needs_cuda
@pytest.mark.parametrize("attention", ["flex", "sdpa"])
def test_kv_cached_generation_equals_uncached_on_cuda(attention: str) -> None:
    """Batched prompts of different lengths (fp32 on CUDA): the KV-cached greedy continuation has exactly the
    token ids of decoding with a full forward per token (tests/test_kv_cache.py checks the same on CPU)."""
    model = built(cfg_of(attention=attention, dim=64, unet_channels=(16, 32))).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11], []]
    got = generate_text(model, prompts, SP, max_new_tokens=8)
    assert any(got)
    for p, ids in zip(prompts, got):
        assert ids == _greedy_uncached(model, [SP.bos_id, *p], 8), (p, ids)


@gpu
@needs_cuda
@pytest.mark.parametrize("attention", ["flex", "sdpa"])
def test_training_step_makes_no_host_sync(attention: str) -> None:
    """After two warm-up steps (compilation), a step of forward, backward and fused AdamW, timed by the
    trainer's event timer, runs under torch.cuda.set_sync_debug_mode('error'): any host sync (.item(),
    nonzero, a device-to-host copy, a blocking wait) raises. Then the timer's one wait reads phase times
    that add up to the step: between 50% and 105% of its wall time (the host queues ahead of the GPU)."""
    model = built(cfg_of(attention=attention))
    batch = packed(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    timer = StepTimer("events")

    def step() -> None:
        with timer.phase("forward"):
            out = model(batch)
        with timer.phase("backward"):
            out.loss.backward()
        with timer.phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    timer.reset()
    t0 = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    times = dict(timer.times)  # the one wait
    wall = time.perf_counter() - t0
    assert set(times) == {"forward", "backward", "optimizer"}
    assert 0.5 * wall <= sum(times.values()) <= 1.05 * wall + 1e-3, (times, wall)
