"""Checkpoints and rollback plans, written with the spec's own operations.

pymem's ``pymem.reuse`` (checkpoint.py, planner.py) packages three memory operations:
a checkpoint is ``state_write(seq, PARTIAL_ONLY)`` plus the sequence's position, a restore
trims the full-attention caches (what a ``PARTIAL_ONLY`` state leaves out) after that
position and reads the blob back, and a rollback plan picks the cheapest exact way back.
Here the same rules are stated naively over the spec memories (lists of cells), with no
code shared with pymem; the harness runs both and compares plan kinds, resume positions,
refusals and the memory afterwards.

Plan rules (``plan_rollback``), for ``seq`` to hold exactly positions ``[0, pos)``:

* ``none``        pos > pos_max(seq): nothing to remove, resume at pos_max + 1;
* ``recompute``   pos == 0 (pymem's rule: rolling back to the start recomputes);
* ``trim``        no recurrent part, and every sliding-window cache still holds the
                  first position a token at ``pos`` attends to (or the window starts at
                  ``pos`` itself);
* ``snapshot``    as ``trim`` for the windows, and the recurrent part can roll back
                  exactly ``k = pos_max - pos + 1`` tokens: the sequence has a tail cell,
                  no rollback is pending, ``k <= n_rs_seq`` and ``k < last_n[seq]``;
* ``checkpoint``  the latest checkpoint of this memory's layout at ``<= pos - 1`` that can
                  be restored (``restorable``: the full-attention cells of ``seq`` still
                  reach its position, and a trimmed cache that slides still holds the
                  window of the token after it); the first one wins a tie;
* ``recompute``   otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import FLAG_PARTIAL_ONLY, SpecStateError, SwaType, is_masked_swa
from .kv import KVCache
from .memory import HybridMemory, ISWAMemory, SpecMemory


@dataclass(frozen=True)
class SpecCheckpoint:
    seq_id: int
    pos: int
    blob: bytes
    layout: tuple  # see layout_of: a checkpoint fits only a memory with the same one


def layout_of(mem: SpecMemory) -> tuple:
    """The memory type, each cache's cells per stream and streams, the recurrent cells and
    snapshot planes (not the layers: a blob for other layers fails when it is read)."""
    kv = tuple((name, kv.size(), kv.n_stream) for name, kv in mem.kv_parts.items())
    rs = (mem.rs.size, mem.rs.n_rs_seq) if mem.rs is not None else None
    return (mem.kind, kv, rs)


def full_attention_parts(mem: SpecMemory) -> list[KVCache]:
    """The caches a PARTIAL_ONLY state leaves out (see memory.py's ``_write``)."""
    if isinstance(mem, HybridMemory):
        attn = mem.attn
        return [attn.base] if isinstance(attn, ISWAMemory) else [attn.kv]
    if isinstance(mem, ISWAMemory):
        return [mem.base]
    return []


def window_start(n_swa: int, swa_type: int, pos: int) -> int:
    """The first position a token at ``pos`` sees: a scan from 0 with the SWA mask rule."""
    for p in range(pos + 1):
        if not is_masked_swa(n_swa, swa_type, p, pos):
            return p
    return pos


def checkpoint(mem: SpecMemory, seq_id: int) -> SpecCheckpoint:
    pos = mem.seq_pos_max(seq_id)
    if pos < 0:
        raise SpecStateError(f"checkpoint: sequence {seq_id} is empty")
    return SpecCheckpoint(seq_id, pos, mem.state_write(seq_id, FLAG_PARTIAL_ONLY), layout_of(mem))


def restorable(mem: SpecMemory, seq_id: int, pos: int) -> bool:
    """Whether a checkpoint at ``pos`` restores exactly into ``seq_id``: every cache a
    PARTIAL_ONLY state leaves out holds the sequence up to ``pos``, and one that slides (a
    hybrid's sliding attention cache) still holds every position from the start of the
    window of a token at ``pos + 1`` to ``pos`` (the checkpoint does not bring them back)."""
    for kv in full_attention_parts(mem):
        if kv.seq_pos_max(seq_id) < pos:
            return False
        if kv.cfg.swa_type != SwaType.NONE:
            start = min(window_start(kv.cfg.n_swa, kv.cfg.swa_type, pos + 1), pos)
            if kv.seq_pos_min(seq_id) > start:
                return False
    return True


def restore(mem: SpecMemory, seq_id: int, ck: SpecCheckpoint) -> int:
    """Trim the full-attention caches after ``ck.pos``, then read the partial state.

    Refused (SpecStateError) unless ``restorable``. Not atomic by itself: the harness runs
    it on a copy of the spec.
    """
    if ck.layout != layout_of(mem):
        raise SpecStateError(f"restore: checkpoint laid out as {ck.layout}, not {layout_of(mem)}")
    parts = full_attention_parts(mem)
    if not restorable(mem, seq_id, ck.pos):
        raise SpecStateError(f"restore: sequence {seq_id} cannot take a checkpoint at {ck.pos}")
    for kv in parts:
        kv.seq_rm(seq_id, ck.pos + 1, -1)
    mem.state_read(ck.blob, seq_id, FLAG_PARTIAL_ONLY)
    return ck.pos + 1


def _window_lost(mem: SpecMemory, seq_id: int, pos: int) -> bool:
    for kv in mem.kv_parts.values():
        if kv.cfg.swa_type == SwaType.NONE:
            continue
        start = window_start(kv.cfg.n_swa, kv.cfg.swa_type, pos)
        have = kv.seq_pos_min(seq_id)
        if start < pos and (have < 0 or have > start):
            return True
    return False


def _snapshot_ok(mem: SpecMemory, seq_id: int, k: int) -> bool:
    rs = mem.rs
    assert rs is not None
    if not 0 <= seq_id < min(rs.size, rs.cfg.n_seq_max) or rs.cells[seq_id].tail < 0:
        return False
    return rs.rs_idx[seq_id] == 0 and k <= rs.n_rs_seq and k < rs.last_n[seq_id]


def plan_rollback(
    mem: SpecMemory, seq_id: int, pos: int, ckpts: list[SpecCheckpoint]
) -> tuple[str, int, SpecCheckpoint | None]:
    """``(kind, resume_from, checkpoint)`` by the rules in the module docstring."""
    cur = mem.seq_pos_max(seq_id)
    if pos > cur:
        return ("none", cur + 1, None)
    if pos == 0:
        return ("recompute", 0, None)
    k = cur - pos + 1
    if not _window_lost(mem, seq_id, pos):
        if mem.rs is None:
            return ("trim", pos, None)
        if _snapshot_ok(mem, seq_id, k):
            return ("snapshot", pos, None)
    best = None
    layout = layout_of(mem)
    for ck in ckpts:
        if (
            ck.layout == layout
            and ck.pos <= pos - 1
            and (best is None or ck.pos > best.pos)
            and restorable(mem, seq_id, ck.pos)
        ):
            best = ck
    if best is not None:
        return ("checkpoint", best.pos + 1, best)
    return ("recompute", 0, None)


def apply_rollback(
    mem: SpecMemory, seq_id: int, pos: int, plan: tuple[str, int, SpecCheckpoint | None]
) -> int:
    """Carry the plan out with the spec's ops; ``seq_rm`` refusing a trim or snapshot
    raises SpecStateError (pymem: the plan is stale)."""
    kind, resume, ck = plan
    if kind == "none":
        return resume
    if kind in ("trim", "snapshot"):
        if not mem.seq_rm(seq_id, pos, -1):
            raise SpecStateError(f"rollback: seq_rm({seq_id}, {pos}, -1) refused")
        return pos
    if kind == "checkpoint":
        assert ck is not None
        return restore(mem, seq_id, ck)
    mem.seq_rm(seq_id, -1, -1)
    return 0
