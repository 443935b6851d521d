"""The training room: the loop, the DeepSpeed engine, distribution, checkpoints, EMA, schedule, metrics, hooks.

Imports the model, the config and the planners (`pretrain.plan`) only; sampling, evaluation and
`train.init_from` come in through `pretrain.train.hooks`. `python -m pretrain.train` runs __main__.py.
"""
