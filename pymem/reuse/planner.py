"""The cheapest exact way back: rollback plans for one sequence.

A runtime that wants sequence ``seq_id`` to hold positions ``[0, pos)`` only (a
regenerated answer, an edited turn, rejected draft tokens) asks :func:`plan_rollback`.
The answer is exact by construction, with its cost in tokens to decode again::

    kind         when                                         decode again
    none         nothing at or after pos                      0
    trim         no recurrent part, the window (if any) still  0
                 holds what a token at pos attends to
    snapshot     the recurrent part's snapshot planes reach    0
                 back far enough (RecurrentMemory.rollback_reach), window as above
    checkpoint   the nearest checkpoint at or before pos - 1   pos - (checkpoint.pos + 1)
    recompute    none of the above                             pos (from position 0)

``seq_rm``'s bare False (a recurrent state cannot lose its last tokens) is therefore never
the end of the story: :func:`apply_rollback` carries the plan out and says where decoding
resumes; the caller decodes ``tokens[resume_from:pos]`` again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pymem.errors import RangeError
from pymem.kv import KVCache
from pymem.memory import Memory
from pymem.recurrent import RecurrentMemory
from pymem.reuse.checkpoints import Checkpoint, layout_of, restorable, restore_checkpoint
from pymem.spec import SWAType, window_start

RollbackKind = Literal["none", "trim", "snapshot", "checkpoint", "recompute"]


@dataclass(frozen=True)
class RollbackPlan:
    """How ``seq_id`` gets back to positions ``[0, pos)``, and what it costs."""

    seq_id: int
    pos: int
    kind: RollbackKind
    resume_from: int  # the first position to decode again
    checkpoint: Checkpoint | None
    reason: str

    @property
    def n_replay(self) -> int:
        """Tokens to decode again after :func:`apply_rollback`."""
        return self.pos - self.resume_from


def _window_holds(mem: Memory, seq_id: int, pos: int) -> str:
    """Why trimming to ``[0, pos)`` would lose window state, or "" when it would not."""
    for name, part in mem.parts().items():
        if not isinstance(part, KVCache) or part.swa_type == SWAType.NONE:
            continue
        need = window_start(part.swa_type, part.n_swa, pos)
        have = part.seq_pos_min(seq_id)
        if need < pos and (have < 0 or have > need):
            return (
                f"the {name} window of a token at {pos} starts at {need}, but the cache "
                f"keeps sequence {seq_id} only from {have}"
            )
    return ""


def plan_rollback(
    mem: Memory, seq_id: int, pos: int, checkpoints: Iterable[Checkpoint] = ()
) -> RollbackPlan:
    """The cheapest exact way for ``seq_id`` to hold exactly positions ``[0, pos)``.

    ``checkpoints`` are candidates (any sequence's, taken on this memory's layout); the
    plan uses the latest one at or before ``pos - 1`` that :func:`restorable` accepts
    (the full-attention cells of ``seq_id`` still cover its position, a trimmed sliding
    window still holds what follows it). Changes nothing.
    """
    if pos < 0:
        raise RangeError(f"pos = {pos}: must be >= 0")
    cur = mem.seq_pos_max(seq_id)
    if cur < pos:
        return RollbackPlan(seq_id, pos, "none", cur + 1, None, f"nothing at or after {pos}")
    if pos == 0:
        return RollbackPlan(seq_id, 0, "recompute", 0, None, "rolling back to the start")
    k = cur - pos + 1  # tokens to remove
    window = _window_holds(mem, seq_id, pos)
    recurrent = [p for p in mem.parts().values() if isinstance(p, RecurrentMemory)]
    if not window:
        if not recurrent:
            return RollbackPlan(seq_id, pos, "trim", pos, None, f"trim {k} tokens")
        reach = min(r.rollback_reach(seq_id) for r in recurrent)
        if k <= reach:
            return RollbackPlan(
                seq_id, pos, "snapshot", pos, None, f"snapshot plane {k} (reach {reach})"
            )
        why = f"the snapshot planes reach back {reach} tokens, {k} needed"
    else:
        why = window
    layout = layout_of(mem)
    best: Checkpoint | None = None
    for ck in checkpoints:
        fits = ck.layout == layout and ck.pos <= pos - 1
        fits = fits and (best is None or ck.pos > best.pos)
        if fits and not restorable(mem, seq_id, ck.pos):
            best = ck
    if best is not None:
        return RollbackPlan(
            seq_id, pos, "checkpoint", best.pos + 1, best,
            f"{why}; checkpoint at {best.pos}, replay {pos - best.pos - 1}",
        )  # fmt: skip
    return RollbackPlan(
        seq_id, pos, "recompute", 0, None, f"{why}; no checkpoint at or before {pos - 1}"
    )


def apply_rollback(mem: Memory, plan: RollbackPlan) -> int:
    """Carry ``plan`` out; returns the position decoding resumes from (``plan.resume_from``).

    The plan must be current (made on this memory since its last change to ``seq_id``).
    """
    seq_id, pos = plan.seq_id, plan.pos
    if plan.kind == "none":
        return plan.resume_from
    if plan.kind in ("trim", "snapshot"):
        if not mem.seq_rm(seq_id, pos, -1):
            raise RangeError(
                f"rollback plan ({plan.kind} to {pos}) is stale: the memory refused it; plan again"
            )
        return pos
    if plan.kind == "checkpoint":
        assert plan.checkpoint is not None
        return restore_checkpoint(mem, seq_id, plan.checkpoint)
    mem.seq_rm(seq_id, -1, -1)
    return 0
