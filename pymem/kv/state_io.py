"""KV cache state blobs (the reference's ``llama_kv_cache::state_write/state_read``, b.2).

Layout, per blob::

    u32 n_stream
    per stream s:
      u32 cell_count                      (an empty stream stops here)
      cell_count x { i32 pos, u32 n_seq_id, [i32 x, i32 y, i32 tok], i32 seq_id[n_seq_id] }
      u32 v_trans, u32 n_layer
      per layer: i32 k_type, u64 k_row, K rows of the selected cells (ascending)
      v_trans 0: per layer with V: i32 v_type, u64 v_row, V rows
      v_trans 1: per layer with V: i32 v_type, u32 el, u32 n_embd_v_gqa,
                 for each channel j: the selected cells' elements of channel j

Tensor bytes move in one native call per section and layer: the selected cells form runs
of consecutive cells, and ``Tensor.read_ranges_into`` / ``write_ranges`` copy every run's
byte range (a K/V row run, or for transposed V one range per channel and run) straight
between the tensor and the blob, on any device. Host tensors keep numpy views where those
are faster: a single run, sequences decoded in lockstep (runs a constant stride apart),
and transposed V whose runs are too short for a copy call each. Reading parses and
validates everything first, simulating the per-sequence placement under an undo journal,
and returns a :class:`KVStatePlan`; only ``commit()`` changes the cache.

This module also owns zeroing cells' K/V bytes (:func:`zero_range`, :func:`zero_cells`).
Its functions take the cache's :class:`~pymem.kv.layout.KVLayout`, its cells
(``v_cells``), heads and :class:`~pymem.kv.layout.KVLayer` list; the few cache operations
a restore drives (slot search, clearing, the mutation counter) come in as
:class:`KVStateHooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass

import numpy as np

from pymem.backend import Tensor
from pymem.errors import StateError
from pymem.kv.cells import OWNER_MULTI, KVCells
from pymem.kv.layout import KVLayer, KVLayout, SlotInfo, StreamHeads
from pymem.spec import SWAType, masked_swa
from pymem.state import StateReader, StateWriter, expect
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

_RUNS_LOOP = 32  # up to this many runs of cells, move each run as one slice
# transposed V: from this mean run length (bytes per channel) on, one native range copy per
# channel and run beats numpy's element gather / scatter (measured on a host: runs of 1-16
# f16 cells are even, longer runs 3x faster; the scatter side wins earlier)
_RANGES_MIN_GATHER = 16
_RANGES_MIN_SCATTER = 8


def _uint_dtype(size: int) -> np.dtype:
    return np.dtype(f"<u{size}")


def rows_view(t: Tensor) -> np.ndarray | None:
    """``uint8[n_rows, row_size]`` zero-copy view of a host tensor, else None."""
    if not t.device.is_host:
        return None
    return t.numpy().view(np.uint8).reshape(t.n_rows, t.row_size)


def v_trans_view(layout: KVLayout, layer: KVLayer, strm: int) -> np.ndarray | None:
    """Transposed V of one stream as ``[n_embd_v_gqa_max, kv_size]`` elements (host only)."""
    v = layer.v
    if v is None or not v.device.is_host:
        return None
    el = _uint_dtype(layout.v_el_size)
    raw = v.numpy().view(np.uint8).reshape(layout.n_stream, -1)
    return raw[strm].view(el).reshape(v.shape[0], layout.kv_size)


def cell_runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of consecutive indices as ``(starts, ends)`` (ends exclusive).

    E.g. [2, 3, 4, 9, 11, 12] -> ([2, 9, 11], [5, 10, 13]).
    """
    if idx.size == 0:
        return idx, idx
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], brk))]
    ends = idx[np.concatenate((brk - 1, [idx.size - 1]))] + 1
    return starts, ends


def _strided_runs(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """A ``[rows, R, L]`` view of the columns of ``a`` (``[rows, K]``) in the runs, when
    all ``R`` runs have one length ``L`` and start a constant stride apart; else None.

    E.g. starts [2, 6, 10], ends [3, 7, 11] (every 4th cell, as sequences decoded in
    lockstep leave them) -> view of columns 2, 6, 10 as shape [rows, 3, 1].
    """
    if not _lockstep(starts, ends):
        return None
    base = a[:, int(starts[0]) :]
    return np.lib.stride_tricks.as_strided(
        base,
        shape=(a.shape[0], starts.size, int(ends[0] - starts[0])),
        strides=(a.strides[0], int(starts[1] - starts[0]) * a.strides[1], a.strides[1]),
    )


def _lockstep(starts: np.ndarray, ends: np.ndarray) -> bool:
    """Whether at least two runs all have one length and start a constant stride apart."""
    if starts.size < 2:
        return False
    length = ends - starts
    gaps = np.diff(starts)
    return not ((length != length[0]).any() or (gaps != gaps[0]).any())


def gather_cols(
    src: np.ndarray,
    idx: np.ndarray,
    out: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """``out[:, k] = src[:, idx[k]]`` for ascending ``idx`` (``src`` 2-D, ``out`` contiguous).

    ``runs``: ``cell_runs(idx)`` when the caller has it already.
    """
    starts, ends = cell_runs(idx) if runs is None else runs
    if starts.size <= _RUNS_LOOP:
        col = 0
        for a, b in zip(starts.tolist(), ends.tolist()):
            out[:, col : col + b - a] = src[:, a:b]
            col += b - a
        return
    strided = _strided_runs(src, starts, ends)
    if strided is not None:
        out.reshape(strided.shape)[...] = strided
    else:
        np.take(src, idx, axis=1, out=out)


def scatter_cols(
    dst: np.ndarray,
    idx: np.ndarray,
    src: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """``dst[:, idx[k]] = src[:, k]`` for ascending ``idx`` (``runs`` as in gather_cols)."""
    starts, ends = cell_runs(idx) if runs is None else runs
    if starts.size <= _RUNS_LOOP:
        col = 0
        for a, b in zip(starts.tolist(), ends.tolist()):
            dst[:, a:b] = src[:, col : col + b - a]
            col += b - a
        return
    strided = _strided_runs(dst, starts, ends)
    if strided is not None:
        strided[...] = src.reshape(strided.shape)
        return
    # one flat index per element, a block of rows at a time (a flat scatter beats a 2-D one)
    flat = dst.reshape(-1) if dst.flags.c_contiguous else None
    if flat is None:
        dst[:, idx] = src
        return
    k = dst.shape[1]
    block = max(1, (1 << 20) // max(1, idx.size))
    for r0 in range(0, dst.shape[0], block):
        r1 = min(dst.shape[0], r0 + block)
        where = (np.arange(r0, r1, dtype=np.int64)[:, None] * k + idx[None, :]).ravel()
        flat[where] = src[r0:r1].ravel()


def row_ranges(
    t: Tensor, base_row: int, idx: np.ndarray, runs: tuple[np.ndarray, np.ndarray], row: int
) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges ``(offsets, sizes)`` of the first ``row`` bytes of rows ``base_row + idx``
    of ``t``, in order: one range per run of cells when whole rows are used.

    E.g. row_size 8, base_row 0, runs [2, 5) and [9, 10) -> offsets [16, 72], sizes [24, 8].
    """
    starts, ends = runs
    if row == t.row_size:
        offsets, sizes = (base_row + starts) * row, (ends - starts) * row
    else:
        offsets, sizes = (base_row + idx) * t.row_size, np.full(idx.size, row, dtype=np.int64)
    # the native call's type: converted once here, not on every call that reuses them
    return offsets.astype(np.uint64), sizes.astype(np.uint64)


def row_runs(
    t: Tensor, base_row: int, idx: np.ndarray, runs: tuple[np.ndarray, np.ndarray], row: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """Rows ``base_row + idx`` of ``t`` (the first ``row`` bytes of each) as one runs set
    ``(offset, starts, sizes)`` for ``Tensor.read_runs_into`` / ``write_runs`` (one
    repetition): one run per run of cells when whole rows are used, else one per cell.

    E.g. row_size 8, base_row 4, runs [2, 5) and [9, 10) -> (32, [16, 72], [24, 8]).
    """
    starts, ends = runs
    if row == t.row_size:
        return (
            base_row * row,
            (starts * row).astype(np.uint64),
            ((ends - starts) * row).astype(np.uint64),
        )
    st = (idx * t.row_size).astype(np.uint64)
    return base_row * t.row_size, st, np.full(idx.size, row, dtype=np.uint64)


def col_runs(runs: tuple[np.ndarray, np.ndarray], el: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte runs of one transposed-V channel, relative to the channel's first cell: with
    ``n_rep = n_embd`` and ``rep_stride = kv_size * el`` they give the whole section in
    blob order (channel by channel, the runs of each).

    E.g. runs [2, 5) and [9, 10), el 2 -> starts [4, 18], sizes [6, 2].
    """
    starts, ends = runs
    return (starts * el).astype(np.uint64), ((ends - starts) * el).astype(np.uint64)


# runs sets shared by the tensors of one stream: ("rows", row_size, row) -> (offset, starts,
# sizes), ("cols", el, 0) -> (0, starts, sizes)
_RangeMemo = dict[tuple[str, int, int], tuple[int, np.ndarray, np.ndarray]]


def _row_runs_memo(
    memo: _RangeMemo,
    t: Tensor,
    base_row: int,
    idx: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray],
    row: int,
) -> tuple[int, np.ndarray, np.ndarray]:
    """:func:`row_runs`, shared by the tensors of one stream with the same row sizes."""
    key = ("rows", t.row_size, row)
    if key not in memo:
        memo[key] = row_runs(t, base_row, idx, runs, row)
    return memo[key]


def _col_runs_memo(
    memo: _RangeMemo, runs: tuple[np.ndarray, np.ndarray], el: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`col_runs`, shared by every V layer of one stream."""
    key = ("cols", el, 0)
    if key not in memo:
        memo[key] = (0, *col_runs(runs, el))
    return memo[key][1], memo[key][2]


def col_ranges(
    base: int, stride: int, n_embd: int, runs: tuple[np.ndarray, np.ndarray], el: int
) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges of transposed-V elements in blob order: channel by channel, the runs of
    each channel (channel ``j`` starts at ``base + j * stride``).

    E.g. base 0, stride 100, 2 channels, runs [2, 5) and [9, 10), el 2
    -> offsets [4, 18, 104, 118], sizes [6, 2, 6, 2].
    """
    starts, ends = runs
    chan = base + np.arange(n_embd, dtype=np.int64) * stride
    offsets = (chan[:, None] + starts[None, :] * el).ravel()
    return offsets.astype(np.uint64), np.tile((ends - starts) * el, n_embd).astype(np.uint64)


def cols_method(
    host: bool, runs: tuple[np.ndarray, np.ndarray], el: int, min_run_bytes: int
) -> str:
    """How to move a transposed-V section whose cells form ``runs`` (``el``-byte elements).

    * ``"ranges"``: one native call for the whole section (``Tensor.read_runs_into`` /
      ``write_runs``: every channel's runs, short ones copied inline); every host tensor,
      and any device when the runs are long or few;
    * ``"numpy"`` (host): per-run slices, a lockstep strided view, or an element gather;
      the tested reference of the native path (tests force it);
    * ``"staged"`` (not host, many short runs): copy the span from the first to the last
      cell of every channel to the host, move the elements there with numpy (and, when
      restoring, put the span back), instead of a device copy per element.
    """
    if host:
        return "ranges"
    starts, ends = runs
    short = int((ends - starts).sum()) * el < min_run_bytes * starts.size
    return "staged" if starts.size > 1 and short else "ranges"


def _span(
    v: Tensor, base: int, stride: int, n_embd: int, runs: tuple[np.ndarray, np.ndarray], el: int
) -> tuple[int, np.ndarray]:
    """Elements of cells ``[first run start, last run end)`` of every channel, read to the
    host as ``[n_embd, span]`` (one strided read); returns ``(first cell, array)``."""
    lo, hi = int(runs[0][0]), int(runs[1][-1])
    span = v.read_strided(base + lo * el, (hi - lo) * el, stride, n_embd)
    return lo, span.view(_uint_dtype(el)).reshape(n_embd, hi - lo)


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


def selected_cells(layout: KVLayout, cells: KVCells, seq_id: int) -> np.ndarray:
    """Cells of one stream (``cells``) a blob holds: all non-empty ones, or (per sequence)
    those of ``seq_id`` that are not SWA-masked relative to its largest position."""
    if seq_id == -1:
        return np.flatnonzero(cells.pos >= 0)
    idx = cells.seq_cells(seq_id)
    if idx.size and layout.swa_type != SWAType.NONE:
        pmax = cells.seq_pos_max(seq_id)
        idx = idx[~masked_swa(layout.n_swa, layout.swa_type, cells.pos[idx], pmax)]
    return idx


def _meta_words(layout: KVLayout, cells: KVCells, idx: np.ndarray, seq_id: int) -> np.ndarray:
    """The meta records of cells ``idx`` (of one stream, ``cells``) as one int32 array."""
    n = idx.size
    n_ext = 3 if layout.with_ext else 0
    if seq_id != -1:
        # every record: pos, n_seq_id, [ext], seq_id (no id at all for ids >= n_seq_max)
        has_id = seq_id < layout.n_seq_max
        rec = 2 + n_ext + (1 if has_id else 0)
        out = np.empty((n, rec), dtype=np.int32)
        out[:, 0] = cells.pos[idx]
        out[:, 1] = 1 if has_id else 0
        if n_ext:
            out[:, 2 : 2 + n_ext] = cells.ext[idx]  # type: ignore[index]
        if has_id:
            out[:, -1] = seq_id
        return out.ravel()

    # whole cache: every id below n_seq_max, ascending
    owner = cells.owner[idx]
    if n == 0 or (int(owner.min()) >= 0 and int(owner.max()) < layout.n_seq_max):
        # every cell held by one sequence (the usual case): fixed records, no bitsets
        # E.g. pos [5, 6], owner [0, 2], no ext -> [5, 1, 0, 6, 1, 2]
        out = np.empty((n, 3 + n_ext), dtype=np.int32)
        out[:, 0] = cells.pos[idx]
        out[:, 1] = 1
        if n_ext:
            out[:, 2 : 2 + n_ext] = cells.ext[idx]  # type: ignore[index]
        out[:, -1] = owner
        return out.ravel()
    counts = np.zeros(n, dtype=np.int64)
    single = (owner >= 0) & (owner < layout.n_seq_max)
    counts[single] = 1
    multi = np.flatnonzero(owner == OWNER_MULTI)
    bits = np.zeros((0, layout.n_seq_max), dtype=np.uint8)
    if multi.size:
        unpacked = np.unpackbits(cells.seq[idx[multi]].view(np.uint8), axis=1, bitorder="little")
        bits = unpacked[:, : layout.n_seq_max]
        counts[multi] = bits.sum(axis=1)
    recs = 2 + n_ext + counts
    # E.g. recs [3, 4, 3] -> starts [0, 3, 7]
    starts = np.concatenate(([0], np.cumsum(recs)[:-1]))
    words = np.empty(int(recs.sum()), dtype=np.int32)
    words[starts] = cells.pos[idx]
    words[starts + 1] = counts
    if cells.ext is not None and n_ext:
        for e in range(n_ext):
            words[starts + 2 + e] = cells.ext[idx, e]
    id0 = starts + 2 + n_ext
    words[id0[single]] = owner[single]
    if multi.size:
        multi_rows, multi_ids = np.nonzero(bits)  # row-major: ascending ids per cell
        # rank of each id within its cell: E.g. rows [0, 0, 1] -> ranks [0, 1, 0]
        rank = np.arange(multi_rows.size) - np.searchsorted(multi_rows, multi_rows, side="left")
        words[id0[multi[multi_rows]] + rank] = multi_ids
    return words


def _write_rows(
    writer: StateWriter,
    t: Tensor,
    base_row: int,
    idx: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray],
    row: int,
    memo: _RangeMemo,
) -> None:
    """Rows ``base_row + idx`` of ``t`` (each ``row`` bytes used), in order."""
    starts, ends = runs
    if starts.size == 1 and row == t.row_size:
        a, b = base_row + int(starts[0]), base_row + int(ends[0])
        view = rows_view(t)
        if view is not None:
            writer.write(view[a:b].data.cast("B"))
        else:
            writer.write_tensor(t, a * row, (b - a) * row)
        return
    offset, st, sz = _row_runs_memo(memo, t, base_row, idx, runs, row)
    writer.write_tensor_runs(t, offset, 1, 0, st, sz)


def _write_v_trans(
    writer: StateWriter,
    layout: KVLayout,
    layer: KVLayer,
    strm: int,
    idx: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray],
    memo: _RangeMemo,
) -> None:
    n_embd = layer.n_embd_v_gqa
    el = layout.v_el_size
    size = n_embd * idx.size * el
    view = v_trans_view(layout, layer, strm)
    method = cols_method(view is not None, runs, el, _RANGES_MIN_GATHER)
    if view is not None and method == "numpy":
        sub = view[:n_embd]

        def fill(out: memoryview) -> None:
            dst = np.frombuffer(out, dtype=view.dtype).reshape(n_embd, idx.size)
            gather_cols(sub, idx, dst, runs)

        writer.write_fill(size, fill)
        return
    v = layer.v
    assert v is not None
    base = strm * v.nb[2]
    stride = layout.kv_size * el
    if method == "staged":

        def fill_staged(out: memoryview) -> None:
            lo, span = _span(v, base, stride, n_embd, runs, el)
            dst = np.frombuffer(out, dtype=span.dtype).reshape(n_embd, idx.size)
            gather_cols(span, idx - lo, dst, (runs[0] - lo, runs[1] - lo))

        writer.write_fill(size, fill_staged)
        return
    # one call: channel j's runs start at base + j * stride
    writer.write_tensor_runs(v, base, n_embd, stride, *_col_runs_memo(memo, runs, el))


def write_kv_state(
    layout: KVLayout,
    v_cells: Sequence[KVCells],
    layers: Sequence[KVLayer],
    writer: StateWriter,
    seq_id: int,
) -> None:
    """Serialise the cells of ``seq_id`` (-1: all) and their K/V bytes."""
    writer.write_u32(layout.n_stream)
    for strm in range(layout.n_stream):
        cells = v_cells[strm]
        idx = selected_cells(layout, cells, seq_id)
        writer.write_u32(idx.size)
        if idx.size == 0:
            continue
        writer.write_array(_meta_words(layout, cells, idx, seq_id))
        writer.write_u32(1 if layout.v_trans else 0)
        writer.write_u32(len(layers))
        base = strm * layout.kv_size
        runs = cell_runs(idx)
        memo: _RangeMemo = {}
        for layer in layers:
            k_row = layout.k_row_size(layer.n_embd_k_gqa)
            writer.write_i32(layout.type_k.id)
            writer.write_u64(k_row)
            _write_rows(writer, layer.k, base, idx, runs, k_row, memo)
        for layer in layers:
            if layer.v is None:
                continue
            writer.write_i32(layout.type_v.id)
            if not layout.v_trans:
                v_row = layout.v_row_size(layer.n_embd_v_gqa)
                writer.write_u64(v_row)
                _write_rows(writer, layer.v, base, idx, runs, v_row, memo)
            else:
                writer.write_u32(layout.v_el_size)
                writer.write_u32(layer.n_embd_v_gqa)
                _write_v_trans(writer, layout, layer, strm, idx, runs, memo)


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVStateHooks:
    """The cache operations a state restore drives; everything else it reads and writes
    through the layout, cells, heads and layers it is given (``KVCache`` builds these)."""

    version: Callable[[], int]  # the cache's mutation counter (a stale plan is refused)
    mark_mutated: Callable[[], None]  # bump it
    clear: Callable[[bool], None]  # empty every stream; True also zeroes the tensors
    # a context inside which cells and heads may change: all of it is undone on exit
    planning: Callable[[], AbstractContextManager[None]]
    # remove the sequence, then find a slot for the ubatch and apply it; None: no slot
    place: Callable[[int, UBatch], SlotInfo | None]


class KVStatePlan:
    """A parsed and validated KV state part. ``commit()`` applies it; until then the cache
    is untouched. Nothing may change the cache between parse and commit."""

    def __init__(
        self,
        layout: KVLayout,
        v_cells: Sequence[KVCells],
        v_heads: StreamHeads,
        layers: Sequence[KVLayer],
        hooks: KVStateHooks,
        seq_id: int,
        version: int,
    ) -> None:
        self.layout = layout
        self.v_cells = v_cells
        self.v_heads = v_heads  # the cache's own heads, changed in place
        self.layers = layers
        self.hooks = hooks
        self.seq_id = seq_id
        self.version = version
        self.steps: list[Callable[[], None]] = []
        self.n_cells = 0
        self.whole_counts: dict[int, int] = {}  # whole restore: cells per stream
        # per sequence: the simulated placement (KVCells.redo_log per stream, heads)
        self.redo: tuple[list[tuple], list[int]] | None = None
        # per sequence, without SWA: the placement done at commit (ubatch, ext, its cells)
        self.place: tuple[UBatch, np.ndarray | None, list[np.ndarray]] | None = None
        self.committed = False

    def is_current(self) -> bool:
        return self.hooks.version() == self.version

    def commit(self) -> None:
        layout = self.layout
        if self.committed:
            raise StateError("state plan: already committed")
        if not self.is_current():
            raise StateError(
                "state plan: the cache changed after the blob was parsed; parse it again"
            )
        self.committed = True
        if self.seq_id == -1:
            # clear(True) without zeroing the rows the blob is about to fill
            self.hooks.clear(False)
            for strm in range(layout.n_stream):
                zero_range(
                    layout, self.layers, strm, self.whole_counts.get(strm, 0), layout.kv_size
                )
        if self.place is not None:
            # the one placement the parse checked by counts: seq_rm + find_slot + apply now
            ub, cell_ext, slot = self.place
            sinfo = self.hooks.place(self.seq_id, ub)
            assert sinfo is not None, "a restore predicted to fit did not"
            idx = sinfo.idxs[0].astype(np.int64)
            if cell_ext is not None:
                self.v_cells[int(layout.seq_to_stream[self.seq_id])].set_ext(idx, cell_ext)
            slot.append(idx)
        if self.redo is not None:
            logs, heads = self.redo
            for cells, log in zip(self.v_cells, logs):
                cells.redo(log)
            self.v_heads[:] = heads
            self.hooks.mark_mutated()
        for step in self.steps:
            step()


def _parse_meta_fixed(reader: StateReader, n: int, n_ext: int, what: str) -> np.ndarray:
    """Per-sequence meta: ``n`` records of ``3 + n_ext`` words, each with n_seq_id == 1."""
    rec = 3 + n_ext
    need = n * rec * 4
    if reader.remaining >= need:
        words = reader.read_array("<i4", n * rec, what).reshape(n, rec)
        bad = np.flatnonzero(words[:, 1] != 1)
        if bad.size:
            raise StateError(
                f"{what}: cell {int(bad[0])} has n_seq_id = {int(words[bad[0], 1]) & 0xFFFFFFFF}, "
                "a sequence state needs exactly 1 (invalid seq_id-agnostic kv cell)"
            )
        return words
    # truncated: report a bad n_seq_id first if there is one within what is there
    avail = reader.remaining // (rec * 4)
    words = reader.read_array("<i4", avail * rec, what).reshape(avail, rec)
    bad = np.flatnonzero(words[:, 1] != 1)
    if bad.size:
        raise StateError(
            f"{what}: cell {int(bad[0])} has n_seq_id = {int(words[bad[0], 1])}, "
            "a sequence state needs exactly 1 (invalid seq_id-agnostic kv cell)"
        )
    reader.read_view(need - avail * rec * 4, what)  # raises the truncation error
    raise AssertionError("unreachable")


def _parse_meta_whole(
    reader: StateReader, n: int, n_ext: int, n_seq_max: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-cache meta of ``n`` variable records -> (pos, ext [n, n_ext], seq_id [n, k])."""
    fixed = 2 + n_ext
    max_words = n * (fixed + n_seq_max)
    avail_words = min(max_words, reader.remaining // 4)
    start = reader.offset
    words = reader.read_array("<i4", avail_words, what)
    # fast path: every record has one id. The check is sound: the first record with
    # another count is still read at its true offset, and fails it.
    rec = fixed + 1
    if avail_words >= n * rec and (n == 0 or (words[1 : n * rec : rec] == 1).all()):
        # fixed records [pos, 1, ext..., id]: columns of one [n, rec] block, no gathers
        block = words[: n * rec].reshape(n, rec)
        reader.offset = start + n * rec * 4
        pos, seq = block[:, 0].copy(), block[:, rec - 1 :].copy()
        bad = np.flatnonzero((seq[:, 0] < 0) | (seq[:, 0] >= n_seq_max))
        if bad.size:
            raise StateError(
                f"{what}: cell {int(bad[0])} has seq_id {int(seq[bad[0], 0])}, outside "
                f"[0, {n_seq_max}) (invalid seq_id)"
            )
        bad = np.flatnonzero(pos < 0)
        if bad.size:
            raise StateError(f"{what}: cell {int(bad[0])} has position {int(pos[bad[0]])} < 0")
        ext = block[:, 2 : 2 + n_ext].copy() if n_ext else np.zeros((n, 0), np.int32)
        return pos, ext, seq
    offs, end = _chase_records(words, n, fixed, n_seq_max, what)
    counts = words[offs + 1].astype(np.int64)
    reader.offset = start + end * 4
    pos = words[offs].copy()
    ext = (
        np.stack([words[offs + 2 + e] for e in range(n_ext)], axis=1)
        if n_ext
        else np.zeros((n, 0), np.int32)
    )
    k = max(1, int(counts.max()) if n else 1)
    seq = np.full((n, k), -1, dtype=np.int32)
    # E.g. counts [1, 2] -> rows [0, 1, 1], ranks [0, 0, 1]
    rows = np.repeat(np.arange(n), counts)
    rank = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = words[np.repeat(offs + fixed, counts) + rank]
    bad = np.flatnonzero((ids < 0) | (ids >= n_seq_max))
    if bad.size:
        raise StateError(
            f"{what}: cell {int(rows[bad[0]])} has seq_id {int(ids[bad[0]])}, outside "
            f"[0, {n_seq_max}) (invalid seq_id)"
        )
    seq[rows, rank] = ids
    if k > 1:
        srt = np.sort(seq, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if dup.any():
            r = int(np.flatnonzero(dup.any(axis=1))[0])
            raise StateError(f"{what}: cell {r} lists a sequence id twice")
    bad = np.flatnonzero(pos < 0)
    if bad.size:
        raise StateError(f"{what}: cell {int(bad[0])} has position {int(pos[bad[0]])} < 0")
    return pos, ext, seq


def _chase_records(
    words: np.ndarray, n: int, fixed: int, n_seq_max: int, what: str
) -> tuple[np.ndarray, int]:
    """Offsets of ``n`` variable-length records (``fixed`` words + ``n_seq_id`` ids).

    Pointer doubling: ``nxt[o]`` is the record after one starting at ``o``; composing the
    table with itself doubles the jump, so all offsets come in ``log2(n)`` vector steps.
    E.g. counts [1, 2, 1], fixed 2 -> offsets [0, 3, 7], end 10.
    """
    size = words.size
    if size < fixed:
        raise StateError(
            f"{what}: state blob truncated reading cell 0 (need {fixed} words, {size} left)"
        )
    cnt = np.zeros(size + 1, dtype=np.int64)
    cnt[: size - 1] = words[1:].astype(np.int64) & 0xFFFFFFFF
    nxt = np.arange(size + 1, dtype=np.int64) + fixed + np.minimum(cnt, n_seq_max + 1)
    nxt = np.minimum(nxt, size + 1)
    nxt[size] = size + 1  # sink: past the end
    table = np.concatenate((nxt, [size + 1]))
    offs = np.zeros(1, dtype=np.int64)
    step = table
    while offs.size < n:
        offs = np.concatenate((offs, step[offs]))
        step = step[step]
    offs = offs[:n]
    if (offs > size - fixed).any():
        k = int(np.flatnonzero(offs > size - fixed)[0])
        raise StateError(f"{what}: state blob truncated reading cell {k}")
    counts = cnt[offs]
    over = np.flatnonzero(counts > n_seq_max)
    if over.size:
        k = int(over[0])
        raise StateError(
            f"{what}: cell {k} has n_seq_id = {int(counts[k])} > n_seq_max = {n_seq_max}"
        )
    end = int(offs[-1] + fixed + counts[-1]) if n else 0
    if end > size:
        raise StateError(f"{what}: state blob truncated reading the sequence ids of cell {n - 1}")
    return offs, end


def _restore_ubatch(
    n_pos_per_embd: int, seq_id: int, pos: np.ndarray, ext: np.ndarray | None
) -> UBatch:
    """The synthetic ubatch a per-sequence restore places (``ubatch_reserve(n, 1)``)."""
    n = pos.size
    n_pos = n_pos_per_embd
    ub = UBatch.reserve(n, 1, n_pos)
    ub.pos[:n] = pos
    if ext is not None:
        if n_pos > 1:
            ub.pos[n : 2 * n] = ext[:, 1]
            ub.pos[2 * n : 3 * n] = ext[:, 0]
        assert ub.token is not None
        ub.token[:] = ext[:, 2]
    ub.seq_id[:, 0] = seq_id
    ub.seq_id_unq[0] = seq_id
    ub.seq_idx[:] = -1
    ub.seq_idx[seq_id] = 0
    return ub


def _parse_data(
    layout: KVLayout, layers: Sequence[KVLayer], reader: StateReader, n: int, what: str
) -> list[tuple[KVLayer, str, memoryview]]:
    """Validate the data section of one stream; returns ``(layer, "k"|"v", payload)``."""
    v_trans = reader.read_u32(f"{what}.v_trans")
    n_layer = reader.read_u32(f"{what}.n_layer")
    expect(
        n_layer == len(layers),
        f"{what}.n_layer: mismatched layer count ({n_layer} in the blob, {len(layers)} in the cache)",
    )
    expect(n <= layout.kv_size, f"{what}.cell_count: {n} cells do not fit in {layout.kv_size}")
    expect(
        bool(v_trans) == layout.v_trans and v_trans in (0, 1),
        f"{what}.v_trans: incompatible V transposition (blob {v_trans}, cache {int(layout.v_trans)})",
    )
    type_k, type_v = layout.type_k, layout.type_v
    out: list[tuple[KVLayer, str, memoryview]] = []
    for layer in layers:
        w = f"{what}.layer[{layer.il}]"
        k_type = reader.read_i32(f"{w}.k_type")
        expect(
            k_type == type_k.id,
            f"{w}.k_type: mismatched key type ({k_type} in the blob, {type_k.id} = {type_k.name})",
        )
        k_row = reader.read_u64(f"{w}.k_size_row")
        want = layout.k_row_size(layer.n_embd_k_gqa)
        expect(
            k_row == want, f"{w}.k_size_row: mismatched key row size ({k_row} in the blob, {want})"
        )
        out.append((layer, "k", reader.read_view(n * k_row, f"{w}.k_data")))
    for layer in layers:
        if layer.v is None:
            continue
        w = f"{what}.layer[{layer.il}]"
        v_type = reader.read_i32(f"{w}.v_type")
        expect(
            v_type == type_v.id,
            f"{w}.v_type: mismatched value type ({v_type} in the blob, {type_v.id} = {type_v.name})",
        )
        if not layout.v_trans:
            v_row = reader.read_u64(f"{w}.v_size_row")
            want = layout.v_row_size(layer.n_embd_v_gqa)
            expect(
                v_row == want,
                f"{w}.v_size_row: mismatched value row size ({v_row} in the blob, {want})",
            )
            out.append((layer, "v", reader.read_view(n * v_row, f"{w}.v_data")))
        else:
            el = reader.read_u32(f"{w}.v_size_el")
            expect(
                el == layout.v_el_size,
                f"{w}.v_size_el: mismatched value element size ({el} in the blob, {layout.v_el_size})",
            )
            n_embd = reader.read_u32(f"{w}.n_embd_v_gqa")
            expect(
                n_embd == layer.n_embd_v_gqa,
                f"{w}.n_embd_v_gqa: mismatched GQA embedding size ({n_embd} in the blob, {layer.n_embd_v_gqa})",
            )
            out.append((layer, "v", reader.read_view(n_embd * n * el, f"{w}.v_data")))
    return out


def zero_cols(layout: KVLayout, layer: KVLayer, strm: int, idx: np.ndarray) -> None:
    """Zero the transposed-V elements of cells ``idx`` of a non-host V, every channel:
    one native range write, or for many short runs a zeroed span written back."""
    v = layer.v
    assert v is not None
    el = layout.v_el_size
    n_ch = v.shape[0]
    base, stride = strm * v.nb[2], layout.kv_size * el
    idx = np.sort(idx)
    runs = cell_runs(idx)
    if cols_method(False, runs, el, _RANGES_MIN_SCATTER) == "staged":
        lo, span = _span(v, base, stride, n_ch, runs, el)
        zeros = np.zeros((n_ch, idx.size), dtype=span.dtype)
        scatter_cols(span, idx - lo, zeros, (runs[0] - lo, runs[1] - lo))
        v.write_strided(span, base + lo * el, span.shape[1] * el, stride, n_ch)
        return
    offsets, sizes = col_ranges(base, stride, n_ch, runs, el)
    v.write_ranges(bytes(int(sizes.sum())), offsets, sizes)


def zero_range(layout: KVLayout, layers: Sequence[KVLayer], strm: int, a: int, b: int) -> None:
    """Zero the K/V bytes of cells ``[a, b)`` of stream ``strm`` in every layer."""
    if b <= a:
        return
    r0, r1 = strm * layout.kv_size + a, strm * layout.kv_size + b
    for layer in layers:
        for t in (layer.k, layer.v):
            if t is None or (t is layer.v and layout.v_trans):
                continue
            view = rows_view(t)
            if view is not None:
                view[r0:r1] = 0
            else:
                t.fill_rows(np.arange(r0, r1, dtype=np.int64), 0)
        if layer.v is not None and layout.v_trans:
            vt = v_trans_view(layout, layer, strm)
            if vt is not None:
                vt[:, a:b] = 0
            else:
                el = layout.v_el_size
                n_ch = layer.v.shape[0]
                zero = bytes(el * (b - a) * n_ch)
                base = strm * layer.v.nb[2] + a * el
                layer.v.write_strided(zero, base, el * (b - a), layout.kv_size * el, n_ch)


def zero_cells(layout: KVLayout, layers: Sequence[KVLayer], strm: int, idx: np.ndarray) -> None:
    """Zero the K/V bytes of cells ``idx`` of stream ``strm`` in every layer."""
    if idx.size == 0:
        return
    rows = strm * layout.kv_size + np.asarray(idx, dtype=np.int64)
    for layer in layers:
        layer.k.fill_rows(rows, 0)
        if layer.v is None:
            continue
        if not layout.v_trans:
            layer.v.fill_rows(rows, 0)
            continue
        view = v_trans_view(layout, layer, strm)
        if view is not None:
            view[:, idx] = 0
        else:
            zero_cols(layout, layer, strm, np.asarray(idx, dtype=np.int64))


def _write_payloads(
    layout: KVLayout,
    strm: int,
    idx: np.ndarray,
    payloads: list[tuple[KVLayer, str, memoryview]],
) -> None:
    """Store parsed K/V bytes into cells ``idx`` of stream ``strm``."""
    n = idx.size
    if n == 0:
        return
    base = strm * layout.kv_size
    runs = cell_runs(idx)
    memo: _RangeMemo = {}
    for layer, kind, data in payloads:
        if kind == "k" or not layout.v_trans:
            t = layer.k if kind == "k" else layer.v
            assert t is not None
            offset, st, sz = _row_runs_memo(memo, t, base, idx, runs, len(data) // n)
            t.write_runs(data, offset, 1, 0, st, sz)
            continue
        v = layer.v
        assert v is not None
        n_embd = layer.n_embd_v_gqa
        el = layout.v_el_size
        vt = v_trans_view(layout, layer, strm)
        method = cols_method(vt is not None, runs, el, _RANGES_MIN_SCATTER)
        src = np.frombuffer(data, dtype=_uint_dtype(el)).reshape(n_embd, n)
        if vt is not None and method == "numpy":
            scatter_cols(vt[:n_embd], idx, src, runs)
            continue
        base, stride = strm * v.nb[2], layout.kv_size * el
        if method == "staged":
            # read-modify-write of the span: the cells between the runs get their own bytes
            lo, span = _span(v, base, stride, n_embd, runs, el)
            scatter_cols(span, idx - lo, src, (runs[0] - lo, runs[1] - lo))
            v.write_strided(span, base + lo * el, span.shape[1] * el, stride, n_embd)
            continue
        v.write_runs(data, base, n_embd, stride, *_col_runs_memo(memo, runs, el))


def parse_kv_state(
    layout: KVLayout,
    v_cells: Sequence[KVCells],
    v_heads: StreamHeads,
    layers: Sequence[KVLayer],
    hooks: KVStateHooks,
    reader: StateReader,
    seq_id: int,
) -> KVStatePlan:
    """Parse a KV part for ``seq_id`` (-1: the whole cache) into a plan; change nothing.

    Per sequence, the placement is simulated with ``hooks.place`` inside
    ``hooks.planning()``, which undoes it; the plan keeps the simulated cells to redo.
    """
    version = hooks.version()
    plan = KVStatePlan(layout, v_cells, v_heads, layers, hooks, seq_id, version)
    n_stream = reader.read_u32("kv.n_stream")
    expect(
        n_stream == layout.n_stream,
        f"kv.n_stream: n_stream mismatch ({n_stream} in the blob, {layout.n_stream} in the cache)",
    )
    n_ext = 3 if layout.with_ext else 0
    kv_size = layout.kv_size

    if seq_id == -1:
        for s in range(n_stream):
            what = f"kv.stream[{s}]"
            n = reader.read_u32(f"{what}.cell_count")
            if n == 0:
                continue
            expect(
                n <= kv_size,
                f"{what}.cell_count: not enough cells in kv cache ({n} > {kv_size})",
            )
            pos, ext, seq = _parse_meta_whole(reader, n, n_ext, layout.n_seq_max, f"{what}.cells")
            payloads = _parse_data(layout, layers, reader, n, what)
            idx = np.arange(n, dtype=np.int64)
            plan.n_cells += n
            plan.whole_counts[s] = n

            def whole_step(
                s: int = s,
                idx: np.ndarray = idx,
                pos: np.ndarray = pos,
                seq: np.ndarray = seq,
                ext: np.ndarray = ext,
                payloads: list = payloads,
            ) -> None:
                v_cells[s].set_new(idx, pos, seq, ext if n_ext else None)
                v_heads[s] = 0
                _write_payloads(layout, s, idx, payloads)

            plan.steps.append(whole_step)
        return plan

    # per sequence: the placement is seq_rm + find_slot + apply. Without SWA, the first
    # (usually only) stream with cells is placed at commit time: whether it fits is known
    # from counts (find_slot takes any n usable cells, and usable means empty after the
    # seq_rm), so the parse changes nothing and journals nothing. A second stream with
    # cells (a hostile blob) places both under an undo journal, as the reference would.
    strm = int(layout.seq_to_stream[seq_id])
    direct = layout.swa_type == SWAType.NONE
    deferred: list[tuple[UBatch, np.ndarray | None, list[np.ndarray]]] = []
    journal: ExitStack | None = None

    def simulate(
        ub: UBatch, cell_ext: np.ndarray | None, slot: list[np.ndarray], what: str
    ) -> None:
        sinfo = hooks.place(seq_id, ub)
        if sinfo is None:
            raise StateError(
                f"{what}: failed to find {ub.n_tokens} available cells in kv cache "
                f"(stream {strm} has {kv_size - v_cells[strm].used} free)"
            )
        idx = sinfo.idxs[0].astype(np.int64)
        if cell_ext is not None:
            v_cells[strm].set_ext(idx, cell_ext)
        slot.append(idx)

    with ExitStack() as stack:
        for s in range(n_stream):
            what = f"kv.stream[{s}]"
            n = reader.read_u32(f"{what}.cell_count")
            if n == 0:
                continue
            expect(
                n <= kv_size,
                f"{what}.cell_count: not enough cells in kv cache ({n} > {kv_size})",
            )
            words = _parse_meta_fixed(reader, n, n_ext, f"{what}.cells")
            pos = words[:, 0].copy()
            bad = np.flatnonzero(pos < 0)
            if bad.size:
                raise StateError(
                    f"{what}.cells: cell {int(bad[0])} has position {int(pos[bad[0]])} < 0"
                )
            cell_ext = words[:, 2 : 2 + n_ext].copy() if n_ext else None
            ub = _restore_ubatch(layout.n_pos_per_embd, seq_id, pos, cell_ext)
            slot: list[np.ndarray] = []  # the cells, once placed (now, or at commit)
            if direct and not plan.steps:
                cells = v_cells[strm]
                # free after seq_rm: the empty cells and those held by seq_id alone
                free = kv_size - cells.used + int(np.count_nonzero(cells.owner == seq_id))
                if n > free:
                    raise StateError(
                        f"{what}: failed to find {n} available cells in kv cache "
                        f"(stream {strm} has {free} free)"
                    )
                deferred.append((ub, cell_ext, slot))
            else:
                if journal is None:
                    journal = stack
                    stack.enter_context(hooks.planning())
                    for d in deferred:
                        simulate(*d, what)
                    deferred.clear()
                simulate(ub, cell_ext, slot, what)
            payloads = _parse_data(layout, layers, reader, n, what)
            plan.n_cells += n

            def seq_step(slot: list[np.ndarray] = slot, payloads: list = payloads) -> None:
                _write_payloads(layout, strm, slot[0], payloads)

            plan.steps.append(seq_step)
        # the commit puts back the simulated cells as they are now instead of placing
        # the sequence again (the cache cannot change in between: version check)
        if journal is not None:
            plan.redo = ([c.redo_log() for c in v_cells], list(v_heads))
    if deferred:
        plan.place = deferred[0]
    return plan


__all__ = [
    "LLAMA_MAX_SEQ",
    "KVStateHooks",
    "KVStatePlan",
    "parse_kv_state",
    "write_kv_state",
    "zero_cells",
    "zero_range",
]
