"""Hand-worked KV cache cases with exact cell indices, heads and positions.

Each test names the behaviour (or the reference quirk) it pins. ``check_invariants`` runs
after every step.
"""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, decode, make_kv, make_spec

from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError, ConfigError, RangeError, TypeSpecError, UnsupportedError
from pymem.kv import KVCache, SlotInfo
from pymem.kv.inputs import build_k_idxs
from pymem.memory import MemoryStatus
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType, SWAType
from pymem.ubatch import UBatch


def prompt(seq: int, n: int, start: int = 0) -> list:
    return [[1, start + k, [seq], k == n - 1] for k in range(n)]


def cells_of(kv: KVCache, strm: int = 0) -> list:
    c = kv.v_cells[strm]
    return [(i, int(c.pos[i]), c.seq_ids_of(i)) for i in range(c.size) if c.pos[i] >= 0]


def no_rope_spec(**kw) -> ModelSpec:
    return make_spec(rope=RopeSpec(n_rot=8, rope_type=RopeType.NONE), **kw)


def ubatch(tokens: list[tuple[int, list[int]]]) -> UBatch:
    """A split_simple-style ubatch of (pos, seq ids) tokens."""
    n = len(tokens)
    k = max(len(s) for _, s in tokens)
    seq = np.full((n, k), -1, dtype=np.int32)
    for i, (_, s) in enumerate(tokens):
        seq[i, : len(s)] = s
    uniq = np.unique(seq[seq >= 0]).astype(np.int32)
    seq_idx = np.full(256, -1, dtype=np.int32)
    seq_idx[uniq] = np.arange(uniq.size)
    return UBatch(
        equal_seqs=False,
        n_tokens=n,
        n_seq_tokens=1,
        n_seqs=n,
        n_seqs_unq=uniq.size,
        n_pos=1,
        token=np.zeros(n, np.int32),
        embd=None,
        pos=np.array([p for p, _ in tokens], dtype=np.int32),
        n_seq_id=(seq >= 0).sum(1).astype(np.int32),
        seq_id=seq,
        seq_id_unq=uniq,
        seq_idx=seq_idx,
        output=np.zeros(n, np.int8),
        batch_idxs=np.arange(n, dtype=np.int32),
    )


# --- placement -----------------------------------------------------------------------


def test_prompts_fill_cells_in_order_and_head_follows():
    kv = make_kv(16, 4)
    assert decode(kv, prompt(0, 5)).code == 0
    assert [c[0] for c in cells_of(kv)] == [0, 1, 2, 3, 4] and kv.v_heads == [5]
    assert decode(kv, prompt(1, 3)).code == 0
    assert cells_of(kv)[5:] == [(5, 0, [1]), (6, 1, [1]), (7, 2, [1])] and kv.v_heads == [8]
    check_invariants(kv, "all")


def test_seq_rm_moves_head_back_to_first_freed_cell_and_the_gap_is_reused():
    kv = make_kv(16, 4)
    decode(kv, prompt(0, 5))
    decode(kv, prompt(1, 3))
    assert kv.seq_rm(0, 1, 3) is True
    assert kv.v_heads == [1] and [c[0] for c in cells_of(kv)] == [0, 3, 4, 5, 6, 7]
    res = decode(kv, [[1, 3, [1], True], [1, 4, [1], True], [1, 5, [1], True]])
    # gap cells 1, 2 first, then 8 (the scan goes on from the head)
    assert res.placed[0][0].idxs.tolist() == [[1, 2, 8]] and kv.v_heads == [9]
    check_invariants(kv, (1,))


def test_head_restarts_at_zero_when_enough_unused_cells_lie_before_it():
    # head 10 > used 2 + 2 * 1 -> search from 0 (first free cell 2)
    kv = make_kv(16, 4)
    decode(kv, prompt(0, 2))
    kv.v_heads[0] = 10
    assert kv.find_slot(ubatch([(2, [0])])).idxs.tolist() == [[2]]
    # head 4 is not > 2 + 2 -> the search starts at 4
    kv.v_heads[0] = 4
    assert kv.find_slot(ubatch([(2, [0])])).idxs.tolist() == [[4]]


def test_non_contiguous_slot_wraps_around_in_scan_order():
    kv = make_kv(8, 4)
    decode(kv, prompt(0, 6))  # cells 0..5
    kv.seq_rm(0, 0, 2)  # frees 0, 1 -> head 0
    kv.seq_rm(0, 4, 5)  # frees 4
    kv.v_heads[0] = 5
    sinfo = kv.find_slot(ubatch([(9, [1]), (10, [1]), (11, [1]), (12, [1])]), cont=False)
    assert sinfo.idxs.tolist() == [[6, 7, 0, 1]]
    kv.apply_ubatch(sinfo, ubatch([(0, [1]), (1, [1]), (2, [1]), (3, [1])]))
    assert kv.v_heads == [2]  # past the last cell of the slot, not past the largest
    check_invariants(kv)


def test_contiguous_slot_search():
    kv = make_kv(8, 4)
    decode(kv, prompt(0, 8))
    kv.seq_rm(0, 1, 3)  # free 1, 2
    kv.seq_rm(0, 5, 8)  # free 5, 6, 7
    kv.v_heads[0] = 6
    three = ubatch([(0, [1]), (1, [1]), (2, [1])])
    # from 6 no window of 3 fits before the end -> wrap -> [1, 2] is too short -> 5..7
    assert kv.find_slot(three, cont=True).idxs.tolist() == [[5, 6, 7]]
    two = ubatch([(0, [1]), (1, [1])])
    assert kv.find_slot(two, cont=True).idxs.tolist() == [[6, 7]]
    kv.v_heads[0] = 3
    assert kv.find_slot(two, cont=True).idxs.tolist() == [[5, 6]]
    four = ubatch([(0, [1])] * 4)
    assert kv.find_slot(four, cont=True) is None
    assert kv.find_slot(four, cont=False).idxs.tolist() == [[5, 6, 7, 1]]


def test_full_cache_fails_to_prepare_and_changes_nothing():
    kv = make_kv(8, 2)
    decode(kv, prompt(0, 6))
    snap = [c.snapshot() for c in kv.v_cells]
    assert decode(kv, prompt(1, 3)).code == 1
    assert repr(snap) == repr([c.snapshot() for c in kv.v_cells])
    # more tokens than cells: same
    assert decode(kv, prompt(1, 9)).code == 1
    check_invariants(kv)


def test_prepare_plans_every_ubatch_on_top_of_the_previous_and_restores_exactly():
    kv = make_kv(16, 2)
    decode(kv, prompt(0, 3))
    balloc = BatchAllocator()
    balloc.init(Batch.from_items(prompt(1, 7)), memory=kv, n_seq_max=2)
    snap = [c.snapshot() for c in kv.v_cells], list(kv.v_heads)
    ctx = kv.init_batch(balloc, 3, False)
    assert repr(snap) == repr(([c.snapshot() for c in kv.v_cells], list(kv.v_heads)))
    assert [s.idxs.tolist() for s in ctx.sinfos] == [[[3, 4, 5]], [[6, 7, 8]], [[9]]]
    ctx.apply()
    assert ctx.get_n_kv() == 16  # min(size 16, max(256, pad(6, 256)))
    assert ctx.next() and ctx.apply() and ctx.next() and ctx.apply() and not ctx.next()
    assert kv.seq_pos_max(1) == 6 and kv.v_heads == [10]
    check_invariants(kv, "all")


def test_multi_sequence_tokens_share_one_cell():
    kv = make_kv(16, 4)
    decode(kv, [[1, p, [2, 3], p == 2] for p in range(3)])
    assert cells_of(kv) == [(0, 0, [2, 3]), (1, 1, [2, 3]), (2, 2, [2, 3])]
    assert kv.v_cells[0].owner[:3].tolist() == [-2, -2, -2]
    kv.seq_rm(3, -1, -1)
    assert cells_of(kv) == [(0, 0, [2]), (1, 1, [2]), (2, 2, [2])] and kv.seq_pos_max(3) == -1
    check_invariants(kv)


# --- SWA ------------------------------------------------------------------------------


def test_swa_masked_cell_is_reused_without_purge_when_it_is_the_oldest():
    kv = make_kv(8, 2, n_swa=4, swa_type=SWAType.STANDARD)
    decode(kv, prompt(0, 8))  # cells 0..7 = pos 0..7, head 8
    res = decode(kv, [[1, 8, [0], True]])
    # cells with 8 - p >= 4 (pos 0..4) are reusable; the scan wraps to cell 0
    assert res.placed[0][0].idxs.tolist() == [[0]]
    assert cells_of(kv)[0] == (0, 8, [0]) and kv.seq_pos_min(0) == 1 and kv.v_heads == [1]
    check_invariants(kv, "all")


def test_swa_overwrite_purges_older_positions_of_that_sequence():
    # pinned: apply_ubatch removes every position <= the overwritten one, keeping
    # [pos_min, pos_max] fully present
    kv = make_kv(8, 2, n_swa=4, swa_type=SWAType.STANDARD)
    decode(kv, prompt(0, 8))
    kv.v_heads[0] = 3
    res = decode(kv, [[1, 8, [0], True]])
    assert res.placed[0][0].idxs.tolist() == [[3]]
    assert cells_of(kv) == [(3, 8, [0]), (4, 4, [0]), (5, 5, [0]), (6, 6, [0]), (7, 7, [0])]
    assert kv.seq_pos_min(0) == 4 and kv.v_heads == [4]
    check_invariants(kv, "all")


def test_swa_cell_of_another_sequence_is_taken_and_that_sequence_purged():
    kv = make_kv(8, 2, n_swa=2, swa_type=SWAType.STANDARD)
    decode(kv, prompt(1, 4))  # seq 1: cells 0..3 pos 0..3; masked for seq 1: pos <= 2
    decode(kv, prompt(0, 4))  # seq 0: cells 4..7
    kv.v_heads[0] = 1
    res = decode(kv, [[1, 4, [0], True]])
    # cell 1 (seq 1, pos 1) is masked for seq 1 (4 - 1 >= 2): taken, seq 1 purged up to pos 1
    assert res.placed[0][0].idxs.tolist() == [[1]]
    assert cells_of(kv)[:3] == [(1, 4, [0]), (2, 2, [1]), (3, 3, [1])]
    assert kv.seq_pos_min(1) == 2
    check_invariants(kv, "all")


def test_prepare_does_not_keep_a_purge_when_a_later_ubatch_fails():
    # pymem difference: the reference restores only the planned cells, so cells purged
    # while planning ubatch 1 stay purged when ubatch 2 finds no slot
    kv = make_kv(8, 2, n_swa=4, swa_type=SWAType.STANDARD)
    decode(kv, prompt(0, 8))
    kv.v_heads[0] = 3
    snap = repr([c.snapshot() for c in kv.v_cells])
    ub1 = ubatch([(8, [0])])  # overwrites cell 3 and, applied, purges cells 0..2
    too_big = ubatch([(9 + k, [0]) for k in range(9)])
    assert kv.prepare([ub1]) is not None
    assert kv.prepare([ub1, too_big]) is None
    assert snap == repr([c.snapshot() for c in kv.v_cells]) and kv.v_heads == [3]
    assert kv.seq_pos_min(0) == 0
    check_invariants(kv, "all")


def test_chunked_and_symmetric_windows():
    kv = make_kv(8, 1, n_swa=4, swa_type=SWAType.CHUNKED)
    decode(kv, prompt(0, 8))
    # next pos 8, chunk [8, 12): every cell before 8 is masked
    assert kv._usable(kv.v_cells[0]).tolist() == [True] * 8
    kv2 = make_kv(8, 1, n_swa=4, swa_type=SWAType.SYMMETRIC)
    decode(kv2, prompt(0, 8))
    # |8 - p| > 2 -> p <= 5
    assert kv2._usable(kv2.v_cells[0]).tolist() == [True] * 6 + [False] * 2


# --- sequence operations ----------------------------------------------------------------


def setup_three() -> KVCache:
    kv = make_kv(16, 4, spec=no_rope_spec())
    decode(kv, prompt(0, 4) + prompt(1, 3))  # cells 0..3 seq 0, 4..6 seq 1
    kv.seq_cp(0, 2, 1, 3)  # cells 1, 2 shared by 0 and 2
    return kv


def test_seq_rm_sentinels():
    kv = setup_three()
    assert kv.seq_rm(0, 3, -1) and kv.seq_pos_max(0) == 2  # p1 < 0: to the end
    assert kv.seq_rm(0, -1, 2) and kv.seq_pos_min(0) == 2  # p0 < 0: from 0
    assert cells_of(kv)[:2] == [(1, 1, [2]), (2, 2, [0, 2])]
    assert kv.seq_rm(-1, 2, 5) and cells_of(kv) == [(1, 1, [2]), (4, 0, [1]), (5, 1, [1])]
    assert kv.seq_rm(100, -1, -1) is True  # an absent id of a unified cache: nothing to do
    before = cells_of(kv)
    assert kv.seq_rm(-1, 5, 2) is True and kv.seq_rm(1, 3, 3) is True  # empty ranges
    assert cells_of(kv) == before
    assert kv.seq_rm(-1, -1, -1) and cells_of(kv) == [] and kv.v_heads == [0]
    check_invariants(kv)


@pytest.mark.parametrize("bad", [-2, 256, 1 << 40])
def test_seq_ids_out_of_range_raise_before_anything_changes(bad):
    kv = setup_three()
    snap = repr([c.snapshot() for c in kv.v_cells])
    for call in (
        lambda: kv.seq_rm(bad, -1, -1),
        lambda: kv.seq_cp(0, bad),
        lambda: kv.seq_keep(bad),
        lambda: kv.seq_add(bad, 0, 1, 1),
        lambda: kv.seq_div(bad, 0, 1, 2),
        lambda: kv.seq_pos_max(bad),
        lambda: kv.seq_pos_min(bad),
    ):
        with pytest.raises(RangeError):
            call()
    assert snap == repr([c.snapshot() for c in kv.v_cells])


def test_seq_cp_shares_cells_and_ignores_self_copy():
    kv = setup_three()
    assert cells_of(kv)[:4] == [(0, 0, [0]), (1, 1, [0, 2]), (2, 2, [0, 2]), (3, 3, [0])]
    kv.seq_cp(2, 2)
    kv.seq_cp(0, 3)
    assert kv.seq_pos_min(3) == 0 and kv.seq_pos_max(3) == 3
    kv.seq_cp(0, 3)  # already there: idempotent
    check_invariants(kv)


def test_seq_keep_frees_other_cells_and_strips_shared_ones():
    kv = setup_three()
    kv.v_heads[0] = 7
    kv.seq_keep(2)
    assert cells_of(kv) == [(1, 1, [2]), (2, 2, [2])] and kv.v_heads == [0]
    check_invariants(kv)


def test_seq_add_moves_shared_cells_frees_negative_and_sets_head():
    kv = setup_three()
    kv.seq_add(0, 2, -1, 10)
    # positions belong to cells: cell 2 (seq 0 and 2) moves for both
    assert cells_of(kv)[:4] == [(0, 0, [0]), (1, 1, [0, 2]), (2, 12, [0, 2]), (3, 13, [0])]
    assert kv.seq_pos_max(2) == 12 and kv.v_heads == [0]  # nothing freed -> head 0
    assert kv.v_cells[0].shift[:4].tolist() == [0, 0, 10, 10] and kv.get_has_shift()
    kv.v_heads[0] = 7
    kv.seq_add(0, -1, 2, -1)  # pos 0 -> -1 is freed, pos 1 -> 0
    assert cells_of(kv)[:2] == [(1, 0, [0, 2]), (2, 12, [0, 2])] and kv.v_heads == [0]
    assert kv.v_cells[0].shift[:2].tolist() == [0, -1]
    kv.v_heads[0] = 7
    kv.seq_add(0, 5, 5, 3)  # empty range: nothing, head untouched
    kv.seq_add(0, -1, -1, 0)  # zero shift: nothing
    assert kv.v_heads == [7]
    check_invariants(kv)


def test_seq_div_records_the_true_displacement():
    # pymem difference: the reference accumulates old - new and rotates K the wrong way
    kv = make_kv(16, 2, spec=no_rope_spec())
    decode(kv, prompt(0, 7))
    kv.seq_div(0, 2, -1, 2)
    assert kv.v_cells[0].pos[:7].tolist() == [0, 1, 1, 1, 2, 2, 3]
    assert kv.v_cells[0].shift[:7].tolist() == [0, 0, -1, -2, -2, -3, -3]
    kv.seq_div(0, -1, -1, 1)
    with pytest.raises(RangeError):
        kv.seq_div(0, -1, -1, 0)
    check_invariants(kv)


def test_seq_add_and_div_refused_with_mrope():
    kv = make_kv(16, 2, spec=no_rope_spec(n_pos_per_embd=4))
    assert not kv.get_can_shift()
    with pytest.raises(UnsupportedError):
        kv.seq_add(0, -1, -1, 1)
    with pytest.raises(UnsupportedError):
        kv.seq_div(0, -1, -1, 2)


def test_clear_with_and_without_data():
    kv = make_kv(8, 2)
    decode(kv, prompt(0, 3))
    kv.layers[0].k.write_rows([0], np.full((1, kv.layers[0].k.row_size), 7, np.uint8))
    kv.clear(False)
    assert cells_of(kv) == [] and kv.layers[0].k.read_rows([0]).max() == 7
    kv.clear(True)
    assert kv.layers[0].k.read_rows([0]).max() == 0
    check_invariants(kv)


# --- streams -------------------------------------------------------------------------


def test_one_stream_per_sequence_places_each_sequence_in_its_stream():
    kv = make_kv(8, 3, unified=False)
    assert kv.n_stream == 3 and kv.layers[0].k.shape[:3] == (16, 8, 3)
    res = decode(kv, prompt(0, 2) + prompt(1, 2))
    sinfo = res.placed[0][0]
    assert sinfo.strm.tolist() == [0, 1] and sinfo.idxs.tolist() == [[0, 1], [0, 1]]
    assert res.placed[0][1].n_seqs_unq == 2
    assert build_k_idxs(kv.layout, sinfo).tolist() == [0, 1, 8, 9]
    assert kv.seq_pos_max(1) == 1 and cells_of(kv, 2) == []
    # the sequential splitter puts seq 2 (not seq 1 + 1 after seq 0) in its own ubatch
    res = decode(kv, prompt(0, 1, 2) + prompt(2, 1))
    assert [p[0].strm.tolist() for p in res.placed] == [[0], [2]]
    with pytest.raises(RangeError):
        kv.seq_rm(3, -1, -1)  # seq ids index the streams
    check_invariants(kv)


def test_cross_stream_seq_cp_copies_metadata_now_and_bytes_at_update():
    kv = make_kv(8, 2, unified=False, spec=no_rope_spec())
    decode(kv, prompt(0, 3))
    k = kv.layers[0].k
    k.write_rows([0, 1, 2], np.arange(3 * k.row_size, dtype=np.uint8).reshape(3, -1) % 251)
    kv.seq_add(0, 2, -1, 4)  # a pending shift travels with the copy
    kv.seq_cp(0, 1, -1, -1)
    assert cells_of(kv, 1) == [(0, 0, [1]), (1, 1, [1]), (2, 6, [1])]
    assert kv.v_cells[1].shift[:3].tolist() == [0, 0, 4] and kv.v_heads == [0, 0]
    assert k.read_rows([8, 9, 10]).max() == 0  # bytes not yet copied
    upd = kv.init_update()
    assert upd.get_status() == MemoryStatus.SUCCESS
    assert k.read_rows([8, 9, 10]).max() == 0  # planning changes nothing
    upd.apply()
    assert np.array_equal(k.read_rows([8, 9, 10]), k.read_rows([0, 1, 2]))
    assert not kv.get_has_shift() and kv.init_update().get_status() == MemoryStatus.NO_UPDATE
    with pytest.raises(UnsupportedError):
        kv.seq_cp(0, 1, 2, 5)  # partial ranges cannot cross streams
    kv.seq_cp(0, 1, 7, -1)  # the reference's "full" test: p0 = size - 1 passes
    check_invariants(kv)


# --- contexts ----------------------------------------------------------------------------


def test_init_full_and_update_contexts():
    kv = make_kv(64, 2, unified=False)
    full = kv.init_full()
    assert full.get_status() == MemoryStatus.SUCCESS and full.get_n_kv() == 64
    assert full.get_sinfo().strm.tolist() == [0, 1] and full.apply()
    assert kv.init_update().get_status() == MemoryStatus.NO_UPDATE
    failed = kv.init_batch(_balloc(kv, prompt(0, 100)), 8, False)
    assert failed.get_status() == MemoryStatus.FAILED_PREPARE
    with pytest.raises(BatchError):
        failed.apply()
    with pytest.raises(BatchError):
        failed.get_ubatch()


def _balloc(kv: KVCache, items: list) -> BatchAllocator:
    b = BatchAllocator()
    b.init(Batch.from_items(items), memory=kv, n_seq_max=kv.n_seq_max)
    return b


def test_n_kv_is_padded_to_256():
    kv = make_kv(4096, 1)
    ctx = kv.init_batch(_balloc(kv, prompt(0, 300)), 512, False)
    ctx.apply()
    assert ctx.get_n_kv() == 512
    assert kv.get_n_kv(SlotInfo(np.zeros(1, np.int32), np.zeros((1, 1), np.int32))) == 512
    small = make_kv(100, 1)
    ctx = small.init_batch(_balloc(small, prompt(0, 3)), 8, False)
    ctx.apply()
    assert ctx.get_n_kv() == 100


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "err"),
    [
        (dict(kv_size=0), ConfigError),
        (dict(kv_size=10, n_pad=4), ConfigError),
        (dict(n_seq_max=0), ConfigError),
        (dict(n_seq_max=257), ConfigError),
        (dict(n_swa=0, swa_type=SWAType.STANDARD), ConfigError),
        (dict(swa_type=7), ConfigError),
        (dict(type_k="nope"), TypeSpecError),
        (dict(type_v="q8_0"), ConfigError),  # a transposed V cannot hold blocks
        (dict(unified=1), ConfigError),
        (dict(filter=3), ConfigError),
        (dict(reuse=lambda il: 5), ConfigError),
        (dict(device={0: "CPU"}), ConfigError),
        (dict(type_k="q8_0"), ConfigError),  # 16 wide K rows do not fill q8_0 blocks
    ],
)
def test_bad_arguments_raise_typed_errors(kw, err):
    args = dict(kv_size=16, n_seq_max=2)
    args.update(kw)
    with pytest.raises(err):
        KVCache(make_spec(), **args)


def test_layer_filter_reuse_devices_and_breakdown():
    spec = ModelSpec(
        layers=(
            LayerSpec.ssm(4, 4),
            LayerSpec.attention(2, 8),
            LayerSpec.attention(1, 16),
            LayerSpec.attention(2, 8),
        )
    )
    kv = KVCache(
        spec,
        kv_size=32,
        n_seq_max=2,
        reuse=lambda il: 1 if il == 3 else -1,
        device={1: "CPU", 2: "CPU"},
    )
    assert kv.get_layer_ids() == [1, 2] and kv.layer(3) is kv.layer(1)
    assert kv.n_embd_v_gqa_max == 16  # [TAG_V_CACHE_VARIABLE]: V padded to the widest
    assert kv.layer(1).v.shape[:2] == (16, 32) and kv.layer(1).k.shape[:2] == (16, 32)
    k_bytes = 2 * 16 * 32 * 2
    assert kv.size_k_bytes() == k_bytes and kv.size_v_bytes() == 2 * 16 * 32 * 2
    assert kv.memory_breakdown()["CPU"] >= 2 * k_bytes
    with pytest.raises(RangeError):
        kv.layer(0)
    kv_fa = KVCache(spec, kv_size=32, n_seq_max=2, v_trans=False, filter=lambda il: il == 2)
    assert kv_fa.get_layer_ids() == [2] and kv_fa.layer(2).v.shape[0] == 16
    kv.close()
    kv_fa.close()


def test_seq_keep_bulk_rebuild_equals_the_cell_by_cell_path():
    kv_a = make_kv(64, 4)
    decode(kv_a, [[1, p, [s], False] for p in range(12) for s in range(4)])
    kv_a.seq_cp(1, 2, 3, 6)  # a few shared cells
    kv_a.v_cells[0].set_new(np.array([60]), np.array([5]), np.full((1, 1), -1, np.int32))
    kv_b = make_kv(64, 4)
    kv_b.v_cells[0] = __import__("copy").deepcopy(kv_a.v_cells[0])
    kv_a.seq_keep(2)  # drops 36 of 49 cells: bulk rebuild
    kv_b.v_cells[0].begin()  # under a journal the cell-by-cell path runs
    kv_b.seq_keep(2)
    kv_b.v_cells[0].end()
    assert repr(kv_a.v_cells[0].snapshot()) == repr(kv_b.v_cells[0].snapshot())
    assert kv_a.v_heads == kv_b.v_heads == [0]
    assert kv_a.v_cells[0].pos[60] == 5 and kv_a.seq_pos_max(2) == 11
    check_invariants(kv_a)
    check_invariants(kv_b)


@pytest.mark.parametrize("seed", range(4))
def test_chunked_slot_search_equals_a_full_scan(seed):
    # find_slot scans from the head in doubling chunks; the result must be the plain
    # circular scan's, whatever the head and the free cells
    rng = np.random.default_rng(seed)
    kv = make_kv(5000, 2)
    c = kv.v_cells[0]
    busy = np.flatnonzero(rng.random(5000) < rng.choice([0.5, 0.99, 0.999]))
    c.set_new(busy, np.arange(busy.size, dtype=np.int32), np.zeros((busy.size, 1), np.int32))
    free = np.flatnonzero(c.pos < 0)
    for head in (0, 17, 2500, 4999, 5000):
        for n in (1, 3, 40, 700):
            kv.v_heads[0] = head
            got = kv.find_slot(ubatch([(0, [1])] * n))
            h = 0 if head > c.used + 2 * n else head
            order = np.concatenate((free[free >= h], free[free < h]))
            if order.size < n:
                assert got is None
            else:
                assert got.idxs[0].tolist() == order[:n].tolist()


def test_quantised_k_must_fill_whole_blocks_per_head():
    # 2 heads x 16 = 32 wide rows fill one q8_0 block, but each head holds half a block:
    # per-head views would cut blocks, so the cache refuses it (as llama_init_from_model)
    spec = ModelSpec(layers=(LayerSpec.attention(2, 16),))
    with pytest.raises(
        ConfigError, match=r"K head size 16 \(row 32\) is not a multiple of the q8_0 block size 32"
    ):
        KVCache(spec, type_k="q8_0", kv_size=16, n_seq_max=1)
    with pytest.raises(
        ConfigError, match="V head size 16 is not a multiple of the q8_0 block size 32"
    ):
        KVCache(spec, type_v="q8_0", v_trans=False, kv_size=16, n_seq_max=1)
    KVCache(
        ModelSpec(layers=(LayerSpec.attention(1, 32),)), type_k="q8_0", kv_size=16, n_seq_max=1
    ).close()
