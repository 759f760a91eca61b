"""The KV cache's batched per-ubatch paths against their per-stream references.

A decode step over many streams runs on the stacked cells of every stream at once: the
slot search (``_find_slot_batched``), ``apply_ubatch`` (``StackedCells.set_new`` over all
(stream, cell) pairs, the SWA purge as one ``seq_rm_upto``), ``get_n_kv`` and the KQ mask
(``_mask_streams``). Each is compared here with the one-stream-at-a-time code it replaced
(``_find_slot_streams``, and the per-stream ``apply_ubatch`` / ``get_n_kv`` written out
below) on random caches: many streams, every SWA kind, partly filled, heads anywhere
(wrapped around, at the end), streams with no room. Exact cell indices, heads, positions
and per-sequence bounds; the undo journal must put batched mutations back exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from kv_helpers import check_invariants, decode, make_kv, make_spec

from pymem.errors import ClosedError, RangeError, StateError
from pymem.kv import KVCache, SlotInfo
from pymem.kv.cache import N_PAD_GRAPH
from pymem.kv.cells import KVCells, single_seq_ids
from pymem.kv.inputs import build_kq_mask
from pymem.kv.layout import StreamHeads
from pymem.kv.state_io import _restore_ubatch
from pymem.spec import ModelSpec, NonCausalType, RopeSpec, RopeType, SWAType
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

SWA_KINDS = [SWAType.NONE, SWAType.STANDARD, SWAType.CHUNKED, SWAType.SYMMETRIC]


# --- helpers ---------------------------------------------------------------------------


def blocks_ubatch(seqs: list[int], pos: np.ndarray, n_pos: int = 1) -> UBatch:
    """A split_equal-style ubatch: sequence ``seqs[s]`` (ascending) has tokens
    ``s * n .. s * n + n - 1`` at positions ``pos[s]`` (``[n_seqs, n]``); with ``n_pos``
    4 (M-RoPE) the y and x sections are ``pos % 3`` and ``pos % 2``."""
    n_seqs, n = pos.shape
    n_tok = n_seqs * n
    p = pos.reshape(-1).astype(np.int32)
    sections = [p] if n_pos == 1 else [p, p % 3, p % 2, np.zeros_like(p)]
    seq_id = np.repeat(np.asarray(seqs, dtype=np.int32), n).reshape(n_tok, 1)
    seq_idx = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
    seq_idx[seqs] = np.arange(n_seqs, dtype=np.int32)
    return UBatch(
        equal_seqs=True,
        n_tokens=n_tok,
        n_seq_tokens=n,
        n_seqs=n_seqs,
        n_seqs_unq=n_seqs,
        n_pos=n_pos,
        token=np.arange(n_tok, dtype=np.int32) + 7,
        embd=None,
        pos=np.concatenate(sections),
        n_seq_id=np.ones(n_tok, dtype=np.int32),
        seq_id=seq_id,
        seq_id_unq=np.asarray(seqs, dtype=np.int32),
        seq_idx=seq_idx,
        output=np.ones(n_tok, dtype=np.int8),
        batch_idxs=np.arange(n_tok, dtype=np.int32),
    )


def streams_kv(
    n_stream: int, size: int, swa_type: SWAType = SWAType.NONE, n_swa: int = 4, **kw
) -> KVCache:
    swa = {} if swa_type == SWAType.NONE else {"swa_type": swa_type, "n_swa": n_swa}
    return make_kv(size, n_stream, unified=False, **swa, **kw)


def fill_randomly(kv: KVCache, rng: np.random.Generator, foreign: bool = False) -> None:
    """Fill each stream to a random level (some empty, the last one full) with its own
    sequence at random positions; with ``foreign`` a few cells hold another sequence or
    several (a whole-state restore can do that). Then remove the newest positions of some
    sequences (their cached maximum goes dirty). Heads anywhere in ``[0, size]``."""
    size = kv.kv_size
    for s, cells in enumerate(kv.v_cells):
        level = rng.choice([0.0, 0.3, 0.6, 0.9, rng.random()])
        idx = np.flatnonzero(rng.random(size) < level)
        if s == kv.n_stream - 1:
            idx = np.arange(size)
        seq = np.full((idx.size, 1), s % kv.n_seq_max, dtype=np.int32)
        if foreign and idx.size:
            other = rng.random(idx.size) < 0.1
            seq[other, 0] = rng.integers(0, kv.n_seq_max, int(other.sum()))
        pos = rng.permutation(max(idx.size, 1) * 2)[: idx.size].astype(np.int32)
        cells.set_new(idx, pos, seq)
        if foreign and idx.size:
            cells.seq_add_bit(idx[::7], int(rng.integers(0, kv.n_seq_max)))
    for s in range(kv.n_seq_max):
        top = kv.seq_pos_max(s)
        if top > 0 and rng.random() < 0.5:
            kv.seq_rm(s, top - int(rng.integers(0, 3)), -1)
    kv.v_heads[:] = rng.integers(0, size + 1, kv.n_stream).tolist()


def reference_apply(kv: KVCache, sinfo: SlotInfo, ub: UBatch) -> None:
    """``apply_ubatch`` one stream at a time, through the per-stream views and
    ``KVCache.seq_rm`` (the code the batched version replaced)."""
    n_per = sinfo.size
    n_tok = ub.n_tokens
    max_rm = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int64)
    for s in range(sinfo.n_stream):
        cells = kv.v_cells[int(sinfo.strm[s])]
        idx = sinfo.idxs[s].astype(np.int64)
        tok = slice(s * n_per, (s + 1) * n_per)
        occupied = idx[cells.pos[idx] >= 0]
        if occupied.size:
            np.maximum.at(max_rm, cells.owner[occupied], cells.pos[occupied].astype(np.int64))
            cells.rm(occupied)
        ext = None
        if cells.ext is not None:
            ext = np.empty((n_per, 3), dtype=np.int32)
            if ub.is_pos_2d():
                ext[:, 0] = ub.pos[2 * n_tok :][tok]
                ext[:, 1] = ub.pos[n_tok:][tok]
            else:
                ext[:, 0:2] = 0
            ext[:, 2] = ub.token[tok]
        cells.set_new(idx, ub.pos[:n_tok][tok], ub.seq_id[tok], ext)
    for seq in np.flatnonzero(max_rm >= 0).tolist():
        cells = kv.v_cells[int(kv.seq_to_stream[seq])]
        pmin = cells.seq_pos_min(seq)
        if pmin <= max_rm[seq]:
            kv.seq_rm(seq, pmin, int(max_rm[seq]) + 1)
    for s in range(sinfo.n_stream):
        kv.v_heads[int(sinfo.strm[s])] = int(sinfo.idxs[s, -1]) + 1


def reference_n_kv(kv: KVCache, sinfo: SlotInfo) -> int:
    pad = max(kv.n_pad, N_PAD_GRAPH)
    res = 0
    for st in sinfo.strm.tolist():
        cells = kv.v_cells[st]
        padded = -(-cells.used_max_p1() // pad) * pad
        res = max(res, min(cells.size, max(pad, padded)))
    return res


def state_of(kv: KVCache) -> str:
    """Everything observable about the cells: per stream snapshot, heads, bounds."""
    bounds = [(kv.seq_pos_min(s), kv.seq_pos_max(s)) for s in range(kv.n_seq_max)]
    per_stream = [
        (c.snapshot(), c.n_multi, [(c.seq_pos_min(q), c.seq_pos_max(q)) for q in range(8)])
        for c in kv.v_cells
    ]
    return repr((per_stream, list(kv.v_heads), bounds))


def reference_slot(kv: KVCache, ub: UBatch) -> SlotInfo | None:
    n = ub.n_tokens // ub.n_seqs_unq if kv.n_stream > 1 else ub.n_tokens
    n_seqs = ub.n_seqs_unq if kv.n_stream > 1 else 1
    return kv._find_slot_streams(ub, n_seqs, n, False)


def same_slot(a: SlotInfo | None, b: SlotInfo | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.strm.tolist() == b.strm.tolist() and a.idxs.tolist() == b.idxs.tolist()


# --- slot search -------------------------------------------------------------------------


def test_batched_slot_search_hand_worked():
    # three streams of 8 cells; stream 0: cells 6, 7 used, head 6 -> scan 6 7 0 1 ...;
    # stream 1: all free, head 0; stream 2: head 8 (past the end) wraps to cell 0
    kv = streams_kv(3, 8)
    kv.v_cells[0].set_new(np.array([6, 7]), np.array([0, 1]), np.zeros((2, 1), np.int32))
    kv.v_cells[2].set_new(np.array([0, 2]), np.array([0, 1]), np.full((2, 1), 2, np.int32))
    kv.v_heads[:] = [6, 0, 8]
    ub = blocks_ubatch([0, 1, 2], np.array([[2, 3], [0, 1], [2, 3]]))
    sinfo = kv.find_slot(ub)
    # stream 0: 6, 7 used -> wraps to 0, 1; stream 2: head 8 > used 2 + 2 * 2? no: 8 -> 0,
    # scan 0 (used) 1 (free) 2 (used) 3 (free)
    assert sinfo.strm.tolist() == [0, 1, 2]
    assert sinfo.idxs.tolist() == [[0, 1], [0, 1], [1, 3]]
    assert same_slot(sinfo, reference_slot(kv, ub))
    # a full stream: no slot for the ubatch at all
    kv.v_cells[1].set_new(np.arange(8), np.arange(8), np.ones((8, 1), np.int32))
    assert kv.find_slot(ub) is None and reference_slot(kv, ub) is None
    # a subset of streams (1 full -> left out) still finds its cells
    ub2 = blocks_ubatch([0, 2], np.array([[2], [2]]))
    assert kv.find_slot(ub2).idxs.tolist() == [[0], [1]]


def test_head_restarts_at_zero_per_stream():
    # stream 0: head 7 with only 1 cell used -> 7 > 1 + 2 restarts at 0; stream 1 keeps 7
    kv = streams_kv(2, 8)
    kv.v_cells[0].set_new(np.array([3]), np.array([0]), np.zeros((1, 1), np.int32))
    kv.v_cells[1].set_new(np.arange(6), np.arange(6), np.ones((6, 1), np.int32))
    kv.v_heads[:] = [7, 7]
    sinfo = kv.find_slot(blocks_ubatch([0, 1], np.array([[1], [6]])))
    assert sinfo.idxs.tolist() == [[0], [7]]


@pytest.mark.parametrize("swa_type", SWA_KINDS)
@pytest.mark.parametrize("seed", range(5))
def test_batched_slot_search_equals_per_stream_search(swa_type, seed):
    rng = np.random.default_rng(seed * 10 + int(swa_type))
    n_stream = int(rng.choice([2, 5, 17]))
    size = int(rng.choice([8, 16, 64, 300]))
    kv = streams_kv(n_stream, size, swa_type, n_swa=int(rng.integers(1, 9)))
    fill_randomly(kv, rng, foreign=bool(seed % 2))
    n_found = 0
    for _ in range(40):
        k = int(rng.integers(1, n_stream + 1))
        seqs = sorted(rng.choice(n_stream, k, replace=False).tolist())
        n = int(rng.choice([1, 1, 2, 3, 7, size // 2, size]))
        ub = blocks_ubatch(seqs, np.zeros((k, n), np.int32))
        got = kv.find_slot(ub)
        assert same_slot(got, reference_slot(kv, ub)), (seqs, n, list(kv.v_heads))
        n_found += got is not None
        kv.v_heads[:] = rng.integers(0, size + 1, n_stream).tolist()
    assert n_found  # the comparison saw slots, not only refusals


@pytest.mark.parametrize("swa_type", SWA_KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_batched_slot_search_unified(swa_type, seed):
    # one stream, many sequences, shared cells (owner -2 is never reusable)
    rng = np.random.default_rng(100 + seed)
    swa = {} if swa_type == SWAType.NONE else {"swa_type": swa_type, "n_swa": 3}
    kv = make_kv(64, 8, **swa)
    c = kv.v_cells[0]
    idx = np.flatnonzero(rng.random(64) < 0.7)
    c.set_new(idx, rng.integers(0, 40, idx.size), rng.integers(0, 8, (idx.size, 1)).astype("i4"))
    used = np.flatnonzero(c.pos >= 0)
    c.seq_add_bit(used[::5], 3)
    for _ in range(30):
        kv.v_heads[0] = int(rng.integers(0, 65))
        n = int(rng.choice([1, 2, 5, 20, 64]))
        ub = blocks_ubatch([int(rng.integers(0, 8))], np.zeros((1, n), np.int32))
        assert same_slot(kv.find_slot(ub), reference_slot(kv, ub))


def test_refused_blocks_take_the_reference_path_and_its_error():
    kv = streams_kv(3, 8)
    ub = blocks_ubatch([0, 1], np.array([[0], [0]]))
    ub.seq_id[1, 0] = 2  # block 1 is not sequence seq_id_unq[1] = 1
    with pytest.raises(Exception, match="token block 1 must belong to sequence 1"):
        kv.find_slot(ub)


# --- apply, n_kv ------------------------------------------------------------------------


@pytest.mark.parametrize("swa_type", SWA_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_batched_apply_equals_per_stream_apply(swa_type, seed):
    # two identical caches decode the same random steps: one applies every stream at once,
    # the other one stream at a time; small SWA caches overwrite masked cells and purge
    rng = np.random.default_rng(1000 + 10 * seed + int(swa_type))
    n_stream, size = int(rng.choice([3, 9])), int(rng.choice([8, 16, 32]))
    n_swa = int(rng.integers(1, 6))
    with_ext = seed % 2 == 1
    spec = make_spec(n_pos_per_embd=4, rope=RopeSpec(n_rot=8, rope_type=RopeType.MROPE))
    kw = {"spec": spec} if with_ext else {}
    a = streams_kv(n_stream, size, swa_type, n_swa, **kw)
    b = streams_kv(n_stream, size, swa_type, n_swa, **kw)
    n_pos = 4 if with_ext else 1
    applied = 0
    for step in range(60):
        k = int(rng.integers(1, n_stream + 1))
        seqs = sorted(rng.choice(n_stream, k, replace=False).tolist())
        n = int(rng.choice([1, 1, 1, 2, 4]))
        start = np.array([a.seq_pos_max(s) + 1 for s in seqs])
        ub = blocks_ubatch(seqs, start[:, None] + np.arange(n), n_pos)
        sa, sb = a.find_slot(ub), reference_slot(b, ub)
        assert same_slot(sa, sb), step
        if sa is None:
            p0 = int(rng.integers(0, 20))
            p1 = p0 + rng.integers(1, 30, n_stream)
            for kv in (a, b):  # make room: a random range of every sequence
                for s in range(n_stream):
                    kv.seq_rm(s, p0, int(p1[s]))
        else:
            a.apply_ubatch(sa, ub)
            reference_apply(b, sb, ub)
            assert a.get_n_kv(sa) == reference_n_kv(b, sb)
            applied += 1
        assert state_of(a) == state_of(b), step
        check_invariants(a, contiguous="all" if swa_type != SWAType.NONE else ())
    assert applied >= 20


def decode_reference(kv: KVCache, items: list, n_ubatch: int = 256) -> None:
    """``decode`` with every ubatch placed by the references, one after the other."""
    from pymem.batch import Batch, BatchAllocator

    balloc = BatchAllocator(kv.n_pos_per_embd)
    balloc.init(Batch.from_items(items), memory=kv, n_seq_max=kv.n_seq_max)
    for ub in balloc.split_all(kv.splits(balloc, n_ubatch, False)[0]):
        sinfo = reference_slot(kv, ub)
        assert sinfo is not None
        reference_apply(kv, sinfo, ub)


@pytest.mark.parametrize("unified", [True, False])
def test_batched_apply_with_shared_tokens_and_window_purge(unified):
    # tokens with several ids (set_new's general path) in a unified cache; in both layouts
    # a 2-wide window lets new tokens overwrite masked cells, which purges older positions
    a = make_kv(16, 4, swa_type=SWAType.STANDARD, n_swa=2, unified=unified)
    b = make_kv(16, 4, swa_type=SWAType.STANDARD, n_swa=2, unified=unified)
    for p in range(12):
        shared = [[1, p, [0, 1], False]] if unified else [[1, p, [0], False], [1, p, [1], False]]
        items = [*shared, [1, p, [2], False], [1, p, [3], True]]
        assert decode(a, items, n_ubatch=2).code == 0
        decode_reference(b, items, n_ubatch=2)
        assert state_of(a) == state_of(b), p
    check_invariants(a, contiguous="all")


def test_n_kv_over_streams():
    kv = streams_kv(3, 1024)
    kv.v_cells[0].set_new(np.array([299]), np.array([0]), np.zeros((1, 1), np.int32))
    kv.v_cells[2].set_new(np.array([10]), np.array([0]), np.full((1, 1), 2, np.int32))
    s = SlotInfo(np.array([0, 2], np.int32), np.zeros((2, 1), np.int32))
    assert kv.get_n_kv(s) == 512  # stream 0: used_max_p1 300 -> 512; stream 2: 11 -> 256
    kv.v_cells[0].rm(np.array([299]))  # used_max_p1 of stream 0 goes dirty, recomputed: 0
    assert kv.get_n_kv(s) == 256 == reference_n_kv(kv, s)


@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_window_purge_equals_per_sequence_seq_rm(unified, seed):
    # StackedCells.seq_rm_upto (every purged sequence at once) against KVCache.seq_rm per
    # sequence over [pos_min, bound + 1), on cells with ext and cells of several sequences
    rng = np.random.default_rng(3000 + seed)
    spec = make_spec(n_pos_per_embd=4, rope=RopeSpec(n_rot=8, rope_type=RopeType.MROPE))
    caches = [make_kv(32, 5, spec=spec, unified=unified) for _ in range(2)]
    for kv in caches:
        r = np.random.default_rng(seed)
        for c in kv.v_cells:
            idx = np.flatnonzero(r.random(32) < 0.7)
            seqs = r.integers(0, 5, (idx.size, 1)).astype(np.int32)
            if not unified:
                seqs[:] = c.strm
            c.set_new(idx, r.permutation(64)[: idx.size], seqs, r.integers(0, 9, (idx.size, 3)))
            c.seq_add_bit(idx[::4], int(r.integers(0, 5)))
        kv.v_heads[:] = r.integers(0, 33, kv.n_stream).tolist()
    a, b = caches
    seqs = np.sort(rng.choice(5, int(rng.integers(1, 6)), replace=False))
    bound = rng.integers(0, 64, seqs.size)
    rows = a.seq_to_stream[seqs].astype(np.int64)
    a._heads_back_to(a.cells.seq_rm_upto(seqs, rows, bound))
    for q, m in zip(seqs.tolist(), bound.tolist()):
        pmin = b.seq_pos_min(q)
        if pmin <= m:
            b.seq_rm(q, pmin, m + 1)
    assert state_of(a) == state_of(b)
    if unified:  # (streams here hold foreign sequences, which the checker refuses)
        check_invariants(a)


# --- journal ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_journal_rolls_back_batched_mutations(seed):
    rng = np.random.default_rng(seed)
    swa = seed % 2 == 1
    kv = streams_kv(6, 16, SWAType.STANDARD if swa else SWAType.NONE, n_swa=3)
    for p in range(20 if swa else 12):  # fill (with SWA: overwrite masked cells, purge)
        assert decode(kv, [[1, p, [s], True] for s in range(6)]).code == 0
    kv.seq_cp(1, 4)  # a pending shift-free stream copy
    kv.seq_add(2, -1, -1, 2)  # a pending shift
    before = state_of(kv)
    heads = kv.begin_plan()
    ub = blocks_ubatch([0, 2, 3], np.array([[kv.seq_pos_max(s) + 1] for s in (0, 2, 3)]))
    sinfo = kv.find_slot(ub)
    kv.apply_ubatch(sinfo, ub)
    kv.seq_rm(-1, int(rng.integers(0, 10)), -1)
    kv.v_cells[5].reset()
    kv.cells.reset_shift()
    after = state_of(kv)
    logs = [c.redo_log() for c in kv.v_cells]
    now_heads = list(kv.v_heads)
    kv.rollback_plan(heads)
    assert state_of(kv) == before
    check_invariants(kv)
    # the per-stream redo logs reproduce the planned state without repeating it
    for c, log in zip(kv.v_cells, logs):
        c.redo(log)
    kv.v_heads[:] = now_heads
    assert state_of(kv) == after
    check_invariants(kv)


def test_journal_rolls_back_shared_cells_in_a_unified_cache():
    kv = make_kv(32, 4)
    for p in range(6):
        decode(kv, [[1, p, [s], True] for s in range(3)])
    kv.seq_cp(0, 3, 2, 5)  # cells shared by sequences 0 and 3
    before = state_of(kv)
    heads = kv.begin_plan()
    kv.seq_add(3, 3, -1, 4)  # moves shared cells: every sequence they hold goes dirty
    kv.seq_rm(-1, 4, -1)  # removes shared cells among others, as one batched rm
    kv.seq_keep(1)
    after = state_of(kv)
    log = kv.v_cells[0].redo_log()
    now_heads = list(kv.v_heads)
    kv.rollback_plan(heads)
    assert state_of(kv) == before
    kv.v_cells[0].redo(log)
    kv.v_heads[:] = now_heads
    assert state_of(kv) == after
    check_invariants(kv)


def test_prepare_changes_nothing_and_plans_every_ubatch():
    kv = streams_kv(4, 32, SWAType.STANDARD, n_swa=2)
    for p in range(12):
        decode(kv, [[1, p, [s], True] for s in range(4)])
    before = state_of(kv)
    ubs = [blocks_ubatch([0, 1, 2, 3], np.full((4, 1), 12 + k)) for k in range(3)]
    plan = kv.prepare(ubs)
    assert state_of(kv) == before
    # the plan is what applying the ubatches one by one finds
    for ub, sinfo in zip(ubs, plan):
        got = kv.find_slot(ub)
        assert same_slot(got, sinfo)
        kv.apply_ubatch(got, ub)
    check_invariants(kv, contiguous="all")


# --- KQ mask ----------------------------------------------------------------------------


def per_stream_mask(kv: KVCache, ub: UBatch, n_kv: int, **kw) -> np.ndarray:
    """The mask through the per-stream path: that path is taken when a stream has cells
    shared by several sequences; a pretended count changes nothing else there."""
    kv.cells.n_multi += 1
    try:
        return build_kq_mask(kv.layout, kv.v_cells, kv.spec, ub, n_kv, **kw)
    finally:
        kv.cells.n_multi -= 1


@pytest.mark.parametrize("swa_type", SWA_KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_streams_mask_equals_per_stream_mask(swa_type, seed):
    rng = np.random.default_rng(2000 + 10 * seed + int(swa_type))
    mrope = seed == 1
    alibi = seed == 2
    if mrope:
        spec = make_spec(n_pos_per_embd=4, rope=RopeSpec(n_rot=8, rope_type=RopeType.MROPE))
    else:
        spec = ModelSpec(layers=make_spec().layers, use_alibi=alibi)
    kv = streams_kv(7, 64, swa_type, n_swa=3, spec=spec)
    n_pos = 4 if mrope else 1
    for p in range(12):  # prompts of 3 tokens and decode steps, some sequences only
        seqs = sorted(rng.choice(7, int(rng.integers(1, 8)), replace=False).tolist())
        start = np.array([kv.seq_pos_max(s) + 1 for s in seqs])
        ub = blocks_ubatch(seqs, start[:, None] + np.arange(3 if p % 2 else 1), n_pos)
        sinfo = kv.find_slot(ub)
        kv.apply_ubatch(sinfo, ub)
        n_kv = kv.get_n_kv(sinfo)
        for kw in (
            {},
            {"causal_attn": False},
            {"causal_attn": False, "non_causal_type": NonCausalType.SWA_FULL},
            {"causal_attn": False, "non_causal_type": NonCausalType.SWA_ONLY},
        ):
            for dtype in (np.float32, np.float16):
                got = build_kq_mask(kv.layout, kv.v_cells, kv.spec, ub, n_kv, dtype=dtype, **kw)
                want = per_stream_mask(kv, ub, n_kv, dtype=dtype, **kw)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.tobytes() == want.tobytes(), (p, kw, dtype)


def test_streams_mask_hand_worked():
    # streams 0 and 2 of 3; decode tokens at positions 3 and 1
    kv = streams_kv(3, 8)
    kv.v_cells[0].set_new(np.arange(3), np.arange(3), np.zeros((3, 1), np.int32))
    kv.v_cells[2].set_new(np.array([0, 5]), np.array([0, 4]), np.full((2, 1), 2, np.int32))
    ub = blocks_ubatch([0, 2], np.array([[3], [1]]))
    sinfo = kv.find_slot(ub)
    assert sinfo.idxs.tolist() == [[3], [1]]
    kv.apply_ubatch(sinfo, ub)
    m = build_kq_mask(kv.layout, kv.v_cells, kv.spec, ub, 8)
    assert (m == 0).astype(int).tolist() == [[[1, 1, 1, 1, 0, 0, 0, 0]], [[1, 1, 0, 0, 0, 0, 0, 0]]]
    assert np.isneginf(m[m != 0]).all()


# --- views ------------------------------------------------------------------------------


def test_stream_heads_read_like_a_list():
    h = StreamHeads(3)
    h[1] = 5
    h[:] = [h[1], 2, 9]
    assert h == [5, 2, 9] and list(h) == [5, 2, 9] and h[0] == 5 and len(h) == 3
    assert h != [5, 2] and h.a.dtype == np.int64 and repr(h) == "[5, 2, 9]"


def test_cell_views_share_the_stack_and_copy_on_assignment():
    kv = streams_kv(3, 8)
    assert all(c.store is kv.cells and c.strm == s for s, c in enumerate(kv.v_cells))
    kv.v_cells[1].set_new(np.array([2]), np.array([5]), np.ones((1, 1), np.int32))
    assert kv.cells.pos[1, 2] == 5 and kv.cells.used.tolist() == [0, 1, 0]
    saved = copy.deepcopy(kv.v_cells[1])  # a view of a copy of the whole stack
    assert saved.store is not kv.cells and saved.pos[2] == 5 and saved.used == 1
    kv.seq_rm(1, -1, -1)
    assert kv.seq_pos_max(1) == -1
    kv.v_cells[1] = saved  # copied into stream 1 of the cache's stack
    assert kv.v_cells[1].store is kv.cells and kv.seq_pos_max(1) == 5
    check_invariants(kv)
    lone = KVCells(4)
    lone.set_new(np.array([0]), np.array([1]), np.zeros((1, 1), np.int32))
    assert lone.store.n_stream == 1 and lone.used == 1


# ---------------------------------------------------------------------------------------
# seq_pos_min_of / seq_pos_max_of: the vectorised bounds batch validation asks for must
# equal the scalar queries exactly, dirty cached bounds and shared cells included
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_seq_pos_bounds_of_equal_the_scalar_queries(unified, seed):
    rng = np.random.default_rng(seed)
    kv = make_kv(32, 4, unified=unified) if unified else streams_kv(4, 32)
    fill_randomly(kv, rng, foreign=unified)
    ids = rng.integers(0, kv.n_seq_max, 9)
    # the vectorised queries first, so they meet the dirty bounds fill_randomly left
    lo, hi = kv.seq_pos_min_of(ids), kv.seq_pos_max_of(ids)
    assert lo.dtype == hi.dtype == np.int64
    fresh = streams_kv(4, 32) if not unified else make_kv(32, 4, unified=True)
    fill_randomly(fresh, np.random.default_rng(seed), foreign=unified)
    assert lo.tolist() == [fresh.seq_pos_min(int(s)) for s in ids]
    assert hi.tolist() == [fresh.seq_pos_max(int(s)) for s in ids]
    assert kv.seq_pos_min_of(ids).tolist() == lo.tolist()


def test_seq_pos_bounds_of_refuse_as_the_scalar_queries():
    kv = streams_kv(2, 16)
    with pytest.raises(RangeError, match=r"seq_id = 3: must be in \[0, 2\)"):
        kv.seq_pos_max_of(np.array([0, 3, 5]))
    with pytest.raises(RangeError, match=r"seq_id = 3: must be in \[0, 2\)"):
        kv.seq_pos_max(3)
    assert kv.seq_pos_max(np.int64(1)) == -1  # numpy ids still take the checked path
    kv.close()
    with pytest.raises(ClosedError):
        kv.seq_pos_max(0)
    with pytest.raises(ClosedError):
        kv.seq_pos_min_of(np.array([0]))


# ---------------------------------------------------------------------------------------
# single_seq_ids (word-0 path and the general path) and seq_rm_bit's owner update on
# shared cells, against a per-row reference on random bitsets
# ---------------------------------------------------------------------------------------


def _owner_reference(bits: np.ndarray) -> list[int]:
    out = []
    for row in bits:
        ids = [w * 64 + b for w in range(4) for b in range(64) if (int(row[w]) >> b) & 1]
        out.append(ids[0] if len(ids) == 1 else (-1 if not ids else -2))
    return out


@pytest.mark.parametrize("hi", [64, 256])
@pytest.mark.parametrize("seed", range(4))
def test_single_seq_ids_equals_a_per_row_reference(hi, seed):
    rng = np.random.default_rng(seed)
    bits = np.zeros((300, 4), dtype=np.uint64)
    for i in range(300):
        for s in rng.integers(0, hi, int(rng.integers(0, 4))):
            bits[i, s >> 6] |= np.uint64(1) << np.uint64(s & 63)
    bits[0] = np.uint64(2**64 - 1)  # all 256 ids: its counts sum to 0 mod 256
    bits[1] = [0, 0, 0, 1 << 63]  # id 255 alone
    assert single_seq_ids(bits).tolist() == _owner_reference(bits)
    assert single_seq_ids(bits[:, :][::2]).tolist() == _owner_reference(bits[::2])  # strided rows


@pytest.mark.parametrize("seed", range(6))
def test_seq_rm_bit_on_shared_cells_equals_owners_from_scratch(seed):
    rng = np.random.default_rng(seed)
    cells = KVCells(64)
    idx = np.arange(64)
    seqs = rng.integers(0, 4 if seed % 2 else 100, 64).astype(np.int32)
    cells.set_new(idx, np.arange(64, dtype=np.int32), seqs[:, None])
    for s in rng.integers(0, 4 if seed % 2 else 100, 5).tolist():  # forks: cells shared by 2-6
        cells.seq_add_bit(idx[rng.random(64) < 0.6], int(s))
    victim = int(seqs[0])
    freed = cells.seq_rm_bit(np.flatnonzero(cells.seq_mask(victim)), victim)
    assert cells.owner.tolist() == _owner_reference(cells.seq)
    assert cells.n_multi == int(np.count_nonzero(cells.owner == -2))
    assert freed.tolist() == np.flatnonzero(cells.pos < 0).tolist()
    assert not cells.seq_mask(victim).any()


# ---------------------------------------------------------------------------------------
# a per-sequence state restore without SWA is placed at commit, its fit judged by counts
# at parse time: it must equal seq_rm + find_slot + apply_ubatch done step by step, and a
# blob that does not fit must raise the same error and change nothing
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_direct_sequence_restore_equals_the_stepwise_placement(unified, seed):
    def build() -> KVCache:
        kv = make_kv(32, 4, unified=True) if unified else streams_kv(4, 32)
        fill_randomly(kv, np.random.default_rng(seed), foreign=unified)
        return kv

    rng = np.random.default_rng(100 + seed)
    a, b = build(), build()
    src, dst = (int(x) for x in rng.integers(0, 4, 2))
    if not unified:
        dst = src  # a sequence's blob restores into its own stream
    blob = a.state_write(src)
    n = int(np.count_nonzero(a.get_cells(src).seq_mask(src)))
    free = a.kv_size - a.get_cells(dst).used + int(np.count_nonzero(a.get_cells(dst).owner == dst))
    before = state_of(a)
    if n == 0:
        return
    if n > free:
        with pytest.raises(StateError, match=f"has {free} free"):
            a.state_read(blob, dst)
        assert state_of(a) == before
        return
    a.state_read(blob, dst)
    # the same placement, step by step, on the twin: the blob lists the source cells in
    # cell order
    src_cells = b.get_cells(src)
    pos = src_cells.pos[src_cells.seq_mask(src)].copy()
    assert b._place_restored(dst, _restore_ubatch(1, dst, pos, None)) is not None
    assert state_of(a) == state_of(b)
    check_invariants(a)
