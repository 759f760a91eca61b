"""Checkpoints: what a sequence cannot get back by trimming, captured at one position.

Attention K/V can be trimmed to any prefix (``seq_rm(seq, pos, -1)``). Two kinds of state
cannot: a recurrent state summarises every token before it, and a sliding-window cache
drops cells once they leave the window. A :class:`Checkpoint` holds exactly those parts of
one sequence, as the memory's own ``PARTIAL_ONLY`` state bytes, at the position of the
last token folded in::

    memory part             trimmed on restore     held by the checkpoint
    full attention (KV)     yes: seq_rm(pos+1..)   no (still in the cache)
    SWA window (KV)         no                     yes: the window's cells
    recurrent (R/S)         no                     yes: the sequence's state rows

So a checkpoint costs the recurrent rows plus the window, never the whole context, and
restoring it is exact: the sequence's state equals the one it had when the checkpoint was
taken (the full-attention cells up to that position never changed). llama.cpp's server
keeps the same bytes per slot; here they are objects any runtime can hold.

The bytes live in host memory: pymem restores through its two-phase state read (parse and
validate, then commit), so a restore that fails changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pymem.errors import RangeError, StateError
from pymem.hybrid import HybridMemory
from pymem.kv import KVCache, KVCacheISWA
from pymem.memory import Memory, StateFlags
from pymem.recurrent import RecurrentMemory
from pymem.spec import SWAType
from pymem.state import StateReader


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The untrimmable state of sequence ``seq_id`` after the token at ``pos``."""

    seq_id: int
    pos: int
    blob: bytes = field(repr=False)
    layout: tuple[str, ...]  # the memory parts the blob fits (see :func:`layout_of`)

    @property
    def nbytes(self) -> int:
        return len(self.blob)


def layout_of(mem: Memory) -> tuple[str, ...]:
    """A short description of the memory's parts and sizes: a checkpoint fits only a memory
    with the same one. E.g. ``("kv:512x1", "recurrent:4+2")``."""
    out = []
    for name, part in mem.parts().items():
        if isinstance(part, KVCache):
            out.append(f"{name}:kv:{part.get_size()}x{part.get_n_stream()}")
        elif isinstance(part, RecurrentMemory):
            out.append(f"{name}:recurrent:{part.size}+{part.n_rs_seq}")
        else:
            out.append(f"{name}:{type(part).__name__}")
    return tuple(out)


def trimmed_parts(mem: Memory) -> list[KVCache]:
    """The full-attention caches a checkpoint does not hold (a restore trims them).

    A plain hybrid's attention cache, an iSWA cache's base cache; none for a plain KV cache
    (its ``PARTIAL_ONLY`` state is the whole sequence) or recurrent memory.
    """
    if isinstance(mem, HybridMemory):
        attn = mem.get_mem_attn()
        return [attn.get_base()] if isinstance(attn, KVCacheISWA) else [attn]
    if isinstance(mem, KVCacheISWA):
        return [mem.get_base()]
    return []


def needs_checkpoints(mem: Memory) -> bool:
    """Whether trimming a sequence can lose state: a recurrent part or a sliding window."""
    for part in mem.parts().values():
        if isinstance(part, RecurrentMemory):
            return True
        if isinstance(part, KVCache) and part.swa_type != SWAType.NONE:
            return True
    return False


def checkpoint(mem: Memory, seq_id: int) -> Checkpoint:
    """Capture ``seq_id``'s untrimmable state at its current position."""
    pos = mem.seq_pos_max(seq_id)
    if pos < 0:
        raise RangeError(f"seq_id = {seq_id}: the sequence is empty, nothing to checkpoint")
    blob = mem.state_write(seq_id, StateFlags.PARTIAL_ONLY)
    return Checkpoint(seq_id, pos, blob, layout_of(mem))


def restorable(mem: Memory, seq_id: int, pos: int) -> str:
    """Why a checkpoint at ``pos`` cannot be restored exactly into ``seq_id``'s cells, or
    "" when it can: every cache it leaves out (:func:`trimmed_parts`) must hold the
    sequence up to ``pos``, and one that slides must still hold the window of a token at
    ``pos + 1`` (the checkpoint does not bring those cells back)."""
    from pymem.reuse.planner import window_start  # the planner imports this module

    for part in trimmed_parts(mem):
        have = part.seq_pos_max(seq_id)
        if have < pos:
            return (
                f"sequence {seq_id}'s full-attention cells end at {have}; the checkpoint needs "
                f"them up to its position"
            )
        if part.swa_type != SWAType.NONE:
            need = min(window_start(part.swa_type, part.n_swa, pos + 1), pos)
            low = part.seq_pos_min(seq_id)
            if low > need:
                return (
                    f"the sliding window of a token at {pos + 1} starts at {need}, but "
                    f"sequence {seq_id}'s cells start at {low} (the checkpoint leaves them out)"
                )
    return ""


def restore_checkpoint(mem: Memory, seq_id: int, ckpt: Checkpoint) -> int:
    """Bring ``seq_id`` back to ``ckpt``: trim the full-attention cells after ``ckpt.pos`` and
    restore the recurrent / window state. Returns the position decoding continues from.

    ``seq_id`` may differ from the sequence the checkpoint was taken from, as long as its
    full-attention cells hold positions ``[0, ckpt.pos]`` of the same tokens (after a
    ``seq_cp``, say). Nothing changes unless every check passes: the layout matches, the
    full-attention cache still holds ``ckpt.pos``, a trimmed cache that slides (a hybrid
    whose attention cache has a window) still holds the window of a token at
    ``ckpt.pos + 1`` (see :func:`restorable`), and the blob parses.
    """
    if ckpt.layout != layout_of(mem):
        raise StateError(
            f"checkpoint: taken on a memory laid out as {ckpt.layout}, this one is {layout_of(mem)}"
        )
    trim = trimmed_parts(mem)
    why = restorable(mem, seq_id, ckpt.pos)
    if why:
        raise StateError(f"checkpoint at pos {ckpt.pos}: {why}")
    plan = mem.state_read_parse(StateReader(ckpt.blob), seq_id, StateFlags.PARTIAL_ONLY)
    for part in trim:
        if part.seq_pos_max(seq_id) > ckpt.pos:  # a cache-wide scan otherwise
            part.seq_rm(seq_id, ckpt.pos + 1, -1)
    plan.commit()
    return ckpt.pos + 1
