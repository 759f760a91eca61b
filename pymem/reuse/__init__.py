"""Prefix reuse for every memory type: checkpoints, rollback plans (and the prefix cache).

Attention K/V can be trimmed to a common prefix; recurrent state and sliding windows
cannot. This package makes every way back exact and says what it costs:
:mod:`pymem.reuse.checkpoint` captures what trimming cannot restore,
:mod:`pymem.reuse.planner` picks the cheapest exact way back to a position.
"""

from __future__ import annotations

from pymem.reuse.checkpoint import (
    Checkpoint,
    checkpoint,
    layout_of,
    needs_checkpoints,
    restore_checkpoint,
    trimmed_parts,
)
from pymem.reuse.planner import RollbackPlan, apply_rollback, plan_rollback, window_start

__all__ = [
    "Checkpoint",
    "RollbackPlan",
    "apply_rollback",
    "checkpoint",
    "layout_of",
    "needs_checkpoints",
    "plan_rollback",
    "restore_checkpoint",
    "trimmed_parts",
    "window_start",
]
