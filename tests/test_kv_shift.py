"""The K-shift graph against a numpy RoPE (ggml's formulas, YaRN included).

(The recorded-run replay in test_kv_parity.py shows the bytes equal llama.cpp's.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from kv_helpers import decode

from pymem.kv import KVCache
from pymem.memory import MemoryStatus
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType


def yarn_corr_dims(n_dims, n_ctx_orig, base, beta_fast, beta_slow):
    def dim(n_rot):
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    return max(0.0, math.floor(dim(beta_fast))), min(n_dims - 1.0, math.ceil(dim(beta_slow)))


def rope_ref(x: np.ndarray, pos: np.ndarray, r: RopeSpec) -> np.ndarray:
    """Rotate ``x [n_cells, n_head, head_dim]`` by ``pos [n_cells]`` (float64)."""
    out = x.astype(np.float64).copy()
    n = r.n_rot
    theta_scale = r.freq_base ** (-2.0 / n)
    lo = hi = 0.0
    if r.ext_factor != 0:
        lo, hi = yarn_corr_dims(n, r.n_ctx_orig, r.freq_base, r.beta_fast, r.beta_slow)
    p = pos.astype(np.float64)[:, None]
    for i0 in range(0, n, 2):
        extrap = p * theta_scale ** (i0 // 2)
        theta = r.freq_scale * extrap
        mscale = r.attn_factor
        if r.ext_factor != 0:
            ramp = 1 - min(1.0, max(0.0, (i0 // 2 - lo) / max(0.001, hi - lo)))
            mix = ramp * r.ext_factor
            theta = theta * (1 - mix) + extrap * mix
            mscale *= 1 + 0.1 * math.log(1 / r.freq_scale)
        c, s = np.cos(theta) * mscale, np.sin(theta) * mscale
        a, b = (i0, i0 + 1) if r.rope_type == RopeType.NORM else (i0 // 2, i0 // 2 + n // 2)
        x0, x1 = out[:, :, a].copy(), out[:, :, b].copy()
        out[:, :, a] = x0 * c - x1 * s
        out[:, :, b] = x0 * s + x1 * c
    return out


def cache(
    rope: RopeSpec, type_k="f32", head_dim=16, n_head=2, unified=True, extra_layer=None
) -> KVCache:
    layers = [LayerSpec.attention(n_head, head_dim, rope=rope)]
    if extra_layer is not None:
        layers.append(extra_layer)
    return KVCache(
        ModelSpec(layers=tuple(layers)), type_k=type_k, kv_size=16, n_seq_max=2, unified=unified
    )


def k_values(kv: KVCache, layer: int = 0) -> np.ndarray:
    """K of every cell as float64 ``[n_stream * kv_size, n_head, head_dim]``."""
    lay = kv.layers[layer]
    spec = kv.spec.layers[lay.il]
    if kv.type_k.numpy_dtype is None:  # quantized or bf16: convert through ggml
        import pymem.ggml as gg

        with gg.Context() as ctx:
            t = ctx.cast(lay.k.ptr, gg.lib.GGML_TYPE_F32)
            (vals,) = gg.GraphRunner("CPU").run(ctx, [t])
        flat = vals.reshape(-1, spec.n_embd_k_gqa)
    else:
        flat = lay.k.numpy().reshape(-1, spec.n_embd_k_gqa)
    return flat.astype(np.float64).reshape(-1, spec.n_head_kv, spec.n_embd_head_k)


def set_k(kv: KVCache, values: np.ndarray, layer: int = 0) -> None:
    lay = kv.layers[layer]
    if kv.type_k.numpy_dtype is None:  # quantized or bf16: convert through ggml
        import pymem.ggml as gg

        with gg.Context() as ctx:
            src = ctx.new_tensor("f32", lay.k.shape[:3], input=True)
            out = ctx.cpy(src, lay.k.ptr)
            gg.GraphRunner("CPU").run(
                ctx,
                [out],
                inputs={
                    src: values.astype(np.float32).reshape(
                        lay.k.shape[2], lay.k.shape[1], lay.k.shape[0]
                    )
                },
                read=[],
            )
        return
    view = lay.k.numpy()
    view[...] = values.reshape(view.shape).astype(view.dtype)


def fill(kv: KVCache, seed: int = 0) -> np.ndarray:
    decode(kv, [[1, p, [0], False] for p in range(6)] + [[1, p, [1], False] for p in range(5)])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(k_values(kv).shape)
    set_k(kv, x)
    return k_values(kv)


def run_update(kv: KVCache) -> None:
    upd = kv.init_update()
    assert upd.get_status() == MemoryStatus.SUCCESS
    upd.apply()
    assert not kv.get_has_shift() and not kv.v_cells[0].shift.any()


ROPES = {
    "norm": RopeSpec(n_rot=16, rope_type=RopeType.NORM),
    "neox-partial": RopeSpec(n_rot=8, rope_type=RopeType.NEOX, freq_base=500.0),
    "yarn": RopeSpec(
        n_rot=16,
        rope_type=RopeType.NORM,
        freq_scale=0.25,
        ext_factor=1.0,
        attn_factor=1.0,
        beta_fast=32.0,
        beta_slow=1.0,
        n_ctx_orig=64,
    ),
}


@pytest.mark.parametrize("name", list(ROPES))
def test_shift_rotates_like_numpy_rope(name):
    rope = ROPES[name]
    kv = cache(rope)
    before = fill(kv)
    kv.seq_add(0, 2, -1, 7)  # cells 2..5
    kv.seq_add(1, -1, 3, -2)  # cells 6, 7 drop below 0; 8 -> 0
    shift = kv.k_shift()
    assert shift[:11].tolist() == [0, 0, 7, 7, 7, 7, 0, 0, -2, 0, 0]
    run_update(kv)
    want = rope_ref(before, shift.astype(np.float64), rope)
    np.testing.assert_allclose(k_values(kv), want, rtol=2e-6, atol=2e-6)
    if rope.ext_factor == 0:
        untouched = shift == 0
        assert np.array_equal(k_values(kv)[untouched], before[untouched])
    # with YaRN every cell is re-roped, so unshifted cells are scaled by mscale as in ggml
    if rope.n_rot < 16:
        assert np.array_equal(k_values(kv)[:, :, rope.n_rot :], before[:, :, rope.n_rot :])


def test_seq_div_shift_has_the_right_sign():
    """K stored rotated for the old positions ends up rotated for the new ones."""
    rope = ROPES["norm"]
    kv = cache(rope)
    fill(kv)
    raw = np.random.default_rng(5).standard_normal(k_values(kv).shape)
    old = np.zeros(len(raw))
    old[:6] = np.arange(6)
    old[6:11] = np.arange(5)
    set_k(kv, rope_ref(raw, old, rope))
    kv.seq_div(0, -1, -1, 2)
    new = old.copy()
    new[:6] = np.arange(6) // 2
    run_update(kv)
    np.testing.assert_allclose(k_values(kv)[:11], rope_ref(raw, new, rope)[:11], atol=1e-5)


@pytest.mark.parametrize(("type_k", "tol"), [("f16", 4e-3), ("bf16", 3e-2), ("q8_0", 0.06)])
def test_shift_of_f16_bf16_and_quantised_k(type_k, tol):
    rope = RopeSpec(n_rot=32, rope_type=RopeType.NEOX)
    kv = cache(rope, type_k=type_k, head_dim=32, n_head=1)
    before = fill(kv)
    kv.seq_add(0, -1, -1, 3)
    shift = kv.k_shift().astype(np.float64)
    run_update(kv)
    got = k_values(kv)
    np.testing.assert_allclose(got, rope_ref(before, shift, rope), atol=tol)


def test_shift_in_a_second_stream_and_layers_without_rope():
    rope = ROPES["norm"]
    kv = cache(
        rope,
        unified=False,
        extra_layer=LayerSpec.attention(2, 16, rope=RopeSpec(n_rot=16, rope_type=RopeType.NONE)),
    )
    decode(kv, [[1, p, [1], False] for p in range(4)])
    x = np.random.default_rng(1).standard_normal(k_values(kv).shape)
    set_k(kv, x)
    set_k(kv, x, layer=1)
    kv.seq_add(1, -1, -1, 5)
    shift = kv.k_shift()
    assert shift[16:20].tolist() == [5] * 4 and not shift[:16].any()
    run_update(kv)
    np.testing.assert_allclose(k_values(kv), rope_ref(x, shift.astype(np.float64), rope), atol=2e-6)
    assert np.array_equal(k_values(kv, 1), x.astype(np.float32))  # RopeType.NONE: metadata only


def test_mla_shift_rotates_the_rope_part_after_the_latent():
    """An MLA cache keeps K rows as [latent | rope part] (bailingmoe3: 8 + 4): the shift
    rotates the last n_rot dims, as llama.cpp's build_graph_shift does when n_lora_kv > 0,
    and leaves the latent alone. Regression: pymem rotated the first n_rot dims (the
    latent), so every decode after a K-shift of a bailingmoe3 run differed (max 1.04)."""
    rope = RopeSpec(n_rot=4, rope_type=RopeType.NORM)
    spec = ModelSpec(layers=(LayerSpec.attention(1, 12, rope=rope),), is_mla=True)
    kv = KVCache(spec, type_k="f32", kv_size=16, n_seq_max=2, unified=True)
    before = fill(kv)
    kv.seq_add(0, 2, -1, 7)
    shift = kv.k_shift().astype(np.float64)
    run_update(kv)
    after = k_values(kv)
    assert np.array_equal(after[:, :, :8], before[:, :, :8])
    np.testing.assert_allclose(after[:, :, 8:], rope_ref(before[:, :, 8:], shift, rope), atol=2e-6)
