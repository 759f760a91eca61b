"""Graph inputs with hand-worked values: row indices, V element indices, K-shift
positions, and KQ masks (causal, SWA, non-causal kinds, M-RoPE ties, ALiBi, f16)."""

from __future__ import annotations

import numpy as np
from kv_helpers import decode, make_kv, make_spec

from pymem.kv import KVCache, NonCausalType, SlotInfo
from pymem.kv.inputs import build_k_idxs, build_kq_mask, build_v_idxs
from pymem.spec import ModelSpec, RopeSpec, RopeType, SWAType
from pymem.ubatch import UBatch

X = -np.inf


def test_k_and_v_indices():
    kv = make_kv(8, 3, unified=False)  # n_embd_v_gqa_max = 16
    sinfo = SlotInfo(np.array([0, 2], np.int32), np.array([[3, 4], [0, 1]], np.int32))
    assert build_k_idxs(kv.layout, sinfo).tolist() == [3, 4, 16, 17]
    v = build_v_idxs(kv.layout, sinfo)
    assert v.dtype == np.int64 and v.size == 4 * 16
    # token 0 (cell 3 of stream 0): channels j -> j * 8 + 3
    assert v[:16].tolist() == [j * 8 + 3 for j in range(16)]
    # token 2 (cell 0 of stream 2): 2 * 8 * 16 + j * 8
    assert v[32:48].tolist() == [256 + j * 8 for j in range(16)]
    fa = make_kv(8, 3, unified=False, v_trans=False)
    assert build_v_idxs(fa.layout, sinfo).tolist() == [3, 4, 16, 17]


def test_context_getters_after_apply():
    kv = make_kv(8, 2)
    res = decode(kv, [[1, 0, [0], False], [1, 1, [0], True], [1, 0, [1], True]])
    assert res.code == 0
    from pymem.batch import Batch, BatchAllocator

    b = BatchAllocator()
    b.init(Batch.from_items([[1, 2, [0], True], [1, 1, [1], True]]), memory=kv, n_seq_max=2)
    ctx = kv.init_batch(b, 8, False)
    ctx.apply()
    assert ctx.get_k_idxs().tolist() == [3, 4]
    assert ctx.get_n_kv() == 8
    mask = ctx.get_kq_mask()
    assert mask.shape == (1, 2, 8) and mask.dtype == np.float32
    assert mask[0].tolist() == [[0, 0, X, 0, X, X, X, X], [X, X, 0, X, 0, X, X, X]]
    m16 = ctx.get_kq_mask(dtype=np.float16)
    assert m16.dtype == np.float16 and np.array_equal(m16.astype(np.float32), mask)
    # non-causal: the seq-0 token also sees... only its own sequence's cells
    assert ctx.get_kq_mask(causal_attn=False)[0, 0].tolist() == [0, 0, X, 0, X, X, X, X]


def test_k_shift_input():
    kv = make_kv(8, 2, spec=make_spec(rope=RopeSpec(n_rot=8, rope_type=RopeType.NONE)))
    decode(kv, [[1, p, [0], False] for p in range(4)])
    kv.seq_add(0, 2, -1, 3)
    kv.seq_rm(0, 5, 6)  # cell 2 (now pos 5) is freed: its shift must read 0
    assert kv.k_shift().tolist() == [0, 0, 0, 3, 0, 0, 0, 0]


def swa_kv(swa_type: SWAType, n_swa: int, **kw) -> KVCache:
    return make_kv(16, 1, n_swa=n_swa, swa_type=swa_type, **kw)


def mask_for(kv: KVCache, items: list, **kw) -> np.ndarray:
    from pymem.batch import Batch, BatchAllocator

    b = BatchAllocator(kv.n_pos_per_embd)
    b.init(Batch.from_items(items), memory=kv, n_seq_max=kv.n_seq_max)
    ctx = kv.init_batch(b, 64, False)
    ctx.apply()
    return ctx.get_kq_mask(**kw)[0]


def test_swa_masks():
    items = [[1, p, [0], False] for p in range(6)]
    std = mask_for(swa_kv(SWAType.STANDARD, 3), items)
    assert (std[5, :6] == 0).tolist() == [False, False, False, True, True, True]  # 5 - p < 3
    chunk = mask_for(swa_kv(SWAType.CHUNKED, 4), items)
    assert (chunk[5, :6] == 0).tolist() == [False, False, False, False, True, True]  # chunk [4, 8)
    sym = mask_for(swa_kv(SWAType.SYMMETRIC, 4), items, causal_attn=False)
    assert (sym[2, :6] == 0).tolist() == [True, True, True, True, True, False]  # |2 - p| <= 2


def test_non_causal_kinds():
    items = [[1, p, [0], False] for p in range(6)]
    # SWA_FULL: tokens of the ubatch see each other whatever the window
    full = mask_for(
        swa_kv(SWAType.STANDARD, 2),
        items,
        causal_attn=False,
        non_causal_type=NonCausalType.SWA_FULL,
    )
    assert (full == 0)[:, :6].all()
    # ALL: non-causal but the window still applies
    alln = mask_for(swa_kv(SWAType.STANDARD, 2), items, causal_attn=False)
    # (the standard window is one-sided: later cells are never outside it)
    assert (alln[0, :6] == 0).tolist() == [True] * 6
    assert (alln[5, :6] == 0).tolist() == [False] * 4 + [True] * 2
    # SWA_ONLY: a cache without SWA stays causal
    only = mask_for(
        make_kv(16, 1), items, causal_attn=False, non_causal_type=NonCausalType.SWA_ONLY
    )
    assert (only[0, :6] == 0).tolist() == [True] + [False] * 5


def test_alibi_mask_values():
    spec = make_spec()
    kv = KVCache(ModelSpec(layers=spec.layers, use_alibi=True), kv_size=8, n_seq_max=1)
    m = mask_for(kv, [[1, p, [0], False] for p in range(3)])
    assert m[:, :3].tolist() == [[0, X, X], [-1, 0, X], [-2, -1, 0]]


def test_mrope_equal_positions_are_ordered_by_y_then_x():
    spec = make_spec(n_pos_per_embd=4, rope=RopeSpec(n_rot=8, rope_type=RopeType.MROPE))
    kv = KVCache(spec, kv_size=8, n_seq_max=1)
    # an image of 2x2 patches at temporal position 1: (x, y) = (0,0) (1,0) (0,1) (1,1)
    n = 5
    t = [0, 1, 1, 1, 1]
    y = [0, 0, 0, 1, 1]
    x = [0, 0, 1, 0, 1]
    pos = np.array(t + y + x + [0] * n, dtype=np.int32)
    seq_idx = np.full(256, -1, np.int32)
    seq_idx[0] = 0
    ub = UBatch(
        equal_seqs=False,
        n_tokens=n,
        n_seq_tokens=1,
        n_seqs=n,
        n_seqs_unq=1,
        n_pos=4,
        token=None,
        embd=np.zeros((n, 4), np.float32),
        pos=pos,
        n_seq_id=np.ones(n, np.int32),
        seq_id=np.zeros((n, 1), np.int32),
        seq_id_unq=np.zeros(1, np.int32),
        seq_idx=seq_idx,
        output=np.ones(n, np.int8),
        batch_idxs=np.arange(n, dtype=np.int32),
    )
    sinfo = kv.find_slot(ub)
    kv.apply_ubatch(sinfo, ub)
    assert kv.v_cells[0].ext[:5].tolist() == [
        [0, 0, -1],
        [0, 0, -1],
        [1, 0, -1],
        [0, 1, -1],
        [1, 1, -1],
    ]
    m = build_kq_mask(kv.layout, kv.v_cells, kv.spec, ub, 8)[0]
    keep = (m[:, :5] == 0).astype(int).tolist()
    assert keep == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]


def test_multi_stream_mask_blocks():
    kv = make_kv(8, 2, unified=False)
    from pymem.batch import Batch, BatchAllocator

    b = BatchAllocator()
    b.init(
        Batch.from_items(
            [[1, 0, [0], False], [1, 1, [0], True], [1, 0, [1], True], [1, 1, [1], True]]
        ),
        memory=kv,
        n_seq_max=2,
    )
    ctx = kv.init_batch(b, 8, False)
    ctx.apply()
    m = ctx.get_kq_mask()
    assert m.shape == (2, 2, 8)
    assert (m == 0).astype(int)[:, :, :3].tolist() == [
        [[1, 0, 0], [1, 1, 0]],
        [[1, 0, 0], [1, 1, 0]],
    ]
