"""The Transfusion model, single-device code (no DeepSpeed import): distribution lives in the trainer."""

from pretrain.model.batch import IGNORE_INDEX, TransfusionBatch
from pretrain.model.kv_cache import KVCache
from pretrain.model.transfusion import Transfusion, TransfusionOutput, flops_per_position

__all__ = ["IGNORE_INDEX", "KVCache", "Transfusion", "TransfusionBatch", "TransfusionOutput", "flops_per_position"]
