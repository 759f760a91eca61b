"""Recurrent cell metadata and the pure operations on it: slot search, ``seq_rm``, ``s_copy``.

Owns :class:`RecurrentCells` (the reference's ``std::vector<mem_cell>`` as parallel
numpy arrays), :class:`SlotRequest` (what ``find_slot`` needs from a ubatch),
:func:`find_slot`, :func:`seq_rm_cells` and :func:`s_copy_rows`. Everything here works on
a cells object and plain sizes; no tensors, no memory object. The callers
(:mod:`pymem.recurrent.memory`, :mod:`pymem.recurrent.state_io`) decide whether they act
on the live cells or on a copy that a plan commits later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pymem._native import check, ffi, lib
from pymem.errors import BatchError
from pymem.memory import POS_MAX
from pymem.ubatch import UBatch

log = logging.getLogger(__name__)

# the steady decode step of find_slot runs as one native call (pm_step_rs_steady); tests
# turn it off to compare with _find_slot_steady, which stays the reference (False with an
# older extension that lacks the kernels)
USE_NATIVE = all(hasattr(lib, f) for f in ("pm_step_rs_steady", "pm_step_rs_pos", "pm_rs_drop_seq"))


class RecurrentCells:
    """Cell metadata as parallel arrays (the reference's ``std::vector<mem_cell>``).

    ``pos``, ``src``, ``src0`` are per cell; ``tail`` is per sequence id (cell ``s`` of the
    reference holds sequence ``s``'s tail); ``rs_idx`` is the per-sequence pending
    rollback plane. Scalars ``head``, ``used``, ``n``, ``rs_z`` as in the reference.
    ``n_last`` (pymem's, not the reference's) is per sequence id the number of tokens the
    ubatch that last advanced its state held: the snapshot planes that ubatch wrote reach
    back exactly ``n_last - 1`` tokens, so a longer rollback is refused (see seq_rm_cells).
    Sequence ops validate first and then change the live object in place. Plans
    (``prepare``, ``find_slot``, a state-read plan) run on a :meth:`copy`, which a commit
    swaps in only once the whole plan succeeded; the steady decode step alone is planned
    by a check of the live cells and placed in them (:func:`steady_step`).
    """

    __slots__ = (
        "_c_buffers", "_views", "head", "n", "n_last", "pos", "rs_idx", "rs_z", "size", "src",
        "src0", "steady", "tail", "used",
    )  # fmt: skip

    def __init__(self, size: int, n_rs_idx: int) -> None:
        self.size = size
        # (np.full is a Python function: empty + fill are two C calls, what a state read
        # that builds cells pays per call)
        self.pos = np.empty(size, dtype=np.int32)
        self.pos.fill(-1)
        self.src = self.pos.copy()
        self.src0 = self.pos.copy()
        self.tail = self.pos.copy()
        self.rs_idx = np.zeros(n_rs_idx, dtype=np.uint32)
        self.n_last = np.zeros(n_rs_idx, dtype=np.uint32)
        self.head = 0
        self.used = 0
        self.n = 0
        self.rs_z = -1
        # what the last uncoupled find_slot left (see _Steady); content-checked before use
        self.steady: _Steady | None = None
        self._views: tuple[memoryview, memoryview] | None = None
        self._c_buffers: tuple[Any, ...] | None = None  # (see c_buffers)

    def views(self) -> tuple[memoryview, memoryview]:
        """Memoryviews of ``tail`` and ``pos``, made on first use: a position query or a
        refused seq_rm reads a word of each, and a memoryview index is ~30 ns cheaper
        than ``ndarray.item`` (those calls sit at llama.cpp's sub-microsecond times). The
        arrays are written in place, never rebound, while this object lives."""
        v = self._views
        if v is None:
            v = self._views = (self.tail.data, self.pos.data)
        return v

    def copy(self) -> RecurrentCells:
        return RecurrentCells.from_arrays(
            (self.pos, self.src, self.src0, self.tail, self.rs_idx, self.n_last),
            (self.head, self.used, self.n, self.rs_z),
            self.steady,  # immutable; valid only while tail matches its snapshot
        )

    @staticmethod
    def from_arrays(
        arrays: Sequence[np.ndarray], scalars: Sequence[int], steady: _Steady | None
    ) -> RecurrentCells:
        """Cells holding copies of ``arrays`` (pos, src, src0, tail, rs_idx, n_last) and
        ``scalars`` (head, used, n, rs_z): :meth:`copy`'s (a native one-sequence restore
        copies its scratch into the live cells' arrays instead)."""
        c = RecurrentCells.__new__(RecurrentCells)
        c.pos, c.src, c.src0, c.tail, c.rs_idx, c.n_last = (a.copy() for a in arrays)
        c.size = c.pos.size
        c.head, c.used, c.n, c.rs_z = (int(v) for v in scalars)
        c.steady = steady
        c._views = None
        c._c_buffers = None
        return c

    def c_buffers(self) -> tuple[Any, ...]:
        """C buffers of ``tail``, ``pos``, ``src``, ``src0`` and ``n_last`` and an out
        word (:c:func:`pm_step_rs_steady`'s arguments; the first three are also
        :c:func:`pm_rs_drop_seq`'s, the first two a hybrid's position kernel's), made on
        first use: the live cells of a steady decode take
        every step in place, so a step makes none (the arrays are never rebound)."""
        b = self._c_buffers
        if b is None:
            b = self._c_buffers = (
                ffi.from_buffer("int32_t[]", self.tail, require_writable=True),
                ffi.from_buffer("int32_t[]", self.pos, require_writable=True),
                ffi.from_buffer("int32_t[]", self.src, require_writable=True),
                ffi.from_buffer("int32_t[]", self.src0, require_writable=True),
                ffi.from_buffer("uint32_t[]", self.n_last, require_writable=True),
                ffi.new("int32_t *"),
            )
        return b

    def seq_counts(self) -> np.ndarray:
        """Number of sequences in each cell. E.g. tail [2, -1, 2, 0] -> [1, 0, 2, 0]."""
        t = self.tail
        return np.bincount(t[t >= 0], minlength=self.size)

    def seq_ids(self, cell: int) -> list[int]:
        """The ascending sequence ids held by ``cell`` (the reference's ``seq_id`` set)."""
        return np.flatnonzero(self.tail == cell).tolist()

    # -- the seq-removal primitive shared by seq_rm, seq_cp and find_slot ------------
    def drop_seq(self, seq_id: int) -> int:
        """Remove ``seq_id`` from its tail cell; empty the cell if it was the last one.

        Returns the emptied cell or -1. Does not touch ``used`` (callers follow their
        reference counterpart, which differ). One native call (:c:func:`pm_rs_drop_seq`,
        4.6 -> ~1 µs: a whole sequence's removal from a hybrid); this numpy code is its
        reference.
        """
        if USE_NATIVE:
            tail, pos, src, _, _, out = self.c_buffers()
            status = lib.pm_rs_drop_seq(tail, pos, src, self.tail.size, self.size, seq_id, out)
            if status != lib.PM_OK:
                check(status, f"pm_rs_drop_seq (sequence {seq_id} of {self.tail.size})")
            emptied: int = out[0]
            return emptied
        t = int(self.tail[seq_id])
        self.tail[seq_id] = -1
        if t >= 0 and not (self.tail == t).any():
            self.pos[t] = -1
            self.src[t] = -1
            return t
        return -1


@dataclass(frozen=True)
class _Steady:
    """What an uncoupled ``find_slot`` left, so that the next step of the same sets is cheap.

    After placing sets of one sequence each, sequence ``ids[s]`` alone holds cell
    ``lo + s``. While ``tail`` has exactly the content of the snapshot and the next request
    holds the same ids, the general path provably finds every set in its own cell, in
    order: no search, no swap, ``used`` unchanged (a function of ``tail`` alone). Only
    positions, sources and ``n_last`` are left to do (:func:`_find_slot_steady`). Both
    keys are compared by content, so no mutation anywhere needs to invalidate this.
    """

    ids: bytes  # all_ids.tobytes() of the request (dtype in ids_dtype)
    ids_dtype: str
    tail: bytes  # tail.tobytes() right after the placement
    lo: int
    used: int
    rng: np.ndarray  # int32 [lo, lo + n_seqs): E.g. lo 4, 3 sets -> [4, 5, 6]
    rng_bytes: bytes  # rng.tobytes(): a cell range whose src is this sources itself
    # C buffers of tail and ids (int32 ones), made by the first native steady step
    snaps_c: list[Any] = field(default_factory=list, compare=False, repr=False)


@dataclass
class SlotRequest:
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
    def one_token(cls, seq_id: int, pos: int) -> SlotRequest:
        """One set of one sequence with one token at ``pos`` (what a per-sequence restore
        places). E.g. (3, 9) -> ids [[3]], last_pos [9]."""
        return cls(
            ids=np.array([[seq_id]], dtype=np.int64),
            n_ids=np.ones(1, dtype=np.int64),
            last_pos=np.array([pos], dtype=np.int32),
            n_seq_tokens=1,
        )

    @classmethod
    def from_ubatch(cls, ubatch: UBatch) -> SlotRequest:
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


def find_slot(c: RecurrentCells, req: SlotRequest) -> bool:
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
    order) touches only a handful of whole-array operations. When the previous uncoupled
    placement on these cells (``c.steady``, carried by :meth:`RecurrentCells.copy`) held
    the same sequences and ``tail`` is byte-equal to what it left, steps 1 and 2 are
    known to change nothing and :func:`_find_slot_steady` does the rest; pinned equal to
    the general path by tests/test_recurrent_steady.py.
    """
    size = c.size
    ids, n_ids = req.ids, req.n_ids
    n_seqs = ids.shape[0]

    # the reference's head heuristic: restart the search if many cells before head are free
    if c.head > c.used + 2 * n_seqs:
        c.head = 0

    coupled_sets, all_ids = req.coupled, req.all_ids
    if steady_step(c, req, dry=False):
        return True
    st = c.steady
    if (
        st is not None
        and not coupled_sets
        and st.ids_dtype == all_ids.dtype.str
        and st.tail == c.tail.tobytes()
        and st.ids == all_ids.tobytes()
    ):
        return _find_slot_steady(c, req, st)
    c.steady = None
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
    moved_out: np.ndarray | None = None
    if mism.size:
        moved_out = _reorder(c, t, int(mism[0]), lo, hi)

    _warn_jumps(c.pos[target], req, primaries)
    c.pos[target] = req.last_pos
    if coupled_sets:
        # every id of set s (primary and coupled) now has cell lo + s as its tail
        # E.g., ids [[1, -1], [2, 3]], lo 4 -> tail[1] = 4, tail[2] = tail[3] = 5
        c.tail[all_ids] = np.repeat(target, n_ids)

    # -- 3. zero state, sources ---------------------------------------------------------
    if not _set_sources(c, lo, hi):
        return False

    c.head = lo
    c.n = hi - lo + 1
    if moved_out is not None and moved_out.size:
        # a sequence outside the ubatch whose cell the swaps moved: the graph copies its
        # state (plane 0) along, not its snapshot planes, so no rollback of it is exact
        c.n_last[moved_out] = 0
    c.n_last[all_ids] = req.n_seq_tokens  # the planes this ubatch writes reach that far back
    if n_need or coupled_sets:
        counts = c.seq_counts()
    c.used = int(np.count_nonzero(counts))  # swaps permute cells: the count is unchanged
    if not coupled_sets:
        _remember_steady(c, all_ids, lo)
    return c.n >= n_seqs


def place_new_sequence(c: RecurrentCells, seq_id: int, pos: int) -> bool:
    """:func:`find_slot` for a one-token ubatch of one sequence that holds no cell, as a
    per-sequence restore places it after its seq_rm: the same cells, counters, sources,
    steady record, logs and result, without the general path's per-set bookkeeping
    (~40 -> ~6 us). The caller checks ``0 <= seq_id < c.size`` and ``c.tail[seq_id] < 0``;
    pinned equal to find_slot by tests/test_recurrent_place.py.

    The general path's steps for this case: no set owns a cell, so the one needed cell is
    the first empty one from ``head`` (cyclically); it is already the window ``[lo, hi]``
    (nothing to swap); ``used`` grows by that cell. Its sources step (``_set_sources``) on
    a one-cell window is a scalar test here: the cell can hold the zero state unless some
    cell still copies from it.
    """
    if c.head > c.used + 2:
        c.head = 0
    c.steady = None  # (its snapshot had seq_id in a cell: it cannot match now)
    counts = c.seq_counts()
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        log.error("find_slot: %d sets need a cell, only %d cells are empty", 1, 0)
        return False
    after = empty[empty >= c.head]
    cell = int(after[0] if after.size else empty[0])
    c.tail[seq_id] = cell
    c.pos[cell] = pos  # (an empty cell's position is -1: find_slot's jump warning never fires)
    src = c.src
    c.rs_z = -1 if (src == cell).any() else cell
    own_src: int = src.item(cell)
    if own_src < 0:  # no source yet: it starts from the zero state
        if c.rs_z < 0:
            log.error("find_slot: no cell in [%d, %d] can hold the zero state", cell, cell)
            return False
        own_src = c.rs_z
    c.src0[cell] = own_src
    src[cell] = cell
    c.head = cell
    c.n = 1
    c.n_last[seq_id] = 1
    c.used = int(np.count_nonzero(counts)) + 1
    # the steady record _remember_steady would write: its facts hold by construction
    # (seq_id alone in the cell that was empty)
    ids = np.array([seq_id], dtype=np.int64)
    rng = np.array([cell], dtype=np.int32)
    rng.flags.writeable = False
    c.steady = _Steady(
        ids.tobytes(), ids.dtype.str, c.tail.tobytes(), cell, c.used, rng, rng.tobytes()
    )
    return True


def _warn_jumps(prev: np.ndarray, req: SlotRequest, primaries: np.ndarray) -> None:
    """Log the first set whose last position does not follow its cell's by ``n_seq_tokens``.

    A warning only (the reference's), so int32 differences are fine. ``prev`` are the
    positions of the sets' cells before the ubatch (-1: a new sequence, never a jump).
    """
    last_pos, nst = req.last_pos, req.n_seq_tokens
    d = last_pos - prev
    if (d == nst).all():  # the usual case: every set goes on where it stopped
        return
    jump = (prev >= 0) & (d != nst)
    if jump.any():
        j = int(np.flatnonzero(jump)[0])
        log.warning(
            "find_slot: non-consecutive token position %d after %d for sequence %d with %d new tokens",
            int(last_pos[j]), int(prev[j]), int(primaries[j]), nst,
        )  # fmt: skip


def _set_sources(c: RecurrentCells, lo: int, hi: int, rng_bytes: bytes = b"") -> bool:
    """Step 3 of :func:`find_slot` on the window ``[lo, hi]``: ``rs_z``, ``src0``, ``src``.

    ``rng_bytes`` (optional) is ``arange(lo, hi + 1)`` as int32 bytes. When every cell of
    the window is its own source (the steady state), each is referenced, so no zero cell
    exists (``rs_z = -1``) and the sources already are what the general code would write.
    """
    src_rng = c.src[lo : hi + 1]
    if rng_bytes and src_rng.tobytes() == rng_bytes:
        c.rs_z = -1
        c.src0[lo : hi + 1] = src_rng
        return True
    src = c.src
    refs = np.bincount(src[src >= 0], minlength=c.size)
    free = np.flatnonzero(refs[lo : hi + 1] == 0)
    c.rs_z = lo + int(free[0]) if free.size else -1
    miss = src_rng < 0
    if miss.any():
        if c.rs_z < 0:
            log.error("find_slot: no cell in [%d, %d] can hold the zero state", lo, hi)
            return False
        c.src0[lo : hi + 1] = np.where(miss, c.rs_z, src_rng)
    else:
        c.src0[lo : hi + 1] = src_rng
    c.src[lo : hi + 1] = np.arange(lo, hi + 1)
    return True


def _remember_steady(c: RecurrentCells, all_ids: np.ndarray, lo: int) -> None:
    """Record :class:`_Steady` after an uncoupled placement, if its facts hold.

    Checked here rather than assumed, so that the fast path rests on verified facts: set
    ``s`` is in cell ``lo + s`` and alone there. E.g. ids [7, 2], lo 4 -> tail[7] = 4,
    tail[2] = 5, both cells counted once.
    """
    rng = np.arange(lo, lo + all_ids.size, dtype=np.int32)
    tp = c.tail[all_ids]
    if not (tp == rng).all() or not (c.seq_counts()[rng] == 1).all():
        return
    rng.flags.writeable = False
    c.steady = _Steady(
        all_ids.tobytes(), all_ids.dtype.str, c.tail.tobytes(), lo, c.used, rng, rng.tobytes()
    )


def _find_slot_steady(c: RecurrentCells, req: SlotRequest, st: _Steady) -> bool:
    """:func:`find_slot` when :class:`_Steady` holds: the same result, fewer numpy calls.

    What the general path would do here: every set owns cell ``lo + s`` already (no
    search, no swap, nobody moved), so positions advance, sources are set on
    ``[lo, hi]``, ``n_last`` of the ubatch's ids is set and ``used`` stays.
    """
    lo, rng = st.lo, st.rng
    hi = lo + rng.size - 1
    _warn_jumps(c.pos[lo : hi + 1], req, req.all_ids)
    c.pos[lo : hi + 1] = req.last_pos
    if not _set_sources(c, lo, hi, st.rng_bytes):
        return False
    c.head = lo
    c.n = hi - lo + 1
    c.n_last.put(req.all_ids, req.n_seq_tokens)  # put: cheaper than a fancy assignment
    c.used = st.used
    return True


def steady_step(c: RecurrentCells, req: SlotRequest, *, dry: bool) -> bool:
    """:func:`find_slot`'s first road on ``c`` itself: the steady step of ``req`` (its
    :class:`_Steady` record holds) in one native call. ``dry``: whether it holds, nothing
    written (a plan asks the live cells, and the apply that follows, the memory
    unchanged, places it in them); else placed (True) or nothing changed (False). False
    without the native kernels, a record, uncoupled sets or int32 ids on both sides."""
    st = c.steady
    if st is None or req.coupled or not USE_NATIVE:
        return False
    return _find_slot_steady_native(c, req, st, dry)


_INT32 = np.dtype(np.int32)  # (a native int32 array's dtype is this very object)


def _find_slot_steady_native(
    c: RecurrentCells, req: SlotRequest, st: _Steady, dry: bool = False
) -> bool:
    """:func:`_find_slot_steady` with the steadiness checks (``tail`` and the ids as
    :class:`_Steady` recorded them) in one native call; False, nothing changed, when it
    does not hold or a set jumps (the numpy path then decides and logs). ``dry``: only
    whether it holds, nothing written. A decode step asks it twice (plan, apply), hence
    the plain checks: no ``flags`` object, no dtype string."""
    ids, last_pos = req.all_ids, req.last_pos
    if ids.dtype is not _INT32 or last_pos.dtype is not _INT32 or st.ids_dtype != "<i4":
        return False
    n = st.rng.size
    if ids.size != n or last_pos.size != n:
        return False  # another set count: the numpy checks see it
    try:
        ids_c = ffi.from_buffer("int32_t[]", ids)
        last_c = ffi.from_buffer("int32_t[]", last_pos)
    except ValueError:  # a strided id column: numpy's road
        return False
    snaps = st.snaps_c
    if not snaps:
        snaps += [ffi.from_buffer("int32_t[]", st.tail), ffi.from_buffer("int32_t[]", st.ids)]
    tail, pos, src, src0, n_last, done = c.c_buffers()
    status = lib.pm_step_rs_steady(
        c.size, tail, snaps[0], ids_c, snaps[1], n, st.lo, pos, src, src0, n_last,
        c.n_last.size, last_c, req.n_seq_tokens, dry, done,
    )  # fmt: skip
    if status != lib.PM_OK:
        check(status, f"pm_step_rs_steady ({n} sets from cell {st.lo} of {c.size})")
    if not done[0] or dry:
        return bool(done[0])
    c.rs_z = -1
    c.head = st.lo
    c.n = n
    c.used = st.used
    return True


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


def _reorder(c: RecurrentCells, t: np.ndarray, s0: int, lo: int, hi: int) -> np.ndarray:
    """Swap cells so that set ``s`` ends in cell ``lo + s``, exactly as the reference.

    The reference swaps cell contents one set at a time (``dst = lo + s`` with the cell
    currently holding set ``s``), and where the *other* cells end up depends on that
    order, which later placement and whole-state blobs expose. The swap chain is
    inherently sequential, so it is simulated on index lists over the window
    ``[lo, hi]`` (one step per sequence set from the first misplaced one; no per-cell
    or per-token work), then applied to the arrays in one vectorised permutation.
    Returns the sequence ids whose tail cell changed.
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
    before = tl[moved]
    tl[moved] = inv[before - lo]
    # E.g., tails [4, 7, -1], window [4, 7], content 7 -> 4, 4 -> 7: both ids changed
    return np.flatnonzero(moved)[tl[moved] != before]


def seq_rm_cells(
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
        c.n_last[seq_id] = 0
    if seq_id >= c.size:
        return False
    tail, positions = c.views()  # (plain ints, no numpy scalars: a per-step call)
    t: int = tail[seq_id]
    if t < 0:
        return True
    pos: int = positions[t]
    if 0 < p0 <= pos < p1:
        # cutting the tail: only a rollback through a snapshot plane can serve it, and only
        # one the last ubatch's planes hold exactly. Departure from the reference, which
        # also accepts rollback >= n_last and then restores a stale plane (wrong state,
        # True returned): pymem returns False and changes nothing, so the caller replays
        # (pymem.reuse plans that); pinned by tests/test_recurrent.py
        rollback = pos - (p0 - 1)
        # (the plane count first: without planes, or past them, no array is read)
        if (
            1 <= rollback <= n_rs_seq
            and rollback < c.n_last.item(seq_id)  # exact: the last ubatch's planes hold it
            and c.rs_idx.item(seq_id) == 0
        ):
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


def s_copy_rows(
    c: RecurrentCells, head: int, n_rs: int, n_rs_seq: int, consume: bool
) -> np.ndarray:
    """``s_copy[i]`` = the row cell ``head + i`` gathers its state from.

    ``src0 + rs_idx * mem_size`` where ``rs_idx`` is the pending rollback of the cell's
    first (lowest) sequence; a freshly started cell (``src0 == rs_z``) always reads
    the zeroed row of plane 0. With ``consume`` the rollbacks of those sequences are
    marked used in ``c`` (single-use snapshots).
    """
    out = c.src0[head : head + n_rs].astype(np.int32)
    if n_rs_seq == 0 or n_rs == 0:
        return out
    seqs = np.flatnonzero((c.tail >= head) & (c.tail < head + n_rs))
    # first sequence of each cell: seqs ascending -> first occurrence per cell
    # E.g., seqs [0, 2, 3] in cells [5, 4, 5] -> cells [4, 5], firsts [2, 0]
    cells_u, first = np.unique(c.tail[seqs], return_index=True)
    firsts = seqs[first]
    idx = c.rs_idx[firsts].astype(np.int64)
    rel = cells_u - head
    fresh = out[rel] == c.rs_z
    out[rel] += np.where(fresh, 0, idx * c.size).astype(np.int32)
    if consume and firsts.size:
        c.rs_idx[firsts] = 0
    return out
