"""Recurrent state blobs (the reference's ``llama_memory_recurrent::state_write/state_read``).

Layout of one section (b.3)::

    u32 cell_count
    META, per cell: i32 pos, u32 n_seq_id, i32 seq_id[n_seq_id]   (n_seq_id = 0 per sequence)
    DATA (always, even for zero cells):
      u32 s_trans = 0, u32 n_layer                 (every trunk layer, not only recurrent)
      per recurrent layer: i32 r_type, u64 r_row, R rows of the cells (ascending)
      per recurrent layer: i32 s_type, u64 s_row, S rows of the cells

Owns the write (:func:`write_state`) and the two-phase read (:func:`parse_state`, which
validates everything and returns new cells plus pending tensor writes, and
:class:`RecurrentReadPlan`, whose ``commit()`` applies them). The functions take narrow
arguments: the cells, the tensors (:class:`StateLayers`) and the sizes; they never see the
memory. The plan reaches its memory only through :class:`ReadTarget`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Protocol

import numpy as np

from pymem._native import check, ffi, lib
from pymem.backend import Tensor
from pymem.errors import StateError
from pymem.memory import POS_MAX
from pymem.recurrent.cells import (
    RecurrentCells,
    SlotRequest,
    find_slot,
    place_new_sequence,
    seq_rm_cells,
)
from pymem.state import (
    BLOB_CHANGED,
    PendingWrites,
    StateReader,
    StateWriter,
    index_runs,
    refuse_stale_commit,
)
from pymem.ubatch import LLAMA_MAX_SEQ


@dataclass(frozen=True)
class StateLayers:
    """The tensors a state section carries, in blob order.

    ``n_layer`` is the trunk's layer count written in the header (every layer but the
    NextN / MTP ones, recurrent or not); ``layers`` are the recurrent layer indices and
    ``r`` / ``s`` their R and S tensors, in the same order.
    """

    n_layer: int
    layers: tuple[int, ...]
    r: tuple[Tensor, ...]
    s: tuple[Tensor, ...]
    # int64[2], the memory's: the cells from which on plane 0's R/S rows and the rollback
    # planes' are zero (a whole restore zeroes only below them; a store, which writes
    # plane 0, raises the first)
    rows_hi: np.ndarray

    @cached_property
    def cell_bytes(self) -> int:
        """One cell's bytes over every R and S tensor (a row of each)."""
        return sum(t.row_size for t in (*self.r, *self.s))


# --------------------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------------------


def select_rows(c: RecurrentCells, seq_id: int, n_rs_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Selected cells (ascending) and the row each one's *logical* state is read from.

    Row = ``rs_idx_cur * mem_size + (src if src >= 0 else cell)``: a pending copy on
    write and a pending rollback plane are resolved, so the blob holds the state the
    sequence would continue from. Rollback planes themselves are not saved. A whole-state
    selection (``seq_id == -1``) raises :class:`StateError` for a cell whose sequences
    disagree on their pending rollback.
    """
    size = c.size
    if seq_id != -1:  # one sequence: seq_cell_row's scalars (the one definition)
        cell, row = seq_cell_row(c, seq_id, n_rs_seq)
        n = int(cell >= 0)
        return np.full(n, cell, dtype=np.int64), np.full(n, row, dtype=np.int64)
    cells = np.flatnonzero(c.seq_counts())
    src = c.src[cells].astype(np.int64)
    rows = np.where(src >= 0, src, cells)
    if n_rs_seq and cells.size:
        # every sequence of a cell must agree on its pending rollback
        seqs = np.flatnonzero(c.tail >= 0)
        cell_of = c.tail[seqs]
        idx = c.rs_idx[seqs].astype(np.int64)
        lo = np.full(size, np.iinfo(np.int64).max)
        hi = np.full(size, -1, dtype=np.int64)
        np.minimum.at(lo, cell_of, idx)
        np.maximum.at(hi, cell_of, idx)
        if (lo[cells] != hi[cells]).any():
            bad = int(cells[np.flatnonzero(lo[cells] != hi[cells])[0]])
            raise StateError(
                f"state_write: cell {bad} is shared by sequences {c.seq_ids(bad)} with different "
                f"pending rollbacks {[int(c.rs_idx[s]) for s in c.seq_ids(bad)]}; decode or remove "
                "one of them first"
            )
        rows = rows + hi[cells] * size
    return cells, rows


def meta_words(c: RecurrentCells, cells: np.ndarray, seq_id: int) -> np.ndarray:
    """The META section as int32 words: ``pos, n_seq_id, seq ids...`` per cell.

    Per-sequence blobs write ``n_seq_id = 0`` (no ids); whole-state blobs list every
    sequence of the cell, ascending.
    """
    k = cells.size
    if seq_id != -1:
        out = np.zeros(2 * k, dtype=np.int32)
        out[0::2] = c.pos[cells]
        return out
    seqs = np.flatnonzero(c.tail >= 0)
    # sequences grouped by cell in cell order, ascending inside a cell
    # E.g., tail [1, -1, 0, 1] -> seqs [0, 2, 3] -> cells [1, 0, 1] -> order [2, 0, 3]
    seqs = seqs[np.argsort(c.tail[seqs], kind="stable")]
    if seqs.size == k:
        # every cell holds one sequence (the usual state): records of 3 words, in one go
        # E.g., cells [0, 1], pos [9, 4], seqs [1, 0] -> [9, 1, 1, 4, 1, 0]
        one = np.empty((k, 3), dtype=np.int32)
        one[:, 0] = c.pos[cells]
        one[:, 1] = 1
        one[:, 2] = seqs
        return one.reshape(-1)
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


def seq_cell_row(c: RecurrentCells, seq_id: int, n_rs_seq: int) -> tuple[int, int]:
    """(cell, row) of sequence ``seq_id`` (>= 0): its tail cell and the row its state is
    read from (a pending copy's source, in the pending rollback's plane); (-1, -1) when
    it holds no cell. In scalars: the one-sequence writer asks it per call, and
    :func:`select_rows` takes its one-sequence selection from it."""
    if not seq_id < c.size or c.tail[seq_id] < 0:
        return -1, -1
    cell = int(c.tail[seq_id])
    src = int(c.src[cell])
    row = src if src >= 0 else cell
    if n_rs_seq:
        row += int(c.rs_idx[seq_id]) * c.size
    return cell, row


def seq_section_size(layers: StateLayers, has_cell: bool) -> int:
    """The bytes :func:`write_state` writes for one sequence: count, META (pos and a zero
    id count) when it holds a cell, s_trans, n_layer, then per R and S tensor its header
    (i32 type, u64 row size) and the cell's row."""
    n = int(has_cell)
    return 4 + 8 * n + 8 + 12 * (len(layers.r) + len(layers.s)) + n * layers.cell_bytes


def touch_rows(rows_hi: np.ndarray, hi: int, planes: bool) -> None:
    """Raise a memory's ``rows_hi`` (StateLayers.rows_hi) to cover the rows of the cells
    below ``hi`` in plane 0 and, with ``planes`` (a graph's snapshots), the rollback
    planes."""
    if hi > rows_hi[0]:
        rows_hi[0] = hi
    if planes and hi > rows_hi[1]:
        rows_hi[1] = hi


class SeqRows:
    """One sequence's section in one native call (:c:func:`pm_rows_section` after a
    few header words), for a memory whose R and S tensors are all in host memory."""

    def __init__(self, layers: StateLayers) -> None:
        tensors = (*layers.r, *layers.s)
        self._tensors = ffi.new("struct ggml_tensor *[]", [t.ptr for t in tensors])
        self._spec = np.array([(t.type.id, t.row_size) for t in tensors], dtype=np.int64)
        self._spec_c = ffi.from_buffer("int64_t[]", self._spec)
        self._n = len(tensors)
        self._n_layer = layers.n_layer
        self._rows_hi = layers.rows_hi
        self._rows_hi_c = ffi.from_buffer("int64_t[]", layers.rows_hi)

    def walk(self, data: memoryview, n_rows: int, dst_row: int, store: bool) -> int | None:
        """:c:func:`pm_rows_store` over the tensor sections at the start of ``data``:
        their bytes when every header is this memory's and the rows are all there, None
        when not; with ``store`` (after such a check) the rows stored at ``dst_row``."""
        if store and n_rows > 0:
            touch_rows(self._rows_hi, dst_row + n_rows, planes=False)  # (a store: plane 0)
        consumed = ffi.new("int64_t *")
        check(
            lib.pm_rows_store(
                self._tensors, self._spec_c, self._n, n_rows, dst_row, ffi.from_buffer(data),
                len(data), int(store), consumed,
            ),
            "state_read: recurrent rows",
        )  # fmt: skip
        return None if consumed[0] < 0 else int(consumed[0])

    @property
    def n_tensors(self) -> int:
        return self._n

    def fill_whole_part(self, part: Any) -> None:
        """The rows' fields of a ``pm_whole_part`` (a composite's whole read)."""
        part.rs_n_layer = self._n_layer
        part.rs_tensors = self._tensors
        part.rs_spec = self._spec_c
        part.rs_n_tensors = self._n
        part.rs_rows_hi = self._rows_hi_c

    def sections(self, out: memoryview, starts: np.ndarray, ends: np.ndarray) -> None:
        """Every tensor section (header, then the rows of runs ``[starts[k], ends[k])``)
        into ``out``, exactly its size: one :c:func:`pm_rows_sections` call."""
        written = ffi.new("int64_t *")
        check(
            lib.pm_rows_sections(
                self._tensors, self._spec_c, self._n, ffi.from_buffer("int64_t[]", starts),
                ffi.from_buffer("int64_t[]", ends), starts.size,
                ffi.from_buffer(out, require_writable=True), len(out), written,
            ),
            "state_write: recurrent rows",
        )  # fmt: skip

    def whole(
        self, c: RecurrentCells, n_rs_seq: int
    ) -> tuple[int, Callable[[memoryview], int]] | None:
        """The whole memory's section (cell count, META, s_trans, n_layer, every tensor
        section) as (size, fill), sized now in one native call (:c:func:`pm_rs_write_whole`);
        ``fill(view)`` writes exactly ``size`` bytes in one more and returns that count.
        None where a cell's sequences disagree on their pending rollback (the general
        writer then names the cell)."""
        args = (
            ffi.from_buffer("int32_t[]", c.tail), ffi.from_buffer("int32_t[]", c.pos),
            ffi.from_buffer("int32_t[]", c.src), ffi.from_buffer("uint32_t[]", c.rs_idx),
            c.size, n_rs_seq, self._n_layer, self._tensors, self._spec_c, self._n,
        )  # fmt: skip
        out = ffi.new("int64_t[2]")  # written, disagree
        status = lib.pm_rs_write_whole(*args, ffi.NULL, 0, out, out + 1)
        if status != lib.PM_ERR_RANGE:  # a section is never 0 bytes: a size query is too small
            check(status, "state_write: recurrent section size")  # (PM_OK: they disagree)
        if out[1] >= 0:
            return None
        size = int(out[0])

        def fill(view: memoryview) -> int:
            done = ffi.new("int64_t[2]")
            dest = ffi.from_buffer(view, require_writable=True)
            check(
                lib.pm_rs_write_whole(*args, dest, len(view), done, done + 1),
                "state_write: recurrent section",
            )
            return int(done[0])

        return size, fill

    def restore_seq(
        self, data: memoryview, live: RecurrentCells, seq_id: int
    ) -> tuple[RecurrentCells, int, int, int] | None:
        """A per-sequence restore of ``seq_id`` (``0 <= seq_id < size``, checked by the
        caller against ``n_seq_max`` too) from the section at the start of ``data``, its
        seq_rm and placement in one native call (:c:func:`pm_rs_restore_seq`; the numpy
        :func:`seq_rm_cells` + :func:`place_new_sequence` the tested reference) on a copy
        of ``live``: (the cells after it, the section's bytes, the cell placed or -1, the
        offset of its tensor sections), or None where the case is another (the general
        parse decides and names it). The copy drops the steady record (a memo the next
        find_slot rebuilds when it needs one)."""
        c = live.copy()
        scalars = np.array([c.head, c.used, c.n, c.rs_z], dtype=np.int64)
        out = ffi.new("int64_t[2]")  # consumed, cell
        check(
            lib.pm_rs_restore_seq(
                ffi.from_buffer("int32_t[]", c.pos, require_writable=True),
                ffi.from_buffer("int32_t[]", c.src, require_writable=True),
                ffi.from_buffer("int32_t[]", c.src0, require_writable=True),
                ffi.from_buffer("int32_t[]", c.tail, require_writable=True),
                ffi.from_buffer("uint32_t[]", c.rs_idx, require_writable=True),
                ffi.from_buffer("uint32_t[]", c.n_last, require_writable=True),
                ffi.from_buffer("int64_t[]", scalars, require_writable=True), c.size, seq_id,
                ffi.from_buffer(data), len(data), self._n_layer, self._tensors, self._spec_c,
                self._n, out, out + 1,
            ),
            "state_read: one sequence's recurrent section",
        )  # fmt: skip
        if out[0] < 0:
            return None
        cell = int(out[1])
        c.head, c.used, c.n, c.rs_z = (int(v) for v in scalars)
        if cell >= 0:
            c.steady = None
        # the tensor sections follow the count, the cell's META (pos, n_seq_id) and
        # s_trans, n_layer: E.g. a cell -> at 4 + 8 + 8 = 20
        return c, int(out[0]), cell, 12 + 8 * int(cell >= 0)

    def read_whole(
        self, data: memoryview, size: int, limit: int, store: bool
    ) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The whole-memory section at the start of ``data`` checked in one native call
        (:c:func:`pm_rs_read_whole`): (its bytes, the cells' positions, per sequence its
        cell), or None where anything differs (the general parse names it). With ``store``
        (after such a check) the rows are stored and every row after them zeroed (below
        the memory's ``rows_hi``, where it keeps one; it is then the section's cells for
        plane 0 and none for the rollback planes)."""
        pos = np.empty(size, dtype=np.int32)
        tail = np.empty(size, dtype=np.int32)
        out = ffi.new("int64_t[2]")  # cell count, consumed
        check(
            lib.pm_rs_read_whole(
                ffi.from_buffer(data), len(data), size, limit, self._n_layer, self._tensors,
                self._spec_c, self._n, int(store), self._rows_hi_c,
                ffi.from_buffer("int32_t[]", pos, require_writable=True),
                ffi.from_buffer("int32_t[]", tail, require_writable=True), out, out + 1,
            ),
            "state_read: recurrent section",
        )  # fmt: skip
        if out[1] < 0:
            return None
        return int(out[1]), pos[: out[0]], tail

    def write(self, view: memoryview, c: RecurrentCells, cell: int, row: int) -> int:
        """The section of the sequence whose (cell, row) :func:`seq_cell_row` gave, into
        ``view`` (exactly :func:`seq_section_size` bytes); the bytes written."""
        if cell >= 0:
            struct.pack_into("<IiIII", view, 0, 1, int(c.pos[cell]), 0, 0, self._n_layer)
            at = 20
        else:
            struct.pack_into("<III", view, 0, 0, 0, self._n_layer)
            at = 12
        written = ffi.new("int64_t *")
        dest = ffi.from_buffer(view, require_writable=True) + at
        check(
            lib.pm_rows_section(
                self._tensors, self._spec_c, self._n, row, dest, len(view) - at, written
            ),
            "state_write: one sequence's recurrent rows",
        )
        return at + int(written[0])


def seq_rows(layers: StateLayers) -> SeqRows | None:
    """The native section writer when every R and S tensor is in host memory, else None."""
    if all(t.device.is_host for t in (*layers.r, *layers.s)):
        return SeqRows(layers)
    return None


def write_state(
    writer: StateWriter,
    c: RecurrentCells,
    layers: StateLayers,
    n_rs_seq: int,
    seq_id: int,
    native: SeqRows | None = None,
) -> None:
    """Serialise the cells of ``seq_id`` (every cell for -1) and their rows into ``writer``.

    ``seq_id`` is already checked (``>= -1``). With ``native`` (host tensors) and a writer
    that fills in place, every tensor section is one ``write_fill`` of one native call
    (:c:func:`pm_rows_sections`); else each tensor's rows move in one native call (every
    run of consecutive source rows).
    """
    if seq_id == -1 and native is not None and writer.fills_in_place:
        whole = native.whole(c, n_rs_seq)
        if whole is not None:  # else the general walk below names the cell that disagrees
            size, fill = whole
            writer.write_fill(size, fill)
            return
    cells, rows = select_rows(c, seq_id, n_rs_seq)
    writer.write_u32(int(cells.size))
    if cells.size:
        writer.write_array(meta_words(c, cells, seq_id))
    starts, ends = index_runs(rows)
    writer.write_u32(0)  # s_trans: the transposed layout is never written
    writer.write_u32(layers.n_layer)
    if native is not None and writer.fills_in_place:
        size = 12 * native.n_tensors + rows.size * layers.cell_bytes
        writer.write_fill(size, lambda out: native.sections(out, starts, ends))
        return
    # E.g. runs [4, 7), [2, 3) -> first rows [4, 2], row counts [3, 1]
    first = starts.astype(np.uint64)
    count = (ends - starts).astype(np.uint64)
    for t in (*layers.r, *layers.s):
        writer.write_i32(t.type.id)
        writer.write_u64(t.row_size)
        if starts.size:  # one native call per tensor, every run of rows
            writer.write_tensor_runs(t, 0, 1, 0, first * t.row_size, count * t.row_size)


# --------------------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------------------


def parse_state(
    reader: StateReader,
    c: RecurrentCells,
    layers: StateLayers,
    n_seq_max: int,
    n_rs_seq: int,
    seq_id: int,
    native: SeqRows | None = None,
) -> tuple[RecurrentCells, PendingWrites, int | None]:
    """Parse and validate one state section against the live cells ``c``; change nothing.

    Returns the cells after the restore, the tensor writes it needs, and for a whole
    restore the first row the commit must zero up to the end (None: nothing, or the
    writes zero it themselves). ``seq_id`` is already checked (-1, or below both
    ``n_seq_max`` and ``mem_size``). Raises :class:`StateError` on any problem in the blob.

    Whole (``seq_id == -1``): cells are restored to ``[0, cell_count)`` with their
    sequence sets, ``head = 0``, ``used = cell_count``. Per sequence: the destination
    is emptied, the (one) cell is placed as ``find_slot`` places a one-token ubatch, and
    its rows are read at ``head``. Restored cells get ``src = self``; rollback
    indices reset. With ``native`` (host tensors) and a plain blob, each is one native
    call (:meth:`SeqRows.read_whole`, :meth:`SeqRows.restore_seq`) where the case is the
    common one; the numpy parse below is their reference and names every fault.
    """
    if seq_id == -1 and native is not None:
        rest = reader.host_rest()
        limit = min(n_seq_max, c.size)
        found = None if rest is None else native.read_whole(rest, c.size, limit, False)
        if rest is not None and found is not None:
            taken, pos, tail = found
            reader.skip(taken, "recurrent state")
            cells = whole_cells(c, pos, tail)
            section = rest[:taken]

            def store() -> None:  # the bytes there now, as a payload write takes them
                if native.read_whole(section, c.size, limit, True) is None:  # nothing stored
                    raise StateError(BLOB_CHANGED)

            def unchanged() -> bool:
                again = native.read_whole(section, c.size, limit, False)
                return (
                    again is not None
                    and np.array_equal(again[1], pos)
                    and np.array_equal(again[2], tail)
                )

            writes = PendingWrites()
            writes.add_call(store, unchanged)
            return cells, writes, None
    if seq_id >= 0 and native is not None:
        rest = reader.host_rest()
        placed = None if rest is None else native.restore_seq(rest, c, seq_id)
        if rest is not None and placed is not None:
            cells, taken, cell, rows_at = placed
            reader.skip(taken, "recurrent state")
            rows = rest[rows_at:taken]
            meta = bytes(rest[:rows_at])  # what placed the cell: a few words
            n_rows = int(cell >= 0)

            def store_rows() -> None:  # the bytes there now, as a payload write takes them
                native.walk(rows, n_rows, cells.head, store=True)

            def unchanged() -> bool:
                again = native.walk(rows, n_rows, cells.head, store=False)
                return again is not None and rest[:rows_at] == meta

            writes = PendingWrites()
            writes.add_call(store_rows, unchanged)
            return cells, writes, None
    cell_count = reader.read_u32("recurrent cell_count")
    if cell_count > c.size:
        raise StateError(
            f"not enough cells in recurrent memory: blob holds {cell_count}, mem_size is {c.size}"
        )
    if seq_id == -1:
        cells = _parse_meta_whole(reader, c, cell_count, n_seq_max)
    else:
        cells = _parse_meta_seq(reader, c, cell_count, seq_id, n_seq_max, n_rs_seq)
    writes = _parse_data(reader, layers, cell_count, cells.head, native)
    return cells, writes, (cells.used if seq_id == -1 else None)


def whole_cells(live: RecurrentCells, pos: np.ndarray, tail: np.ndarray) -> RecurrentCells:
    """The cells a whole restore leaves: ``pos`` in cells ``[0, k)``, each its own
    source, sequences at ``tail``; ``src0``, ``n`` and ``rs_z`` kept (as clear() keeps
    them). :func:`_parse_meta_whole` is the reference."""
    k = pos.size
    c = RecurrentCells(live.size, live.rs_idx.size)
    c.src0[:] = live.src0
    c.n, c.rs_z = live.n, live.rs_z
    c.pos[:k] = pos
    c.tail[:] = tail
    c.src[:k] = np.arange(k)
    c.head = 0
    c.used = k
    return c


def _parse_meta_whole(
    reader: StateReader, live: RecurrentCells, cell_count: int, n_seq_max: int
) -> RecurrentCells:
    size = live.size
    c = RecurrentCells(size, live.rs_idx.size)
    c.src0[:] = live.src0  # clear() keeps src0, n and rs_z
    c.n, c.rs_z = live.n, live.rs_z
    if cell_count:
        pos, cell_of, seqs = _read_meta_cells(reader, cell_count)
        limit = min(n_seq_max, size)
        bad = (seqs < 0) | (seqs >= limit)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise StateError(
                f"invalid seq_id, {int(seqs[j])} is out of range [0, {limit}) (cell {int(cell_of[j])})"
            )
        cnt = np.bincount(seqs, minlength=limit)  # ids checked in [0, limit) above
        if cnt.max() > 1:
            s = int(np.flatnonzero(cnt > 1)[0])  # the smallest repeated id
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


def _parse_meta_seq(
    reader: StateReader,
    live: RecurrentCells,
    cell_count: int,
    dest: int,
    n_seq_max: int,
    n_rs_seq: int,
) -> RecurrentCells:
    c = live.copy()
    # empty the destination first (the reference's seq_rm(dest, -1, -1))
    seq_rm_cells(c, n_seq_max, n_rs_seq, dest, 0, POS_MAX)
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
    # dest holds no cell after the seq_rm, unless it is out of range or its position is
    # negative (seq_rm's range [0, POS_MAX) does not take it): find_slot handles those
    if 0 <= dest < c.size and c.tail[dest] < 0:
        placed = place_new_sequence(c, dest, pos)
    else:
        placed = find_slot(c, SlotRequest.one_token(dest, pos))
    if not placed:
        raise StateError(
            f"failed to find an available cell for sequence {dest} in recurrent memory"
        )
    c.src[c.head] = c.head
    return c


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
        block = reader.read_array("<i4", 3 * cell_count, "recurrent cell meta").reshape(-1, 3)
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


def _parse_data(
    reader: StateReader,
    layers: StateLayers,
    cell_count: int,
    head: int,
    native: SeqRows | None = None,
) -> PendingWrites:
    """The per-layer sections (``i32 type, u64 row size, cell_count rows`` per tensor, R
    then S): each header compared with the memory's as 12 bytes at once, the rows taken
    as a payload (``read_payload``: metadata and payloads are never read in one call, so a
    device-resident blob parses from its host metadata). With ``native`` (host tensors)
    and a plain blob, every section is checked in one native walk and stored by one more
    at commit; anything it does not take goes through this loop, which names the field."""
    s_trans = reader.read_u32("recurrent s_trans")
    n_layer = reader.read_u32("recurrent n_layer")
    if n_layer != layers.n_layer:
        raise StateError(f"mismatched layer count ({n_layer} instead of {layers.n_layer})")
    if s_trans != 0:
        raise StateError(f"incompatible s transposition: blob has s_trans={s_trans}, expected 0")
    writes = PendingWrites()
    rest = reader.host_rest() if native is not None else None
    if native is not None and rest is not None:
        taken = native.walk(rest, cell_count, head, store=False)
        if taken is not None:
            reader.skip(taken, "recurrent rows")
            sections = rest[:taken]

            def store() -> None:  # the bytes there now, as a payload write takes them
                native.walk(sections, cell_count, head, store=True)

            writes.add_call(store)
            return writes
    for kind, tensors in (("r", layers.r), ("s", layers.s)):
        for il, t in zip(layers.layers, tensors):
            got = reader.read_bytes(12, f"{kind} type and row size of layer {il}")
            if got != _HEADER.pack(t.type.id, t.row_size):
                type_id, row = _HEADER.unpack(got)
                if type_id != t.type.id:
                    raise StateError(
                        f"mismatched {kind} type ({t.type.id} != {type_id}, layer {il})"
                    )
                raise StateError(f"mismatched {kind} row size ({t.row_size} != {row}, layer {il})")
            if cell_count:
                data = reader.read_payload(cell_count * t.row_size, f"{kind} rows of layer {il}")
                # (plane 0's rows of cells [head, head + cell_count): a store's)
                touch = partial(touch_rows, layers.rows_hi, head + cell_count, False)
                writes.add(t, head * t.row_size, data, touch)
    return writes


_HEADER = struct.Struct("<iQ")  # a tensor section's header: type id, row size


class ReadTarget(Protocol):
    """What a :class:`RecurrentReadPlan` needs from the memory it was parsed for."""

    @property
    def version(self) -> int:
        """Bumped by every change of the memory: a plan parsed at another one is stale."""
        ...

    def check_open(self) -> None: ...

    def check_devices(self) -> None:
        """Raise DeviceError when a device of the memory's tensors is gone."""
        ...

    def zero_rows(self, from_row: int = 0) -> None:
        """Zero R/S rows ``[from_row, n_rows)`` (0: every byte, the data half of the
        reference's ``clear(true)``)."""
        ...

    def commit_cells(self, cells: RecurrentCells) -> None:
        """Make ``cells`` the memory's cells (a new version)."""
        ...


@dataclass
class RecurrentReadPlan:
    """A parsed, validated recurrent state restore; :meth:`commit` applies it.

    Compositions (hybrid memories) parse every part first and commit all of them only
    when every part parsed, so a bad blob changes nothing anywhere. ``zero_from`` (a
    whole-memory restore parsed in Python: its cell count; None where the native store
    zeroes them itself) zeroes every R/S row from there on; the rows below it are the
    blob's (the reference zeroes everything first, then writes them).
    """

    target: ReadTarget
    cells: RecurrentCells
    writes: PendingWrites
    zero_from: int | None
    version: int
    done: bool = field(default=False)
    parsed_now: bool = field(default=False)  # committed right after the parse

    def is_current(self) -> bool:
        return self.target.version == self.version

    def check_devices(self) -> None:
        self.target.check_devices()

    def verify(self) -> None:
        """The native stores' blob checked again (a composite's last look before any part
        commits; not for a plan committed right after its parse): StateError, nothing
        changed, where it no longer holds what the parse took."""
        if not self.parsed_now:
            self.writes.verify()

    def committed_at_once(self) -> None:
        self.parsed_now = True

    def commit(self) -> None:
        target = self.target
        target.check_open()
        refuse_stale_commit(self.done, self.is_current(), "memory")
        target.check_devices()
        if self.zero_from is not None:
            target.zero_rows(self.zero_from)
        self.writes.commit()
        target.commit_cells(self.cells)
        self.done = True
