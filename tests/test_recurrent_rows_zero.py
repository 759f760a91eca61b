"""A recurrent memory's whole restore zeroes every plane's R/S rows of the cells past its
own, as the reference's clear(true) leaves them, but only below ``RecurrentMemory.rows_hi``
(plane 0's bound, the rollback planes' bound): the rows of the cells from them on are zero
already. Pins the bound on the three
roads (the native reader, the plan's, a composite's pm_whole_read): rows a graph may have
written below it are zeroed and the tensors end as a restore into a zeroed memory leaves
them; the zeroing stops at the bound; what may write rows raises it (a placement, a
context's views and inputs, a one-sequence store), a write through the tensors' own API
lifts it to every cell, clear(True) puts it back to 0."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from recurrent_helpers import check_rows_past_zero
from state_files import decode
from test_hybrid import make_hybrid
from test_iswa import tensors
from test_recurrent import make_rec, ub

from pymem.recurrent import RecurrentMemory


def _planes(rec: RecurrentMemory, t: Any) -> np.ndarray:
    """``uint8[planes, size, row]``: every plane's rows of an R/S tensor (host)."""
    return t.host_view().view(np.uint8).reshape(-1, rec.size, t.row_size)


def _graph_rows(rec: RecurrentMemory, value: int) -> None:
    """Bytes ``value`` in each plane's rows of the cells below its bound: whatever a graph
    may have written there (through the tensors' memory, not their API)."""
    hi0, hi_planes = (int(h) for h in rec.rows_hi)
    for t in tensors(rec):
        _planes(rec, t)[0, :hi0] = value
        _planes(rec, t)[1:, :hi_planes] = value


def _decoded(mem: Any, per_seq: list[int]) -> None:
    """Sequence s decoded to per_seq[s] tokens, in one-token steps of every sequence."""
    for step in range(max(per_seq)):
        items = [[1 + s, step, [s], False] for s, n in enumerate(per_seq) if step < n]
        decode(mem, items)


def _recurrent(mem: Any) -> RecurrentMemory:
    return mem if isinstance(mem, RecurrentMemory) else mem.parts()["recurrent"]


def _make(kind: str, n_rs_seq: int) -> Any:
    if kind == "hybrid":
        return make_hybrid("RAR", n_seq_max=6, n_rs_seq=n_rs_seq)
    return make_rec(n_seq=6, n_rs_seq=n_rs_seq)


@pytest.mark.parametrize("n_rs_seq", [0, 2])
@pytest.mark.parametrize("road", ["native", "plan", "composite"])
def test_a_whole_read_zeroes_the_rows_below_the_bound(
    monkeypatch, road: str, n_rs_seq: int
) -> None:
    """Four sequences placed and their rows written (every plane), three removed: a whole
    restore of a one-sequence memory leaves the tensors a restore into a zeroed memory
    leaves, every plane's rows past its cell zero, and (native roads) the bound at its
    cells."""
    kind = "hybrid" if road == "composite" else "recurrent"
    mem = _make(kind, n_rs_seq)
    _decoded(mem, [3, 2, 4, 1])
    rec = _recurrent(mem)
    assert rec.rows_hi.tolist() == [4] * 2
    _graph_rows(rec, 0x5A)
    for s in range(1, 4):
        mem.seq_rm(s, -1, -1)
    donor = _make(kind, n_rs_seq)
    _decoded(donor, [2])
    _graph_rows(_recurrent(donor), 0x21)
    blob = bytes(donor.state_write())
    ref = _make(kind, n_rs_seq)
    with monkeypatch.context() as m:
        if road == "plan":
            m.setattr(RecurrentMemory, "_native_rows", lambda self: None)
        assert mem.state_read(blob) == len(blob)
        ref.clear(True)
        assert ref.state_read(blob) == len(blob)
    check_rows_past_zero(rec)
    got = [_planes(rec, t).tobytes() for t in tensors(rec)]
    want = [_planes(_recurrent(ref), t).tobytes() for t in tensors(_recurrent(ref))]
    assert got == want
    assert rec.rows_hi.tolist() == [1, 0]  # (the plan's rows too: written unreported)
    for m_ in (mem, donor, ref):
        m_.close()


@pytest.mark.parametrize("road", ["native", "composite"])
def test_the_zeroing_stops_at_the_bound(road: str) -> None:
    """A byte put past the bound behind the memory's back survives a whole restore; one
    below it (past the blob's cells) does not. After it the rollback planes' bound is 0:
    the next whole restore leaves them alone."""
    kind = "hybrid" if road == "composite" else "recurrent"
    mem = _make(kind, 1)
    _decoded(mem, [2, 2, 2])
    rec = _recurrent(mem)
    assert rec.rows_hi.tolist() == [3] * 2
    donor = _make(kind, 1)
    _decoded(donor, [1])
    blob = bytes(donor.state_write())
    t = rec.get_s_l(rec.layers[0])
    _planes(rec, t)[1, 5] = 9  # plane 1, cell 5: past the bound
    _planes(rec, t)[1, 2] = 9  # plane 1, cell 2: below it
    _planes(rec, t)[0, 2] = 9  # plane 0, cell 2: past the blob's one cell
    assert mem.state_read(blob) == len(blob)
    assert (_planes(rec, t)[1, 5] == 9).all()
    assert not _planes(rec, t)[1, 2].any() and not _planes(rec, t)[0, 2].any()
    assert rec.rows_hi.tolist() == [1, 0]
    _planes(rec, t)[1, 0] = 7  # plane 1, cell 0: past the planes' bound now
    assert mem.state_read(blob) == len(blob)
    assert (_planes(rec, t)[1, 0] == 7).all()
    mem.close()
    donor.close()


def test_what_may_write_rows_raises_the_bound() -> None:
    """A placement (find_slot, a context's apply), a context's views and graph inputs and a
    one-sequence store raise the bound to the cells they write; a write through an R/S
    tensor's API lifts it to every cell, zeros aside; clear(True) and zero_rows set it."""
    rec = make_rec(n_seq=6, n_rs_seq=1)
    assert rec.rows_hi.tolist() == [0] * 2
    _decoded(rec, [1, 1])  # (context apply)
    assert rec.rows_hi.tolist() == [2] * 2
    ctx = rec.init_full()
    ctx.graph_inputs()
    assert rec.rows_hi.tolist() == [rec.size] * 2
    rec.clear(True)
    assert rec.rows_hi.tolist() == [0] * 2
    rec.init_full().s_view(rec.layers[0])  # (a view of the rows its graph writes)
    assert rec.rows_hi.tolist() == [rec.size] * 2
    rec.clear(True)
    assert rec.find_slot(ub((0, 0), (1, 0), (2, 0)))
    assert rec.rows_hi.tolist() == [3] * 2
    rec.clear(True)
    donor = make_rec(n_seq=6, n_rs_seq=1)
    _decoded(donor, [1, 1, 1, 1])
    blob = bytes(donor.state_write(3))
    assert rec.state_read(blob, 3) == len(blob)  # (the native one-sequence store)
    assert rec.rows_hi.tolist() == [int(rec.cells.tail[3]) + 1, 0]  # (plane 0 alone)
    check_rows_past_zero(rec)
    t = rec.get_r_l(rec.layers[0])
    for write, lifts in (
        (lambda: t.fill_row_range(0, 2, 0), False),
        (lambda: t.host_view(), False),
        (lambda: t.write_rows([1], b"\x03" * t.row_size), True),
        (lambda: t.numpy(), True),
    ):
        rec.clear(True)
        write()
        assert rec.rows_hi.tolist() == [rec.size if lifts else 0] * 2
    rec.rows_hi[:] = (4, 1)  # (plane 0's rows of cells 0-3, the planes' of cell 0 may hold bytes)
    planes = _planes(rec, rec.get_r_l(rec.layers[0]))
    planes[1, 2] = 7  # (past the planes' bound: left alone)
    planes[0, 3] = 7  # (below plane 0's: zeroed)
    rec.zero_rows(2)
    assert rec.rows_hi.tolist() == [2, 0]
    assert (planes[1, 2] == 7).all() and not planes[0, 3].any()
    planes[1, 2] = 0
    check_rows_past_zero(rec)
    rec.close()
    donor.close()


def test_the_plan_roads_one_sequence_store_raises_plane_0s_bound(monkeypatch) -> None:
    """Without the native rows (a device memory's road) a one-sequence store writes its
    cell's rows through the tensors' API: it raises plane 0's bound to that cell, as the
    native store does, instead of lifting both to every cell."""
    rec, donor = make_rec(n_seq=6, n_rs_seq=1), make_rec(n_seq=6, n_rs_seq=1)
    _decoded(donor, [1, 1, 1, 1])
    _graph_rows(donor, 0x33)
    blob = bytes(donor.state_write(3))
    rec.clear(True)
    monkeypatch.setattr(RecurrentMemory, "_native_rows", lambda self: None)
    assert rec.state_read(blob, 3) == len(blob)
    cell = int(rec.cells.tail[3])
    assert cell >= 0 and rec.rows_hi.tolist() == [cell + 1, 0]
    assert _planes(rec, rec.get_s_l(rec.layers[0]))[0, cell].any()
    check_rows_past_zero(rec)
    rec.close()
    donor.close()


def test_a_hybrid_one_sequence_read_raises_the_bound() -> None:
    """pm_seq_read's recurrent part stores its cell's rows: the bound covers that cell."""
    mem, donor = make_hybrid("RAR", n_seq_max=6), make_hybrid("RAR", n_seq_max=6)
    _decoded(donor, [1, 1, 1, 2])
    blob = bytes(donor.state_write(3))
    rec = _recurrent(mem)
    mem.clear(True)
    assert mem.state_read(blob, 3) == len(blob)
    cell = int(rec.cells.tail[3])
    assert cell >= 0 and rec.rows_hi.tolist() == [cell + 1, 0]
    check_rows_past_zero(rec)
    mem.close()
    donor.close()
