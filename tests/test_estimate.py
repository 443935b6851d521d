"""pretrain.plan.estimate against independent references: DeepSpeed's own ZeRO-3 estimator and FLOPs
counted by hand for the 0.16B and 7B configs, and a U-Net whose convolutions are counted by hand."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ModelConfig, load_config
from pretrain.plan.estimate import (
    DocMix,
    count_parameters,
    default_mix,
    flops_breakdown,
    host_memory_plan,
    make_plan,
    mix_of_batch,
    model_state_bytes,
    patching_cost,
)
from pretrain.plan.hardware import GPUS, detect_gpu

ROOT = Path(__file__).resolve().parents[1]


def _linear(name: str):
    return load_config(ROOT / f"configs/transfusion_{name}.yaml", ["model.patch_encoder=linear"])


def test_model_states_equal_deepspeed_estimator() -> None:
    """18 bytes/param partitioned + 4 x largest layer, exactly DeepSpeed's numbers, for 3 offload settings."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

    c = count_parameters(load_config(ROOT / "configs/transfusion_7b.yaml").model)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero3_model_states_mem_needs_all_cold(c["total"], c["largest_layer"], num_gpus_per_node=8,
                                                       num_nodes=16)
    printed = buf.getvalue()
    for off_opt, off_par in ((False, False), (True, False), (True, True)):
        ours = model_state_bytes(c["total"], c["largest_layer"], 8, 16, 3, off_opt, off_par)
        gpu = sum(v for k, v in ours.items() if k != "cpu_per_node")
        cpu_ds, gpu_ds, _ = estimate_zero3_model_states_mem_needs(
            c["total"], c["largest_layer"], 8, 16, cpu_offload=off_opt, cpu_offload_params=off_par, zero_init=True)
        assert int(gpu) == gpu_ds and int(ours["cpu_per_node"]) == cpu_ds
        line = next(ln for ln in printed.splitlines() if ln.endswith("zero_init=1")
                    and ("offload_param=none" in ln) != off_par and ("offload_optimizer=none" in ln) != off_opt)
        assert line.split("|")[1].strip() == f"{gpu / 2**30:.2f}GB", (line, gpu)
        assert line.split("|")[0].strip() == f"{ours['cpu_per_node'] / 2**30:.2f}GB", (line, ours)


def test_deepspeed_zero_defaults_are_the_installed_deepspeeds() -> None:
    """The defaults the planners assume for unset ZeRO knobs are DeepSpeed's own (DeepSpeedZeroConfig)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pretrain.plan.batch import DEEPSPEED_ZERO_DEFAULTS, zero_setting

    theirs = DeepSpeedZeroConfig()
    by_key = {(f.alias or name): getattr(theirs, name) for name, f in DeepSpeedZeroConfig.model_fields.items()}
    assert {k: by_key[k] for k in DEEPSPEED_ZERO_DEFAULTS} == DEEPSPEED_ZERO_DEFAULTS
    assert zero_setting({"reduce_bucket_size": 7}, "reduce_bucket_size") == 7


def test_flops_of_paper_configs_by_hand() -> None:
    """0.16B and 7B (linear patching, default mix) against FLOPs written out by hand."""
    # default mix, seq 4096, P = 256: caption+image documents of 30 + 4 + 256 = 290 positions,
    # 14 per image sequence (4060 positions) + 36 padding; 14 x 256 = 3584 patches per image sequence;
    # image sequences r = 0.5 * 4096 / 3584 = 0.5714..., text sequences one 4096-token document.
    r = 0.5 * 4096 / 3584
    images = r * 14
    text_targets = r * 14 * 34 + (1 - r) * 4096
    pairs = r * (14 * 290 * 291 / 2 + 36 * 37 / 2) + (1 - r) * 4096 * 4097 / 2 + images * 256 * 255 / 2
    for name, L, d, hidden in (("0.16b", 16, 768, 2048), ("7b", 32, 4096, 11008)):
        cfg = _linear(name).model
        per_layer = d * 3 * d + d * d + d * 2 * hidden + hidden * d + 2 * d  # wqkv, wo, w13, w2, 2 norms
        backbone = L * per_layer + d
        head = d * 32000
        # per image: patch in (32 -> d) and out (d -> 32) per patch, timestep MLP 256 -> d -> d
        patch_fwd = 256 * (2 * 32 * d + 2 * d * 32) + 2 * 256 * d + 2 * d * d
        expected = (6 * backbone + 6 * head * text_targets / 4096 + 3 * patch_fwd * images / 4096
                    + 12 * L * d * pairs / 4096)
        f = flops_breakdown(cfg, default_mix(4096, 256))
        assert f.total == pytest.approx(expected, rel=1e-12), name
        assert f.attention < f.attention_dense / 3  # masked attention is well under the dense convention
    # the totals, rounded, as the docs quote them
    assert flops_breakdown(_linear("7b").model, default_mix(4096, 256)).total / 1e9 == pytest.approx(40.86, abs=0.01)


def test_unet_patching_flops_by_hand() -> None:
    """A tiny U-Net (channels 8/16, one res block per level, 4x4 latent, 2x2 patches), conv by conv."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, latent_channels=8,
                      latent_size=4, patch_size=2, patch_encoder="unet", unet_channels=(8, 16), unet_res_blocks=1)

    def conv(cin: int, cout: int, k: int, hw: int) -> int:  # 2 x MACs at the output resolution
        return 2 * cin * cout * k * k * hw

    temb = 2 * 256 * 16 + 2 * 16 * 16  # timestep MLP (width = last channel count 16)
    enc = (temb + conv(8, 8, 3, 16)  # conv_in
           + conv(8, 8, 3, 16) + 2 * 16 * 8 + conv(8, 8, 3, 16)  # res block 8->8 at 4x4
           + conv(8, 8, 3, 4)  # stride-2 down to 2x2
           + conv(8, 16, 3, 4) + 2 * 16 * 16 + conv(16, 16, 3, 4) + conv(8, 16, 1, 4)  # res block 8->16
           + conv(16, 32, 1, 4))  # proj_out to width 32
    dec = (conv(32, 16, 1, 4)  # proj_in
           + conv(32, 16, 3, 4) + 2 * 16 * 16 + conv(16, 16, 3, 4) + conv(32, 16, 1, 4)  # res block (16+16)->16
           + conv(16, 8, 3, 16)  # up: nearest x2, conv 16->8 at 4x4
           + conv(16, 8, 3, 16) + 2 * 16 * 8 + conv(8, 8, 3, 16) + conv(16, 8, 1, 16)  # res block (8+8)->8
           + conv(8, 8, 3, 16))  # conv_out
    fwd, act = patching_cost(cfg)
    assert fwd == enc + dec
    assert act > 0


def test_mix_of_batch_counts_documents_and_images() -> None:
    from batches import random_batch

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, latent_size=4, patch_size=2)
    b = random_batch(cfg, batch_size=3, seq_len=64, seed=0)
    mix = mix_of_batch(b)
    B, L = b.tokens.shape
    pairs = 0
    for row in b.doc_ids.tolist():  # run lengths by hand
        runs, prev = [], None
        for x in row:
            if x == prev:
                runs[-1] += 1
            else:
                runs.append(1)
            prev = x
        pairs += sum(n * (n + 1) // 2 for n in runs)
    assert mix.causal_pairs == pairs / B and mix.images == b.num_images / B


def test_plan_verdict_and_activation_checkpointing() -> None:
    cfg = load_config(ROOT / "configs/transfusion_7b.yaml")
    ok = make_plan(cfg, 16, 8, GPUS["h100-80gb"])
    assert ok.fits and ok.checkpointing
    assert sum(ok.activations_other.values()) > 5 * sum(ok.activations.values())  # no ckpt: all layers saved
    big = load_config(ROOT / "configs/transfusion_7b.yaml", ["train.micro_batch_size=16",
                                                             "train.activation_checkpointing=false"])
    assert not make_plan(big, 16, 8, GPUS["h100-80gb"]).fits
    assert make_plan(cfg, 16, 8, GPUS["a100-40gb"]).gpu.memory_bytes < ok.gpu.memory_bytes


def test_gpu_table_lookup() -> None:
    assert detect_gpu("NVIDIA H100 80GB HBM3").key == "h100-80gb"
    assert detect_gpu("NVIDIA GH200 480GB").key == "gh200"
    assert detect_gpu("NVIDIA H200").key == "h200"
    assert detect_gpu("NVIDIA A100-SXM4-40GB").key == "a100-40gb"
    assert detect_gpu("NVIDIA A100-SXM4-80GB").key == "a100-80gb"
    assert detect_gpu("Some CPU") is None


def test_estimate_cli_prints_plan() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pretrain.plan.estimate", "--config", str(ROOT / "configs/transfusion_7b.yaml"),
         "--nodes", "16", "--gpus-per-node", "8", "--gpu", "h100-80gb"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    for needle in ("parameters: ", "training FLOPs per position", "verdict: FITS", "days"):
        assert needle in out, needle


def test_docmix_attention_pairs() -> None:
    m = DocMix(seq_len=10, images=1.0, text_targets=2.0, causal_pairs=55.0, source="x")
    assert m.attention_pairs(4) == 55 + 6


def test_host_memory_plan_terms_by_hand() -> None:
    """CPU ZeRO-3 rank: 16 bytes per parameter over the world, the DeepSpeed knobs as configured, the fp32 LM
    head at its backward peak; another ZeRO stage is refused. (bench/scale_016b.py compares it with RSS.)"""
    cfg = _linear("0.16b")
    n = count_parameters(cfg.model)["total"]
    zero = {"stage": 3, "reduce_bucket_size": 1000, "stage3_max_live_parameters": 10**7, "stage3_max_reuse_distance": 0}
    mix = DocMix(seq_len=4096, images=2, text_targets=3000, causal_pairs=5e6, source="by hand")
    t = host_memory_plan(cfg, mix, 4, {"zero_optimization": zero}, baseline_bytes=1e9).terms
    assert t["model states (fp32 params + grads + Adam m, v) / world"] == 16 * n / 4
    assert t["deepspeed / reduce bucket"] == 4000
    assert t["deepspeed / gathered parameters (live + reuse distance)"] == 4 * 10**7
    assert cfg.train.micro_batch_size == 2 and t["activations / lm_head"] == 16 * cfg.model.vocab_size * 3000 * 2
    assert t["runtime (python, torch, deepspeed, compiled kernels; measured)"] == 1e9
    with pytest.raises(ValueError, match="ZeRO-3 only"):
        host_memory_plan(cfg, mix, 4, {"zero_optimization": {"stage": 2}}, baseline_bytes=0)
