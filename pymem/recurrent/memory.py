"""Recurrent state memory for SSM, RWKV and short-conv layers, with rollback snapshots.

A recurrent layer keeps one fixed-size state per sequence instead of one row per token:
``R`` (the conv / token-shift history, ``n_embd_r`` values) and ``S`` (the SSM / WKV
state, ``n_embd_s`` values). :class:`RecurrentMemory` is llama.cpp's
``llama_memory_recurrent``: same cell placement, same sequence-op results, same state
bytes. Parity is the point, so the reference's vocabulary is kept (``head``, ``used``,
``n``, ``rs_z``, ``src``, ``src0``, ``tail``, ``rs_idx``).

Layout of one layer's R (S is the same with ``n_embd_s`` columns)::

    row = plane * mem_size + cell          plane 0: the current state of each cell
                                           plane k: the state k tokens back (rollback)
    +-----------------------------+
    | cell 0 | cell 1 | ... | m-1 |  plane 0   <- what graphs read (via s_copy) and write
    +-----------------------------+
    | cell 0 | cell 1 | ... | m-1 |  plane 1   <- snapshots written by the kernels when
    +-----------------------------+               n_rs_seq > 0 (read once, then dropped)
    |            ...              |  ... up to plane n_rs_seq
    +-----------------------------+

Cells. Cell ``i`` stores one state (``pos`` = the position of the last token folded into
it, ``src`` = the row the state must be copied from before the next graph, ``src0`` = the
same, staged for the graph inputs). Cell ``i`` also doubles as the metadata slot of
*sequence* ``i``: ``tail[i]`` is the cell holding sequence ``i``'s state. A cell's
sequence set is therefore ``{s : tail[s] == i}``; the reference keeps an explicit
``std::set`` per cell that always agrees with ``tail`` (its own debug check verifies
exactly that), so pymem stores only ``tail`` and derives sets and counts from it with
numpy. Several sequences share one cell after ``seq_cp``; the next ubatch that advances
one of them copies the state on write into an empty cell.

Contracts (as ``llama_memory_i``; see :mod:`pymem.memory`): ``init_batch`` plans without
changing anything and ``MemoryContext.apply()`` is the only mutation of a decode.
Ranges are ``[p0, p1)`` with ``p0 < 0`` meaning 0 and ``p1 < 0`` meaning +infinity.

Reference quirks kept on purpose (each pinned by a test in tests/test_recurrent.py):

* ``seq_rm`` with a range that cuts the tail (``0 < p0 <= pos < p1``) is a *rollback*:
  True only when ``pos - p0 + 1 <= n_rs_seq`` and no rollback is pending for that
  sequence; otherwise False and nothing changes. A range that does not contain the tail
  position (``p1 <= pos`` or ``p0 > pos``) returns True and changes nothing.
* ``seq_rm(-1, ...)`` returns False and changes nothing, even for the whole range (the
  reference compares the seq id unsigned against ``n_seq_max`` first). ``clear()`` empties.
* ``seq_add`` / ``seq_div`` only move the tail cell's position; a position can go
  negative, and a cell with a negative position is then out of reach of ``seq_rm``
  (``p0`` is clamped to 0), exactly as in the reference.
* ``seq_keep`` with a seq id that no cell holds (or a negative one) empties everything.
* ``seq_cp`` ignores ``p0``/``p1`` and shares the source's cell.
* ``seq_pos_min == seq_pos_max`` (one state per sequence), except for a position that
  ``seq_add`` / ``seq_div`` made negative: ``seq_pos_min`` reports it, ``seq_pos_max``
  reports -1 (the reference starts its max at -1), so e.g. [-91, -1].
* ``state_write`` always writes the data header, even for zero cells.

Where the reference crashes or corrupts, pymem does better and says so:

* A failed ``state_read`` changes nothing (the reference empties the destination
  sequence, or the whole memory, and zeroes the rows it had taken). Parsing and
  validation finish before anything is touched (:meth:`RecurrentMemory.state_read_parse`).
* A whole-state write of a cell shared by sequences with different pending rollbacks
  raises :class:`~pymem.errors.StateError` (the reference aborts).
* A per-sequence blob with more than one cell raises ``StateError`` (the reference fails
  a ``GGML_ASSERT``); ``seq_div`` by 0 and out-of-int32 positions raise ``RangeError``.
* Pending rollbacks are consumed when the context is applied (the reference consumes them
  while setting the graph input ``s_copy``; nothing can observe the difference inside a
  decode), so :meth:`RecurrentMemoryContext.s_copy` is a pure getter. A freshly started
  sequence always gathers the zeroed state from plane 0 (the reference adds a stale
  rollback plane offset when the sequence had a pending rollback before it was dropped
  by ``seq_keep`` or overwritten by ``seq_cp``, reading an unrelated snapshot row).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pymem.errors import (
    BatchError,
    ClosedError,
    ConfigError,
    RangeError,
    StateError,
    UnsupportedError,
)
from pymem.memory import (
    POS_MAX,
    GraphInputs,
    Memory,
    MemoryContext,
    MemoryStatus,
    RSInputs,
    Split,
    StateFlags,
    clamp_range,
)
from pymem.state import PendingWrites, StateReader, StateWriter
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

if TYPE_CHECKING:
    from pymem.backend import Tensor, TensorStore
    from pymem.batch import BatchAllocator
    from pymem.spec import ModelSpec

log = logging.getLogger(__name__)

_I32_MIN = -(2**31)


def _c_div(a: int, d: int) -> int:
    """Integer division truncating toward zero, as C's ``/`` (Python's ``//`` floors).

    E.g. ``_c_div(-7, 2) == -3`` where ``-7 // 2 == -4``.
    """
    q = abs(a) // abs(d)
    return q if (a >= 0) == (d > 0) else -q


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive values, as half-open ``(first, last + 1)`` pairs.

    E.g. ``[4, 5, 6, 9, 10, 2] -> [(4, 7), (9, 11), (2, 3)]``.
    """
    if rows.size == 0:
        return []
    # a run breaks wherever the next row is not the previous one + 1
    # E.g., [4, 5, 6, 9, 10, 2] -> breaks after index 2 and 4 -> starts [0, 3, 5]
    brk = np.ones(rows.size, dtype=bool)
    np.not_equal(np.diff(rows), 1, out=brk[1:])
    starts = np.flatnonzero(brk).tolist()
    ends = [*starts[1:], rows.size]
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, ends)]


# --------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------


class RecurrentCells:
    """Cell metadata as parallel arrays (the reference's ``std::vector<mem_cell>``).

    ``pos``, ``src``, ``src0`` are per cell; ``tail`` is per sequence id (cell ``s`` of the
    reference holds sequence ``s``'s tail); ``rs_idx`` is the per-sequence pending
    rollback plane. Scalars ``head``, ``used``, ``n``, ``rs_z`` as in the reference.
    Sequence ops validate first and then change the live object in place. Plans
    (``prepare``, ``find_slot``, a state-read plan) run on a :meth:`copy`, which a commit
    swaps in only once the whole plan succeeded.
    """

    __slots__ = ("head", "n", "pos", "rs_idx", "rs_z", "size", "src", "src0", "tail", "used")

    def __init__(self, size: int, n_rs_idx: int) -> None:
        self.size = size
        self.pos = np.full(size, -1, dtype=np.int32)
        self.src = np.full(size, -1, dtype=np.int32)
        self.src0 = np.full(size, -1, dtype=np.int32)
        self.tail = np.full(size, -1, dtype=np.int32)
        self.rs_idx = np.zeros(n_rs_idx, dtype=np.uint32)
        self.head = 0
        self.used = 0
        self.n = 0
        self.rs_z = -1

    def copy(self) -> RecurrentCells:
        other = RecurrentCells.__new__(RecurrentCells)
        other.size = self.size
        other.pos = self.pos.copy()
        other.src = self.src.copy()
        other.src0 = self.src0.copy()
        other.tail = self.tail.copy()
        other.rs_idx = self.rs_idx.copy()
        other.head, other.used, other.n, other.rs_z = self.head, self.used, self.n, self.rs_z
        return other

    def seq_counts(self) -> np.ndarray:
        """Number of sequences in each cell. E.g. tail [2, -1, 2, 0] -> [1, 0, 2, 0]."""
        t = self.tail
        return np.bincount(t[t >= 0], minlength=self.size)

    def is_empty(self) -> np.ndarray:
        """Mask of cells that hold no sequence (the reference's ``is_empty()``)."""
        return self.seq_counts() == 0

    def seq_ids(self, cell: int) -> list[int]:
        """The ascending sequence ids held by ``cell`` (the reference's ``seq_id`` set)."""
        return np.flatnonzero(self.tail == cell).tolist()

    def has_seq(self, cell: int, seq_id: int) -> bool:
        return 0 <= seq_id < self.size and int(self.tail[seq_id]) == cell

    # -- the seq-removal primitive shared by seq_rm, seq_cp and find_slot ------------
    def drop_seq(self, seq_id: int) -> int:
        """Remove ``seq_id`` from its tail cell; empty the cell if it was the last one.

        Returns the emptied cell or -1. Does not touch ``used`` (callers follow their
        reference counterpart, which differ).
        """
        t = int(self.tail[seq_id])
        self.tail[seq_id] = -1
        if t >= 0 and not (self.tail == t).any():
            self.pos[t] = -1
            self.src[t] = -1
            return t
        return -1


@dataclass
class _SlotRequest:
    """What ``find_slot`` needs from a ubatch: one row per sequence set.

    ``ids`` is ``[n_seqs, k]`` padded with -1 (``ids[s, 0]`` is the set's primary sequence),
    ``last_pos[s]`` the position of the set's last token. Extracted (and its ids checked)
    once per ubatch: planning and applying reuse it.
    """

    ids: np.ndarray
    n_ids: np.ndarray
    last_pos: np.ndarray
    n_seq_tokens: int
    all_ids: np.ndarray = field(init=False)  # every id, set by set
    coupled: bool = field(init=False)  # some set has more than one sequence
    error: str = field(init=False, default="")  # why no memory can place it, or ""

    def __post_init__(self) -> None:
        self.coupled = self.ids.shape[1] > 1 and bool((self.n_ids > 1).any())
        if self.coupled:
            # E.g., n_ids [1, 2] with k=2 -> [[True, False], [True, True]]
            self.all_ids = self.ids[np.arange(self.ids.shape[1]) < self.n_ids[:, None]]
        else:
            self.all_ids = self.ids[:, 0]
        if self.all_ids.size == 0 or int(self.all_ids.min()) < 0:
            self.error = "a set without a valid (non-negative) sequence id"
        elif self.all_ids.size > 1 and int(np.bincount(self.all_ids).max()) > 1:
            self.error = "a sequence appears in more than one set of the ubatch"

    @classmethod
    def from_ubatch(cls, ubatch: UBatch) -> _SlotRequest:
        if not ubatch.equal_seqs:
            raise BatchError(
                "ubatch.equal_seqs: recurrent memory needs equal-sequence ubatches "
                "(split_equal or split_seq), got a split_simple ubatch"
            )
        n_seq_tokens, n_seqs = int(ubatch.n_seq_tokens), int(ubatch.n_seqs)
        if n_seqs < 1 or n_seq_tokens < 1:
            raise BatchError(
                f"ubatch: needs n_seqs >= 1 and n_seq_tokens >= 1, got {n_seqs} and {n_seq_tokens}"
            )
        # the first token of each set: E.g., n_seq_tokens 3, n_seqs 2 -> [0, 3]; last -> [2, 5]
        first = np.arange(0, n_seqs * n_seq_tokens, n_seq_tokens)
        return cls(
            ids=np.asarray(ubatch.seq_id)[first],
            n_ids=np.asarray(ubatch.n_seq_id)[first],
            last_pos=np.asarray(ubatch.pos, dtype=np.int32)[first + (n_seq_tokens - 1)],
            n_seq_tokens=n_seq_tokens,
        )


def _find_slot(c: RecurrentCells, req: _SlotRequest) -> bool:
    """Place one ubatch's sequence sets in ``c`` (mutated), as the reference's ``find_slot``.

    On False, ``c`` may be partly changed: callers run this on a copy.

    1. every sequence of a set gets an exclusively owned cell: a sequence sharing its cell
       (after ``seq_cp``) moves to the next empty cell, taking ``pos`` and ``src`` along
       (copy on write, resolved in-graph through ``src0``); a new sequence takes the next
       empty cell (searched cyclically from ``head``);
    2. cells are swapped so that set ``s`` lives in cell ``min + s`` (contiguous, ubatch
       order); ``pos`` becomes the set's last position;
    3. ``rs_z`` = the first cell in ``[min, max]`` that no cell uses as ``src`` (zeroed by
       the graph, the initial state of new sequences); every cell of the range gets
       ``src0`` (where its state comes from) and ``src = itself``.

    The steady state of a decode (every sequence already owns its cell, cells in ubatch
    order) touches only a handful of whole-array operations.
    """
    size = c.size
    ids, n_ids = req.ids, req.n_ids
    n_seqs = ids.shape[0]

    # the reference's head heuristic: restart the search if many cells before head are free
    if c.head > c.used + 2 * n_seqs:
        c.head = 0

    coupled_sets, all_ids = req.coupled, req.all_ids
    if req.error:
        log.error("find_slot: %s", req.error)
        return False
    if int(all_ids.max()) >= size:
        log.error(
            "find_slot: seq_id=%d >= n_seq_max=%d Try using a bigger --parallel value",
            int(all_ids.max()), size,
        )  # fmt: skip
        return False

    # -- coupled sequences (ids[s, j > 0]) leave their cells; they join set s's cell below
    if coupled_sets:
        coupled = ids[:, 1:][np.arange(1, ids.shape[1]) < n_ids[:, None]]
        old = c.tail[coupled]
        c.tail[coupled] = -1
        left = np.unique(old[old >= 0])
        if left.size:
            emptied = left[c.seq_counts()[left] == 0]
            c.pos[emptied] = -1
            c.src[emptied] = -1
            c.used -= int(emptied.size)

    # -- 1. an owned cell for every set's primary sequence ---------------------------
    primaries = ids[:, 0]
    counts = c.seq_counts()
    t = c.tail[primaries]
    # the steady state: every set already owns its cell (t >= 0 and alone in it)
    n_need = 0
    if int(t.min()) < 0 or not bool((counts[t] == 1).all()):
        has = t >= 0
        owned = np.zeros(n_seqs, dtype=bool)
        shared = np.flatnonzero(has)
        if shared.size:
            owned[shared] = _last_owner(t[shared], counts)
        need = np.flatnonzero(~owned)
        n_need = need.size
    if n_need:
        # empty cells in cyclic order from head: E.g., empty [0, 2, 6], head 3 -> [6, 0, 2]
        empty = np.flatnonzero(counts == 0)
        cyc = np.concatenate((empty[empty >= c.head], empty[empty < c.head]))
        if cyc.size < n_need:
            log.error("find_slot: %d sets need a cell, only %d cells are empty", n_need, cyc.size)
            return False
        new = cyc[:n_need]
        old_t = t[need]
        cow = old_t >= 0
        # copy on write: the new cell starts as the shared one (state copied in-graph)
        c.pos[new[cow]] = c.pos[old_t[cow]]
        c.src[new[cow]] = c.src[old_t[cow]]
        c.tail[primaries[need]] = new
        t[need] = new

    lo, hi = int(t.min()), int(t.max())

    # -- 2. gather: set s must live in cell lo + s ------------------------------------
    target = np.arange(lo, lo + n_seqs)
    mism = np.flatnonzero(t != target)
    if mism.size:
        _reorder(c, t, int(mism[0]), lo, hi)

    last_pos = req.last_pos
    prev = c.pos[target]
    jump = (prev >= 0) & (last_pos - prev != req.n_seq_tokens)  # a warning only: int32 is fine
    if jump.any():
        j = int(np.flatnonzero(jump)[0])
        log.warning(
            "find_slot: non-consecutive token position %d after %d for sequence %d with %d new tokens",
            int(last_pos[j]), int(prev[j]), int(primaries[j]), req.n_seq_tokens,
        )  # fmt: skip
    c.pos[target] = last_pos
    if coupled_sets:
        # every id of set s (primary and coupled) now has cell lo + s as its tail
        # E.g., ids [[1, -1], [2, 3]], lo 4 -> tail[1] = 4, tail[2] = tail[3] = 5
        c.tail[all_ids] = np.repeat(target, n_ids)

    # -- 3. zero state, sources ---------------------------------------------------------
    src = c.src
    refs = np.bincount(src[src >= 0], minlength=size)
    free = np.flatnonzero(refs[lo : hi + 1] == 0)
    c.rs_z = lo + int(free[0]) if free.size else -1
    src_rng = src[lo : hi + 1]
    miss = src_rng < 0
    if miss.any():
        if c.rs_z < 0:
            log.error("find_slot: no cell in [%d, %d] can hold the zero state", lo, hi)
            return False
        c.src0[lo : hi + 1] = np.where(miss, c.rs_z, src_rng)
    else:
        c.src0[lo : hi + 1] = src_rng
    c.src[lo : hi + 1] = np.arange(lo, hi + 1)

    c.head = lo
    c.n = hi - lo + 1
    if n_need or coupled_sets:
        counts = c.seq_counts()
    c.used = int(np.count_nonzero(counts))  # swaps permute cells: the count is unchanged
    return c.n >= n_seqs


def _last_owner(tt: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Which of the ubatch's sets keep the cell they share with other sequences.

    The reference walks the sets in order and erases each mover from its old cell, so
    among the sets whose sequences share one cell, only the last can own it, and only if
    every sequence of that cell is in the ubatch. ``tt`` are the sets' cells in set order.
    E.g., cell 5 = {0, 3}, sets (seq 3, seq 0): tt [5, 5], counts[5] = 2, ranks [0, 1]
    -> [False, True]: seq 3 moves out, seq 0 keeps cell 5.
    """
    order = np.argsort(tt, kind="stable")  # sets grouped by cell, set order inside
    st = tt[order]
    first = np.ones(st.size, dtype=bool)
    np.not_equal(st[1:], st[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    # rank inside the group: E.g., st [2, 5, 5, 7] -> starts [0, 1, 3] -> [0, 0, 1, 0]
    rank_sorted = np.arange(st.size) - starts[np.cumsum(first) - 1]
    rank = np.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank == counts[tt] - 1


def _reorder(c: RecurrentCells, t: np.ndarray, s0: int, lo: int, hi: int) -> None:
    """Swap cells so that set ``s`` ends in cell ``lo + s``, exactly as the reference.

    The reference swaps cell contents one set at a time (``dst = lo + s`` with the cell
    currently holding set ``s``), and where the *other* cells end up depends on that
    order, which later placement and whole-state blobs expose. The swap chain is
    inherently sequential, so it is simulated on index lists over the window
    ``[lo, hi]`` (one step per sequence set from the first misplaced one; no per-cell
    or per-token work), then applied to the arrays in one vectorised permutation.
    """
    width = hi - lo + 1
    at = list(range(width))  # at[x]: original window index of the content now at x
    where = list(range(width))  # where[o]: current window index of original content o
    t_rel = (t - lo).tolist()
    for s in range(s0, len(t_rel)):
        src = where[t_rel[s]]
        if src != s:
            a, b = at[s], at[src]
            at[s], at[src] = b, a
            where[a], where[b] = src, s
    perm = np.asarray(at, dtype=np.int64) + lo
    c.pos[lo : hi + 1] = c.pos[perm]
    c.src[lo : hi + 1] = c.src[perm]
    # tails follow their content: E.g., content of cell 7 moved to 4 -> tail 7 becomes 4
    inv = np.asarray(where, dtype=np.int32) + lo
    tl = c.tail
    moved = (tl >= lo) & (tl <= hi)
    tl[moved] = inv[tl[moved] - lo]


def _seq_rm(
    c: RecurrentCells, n_seq_max: int, n_rs_seq: int, seq_id: int, p0: int, p1: int
) -> bool:
    """The reference's ``seq_rm`` on ``c`` (mutated), with ``p0``/``p1`` already clamped.

    Order matters for parity: the seq id is checked against ``n_seq_max`` as unsigned
    (so every negative id fails), a whole-range removal resets the rollback index even
    when the id is then refused for being ``>= mem_size``, and only a range holding the
    tail position removes anything.
    """
    if seq_id < 0 or seq_id >= n_seq_max:
        log.error("seq_rm: invalid seq_id (%d) - larger than n_seq_max (%d)", seq_id, n_seq_max)
        return False
    if p0 == 0 and p1 == POS_MAX:
        c.rs_idx[seq_id] = 0
    if seq_id >= c.size:
        return False
    t = int(c.tail[seq_id])
    if t < 0:
        return True
    pos = int(c.pos[t])
    if 0 < p0 <= pos < p1:
        # cutting the tail: only a rollback through a snapshot plane can serve it
        rollback = pos - (p0 - 1)
        if c.rs_idx[seq_id] == 0 and 1 <= rollback <= n_rs_seq:
            c.rs_idx[seq_id] = rollback
            c.pos[t] = p0 - 1
            return True
        return False
    if not p0 <= pos < p1:
        return True  # the range misses the tail position: nothing to remove (reference quirk)
    emptied = c.drop_seq(seq_id)
    if emptied >= 0:
        c.used -= 1
        c.head = min(c.head, emptied)
    return True


# --------------------------------------------------------------------------------------
# the memory
# --------------------------------------------------------------------------------------


def _resolve_devices(device: Any, layers: Sequence[int]) -> dict[int, Any]:
    """Per-layer device choice: one name/Device, a mapping il -> device, a sequence
    indexed by il, or a callable ``il -> device``."""
    if isinstance(device, Mapping):
        out = {}
        for il in layers:
            if il not in device:
                raise ConfigError(
                    f"device: no device given for recurrent layer {il} (mapping keys {sorted(device)})"
                )
            out[il] = device[il]
        return out
    if callable(device) and not isinstance(device, str):
        return {il: device(il) for il in layers}
    if isinstance(device, Sequence) and not isinstance(device, str):
        if layers and max(layers) >= len(device):
            raise ConfigError(
                f"device: sequence of {len(device)} devices does not cover layer {max(layers)}"
            )
        return {il: device[il] for il in layers}
    return dict.fromkeys(layers, device)


@dataclass
class RecurrentPlan:
    """Placement of a batch's ubatches, computed without changing the memory.

    ``states[i]`` are the cells after ubatch ``i``; they hold when the memory is still at
    ``version`` with the cells object ``base`` (ubatch 0), or at the state applied for
    ubatch ``i - 1``. Rollback indices are not part of a placement (``find_slot`` never
    changes them): the live ones carry over.
    """

    requests: list[_SlotRequest]
    states: list[RecurrentCells]
    base: RecurrentCells
    version: int


class RecurrentMemory(Memory):
    """Recurrent (SSM) state memory: ``llama_memory_recurrent``.

    Parameters mirror the reference constructor:

    * ``spec``: every model layer; ``n_layer`` in state blobs is ``spec.n_layer``.
    * ``type_r`` / ``type_s``: ggml types of R and S (the reference always uses f32).
    * ``device``: one device for all layers, or per layer (mapping ``il -> device``, a
      sequence indexed by ``il``, or a callable). One tensor store per distinct device.
    * ``mem_size``: number of cells (the reference passes ``max(1, n_seq_max)``); default
      ``max(1, n_seq_max)``.
    * ``n_seq_max``: sequence ids must be below it (and below ``mem_size``).
    * ``n_rs_seq``: rollback snapshots per sequence; tensors get ``1 + n_rs_seq`` planes.
    * ``filter``: ``il -> bool``, which layers get R/S. ``None`` means every layer, as in
      the reference (hybrid memories pass ``spec.is_recurrent``).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        type_r: Any = "f32",
        type_s: Any = "f32",
        device: Any = "CPU",
        mem_size: int | None = None,
        n_seq_max: int = 1,
        n_rs_seq: int = 0,
        filter: Callable[[int], bool] | None = None,
    ) -> None:
        from pymem.backend import TensorSpec, TensorStore, get_device
        from pymem.types import ggml_type

        for name, value, lo, hi in (
            ("n_seq_max", n_seq_max, 1, LLAMA_MAX_SEQ),
            ("n_rs_seq", n_rs_seq, 0, 1 << 16),
        ):
            if (
                not isinstance(value, (int, np.integer))
                or isinstance(value, bool)
                or not lo <= value <= hi
            ):
                raise ConfigError(f"{name}: must be an int in [{lo}, {hi}], got {value!r}")
        if mem_size is None:
            mem_size = max(1, int(n_seq_max))
        if (
            not isinstance(mem_size, (int, np.integer))
            or isinstance(mem_size, bool)
            or not 1 <= mem_size <= 1 << 20
        ):
            raise ConfigError(f"mem_size: must be an int in [1, {1 << 20}], got {mem_size!r}")

        self.spec = spec
        self.size = int(mem_size)
        self.n_seq_max = int(n_seq_max)
        self.n_rs_seq = int(n_rs_seq)
        self.type_r = ggml_type(type_r)
        self.type_s = ggml_type(type_s)
        self.n_embd_r = int(spec.n_embd_r())
        self.n_embd_s = int(spec.n_embd_s())

        self.layers: tuple[int, ...] = tuple(
            il for il in range(spec.n_layer) if filter is None or filter(il)
        )
        # n_embd_s may be 0 (LFM2's short-conv layers keep only R): the reference then
        # allocates a zero-width S and still writes its header in the state
        if self.layers and (self.n_embd_r < 1 or self.n_embd_s < 0):
            raise ConfigError(
                f"spec: recurrent layers need n_embd_r >= 1 and n_embd_s >= 0, got {self.n_embd_r} and "
                f"{self.n_embd_s}"
            )
        self.n_rows = self.size * (1 + self.n_rs_seq)

        # per device, in device-name order (the reference orders buffer types by name)
        per_layer = {il: get_device(d) for il, d in _resolve_devices(device, self.layers).items()}
        by_dev: dict[str, list[int]] = {}
        for il in self.layers:
            by_dev.setdefault(per_layer[il].name, []).append(il)
        self._stores: list[TensorStore] = []
        self._r: dict[int, Tensor] = {}
        self._s: dict[int, Tensor] = {}
        try:
            for dev_name in sorted(by_dev):
                ils = by_dev[dev_name]
                specs = []
                for il in ils:
                    specs.append(
                        TensorSpec(f"cache_r_l{il}", self.type_r, (self.n_embd_r, self.n_rows))
                    )
                    specs.append(
                        TensorSpec(f"cache_s_l{il}", self.type_s, (self.n_embd_s, self.n_rows))
                    )
                store = TensorStore(per_layer[ils[0]], specs)
                self._stores.append(store)
                for il in ils:
                    self._r[il] = store[f"cache_r_l{il}"]
                    self._s[il] = store[f"cache_s_l{il}"]
        except Exception:
            self.close()
            raise

        # seq ids stored in cells are < size; rs_idx is indexed by any id < n_seq_max too
        self.cells = RecurrentCells(self.size, max(self.size, self.n_seq_max))
        self._version = 0  # bumped on every mutation: a stale read plan refuses to commit
        self._closed = False

    # -- small accessors ---------------------------------------------------------------
    @property
    def head(self) -> int:
        return self.cells.head

    @property
    def used(self) -> int:
        return self.cells.used

    @property
    def n(self) -> int:
        return self.cells.n

    @property
    def rs_z(self) -> int:
        return self.cells.rs_z

    @property
    def rs_idx(self) -> np.ndarray:
        """Pending rollback plane per sequence id (read-only copy)."""
        return self.cells.rs_idx[: self.n_seq_max].copy()

    def get_r_l(self, il: int) -> Tensor:
        """R (conv / token-shift state) of layer ``il``: ``[n_embd_r, mem_size * (1 + n_rs_seq)]``."""
        return self._tensor(self._r, il, "R")

    def get_s_l(self, il: int) -> Tensor:
        """S (SSM / WKV state) of layer ``il``: ``[n_embd_s, mem_size * (1 + n_rs_seq)]``."""
        return self._tensor(self._s, il, "S")

    def _tensor(self, table: dict[int, Tensor], il: int, what: str) -> Tensor:
        self.check_open()
        try:
            return table[il]
        except KeyError:
            raise RangeError(
                f"il: layer {il} has no {what} tensor in this memory (layers {list(self.layers)})"
            ) from None

    def check_open(self) -> None:
        if self._closed:
            raise ClosedError("RecurrentMemory: already closed")

    def _commit(self, cells: RecurrentCells) -> None:
        self.cells = cells
        self._version += 1

    # -- planning ----------------------------------------------------------------------
    def splits(self, balloc: BatchAllocator, n_ubatch: int, embd_all: bool) -> list[Split]:
        """``embd_all`` -> ``split_seq``; else ``split_equal(n_ubatch, sequential=True,
        n_keep_tail = n_rs_seq + 1 if n_rs_seq > 0 else 0)`` so that the last
        ``n_rs_seq + 1`` tokens of a sequence land in one ubatch (the snapshots a later
        rollback needs are written by that ubatch's kernels)."""
        if embd_all:
            return [lambda: balloc.split_seq(n_ubatch)]
        n_keep_tail = self.n_rs_seq + 1 if self.n_rs_seq > 0 else 0
        return [lambda: balloc.split_equal(n_ubatch, True, n_keep_tail)]

    def failed_context(self, status: MemoryStatus) -> RecurrentMemoryContext:
        return RecurrentMemoryContext.failed(status)

    def init_full(self) -> RecurrentMemoryContext:
        """A context covering every cell (worst-case graph reservation)."""
        self.check_open()
        return RecurrentMemoryContext(self, None, is_full=True)

    def init_update(self, optimize: bool = False) -> RecurrentMemoryContext:
        """Recurrent memory never has pending updates: always ``NO_UPDATE``."""
        return RecurrentMemoryContext.failed(MemoryStatus.NO_UPDATE)

    def get_can_shift(self) -> bool:
        return True  # shifting a recurrent state only moves its position

    def prepare(self, ubatches: Sequence[UBatch]) -> RecurrentPlan | None:
        """Place every ubatch in order on copies of the cells; None if one does not fit.

        Changes nothing. A context made by :meth:`context_for` applies the planned cells
        as long as the memory has not changed since, instead of placing again.
        """
        self.check_open()
        reqs = [_SlotRequest.from_ubatch(ub) for ub in ubatches]
        states: list[RecurrentCells] = []
        cells = self.cells
        for req in reqs:
            cells = cells.copy()
            if not _find_slot(cells, req):
                return None
            states.append(cells)
        return RecurrentPlan(reqs, states, self.cells, self._version)

    def context_for(
        self, plan: RecurrentPlan, ubatches: Sequence[UBatch]
    ) -> RecurrentMemoryContext:
        """A batch context from a :meth:`prepare` of the same ubatches (no re-planning)."""
        return RecurrentMemoryContext(self, ubatches, requests=plan.requests, plan=plan)

    def find_slot(self, ubatch: UBatch) -> bool:
        """Place ``ubatch`` now (what ``apply`` does). On False nothing changes."""
        self.check_open()
        return self._place(_SlotRequest.from_ubatch(ubatch))

    def _place(self, req: _SlotRequest) -> bool:
        cells = self.cells.copy()
        if not _find_slot(cells, req):
            return False
        self._commit(cells)
        return True

    # -- sequence operations -----------------------------------------------------------
    def clear(self, data: bool = True) -> None:
        """Empty every cell (``src0`` is kept, as in the reference); zero R/S if ``data``."""
        self.check_open()
        c = self.cells
        c.pos[:] = -1
        c.src[:] = -1
        c.tail[:] = -1
        c.head = 0
        c.used = 0
        c.rs_idx[:] = 0
        if data:
            for store in self._stores:
                store.clear(0)
        self._version += 1

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove ``[p0, p1)`` of ``seq_id``; see the module notes for the exact results.

        A recurrent state cannot lose its last tokens, except through a rollback plane:
        with ``0 < p0 <= pos < p1``, ``pos - (p0 - 1) <= n_rs_seq`` and no rollback
        pending, the sequence goes back to ``p0 - 1`` (True); any other cut of the tail
        is False with nothing changed. ``seq_id < 0`` is always False (reference quirk).
        """
        self.check_open()
        self._version += 1
        return _seq_rm(self.cells, self.n_seq_max, self.n_rs_seq, int(seq_id), *clamp_range(p0, p1))

    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make ``dst`` share ``src``'s cell (copy on write at its next ubatch).

        ``p0``/``p1`` are ignored (one state per sequence). Ids outside ``[0, mem_size)``
        make this a no-op, as in the reference.
        """
        self.check_open()
        src, dst = int(seq_id_src), int(seq_id_dst)
        if src == dst or not (0 <= src < self.size and 0 <= dst < self.size):
            return
        c = self.cells
        if c.tail[dst] >= 0 and c.drop_seq(dst) >= 0:
            c.used -= 1
        c.tail[dst] = c.tail[src]
        self._version += 1

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but ``seq_id`` (all of them if no cell holds ``seq_id``)."""
        self.check_open()
        seq_id = int(seq_id)
        c = self.cells
        keep = int(c.tail[seq_id]) if 0 <= seq_id < self.size else -1
        others = np.arange(self.size) != seq_id
        c.tail[others] = -1
        # E.g., keep cell 2 of 4 -> cleared [0, 1, 3]; used drops by those with pos >= 0
        cleared = np.flatnonzero(np.arange(self.size) != keep)
        c.used -= int(np.count_nonzero(c.pos[cleared] >= 0))
        c.pos[cleared] = -1
        c.src[cleared] = -1
        if cleared.size:
            c.head = min(c.head, int(cleared[0]))
        self._version += 1

    def _tail_in_range(self, seq_id: int, p0: int, p1: int) -> int:
        if not 0 <= seq_id < self.size:
            return -1
        t = int(self.cells.tail[seq_id])
        if t >= 0 and p0 <= int(self.cells.pos[t]) < p1:
            return t
        return -1

    # what an op would refuse, checked without changing anything: compositions ask every
    # part before mutating any (pymem.composite); seq_cp never refuses here
    def check_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        self.check_open()

    def check_seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.check_open()
        p0, p1 = clamp_range(p0, p1)
        shift = int(shift)
        t = self._tail_in_range(int(seq_id), p0, p1) if shift and p0 != p1 else -1
        if t >= 0 and not _I32_MIN <= int(self.cells.pos[t]) + shift <= POS_MAX:
            raise RangeError(
                f"seq_add: position {int(self.cells.pos[t])} + shift {shift} = "
                f"{int(self.cells.pos[t]) + shift} leaves int32"
            )

    def check_seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self.check_open()
        if int(d) == 0:
            raise RangeError("seq_div: d must not be 0")

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Add ``shift`` to the position of ``seq_id``'s cell if it lies in ``[p0, p1)``.

        Only the position moves (there is nothing to rotate in a recurrent state). The
        cell is kept even when its position drops below 0, as in the reference.
        """
        self.check_open()
        shift = int(shift)
        if shift == 0:
            return
        p0, p1 = clamp_range(p0, p1)
        if p0 == p1:
            return
        t = self._tail_in_range(int(seq_id), p0, p1)
        if t < 0:
            return
        new = int(self.cells.pos[t]) + shift
        if not _I32_MIN <= new <= POS_MAX:
            raise RangeError(
                f"seq_add: position {int(self.cells.pos[t])} + shift {shift} = {new} leaves int32"
            )
        c = self.cells
        c.pos[t] = new
        self._version += 1

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Divide the position of ``seq_id``'s cell by ``d`` (truncating, as C) if in range."""
        self.check_open()
        d = int(d)
        if d == 1:
            return
        if d == 0:
            raise RangeError("seq_div: d must not be 0")
        p0, p1 = clamp_range(p0, p1)
        if p0 == p1:
            return
        t = self._tail_in_range(int(seq_id), p0, p1)
        if t < 0:
            return
        c = self.cells
        c.pos[t] = _c_div(int(c.pos[t]), d)
        self._version += 1

    def seq_pos_min(self, seq_id: int) -> int:
        """The position of ``seq_id``'s state, or -1 when it has none.

        A negative position (``seq_add`` / ``seq_div`` moved it below 0) is reported as
        it is, as the reference's minimum over the cells holding the sequence.
        """
        seq_id = int(seq_id)
        if not 0 <= seq_id < self.size:
            return -1
        t = int(self.cells.tail[seq_id])
        return int(self.cells.pos[t]) if t >= 0 else -1

    def seq_pos_max(self, seq_id: int) -> int:
        """The position of ``seq_id``'s state, never below -1.

        The reference's maximum starts at -1, so a negative position reads as -1 here while
        :meth:`seq_pos_min` reports it: after ``seq_add(s, -1, -1, -100)`` on a state at
        position 9 the pair is ``(-91, -1)``, and the next batch for ``s`` starts at 0.
        """
        return max(-1, self.seq_pos_min(seq_id))

    # -- accounting ---------------------------------------------------------------------
    def parts(self) -> dict[str, RecurrentMemory]:
        return {"recurrent": self}

    def cell_owners(self) -> np.ndarray:
        cells = self.cells
        owners = np.full(cells.size, -1, dtype=np.int32)
        seqs = np.flatnonzero(cells.tail >= 0)
        owners[cells.tail[seqs]] = seqs  # E.g. tail [2, -1, 2, 0] -> owners [3, -1, 2 or 0, -1]
        owners[cells.seq_counts() > 1] = -2
        return owners

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes allocated per device name."""
        out: dict[str, int] = {}
        for store in self._stores:
            out[store.device.name] = out.get(store.device.name, 0) + store.nbytes
        return out

    def close(self) -> None:
        for store in getattr(self, "_stores", []):
            store.close()
        self._closed = True

    # -- state: selection ---------------------------------------------------------------
    def _select(self, seq_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Selected cells (ascending) and the row each one's *logical* state is read from.

        Row = ``rs_idx_cur * mem_size + (src if src >= 0 else cell)``: a pending copy on
        write and a pending rollback plane are resolved, so the blob holds the state the
        sequence would continue from. Rollback planes themselves are not saved.
        """
        c = self.cells
        if seq_id == -1:
            cells = np.flatnonzero(c.seq_counts())
        elif 0 <= seq_id < self.size and c.tail[seq_id] >= 0:
            cells = np.array([c.tail[seq_id]], dtype=np.int64)
        else:
            cells = np.zeros(0, dtype=np.int64)
        src = c.src[cells].astype(np.int64)
        rows = np.where(src >= 0, src, cells)
        if self.n_rs_seq and cells.size:
            if seq_id != -1:
                rows = rows + int(c.rs_idx[seq_id]) * self.size
            else:
                # every sequence of a cell must agree on its pending rollback
                seqs = np.flatnonzero(c.tail >= 0)
                cell_of = c.tail[seqs]
                idx = c.rs_idx[seqs].astype(np.int64)
                lo = np.full(self.size, np.iinfo(np.int64).max)
                hi = np.full(self.size, -1, dtype=np.int64)
                np.minimum.at(lo, cell_of, idx)
                np.maximum.at(hi, cell_of, idx)
                if (lo[cells] != hi[cells]).any():
                    bad = int(cells[np.flatnonzero(lo[cells] != hi[cells])[0]])
                    raise StateError(
                        f"state_write: cell {bad} is shared by sequences {c.seq_ids(bad)} with different "
                        f"pending rollbacks {[int(c.rs_idx[s]) for s in c.seq_ids(bad)]}; decode or remove "
                        "one of them first"
                    )
                rows = rows + hi[cells] * self.size
        return cells, rows

    def _meta_words(self, cells: np.ndarray, seq_id: int) -> np.ndarray:
        """The META section as int32 words: ``pos, n_seq_id, seq ids...`` per cell.

        Per-sequence blobs write ``n_seq_id = 0`` (no ids); whole-state blobs list every
        sequence of the cell, ascending.
        """
        c = self.cells
        k = cells.size
        if seq_id != -1:
            out = np.zeros(2 * k, dtype=np.int32)
            out[0::2] = c.pos[cells]
            return out
        seqs = np.flatnonzero(c.tail >= 0)
        # sequences grouped by cell in cell order, ascending inside a cell
        # E.g., tail [1, -1, 0, 1] -> seqs [0, 2, 3] -> cells [1, 0, 1] -> order [2, 0, 3]
        seqs = seqs[np.argsort(c.tail[seqs], kind="stable")]
        n = c.seq_counts()[cells]
        # cell j's header sits after 2 words per earlier cell plus their ids
        # E.g., n [1, 2, 1] -> off [0, 3, 7], ids at [2 | 5, 6 | 9]
        n_before = np.cumsum(n) - n
        off = 2 * np.arange(k) + n_before
        out = np.empty(2 * k + int(n.sum()), dtype=np.int32)
        out[off] = c.pos[cells]
        out[off + 1] = n
        out[np.repeat(off + 2, n) + (np.arange(n.sum()) - np.repeat(n_before, n))] = seqs
        return out

    # -- state: write ---------------------------------------------------------------------
    def _check_seq_arg(self, seq_id: int, what: str) -> int:
        seq_id = int(seq_id)
        if seq_id < -1:
            raise RangeError(f"{what}: seq_id must be -1 (all) or >= 0, got {seq_id}")
        return seq_id

    @staticmethod
    def _check_flags(flags: int, what: str) -> int:
        flags = int(flags)
        if flags & StateFlags.ON_DEVICE:
            raise UnsupportedError(
                f"{what}: flags ON_DEVICE (device-resident sequence states) is not supported"
            )
        if flags & ~int(StateFlags.PARTIAL_ONLY | StateFlags.ON_DEVICE):
            raise RangeError(f"{what}: unknown flag bits in {flags:#x}")
        return flags

    def state_write_into(self, writer: StateWriter, seq_id: int = -1, flags: int = 0) -> None:
        """Serialise (whole memory for ``seq_id == -1``, else one sequence) into ``writer``.

        Layout (section b.3): ``u32 cell_count``, META per cell, then DATA (always):
        ``u32 s_trans = 0``, ``u32 n_layer`` (all model layers), per R layer ``i32 type,
        u64 row_size, rows``, then per S layer the same. ``PARTIAL_ONLY`` changes nothing
        here: recurrent state is the partial part.
        """
        self.check_open()
        seq_id = self._check_seq_arg(seq_id, "state_write")
        self._check_flags(flags, "state_write")
        cells, rows = self._select(seq_id)
        writer.write_u32(int(cells.size))
        if cells.size:
            writer.write_array(self._meta_words(cells, seq_id))
        runs = _runs(rows)
        writer.write_u32(0)  # s_trans: the transposed layout is never written
        writer.write_u32(self.spec.n_layer)
        for table in (self._r, self._s):
            for il in self.layers:
                t = table[il]
                writer.write_i32(t.type.id)
                writer.write_u64(t.row_size)
                for a, b in runs:
                    writer.write_tensor(t, a * t.row_size, (b - a) * t.row_size)

    # -- state: read ------------------------------------------------------------------------
    def state_read_parse(
        self, reader: StateReader, seq_id: int = -1, flags: int = 0
    ) -> RecurrentReadPlan:
        """Parse and validate one recurrent state section; change nothing.

        Returns a plan whose ``commit()`` applies it (new cells, tensor rows, and for a
        whole-memory restore the zeroing of every R/S byte, as the reference's
        ``clear(true)``). Raises :class:`StateError` on any problem in the blob.

        Whole (``seq_id == -1``): cells are restored to ``[0, cell_count)`` with their
        sequence sets, ``head = 0``, ``used = cell_count``. Per sequence: the destination
        is emptied, the (one) cell is placed by ``find_slot`` as a one-token ubatch, and
        its rows are read at ``head``. Restored cells get ``src = self``; rollback
        indices reset.
        """
        self.check_open()
        seq_id = self._check_seq_arg(seq_id, "state_read")
        self._check_flags(flags, "state_read")
        if seq_id != -1 and seq_id >= min(self.size, self.n_seq_max):
            raise RangeError(
                f"state_read: seq_id {seq_id} must be < n_seq_max ({self.n_seq_max}) and < mem_size ({self.size})"
            )
        cell_count = reader.read_u32("recurrent cell_count")
        if cell_count > self.size:
            raise StateError(
                f"not enough cells in recurrent memory: blob holds {cell_count}, mem_size is {self.size}"
            )
        if seq_id == -1:
            cells = self._parse_meta_whole(reader, cell_count)
        else:
            cells = self._parse_meta_seq(reader, cell_count, seq_id)
        head = cells.head
        writes = self._parse_data(reader, cell_count, head)
        return RecurrentReadPlan(
            self, cells, writes, clear_data=seq_id == -1, version=self._version
        )

    def _parse_meta_whole(self, reader: StateReader, cell_count: int) -> RecurrentCells:
        c = RecurrentCells(self.size, self.cells.rs_idx.size)
        c.src0[:] = self.cells.src0  # clear() keeps src0, n and rs_z
        c.n, c.rs_z = self.cells.n, self.cells.rs_z
        if cell_count:
            pos, cell_of, seqs = _read_meta_cells(reader, cell_count)
            limit = min(self.n_seq_max, self.size)
            bad = (seqs < 0) | (seqs >= limit)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise StateError(
                    f"invalid seq_id, {int(seqs[j])} is out of range [0, {limit}) (cell {int(cell_of[j])})"
                )
            uniq, cnt = np.unique(seqs, return_counts=True)
            if (cnt > 1).any():
                s = int(uniq[np.flatnonzero(cnt > 1)[0]])
                where = cell_of[seqs == s]
                raise StateError(
                    f"duplicate tail for seq_id {s} in cell {int(where[1])} and {int(where[0])}"
                )
            c.pos[:cell_count] = pos
            c.tail[seqs] = cell_of
            c.src[:cell_count] = np.arange(cell_count)
        c.head = 0
        c.used = cell_count
        return c

    def _parse_meta_seq(self, reader: StateReader, cell_count: int, dest: int) -> RecurrentCells:
        c = self.cells.copy()
        # empty the destination first (the reference's seq_rm(dest, -1, -1))
        _seq_rm(c, self.n_seq_max, self.n_rs_seq, dest, 0, POS_MAX)
        if cell_count == 0:
            return c
        if cell_count > 1:
            raise StateError(
                f"per-sequence recurrent state holds {cell_count} cells; a sequence has exactly one state cell"
            )
        pos = reader.read_i32("recurrent cell pos")
        n_seq_id = reader.read_u32("recurrent cell n_seq_id")
        if n_seq_id != 0:
            raise StateError(
                f"invalid seq_id-agnostic recurrent cell: n_seq_id is {n_seq_id}, expected 0"
            )
        req = _SlotRequest(
            ids=np.array([[dest]], dtype=np.int64),
            n_ids=np.ones(1, dtype=np.int64),
            last_pos=np.array([pos], dtype=np.int32),
            n_seq_tokens=1,
        )
        if not _find_slot(c, req):
            raise StateError(
                f"failed to find an available cell for sequence {dest} in recurrent memory"
            )
        c.src[c.head] = c.head
        return c

    def _parse_data(self, reader: StateReader, cell_count: int, head: int) -> PendingWrites:
        s_trans = reader.read_u32("recurrent s_trans")
        n_layer = reader.read_u32("recurrent n_layer")
        if n_layer != self.spec.n_layer:
            raise StateError(f"mismatched layer count ({n_layer} instead of {self.spec.n_layer})")
        if s_trans != 0:
            raise StateError(
                f"incompatible s transposition: blob has s_trans={s_trans}, expected 0"
            )
        writes = PendingWrites()
        if self._parse_data_fast(reader, cell_count, head, writes):
            return writes
        for kind, table in (("r", self._r), ("s", self._s)):
            for il in self.layers:
                t = table[il]
                type_id = reader.read_i32(f"{kind} type of layer {il}")
                if type_id != t.type.id:
                    raise StateError(
                        f"mismatched {kind} type ({t.type.id} != {type_id}, layer {il})"
                    )
                row = reader.read_u64(f"{kind} row size of layer {il}")
                if row != t.row_size:
                    raise StateError(
                        f"mismatched {kind} row size ({t.row_size} != {row}, layer {il})"
                    )
                if cell_count:
                    data = reader.read_view(cell_count * row, f"{kind} rows of layer {il}")
                    writes.add(t, head * row, data)
        return writes

    def _parse_data_fast(
        self, reader: StateReader, cell_count: int, head: int, writes: PendingWrites
    ) -> bool:
        """The per-layer sections when every header is the expected one, checked at once.

        Each tensor's section is ``i32 type, u64 row size, cell_count rows``; all headers
        are compared with the memory's in one vector step. False (nothing consumed) when
        the blob is short or a header differs: the field-by-field parse then names it.
        """
        tensors = [self._r[il] for il in self.layers] + [self._s[il] for il in self.layers]
        if not tensors:
            return False
        rows = np.array([t.row_size for t in tensors], dtype=np.int64)
        want = np.zeros((len(tensors), 12), dtype=np.uint8)
        want[:, :4] = (
            np.array([t.type.id for t in tensors], dtype="<i4").view(np.uint8).reshape(-1, 4)
        )
        want[:, 4:] = rows.astype("<u8").view(np.uint8).reshape(-1, 8)
        # section k starts after the earlier ones: E.g. rows [32, 48], 2 cells -> [0, 76]
        size = 12 + cell_count * rows
        start = np.cumsum(size) - size
        total = int(size.sum())
        if reader.remaining < total:
            return False
        offset = reader.offset
        data = reader.read_view(total, "recurrent data")
        got = np.frombuffer(data, dtype=np.uint8)[start[:, None] + np.arange(12)]
        if not np.array_equal(got, want):
            reader.offset = offset
            return False
        if cell_count:
            for t, a, row in zip(tensors, start.tolist(), rows.tolist()):
                writes.add(t, head * row, data[a + 12 : a + 12 + cell_count * row])
        return True

    # -- graph inputs ---------------------------------------------------------------------
    def _s_copy(self, head: int, n_rs: int, consume: bool) -> np.ndarray:
        """``s_copy[i]`` = the row cell ``head + i`` gathers its state from.

        ``src0 + rs_idx * mem_size`` where ``rs_idx`` is the pending rollback of the cell's
        first (lowest) sequence; a freshly started cell (``src0 == rs_z``) always reads
        the zeroed row of plane 0. With ``consume`` the rollbacks of those sequences are
        marked used (single-use snapshots).
        """
        c = self.cells
        out = c.src0[head : head + n_rs].astype(np.int32)
        if self.n_rs_seq == 0 or n_rs == 0:
            return out
        seqs = np.flatnonzero((c.tail >= head) & (c.tail < head + n_rs))
        # first sequence of each cell: seqs ascending -> first occurrence per cell
        # E.g., seqs [0, 2, 3] in cells [5, 4, 5] -> cells [4, 5], firsts [2, 0]
        cells_u, first = np.unique(c.tail[seqs], return_index=True)
        firsts = seqs[first]
        idx = c.rs_idx[firsts].astype(np.int64)
        rel = cells_u - head
        fresh = out[rel] == c.rs_z
        out[rel] += np.where(fresh, 0, idx * self.size).astype(np.int32)
        if consume and firsts.size:
            c.rs_idx[firsts] = 0
        return out


def _read_meta_cells(
    reader: StateReader, cell_count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-state META: per cell ``i32 pos, u32 n_seq_id, i32 ids[n]``.

    Returns positions per cell, and (cell, seq id) pairs. Fast path: when every cell
    holds exactly one sequence (the common case) the section is one ``[n, 3]`` int32
    block; otherwise the variable-length records are walked (at most ``mem_size`` cells).
    """
    if reader.remaining >= 12 * cell_count:
        start = reader.offset
        block = np.frombuffer(
            reader.read_view(12 * cell_count, "recurrent cell meta"), dtype="<i4"
        ).reshape(-1, 3)
        if (block[:, 1] == 1).all():
            return block[:, 0].copy(), np.arange(cell_count), block[:, 2].astype(np.int64)
        reader.offset = start
    pos = np.empty(cell_count, dtype=np.int32)
    cell_of: list[np.ndarray] = []
    seqs: list[np.ndarray] = []
    for i in range(cell_count):
        pos[i] = reader.read_i32("recurrent cell pos")
        n = reader.read_u32("recurrent cell n_seq_id")
        if n > LLAMA_MAX_SEQ:
            raise StateError(f"recurrent cell {i}: n_seq_id {n} exceeds {LLAMA_MAX_SEQ}")
        ids = reader.read_array("<i4", n, "recurrent cell seq ids").astype(np.int64)
        seqs.append(ids)
        cell_of.append(np.full(n, i, dtype=np.int64))
    return pos, np.concatenate(cell_of), np.concatenate(seqs)


@dataclass
class RecurrentReadPlan:
    """A parsed, validated recurrent state restore; :meth:`commit` applies it.

    Compositions (hybrid memories) parse every part first and commit all of them only
    when every part parsed, so a bad blob changes nothing anywhere.
    """

    memory: RecurrentMemory
    cells: RecurrentCells
    writes: PendingWrites
    clear_data: bool
    version: int
    done: bool = field(default=False)

    def is_current(self) -> bool:
        return self.memory._version == self.version

    def commit(self) -> None:
        mem = self.memory
        mem.check_open()
        if self.done:
            raise StateError("state_read plan: already committed")
        if not self.is_current():
            raise StateError(
                "state_read plan: the memory changed after the blob was parsed; parse it again"
            )
        if self.clear_data:
            for store in mem._stores:
                store.clear(0)
        self.writes.commit()
        mem._commit(self.cells)
        self.done = True


# --------------------------------------------------------------------------------------
# context
# --------------------------------------------------------------------------------------


class RecurrentMemoryContext(MemoryContext):
    """One planned pass over a batch's ubatches (or a full / no-op context).

    Graph inputs for the current ubatch (valid after :meth:`apply`): ``get_head()``,
    ``get_n_rs()`` (cells ``[head, head + n_rs)`` are read and written by the graph),
    ``get_rs_z()`` (the cell zeroed in-graph, or -1), :meth:`s_copy` (int32 rows the
    states are gathered from: the first ``n_seqs`` feed the ubatch's sequences, the rest
    are copied back in place), and the R/S tensors and row views.
    """

    def __init__(
        self,
        mem: RecurrentMemory | None,
        ubatches: Sequence[UBatch] | None,
        *,
        is_full: bool = False,
        status: MemoryStatus = MemoryStatus.SUCCESS,
        requests: Sequence[_SlotRequest] | None = None,
        plan: RecurrentPlan | None = None,
    ) -> None:
        self.mem = mem
        self._plan = plan
        self.ubatches: list[UBatch] = list(ubatches or [])
        # what find_slot needs from each ubatch, extracted once at planning time
        self._requests = list(requests) if requests is not None else None
        self.is_full = is_full
        self.status = status
        self.i_next = 0
        self._s_copy: np.ndarray | None = None

    @classmethod
    def failed(cls, status: MemoryStatus) -> RecurrentMemoryContext:
        """A context carrying only a status (FAILED_PREPARE, or NO_UPDATE for updates)."""
        return cls(None, None, status=status)

    def get_status(self) -> MemoryStatus:
        return self.status

    def next(self) -> bool:
        self._require_success("next")
        self._s_copy = None
        self.i_next += 1
        return self.i_next < len(self.ubatches)

    def apply(self) -> bool:
        """Place the current ubatch (``find_slot``) and fix its graph inputs.

        Pending rollbacks of the gathered cells are consumed here (single use).
        A full or update context has nothing to apply.
        """
        if self.status.is_fail():
            raise BatchError(f"apply: context status is {self.status.name}")
        if not self.ubatches:
            return True
        if self.i_next >= len(self.ubatches):
            raise RangeError(
                f"apply: no current ubatch (index {self.i_next} of {len(self.ubatches)})"
            )
        mem = self._mem()
        mem.check_open()
        i, plan = self.i_next, self._plan
        if (
            plan is not None
            and mem._version == plan.version + i
            and mem.cells is (plan.states[i - 1] if i else plan.base)
        ):
            # nothing changed since planning: the planned cells are this placement
            cells = plan.states[i]
            cells.rs_idx = mem.cells.rs_idx
            mem._commit(cells)
        else:
            if self._requests is not None:
                req = self._requests[i]
            else:
                req = _SlotRequest.from_ubatch(self.ubatches[i])
            if not mem._place(req):
                raise BatchError(
                    "apply: the planned ubatch no longer fits (memory changed after init_batch)"
                )
        self._s_copy = mem._s_copy(mem.head, mem.n, consume=True)
        return True

    def get_ubatch(self) -> UBatch:
        self._require_success("get_ubatch")
        if self.i_next >= len(self.ubatches):
            raise RangeError(
                f"get_ubatch: no current ubatch (index {self.i_next} of {len(self.ubatches)})"
            )
        return self.ubatches[self.i_next]

    # -- graph inputs ---------------------------------------------------------------------
    def graph_inputs(self) -> GraphInputs:
        """The state-copy inputs of the current ubatch (``recr``)."""
        self._require_success("graph_inputs")
        return GraphInputs(
            recr=RSInputs(
                head=self.get_head(),
                n_rs=self.get_n_rs(),
                rs_z=self.get_rs_z(),
                size=self.get_size(),
                n_rs_seq=self._mem().n_rs_seq,
                s_copy=np.asarray(self.s_copy(), dtype=np.int32),
                r_l=self.get_r_l,
                s_l=self.get_s_l,
            )
        )

    def get_n_rs(self) -> int:
        mem = self._mem()
        return mem.size if self.is_full else mem.n

    def get_head(self) -> int:
        return 0 if self.is_full else self._mem().head

    def get_rs_z(self) -> int:
        return 0 if self.is_full else self._mem().rs_z

    def get_size(self) -> int:
        return self._mem().size

    def s_copy(self) -> np.ndarray:
        """int32 ``[n_rs]``: row of R/S each cell ``head + i`` starts from (with plane offset)."""
        if self._s_copy is not None:
            return self._s_copy
        mem = self._mem()
        return mem._s_copy(self.get_head(), self.get_n_rs(), consume=False)

    def s_copy_main(self) -> np.ndarray:
        """The first ``n_seqs`` entries of :meth:`s_copy` (states the ubatch advances)."""
        n_seqs = self.get_ubatch().n_seqs if self.ubatches else self.get_n_rs()
        return self.s_copy()[:n_seqs]

    def s_copy_extra(self) -> np.ndarray:
        """The rest of :meth:`s_copy` (states copied back into their own cells)."""
        n_seqs = self.get_ubatch().n_seqs if self.ubatches else self.get_n_rs()
        return self.s_copy()[n_seqs:]

    def get_r_l(self, il: int) -> Tensor:
        return self._mem().get_r_l(il)

    def get_s_l(self, il: int) -> Tensor:
        return self._mem().get_s_l(il)

    def r_view(self, il: int) -> np.ndarray:
        """Host numpy view of layer ``il``'s R rows ``[head, head + n_rs)`` of plane 0."""
        h = self.get_head()
        return self.get_r_l(il).numpy()[h : h + self.get_n_rs()]

    def s_view(self, il: int) -> np.ndarray:
        """Host numpy view of layer ``il``'s S rows ``[head, head + n_rs)`` of plane 0."""
        h = self.get_head()
        return self.get_s_l(il).numpy()[h : h + self.get_n_rs()]

    def _mem(self) -> RecurrentMemory:
        if self.mem is None:
            raise BatchError(f"context with status {self.status.name} has no memory")
        return self.mem

    def _require_success(self, what: str) -> None:
        if self.status != MemoryStatus.SUCCESS:
            raise BatchError(f"{what}: context status is {self.status.name}")


# --------------------------------------------------------------------------------------
# ggml graph helpers (the reference's build_rs_inp / build_rs)
# --------------------------------------------------------------------------------------


@dataclass
class RSGraphInputs:
    """Graph inputs of one ubatch for recurrent layers (``llm_graph_input_rs``).

    ``s_copy`` is an I32 ``[n_rs]`` input tensor; ``s_copy_main`` views its first
    ``n_seqs`` entries (the states the ubatch advances), ``s_copy_extra`` the rest (states
    copied back into their own cells; None when there are none). Pass ``feed()`` as the
    ``inputs`` of :meth:`pymem.ggml.GraphRunner.run`.
    """

    s_copy: Any
    s_copy_main: Any
    s_copy_extra: Any
    values: np.ndarray
    head: int
    rs_z: int
    n_rs: int
    n_seqs: int
    size: int

    def feed(self) -> dict[Any, np.ndarray]:
        return {self.s_copy: self.values}


def build_rs_inputs(
    ctx: Any, mctx: RecurrentMemoryContext, n_seqs: int | None = None
) -> RSGraphInputs:
    """Create the ``s_copy`` input (and its views) for the current ubatch of ``mctx``.

    ``ctx`` is a :class:`pymem.ggml.Context`. ``n_seqs`` defaults to the ubatch's (or to
    every cell for a full context).
    """
    from pymem._native import lib

    n_rs = mctx.get_n_rs()
    if n_seqs is None:
        n_seqs = mctx.get_ubatch().n_seqs if mctx.ubatches else n_rs
    if not 1 <= n_seqs <= n_rs:
        raise RangeError(f"build_rs_inputs: n_seqs {n_seqs} must be in [1, n_rs = {n_rs}]")
    s_copy = ctx.new_tensor("i32", (n_rs,), name="rs_s_copy", input=True)
    main = ctx.view_1d(s_copy, n_seqs, 0)
    extra = ctx.view_1d(s_copy, n_rs - n_seqs, n_seqs * 4) if n_rs > n_seqs else None
    lib.ggml_set_name(main, b"rs_s_copy_main")
    return RSGraphInputs(
        s_copy=s_copy,
        s_copy_main=main,
        s_copy_extra=extra,
        values=mctx.s_copy(),
        head=mctx.get_head(),
        rs_z=mctx.get_rs_z(),
        n_rs=n_rs,
        n_seqs=n_seqs,
        size=mctx.get_size(),
    )


def build_rs(ctx: Any, inp: RSGraphInputs, s: Any, state_size: int, expand: list[Any]) -> Any:
    """Gather the states a ubatch starts from (the reference's ``build_rs``).

    ``s`` is a layer's R or S (a pymem Tensor or a ``ggml_tensor *``) holding
    ``state_size`` values per row. Appends to ``expand``, in the order they must run,
    the nodes with side effects on ``s``: zeroing row ``rs_z`` (the initial state of
    new sequences) and copying the extra states ``[head + n_seqs, head + n_rs)`` from
    their sources. Returns the gathered ``[state_size, n_seqs]`` states of the ubatch's
    sequences (the node that reads them must come after ``expand``'s nodes; pass
    ``expand + [outputs...]`` to the graph runner).

    The reference zeroes in place with ``ggml_scale_inplace``; this uses
    ``cpy(scale(row, 0), row)``, the same bytes.
    """
    t = getattr(s, "ptr", s)
    n_rows = int(t.ne[1]) * int(t.ne[2]) * int(t.ne[3])
    states = ctx.reshape_2d(t, state_size, n_rows)
    nb1 = int(states.nb[1])
    if inp.rs_z >= 0:
        zero = ctx.view_1d(states, state_size, inp.rs_z * nb1)
        expand.append(ctx.cpy(ctx.scale(zero, 0.0), zero))
    out = ctx.get_rows(states, inp.s_copy_main)
    if inp.s_copy_extra is not None:
        extra = ctx.get_rows(states, inp.s_copy_extra)
        dst = ctx.view_2d(
            states, state_size, inp.n_rs - inp.n_seqs, nb1, (inp.head + inp.n_seqs) * nb1
        )
        expand.append(out)  # the gather must read before the extra copy writes
        expand.append(ctx.cpy(extra, dst))
    return out


def rs_store_view(ctx: Any, inp: RSGraphInputs, s: Any, state_size: int, plane: int = 0) -> Any:
    """A ``[state_size, n_seqs]`` view of the rows the ubatch's new states go to.

    Plane 0 holds current states (rows ``head .. head + n_seqs``); plane ``k`` the
    rollback snapshot ``k`` tokens back (rows offset by ``k * mem_size``).
    """
    t = getattr(s, "ptr", s)
    n_rows = int(t.ne[1]) * int(t.ne[2]) * int(t.ne[3])
    if plane < 0 or (plane + 1) * inp.size > n_rows:
        raise RangeError(
            f"rs_store_view: plane {plane} outside the {n_rows // inp.size} planes of {n_rows} rows"
        )
    states = ctx.reshape_2d(t, state_size, n_rows)
    nb1 = int(states.nb[1])
    return ctx.view_2d(states, state_size, inp.n_seqs, nb1, (plane * inp.size + inp.head) * nb1)
