"""The planning room: batch plan and DeepSpeed config, FLOPs/memory/time estimates, the dry run, GPU facts.

Imports the model and the config only (no DeepSpeed at import); `python -m pretrain.plan.estimate`.
"""
