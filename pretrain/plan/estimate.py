"""Plan a run before the queue: exact parameters, training FLOPs, per-GPU memory, time to a budget.

    python -m pretrain.plan.estimate --config configs/transfusion_7b.yaml --nodes 16 --gpus-per-node 8 \\
        --gpu h100-80gb [--mfu 0.35,0.45] [--positions 2e12] [key.sub=value ...]

Everything runs on the meta device (no weights are allocated), in seconds even for 7B:

- parameters: counted on the model built on the meta device, by part;
- FLOPs per position (training = forward + backward = 3x forward): 6 x the matmul weights every
  position passes through (under model.modality_experts one expert's: Mixture-of-Transformers
  doubles the backbone's parameters, not its FLOPs per position), the LM head only at positions with a next-token
  target,
  the patch
  encoder/decoder per image (counted by torch's FlopCounterMode, so U-Net convolutions are exact),
  and attention per document under the Transfusion mask: 12 x layers x dim FLOPs per allowed
  (query, key) pair (QK^T and AV, 2 x dim each forward), pairs = causal pairs of each document +
  the bidirectional pairs inside each image. PaLM's dense convention (12 x layers x dim x seq_len
  per position) would count every pair of the sequence;
- memory per GPU under the ZeRO stage: model states as DeepSpeed's
  `estimate_zero3_model_states_mem_needs` counts them (18 bytes per parameter, partitioned,
  + 4 bytes x the largest layer gathered), its buffers, and activations (see `activation_bytes`).

The document mix (how many images, text targets and causal pairs a sequence holds) comes from the
shards' pack.json files when the config's streams point at them, else from `default_mix`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from contract.positions import pair_positions
from pretrain.config import Config, load_config
from pretrain.configlib import ConfigError
from pretrain.plan.batch import weight_bytes, zero_setting
from pretrain.plan.hardware import GIB, GPUS, Gpu
from pretrain.model import ModelConfig, Transfusion, TransfusionBatch
from pretrain.model.patching import build_patching

#: positions of the paper's longest run (2T positions: 1T text tokens + 3.5B images)
PAPER_POSITIONS = 2e12
#: caption length (tokens) of an image-caption document in the default mix
DEFAULT_CAPTION_TOKENS = 30
#: CUDA context, NCCL communicators and allocator slack per GPU (typical; measure on your cluster)
RUNTIME_OVERHEAD_BYTES = 2 * GIB
#: what to change when a plan does not fit a GPU's memory (the estimate's verdict and the dry run's problem)
DOES_NOT_FIT_ADVICE = ("lower train.micro_batch_size, set train.activation_checkpointing=true, or offload "
                       "(distributed.offload_optimizer=true)")


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part: total, embedding, backbone (both experts under model.modality_experts),
    image_experts (the image expert's blocks and final norm; 0 for a dense model), lm_head,
    patch_encoder, patch_decoder, and `largest_layer` (the most parameters held directly by one
    module, as DeepSpeed counts it)."""
    with torch.device("meta"):
        model = Transfusion(cfg)

    def n(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    image = sum(n(b.image) for b in model.layers) + n(model.image_norm) if cfg.modality_experts else 0
    return {
        "total": n(model),
        "embedding": n(model.tok_embeddings),
        "backbone": n(model.layers) + n(model.norm) + (n(model.image_norm) if cfg.modality_experts else 0),
        "image_experts": image,
        "lm_head": n(model.output),
        "patch_encoder": n(model.patch_encoder),
        "patch_decoder": n(model.patch_decoder),
        "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
    }


# ----------------------------------------------------------------------------- the document mix


@dataclass(frozen=True)
class DocMix:
    """What one packed sequence of `seq_len` positions holds on average."""

    seq_len: int
    images: float  # images per sequence
    text_targets: float  # positions with a next-token target (non-patch real positions)
    causal_pairs: float  # sum over its documents (and padding) of n(n+1)/2
    source: str  # where these numbers come from

    def attention_pairs(self, patches_per_image: int) -> float:
        """Allowed (query, key) pairs per sequence: causal pairs + the bidirectional ones inside images."""
        P = patches_per_image
        return self.causal_pairs + self.images * P * (P - 1) / 2


def default_mix(seq_len: int, patches_per_image: int, image_share: float = 0.5,
                caption_tokens: int = DEFAULT_CAPTION_TOKENS) -> DocMix:
    """The paper's 1:1 text:image positions, stated: text sequences are one document filling the
    sequence (the attention upper bound for text); image sequences hold as many whole
    caption+image documents (caption + BOS/EOS + BOI + P + EOI positions) as fit, rest padding."""
    P, S = patches_per_image, seq_len
    doc = pair_positions(P, caption_tokens)
    k = S // doc  # image documents per image sequence
    pad = S - k * doc
    r = min(1.0, image_share * S / (k * P))  # share of sequences that are image sequences
    return DocMix(
        seq_len=S,
        images=r * k,
        text_targets=r * k * (caption_tokens + 4) + (1 - r) * S,
        causal_pairs=r * (k * doc * (doc + 1) / 2 + pad * (pad + 1) / 2) + (1 - r) * S * (S + 1) / 2,
        source=f"default: {image_share:.0%} image positions, text documents of {S} tokens, "
               f"captions of {caption_tokens} tokens",
    )


def mix_from_pack(cfg: Config) -> DocMix | None:
    """The mix of the config's train streams from their pack.json files (None if one is unreadable,
    predates the `causal_pairs` field or was packed for another seq_len); streams are weighted as
    the loader weights them."""
    from data_pipeline.loader import pack_info, mix_proportions
    from data_pipeline.storage import StorageError

    streams = cfg.data.streams
    if not streams:
        return None
    stats = []
    for sc in streams:
        try:
            st = pack_info(sc.remote or sc.local) if (sc.remote or sc.local) else None
        except StorageError:
            return None  # an unreadable remote (the dry run reports it)
        if st is None:
            return None
        if "causal_pairs" not in st or not st.get("rows") or st.get("seq_len") != cfg.data.seq_len:
            return None  # an older pack.json, or packed for another seq_len (the dry run reports that)
        stats.append(st)
    try:
        props = mix_proportions(streams, cfg.data.image_position_share)
    except ValueError:
        return None
    w = [p if p is not None else st["rows"] for p, st in zip(props, stats)]
    w = [x / sum(w) for x in w]
    per_row = lambda key: sum(wi * st[key] / st["rows"] for wi, st in zip(w, stats))  # noqa: E731
    return DocMix(
        seq_len=cfg.data.seq_len,
        images=per_row("images"),
        text_targets=per_row("real_positions") - per_row("image_positions"),
        causal_pairs=per_row("causal_pairs"),
        source="pack.json of " + ", ".join(sc.remote or sc.local for sc in streams),
    )


def mix_of_batch(batch: TransfusionBatch) -> DocMix:
    """The exact mix of a concrete batch (documents are runs of equal doc_ids)."""
    B, L = batch.tokens.shape
    pairs = 0
    for row in batch.doc_ids:  # (L,)
        _, n = torch.unique_consecutive(row, return_counts=True)
        pairs += int((n * (n + 1) // 2).sum())
    return DocMix(L, batch.num_images / B, batch.num_text_targets / B, pairs / B, "the batch itself")


def mix_for(cfg: Config) -> DocMix:
    """pack.json's mix when the shards are here, else the default mix."""
    return mix_from_pack(cfg) or default_mix(cfg.data.seq_len, cfg.model.patches_per_image,
                                             cfg.data.image_position_share or 0.5)


# ----------------------------------------------------------------------------- FLOPs


def patching_cost(cfg: ModelConfig) -> tuple[float, float]:
    """(forward FLOPs, saved-activation elements) of the patch encoder + decoder for ONE image.

    Measured on the meta device: FLOPs by torch's FlopCounterMode (matmuls and convolutions), the
    activations as the distinct tensors autograd saves for backward, parameters excluded.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        enc, dec = build_patching(cfg)
    params = {p.untyped_storage()._cdata for m in (enc, dec) for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sid = t.untyped_storage()._cdata
        if sid not in params and t.is_floating_point():
            saved[sid] = max(saved.get(sid, 0), t.untyped_storage().nbytes() // t.element_size())
        return t

    C, S = cfg.latent_channels, cfg.latent_size
    x = torch.empty(1, C, S, S, device="meta")  # (1, C, H, W)
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h, ctx = enc(x, t)  # (1, P, D)
        dec(h, t, ctx)  # (1, C, H, W)
    return float(fc.get_total_flops()), float(sum(saved.values()))


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per position, by part (forward + backward)."""

    weights: float  # 6 x the backbone parameters one position runs (one expert under model.modality_experts)
    lm_head: float  # 6 x dim x vocab x (text targets / seq_len)
    patching: float  # 3 x patch encoder+decoder forward FLOPs x (images / seq_len)
    attention: float  # 12 x layers x dim x (allowed pairs / seq_len)
    attention_dense: float  # PaLM's convention, for comparison: 12 x layers x dim x seq_len

    @property
    def total(self) -> float:
        return self.weights + self.lm_head + self.patching + self.attention


def flops_breakdown(cfg: ModelConfig, mix: DocMix, counts: dict[str, int] | None = None,
                    patch_fwd_flops: float | None = None) -> Flops:
    """Training FLOPs per position of `cfg` over sequences like `mix` (see module docstring)."""
    counts = counts or count_parameters(cfg)
    if patch_fwd_flops is None:
        patch_fwd_flops = patching_cost(cfg)[0]
    S = mix.seq_len
    per_pair = 12.0 * cfg.n_layers * cfg.dim
    return Flops(
        weights=6.0 * (counts["backbone"] - counts.get("image_experts", 0)),  # each position runs one expert
        lm_head=6.0 * counts["lm_head"] * mix.text_targets / S,
        patching=3.0 * patch_fwd_flops * mix.images / S,
        attention=per_pair * mix.attention_pairs(cfg.patches_per_image) / S,
        attention_dense=per_pair * S,
    )


def flops_per_position(cfg: ModelConfig, seq_len: int, mix: DocMix | None = None) -> float:
    """Training FLOPs per position (what the trainer's MFU uses); `mix` defaults to `default_mix`."""
    mix = mix or default_mix(seq_len, cfg.patches_per_image)
    if mix.seq_len != seq_len:
        raise ValueError(f"the document mix is for seq_len={mix.seq_len}, not {seq_len}")
    return flops_breakdown(cfg, mix).total


# ----------------------------------------------------------------------------- memory


def model_state_bytes(total: int, largest_layer: int, gpus_per_node: int, nodes: int, zero_stage: int,
                      offload_optimizer: bool, offload_params: bool) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients and optimizer states, and per-node CPU bytes.

    Mixed precision with AdamW: 2 bytes bf16 parameter, 4 bytes gradient (bf16 + the fp32 partition
    the optimizer reads), 12 bytes fp32 master + Adam m + v: 18 bytes per parameter, the figure of
    DeepSpeed's `estimate_zero3_model_states_mem_needs`; ZeRO-3 adds the largest layer gathered
    (4 bytes per parameter). ZeRO-1 partitions the optimizer states, ZeRO-2 also the gradients.
    CPU bytes follow DeepSpeed's formula (x1.5 buffer factor, per node).
    """
    n = gpus_per_node * nodes
    part = {0: (1, 1, 1), 1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}[zero_stage]
    gathered = 4 * largest_layer if zero_stage == 3 else 0
    params, grads, optim = 2 * total / part[0], 4 * total / part[1], 12 * total / part[2]
    cpu = 0.0
    if offload_optimizer:
        cpu = (16 + (2 if offload_params else 0)) * total / nodes * 1.5
        grads, optim = 0.0, 0.0
        if offload_params:
            params = 0.0
    elif zero_stage == 3:
        cpu = largest_layer * 4 * gpus_per_node * 1.5  # zero.Init: DeepSpeed's figure
    return {"parameters": params, "gradients": grads, "optimizer": optim, "gathered_layer": gathered,
            "cpu_per_node": cpu}


def deepspeed_buffer_bytes(ds_zero: dict[str, Any], total: int, bytes_per_el: int) -> dict[str, float]:
    """ZeRO-3 communication buffers at the derived DeepSpeed config (DeepSpeed's defaults otherwise):
    the gradient reduce bucket, the parameter prefetch bucket, and up to `stage3_max_live_parameters`
    gathered parameters (an upper bound: DeepSpeed releases them as it goes)."""
    reduce = {"reduce_bucket": float(bytes_per_el * zero_setting(ds_zero, "reduce_bucket_size"))}
    if ds_zero.get("stage", 0) != 3:
        return reduce
    return {
        **reduce,
        "prefetch_bucket": float(bytes_per_el * zero_setting(ds_zero, "stage3_prefetch_bucket_size")),
        "live_parameters": float(bytes_per_el * min(total, zero_setting(ds_zero, "stage3_max_live_parameters"))),
    }


def layer_activation_elements(cfg: ModelConfig) -> int:
    """Elements one transformer block saves for backward per position (FlexAttention, no mask matrix).

    Attention: norm input, norm output (wqkv input), q, k, v, attention output, wo input (7 x dim);
    feed-forward: norm input and output (2 x dim), w13 output (2 x hidden), silu(gate), gate x up
    (2 x hidden). In the spirit of Korthikanti et al. 2022 (34·s·b·h bytes for GPT blocks).
    """
    return 9 * cfg.dim + 4 * cfg.hidden_dim


def activation_bytes(cfg: ModelConfig, mix: DocMix, micro_batch: int, checkpointing: bool, bytes_per_el: int,
                     patch_act_elements: float | None = None) -> dict[str, float]:
    """Activation bytes per GPU for one micro-batch: blocks (all saved, or only block inputs plus one
    block recomputed under checkpointing), embedding/final norm, the LM head (bf16 logits, fp32 copy,
    fp32 log-softmax: 2 + 4 + 4 bytes x vocab per text target) and the patch encoder/decoder."""
    if patch_act_elements is None:
        patch_act_elements = patching_cost(cfg)[1]
    positions = micro_batch * mix.seq_len
    block = layer_activation_elements(cfg) * positions * bytes_per_el
    blocks = (cfg.n_layers * cfg.dim * positions * bytes_per_el + block) if checkpointing else cfg.n_layers * block
    return {
        "blocks": float(blocks),
        "embedding_norm": float(3 * cfg.dim * positions * bytes_per_el),
        "lm_head": float(10 * cfg.vocab_size * mix.text_targets * micro_batch),
        "patching": float(patch_act_elements * mix.images * micro_batch * bytes_per_el),
    }


@dataclass
class Plan:
    """Everything the estimate prints; `fits` is the verdict for one GPU."""

    counts: dict[str, int]
    mix: DocMix
    flops: Flops
    gpu: Gpu
    world_size: int
    model_states: dict[str, float]
    buffers: dict[str, float]
    activations: dict[str, float]
    activations_other: dict[str, float]  # the same micro-batch with checkpointing toggled
    checkpointing: bool
    micro_batch: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu_bytes(self) -> float:
        states = sum(v for k, v in self.model_states.items() if k != "cpu_per_node")
        return states + sum(self.buffers.values()) + sum(self.activations.values()) + RUNTIME_OVERHEAD_BYTES

    @property
    def fits(self) -> bool:
        return self.gpu_bytes <= self.gpu.memory_bytes


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, gpu: Gpu, ds_config: dict[str, Any] | None = None,
              mix: DocMix | None = None) -> Plan:
    """The full plan of `cfg` on nodes x gpus_per_node GPUs of kind `gpu` (ds_config: the derived one)."""
    m, d = cfg.model, cfg.distributed
    counts = count_parameters(m)
    mix = mix or mix_for(cfg)
    patch_flops, patch_act = patching_cost(m)
    el = weight_bytes(cfg)
    zero = (ds_config or {}).get("zero_optimization", {"stage": d.zero_stage})
    states = model_state_bytes(counts["total"], counts["largest_layer"], gpus_per_node, nodes, d.zero_stage,
                               d.offload_optimizer, d.offload_params)
    mb, ck = cfg.train.micro_batch_size, cfg.train.activation_checkpointing
    return Plan(
        counts=counts, mix=mix, flops=flops_breakdown(m, mix, counts, patch_flops), gpu=gpu,
        world_size=nodes * gpus_per_node, model_states=states,
        buffers=deepspeed_buffer_bytes(zero, counts["total"], el),
        activations=activation_bytes(m, mix, mb, ck, el, patch_act),
        activations_other=activation_bytes(m, mix, mb, not ck, el, patch_act),
        checkpointing=ck, micro_batch=mb,
    )


def persistent_parameters(cfg: ModelConfig, threshold: int) -> int:
    """Elements of the parameters ZeRO-3 keeps whole on every rank once gathered: those with at most
    `threshold` elements (DeepSpeed's stage3_param_persistence_threshold, default 1e5)."""
    with torch.device("meta"):
        model = Transfusion(cfg)
    return sum(p.numel() for p in model.parameters() if p.numel() <= threshold)


@dataclass
class HostPlan:
    """Predicted peak resident memory (bytes) of one CPU rank, by term; `counts` as count_parameters."""

    counts: dict[str, int]
    terms: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def host_memory_plan(cfg: Config, mix: DocMix, world_size: int, ds_config: dict[str, Any],
                     baseline_bytes: float) -> HostPlan:
    """Peak RSS of one rank training on CPU in fp32 under ZeRO-3 (DeepSpeedCPUAdam), term by term.

    - runtime: `baseline_bytes`, measured by the caller (a process that imports the trainer, DeepSpeed's
      CPU Adam and streaming and runs one tiny compiled FlexAttention step);
    - model states, 16 bytes per parameter / world: the fp32 parameter partition (4), the fp32 gradient
      partition buffer (4; stage3.py `grad_partitions_flat_buffer`) and Adam's m and v (8). The fp32
      master copy is the parameter partition itself when both are fp32 on the same device (stage3.py
      `_create_fp32_partitions`), so no second 4 bytes;
    - persistent parameters: those under `stage3_param_persistence_threshold` stay gathered (4 bytes x
      elements x (1 - 1/world) beyond their partition);
    - the gradient reduce bucket: `reduce_bucket_size` fp32 elements (stage3.py allocates it whole; the
      pages a step touches are at most the model's gradients);
    - gathered parameters, 4 bytes x min(parameters, `stage3_max_live_parameters` +
      `stage3_max_reuse_distance`): once the first step has traced the module order, ZeRO-3 keeps a
      gathered parameter that is used again within `stage3_max_reuse_distance` elements
      (partitioned_param_coordinator.py `__params_to_release`; with checkpointing every block is used
      again in its recompute) and prefetches up to `stage3_max_live_parameters`;
    - activations of one micro-batch in fp32 (`activation_bytes`) with the LM head at its backward peak:
      16 bytes x vocab per text target (fp32 logits, log-softmax, and both their gradients; measured with
      Linear + F.cross_entropy at 3584 x 32003: peak 4.0 x the logits' bytes) instead of the forward's;
      plus the CPU attention backward's dense mask (micro-batch x seq_len^2 booleans,
      pretrain/model/backbone.py `_dense_from_block_mask`).
    Raises ValueError for a ZeRO stage other than 3.
    """
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(f"host_memory_plan models ZeRO-3 only, got stage {zero.get('stage')}")
    m, mb = cfg.model, cfg.train.micro_batch_size
    counts = count_parameters(m)
    n = counts["total"]
    persist = persistent_parameters(m, zero_setting(zero, "stage3_param_persistence_threshold"))
    acts = activation_bytes(m, mix, mb, cfg.train.activation_checkpointing, 4)
    acts["lm_head"] = 16.0 * m.vocab_size * mix.text_targets * mb
    live = zero_setting(zero, "stage3_max_live_parameters") + zero_setting(zero, "stage3_max_reuse_distance")
    terms = {
        "runtime (python, torch, deepspeed, compiled kernels; measured)": float(baseline_bytes),
        "model states (fp32 params + grads + Adam m, v) / world": 16.0 * n / world_size,
        "persistent parameters (gathered whole)": 4.0 * persist * (1 - 1 / world_size),
        "deepspeed / reduce bucket": 4.0 * min(zero_setting(zero, "reduce_bucket_size"), n),
        "deepspeed / gathered parameters (live + reuse distance)": 4.0 * min(live, n),
        **{f"activations / {k}": v for k, v in acts.items()},
        "activations / dense attention mask (CPU backward)": float(mb * mix.seq_len**2),
    }
    return HostPlan(counts, terms)


# ----------------------------------------------------------------------------- report


def _row(label: str, nbytes: float) -> str:
    return f"  {label:42s}{nbytes / GIB:8.2f} GiB"


def format_plan(plan: Plan, cfg: Config, mfus: list[float], positions: float) -> str:
    """The human-readable plan (what the CLI and the dry run print)."""
    c, f, mix, g = plan.counts, plan.flops, plan.mix, plan.gpu
    out = [f"parameters: {c['total']}"]
    out += [f"  {k:14s} {v:>15,d}  ({v / c['total']:.2%}){'  of the backbone' if k == 'image_experts' else ''}"
            for k, v in c.items() if k not in ("total", "largest_layer") and (v or k != "image_experts")]
    out.append(f"  {'largest_layer':14s} {c['largest_layer']:>15,d}  (one module's own parameters)")
    P = cfg.model.patches_per_image
    out += [
        f"document mix ({mix.source}):",
        f"  per sequence of {mix.seq_len}: {mix.images:.2f} images ({mix.images * P / mix.seq_len:.1%} of positions), "
        f"{mix.text_targets:,.0f} text targets, attention pairs {mix.attention_pairs(P):,.0f} "
        f"({mix.attention_pairs(P) / mix.seq_len**2:.1%} of dense)",
        f"training FLOPs per position: {f.total / 1e9:.2f} GFLOP",
        f"  {'weights (6 x backbone parameters)':42s}{f.weights / 1e9:8.2f} G"
        + ("   (modality experts: one expert's per position)" if cfg.model.modality_experts else ""),
        f"  {'lm_head (text targets only)':42s}{f.lm_head / 1e9:8.2f} G",
        f"  {'patch encoder/decoder':42s}{f.patching / 1e9:8.2f} G",
        f"  {'attention (Transfusion mask)':42s}{f.attention / 1e9:8.2f} G   (dense 12*L*d*seq: "
        f"{f.attention_dense / 1e9:.2f} G)",
    ]
    d = cfg.distributed
    where = "CPU" if d.offload_optimizer else "GPU"
    out.append(f"memory per GPU ({plan.world_size} x {g.key}, ZeRO-{d.zero_stage}, optimizer on {where}"
               f"{', parameters on CPU' if d.offload_params else ''}, micro-batch {plan.micro_batch} x {mix.seq_len}):")
    for k, v in plan.model_states.items():
        if k != "cpu_per_node":
            out.append(_row(f"model states / {k}", v))
    for k, v in plan.buffers.items():
        out.append(_row(f"deepspeed / {k}", v))
    ck = "with" if plan.checkpointing else "without"
    for k, v in plan.activations.items():
        out.append(_row(f"activations ({ck} ckpt) / {k}", v))
    out.append(_row("runtime (CUDA context, NCCL)", RUNTIME_OVERHEAD_BYTES))
    other = sum(plan.activations_other.values()) - sum(plan.activations.values())
    out.append(_row("total", plan.gpu_bytes) + f"  of {g.memory_bytes / GIB:.2f} GiB")
    out.append(_row(f"total with checkpointing {'off' if plan.checkpointing else 'on'}", plan.gpu_bytes + other))
    if plan.model_states["cpu_per_node"]:
        out.append(_row("CPU memory per node (DeepSpeed)", plan.model_states["cpu_per_node"]))
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    out.append(f"verdict: {verdict} ({plan.gpu_bytes / g.memory_bytes:.0%} of {g.key} memory)")
    if not plan.fits:
        out.append(f"  {DOES_NOT_FIT_ADVICE}")
    out.append(f"throughput ({g.key}: {g.bf16_flops / 1e12:.0f} TFLOP/s dense bf16 peak):")
    for mfu in mfus:
        per_gpu = mfu * g.bf16_flops / f.total
        total = per_gpu * plan.world_size
        out.append(f"  MFU {mfu:.0%}: {per_gpu:,.0f} positions/s per GPU, {total:,.0f} on {plan.world_size}; "
                   f"{positions:.3g} positions in {positions / total / 86400:.1f} days")
    return "\n".join(out)


def gpu_table() -> str:
    """The GPUs the estimate knows: key, dense bf16 peak, memory."""
    rows = [f"  {g.key:10s} {g.bf16_flops / 1e12:7.0f} TFLOP/s  {g.memory_bytes / GIB:6.1f} GiB" for g in GPUS.values()]
    return "\n".join(["GPUs (dense bf16 peak, memory):", *rows])


def main(argv: list[str] | None = None) -> int:
    """CLI: the plan of a config on a cluster shape."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML")
    ap.add_argument("--nodes", type=int, default=1, help="(default: %(default)s)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="(default: %(default)s)")
    ap.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS),
                    help="GPU kind (see --list-gpus) (default: %(default)s)")
    ap.add_argument("--mfu", default="0.35,0.45", help="comma-separated MFUs for the time estimate "
                    "(put the one bench/gpu_step.py measured first) (default: %(default)s)")
    ap.add_argument("--positions", type=float, default=PAPER_POSITIONS, help="training positions (default 2T)")
    ap.add_argument("--list-gpus", action="store_true", help="print the GPU table and exit")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = ap.parse_args(argv)
    if args.list_gpus:
        print(gpu_table())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, GPUS[args.gpu])
    print(format_plan(plan, cfg, [float(x) for x in args.mfu.split(",")], args.positions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
