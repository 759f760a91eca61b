"""The attention KV caches: cells, slot search, the iSWA pair, graph inputs, K-shift, state.

Modules: ``layout`` (SlotInfo, KVLayer, KVLayout), ``cells`` (per-stream metadata),
``cache`` (KVCache and its context), ``iswa`` (the base + SWA pair), and the helpers
``inputs``, ``graph``, ``shift`` and ``state_io``, which take a layout, cells and layers
and never import ``cache``.
"""

from __future__ import annotations

from pymem.kv.cache import KVCache, KVCacheContext
from pymem.kv.cells import KVCells, PositionBounds
from pymem.kv.iswa import KVCacheISWA, KVCacheISWAContext, swa_cache_size
from pymem.kv.layout import KVLayer, KVLayout, SlotInfo
from pymem.spec import NonCausalType  # re-exported: the KQ mask option

__all__ = [
    "KVCache",
    "KVCacheContext",
    "KVCacheISWA",
    "KVCacheISWAContext",
    "KVCells",
    "KVLayer",
    "KVLayout",
    "NonCausalType",
    "PositionBounds",
    "SlotInfo",
    "swa_cache_size",
]
