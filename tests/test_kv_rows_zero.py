"""A whole restore zeroes the K/V rows past the blob's cells, as the reference's
clear(true) leaves them, but only below ``StackedCells.rows_bound``: the rows past the last
cell any cell held since they were last zeroed are zero already. Pins that bound on both
roads (the one-call native commit and the plan's, and a composite's pm_whole_read): the
rows a graph wrote into cells that were emptied since are zeroed; a restore leaves the
tensors a restore into a fully zeroed cache leaves; the zeroing stops at the bound; every
write through a K/V tensor's own API that may put bytes anywhere lifts the bound to the
whole cache, and zeros do not."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from kv_helpers import check_invariants, check_rows_past_zero, decode
from test_kv_state import CFGS, build
from test_kv_state_same import NAMES, _state
from test_seq_reader import _memory

from pymem.errors import RangeError
from pymem.kv import KVCache, state_io, state_rows
from pymem.kv.state_rows import rows_view, v_trans_view

N_CELLS = 64


def _graph_writes(kv: KVCache, value: int) -> None:
    """Bytes ``value`` into the K/V rows of every cell in use, as a graph writes them at
    the cells' indices (through the tensors' memory, not their API)."""
    for s, cells in enumerate(kv.v_cells):
        idx = np.flatnonzero(cells.pos >= 0)
        for lay in kv.layers:
            rows_view(lay.k).reshape(kv.n_stream, kv.kv_size, -1)[s, idx] = value  # type: ignore[union-attr]
            if lay.v is None:
                continue
            if kv.layout.v_trans:
                v_trans_view(kv.layout, lay, s)[:, idx] = value  # type: ignore[index]
            else:
                rows_view(lay.v).reshape(kv.n_stream, kv.kv_size, -1)[s, idx] = value  # type: ignore[union-attr]


def _filled(name: str, per_seq: int) -> KVCache:
    """Three sequences of ``per_seq`` tokens decoded in interleaved chunks, their rows
    written as a graph writes them."""
    kv = build(CFGS[name], n_cells=N_CELLS, n_seq=3)
    for chunk in range(0, per_seq, 4):
        items = [
            [1, p, [s], False] for s in range(3) for p in range(chunk, min(chunk + 4, per_seq))
        ]
        decode(kv, items, n_ubatch=len(items))
        _graph_writes(kv, 0x3C)
    return kv


def _read(monkeypatch: pytest.MonkeyPatch, kv: KVCache, blob: bytes, reader: bool) -> None:
    with monkeypatch.context() as m:
        if not reader:
            m.setattr(KVCache, "_whole_reader", lambda self: None)
        assert kv.state_read(blob) == len(blob)


@pytest.mark.parametrize("reader", [True, False], ids=["one-call", "plan"])
@pytest.mark.parametrize("name", NAMES)
def test_a_whole_read_zeroes_the_rows_cells_held_and_no_others(
    monkeypatch, name: str, reader: bool
) -> None:
    """Cells written, then emptied (a tail seq_rm, a whole sequence's): a whole restore of
    a smaller blob leaves every row past its cells zero, the tensors and cells a restore
    into a fully zeroed cache leaves, and the bound at the blob's cells."""
    kv = _filled(name, 14)
    small = build(CFGS[name], n_cells=N_CELLS, n_seq=3)
    decode(small, [[1, p, [0], False] for p in range(5)], n_ubatch=5)
    blob = bytes(small.state_write())
    kv.seq_rm(1, 6, -1)  # (the last cells of each stream may go: used_max_p1 falls)
    kv.seq_rm(2, -1, -1)
    assert any(
        kv.cells.rows_bound(s) > kv.cells.used_max_p1_of(np.array([s]))[0]
        for s in range(kv.n_stream)
    )
    _read(monkeypatch, kv, blob, reader)
    check_invariants(kv)
    ref = build(CFGS[name], n_cells=N_CELLS, n_seq=3)
    ref.clear(True)
    _read(monkeypatch, ref, blob, reader)
    assert _state(kv) == _state(ref)
    for s in range(kv.n_stream):
        assert kv.cells.rows_bound(s) == int(kv.v_cells[s].used)


@pytest.mark.parametrize("reader", [True, False], ids=["one-call", "plan"])
@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans"])
def test_the_zeroing_stops_at_the_bound(monkeypatch, name: str, reader: bool) -> None:
    """A byte put past the bound behind the cache's back (through the tensor's memory) is
    not zeroed: the restore zeroes the rows below the bound alone. (The same byte below
    it is.)"""
    kv = _filled(name, 8)
    bound = kv.cells.rows_bound(0)
    assert 0 < bound < N_CELLS - 2
    small = build(CFGS[name], n_cells=N_CELLS, n_seq=3)
    decode(small, [[1, p, [0], False] for p in range(3)], n_ubatch=3)
    blob = bytes(small.state_write())
    k = rows_view(kv.layers[0].k)
    assert k is not None
    k[N_CELLS - 1] = 7  # past the bound
    k[bound - 1] = 7  # below it, past the blob's cells
    _read(monkeypatch, kv, blob, reader)
    assert (k[N_CELLS - 1] == 7).all()
    assert not k[bound - 1].any()
    assert kv.cells.rows_bound(0) == 3


def _writes(kv: KVCache) -> list[tuple[str, Any, bool]]:
    """(what, a write through the K/V tensors' API, whether it may put nonzero bytes)."""
    k, v = kv.layers[0].k, kv.layers[0].v
    row = k.row_size
    return [
        ("write_bytes", lambda: k.write_bytes(b"\x01" * row, row * 5), True),
        ("write_rows", lambda: k.write_rows([9], b"\x02" * row), True),
        ("fill_rows of zeros", lambda: k.fill_rows([9], 0), False),
        ("fill_rows", lambda: k.fill_rows([9], 3), True),
        ("fill_row_range of zeros", lambda: k.fill_row_range(2, 3, 0), False),
        ("fill_row_range", lambda: k.fill_row_range(2, 3, 4), True),
        ("copy_rows (its destination)", lambda: k.copy_rows([1], k, [40]), True),
        ("write_strided", lambda: v.write_strided(b"\x05" * 4, 0, 2, 64, 2), True),
        ("write_ranges", lambda: v.write_ranges(b"\x06" * 4, [0, 8], [2, 2]), True),
        ("write_runs", lambda: v.write_runs(b"\x07" * 4, 0, 1, 0, [0, 8], [2, 2]), True),
        ("copy_runs_from", lambda: v.copy_runs_from(k, 0, 16, 1, 0, [0], [4]), True),
        ("numpy (a writable view)", lambda: k.numpy(), True),
        ("host_view (pymem's own)", lambda: k.host_view(), False),
    ]


def test_tensor_writes_lift_the_bound_and_zeros_do_not() -> None:
    """A fresh cache's rows are zero (bound 0); each write through a K/V tensor's API that
    may put bytes anywhere lifts every stream's bound to the cache's size, and clear(True)
    puts it back to 0; zeros and pymem's own views leave it."""
    kv = build(CFGS["f16-trans-streams"], n_cells=N_CELLS, n_seq=3)
    k = kv.layers[0].k
    with pytest.raises(RangeError, match="2 source rows but 1 destination rows"):
        k.copy_rows([1, 2], k, [40])  # (refused before the owner is told of a write)
    for what, write, lifts in _writes(kv):
        assert [kv.cells.rows_bound(s) for s in range(kv.n_stream)] == [0] * kv.n_stream, what
        write()
        want = N_CELLS if lifts else 0
        assert [kv.cells.rows_bound(s) for s in range(kv.n_stream)] == [want] * kv.n_stream, what
        kv.clear(True)
        check_rows_past_zero(kv)


def _bound_after(lower: Any, name: str = "f32-notrans") -> tuple[int, int, int]:
    """(used_max_p1 before, after ``lower(kv)``, the bound after) on a cache filled to 54
    of its 64 cells (a seq_keep then drops most: numpy's rebuild)."""
    kv = _filled(name, 18)
    top = int(kv.cells.used_max_p1_of(np.array([0]))[0])
    lower(kv)
    low = int(kv.cells.used_max_p1_of(np.array([0]))[0])
    check_invariants(kv)
    return top, low, kv.cells.rows_bound(0)


def _tail_rm(kv: KVCache) -> None:
    for q in range(3):
        kv.seq_rm(q, 4, -1)


LOWERINGS = {
    "a recount after removals": _tail_rm,
    "a clear without data (native)": lambda kv: kv.clear(False),
    "the stack's reset (numpy)": lambda kv: kv.cells.reset(),
    "a stream's reset (numpy)": lambda kv: kv.v_cells[0].reset(),
    "seq_keep (numpy's rebuild)": lambda kv: kv.v_cells[0].seq_keep(0),
    "another stream's cells loaded": lambda kv: kv.v_cells.__setitem__(
        0, build(CFGS["f32-notrans"], n_cells=N_CELLS, n_seq=3).v_cells[0]
    ),
}


@pytest.mark.parametrize("what", list(LOWERINGS))
def test_lowering_used_max_p1_keeps_the_rows_it_covered(what: str) -> None:
    """Whatever lowers a stream's used_max_p1 raises rows_hi to it first, so the rows the
    emptied cells held stay inside the bound."""
    top, low, bound = _bound_after(LOWERINGS[what])
    assert low < top
    assert bound == top


@pytest.mark.parametrize("kind", ["hybrid", "iswa"])
def test_a_composite_whole_read_zeroes_below_the_bound(kind: str) -> None:
    """pm_whole_read's KV parts: rows a graph wrote into cells emptied since are zeroed by
    a whole restore of a smaller memory, and the bound lands at the blob's cells."""
    for seed in (2, 3):
        mem, donor = _memory(kind, seed), _memory(kind, seed + 20)
        kvs = [p for p in mem.parts().values() if isinstance(p, KVCache)]
        for kv in kvs:
            kv.clear(True)  # (_memory's random bytes lift the bound)
        donor_blob = bytes(donor.state_write())
        assert mem.state_read(donor_blob) == len(donor_blob)
        for kv in kvs:
            _graph_writes(kv, 0x11)
        for q in range(3):
            mem.seq_rm(q, 1, -1)
        small = _memory(kind, seed + 40)
        for q in (1, 2):
            small.seq_rm(q, -1, -1)
        blob = bytes(small.state_write())
        assert mem.state_read(blob) == len(blob)
        for kv in kvs:
            check_invariants(kv)
            for s in range(kv.n_stream):
                assert kv.cells.rows_bound(s) == int(kv.v_cells[s].used)
        for m in (mem, donor, small):
            m.close()


def test_a_stream_copy_keeps_the_bound_exact() -> None:
    """seq_cp across streams copies the source stream's cells now and its rows at the next
    update: the destination's bound becomes the source's (not the whole cache), and its
    rows are the source's."""
    kv = _filled("f16-trans-streams", 6)
    top = kv.cells.rows_bound(0)
    kv.seq_rm(0, 3, -1)  # (the source's bound stays above its cells: rows they held)
    assert int(kv.cells.used_max_p1_of(np.array([0]))[0]) < top < N_CELLS
    assert kv.cells.rows_bound(1) < N_CELLS
    kv.seq_cp(0, 1)
    kv.update(False)
    assert kv.cells.rows_bound(1) == top
    check_invariants(kv)
    for lay in kv.layers:
        for t in (lay.k, lay.v):
            rows = rows_view(t).reshape(kv.n_stream, kv.kv_size, -1)  # type: ignore[union-attr]
            assert (rows[1] == rows[0]).all()


@pytest.mark.parametrize("name", NAMES)
def test_the_numpy_and_device_roads_keep_the_bound(monkeypatch, name: str) -> None:
    """A one-sequence restore through the tensors' API (the numpy reference road, which a
    device cache takes) writes rows of cells it placed already: the bound stays at the
    cells, not lifted to the whole cache, and the rows are the native road's."""
    kvs = []
    for native in (True, False):
        kv = _filled(name, 6)
        blob = bytes(kv.state_write(1))
        kv.seq_rm(1, -1, -1)
        with monkeypatch.context() as m:
            m.setattr(state_io, "NATIVE_RUNS", native)
            assert kv.state_read(blob, 1) == len(blob)
        check_invariants(kv)
        for s in range(kv.n_stream):
            assert (
                kv.cells.rows_bound(s) == int(kv.cells.used_max_p1_of(np.array([s]))[0]) < N_CELLS
            )
        kvs.append(kv)
    assert _state(kvs[0]) == _state(kvs[1])
    k = kvs[1].layers[0].k
    k.write_rows([0], b"\x01" * k.row_size)  # (the tensors report again after the restore)
    assert kvs[1].cells.rows_bound(0) == N_CELLS


def test_zeroing_a_failed_restore_off_host_keeps_the_bound(monkeypatch) -> None:
    """state_clear of one sequence (a composite's undo) zeroes its transposed-V columns
    through the tensor's API where no host view exists (a device): zeros, not reported, so
    the bound stays."""
    kv = _filled("f16-trans", 6)
    bound = kv.cells.rows_bound(0)
    assert bound < N_CELLS
    monkeypatch.setattr(state_rows, "v_trans_view", lambda layout, layer, strm: None)
    kv.state_clear(1)
    monkeypatch.undo()
    assert kv.cells.rows_bound(0) == bound
    v = v_trans_view(kv.layout, kv.layers[0], 0)
    assert v is not None and not v[:, np.flatnonzero(kv.v_cells[0].pos < 0)].any()
    check_invariants(kv)
