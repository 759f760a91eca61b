"""The cells' sequence bitsets are as wide as the ids they hold (pymem.kv.cells).

A cache of up to 64 sequences keeps one 64-bit word a cell; an id past the words (a
unified cache takes every id below 256) widens them. Each cache here runs next to a twin
whose bitsets were made 256 ids wide from the start: every cell, result and state byte
must agree, through decodes (planned under a journal, rolled back, applied), every
sequence op and state restores.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from kv_helpers import check_invariants, make_kv

from pymem._native import ffi, lib
from pymem.batch import Batch, BatchAllocator
from pymem.kv.cells import StackedCells, words_for
from pymem.memory import MemoryStatus
from pymem.ubatch import LLAMA_MAX_SEQ


def _decode(kv, items: list, n_ubatch: int = 256) -> bool:
    """Decode ``[token, pos, [ids], output]`` items; a unified cache's batches take any id
    below 256, as llama.cpp's do (``n_seq_max`` of the batch check: LLAMA_MAX_SEQ)."""
    balloc = BatchAllocator(kv.n_pos_per_embd)
    n_seq = LLAMA_MAX_SEQ if kv.unified else kv.n_seq_max
    balloc.init(Batch.from_items(items), memory=kv, n_seq_max=n_seq)
    ctx = kv.init_batch(balloc, n_ubatch, False)
    if ctx.get_status() != MemoryStatus.SUCCESS:
        return False
    while True:
        ctx.apply()
        if not ctx.next():
            return True


def _same(a, b) -> None:
    """Both caches' cells equal, bitsets compared over the wider one's words."""
    ca, cb = a.cells, b.cells
    for name in ("pos", "shift", "owner", "used", "n_multi", "has_shift"):
        np.testing.assert_array_equal(getattr(ca, name), getattr(cb, name), err_msg=name)
    every = np.arange(ca.n_stream)  # (the stored bound may be stale: compare the exact one)
    np.testing.assert_array_equal(ca.used_max_p1_of(every), cb.used_max_p1_of(every))
    w = max(ca.n_words, cb.n_words)
    wa = np.zeros((*ca.pos.shape, w), np.uint64)
    wb = np.zeros((*cb.pos.shape, w), np.uint64)
    wa[..., : ca.n_words] = ca.seq
    wb[..., : cb.n_words] = cb.seq
    np.testing.assert_array_equal(wa, wb, err_msg="seq bitsets")
    for q in range(LLAMA_MAX_SEQ):
        assert a.seq_pos_min(q) == b.seq_pos_min(q) and a.seq_pos_max(q) == b.seq_pos_max(q), q
    assert bytes(a.state_write()) == bytes(b.state_write())


@pytest.mark.parametrize(
    ("n_seq_max", "words"), [(1, 1), (8, 1), (64, 1), (65, 2), (200, 4), (256, 4)]
)
def test_a_cache_keeps_the_words_its_sequences_need(n_seq_max, words):
    kv = make_kv(32, n_seq_max)
    assert kv.cells.n_words == words == words_for(n_seq_max)
    assert kv.cells.seq.shape == (kv.n_stream, 32, words)
    assert kv.cells.rows_f.dtype.itemsize == 8 * words
    assert kv._native_cells()[0].n_words == words


def test_fit_widens_keeping_every_bit_and_refuses_ids_past_256():
    st = StackedCells(2, 16, n_seq_ids=8)
    assert st.n_words == 1
    st.set_new(
        np.array([0, 1]),
        np.array([[3, 4], [5, 6]]),
        np.arange(4),
        np.array([[1], [2], [7], [7]], np.int32),
    )
    c = st.native()
    before = st.seq.copy()
    st.fit(63)
    assert st.n_words == 1  # fits: nothing changes
    st.fit(130)
    assert st.n_words == 3 and st.seq.shape == (2, 16, 3)
    np.testing.assert_array_equal(st.seq[..., :1], before)
    assert not st.seq[..., 1:].any()
    assert c.n_words == 3 and c.seq == st.native().seq  # the one struct, updated in place
    assert st.seq_f.shape == (32, 3) and st.rows_f.dtype.itemsize == 24
    with pytest.raises(ValueError, match="256"):
        st.fit(256)


# (n_seq_max, the ids used): one word widened by ids past it; two words (ids 64-99 in
# word 1) widened by 130
WIDTHS = [(4, [0, 1, 2, 3, 70, 129, 255]), (100, [0, 5, 64, 70, 99, 130])]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n_seq_max", "ids"), WIDTHS, ids=["one-word", "two-words"])
def test_unified_cache_widened_by_ids_past_n_seq_max_equals_a_wide_one(seed, n_seq_max, ids):
    rng = np.random.default_rng(seed)
    narrow = make_kv(192, n_seq_max, unified=True)
    wide = make_kv(192, n_seq_max, unified=True)
    wide.cells.fit(LLAMA_MAX_SEQ - 1)
    assert narrow.cells.n_words == words_for(n_seq_max) and wide.cells.n_words == 4
    tops = dict.fromkeys(ids, -1)
    for step in range(30):
        op = int(rng.integers(0, 7))
        s, t = (int(x) for x in rng.choice(ids, 2))
        p0, p1 = (int(x) for x in rng.integers(-1, 12, 2))
        if step == 15:  # the largest id at least once, into cells the ops before left
            op, s = 0, ids[-1]
        if op <= 2:  # a decode of a few tokens (seq_cp makes the shared cells)
            items = [[1, tops[s] + 1 + i, [s], False] for i in range(int(rng.integers(1, 5)))]
            got = [_decode(kv, [list(x) for x in items]) for kv in (narrow, wide)]
            assert got[0] == got[1]
        elif op == 3:
            for kv in (narrow, wide):
                kv.seq_cp(s, t, p0, p1)
        elif op == 4:
            res = [kv.seq_rm(s, p0, p1) for kv in (narrow, wide)]
            assert res[0] == res[1]
        elif op == 5:
            d = int(rng.integers(-2, 3))
            for kv in (narrow, wide):
                kv.seq_add(s, p0, p1, d)
        elif rng.random() < 0.3:
            for kv in (narrow, wide):
                kv.seq_keep(s)
        tops = {q: narrow.seq_pos_max(q) for q in ids}
        _same(narrow, wide)
        check_invariants(narrow)
    assert narrow.cells.n_words == words_for(max(ids) + 1)  # widened on the way


def test_a_decode_planned_then_rolled_back_across_a_widening_restores_the_cells():
    kv = make_kv(64, 4, unified=True)
    _decode(kv, [[1, p // 3, [p % 3], False] for p in range(9)])
    kv.seq_cp(0, 1, -1, -1)  # shared cells: their bitsets carry two bits
    snap = kv.cells.pos.copy(), kv.cells.owner.copy(), kv.cells.seq.copy()
    st = kv.cells
    st.begin()
    st.set_new(
        np.array([0]), np.array([[20, 21]]), np.array([0, 1]), np.array([[200], [0]], np.int32)
    )
    assert st.n_words == 4  # widened under the journal
    st.rollback()
    np.testing.assert_array_equal(st.pos, snap[0])
    np.testing.assert_array_equal(st.owner, snap[1])
    np.testing.assert_array_equal(st.seq[..., :1], snap[2])
    assert not st.seq[..., 1:].any()
    check_invariants(kv)


def test_a_redo_log_from_before_a_widening_applies_after_it():
    a = StackedCells(1, 16, n_seq_ids=4)
    b = StackedCells(1, 16, n_seq_ids=4)
    for st in (a, b):
        st.set_new(
            np.array([0]), np.array([[0, 1]]), np.array([5, 6]), np.array([[1], [1]], np.int32)
        )
    a.begin()
    a.set_new(np.array([0]), np.array([[2, 3]]), np.array([7, 8]), np.array([[2], [3]], np.int32))
    log = a.redo_log()
    a.end()
    b.fit(100)  # b widens before the log reaches it
    b.redo(log)
    np.testing.assert_array_equal(a.pos, b.pos)
    np.testing.assert_array_equal(a.owner, b.owner)
    np.testing.assert_array_equal(a.seq, b.seq[..., :1])
    a.begin()
    empty = a.redo_log()  # no cell changed: an empty log of one-word items
    a.end()
    b.fit(200)
    b.redo(empty)
    assert b.n_words == 4


def test_the_native_step_follows_a_widening():
    # the decode step's native placement declines an id past the words; numpy widens, and
    # the next step's kernel (the same struct, updated in place) writes the wider bitsets
    narrow = make_kv(64, 2, unified=True)
    wide = make_kv(64, 2, unified=True)
    wide.cells.fit(LLAMA_MAX_SEQ - 1)
    for kv in (narrow, wide):
        kv._native_cells()  # built before the widening
        _decode(kv, [[1, 0, [0], False], [1, 0, [1], False]])
        for step in range(1, 6):
            _decode(kv, [[1, step, [0], False], [1, step - 1 if step > 1 else 0, [199], False]])
    assert narrow.cells.n_words == 4 and narrow._native_cells()[0].n_words == 4
    _same(narrow, wide)
    check_invariants(narrow)


def test_state_of_a_narrow_cache_reads_into_a_wide_one_and_back():
    a = make_kv(64, 8, unified=True)
    b = make_kv(64, 8, unified=True)
    b.cells.fit(LLAMA_MAX_SEQ - 1)
    _decode(a, [[1, p // 5, [p % 5], False] for p in range(20)])
    a.seq_cp(1, 6, -1, -1)
    blob = bytes(a.state_write())
    b.state_read(blob)
    _same(a, b)
    for q in (1, 6, 2):  # swapped out and in again (the one-call swap-in's placement)
        one = bytes(b.state_write(q))
        for kv in (a, b):
            kv.seq_rm(q, -1, -1)
            kv.state_read(one, q)
        _same(a, b)
    check_invariants(a)
    check_invariants(b)
    assert a.cells.n_words == 1


def test_a_widened_stack_pickles_and_copies_its_views():
    kv = make_kv(32, 2, unified=True)
    _decode(kv, [[1, 0, [0], False], [1, 0, [100], False]])
    assert kv.cells.n_words == 2
    v = kv.v_cells[0]
    assert v.seq.shape == (32, 2) and v.seq_has(int(np.flatnonzero(v.owner == 100)[0]), 100)
    assert not v.seq_mask(250).any() and not v.seq_has(0, 250)  # past the words: in no cell
    copy = pickle.loads(pickle.dumps(kv.cells))
    np.testing.assert_array_equal(copy.seq, kv.cells.seq)
    assert copy.native().n_words == 2
    other = make_kv(32, 2, unified=True)
    other.v_cells[0] = v  # a narrower stream loads a wider one: it widens
    assert other.cells.n_words == 2
    np.testing.assert_array_equal(other.cells.seq, kv.cells.seq)


def test_a_swap_in_writes_the_word_of_an_id_past_64():
    # a cache of 100 sequences keeps two words a cell: sequence 70's bit is in word 1, on
    # every road that places a swapped-out sequence (the one-call swap-in's runs, numpy's)
    kv = make_kv(96, 100)
    assert kv.cells.n_words == 2
    _decode(kv, [[1, p // 2, [(3, 70)[p % 2]], False] for p in range(40)])
    blob = bytes(kv.state_write(70))
    kv.seq_rm(70, -1, -1)
    kv.state_read(blob, 70)
    check_invariants(kv)
    cells = np.flatnonzero(kv.cells.owner[0] == 70)
    assert cells.size == 20 and (kv.cells.seq[0, cells, 1] == 1 << 6).all()
    assert not kv.cells.seq[0, cells, 0].any()


@pytest.mark.parametrize("n_words", [0, 5])
def test_kernels_refuse_a_word_count_outside_one_to_four(n_words):
    # the bitsets' word count bounds every id a kernel takes (the bounds have 256 keys a
    # stream): a struct saying 0 or 5 words is refused before anything is written
    kv = make_kv(32, 4, unified=True)
    _decode(kv, [[1, p, [0], False] for p in range(6)])
    c, heads, _, placed = kv._native_cells()
    before = [a.copy() for a in (kv.cells.pos, kv.cells.seq, kv.cells.owner, kv.cells.pmin)]
    saved = c.n_words
    c.n_words = n_words
    try:
        words = np.array([[0, 1, 0]], dtype=np.int32)
        ptrs = ffi.new("int32_t *[]", [ffi.from_buffer("int32_t[]", words)])
        counts = ffi.new("int64_t[]", [1])
        assert lib.pm_step_kv_refill(c, ptrs, counts, ffi.NULL, 3, 4, placed) == lib.PM_ERR_ARG
        out = ffi.new("int64_t[2]")
        done = ffi.new("int32_t *")
        assert (
            lib.pm_step_kv_rm_seq(c, 0, 0, 0, 2**31 - 1, 1, 32, out, out + 1, done)
            == lib.PM_ERR_ARG
        )
        idx = ffi.new("int32_t[]", [10])
        pos = ffi.new("int32_t[]", [6])
        seq = ffi.new("int32_t[]", [0])
        top = ffi.new("int64_t *")
        strm = ffi.new("int64_t[]", [0])
        assert lib.pm_step_kv_place(c, strm, 1, 1, idx, pos, seq, heads, top, placed) == lib.PM_OK
        assert placed[0] == 0
    finally:
        c.n_words = saved
    after = (kv.cells.pos, kv.cells.seq, kv.cells.owner, kv.cells.pmin)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    check_invariants(kv)
