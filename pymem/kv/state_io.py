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

The bytes of the selected cells move in runs (:mod:`pymem.kv.state_rows`, which also
zeroes cells: :func:`zero_range`, :func:`zero_cells`). Reading parses and validates
everything first, simulating the per-sequence placement under an undo journal, and
returns a :class:`KVStatePlan`; only ``commit()`` changes the cache.

A per-sequence restore whose sequence would land back in the very cells it holds, with
the same positions (a rollback to the state just saved, a repeated restore), is decided
in one native pass (:func:`seq_same_cells`) and changes no cell: the reference's seq_rm +
find_slot + apply_ubatch would leave each as it is, so only the head moves and the bytes
are written. Host tensors take the bytes of every layer in one native call
(:func:`put_payloads`); other devices go through :func:`~pymem.kv.state_rows.write_payloads`.
Writing, a stream of host tensors is selected in one native pass (its runs of cells) and
its meta records are written straight into the output (:func:`_write_stream_native`), instead
of index arrays the size of the selection; :func:`selected_cells`, :func:`_meta_words` and
state_rows stay the reference (``NATIVE_RUNS = False``) and serve shared cells, sliding
windows and other devices.

Its functions take the cache's :class:`~pymem.kv.layout.KVLayout`, its cells
(``v_cells``), heads and :class:`~pymem.kv.layout.KVLayer` list; the few cache operations
a restore drives (slot search, clearing, the mutation counter) come in as
:class:`KVStateHooks`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from pymem._native import check, ffi, lib
from pymem.backend import Tensor, check_reachable, unreported
from pymem.errors import RangeError, StateError
from pymem.kv.cells import OWNER_MULTI, KVCells, StackedCells
from pymem.kv.layout import KVLayer, KVLayout, SlotInfo, StreamHeads
from pymem.kv.state_rows import (
    RangeMemo,
    cell_runs,
    write_payloads,
    write_rows,
    write_v_trans,
    zero_cells,
    zero_range,
)
from pymem.spec import SWAType, masked_swa, window_start
from pymem.state import (
    BLOB_CHANGED,
    Payload,
    StateReader,
    StateWriter,
    expect,
    refuse_stale_commit,
)
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

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
    n_ext = layout.n_ext
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


@dataclass(frozen=True)
class NativeSection:
    """What :c:func:`pm_kv_write_section` needs to write a stream's whole part of a blob
    in one call: its ``spec`` words per stream and the K then V tensors. Built once per
    cache (its tensors live as long as it does) by :func:`native_section`."""

    specs: tuple[np.ndarray, ...]  # per stream: int64 spec words (see pymem_stateio.h)
    tensors: object  # cffi ``struct ggml_tensor *[]``: n_layer K, then n_layer V (or NULL)
    cell_bytes: int  # tensor bytes per selected cell, all layers
    n_headers: int  # 12-byte layer headers (K layers, V layers)
    scratch: dict[int, np.ndarray] = field(default_factory=dict)  # stream -> runs found

    def runs_scratch(self, strm: int, size: int) -> np.ndarray:
        """int64 [2, size // 2 + 1]: room for any stream's runs (starts, ends)."""
        buf = self.scratch.get(strm)
        if buf is None:
            buf = self.scratch[strm] = np.empty((2, size // 2 + 1), dtype=np.int64)
        return buf


def native_section(layout: KVLayout, layers: Sequence[KVLayer]) -> NativeSection | None:
    """The one-call stream writer's parameters, or None where it does not apply (a tensor
    not in host memory, rows padded past the blob's width, ``NATIVE_RUNS`` off)."""
    if not _native_writable(layout, layers, -1):
        return None
    el = layout.v_el_size
    per_layer: list[int] = []
    cell_bytes, n_headers = 0, 0
    for layer in layers:
        v_row = 0 if layer.v is None else layer.v.row_size
        per_layer += [layer.k.row_size, v_row, layer.n_embd_v_gqa]
        cell_bytes += layer.k.row_size
        n_headers += 1
        if layer.v is not None:
            cell_bytes += el * layer.n_embd_v_gqa if layout.v_trans else v_row
            n_headers += 1
    specs = tuple(
        np.array(
            [
                len(layers),
                int(layout.v_trans),
                layout.type_k.id,
                layout.type_v.id,
                layout.kv_size,
                el,
                strm,
                *per_layer,
            ],
            dtype=np.int64,
        )
        for strm in range(layout.n_stream)
    )
    ptrs = [layer.k.ptr for layer in layers] + [
        ffi.NULL if layer.v is None else layer.v.ptr for layer in layers
    ]
    return NativeSection(specs, ffi.new("struct ggml_tensor *[]", ptrs), cell_bytes, n_headers)


_INT32_MAX = 2**31 - 1
_ALL_POSITIONS = (-(2**31), _INT32_MAX)  # no window: every position of the sequence


def _source(data: object) -> Any | None:
    """``data`` as a cffi byte buffer, or None where it is no contiguous buffer (the
    general path then names what is wrong with it)."""
    try:
        return ffi.from_buffer(data)
    except (TypeError, ValueError, BufferError):
        return None


class SeqBlob:
    """A cache's whole per-sequence blobs in one native call each
    (:c:func:`pm_kv_write_seq_blob`, :c:func:`pm_kv_read_seq_blob`): one view of every
    stream's cell arrays, counters and run scratch, built once per cache (none of them is
    ever rebound), so a call costs one C call and a few Python lines, whatever the stream.

    Each method returns None where its case does not apply (for a read, a blob that
    neither goes back into the very cells the sequence holds nor is placed by the one
    call; shared cells are told by the cells' bitsets, so they decline nothing): the
    caller then takes the general path, which also names what is wrong. ``seq_id`` must
    already be checked (``0 <= seq_id < n_seq``).
    """

    __slots__ = (
        "_cells", "_checked", "_idx", "_keep", "_nones", "_placing", "_pos", "_searched",
        "_step", "_stream_of", "_swa", "_view", "n_seq",
    )  # fmt: skip

    def __init__(
        self,
        layout: KVLayout,
        v_cells: Sequence[KVCells],
        v_heads: StreamHeads,
        section: NativeSection,
    ) -> None:
        store = v_cells[0].store
        n_stream = layout.n_stream
        n_ext = layout.n_ext
        scratch = [section.runs_scratch(s, v_cells[s].size) for s in range(n_stream)]
        starts = [ffi.from_buffer("int64_t[]", a, require_writable=True) for a in scratch]
        keep: list[object] = [store, v_heads, section, scratch, starts]

        def ptrs(ctype: str, arrays: Sequence[object]) -> object:
            cdata = ffi.new(f"{ctype} *[]", list(arrays))
            keep.extend((arrays, cdata))
            return cdata

        def array(ctype: str, a: np.ndarray, writable: bool = False) -> object:
            cdata = ffi.from_buffer(f"{ctype}[]", a, require_writable=writable)
            keep.extend((a, cdata))
            return cdata

        v = ffi.new("pm_kv_seq_blob *")
        v.n_stream = n_stream
        v.n_seq = len(layout.seq_to_stream)
        v.n_seq_max = layout.n_seq_max
        v.n_ext = n_ext
        v.size = v_cells[0].size
        v.runs_cap = scratch[0].shape[1]
        v.seq_to_stream = array("int32_t", layout.seq_to_stream)
        v.pos = ptrs("int32_t", [array("int32_t", c.pos) for c in v_cells])
        v.owner = ptrs("int32_t", [array("int32_t", c.owner) for c in v_cells])
        v.shift = ptrs("int32_t", [array("int32_t", c.shift) for c in v_cells])
        exts = [array("int32_t", c.ext) for c in v_cells if c.ext is not None]
        v.ext = ptrs("int32_t", exts) if n_ext else ffi.NULL
        v.spec = ptrs("int64_t", [array("int64_t", sp) for sp in section.specs])
        v.run_starts = ptrs("int64_t", starts)
        v.run_ends = ptrs("int64_t", [p + a.shape[1] for p, a in zip(starts, scratch)])
        # per stream: the cells and runs a search found, then (after all streams) whether
        # a whole one found cells not of one id below n_seq_max, then the ids its records
        # list (pm_kv_write_whole_blob's count, for the sized write)
        v.selected = array("int64_t", np.full(4 * n_stream, -1, dtype=np.int64), writable=True)
        v.n_multi = array("int64_t", store.n_multi)
        v.used = array("int64_t", store.used)
        v.heads = array("int64_t", v_heads.a, writable=True)
        v.has_shift = array("uint8_t", store.has_shift)
        v.tensors = section.tensors
        # the bitsets: cells shared by several sequences (a forked prompt's) are told by
        # them, so no stream with one is declined; the pointer follows a widening (fit)
        v.cells = store.native()
        keep.append(v.cells)
        self._view = v
        self._keep = keep  # every array and cdata the view points into
        self.n_seq = int(v.n_seq)
        self._cells = tuple(v_cells)
        self._stream_of = layout.seq_to_stream
        # per stream, the sequence whose cells its run scratch holds (None: another call's)
        self._searched: list[int | None] = [None] * n_stream
        self._nones = (None,) * n_stream  # (what scratch_taken resets both lists to)
        # per stream, (sequence, token) of the read check whose runs the scratch holds: a
        # commit with that token stores into them without searching again (None: no such)
        self._checked: list[tuple[int, object] | None] = [None] * n_stream
        # (type, n_swa) of a sliding-window cache: a sequence's blob holds only the cells
        # its last token still sees (selected_cells), a window the write passes to C
        self._swa = None if layout.swa_type == SWAType.NONE else (layout.swa_type, layout.n_swa)
        # the positions the last placing parse read (read_place), and (sequence, token) of
        # that parse: a commit with its token places them without parsing again
        self._pos = np.empty(v_cells[0].size, dtype=np.int32)
        self._placing: tuple[int, object] | None = None
        # a swap-in's placement (swap_in_with): the cache's pm_step_cells view of the same
        # cells, the placement's cell scratch, and the pointers of both scratches
        self._step: tuple[Any, Any, Any, Any] | None = None
        self._idx = np.empty(v_cells[0].size, dtype=np.int32)

    @property
    def view(self) -> Any:
        """The ``pm_kv_seq_blob *`` this object's calls pass (valid while the cache is
        open)."""
        return self._view

    def scratch_taken(self) -> None:
        """Another call (a composite's one-call write or read) filled the run scratch or
        the placement's: no size, check or parse of this object holds them any more."""
        nones = self._nones
        self._searched[:] = nones
        self._checked[:] = nones
        self._placing = None

    def placing_scratch(self) -> tuple[Any, Any]:
        """The placement's position and cell scratch (``int32[size]`` each) as cffi
        pointers, for a one-call read (kept alive by this object)."""
        if self._step is None:
            return ffi.NULL, ffi.NULL
        return self._step[2], self._step[3]

    def swap_in_with(self, step_cells: object) -> None:
        """Let :meth:`read` swap a sequence that holds no cell back in, and
        :meth:`commit_whole` commit a whole restore, in one native call each
        (:c:func:`pm_kv_read_seq_placed`, :c:func:`pm_kv_read_whole_commit`):
        ``step_cells`` is the cache's ``pm_step_cells *`` over these very cells (kept alive
        by the cache). Not with ext, whose words Python writes."""
        if self._view.n_ext != 0:
            return
        self._step = (
            step_cells,
            self._cells[0].store,
            ffi.from_buffer("int32_t[]", self._pos, require_writable=True),
            ffi.from_buffer("int32_t[]", self._idx, require_writable=True),
        )

    def window(self, seq_id: int) -> tuple[int, int]:
        """The positions ``[lo, hi]`` of ``seq_id``'s cells its blob holds: every position
        without a window; else those ``masked_swa`` keeps from the sequence's largest
        position (no cell lies above it). E.g. STANDARD, n_swa 4, largest position 10 ->
        [7, INT32_MAX]."""
        if self._swa is None:
            return _ALL_POSITIONS
        swa_type, n_swa = self._swa
        p_max = self._cells[int(self._stream_of[seq_id])].seq_pos_max(seq_id)
        if p_max < 0:
            return _ALL_POSITIONS  # no cells at all
        return window_start(swa_type, n_swa, p_max), _INT32_MAX

    def size(self, seq_id: int) -> int | None:
        """The bytes of ``seq_id``'s blob (its cells are searched, no byte moves; a
        ``write(..., reuse=True)`` right after writes what this found)."""
        window = self.window(seq_id)
        written = ffi.new("int64_t[2]")
        declined = ffi.cast("int32_t *", written + 1)
        status = lib.pm_kv_write_seq_blob(
            self._view, seq_id, 0, window[0], window[1], ffi.NULL, 0, written, declined
        )
        strm = int(self._stream_of[seq_id])
        self._checked[strm] = None  # (a search, declined or not, overwrote the scratch)
        if declined[0]:
            self._searched[strm] = None
            return None
        if status != lib.PM_ERR_RANGE:  # a blob is never 0 bytes: a size query is too small
            check(status, "state size: one sequence's blob")
        self._searched[strm] = seq_id
        return int(written[0])

    def write(self, out: object, seq_id: int, what: str, reuse: bool = False) -> int | None:
        """``seq_id``'s blob into the start of ``out`` (a writable buffer); its size. None
        when ``out`` is no writable contiguous buffer (the caller's general path says so).
        RangeError, nothing written, when ``out`` is too small. ``reuse``: the cells
        :meth:`size` just found for ``seq_id``, with no change to the cache since (the
        caller's promise: :meth:`KVCache.seq_writer` checks its version); searched again
        when the stream's scratch holds another call's runs."""
        strm = int(self._stream_of[seq_id])
        reuse = reuse and self._searched[strm] == seq_id
        self._searched[strm] = seq_id
        self._checked[strm] = None
        window = self.window(seq_id) if not reuse else _ALL_POSITIONS  # reuse: not searched
        try:
            dest = ffi.from_buffer(out, require_writable=True)
        except (TypeError, ValueError, BufferError):
            return None
        written = ffi.new("int64_t[2]")
        declined = ffi.cast("int32_t *", written + 1)
        status = lib.pm_kv_write_seq_blob(
            self._view, seq_id, reuse, window[0], window[1], dest, len(dest), written, declined
        )
        if declined[0]:
            self._searched[strm] = None  # (the declined search left no runs to reuse)
            return None
        if status == lib.PM_ERR_RANGE and written[0] > len(dest):
            raise RangeError(f"{what}: out holds {len(dest)} bytes, the state needs {written[0]}")
        check(status, f"{what}: one sequence's blob")
        return int(written[0])

    def read(
        self, data: object, seq_id: int, store: bool = True, token: object = None,
        place: bool = True,
    ) -> int | None:  # fmt: skip
        """A per-sequence restore that changes no cell (:func:`seq_same_cells`): the blob's
        one stream with cells puts ``seq_id`` back into exactly the cells it holds, with
        headers the cache's; its bytes are stored and the stream's head moves past the last
        cell, as the two-phase restore would. A sequence that holds no cell, or any of a
        sliding-window cache (whose placement may take and purge cells the window masks),
        is placed anew in one call instead (:meth:`_placed`; only with ``store`` and no
        ``token``), and so is one whose blob does not go back into its cells (another
        state, or cells it shares; not without ``place``: a same-cells plan's commit).
        The bytes consumed, or None with nothing changed (the two-phase restore then
        decides). Without ``store``: every check, nothing stored (what a call with it
        would take). ``token`` (a two-phase plan's):
        a check remembers the runs it found under it, and a store with the same token right
        after uses them without searching the stream again (the plan vouches that neither
        the cache nor the blob changed; any other call on the stream forgets them)."""
        if self._swa is not None and not SWA_DEFERRED:
            return None  # (the simulated restore: the two-phase parse's)
        strm = int(self._stream_of[seq_id])
        held = self._cells[strm].seq_pos_max(seq_id) >= 0
        if self._swa is not None or not held:
            # placed anew in one more call where it may be: swapped out (no cells to go
            # back into; no owner scan to say so), or a window's (its search may take cells
            # the window masks, so the reference's cells are not the ones it holds)
            return self._placed(data, seq_id, strm, held) if store and token is None else None
        src = _source(data)
        if src is None:
            return None
        consumed = ffi.new("int64_t *")
        done = ffi.new("int32_t *")
        self._searched[strm] = None  # the check fills the scratch
        mode = int(store)
        if store and token is not None and self._checked[strm] == (seq_id, token):
            mode = 2  # the runs the plan's own check found
        self._checked[strm] = None
        status = lib.pm_kv_read_seq_blob(self._view, seq_id, src, len(src), mode, consumed, done)
        if status == lib.PM_OK and mode == 2 and not done[0]:
            # the scratch no longer held the check's runs (another selection of the stream
            # wrote it: the whole writer shares it): the full check and store
            status = lib.pm_kv_read_seq_blob(self._view, seq_id, src, len(src), 1, consumed, done)
        check(status, "state read: one sequence in place")
        if not done[0]:
            # not back into its own cells (another state, or cells it shares with other
            # sequences): placed anew, its seq_rm first, as the reference restores it
            placing = place and store and token is None
            return self._placed(data, seq_id, strm, True) if placing else None
        if not store and token is not None:
            self._checked[strm] = (seq_id, token)
        return int(consumed[0])

    def _placed(self, data: object, seq_id: int, strm: int, held: bool) -> int | None:
        """A per-sequence restore that places the sequence anew, in one native call
        (:c:func:`pm_kv_read_seq_placed`): parse, the sequence's seq_rm when ``held``, the
        placement (a window's overwrite of masked cells and purge included) and the store,
        what :class:`PlacedSeqPlan` does in three. The bytes consumed, or None with nothing
        changed (no :meth:`swap_in_with`, ``NATIVE_PLACE`` off, an undo journal, or what the
        call declines: too few cells without the window's help, a blob it cannot parse; the
        two-phase restore then places it or names what is wrong). Without ``held`` the
        caller vouches that ``seq_id`` holds no cell of stream ``strm``."""
        step = self._step
        if step is None or not NATIVE_PLACE or step[1].journaling:
            return None
        src = _source(data)
        if src is None:
            return None
        consumed = ffi.new("int64_t *")
        done = ffi.new("int32_t *")
        self._searched[strm] = self._checked[strm] = self._placing = None  # scratch taken
        size = self._idx.size
        swa_type, n_swa = self._swa if self._swa is not None else (SWAType.NONE, 0)
        status = lib.pm_kv_read_seq_placed(
            self._view, step[0], seq_id, int(held), int(swa_type), n_swa, src, len(src),
            step[2], size, step[3], size, consumed, done,
        )  # fmt: skip
        check(status, "state read: one sequence placed")
        return int(consumed[0]) if done[0] else None

    def read_place(self, data: object, seq_id: int, token: object) -> PlaceRead | None:
        """The parse of a per-sequence restore that places the sequence
        (:c:func:`pm_kv_read_seq_place`): headers, byte ranges and records checked, the
        positions read, nothing changed. None where it does not apply (the general parse
        then reads the blob and names what is wrong). ``token``: the positions stay
        readable (:meth:`placed_positions`) until another parse of this cache."""
        self._placing = None
        src = _source(data)
        if src is None:
            return None
        found = ffi.new("int64_t[4]")
        done = ffi.new("int32_t *")
        status = lib.pm_kv_read_seq_place(
            self._view, seq_id, src, len(src), ffi.from_buffer("int32_t[]", self._pos, require_writable=True),
            self._pos.size, ffi.NULL, ffi.NULL, 0, found, done,
        )  # fmt: skip
        check(status, "state read: one sequence, placed")
        if not done[0]:
            return None
        self._placing = (seq_id, token)
        return PlaceRead(int(found[0]), int(found[1]), int(found[2]), int(found[3]))

    def placed_positions(self, seq_id: int, token: object, n: int) -> np.ndarray | None:
        """The ``n`` positions :meth:`read_place` read under ``token`` (a view of this
        blob's scratch), or None once another parse has taken the scratch."""
        return self._pos[:n] if self._placing == (seq_id, token) else None

    def store_placed(self, data: object, seq_id: int, runs: Runs) -> bool:
        """The bytes of ``seq_id``'s part of a blob :meth:`read_place` accepted into the
        cells of ``runs`` (slot order), its checks run again; False, nothing stored, where
        they fail (the blob changed since)."""
        src = ffi.from_buffer(data)
        starts = np.ascontiguousarray(runs[0], dtype=np.int64)
        ends = np.ascontiguousarray(runs[1], dtype=np.int64)
        if starts.size == 0:  # (no runs would ask the C call for a parse)
            return False
        found = ffi.new("int64_t[4]")
        done = ffi.new("int32_t *")
        status = lib.pm_kv_read_seq_place(
            self._view, seq_id, src, len(src), ffi.NULL, 0, ffi.from_buffer("int64_t[]", starts),
            ffi.from_buffer("int64_t[]", ends), starts.size, found, done,
        )  # fmt: skip
        check(status, "state read: one sequence, placed")
        return bool(done[0])

    def read_whole(self, data: object, mode: int) -> WholeBlobRead | None:
        """A whole-cache restore whose every meta record is a fixed one (one sequence id)
        in one native call per phase (:c:func:`pm_kv_read_whole_blob`): ``mode`` 0 checks
        everything (headers, ranges, records) and says whether the cells already are the
        blob's; 1 checks the headers and ranges and stores every stream's bytes into its
        cells ``[0, n)``; 2 checks them alone. None, nothing changed, where it does not
        apply (the general parse then reads the blob and names what is wrong). The cells
        and heads are the caller's (:class:`WholeBlobPlan`)."""
        src = _source(data)
        if src is None:
            return None
        # counts and offsets [n_stream] each, then consumed; flags: same, done
        n = len(self._cells)
        found = np.zeros(2 * n + 1, dtype=np.int64)
        p = ffi.from_buffer("int64_t[]", found, require_writable=True)
        flags = ffi.new("int32_t[2]")
        status = lib.pm_kv_read_whole_blob(
            self._view, src, len(src), mode, p, p + n, flags, p + 2 * n, flags + 1
        )
        check(status, "state read: whole cache")
        if not flags[1]:
            return None
        return WholeBlobRead(int(found[2 * n]), found[:n], found[n : 2 * n], bool(flags[0]))

    def commit_whole(self, data: object, found: WholeBlobRead) -> bool:
        """The commit of a whole restore :meth:`read_whole` (mode 0) parsed from ``data``
        just before, with nothing changed since (the caller's promise): placement, store
        and the zeroing past every stream's cells in one native call
        (:c:func:`pm_kv_read_whole_commit`; :class:`WholeBlobPlan` is the reference).
        False, nothing changed, where it does not apply (no :meth:`swap_in_with` view, an
        undo journal, ``NATIVE_PLACE`` off) or the placement declines a record; the caller
        resets ``has_shift`` and moves its version after True. StateError when the store's
        checks fail after the placement (the blob changed while it was restored)."""
        step = self._step
        if step is None or not NATIVE_PLACE or step[1].journaling:
            return False
        done = ffi.new("int32_t *")
        status = lib.pm_kv_read_whole_commit(
            self._view, step[0], ffi.from_buffer(data), len(data),  # type: ignore[arg-type]
            ffi.from_buffer("int64_t[]", found.counts), ffi.from_buffer("int64_t[]", found.offsets),
            int(found.same), lib.PM_RECORDS_PARSED, done,
        )  # fmt: skip
        if status == lib.PM_ERR_RANGE:
            raise StateError("state plan: the blob changed while it was restored")
        check(status, "state read: whole cache")
        return bool(done[0])


class PlaceRead(NamedTuple):
    """What :meth:`SeqBlob.read_place` found: the part's cell count, the byte offset of
    its meta records and the blob's bytes in ``data``, and the cells a restore of the
    sequence may take without a window's help (empty, or the sequence's own), counted as
    far as needed: ``free >= n`` proves that it fits."""

    n: int
    records_at: int
    consumed: int
    free: int


class StreamRecords(NamedTuple):
    """A stream's meta records in a whole blob: the first ``n`` records of ``words``
    (int32, a view of the blob that may run past them). Fixed records (one id each) take
    ``n * (3 + n_ext)`` words; variable ones (cells shared by several sequences, as a
    forked cache writes them) list each cell's ids after its count."""

    words: np.ndarray
    n: int

    @staticmethod
    def of_fixed(words: np.ndarray) -> StreamRecords:
        """Fixed records given as ``[n, 3 + n_ext]`` words."""
        return StreamRecords(words.reshape(-1), words.shape[0])


class WholeBlobRead(NamedTuple):
    """What :meth:`SeqBlob.read_whole` found: the blob's bytes, each stream's cell count
    and the byte offset of its meta records, and whether every stream's cells already are
    the blob's."""

    consumed: int
    counts: np.ndarray
    offsets: np.ndarray
    same: bool


class _CachePlan:
    """What every KV cache plan shares: the cache's version when parsed (a changed cache
    refuses the commit), the layers whose devices a commit writes, and whether the caller
    commits right after the parse (``parsed_now``: the blob cannot have changed)."""

    def __init__(self, hooks: KVStateHooks, layers: Sequence[KVLayer], version: int) -> None:
        self.hooks = hooks
        self.layers = layers
        self.version = version
        self.committed = False
        self.parsed_now = False

    def committed_at_once(self) -> None:
        self.parsed_now = True

    def is_current(self) -> bool:
        return self.hooks.version() == self.version

    def check_devices(self) -> None:
        """Raise DeviceError for a layer's device that is gone (an rpc-server)."""
        check_reachable(layer.k.device for layer in self.layers)

    def _may_commit(self) -> None:
        """Refuse a second commit, a changed cache and a lost device, changing nothing."""
        refuse_stale_commit(self.committed, self.is_current(), "cache")
        self.check_devices()


class _BlobPlan(_CachePlan):
    """A plan whose parse was one :class:`SeqBlob` native call over a host view of the
    blob (``data``, the cache's part of it: no copy); its verify and commit call it again
    on the same bytes."""

    def __init__(
        self, blob: SeqBlob, data: memoryview, hooks: KVStateHooks, layers: Sequence[KVLayer]
    ) -> None:
        super().__init__(hooks, layers, hooks.version())
        self.blob = blob
        self.data = data


class SameCellsPlan(_BlobPlan):
    """A parsed one-sequence restore that puts the sequence back into exactly the cells
    it holds (:meth:`SeqBlob.read` without storing found it so): ``commit()`` stores it in
    one native call. As every plan, it refuses a stale cache; :meth:`verify` runs the
    checks again (a composite verifies every part before it commits any, so a blob
    changed after the parse is refused with nothing changed anywhere)."""

    def __init__(
        self,
        blob: SeqBlob,
        data: memoryview,
        seq_id: int,
        hooks: KVStateHooks,
        layers: Sequence[KVLayer],
        token: object = None,
    ) -> None:
        super().__init__(blob, data, hooks, layers)
        self.seq_id = seq_id
        self.token = token  # the parse's check left its runs under it (SeqBlob.read)

    def verify(self) -> None:
        if not self.parsed_now and self.blob.read(self.data, self.seq_id, store=False) is None:
            raise StateError(BLOB_CHANGED)

    def commit(self) -> None:
        self._may_commit()
        # committed right after the parse: into the runs its check found (no owner scan);
        # a plan a caller held is checked in full again
        token = self.token if self.parsed_now else None
        if self.blob.read(self.data, self.seq_id, token=token, place=False) is None:
            raise StateError(BLOB_CHANGED)
        self.committed = True
        self.hooks.mark_mutated()


class PlacedSeqPlan(_BlobPlan):
    """A parsed one-sequence restore that places the sequence (a swap-in after its
    ``seq_rm``, a restore into cells that changed, any sliding-window restore):
    :meth:`SeqBlob.read_place` checked it all and found that the cells a placement may
    take without a window's help suffice, so it fits. ``commit()`` places it as the
    reference does (``seq_rm``, find_slot, apply_ubatch: one native call,
    ``hooks.place_seq``, or the numpy placement where that declines) and stores its bytes
    into the cells found in one more native call."""

    def __init__(
        self,
        blob: SeqBlob,
        data: memoryview,
        seq_id: int,
        found: PlaceRead,
        layout: KVLayout,
        v_cells: Sequence[KVCells],
        hooks: KVStateHooks,
        layers: Sequence[KVLayer],
        token: object,
    ) -> None:
        super().__init__(blob, data, hooks, layers)
        self.seq_id = seq_id
        self.found = found
        self.layout = layout
        self.v_cells = v_cells
        self.token = token  # the parse's positions stay in the blob's scratch under it

    def verify(self) -> None:
        """The parse's checks again, so a blob changed since into one that fails them, or
        with another cell count or length, is refused before any part of a composite
        commits (a plan committed right after its parse skips them). Positions and bytes
        that still pass are taken as they are at commit, both from the one buffer."""
        if self.parsed_now:
            return
        again = self.blob.read_place(self.data, self.seq_id, self.token)
        if again is None or again[:3] != self.found[:3]:
            raise StateError(BLOB_CHANGED)

    def commit(self) -> None:
        self._may_commit()
        self.verify()
        # parse, seq_rm, placement and store in one call where it applies (None, nothing
        # changed, for ext or what it declines)
        strm = int(self.layout.seq_to_stream[self.seq_id])
        held = self.v_cells[strm].seq_pos_max(self.seq_id) >= 0
        if self.blob._placed(self.data, self.seq_id, strm, held) is not None:
            self.committed = True
            self.hooks.mark_mutated()
            return
        n = self.found.n
        pos = self.blob.placed_positions(self.seq_id, self.token, n)
        if pos is None:  # another parse of this cache took the scratch: read them again
            again = self.blob.read_place(self.data, self.seq_id, self.token)
            pos = self.blob.placed_positions(self.seq_id, self.token, n)
            if again is None or again[:3] != self.found[:3] or pos is None:
                raise StateError(BLOB_CHANGED)
        ext = None
        if self.layout.n_ext:
            rec = self.layout.record_words
            words = np.frombuffer(self.data, np.int32, n * rec, self.found.records_at)
            ext = words.reshape(n, rec)[:, 2 : 2 + self.layout.n_ext].copy()
        self.committed = True
        _, runs = _place_sequence(self.layout, self.v_cells, self.hooks, self.seq_id, pos, ext)
        # the same checks as the parse's on the same bytes: they hold (a changed blob was
        # refused above, before anything changed)
        if not self.blob.store_placed(self.data, self.seq_id, runs):
            raise AssertionError("a placed restore's bytes failed the checks they passed")
        self.hooks.mark_mutated()


def _place_sequence(
    layout: KVLayout,
    v_cells: Sequence[KVCells],
    hooks: KVStateHooks,
    seq_id: int,
    pos: np.ndarray,
    ext: np.ndarray | None,
) -> tuple[np.ndarray, Runs]:
    """A per-sequence restore's placement that its parse proved fits: seq_rm, find_slot,
    apply_ubatch (``hooks.place_seq``'s one native call, or the numpy placement where
    that declines), then the records' ext. The cells in slot order and their runs."""
    native = hooks.place_seq(seq_id, pos)
    if native is not None:
        idx, runs = native
    else:
        ub = _restore_ubatch(layout.n_pos_per_embd, seq_id, pos.copy(), ext)
        sinfo = hooks.place(seq_id, ub)
        if sinfo is None:
            raise AssertionError("a restore its parse proved to fit did not")
        idx = sinfo.idxs[0].astype(np.int64)
        runs = cell_runs(idx)
    if ext is not None:
        v_cells[int(layout.seq_to_stream[seq_id])].set_ext(idx, ext)
    return idx, runs


class WholeBlobPlan(_BlobPlan):
    """A parsed whole-cache restore whose every record is a fixed one
    (:meth:`SeqBlob.read_whole` checked it all). ``commit()`` runs the parse's checks
    again (:meth:`verify`; not for a plan committed right after its parse), empties and
    places every stream's cells in one native refill (or, when they already are the
    blob's, moves the heads alone), stores the bytes in one more native call, and zeroes
    the rows past each stream's cells, as the reference's ``clear(true)`` leaves them."""

    def __init__(
        self,
        blob: SeqBlob,
        data: memoryview,
        found: WholeBlobRead,
        layout: KVLayout,
        v_cells: Sequence[KVCells],
        v_heads: StreamHeads,
        hooks: KVStateHooks,
        layers: Sequence[KVLayer],
    ) -> None:
        super().__init__(blob, data, hooks, layers)
        self.found = found
        self.layout = layout
        self.v_cells = v_cells
        self.v_heads = v_heads

    def verify(self) -> None:
        """The parse's checks again (headers, ranges, records, whether the cells already
        are the blob's): a blob changed since, in any of them, is refused before any part
        of a composite commits."""
        if self.parsed_now:
            return
        again = self.blob.read_whole(self.data, 2)
        if (
            again is None
            or again.same != self.found.same
            or not np.array_equal(again.counts, self.found.counts)
        ):
            raise StateError(BLOB_CHANGED)

    def _records(self, strm: int) -> StreamRecords:
        """Stream ``strm``'s meta records (fixed or variable: a view from their start to
        the blob's end)."""
        n, at = int(self.found.counts[strm]), int(self.found.offsets[strm])
        words = np.frombuffer(self.data, dtype="<i4", count=(len(self.data) - at) // 4, offset=at)
        return StreamRecords(words, n)

    def commit(self) -> None:
        self._may_commit()
        layout = self.layout
        self.verify()  # the parse's checks again, before anything changes
        counts = self.found.counts
        records = (
            None
            if self.found.same
            else [self._records(s) if counts[s] else None for s in range(layout.n_stream)]
        )
        if not _place_whole(self.hooks, self.v_heads, records):
            assert records is not None, "cells that already are the blob's need no placement"
            for strm, recs in enumerate(records):
                if recs is not None:
                    _set_new_records(self.v_cells[strm], recs, layout)
        self.committed = True
        if self.blob.read_whole(self.data, 1) is None:  # checked just before: cannot fail
            raise StateError("state plan: the blob changed while it was restored")
        _zero_past(layout, self.layers, [int(n) for n in counts], self.v_cells[0].store)


def _place_whole(
    hooks: KVStateHooks, v_heads: StreamHeads, records: Sequence[StreamRecords | None] | None
) -> bool:
    """A whole restore's cells, as the reference's clear + set_new leaves them: with
    ``records`` None the cells already are the blob's and only the heads move; else one
    native refill of every stream's records (None for a stream without cells). False when
    the refill declined: every stream is then emptied
    (``clear(False)``: the rows are about to be filled or zeroed) and the caller places
    the cells."""
    if records is None:
        v_heads.a[:] = 0
        hooks.mark_mutated()
        return True
    if hooks.refill(records):
        return True
    hooks.clear(False)
    return False


def _zero_past(
    layout: KVLayout, layers: Sequence[KVLayer], counts: Sequence[int], cells: StackedCells
) -> None:
    """Zero every stream's rows past its restored cells, as the reference's clear(true)
    leaves them: those below the cells any cell held since they were last zeroed (the
    cells' ``rows_bound``; the rows above it are zero already)."""
    for strm in range(layout.n_stream):
        a = counts[strm] if strm < len(counts) else 0
        b = min(cells.rows_bound(strm), layout.kv_size)
        if a < b and not zero_range_native(layout, layers, strm, a, b):
            zero_range(layout, layers, strm, a, b)
        cells.rows_hi[strm] = a


def _set_new_records(cells: KVCells, recs: StreamRecords, layout: KVLayout) -> None:
    """Cells ``[0, n)`` of an emptied stream from its ``n`` meta records, fixed or
    variable (``set_new``: the reference of the native refill)."""
    pos, ext, seq, _ = _decode_meta_whole(
        recs.words, recs.n, layout.n_ext, layout.n_seq_max, "kv cells"
    )
    idx = np.arange(recs.n, dtype=np.int64)
    cells.set_new(idx, pos, seq, ext if layout.with_ext else None)


def seq_blob(
    layout: KVLayout,
    v_cells: Sequence[KVCells],
    v_heads: StreamHeads,
    section: NativeSection | None,
) -> SeqBlob | None:
    """The cache's :class:`SeqBlob`, or None where the one-call paths do not apply (no
    native section). The caller also honours ``NATIVE_RUNS`` per call."""
    if section is None:
        return None
    return SeqBlob(layout, v_cells, v_heads, section)


def _native_writable(layout: KVLayout, layers: Sequence[KVLayer], seq_id: int) -> bool:
    """Whether :func:`_write_stream_native` may write this blob: host tensors whose rows
    the blob takes whole, and a plain selection (no sliding window for one sequence)."""
    if not NATIVE_RUNS or (seq_id >= 0 and layout.swa_type != SWAType.NONE):
        return False
    for layer in layers:
        if not layer.k.device.is_host or layout.k_row_size(layer.n_embd_k_gqa) != layer.k.row_size:
            return False
        v = layer.v
        if v is not None and not v.device.is_host:
            return False
        if (
            v is not None
            and not layout.v_trans
            and layout.v_row_size(layer.n_embd_v_gqa) != v.row_size
        ):
            return False
    return True


def _select(
    layout: KVLayout, cells: KVCells, seq_id: int, scratch: np.ndarray
) -> tuple[int, np.ndarray, bool]:
    """The cells a blob of ``seq_id`` (-1: the whole stream) holds, in one native pass
    (:c:func:`pm_kv_select`): (count, runs ``int64 [2, n_runs]`` (starts, exclusive
    ends; a copy, the scratch is the stream's), whether a selected cell of the whole
    stream is shared). ``scratch``: ``int64 [2, size // 2 + 1]``."""
    cap = scratch.shape[1]
    found = ffi.from_buffer("int64_t[]", scratch, require_writable=True)
    counts = ffi.new("int64_t[2]")
    shared = ffi.new("int32_t *")
    check(
        lib.pm_kv_select(
            ffi.from_buffer("int32_t[]", cells.pos), ffi.from_buffer("int32_t[]", cells.owner),
            cells.size, seq_id, layout.n_seq_max, found, found + cap, cap, counts, counts + 1,
            shared,
        ),
        "state write: select cells",
    )  # fmt: skip
    n_runs = int(counts[1])
    return int(counts[0]), scratch[:, :n_runs].copy(), bool(shared[0])


def _stream_section(
    layout: KVLayout, cells: KVCells, strm: int, seq_id: int, section: NativeSection
) -> tuple[int, Callable[[memoryview], None]] | None:
    """One stream's part of a blob (from its cell count on) as (size, fill): one native
    pass finds the cells' runs now (:func:`_select`), ``fill(out)`` writes exactly
    ``size`` bytes in one native call (:c:func:`pm_kv_write_section`). A whole stream with
    a cell not of one sequence (a shared one: its record lists every id) takes the cells'
    bitsets. None for a sequence's part with a shared selected cell (numpy's)."""
    pos = ffi.from_buffer("int32_t[]", cells.pos)
    owner = ffi.from_buffer("int32_t[]", cells.owner)
    n, runs, shared = _select(layout, cells, seq_id, section.runs_scratch(strm, cells.size))
    if seq_id >= 0 and shared:
        return None
    if n == 0:
        return 4, lambda out: struct.pack_into("<I", out, 0, 0)
    n_runs = runs.shape[1]
    n_ext = layout.n_ext
    with_id = seq_id < layout.n_seq_max  # per sequence: no id at all for ids >= n_seq_max
    rec = 2 + n_ext + int(with_id)
    runs_p = ffi.from_buffer("int64_t[]", runs)
    bits, n_words, ids = ffi.NULL, 0, n  # records of one id each
    if shared:  # (a whole stream: records of their cells' ids, however many)
        n_words = cells.store.n_words
        bits = ffi.from_buffer("uint64_t[]", cells.seq)
        counted = ffi.new("int64_t *")
        check(
            lib.pm_kv_record_ids(owner, cells.size, bits, n_words, layout.n_seq_max, runs_p,
                                 runs_p + n_runs, n_runs, counted),
            "state write: record ids",
        )  # fmt: skip
        ids = int(counted[0])
    total = 12 + 4 * (rec * n + ids - n) + n * section.cell_bytes + 12 * section.n_headers
    ext = ffi.from_buffer("int32_t[]", cells.ext) if n_ext else ffi.NULL
    spec = ffi.from_buffer("int64_t[]", section.specs[strm])

    def fill_section(out: memoryview) -> None:
        done = ffi.new("int64_t *")
        status = lib.pm_kv_write_section(
            pos, owner, ext, n_ext, cells.size, seq_id, int(with_id), spec, section.tensors,
            n, n_runs, runs_p, runs_p + n_runs, bits, n_words, layout.n_seq_max,
            ffi.from_buffer(out, require_writable=True), len(out), done,
        )  # fmt: skip
        check(status, "state write: stream section")

    return total, fill_section


def _write_stream_section(
    layout: KVLayout,
    cells: KVCells,
    writer: StateWriter,
    strm: int,
    seq_id: int,
    section: NativeSection,
) -> bool:
    """:func:`_write_stream_native` into a writer that fills in place: the whole part
    (:func:`_stream_section`) is one ``write_fill``."""
    part = _stream_section(layout, cells, strm, seq_id, section)
    if part is None:
        return False
    writer.write_fill(*part)
    return True


def whole_writer(
    layout: KVLayout, v_cells: Sequence[KVCells], section: NativeSection
) -> tuple[int, Callable[[memoryview], int]] | None:
    """The whole cache's blob as (size, fill), every stream's part sized now
    (:func:`_stream_section`); ``fill(view)`` writes exactly ``size`` bytes and returns
    that count (a shared cell's record lists every id it holds)."""
    parts = []
    for strm in range(layout.n_stream):
        part = _stream_section(layout, v_cells[strm], strm, -1, section)
        if part is None:
            return None
        parts.append(part)
    size = 4 + sum(n for n, _ in parts)

    def fill(view: memoryview) -> int:
        struct.pack_into("<I", view, 0, layout.n_stream)
        at = 4
        for n, fill_part in parts:
            fill_part(view[at : at + n])
            at += n
        return at

    return size, fill


def _write_stream_native(
    layout: KVLayout,
    cells: KVCells,
    layers: Sequence[KVLayer],
    writer: StateWriter,
    strm: int,
    seq_id: int,
    section: NativeSection | None = None,
) -> bool:
    """One stream's part of a blob (from its cell count on) with one native pass over the
    cells (the runs, :func:`_select`) and the meta records written straight into the output; the
    bytes as byte runs (:func:`selected_cells`, :func:`_meta_words` and state_rows'
    ``write_rows`` / ``write_v_trans`` are the reference). Where the writer fills its
    destination in place and ``section`` is given, the whole part (headers, records, every
    layer's bytes) is one ``write_fill`` of one native call (:c:func:`pm_kv_write_section`).
    False, nothing written, for a stream with shared cells (per sequence: any; whole
    cache: a selected one)."""
    if seq_id >= 0 and cells.n_multi:
        return False
    if section is not None and writer.fills_in_place:
        return _write_stream_section(layout, cells, writer, strm, seq_id, section)
    pos = ffi.from_buffer("int32_t[]", cells.pos)
    owner = ffi.from_buffer("int32_t[]", cells.owner)
    scratch = (
        section.runs_scratch(strm, cells.size)
        if section is not None
        else np.empty((2, cells.size // 2 + 1), dtype=np.int64)
    )
    n, runs, shared = _select(layout, cells, seq_id, scratch)
    if seq_id < 0 and shared:
        return False
    n_runs = runs.shape[1]
    n_ext = layout.n_ext
    with_id = seq_id < layout.n_seq_max  # per sequence: no id at all for ids >= n_seq_max
    writer.write_u32(n)
    if n == 0:
        return True
    starts, ends = runs[0], runs[1]
    rec = 2 + n_ext + int(with_id)
    ext = ffi.from_buffer("int32_t[]", cells.ext) if n_ext else ffi.NULL

    def fill_meta(out: memoryview) -> None:
        status = lib.pm_kv_meta_words(
            pos, owner, ext, n_ext, ffi.from_buffer("int64_t[]", starts),
            ffi.from_buffer("int64_t[]", ends), n_runs, seq_id, int(with_id),
            ffi.from_buffer("int32_t[]", out, require_writable=True), n * rec,
        )  # fmt: skip
        check(status, "state write: meta records")

    writer.write_fill(n * rec * 4, fill_meta)
    writer.write_u32(1 if layout.v_trans else 0)
    writer.write_u32(len(layers))
    lengths = ends - starts
    memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row size -> byte runs

    def rows(t: Tensor) -> None:
        """The selected rows of ``t``: one run read in place, else every run in one call.
        E.g. row 64, runs [0, 2), [4, 5) -> byte runs at [0, 256), sizes [128, 64]."""
        row = t.row_size
        base = strm * layout.kv_size * row
        if n_runs == 1:
            a = base + int(starts[0]) * row
            writer.write(t.host_view().reshape(-1).view(np.uint8)[a : a + n * row].data)
            return
        if row not in memo:
            memo[row] = ((starts * row).astype(np.uint64), (lengths * row).astype(np.uint64))
        writer.write_tensor_runs(t, base, 1, 0, *memo[row])

    for layer in layers:
        writer.write_i32(layout.type_k.id)
        writer.write_u64(layer.k.row_size)
        rows(layer.k)
    el = layout.v_el_size
    for layer in layers:
        v = layer.v
        if v is None:
            continue
        writer.write_i32(layout.type_v.id)
        if not layout.v_trans:
            writer.write_u64(v.row_size)
            rows(v)
            continue
        writer.write_u32(el)
        writer.write_u32(layer.n_embd_v_gqa)
        # channel j's runs start at the stream's V block + j * kv_size * el
        if -el not in memo:
            memo[-el] = ((starts * el).astype(np.uint64), (lengths * el).astype(np.uint64))
        writer.write_tensor_runs(v, strm * v.nb[2], layer.n_embd_v_gqa, layout.kv_size * el,
                                 *memo[-el])  # fmt: skip
    return True


def write_kv_state(
    layout: KVLayout,
    v_cells: Sequence[KVCells],
    layers: Sequence[KVLayer],
    writer: StateWriter,
    seq_id: int,
    section: NativeSection | None = None,
) -> None:
    """Serialise the cells of ``seq_id`` (-1: all) and their K/V bytes. ``section``: the
    cache's :func:`native_section` (kept by the cache: building it costs microseconds)."""
    writer.write_u32(layout.n_stream)
    if section is not None:  # built only where _native_writable holds for the whole cache
        native = NATIVE_RUNS and (seq_id < 0 or layout.swa_type == SWAType.NONE)
    else:
        native = _native_writable(layout, layers, seq_id)
    for strm in range(layout.n_stream):
        cells = v_cells[strm]
        if native and _write_stream_native(layout, cells, layers, writer, strm, seq_id, section):
            continue
        idx = selected_cells(layout, cells, seq_id)
        writer.write_u32(idx.size)
        if idx.size == 0:
            continue
        writer.write_array(_meta_words(layout, cells, idx, seq_id))
        writer.write_u32(1 if layout.v_trans else 0)
        writer.write_u32(len(layers))
        base = strm * layout.kv_size
        runs = cell_runs(idx)
        memo: RangeMemo = {}
        for layer in layers:
            k_row = layout.k_row_size(layer.n_embd_k_gqa)
            writer.write_i32(layout.type_k.id)
            writer.write_u64(k_row)
            write_rows(writer, layer.k, base, idx, runs, k_row, memo)
        for layer in layers:
            if layer.v is None:
                continue
            writer.write_i32(layout.type_v.id)
            if not layout.v_trans:
                v_row = layout.v_row_size(layer.n_embd_v_gqa)
                writer.write_u64(v_row)
                write_rows(writer, layer.v, base, idx, runs, v_row, memo)
            else:
                writer.write_u32(layout.v_el_size)
                writer.write_u32(layer.n_embd_v_gqa)
                write_v_trans(writer, layout, layer, strm, idx, runs, memo)


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------

Runs = tuple[np.ndarray, np.ndarray]  # maximal runs of cells: (starts, ends exclusive)


def seq_same_cells(
    cells: KVCells, head: int, seq_id: int, words: np.ndarray, n_ext: int
) -> Runs | None:
    """The runs of the cells ``seq_id`` holds, when restoring the meta records ``words``
    (``[n, 3 + n_ext]``: pos, n_seq_id, ext..., id) as ``seq_id`` puts it back in exactly
    those cells with the same positions, ext and no pending shift, so that the
    reference's seq_rm + find_slot + apply_ubatch changes no cell; else None.

    One native pass over the stream; :func:`seq_same_cells_reference` is the numpy
    statement of the same rule. Only for caches without a sliding window and streams
    without shared cells (the caller checks both).
    E.g. seq 0 in cells [4, 5, 9] with positions [0, 1, 2], head 12, no empty cell in
    [4, 9]: records with positions [0, 1, 2] -> ([4, 9], [6, 10]).
    """
    n = int(words.shape[0])
    starts = np.empty(n, dtype=np.int64)
    ends = np.empty(n, dtype=np.int64)
    out = ffi.new("int64_t *")
    same = ffi.new("int32_t *")
    ext = ffi.from_buffer("int32_t[]", cells.ext) if n_ext else ffi.NULL
    # no pending shift anywhere (the flag is set by every shift): nothing to read
    shift = ffi.from_buffer("int32_t[]", cells.shift) if cells.has_shift else ffi.NULL
    status = lib.pm_kv_seq_same_cells(
        ffi.from_buffer("int32_t[]", cells.pos), shift,
        ffi.from_buffer("int32_t[]", cells.owner), ext, cells.size, seq_id, head, cells.used,
        ffi.from_buffer("int32_t[]", words), n, words.shape[1], n_ext, ffi.NULL,
        ffi.from_buffer("int64_t[]", starts, require_writable=True),
        ffi.from_buffer("int64_t[]", ends, require_writable=True), out, same,
    )  # fmt: skip
    check(status, "state read: same-cells test")
    if not same[0]:
        return None
    k = int(out[0])
    return starts[:k], ends[:k]


def cells_of_runs(runs: Runs) -> np.ndarray:
    """The cells of ``runs``, ascending (int64). E.g. ([2, 9], [5, 10]) -> [2, 3, 4, 9]."""
    starts, ends = runs
    lengths = ends - starts
    # each cell: its rank overall + (its run's start - the run's first rank)
    # E.g. lengths [3, 1] -> first ranks [0, 3] -> [0, 1, 2, 3] + [2, 2, 2, 6]
    first = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - first, lengths)


def seq_same_cells_reference(
    cells: KVCells, head: int, seq_id: int, words: np.ndarray, n_ext: int
) -> Runs | None:
    """:func:`seq_same_cells` in numpy (the reference the native pass is tested against)."""
    n = int(words.shape[0])
    idx = np.flatnonzero(cells.owner == seq_id)
    if idx.size != n or n == 0:
        return None
    if (words[:, 1] != 1).any() or (cells.pos[idx] != words[:, 0]).any() or cells.shift[idx].any():
        return None
    if n_ext and cells.ext is not None and (cells.ext[idx] != words[:, 2 : 2 + n_ext]).any():
        return None
    # the slot search after seq_rm starts at the first freed cell if that is before the
    # head, at 0 when more than 2n of the (used - n) cells left are free before it
    h = min(head, int(idx[0]))
    if h > cells.used + n:
        h = 0
    if (cells.pos[h : int(idx[-1]) + 1] < 0).any():
        return None  # an empty cell the search would take first
    return cell_runs(idx)


def _cells_param(
    layout: KVLayout, strm: int, t: Tensor, cell_bytes: int, channels: int | None
) -> tuple[int, int, int, int, int]:
    """:c:func:`pm_stateio_put_cells`' words for tensor ``t`` in stream ``strm``: a row
    tensor (``channels`` None; ``cell_bytes`` of each row) or a transposed V of
    ``channels`` channels, channel j of cell c at offset + j * kv_size * el + c * el.
    E.g. rows of 64 bytes -> (offset, 64, 64, 1, 0)."""
    if channels is None:
        return (strm * layout.kv_size * t.row_size, t.row_size, cell_bytes, 1, 0)
    el = layout.v_el_size
    return (strm * t.nb[2], el, el, channels, layout.kv_size * el)


def _put_cells(
    tensors: list[Any], srcs: list[Any], params: Sequence[tuple[int, ...]], runs: Runs, what: str
) -> None:
    """One :c:func:`pm_stateio_put_cells` call (a source ``ffi.NULL``: zeros)."""
    starts = np.ascontiguousarray(runs[0], dtype=np.int64)
    ends = np.ascontiguousarray(runs[1], dtype=np.int64)
    par = np.array(params, dtype=np.int64)
    status = lib.pm_stateio_put_cells(
        ffi.new("struct ggml_tensor *[]", tensors), ffi.new("void *[]", srcs),
        ffi.from_buffer("int64_t[]", par), len(params), ffi.from_buffer("int64_t[]", starts),
        ffi.from_buffer("int64_t[]", ends), starts.size,
    )  # fmt: skip
    check(status, what)


def put_payloads(
    layout: KVLayout,
    strm: int,
    n: int,
    runs: Callable[[], Runs],
    payloads: list[tuple[KVLayer, str, Payload]],
) -> bool:
    """Store parsed K/V bytes into ``n`` cells of stream ``strm`` of host tensors, every
    layer in one native call (``runs()``: the cells as :func:`cell_runs`, asked for only
    then); False (nothing written) when a tensor is not in host memory or a payload is
    not a host buffer (the caller then takes :func:`~pymem.kv.state_rows.write_payloads`)."""
    if not NATIVE_RUNS or n == 0:
        return False
    tensors, srcs, params = [], [], []
    for layer, kind, data in payloads:
        if not isinstance(data, memoryview):
            return False
        t = layer.k if kind == "k" else layer.v
        assert t is not None
        if not t.device.is_host:
            return False
        rows = kind == "k" or not layout.v_trans
        channels = None if rows else layer.n_embd_v_gqa
        param = _cells_param(layout, strm, t, data.nbytes // n, channels)
        want = n * param[2] * param[3]
        if data.nbytes != want:
            raise StateError(
                f"state read: layer {layer.il} {kind.upper()} payload of {data.nbytes} bytes, "
                f"{want} expected for {n} cells"
            )
        tensors.append(t._live())  # the tensor itself (a closed store raises here)
        srcs.append(ffi.from_buffer(data))
        params.append(param)
    _put_cells(tensors, srcs, params, runs(), "state read: K/V bytes")
    return True


# host tensors: blobs written and restored by the one-pass native code here; tests turn
# it off to drive kv.state_rows' paths (the reference ones) through the same calls
NATIVE_RUNS = True

NATIVE_PLACE = True
"""Restores place their cells natively (False: the numpy paths, which tests pin the native
ones to): a per-sequence restore in one call (``KVCache._place_seq_native``: find_slot's
search and apply_ubatch's placement; where it declines, find_slot and apply_ubatch with
a frozen ubatch, :func:`_restore_ubatch`, take their own native paths), a whole restore's
records checked by :func:`_whole_fixed_words` and placed by one refill
(``KVCache._refill``, which ``clear`` uses too). tiny-llama, a sequence of 8,192 cells
swapped back in: 619 -> ~390 µs with the one call (508 with the frozen ubatch, 532
numpy)."""


def zero_range_native(
    layout: KVLayout, layers: Sequence[KVLayer], strm: int, a: int, b: int
) -> bool:
    """:func:`~pymem.kv.state_rows.zero_range` (cells ``[a, b)`` of stream ``strm``, every
    layer) in one native call on host tensors, on ``set_state_threads``' threads from
    1 MiB on (:c:func:`pm_stateio_put_cells` without sources); False, nothing zeroed,
    where a tensor is not in host memory."""
    if not NATIVE_RUNS:
        return False
    if b <= a:  # nothing to zero (a blob that fills the stream)
        return True
    tensors, params = [], []
    for layer in layers:
        for t in (layer.k, layer.v):
            if t is None:
                continue
            if not t.device.is_host:
                return False
            # every channel of a transposed V (its padding too, as zero_range)
            trans = t is layer.v and layout.v_trans
            params.append(_cells_param(layout, strm, t, t.row_size, t.shape[0] if trans else None))
            tensors.append(t._live())
    if b > a and tensors:
        runs = (np.array([a], dtype=np.int64), np.array([b], dtype=np.int64))
        zeros = [ffi.NULL] * len(tensors)
        _put_cells(tensors, zeros, params, runs, "state read: zeroing the cells not restored")
    return True


def _store_payloads(
    layout: KVLayout,
    strm: int,
    n: int,
    idx: np.ndarray | None,
    runs: Runs | None,
    payloads: list[tuple[KVLayer, str, Payload]],
) -> None:
    """Write parsed K/V bytes into ``n`` cells of stream ``strm``, given as ``idx``
    (ascending) or ``runs`` or both, natively for host tensors. Elsewhere (a device, the
    numpy reference) through the tensors' API, not reported to the cache: the cells are
    placed already, so below ``used_max_p1``, and the rows bound (StackedCells.rows_hi)
    holds without lifting it to the whole cache."""

    def the_runs() -> Runs:
        if runs is not None:
            return runs
        assert idx is not None, "cells given neither as indices nor as runs"
        return cell_runs(idx)

    if put_payloads(layout, strm, n, the_runs, payloads):
        return
    if idx is None:
        idx = cells_of_runs(the_runs())
    tensors = [layer.k if kind == "k" else layer.v for layer, kind, _ in payloads]
    with unreported(t for t in tensors if t is not None):
        write_payloads(layout, strm, idx, payloads)


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
    # ``place`` for a sequence's positions in one native call where it applies (no shared
    # cell, no undo journal; windows included): the cells in slot order and their runs;
    # None, nothing placed: ``place`` decides
    place_seq: Callable[[int, np.ndarray], tuple[np.ndarray, Runs] | None]
    # a whole restore's clear(False) and placement of every stream's meta records (None
    # for a stream without cells) in one native call; False, nothing changed, where numpy
    # does them (clear + set_new); StateError, nothing changed, for a record that is not
    # a valid one (the blob changed after its parse)
    refill: Callable[[Sequence[StreamRecords | None]], bool]


SWA_DEFERRED = True
"""A sliding-window cache's per-sequence placement is left to the commit where its empty
cells prove it fits (False: always simulated under an undo journal at parse; tests pin
the two equal)."""

# a per-sequence placement left to commit: positions, ext, the list its cells go into
# ((cells, runs), either None, once placed), and seq_same_cells' answer (None: place it)
_Deferred = tuple[
    np.ndarray,
    np.ndarray | None,
    list[tuple[np.ndarray | None, Runs | None]],
    Runs | None,
]


class KVStatePlan(_CachePlan):
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
        super().__init__(hooks, layers, version)
        self.layout = layout
        self.v_cells = v_cells
        self.v_heads = v_heads  # the cache's own heads, changed in place
        self.seq_id = seq_id
        self.steps: list[Callable[[], None]] = []
        self.n_cells = 0
        self.whole_counts: dict[int, int] = {}  # whole restore: cells per stream
        # per sequence: the simulated placement (KVCells.redo_log per stream, heads)
        self.redo: tuple[list[tuple], list[int]] | None = None
        # per sequence: the placement done at commit (see _Deferred)
        self.place: _Deferred | None = None
        # whole cache: the cells already hold exactly the blob's (only the bytes move)
        self.whole_same = False
        # whole cache: every stream's records when each is a fixed one (None for a stream
        # without cells), placed by one refill at commit; None: the steps place them
        self.whole_fixed: list[np.ndarray | None] | None = None
        # whole cache, set at commit: the cells are placed already (the steps store bytes)
        self.cells_placed = False

    def verify(self) -> None:
        """A whole restore's fixed records (views of the blob, placed at commit) checked
        again, so a blob changed since is refused before any part of a composite commits;
        everything else the commit needs to decide, the parse copied."""
        if self.whole_fixed is None or self.parsed_now:
            return
        n_ext = self.layout.n_ext
        for strm, words in enumerate(self.whole_fixed):
            if words is None:
                continue
            if self.whole_same:  # the cells must still be the records
                ok = _cells_hold(self.v_cells[strm], words, n_ext, self.layout.n_seq_max)
            else:
                ok = _whole_fixed_words_in(words, self.layout.n_seq_max) is not None
            if not ok:
                raise StateError(BLOB_CHANGED)

    def commit(self) -> None:
        layout = self.layout
        self._may_commit()
        self.verify()  # a whole restore's records, views of the blob, before any change
        self.committed = True
        if self.seq_id == -1:
            if self.whole_same:
                self.cells_placed = _place_whole(self.hooks, self.v_heads, None)
            elif self.whole_fixed is None:
                self.hooks.clear(False)  # the steps place the cells
            else:  # where the refill declines, the steps place them
                fixed = [None if w is None else StreamRecords.of_fixed(w) for w in self.whole_fixed]
                self.cells_placed = _place_whole(self.hooks, self.v_heads, fixed)
            counts = [self.whole_counts.get(s, 0) for s in range(layout.n_stream)]
            _zero_past(layout, self.layers, counts, self.v_cells[0].store)
        if self.place is not None:
            pos, cell_ext, slot, same = self.place
            strm = int(layout.seq_to_stream[self.seq_id])
            if same is not None:
                # seq_rm + find_slot + apply_ubatch would put every cell back as it is
                # (seq_same_cells): only the head moves past the last one, as apply's does
                self.v_heads[strm] = int(same[1][-1])
                self.hooks.mark_mutated()
                slot.append((None, same))
            else:
                # the one placement the parse checked by counts: seq_rm + find_slot + apply
                slot.append(
                    _place_sequence(layout, self.v_cells, self.hooks, self.seq_id, pos, cell_ext)
                )
        if self.redo is not None:
            logs, heads = self.redo
            for cells, log in zip(self.v_cells, logs):
                cells.redo(log)
            self.v_heads[:] = heads
            self.hooks.mark_mutated()
        for step in self.steps:
            step()


def _parse_meta_fixed(
    reader: StateReader, n: int, n_ext: int, what: str, check_ids: bool = True
) -> np.ndarray:
    """Per-sequence meta: ``n`` records of ``3 + n_ext`` words, each with n_seq_id == 1
    (``check_ids=False``: the caller checks that, see :func:`_check_n_seq_id`)."""
    rec = 3 + n_ext
    need = n * rec * 4
    if reader.remaining >= need:
        words = reader.read_array("<i4", n * rec, what).reshape(n, rec)
        if check_ids:
            _check_n_seq_id(words, what)
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


def _check_n_seq_id(words: np.ndarray, what: str) -> None:
    """Refuse per-sequence meta records whose n_seq_id is not 1."""
    bad = np.flatnonzero(words[:, 1] != 1)
    if bad.size:
        raise StateError(
            f"{what}: cell {int(bad[0])} has n_seq_id = {int(words[bad[0], 1]) & 0xFFFFFFFF}, "
            "a sequence state needs exactly 1 (invalid seq_id-agnostic kv cell)"
        )


def _parse_meta_whole(
    reader: StateReader, n: int, n_ext: int, n_seq_max: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-cache meta of ``n`` variable records -> (pos, ext [n, n_ext], seq_id [n, k])."""
    max_words = n * (2 + n_ext + n_seq_max)
    avail_words = min(max_words, reader.remaining // 4)
    start = reader.offset
    words = reader.read_array("<i4", avail_words, what)
    pos, ext, seq, end = _decode_meta_whole(words, n, n_ext, n_seq_max, what)
    reader.offset = start + end * 4
    return pos, ext, seq


def _decode_meta_whole(
    words: np.ndarray, n: int, n_ext: int, n_seq_max: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """:func:`_parse_meta_whole` of the ``n`` records at the start of ``words`` -> (pos,
    ext, seq_id, the words they take)."""
    fixed = 2 + n_ext
    avail_words = words.size
    # fast path: every record has one id. The check is sound: the first record with
    # another count is still read at its true offset, and fails it.
    rec = fixed + 1
    if avail_words >= n * rec and (n == 0 or (words[1 : n * rec : rec] == 1).all()):
        # fixed records [pos, 1, ext..., id]: columns of one [n, rec] block, no gathers
        block = words[: n * rec].reshape(n, rec)
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
        return pos, ext, seq, n * rec
    offs, end = _chase_records(words, n, fixed, n_seq_max, what)
    counts = words[offs + 1].astype(np.int64)
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
    return pos, ext, seq, end


NATIVE_CHASE = hasattr(lib, "pm_kv_chase_records")
"""Whether the offsets of variable-length records (a whole blob whose cells are shared by
several sequences) come from one sequential native pass (:c:func:`pm_kv_chase_records`)
instead of numpy's pointer doubling over every word of the rest of the blob, which stays
the reference (tests set this False to run it)."""


def _chase_records(
    words: np.ndarray, n: int, fixed: int, n_seq_max: int, what: str
) -> tuple[np.ndarray, int]:
    """Offsets of ``n`` variable-length records (``fixed`` words + ``n_seq_id`` ids), and
    the word after the last; StateError naming the first record that does not fit or
    lists more than ``n_seq_max`` ids. E.g. counts [1, 2, 1], fixed 2 -> offsets
    [0, 3, 7], end 10."""
    size = words.size
    if size < fixed:
        raise StateError(
            f"{what}: state blob truncated reading cell 0 (need {fixed} words, {size} left)"
        )
    if not NATIVE_CHASE:
        return _chase_records_numpy(words, n, fixed, n_seq_max, what)
    offs = np.empty(n, dtype=np.int64)
    out = ffi.new("int64_t[3]")  # end, the failing record
    why = ffi.new("int32_t *")
    src = np.ascontiguousarray(words, dtype=np.int32)
    check(
        lib.pm_kv_chase_records(
            ffi.from_buffer("int32_t[]", src), size, n, fixed, n_seq_max,
            ffi.from_buffer("int64_t[]", offs, require_writable=True), out, out + 1, why,
        ),
        f"{what}: record offsets",
    )  # fmt: skip
    k, fault = int(out[1]), int(why[0])
    if fault == 1:
        raise StateError(f"{what}: state blob truncated reading cell {k}")
    if fault == 2:
        count = int(src[offs[k] + 1]) & 0xFFFFFFFF
        raise StateError(f"{what}: cell {k} has n_seq_id = {count} > n_seq_max = {n_seq_max}")
    if fault == 3:
        raise StateError(f"{what}: state blob truncated reading the sequence ids of cell {n - 1}")
    return offs, int(out[0])


def _chase_records_numpy(
    words: np.ndarray, n: int, fixed: int, n_seq_max: int, what: str
) -> tuple[np.ndarray, int]:
    """:func:`_chase_records` by pointer doubling (``size >= fixed`` checked): ``nxt[o]``
    is the record after one starting at ``o``; composing the table with itself doubles
    the jump, so all offsets come in ``log2(n)`` vector steps."""
    size = words.size
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
    if NATIVE_PLACE:
        # frozen, as an allocator's ubatch: find_slot and apply_ubatch take their native
        # paths for it (a step memo is built only over sequence arrays that cannot change)
        for a in (ub.seq_id, ub.seq_id_unq, ub.n_seq_id):
            a.flags.writeable = False
    return ub


@lru_cache(maxsize=4096)
def _layer_labels(what: str, il: int) -> tuple[str, ...]:
    """The field names of one layer's data headers (built once: a restore reads them all).

    E.g. ("kv.stream[0]", 3) -> ("kv.stream[0].layer[3]", "kv.stream[0].layer[3].k_type", ...).
    """
    w = f"{what}.layer[{il}]"
    fields = ("k_type", "k_size_row", "k_data", "v_type", "v_size_row", "v_data", "v_size_el")
    return (w, *(f"{w}.{f}" for f in fields), f"{w}.n_embd_v_gqa")


def _parse_data(
    layout: KVLayout, layers: Sequence[KVLayer], reader: StateReader, n: int, what: str
) -> list[tuple[KVLayer, str, Payload]]:
    """Validate the data section of one stream; returns ``(layer, "k"|"v", payload)``.

    Messages are formatted only on failure (a restore reads ~4 fields per layer)."""
    v_trans = reader.read_u32(f"{what}.v_trans")
    n_layer = reader.read_u32(f"{what}.n_layer")
    if n_layer != len(layers):
        raise StateError(
            f"{what}.n_layer: mismatched layer count ({n_layer} in the blob, {len(layers)} in the cache)"
        )
    if n > layout.kv_size:
        raise StateError(f"{what}.cell_count: {n} cells do not fit in {layout.kv_size}")
    if bool(v_trans) != layout.v_trans or v_trans not in (0, 1):
        raise StateError(
            f"{what}.v_trans: incompatible V transposition (blob {v_trans}, cache {int(layout.v_trans)})"
        )
    type_k, type_v = layout.type_k, layout.type_v
    out: list[tuple[KVLayer, str, Payload]] = []
    for layer in layers:
        w, k_type_f, k_row_f, k_data_f = _layer_labels(what, layer.il)[:4]
        k_type = reader.read_i32(k_type_f)
        if k_type != type_k.id:
            raise StateError(
                f"{w}.k_type: mismatched key type ({k_type} in the blob, {type_k.id} = {type_k.name})"
            )
        k_row = reader.read_u64(k_row_f)
        want = layout.k_row_size(layer.n_embd_k_gqa)
        if k_row != want:
            raise StateError(
                f"{w}.k_size_row: mismatched key row size ({k_row} in the blob, {want})"
            )
        out.append((layer, "k", reader.read_payload(n * k_row, k_data_f)))
    for layer in layers:
        if layer.v is None:
            continue
        w, _, _, _, v_type_f, v_row_f, v_data_f, v_el_f, v_embd_f = _layer_labels(what, layer.il)
        v_type = reader.read_i32(v_type_f)
        if v_type != type_v.id:
            raise StateError(
                f"{w}.v_type: mismatched value type ({v_type} in the blob, {type_v.id} = {type_v.name})"
            )
        if not layout.v_trans:
            v_row = reader.read_u64(v_row_f)
            want = layout.v_row_size(layer.n_embd_v_gqa)
            if v_row != want:
                raise StateError(
                    f"{w}.v_size_row: mismatched value row size ({v_row} in the blob, {want})"
                )
            out.append((layer, "v", reader.read_payload(n * v_row, v_data_f)))
        else:
            el = reader.read_u32(v_el_f)
            if el != layout.v_el_size:
                raise StateError(
                    f"{w}.v_size_el: mismatched value element size ({el} in the blob, {layout.v_el_size})"
                )
            n_embd = reader.read_u32(v_embd_f)
            if n_embd != layer.n_embd_v_gqa:
                raise StateError(
                    f"{w}.n_embd_v_gqa: mismatched GQA embedding size ({n_embd} in the blob, {layer.n_embd_v_gqa})"
                )
            out.append((layer, "v", reader.read_payload(n_embd * n * el, v_data_f)))
    return out


def _whole_same_words(
    cells: KVCells, reader: StateReader, n: int, n_ext: int, n_seq_max: int
) -> np.ndarray | None:
    """The ``n`` whole-cache meta records of a stream as ``[n, 3 + n_ext]`` words, read,
    when a whole restore's clear + set_new of them would leave the stream as it is: cells
    ``[0, n)`` hold exactly those positions, ext and one sequence each (one native pass,
    ``pm_kv_cells_equal``), no other cell is used and no shift is pending. Else None, and
    the reader is where it was (the records are then parsed in full)."""
    rec = 3 + n_ext
    if cells.used != n or cells.n_multi or cells.has_shift or reader.remaining < n * rec * 4:
        return None
    start = reader.offset
    words = reader.read_array("<i4", n * rec, "kv cells").reshape(n, rec)
    if not _cells_hold(cells, words, n_ext, n_seq_max):
        reader.offset = start
        return None
    return words


def _cells_hold(cells: KVCells, words: np.ndarray, n_ext: int, n_seq_max: int) -> bool:
    """Whether cells ``[0, n)`` already are the ``n`` whole-cache records ``words``, each of
    an id below ``n_seq_max`` (one native pass, ``pm_kv_cells_equal``; the caller checked
    the counters)."""
    same = ffi.new("int32_t *")
    ext = ffi.from_buffer("int32_t[]", cells.ext) if n_ext else ffi.NULL
    status = lib.pm_kv_cells_equal(
        ffi.from_buffer("int32_t[]", cells.pos), ffi.from_buffer("int32_t[]", cells.owner), ext,
        ffi.from_buffer("int32_t[]", words), words.shape[0], words.shape[1], n_ext, n_seq_max, same,
    )  # fmt: skip
    check(status, "state read: whole-cache cells test")
    return bool(same[0])


def _whole_fixed_words_in(words: np.ndarray, n_seq_max: int) -> np.ndarray | None:
    """``words`` (``[n, rec]`` meta records) when every one is a fixed record (n_seq_id 1,
    position >= 0, its id in [0, n_seq_max)): one native pass (``pm_kv_records_fixed``);
    else None."""
    bad = ffi.new("int64_t *")
    n, rec = words.shape
    status = lib.pm_kv_records_fixed(ffi.from_buffer("int32_t[]", words), n, rec, n_seq_max, bad)
    check(status, "state read: whole-cache records test")
    return words if bad[0] < 0 else None


def _whole_fixed_words(
    reader: StateReader, n: int, n_ext: int, n_seq_max: int
) -> np.ndarray | None:
    """The ``n`` whole-cache meta records of a stream as ``[n, 3 + n_ext]`` words (a view
    of the blob, which must not change before the commit, as its payloads), read, when
    every one is a fixed record (n_seq_id 1, position >= 0, its id in [0, n_seq_max)): one native
    pass (``pm_kv_records_fixed``). Else None, and the reader is where it was (the general
    parse then reads variable records or names the fault)."""
    rec = 3 + n_ext
    if not NATIVE_PLACE or n == 0 or reader.remaining < n * rec * 4:
        return None
    start = reader.offset
    words = _whole_fixed_words_in(
        reader.read_array("<i4", n * rec, "kv cells").reshape(n, rec), n_seq_max
    )
    if words is None:
        reader.offset = start
    return words


def whole_same_reference(cells: KVCells, pos: np.ndarray, ext: np.ndarray, seq: np.ndarray) -> bool:
    """Whether a whole restore's clear + placement of the parsed records (``pos``, ``ext``
    ``[n, n_ext]``, ``seq`` ids ``[n, k]``, -1 padded) would leave the stream as it is, in
    numpy: the reference the native passes (``pm_kv_cells_equal`` for a stream without
    shared cells, ``pm_step_kv_cells_equal_var`` for one with them) are tested against.
    Cells ``[0, n)`` hold exactly the records' positions, ext and ids, no other cell is
    used and no shift is pending; a stream with shared cells and ext is never taken."""
    n = pos.size
    if cells.used != n or cells.has_shift or (cells.n_multi and cells.ext is not None):
        return False
    if (pos < 0).any():  # an empty cell (position -1) never matches a record
        return False
    if not np.array_equal(cells.pos[:n], pos):
        return False
    if cells.ext is not None and not (ext.shape[1] == 3 and np.array_equal(cells.ext[:n], ext)):
        return False
    # each cell's bitset is exactly its record's ids (distinct ones: as many bits as ids)
    want = np.zeros((n, cells.seq.shape[1]), dtype=np.uint64)
    rows, cols = np.nonzero(seq >= 0)
    ids = seq[rows, cols].astype(np.int64)
    if (ids >= 64 * want.shape[1]).any():
        return False
    np.bitwise_or.at(
        want, (rows, ids >> 6), np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64))
    )
    n_bits = np.unpackbits(want.view(np.uint8), axis=1).sum(axis=1)
    return bool(
        np.array_equal(cells.seq[:n], want) and np.array_equal(n_bits, (seq >= 0).sum(axis=1))
    )


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
    n_ext = layout.n_ext
    kv_size = layout.kv_size

    if seq_id == -1:
        same = True  # so far, every stream's cells already are the blob's
        fixed_all: list[np.ndarray | None] | None = [None] * n_stream
        for s in range(n_stream):
            what = f"kv.stream[{s}]"
            n = reader.read_u32(f"{what}.cell_count")
            if n == 0:
                same = same and v_cells[s].used == 0 and not v_cells[s].has_shift
                continue
            expect(
                n <= kv_size,
                f"{what}.cell_count: not enough cells in kv cache ({n} > {kv_size})",
            )
            words = (
                _whole_same_words(v_cells[s], reader, n, n_ext, layout.n_seq_max) if same else None
            )
            fixed = None  # the records, where each is fixed (one id): placed natively
            if words is None:
                same = False
                fixed = _whole_fixed_words(reader, n, n_ext, layout.n_seq_max)
            w = fixed if fixed is not None else words
            if fixed_all is not None:
                fixed_all[s] = w
                if w is None:
                    fixed_all = None
            if w is not None:
                # checked by a native pass: one valid id each, positions >= 0
                meta = (w[:, 0], w[:, 2 : 2 + n_ext], w[:, -1:])
            else:
                meta = _parse_meta_whole(reader, n, n_ext, layout.n_seq_max, f"{what}.cells")
            pos, ext, seq = meta
            payloads = _parse_data(layout, layers, reader, n, what)
            plan.n_cells += n
            plan.whole_counts[s] = n

            def whole_step(
                s: int = s,
                n: int = n,
                pos: np.ndarray = pos,
                seq: np.ndarray = seq,
                ext: np.ndarray = ext,
                payloads: list = payloads,
            ) -> None:
                # cells [0, n): one run (an index array only where one is needed: a
                # fresh 256 KiB array costs its page faults, ~90 us at 32,768 cells)
                runs = (np.zeros(1, dtype=np.int64), np.full(1, n, dtype=np.int64))
                if not plan.cells_placed:
                    idx = np.arange(n, dtype=np.int64)
                    v_cells[s].set_new(idx, pos, seq, ext if n_ext else None)
                v_heads[s] = 0
                _store_payloads(layout, s, n, None, runs, payloads)

            plan.steps.append(whole_step)
        plan.whole_same = same
        plan.whole_fixed = fixed_all
        return plan

    # per sequence: the placement is seq_rm + find_slot + apply. The first (usually only)
    # stream with cells is placed at commit time where counts tell that it fits: find_slot
    # takes any n usable cells, and usable means empty after the seq_rm (a sliding-window
    # cache also reuses cells its window masks: more usable cells, never fewer, so an
    # empty count that suffices is proof there too), so the parse changes nothing and
    # journals nothing. Without SWA, when the sequence would land back in the very cells
    # it holds, unchanged (seq_same_cells), the commit only moves the head. A sliding-window
    # stream whose empty cells do not suffice, or with shared cells, and a second stream
    # with cells (a hostile blob) are placed under an undo journal, as the reference would.
    strm = int(layout.seq_to_stream[seq_id])
    swa = layout.swa_type != SWAType.NONE
    deferred: list[_Deferred] = []
    journal: ExitStack | None = None

    def simulate(
        pos: np.ndarray,
        cell_ext: np.ndarray | None,
        slot: list[tuple[np.ndarray | None, Runs | None]],
        same: object,
        what: str,
    ) -> None:
        ub = _restore_ubatch(layout.n_pos_per_embd, seq_id, pos, cell_ext)
        sinfo = hooks.place(seq_id, ub)
        if sinfo is None:
            raise StateError(
                f"{what}: failed to find {ub.n_tokens} available cells in kv cache "
                f"(stream {strm} has {kv_size - v_cells[strm].used} free)"
            )
        idx = sinfo.idxs[0].astype(np.int64)
        if cell_ext is not None:
            v_cells[strm].set_ext(idx, cell_ext)
        slot.append((idx, None))

    with ExitStack() as stack:
        for s in range(n_stream):
            what = f"kv.stream[{s}]"
            n = reader.read_u32(f"{what}.cell_count")
            if n == 0:
                continue
            if n > kv_size:
                raise StateError(
                    f"{what}.cell_count: not enough cells in kv cache ({n} > {kv_size})"
                )
            slot: list[tuple[np.ndarray | None, Runs | None]] = []  # (cells, runs) placed
            cells = v_cells[strm]
            same_cells: Runs | None = None
            # a sequence the stream does not hold (swapped out by a seq_rm) has no cells to
            # go back into, nor any that its seq_rm would free: no scan of the stream for it
            holds = cells.seq_pos_max(seq_id) >= 0
            if holds and not swa and not plan.steps and not cells.n_multi:
                # seq_same_cells checks n_seq_id == 1 too: the full check only without it
                words = _parse_meta_fixed(reader, n, n_ext, f"{what}.cells", check_ids=False)
                same_cells = seq_same_cells(cells, int(v_heads.a[strm]), seq_id, words, n_ext)
                if same_cells is None:
                    _check_n_seq_id(words, f"{what}.cells")
            else:
                words = _parse_meta_fixed(reader, n, n_ext, f"{what}.cells")
            if same_cells is None:
                pos = words[:, 0].copy()
                bad = np.flatnonzero(pos < 0)
                if bad.size:
                    raise StateError(
                        f"{what}.cells: cell {int(bad[0])} has position {int(pos[bad[0]])} < 0"
                    )
                cell_ext = words[:, 2 : 2 + n_ext].copy() if n_ext else None
            else:
                pos, cell_ext = words[:, 0], words[:, 2 : 2 + n_ext] if n_ext else None
            defer = not plan.steps and not (swa and (cells.n_multi or not SWA_DEFERRED))
            if defer and same_cells is None:
                # free after seq_rm: the empty cells and those held by seq_id alone
                free = kv_size - cells.used
                if holds:
                    free += int(np.count_nonzero(cells.owner == seq_id))
                if n > free and not swa:
                    raise StateError(
                        f"{what}: failed to find {n} available cells in kv cache "
                        f"(stream {strm} has {free} free)"
                    )
                defer = n <= free  # else masked cells may still take it: simulate
            if defer:
                deferred.append((pos, cell_ext, slot, same_cells))
            else:
                if journal is None:
                    journal = stack
                    stack.enter_context(hooks.planning())
                    for d in deferred:
                        simulate(*d, what)
                    deferred.clear()
                simulate(pos, cell_ext, slot, None, what)
            payloads = _parse_data(layout, layers, reader, n, what)
            plan.n_cells += n

            def seq_step(slot: list = slot, payloads: list = payloads, n: int = n) -> None:
                _store_payloads(layout, strm, n, slot[0][0], slot[0][1], payloads)

            plan.steps.append(seq_step)
        # the commit puts back the simulated cells as they are now instead of placing
        # the sequence again (the cache cannot change in between: version check)
        if journal is not None:
            plan.redo = ([c.redo_log() for c in v_cells], list(v_heads))
    if deferred:
        plan.place = deferred[0]
    return plan


KVPartPlan = KVStatePlan | SameCellsPlan | PlacedSeqPlan | WholeBlobPlan
"""A parsed KV part of a state blob, by the road its parse took (each ``commit()``s it)."""


__all__ = [
    "LLAMA_MAX_SEQ",
    "KVPartPlan",
    "KVStateHooks",
    "KVStatePlan",
    "PlacedSeqPlan",
    "cells_of_runs",
    "parse_kv_state",
    "put_payloads",
    "seq_same_cells",
    "seq_same_cells_reference",
    "whole_same_reference",
    "write_kv_state",
    "zero_cells",
    "zero_range",
]
