"""Learning-rate schedule: linear warmup, then cosine decay to a floor (the paper's recipe).

The schedule is a pure function of the step, so a resumed run needs nothing but the step.
"""

from __future__ import annotations

import math

from pretrain.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total_steps` run."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return optim.min_lr + (optim.lr - optim.min_lr) * cosine


def set_lr(optimizer, lr: float) -> None:
    """Write `lr` into every parameter group (DeepSpeed and torch optimizers alike)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
