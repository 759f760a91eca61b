"""pymem.ggml: graphs over pymem tensors run on every device and write tensors in place."""

from __future__ import annotations

import numpy as np

import pymem.ggml as gg
from pymem.backend import TensorSpec, TensorStore


def test_set_rows_and_get_rows_over_a_store(device: str) -> None:
    with TensorStore(device, [TensorSpec("k", "f16", (8, 16))]) as store, gg.Context() as ctx:
        k = store["k"]
        x = ctx.new_tensor("f32", (8, 3), input=True)
        idx = ctx.new_tensor("i64", (3,), input=True)
        stored = ctx.set_rows(k.ptr, x, idx)
        values = np.arange(24, dtype=np.float32).reshape(3, 8)
        gg.GraphRunner(device).run(ctx, [stored], inputs={x: values, idx: np.array([4, 0, 9])})
        got = k.read_rows([4, 0, 9]).view(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got, values)


def test_mul_mat_and_softmax_match_numpy(device: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 16)).astype(np.float32)
    b = rng.standard_normal((3, 16)).astype(np.float32)
    with gg.Context() as ctx:
        ta = ctx.new_tensor("f32", (16, 5), input=True)
        tb = ctx.new_tensor("f32", (16, 3), input=True)
        out = ctx.soft_max_ext(ctx.mul_mat(ta, tb), gg.ffi.NULL, 0.5, 0.0)
        (got,) = gg.GraphRunner(device).run(ctx, [out], inputs={ta: a, tb: b})
    logits = (b @ a.T) * 0.5
    expect = np.exp(logits - logits.max(-1, keepdims=True))
    expect /= expect.sum(-1, keepdims=True)
    np.testing.assert_allclose(got.reshape(3, 5), expect, rtol=1e-5, atol=1e-6)
