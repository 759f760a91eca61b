"""The attention KV caches: cells, slot search, the iSWA pair, graph inputs, K-shift, state."""

from __future__ import annotations

from pymem.kv.cache import KVCache, KVCacheContext, KVLayer, SlotInfo
from pymem.kv.cells import KVCells
from pymem.kv.iswa import KVCacheISWA, KVCacheISWAContext, swa_cache_size
from pymem.spec import NonCausalType  # re-exported: the KQ mask option

__all__ = [
    "KVCache",
    "KVCacheContext",
    "KVCacheISWA",
    "KVCacheISWAContext",
    "KVCells",
    "KVLayer",
    "NonCausalType",
    "SlotInfo",
    "swa_cache_size",
]
