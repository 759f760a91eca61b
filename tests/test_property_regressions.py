"""Regression tests for the failures the stateful property tests found (tests/test_property.py).

Each test is the minimal failing program, shrunk by hand from what hypothesis / the soak
runner reported, with the reference behaviour it pins. While a bug is open its test is
a strict xfail naming the request in /work/notes/REQUESTS.md (and the harness can model
it, ``EMULATE_OPEN_BUGS`` in tests/spec/harness.py, so the random programs keep exploring
the rest); once the owner fixes it the marker goes and the test guards the fix. All the
bugs below are fixed.
"""

from __future__ import annotations

import dataclasses

import pytest
from spec.harness import Config, Pair, build_pymem

from pymem.batch import Batch, BatchAllocator
from pymem.errors import StateError, UnsupportedError
from pymem.kv import KVCache
from pymem.kv.iswa import KVCacheISWA
from pymem.recurrent import RecurrentMemory
from pymem.reuse import CheckpointPolicy, PrefixCache, checkpoint, plan_rollback, restore_checkpoint
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType, SWAType


def _decode(mem, items, n_seq_max: int, n_ubatch: int = 8) -> list:
    """Validate, plan and apply a batch on a pymem memory; returns the ubatches."""
    b = Batch.from_items(items)
    balloc = BatchAllocator()
    balloc.init(b, memory=mem, n_seq_max=n_seq_max, n_vocab=64)
    ctx = mem.init_batch(balloc, n_ubatch, False)
    ubs = []
    while True:
        ubs.append(ctx.get_ubatch())
        ctx.apply()
        if not ctx.next():
            return ubs


# --------------------------------------------------------------------------------------
# R1 (recurrent): a tail at a negative position. Found by the soak runner (recurrent,
# seed "recurrent-72"): seq_add(s, -1, -1, -2) on a sequence at position 0.
# llama_memory_recurrent::seq_pos_max starts from -1 and takes the max, so a state at
# position -2 reports pos_max = -1 while seq_pos_min reports -2; the next batch for that
# sequence is then unconstrained (X = -1). pymem reported (-2, -2) and refused the next
# batch unless it started at -1 (fixed).
# --------------------------------------------------------------------------------------


def test_r1_recurrent_negative_position_reports_pos_max_minus_one() -> None:
    spec = ModelSpec(layers=(LayerSpec.ssm(6, 10),), arch="spec")
    mem = RecurrentMemory(spec, n_seq_max=2)
    _decode(mem, [[1, 0, [1], True]], 2)
    mem.seq_add(1, -1, 2, -2)
    assert (mem.seq_pos_min(1), mem.seq_pos_max(1)) == (-2, -1)
    # and, as in the reference, a batch restarting the sequence at 0 is accepted
    _decode(mem, [[2, 0, [1], True]], 2)


def test_r1_hybrid_negative_recurrent_position() -> None:
    # hybrid (recurrent + attention, one stream per sequence): seq_add(0, 0, 3, -4) moves
    # the recurrent state to -4 (removing the attention cells below 0): the hybrid's
    # pos_max is min(attn, recr) = min(-1, -1) in the reference, min(-1, -4) in pymem
    pair = Pair(Config("hybrid", layout="RA", n_seq_max=2, unified=False, kv_size=16))
    try:
        pair.decode([[1, 0, [0], False], [2, 1, [0], False], [3, 2, [0], True]])
        pair.seq_op("seq_add", 0, 0, 3, -4)
        assert pair.pm.seq_pos_max(0) == -1
    finally:
        pair.close()


# --------------------------------------------------------------------------------------
# I1 (iSWA): a cross-stream seq_cp that one cache refuses must change nothing. Found by
# the soak runner (hybrid_iswa, seed "hybrid_iswa-29"). With one stream per sequence the
# reference asserts for a partial-range cross-stream copy ("seq_cp() is only supported
# for full KV buffers"), and "full" is judged against each cache's own size: [0, 3) is
# full for a 4-cell base cache but partial for a 16-cell SWA cache. pymem's base cache
# copied, then the SWA cache raised UnsupportedError: a typed error after a change (fixed:
# the composite asks every part's check_seq_cp before any part changes).
# --------------------------------------------------------------------------------------


def _iswa(n_seq_max: int, unified: bool, base_size: int, swa_size: int) -> KVCacheISWA:
    rope = RopeSpec(n_rot=8, rope_type=RopeType.NONE)
    spec = ModelSpec(
        layers=(
            LayerSpec.attention(1, 8, rope=rope),
            LayerSpec.attention(1, 8, swa=True, rope=rope),
        ),
        n_swa=3,
        swa_type=SWAType.STANDARD,
        arch="spec",
    )
    kw = dict(unified=unified, n_seq_max=n_seq_max)
    base = KVCache(spec, kv_size=base_size, filter=lambda il: il == 0, **kw)
    swa = KVCache(
        spec, kv_size=swa_size, filter=lambda il: il == 1, n_swa=3, swa_type=SWAType.STANDARD, **kw
    )
    return KVCacheISWA.from_parts(base, swa)


def test_i1_iswa_refused_cross_stream_copy_changes_nothing() -> None:
    mem = _iswa(n_seq_max=8, unified=False, base_size=4, swa_size=16)
    _decode(mem, [[1, 0, [6], False], [2, 1, [6], True]], 8)
    before = mem.state_write()
    with pytest.raises(UnsupportedError):
        mem.seq_cp(6, 3, 0, 3)
    assert mem.state_write() == before
    assert mem.kv_base.v_cells[3].pos.tolist() == [-1, -1, -1, -1]
    # the whole range is full for both caches: the copy goes through
    mem.seq_cp(6, 3, -1, -1)
    assert (mem.kv_base.seq_pos_max(3), mem.kv_swa.seq_pos_max(3)) == (1, 1)


def test_i1_hybrid_iswa_refused_cross_stream_copy_changes_nothing() -> None:
    # the same copy one level down: the hybrid asks its iSWA part, which asks both caches,
    # before the attention or the recurrent part changes
    from pymem.hybrid import HybridISWAMemory

    iswa = _iswa(n_seq_max=8, unified=False, base_size=4, swa_size=16)
    recr = RecurrentMemory(ModelSpec(layers=(LayerSpec.ssm(6, 10),), arch="spec"), n_seq_max=8)
    mem = HybridISWAMemory(iswa, recr)
    _decode(mem, [[1, 0, [6], False], [2, 1, [6], True]], 8)
    before = mem.state_write()
    with pytest.raises(UnsupportedError):
        mem.seq_cp(6, 3, 0, 3)
    assert mem.state_write() == before
    assert recr.seq_pos_max(3) == -1 and iswa.kv_base.seq_pos_max(3) == -1
    mem.close()


# --------------------------------------------------------------------------------------
# I2 (iSWA): the split strategy follows the *unified flag*, not the stream count. Found by
# the soak runner (iswa, seed "iswa-11"). llama_kv_cache_iswa::init_batch tries
# split_simple only when constructed with unified = true; with kv_unified = false and
# n_seq_max = 1 (llama_context_default_params!) the cache has one stream but the
# reference splits with split_equal(sequential = true): ubatches with equal_seqs = true
# and n_seq_tokens = n_tokens. pymem's KVCacheISWA.from_parts derived "unified" from
# n_stream == 1 and used split_simple (fixed: it takes the base cache's unified flag).
# --------------------------------------------------------------------------------------


def test_i2_iswa_not_unified_single_sequence_uses_split_equal() -> None:
    mem = _iswa(n_seq_max=1, unified=False, base_size=16, swa_size=8)
    (ub,) = _decode(mem, [[1, 0, [0], False], [2, 1, [0], True]], 1)
    assert bool(ub.equal_seqs) and ub.n_seq_tokens == 2 and ub.n_seqs == 1


# --------------------------------------------------------------------------------------
# Behaviours the property runs pinned on the way (all pass): kept as named programs.
# --------------------------------------------------------------------------------------


def test_p1_split_equal_n_ubatch_plus_one_multi_stream_kv() -> None:
    # four one-token sequences, n_ubatch 2, one stream per sequence: the first ubatch has
    # 3 tokens (split_equal accepts n_ubatch + 1 sets), the second 1
    pair = Pair(Config("kv", n_seq_max=4, unified=False, kv_size=8, n_ubatch=2))
    try:
        assert pair.decode([[1, 0, [s], True] for s in range(4)]) == 0
        assert [int(c.pos[0]) for c in pair.pm.v_cells] == [0, 0, 0, 0]
    finally:
        pair.close()


def test_p2_swa_masked_cells_are_reused_and_purged() -> None:
    # one 4-cell SWA cache (window 2): a sequence of 6 tokens overwrites its own masked
    # cells and purges positions up to the largest one overwritten
    pair = Pair(Config("kv", layout="W", n_seq_max=1, kv_size=4, n_swa=2, swa_type=1, n_ubatch=1))
    try:
        for p in range(6):
            assert pair.decode([[1, p, [0], True]]) == 0
        assert sorted(pair.pm.v_cells[0].pos.tolist()) == [2, 3, 4, 5]
        assert pair.pm.seq_pos_min(0) == 2
    finally:
        pair.close()


def test_p3_recurrent_copy_of_a_rolled_back_sequence_reads_plane_0() -> None:
    # n_rs_seq 2: roll seq 0 back by 2 (pending rollback plane 2 of its cell), share it
    # with seq 1 (seq_cp), then advance seq 1. Its new cell copies on write from seq 0's
    # cell, but s_copy uses seq 1's own rollback index (0): seq 1 continues from plane 0,
    # the state *before* the rollback, at position 3. A reference quirk pymem keeps (parity);
    # seq 0's pending rollback stays pending.
    pair = Pair(Config("recurrent", layout="R", n_seq_max=2, n_rs_seq=2, n_ubatch=4))
    try:
        assert pair.decode([[t, t, [0], t == 4] for t in range(5)]) == 0
        assert pair.seq_op("seq_rm", 0, 3, -1) == "ok"
        assert pair.pm.seq_pos_max(0) == 2
        pair.seq_op("seq_cp", 0, 1, -1, -1)
        assert pair.decode([[9, 3, [1], True]]) == 0
        assert [int(x) for x in pair.pm.rs_idx] == [2, 0]
        assert pair.pm.seq_pos_max(1) == 3 and pair.pm.seq_pos_max(0) == 2
    finally:
        pair.close()


# --------------------------------------------------------------------------------------
# Prefix cache (pymem/reuse/prefix_cache.py, radix.py) against the contract model of
# tests/spec/prefix.py, found by the random programs once they served requests.
# --------------------------------------------------------------------------------------


def _recurrent(n_seq_max: int, n_rs_seq: int = 0) -> RecurrentMemory:
    spec = ModelSpec(layers=(LayerSpec.ssm(6, 10),), arch="spec")
    return RecurrentMemory(spec, n_seq_max=n_seq_max, n_rs_seq=n_rs_seq)


def _serve(cache: PrefixCache, seq: int, toks: list[int], kind: str = "prompt") -> None:
    """attach, then every chunk decoded (bookkeeping only) and recorded."""
    att = cache.attach(seq, toks, kind)  # type: ignore[arg-type]
    for p0, p1 in att.chunks:
        items = [[toks[p], p, [seq], p == p1 - 1] for p in range(p0, p1)]
        _decode(cache.mem, items, 4)
        cache.record(seq, toks[:p1])


_NO_CHECKPOINTS = CheckpointPolicy(
    interval=0, before_last_turn=False, before_last_token=False, branch_points=False
)


# C1 (radix.py): a leaf no sequence runs through any more kept the tokens after its
# deepest checkpoint, so lookups matched tokens nothing cached (n_common too long, and a
# branch-point checkpoint planned where nothing branches). Found by the random programs
# (recurrent, seed "recurrent-56"): a sequence decodes 6 tokens with a checkpoint at
# position 3, then goes away. Fixed: prune cuts such a leaf back to its deepest payload.
def test_c1_prefix_cache_forgets_tokens_past_the_last_checkpoint() -> None:
    with _recurrent(4) as mem, PrefixCache(mem, policy=CheckpointPolicy(interval=4)) as cache:
        _serve(cache, 0, [1, 2, 0, 2, 1, 0], "generate")
        assert [e.pos for e in cache.entries()] == [3]
        mem.seq_rm(0, -1, -1)
        cache.release(0)
        m = cache.lookup([1, 2, 0, 2, 1, 0, 5], 1)
        assert (m.n_common, m.n_reuse, m.how, m.pos) == (4, 4, "restore", 3)


# C2 (prefix_cache.py): a sequence holding exactly a prefix of the request is copied
# whole only when it ends where the request leaves the cache; one that ends earlier on the
# path was ignored, although its whole state is an exact way back. Found by the random
# programs (hybrid_iswa-1011, hybrid-1026: a longer checkpoint copy or a recompute taken
# instead). Fixed: the deepest end on the path, at or before the common prefix, is a copy.
def test_c2_prefix_cache_copies_a_sequence_that_ends_before_the_common_prefix() -> None:
    with _recurrent(4) as mem, PrefixCache(mem, policy=_NO_CHECKPOINTS) as cache:
        _serve(cache, 0, [1, 2, 3, 4, 5, 6])
        _serve(cache, 1, [1, 2, 3])
        m = cache.lookup([1, 2, 3, 4, 9], 2)
        assert (m.n_common, m.n_reuse, m.source, m.how, m.src_seq) == (4, 3, "live", "copy", 1)


# C3 (prefix_cache.py): a recurrent sequence rolled back by a snapshot plane keeps the
# rollback pending until its next ubatch; seq_cp copies the cell, whose plane 0 is still
# the state *before* the rollback (the reference's behaviour, test_p3 above), so a copy
# of that sequence continued from the wrong state. Found by the random programs
# (recurrent-1044, recurrent-1049, hybrid_iswa-1038: the copy's state was not the fold
# of its tokens). Fixed: a source with a pending rollback is not copied whole.
def test_c3_prefix_cache_does_not_copy_a_sequence_with_a_pending_rollback() -> None:
    with _recurrent(4, n_rs_seq=2) as mem, PrefixCache(mem, policy=_NO_CHECKPOINTS) as cache:
        _serve(cache, 0, [1, 2, 3, 4, 5])
        att = cache.attach(0, [1, 2, 3, 4, 7])  # back to 4 through a snapshot plane
        assert (att.match.how, att.resume_from) == ("snapshot", 4)
        assert mem.rs_idx[0] == 1
        m = cache.lookup([1, 2, 3, 4, 8], 1)
        assert (m.n_reuse, m.how) == (0, "recompute")


# C4 (prefix_cache.py): with sliding windows (and no recurrent part) another sequence's
# cells were copied only from the lowest sequence holding the whole common prefix; when
# its window no longer held what a token there attends to, nothing was copied, although
# a sequence sharing a shorter prefix still had its window. Found by the random programs
# (kv-2096, iswa-2060, iswa-2120, iswa-2133: a recompute where a copy was exact). Fixed:
# the path is searched deepest first, every current sequence tried.
def test_c4_prefix_cache_copies_from_a_sequence_whose_window_is_still_there() -> None:
    # one stream per sequence, 4 window cells each: decoding overwrites masked cells
    cfg = Config(
        "iswa", layout="AW", n_seq_max=3, unified=False, kv_size=32, swa_size=4, n_swa=2,
        swa_type=1,
    )  # fmt: skip
    policy = dataclasses.replace(_NO_CHECKPOINTS, n_batch=2)  # 2 tokens a decode
    with build_pymem(cfg) as mem, PrefixCache(mem, policy=policy) as cache:
        _serve(cache, 0, list(range(1, 11)))
        _serve(cache, 1, [1, 2, 3, 4, 7])
        # a token at 5 attends to 4 and 5: sequence 0 keeps 6.. only, sequence 1 keeps 1..
        assert (mem.seq_pos_min(0), mem.seq_pos_min(1)) == (6, 1)
        m = cache.lookup([1, 2, 3, 4, 5, 99], 2)
        assert (m.n_common, m.n_reuse, m.how, m.src_seq) == (5, 4, "copy", 1)


# C5 (prefix_cache.py): a hybrid whose attention cache slides leaves that cache out of a
# checkpoint (it is trimmed, as full attention is), so restoring the checkpoint needs the
# live sequence's window at the checkpoint; the cache restored it anyway and the attached
# sequence missed its window cells (or ended before the checkpoint: an AssertionError).
# Found by the random programs (hybrid-2013, hybrid-2078, hybrid-2140). Fixed: such a
# checkpoint needs a live sequence whose window is still there.
def test_c5_prefix_cache_hybrid_sliding_checkpoint_needs_the_window() -> None:
    cfg = Config("hybrid", layout="RW", n_seq_max=2, kv_size=4, n_swa=2, swa_type=1)
    policy = CheckpointPolicy(
        interval=4, before_last_turn=False, before_last_token=False, branch_points=False,
        n_batch=2,
    )  # fmt: skip
    with build_pymem(cfg) as mem, PrefixCache(mem, policy=policy) as cache:
        _serve(cache, 0, list(range(1, 11)))
        assert [e.pos for e in cache.entries()] == [3, 7]
        # the window of a token at 4 starts at 3: its cell was overwritten
        assert mem.mem_attn.seq_pos_min(0) == 6
        m = cache.lookup([1, 2, 3, 4, 5, 99], 1)
        assert (m.n_reuse, m.how) == (0, "recompute")


# C6 (prefix_cache.py): a chunked window that starts a new chunk at the cut position
# needs nothing before it, so the planner calls the cut a trim; but the sequence's cells
# before the chunk were purged and the cut leaves it empty, while the cache recorded it
# as holding the prefix (and, taking a checkpoint there, raised RangeError from attach).
# Found by the random programs (kv-2103). Fixed: a cut or copy keeps the cell at L - 1.
def test_c6_prefix_cache_does_not_cut_a_chunked_sequence_to_nothing() -> None:
    cfg = Config("kv", layout="W", n_seq_max=1, kv_size=4, n_swa=2, swa_type=2)
    with build_pymem(cfg) as mem, PrefixCache(mem, policy=CheckpointPolicy(n_batch=2)) as cache:
        _serve(cache, 0, [1, 0, 2, 2, 2, 2, 2, 2])
        assert mem.seq_pos_min(0) == 4  # cells 0..3 overwritten: chunks [4, 6), [6, 8)
        att = cache.attach(0, [1, 0, 1, 1])
        assert (att.match.how, att.resume_from) == ("recompute", 0)
        assert mem.seq_pos_max(0) == -1 and cache.held(0) is None


# C7 (checkpoints.py, planner.py): the same hole outside the prefix cache: a hybrid's
# sliding attention cache is trimmed by a restore, not restored, so restore_checkpoint
# (and a rollback plan of kind "checkpoint") brought the recurrent state back while the
# window cells before the checkpoint were gone: the sequence missed them. Found by the
# random programs through PrefixCache.restore_entry (hybrid-3039). Fixed: restorable()
# refuses, before any change, when a trimmed sliding cache lacks the window.
def test_c7_hybrid_sliding_checkpoint_restore_needs_the_window() -> None:
    cfg = Config("hybrid", layout="RW", n_seq_max=2, kv_size=4, n_swa=2, swa_type=1)
    toks = list(range(1, 11))
    with build_pymem(cfg) as mem:
        _decode(mem, [[toks[p], p, [0], p == 3] for p in range(4)], 2, n_ubatch=2)
        ck = checkpoint(mem, 0)
        for p0 in range(4, 10, 2):
            _decode(mem, [[toks[p], p, [0], p == p0 + 1] for p in (p0, p0 + 1)], 2)
        assert (ck.pos, mem.mem_attn.seq_pos_min(0)) == (3, 6)  # the window of 4 starts at 3
        before = mem.state_write()
        with pytest.raises(StateError, match="sliding window"):
            restore_checkpoint(mem, 0, ck)
        assert mem.state_write() == before
        assert plan_rollback(mem, 0, 5, [ck]).kind == "recompute"


# --------------------------------------------------------------------------------------
# R2 (recurrent, fixed): a sequence's snapshot planes stay in its old cell when another
# sequence's slot search moves its cell. Found by the random programs through the prefix
# cache (hybrid-5147: a snapshot rollback of the attached sequence, whose recurrent state
# then was not the fold of its tokens). pymem refuses rollbacks its planes cannot serve
# (RecurrentCells.n_last, a deliberate departure), but a move keeps n_last: after it,
# rollback_reach still says 2, seq_rm(1, 2, -1) succeeds and the next ubatch gathers
# plane 2 of the new cell, which holds another state. The graph copies only plane 0 of a
# moved cell. Fixed in pymem/recurrent/cells.py find_slot (and the spec's model of the
# departure, tests/spec/recurrent.py): a sequence outside the ubatch whose cell the swaps
# move gets n_last 0, so its rollbacks are refused (reach 0) and the planner replays from a
# checkpoint instead. The probe known_bugs "recurrent_moved_planes" now reads False.
# --------------------------------------------------------------------------------------


def test_r2_snapshot_rollback_after_a_cell_move_is_refused_or_exact() -> None:
    from spec import prefix as sprefix

    cfg = Config("hybrid", layout="RRA", n_seq_max=4, n_rs_seq=2, n_ubatch=32, kv_size=16)
    pair = Pair(cfg)
    try:
        pair.prefix_setup(sprefix.Policy(), 1 << 20, "none")  # indexes K rows
        pair.decode([[5, 0, [0], False], [6, 0, [1], False], [7, 0, [2], False], [8, 0, [3], True]])
        pair.decode([[9, 1, [1], False], [10, 2, [1], False], [11, 3, [1], True]])
        pair.seq_op("seq_rm", 0, -1, -1)
        pair.seq_op("seq_rm", 2, -1, -1)
        items = [[31, 0, [0], True], [54, 0, [2], True], [31, 1, [2], True], [30, 2, [2], False]]
        pair.decode([*items, [38, 3, [2], True]])  # sequence 1's cell moves from 1 to 2
        assert pair.pm.mem_recr.cells.tail[1] == 2
        # fixed: the moved sequence's snapshot planes stayed behind, so no rollback is exact
        assert pair.pm.mem_recr.rollback_reach(1) == 0
        pair.seq_op("seq_rm", 1, 2, -1)  # a rollback of 2 tokens
        if pair.sp.rs.rs_idx[1] == 2:  # accepted as exact: the state must be right
            assert sprefix.holds_exactly(pair.sp, 1, (6, 9), pair.rows) == ""
    finally:
        pair.close()
