"""The Transfusion model, single-device code (no DeepSpeed import): distribution lives in the trainer.

Imports only `contract` (the batch it reads) and its own config (`pretrain.model.config`).
"""

from contract.batch import IGNORE_INDEX, TransfusionBatch
from pretrain.model.config import ModelConfig
from pretrain.model.kv_cache import KVCache
from pretrain.model.transfusion import CachedChunk, Transfusion, TransfusionOutput

__all__ = ["IGNORE_INDEX", "CachedChunk", "KVCache", "ModelConfig", "Transfusion", "TransfusionBatch",
           "TransfusionOutput"]
