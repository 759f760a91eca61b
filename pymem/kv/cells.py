"""Cell metadata of one KV stream, as parallel numpy arrays (``llama_kv_cells``).

One :class:`KVCells` describes the ``size`` cells of one stream::

    cell      0    1    2    3    4    5   ...
    pos      0    1    2   -1    7    3        int32, -1 = empty
    shift    0    0    0    0   +5    0        int32, delta accumulated since the last K-shift
    seq     {0}  {0}  {0,1} {}  {2}  {1}       uint64[size, 4] bitsets over 256 sequence ids
    owner    0    0   -2   -1    2    1        int32: the only sequence, -1 none, -2 several
    ext     (x, y, tok) per cell               int32[size, 3], only with M-RoPE / PLE

``owner`` is derived from ``seq`` and kept in step with it: it turns most per-sequence
tests into one int32 comparison and only cells shared by several sequences need a bit test.

Per-sequence minimum and maximum positions are cached (``llama_kv_cells::seq_pos``): adding
cells updates them in O(1) per sequence, removing cells marks the touched sequences dirty,
and a query recomputes a dirty sequence with one vectorised pass. Cells with a position but
no sequence are allowed (a whole-state restore can produce them), as in the reference.

Every mutation goes through a few vectorised primitives that can record an undo journal:
:meth:`KVCells.begin` / :meth:`KVCells.rollback` restore the cells exactly, which is how
``KVCache.prepare`` plans ubatches without changing anything.
"""

from __future__ import annotations

import numpy as np

from pymem.ubatch import LLAMA_MAX_SEQ, seq_bitsets

N_WORDS = LLAMA_MAX_SEQ // 64
POS_NONE = -1
OWNER_NONE = -1
OWNER_MULTI = -2
_EMPTY_MIN = np.iinfo(np.int64).max
EXT_DEFAULT = (0, 0, -1)  # x, y, tok (LLAMA_TOKEN_NULL)

_ONE = np.uint64(1)
_ROW = np.dtype((np.void, N_WORDS * 8))  # one cell's bitset as a single 32-byte item
_ZERO_ROW = np.zeros(1, dtype=_ROW)[0]


def seq_word_bit(seq_id: int) -> tuple[int, np.uint64]:
    """The word index and bit mask of ``seq_id`` in a ``uint64[4]`` bitset."""
    return seq_id >> 6, np.left_shift(_ONE, np.uint64(seq_id & 63))


def single_seq_ids(bits: np.ndarray) -> np.ndarray:
    """Owner ids of bitset rows: the only set bit, -1 for none, -2 for several.

    E.g. rows [[0b100, 0, 0, 0], [0, 0, 0, 0], [0b11, 0, 0, 0], [0, 0b1, 0, 0]] -> [2, -1, -2, 64].
    """
    count = np.bitwise_count(bits).sum(axis=1, dtype=np.int32)
    out = np.where(count == 0, OWNER_NONE, OWNER_MULTI).astype(np.int32)
    one = np.flatnonzero(count == 1)
    if one.size:
        words = bits[one]
        w = np.argmax(words != 0, axis=1)
        word = words[np.arange(one.size), w]
        # a single set bit is a power of two, exact in float64: log2 gives its index
        out[one] = w * 64 + np.log2(word.astype(np.float64)).astype(np.int32)
    return out


class KVCells:
    """The metadata of one stream's cells; tensor data lives elsewhere."""

    def __init__(self, size: int, with_ext: bool = False) -> None:
        self.size = int(size)
        self.pos = np.full(self.size, POS_NONE, dtype=np.int32)
        self.shift = np.zeros(self.size, dtype=np.int32)
        self.seq = np.zeros((self.size, N_WORDS), dtype=np.uint64)
        self.owner = np.full(self.size, OWNER_NONE, dtype=np.int32)
        self.ext: np.ndarray | None = None
        if with_ext:
            self.ext = np.empty((self.size, 3), dtype=np.int32)
            self.ext[:] = EXT_DEFAULT
        self.has_shift = False
        self.n_multi = 0  # cells held by several sequences (owner == OWNER_MULTI)
        self._used = 0
        self._used_max_p1 = 0
        self._used_max_dirty = False
        self._pmin = np.full(LLAMA_MAX_SEQ, _EMPTY_MIN, dtype=np.int64)
        self._pmax = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int64)
        self._pdirty = np.zeros(LLAMA_MAX_SEQ, dtype=bool)
        self._journal: list[tuple] | None = None
        self._saved: tuple | None = None

    # --- journal --------------------------------------------------------------------
    def begin(self) -> None:
        """Start recording an undo journal (planning); :meth:`rollback` restores exactly."""
        assert self._journal is None, "nested journal"
        self._journal = []
        self._saved = self._summary()

    def rollback(self) -> None:
        """Undo every mutation since :meth:`begin`, newest first."""
        assert self._journal is not None and self._saved is not None
        for entry in reversed(self._journal):
            self._set_cells(*entry)
        self._set_summary(self._saved)
        self._journal = None
        self._saved = None

    def _summary(self) -> tuple:
        """The counters and per-sequence position caches a journal saves (copied)."""
        return (
            self._used,
            self._used_max_p1,
            self._used_max_dirty,
            self.has_shift,
            self.n_multi,
            self._pmin.copy(),
            self._pmax.copy(),
            self._pdirty.copy(),
        )

    def _set_summary(self, saved: tuple) -> None:
        """Put back what :meth:`_summary` returned."""
        (
            self._used,
            self._used_max_p1,
            self._used_max_dirty,
            self.has_shift,
            self.n_multi,
            pmin,
            pmax,
            pdirty,
        ) = saved
        self._pmin[:] = pmin
        self._pmax[:] = pmax
        self._pdirty[:] = pdirty

    def _set_cells(
        self,
        idx: np.ndarray,
        pos: np.ndarray,
        shift: np.ndarray,
        rows: np.ndarray,
        owner: np.ndarray,
        ext: np.ndarray | None,
    ) -> None:
        """Write the metadata of cells ``idx`` (a journal entry, or a redo log's cells)."""
        self.pos[idx] = pos
        self.shift[idx] = shift
        self._rows[idx] = rows
        self.owner[idx] = owner
        if ext is not None:
            assert self.ext is not None
            self.ext[idx] = ext

    def redo_log(self) -> tuple:
        """The changes since :meth:`begin` as they stand now: the touched cells, their
        current values and the scalar state. :meth:`redo` on the state :meth:`begin` saw
        reproduces this one without repeating the operations (a parsed state restore
        commits this way)."""
        assert self._journal is not None and self._saved is not None
        # a cell touched twice appears twice, with the same current values: harmless
        idx = np.concatenate([entry[0] for entry in self._journal] or [np.zeros(0, np.int64)])
        return (*self._cells_at(idx), *self._summary())

    def redo(self, log: tuple) -> None:
        """Apply a :meth:`redo_log` (the cells must be as they were at its :meth:`begin`)."""
        self._set_cells(*log[:6])
        self._set_summary(log[6:])

    def end(self) -> None:
        """Stop recording and keep the changes."""
        self._journal = None
        self._saved = None

    def _record(self, idx: np.ndarray) -> None:
        if self._journal is not None and idx.size:
            self._journal.append(self._cells_at(idx.copy()))

    def _cells_at(self, idx: np.ndarray) -> tuple:
        """Copies of the metadata of cells ``idx``, in :meth:`_set_cells` order."""
        ext = None if self.ext is None else self.ext[idx]
        return (idx, self.pos[idx], self.shift[idx], self._rows[idx], self.owner[idx], ext)

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

    @property
    def _rows(self) -> np.ndarray:
        """``seq`` viewed as one 32-byte item per cell (fast row gathers and stores)."""
        return self.seq.view(_ROW).reshape(self.size)

    def _set_owner(self, idx: np.ndarray, owner: np.ndarray | int) -> None:
        old = self.owner[idx]
        self.owner[idx] = owner
        self.n_multi += int(np.count_nonzero(self.owner[idx] == OWNER_MULTI)) - int(
            np.count_nonzero(old == OWNER_MULTI)
        )

    # --- queries --------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Number of non-empty cells."""
        return self._used

    def used_max_p1(self) -> int:
        """Index of the last non-empty cell + 1; 0 when all cells are empty."""
        if self._used_max_dirty:
            nz = np.flatnonzero(self.pos[: self._used_max_p1] >= 0)
            self._used_max_p1 = int(nz[-1]) + 1 if nz.size else 0
            self._used_max_dirty = False
        return self._used_max_p1

    def is_empty(self, i: int) -> bool:
        return bool(self.pos[i] < 0)

    def seq_has(self, i: int, seq_id: int) -> bool:
        w, b = seq_word_bit(seq_id)
        return bool(self.seq[i, w] & b)

    def seq_ids_of(self, i: int) -> list[int]:
        """Sequence ids of cell ``i``, ascending (not for hot paths)."""
        bits = np.unpackbits(self.seq[i].view(np.uint8), bitorder="little")
        return [int(s) for s in np.flatnonzero(bits)]

    def seq_mask(self, seq_id: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Bool mask over cells ``[lo, hi)`` holding ``seq_id``."""
        hi = self.size if hi is None else hi
        own = self.owner[lo:hi]
        mask = own == seq_id
        if self.n_multi == 0:
            return mask
        multi = np.flatnonzero(own == OWNER_MULTI)
        if multi.size:
            w, b = seq_word_bit(seq_id)
            mask[multi] = (self.seq[lo + multi, w] & b) != 0
        return mask

    def seq_cells(self, seq_id: int) -> np.ndarray:
        """Indices of the cells holding ``seq_id``, ascending."""
        return np.flatnonzero(self.seq_mask(seq_id))

    def _refresh(self, seq_id: int) -> None:
        p = self.pos[self.seq_mask(seq_id)]
        if p.size:
            self._pmin[seq_id] = int(p.min())
            self._pmax[seq_id] = int(p.max())
        else:
            self._pmin[seq_id] = _EMPTY_MIN
            self._pmax[seq_id] = -1
        self._pdirty[seq_id] = False

    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position of ``seq_id`` in these cells, -1 if it has none."""
        if self._pdirty[seq_id]:
            self._refresh(seq_id)
        v = int(self._pmin[seq_id])
        return -1 if v == _EMPTY_MIN else v

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position of ``seq_id`` in these cells, -1 if it has none."""
        if self._pdirty[seq_id]:
            self._refresh(seq_id)
        return int(self._pmax[seq_id])

    def seq_pos_max_all(self) -> np.ndarray:
        """``seq_pos_max`` of every sequence id as ``int64[256]`` (-1 for absent ones)."""
        for s in np.flatnonzero(self._pdirty):
            self._refresh(int(s))
        return self._pmax

    # --- primitive mutations (vectorised over index arrays) ---------------------------
    def _dirty_from(self, idx: np.ndarray) -> None:
        """Mark every sequence held by the cells ``idx`` dirty (their min/max may move)."""
        if idx.size == 0:
            return
        own = self.owner[idx]
        self._pdirty[own[own >= 0]] = True
        if self.n_multi:
            multi = idx[own == OWNER_MULTI]
            if multi.size:
                words = np.bitwise_or.reduce(self.seq[multi], axis=0)
                self._pdirty |= np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)

    def _freed(self, idx: np.ndarray) -> None:
        """Bookkeeping for cells ``idx`` that just became empty."""
        self._used -= int(idx.size)
        if idx.size and int(idx.max()) + 1 >= self._used_max_p1:
            self._used_max_dirty = True

    def reset(self) -> None:
        """Empty every cell and forget pending shifts (``llama_kv_cells::reset``)."""
        if self._journal is not None:
            self._record(np.arange(self.size))
        self.pos[:] = POS_NONE
        self.shift[:] = 0
        self.seq[:] = 0
        self.owner[:] = OWNER_NONE
        if self.ext is not None:
            self.ext[:] = EXT_DEFAULT
        self.has_shift = False
        self.n_multi = 0
        self._used = 0
        self._used_max_p1 = 0
        self._used_max_dirty = False
        self._pmin[:] = _EMPTY_MIN
        self._pmax[:] = -1
        self._pdirty[:] = False

    def reset_shift(self) -> None:
        self._record(np.flatnonzero(self.shift))
        self.shift[:] = 0
        self.has_shift = False

    def rm(self, idx: np.ndarray) -> None:
        """Empty the non-empty cells ``idx`` (``llama_kv_cells::rm``)."""
        if idx.size == 0:
            return
        self._record(idx)
        self._dirty_from(idx)
        if self.n_multi:
            self.n_multi -= int(np.count_nonzero(self.owner[idx] == OWNER_MULTI))
        self.pos[idx] = POS_NONE
        self.shift[idx] = 0
        self._rows[idx] = _ZERO_ROW
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
        if idx.size == 0:
            return
        self._record(idx)
        pos = np.asarray(pos, dtype=np.int32)
        self.pos[idx] = pos
        primary = seq_id[:, 0]
        simple = seq_id.shape[1] == 1 and int(primary.min()) >= 0  # one id per cell
        if simple:
            # one id per token: E.g. ids [1, 65] -> words [0, 1], bits [1 << 1, 1 << 1]
            self._rows[idx] = _ZERO_ROW
            self.seq[idx, primary >> 6] = np.left_shift(_ONE, (primary & 63).astype(np.uint64))
            self._set_owner(idx, primary)
        else:
            self.seq[idx] = seq_bitsets(seq_id)
            # exact popcount: a token may repeat a sequence id
            self._set_owner(idx, single_seq_ids(self.seq[idx]))
        if ext is not None and self.ext is not None:
            self.ext[idx] = ext
        self._used += int(idx.size)
        top = int(idx.max()) + 1
        if top > self._used_max_p1:
            self._used_max_p1 = top
        # E.g. tokens (pos 7, seqs [0, 2]) and (pos 9, seqs [2, -1]) -> min/max of seq 2 see 7 and 9
        if simple:
            ids, p = primary, pos
        else:
            rows, cols = np.nonzero(seq_id >= 0)
            ids, p = seq_id[rows, cols], pos[rows]
        if ids.size == 1:
            s = int(ids[0])
            self._pmin[s] = min(int(self._pmin[s]), int(p[0]))
            self._pmax[s] = max(int(self._pmax[s]), int(p[0]))
        else:
            np.minimum.at(self._pmin, ids, p.astype(np.int64))
            np.maximum.at(self._pmax, ids, p.astype(np.int64))

    def seq_rm_bit(self, idx: np.ndarray, seq_id: int) -> np.ndarray:
        """Remove ``seq_id`` from the cells ``idx`` (which all hold it).

        Returns the cells that became empty, ascending as ``idx``.
        """
        if idx.size == 0:
            return idx
        self._record(idx)
        w, b = seq_word_bit(seq_id)
        p = self.pos[idx]
        self.seq[idx, w] &= ~b
        if int(p.min()) <= self._pmin[seq_id] or int(p.max()) >= self._pmax[seq_id]:
            self._pdirty[seq_id] = True
        own = self.owner[idx]
        single = own == seq_id
        emptied = idx[single]
        multi = idx[~single]
        if multi.size:
            self._set_owner(multi, single_seq_ids(self.seq[multi]))
        if emptied.size:
            self.pos[emptied] = POS_NONE
            self.shift[emptied] = 0
            self._set_owner(emptied, OWNER_NONE)
            if self.ext is not None:
                self.ext[emptied] = EXT_DEFAULT
            self._freed(emptied)
        return emptied

    def seq_add_bit(self, idx: np.ndarray, seq_id: int) -> None:
        """Add ``seq_id`` to the non-empty cells ``idx`` (a no-op where already present)."""
        if idx.size == 0:
            return
        self._record(idx)
        w, b = seq_word_bit(seq_id)
        self.seq[idx, w] |= b
        own = self.owner[idx]
        self._set_owner(
            idx, np.where(own == OWNER_NONE, seq_id, np.where(own == seq_id, seq_id, OWNER_MULTI))
        )
        p = self.pos[idx].astype(np.int64)
        self._pmin[seq_id] = min(int(self._pmin[seq_id]), int(p.min()))
        self._pmax[seq_id] = max(int(self._pmax[seq_id]), int(p.max()))

    def seq_keep(self, seq_id: int) -> np.ndarray:
        """Keep only ``seq_id``: strip other ids from its cells, empty every other cell.

        Returns the cells that became empty, ascending.
        """
        keep = self.seq_mask(seq_id)
        used = self.pos >= 0
        drop = np.flatnonzero(used & ~keep & (self.owner != OWNER_NONE))
        if self._journal is None and 2 * drop.size > self.size:
            self._keep_rebuild(seq_id, keep, used)
            return drop
        strip = np.flatnonzero(keep & (self.owner != seq_id))
        if strip.size:
            self._record(strip)
            self._dirty_from(strip)
            w, b = seq_word_bit(seq_id)
            self._rows[strip] = _ZERO_ROW
            self.seq[strip, w] = b
            self._set_owner(strip, seq_id)
        if drop.size:
            self.rm(drop)
        # a cell with a position but no sequence is not "freed" here (the reference keeps it)
        return drop

    def _keep_rebuild(self, seq_id: int, keep: np.ndarray, used: np.ndarray) -> None:
        """``seq_keep`` when most cells go: refill the arrays wholesale, put back the cells
        of ``seq_id`` (with only that id) and the cells that hold no sequence at all."""
        stay = np.flatnonzero(keep | (used & (self.owner == OWNER_NONE)))
        mine = keep[stay]
        pos, shift = self.pos[stay], self.shift[stay]
        ext = None if self.ext is None else self.ext[stay]
        pmin, pmax, dirty = (
            int(self._pmin[seq_id]),
            int(self._pmax[seq_id]),
            bool(self._pdirty[seq_id]),
        )
        has_shift = self.has_shift
        self.reset()
        self.has_shift = has_shift
        self.pos[stay] = pos
        self.shift[stay] = shift
        if ext is not None:
            self.ext[stay] = ext  # type: ignore[index]
        w, b = seq_word_bit(seq_id)
        self.seq[stay[mine], w] = b
        self.owner[stay[mine]] = seq_id
        self._pmin[seq_id], self._pmax[seq_id], self._pdirty[seq_id] = pmin, pmax, dirty
        self._used = int(stay.size)
        self._used_max_p1 = int(stay[-1]) + 1 if stay.size else 0

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
        self.has_shift = True
        gone = idx[new < 0]
        if gone.size:
            self.pos[gone] = POS_NONE
            self.shift[gone] = 0
            self._rows[gone] = _ZERO_ROW
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
        self.has_shift = True

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
            self.has_shift = True
