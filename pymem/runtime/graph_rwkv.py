"""RWKV and the other linear-recurrence families: RWKV-6/7 (and their Qwen-based flavours),
PLaMo-2, Kimi-Linear, Kimi-K3 and BailingMoE-3 (KDA + MLA), MiniMax-01 (lightning
attention).

A mixin of the engine's graph builder (``pymem.runtime.gguf_llama._Graph``): methods
here use its context (``self.ctx``), hyper-parameters (``self.hp``), weights
(``self.m._w``), inputs and shared blocks (``norm``, ``ffn``, ``attention``,
``build_rs``, ...). :data:`ARCH_GRAPHS` registers the architectures built here.

The reference builders (vendor/llama.cpp/src):

* ``llama-graph.cpp`` ``build_rwkv_token_shift_load`` / ``_store``: the token shift
  (the previous token's normed input, per mixer: ``token_shift_count`` rows of ``n_embd``)
  is R, read through ``build_rs`` and written back for rows ``[head, head + n_seqs)``;
  the WKV state (``n_embd * head_size`` per sequence) is S, read through ``build_rs``
  and replaced by the fused op's final state;
* ``models/rwkv6-base.cpp``: RWKV-6 time mix (data-dependent lerp through the 5-way
  ``time_mix_w1`` / ``w2`` LoRA, decay LoRA, ``ggml_rwkv_wkv6``, a group norm with one
  group per head) and channel mix; the Qwen-based flavour (no ``time_mix_first``)
  scales K by ``1 - w`` and runs ``ggml_gated_linear_attn`` without the group norm;
* ``models/rwkv7-base.cpp``: RWKV-7 time mix (6- or 5-way fused lerp, decay / ICLR /
  value-residual / gate LoRAs, L2-normed ``kk``, ``ggml_rwkv_wkv7``, optional group
  norm, the ``r * k * r_k`` bonus) and channel mix (ReLU² key);
* ``models/rwkv6.cpp`` / ``rwkv7.cpp``: layer norms (with biases) on the embeddings,
  before each mixer and at the output, two token-shift rows per layer;
  ``rwkv6qwen2.cpp`` / ``arwkv7.cpp``: RMS norms, one token-shift row per layer, a SwiGLU
  FFN instead of the channel mix;
* ``models/plamo2.cpp``: Mamba layers (per-head A and D, in_proj interleaved per head as
  [z | x], RMS-normed dt / B / C, ``ggml_ssm_scan``) and fused-QKV attention with
  per-head Q/K norms, each mixer and the ``ggml_swiglu`` FFN between pre- and post-norms;
* ``models/kimi-linear.cpp`` (+ ``delta-net-base.cpp``): KDA layers (Q, K and V each
  through its own short convolution, three conv states per R row; per-channel decay;
  the fused ``ggml_gated_delta_net``; sigmoid-gated RMS norm) and MLA layers over a
  K-only cache (absorbed Q, V = the latent part of K, ``v_mla`` decompression), a dense
  or sigmoid-routed MoE FFN with a shared expert;
* ``models/kimi-k3.cpp``: the same KDA with rollback planes (``build_recurrent_attn``)
  and a full-rank output gate, MLA with a sigmoid gate before ``wo``, SiTU activations in
  the dense FFN and the experts; ``models/bailingmoe3.cpp``: KDA with the sigmoid-bounded
  decay and rollback planes, MLA with RoPE on its rope part and a per-head gate;
* ``models/minimax-01.cpp``: lightning attention (``llm_graph_input_la``'s decay inputs,
  intra-block ``(Q K^T * decay) V`` plus inter-block ``(Q * decay) S``, the decayed state
  update) and softmax attention layers, softmax-routed MoE, scaled residuals.

Reference behaviour repeated because the recorded bytes are the reference's: the
token-shift store of the Qwen RWKV flavours takes ``n_embd * n_seqs`` contiguous values
from the last token of the first sequence (not each sequence's last token when a ubatch
holds several sequences of several tokens); PLaMo-2 stores the SSM state at
``head * n_seqs * n_embd_s``. Reference behaviour refused (UnsupportedError) because its
numbers come from memory nobody wrote: WKV-7 heads that are not a multiple of 64
(:meth:`RWKVGraph._rwkv7_check_head`) and lightning-attention ubatches whose sequence
indices are not their set indices (:meth:`RWKVGraph._la_inputs`). LoRA adapters, control
vectors and the variants each graph checks first (``_rwkv6_refuse``, ``_kimi_refuse``,
...) are not built either (the error names the tensor or key).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import numpy as np

import pymem.ggml as gg
from pymem.errors import ConfigError, UnsupportedError
from pymem.runtime.arch_graph import ArchGraph, f32, f32_div

F32 = 4  # bytes per float32

# the group norm of the WKV output (one group per head): llama.cpp's constant 64e-5f
_WKV_GROUP_NORM_EPS = 64e-5
# RWKV-7's decay: w = exp(-0.606531 * sigmoid(.)) (= exp(-e^-0.5 * sigmoid(.)))
_RWKV7_DECAY_SCALE = -0.606531
# the WKV-7 head size ggml's CPU kernel handles without overrunning (its SIMD step)
_WKV7_HEAD_MULTIPLE = 64
# llama_expert_gating_func_type: MiniMax-01 routes by softmax, Kimi by sigmoid
_GATING_SOFTMAX, _GATING_SIGMOID = 1, 2


class RWKVGraph:
    """Graph builders of this family (mixed into the engine's graph builder)."""

    # provided by the engine's graph builder (pymem.runtime.gguf_llama._Graph)
    ctx: Any
    hp: Any
    m: Any
    ubatch: Any
    inputs: Any

    # --- shared pieces ----------------------------------------------------------------
    def _rwkv_layer_norm(self, cur: Any, w: Any, b: Any) -> Any:
        """``build_norm(LLM_NORM)``: ``norm(cur, f_norm_eps) * w + b``."""
        ctx = self.ctx
        eps = self.m.keys.f32(f"{self.hp.arch}.attention.layer_norm_epsilon", 0.0)
        return ctx.add(ctx.mul(ctx.norm(cur, eps), w), b)

    def _rwkv_rms_norm(self, cur: Any, w: Any, b: Any = None) -> Any:
        """``build_norm(LLM_NORM_RMS)`` with an optional bias."""
        g: Any = self
        cur = g.norm(cur, w)
        return cur if b is None else self.ctx.add(cur, b)

    def _rwkv_check(self, count: int) -> None:
        """The ubatch and memory the RWKV graphs assume (equal split, one state plane,
        ``count`` token-shift rows)."""
        ub, hpf = self.ubatch, self.m.hp_file
        g: Any = self
        if not ub.equal_seqs or ub.n_seqs * ub.n_seq_tokens != ub.n_tokens:
            raise ConfigError(
                "ubatch: RWKV layers need an equal-sequence split (split_equal or split_seq)"
            )
        if g._recr().n_rs_seq:
            raise UnsupportedError(f"{hpf.arch}: rollback snapshots (n_rs_seq > 0)")
        if hpf.token_shift_count != count:
            raise ConfigError(
                f"{self.m.path}: {hpf.arch}.token_shift_count {hpf.token_shift_count}, the "
                f"graph needs {count}"
            )
        if hpf.wkv_head_size <= 0 or hpf.n_embd % hpf.wkv_head_size:
            raise ConfigError(
                f"{self.m.path}: {hpf.arch}.wkv.head_size {hpf.wkv_head_size} does not divide "
                f"n_embd {hpf.n_embd}"
            )

    def _rwkv7_check_head(self) -> None:
        """Refuse a WKV-7 head size the CPU kernel overruns.

        ``ggml_compute_forward_rwkv_wkv7_f32`` walks each head's row in whole SIMD steps
        (``GGML_F32_STEP``: 64 floats with AVX-512, 32 with AVX2) and has no tail loop
        that runs, so with a smaller head it reads and writes past the row, into other
        heads, other sequences' states and past the tensor (heap corruption; the
        reference's own numbers then depend on neighbouring memory). Real RWKV-7 models
        use heads of 64.
        """
        hs = self.m.hp_file.wkv_head_size
        if hs % _WKV7_HEAD_MULTIPLE:
            raise UnsupportedError(
                f"{self.m.path}: {self.hp.arch}.wkv.head_size {hs} is not a multiple of "
                f"{_WKV7_HEAD_MULTIPLE} (ggml's CPU rwkv_wkv7 kernel overruns smaller heads)"
            )

    def _rwkv_refuse(self, names: list[str], keys: tuple[str, ...] = ()) -> None:
        """Refuse layer tensors (``blk.<il>.<name>`` of any layer) and non-zero keys this
        module does not build, before any node is made."""
        w = self.m._w
        found = [
            f"blk.{il}.{n}"
            for il in range(self.hp.n_layer)
            for n in names
            if w(il, n, required=False) is not None
        ]
        if found:
            raise UnsupportedError(f"{self.m.path}: tensors the engine does not build: {found}")
        for key in keys:
            if self.m.keys.f32(key, 0.0):
                raise UnsupportedError(f"{self.m.path}: {key} is not built")

    def _rwkv_shift_load(self, il: int, count: int) -> Any:
        """``build_rwkv_token_shift_load``: ``[n_embd, count, n_seqs]`` through build_rs."""
        g: Any = self
        n_embd_r = self.m.hp_file.n_embd_r()
        shift = g.build_rs(g._recr().r_tensor(il).ptr, n_embd_r, self.ctx.get_rows)
        return self.ctx.reshape_3d(shift, self.hp.n_embd, count, self.ubatch.n_seqs)

    def _rwkv_shift_store(self, il: int, shift: Any, count: int) -> None:
        """``build_rwkv_token_shift_store``: ``n_embd * n_seqs * count`` values from the
        start of ``shift`` to rows ``[head, head + n_seqs)`` of R."""
        ctx = self.ctx
        g: Any = self
        rs = g._recr()
        r_all = rs.r_tensor(il).ptr
        n_embd_r, n_seqs = self.m.hp_file.n_embd_r(), self.ubatch.n_seqs
        src = ctx.view_1d(shift, self.hp.n_embd * n_seqs * count, 0)
        dst = ctx.view_1d(r_all, n_embd_r * n_seqs,
                          n_embd_r * rs.head * int(gg.lib.ggml_element_size(r_all)))  # fmt: skip
        g.expand(ctx.cpy(src, dst))

    def _rwkv_prev(self, shift: Any, x: Any) -> Any:
        """``x_prev``: the stored shift row, then every token but the last of each sequence.

        E.g. 3 tokens a b c of one sequence, stored s -> [s, a, b].
        """
        ctx, ub = self.ctx, self.ubatch
        head = ctx.view_3d(x, self.hp.n_embd, ub.n_seq_tokens - 1, ub.n_seqs, x.nb[1], x.nb[2], 0)
        return ctx.concat(shift, head, 1)

    def _rwkv_last(self, x: Any) -> Any:
        """The last token of each sequence of ``x`` ``[n_embd, n_seq_tokens, n_seqs]``."""
        ub = self.ubatch
        off = (ub.n_seq_tokens - 1) * self.hp.n_embd * int(gg.lib.ggml_element_size(x))
        return self.ctx.view_3d(x, self.hp.n_embd, 1, ub.n_seqs, x.nb[1], x.nb[2], off)

    def _rwkv_wkv_out(self, il: int, out: Any) -> Any:
        """Split the fused op's output ``[y of every token | final states]``: store the
        states to rows ``[head, head + n_seqs)`` of S and return ``y`` (1-d)."""
        ctx = self.ctx
        g: Any = self
        rs = g._recr()
        s_all = rs.s_tensor(il).ptr
        n_embd, n_tokens, n_seqs = self.hp.n_embd, self.ubatch.n_tokens, self.ubatch.n_seqs
        n_embd_s = self.m.hp_file.n_embd_s()
        cur = ctx.view_1d(out, n_embd * n_tokens, 0)
        state = ctx.view_1d(out, n_embd_s * n_seqs, n_embd * n_tokens * F32)
        dst = ctx.view_1d(s_all, n_embd_s * n_seqs,
                          n_embd_s * rs.head * int(gg.lib.ggml_element_size(s_all)))  # fmt: skip
        g.expand(ctx.cpy(state, dst))
        return cur

    def _rwkv_wkv_state(self, il: int) -> Any:
        g: Any = self
        return g.build_rs(g._recr().s_tensor(il).ptr, self.m.hp_file.n_embd_s(), self.ctx.get_rows)

    def _rwkv_group_norm(self, cur: Any, il: int) -> Any:
        """One group per head: ``norm`` over each head's values, then ``ln`` and its bias."""
        ctx, w = self.ctx, self.m._w
        hs, n_tokens = self.m.hp_file.wkv_head_size, self.ubatch.n_tokens
        n_head = self.hp.n_embd // hs
        cur = ctx.reshape_3d(cur, hs, n_head, n_tokens)
        cur = ctx.norm(cur, _WKV_GROUP_NORM_EPS)
        cur = ctx.reshape_2d(cur, self.hp.n_embd, n_tokens)
        return ctx.add(ctx.mul(cur, w(il, "time_mix_ln.weight")), w(il, "time_mix_ln.bias"))

    # --- RWKV-6 -----------------------------------------------------------------------
    def rwkv6_time_mix(self, il: int, cur: Any, x_prev: Any) -> Any:
        """``build_rwkv6_time_mix`` (fused lerp, no K/V/R biases, K/V heads = heads)."""
        ctx, w = self.ctx, self.m._w
        n_embd, n_tokens = self.hp.n_embd, self.ubatch.n_tokens
        hs = self.m.hp_file.wkv_head_size
        n_head = n_embd // hs
        qrwkv = w(il, "time_mix_first.weight", required=False) is None

        sx = ctx.sub(x_prev, cur)
        sx = ctx.reshape_2d(sx, n_embd, n_tokens)
        cur = ctx.reshape_2d(cur, n_embd, n_tokens)
        xxx = ctx.add(ctx.mul(sx, w(il, "time_mix_lerp_x.weight")), cur)
        w1, w2 = w(il, "time_mix_w1.weight"), w(il, "time_mix_w2.weight")
        xxx = ctx.reshape_4d(ctx.tanh(ctx.mul_mat(w1, xxx)), int(w1.ne[1]) // 5, 1, 5, n_tokens)
        xxx = ctx.cont(ctx.permute(xxx, 0, 1, 3, 2))
        xxx = ctx.mul_mat(ctx.reshape_4d(w2, w2.ne[0], w2.ne[1], 1, 5), xxx)
        sx = ctx.reshape_3d(sx, n_embd, 1, n_tokens)
        cur = ctx.reshape_3d(cur, n_embd, 1, n_tokens)
        xxx = ctx.add(ctx.mul(ctx.add(xxx, w(il, "time_mix_lerp_fused.weight")), sx), cur)
        # five planes of n_embd x n_tokens: w, k, v, r, g
        xw, xk, xv, xr, xg = (
            ctx.view_2d(xxx, n_embd, n_tokens, xxx.nb[1], j * n_embd * n_tokens * F32)
            for j in range(5)
        )
        r = ctx.mul_mat(w(il, "time_mix_receptance.weight"), xr)
        k = ctx.mul_mat(w(il, "time_mix_key.weight"), xk)
        v = ctx.mul_mat(w(il, "time_mix_value.weight"), xv)
        g = ctx.mul_mat(w(il, "time_mix_gate.weight"), xg)
        g = ctx.sigmoid(g) if qrwkv else ctx.silu(g)
        k = ctx.reshape_3d(k, hs, n_head, n_tokens)
        v = ctx.reshape_3d(v, hs, n_head, n_tokens)
        r = ctx.reshape_3d(r, hs, n_head, n_tokens)

        decay = ctx.tanh(ctx.mul_mat(w(il, "time_mix_decay_w1.weight"), xw))
        decay = ctx.mul_mat(w(il, "time_mix_decay_w2.weight"), decay)
        decay = ctx.add(decay, w(il, "time_mix_decay.weight"))
        decay = ctx.exp(ctx.neg(ctx.exp(decay)))
        decay = ctx.reshape_3d(decay, hs, n_head, n_tokens)
        if qrwkv:
            k = ctx.sub(k, ctx.mul(k, decay))  # k * (1 - w)
        state = self._rwkv_wkv_state(il)
        if qrwkv:
            # the reference's pow(head_size, -0.5f) is computed in double
            out = ctx.gated_linear_attn(k, v, r, decay, state, f32(hs**-0.5))
        else:
            out = ctx.rwkv_wkv6(k, v, r, w(il, "time_mix_first.weight"), decay, state)
        cur = self._rwkv_wkv_out(il, out)
        cur = ctx.reshape_2d(cur, n_embd, n_tokens) if qrwkv else self._rwkv_group_norm(cur, il)
        cur = ctx.mul(cur, g)
        cur = ctx.mul_mat(w(il, "time_mix_output.weight"), cur)
        return ctx.reshape_3d(cur, n_embd, self.ubatch.n_seq_tokens, self.ubatch.n_seqs)

    def _rwkv6_refuse(self) -> None:
        """RWKV-6 variants not built: K/V/R biases, the unfused lerp of old files, fewer
        K/V heads than heads (repeated in the reference), rescaling every n layers."""
        arch = self.hp.arch
        biases = ["time_mix_receptance.bias", "time_mix_key.bias", "time_mix_value.bias"]
        self._rwkv_refuse([*biases, "time_mix_lerp_w.weight"], (f"{arch}.rescale_every_n_layers",))
        n_head = self.hp.n_embd // self.m.hp_file.wkv_head_size
        for il, n_head_kv in enumerate(self.hp.n_head_kv):
            if n_head_kv not in (0, n_head):
                raise UnsupportedError(
                    f"{self.m.path}: layer {il}: {arch}.attention.head_count_kv {n_head_kv} "
                    f"!= {n_head} heads (repeated K/V heads are not built)"
                )

    # --- RWKV-7 -----------------------------------------------------------------------
    def rwkv7_time_mix(self, il: int, cur: Any, x_prev: Any, first: list[Any]) -> Any:
        """``build_rwkv7_time_mix``; ``first`` holds layer 0's V (the value residual)."""
        ctx, w = self.ctx, self.m._w
        ub = self.ubatch
        n_embd, n_tokens = self.hp.n_embd, ub.n_tokens
        hs = self.m.hp_file.wkv_head_size
        n_head = n_embd // hs
        g1 = w(il, "time_mix_g1.weight", required=False)
        g2 = w(il, "time_mix_g2.weight", required=False)
        gating = g1 is not None and g2 is not None
        n_lerp = 6 if gating else 5

        sx = ctx.sub(x_prev, cur)
        dummy = ctx.new_tensor_4d(gg.lib.GGML_TYPE_F32, n_embd, ub.n_seq_tokens, ub.n_seqs, n_lerp)
        sx = ctx.repeat(sx, dummy)
        xxx = ctx.add(ctx.mul(sx, w(il, "time_mix_lerp_fused.weight")), cur)
        # planes of n_embd x n_tokens: r, w, k, v, a (, g)
        xr, xw, xk, xv, xa, *xg = (
            ctx.view_2d(xxx, n_embd, n_tokens, xxx.nb[1], j * n_embd * n_tokens * F32)
            for j in range(n_lerp)
        )
        r = ctx.mul_mat(w(il, "time_mix_receptance.weight"), xr)
        decay = ctx.tanh(ctx.mul_mat(w(il, "time_mix_w1.weight"), xw))
        decay = ctx.add(ctx.mul_mat(w(il, "time_mix_w2.weight"), decay),
                        w(il, "time_mix_w0.weight"))  # fmt: skip
        decay = ctx.exp(ctx.scale(ctx.sigmoid(decay), _RWKV7_DECAY_SCALE))
        k = ctx.mul_mat(w(il, "time_mix_key.weight"), xk)
        v = ctx.mul_mat(w(il, "time_mix_value.weight"), xv)
        if not first:
            first.append(v)
        else:
            mix = ctx.mul_mat(w(il, "time_mix_v2.weight"),
                              ctx.mul_mat(w(il, "time_mix_v1.weight"), xv))  # fmt: skip
            mix = ctx.sigmoid(ctx.add(mix, w(il, "time_mix_v0.weight")))
            v = ctx.add(v, ctx.mul(ctx.sub(first[0], v), mix))
        gate = None
        if gating:
            gate = ctx.mul_mat(g2, ctx.sigmoid(ctx.mul_mat(g1, xg[0])))
        a = ctx.mul_mat(w(il, "time_mix_a2.weight"), ctx.mul_mat(w(il, "time_mix_a1.weight"), xa))
        a = ctx.sigmoid(ctx.add(a, w(il, "time_mix_a0.weight")))

        kk = ctx.reshape_3d(ctx.mul(k, w(il, "time_mix_k_k.weight")), hs, n_head, n_tokens)
        kk = ctx.l2_norm(kk, 1e-12)
        ka = ctx.mul(k, w(il, "time_mix_k_a.weight"))
        k = ctx.add(k, ctx.sub(ctx.mul(a, ka), ka))  # k + (a - 1) * k * k_a

        r, decay, k, v, a = (ctx.reshape_3d(t, hs, n_head, n_tokens) for t in (r, decay, k, v, a))
        state = self._rwkv_wkv_state(il)
        out = ctx.rwkv_wkv7(r, decay, k, v, ctx.neg(kk), ctx.mul(kk, a), state)
        cur = self._rwkv_wkv_out(il, out)
        if w(il, "time_mix_ln.weight", required=False) is not None and (
            w(il, "time_mix_ln.bias", required=False) is not None
        ):
            cur = self._rwkv_group_norm(cur, il)
        else:
            cur = ctx.reshape_2d(cur, n_embd, n_tokens)
        r_k = ctx.reshape_2d(w(il, "time_mix_r_k.weight"), hs, n_head)
        rk = ctx.sum_rows(ctx.mul(ctx.mul(k, r), r_k))
        cur = ctx.add(cur, ctx.reshape_2d(ctx.mul(v, rk), n_embd, n_tokens))
        if gate is not None:
            cur = ctx.mul(cur, gate)
        cur = ctx.mul_mat(w(il, "time_mix_output.weight"), cur)
        return ctx.reshape_3d(cur, n_embd, ub.n_seq_tokens, ub.n_seqs)

    # --- the RWKV-6 / RWKV-7 trunk (layer norms, channel mix) ---------------------------
    def _rwkv_trunk(self, inp: Any, out_ids: Any, v7: bool) -> Any:
        """``llama_model_rwkv6::graph`` / ``llama_model_rwkv7::graph`` through the output
        norm: two token-shift rows per layer (time mix, channel mix)."""
        ctx, hp, w = self.ctx, self.hp, self.m._w
        g: Any = self
        ub = self.ubatch
        n_embd, n_seq_tokens, n_seqs = hp.n_embd, ub.n_seq_tokens, ub.n_seqs
        self._rwkv_check(2)
        if v7:
            self._rwkv7_check_head()
        else:
            self._rwkv6_refuse()
        get = self.m.weights.get
        inpL = self._rwkv_layer_norm(inp, get("token_embd_norm.weight"),
                                     get("token_embd_norm.bias"))  # fmt: skip
        g.s_copy()
        first: list[Any] = []
        for il in range(hp.n_layer):
            inpL = ctx.reshape_3d(inpL, n_embd, n_seq_tokens, n_seqs)
            shift = self._rwkv_shift_load(il, 2)
            el = int(gg.lib.ggml_element_size(shift))
            att_shift = ctx.view_3d(shift, n_embd, 1, n_seqs, shift.nb[1], shift.nb[2], 0)
            ffn_shift = ctx.view_3d(shift, n_embd, 1, n_seqs, shift.nb[1], shift.nb[2], n_embd * el)
            att_norm = self._rwkv_layer_norm(inpL, w(il, "attn_norm.weight"),
                                             w(il, "attn_norm.bias"))  # fmt: skip
            x_prev = self._rwkv_prev(att_shift, att_norm)
            if v7:
                cur = self.rwkv7_time_mix(il, att_norm, x_prev, first)
            else:
                cur = self.rwkv6_time_mix(il, att_norm, x_prev)
            ffn_inp = ctx.add(cur, inpL)
            ffn_norm = self._rwkv_layer_norm(ffn_inp, w(il, "attn_norm_2.weight"),
                                             w(il, "attn_norm_2.bias"))  # fmt: skip
            x_prev = self._rwkv_prev(ffn_shift, ffn_norm)
            shift = ctx.concat(self._rwkv_last(att_norm), self._rwkv_last(ffn_norm), 1)
            self._rwkv_shift_store(il, shift, 2)

            ffn_inp = ctx.reshape_2d(ffn_inp, n_embd, ub.n_tokens)
            ffn_norm = ctx.reshape_2d(ffn_norm, n_embd, ub.n_tokens)
            x_prev = ctx.reshape_2d(x_prev, n_embd, ub.n_tokens)
            if il == hp.n_layer - 1:
                ffn_inp = ctx.get_rows(ffn_inp, out_ids)
                ffn_norm = ctx.get_rows(ffn_norm, out_ids)
                x_prev = ctx.get_rows(x_prev, out_ids)
            cur = self._rwkv_channel_mix(il, ffn_norm, x_prev, v7)
            inpL = ctx.add(cur, ffn_inp)
        return self._rwkv_layer_norm(inpL, get("output_norm.weight"), get("output_norm.bias"))

    def _rwkv_channel_mix(self, il: int, cur: Any, x_prev: Any, v7: bool) -> Any:
        """``build_rwkv6_channel_mix`` / ``build_rwkv7_channel_mix``."""
        ctx, w = self.ctx, self.m._w
        sx = ctx.sub(x_prev, cur)
        xk = ctx.add(ctx.mul(sx, w(il, "channel_mix_lerp_k.weight")), cur)
        if v7:
            k = ctx.sqr(ctx.relu(ctx.mul_mat(w(il, "channel_mix_key.weight"), xk)))
            return ctx.mul_mat(w(il, "channel_mix_value.weight"), k)
        xr = ctx.add(ctx.mul(sx, w(il, "channel_mix_lerp_r.weight")), cur)
        r = ctx.sigmoid(ctx.mul_mat(w(il, "channel_mix_receptance.weight"), xr))
        k = ctx.sqr(ctx.relu(ctx.mul_mat(w(il, "channel_mix_key.weight"), xk)))
        return ctx.mul(r, ctx.mul_mat(w(il, "channel_mix_value.weight"), k))

    # --- the Qwen-based trunk (RMS norms, SwiGLU FFN) ------------------------------------
    def _rwkv_qwen_trunk(self, inp: Any, out_ids: Any, v7: bool) -> Any:
        """``llama_model_rwkv6qwen2::graph`` / ``llama_model_arwkv7::graph`` through the
        output norm: one token-shift row per layer (the time mix's)."""
        ctx, hp, w = self.ctx, self.hp, self.m._w
        g: Any = self
        ub = self.ubatch
        n_embd, n_seq_tokens, n_seqs = hp.n_embd, ub.n_seq_tokens, ub.n_seqs
        self._rwkv_check(1)
        if v7:
            self._rwkv7_check_head()
        else:
            self._rwkv6_refuse()
        g.s_copy()
        first: list[Any] = []
        inpL = inp
        for il in range(hp.n_layer):
            inpL = ctx.reshape_3d(inpL, n_embd, n_seq_tokens, n_seqs)
            shift = self._rwkv_shift_load(il, 1)
            att_norm = self._rwkv_rms_norm(inpL, w(il, "attn_norm.weight"),
                                           w(il, "attn_norm.bias", required=False))  # fmt: skip
            x_prev = self._rwkv_prev(shift, att_norm)
            if v7:
                cur = self.rwkv7_time_mix(il, att_norm, x_prev, first)
            else:
                cur = self.rwkv6_time_mix(il, att_norm, x_prev)
            self._rwkv_shift_store(il, self._rwkv_last(att_norm), 1)
            ffn_inp = ctx.add(cur, inpL)
            ffn_inp = ctx.reshape_2d(ffn_inp, n_embd, ub.n_tokens)
            if il == hp.n_layer - 1:
                ffn_inp = ctx.get_rows(ffn_inp, out_ids)
            cur = g.norm(ffn_inp, w(il, "ffn_norm.weight"))
            cur = g.ffn(il, cur)
            inpL = ctx.add(cur, ffn_inp)
        get = self.m.weights.get
        return self._rwkv_rms_norm(inpL, get("output_norm.weight"),
                                   get("output_norm.bias", required=False))  # fmt: skip

    def rwkv6(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_rwkv6::graph`` through the output norm."""
        return self._rwkv_trunk(inp, out_ids, v7=False)

    def rwkv7(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_rwkv7::graph`` through the output norm."""
        return self._rwkv_trunk(inp, out_ids, v7=True)

    def rwkv6qwen2(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_rwkv6qwen2::graph`` through the output norm."""
        return self._rwkv_qwen_trunk(inp, out_ids, v7=False)

    def arwkv7(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_arwkv7::graph`` through the output norm."""
        return self._rwkv_qwen_trunk(inp, out_ids, v7=True)

    # --- PLaMo-2 ------------------------------------------------------------------------
    def plamo2_mamba(self, il: int, cur: Any) -> Any:
        """``build_plamo2_mamba_layer``: a Mamba layer with per-head A and D, the in_proj
        output interleaved per head as [z | x], dt / B / C RMS-normed, no groups.

        Conv state R: the last ``d_conv - 1`` columns of [state | x] go to rows
        ``[head, head + n_seqs)``. SSM state S: the scan's final states go to the byte
        offset ``head * n_seqs * n_embd_s`` (the reference multiplies the head by
        ``n_seqs``; with several sequences in a ubatch and ``head > 0`` that is not row
        ``head``, and the graph here writes where the reference writes).
        """
        ctx, ub = self.ctx, self.ubatch
        g: Any = self
        rs = g._recr()
        w = self.m._w
        hpf = self.m.hp_file
        n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        if not ub.equal_seqs or n_seqs * n_seq_tokens != ub.n_tokens:
            raise ConfigError(
                "ubatch: PLaMo-2 Mamba layers need an equal-sequence split (split_equal or "
                "split_seq)"
            )
        if rs.n_rs_seq:
            raise UnsupportedError("PLaMo-2 Mamba layers: rollback snapshots (n_rs_seq > 0)")
        d_conv, d_inner, d_state = hpf.ssm_d_conv, hpf.ssm_d_inner, hpf.ssm_d_state
        n_heads = hpf.ssm_dt_rank
        if n_heads <= 0 or d_inner % n_heads or hpf.ssm_n_group != 0:
            raise ConfigError(
                f"{self.m.path}: ssm.inner_size {d_inner}, ssm.time_step_rank {n_heads}, "
                f"ssm.group_count {hpf.ssm_n_group}: PLaMo-2 needs heads dividing the inner "
                f"size and no groups"
            )
        head_dim = d_inner // n_heads
        n_embd_r, n_embd_s = hpf.n_embd_r(), hpf.n_embd_s()
        r_all, s_all = rs.r_tensor(il).ptr, rs.s_tensor(il).ptr

        conv = g.build_rs(r_all, n_embd_r, ctx.get_rows)
        conv = ctx.reshape_3d(conv, d_conv - 1, d_inner, n_seqs)
        cur = ctx.reshape_3d(cur, cur.ne[0], n_seq_tokens, n_seqs)
        zx = ctx.mul_mat(w(il, "ssm_in.weight"), cur)
        zx = ctx.permute(zx, 0, 2, 1, 3)
        zx = ctx.cont_4d(zx, head_dim * 2, n_heads, n_seq_tokens, n_seqs)
        # per head: head_dim z values, then head_dim x values
        nb = (zx.nb[1], zx.nb[2], zx.nb[3])
        x = ctx.view_4d(zx, head_dim, n_heads, n_seq_tokens, n_seqs, *nb,
                        head_dim * int(gg.lib.ggml_element_size(zx)))  # fmt: skip
        x = ctx.cont_3d(x, head_dim * n_heads, n_seq_tokens, n_seqs)
        z = ctx.view_4d(zx, head_dim, n_heads, n_seq_tokens, n_seqs, *nb, 0)

        conv_x = ctx.concat(conv, ctx.transpose(x), 0)
        last_conv = ctx.view_3d(conv_x, d_conv - 1, d_inner, n_seqs, conv_x.nb[1], conv_x.nb[2],
                                n_seq_tokens * int(conv_x.nb[0]))  # fmt: skip
        r_el = int(gg.lib.ggml_element_size(r_all))
        g.expand(
            ctx.cpy(last_conv, ctx.view_1d(r_all, n_embd_r * n_seqs, rs.head * n_embd_r * r_el))
        )
        x = ctx.silu(ctx.ssm_conv(conv_x, w(il, "ssm_conv1d.weight")))

        x_bcdt = ctx.mul_mat(w(il, "ssm_x.weight"), x)
        el = int(gg.lib.ggml_element_size(x_bcdt))
        dt_dim = max(64, self.hp.n_embd // 16)
        nb1, nb2 = x_bcdt.nb[1], x_bcdt.nb[2]
        b = ctx.view_3d(x_bcdt, d_state, n_seq_tokens, n_seqs, nb1, nb2, 0)
        c = ctx.view_3d(x_bcdt, d_state, n_seq_tokens, n_seqs, nb1, nb2, el * d_state)
        dt = ctx.view_3d(x_bcdt, dt_dim, n_seq_tokens, n_seqs, nb1, nb2, el * 2 * d_state)
        b = g.norm(b, w(il, "ssm_b_norm"))
        c = g.norm(c, w(il, "ssm_c_norm"))
        dt = g.norm(dt, w(il, "ssm_dt_norm"))
        dt = ctx.add(ctx.mul_mat(w(il, "ssm_dt.weight"), dt), w(il, "ssm_dt.bias"))
        a = ctx.reshape_2d(w(il, "ssm_a"), 1, n_heads)

        xel = int(gg.lib.ggml_element_size(x))
        x = ctx.view_4d(x, head_dim, n_heads, n_seq_tokens, n_seqs, head_dim * xel,
                        head_dim * n_heads * xel, head_dim * n_heads * n_seq_tokens * xel, 0)  # fmt: skip
        b = ctx.view_4d(b, d_state, 1, n_seq_tokens, n_seqs, d_state * int(b.nb[0]), b.nb[1],
                        b.nb[2], 0)  # fmt: skip
        c = ctx.view_4d(c, d_state, 1, n_seq_tokens, n_seqs, d_state * int(c.nb[0]), c.nb[1],
                        c.nb[2], 0)  # fmt: skip

        def get_ssm_rows(states: Any, ids: Any) -> Any:
            ssm = ctx.reshape_4d(states, d_state, head_dim, n_heads, rs.size)
            return ctx.ssm_scan(ssm, x, dt, a, b, c, ids, 1)

        y_ssm = g.build_rs(s_all, n_embd_s, get_ssm_rows)
        n_state = n_heads * head_dim * d_state * n_seqs
        yel, sel = int(gg.lib.ggml_element_size(y_ssm)), int(gg.lib.ggml_element_size(s_all))
        src = ctx.view_1d(y_ssm, n_state, n_heads * head_dim * n_seq_tokens * n_seqs * yel)
        dst = ctx.view_1d(s_all, n_state, rs.head * n_seqs * n_heads * head_dim * d_state * sel)
        g.expand(ctx.cpy(src, dst))

        y = ctx.view_4d(y_ssm, head_dim, n_heads, n_seq_tokens, n_seqs, head_dim * xel,
                        head_dim * n_heads * xel, head_dim * n_heads * n_seq_tokens * xel, 0)  # fmt: skip
        d = ctx.reshape_2d(w(il, "ssm_d"), 1, n_heads)
        y = ctx.add(y, ctx.mul(x, d))
        y = ctx.swiglu_split(ctx.cont(z), y)
        y = ctx.view_3d(y, head_dim * n_heads, n_seq_tokens, n_seqs, y.nb[2], y.nb[3], 0)
        cur = ctx.mul_mat(w(il, "ssm_out.weight"), y)
        return ctx.reshape_2d(cur, cur.ne[0], n_seq_tokens * n_seqs)

    def plamo2_attention(self, il: int, cur: Any) -> Any:
        """``build_plamo2_attn_layer``: fused QKV split into per-head views, Q/K RMS norms
        (per-head weights), RoPE, ``build_attn`` (scale 1/sqrt(head_v)) and ``wo``."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        n_tokens = self.ubatch.n_tokens
        hd, nh, nkv = hp.n_embd_head, hp.n_head[il], hp.n_head_kv[il]
        qkv = ctx.mul_mat(w(il, "attn_qkv.weight"), cur)
        el = int(gg.lib.ggml_element_size(qkv))
        q = ctx.view_3d(qkv, hd, nh, n_tokens, hd * F32, qkv.nb[1], 0)
        k = ctx.view_3d(qkv, hd, nkv, n_tokens, hd * F32, qkv.nb[1], hd * nh * el)
        v = ctx.view_3d(qkv, hd, nkv, n_tokens, hd * F32, qkv.nb[1], hd * (nh + nkv) * el)
        rope = self.m.spec.layers[il].rope
        q = g.rope(g.norm(q, w(il, "attn_q_norm.weight")), rope)
        k = g.rope(g.norm(k, w(il, "attn_k_norm.weight")), rope)

        part = self.inputs.attn_part(il)
        ai = self.inputs.attn[part]
        t_mask, t_kidx, t_vidx = g.attn_inputs(part)
        g.expand(q, v, k)
        g.expand(ai.cpy_k(ctx, k, t_kidx, il))
        g.expand(ai.cpy_v(ctx, v, t_vidx, il))
        cur = g.attn_mha(q, ai.get_k(ctx, il), ai.get_v(ctx, il), t_mask, hp.kq_scale)
        g.expand(cur)
        return ctx.mul_mat(w(il, "attn_output.weight"), cur)

    def plamo2(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_plamo2::graph`` up to the output norm: pre-norm, mixer (Mamba or
        attention), post-mixer norm, residual, pre-FFN norm, SwiGLU FFN over one fused
        up projection (``ggml_swiglu``), post-FFN norm, residual."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        layers = self.m.spec.layers
        # biases and a separate gate the reference would read (the engine builds none)
        self._rwkv_refuse(
            ["attn_qkv.bias", "attn_output.bias", "ffn_up.bias", "ffn_down.bias", "ffn_gate.weight"]
        )
        inpL = inp
        for il in range(hp.n_layer):
            residual = inpL
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            if layers[il].recurrent:
                cur = self.plamo2_mamba(il, cur)
            else:
                cur = self.plamo2_attention(il, cur)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                residual = ctx.get_rows(residual, out_ids)
            cur = g.norm(cur, w(il, "post_attention_norm"))
            residual = ctx.add(cur, residual)
            cur = g.norm(residual, w(il, "ffn_norm.weight"))
            cur = ctx.mul_mat(w(il, "ffn_up.weight"), cur)
            cur = ctx.mul_mat(w(il, "ffn_down.weight"), ctx.swiglu(cur))
            cur = g.norm(cur, w(il, "post_ffw_norm"))
            inpL = ctx.add(cur, residual)
        return inpL

    # --- Kimi-Linear ----------------------------------------------------------------------
    def _kimi_conv(
        self, il: int, conv_state: Any, j: int, x: Any, proj: str, conv_w: str, every: bool
    ) -> Any:
        """``causal_conv1d`` of Q (``j`` 0), K (1) or V (2): the projection, its short
        convolution over [state | tokens], the state's last ``d_conv - 1`` columns stored
        into the ``j``-th third of each R row ``[head, head + n_seqs)``, SiLU.

        With rollback (kimi-k3, bailingmoe3: ``n_rs_seq`` > 0) plane ``s`` gets the
        columns ending ``s`` tokens before the last, planes written in order: every plane
        (``every``, kimi-k3: the window clamped to the first column) or only the first
        ``min(n_seq_tokens, n_rs_seq + 1)`` (bailingmoe3).
        """
        ctx, ub = self.ctx, self.ubatch
        g: Any = self
        rs = g._recr()
        hpf = self.m.hp_file
        r_all = rs.r_tensor(il).ptr
        n_head, head_dim, d_conv = hpf.n_head[il], hpf.n_embd_head_kda, hpf.ssm_d_conv
        d_inner = head_dim * n_head
        size = (d_conv - 1) * d_inner
        n_embd_r = 3 * size
        n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        el = int(gg.lib.ggml_element_size(conv_state))
        state = ctx.view_3d(conv_state, d_conv - 1, d_inner, n_seqs, (d_conv - 1) * el,
                            n_embd_r * el, j * size * el)  # fmt: skip
        x = ctx.mul_mat(self.m._w(il, proj), x)
        x = ctx.reshape_3d(x, d_inner, n_seq_tokens, n_seqs)
        conv_x = ctx.concat(state, ctx.transpose(x), 0)
        rel = int(gg.lib.ggml_element_size(r_all))
        n_planes = rs.n_rs_seq + 1 if every else min(n_seq_tokens, rs.n_rs_seq + 1)
        for plane in range(n_planes):
            s_idx = max(0, n_seq_tokens - plane)
            last = ctx.view_3d(conv_x, d_conv - 1, d_inner, n_seqs, conv_x.nb[1], conv_x.nb[2],
                               s_idx * int(conv_x.nb[0]))  # fmt: skip
            row = plane * rs.size + rs.head
            dst = ctx.view_3d(r_all, d_conv - 1, d_inner, n_seqs, (d_conv - 1) * rel,
                              n_embd_r * rel, (row * n_embd_r + j * size) * rel)  # fmt: skip
            g.expand(ctx.cpy(last, dst))
        conv_w_2d = ctx.reshape_2d(self.m._w(il, conv_w), d_conv, d_inner)
        out = ctx.ssm_conv(conv_x, conv_w_2d)
        out = ctx.silu(ctx.reshape_2d(out, d_inner, ub.n_tokens))
        return ctx.reshape_4d(out, head_dim, n_head, n_seq_tokens, n_seqs)

    def kimi_kda(self, il: int, cur: Any, variant: str = "kimi-linear") -> Any:
        """The KDA layer of ``llama_model_kimi_linear::graph``: Q/K/V each through a short
        convolution (R: three conv states per row), the per-channel decay
        ``A * softplus(f_b(f_a(x)) + dt_bias)``, sigmoid beta, L2-normed Q/K, the fused
        ``ggml_gated_delta_net`` (its final state to S rows ``[head, head + n_seqs)``), an
        RMS norm gated by ``sigmoid(g_b(g_a(x)))``, ``wo``.

        ``variant`` ``kimi-k3`` (``build_kda_layer``): rollback planes (conv columns and
        the fused op's state snapshots, ``build_recurrent_attn``) and one full-rank output
        gate ``ssm_g``; ``bailingmoe3``: rollback planes, the decay
        ``lower_bound * sigmoid(A * (f_a(x) + dt_bias))`` from a full-rank ``f_a`` and the
        output gate ``ssm_g_a``.
        """
        k3, bailing = variant == "kimi-k3", variant == "bailingmoe3"
        ctx, ub = self.ctx, self.ubatch
        g: Any = self
        rs = g._recr()
        w = self.m._w
        hpf = self.m.hp_file
        if not ub.equal_seqs or ub.n_seqs * ub.n_seq_tokens != ub.n_tokens:
            raise ConfigError(
                "ubatch: KDA layers need an equal-sequence split (split_equal or split_seq)"
            )
        if rs.n_rs_seq and variant == "kimi-linear":
            raise UnsupportedError("kimi-linear KDA layers: rollback snapshots (n_rs_seq > 0)")
        n_head, head_dim = hpf.n_head[il], hpf.n_embd_head_kda
        n_seqs, n_seq_tokens, n_tokens = ub.n_seqs, ub.n_seq_tokens, ub.n_tokens
        n_embd_s = hpf.n_embd_s()
        s_all = rs.s_tensor(il).ptr

        conv_state = g.build_rs(rs.r_tensor(il).ptr, hpf.n_embd_r(), ctx.get_rows)
        q, k, v = (
            self._kimi_conv(
                il, conv_state, j, cur, f"attn_{x}.weight", f"ssm_conv1d_{x}.weight", every=k3
            )
            for j, x in enumerate("qkv")
        )

        a = ctx.reshape_3d(w(il, "ssm_a"), 1, n_head, 1)  # the file holds -exp(A_log)
        if bailing:
            g1 = ctx.add(ctx.mul_mat(w(il, "ssm_f_a.weight"), cur), w(il, "ssm_dt.bias"))
            g1 = ctx.mul(ctx.reshape_3d(g1, head_dim, n_head, n_tokens), a)
            g1 = ctx.scale(ctx.sigmoid(g1), self._kda_lower_bound())
        else:
            g1 = ctx.mul_mat(w(il, "ssm_f_b.weight"), ctx.mul_mat(w(il, "ssm_f_a.weight"), cur))
            g1 = ctx.softplus(ctx.add(g1, w(il, "ssm_dt.bias")))
            g1 = ctx.mul(ctx.reshape_3d(g1, head_dim, n_head, n_tokens), a)
        g1 = ctx.reshape_4d(g1, head_dim, n_head, n_seq_tokens, n_seqs)
        beta = ctx.mul_mat(w(il, "ssm_beta.weight"), cur)
        beta = ctx.sigmoid(ctx.reshape_4d(beta, 1, n_head, n_seq_tokens, n_seqs))
        cur = ctx.reshape_3d(cur, cur.ne[0], n_seq_tokens, n_seqs)

        state = g.build_rs(s_all, n_embd_s, ctx.get_rows)
        state = ctx.reshape_4d(state, head_dim, head_dim, n_head, n_seqs)
        q = g._gdn_l2_norm(q)
        k = g._gdn_l2_norm(k)
        if k3 or bailing:
            output = g._gdn_recurrent_attn(rs, s_all, q, k, v, g1, beta, state, n_embd_s)
            output = ctx.cont(output)
            cur_2d = ctx.reshape_2d(cur, cur.ne[0], n_seq_tokens * n_seqs)
            g2 = ctx.mul_mat(w(il, "ssm_g.weight" if k3 else "ssm_g_a.weight"), cur_2d)
            return self._kda_out(il, output, g2)
        out = ctx.gated_delta_net(q, k, v, g1, beta, state, 1)
        # out = [S x H x n_seq_tokens x n_seqs scores | S x S x H x n_seqs states]
        output = ctx.view_4d(out, head_dim, n_head, n_seq_tokens, n_seqs, head_dim * F32,
                             head_dim * n_head * F32, head_dim * n_head * n_seq_tokens * F32, 0)  # fmt: skip
        new_state = ctx.view_4d(out, head_dim, head_dim, n_head, n_seqs, head_dim * F32,
                                head_dim * head_dim * F32, head_dim * head_dim * n_head * F32,
                                head_dim * n_head * n_seq_tokens * n_seqs * F32)  # fmt: skip
        output = ctx.cont(output)
        sel = int(gg.lib.ggml_element_size(s_all))
        dst = ctx.view_1d(s_all, n_embd_s * n_seqs, rs.head * n_embd_s * sel)
        g.expand(ctx.cpy(new_state, dst))

        cur_2d = ctx.reshape_2d(cur, cur.ne[0], n_seq_tokens * n_seqs)
        g2 = ctx.mul_mat(w(il, "ssm_g_b.weight"), ctx.mul_mat(w(il, "ssm_g_a.weight"), cur_2d))
        return self._kda_out(il, output, g2)

    def _kda_lower_bound(self) -> float:
        """``kda.gate_lower_bound`` (bailingmoe3 requires it)."""
        key = f"{self.hp.arch}.kda.gate_lower_bound"
        if self.m.keys.fields.get(key) is None:
            raise ConfigError(f"{self.m.path}: key not found in model: {key}")
        return self.m.keys.f32(key)

    def _kda_out(self, il: int, output: Any, g2: Any) -> Any:
        """``wo(rms_norm(output) * sigmoid(g2))`` per KDA head."""
        ctx, g = self.ctx, self
        gw: Any = g
        w = self.m._w
        n_head, head_dim = self.m.hp_file.n_head[il], self.m.hp_file.n_embd_head_kda
        n_tokens = self.ubatch.n_tokens
        g2 = ctx.reshape_3d(g2, head_dim, n_head, n_tokens)
        out3 = ctx.reshape_3d(output, head_dim, n_head, n_tokens)
        gated = ctx.mul(gw.norm(out3, w(il, "ssm_norm.weight")), ctx.sigmoid(g2))
        gated = ctx.cont_2d(gated, head_dim * n_head, n_tokens)
        return ctx.mul_mat(w(il, "attn_output.weight"), gated)

    def _kimi_k_inputs(self, part: str) -> tuple[Any, Any]:
        """(KQ mask, k_idxs) of a K-only attention memory (``build_inp_mem_hybrid_k``): no
        V rows are stored, so no v_idxs input is made."""
        g: Any = self
        if part not in g._attn_in:
            ai = self.inputs.attn[part]
            n_tps = self.ubatch.n_tokens // ai.n_stream
            mask = ai.kq_mask(self.ubatch)
            if mask.shape != (ai.n_stream, n_tps, ai.n_kv):
                raise ConfigError(
                    f"kq_mask[{part}]: shape {mask.shape}, expected {(ai.n_stream, n_tps, ai.n_kv)}"
                )
            fa = g.flash_attn
            t_mask = g.input("f16" if fa else "f32", (ai.n_kv, n_tps, 1, ai.n_stream),
                             mask.astype(np.float16 if fa else np.float32), f"kq_mask_{part}")  # fmt: skip
            k_idxs = ai.k_idxs(self.ubatch).astype(np.int64)
            t_k = g.input("i64", (k_idxs.size,), k_idxs, f"k_idxs_{part}")
            g._attn_in[part] = (t_mask, t_k, None)
        t_mask, t_k, _ = g._attn_in[part]
        return t_mask, t_k

    def kimi_mla(self, il: int, cur: Any, variant: str = "kimi-linear") -> Any:
        """The MLA layer of ``llama_model_kimi_linear::graph`` (no RoPE), with the MLA KV
        cache: Q's no-RoPE part absorbed through ``wk_b``, K = [normed latent | k_pe] in a
        K-only cache, V = the first ``kv_lora_rank`` values of each K row, decompressed per
        head by ``wv_b`` after attention (``v_mla``), scale 1/sqrt(key_length_mla).

        ``variant`` ``kimi-k3`` multiplies the attention output by
        ``sigmoid(attn_gate . x)`` (``x`` the normed layer input) before ``wo`` when the
        layer has the gate; ``bailingmoe3`` ropes ``q_pe`` and ``k_pe`` and gates each head
        by one ``sigmoid(attn_gate . x)`` value.
        """
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        keys = self.m.keys
        arch, n_tokens = hp.arch, self.ubatch.n_tokens
        n_head = hp.n_head[il]
        k_mla = int(keys.f32(f"{arch}.attention.key_length_mla"))
        kv_lora = int(keys.f32(f"{arch}.attention.kv_lora_rank"))
        n_rope = int(keys.f32(f"{arch}.rope.dimension_count"))
        n_nope = k_mla - n_rope
        kq_scale = float(np.float32(1.0) / np.sqrt(np.float32(k_mla)))

        q = ctx.mul_mat(w(il, "attn_q.weight"), cur)
        kv_pe = ctx.mul_mat(w(il, "attn_kv_a_mqa.weight"), cur)
        row = int(gg.lib.ggml_row_size(kv_pe.type, kv_lora + n_rope))
        kv_cmpr = ctx.view_2d(kv_pe, kv_lora, n_tokens, row, 0)
        k_pe = ctx.view_3d(kv_pe, n_rope, 1, n_tokens, row, row,
                           int(gg.lib.ggml_row_size(kv_pe.type, kv_lora)))  # fmt: skip
        qrow = int(gg.lib.ggml_row_size(q.type, k_mla))
        q_nope = ctx.view_3d(q, n_nope, n_head, n_tokens, qrow, qrow * n_head, 0)
        q_pe = ctx.view_3d(q, n_rope, n_head, n_tokens, qrow, qrow * n_head,
                           int(gg.lib.ggml_row_size(q.type, n_nope)))  # fmt: skip
        if variant == "bailingmoe3":
            rope = self.m.spec.layers[il].rope
            if rope is None:
                raise ConfigError(f"layer {il}: an MLA layer without RoPE parameters")
            q_pe = g.rope(q_pe, rope)
            k_pe = g.rope(k_pe, rope)
        kv_cmpr = g.norm(kv_cmpr, w(il, "attn_kv_a_norm.weight"))

        q_nope = ctx.permute(q_nope, 0, 2, 1, 3)
        q_abs = ctx.permute(ctx.mul_mat(w(il, "attn_k_b.weight"), q_nope), 0, 2, 1, 3)
        q = ctx.concat(q_abs, q_pe, 0)  # [kv_lora + n_rope, n_head, n_tokens]
        kv_cmpr = ctx.reshape_3d(kv_cmpr, kv_lora, 1, n_tokens)
        k = ctx.concat(kv_cmpr, k_pe, 0)
        v = kv_cmpr

        part = self.inputs.attn_part(il)
        ai = self.inputs.attn[part]
        t_mask, t_kidx = self._kimi_k_inputs(part)
        g.expand(q, v, k)
        g.expand(ai.cpy_k(ctx, k, t_kidx, il))
        k_view = ai.get_k(ctx, il)
        v_view = ctx.view_4d(k_view, v.ne[0], k_view.ne[1], k_view.ne[2], k_view.ne[3],
                             k_view.nb[1], k_view.nb[2], k_view.nb[3], 0)  # fmt: skip
        out = self._mla_attn_mha(q, k_view, v_view, t_mask, kq_scale, w(il, "attn_v_b.weight"))
        g.expand(out)
        if variant == "bailingmoe3":
            v_head = int(keys.f32(f"{arch}.attention.value_length_mla"))
            gate = ctx.mul_mat(w(il, "attn_gate.weight"), cur)
            gate = ctx.sigmoid(ctx.reshape_3d(gate, 1, n_head, n_tokens))
            out = ctx.mul(ctx.reshape_3d(out, v_head, n_head, n_tokens), gate)
            out = ctx.cont_2d(out, v_head * n_head, n_tokens)
        elif variant == "kimi-k3":
            gate_w = w(il, "attn_gate.weight", required=False)
            if gate_w is not None:
                out = ctx.mul(out, ctx.sigmoid(ctx.mul_mat(gate_w, cur)))
        return ctx.mul_mat(w(il, "attn_output.weight"), out)

    def _mla_attn_mha(
        self, q: Any, k: Any, v: Any, kq_mask: Any, kq_scale: float, v_mla: Any
    ) -> Any:
        """``build_attn_mha`` with ``v_mla`` (no KQ bias, sinks, soft-capping or ALiBi):
        the attention output over the latent V is decompressed per head by ``v_mla``."""
        ctx = self.ctx
        v_trans = int(v.nb[1]) > int(v.nb[2])
        n_stream = int(k.ne[3])
        n_tps = int(q.ne[2]) // n_stream
        q = ctx.view_4d(q, q.ne[0], q.ne[1], n_tps, n_stream, q.nb[1], q.nb[2], q.nb[2] * n_tps, 0)
        q = ctx.permute(q, 0, 2, 1, 3)
        k = ctx.permute(k, 0, 2, 1, 3)
        v = ctx.permute(v, 0, 2, 1, 3)
        g: Any = self
        if g.flash_attn:
            if v_trans:
                v = ctx.transpose(v)
            if k.type == gg.lib.GGML_TYPE_F32:
                k = ctx.cast(k, gg.lib.GGML_TYPE_F16)
            if v.type == gg.lib.GGML_TYPE_F32:
                v = ctx.cast(v, gg.lib.GGML_TYPE_F16)
            cur = ctx.flash_attn_ext(q, k, v, kq_mask, f32(kq_scale), 0.0, 0.0)
            gg.lib.ggml_flash_attn_ext_set_prec(cur, gg.lib.GGML_PREC_F32)
            cur = ctx.permute(cur, 0, 2, 1, 3)
            cur = ctx.mul_mat(v_mla, cur)
            cur = ctx.cont(ctx.permute(cur, 0, 2, 1, 3))
            return ctx.reshape_2d(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])
        kq = ctx.mul_mat(k, q)
        gg.lib.ggml_mul_mat_set_prec(kq, gg.lib.GGML_PREC_F32)
        kq = ctx.soft_max_ext(kq, kq_mask, f32(kq_scale), 0.0)
        if not v_trans:
            v = ctx.cont(ctx.transpose(v))
        kqv = ctx.mul_mat(v, kq)
        kqv = ctx.mul_mat(v_mla, kqv)
        cur = ctx.permute(kqv, 0, 2, 1, 3)
        return ctx.cont_2d(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])

    def _kimi_refuse(self) -> None:
        """Kimi-Linear variants not built: fused KDA QKV, Q LoRA, the MHA fallback of MLA
        (``attn_kv_b``), Q/K/V/output biases, a MoE layer without its shared expert."""
        self._rwkv_refuse(
            ["attn_qkv.weight", "attn_q_a_norm.weight", "attn_q_a.weight", "attn_kv_b.weight",
             "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"]
        )  # fmt: skip
        n_dense = int(self.m.keys.f32(f"{self.hp.arch}.leading_dense_block_count", 0.0))
        for il in range(n_dense, self.hp.n_layer):
            if self.m._w(il, "ffn_up_shexp.weight", required=False) is None:
                raise UnsupportedError(
                    f"{self.m.path}: blk.{il}: a MoE layer without ffn_up_shexp.weight (the "
                    f"reference always adds the shared expert)"
                )

    def kimi_linear(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_kimi_linear::graph`` up to the output norm: KDA or MLA mixer,
        residual, RMS norm, dense SwiGLU (the leading layers) or sigmoid-routed MoE with
        the selection bias, normalised and scaled weights, plus the shared expert."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        keys = self.m.keys
        if not self.m.hp_file.is_mla:
            raise UnsupportedError(f"{self.m.path}: kimi-linear without MLA (an MHA KV cache)")
        self._kimi_refuse()
        n_dense = int(keys.f32(f"{hp.arch}.leading_dense_block_count", 0.0))
        w_scale = keys.f32(f"{hp.arch}.expert_weights_scale", 0.0)
        gating = int(keys.f32(f"{hp.arch}.expert_gating_func", 0.0))
        layers = self.m.spec.layers
        if any(layer.recurrent for layer in layers):
            g.s_copy()
        inpL = inp
        for il in range(hp.n_layer):
            inpSA = inpL
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            g.expand(cur)
            cur = self.kimi_kda(il, cur) if layers[il].recurrent else self.kimi_mla(il, cur)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpSA = ctx.get_rows(inpSA, out_ids)
            ffn_inp = ctx.add(cur, inpSA)
            cur = g.norm(ffn_inp, w(il, "ffn_norm.weight"))
            if il < n_dense:
                cur = g.ffn(il, cur)
            else:
                moe = g.moe_ffn(il, cur, gating, norm_w=True, w_scale=w_scale)
                cur = ctx.add(moe, g.swiglu_ffn(il, cur, "_shexp"))
            inpL = ctx.add(cur, ffn_inp)
        return inpL

    # --- MiniMax-01 (lightning attention) -------------------------------------------------
    def _la_inputs(self) -> tuple[Any, Any, Any, Any]:
        """``llm_graph_input_la``: (slopes ``[n_head]``, q_decay and k_decay ``[1, n_head,
        n_seq_tokens, n_seqs]``, diag_decay ``[n_seq_tokens, n_seq_tokens, n_head, n_seqs]``),
        the exponents before the per-layer slope scale, in the reference's float32 math.

        ``pos_rel`` is a token's position minus its sequence's lowest in the ubatch;
        slopes ``start * start**h`` with ``start = 2**-(2**-(log2(n_head) - 3))`` (libm's
        ``powf`` / ``log2f``, as the reference calls them).

        The reference writes set ``s``'s rows at its primary sequence's ``seq_idx``, an
        index among the ubatch's unique sequences, while the graph reads row ``s``. When a
        token belongs to several sequences these differ: rows land past the tensors (into
        whatever the compute buffer holds there) and the graph reads rows nobody wrote.
        Such ubatches are refused (UnsupportedError) rather than imitated.
        """
        cached = getattr(self, "_la_cache", None)
        if cached is not None:
            return cached
        g: Any = self
        ub = self.ubatch
        n_head = self.hp.n_head[0]
        n_seqs, n_tps = ub.n_seqs, ub.n_seq_tokens
        powf, log2f = _libm_f32("powf", 2), _libm_f32("log2f", 1)
        f = np.float32
        start = powf(2.0, float(-powf(2.0, float(-(f(log2f(float(n_head))) - f(3))))))
        slopes = np.array(
            [f(start) * f(powf(start, float(h))) for h in range(n_head)], dtype=np.float32
        )
        seq_idx = ub.seq_idx[ub.seq_id0].astype(np.int64)  # per token
        rows = seq_idx[::n_tps]  # the row each set's values are written to
        if sorted(rows.tolist()) != list(range(n_seqs)):
            raise UnsupportedError(
                f"ubatch: lightning attention over {n_seqs} sequence sets whose sequence "
                f"indices {rows.tolist()} are not 0..{n_seqs - 1} (tokens of several "
                f"sequences: the reference writes its decay rows past the inputs and reads "
                f"rows it never wrote)"
            )
        pos = ub.pos0.astype(np.int64)
        p0 = np.full(ub.n_seqs_unq, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(p0, seq_idx, pos)
        pos_rel = (pos - p0[seq_idx]).reshape(n_seqs, n_tps)  # [set, token]
        neg = -slopes  # E.g. slopes [0.25, 0.0625] -> [-0.25, -0.0625]
        q = np.empty((n_seqs, n_tps, n_head), dtype=np.float32)
        k = np.empty_like(q)
        # q[row, i, h] = -slopes[h] * (pos_rel + 1); k: * (n_seq_tokens - pos_rel - 1)
        q[rows] = neg[None, None, :] * (pos_rel + 1).astype(np.float32)[:, :, None]
        k[rows] = neg[None, None, :] * (n_tps - pos_rel - 1).astype(np.float32)[:, :, None]
        # diag[row, h, j, i] = -slopes[h] * (pos_rel_j - pos_rel_i) where >= 0, else -inf
        index = pos_rel[:, :, None] - pos_rel[:, None, :]  # [set, j, i]
        diag = np.empty((n_seqs, n_head, n_tps, n_tps), dtype=np.float32)
        with np.errstate(invalid="ignore"):
            vals = neg[None, :, None, None] * index.astype(np.float32)[:, None, :, :]
        diag[rows] = np.where(index[:, None, :, :] >= 0, vals, np.float32(-np.inf))
        t_slopes = g.input("f32", (n_head,), slopes, "la_slopes")
        t_q = g.input("f32", (1, n_head, n_tps, n_seqs), q, "la_q_decay")
        t_k = g.input("f32", (1, n_head, n_tps, n_seqs), k, "la_k_decay")
        t_diag = g.input("f32", (n_tps, n_tps, n_head, n_seqs), diag, "la_diag_decay")
        self._la_cache = (t_slopes, t_q, t_k, t_diag)
        return self._la_cache

    def lightning_attention(self, il: int, cur: Any) -> Any:
        """The lightning-attention layer of ``llama_model_minimax_01::graph``: SiLU'd fused
        QKV, the intra-block part ``(Q K^T * diag_decay) V`` plus the inter-block part
        ``(Q * q_decay) S``, the state ``S * exp(-n_seq_tokens * slope) + (K * k_decay)^T V``
        to S rows ``[head, head + n_seqs)``, RMS norm, sigmoid gate, ``wo``."""
        ctx, hp, ub = self.ctx, self.hp, self.ubatch
        g: Any = self
        rs = g._recr()
        w = self.m._w
        hpf = self.m.hp_file
        if not ub.equal_seqs or ub.n_seqs * ub.n_seq_tokens != ub.n_tokens:
            raise ConfigError(
                "ubatch: lightning attention needs an equal-sequence split (split_equal or "
                "split_seq)"
            )
        if rs.n_rs_seq:
            raise UnsupportedError("lightning attention: rollback snapshots (n_rs_seq > 0)")
        if hpf.n_embd_r():
            raise UnsupportedError(f"{self.m.path}: lightning attention with a conv state")
        n_seqs, n_tps = ub.n_seqs, ub.n_seq_tokens
        hd, n_head = hp.n_embd_head, hp.n_head[il]
        n_embd_s = hpf.n_embd_s()
        s_all = rs.s_tensor(il).ptr
        t_slopes, q_decay_exp, k_decay_exp, diag_decay_exp = self._la_inputs()

        # computed in double, passed as float
        slope_scale = f32(1.0 - 1.0 * il / (hp.n_layer - 1) + 1e-5)
        slope_rate = ctx.scale(t_slopes, slope_scale)
        cur = ctx.reshape_4d(cur, cur.ne[0], n_tps, 1, n_seqs)
        qkv_all = ctx.silu(ctx.mul_mat(w(il, "attn_qkv.weight"), cur))
        qkv_all = ctx.reshape_4d(qkv_all, hd * 3, n_head, n_tps, n_seqs)
        el = int(gg.lib.ggml_element_size(qkv_all))
        nb = (qkv_all.nb[1], qkv_all.nb[2], qkv_all.nb[3])
        q, k, v = (
            ctx.view_4d(qkv_all, hd, n_head, n_tps, n_seqs, *nb, j * el * hd) for j in range(3)
        )
        state = g.build_rs(s_all, n_embd_s, ctx.get_rows)
        kv_old = ctx.reshape_4d(state, hd, hd, n_head, n_seqs)

        q_decay = ctx.exp(ctx.scale(q_decay_exp, slope_scale))
        k_decay = ctx.exp(ctx.scale(k_decay_exp, slope_scale))
        diag_decay = ctx.exp(ctx.scale(diag_decay_exp, slope_scale))
        q_s = ctx.permute(ctx.mul(q, q_decay), 0, 2, 1, 3)
        qkv_none_diag = ctx.mul_mat(kv_old, q_s)
        qk = ctx.mul_mat(ctx.permute(k, 0, 2, 1, 3), ctx.permute(q, 0, 2, 1, 3))
        qk = ctx.mul(qk, diag_decay)
        v_trans = ctx.cont(ctx.permute(v, 1, 2, 0, 3))
        qkv = ctx.add(qkv_none_diag, ctx.mul_mat(v_trans, qk))
        g.expand(qkv)

        block_decay = ctx.exp(ctx.scale(slope_rate, f32(-1.0 * n_tps)))
        kv_old_s = ctx.mul(kv_old, ctx.reshape_3d(block_decay, 1, 1, n_head))
        k_after = ctx.cont(ctx.permute(ctx.mul(k, k_decay), 1, 2, 0, 3))
        kv_new = ctx.add(kv_old_s, ctx.mul_mat(k_after, v_trans))
        sel = int(gg.lib.ggml_element_size(s_all))
        g.expand(ctx.cpy(kv_new, ctx.view_1d(s_all, n_embd_s * n_seqs, rs.head * n_embd_s * sel)))

        qkv = ctx.cont(ctx.permute(qkv, 0, 2, 1, 3))
        qkv = ctx.reshape_4d(qkv, qkv.ne[0] * qkv.ne[1], qkv.ne[2], 1, qkv.ne[3])
        qkv_norm = g.norm(qkv, w(il, "attn_norm_2.weight"))
        gate = ctx.sigmoid(ctx.mul_mat(w(il, "attn_gate.weight"), cur))
        cur = ctx.mul_mat(w(il, "attn_output.weight"), ctx.mul(gate, qkv_norm))
        return ctx.reshape_2d(cur, cur.ne[0], n_tps * n_seqs)

    def minimax_01(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_minimax_01::graph`` up to the output norm: lightning or softmax
        attention on the normed input, the normed input (times ``residual_scale``) as the
        residual, softmax-routed MoE (normalised weights) on the normed sum, the normed sum
        (scaled) as the second residual."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        keys = self.m.keys
        layers = self.m.spec.layers
        attn = [il for il in range(hp.n_layer) if not layers[il].recurrent]
        unbuilt = (
            "attn_qkv.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_output.bias",
        )
        found = [
            f"blk.{il}.{n}" for il in attn for n in unbuilt if w(il, n, required=False) is not None
        ]
        if found:
            raise UnsupportedError(f"{self.m.path}: tensors the engine does not build: {found}")
        res_scale = keys.f32(f"{hp.arch}.residual_scale")
        w_scale = keys.f32(f"{hp.arch}.expert_weights_scale", 0.0)
        if any(layer.recurrent for layer in layers):
            g.s_copy()
        inpL = inp
        for il in range(hp.n_layer):
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            residual = cur
            if layers[il].recurrent:
                cur = self.lightning_attention(il, cur)
            else:
                cur = g.attention(il, cur)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                residual = ctx.get_rows(residual, out_ids)
            ffn_inp = ctx.add(cur, ctx.scale(residual, res_scale))
            cur = g.norm(ffn_inp, w(il, "ffn_norm.weight"))
            residual = cur
            cur = g.moe_ffn(il, cur, _GATING_SOFTMAX, norm_w=True, w_scale=w_scale)
            inpL = ctx.add(cur, ctx.scale(residual, res_scale))
        return inpL

    # --- Kimi-K3 --------------------------------------------------------------------------
    def _k3_situ(self, gate: Any, up: Any) -> Any:
        """``kimi_k3_situ``: ``beta tanh(gate / beta) sigmoid(gate)`` times ``up`` (through
        ``lb tanh(up / lb)`` when ``situ_linear_beta`` > 0)."""
        ctx, keys, arch = self.ctx, self.m.keys, self.hp.arch
        beta = keys.f32(f"{arch}.activation.situ_beta")
        lb = keys.f32(f"{arch}.activation.situ_linear_beta")
        act = ctx.scale(ctx.tanh(ctx.scale(gate, f32_div(1.0, beta))), beta)
        act = ctx.mul(act, ctx.sigmoid(gate))
        if lb > 0.0:
            up = ctx.scale(ctx.tanh(ctx.scale(up, f32_div(1.0, lb))), lb)
        return ctx.mul(act, up)

    def _k3_moe(self, il: int, cur: Any) -> Any:
        """``build_latent_moe`` without the latent projections: ``build_moe_ffn`` (the
        engine's shared ``moe_ffn``) with the router logits of the layer input, the file's
        gating (softmax or sigmoid), the selection bias, optionally normalised
        (``expert_weights_norm``) and scaled weights, SiTU experts; plus the SiTU shared
        expert."""
        ctx, w = self.ctx, self.m._w
        g: Any = self
        keys, arch = self.m.keys, self.hp.arch
        gating = int(keys.f32(f"{arch}.expert_gating_func"))
        if gating not in (_GATING_SOFTMAX, _GATING_SIGMOID):
            raise UnsupportedError(f"{self.m.path}: {arch}.expert_gating_func {gating}")
        moe_out = g.moe_ffn(
            il, cur, gating, norm_w=keys.bool_(f"{arch}.expert_weights_norm"),
            w_scale=keys.f32(f"{arch}.expert_weights_scale", 0.0), act=self._k3_situ,
        )  # fmt: skip
        if w(il, "ffn_gate_shexp.weight", required=False) is not None:
            sh = self._k3_situ(ctx.mul_mat(w(il, "ffn_gate_shexp.weight"), cur),
                               ctx.mul_mat(w(il, "ffn_up_shexp.weight"), cur))  # fmt: skip
            moe_out = ctx.add(moe_out, ctx.mul_mat(w(il, "ffn_down_shexp.weight"), sh))
        return moe_out

    def _k3_refuse(self) -> None:
        """Kimi-K3 variants not built: attention residuals (``attn_res.block_size`` > 0),
        the latent MoE projections, the KDA gate lower bound, Q LoRA, MHA-cache MLA."""
        arch = self.hp.arch
        if self.m.keys.f32(f"{arch}.attn_res.block_size", 0.0):
            raise UnsupportedError(
                f"{self.m.path}: {arch}.attn_res.block_size (attention residuals)"
            )
        if self.m.keys.fields.get(f"{arch}.kda.gate_lower_bound") is not None:
            raise UnsupportedError(f"{self.m.path}: {arch}.kda.gate_lower_bound (sigmoid KDA gate)")
        self._rwkv_refuse(
            ["ffn_routed_down.weight", "ffn_routed_up.weight", "attn_q_a.weight",
             "attn_kv_b.weight", "attn_qkv.weight"]
        )  # fmt: skip

    def kimi_k3(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_kimi_k3::graph`` (no attention residuals) up to the output norm:
        KDA (with rollback planes) or gated MLA mixer, residual, RMS norm, SiTU FFN (the
        leading dense layers) or SiTU MoE with a shared expert, residual; the output rows
        are taken after the last layer."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        if not self.m.hp_file.is_mla:
            raise UnsupportedError(f"{self.m.path}: kimi-k3 without MLA (an MHA KV cache)")
        self._k3_refuse()
        n_dense = int(self.m.keys.f32(f"{hp.arch}.leading_dense_block_count", 0.0))
        layers = self.m.spec.layers
        if any(layer.recurrent for layer in layers):
            g.s_copy()
        inpL = inp
        for il in range(hp.n_layer):
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            g.expand(cur)
            if layers[il].recurrent:
                cur = self.kimi_kda(il, cur, variant="kimi-k3")
            else:
                cur = self.kimi_mla(il, cur, variant="kimi-k3")
            prefix = ctx.add(inpL, cur)
            cur = g.norm(prefix, w(il, "ffn_norm.weight"))
            if il < n_dense:
                gate = ctx.mul_mat(w(il, "ffn_gate.weight"), cur)
                up = ctx.mul_mat(w(il, "ffn_up.weight"), cur)
                cur = ctx.mul_mat(w(il, "ffn_down.weight"), self._k3_situ(gate, up))
            else:
                cur = self._k3_moe(il, cur)
            inpL = ctx.add(prefix, cur)
        return ctx.get_rows(inpL, out_ids)

    # --- BailingMoE-3 -----------------------------------------------------------------------
    def bailingmoe3(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_bailingmoe3::graph`` (NextN layers not run, as the reference's main
        pass) up to the output norm: KDA (sigmoid-bounded decay, rollback planes) or MLA
        with RoPE and a per-head gate over a K-only cache, residual, RMS norm, dense SwiGLU
        (the leading layers) or routed MoE plus the shared expert, residual; the output
        rows are taken after the last layer (the engine's output norm is per row)."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        keys, arch = self.m.keys, hp.arch
        if not self.m.hp_file.is_mla:
            raise UnsupportedError(f"{self.m.path}: bailingmoe3 without MLA (an MHA KV cache)")
        if keys.fields.get(f"{arch}.rope.dimension_sections") is not None:
            raise UnsupportedError(f"{self.m.path}: {arch}.rope.dimension_sections (M-RoPE)")
        self._rwkv_refuse(["attn_q_a.weight", "attn_kv_b.weight", "attn_qkv.weight"])
        n_dense = int(keys.f32(f"{arch}.leading_dense_block_count", 0.0))
        gating = int(keys.f32(f"{arch}.expert_gating_func"))
        norm_w = keys.bool_(f"{arch}.expert_weights_norm")
        w_scale = keys.f32(f"{arch}.expert_weights_scale", 0.0)
        layers = self.m.spec.layers
        if any(layers[il].recurrent for il in range(hp.n_layer)):
            g.s_copy()
        inpL = inp
        for il in range(hp.n_layer):
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            if layers[il].recurrent:
                cur = self.kimi_kda(il, cur, variant="bailingmoe3")
            else:
                cur = self.kimi_mla(il, cur, variant="bailingmoe3")
            ffn_inp = ctx.add(cur, inpL)
            cur = g.norm(ffn_inp, w(il, "ffn_norm.weight"))
            if il < n_dense:
                cur = g.ffn(il, cur)
            else:
                moe = g.moe_ffn(il, cur, gating, norm_w=norm_w, w_scale=w_scale)
                cur = ctx.add(moe, g.swiglu_ffn(il, cur, "_shexp"))
            inpL = ctx.add(cur, ffn_inp)
        return ctx.get_rows(inpL, out_ids)


def _libm_f32(name: str, n_args: int) -> Any:
    """libm's float function ``name`` (``powf``, ``log2f``): the reference computes the
    lightning-attention slopes with them, so their last bits are the same here."""
    fn = getattr(ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6"), name)
    fn.argtypes = [ctypes.c_float] * n_args
    fn.restype = ctypes.c_float
    return fn


ARCH_GRAPHS: dict[str, ArchGraph] = {
    "bailingmoe3": ArchGraph(RWKVGraph.bailingmoe3),
    "kimi-k3": ArchGraph(RWKVGraph.kimi_k3),
    "minimax-01": ArchGraph(RWKVGraph.minimax_01),
    "kimi-linear": ArchGraph(RWKVGraph.kimi_linear),
    "plamo2": ArchGraph(RWKVGraph.plamo2),
    "rwkv6": ArchGraph(RWKVGraph.rwkv6, output_norm=None),
    "rwkv7": ArchGraph(RWKVGraph.rwkv7, output_norm=None),
    "rwkv6qwen2": ArchGraph(RWKVGraph.rwkv6qwen2, output_norm=None),
    "arwkv7": ArchGraph(RWKVGraph.arwkv7, output_norm=None),
}
