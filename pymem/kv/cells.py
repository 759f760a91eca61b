"""Cell metadata of a KV cache, as parallel numpy arrays (``llama_kv_cells``).

The metadata of every stream of one cache is stacked in :class:`StackedCells`, row ``s``
being stream ``s``::

    cell         0    1    2    3    4    5   ...
    pos[s]       0    1    2   -1    7    3        int32, -1 = empty
    shift[s]     0    0    0    0   +5    0        int32, delta accumulated since the last K-shift
    seq[s]      {0}  {0}  {0,1} {}  {2}  {1}       uint64[.., n_words] sequence-id bitsets
    owner[s]     0    0   -2   -1    2    1        int32: the only sequence, -1 none, -2 several
    ext[s]      (x, y, tok) per cell               int32[.., 3], only with M-RoPE / PLE

A cell is also addressed by its global id ``g = s * size + i``, which is its K row: the
batched operations take global ids, so that one call covers a ubatch spanning many
streams. :class:`KVCells` is a view of one stream (one row) with the single-stream API.

``owner`` is derived from ``seq`` and kept in step with it: it turns most per-sequence
tests into one int32 comparison and only cells shared by several sequences need a bit test.

A bitset has as many 64-bit words as the ids the stack holds need (``n_words``, 1-4): a
cache of up to 64 sequences keeps 8 bytes a cell, not the 32 of all 256 ids, and its
metadata is 20 bytes a cell instead of 44 (every restore, clear and copy of the cells
writes that). An id past the words (a unified cache takes any id below 256, whatever its
``n_seq_max``) widens every bitset first (:meth:`StackedCells.fit`); queries of such an id
find no cell and widen nothing.

Per-stream counters (``used``, ``used_max_p1``, ``has_shift``, ``n_multi``) are arrays
over streams. Per (stream, sequence) minimum and maximum positions are cached
(``llama_kv_cells::seq_pos``): adding cells updates them in O(1) per sequence; removing
or moving cells marks the bound that may have changed dirty, and a query recomputes a
dirty pair with one vectorised pass. Removing a sequence's oldest positions (the SWA
purge) thus leaves its maximum clean, which is what the slot search reads. Cells with a
position but no sequence are allowed (a whole-state restore can produce them), as in the
reference.

Every mutation goes through a few vectorised primitives that can record an undo journal:
:meth:`StackedCells.begin` / :meth:`StackedCells.rollback` restore the cells exactly, which
is how ``KVCache.prepare`` plans ubatches without changing anything. The journal records
cells by global id before they change, and a stream's counters the first time the stream
is touched, so its cost follows what changed, not the number of streams.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from pymem._native import check, ffi, lib
from pymem.ubatch import LLAMA_MAX_SEQ, seq_bitsets

N_WORDS = LLAMA_MAX_SEQ // 64  # the widest bitset: every id below 256
POS_NONE = -1
OWNER_NONE = -1
OWNER_MULTI = -2
EMPTY_MIN = np.iinfo(np.int64).max
_POS_BIG = np.iinfo(np.int32).max
EXT_DEFAULT = (0, 0, -1)  # x, y, tok (LLAMA_TOKEN_NULL)

_ONE = np.uint64(1)
_NO_CELLS = np.zeros(0, dtype=np.int64)
_NO_CELLS.flags.writeable = False
_NO_BOUND = np.full(2, -2, dtype=np.int64)  # owners -2, -1: nothing removed
_NO_BOUND.flags.writeable = False
# KVCells.seq_cells_in_all's position-range scan in C (pm_kv_seq_cells_range; shared cells
# by their bits); the numpy scan below stays the reference it is tested against
USE_NATIVE_RANGE = hasattr(lib, "pm_kv_seq_cells_range")
_RANGE_FIRST = 1024  # cells the first pass has room for at least (a tail's, usually)
# ... and at most, where the range is wider: room for one cell a position, so a range of a
# few thousand positions takes one pass, not two (64 KiB: a larger fresh array's page
# faults cost more than the second pass)
_RANGE_FIRST_MAX = 8192
# per-stream state a journal saves when it first touches a stream (StackedCells attributes)
_SUMMARY = (
    "used",
    "used_max_p1",
    "used_max_dirty",
    "has_shift",
    "n_multi",
    "pmin",
    "pmax",
    "pdirty",
)
# pdirty bits: the cached minimum / maximum of a (stream, sequence) pair may be stale
STALE_MIN, STALE_MAX = 1, 2
STALE = STALE_MIN | STALE_MAX
_REFRESH_CHUNK = 1 << 22  # cells per vectorised refresh pass (bounds its temporaries)


class RangeCover(enum.Enum):
    """What a sequence's cached position bounds say about a range (KVCells.range_cover)."""

    NONE = 0  # no cell of the sequence is in the range
    WHOLE = 1  # every cell of the sequence is
    SOME = 2  # unknown without a scan


# the stream of each cell of a batched operation, or the one stream all its cells are in
Rows = np.ndarray | int


def _sel(rows: Rows, sel: np.ndarray) -> Rows:
    """``rows`` of the selected cells (the one stream stays an int)."""
    return rows if isinstance(rows, int) else rows[sel]


def _run(idx: np.ndarray) -> np.ndarray | slice:
    """Cells ``idx`` (ascending, distinct, not empty) as a slice when they are one run,
    which numpy reads and writes without gathers; else ``idx``. E.g. [5, 6, ..., 300] ->
    5:301. A few cells stay an array: gathers of them cost less than the test."""
    n = idx.size
    if n < 256:
        return idx
    lo = int(idx[0])
    return slice(lo, lo + n) if int(idx[-1]) - lo + 1 == n else idx


# a run of cells shorter than this is written through its index array: a gather of a few
# cells costs less than the test (tests raise it to force the index path and compare)
RUN_MIN = 256
# key runs per value above which min_max_at leaves the grouping to ufunc.at (tests raise
# it to force plain ufunc.at and compare)
_GROUP_MAX_SHARE = 4
# cells from which put_rows takes np.put
_PUT_MIN = 1024


def _one_run(strm: np.ndarray, idx: np.ndarray) -> slice | None:
    """``idx`` (``[1, n]``, one stream) as a slice when it is one ascending run of at
    least :data:`RUN_MIN` cells, else None. E.g. [[5, 6, ..., 300]] -> 5:301;
    [[0, 2, 1, 3, ...]] -> None (its ends say a run, its order does not)."""
    n = idx.shape[1]
    if strm.size != 1 or n < RUN_MIN:
        return None
    row = idx[0]
    lo = int(row[0])
    if int(row[-1]) - lo + 1 != n:
        return None
    # n distinct integers from lo to lo + n - 1 are the run iff they ascend (E.g. [0, 2,
    # 1, 3] does not); a bool temporary, not an int64 one (fresh pages cost their faults)
    if not (row[1:] > row[:-1]).all():
        return None
    return slice(lo, lo + n)


def min_max_at(pmin: np.ndarray, pmax: np.ndarray, key: np.ndarray, p: np.ndarray) -> None:
    """``np.minimum.at(pmin, key, p)`` and ``np.maximum.at(pmax, key, p)`` (repeated keys
    accumulate), reduced over runs of equal keys first: a restore's or a prompt's keys come
    in long runs (one sequence's cells together), so the ``ufunc.at`` calls see one value
    per run instead of one per cell, and one run needs none. ``key`` and ``p`` may be any
    integer type (int32 ones are widened only where ``ufunc.at`` needs it).

    E.g. keys [3, 3, 5, 5, 5, 3], p [7, 8, 1, 2, 3, 9] -> runs at [0, 2, 5] -> keys
    [3, 5, 3], minima [7, 1, 9], maxima [8, 3, 9] -> pmin[3] = min(., 7, 9), pmin[5] = 1.
    """
    n = key.size
    if n == 0:
        return
    starts = np.flatnonzero(key[1:] != key[:-1]) + 1
    if starts.size == 0:  # one key (a one-sequence restore): two reductions
        k0 = int(key[0])
        pmin[k0] = min(int(pmin[k0]), int(p.min()))
        pmax[k0] = max(int(pmax[k0]), int(p.max()))
        return
    if starts.size * _GROUP_MAX_SHARE > n:  # short runs: grouping would not pay
        key64, p64 = key.astype(np.int64), p.astype(np.int64)
        np.minimum.at(pmin, key64, p64)
        np.maximum.at(pmax, key64, p64)
        return
    starts = np.concatenate((np.zeros(1, dtype=starts.dtype), starts))
    k = key[starts].astype(np.int64)
    np.minimum.at(pmin, k, np.minimum.reduceat(p, starts).astype(np.int64))
    np.maximum.at(pmax, k, np.maximum.reduceat(p, starts).astype(np.int64))


def words_for(n_ids: int) -> int:
    """64-bit words of a bitset over ids ``[0, n_ids)``. E.g. 8 -> 1, 65 -> 2, 256 -> 4."""
    return max(1, -(-int(n_ids) // 64))


def row_dtype(n_words: int) -> np.dtype:
    """One cell's bitset of ``n_words`` words as a single void item (row gathers and
    stores copy it whole)."""
    return np.dtype((np.void, n_words * 8))


def put_rows(rows: np.ndarray, idx: np.ndarray | slice, item: Any = None) -> None:
    """``rows[idx] = item`` (default: an empty bitset) for a flat array of bitset items:
    ``np.put`` for many cells, whose loop beats fancy assignment's per-item copy of a void
    type from about 512 cells (8,192 cells: 34 -> 22 us); fancy assignment below (put's
    call costs more)."""
    if item is None:
        item = np.zeros(1, dtype=rows.dtype)[0]
    if isinstance(idx, slice) or idx.size < _PUT_MIN:
        rows[idx] = item
    else:
        np.put(rows, idx, item)


def _ids(cells: np.ndarray | slice) -> np.ndarray:
    """Global ids of ``cells`` (a slice made an index array). E.g. 4:7 -> [4, 5, 6]."""
    if isinstance(cells, slice):
        return np.arange(cells.start, cells.stop, dtype=np.int64)
    return cells


def seq_word_bit(seq_id: int) -> tuple[int, np.uint64]:
    """The word index and bit mask of ``seq_id`` in a bitset of ``uint64`` words."""
    return seq_id >> 6, np.left_shift(_ONE, np.uint64(seq_id & 63))


def single_seq_ids(bits: np.ndarray) -> np.ndarray:
    """Owner ids of bitset rows: the only set bit, -1 for none, -2 for several.

    E.g. rows [[0b100, 0, 0, 0], [0, 0, 0, 0], [0b11, 0, 0, 0], [0, 0b1, 0, 0]] -> [2, -1, -2, 64].
    A single set bit ``x`` is a power of two and its index is the popcount of ``x - 1``
    (E.g. 0b100 - 1 = 0b011 -> 2); ``x & (x - 1)`` is 0 only for 0 and powers of two.
    """
    x = bits[:, 0]
    if bits.shape[1] == 1 or np.count_nonzero(bits) == np.count_nonzero(x):
        # every id < 64: word 0 decides
        out = np.bitwise_count(x - _ONE).astype(np.int32)
        out[(x & (x - _ONE)) != 0] = OWNER_MULTI
        out[x == 0] = OWNER_NONE
        return out
    n = bits.shape[0]
    if bits.shape[1] != N_WORDS:  # narrower bitsets: as four words, the rest zero
        wide = np.zeros((n, N_WORDS), dtype=np.uint64)
        wide[:, : bits.shape[1]] = bits
        bits = wide
    bits = np.ascontiguousarray(bits)
    # set bits per word, a row's four counts read as the bytes of one uint32; times
    # 0x01010101 sums them into the top byte. E.g. counts [1, 0, 2, 0] -> 0x00020001 -> 3
    # (a row of all 256 bits sums to 0 mod 256, but its packed counts are not 0)
    packed = np.bitwise_count(bits).view("<u4").reshape(n)
    total = (packed * np.uint32(0x01010101)) >> np.uint32(24)
    out = np.full(n, OWNER_MULTI, dtype=np.int32)
    out[packed == 0] = OWNER_NONE
    one = np.flatnonzero(total == 1)
    if one.size:
        # the word whose count is 1: E.g. packed 0x00010000 - 1 = 0x0000FFFF -> 16 bits -> word 2
        w = (np.bitwise_count(packed[one] - np.uint32(1)) >> np.uint8(3)).astype(np.int64)
        word = bits.reshape(-1)[one * N_WORDS + w]
        out[one] = w * 64 + np.bitwise_count(word - _ONE)
    return out


@dataclass(frozen=True, eq=False)
class NewRows:
    """What :meth:`StackedCells.set_new` derives from a slot's streams and sequence ids
    alone, computed once by a caller that places the same layout step after step (the
    KV cache's decode-step memo)."""

    rows: Rows  # each token's stream (an int when there is one stream)
    simple: bool  # one sequence id per token, none negative
    word: np.ndarray | None  # simple only: the bitset word of each token's id (id >> 6)
    bit: np.ndarray | None  # simple only: its bit, uint64 (1 << (id & 63))
    key: np.ndarray | None  # simple only: the token's bound key, rows * 256 + id
    distinct: bool = False  # simple, and no key twice (the bounds update needs no ufunc.at)
    hi: int = LLAMA_MAX_SEQ - 1  # the largest id (what the bitsets must hold)

    @classmethod
    def of(cls, strm: np.ndarray, n_per: int, seq_id: np.ndarray) -> NewRows:
        """E.g. strm [0, 2], 1 token each, ids [[1], [65]] -> rows [0, 2], words [0, 1],
        bits [1 << 1, 1 << 1], keys [1, 577]."""
        rows: Rows = int(strm[0]) if strm.size == 1 else np.repeat(strm, n_per)
        primary = seq_id[:, 0].astype(np.int64)
        hi = int(seq_id.max()) if seq_id.size else 0
        if seq_id.shape[1] != 1 or primary.size == 0:
            return cls(rows, False, None, None, None, hi=hi)
        lo = int(primary.min())
        if lo < 0:
            return cls(rows, False, None, None, None, hi=hi)
        bit = np.left_shift(_ONE, (primary & 63).astype(np.uint64))
        key = rows * LLAMA_MAX_SEQ + primary
        if key.size == 1:
            distinct = True
        elif isinstance(rows, int) and lo == int(primary.max()):
            distinct = False  # one sequence in one stream (a prompt, a restore): one key
        else:  # np.unique sorts: ~120 us for 8,192 equal keys, hence the cases above
            distinct = np.unique(key).size == key.size
        return cls(rows, True, primary >> 6, bit, key, distinct, hi)


class PositionBounds:
    """A cache's cached position bounds, readable without a call into the cache.

    Why: a composite's ``seq_pos_max`` / ``seq_pos_min`` sit at llama.cpp's
    sub-microsecond times, and calling the KV part's query from the composite's costs a
    third of that. A composite holds this object and reads an open id's bound itself:
    ``key = keys[seq_id]``; the bound is ``pos_max[key]`` (``pos_min[key]``, ``EMPTY_MIN``
    meaning none) unless ``stale[key] & STALE_MAX`` (``STALE_MIN``) says to ask the cache,
    which recomputes it. Only ids in ``[0, n_open)`` may be read this way (every id
    below 256 in a unified cache, ``n_seq_max`` ids with one stream a sequence): ``n_open``
    is 0 once the cache is closed, so every id then takes the cache's checked path (which
    raises). The views stay valid for the life of the cells (the bound arrays are never
    reallocated; a widening of the bitsets rebinds other arrays).
    """

    __slots__ = ("keys", "n_open", "pos_max", "pos_min", "stale")

    def __init__(self, keys: list[int], cells: StackedCells) -> None:
        self.keys = keys  # per sequence id, its (stream, sequence) key s * 256 + id
        self.n_open = len(keys)
        self.pos_min: memoryview = cells.pmin_m
        self.pos_max: memoryview = cells.pmax_m
        self.stale: memoryview = cells.pdirty_m


class StackedCells:
    """The cell metadata of every stream of one cache; tensor data lives elsewhere.

    Arrays are ``[n_stream, size, ...]`` with contiguous flat views (``pos_f``, ...) over
    global cell ids; per-stream state is ``[n_stream]`` and per (stream, sequence) state
    ``[n_stream, LLAMA_MAX_SEQ]`` (flat key ``s * LLAMA_MAX_SEQ + seq_id``). The bitsets
    start wide enough for ids below ``n_seq_ids`` and widen when a larger id is added.
    """

    def __init__(
        self, n_stream: int, size: int, with_ext: bool = False, n_seq_ids: int = LLAMA_MAX_SEQ
    ) -> None:
        self.n_stream = int(n_stream)
        self.size = int(size)
        shape = (self.n_stream, self.size)
        self.n_words = words_for(min(max(int(n_seq_ids), 1), LLAMA_MAX_SEQ))
        self.row = row_dtype(self.n_words)
        self.pos = np.full(shape, POS_NONE, dtype=np.int32)
        self.shift = np.zeros(shape, dtype=np.int32)
        self.seq = np.zeros((*shape, self.n_words), dtype=np.uint64)
        self.owner = np.full(shape, OWNER_NONE, dtype=np.int32)
        self.ext: np.ndarray | None = None
        if with_ext:
            self.ext = np.empty((*shape, 3), dtype=np.int32)
            self.ext[:] = EXT_DEFAULT
        self.used = np.zeros(self.n_stream, dtype=np.int64)  # non-empty cells
        self.used_max_p1 = np.zeros(self.n_stream, dtype=np.int64)
        self.used_max_dirty = np.zeros(self.n_stream, dtype=bool)
        self.has_shift = np.zeros(self.n_stream, dtype=bool)
        self.n_multi = np.zeros(self.n_stream, dtype=np.int64)  # cells with owner OWNER_MULTI
        self.pmin = np.full((self.n_stream, LLAMA_MAX_SEQ), EMPTY_MIN, dtype=np.int64)
        self.pmax = np.full((self.n_stream, LLAMA_MAX_SEQ), -1, dtype=np.int64)
        self.pdirty = np.zeros((self.n_stream, LLAMA_MAX_SEQ), dtype=np.uint8)  # STALE_* bits
        # per stream: every K/V row (cell) from max(rows_hi, used_max_p1) on is zero, so a
        # whole restore zeroes only below it (a fresh buffer is zero: 0). Raised to
        # used_max_p1 before anything lowers that (no journal: a higher bound only zeroes
        # more); the owner's tensor writes outside the cells raise it to size
        self.rows_hi = np.zeros(self.n_stream, dtype=np.int64)
        self._flat_views()
        self._journal: list[tuple] | None = None
        self._saved: dict[str, np.ndarray] | None = None
        self._touched = np.zeros(self.n_stream, dtype=bool)
        self._native: tuple | None = None  # (pm_step_cells *, the buffers it points into)

    def _flat_views(self) -> None:
        self.pos_f = self.pos.reshape(-1)
        self.shift_f = self.shift.reshape(-1)
        self.seq_f = self.seq.reshape(-1, self.n_words)
        self.rows_f = self.seq.view(self.row).reshape(-1)  # one bitset item per cell
        self.owner_f = self.owner.reshape(-1)
        self.ext_f = None if self.ext is None else self.ext.reshape(-1, 3)
        self.pmin_f = self.pmin.reshape(-1)
        self.pmax_f = self.pmax.reshape(-1)
        self.pdirty_f = self.pdirty.reshape(-1)
        # the scalar position queries index these: a memoryview item is a Python int in
        # ~13 ns, ndarray.item ~37 ns (seq_pos_max is a sub-microsecond call)
        self.pmin_m = self.pmin_f.data
        self.pmax_m = self.pmax_f.data
        self.pdirty_m = self.pdirty_f.data

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in [k for k in state if k.endswith(("_f", "_m"))]:
            del state[k]  # views: rebuilt on the copy's own arrays
        state["_native"] = None  # pointers into these arrays, not the copy's
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._flat_views()

    # --- bitset width -----------------------------------------------------------------
    def fit(self, seq_id: int) -> None:
        """Make the bitsets hold ``seq_id`` (in ``[0, 256)``): every cell's bitset widened
        to the words it needs, the bits kept. A no-op for an id that fits, which is every
        id below the ``n_seq_ids`` the stack was made for."""
        if seq_id < 64 * self.n_words:
            return
        if not 0 <= seq_id < LLAMA_MAX_SEQ:
            raise ValueError(f"sequence id {seq_id} is outside [0, {LLAMA_MAX_SEQ})")
        n_words = words_for(seq_id + 1)
        wide = np.zeros((self.n_stream, self.size, n_words), dtype=np.uint64)
        wide[:, :, : self.n_words] = self.seq
        self.seq = wide
        self.n_words = n_words
        self.row = row_dtype(n_words)
        self._flat_views()
        if self._native is not None:  # the native view follows (its holders share it)
            c, bufs = self._native
            bufs[2] = ffi.from_buffer("uint64_t[]", self.seq_f, require_writable=True)
            c.seq, c.n_words = bufs[2], n_words

    def holds_id(self, seq_id: int) -> bool:
        """Whether ``seq_id`` has a bit in these bitsets (one past them is in no cell)."""
        return seq_id < 64 * self.n_words

    def as_rows(self, rows: np.ndarray) -> np.ndarray:
        """Bitset items of another width (a journal entry or log from before :meth:`fit`)
        as items of this width: zero words appended (a narrower item's ids all fit)."""
        if rows.dtype == self.row:
            return rows
        words = rows.view(np.uint64).reshape(rows.size, rows.dtype.itemsize // 8)
        if words.shape[1] > self.n_words:
            self.fit(64 * words.shape[1] - 1)
            return self.as_rows(rows)
        wide = np.zeros((rows.size, self.n_words), dtype=np.uint64)
        wide[:, : words.shape[1]] = words
        return wide.view(self.row).reshape(-1)

    def native(self) -> Any:
        """A ``pm_step_cells *`` over these arrays, built once (its pointers stay valid:
        the arrays are rebound only by :meth:`fit`, which updates the struct in place, so
        every holder of the pointer sees the wider bitsets)."""
        if self._native is None:
            c = ffi.new("pm_step_cells *")
            bufs = [
                ffi.from_buffer("int32_t[]", self.pos_f, require_writable=True),
                ffi.from_buffer("int32_t[]", self.shift_f, require_writable=True),
                ffi.from_buffer("uint64_t[]", self.seq_f, require_writable=True),
                ffi.from_buffer("int32_t[]", self.owner_f, require_writable=True),
                ffi.from_buffer("int64_t[]", self.used, require_writable=True),
                ffi.from_buffer("int64_t[]", self.used_max_p1, require_writable=True),
                ffi.from_buffer(
                    "uint8_t[]", self.used_max_dirty.view(np.uint8), require_writable=True
                ),
                ffi.from_buffer("int64_t[]", self.n_multi, require_writable=True),
                ffi.from_buffer("int64_t[]", self.pmin_f, require_writable=True),
                ffi.from_buffer("int64_t[]", self.pmax_f, require_writable=True),
                ffi.from_buffer("uint8_t[]", self.pdirty_f, require_writable=True),
                ffi.from_buffer("uint8_t[]", self.has_shift.view(np.uint8), require_writable=True),
                ffi.from_buffer("int64_t[]", self.rows_hi, require_writable=True),
            ]
            c.n_stream, c.size, c.n_words = self.n_stream, self.size, self.n_words
            (c.pos, c.shift, c.seq, c.owner, c.used, c.used_max_p1, c.used_max_dirty, c.n_multi,
             c.pmin, c.pmax, c.pdirty, c.has_shift, c.rows_hi) = bufs  # fmt: skip
            self._native = (c, bufs)
        return self._native[0]

    # --- journal --------------------------------------------------------------------
    @property
    def journaling(self) -> bool:
        return self._journal is not None

    def begin(self) -> None:
        """Start recording an undo journal (planning); :meth:`rollback` restores exactly."""
        assert self._journal is None, "nested journal"
        self._journal = []
        if self._saved is None:
            self._saved = {name: np.empty_like(getattr(self, name)) for name in _SUMMARY}

    def rollback(self) -> None:
        """Undo every mutation since :meth:`begin`, newest first."""
        assert self._journal is not None and self._saved is not None
        for entry in reversed(self._journal):
            self._set_cells(*entry)
        if self._touched.any():
            t = np.flatnonzero(self._touched)
            for name in _SUMMARY:
                getattr(self, name)[t] = self._saved[name][t]
        self.end()

    def end(self) -> None:
        """Stop recording and keep the changes."""
        self._journal = None
        if self._touched.any():
            self._touched[:] = False

    def redo_log(self, strm: int | None = None) -> tuple:
        """The changes since :meth:`begin` as they stand now (of stream ``strm`` only, or
        of every stream): the touched cells, their current values and the touched streams'
        counters. :meth:`redo` on the state :meth:`begin` saw reproduces this one without
        repeating the operations (a parsed state restore commits this way)."""
        assert self._journal is not None
        # a cell touched twice appears twice, with the same current values: harmless
        gid = np.concatenate([entry[0] for entry in self._journal] or [np.zeros(0, np.int64)])
        touched = self._touched.copy()
        if strm is not None:
            gid = gid[gid // self.size == strm]
            touched[:strm] = False
            touched[strm + 1 :] = False
        t = np.flatnonzero(touched)
        return (*self._cells_at(gid), t, [getattr(self, name)[t].copy() for name in _SUMMARY])

    def redo(self, log: tuple) -> None:
        """Apply a :meth:`redo_log` (the cells must be as they were at its :meth:`begin`)."""
        self._set_cells(*log[:6])
        t, values = log[6:]
        for name, v in zip(_SUMMARY, values):
            getattr(self, name)[t] = v

    def _touch(self, rows: Rows) -> None:
        """Save the counters of streams ``rows`` not saved yet (call before changing them)."""
        if self._journal is None:
            return
        assert self._saved is not None
        if isinstance(rows, (int, np.integer)):
            if self._touched[rows]:
                return
            new: np.ndarray | int = rows
        else:
            # each stream once, whatever the repeats: E.g. rows [2, 2, 0], touched [T, F, F] -> [2]
            hit = np.zeros(self.n_stream, dtype=bool)
            hit[rows] = True
            new = np.flatnonzero(hit & ~self._touched)
            if new.size == 0:
                return
        for name in _SUMMARY:
            self._saved[name][new] = getattr(self, name)[new]
        self._touched[new] = True

    def _record(self, gid: np.ndarray, rows: Rows) -> None:
        """Journal cells ``gid`` (of streams ``rows``) before they change."""
        if self._journal is None:
            return
        self._touch(rows)
        if gid.size:
            self._journal.append(self._cells_at(gid.copy()))

    def _cells_at(self, gid: np.ndarray) -> tuple:
        """Copies of the metadata of cells ``gid``, in :meth:`_set_cells` order."""
        ext = None if self.ext_f is None else self.ext_f[gid]
        return (gid, self.pos_f[gid], self.shift_f[gid], self.rows_f[gid], self.owner_f[gid], ext)

    def _set_cells(
        self,
        gid: np.ndarray,
        pos: np.ndarray,
        shift: np.ndarray,
        rows: np.ndarray,
        owner: np.ndarray,
        ext: np.ndarray | None,
    ) -> None:
        """Write the metadata of cells ``gid`` (a journal entry, or a redo log's cells)."""
        self.pos_f[gid] = pos
        self.shift_f[gid] = shift
        self.rows_f[gid] = self.as_rows(rows)
        self.owner_f[gid] = owner
        if ext is not None:
            assert self.ext_f is not None
            self.ext_f[gid] = ext

    # --- queries --------------------------------------------------------------------
    def used_max_p1_of(self, strm: np.ndarray) -> np.ndarray:
        """``used_max_p1`` of streams ``strm`` (int64), recomputing the dirty ones at once.

        E.g. a dirty stream with pos [3, -1, 5, -1, -1] (bound 5) -> 3.
        """
        dirty = strm[self.used_max_dirty[strm]]
        if dirty.size:
            dirty = np.unique(dirty)
            hi = int(self.used_max_p1[dirty].max())
            filled = self.pos[dirty, :hi] >= 0
            # the last filled cell + 1: E.g. [T, F, T, F, F] -> 5 - argmax([F, F, T, F, T]) = 3
            last = hi - np.argmax(filled[:, ::-1], axis=1)
            self.keep_rows(dirty)
            self.used_max_p1[dirty] = np.where(filled.any(axis=1), last, 0)
            self.used_max_dirty[dirty] = False
        return self.used_max_p1[strm]

    def holds(self, rows: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        """Bool ``[k, size]``: which cells of stream ``rows[j]`` hold ``seqs[j]``."""
        own = self.owner[rows]
        hold = own == seqs[:, None]
        if self.n_multi[rows].any():
            # (an id past the bitsets is in no cell: its pairs test nothing)
            r, c = np.nonzero((own == OWNER_MULTI) & (seqs < 64 * self.n_words)[:, None])
            # E.g. seqs [1, 65]: pair 1 tests bit 1 of word 1 of its multi cells
            words = self.seq[rows[r], c, seqs[r] >> 6]
            hold[r, c] = ((words >> (seqs[r] & 63).astype(np.uint64)) & _ONE) != 0
        return hold

    def refresh(self, rows: np.ndarray, seqs: np.ndarray) -> None:
        """Recompute the cached min/max position of the (stream, sequence) pairs
        ``(rows[j], seqs[j])`` and clear their dirty flags (pairs must be distinct)."""
        step = max(1, _REFRESH_CHUNK // self.size)
        for a in range(0, rows.size, step):  # chunks bound the [k, size] temporaries
            r, q = rows[a : a + step], seqs[a : a + step]
            hold = self.holds(r, q)
            pos = self.pos[r]
            lo = np.where(hold, pos, _POS_BIG).min(axis=1).astype(np.int64)
            hi = np.where(hold, pos, -1).max(axis=1).astype(np.int64)
            key = r * LLAMA_MAX_SEQ + q
            self.pmin_f[key] = np.where(hi >= 0, lo, EMPTY_MIN)
            self.pmax_f[key] = hi
            self.pdirty_f[key] = 0

    def _refresh_stale(self, key: np.ndarray, flag: int) -> None:
        """Recompute the (stream, sequence) keys whose ``flag`` bound is stale."""
        stale = self.pdirty_f[key] & flag
        if stale.any():  # usually not: a decode step's bounds are clean
            dirty = np.unique(key[stale != 0])
            self.refresh(dirty // LLAMA_MAX_SEQ, dirty % LLAMA_MAX_SEQ)

    def pos_max_at(self, key: np.ndarray) -> np.ndarray:
        """Largest position of (stream, sequence) keys ``s * 256 + seq_id`` (-1 if none)."""
        self._refresh_stale(key, STALE_MAX)
        return self.pmax_f[key]

    def pos_min_at(self, key: np.ndarray) -> np.ndarray:
        """Smallest position of (stream, sequence) keys (``EMPTY_MIN`` if none)."""
        self._refresh_stale(key, STALE_MIN)
        return self.pmin_f[key]

    # --- primitive mutations (vectorised over global cell ids) ---------------------------
    def streams_of(self, gid: np.ndarray) -> Rows:
        """The stream of each cell ``gid`` (int64), or an int when they are all in one
        (then per-stream bookkeeping is scalar). E.g. size 8, gid [3, 4] -> 0; [3, 9] -> [0, 1]."""
        if self.n_stream == 1:
            return 0
        lo, hi = int(gid.min()) // self.size, int(gid.max()) // self.size
        return lo if lo == hi else gid // self.size

    def _removed(self, gid: np.ndarray, rows: Rows) -> None:
        """Mark dirty the cached bounds that removing cells ``gid`` may change: a
        sequence's minimum if a removed position is at or below it, its maximum likewise.

        E.g. seq 3 with [min, max] = [10, 40] losing positions [10, 11] -> min dirty only.
        """
        own = self.owner_f[gid]
        single = own >= 0
        key = _sel(rows, single) * LLAMA_MAX_SEQ + own[single]
        p = self.pos_f[gid[single]].astype(np.int64)
        # (a repeated key reads and writes the same value: |= is safe here)
        self.pdirty_f[key[p <= self.pmin_f[key]]] |= STALE_MIN
        self.pdirty_f[key[p >= self.pmax_f[key]]] |= STALE_MAX
        if self.n_multi.any():
            multi = own == OWNER_MULTI
            self._moved(gid[multi], _sel(rows, multi))

    def _moved(self, gid: np.ndarray, rows: Rows) -> None:
        """Mark both bounds of every sequence held by cells ``gid`` dirty."""
        if gid.size == 0:
            return
        own = self.owner_f[gid]
        single = own >= 0
        key = _sel(rows, single) * LLAMA_MAX_SEQ + own[single]
        self.pdirty_f[key] = STALE
        if not self.n_multi.any():
            return
        multi = own == OWNER_MULTI
        if multi.any():
            # E.g. a multi cell of stream 1 holding {0, 3} -> keys [256, 259]
            bits = np.unpackbits(self.seq_f[gid[multi]].view(np.uint8), axis=1, bitorder="little")
            i, q = np.nonzero(bits)
            key = _sel(_sel(rows, multi), i) * LLAMA_MAX_SEQ + q
            self.pdirty_f[key] = STALE

    def _freed(self, gid: np.ndarray, rows: Rows) -> None:
        """Bookkeeping for cells ``gid`` (of streams ``rows``) that just became empty."""
        if isinstance(rows, int):
            self.used[rows] -= gid.size
            if int(gid.max()) - rows * self.size + 1 >= self.used_max_p1[rows]:
                self.used_max_dirty[rows] = True
            return
        # E.g. 3 streams, rows [0, 2, 2] -> used -= [1, 0, 2]
        self.used -= np.bincount(rows, minlength=self.n_stream)
        # a freed cell at or past the last used one: E.g. used_max_p1 8, freed cell 7 -> dirty
        top = gid - rows * self.size + 1 >= self.used_max_p1[rows]
        self.used_max_dirty[rows[top]] = True

    def _set_owner(self, gid: np.ndarray, rows: Rows, owner: np.ndarray | int) -> None:
        old = self.owner_f[gid]
        self.owner_f[gid] = owner
        new = self.owner_f[gid]
        # E.g. old [-2, 3], new [4, -2] -> delta [-1, +1] on the cells' streams
        delta = (new == OWNER_MULTI).astype(np.int64) - (old == OWNER_MULTI)
        if not delta.any():
            return
        if isinstance(rows, int):
            self.n_multi[rows] += int(delta.sum())
        else:
            np.add.at(self.n_multi, rows, delta)

    def keep_rows(self, rows: Rows | slice) -> None:
        """Raise ``rows_hi`` of streams ``rows`` to their ``used_max_p1`` (call before
        lowering that: the rows its cells held may still hold their bytes). A journal's
        rollback and redo need none: a plan writes no row, and ``rows_hi`` is not
        journaled, so what a recount or reset inside the plan raised stays raised."""
        self.rows_hi[rows] = np.maximum(self.rows_hi[rows], self.used_max_p1[rows])

    def rows_bound(self, strm: int) -> int:
        """Stream ``strm``'s cells from which on every K/V row is zero (see ``rows_hi``)."""
        return max(int(self.rows_hi[strm]), int(self.used_max_p1[strm]))

    def reset(self) -> None:
        """Empty every cell of every stream and forget pending shifts."""
        if self._journal is not None:  # the index arrays cost ~50 us at 32,768 cells
            self._record(np.arange(self.pos_f.size), np.arange(self.n_stream))
        self.pos[:] = POS_NONE
        self.shift[:] = 0
        self.seq[:] = 0
        self.owner[:] = OWNER_NONE
        if self.ext is not None:
            self.ext[:] = EXT_DEFAULT
        self.has_shift[:] = False
        self.n_multi[:] = 0
        self.used[:] = 0
        self.keep_rows(slice(None))
        self.used_max_p1[:] = 0
        self.used_max_dirty[:] = False
        self.pmin[:] = EMPTY_MIN
        self.pmax[:] = -1
        self.pdirty[:] = 0

    def reset_shift(self) -> None:
        """Forget the pending shifts of every stream (after a K-shift)."""
        self._record(np.flatnonzero(self.shift_f), np.arange(self.n_stream))
        self.shift[:] = 0
        self.has_shift[:] = False

    def rm(self, gid: np.ndarray, exact_bounds: bool = False) -> None:
        """Empty the non-empty cells ``gid`` (``llama_kv_cells::rm``).

        Every sequence that held one of them has its cached bounds marked dirty; with
        ``exact_bounds`` only those a removed position reaches (worth it for a few cells
        whose sequences' bounds are read next: the SWA overwrite).
        """
        if gid.size == 0:
            return
        rows = self.streams_of(gid)
        self._record(gid, rows)
        if exact_bounds:
            self._removed(gid, rows)
        else:
            self._moved(gid, rows)
        if self.n_multi.any():
            multi = self.owner_f[gid] == OWNER_MULTI
            if isinstance(rows, int):
                self.n_multi[rows] -= int(np.count_nonzero(multi))
            elif multi.any():
                np.subtract.at(self.n_multi, rows[multi], 1)
        self._empty(gid, rows)

    def _empty(self, gid: np.ndarray, rows: Rows) -> None:
        """Cells ``gid`` (of streams ``rows``) made empty; bounds, ``n_multi`` and the
        rollback record are the caller's."""
        self.owner_f[gid] = OWNER_NONE
        self.pos_f[gid] = POS_NONE
        self.shift_f[gid] = 0
        put_rows(self.rows_f, gid)
        if self.ext_f is not None:
            self.ext_f[gid] = EXT_DEFAULT
        self._freed(gid, rows)

    def rm_owned(self, gid: np.ndarray, own: np.ndarray, pos: np.ndarray) -> None:
        """:meth:`rm` with ``exact_bounds`` of cells ``gid`` of a one-stream stack without
        shared cells, each held by one sequence: ``own`` and ``pos`` are their owners and
        positions, already read by the caller (the SWA overwrite of a decode step). The
        same state as ``rm(gid, exact_bounds=True)`` in about half the numpy calls: the
        owner is the bound key, nothing is shared, the stream is 0."""
        self._record(gid, 0)
        # E.g. seq 3 with [min, max] = [10, 40] losing position 10 -> min dirty only
        # (a repeated key reads and writes the same value: |= is safe here)
        key = own.astype(np.int64)
        p = pos.astype(np.int64)
        self.pdirty_f[key[p <= self.pmin_f[key]]] |= STALE_MIN
        self.pdirty_f[key[p >= self.pmax_f[key]]] |= STALE_MAX
        self._empty(gid, 0)

    def set_new(
        self,
        strm: np.ndarray,
        idx: np.ndarray,
        pos: np.ndarray,
        seq_id: np.ndarray,
        ext: np.ndarray | None = None,
        gid: np.ndarray | None = None,
        known: NewRows | None = None,
    ) -> None:
        """Fill empty cells: ``idx[r]`` of stream ``strm[r]`` (distinct streams) get the
        tokens ``r * idx.shape[1] + i`` in order, with positions ``pos`` and the sequence
        ids of ``seq_id``, an int32 ``[n, k]`` matrix padded with -1 (a ubatch's ``seq_id``).

        ``gid`` (the cells' global ids, any shape) and ``known`` (:class:`NewRows` of
        ``strm`` and ``seq_id``) are what this computes first; a caller that already holds
        them (a decode step's memo) passes them.

        Cells that are one ascending run of one stream (a whole-cache restore's
        ``0 .. n-1``, a restore into a fresh cache) are written through a slice, which numpy
        copies without gathers; the result is the same as the general path's.
        """
        if idx.size == 0:
            return
        n_per = idx.shape[1]
        # E.g. size 8, strm [0, 2], idx [[3, 4], [0, 1]] -> gid [3, 4, 16, 17], rows [0, 0, 2, 2]
        run = _one_run(strm, idx) if gid is None else None
        cells: np.ndarray | slice
        if run is not None:
            # no index array at all unless the journal or the owner count needs one (a
            # fresh 32k-cell temporary costs its page faults, more than the writes)
            g0 = int(strm[0]) * self.size
            cells = slice(g0 + run.start, g0 + run.stop)
        else:
            gid = (strm[:, None] * self.size + idx).reshape(-1) if gid is None else gid.reshape(-1)
            cells = gid
        if known is not None:
            rows = known.rows
        else:
            rows = int(strm[0]) if strm.size == 1 else np.repeat(strm, n_per)
        if self._journal is not None:
            self._record(_ids(cells), strm)
        self.fit(known.hi if known is not None else int(seq_id.max()))
        pos = np.asarray(pos, dtype=np.int32)
        self.pos_f[cells] = pos
        primary = seq_id[:, 0]
        # simple, one stream, and every token has this id (a one-sequence restore)
        one_id = -1
        small = False  # simple, every id < 64 and the cells a run (a whole-cache restore)
        if known is not None:
            simple = known.simple
        else:
            lo = int(primary.min())
            simple = seq_id.shape[1] == 1 and lo >= 0  # one id per cell
            if simple and n_per >= RUN_MIN and strm.size == 1:
                hi = int(primary.max())
                one_id = lo if lo == hi else -1
                small = isinstance(cells, slice) and hi < 64
        if simple:
            # one id per token: E.g. ids [1, 65] -> words [0, 1], bits [1 << 1, 1 << 1]
            if one_id >= 0:
                # every cell gets the same bitset: one item written to all of them
                # (E.g. id 65 of two words -> [0, 0b10])
                item = np.zeros(self.n_words, dtype=np.uint64)
                word, bit = seq_word_bit(one_id)
                item[word] = bit
                put_rows(self.rows_f, cells, item.view(self.row)[0])
            elif small:
                # bits computed straight into word 0 of the run (no 32k-cell temporaries):
                # E.g. ids [1, 3] -> [0b10, 0b1000]
                assert isinstance(cells, slice)  # small is only set for a run
                self.seq_f[cells] = 0
                np.left_shift(
                    _ONE, primary, out=self.seq_f[cells, 0], dtype=np.uint64, casting="unsafe"
                )
            else:
                put_rows(self.rows_f, cells)
                if known is not None:
                    assert known.word is not None and known.bit is not None  # simple: set
                    self._set_bits(cells, known.word, known.bit)
                else:
                    self._set_bits(
                        cells, primary >> 6, np.left_shift(_ONE, (primary & 63).astype(np.uint64))
                    )
            owner = primary
        else:
            self.seq_f[cells] = seq_bitsets(seq_id)[:, : self.n_words]
            # exact popcount: a token may repeat a sequence id
            owner = single_seq_ids(self.seq_f[cells])
        if simple and not self.n_multi[strm].any():
            self.owner_f[cells] = owner  # empty cells, none of them held by several sequences
        else:
            self._set_owner(_ids(cells), rows, owner)
        if ext is not None and self.ext_f is not None:
            self.ext_f[cells] = ext
        if strm.size == 1:  # one stream (a unified cache): Python ints
            s = int(strm[0])
            self.used[s] += n_per
            hi = run.stop if run is not None else int(idx.max()) + 1
            self.used_max_p1[s] = max(int(self.used_max_p1[s]), hi)
        else:
            self.used[strm] += n_per
            self.used_max_p1[strm] = np.maximum(self.used_max_p1[strm], idx.max(axis=1) + 1)
        # E.g. tokens (pos 7, seqs [0, 2]) and (pos 9, seqs [2, -1]) in stream 1 -> the
        # bounds of key 1 * 256 + 2 see 7 and 9
        key: Any
        if one_id >= 0:
            k = int(strm[0]) * LLAMA_MAX_SEQ + one_id
            self.pmin_f[k] = min(int(self.pmin_f[k]), int(pos.min()))
            self.pmax_f[k] = max(int(self.pmax_f[k]), int(pos.max()))
            return
        if simple:
            key = rows * LLAMA_MAX_SEQ + primary if known is None else known.key
            assert key is not None
            p = pos
        else:
            t, c = np.nonzero(seq_id >= 0)
            key, p = _sel(rows, t) * LLAMA_MAX_SEQ + seq_id[t, c], pos[t]
        if simple and (n_per == 1 or (known is not None and known.distinct)):
            # one token per stream, or one per sequence: the keys are distinct
            p = p.astype(np.int64)
            self.pmin_f[key] = np.minimum(self.pmin_f[key], p)
            self.pmax_f[key] = np.maximum(self.pmax_f[key], p)
        else:
            min_max_at(self.pmin_f, self.pmax_f, key, p)

    def _set_bits(self, cells: np.ndarray | slice, word: np.ndarray, bit: np.ndarray) -> None:
        """Set bit ``bit[i]`` of word ``word[i]`` of cell ``i`` of ``cells`` (cleared)."""
        if int(word.max()) == 0:  # every id < 64 (usual): word 0 alone, one strided write
            self.seq_f[cells, 0] = bit
        elif isinstance(cells, slice):
            # a slice and an index array would pair every cell with every word: index
            # the run's view instead. E.g. cells 4:6, words [0, 1] -> (4, 0), (5, 1)
            self.seq_f[cells][np.arange(word.size), word] = bit
        else:
            self.seq_f[cells, word] = bit

    def seq_rm_upto(self, seqs: np.ndarray, rows: np.ndarray, p_max: np.ndarray) -> np.ndarray:
        """Remove each sequence ``seqs[j]`` from the cells of stream ``rows[j]`` at positions
        ``<= p_max[j]`` (the SWA purge; pairs distinct). Returns the global ids of the cells
        that became empty, ascending.

        A cell held by one sequence is tested through ``owner``: a ``[n_stream, 256]`` table
        of bounds, -2 where nothing is removed. E.g. stream 0, seq 2, p_max 5: cells of stream
        0 owned by 2 with pos [3, 5, 6] -> the first two.
        """
        if self.n_stream == 1 and self.n_multi[0] == 0:
            # one stream, no shared cells (a unified SWA cache's decode step): a cell goes
            # iff its owner's bound reaches it. Owners -2 and -1 read entries 0 and 1, -2,
            # below every position. E.g. seqs [2], p_max [5]: owners [2, 2, -1], pos
            # [3, 6, -1] -> bounds [5, 5, -2] -> cell 0
            bound1 = np.full(LLAMA_MAX_SEQ + 2, -2, dtype=np.int64)
            bound1[seqs + 2] = p_max
            own1 = self.owner[0]
            cells = np.flatnonzero(self.pos[0] <= bound1[own1 + 2])  # ascending, distinct
            if cells.size == 0:
                return cells
            return self._purge(cells, own1[cells].astype(np.int64), cells, 0, rows, seqs, p_max)
        # -2: below every position, empty cells (pos -1) included
        bound = np.full(self.n_stream * LLAMA_MAX_SEQ + 1, -2, dtype=np.int64)
        bound[rows * LLAMA_MAX_SEQ + seqs] = p_max
        # one stream: every pair is in row 0 (np.unique costs a sort)
        strms = rows[:1] if self.n_stream == 1 else np.unique(rows)
        pos = self.pos[strms]
        own = self.owner[strms]
        # owners -1 and -2 look up the last entry, -2: E.g. own [2, -1] in stream 0 of 10 -> keys [2, 2560]
        key = np.where(own >= 0, strms[:, None] * LLAMA_MAX_SEQ + own, bound.size - 1)
        r, c = np.nonzero(pos <= bound[key])
        gid = strms[r] * self.size + c
        hit_seq = own[r, c].astype(np.int64)
        if self.n_multi[strms].any():
            mr, mc = np.nonzero(own == OWNER_MULTI)
            mg = strms[mr] * self.size + mc
            bits = np.unpackbits(self.seq_f[mg].view(np.uint8), axis=1, bitorder="little")
            i, q = np.nonzero(bits)
            # a (multi cell, sequence) pair is removed where that sequence's bound reaches it
            take = self.pos_f[mg[i]] <= bound[(mg[i] // self.size) * LLAMA_MAX_SEQ + q]
            gid = np.concatenate((gid, mg[i[take]]))
            hit_seq = np.concatenate((hit_seq, q[take].astype(np.int64)))
        if gid.size == 0:
            return gid
        cells = np.unique(gid)
        return self._purge(gid, hit_seq, cells, self.streams_of(cells), rows, seqs, p_max)

    def _purge(
        self,
        gid: np.ndarray,
        hit_seq: np.ndarray,
        cells: np.ndarray,
        crow: Rows,
        rows: np.ndarray,
        seqs: np.ndarray,
        p_max: np.ndarray,
    ) -> np.ndarray:
        """:meth:`seq_rm_upto` once the (cell ``gid[k]``, sequence ``hit_seq[k]``) pairs to
        remove are known (``cells``: the distinct cells, ascending, of streams ``crow``)."""
        self._record(cells, crow)
        self._touch(rows)
        self._removed_bounds(rows, seqs, p_max)
        w = hit_seq >> 6
        np.bitwise_and.at(
            self.seq_f, (gid, w), ~np.left_shift(_ONE, (hit_seq & 63).astype(np.uint64))
        )
        self._set_owner(cells, crow, single_seq_ids(self.seq_f[cells]))
        emptied = cells[self.owner_f[cells] == OWNER_NONE]
        if emptied.size:
            self.pos_f[emptied] = POS_NONE
            self.shift_f[emptied] = 0
            if self.ext_f is not None:
                self.ext_f[emptied] = EXT_DEFAULT
            self._freed(emptied, self.streams_of(emptied))
        return emptied

    def purge_owned_upto(self, max_rm: np.ndarray) -> np.ndarray:
        """:meth:`seq_rm_upto` of every sequence ``s`` with ``max_rm[s] >= 0`` up to
        ``max_rm[s]`` (``max_rm``: int64 ``[256]``, -1 for none) on a one-stream stack
        without shared cells, the table used as it is (the SWA overwrite's purge, which
        usually finds nothing: the overwritten cells were the oldest). Returns the emptied
        cells, ascending; the same state as ``seq_rm_upto``."""
        hi = int(max_rm.max())
        if hi < 0:
            return _NO_CELLS
        pos1 = self.pos[0]
        # filled cells at or below the largest bound, one uint32 pass (an empty cell's -1
        # reads 2^32 - 1). E.g. pos [3, 6, -1], max_rm up to 5 -> candidates [0]
        cand = np.flatnonzero(pos1.view(np.uint32) <= np.uint32(hi))
        if cand.size == 0:
            return _NO_CELLS
        # owners -1 (a position without a sequence) read entry 1, -2: below every position
        # E.g. owners [2, -1], max_rm[2] = 5, pos [3, 4] -> bounds [5, -2] -> cell 0 only
        bound1 = np.concatenate((_NO_BOUND, max_rm))
        cells = cand[pos1[cand] <= bound1[self.owner[0, cand] + 2]]  # ascending, distinct
        if cells.size == 0:
            return cells
        seqs = np.flatnonzero(max_rm >= 0)
        return self._purge_owned(cells, np.zeros(seqs.size, np.int64), seqs, max_rm[seqs])

    def _purge_owned(
        self, cells: np.ndarray, rows: np.ndarray, seqs: np.ndarray, p_max: np.ndarray
    ) -> np.ndarray:
        """:meth:`_purge` of cells of stream 0 each held by the one sequence it loses (one
        stream, no shared cells): a bitset of one bit loses it and is empty, so every cell
        empties and ``n_multi`` stays 0; no ``ufunc.at`` and no owner recount."""
        self._record(cells, 0)
        self._touch(rows)
        self._removed_bounds(rows, seqs, p_max)
        self._empty(cells, 0)
        return cells

    def _removed_bounds(self, rows: np.ndarray, seqs: np.ndarray, p_max: np.ndarray) -> None:
        """Dirty flags for removing positions ``<= p_max[j]`` of pair j: the minimum may
        move; the maximum only if the bound reaches it."""
        key = rows * LLAMA_MAX_SEQ + seqs
        self.pdirty_f[key] |= STALE_MIN
        self.pdirty_f[key[p_max >= self.pmax_f[key]]] |= STALE_MAX


class KVCells:
    """The metadata of one stream's cells: a view of row ``strm`` of a
    :class:`StackedCells` (a standalone ``KVCells(size)`` owns a one-stream stack).

    ``pos``, ``shift``, ``seq``, ``owner`` and ``ext`` are views of the row; counters read
    and write the stack's arrays. The journal (:meth:`begin`, :meth:`rollback`,
    :meth:`end`) is the stack's, covering every stream; :meth:`redo_log` and :meth:`redo`
    carry this stream's part.
    """

    def __init__(self, size: int, with_ext: bool = False) -> None:
        self._bind(StackedCells(1, size, with_ext), 0)

    @classmethod
    def view(cls, store: StackedCells, strm: int) -> KVCells:
        """The cells of stream ``strm`` of ``store``."""
        cells = cls.__new__(cls)
        cells._bind(store, strm)
        return cells

    def _bind(self, store: StackedCells, strm: int) -> None:
        self.store = store
        self.strm = int(strm)
        self.size = store.size
        self._base = self.strm * store.size  # global id of cell 0
        self.pos = store.pos[strm]
        self.shift = store.shift[strm]
        self.owner = store.owner[strm]
        self.ext = None if store.ext is None else store.ext[strm]
        self._pmin = store.pmin[strm]
        self._pmax = store.pmax[strm]
        self._pdirty = store.pdirty[strm]  # STALE_* bits per sequence

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "strm": self.strm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._bind(state["store"], state["strm"])

    # --- counters (the stack's arrays) ----------------------------------------------------
    @property
    def used(self) -> int:
        """Number of non-empty cells."""
        return int(self.store.used[self.strm])

    @property
    def has_shift(self) -> bool:
        return bool(self.store.has_shift[self.strm])

    @has_shift.setter
    def has_shift(self, value: bool) -> None:
        self.store._touch(self.strm)
        self.store.has_shift[self.strm] = value

    @property
    def n_multi(self) -> int:
        """Cells held by several sequences (owner == OWNER_MULTI)."""
        return int(self.store.n_multi[self.strm])

    @property
    def seq(self) -> np.ndarray:
        """The cells' bitsets, ``uint64[size, n_words]`` (a property: :meth:`StackedCells.fit`
        rebinds the stack's array)."""
        return self.store.seq[self.strm]

    @property
    def _rows(self) -> np.ndarray:
        """``seq`` viewed as one item per cell (fast row gathers and stores)."""
        return self.store.rows_f[self._base : self._base + self.size]

    # --- journal --------------------------------------------------------------------
    def begin(self) -> None:
        """Start the stack's undo journal; :meth:`rollback` restores every stream exactly."""
        self.store.begin()

    def rollback(self) -> None:
        self.store.rollback()

    def end(self) -> None:
        self.store.end()

    def redo_log(self) -> tuple:
        """This stream's changes since :meth:`begin` (see :meth:`StackedCells.redo_log`)."""
        return self.store.redo_log(self.strm)

    def redo(self, log: tuple) -> None:
        self.store.redo(log)

    def snapshot(self) -> tuple:
        """A full copy of the metadata (tests and debugging)."""
        return (
            self.pos.copy(),
            self.shift.copy(),
            self.seq.copy(),
            self.owner.copy(),
            None if self.ext is None else self.ext.copy(),
            self.has_shift,
            self.used,
            self.used_max_p1(),
        )

    def load(self, other: KVCells) -> None:
        """Make this stream a copy of ``other`` (cells, counters, position caches)."""
        st, s = self.store, self.strm
        st._record(np.arange(self._base, self._base + self.size), s)
        st.fit(64 * other.store.n_words - 1)  # (other's bitsets may be wider)
        self.pos[:] = other.pos
        self.shift[:] = other.shift
        w = other.store.n_words
        self.seq[:, :w] = other.seq
        self.seq[:, w:] = 0
        self.owner[:] = other.owner
        if self.ext is not None and other.ext is not None:
            self.ext[:] = other.ext
        st.keep_rows(s)
        for name in _SUMMARY:
            getattr(st, name)[s] = getattr(other.store, name)[other.strm]

    def _record(self, idx: np.ndarray) -> None:
        if self.store.journaling:
            self.store._record(idx + self._base, self.strm)

    def _set_owner(self, idx: np.ndarray | slice, owner: np.ndarray | int) -> None:
        old = self.owner[idx]
        self.owner[idx] = owner
        delta = int(np.count_nonzero(self.owner[idx] == OWNER_MULTI)) - int(
            np.count_nonzero(old == OWNER_MULTI)
        )
        if delta:
            self.store.n_multi[self.strm] += delta

    # --- queries --------------------------------------------------------------------
    def used_max_p1(self) -> int:
        """Index of the last non-empty cell + 1; 0 when all cells are empty."""
        return int(self.store.used_max_p1_of(np.array([self.strm]))[0])

    def is_empty(self, i: int) -> bool:
        return bool(self.pos[i] < 0)

    def seq_has(self, i: int, seq_id: int) -> bool:
        if not self.store.holds_id(seq_id):
            return False
        w, b = seq_word_bit(seq_id)
        return bool(self.seq[i, w] & b)

    def seq_ids_of(self, i: int) -> list[int]:
        """Sequence ids of cell ``i``, ascending (not for hot paths)."""
        bits = np.unpackbits(self.seq[i].view(np.uint8), bitorder="little")
        return [int(s) for s in np.flatnonzero(bits)]

    def seq_mask(self, seq_id: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Bool mask over cells ``[lo, hi)`` holding ``seq_id``."""
        hi = self.size if hi is None else hi
        n_multi = self.n_multi
        if not self.store.holds_id(seq_id):
            return np.zeros(max(hi - lo, 0), dtype=bool)  # in no cell
        if 32 * n_multi > hi - lo:
            # many shared cells (forks): test the sequence's bit in every cell's bitset,
            # one byte per cell. E.g. seq 13 -> byte 1 of the 8 (or 32), bit 1 << 5
            byte = self.seq.view(np.uint8)[lo:hi, seq_id >> 3]
            return (byte & np.uint8(1 << (seq_id & 7))) != 0
        own = self.owner[lo:hi]
        mask = own == seq_id
        if n_multi == 0:
            return mask
        multi = np.flatnonzero(own == OWNER_MULTI)
        if multi.size:
            w, b = seq_word_bit(seq_id)
            mask[multi] = (self.seq[lo + multi, w] & b) != 0
        return mask

    def seq_cells(self, seq_id: int) -> np.ndarray:
        """Indices of the cells holding ``seq_id``, ascending."""
        return np.flatnonzero(self.seq_mask(seq_id))

    def seq_cells_in(self, seq_id: int, p0: int, p1: int) -> np.ndarray:
        """Indices of the cells holding ``seq_id`` with ``p0 <= pos < p1`` (``p0 >= 0``),
        ascending (see :meth:`seq_cells_in_all`)."""
        return self.seq_cells_in_all(seq_id, p0, p1)[0]

    def _cells_range_native(self, seq_id: int, p0: int, p1: int, n: int) -> np.ndarray:
        """The cells below ``n`` that ``seq_id`` holds with ``p0 <= pos < p1`` (alone, or
        shared: its bit), ascending, in one native pass into a small array (a second pass
        into one of the exact size when more are found)."""
        pos = ffi.from_buffer("int32_t[]", self.pos[:n])
        owner = ffi.from_buffer("int32_t[]", self.owner[:n])
        # (the bitsets read only where a cell is shared)
        bits = ffi.from_buffer("uint64_t[]", self.seq) if self.n_multi else ffi.NULL
        n_words = self.store.n_words
        count = ffi.new("int64_t *")
        out = np.empty(min(n, max(_RANGE_FIRST, min(p1 - p0, _RANGE_FIRST_MAX))), dtype=np.int64)
        status = lib.pm_kv_seq_cells_range(
            pos, owner, bits, n_words, n, seq_id, p0, p1,
            ffi.from_buffer("int64_t[]", out, require_writable=True), out.size, count,
        )  # fmt: skip
        k = int(count[0])
        if status == lib.PM_ERR_RANGE and k > out.size:
            out = np.empty(k, dtype=np.int64)
            status = lib.pm_kv_seq_cells_range(
                pos, owner, bits, n_words, n, seq_id, p0, p1,
                ffi.from_buffer("int64_t[]", out, require_writable=True), k, count,
            )  # fmt: skip
        check(status, "seq cells in a position range")
        return out[:k] if k else _NO_CELLS

    def range_cover(self, seq_id: int, p0: int, p1: int) -> RangeCover:
        """What the cached bounds of ``seq_id`` tell about its cells with ``p0 <= pos < p1``:
        NONE (an empty range, or clean bounds outside it: also a sequence without cells,
        E.g. [EMPTY_MIN .. -1]), WHOLE (clean bounds inside it: every cell of the sequence),
        else SOME (a scan decides)."""
        if p1 <= p0:
            return RangeCover.NONE
        if self._pdirty[seq_id] != 0:
            return RangeCover.SOME
        lo, hi = int(self._pmin[seq_id]), int(self._pmax[seq_id])
        if hi < p0 or lo >= p1:
            return RangeCover.NONE
        return RangeCover.WHOLE if p0 <= lo and hi < p1 else RangeCover.SOME

    def seq_cells_in_all(self, seq_id: int, p0: int, p1: int) -> tuple[np.ndarray, bool]:
        """The cells holding ``seq_id`` with ``p0 <= pos < p1`` (``p0 >= 0``), ascending:
        ``flatnonzero(pos in [p0, p1) & seq_mask(seq_id))`` in fewer passes; and whether
        they are known to be all of its cells (clean bounds inside the range).

        Only cells below ``used_max_p1`` are scanned (the stored value is an upper bound
        even while dirty: freeing cells never raises it). With clean cached bounds a range
        covering the sequence needs no position test and one missing it no scan at all.
        Otherwise a superset of the range is selected first (``pos >= p0``, one pass) and,
        when it is small (a tail, say), the exact tests run on its cells only.
        """
        cover = self.range_cover(seq_id, p0, p1)
        if cover == RangeCover.NONE:
            return _NO_CELLS, False
        n = int(self.store.used_max_p1[self.strm])
        if cover == RangeCover.WHOLE:
            # (numpy's mask and flatnonzero: 34 us for 8,192 of 32,768 cells, where the
            # native scan's scalar loop over every block with a position took 70)
            return np.flatnonzero(self.seq_mask(seq_id, 0, n)), True
        if USE_NATIVE_RANGE and p0 >= 0:  # (shared cells by their bits)
            return self._cells_range_native(seq_id, p0, min(p1, _POS_BIG), n), False
        # every cell of seq_id is known to be below p1 (clean bounds)
        below_p1 = self._pdirty[seq_id] == 0 and int(self._pmax[seq_id]) < p1
        pos = self.pos[:n]
        # from 0: one unsigned comparison, exact (E.g. pos [-1, 2, 9], p1 5 -> [F, T, F]);
        # else pos >= p0, a superset (E.g. pos [-1, 2, 9], [5, 7) -> [F, F, T])
        coarse = pos.view(np.uint32) < np.uint32(p1) if p0 == 0 else pos >= np.int32(p0)
        if 8 * int(np.count_nonzero(coarse)) > n:  # most cells: masks beat gathers
            exact = coarse if p0 == 0 else coarse & (pos < p1)
            return np.flatnonzero(exact & self.seq_mask(seq_id, 0, n)), False
        cand = np.flatnonzero(coarse)
        own = self.owner[cand]
        keep = own == seq_id
        if self.store.n_multi[self.strm] and self.store.holds_id(seq_id):
            # shared candidates: test the bit. E.g. seq 65, cell holding {3, 65} -> word 1 bit 1
            multi = np.flatnonzero(own == OWNER_MULTI)
            w, b = seq_word_bit(seq_id)
            keep[multi] = (self.seq[cand[multi], w] & b) != 0
        if p0 > 0 and not below_p1:
            keep &= pos[cand] < p1
        return cand[keep], False

    def _refresh(self, seq_id: int) -> None:
        p = self.pos[self.seq_mask(seq_id)]
        if p.size:
            self._pmin[seq_id] = int(p.min())
            self._pmax[seq_id] = int(p.max())
        else:
            self._pmin[seq_id] = EMPTY_MIN
            self._pmax[seq_id] = -1
        self._pdirty[seq_id] = 0

    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position of ``seq_id`` in these cells, -1 if it has none."""
        if self._pdirty[seq_id] & STALE_MIN:
            self._refresh(seq_id)
        v = int(self._pmin[seq_id])
        return -1 if v == EMPTY_MIN else v

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position of ``seq_id`` in these cells, -1 if it has none."""
        if self._pdirty[seq_id] & STALE_MAX:
            self._refresh(seq_id)
        return int(self._pmax[seq_id])

    def seq_pos_max_all(self) -> np.ndarray:
        """``seq_pos_max`` of every sequence id as ``int64[256]`` (-1 for absent ones)."""
        dirty = np.flatnonzero(self._pdirty & STALE_MAX)
        if dirty.size:
            self.store.refresh(np.full(dirty.size, self.strm, dtype=np.int64), dirty)
        return self._pmax

    # --- primitive mutations (vectorised over index arrays) ---------------------------
    def _dirty_from(self, idx: np.ndarray) -> None:
        """Mark both bounds of every sequence held by the cells ``idx`` dirty."""
        if idx.size == 0:
            return
        own = self.owner[idx]
        held = own[own >= 0]
        self._pdirty[held] = STALE
        if self.n_multi:
            multi = idx[own == OWNER_MULTI]
            if multi.size:
                words = np.bitwise_or.reduce(self.seq[multi], axis=0)
                bits = np.unpackbits(words.view(np.uint8), bitorder="little")
                self._pdirty[np.flatnonzero(bits)] = STALE

    def _freed(self, idx: np.ndarray) -> None:
        """Bookkeeping for cells ``idx`` that just became empty."""
        st, s = self.store, self.strm
        st.used[s] -= idx.size
        if idx.size and int(idx.max()) + 1 >= st.used_max_p1[s]:
            st.used_max_dirty[s] = True

    def reset(self) -> None:
        """Empty every cell and forget pending shifts (``llama_kv_cells::reset``)."""
        st, s = self.store, self.strm
        self._record(np.arange(self.size))
        self.pos[:] = POS_NONE
        self.shift[:] = 0
        self.seq[:] = 0
        self.owner[:] = OWNER_NONE
        if self.ext is not None:
            self.ext[:] = EXT_DEFAULT
        st.has_shift[s] = False
        st.n_multi[s] = 0
        st.used[s] = 0
        st.keep_rows(s)
        st.used_max_p1[s] = 0
        st.used_max_dirty[s] = False
        self._pmin[:] = EMPTY_MIN
        self._pmax[:] = -1
        self._pdirty[:] = 0

    def reset_shift(self) -> None:
        self._record(np.flatnonzero(self.shift))
        self.shift[:] = 0
        self.store.has_shift[self.strm] = False

    def rm(self, idx: np.ndarray) -> None:
        """Empty the non-empty cells ``idx`` (``llama_kv_cells::rm``)."""
        if idx.size == 0:
            return
        self._record(idx)
        self._dirty_from(idx)
        if self.n_multi:
            self.store.n_multi[self.strm] -= int(np.count_nonzero(self.owner[idx] == OWNER_MULTI))
        self.pos[idx] = POS_NONE
        self.shift[idx] = 0
        put_rows(self._rows, idx)
        self.owner[idx] = OWNER_NONE
        if self.ext is not None:
            self.ext[idx] = EXT_DEFAULT
        self._freed(idx)

    def set_new(
        self, idx: np.ndarray, pos: np.ndarray, seq_id: np.ndarray, ext: np.ndarray | None = None
    ) -> None:
        """Fill the empty cells ``idx`` with positions and sequence ids.

        ``seq_id`` is an int32 ``[n, k]`` matrix padded with -1 (a ubatch's ``seq_id``).
        """
        idx = np.asarray(idx, dtype=np.int64)
        strm = np.array([self.strm], dtype=np.int64)
        self.store.set_new(strm, idx.reshape(1, -1), pos, seq_id, ext)

    def seq_rm_bit(self, idx: np.ndarray, seq_id: int, whole: bool = False) -> np.ndarray:
        """Remove ``seq_id`` from the cells ``idx`` (ascending, distinct; all hold it).

        ``whole``: ``idx`` are all the cells of ``seq_id``, whose bounds then become those
        of a sequence without cells, clean (a later query needs no scan).
        Returns the cells that became empty, ascending as ``idx``.
        """
        if idx.size == 0:
            return idx
        self._record(idx)
        sel = _run(idx)
        if whole:
            self._pmin[seq_id], self._pmax[seq_id], self._pdirty[seq_id] = EMPTY_MIN, -1, 0
        else:
            p = self.pos[sel]
            if int(p.min()) <= self._pmin[seq_id]:
                self._pdirty[seq_id] |= STALE_MIN
            if int(p.max()) >= self._pmax[seq_id]:
                self._pdirty[seq_id] |= STALE_MAX
        own = self.owner[sel]
        single = own == seq_id
        n_single = int(np.count_nonzero(single))
        if n_single == idx.size:
            # every cell held by seq_id alone (a forked tail, say): its bitset is that one
            # bit, so the whole row clears and every cell empties; the owner goes from
            # seq_id to -1, which leaves n_multi as it was
            if isinstance(sel, slice):
                self.seq[sel] = 0
            else:
                put_rows(self._rows, idx)
            self.pos[sel] = POS_NONE
            self.shift[sel] = 0
            self.owner[sel] = OWNER_NONE
            if self.ext is not None:
                self.ext[sel] = EXT_DEFAULT
            st, s = self.store, self.strm
            st.used[s] -= idx.size
            if idx[-1] + 1 >= st.used_max_p1[s]:  # _freed, with idx ascending
                st.used_max_dirty[s] = True
            return idx
        w, b = seq_word_bit(seq_id)
        if isinstance(sel, slice):
            self.seq[sel, w] &= ~b
        else:
            words = self.store.seq[self.strm].reshape(-1)  # cell i's word w: i * n_words + w
            at = idx * self.store.n_words + w  # E.g. 4 words, idx [3, 9], w 0 -> [12, 36]
            words[at] = words[at] & ~b
        if n_single == 0:
            # every cell shared (a fork removed): each one's owner is what remains, read
            # in place when the cells are one run. E.g. {0, 5} minus 5 -> 0
            rows = self.seq[sel] if isinstance(sel, slice) else np.take(self.seq, idx, axis=0)
            owner = single_seq_ids(rows)
            self.owner[sel] = owner
            self.store.n_multi[self.strm] -= int(np.count_nonzero(owner != OWNER_MULTI))
            return _NO_CELLS
        emptied = idx[single]
        multi = idx[~single]
        # cells holding seq_id but not owned by it are shared (owner -2): their new
        # owner is what remains; E.g. {0, 5} minus 5 -> 0, {0, 1, 5} minus 5 -> -2
        owner = single_seq_ids(np.take(self.seq, multi, axis=0))
        self.owner[multi] = owner
        self.store.n_multi[self.strm] -= int(np.count_nonzero(owner != OWNER_MULTI))
        self.pos[emptied] = POS_NONE
        self.shift[emptied] = 0
        self._set_owner(emptied, OWNER_NONE)
        if self.ext is not None:
            self.ext[emptied] = EXT_DEFAULT
        self._freed(emptied)
        return emptied

    def seq_add_bit(self, idx: np.ndarray, seq_id: int) -> None:
        """Add ``seq_id`` to the non-empty cells ``idx`` (ascending, distinct; a no-op
        where already present)."""
        if idx.size == 0:
            return
        self.store.fit(seq_id)
        self._record(idx)
        w, b = seq_word_bit(seq_id)
        sel = _run(idx)
        if isinstance(sel, slice):
            self.seq[sel, w] |= b
        else:
            words = self.store.seq[self.strm].reshape(-1)  # cell i's word w: i * n_words + w
            words[idx * self.store.n_words + w] |= b  # E.g. 4 words, idx [3, 9], w 0 -> [12, 36]
        self._add_owner(sel, idx.size, seq_id)
        p = self.pos[sel]
        self._pmin[seq_id] = min(int(self._pmin[seq_id]), int(p.min()))
        self._pmax[seq_id] = max(int(self._pmax[seq_id]), int(p.max()))

    def _add_owner(self, sel: np.ndarray | slice, n: int, seq_id: int) -> None:
        """The owners of the ``n`` cells ``sel`` after ``seq_id`` joined them: -1 -> seq_id,
        seq_id stays, any other id or -2 -> -2 (E.g. [-1, 4, 7, -2] + 4 -> [4, 4, -2, -2])."""
        own = self.owner[sel]
        n_none = int(np.count_nonzero(own == OWNER_NONE))
        n_self = int(np.count_nonzero(own == seq_id))
        if n_none == 0 and n_self == 0:
            # the copy of a sequence into a new one: every cell ends shared; those that
            # were not shared yet (owner >= 0) add to n_multi
            self.store.n_multi[self.strm] += n - int(np.count_nonzero(own == OWNER_MULTI))
            self.owner[sel] = OWNER_MULTI
            return
        self._set_owner(
            sel, np.where(own == OWNER_NONE, seq_id, np.where(own == seq_id, seq_id, OWNER_MULTI))
        )

    def seq_keep(self, seq_id: int) -> np.ndarray:
        """Keep only ``seq_id``: strip other ids from its cells, empty every other cell.

        Returns the cells that became empty, ascending.
        """
        keep = self.seq_mask(seq_id)
        used = self.pos >= 0
        drop = np.flatnonzero(used & ~keep & (self.owner != OWNER_NONE))
        if not self.store.journaling and 2 * drop.size > self.size:
            self._keep_rebuild(seq_id, keep, used)
            return drop
        strip = np.flatnonzero(keep & (self.owner != seq_id))
        if strip.size:
            self._record(strip)
            self._dirty_from(strip)
            w, b = seq_word_bit(seq_id)
            put_rows(self._rows, strip)
            self.seq[strip, w] = b
            self._set_owner(strip, seq_id)
        if drop.size:
            self.rm(drop)
        # a cell with a position but no sequence is not "freed" here (the reference keeps it)
        return drop

    def _keep_rebuild(self, seq_id: int, keep: np.ndarray, used: np.ndarray) -> None:
        """``seq_keep`` when most cells go: refill the arrays wholesale, put back the cells
        of ``seq_id`` (with only that id) and the cells that hold no sequence at all."""
        st, s = self.store, self.strm
        stay = np.flatnonzero(keep | (used & (self.owner == OWNER_NONE)))
        mine = keep[stay]
        pos, shift = self.pos[stay], self.shift[stay]
        ext = None if self.ext is None else self.ext[stay]
        bounds = (
            int(self._pmin[seq_id]),
            int(self._pmax[seq_id]),
            int(self._pdirty[seq_id]),
        )
        has_shift = self.has_shift
        self.reset()
        st.has_shift[s] = has_shift
        self.pos[stay] = pos
        self.shift[stay] = shift
        if ext is not None:
            self.ext[stay] = ext  # type: ignore[index]
        if mine.any():  # (then seq_id is in a cell, so its word is in the bitsets)
            w, b = seq_word_bit(seq_id)
            self.seq[stay[mine], w] = b
        self.owner[stay[mine]] = seq_id
        (
            self._pmin[seq_id],
            self._pmax[seq_id],
            self._pdirty[seq_id],
        ) = bounds
        st.used[s] = stay.size  # (the reset above kept the rows the cells covered)
        st.used_max_p1[s] = int(stay[-1]) + 1 if stay.size else 0

    def pos_add(self, idx: np.ndarray, d: int) -> np.ndarray:
        """``pos += d`` and ``shift += d`` on the non-empty cells ``idx``.

        Cells whose position drops below 0 become empty; they are returned. As in the
        reference their ``ext`` is left as it was.
        """
        if idx.size == 0:
            return idx
        self._record(idx)
        self._dirty_from(idx)
        new = self.pos[idx].astype(np.int64) + d
        self.pos[idx] = new
        self.shift[idx] += np.int32(d)
        self.store.has_shift[self.strm] = True
        gone = idx[new < 0]
        if gone.size:
            self.pos[gone] = POS_NONE
            self.shift[gone] = 0
            put_rows(self._rows, gone)
            self._set_owner(gone, OWNER_NONE)
            self._freed(gone)
        return gone

    def pos_div(self, idx: np.ndarray, d: int) -> None:
        """``pos //= d`` on the non-empty cells ``idx``; ``shift`` gets ``new - old``.

        The reference accumulates ``old - new`` here (its K-shift then rotates the wrong
        way after ``seq_div``); pymem records the true displacement.
        """
        if idx.size == 0:
            return
        self._record(idx)
        self._dirty_from(idx)
        old = self.pos[idx]
        new = old // np.int32(d)
        self.pos[idx] = new
        self.shift[idx] += new - old
        self.store.has_shift[self.strm] = True

    def set_ext(self, idx: np.ndarray, ext: np.ndarray) -> None:
        if self.ext is None or idx.size == 0:
            return
        self._record(idx)
        self.ext[idx] = ext

    def copy_from(self, other: KVCells, idx: np.ndarray, seq_id: int) -> None:
        """Cross-stream ``seq_cp``: cells ``idx`` of ``other`` land here at the same index.

        Each gets the source position (with the pending shift carried over) and only
        ``seq_id``; this stream must have been reset first.
        """
        if idx.size == 0:
            return
        self._record(idx)
        pos = other.pos[idx]
        shift = other.shift[idx]
        seq_ids = np.full((idx.size, 1), seq_id, dtype=np.int32)
        self.set_new(idx, pos, seq_ids, None if other.ext is None else other.ext[idx])
        self.shift[idx] = shift
        if shift.any():
            self.store.has_shift[self.strm] = True


class CellViews(list[KVCells]):
    """``KVCache.v_cells``: the per-stream views of one stack. Assigning ``v_cells[s] = c``
    copies ``c`` into stream ``s`` (the views stay bound to the stack)."""

    def __setitem__(self, i: Any, value: Any) -> None:
        if isinstance(i, slice):
            raise TypeError("v_cells: assign one stream at a time")
        self[i].load(value)
