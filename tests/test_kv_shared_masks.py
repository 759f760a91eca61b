"""Cells shared by several sequences, found by 32-cell masks of their bitsets
(``pm_bit_mask32``): the selection of a one-sequence write, the removal's unsharing and
the shared test a read asks first. Sequence ids in both halves of a bitset word (a word's
halves are compared apart) and shared cells at every place in a block, against the numpy
reference: the same blob bytes, cells and answers."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, decode
from test_kv_state import CFGS, build, randomize

import pymem.kv.cache as kv_cache
import pymem.kv.state_io as state_io
from pymem._native import lib
from pymem.kv.cells import OWNER_MULTI, StackedCells

N_SEQ = 64
IDS = (0, 5, 31, 32, 33, 47, 63)  # (the low half of a bitset word, then the high one)
N_CELLS = 200  # six whole blocks of 32 and a partial one


def _shared_memory(seed: int, name: str = "f16-trans"):
    """Short runs of IDS interleaved, then forks into other ids (whole and part ranges,
    across the halves), and random K/V bytes."""
    rng = np.random.default_rng(seed)
    kv = build(CFGS[name], n_cells=N_CELLS, n_seq=N_SEQ)
    pos = dict.fromkeys(IDS, 0)
    while sum(pos.values()) < 170:
        items = []
        for q in rng.permutation(IDS):
            for _ in range(int(rng.integers(0, 6))):
                items.append([1, pos[int(q)], [int(q)], False])
                pos[int(q)] += 1
        if items:
            decode(kv, items, n_ubatch=len(items))
    # (33 -> 20: its last tokens alone, shared cells in the last blocks only)
    for src, dst, p0, p1 in ((5, 40, -1, -1), (32, 2, 3, 20), (63, 30, -1, -1), (63, 50, 5, -1),
                             (0, 62, 0, 9), (47, 1, -1, -1), (33, 20, pos[33] - 2, -1)):  # fmt: skip
        kv.seq_cp(src, dst, p0, p1)
    randomize(kv, seed)
    return kv


def _holders(kv) -> dict[int, set[int]]:
    """Cell -> the ids its bitset names, for every shared cell (numpy, from the arrays)."""
    cells = kv.v_cells[0]
    bits = cells.seq[:, 0] if cells.seq.ndim == 2 else cells.seq
    return {
        int(i): {q for q in range(N_SEQ) if int(bits[i]) >> q & 1}
        for i in np.flatnonzero(cells.owner == OWNER_MULTI)
    }


@pytest.mark.parametrize("seed", range(4))
def test_shared_test_names_the_ids_of_the_shared_cells(seed: int) -> None:
    kv = _shared_memory(seed)
    holders = _holders(kv)
    assert len(holders) > 20 and {i % 32 for i in holders} >= {0, 31}  # (every place)
    expected = set().union(*holders.values())
    assert {q for q in (32, 40, 62, 50, 20) if q in expected} == {32, 40, 62, 50, 20}
    c = kv._native_cells()[0]
    assert {q for q in range(N_SEQ) if lib.pm_step_seq_shared(c, 0, q)} == expected


@pytest.mark.parametrize("n_seq_ids", [N_SEQ, 256])  # one word a cell (masks), or four
@pytest.mark.parametrize("cell", [0, 13, 31, 32, 63, 95, 100])
def test_shared_test_finds_one_shared_cell_anywhere_in_a_block(cell: int, n_seq_ids: int) -> None:
    """One cell shared by 3 and 40 (both halves of the word), and four cells shared by 1
    and 2: in a block before it where there is one (a count of shared cells that ends
    the scan too early stops before it), else after it; each other id answers 0."""
    st = StackedCells(1, 104, n_seq_ids=n_seq_ids)
    first = [0, 1, 2, 3] if cell >= 32 else [96, 97, 98, 99]
    for c in range(104):
        st.pos_f[c], st.owner_f[c], st.seq_f[c, 0] = c, 0, 1
    for c in first:
        st.owner_f[c], st.seq_f[c, 0] = OWNER_MULTI, (1 << 1) | (1 << 2)
    st.owner_f[cell], st.seq_f[cell, 0] = OWNER_MULTI, (1 << 3) | (1 << 40)
    st.n_multi[0], st.used[0], st.used_max_p1[0] = 5, 104, 104
    for q in range(N_SEQ):
        st.pmin[0, q], st.pmax[0, q] = 0, 103
    c = st.native()
    assert {q for q in range(N_SEQ) if lib.pm_step_seq_shared(c, 0, q)} == {1, 2, 3, 40}


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans"])
@pytest.mark.parametrize("seed", range(3))
def test_write_of_a_sequence_takes_its_shared_cells_as_the_reference(
    monkeypatch, name: str, seed: int
) -> None:
    kv = _shared_memory(seed, name)
    ids = sorted(set(IDS) | {40, 2, 30, 50, 62, 1})
    native = [bytes(kv.state_write(q)) for q in ids]
    with monkeypatch.context() as m:
        m.setattr(state_io, "NATIVE_RUNS", False)  # the reference
        assert [bytes(kv.state_write(q)) for q in ids] == native
    for q, blob in zip(ids, native, strict=True):  # and each blob holds every cell of q
        n_cells = int(np.frombuffer(blob, "<u4", 1, 4)[0])
        assert n_cells == int(np.count_nonzero(kv.v_cells[0].seq_mask(q)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("q, p0, p1", [(32, -1, -1), (40, 2, 11), (63, 4, 30), (62, -1, -1),
                                       (1, 0, 7), (5, 9, -1)])  # fmt: skip
def test_removal_unshares_cells_as_the_reference(monkeypatch, seed, q, p0, p1) -> None:
    native, reference = _shared_memory(seed), _shared_memory(seed)
    native.seq_rm(q, p0, p1)
    with monkeypatch.context() as m:
        m.setattr(kv_cache, "USE_NATIVE_RM", False)
        reference.seq_rm(q, p0, p1)
    a, b = native.v_cells[0], reference.v_cells[0]
    for field in ("pos", "owner", "seq"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert list(native.v_heads) == list(reference.v_heads)
    assert [native.seq_pos_max(s) for s in range(N_SEQ)] == [
        reference.seq_pos_max(s) for s in range(N_SEQ)
    ]
    assert [native.seq_pos_min(s) for s in range(N_SEQ)] == [
        reference.seq_pos_min(s) for s in range(N_SEQ)
    ]
    check_invariants(native)
