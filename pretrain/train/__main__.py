"""`python -m pretrain.train --config PATH [key=value ...]`: the trainer with every hook joined.

The one place where the training room meets the tools: `train.init_from` reading (artifacts),
TensorBoard samples (inference) and the periodic evaluation (evaluation). See pretrain/train/loop.py.
"""

from __future__ import annotations

import sys

from pretrain.artifacts.init_from import initial_tensors
from pretrain.evaluation.hooks import periodic_evaluation
from pretrain.inference.hooks import tensorboard_samples
from pretrain.train.hooks import TrainHooks
from pretrain.train.loop import main

HOOKS = TrainHooks(initial_tensors=initial_tensors, sample=tensorboard_samples, evaluate=periodic_evaluation)

if __name__ == "__main__":
    sys.exit(main(hooks=HOOKS))
