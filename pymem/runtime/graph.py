"""The tiny hybrid decoder as ggml graphs over pymem's memory: one graph per ubatch.

The graph follows llama.cpp's builders (``build_attn`` with ``build_attn_mha``,
``build_rs``, ``llm_build_mamba_base::build_mamba2_layer``) so that it exercises pymem
the way a real runtime does:

* attention: K and V of the ubatch are stored with ``set_rows`` at the rows the memory
  chose (``k_idxs``/``v_idxs``); Q attends over views of the whole cache (``n_kv``
  cells per stream) under the memory's KQ mask. V transposed (``v_trans``) goes through
  ``mul_mat`` + ``soft_max_ext``; V by rows goes through ``flash_attn_ext``.
* recurrent: the conv state R and SSM state S of each ubatch sequence are gathered
  through the memory's state-copy indices (``s_copy``), the row ``rs_z`` is zeroed first
  (the initial state of new sequences), states not in the ubatch but moved by the plan
  are copied in place, and the new states (and rollback snapshots, ``K = n_rs_seq + 1``
  planes) are written back to rows ``[head, head + n_seqs)`` of each plane.

The memory side is reached through two small protocols (:class:`AttentionInputs`,
:class:`RecurrentInputs`): :mod:`pymem.runtime.decoder` adapts pymem's memory contexts to
them, and tests/test_e2e_blocks.py hand-built inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

import pymem.ggml as gg
from pymem.backend import Device, Tensor, TensorSpec, TensorStore, get_device
from pymem.errors import ConfigError
from pymem.runtime.config import TinyConfig
from pymem.runtime.weights import TinyWeights
from pymem.spec import ModelSpec
from pymem.ubatch import UBatch


class AttentionInputs(Protocol):
    """What one attention memory (a KV cache, or one half of an iSWA pair) gives a graph."""

    layers: frozenset[int]  # the model layers whose K/V this memory holds
    v_trans: bool
    n_kv: int  # cells per stream the graph attends over
    n_stream: int  # streams this ubatch touches (1 for a unified cache)
    s0: int  # first stream of this ubatch

    def get_k(self, ctx: gg.Context, il: int) -> Any:
        """View ``[head_dim, n_head_kv, n_kv, n_stream]`` of layer ``il``'s K."""

    def get_v(self, ctx: gg.Context, il: int) -> Any:
        """View of V: ``[head_dim, n_head_kv, n_kv, n_stream]``, or with ``v_trans``
        ``[n_kv, n_head_kv, head_dim, n_stream]`` (``nb[1] > nb[2]``)."""

    def cpy_k(self, ctx: gg.Context, k_cur: Any, k_idxs: Any, il: int) -> Any:
        """``set_rows`` node storing ``k_cur [head_dim, n_head_kv, n_tokens]``."""

    def cpy_v(self, ctx: gg.Context, v_cur: Any, v_idxs: Any, il: int) -> Any:
        """``set_rows`` node storing ``v_cur [head_dim, n_head_kv, n_tokens]``."""

    def kq_mask(self, ubatch: UBatch) -> np.ndarray:
        """float32 ``[n_stream, n_tokens / n_stream, n_kv]``: 0 keep, -inf drop."""

    def k_idxs(self, ubatch: UBatch) -> np.ndarray:
        """int64 ``[n_tokens]`` global rows (``stream * size + cell``)."""

    def v_idxs(self, ubatch: UBatch) -> np.ndarray:
        """int64 rows: ``[n_tokens]``, or ``[n_tokens * n_embd_v_gqa]`` element rows if v_trans."""


class RecurrentInputs(Protocol):
    """What a recurrent memory gives a graph for the current ubatch."""

    head: int  # first row of the ubatch's sequences
    n_rs: int  # rows [head, head + n_rs) the plan touches
    rs_z: int  # row to zero (initial state of new sequences), -1 for none
    size: int  # rows per plane (mem_size)
    n_rs_seq: int  # rollback snapshots kept (planes - 1)

    def r_tensor(self, il: int) -> Tensor: ...

    def s_tensor(self, il: int) -> Tensor: ...

    def s_copy(self) -> np.ndarray:
        """int32 ``[n_rs]``: the source row (plane offset included) of each touched row."""


@dataclass
class StepInputs:
    """The memory's side of one ubatch: attention inputs per memory part, recurrent inputs.

    Each attention layer reads the part holding it (``AttentionInputs.layers``), e.g. an
    iSWA cache gives ``{"base": ..., "swa": ...}``.
    """

    attn: dict[str, AttentionInputs] = field(default_factory=dict)
    recr: RecurrentInputs | None = None
    n_ctx_seq: int | None = None
    """The context's cells per sequence (``llama_cparams::n_ctx_seq``): it picks a LongRoPE
    model's long or short factors. None: unknown (a memory not made by ``create_memory``)."""

    def attn_part(self, il: int) -> str:
        """The name of the attention part holding layer ``il``."""
        for name, ai in self.attn.items():
            if il in ai.layers:
                return name
        raise ConfigError(
            f"layer {il}: attention, but no memory part holds it (parts: {list(self.attn)})"
        )


def _row(t: Any, n: int) -> int:
    return int(gg.lib.ggml_row_size(t.type, n))


class TinyModel:
    """The tiny hybrid decoder with its weights on one device.

    ``forward(ubatch, inputs)`` builds and computes the graph of one ubatch after the
    memory context has been applied, writes K/V/R/S in place, and returns the logits of
    every ubatch token as ``float32 [n_tokens, n_vocab]``.
    """

    def __init__(
        self,
        config: TinyConfig | None = None,
        device: str | Device | None = None,
        weights: TinyWeights | None = None,
        n_threads: int | None = None,
    ) -> None:
        self.config = config if config is not None else TinyConfig()
        self.weights = weights if weights is not None else TinyWeights.random(self.config)
        if self.weights.config != self.config:
            raise ConfigError("weights: drawn for a different TinyConfig than the model's")
        self.device = get_device(device)
        self.store = TensorStore(self.device, self._specs())
        for name, arr in self._arrays():
            self.store[name].write_bytes(np.ascontiguousarray(arr, dtype=np.float32))
        # one thread by default: the graphs are tiny, and spinning worker threads on a
        # loaded machine cost far more than they save. A memory with layers on other
        # devices: ggml's scheduler over them for the graphs that reach them
        self.runners = gg.DeviceRunners(
            self.device, n_threads=n_threads or 1, weights=self.store["tok_embd"].ptr
        )
        self._fa_support: dict[tuple[str, str], bool] = {}

    @property
    def spec(self) -> ModelSpec:
        return self.config.spec()

    def close(self) -> None:
        self.runners.close()
        self.store.close()

    def __enter__(self) -> TinyModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- weights ----------------------------------------------------------------------
    def _arrays(self) -> list[tuple[str, np.ndarray]]:
        w = self.weights
        out = [("tok_embd", w.tok_embd), ("output_norm", w.output_norm), ("output", w.output)]
        for il, lw in enumerate(w.layers):
            for name, arr in vars(lw).items():
                if isinstance(arr, np.ndarray):
                    out.append((f"l{il}.{name}", arr))
        return out

    def _specs(self) -> list[TensorSpec]:
        c = self.config
        # ggml shapes: numpy [out, in] is ggml (in, out); per-head vectors broadcast as (1, n_head)
        special = {
            "ssm_a": (1, c.ssm_n_head),
            "ssm_d": (1, c.ssm_n_head),
            "ssm_norm": (c.d_inner // c.n_group, c.n_group),
        }
        specs = []
        for name, arr in self._arrays():
            short = name.split(".")[-1]
            shape = special.get(short, tuple(reversed(arr.shape)))
            specs.append(TensorSpec(name, "f32", shape))
        return specs

    def flash_attn_supports(self, type_k: str, type_v: str) -> bool:
        """Whether this device runs ``flash_attn_ext`` over K/V of these types as they are."""
        key = (type_k, type_v)
        if key not in self._fa_support:
            c = self.config
            with gg.Context(max_tensors=16, graph_size=16) as ctx:
                q = ctx.new_tensor("f32", (c.head_dim, 1, c.n_head, 1))
                k = ctx.new_tensor(type_k, (c.head_dim, 256, c.n_head_kv, 1))
                v = ctx.new_tensor(type_v, (c.head_dim, 256, c.n_head_kv, 1))
                mask = ctx.new_tensor("f16", (256, 1, 1, 1))
                node = ctx.flash_attn_ext(q, k, v, mask, 1.0, 0.0, 0.0)
                gg.lib.ggml_flash_attn_ext_set_prec(node, gg.lib.GGML_PREC_F32)
                ok = bool(gg.lib.ggml_backend_dev_supports_op(self.device.handle, node))
            self._fa_support[key] = ok
        return self._fa_support[key]

    def _w(self, il: int, name: str) -> Any:
        return self.store[f"l{il}.{name}" if il >= 0 else name].ptr

    # --- the graph --------------------------------------------------------------------
    def forward(self, ubatch: UBatch, inputs: StepInputs, flash_attn: bool = False) -> np.ndarray:
        """Compute one ubatch; K/V/R/S are written in place. Returns ``float32 [n_tokens, n_vocab]``."""
        c = self.config
        n_tokens = ubatch.n_tokens
        if ubatch.token is None:
            raise ConfigError("ubatch: the tiny model needs token ids, got an embedding ubatch")
        with gg.Context() as ctx:
            feed: dict[Any, np.ndarray] = {}
            # nodes in llama.cpp's build order: each store before the reads that follow it
            expand: list[Any] = []

            def new_input(type_: str, shape: Sequence[int], values: np.ndarray, name: str) -> Any:
                t = ctx.new_tensor(type_, shape, name=name, input=True)
                feed[t] = values
                return t

            inp_tokens = new_input("i32", (n_tokens,), ubatch.token.astype(np.int32), "inp_tokens")
            inp_pos = None  # only attention layers read positions (an unused input gets no buffer)
            if inputs.attn:
                inp_pos = new_input("i32", (n_tokens,), ubatch.pos0.astype(np.int32), "inp_pos")

            attn_in: dict[str, tuple[Any, Any, Any]] = {}
            for name, ai in inputs.attn.items():
                mask_type = "f16" if flash_attn else "f32"
                mask = ai.kq_mask(ubatch)
                n_tps = n_tokens // ai.n_stream
                if mask.shape != (ai.n_stream, n_tps, ai.n_kv):
                    raise ConfigError(
                        f"kq_mask[{name}]: shape {mask.shape}, expected {(ai.n_stream, n_tps, ai.n_kv)}"
                    )
                t_mask = new_input(
                    mask_type,
                    (ai.n_kv, n_tps, 1, ai.n_stream),
                    mask.astype(np.float16 if flash_attn else np.float32),
                    f"kq_mask_{name}",
                )
                k_idxs = ai.k_idxs(ubatch).astype(np.int64)
                v_idxs = ai.v_idxs(ubatch).astype(np.int64)
                t_k = new_input("i64", (k_idxs.size,), k_idxs, f"k_idxs_{name}")
                t_v = new_input("i64", (v_idxs.size,), v_idxs, f"v_idxs_{name}")
                attn_in[name] = (t_mask, t_k, t_v)

            t_s_copy = None
            if inputs.recr is not None:
                s_copy = inputs.recr.s_copy().astype(np.int32)
                t_s_copy = new_input("i32", (s_copy.size,), s_copy, "rs_s_copy")

            x = ctx.get_rows(self.store["tok_embd"].ptr, inp_tokens)
            for il, kind in enumerate(c.layers):
                h = ctx.mul(ctx.rms_norm(x, c.norm_eps), self._w(il, "attn_norm"))
                if kind == "R":
                    if inputs.recr is None:
                        raise ConfigError(
                            f"layer {il}: recurrent, but the memory gave no recurrent inputs"
                        )
                    cur = self._mamba2(ctx, il, h, ubatch, inputs.recr, t_s_copy, expand)
                else:
                    part = inputs.attn_part(il)
                    cur = self._attention(
                        ctx,
                        il,
                        h,
                        inp_pos,
                        inputs.attn[part],
                        attn_in[part],
                        n_tokens,
                        flash_attn,
                        expand,
                    )
                x = ctx.add(x, cur)
                h = ctx.mul(ctx.rms_norm(x, c.norm_eps), self._w(il, "ffn_norm"))
                gate = ctx.mul_mat(self._w(il, "ffn_gate"), h)
                up = ctx.mul_mat(self._w(il, "ffn_up"), h)
                x = ctx.add(x, ctx.mul_mat(self._w(il, "ffn_down"), ctx.mul(ctx.silu(gate), up)))
            x = ctx.mul(ctx.rms_norm(x, c.norm_eps), self.store["output_norm"].ptr)
            logits = ctx.mul_mat(self.store["output"].ptr, x)
            if self.device.kind == "cpu":
                # Device.backend() is one backend per device, shared by every GraphRunner
                # (the KV cache's K-shift runner sets its own thread count on it)
                gg.check(gg.lib.pm_backend_set_n_threads(self.device.backend(), self.runners.one.n_threads),
                         "set_n_threads")  # fmt: skip
            (out,) = self.runners.run(ctx, [*expand, logits], inputs=feed, read=[logits])
        return np.array(out.reshape(n_tokens, c.n_vocab), dtype=np.float32)

    def _attention(
        self,
        ctx: gg.Context,
        il: int,
        h: Any,
        inp_pos: Any,
        ai: AttentionInputs,
        tensors: tuple[Any, Any, Any],
        n_tokens: int,
        flash_attn: bool,
        expand: list[Any],
    ) -> Any:
        c = self.config
        hd, nh, nkv = c.head_dim, c.n_head, c.n_head_kv
        t_mask, t_kidx, t_vidx = tensors
        rope = c.rope()

        q = ctx.rope(
            ctx.reshape_3d(ctx.mul_mat(self._w(il, "wq"), h), hd, nh, n_tokens), inp_pos, rope
        )
        k = ctx.rope(
            ctx.reshape_3d(ctx.mul_mat(self._w(il, "wk"), h), hd, nkv, n_tokens), inp_pos, rope
        )
        v = ctx.mul_mat(self._w(il, "wv"), h)  # [n_embd_v_gqa, n_tokens], contiguous

        # store K and V at the rows the memory chose, then read the cache views (the
        # stores come first in the graph, so the views see this ubatch's K and V)
        expand.append(ai.cpy_k(ctx, k, t_kidx, il))
        expand.append(ai.cpy_v(ctx, ctx.reshape_3d(v, hd, nkv, n_tokens), t_vidx, il))
        k_view = ai.get_k(ctx, il)  # [hd, n_head_kv, n_kv, ns]
        v_view = ai.get_v(ctx, il)  # v_trans: [n_kv, n_head_kv, hd, ns]
        ns = int(k_view.ne[3])
        n_tps = n_tokens // ns
        q = ctx.view_4d(q, hd, nh, n_tps, ns, q.nb[1], q.nb[2], q.nb[2] * n_tps, 0)
        q = ctx.permute(q, 0, 2, 1, 3)  # [hd, n_tps, n_head, ns]
        kk = ctx.permute(k_view, 0, 2, 1, 3)  # [hd, n_kv, n_head_kv, ns]
        vv = ctx.permute(v_view, 0, 2, 1, 3)
        scale = 1.0 / float(np.sqrt(hd))
        if flash_attn:
            if v_view.nb[1] > v_view.nb[2]:  # transposed V
                vv = ctx.transpose(vv)
            if not self.flash_attn_supports(gg.type_of(kk), gg.type_of(vv)):
                # the reference always casts f32 K/V to f16 here; pymem casts only where the
                # device cannot attend over them (CPU can, and keeps f32 caches exact)
                kk = ctx.cast(kk, gg.lib.GGML_TYPE_F16)
                vv = ctx.cast(vv, gg.lib.GGML_TYPE_F16)
            cur = ctx.flash_attn_ext(q, kk, vv, t_mask, scale, 0.0, 0.0)
            gg.lib.ggml_flash_attn_ext_set_prec(cur, gg.lib.GGML_PREC_F32)
            # the result is already permuted: [hd, n_head, n_tps, ns]
            cur = ctx.reshape_2d(cur, hd * nh, n_tokens)
        else:
            kq = ctx.mul_mat(kk, q)  # [n_kv, n_tps, n_head, ns]
            gg.lib.ggml_mul_mat_set_prec(kq, gg.lib.GGML_PREC_F32)
            kq = ctx.soft_max_ext(kq, t_mask, scale, 0.0)
            if v_view.nb[1] <= v_view.nb[2]:  # V by rows: mul_mat needs it transposed
                vv = ctx.cont(ctx.transpose(vv))
            kqv = ctx.mul_mat(vv, kq)  # [hd, n_tps, n_head, ns]
            cur = ctx.cont_2d(ctx.permute(kqv, 0, 2, 1, 3), hd * nh, n_tokens)
        return ctx.mul_mat(self._w(il, "wo"), cur)

    def _build_rs(
        self, ctx: gg.Context, s: Tensor, rs: RecurrentInputs, t_s_copy: Any, n_seqs: int
    ) -> tuple[Any, Any, list[Any], list[tuple[Any, Any]]]:
        """``build_rs`` split in parts the caller orders: (all rows as 2-D, main ids, the
        node zeroing row rs_z, the (gathered, destination) pairs of the extra rows).

        The zeroing goes before the read of the ubatch's states, the extra copies after it.
        """
        width = s.shape[0]
        rows = int(np.prod(s.shape[1:]))
        states = ctx.reshape_2d(s.ptr, width, rows)
        nb1 = int(states.nb[1])
        zero_nodes = []
        if rs.rs_z >= 0:
            zero = ctx.view_2d(states, width, 1, nb1, rs.rs_z * nb1)
            zero_nodes.append(ctx.cpy(ctx.scale(zero, 0.0), zero))
        main = ctx.view_1d(t_s_copy, n_seqs, 0)
        extras = []
        if rs.n_rs > n_seqs:
            extra_ids = ctx.view_1d(t_s_copy, rs.n_rs - n_seqs, n_seqs * 4)
            dst = ctx.view_2d(states, width, rs.n_rs - n_seqs, nb1, (rs.head + n_seqs) * nb1)
            extras.append((ctx.get_rows(states, extra_ids), dst))
        return states, main, zero_nodes, extras

    def _mamba2(
        self,
        ctx: gg.Context,
        il: int,
        h: Any,
        ubatch: UBatch,
        rs: RecurrentInputs,
        t_s_copy: Any,
        expand: list[Any],
    ) -> Any:
        c = self.config
        n_seqs, nst = ubatch.n_seqs, ubatch.n_seq_tokens
        if not ubatch.equal_seqs or nst * n_seqs != ubatch.n_tokens:
            raise ConfigError(
                "ubatch: recurrent layers need an equal-sequence split (split_equal or split_seq)"
            )
        d_inner, nhd, ng, ds = c.d_inner, c.ssm_n_head, c.n_group, c.d_state
        hd, ch = c.ssm_head_dim, c.conv_channels
        big_k = rs.n_rs_seq + 1 if rs.n_rs_seq > 0 else 1
        n_written = min(nst, big_k)  # states saved: the final one and up to n_rs_seq snapshots
        f32 = 4

        r_all, s_all = rs.r_tensor(il), rs.s_tensor(il)
        conv_states, main_ids, zero_nodes, extras = self._build_rs(ctx, r_all, rs, t_s_copy, n_seqs)
        conv = ctx.get_rows(conv_states, main_ids)  # [n_embd_r, n_seqs]
        expand.extend([*zero_nodes, conv, *(ctx.cpy(src, dst) for src, dst in extras)])
        conv = ctx.reshape_3d(conv, c.d_conv - 1, ch, n_seqs)

        zxbcdt = ctx.reshape_3d(ctx.mul_mat(self._w(il, "ssm_in"), h), c.d_in_proj, nst, n_seqs)
        nb1, nb2 = int(zxbcdt.nb[1]), int(zxbcdt.nb[2])
        z = ctx.view_4d(zxbcdt, hd, nhd, nst, n_seqs, hd * f32, nb1, nb2, 0)
        xbc = ctx.view_3d(zxbcdt, ch, nst, n_seqs, nb1, nb2, d_inner * f32)
        dt = ctx.view_3d(zxbcdt, nhd, nst, n_seqs, nb1, nb2, (d_inner + ch) * f32)

        # conv over [d_conv - 1 state columns | this ubatch's inputs] per channel; the last
        # d_conv - 1 columns after token nst - 1 - k are the new state of plane k
        conv_x = ctx.concat(conv, ctx.transpose(xbc), 0)  # [d_conv - 1 + nst, ch, n_seqs]
        r_row = _row(r_all.ptr, c.n_embd_r)
        for plane in range(n_written):
            last = ctx.view_3d(
                conv_x,
                c.d_conv - 1,
                ch,
                n_seqs,
                conv_x.nb[1],
                conv_x.nb[2],
                (nst - plane) * conv_x.nb[0],
            )
            dst = ctx.view_2d(
                conv_states,
                c.n_embd_r,
                n_seqs,
                conv_states.nb[1],
                (plane * rs.size + rs.head) * r_row,
            )
            expand.append(ctx.cpy(last, dst))
        xbc = ctx.ssm_conv(conv_x, self._w(il, "ssm_conv1d"))  # [ch, nst, n_seqs]
        xbc = ctx.silu(ctx.add(xbc, self._w(il, "ssm_conv1d_b")))

        xb1, xb2 = int(xbc.nb[1]), int(xbc.nb[2])
        x = ctx.view_4d(xbc, hd, nhd, nst, n_seqs, hd * f32, xb1, xb2, 0)
        b = ctx.view_4d(xbc, ds, ng, nst, n_seqs, ds * f32, xb1, xb2, d_inner * f32)
        cc = ctx.view_4d(xbc, ds, ng, nst, n_seqs, ds * f32, xb1, xb2, (d_inner + ng * ds) * f32)
        dt = ctx.add(ctx.cont(dt), self._w(il, "ssm_dt_b"))

        # the scan reads each sequence's state straight from its source row (no gather copy)
        ssm_states, main_ids, zero_nodes, extras = self._build_rs(ctx, s_all, rs, t_s_copy, n_seqs)
        ssm = ctx.reshape_4d(ssm_states, ds, hd, nhd, int(ssm_states.ne[1]))
        y_ssm = ctx.ssm_scan(ssm, x, dt, self._w(il, "ssm_a"), b, cc, main_ids, big_k)
        expand.extend([*zero_nodes, y_ssm, *(ctx.cpy(src, dst) for src, dst in extras)])

        # y_ssm = [y of every token | n_written planes of n_seqs states]
        d = c.n_embd_s
        s_row = _row(s_all.ptr, d)
        y_bytes = int(gg.lib.ggml_nelements(x)) * f32
        expand.append(
            ctx.cpy(
                ctx.view_3d(y_ssm, d, n_seqs, n_written, d * f32, d * f32 * n_seqs, y_bytes),
                ctx.view_3d(
                    ssm_states,
                    d,
                    n_seqs,
                    n_written,
                    ssm_states.nb[1],
                    rs.size * s_row,
                    rs.head * s_row,
                ),
            )
        )

        y = ctx.view_4d(y_ssm, hd, nhd, nst, n_seqs, x.nb[1], nhd * x.nb[1], nst * nhd * x.nb[1], 0)
        y = ctx.add(y, ctx.mul(x, self._w(il, "ssm_d")))
        y = ctx.mul(ctx.silu(ctx.cont(z)), y)
        y = ctx.reshape_4d(y, d_inner // ng, ng, nst, n_seqs)
        y = ctx.mul(ctx.rms_norm(y, c.norm_eps), self._w(il, "ssm_norm"))
        y = ctx.reshape_2d(y, d_inner, nst * n_seqs)
        return ctx.mul_mat(self._w(il, "ssm_out"), y)
