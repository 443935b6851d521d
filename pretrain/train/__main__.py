"""`python -m pretrain.train --config PATH [key=value ...]`: the trainer with every hook joined.

The one place where the training room meets the tools: `train.init_from` reading (artifacts),
TensorBoard samples (inference) and the periodic evaluation (evaluation). See pretrain/train/loop.py.
"""

from __future__ import annotations

import sys

from pretrain.plan.data_keys import preflight

if __name__ == "__main__":
    preflight(sys.argv[1:])  # model keys vs the shards in seconds, before DeepSpeed and the tools are imported

from pretrain.artifacts.init_from import initial_tensors  # noqa: E402
from pretrain.evaluation.hooks import periodic_evaluation  # noqa: E402
from pretrain.inference.hooks import tensorboard_samples  # noqa: E402
from pretrain.train.hooks import TrainHooks  # noqa: E402
from pretrain.train.loop import main  # noqa: E402

HOOKS = TrainHooks(initial_tensors=initial_tensors, sample=tensorboard_samples, evaluate=periodic_evaluation)

if __name__ == "__main__":
    sys.exit(main(hooks=HOOKS))
