"""Prefix reuse for every memory type: checkpoints, rollback plans and the prefix cache.

Attention K/V can be trimmed to a common prefix; recurrent state and sliding windows
cannot. This package makes every way back exact and says what it costs:
:mod:`pymem.reuse.checkpoints` captures what trimming cannot restore,
:mod:`pymem.reuse.planner` picks the cheapest exact way back to a position,
:mod:`pymem.reuse.prefix_cache` finds the longest reusable prefix of a request among live
sequences, checkpoints in RAM and on disk (:mod:`pymem.reuse.radix`: the token tree) and
sets a sequence up from it; :mod:`pymem.reuse.persist` saves the cache with its memory in
one checksummed container and restores both.
"""

from __future__ import annotations

from pymem.reuse.checkpoints import (
    Checkpoint,
    CheckpointArena,
    checkpoint,
    layout_of,
    memory_device,
    needs_checkpoints,
    restore_checkpoint,
    trimmed_parts,
)
from pymem.reuse.persist import load_prefix_cache, save_prefix_cache
from pymem.reuse.planner import RollbackPlan, apply_rollback, plan_rollback, window_start
from pymem.reuse.prefix_cache import (
    Attach,
    CheckpointPolicy,
    EntryInfo,
    PrefixCache,
    PrefixMatch,
)
from pymem.reuse.radix import RadixTree, as_tokens

__all__ = [
    "Attach",
    "Checkpoint",
    "CheckpointArena",
    "CheckpointPolicy",
    "EntryInfo",
    "PrefixCache",
    "PrefixMatch",
    "RadixTree",
    "RollbackPlan",
    "apply_rollback",
    "as_tokens",
    "checkpoint",
    "layout_of",
    "load_prefix_cache",
    "memory_device",
    "needs_checkpoints",
    "plan_rollback",
    "restore_checkpoint",
    "save_prefix_cache",
    "trimmed_parts",
    "window_start",
]
