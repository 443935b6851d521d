"""The inference room: KV-cached mixed-modal generation (`python -m pretrain.inference.generate`) and the
trainer's TensorBoard sampling hook. Reads exports through `pretrain.artifacts`.
"""
