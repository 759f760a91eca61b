"""The attention KV cache: cells, slot search, graph inputs and state blobs."""

from __future__ import annotations

from pymem.kv.cache import KVCache, KVCacheContext, KVLayer, NonCausalType, SlotInfo
from pymem.kv.cells import KVCells

__all__ = ["KVCache", "KVCacheContext", "KVCells", "KVLayer", "NonCausalType", "SlotInfo"]
