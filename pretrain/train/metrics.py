"""Training metrics: per-step time breakdown, throughput, MFU, memory; stdout, TensorBoard, JSONL.

Rank 0 writes: a line to stdout every `logging.every` steps, the same scalars to TensorBoard
(RUN_DIR/tensorboard), and one JSON line per step to RUN_DIR/metrics.jsonl (losses, lr, time
breakdown and a digest of the sequences consumed: what the resume tests compare).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil
import torch

from pretrain.plan.hardware import detect_gpu

log = logging.getLogger("pretrain")


def detect_peak_flops(configured: float | None) -> float | None:
    """Peak FLOP/s per device: the config's value, else the detected GPU's bf16 peak, else None (no MFU)."""
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    gpu = detect_gpu(torch.cuda.get_device_name())
    return gpu.bf16_flops if gpu else None


class StepTimer:
    """Seconds per phase of a step (data, forward, backward, optimizer), summed over micro-batches.

    mode "events" (logging.timer=events, the default): on CUDA each phase is bracketed by two CUDA events
    recorded on the current stream, and nothing synchronises inside the step. Reading `times` waits once
    for the step's last event (the trainer's per-step loss read has usually passed it already) and adds
    up event.elapsed_time: GPU-timeline seconds. The phases are back to back on the stream, so they add
    up to the step's GPU time; a phase's share is where the GPU was when the host moved on (a kernel
    queue that runs ahead shows up in the phase whose end event waits for it).
    mode "sync" (the old timer): torch.cuda.synchronize() before and after every phase of every
    micro-batch: exact host wall time per phase, but it serialises the step (no overlap of DeepSpeed's
    communication with compute, no kernel queue across phases), so the step is slower than untimed.
    Without CUDA both modes time host wall clock with time.perf_counter, identically.

    Raises ValueError for another mode.
    """

    PHASES = ("data", "forward", "backward", "optimizer")
    MODES = ("events", "sync")

    def __init__(self, mode: str = "events") -> None:
        if mode not in self.MODES:
            raise ValueError(f"logging.timer={mode!r}: expected one of {', '.join(self.MODES)}")
        self.mode = mode
        self._times: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, Any, Any]] = []  # (phase, start event, end event) not yet read

    def reset(self) -> None:
        self._times = defaultdict(float)
        self._pending = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        cuda = torch.cuda.is_available()
        if cuda and self.mode == "events":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
            return
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            self._times[name] += time.perf_counter() - t0

    @property
    def times(self) -> dict[str, float]:
        """Seconds per phase since the last reset; in events mode waits for the last recorded event (one sync)."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                self._times[name] += start.elapsed_time(end) / 1e3  # elapsed_time is in ms
            self._pending = []
        return self._times

    @property
    def total(self) -> float:
        return sum(self.times.values())


@dataclass
class StepStats:
    """What one optimizer step produced, summed over ranks and micro-batches where it says so."""

    step: int
    loss: float  # total loss of the step (LM + lambda * diffusion), global
    lm_loss: float  # mean CE per text target, global
    diffusion_loss: float  # mean MSE per image, global (0 when the step had no image)
    lr: float
    grad_norm: float
    text_tokens: int  # global text targets
    images: int  # global images
    applied: bool  # False: NaN/Inf step, skipped
    times: dict[str, float] = field(default_factory=dict)
    digest: list[int] = field(default_factory=list)  # per-rank digest of the sequences consumed
    sequence_digest: int = 0  # order-independent digest of the step's sequences, the same on any number of ranks


def memory_stats() -> dict[str, float]:
    """GPU peak allocated memory (GiB) when on GPU, and this process's resident memory (GiB)."""
    out = {"rss_gib": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["gpu_max_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class MetricsWriter:
    """Rank 0's sinks: stdout line, TensorBoard scalars/images, metrics.jsonl."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, flops_per_step: float,
                 peak_flops: float | None, world_size: int, patches_per_image: int) -> None:
        """enabled: this rank writes (rank 0); flops_per_step: model FLOPs of one global step; peak_flops: per
        device (None: no MFU); patches_per_image: P, for the image-patch throughput."""
        self.enabled = enabled
        self.flops_per_step = flops_per_step  # model FLOPs of one global step
        self.peak = peak_flops
        self.world = world_size
        self.patches_per_image = patches_per_image
        self.tb = None
        self.jsonl = None
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def throughput(self, s: StepStats) -> dict[str, float]:
        """Text tokens/s, image patches/s, MFU (when the peak is known) over the step's wall time."""
        dt = max(sum(s.times.values()), 1e-9)
        out = {"text_tokens_per_s": s.text_tokens / dt, "image_patches_per_s": s.images * self.patches_per_image / dt}
        if self.peak:
            out["mfu"] = self.flops_per_step / dt / (self.peak * self.world)
        return out

    def record_step(self, s: StepStats, log_now: bool) -> None:
        """Append the step to metrics.jsonl; every `logging.every` steps also stdout + TensorBoard."""
        if not self.enabled:
            return
        tp = self.throughput(s)
        row = {k: v for k, v in s.__dict__.items()}
        row.update(tp, wall=time.time())  # unix seconds at the end of the step: wall time between steps
        self.jsonl.write(json.dumps(row) + "\n")
        if not log_now:
            return
        mem = memory_stats()
        total = max(sum(s.times.values()), 1e-9)
        share = {k: 100 * v / total for k, v in s.times.items()}
        mfu = f" mfu {100 * tp['mfu']:.1f}%" if "mfu" in tp else ""
        log.info(
            "step %d | loss %.4f lm %.4f diff %.4f | lr %.2e gnorm %.3f | %.0f tok/s %.0f patch/s%s | "
            "step %.3fs: data %.0f%% fwd %.0f%% bwd %.0f%% opt %.0f%% | rss %.2f GiB%s",
            s.step, s.loss, s.lm_loss, s.diffusion_loss, s.lr, s.grad_norm, tp["text_tokens_per_s"],
            tp["image_patches_per_s"], mfu, total, share.get("data", 0), share.get("forward", 0),
            share.get("backward", 0), share.get("optimizer", 0), mem["rss_gib"],
            f" gpu {mem['gpu_max_alloc_gib']:.2f} GiB" if "gpu_max_alloc_gib" in mem else "",
        )
        if self.tb is None:
            return
        scalars = {
            "train/loss": s.loss, "train/lm_loss": s.lm_loss, "train/diffusion_loss": s.diffusion_loss,
            "train/lr": s.lr, "train/grad_norm": s.grad_norm, "perf/text_tokens_per_s": tp["text_tokens_per_s"],
            "perf/image_patches_per_s": tp["image_patches_per_s"], "perf/step_time_s": total,
            **{f"time/{k}_s": v for k, v in s.times.items()}, **{f"memory/{k}": v for k, v in mem.items()},
        }
        if "mfu" in tp:
            scalars["perf/mfu"] = tp["mfu"]
        for tag, value in scalars.items():
            self.tb.add_scalar(tag, value, s.step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log extra scalars (validation, bad-step counts) to stdout and TensorBoard."""
        if not self.enabled:
            return
        log.info("step %d | %s", step, " ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")

    def images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """A (3, H, W) image grid in [0, 1] to TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Mean step-time breakdown over recorded steps (skipping the first, warm-up step) as a text table."""
    rows = [r for r in rows if "times" in r][1:] or [r for r in rows if "times" in r]
    if not rows:
        return "no steps recorded"
    phases = StepTimer.PHASES
    mean = {p: sum(r["times"].get(p, 0.0) for r in rows) / len(rows) for p in phases}
    total = sum(mean.values())
    lines = [f"{'phase':<10} {'s/step':>8} {'share':>7}"]
    lines += [f"{p:<10} {mean[p]:>8.4f} {100 * mean[p] / total:>6.1f}%" for p in phases]
    tok = sum(r["text_tokens_per_s"] for r in rows) / len(rows)
    lines.append(f"{'total':<10} {total:>8.4f}   text tokens/s {tok:.0f}")
    return "\n".join(lines)
