"""The evaluation room: the pixel-judged synthetic-task evaluation, its judge, FID, and the trainer's
periodic evaluation hook (`python -m pretrain.evaluation.evaluate`, `python -m pretrain.evaluation.fid`).
"""
