"""The native decode-step kernels (csrc/pymem_step.c) against the numpy code they replace.

Pins: ``pm_step_batch_check`` (``BatchAllocator.init`` of a one-token-per-sequence batch)
accepts and refuses exactly the batches the numpy checks do, with the same output flags,
position table and output count; ``pm_step_kv_find`` / ``pm_step_kv_place`` (a KV
cache's head-window slot, window-masked cells of an SWA cache included, and the
placement of a replayed ubatch: one token per stream, or a unified cache's block of one
token per sequence) leave every cell array, per-stream
counter, cached bound and head byte-equal to the numpy path's, on caches whose streams
wrap, overwrite window-masked cells (``pm_step_kv_overwrite`` on one stream: emptied,
placed, the losers' older positions purged; with streams place runs after numpy emptied
them) and lose cells to ``seq_rm``; where a head cell is taken the kernels decline, change nothing, and
the numpy path decides.
"""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, make_kv
from test_batch_decode_path import FakeMemory, decode_batch
from test_kv_batched import SWA_KINDS, state_of
from test_kv_decode_path import _drive

import pymem.batch as batch_mod
import pymem.kv.cache as kv_cache
from pymem._native import check, ffi, lib
from pymem.batch import Batch, BatchAllocator
from pymem.errors import NativeError
from pymem.ubatch import LLAMA_MAX_SEQ

CELL_ARRAYS = ("pos", "shift", "seq", "owner", "used", "used_max_p1", "used_max_dirty",
               "has_shift", "n_multi", "pmin", "pmax", "pdirty")  # fmt: skip


def _layout(balloc: BatchAllocator, batch: Batch, n_seq_max: int):
    lay = balloc._layout_of(batch, n_seq_max)
    assert lay is not None
    return lay


def _same_checks(a, b) -> None:
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    (oa, pa, na), (ob, pb, nb) = a, b
    assert oa.dtype == ob.dtype == np.int8 and oa.tobytes() == ob.tobytes()
    assert pa.dtype == pb.dtype == np.int32 and pa.tobytes() == pb.tobytes()
    assert na == nb == int(np.count_nonzero(oa))


@pytest.mark.parametrize("seed", range(20))
def test_batch_check_equals_numpy(seed: int) -> None:
    """Valid and broken batches (token out of range, negative or non-consecutive position,
    output flags bool / int8 / None, no memory, shuffled ids): the same verdict and values."""
    rng = np.random.default_rng(seed)
    n_seq_max = int(rng.integers(1, 40))
    seqs = rng.permutation(n_seq_max)[: int(rng.integers(1, n_seq_max + 1))]
    pmax = {int(s): int(rng.integers(-1, 50)) for s in range(n_seq_max)}
    balloc = BatchAllocator()
    for case in range(12):
        batch = decode_batch(rng, seqs, pmax)
        assert batch.token is not None and batch.pos is not None
        if case == 1:
            batch.token[int(rng.integers(0, seqs.size))] = 100  # n_vocab is 100
        elif case == 2:
            batch.token[0] = -1
        elif case == 3:
            batch.pos[int(rng.integers(0, seqs.size))] += 1 + int(rng.integers(0, 3))
        elif case == 4:
            batch.pos[-1] = -1
        elif case == 5:
            batch.output = (rng.random(seqs.size) < 0.5).astype(np.int8) * np.int8(-3)
        lay = _layout(balloc, batch, n_seq_max)
        for memory, n_vocab in ((FakeMemory(pmax), 100), (None, None), (FakeMemory(pmax), None)):
            ref = batch_mod._check_one_per_seq(batch, lay, memory, n_vocab)
            got = batch_mod._check_one_per_seq_native(batch, lay, memory, n_vocab)
            _same_checks(got, ref)
        if case in (0, 5):
            assert batch_mod._check_one_per_seq(batch, lay, FakeMemory(pmax), 100) is not None


def test_batch_check_refuses_bad_ids() -> None:
    """The kernel's own safety net: a sequence id outside the 256-entry table is refused."""
    out = np.empty(1, np.int8)
    table = np.empty(LLAMA_MAX_SEQ, np.int32)
    n_out, ok = ffi.new("int64_t *"), ffi.new("int32_t *")
    one = np.ones(1, np.int32)
    status = lib.pm_step_batch_check(
        ffi.from_buffer("int32_t[]", one), ffi.from_buffer("int32_t[]", one),
        ffi.from_buffer("int64_t[]", np.array([LLAMA_MAX_SEQ], np.int64)), 1, ffi.NULL, ffi.NULL,
        -1, ffi.NULL, ffi.from_buffer("int8_t[]", out), ffi.from_buffer("int32_t[]", table),
        n_out, ok,
    )  # fmt: skip
    assert status == lib.PM_ERR_RANGE and ok[0] == 0


def _cells_bytes(kv) -> list[bytes]:
    st = kv.cells
    return [getattr(st, name).tobytes() for name in CELL_ARRAYS] + [kv.v_heads.a.tobytes()]


def _drive_twins(monkeypatch, twins, allocs, seqs, pos) -> None:
    got = []
    for native, kv, balloc in zip((True, False), twins, allocs):
        monkeypatch.setattr(kv_cache, "USE_NATIVE", native)
        got.append(_drive(kv, balloc, seqs, pos, np.float32))
    assert got[0] == got[1]
    assert _cells_bytes(twins[0]) == _cells_bytes(twins[1])
    assert state_of(twins[0]) == state_of(twins[1])


@pytest.mark.parametrize(
    "unified, fork",
    [(False, False), (True, False), (True, True)],
    ids=["streams", "unified", "forked"],
)
@pytest.mark.parametrize("swa_type", SWA_KINDS)
@pytest.mark.parametrize("v_trans", [True, False])
def test_kv_decode_steps_native_equal_numpy(monkeypatch, swa_type, v_trans, unified, fork) -> None:
    """Twin caches, one stepped through the kernels, one through numpy: equal slots,
    inputs and cell bytes after every step, across wrap-arounds (16 cells a stream, 40
    unified), SWA overwrites, layout changes and removals; ``fork``: every sequence starts
    from one prompt copied by seq_cp (cells shared by all of them, a parallel-sampling
    run), which the placements must leave shared."""
    rng = np.random.default_rng(40 + int(swa_type) + 10 * v_trans + 100 * unified + 1000 * fork)
    swa = {} if swa_type == 0 else {"swa_type": swa_type, "n_swa": 4}
    n_seq = 6
    size, full = (40, 34) if unified else (16, 14)
    twins = [make_kv(size, n_seq, unified=unified, v_trans=v_trans, **swa) for _ in range(2)]
    allocs = [BatchAllocator(), BatchAllocator()]
    calls = dict.fromkeys(
        (
            "find",
            "find_taken",
            "place",
            "place_shared",
            "after_rm",
            "overwrite",
            "overwrite_shared",
        ),
        0,
    )
    find, place = kv_cache.KVCache._find_slot_native, kv_cache.KVCache._place_native

    def count_find(self, memo, n_per):
        res = find(self, memo, n_per)
        calls["find"] += res is not None
        if res is not None:  # window-masked cells the kernel found usable
            calls["find_taken"] += bool((self.cells.pos_f[memo.offs + res.idxs] >= 0).any())
        return res

    def count_place(self, memo, sinfo, ubatch, *, heads):
        res = place(self, memo, sinfo, ubatch, heads=heads)
        calls["place" if heads else "after_rm"] += res
        calls["place_shared"] += res and bool(self.cells.n_multi.any())
        return res

    overwrite = kv_cache.KVCache._overwrite_native

    def count_overwrite(self, sinfo, ubatch):
        shared = bool(self.cells.n_multi.any())
        res = overwrite(self, sinfo, ubatch)
        calls["overwrite"] += res
        calls["overwrite_shared"] += res and shared
        return res

    monkeypatch.setattr(kv_cache.KVCache, "_find_slot_native", count_find)
    monkeypatch.setattr(kv_cache.KVCache, "_place_native", count_place)
    monkeypatch.setattr(kv_cache.KVCache, "_overwrite_native", count_overwrite)
    layouts = [list(range(n_seq)), [1, 3, 4], [2]]
    if fork:
        _drive_twins(monkeypatch, twins, allocs, [0] * 4, [0, 1, 2, 3])
        for kv in twins:
            for s in range(1, n_seq):
                kv.seq_cp(0, s, -1, -1)
        assert twins[0].cells.n_multi[0] == 4
    for step in range(60):
        seqs = layouts[(step // 5) % len(layouts)]
        pos = [twins[0].seq_pos_max(s) + 1 for s in seqs]
        if swa_type == 0 and int(twins[0].cells.used.max()) >= full:
            for kv in twins:  # without a window a full stream refuses: make room
                for s in range(n_seq):
                    kv.seq_rm(s, -1, kv.seq_pos_max(s) - 4)
            continue
        _drive_twins(monkeypatch, twins, allocs, seqs, pos)
        if step % 7 == 6:
            s = int(rng.integers(0, n_seq))
            for kv in twins:
                kv.seq_rm(s, max(0, kv.seq_pos_max(s) - 2), -1)
        for kv in twins:  # both: the checks refresh lazily kept bounds
            check_invariants(kv)
    assert calls["find"] > 5 and calls["place"] > 5
    assert (calls["place_shared"] > 0) == fork  # a forked prompt's cells stop no placement
    if swa_type != 0:  # the windows overwrite: one kernel for a unified cache, else numpy
        # empties the cells and the kernel places; forked, the kernel's purge meets shared
        # cells
        assert calls["overwrite" if unified else "after_rm"] > 0 and calls["find_taken"] > 0
        assert (calls["overwrite_shared"] > 0) == fork


def test_kv_kernels_decline_taken_cells_and_change_nothing() -> None:
    """A head cell that is not empty: find1 and apply1 report not placed, no byte moves;
    a stream or cell outside the stack is a range error."""
    kv = make_kv(8, 3, unified=False)
    balloc = BatchAllocator()
    for p in range(3):
        _drive(kv, balloc, [0, 1, 2], [p, p, p], np.float32)
    c, heads, *_ = kv._native_cells()
    before = _cells_bytes(kv)
    strm = np.array([0, 1, 2], np.int64)
    idx = np.array([[3], [1], [3]], np.int32)  # stream 1's cell 1 holds position 1
    pos = np.array([3, 3, 3], np.int32)
    seq = np.array([[0], [1], [2]], np.int32)
    placed = ffi.new("int32_t *")
    top = ffi.new("int64_t *")
    args = (ffi.from_buffer("int32_t[]", idx), ffi.from_buffer("int32_t[]", pos),
            ffi.from_buffer("int32_t[]", seq), heads, top, placed)  # fmt: skip
    assert lib.pm_step_kv_place(c, ffi.from_buffer("int64_t[]", strm), 3, 1, *args) == lib.PM_OK
    assert placed[0] == 0 and _cells_bytes(kv) == before
    kv.v_heads.a[1] = 0  # the head window of stream 1 is taken
    out = np.empty((3, 1), np.int32)

    def find1(streams: np.ndarray) -> int:
        return lib.pm_step_kv_find(
            c, ffi.from_buffer("int64_t[]", streams), streams.size, 1, heads, 0, 0,
            ffi.from_buffer("int32_t[]", out), placed,
        )  # fmt: skip

    assert find1(strm) == lib.PM_OK and placed[0] == 0
    assert find1(np.array([0, 3], np.int64)) == lib.PM_ERR_RANGE
    with pytest.raises(NativeError, match="out of range"):
        check(lib.PM_ERR_RANGE, "pm_step_kv_find")


@pytest.mark.parametrize("swa_type", SWA_KINDS)
def test_native_step_masks_equal_numpy(monkeypatch, swa_type) -> None:
    """``pm_step_kq_mask`` (one stream per sequence, replayed ubatches) writes the bytes of
    ``build_kq_mask`` for every causal / non-causal option, f16 and f32, on streams that
    wrap, overwrite window-masked cells and lose cells to ``seq_rm``."""
    from test_kv_decode_path import MASK_OPTIONS

    rng = np.random.default_rng(70 + int(swa_type))
    swa = {} if swa_type == 0 else {"swa_type": swa_type, "n_swa": 3}
    kv = make_kv(16, 5, unified=False, **swa)
    balloc = BatchAllocator()
    taken = []
    native = kv_cache.KVCacheContext._kq_mask_native

    def counted(self, *a):
        res = native(self, *a)
        taken.extend([1] * (res is not None))
        return res

    monkeypatch.setattr(kv_cache.KVCacheContext, "_kq_mask_native", counted)
    for step in range(30):
        seqs = [0, 1, 2, 3, 4] if step % 10 < 7 else [1, 3]
        if swa_type == 0 and int(kv.cells.used.max()) >= 14:
            for s in range(5):
                kv.seq_rm(s, -1, kv.seq_pos_max(s) - 3)
        pos = np.array([kv.seq_pos_max(s) + 1 for s in seqs], np.int32)
        balloc.init(Batch(pos + 1, pos=pos, seq_id=seqs), memory=kv, n_seq_max=5)
        ctx = kv.init_batch(balloc, 512, False)
        ctx.apply()
        for opts in MASK_OPTIONS:
            for dtype in (np.float16, np.float32):
                monkeypatch.setattr(kv_cache, "USE_NATIVE", True)
                got = ctx.get_kq_mask(dtype=dtype, **opts)
                monkeypatch.setattr(kv_cache, "USE_NATIVE", False)
                ref = ctx.get_kq_mask(dtype=dtype, **opts)
                assert got.dtype == ref.dtype and got.shape == ref.shape
                assert got.tobytes() == ref.tobytes(), (step, opts, dtype)
        if step % 6 == 5:
            s = int(rng.integers(0, 5))
            kv.seq_rm(s, max(0, kv.seq_pos_max(s) - 1), -1)
    assert len(taken) > 100


def test_init_update_without_work_shares_one_no_update_context() -> None:
    """A decode step's ``init_update`` with nothing pending returns the same NO_UPDATE
    context every time (KV cache, recurrent memory, iSWA and hybrid composites); apply()
    does nothing. A pending K-shift still gets a fresh context that applies it."""
    from test_hybrid import make_hybrid

    from pymem.memory import MemoryStatus

    kv = make_kv(16, 2)
    mems = [
        kv,
        make_hybrid("RAR", kv_size=32, n_seq_max=2),
        make_hybrid("RSAR", kv_size=32, n_seq_max=2),
    ]
    for mem in mems:
        a, b = mem.init_update(False), mem.init_update(False)
        assert a is b and a.get_status() == MemoryStatus.NO_UPDATE and a.apply()
    _drive(kv, BatchAllocator(), [0, 1], [0, 0], np.float32)
    kv.seq_add(0, 0, -1, 2)
    upd = kv.init_update(False)
    assert upd.get_status() == MemoryStatus.SUCCESS and upd is not kv.init_update(False)
    assert upd.apply() and not kv.get_has_shift()
    assert kv.init_update(False).get_status() == MemoryStatus.NO_UPDATE


@pytest.mark.parametrize("unified", [True, False])
def test_native_pos_bounds_of_frozen_ids_equal_numpy(monkeypatch, unified) -> None:
    """``seq_pos_max_of`` of the allocator's frozen ids read natively (KV:
    ``pm_step_kv_pos_max``, declining on a stale bound; recurrent: ``pm_step_rs_pos``)
    equals the numpy query and the scalar one after decodes, removals, shifts and forks."""
    from test_recurrent import make_rec, ub

    import pymem.recurrent.cells as rc

    kv = make_kv(32, 4, unified=unified)
    rec = make_rec(n_seq=4)
    ids = np.array([2, 0, 3, 1], dtype=np.int32)
    ids.flags.writeable = False
    balloc = BatchAllocator()

    def check() -> None:
        for mem in (kv, rec):
            got = mem.seq_pos_max_of(ids)  # the memo is made on the first call
            got = mem.seq_pos_max_of(ids)
            monkeypatch.setattr(kv_cache, "USE_NATIVE", False)
            monkeypatch.setattr(rc, "USE_NATIVE", False)
            ref = mem.seq_pos_max_of(ids)
            monkeypatch.setattr(kv_cache, "USE_NATIVE", True)
            monkeypatch.setattr(rc, "USE_NATIVE", True)
            assert got.dtype == ref.dtype == np.int64
            assert got.tolist() == ref.tolist() == [mem.seq_pos_max(int(s)) for s in ids]

    check()
    for p in range(5):
        _drive(kv, balloc, [0, 1, 2, 3], [p] * 4, np.float32)
        assert rec.find_slot(ub((0, p), (1, p), (2, p), (3, p)))
        check()
    for mem in (kv, rec):
        mem.seq_rm(1, -1, -1)
    kv.seq_rm(2, 3, -1)  # the maximum of sequence 2 goes stale
    check()
    kv.seq_add(0, 0, -1, 3)
    rec.seq_add(0, -1, -1, 3)
    check()
    for mem in (kv, rec):
        mem.seq_cp(3, 1, -1, -1)
    check()
