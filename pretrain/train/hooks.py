"""The training loop's hooks: what the loop calls without importing the rooms that implement it.

The loop knows when to sample, evaluate and read `train.init_from`; what that means lives in
`pretrain.inference.hooks`, `pretrain.evaluation.hooks` and `pretrain.artifacts.init_from`. The entry
point (`python -m pretrain.train`, pretrain/train/__main__.py) joins them into one `TrainHooks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pretrain.config import Config


@dataclass(frozen=True)
class HookContext:
    """What a periodic hook sees: the (ZeRO-partitioned) model, the run config, the metrics writer and the step.

    Every rank calls a hook (ZeRO-3 forwards are collective); only rank 0's writer writes (`is_main`).
    """

    model: torch.nn.Module
    cfg: Config
    writer: Any  # pretrain.train.metrics.MetricsWriter
    step: int
    is_main: bool


InitialTensors = Callable[[Path, Config], Iterator[tuple[str, torch.Tensor]]]
PeriodicHook = Callable[[HookContext], None]


@dataclass(frozen=True)
class TrainHooks:
    """initial_tensors: `train.init_from` -> (parameter name, tensor) pairs; sample: every
    `logging.sample_every` steps; evaluate: every `logging.eval_every` steps. None: not available."""

    initial_tensors: InitialTensors | None = None
    sample: PeriodicHook | None = None
    evaluate: PeriodicHook | None = None


def check_hooks(cfg: Config, hooks: TrainHooks) -> None:
    """Raise ValueError naming the setting when the config asks for something no hook provides."""
    wanted = {"train.init_from": (cfg.train.init_from, hooks.initial_tensors),
              "logging.sample_every": (cfg.logging.sample_every > 0, hooks.sample),
              "logging.eval_every": (cfg.logging.eval_every > 0, hooks.evaluate)}
    missing = [k for k, (asked, hook) in wanted.items() if asked and hook is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} set, but this entry point gives no hook for it: launch "
                         "`python -m pretrain.train` (pretrain/train/__main__.py), or pass TrainHooks to "
                         "pretrain.train.loop.main")
