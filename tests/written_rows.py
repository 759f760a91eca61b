"""Replay hooks that copy the reference's rows only into the cells the ubatches wrote.

tests/replay.py plays the graph's part by copying the reference's rows into *every*
filled cell after a decode, which hides whatever pymem did to the other rows. With
:class:`WrittenRows` the rows go only where pymem's contexts say the graph writes: a KV
cache's slot cells of each stream (``sinfo.idxs``), a recurrent memory's ``[head, head +
n_rs)`` of each ubatch (an empty cell in that range receives the zero state, as the
reference's kernels leave it). Every other row in the later blobs (cells the batch did
not touch, rows pymem copied between streams at the update, rows restored from blobs) is
pymem's own and must equal the reference byte for byte.

The hooks also run an invariant checker after every step, and try a restore that the
reference failed on its own first: pymem must refuse it without changing any part's
cell metadata (the generic replay then checks the state bytes and re-enacts the
reference's side effects).

Runs with recurrent rollback planes (``n_rs_seq`` > 0) are not supported: their
snapshot rows come from kernels no blob shows (tests/replay.py syncs them itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from kv_helpers import fill_rows_from_part, parse_kv_part
from replay import (
    ReplayHooks,
    ReplayReport,
    Run,
    _parse_rs_part,
    parts,
    replay,
    strip_seq,
    strip_whole,
)

from pymem.errors import StateError
from pymem.hybrid import HybridContext
from pymem.kv import KVCache
from pymem.kv.iswa import KVCacheISWAContext
from pymem.memory import Memory, MemoryContext
from pymem.recurrent import RecurrentMemory, RecurrentMemoryContext
from pymem.ubatch import UBatch

Written = list[dict[int, set[int]]]
"""Per part (in :func:`replay.parts` order): stream -> cells written (recurrent: stream 0)."""


def written_cells(ctx: MemoryContext) -> Written:
    """The cells the graph of the context's current ubatch writes, per part."""
    if isinstance(ctx, HybridContext):
        return written_cells(ctx.get_attn()) + written_cells(ctx.get_recr())
    if isinstance(ctx, KVCacheISWAContext):
        return written_cells(ctx.get_base()) + written_cells(ctx.get_swa())
    if isinstance(ctx, RecurrentMemoryContext):
        return [{0: set(range(ctx.get_head(), ctx.get_head() + ctx.get_n_rs()))}]
    sinfo = ctx.get_sinfo()  # type: ignore[attr-defined]
    return [{int(strm): set(sinfo.idxs[j].tolist()) for j, strm in enumerate(sinfo.strm)}]


def write_reference_rows(mem: Memory, written: Written, ref: bytes) -> None:
    """Copy the rows of the ``written`` cells from the reference's whole-state part ``ref``.

    The reference lists each stream's cells in ascending order, and its cells are pymem's
    (tests/replay.py checks that after every decode), so a cell's rank among the filled
    cells of its stream is its index in the blob.
    """
    off = 0
    for i, (kind, part) in enumerate(parts(mem)):
        cells = written[i] if i < len(written) else {}
        if kind == "kv":
            kv: KVCache = part
            kvp = parse_kv_part(ref, len(kv.layers), kv.has_cell_ext(), offset=off)
            for strm, idx in cells.items():
                filled = np.flatnonzero(kv.v_cells[strm].pos >= 0)
                # E.g. written {3, 4, 9}, filled [0, 3, 4, 5] -> cells [3, 4] at ranks [1, 2]
                idx_filled = np.intersect1d(np.fromiter(idx, dtype=np.int64), filled)
                if idx_filled.size:
                    rank = np.searchsorted(filled, idx_filled)
                    fill_rows_from_part(kv, kvp, strm, idx_filled, rank)
            off = kvp.end
            continue
        rec: RecurrentMemory = part
        r0, s0 = rec.get_r_l(rec.layers[0]), rec.get_s_l(rec.layers[0])
        _, r_rows, s_rows, off = _parse_rs_part(
            ref, off, rec.spec.n_layer, len(rec.layers), r0.row_size, s0.row_size
        )
        filled = np.flatnonzero(rec.cells.seq_counts())
        idx = np.array(sorted(cells.get(0, ())), dtype=np.int64)
        in_use = np.isin(idx, filled)
        rank = np.searchsorted(filled, idx[in_use])
        for k, il in enumerate(rec.layers):
            for t, rows in ((rec.get_r_l(il), r_rows[k]), (rec.get_s_l(il), s_rows[k])):
                if not t.nbytes:
                    continue
                if in_use.any():
                    t.write_rows(idx[in_use], rows[rank])
                if not in_use.all():
                    t.fill_rows(idx[~in_use], 0)  # an empty cell in range: the zero state


def _fields(obj: Any) -> dict[str, Any]:
    """The public attributes of a cells object (``__slots__`` or ``__dict__``), copied."""
    names = getattr(type(obj), "__slots__", None) or list(vars(obj))
    out = {}
    for name in names:
        if not name.startswith("_"):
            value = getattr(obj, name)
            out[name] = value.copy() if isinstance(value, np.ndarray) else value
    return out


def cell_metadata(mem: Memory) -> list[Any]:
    """Every part's cell metadata (positions, sequence sets, shifts, tails, heads, ...)."""
    out: list[Any] = []
    for kind, part in parts(mem):
        if kind == "kv":
            out.append([_fields(c) for c in part.v_cells])
            out.append((list(part.v_heads), part.seq_to_stream.copy()))
        else:
            out.append(_fields(part.cells))
    return out


def assert_same_metadata(got: Any, want: Any, where: str) -> None:
    if isinstance(want, np.ndarray):
        assert np.array_equal(got, want), f"{where}: changed"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: fields"
        for name in want:
            assert_same_metadata(got[name], want[name], f"{where}.{name}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_metadata(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


class WrittenRows(ReplayHooks):
    """:func:`replay.replay` hooks (see the module docstring).

    ``check(mem)`` runs after every step's operation. :attr:`decodes` counts the decodes
    whose rows were played, :attr:`refused` the failed restores checked.
    """

    def __init__(self, run: Run, check: Callable[[Memory], None] | None = None) -> None:
        self.run = run
        self.check = check
        self.written: Written = []
        self.decodes = 0
        self.refused = 0

    def forward(self, mctx: MemoryContext, ubatch: UBatch) -> None:
        for i, cells in enumerate(written_cells(mctx)):
            if i == len(self.written):
                self.written.append({})
            for strm, idx in cells.items():
                self.written[i].setdefault(strm, set()).update(idx)

    def before_op(self, step: dict[str, Any], mem: Memory, where: str) -> None:
        self.written = []
        if step["op"] in ("state_seq_set", "state_set") and step["result"] == 0:
            self.refuse_unchanged(step, mem, where)

    def after_op(self, step: dict[str, Any], mem: Memory, result: Any, where: str) -> None:
        assert not any(kind == "rs" and p.n_rs_seq > 0 for kind, p in parts(mem)), (
            f"{where}: rollback planes are not supported here"
        )
        if step["op"] == "decode" and result == 0 and "state" in step:
            ref = strip_whole(self.run.blob(step["state"]), self.run.arch)
            write_reference_rows(mem, self.written, ref)
            self.decodes += 1
        if self.check is not None:
            self.check(mem)

    def refuse_unchanged(self, step: dict[str, Any], mem: Memory, where: str) -> None:
        """The restore the reference failed: pymem refuses it and no cell metadata moves."""
        before = cell_metadata(mem)
        with pytest.raises(StateError):
            if step["op"] == "state_seq_set":
                data = strip_seq(self.run.blob(step["blob"]))
                mem.state_read(data, step["seq"], int(step.get("flags", 0)))
            else:
                mem.state_read(strip_whole(self.run.blob(step["blob"]), self.run.arch))
        assert_same_metadata(cell_metadata(mem), before, f"{where}: a refused restore, cells")
        self.refused += 1


def replay_written(run: Run, mem: Memory, hooks: WrittenRows) -> ReplayReport:
    """:func:`replay.replay` with ``hooks``; the memory is closed afterwards (also on failure)."""
    try:
        return replay(run, mem, hooks)
    finally:
        mem.close()
