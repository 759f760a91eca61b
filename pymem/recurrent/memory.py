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
  True only when ``k = pos - p0 + 1 <= n_rs_seq`` and no rollback is pending for that
  sequence (and, pymem's departure below, ``k`` is exact); otherwise False and nothing
  changes. A range that does not contain the tail
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

* A rollback is exact only when the ubatch that last advanced the sequence held more
  than ``k`` of its tokens: the kernels write the snapshot planes from inside that
  ubatch. The reference also accepts ``k >=`` that count, returns True and restores a
  stale plane (a wrong state, silently; e.g. decode 0..17 in one ubatch, then 18 alone,
  then ``seq_rm(s, 18, -1)``). pymem returns False and changes nothing, so the caller
  knows to replay (``RecurrentCells.n_last`` keeps the count; copies share it, restores
  and clears reset it). A departure from the reference's return value, pinned by
  tests/test_recurrent.py and modelled in the executable spec. The same holds for a
  sequence whose cell another ubatch's slot search swapped elsewhere: the graph carries
  its state (plane 0) along but not its snapshot planes, so its ``n_last`` drops to 0
  and every rollback of it is refused until it decodes again (the reference, again,
  restores a plane of another state; tests/test_property_regressions.py R2).

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

Package map: cell metadata and slot search in :mod:`pymem.recurrent.cells`, state blobs
in :mod:`pymem.recurrent.state_io`, the batch context in :mod:`pymem.recurrent.context`,
ggml graph helpers in :mod:`pymem.recurrent.graph`; this module holds the memory itself
(:class:`RecurrentMemory`, :class:`RecurrentPlan`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from pymem._native import check, ffi, lib
from pymem.backend import (
    Tensor,
    TensorSpec,
    TensorStore,
    check_reachable,
    get_device,
    report_writes,
)
from pymem.batch import BatchAllocator
from pymem.errors import BatchError, ClosedError, ConfigError, RangeError, StateError
from pymem.memory import POS_MAX, Memory, MemoryStatus, Split, clamp_range
from pymem.recurrent import cells as rcells
from pymem.recurrent.cells import (
    RecurrentCells,
    SlotRequest,
    find_slot,
    s_copy_rows,
    seq_rm_cells,
    steady_step,
)
from pymem.recurrent.context import RecurrentMemoryContext
from pymem.recurrent.state_io import (
    RecurrentReadPlan,
    SeqRows,
    StateLayers,
    parse_state,
    seq_cell_row,
    seq_rows,
    seq_section_size,
    touch_rows,
    whole_cells,
    write_state,
)
from pymem.spec import ModelSpec
from pymem.state import (
    BLOB_CHANGED,
    BufferWriter,
    SeqReader,
    SeqWriter,
    StateReader,
    StateWriter,
    check_state_flags,
    stamped_store,
)
from pymem.types import ggml_type
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

_NO_UPDATE = RecurrentMemoryContext.failed(MemoryStatus.NO_UPDATE)  # init_update's answer
_I32_MIN = -(2**31)


def _c_div(a: int, d: int) -> int:
    """Integer division truncating toward zero, as C's ``/`` (Python's ``//`` floors).

    E.g. ``_c_div(-7, 2) == -3`` where ``-7 // 2 == -4``.
    """
    q = abs(a) // abs(d)
    return q if (a >= 0) == (d > 0) else -q


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
    changes them): the live ones carry over. ``states`` is ``[None]`` for one steady
    ubatch (:func:`~pymem.recurrent.cells.steady_step` held on the live cells): no copy
    is made, and the apply places it in the live cells.
    """

    requests: list[SlotRequest]
    states: list[RecurrentCells | None]
    base: RecurrentCells
    version: int


class RecurrentMemory(Memory):
    """Recurrent (SSM) state memory: ``llama_memory_recurrent``.

    Parameters mirror the reference constructor:

    * ``spec``: every model layer; ``n_layer`` in state blobs is the trunk's layer count
      (``hparams.n_layer()``: NextN / MTP layers excluded, and never given states).
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
        self._stores: list[TensorStore] = []  # first: close() must work whatever fails below
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
        # ids the position queries read without a closed test: all while open, none after
        self._n_fast_ids = self.size
        self.n_seq_max = int(n_seq_max)
        self.n_rs_seq = int(n_rs_seq)
        self.type_r = ggml_type(type_r)
        self.type_s = ggml_type(type_s)
        self.n_embd_r = int(spec.n_embd_r())
        self.n_embd_s = int(spec.n_embd_s())

        # the reference sizes and serialises recurrent memory over the trunk only
        self.n_layer_trunk = spec.n_layer - spec.n_layer_nextn
        self.layers: tuple[int, ...] = tuple(
            il for il in range(self.n_layer_trunk) if filter is None or filter(il)
        )
        # either width may be 0 (LFM2's short-conv layers keep only R, MiniMax-01's lightning
        # layers only S): the reference then allocates a zero-width tensor and still writes
        # its header in the state
        if self.layers and (self.n_embd_r < 0 or self.n_embd_s < 0):
            raise ConfigError(
                f"spec: recurrent layers need n_embd_r >= 0 and n_embd_s >= 0, got {self.n_embd_r} and "
                f"{self.n_embd_s}"
            )
        self.n_rows = self.size * (1 + self.n_rs_seq)

        # per device, in device-name order (the reference orders buffer types by name)
        per_layer = {il: get_device(d) for il, d in _resolve_devices(device, self.layers).items()}
        by_dev: dict[str, list[int]] = {}
        for il in self.layers:
            by_dev.setdefault(per_layer[il].name, []).append(il)
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
        # the cells from which on plane 0's R/S rows ([0]) and the rollback planes' ([1])
        # are zero (a fresh buffer is zero: 0, 0): a whole restore zeroes only below them.
        # A graph's rows (apply_ubatch) raise both, a store's plane 0's; a write through
        # the tensors' own API lifts both to every cell
        self.rows_hi = np.zeros(2, dtype=np.int64)
        report_writes(
            self, (*self._r.values(), *self._s.values()), lambda m: m.rows_hi.fill(m.size)
        )
        self._state_layers = StateLayers(
            self.n_layer_trunk,
            self.layers,
            tuple(self._r[il] for il in self.layers),
            tuple(self._s[il] for il in self.layers),
            self.rows_hi,
        )
        # one sequence's section in one native call (host tensors; built on first use)
        self._seq_rows: SeqRows | Literal[False] | None = False

        # seq ids stored in cells are < size; rs_idx is indexed by any id < n_seq_max too
        self.cells = RecurrentCells(self.size, max(self.size, self.n_seq_max))
        # memoryviews of the cells' tail and pos, rebound with the cells (commit_cells):
        # the position queries, here and in a hybrid, read a word of each
        self.position_views: tuple[memoryview, memoryview] = self.cells.views()
        self._version = 0  # bumped on every mutation: a stale read plan refuses to commit
        # frozen ids seq_pos_min_of checked, and their int64 copy
        # (frozen ids, their int64 copy, its cffi buffer): the allocator's layout ids
        self._ids_in_range: tuple[np.ndarray, np.ndarray, Any] | None = None
        # (seq_id, n_seq_id, request, last-token indices, n_tokens) of the last replayed ubatch
        self._req_memo: tuple[np.ndarray, np.ndarray, SlotRequest, np.ndarray, int] | None = None
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

    def rollback_reach(self, seq_id: int) -> int:
        """How many trailing tokens of ``seq_id`` a rollback could remove exactly right now.

        0 when none: no snapshot planes, a rollback already pending, or the last ubatch
        held a single token of the sequence. ``seq_rm(seq_id, pos - k + 1, -1)`` succeeds
        as a rollback exactly for ``1 <= k <= rollback_reach(seq_id)``.
        """
        self.check_open()
        c = self.cells
        if not 0 <= seq_id < min(self.size, self.n_seq_max) or c.tail[seq_id] < 0:
            return 0
        if c.rs_idx[seq_id] != 0:
            return 0
        return max(0, min(self.n_rs_seq, int(c.n_last[seq_id]) - 1))

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

    def check_devices(self) -> None:
        """Raise DeviceError when a device of the R/S tensors is gone (an rpc-server)."""
        check_reachable(store.device for store in self._stores)

    # -- what a state-read plan needs (pymem.recurrent.state_io.ReadTarget) -------------
    @property
    def version(self) -> int:
        """Bumped by every mutation: a plan made at another version is stale."""
        return self._version

    def rows_touched(self, hi: int, planes: bool = True) -> None:
        """Rows of the cells below ``hi`` may be written, in plane 0 and (``planes``: a
        graph's snapshots) in the rollback planes: ``rows_hi`` covers them."""
        touch_rows(self.rows_hi, hi, planes)

    def zero_rows(self, from_row: int = 0) -> None:
        """Zero R/S rows ``[from_row, n_rows)`` of every layer, every plane (0: every byte,
        the data half of ``clear(True)``). A whole restore passes the rows it is about to
        overwrite: the same bytes after it, without zeroing them first. Only each plane's
        cells below its ``rows_hi`` are zeroed (the rows of the cells past it are zero);
        ``rows_hi`` is then ``from_row`` for plane 0 and 0 for the rollback planes."""
        if from_row <= 0:
            for store in self._stores:
                store.clear(0)
            self.rows_hi[:] = 0
            return
        hi0, hi_planes = (min(int(h), self.size) for h in self.rows_hi)
        for il in self.layers:
            for t in (self._r[il], self._s[il]):
                if t.row_size <= 0:
                    continue
                for p0 in range(0, t.n_rows, self.size):  # plane by plane
                    a = p0 + (from_row if p0 == 0 else 0)
                    e = min(p0 + (hi0 if p0 == 0 else hi_planes), t.n_rows)
                    if a < e:
                        t.fill_row_range(a, e - a, 0)
        self.rows_hi[:] = (from_row, 0)

    def commit_cells(self, cells: RecurrentCells) -> None:
        """Make ``cells`` (a validated placement or restore) the memory's cells."""
        self.cells = cells
        self.position_views = cells.views()
        self._version += 1

    # -- planning ----------------------------------------------------------------------
    def splits(self, balloc: BatchAllocator, n_ubatch: int, embd_all: bool) -> list[Split]:
        """``embd_all`` -> ``split_seq``; else ``split_equal(n_ubatch, sequential=True,
        n_keep_tail = n_rs_seq + 1 if n_rs_seq > 0 else 0)`` so that the last
        ``n_rs_seq + 1`` tokens of a sequence land in one ubatch (the snapshots a later
        rollback needs are written by that ubatch's kernels)."""
        if embd_all:
            return [partial(balloc.split_seq, n_ubatch)]
        n_keep_tail = self.n_rs_seq + 1 if self.n_rs_seq > 0 else 0
        return [partial(balloc.split_equal, n_ubatch, True, n_keep_tail)]

    def failed_context(self, status: MemoryStatus) -> RecurrentMemoryContext:
        return RecurrentMemoryContext.failed(status)

    def init_full(self) -> RecurrentMemoryContext:
        """A context covering every cell (worst-case graph reservation)."""
        self.check_open()
        return RecurrentMemoryContext(self, None, is_full=True)

    def init_update(self, optimize: bool = False) -> RecurrentMemoryContext:
        """Recurrent memory never has pending updates: always ``NO_UPDATE`` (one shared
        context: it only reports its status, so every decode step can reuse it)."""
        self.check_open()
        return _NO_UPDATE

    def get_can_shift(self) -> bool:
        return True  # shifting a recurrent state only moves its position

    def prepare(self, ubatches: Sequence[UBatch]) -> RecurrentPlan | None:
        """Place every ubatch in order on copies of the cells; None if one does not fit.

        Changes nothing. A lone ubatch that takes the steady step (a decode step of the
        same sequences) is only checked on the live cells: no copy is planned, and the
        apply places it in them (prepare and apply of a tiny-jamba step, 32 sequences:
        28.6 -> 20.3 µs). A context made by :meth:`context_for` applies the planned cells
        as long as the memory has not changed since, instead of placing again.
        """
        self.check_open()
        reqs = [self._request(ub) for ub in ubatches]
        if len(reqs) == 1 and steady_step(self.cells, reqs[0], dry=True):
            return RecurrentPlan(reqs, [None], self.cells, self._version)  # (a decode step)
        states: list[RecurrentCells | None] = []
        cells = self.cells
        for req in reqs:
            cells = cells.copy()
            if not find_slot(cells, req):
                return None
            states.append(cells)
        return RecurrentPlan(reqs, states, self.cells, self._version)

    def _request(self, ub: UBatch) -> SlotRequest:
        """``SlotRequest.from_ubatch(ub)``; for a ubatch the allocator replayed (read-only
        sequence arrays, the same objects every decode step) the sequence part of the last
        such request is reused and only the positions are gathered again."""
        m = self._req_memo
        if m is not None and ub.seq_id is m[0] and ub.n_seq_id is m[1] and ub.equal_seqs:
            tmpl, last = m[2], m[3]
            if ub.n_seq_tokens == tmpl.n_seq_tokens and ub.n_tokens == m[4]:
                req = SlotRequest.__new__(SlotRequest)  # ids, n_ids, all_ids, coupled,
                req.__dict__.update(tmpl.__dict__)  # error: shared, never written
                req.last_pos = np.asarray(ub.pos, dtype=np.int32)[last]
                return req
        req = SlotRequest.from_ubatch(ub)
        if not (ub.seq_id.flags.writeable or ub.n_seq_id.flags.writeable):
            # the last token of each set: E.g. 3 tokens per set, 2 sets -> [2, 5]
            last = np.arange(ub.n_seq_tokens - 1, ub.n_tokens, ub.n_seq_tokens)
            self._req_memo = (ub.seq_id, ub.n_seq_id, req, last, ub.n_tokens)
        return req

    def context_for(
        self, plan: RecurrentPlan, ubatches: Sequence[UBatch]
    ) -> RecurrentMemoryContext:
        """A batch context from a :meth:`prepare` of the same ubatches (no re-planning)."""
        return RecurrentMemoryContext(self, ubatches, requests=plan.requests, plan=plan)

    def find_slot(self, ubatch: UBatch) -> bool:
        """Place ``ubatch`` now (what ``apply`` does). On False nothing changes."""
        self.check_open()
        if not self._place(SlotRequest.from_ubatch(ubatch)):
            return False
        self.rows_touched(self.head + self.n)  # (what its graph writes, as apply's)
        return True

    def apply_ubatch(self, req: SlotRequest, plan: RecurrentPlan | None, i: int) -> np.ndarray:
        """Place ubatch ``i`` of a batch now (a context's ``apply``); returns its ``s_copy``.

        The cells ``plan`` computed for it are taken as they are when the memory has not
        changed since planning (it is at the plan's version plus the ``i`` placements made
        from it, holding the plan's cells); otherwise ``find_slot`` places ``req`` again
        from the current cells. The pending rollbacks of the gathered cells are consumed
        (single use). Raises :class:`BatchError`, changing nothing, when it no longer fits.
        """
        self.check_open()
        planned = (
            plan is not None
            and self._version == plan.version + i
            and self.cells is (plan.states[i - 1] if i else plan.base)
        )
        # nothing changed since planning: the planned cells are this placement, or for a
        # steady step (no cells planned) the step placed in the live cells it was checked on
        cells = plan.states[i] if planned and plan is not None else None
        if cells is not None:
            cells.rs_idx = self.cells.rs_idx
            self.commit_cells(cells)
        elif planned and steady_step(self.cells, req, dry=False):
            self.commit_cells(self.cells)
        elif not self._place(req):  # (placed anew from the current cells)
            raise BatchError(
                "apply: the planned ubatch no longer fits (memory changed after init_batch)"
            )
        head, n = self.head, self.n
        self.rows_touched(head + n)  # (the graph writes cells [head, head + n), any plane)
        return s_copy_rows(self.cells, head, n, self.n_rs_seq, consume=True)

    def _place(self, req: SlotRequest) -> bool:
        cells = self.cells.copy()
        if not find_slot(cells, req):
            return False
        self.commit_cells(cells)
        return True

    # -- sequence operations -----------------------------------------------------------
    def clear(self, data: bool = True) -> None:
        """Empty every cell (``src0`` is kept, as in the reference); zero R/S if ``data``."""
        self.check_open()
        if data:
            self.check_devices()
        c = self.cells
        c.pos[:] = -1
        c.src[:] = -1
        c.tail[:] = -1
        c.head = 0
        c.used = 0
        c.rs_idx[:] = 0
        c.n_last[:] = 0
        if data:
            self.zero_rows()
        self._version += 1

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove ``[p0, p1)`` of ``seq_id``; see the module notes for the exact results.

        A recurrent state cannot lose its last tokens, except through a rollback plane:
        with ``0 < p0 <= pos < p1``, ``pos - (p0 - 1) <= n_rs_seq`` and no rollback
        pending, the sequence goes back to ``p0 - 1`` (True); any other cut of the tail
        is False with nothing changed. ``seq_id < 0`` is always False (reference quirk).
        """
        if self._closed:
            self.check_open()  # raises
        self._version += 1
        # clamp_range and check_open's call inlined: 0.64 -> 0.47 us a call, measured, and a
        # hybrid's refused tail cut (its recurrent part first) is held to llama.cpp's time;
        # plain ints skip int() (another 0.05 us)
        if type(seq_id) is not int:
            seq_id = int(seq_id)
        if p0 < 0:
            p0 = 0
        elif type(p0) is not int:
            p0 = int(p0)
        if p1 < 0:
            p1 = POS_MAX
        elif type(p1) is not int:
            p1 = int(p1)
        return seq_rm_cells(self.cells, self.n_seq_max, self.n_rs_seq, seq_id, p0, p1)

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
        c.n_last[dst] = c.n_last[src]  # the shared cell's snapshot planes
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
        if type(seq_id) is not int:
            seq_id = int(seq_id)
        if not 0 <= seq_id < self._n_fast_ids:
            self.check_open()  # a closed memory raises; an id outside the cells has none
            return -1
        tail, pos = self.position_views  # (plain ints, no numpy scalars: a hot query)
        t: int = tail[seq_id]
        return pos[t] if t >= 0 else -1

    def seq_pos_max(self, seq_id: int) -> int:
        """The position of ``seq_id``'s state, never below -1.

        The reference's maximum starts at -1, so a negative position reads as -1 here while
        :meth:`seq_pos_min` reports it: after ``seq_add(s, -1, -1, -100)`` on a state at
        position 9 the pair is ``(-91, -1)``, and the next batch for ``s`` starts at 0.
        """
        pos = self.seq_pos_min(seq_id)
        return pos if pos > -1 else -1

    def frozen_ids_c(self, seq_ids: np.ndarray) -> Any | None:
        """The C buffer of ``seq_ids`` (int64) when it is the frozen id array, every id
        naming a cell, that a previous :meth:`seq_pos_min_of` memoised (a decode step's
        allocator layout) and the native kernels are in use; None otherwise."""
        self.check_open()
        memo = self._ids_in_range
        if not rcells.USE_NATIVE or memo is None or memo[0] is not seq_ids:
            return None
        return memo[2]

    def seq_pos_min_of(self, seq_ids: np.ndarray) -> np.ndarray:
        """:meth:`seq_pos_min` of each of ``seq_ids`` (int64).

        E.g. size 4, tails [2, -1, ...], pos[2] = 9; ids [0, 1, 7] -> [9, -1, -1].
        """
        self.check_open()
        memo = self._ids_in_range
        if memo is not None and seq_ids is memo[0]:
            ids, inside = memo[1], True  # the allocator's frozen layout ids: checked once
            if rcells.USE_NATIVE:  # one native gather (pm_step_rs_pos), same values
                c = self.cells
                tail, pos = c.c_buffers()[:2]
                out = np.empty(ids.size, dtype=np.int64)
                status = lib.pm_step_rs_pos(
                    tail, pos, c.size, memo[2], ids.size,
                    ffi.from_buffer("int64_t[]", out, require_writable=True),
                )  # fmt: skip
                if status != lib.PM_OK:
                    check(status, f"pm_step_rs_pos ({ids.size} ids, {c.size} cells)")
                return out
        else:
            ids = np.asarray(seq_ids).astype(np.int64, copy=False)
            inside = bool(ids.size) and int(ids.min()) >= 0 and int(ids.max()) < self.size
            if (
                inside
                and isinstance(seq_ids, np.ndarray)
                and not seq_ids.flags.writeable
                and seq_ids.base is None
            ):
                # frozen, owns its data: keep the int64 copy
                self._ids_in_range = (seq_ids, ids, ffi.from_buffer("int64_t[]", ids))
        if inside:
            # every id names a cell's tail (a decode step's batch): gathers, no selection;
            # a missing tail (-1) reads the last cell, masked out. E.g. tails [2, -1] -> [9, -1]
            # (take: measured ~3 us cheaper than fancy indexing right after a model step)
            t = self.cells.tail.take(ids)
            out = self.cells.pos.take(t).astype(np.int64)
            missing = t < 0
            if missing.any():
                out[missing] = -1
            return out
        out = np.full(ids.shape, -1, dtype=np.int64)
        sel = np.flatnonzero((ids >= 0) & (ids < self.size))
        t = self.cells.tail[ids[sel]]
        has = t >= 0
        out[sel[has]] = self.cells.pos[t[has]]
        return out

    def seq_pos_max_of(self, seq_ids: np.ndarray) -> np.ndarray:
        """:meth:`seq_pos_max` of each of ``seq_ids`` (int64): never below -1."""
        out = self.seq_pos_min_of(seq_ids)  # a fresh array: clamped in place
        return np.maximum(out, -1, out=out)

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
        for store in self._stores:
            store.close()
        self._closed = True
        self._n_fast_ids = 0

    # -- state ----------------------------------------------------------------------------
    def _check_seq_arg(self, seq_id: int, what: str) -> int:
        seq_id = int(seq_id)
        if seq_id < -1:
            raise RangeError(f"{what}: seq_id must be -1 (all) or >= 0, got {seq_id}")
        return seq_id

    def _native_rows(self) -> SeqRows | None:
        """The one-call R/S rows writer and reader (host tensors), built on first use."""
        if self._seq_rows is False:
            self._seq_rows = seq_rows(self._state_layers)
        return self._seq_rows

    def seq_writer(self, seq_id: int, flags: int) -> SeqWriter | None:
        """One sequence's section (``seq_id`` -1: the whole memory's), sized up front and
        written in one pass into the caller's view; the fill refuses a memory changed
        since the sizing (its size no longer holds)."""
        self.check_open()
        seq_id = self._check_seq_arg(seq_id, "state_write")
        check_state_flags(flags, "state_write")
        native = self._native_rows()
        sized: SeqWriter
        if seq_id == -1:  # the whole memory: one native call to size, one to write
            whole = None if native is None else native.whole(self.cells, self.n_rs_seq)
            if whole is None:
                return None
            sized = whole
        else:
            cell, row = seq_cell_row(self.cells, seq_id, self.n_rs_seq)
            size = seq_section_size(self._state_layers, cell >= 0)

            def fill_seq(view: memoryview) -> int:
                if native is not None:
                    return native.write(view, self.cells, cell, row)
                writer = BufferWriter(size, view)
                write_state(writer, self.cells, self._state_layers, self.n_rs_seq, seq_id)
                return writer.n_written

            sized = (size, fill_seq)
        version = self._version

        def fill(view: memoryview) -> int:
            if self._version != version:
                raise StateError("state_write: the memory changed between sizing and writing")
            return sized[1](view)

        return sized[0], fill

    def seq_reader(self, seq_id: int, flags: int) -> SeqReader | None:
        """A composite's part of a one-sequence restore as a native check and store (see
        :meth:`TwoPhaseStateIO.seq_reader`): the section's seq_rm and placement checked on
        a copy of the cells in one native call (:meth:`SeqRows.restore_seq`), then its
        rows stored and the copy made the memory's cells. None where the general parse
        runs: a closed memory, tensors outside host memory, ``seq_id`` outside
        ``[0, min(n_seq_max, size))``."""
        native = None if self._closed else self._native_rows()
        if native is not None and type(seq_id) is int and seq_id == -1:
            return self._whole_reader(native)
        if (
            native is None
            or type(seq_id) is not int
            or not 0 <= seq_id < min(self.n_seq_max, self.size)
        ):
            return None

        def check(
            view: memoryview,
        ) -> tuple[int, Callable[[], None], Callable[[], bool]] | None:
            placed = native.restore_seq(view, self.cells, seq_id)
            if placed is None:
                return None
            cells, taken, cell, rows_at = placed
            rows, n_rows = view[rows_at:taken], int(cell >= 0)

            def apply() -> None:  # (while the copy still starts from the memory's cells)
                native.walk(rows, n_rows, cells.head, store=True)
                self.commit_cells(cells)

            return stamped_store(taken, lambda: self._version, apply)

        return check

    def whole_part(self) -> _RecurrentWholePart | None:
        """This memory's part of a composite's whole read in one native call (see
        :meth:`TwoPhaseStateIO.whole_part`): :meth:`_whole_reader`'s check and store. None
        for a closed memory or tensors outside host memory."""
        native = None if self._closed else self._native_rows()
        return None if native is None else _RecurrentWholePart(self, native)

    def _whole_reader(self, native: SeqRows) -> SeqReader:
        """The whole memory's restore as a native check and store (:meth:`seq_reader` for
        ``seq_id`` -1): :meth:`SeqRows.read_whole` checks the section, then stores its rows
        (zeroing every row after them) and the cells it describes become the memory's
        (:func:`parse_state`'s native road, with no plan)."""
        size, limit = self.size, min(self.n_seq_max, self.size)

        def check(
            view: memoryview,
        ) -> tuple[int, Callable[[], None], Callable[[], bool]] | None:
            found = native.read_whole(view, size, limit, False)
            if found is None:
                return None
            taken, pos, tail = found

            def apply() -> None:
                cells = whole_cells(self.cells, pos, tail)
                if native.read_whole(view[:taken], size, limit, True) is None:
                    raise StateError(BLOB_CHANGED)  # (checked just before: cannot fail)
                self.commit_cells(cells)

            return stamped_store(taken, lambda: self._version, apply)

        return check

    def state_write_into(self, writer: StateWriter, seq_id: int = -1, flags: int = 0) -> None:
        """Serialise (whole memory for ``seq_id == -1``, else one sequence) into ``writer``.

        Layout (section b.3, :mod:`pymem.recurrent.state_io`): ``u32 cell_count``, META per
        cell, then DATA (always): ``u32 s_trans = 0``, ``u32 n_layer`` (all trunk layers),
        per R layer ``i32 type, u64 row_size, rows``, then per S layer the same.
        ``PARTIAL_ONLY`` changes nothing here: recurrent state is the partial part.
        """
        self.check_open()
        seq_id = self._check_seq_arg(seq_id, "state_write")
        check_state_flags(flags, "state_write")
        write_state(
            writer, self.cells, self._state_layers, self.n_rs_seq, seq_id, self._native_rows()
        )

    def state_read_parse(
        self, reader: StateReader, seq_id: int = -1, flags: int = 0
    ) -> RecurrentReadPlan:
        """Parse and validate one recurrent state section; change nothing.

        Returns a plan whose ``commit()`` applies it (new cells, tensor rows, and for a
        whole-memory restore the zeroing of every R/S byte, as the reference's
        ``clear(true)``). Raises :class:`~pymem.errors.StateError` on any problem in the blob.

        Whole (``seq_id == -1``): cells are restored to ``[0, cell_count)`` with their
        sequence sets, ``head = 0``, ``used = cell_count``. Per sequence: the destination
        is emptied, the (one) cell is placed by ``find_slot`` as a one-token ubatch, and
        its rows are read at ``head``. Restored cells get ``src = self``; rollback
        indices reset.
        """
        self.check_open()
        seq_id = self._check_seq_arg(seq_id, "state_read")
        check_state_flags(flags, "state_read")
        if seq_id != -1 and seq_id >= min(self.size, self.n_seq_max):
            raise RangeError(
                f"state_read: seq_id {seq_id} must be < n_seq_max ({self.n_seq_max}) and < mem_size ({self.size})"
            )
        # a whole restore zeroes what its rows [0, cell_count) do not overwrite (zero_from,
        # unless its writes do)
        cells, writes, zero_from = parse_state(
            reader, self.cells, self._state_layers, self.n_seq_max, self.n_rs_seq, seq_id,
            self._native_rows(),
        )  # fmt: skip
        return RecurrentReadPlan(self, cells, writes, zero_from=zero_from, version=self._version)


class _RecurrentWholePart:
    """A recurrent memory's :class:`~pymem.state.WholePart`: its rows' tensors and the
    scratch the check fills with the cells' positions and the sequences' cells."""

    def __init__(self, memory: RecurrentMemory, native: SeqRows) -> None:
        self._memory = memory
        self._native = native
        self._pos = np.empty(memory.size, dtype=np.int32)
        self._tail = np.empty(memory.size, dtype=np.int32)
        self._keep: list[object] = []
        self._cells: RecurrentCells | None = None  # whose arrays rs_cell_* point into
        self._cell_ptrs: list[object] = []
        n = memory.cells.rs_idx.size
        self._scratch = [np.empty(memory.size, np.int32) for _ in range(4)] + [
            np.empty(n, np.uint32) for _ in range(2)
        ]

    def fill(self, part: Any) -> None:
        memory = self._memory
        pos = ffi.from_buffer("int32_t[]", self._pos, require_writable=True)
        tail = ffi.from_buffer("int32_t[]", self._tail, require_writable=True)
        self._keep = [pos, tail]
        part.kv = ffi.NULL
        part.rs_size = memory.size
        part.rs_limit = min(memory.n_seq_max, memory.size)
        self._native.fill_whole_part(part)
        part.rs_pos = pos
        part.rs_tail = tail
        part.rs_n_rs_seq = memory.n_rs_seq
        scratch = [
            ffi.from_buffer(
                "int32_t[]" if a.dtype == np.int32 else "uint32_t[]", a, require_writable=True
            )
            for a in self._scratch
        ]
        self._keep.extend(scratch)
        (part.rs_scr_pos, part.rs_scr_src, part.rs_scr_src0, part.rs_scr_tail, part.rs_scr_rs_idx,
         part.rs_scr_n_last) = scratch  # fmt: skip
        part.rs_n_seq_arrays = self._scratch[4].size
        self._cells = None  # (the cells' fields: at the first ready)

    def ready(self, part: Any) -> bool:
        memory = self._memory
        if memory._closed:
            return False
        cells = memory.cells
        if cells is not self._cells:  # (a placement or a two-phase restore makes new cells)
            ptrs = [  # (a read's commit writes them)
                ffi.from_buffer(kind, a, require_writable=True)
                for kind, a in (
                    ("int32_t[]", cells.tail), ("int32_t[]", cells.pos), ("int32_t[]", cells.src),
                    ("uint32_t[]", cells.rs_idx), ("int32_t[]", cells.src0),
                    ("uint32_t[]", cells.n_last),
                )
            ]  # fmt: skip
            (part.rs_cell_tail, part.rs_cell_pos, part.rs_cell_src, part.rs_cell_rs_idx,
             part.rs_cell_src0, part.rs_cell_n_last) = ptrs  # fmt: skip
            self._cells, self._cell_ptrs = cells, ptrs
        return True

    def commit(self, part: Any) -> None:
        """The native read wrote the restored cells (``whole_cells`` of the scratch is the
        reference) into the memory's own arrays: the same object, its scalars set here and
        its version bumped, so the next call's :meth:`ready` keeps its six pointers (new
        cells cost six arrays, six pointers and their numpy calls: microseconds of a whole
        read once a decode step has evicted the caches)."""
        memory = self._memory
        cells = memory.cells
        cells.head, cells.used, cells.steady = 0, int(part.n_cells), None  # (n, rs_z kept)
        memory.commit_cells(cells)

    def for_sequence(self, part: Any, seq_id: int) -> None:
        pass

    def read_sequence(self, part: Any, seq_id: int) -> bool:
        c = self._memory.cells
        part.rs_scalars = [c.head, c.used, c.n, c.rs_z]
        return True

    def sequence_read(self, part: Any) -> None:
        """The native restore copied its restored copy into the memory's own cells (the
        same object and arrays, as a sequence op leaves them): its scalars set here, its
        version bumped, so the next call's :meth:`ready` keeps its pointers."""
        memory = self._memory
        cells = memory.cells
        if part.rs_cell >= 0:
            cells.steady = None
            memory.rows_touched(int(part.rs_cell) + 1, planes=False)  # (its rows: plane 0)
        s = part.rs_scalars
        cells.head, cells.used, cells.n, cells.rs_z = int(s[0]), int(s[1]), int(s[2]), int(s[3])
        memory.commit_cells(cells)

    def written(self) -> None:
        pass
