"""ggml graph helpers over the KV cache's tensors (``llama_kv_cache::get_k/get_v/cpy_k/cpy_v``).

Nodes are built in a :class:`pymem.ggml.Context`; views read pymem's K/V buffers directly
and ``set_rows`` nodes write into them when the graph is computed. Each helper takes the
cache's :class:`~pymem.kv.layout.KVLayout`, the :class:`~pymem.kv.layout.KVLayer` whose
tensors it reads (after ``reuse``) and, for views, the model layer's head sizes.
"""

from __future__ import annotations

from typing import Any

from pymem.errors import UnsupportedError
from pymem.ggml import lib
from pymem.kv.layout import KVLayer, KVLayout, SlotInfo
from pymem.spec import LayerSpec


def _row(t: Any, n: int) -> int:
    return int(lib.ggml_row_size(t.type, n))


def get_k(
    layout: KVLayout, layer: KVLayer, lay: LayerSpec, ctx: Any, n_kv: int, sinfo: SlotInfo
) -> Any:
    """View ``[n_embd_head_k, n_head_kv, n_kv, ns]`` of ``layer``'s K over the slot's
    streams ``s0 .. s1`` (``ns = s1 - s0 + 1``); ``lay`` is the model layer read."""
    k = layer.k.ptr
    n_embd = int(k.ne[0])
    ns = sinfo.s1 - sinfo.s0 + 1
    size = layout.kv_size
    return ctx.view_4d(k, lay.n_embd_head_k, lay.n_head_kv, n_kv, ns,
                       _row(k, lay.n_embd_head_k), _row(k, n_embd), _row(k, n_embd * size),
                       _row(k, n_embd * size) * sinfo.s0)  # fmt: skip


def get_v(
    layout: KVLayout,
    layer: KVLayer,
    lay: LayerSpec,
    ctx: Any,
    il: int,
    n_kv: int,
    sinfo: SlotInfo,
) -> Any:
    """View of ``layer``'s V for model layer ``il``: ``[n_embd_head_v, n_head_kv, n_kv, ns]``,
    or with ``v_trans`` ``[n_kv, n_head_kv, n_embd_head_v, ns]`` (``nb[1] > nb[2]``)."""
    v_t = layer.v
    if v_t is None:
        raise UnsupportedError(f"get_v: layer {il} has no V in this cache")
    v = v_t.ptr
    n_embd = int(v.ne[0])
    size = layout.kv_size
    ns = sinfo.s1 - sinfo.s0 + 1
    if not layout.v_trans:
        return ctx.view_4d(v, lay.n_embd_head_v, lay.n_head_kv, n_kv, ns,
                           _row(v, lay.n_embd_head_v), _row(v, n_embd), _row(v, n_embd * size),
                           _row(v, n_embd * size) * sinfo.s0)  # fmt: skip
    return ctx.view_4d(v, n_kv, lay.n_head_kv, lay.n_embd_head_v, ns,
                       _row(v, size * lay.n_embd_head_v), _row(v, size), _row(v, size * n_embd),
                       _row(v, size * n_embd) * sinfo.s0)  # fmt: skip


def cpy_k(layout: KVLayout, layer: KVLayer, ctx: Any, k_cur: Any, k_idxs: Any) -> Any:
    """``set_rows`` node storing ``k_cur [n_embd_head_k, n_head_k, n_tokens]`` at the rows
    ``k_idxs`` (global across streams, see :func:`pymem.kv.inputs.build_k_idxs`)."""
    k = layer.k.ptr
    n_embd_head, n_head, n_tokens = int(k_cur.ne[0]), int(k_cur.ne[1]), int(k_cur.ne[2])
    if _row(k_cur, n_embd_head) != int(k_cur.nb[1]):
        raise UnsupportedError("cpy_k: the heads of k_cur must be contiguous (nb[1] == row size)")
    cur = ctx.view_2d(k_cur, n_embd_head * n_head, n_tokens, k_cur.nb[2], 0)
    if layout.n_stream > 1:
        k = ctx.reshape_2d(k, int(k.ne[0]), layout.kv_size * layout.n_stream)
    return ctx.set_rows(k, cur, k_idxs)


def cpy_v(layout: KVLayout, layer: KVLayer, ctx: Any, v_cur: Any, v_idxs: Any, il: int) -> Any:
    """``set_rows`` node storing ``v_cur [n_embd_head_v, n_head_v, n_tokens]`` for model
    layer ``il``; with ``v_trans`` one element per index
    (:func:`pymem.kv.inputs.build_v_idxs`)."""
    v_t = layer.v
    if v_t is None:
        raise UnsupportedError(f"cpy_v: layer {il} has no V in this cache")
    v = v_t.ptr
    n_embd_head, n_head, n_tokens = int(v_cur.ne[0]), int(v_cur.ne[1]), int(v_cur.ne[2])
    n_embd = n_embd_head * n_head
    if _row(v_cur, n_embd_head) != int(v_cur.nb[1]):
        raise UnsupportedError("cpy_v: the heads of v_cur must be contiguous (nb[1] == row size)")
    if not layout.v_trans:
        cur = ctx.view_2d(v_cur, n_embd, n_tokens, v_cur.nb[2], 0)
        if layout.n_stream > 1:
            v = ctx.reshape_2d(v, int(v.ne[0]), layout.kv_size * layout.n_stream)
        return ctx.set_rows(v, cur, v_idxs)
    if _row(v_cur, n_embd) == int(v_cur.nb[2]):
        cur = ctx.reshape_2d(v_cur, n_embd, n_tokens)
    else:
        cur = ctx.cont_2d(v_cur, n_embd, n_tokens)
    if n_embd < int(v.ne[0]):
        # [TAG_V_CACHE_VARIABLE] a narrower layer's rows are zero-padded to the cache width
        # (the v_idxs cover n_embd_v_gqa_max elements per token). E.g. 8 of 16 -> 8 zeros
        cur = ctx.pad(cur, int(v.ne[0]) - n_embd, 0, 0, 0)
    elems = ctx.reshape_2d(v, 1, int(lib.ggml_nelements(v)))
    cur = ctx.reshape_2d(cur, 1, int(lib.ggml_nelements(cur)))
    return ctx.set_rows(elems, cur, v_idxs)
