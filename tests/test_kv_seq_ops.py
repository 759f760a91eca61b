"""The KV sequence operations' fast paths against the general code they shortcut.

``KVCells.seq_cells_in`` (the cells of one sequence in ``[p0, p1)``: scan limited to
``used_max_p1``, whole-sequence and disjoint ranges from the cached bounds, small ranges
tested on their candidates only) is compared with ``flatnonzero(pos in range & seq_mask)``;
``seq_rm_bit`` on cells owned by the sequence alone (whole rows cleared) and
``seq_add_bit`` on cells that all hold other sequences (owners set to -2 in one write) are
compared with the per-row owner recompute, on random unified caches: shared cells, ids
past 63, empty gaps, dirty bounds, a position at ``POS_MAX``. Exact cells, bitsets,
owners, counters and bounds; the undo journal must put the fast paths back exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, decode, make_kv

from pymem.kv.cache import _pos_in
from pymem.kv.cells import OWNER_MULTI, KVCells, seq_word_bit, single_seq_ids
from pymem.memory import POS_MAX

SEQS = [0, 1, 2, 3, 64, 130]


def random_cells(rng: np.random.Generator, size: int = 96) -> KVCells:
    """A stream partly filled (gaps, a free tail) with sequences from ``SEQS``, about a
    third of the cells shared by two or three of them; some bounds dirty."""
    cells = KVCells(size)
    n = int(rng.integers(size // 4, size))
    idx = np.sort(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False))
    seq_id = np.full((idx.size, 3), -1, dtype=np.int32)
    seq_id[:, 0] = rng.choice(SEQS, idx.size)
    shared = rng.random(idx.size) < 0.35
    seq_id[shared, 1] = rng.choice(SEQS, int(shared.sum()))
    seq_id[shared & (rng.random(idx.size) < 0.3), 2] = rng.choice(SEQS)
    pos = rng.integers(0, 40, idx.size).astype(np.int32)
    if rng.random() < 0.2:
        pos[0] = POS_MAX  # a position [p0, POS_MAX) leaves out
    cells.set_new(idx, pos, seq_id)
    if rng.random() < 0.5:  # dirty bounds: some cells removed by hand
        gone = idx[rng.random(idx.size) < 0.2]
        cells.rm(gone)
    return cells


def general_cells_in(cells: KVCells, seq_id: int, p0: int, p1: int) -> np.ndarray:
    return np.flatnonzero(_pos_in(cells.pos, p0, p1) & cells.seq_mask(seq_id))


def reference_rm_bit(cells: KVCells, idx: np.ndarray, seq_id: int) -> None:
    """``seq_rm_bit`` as the general path does it: clear the bit, recompute every owner."""
    w, b = seq_word_bit(seq_id)
    cells.seq[idx, w] &= ~b
    owner = single_seq_ids(cells.seq[idx])
    cells._set_owner(idx, owner)
    emptied = idx[owner == -1]
    cells.pos[emptied] = -1
    cells.shift[emptied] = 0
    cells._freed(emptied)
    cells._pdirty[seq_id] = 3  # both bounds recomputed from the cells


def reference_add_bit(cells: KVCells, idx: np.ndarray, seq_id: int) -> None:
    w, b = seq_word_bit(seq_id)
    cells.seq[idx, w] |= b
    cells._set_owner(idx, single_seq_ids(cells.seq[idx]))
    cells._pdirty[seq_id] = 3


def same_cells(a: KVCells, b: KVCells) -> None:
    np.testing.assert_array_equal(a.pos, b.pos)
    np.testing.assert_array_equal(a.shift, b.shift)
    np.testing.assert_array_equal(a.seq, b.seq)
    np.testing.assert_array_equal(a.owner, b.owner)
    np.testing.assert_array_equal(a.owner, single_seq_ids(a.seq.reshape(-1, a.store.n_words)))
    assert a.n_multi == b.n_multi == int(np.count_nonzero(a.owner == OWNER_MULTI))
    assert a.used == b.used == int(np.count_nonzero(a.pos >= 0))
    assert a.used_max_p1() == b.used_max_p1()
    for q in SEQS:
        assert a.seq_pos_min(q) == b.seq_pos_min(q), q
        assert a.seq_pos_max(q) == b.seq_pos_max(q), q


def ranges(rng: np.random.Generator) -> list[tuple[int, int]]:
    out = [(0, POS_MAX), (0, 1), (5, 5), (7, 3), (38, POS_MAX), (0, 20), (39, 40), (50, 60)]
    for _ in range(6):
        p0 = int(rng.integers(0, 45))
        out.append((p0, p0 + int(rng.integers(0, 45))))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_seq_cells_in_equals_mask_path(seed):
    rng = np.random.default_rng(seed)
    cells = random_cells(rng)
    for q in SEQS:
        for p0, p1 in ranges(rng):
            got = cells.seq_cells_in(q, p0, p1)
            np.testing.assert_array_equal(got, general_cells_in(cells, q, p0, p1), (q, p0, p1))
            assert got.dtype == np.int64
        cells.seq_pos_max(q)  # clean this sequence's bounds: the next ones use them


def test_seq_cells_in_hand_worked():
    # cells 0..5: pos [4, 5, 6, 7, -1, 9], seqs {1}, {1, 2}, {2}, {1}, -, {1}
    cells = KVCells(16)
    seq_id = np.array([[1, -1], [1, 2], [2, -1], [1, -1], [1, -1]], dtype=np.int32)
    cells.set_new(np.array([0, 1, 2, 3, 5]), np.array([4, 5, 6, 7, 9]), seq_id)
    assert cells.seq_cells_in(1, 0, POS_MAX).tolist() == [0, 1, 3, 5]  # whole sequence
    assert cells.seq_cells_in(1, 6, POS_MAX).tolist() == [3, 5]  # a tail: candidates [2, 3, 5]
    assert cells.seq_cells_in(2, 0, 6).tolist() == [1]
    assert cells.seq_cells_in(1, 10, 20).tolist() == []  # past the maximum: no scan
    assert cells.seq_cells_in(3, 0, POS_MAX).tolist() == []  # no cells


@pytest.mark.parametrize("seed", range(30))
def test_seq_rm_and_add_bit_equal_the_general_path(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(4):
        fast = random_cells(rng)
        ref = KVCells(fast.size)
        ref.load(fast)
        q = int(rng.choice(SEQS))
        p0 = int(rng.integers(0, 30))
        idx = fast.seq_cells_in(q, p0, POS_MAX)
        if rng.random() < 0.5:  # only the cells q owns alone: the whole-row path
            idx = idx[fast.owner[idx] == q]
        emptied = fast.seq_rm_bit(idx, q)
        reference_rm_bit(ref, idx, q)
        same_cells(fast, ref)
        np.testing.assert_array_equal(emptied, idx[ref.pos[idx] < 0])
        # copy another sequence into q, or into a sequence it shares no cell with
        src = int(rng.choice(SEQS))
        dst = int(rng.choice([s for s in SEQS if s != src] + [200]))
        idx = fast.seq_cells_in(src, 0, POS_MAX)
        fast.seq_add_bit(idx, dst)
        reference_add_bit(ref, idx, dst)
        same_cells(fast, ref)


def test_seq_cp_and_seq_rm_fast_paths_roll_back_exactly():
    # a fork and its removal under the undo journal, on a unified cache
    kv = make_kv(64, 4)
    items = [[1, p, [s], False] for s in range(3) for p in range(12)]

    decode(kv, items)
    before = kv.cells.rows_f.copy(), kv.cells.owner.copy(), kv.cells.n_multi.copy()
    kv.cells.begin()
    kv.seq_cp(0, 3, -1, -1)
    assert kv.cells.n_multi[0] == 12
    kv.seq_rm(1, 6, -1)
    kv.seq_rm(3, -1, -1)
    kv.cells.rollback()
    np.testing.assert_array_equal(kv.cells.rows_f, before[0])
    np.testing.assert_array_equal(kv.cells.owner, before[1])
    np.testing.assert_array_equal(kv.cells.n_multi, before[2])
    check_invariants(kv)


@pytest.mark.parametrize("seed", range(10))
def test_seq_mask_byte_test_equals_the_bit_test(seed):
    # many shared cells: seq_mask reads one byte of each bitset instead of owner
    rng = np.random.default_rng(300 + seed)
    cells = random_cells(rng)
    cells.seq_add_bit(np.flatnonzero(cells.pos >= 0)[::2], 200)  # more shared cells
    for q in [*SEQS, 255]:
        w, b = seq_word_bit(q)
        np.testing.assert_array_equal(cells.seq_mask(q), (cells.seq[:, w] & b) != 0)
        np.testing.assert_array_equal(cells.seq_mask(q, 10, 50), (cells.seq[10:50, w] & b) != 0)


@pytest.mark.parametrize("shared", ["none", "all", "some"])
@pytest.mark.parametrize("seed", range(6))
def test_runs_of_cells_take_slices_as_scattered_cells_take_gathers(shared, seed):
    # seq_add_bit / seq_rm_bit on one run of cells (slices) and on the same cells with a
    # gap (gathers), each against the general path: a fork of seq 1 into 70, then removed
    rng = np.random.default_rng(500 + seed)
    for gap in (False, True):
        fast = KVCells(400)  # runs of 256 cells or more take slices
        idx = np.arange(4, 304) if not gap else np.r_[4:200, 201:305]
        seq_id = np.full((idx.size, 2), -1, dtype=np.int32)
        seq_id[:, 0] = 1
        other = {"none": 0.0, "all": 1.0, "some": 0.5}[shared]
        pick = rng.random(idx.size) < other
        seq_id[pick, 1] = rng.choice([0, 2, 64])
        fast.set_new(idx, rng.permutation(idx.size).astype(np.int32), seq_id)
        ref = KVCells(400)
        ref.load(fast)
        fast.seq_add_bit(idx, 70)
        reference_add_bit(ref, idx, 70)
        same_cells(fast, ref)
        for q in (70, 1):  # the fork (every cell shared), then the original
            emptied = fast.seq_rm_bit(idx, q)
            reference_rm_bit(ref, idx, q)
            same_cells(fast, ref)
            np.testing.assert_array_equal(emptied, idx[ref.pos[idx] < 0])


@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_random_seq_ops_keep_every_invariant(unified, seed):
    # forks, tails, whole removals (bounds set to "no cells", clean), shifts, divisions and
    # keeps through KVCache, with the invariants (bounds recomputed by loops) after each
    rng = np.random.default_rng(700 + seed)
    kv = make_kv(96, 4, unified=unified)

    for s in range(4):
        decode(kv, [[1, p, [s], False] for p in range(int(rng.integers(1, 20)))])
    for _ in range(40):
        op = int(rng.integers(0, 6))
        s, t = (int(x) for x in rng.integers(0, 4, 2))
        p0, p1 = (int(x) for x in rng.integers(-1, 24, 2))
        if op == 0 and (unified or s == t):
            kv.seq_cp(s, t, p0, p1)
        elif op == 1:
            kv.seq_rm(s, p0, p1)
            if p0 <= 0 and p1 < 0:
                assert kv.seq_pos_max(s) == -1
        elif op == 2:
            kv.seq_add(s, p0, p1, int(rng.integers(-3, 4)))
        elif op == 3:
            kv.seq_div(s, p0, p1, int(rng.integers(1, 3)))
        elif op == 4 and rng.random() < 0.2:
            kv.seq_keep(s)
        else:
            top = kv.seq_pos_max(s)
            decode(kv, [[1, top + 1 + i, [s], False] for i in range(int(rng.integers(1, 6)))])
        check_invariants(kv)
