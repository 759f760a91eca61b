"""cpy_k / cpy_v / get_k / get_v: set_rows nodes store a ubatch's K/V in its cells, and
the views read them back in the reference layout (V transposed or not, several streams)."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import make_kv

import pymem.ggml as gg
from pymem.batch import Batch, BatchAllocator


@pytest.mark.parametrize("v_trans", [True, False])
@pytest.mark.parametrize("unified", [True, False])
def test_store_and_view(v_trans, unified):
    kv = make_kv(8, 2, v_trans=v_trans, unified=unified)  # 2 heads of 8, f16
    items = [[1, 0, [0], False], [1, 1, [0], True], [1, 0, [1], False], [1, 1, [1], True]]
    b = BatchAllocator()
    b.init(Batch.from_items(items), memory=kv, n_seq_max=2)
    ctx_kv = kv.init_batch(b, 8, False)
    ctx_kv.apply()
    n = ctx_kv.get_ubatch().n_tokens
    rng = np.random.default_rng(0)
    k_vals = rng.standard_normal((n, 2, 8)).astype(np.float32)
    v_vals = rng.standard_normal((n, 2, 8)).astype(np.float32)
    runner = gg.GraphRunner("CPU")
    with gg.Context() as ctx:
        k_cur = ctx.new_tensor("f32", (8, 2, n), input=True)
        v_cur = ctx.new_tensor("f32", (8, 2, n), input=True)
        k_idx = ctx.new_tensor("i64", (n,), input=True)
        v_idx = ctx.new_tensor("i64", (ctx_kv.get_v_idxs().size,), input=True)
        outs = [ctx_kv.cpy_k(ctx, k_cur, k_idx, 0), ctx_kv.cpy_v(ctx, v_cur, v_idx, 0)]
        runner.run(
            ctx,
            outs,
            inputs={
                k_cur: k_vals,
                v_cur: v_vals,
                k_idx: ctx_kv.get_k_idxs(),
                v_idx: ctx_kv.get_v_idxs(),
            },
            read=[],
        )
    k16 = k_vals.astype(np.float16).reshape(n, 16)
    v16 = v_vals.astype(np.float16).reshape(n, 16)
    layer = kv.layers[0]
    rows = ctx_kv.get_k_idxs()
    assert np.array_equal(layer.k.numpy().reshape(-1, 16)[rows], k16)
    if v_trans:
        full = layer.v.numpy().reshape(kv.n_stream, 16, 8)  # per stream [channel, cell]
        strm, cell = rows // 8, rows % 8
        assert np.array_equal(full[strm, :, cell], v16)
    else:
        assert np.array_equal(layer.v.numpy().reshape(-1, 16)[rows], v16)
    # views over n_kv cells of the slot's streams
    n_kv = ctx_kv.get_n_kv()
    with gg.Context() as ctx:
        kv_k = ctx.cont(ctx_kv.get_k(ctx, 0))
        kv_v = ctx.cont(ctx_kv.get_v(ctx, 0))
        got_k, got_v = runner.run(ctx, [kv_k, kv_v])
    ns = ctx_kv.get_sinfo().n_stream
    assert got_k.shape == (ns, n_kv, 2, 8)
    # E.g. unified: cells 0..3 hold the tokens in order
    k_cells = layer.k.numpy().reshape(kv.n_stream, 8, 2, 8)[:ns, :n_kv]
    assert np.array_equal(got_k, k_cells)
    if v_trans:
        assert got_v.shape == (ns, 8, 2, n_kv)  # [dim, head, cell] per stream
        vt = layer.v.numpy().reshape(kv.n_stream, 2, 8, 8)[:ns, :, :, :n_kv]  # [head, dim, cell]
        assert np.array_equal(got_v, vt.transpose(0, 2, 1, 3))
    else:
        assert np.array_equal(got_v, layer.v.numpy().reshape(kv.n_stream, 8, 2, 8)[:ns, :n_kv])
