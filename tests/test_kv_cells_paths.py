"""Fast paths of the KV cells and cache against their general paths (issue 14).

A run of cells of one stream is written through a slice, one sequence id for every
token updates its bounds with two reductions, ids below 64 are shifted straight into the
cells, and ``min_max_at`` groups runs of equal keys before ``ufunc.at``. Each must leave
exactly the state the general path (index arrays, ``ufunc.at`` per cell) leaves: the
general path is forced by raising ``cells.RUN_MIN`` and ``cells._GROUP_MAX_SHARE``.

Also: ``put_rows`` (``np.put`` of bitset items) against fancy assignment; the SWA
overwrite of a one-stream cache (``rm_owned``, ``purge_owned_upto``; off with
``cache.OVERWRITE_OWNED``) against ``rm`` / ``seq_rm_upto`` and over whole decodes; the
one-stream slot search through a slice (off with ``cache.SLOT_SLICE_MIN``) against the
gather path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from kv_helpers import check_invariants, decode, make_kv

import pymem.kv.cache as cache_mod
import pymem.kv.cells as cells_mod
from pymem._native import ffi, lib
from pymem.kv.cells import StackedCells, min_max_at
from pymem.kv.state_io import _restore_ubatch
from pymem.spec import SWAType

_STATE = (
    "pos", "shift", "seq", "owner", "ext", "used", "used_max_p1", "used_max_dirty",
    "has_shift", "n_multi", "pmin", "pmax", "pdirty",
)  # fmt: skip


def state(st: StackedCells) -> dict[str, np.ndarray | None]:
    return {k: None if getattr(st, k) is None else getattr(st, k).copy() for k in _STATE}


def same(a: dict, b: dict) -> None:
    for k in _STATE:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def seeded(rng: np.random.Generator, n_stream: int, size: int, with_ext: bool) -> StackedCells:
    """A stack with some cells held (some by several sequences, ids past 64 too)."""
    st = StackedCells(n_stream, size, with_ext)
    for s in range(n_stream):
        free = rng.permutation(size)[: size // 4]
        free.sort()
        k = free.size
        seq = np.full((k, 2), -1, dtype=np.int32)
        seq[:, 0] = rng.integers(0, 100, k)
        seq[rng.random(k) < 0.2, 1] = 120
        ext = rng.integers(0, 9, (k, 3)).astype(np.int32) if with_ext else None
        st.set_new(np.array([s]), free[None], rng.integers(0, 500, k), seq, ext)
    return st


def ids_for(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """A ``[n, k]`` seq_id matrix of one kind, in runs as a restore or a prompt has them."""
    if kind == "one":
        return np.full((n, 1), 3, dtype=np.int32)
    if kind == "one_high":
        return np.full((n, 1), 200, dtype=np.int32)
    if kind == "runs_low":  # E.g. 4 sequences in runs of 16 (a whole-cache restore)
        return np.repeat(rng.integers(0, 64, -(-n // 16)), 16)[:n, None].astype(np.int32)
    if kind == "runs_high":
        return np.repeat(rng.integers(0, 256, -(-n // 16)), 16)[:n, None].astype(np.int32)
    if kind == "scattered":  # every token another id: ufunc.at's own case
        return rng.integers(0, 256, (n, 1)).astype(np.int32)
    seq = np.full((n, 3), -1, dtype=np.int32)  # several ids per cell, a repeated one
    seq[:, 0] = rng.integers(0, 256, n)
    seq[::3, 1] = 7
    seq[::5, 2] = seq[::5, 0]
    return seq


def place_both(
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[], StackedCells],
    strm: np.ndarray,
    idx: np.ndarray,
    pos: np.ndarray,
    seq: np.ndarray,
    ext: np.ndarray | None,
    journal: bool,
) -> None:
    """``set_new`` on two equal stacks, once as is and once forced onto the general path;
    the states (and, under a journal, the redo logs and the rollbacks) must be equal."""
    fast, slow = make(), make()
    before = state(fast)
    out = []
    for st, general in ((fast, False), (slow, True)):
        with monkeypatch.context() as m:
            if general:
                m.setattr(cells_mod, "RUN_MIN", 1 << 62)
                m.setattr(cells_mod, "_GROUP_MAX_SHARE", 1 << 62)
            if journal:
                st.begin()
            st.set_new(strm, idx, pos, seq, ext)
            log = st.redo_log() if journal else None
        out.append((state(st), log))
    same(out[0][0], out[1][0])
    if journal:
        gid_f, gid_s = out[0][1][0], out[1][1][0]
        # the same cells journaled (the fast path journals a run as its ids)
        np.testing.assert_array_equal(np.sort(gid_f), np.sort(gid_s))
        fast.rollback()
        slow.rollback()
        same(state(fast), before)
        same(state(slow), before)


@pytest.mark.parametrize("kind", ["one", "one_high", "runs_low", "runs_high", "scattered", "multi"])
@pytest.mark.parametrize("with_ext", [False, True])
@pytest.mark.parametrize("journal", [False, True])
def test_run_of_cells_equals_general_path(monkeypatch, kind, with_ext, journal):
    rng = np.random.default_rng([len(kind), ord(kind[-1]), int(with_ext), int(journal)])
    size, n = 2048, 700
    for empty in (True, False):  # a fresh stack, and one with cells (multi ones too) around the run

        def make(empty: bool = empty) -> StackedCells:
            if empty:
                return StackedCells(1, size, with_ext)
            st = seeded(np.random.default_rng(5), 1, size, with_ext)
            st.rm(np.arange(100, 100 + n))  # the run must be empty
            return st

        idx = np.arange(100, 100 + n, dtype=np.int64)[None]
        pos = rng.integers(0, 10_000, n).astype(np.int32)
        ext = rng.integers(0, 9, (n, 3)).astype(np.int32) if with_ext else None
        place_both(monkeypatch, make, np.array([0]), idx, pos, ids_for(rng, kind, n), ext, journal)


@pytest.mark.parametrize("kind", ["one", "runs_low", "runs_high", "multi"])
def test_runs_of_cells_and_streams_equal_general_path(monkeypatch, kind):
    # not one run: several runs (a per-sequence restore's freed cells), a permutation whose
    # ends look like a run, and several streams
    rng = np.random.default_rng(7)
    size = 4096
    runs = np.concatenate([np.arange(a, a + 128) for a in range(0, size, 512)])
    looks = np.arange(300, 300 + 600)
    looks[[10, 11]] = looks[[11, 10]]  # ends match a run, the order does not
    for strm, idx in (
        (np.array([0]), runs[None]),
        (np.array([0]), looks[None]),
        (np.array([1, 0]), np.stack([np.arange(1000, 1300), np.arange(2000, 2300)])),
    ):
        n = idx.size
        pos = rng.integers(0, 10_000, n).astype(np.int32)
        place_both(
            monkeypatch, lambda: StackedCells(2, size), strm, idx.astype(np.int64), pos,
            ids_for(rng, kind, n), None, False,
        )  # fmt: skip


def test_min_max_at_equals_ufunc_at():
    rng = np.random.default_rng(11)
    for keys in (
        np.repeat([3, 5, 3, 9], [40, 7, 1, 100]),  # runs, a key repeated across runs
        np.full(50, 4),  # one key
        rng.integers(0, 30, 500),  # no runs: ufunc.at itself
        np.array([6]),
        np.zeros(0, dtype=np.int64),
    ):
        for dtype in (np.int32, np.int64):
            k = keys.astype(dtype)
            p = rng.integers(-5, 1000, keys.size).astype(dtype)
            lo = rng.integers(0, 2000, 32)
            hi = rng.integers(-1, 900, 32)
            want_lo, want_hi = lo.copy(), hi.copy()
            np.minimum.at(want_lo, k.astype(np.int64), p.astype(np.int64))
            np.maximum.at(want_hi, k.astype(np.int64), p.astype(np.int64))
            min_max_at(lo, hi, k, p)
            np.testing.assert_array_equal(lo, want_lo)
            np.testing.assert_array_equal(hi, want_hi)


def test_min_max_at_hand_worked():
    lo = np.full(6, 100, dtype=np.int64)
    hi = np.full(6, -1, dtype=np.int64)
    min_max_at(lo, hi, np.array([3, 3, 5, 5, 5, 3]), np.array([7, 8, 1, 2, 3, 9]))
    assert lo.tolist() == [100, 100, 100, 7, 100, 1]
    assert hi.tolist() == [-1, -1, -1, 9, -1, 3]


# --- the SWA overwrite of a one-stream cache (KVCache.apply_ubatch) ------------------------


def owned_stack(rng: np.random.Generator, size: int, with_ext: bool) -> StackedCells:
    """One stream, no shared cells: cells held by one of 6 sequences at random positions
    (repeats within a sequence too), a few with a position and no sequence (a restore's)."""
    st = StackedCells(1, size, with_ext)
    idx = np.flatnonzero(rng.random(size) < 0.8)
    seq = rng.integers(0, 6, (idx.size, 1)).astype(np.int32)
    ext = rng.integers(0, 9, (idx.size, 3)).astype(np.int32) if with_ext else None
    st.set_new(np.array([0]), idx[None], rng.integers(0, 40, idx.size), seq, ext)
    lone = idx[::9]
    st.rows_f[lone] = np.zeros(1, dtype=st.row)[0]  # position, no sequence
    st.owner_f[lone] = cells_mod.OWNER_NONE
    st.refresh(np.zeros(6, np.int64), np.arange(6))
    return st


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_ext", [False, True])
def test_rm_owned_and_purge_owned_upto_equal_rm_and_seq_rm_upto(seed, with_ext):
    rng = np.random.default_rng(4100 + seed)
    a = owned_stack(np.random.default_rng(seed), 96, with_ext)
    b = owned_stack(np.random.default_rng(seed), 96, with_ext)
    same(state(a), state(b))
    # overwritten cells: some held cells, a sequence twice at times
    held = np.flatnonzero(a.owner_f >= 0)
    gid = np.sort(rng.choice(held, int(rng.integers(1, 9)), replace=False))
    own, pos = a.owner_f[gid].copy(), a.pos_f[gid].copy()
    for st in (a, b):
        st.begin() if seed % 2 else None
    a.rm_owned(gid, own, pos)
    b.rm(gid, exact_bounds=True)
    same(state(a), state(b))
    max_rm = np.full(cells_mod.LLAMA_MAX_SEQ, -1, dtype=np.int64)
    np.maximum.at(max_rm, own, pos.astype(np.int64))
    seqs = np.flatnonzero(max_rm >= 0)
    got = a.purge_owned_upto(max_rm)
    want = b.seq_rm_upto(seqs, np.zeros(seqs.size, np.int64), max_rm[seqs])
    np.testing.assert_array_equal(got, want)
    same(state(a), state(b))
    if seed % 2:  # under a journal both roll back to the same cells
        a.rollback()
        b.rollback()
        same(state(a), state(b))


@pytest.mark.parametrize("swa_type", ["standard", "chunked", "symmetric"])
@pytest.mark.parametrize("seed", range(3))
def test_swa_overwrite_equals_general_path(monkeypatch, swa_type, seed):
    # random decodes on a unified SWA cache (one token per sequence, longer ubatches, a
    # token of several sequences now and then, tails removed and decoded again): the
    # overwrite through rm_owned / purge_owned_upto against the general rm / seq_rm_upto
    kind = {"standard": SWAType.STANDARD, "chunked": SWAType.CHUNKED,
            "symmetric": SWAType.SYMMETRIC}[swa_type]  # fmt: skip
    rng = np.random.default_rng(5200 + seed)
    caches = [make_kv(48, 4, swa_type=kind, n_swa=4, unified=True) for _ in range(2)]
    nxt = [0, 0, 0, 0]
    for step in range(60):
        r = rng.random()
        if r < 0.1:
            q = int(rng.integers(0, 4))
            cut = max(0, nxt[q] - int(rng.integers(1, 4)))
            for kv in caches:
                kv.seq_rm(q, cut, -1)
            nxt[q] = cut
            continue
        items = []
        for q in rng.permutation(4)[: int(rng.integers(1, 5))].tolist():
            for _ in range(int(rng.integers(1, 3))):
                items.append([1, nxt[q], [q], True])
                nxt[q] += 1
        if r > 0.9 and nxt[0] == nxt[1]:  # one token of sequences 0 and 1
            items.append([1, nxt[0], [0, 1], True])
            nxt[0] += 1
            nxt[1] += 1
        res, n_ubatch = [], int(rng.integers(1, 6))
        for i, kv in enumerate(caches):
            with monkeypatch.context() as m:
                m.setattr(cache_mod, "OVERWRITE_OWNED", i == 0)
                res.append(decode(kv, items, n_ubatch=n_ubatch).code)
        assert res[0] == res[1], step
        same(state(caches[0].cells), state(caches[1].cells))
        assert list(caches[0].v_heads) == list(caches[1].v_heads), step
        if res[0] != 0:  # did not fit: both unchanged, positions as before the batch
            nxt = [kv_max + 1 for kv_max in (caches[0].seq_pos_max(q) for q in range(4))]
    check_invariants(caches[0])


@pytest.mark.parametrize("n", [0, 5, 1023, 1024, 5000])
def test_put_rows_equals_fancy_assignment(n):
    # np.put from _PUT_MIN cells on, fancy assignment below; on the stack's flat items and
    # on a stream's view of them (KVCells._rows)
    rng = np.random.default_rng(n)
    st = StackedCells(2, 8192)
    st.seq[:] = rng.integers(0, 2**63, st.seq.shape, dtype=np.uint64)
    want = st.seq.copy()
    item = np.array([1, 2, 3, 4], dtype=np.uint64).view(st.row)[0]
    idx = np.sort(rng.choice(8192, n, replace=False)).astype(np.int64)
    cells_mod.put_rows(st.rows_f, idx + 8192, item)
    want.reshape(-1, 4)[idx + 8192] = [1, 2, 3, 4]
    view = st.rows_f[:8192]
    cells_mod.put_rows(view, idx)
    want[0, idx] = 0
    np.testing.assert_array_equal(st.seq, want)


@pytest.mark.parametrize("swa", ["none", "standard", "chunked"])
@pytest.mark.parametrize("seed", range(3))
def test_slot_search_through_a_slice_equals_gather_path(monkeypatch, swa, seed):
    # a one-stream find_slot of >= SLOT_SLICE_MIN tokens tests the head window through a
    # slice (then scans): the same cells as the gather path, from every head, on caches
    # with holes, SWA-masked cells and dirty bounds
    kind = {"none": SWAType.NONE, "standard": SWAType.STANDARD, "chunked": SWAType.CHUNKED}[swa]
    rng = np.random.default_rng(6300 + seed)
    kw = {} if kind == SWAType.NONE else {"swa_type": kind, "n_swa": 64}
    kv = make_kv(1024, 4, unified=True, **kw)
    for q in range(4):
        n = int(rng.integers(50, 250))
        idx = np.sort(rng.choice(np.flatnonzero(kv.v_cells[0].pos < 0), n, replace=False))
        kv.v_cells[0].set_new(idx, np.arange(n), np.full((n, 1), q, np.int32))
        kv.seq_rm(q, int(rng.integers(0, n)), int(rng.integers(0, n)))  # holes, dirty bounds
    for _ in range(12):
        n = int(rng.integers(256, 700))
        ub = _restore_ubatch(1, 0, np.arange(n, dtype=np.int32), None)
        kv.v_heads[:] = [int(rng.integers(0, 1025))]
        got = kv.find_slot(ub, False)
        with monkeypatch.context() as m:
            m.setattr(cache_mod, "SLOT_SLICE_MIN", 1 << 62)
            want = kv.find_slot(ub, False)
        assert (got is None) == (want is None)
        if got is not None:
            np.testing.assert_array_equal(got.strm, want.strm)
            np.testing.assert_array_equal(got.idxs, want.idxs)


def _lockstep_cache(
    seed: int,
    n_cells: int = 300,
    steps: int = 40,
    hole: bool = True,
    run: tuple[int, int] = (1, 6),
    **kw,
):
    """Four sequences decoded in random interleaved steps (``run``: 1-5 tokens each), then
    (``hole``) a hole cut in one; ``kw`` go to the cache (``unified=False``: a stream each)."""
    rng = np.random.default_rng(seed)
    kv = make_kv(n_cells, 4, **kw)
    pos = [0] * 4
    for _ in range(steps):
        items = []
        for s in rng.permutation(4)[: int(rng.integers(1, 5))]:
            for _ in range(int(rng.integers(*run))):
                items.append([1, pos[s], [int(s)], False])
                pos[s] += 1
        decode(kv, items, n_ubatch=len(items))
    if hole:
        kv.seq_rm(1, 3, 9)  # dirty bounds
    return kv


@pytest.mark.parametrize("first", [1024, 3], ids=["one-pass", "second-pass"])
@pytest.mark.parametrize("seed", range(4))
def test_native_range_scan_equals_numpy_scan(monkeypatch, seed: int, first: int) -> None:
    # seq_cells_in_all's position-range scan in C (pm_kv_seq_cells_range, where no cell is
    # shared) and the numpy scan give the same cells for every sequence and range, including
    # ranges past the positions, empty ranges and p0 = 0; and seq_rm through either leaves
    # the same cache. first 3: most ranges find more cells than the first array holds and
    # take the second pass
    monkeypatch.setattr(cells_mod, "_RANGE_FIRST", first)
    monkeypatch.setattr(cells_mod, "_RANGE_FIRST_MAX", first)  # (3: no room by the range)
    monkeypatch.setattr(cache_mod, "USE_NATIVE_RM", False)  # seq_rm through the scan
    kv = _lockstep_cache(seed)
    cells = kv.v_cells[0]
    assert not cells.n_multi
    ranges = [(0, 5), (3, 9), (7, 1 << 31), (40, 41), (0, 1 << 40), (1000, 2000), (5, 5)]
    for s in range(4):
        for p0, p1 in ranges:
            got, _ = cells.seq_cells_in_all(s, p0, p1)
            with monkeypatch.context() as m:
                m.setattr(cells_mod, "USE_NATIVE_RANGE", False)
                want, _ = cells.seq_cells_in_all(s, p0, p1)
            assert got.tolist() == want.tolist(), (s, p0, p1)
            mask = (cells.owner == s) & (cells.pos >= p0) & (cells.pos < p1)
            assert got.tolist() == np.flatnonzero(mask).tolist()
    twin = _lockstep_cache(seed)
    same(state(kv.cells), state(twin.cells))
    with monkeypatch.context() as m:
        m.setattr(cells_mod, "USE_NATIVE_RANGE", False)
        twin.seq_rm(2, 11, -1)
        twin.seq_rm(0, 2, 6)
    kv.seq_rm(2, 11, -1)
    kv.seq_rm(0, 2, 6)
    same(state(kv.cells), state(twin.cells))
    check_invariants(kv)


@pytest.mark.parametrize("seed", range(3))
def test_native_range_scan_takes_shared_cells_by_their_bits(monkeypatch, seed: int) -> None:
    # with forks (cells shared by several sequences, owner -2) the native scan takes a
    # shared cell by the sequence's bit: the same cells as the numpy scan for every
    # sequence and range, the whole-sequence cover too, and seq_cp / seq_rm through either
    # leave the same cache
    monkeypatch.setattr(cache_mod, "USE_NATIVE_RM", False)  # seq_rm through the scan
    kv, twin = _lockstep_cache(seed), _lockstep_cache(seed)

    def forks(c) -> None:  # type: ignore[no-untyped-def]
        c.seq_cp(0, 3, 2, 9)
        c.seq_cp(2, 1, 0, 5)
        c.seq_cp(3, 2, -1, -1)

    forks(kv)
    with monkeypatch.context() as m:
        m.setattr(cells_mod, "USE_NATIVE_RANGE", False)
        forks(twin)
    same(state(kv.cells), state(twin.cells))
    cells = kv.v_cells[0]
    assert cells.n_multi
    ranges = [(0, 5), (3, 9), (7, 1 << 31), (40, 41), (0, 1 << 40), (1000, 2000), (5, 5)]
    for q in range(4):
        bit = (cells.seq[:, 0] >> np.uint64(q)) & np.uint64(1)
        for p0, p1 in [*ranges, (0, -1)]:
            lo, hi = (0, 1 << 40) if p1 < 0 else (p0, p1)
            got, whole = cells.seq_cells_in_all(q, lo, hi)
            with monkeypatch.context() as m:
                m.setattr(cells_mod, "USE_NATIVE_RANGE", False)
                want, whole_want = cells.seq_cells_in_all(q, lo, hi)
            assert got.tolist() == want.tolist() and whole == whole_want, (q, p0, p1)
            mask = (bit != 0) & (cells.pos >= lo) & (cells.pos < hi)
            assert got.tolist() == np.flatnonzero(mask).tolist(), (q, p0, p1)
    with monkeypatch.context() as m:
        m.setattr(cells_mod, "USE_NATIVE_RANGE", False)
        twin.seq_rm(2, 1, 6)
        twin.seq_rm(3, -1, -1)
    kv.seq_rm(2, 1, 6)
    kv.seq_rm(3, -1, -1)
    same(state(kv.cells), state(twin.cells))
    check_invariants(kv)


@pytest.mark.parametrize(
    "long_runs, wide", [(False, False), (True, False), (True, True)],
    ids=["short-runs", "long-runs", "long-runs-two-words"],
)  # fmt: skip
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("seed", range(6))
def test_native_seq_rm_equals_reference(
    monkeypatch, seed: int, unified: bool, long_runs: bool, wide: bool
) -> None:
    # KVCache.seq_rm of one sequence through one native pass (pm_step_kv_rm_seq) and
    # through seq_cells_in_all + seq_rm_bit leave the same cells, bounds (clean or stale),
    # used counts, heads; random removals: tails, middles, whole sequences, empty and
    # reversed ranges, ranges past the positions, forks (shared cells: the kernel declines).
    # Long runs: sequences decoded 24-63 tokens a step, so whole 32-cell blocks of one
    # sequence (the kernel's block stores) meet blocks it shares with another; two words:
    # the bitsets widened first (the block's bitset stores are strided then)
    shape = (2048, 8, (24, 64)) if long_runs else (256, 30, (1, 6))
    fast, ref = (
        _lockstep_cache(seed, shape[0], shape[1], hole=False, run=shape[2], unified=unified)
        for _ in range(2)
    )
    for kv in (fast, ref) if wide else ():
        kv.cells.fit(100)
        assert kv.cells.n_words == 2
    rng = np.random.default_rng(100 + seed)
    taken = []
    real = cache_mod.KVCache._seq_rm_native

    def counted(self, *a):
        done = real(self, *a)
        taken.append(done)
        return done

    monkeypatch.setattr(cache_mod.KVCache, "_seq_rm_native", counted)
    for step in range(40):
        s = int(rng.integers(0, 4))
        kind = int(rng.integers(0, 6))
        hi = int(fast.seq_pos_max(s)) + 2  # (a query may refresh stale bounds: ask both)
        assert int(ref.seq_pos_max(s)) + 2 == hi
        p0 = int(rng.integers(0, max(hi, 1)))
        p0, p1 = [(p0, -1), (p0, p0 + int(rng.integers(1, 6))), (-1, -1), (p0, p0),
                  (p0 + 3, p0), (hi + 5, -1)][kind]  # fmt: skip
        if step % 9 == 4 and unified:
            fast.seq_cp(s, (s + 1) % 4, -1, -1)  # shared cells: the kernel declines
            ref.seq_cp(s, (s + 1) % 4, -1, -1)
        fast.seq_rm(s, p0, p1)
        with monkeypatch.context() as m:
            m.setattr(cache_mod, "USE_NATIVE_RM", False)
            ref.seq_rm(s, p0, p1)
        same(state(fast.cells), state(ref.cells))
        assert fast.v_heads.a.tolist() == ref.v_heads.a.tolist(), step
        check_invariants(fast)
        check_invariants(ref)
    assert any(taken)


def test_native_seq_rm_refuses_bad_arguments_and_leaves_the_cells() -> None:
    """``pm_step_kv_seq_rm`` names what it cannot take (null pointers, p0 < 0: PM_ERR_ARG;
    a stream or an id outside the stack: PM_ERR_RANGE) and changes nothing; a range its
    clean bounds miss removes nothing, without a scan, and keeps the heads (NULL heads:
    no head moves)."""
    kv = make_kv(16, 2)
    decode(kv, [[1, p, [0], False] for p in range(4)], n_ubatch=4)
    c = kv.cells.native()
    out, done = ffi.new("int64_t[2]"), ffi.new("int32_t *")
    snap = [x.copy() for x in (kv.cells.pos, kv.cells.owner, kv.cells.seq, kv.cells.pmin)]
    heads = ffi.from_buffer("int64_t[]", kv.v_heads.a, require_writable=True)
    bad = [
        (ffi.NULL, heads, 0, 0, 0, 9, out, out + 1, done, lib.PM_ERR_ARG),
        (c, heads, 0, 0, -1, 9, out, out + 1, done, lib.PM_ERR_ARG),
        (c, heads, 0, 0, 0, 9, ffi.NULL, out + 1, done, lib.PM_ERR_ARG),
        (c, heads, 0, 0, 0, 9, out, out + 1, ffi.NULL, lib.PM_ERR_ARG),
        (c, heads, 1, 0, 0, 9, out, out + 1, done, lib.PM_ERR_RANGE),
        (c, heads, -1, 0, 0, 9, out, out + 1, done, lib.PM_ERR_RANGE),
        (c, heads, 0, 256, 0, 9, out, out + 1, done, lib.PM_ERR_RANGE),
        (c, heads, 0, -1, 0, 9, out, out + 1, done, lib.PM_ERR_RANGE),
    ]
    for *args, want in bad:
        assert lib.pm_step_kv_seq_rm(*args) == want, args
    for a, b in zip(snap, (kv.cells.pos, kv.cells.owner, kv.cells.seq, kv.cells.pmin)):
        assert np.array_equal(a, b)
    head = int(kv.v_heads.a[0])
    assert lib.pm_step_kv_seq_rm(c, heads, 0, 0, 10, 20, out, out + 1, done) == lib.PM_OK
    assert done[0] == 1 and out[0] == 0 and out[1] == -1  # clean bounds [0, 3] missed
    assert lib.pm_step_kv_seq_rm(c, ffi.NULL, 0, 0, 1, 3, out, out + 1, done) == lib.PM_OK
    assert (done[0], out[0], out[1]) == (1, 2, 1) and int(kv.v_heads.a[0]) == head
    assert lib.pm_step_kv_seq_rm(c, heads, 0, 0, 0, 1, out, out + 1, done) == lib.PM_OK
    assert (out[0], out[1]) == (1, 0) and int(kv.v_heads.a[0]) == 0  # back to cell 0
    assert kv.v_cells[0].pos.tolist()[:4] == [-1, -1, -1, 3]
    check_invariants(kv)


def test_new_rows_of_says_distinct_exactly_when_no_key_repeats() -> None:
    # NewRows.of skips np.unique for one token and for one sequence in one stream: the
    # answer must be the sort's in every case
    rng = np.random.default_rng(3)
    cases = [(np.array([0]), 5, np.full((5, 1), 7)), (np.array([0]), 1, np.array([[7]])),
             (np.array([2]), 4, np.array([[1], [1], [2], [1]])),
             (np.array([0, 1]), 2, np.array([[3], [3], [3], [3]])),
             (np.array([0, 1]), 1, np.array([[3], [3]]))]  # fmt: skip
    for _ in range(200):
        n_str = int(rng.integers(1, 4))
        n_per = int(rng.integers(1, 5))
        strm = rng.choice(8, n_str, replace=False)
        ids = rng.integers(0, 3 if rng.random() < 0.5 else 200, (n_str * n_per, 1))
        cases.append((strm, n_per, ids))
    for strm, n_per, ids in cases:
        got = cells_mod.NewRows.of(strm, n_per, ids)
        rows = np.repeat(strm, n_per) if strm.size > 1 else np.full(ids.shape[0], strm[0])
        key = rows * 256 + ids[:, 0]
        assert got.simple and got.distinct == (np.unique(key).size == key.size), (strm, ids)
        assert np.array_equal(got.key, key)


@pytest.mark.parametrize("shifted", [False, True])
def test_native_removal_of_every_position_keeps_a_cell_at_the_largest_position(
    shifted: bool,
) -> None:
    """pm_step_kv_rm_seq over every position [0, INT32_MAX) counts a block's cells by their
    owners alone, but a cell at position INT32_MAX lies past the range and stays (the
    reference's p1 is exclusive): its block is then taken cell by cell. The removed cells'
    shifts are cleared when the stream has a shift pending (``has_shift``)."""
    st = StackedCells(1, 64, n_seq_ids=8)
    pos = np.arange(64, dtype=np.int32)
    pos[37] = 2**31 - 1
    st.set_new(np.array([0]), np.arange(64)[None, :], pos, np.zeros((64, 1), np.int32))
    if shifted:
        st.shift[0, :] = 3
        st.has_shift[0] = True
    c = st.native()
    out = ffi.new("int64_t[2]")
    done = ffi.new("int32_t *")
    assert lib.pm_step_kv_rm_seq(c, 0, 0, 0, 2**31 - 1, 0, 64, out, out + 1, done) == lib.PM_OK
    assert done[0] == 1 and out[0] == 63 and out[1] == 0
    assert st.owner[0].tolist() == [-1] * 37 + [0] + [-1] * 26
    assert st.pos[0, 37] == 2**31 - 1 and (np.delete(st.pos[0], 37) == -1).all()
    assert int(st.used[0]) == 1
    assert (np.delete(st.shift[0], 37) == 0).all() and st.shift[0, 37] == (3 if shifted else 0)


@pytest.mark.parametrize("at", [0, 13, 31, 32, 63])
def test_native_seq_rm_finds_a_lone_shared_cell_anywhere_in_a_block(monkeypatch, at: int) -> None:
    # one cell shared by sequences 0 and 1 among 64 cells of sequence 0 (the block scan
    # for shared cells tests 32 at a time: any place in a block, either block); removing
    # sequence 1, then a range of sequence 0 around it, leaves what the reference leaves
    def filled() -> cache_mod.KVCache:
        kv = make_kv(64, 2)
        decode(kv, [[1, p, [0, 1] if p == at else [0], False] for p in range(64)])
        assert int(kv.v_cells[0].owner[at]) == -2 and int(kv.cells.n_multi[0]) == 1
        return kv

    fast, ref = filled(), filled()
    for s, p0, p1 in ((1, -1, -1), (0, max(at - 1, 0), at + 2)):
        fast.seq_rm(s, p0, p1)
        with monkeypatch.context() as m:
            m.setattr(cache_mod, "USE_NATIVE_RM", False)
            ref.seq_rm(s, p0, p1)
        same(state(fast.cells), state(ref.cells))
        check_invariants(fast)
    assert int(fast.cells.n_multi[0]) == 0 and int(fast.v_cells[0].owner[at]) == -1


def test_position_range_scan_equals_numpy_at_the_int32_edges() -> None:
    # pm_kv_seq_cells_range's block test (pm_range_mask32: an unsigned compare done as a
    # signed one) against numpy: positions at 0, INT32_MAX and either side of the range's
    # ends, empty cells (-1), ranges from empty to the whole int32 span, one hit per block
    rng = np.random.default_rng(73)
    top = np.iinfo(np.int32).max
    for size in (32, 100, 1024):
        for trial in range(40):
            p0 = int(rng.choice([0, 1, 5, 1 << 20, top - 3, top - 1]))
            p1 = int(rng.choice([p0, p0 + 1, p0 + 7, p0 + (1 << 30), top]))
            p1 = min(p1, top)
            edges = [-1, 0, p0 - 1, p0, p0 + 1, p1 - 1, p1, p1 + 1, top - 1, top]
            pos = rng.choice([e for e in edges if -1 <= e <= top], size).astype(np.int32)
            if trial % 5 == 0:  # sparse: a single candidate per block at most
                pos[:] = -1
                for b in range(0, size, 32):
                    pos[b + int(rng.integers(0, min(32, size - b)))] = p0
            owner = rng.integers(-2, 2, size).astype(np.int32)
            # (two words a cell: sequence 64 is word 1's bit 0, sequence 0 word 0's)
            bits = rng.integers(0, 4, (size, 2)).astype(np.uint64)
            in_range = (pos >= p0) & (pos.astype(np.int64) < p1)
            for q, with_bits in ((0, False), (0, True), (64, True)):
                held = bits[:, q >> 6] & np.uint64(1 << (q & 63)) != 0
                want = np.flatnonzero(
                    in_range & ((owner == q) | (with_bits & (owner == -2) & held))
                )
                out = np.empty(size, dtype=np.int64)
                count = ffi.new("int64_t *")
                status = lib.pm_kv_seq_cells_range(
                    ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("int32_t[]", owner),
                    ffi.from_buffer("uint64_t[]", bits) if with_bits else ffi.NULL, 2, size, q,
                    p0, p1, ffi.from_buffer("int64_t[]", out, require_writable=True), size, count,
                )  # fmt: skip
                assert status == lib.PM_OK
                assert out[: int(count[0])].tolist() == want.tolist(), (size, trial, p0, p1, q)
    bad = np.zeros(4, dtype=np.int32)
    count = ffi.new("int64_t *")
    # with bitsets one to four words a cell; a negative id (the owners' markers) refused
    for n_words, q in ((0, 0), (5, 0), (1, -2), (1, -1)):
        assert lib.pm_kv_seq_cells_range(
            ffi.from_buffer("int32_t[]", bad), ffi.from_buffer("int32_t[]", bad),
            ffi.from_buffer("uint64_t[]", np.zeros(4, np.uint64)), n_words, 4, q, 0, 1, ffi.NULL, 0,
            count,
        ) == lib.PM_ERR_ARG  # fmt: skip
