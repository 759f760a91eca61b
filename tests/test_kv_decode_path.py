"""The KV cache's decode-step shortcuts against the general code they bypass.

Pins: a ubatch replayed by the allocator (frozen sequence arrays) lets the cache reuse
its per-layout values (``KVCache._StepMemo``: streams, row offsets, set_new rows) in
find_slot, apply_ubatch, get_n_kv, the K/V rows and the mask, with exactly the results
of a fresh ubatch; so does a hybrid's recurrent part (the request of a replayed
ubatch reuses its sequence part). The native mask kernels write the bytes of the numpy
evaluation, which stays the reference. The one-stream KQ mask of a ubatch with one token per sequence
(``inputs._mask_one_per_seq``: each cell decided once, against its owner's token) equals
the per-stream pair evaluation, for every SWA kind, causal or not, f32 and f16, on
caches with window-purged, removed and shared cells (a cell shared by several
sequences pairs with the token of each of them: the kernel walks its bitset).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from kv_helpers import check_invariants, make_kv
from test_batch_decode_path import GeneralOnly
from test_hybrid import make_hybrid
from test_kv_batched import SWA_KINDS, per_stream_mask, state_of

import pymem.kv.inputs as kv_inputs
from pymem._native import check, ffi, lib
from pymem.batch import Batch, BatchAllocator
from pymem.errors import NativeError
from pymem.kv.cells import StackedCells
from pymem.kv.inputs import build_kq_mask
from pymem.memory import MemoryStatus
from pymem.spec import NonCausalType, SWAType
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

MASK_OPTIONS = (
    {},
    {"causal_attn": False},
    {"causal_attn": False, "non_causal_type": NonCausalType.SWA_FULL},
    {"causal_attn": False, "non_causal_type": NonCausalType.SWA_ONLY},
)


def tokens_ubatch(seqs: list[int], pos: list[int]) -> UBatch:
    """A split_simple-style ubatch: token i of sequence ``seqs[i]`` (any order) at ``pos[i]``."""
    n = len(seqs)
    seq = np.asarray(seqs, dtype=np.int32)
    unq = np.unique(seq).astype(np.int32)
    seq_idx = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
    seq_idx[unq] = np.arange(unq.size, dtype=np.int32)
    return UBatch(
        equal_seqs=False,
        n_tokens=n,
        n_seq_tokens=1,
        n_seqs=n,
        n_seqs_unq=int(unq.size),
        n_pos=1,
        token=np.arange(n, dtype=np.int32) + 3,
        embd=None,
        pos=np.asarray(pos, dtype=np.int32),
        n_seq_id=np.ones(n, dtype=np.int32),
        seq_id=seq.reshape(n, 1),
        seq_id_unq=unq,
        seq_idx=seq_idx,
        output=np.ones(n, dtype=np.int8),
        batch_idxs=np.arange(n, dtype=np.int32),
    )


@pytest.mark.parametrize("swa_type", SWA_KINDS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("native", [True, False])
def test_one_stream_decode_mask_equals_pair_evaluation(
    monkeypatch, swa_type, seed: int, native: bool
) -> None:
    monkeypatch.setattr(kv_inputs, "USE_NATIVE", native and kv_inputs.USE_NATIVE)
    taken = []
    fast = kv_inputs._mask_one_per_seq
    # (the shared cells of the stream each call saw)
    monkeypatch.setattr(
        kv_inputs, "_mask_one_per_seq", lambda *a: taken.append(a[0].n_multi) or fast(*a)
    )
    rng = np.random.default_rng(3000 + 10 * seed + int(swa_type))
    swa = {} if swa_type == 0 else {"swa_type": swa_type, "n_swa": 5}
    n_seq = 6
    kv = make_kv(96, n_seq, unified=True, **swa)
    for step in range(30):
        if step % 7 == 6:  # some cells leave: a tail, or a shared prefix appears
            s = int(rng.integers(0, n_seq))
            if rng.random() < 0.5 and kv.seq_pos_max(s) > 2:
                kv.seq_rm(s, kv.seq_pos_max(s) - 1, -1)
            elif kv.seq_pos_max(s) >= 0:
                d = int(rng.integers(0, n_seq))
                if d != s:
                    kv.seq_rm(d, -1, -1)
                    kv.seq_cp(s, d, -1, -1)
        seqs = rng.permutation(n_seq)[: int(rng.integers(1, n_seq + 1))].tolist()
        ub = tokens_ubatch(seqs, [kv.seq_pos_max(s) + 1 for s in seqs])
        sinfo = kv.find_slot(ub)
        if sinfo is None:
            break
        kv.apply_ubatch(sinfo, ub)
        check_invariants(kv)
        n_kv = kv.get_n_kv(sinfo)
        for kw in MASK_OPTIONS:
            for dtype in (np.float32, np.float16):
                got = build_kq_mask(kv.layout, kv.v_cells, kv.spec, ub, n_kv, dtype=dtype, **kw)
                want = per_stream_mask(kv, ub, n_kv, dtype=dtype, **kw)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.tobytes() == want.tobytes(), (step, kw, dtype)
    # the shortcut ran, also over shared cells
    assert len(taken) > 20 and any(n_multi > 0 for n_multi in taken)


# --- a decode step's memo (replayed ubatches) ------------------------------------------


def _drive(kv, balloc, seqs: list[int], pos: list[int], dtype, may_fail: bool = False) -> Any:
    """One decode call through ``balloc`` and ``kv``: everything the step hands a graph
    (``may_fail``: the planning's status name instead, where it is not SUCCESS)."""
    n = len(seqs)
    batch = Batch(np.arange(n, dtype=np.int32) + 1, pos=np.asarray(pos, np.int32), seq_id=seqs)
    balloc.init(batch, memory=kv, n_seq_max=kv.n_seq_max)
    ctx = kv.init_batch(balloc, 512, False)
    if may_fail and ctx.get_status() != MemoryStatus.SUCCESS:
        return ctx.get_status().name
    assert ctx.get_status() == MemoryStatus.SUCCESS
    out = []
    while True:
        ctx.apply()
        sinfo = ctx.get_sinfo()
        out.append(
            (
                sinfo.strm.tolist(),
                sinfo.idxs.tolist(),
                ctx.get_n_kv(),
                ctx.get_k_idxs().tolist(),
                ctx.get_v_idxs().tolist(),
                ctx.get_kq_mask(dtype=dtype).tobytes(),
            )
        )
        if not ctx.next():
            return tuple(out)


def _runs(twin: Any, seqs: list[int], k: int) -> tuple[list[int], list[int]]:
    """``k`` tokens of each of ``seqs`` in turn, continuing ``twin``: (seq ids, positions).
    E.g. seqs [3, 1], k 2, both empty -> [3, 3, 1, 1], [0, 1, 0, 1]."""
    ids = [s for s in seqs for _ in range(k)]
    pos = [twin.seq_pos_max(s) + 1 + j for s in seqs for j in range(k)]
    return ids, pos


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("swa_type", SWA_KINDS)
@pytest.mark.parametrize("v_trans", [True, False])
def test_decode_steps_with_replayed_ubatches_equal_fresh_ubatches(unified, swa_type, v_trans, k):
    """Two twin caches, one fed through the allocator's fast path and replays (its memo
    used), one through the general path (fresh, writable ubatches): the same slots, n_kv,
    K/V rows, masks and cells after every step, across layout changes and seq ops; one
    token a sequence, or ``k`` (a draft step: the allocator's run layout)."""
    rng = np.random.default_rng(int(swa_type) + 10 * unified + 100 * v_trans)
    swa = {} if swa_type == 0 else {"swa_type": swa_type, "n_swa": 6}
    n_seq = 5
    size = 256 if unified else 64
    twins = [make_kv(size, n_seq, unified=unified, v_trans=v_trans, **swa) for _ in range(2)]
    allocs = [BatchAllocator(), GeneralOnly()]
    layouts = [[0, 1, 2, 3, 4], [3, 1, 4], [2]]
    if not unified:
        layouts[1] = [1, 3, 4]  # streams split sequentially: ascending ids
    dtype = np.float16
    for step in range(40 // k + 1):
        ids, pos = _runs(twins[0], layouts[(step // 4) % len(layouts)], k)
        got = [_drive(kv, a, ids, pos, dtype) for kv, a in zip(twins, allocs)]
        assert got[0] == got[1], step
        assert state_of(twins[0]) == state_of(twins[1]), step
        if step % 9 == 8:
            s = int(rng.integers(0, n_seq))
            for kv in twins:
                kv.seq_rm(s, max(0, kv.seq_pos_max(s) - 2), -1)
    assert twins[0]._memo is not None and twins[1]._memo is None


def _drive_memory(mem, balloc, seqs: list[int], pos: list[int]) -> tuple:
    """One decode call of any memory: every graph input it hands out, as plain values."""
    n = len(seqs)
    batch = Batch(np.arange(n, dtype=np.int32) + 1, pos=np.asarray(pos, np.int32), seq_id=seqs)
    balloc.init(batch, memory=mem, n_seq_max=4)
    ctx = mem.init_batch(balloc, 512, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    out = []
    while True:
        ctx.apply()
        gi = ctx.graph_inputs()
        for name in sorted(gi.attn):
            inp = gi.attn[name]
            out.append(
                (name, inp.n_kv, inp.k_idxs.tolist(), inp.v_idxs.tolist(), inp.kq_mask().tobytes())
            )
        r = gi.recr
        assert r is not None
        out.append((r.head, r.n_rs, r.rs_z, r.s_copy.tolist()))
        if not ctx.next():
            return tuple(out)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("pattern", ["RAR", "RSAR"])
@pytest.mark.parametrize("unified", [True, False])
def test_hybrid_decode_steps_with_replayed_ubatches_equal_fresh_ubatches(pattern, unified, k):
    """A hybrid (plain and iSWA) fed replayed ubatches (the KV step memo, the recurrent
    request memo) equals its twin fed fresh ubatches: inputs, positions, cells; one token
    a sequence or ``k``."""
    twins = [make_hybrid(pattern, kv_size=128, n_seq_max=4, unified=unified) for _ in range(2)]
    allocs = [BatchAllocator(), GeneralOnly()]
    layouts = [[0, 1, 2, 3], [1, 3], [2]]
    for step in range(24 if k == 1 else 11):  # (k tokens a step fill the cells sooner)
        ids, pos = _runs(twins[0], layouts[(step // 3) % len(layouts)], k)
        got = [_drive_memory(m, a, ids, pos) for m, a in zip(twins, allocs)]
        assert got[0] == got[1], step
        for s in range(4):
            assert twins[0].seq_pos_ranges(s) == twins[1].seq_pos_ranges(s)
        assert (twins[0].cell_owners() == twins[1].cell_owners()).all()
    assert twins[0].mem_recr._req_memo is not None and twins[1].mem_recr._req_memo is None


# --- the native mask kernels against the numpy evaluation --------------------------------


@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("swa_type", SWA_KINDS)
def test_native_masks_equal_numpy(monkeypatch, unified, swa_type):
    """``pm_kq_mask_rows`` (streams), ``pm_kq_mask_owner`` (one stream, one token per
    sequence) and ``pm_kq_mask_seqs`` (one stream, several tokens per sequence) write the
    bytes numpy writes, for decode steps and 3-token steps, causal or not, f16 and f32;
    cells removed and forked (shared) on the way, foreign owners in a stream included."""
    assert kv_inputs.USE_NATIVE, "the extension lacks the mask kernels: rebuild it"
    lists = []  # one-stream masks of several tokens per sequence (pm_kq_mask_seqs)
    real = kv_inputs._mask_seq_lists
    monkeypatch.setattr(kv_inputs, "_mask_seq_lists", lambda *a: lists.append(1) or real(*a))
    rng = np.random.default_rng(4000 + int(swa_type) + 10 * unified)
    swa = {} if swa_type == 0 else {"swa_type": swa_type, "n_swa": 5}
    n_seq = 5
    kv = make_kv(256 if unified else 64, n_seq, unified=unified, **swa)
    for step in range(24):
        n_tok = 3 if step % 5 == 4 else 1
        seqs = sorted(rng.choice(n_seq, int(rng.integers(1, n_seq + 1)), replace=False).tolist())
        if unified and n_tok == 1:
            seqs = rng.permutation(seqs).tolist()
        start = [kv.seq_pos_max(s) + 1 for s in seqs]
        ub = tokens_ubatch(
            [s for s in seqs for _ in range(n_tok)], [p + i for p in start for i in range(n_tok)]
        )
        if not unified:  # split_equal order: a block of n_tok tokens per sequence
            ub.equal_seqs, ub.n_seq_tokens, ub.n_seqs = True, n_tok, len(seqs)
        sinfo = kv.find_slot(ub)
        if sinfo is None:
            break
        kv.apply_ubatch(sinfo, ub)
        if step % 6 == 5:
            s = int(rng.integers(0, n_seq))
            kv.seq_rm(s, max(0, kv.seq_pos_max(s) - 1), -1)
        elif step % 6 == 2:  # a fork: shared cells in a unified cache (copies in streams)
            s, d = (int(x) for x in rng.choice(n_seq, 2, replace=False))
            kv.seq_rm(d, -1, -1)
            kv.seq_cp(s, d, -1, -1)
        n_kv = kv.get_n_kv(sinfo)
        for kw in MASK_OPTIONS:
            for dtype in (np.float32, np.float16):
                got = build_kq_mask(kv.layout, kv.v_cells, kv.spec, ub, n_kv, dtype=dtype, **kw)
                with monkeypatch.context() as m:
                    m.setattr(kv_inputs, "USE_NATIVE", False)
                    want = build_kq_mask(
                        kv.layout, kv.v_cells, kv.spec, ub, n_kv, dtype=dtype, **kw
                    )
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.tobytes() == want.tobytes(), (step, kw, dtype)
    assert (len(lists) > 0) == unified  # (with streams each sequence has its own rows)


def test_native_mask_kernels_refuse_rows_outside_the_cells():
    """The kernels check their arguments (a safety net behind the Python callers)."""
    owner = np.zeros(8, dtype=np.int32)
    pos = np.arange(8, dtype=np.int32)
    seq = np.zeros(1, dtype=np.int32)
    lo, hi = np.zeros(1, dtype=np.int32), np.full(1, 9, dtype=np.int32)
    out = np.empty((1, 4), dtype=np.float16)
    i32 = lambda a: ffi.from_buffer("int32_t[]", a)  # noqa: E731
    for off, want in ((4, lib.PM_OK), (5, lib.PM_ERR_RANGE), (-1, lib.PM_ERR_RANGE)):
        status = lib.pm_kq_mask_rows(
            i32(owner), i32(pos), 8, ffi.from_buffer("int64_t[]", np.array([off], np.int64)),
            i32(seq), i32(lo), i32(hi), 1, 4, 2, ffi.from_buffer(out, require_writable=True),
        )  # fmt: skip
        assert status == want, off
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0]]  # cells 4..7 of seq 0, positions 4..7 <= 9
    tok_of = np.full(LLAMA_MAX_SEQ + 2, -1, dtype=np.int64)
    tok_of[2] = 5  # sequence 0 -> token 5 of 1
    status = lib.pm_kq_mask_owner(
        i32(owner), i32(pos), 8, ffi.from_buffer("int64_t[]", tok_of), tok_of.size, ffi.NULL, 1,
        i32(lo), i32(hi), 1, 4, 2, ffi.from_buffer(out, require_writable=True),
    )  # fmt: skip
    assert status == lib.PM_ERR_RANGE
    with pytest.raises(NativeError):
        check(status, "pm_kq_mask_owner")
    # with bitsets every table entry is checked (a shared cell's bits may name any), and
    # a bitset width outside [1, 4] words is refused
    tok_of[2] = -1
    tok_of[200] = 1
    bits = np.zeros(8, dtype=np.uint64)
    for n_words, want in ((1, lib.PM_ERR_RANGE), (0, lib.PM_ERR_ARG), (5, lib.PM_ERR_ARG)):
        status = lib.pm_kq_mask_owner(
            i32(owner), i32(pos), 8, ffi.from_buffer("int64_t[]", tok_of), tok_of.size,
            ffi.from_buffer("uint64_t[]", bits), n_words, i32(lo), i32(hi), 1, 4, 2,
            ffi.from_buffer(out, require_writable=True),
        )  # fmt: skip
        assert status == want, n_words
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0]]  # refused calls wrote nothing
    # an element size other than f16 / f32 is refused before anything is written
    status = lib.pm_kq_mask_rows(
        i32(owner), i32(pos), 8, ffi.from_buffer("int64_t[]", np.zeros(1, np.int64)),
        i32(seq), i32(lo), i32(hi), 1, 4, 3, ffi.from_buffer(out, require_writable=True),
    )  # fmt: skip
    assert status == lib.PM_ERR_ARG
    status = lib.pm_kq_mask_owner(
        i32(owner), i32(pos), 8, ffi.from_buffer("int64_t[]", tok_of), tok_of.size, ffi.NULL, 1,
        i32(lo), i32(hi), 1, 4, 8, ffi.from_buffer(out, require_writable=True),
    )  # fmt: skip
    assert status == lib.PM_ERR_ARG


def test_owner_mask_kernel_pairs_a_shared_cell_with_each_of_its_sequences():
    """A cell held by sequences 1 and 70 (two bitset words) is attended by both their
    tokens where the window allows, by no other; without bitsets (NULL) by none."""
    owner = np.array([1, -2, 70, -1, -2], dtype=np.int32)
    pos = np.array([0, 1, 2, -1, 9], dtype=np.int32)
    bits = np.zeros((5, 2), dtype=np.uint64)
    bits[1] = [1 << 1, 1 << (70 - 64)]  # cell 1: sequences 1 and 70
    bits[4] = [1 << 3, 1 << (70 - 64)]  # cell 4: sequences 3 and 70, at position 9
    tok_of = np.full(LLAMA_MAX_SEQ + 2, -1, dtype=np.int64)
    tok_of[1 + 2], tok_of[70 + 2], tok_of[5 + 2] = 0, 1, 2  # tokens of seqs 1, 70, 5
    lo = np.zeros(3, dtype=np.int32)
    hi = np.array([5, 5, 5], dtype=np.int32)  # causal at position 5: cell 4 (pos 9) masked
    i32 = lambda a: ffi.from_buffer("int32_t[]", a)  # noqa: E731
    for with_bits in (True, False):
        out = np.empty((3, 5), dtype=np.float32)
        status = lib.pm_kq_mask_owner(
            i32(owner), i32(pos), 5, ffi.from_buffer("int64_t[]", tok_of), tok_of.size,
            ffi.from_buffer("uint64_t[]", bits) if with_bits else ffi.NULL, 2, i32(lo), i32(hi),
            3, 5, 4, ffi.from_buffer(out, require_writable=True),
        )  # fmt: skip
        assert status == lib.PM_OK
        attended = [np.flatnonzero(row == 0).tolist() for row in out]
        shared = [1] if with_bits else []
        assert attended == [sorted([0, *shared]), sorted([2, *shared]), []], with_bits


def test_native_mask_refusal_names_the_values():
    """A refused kernel call (a broken internal invariant: here a row past the cells)
    raises NativeError naming the row offsets, n_kv and the number of cells."""
    stack = StackedCells(1, 8)
    rules = kv_inputs._rules(True, SWAType.NONE, 0, False)
    out = np.empty((1, 1, 16), dtype=np.float16)  # n_kv 16 > 8 cells
    strm = np.zeros(1, dtype=np.int64)
    sq, p1 = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32)
    with pytest.raises(NativeError, match=r"row offsets \[0, 0\] \+ n_kv 16 <= 8 cells"):
        kv_inputs._mask_streams(stack, rules, strm, sq, p1, None, None, out)
