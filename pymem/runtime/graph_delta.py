"""Gated delta-net hybrids: Qwen3.5 (qwen35, qwen35moe) and Qwen3-Next (qwen3next).

A mixin of the engine's graph builder (``pymem.runtime.gguf_llama._Graph``): methods
here use its context (``self.ctx``), hyper-parameters (``self.hp``), weights
(``self.m._w``), inputs and shared blocks (``norm``, ``attn_inputs``, ``attn_mha``,
``build_rs``, ...). :data:`ARCH_GRAPHS` registers the architectures built here.

The reference builders (vendor/llama.cpp/src/models):

* ``delta-net-base.cpp``: ``build_conv_state`` (conv state R through ``build_rs``, the
  last ``d_conv - 1`` columns of [state | Q K V] written back, with ``n_rs_seq`` one
  more column set per rollback plane) and ``build_recurrent_attn``. The reference's
  context sets ``fused_gdn_ar`` and ``fused_gdn_ch`` (``llama_context``: always on, never
  probed), so every ubatch, one token or many, goes through the fused
  ``ggml_gated_delta_net`` (K = 1, or ``n_rs_seq + 1`` snapshots with rollback); the
  chunked and autoregressive builders are never taken and are not built here;
* ``qwen35.cpp`` / ``qwen35moe.cpp``: separate beta / alpha projections, no K-head
  repeat (the fused op broadcasts K heads over V heads), gated attention (Q projected
  with an output gate, Q/K RMS norms) with interleaved M-RoPE (``ggml_rope_multi``,
  4 positions per token: the text position three times and 0), post-attention norm,
  dense SwiGLU (qwen35) or MoE with a gated shared expert (qwen35moe);
* ``qwen3next.cpp``: one ``ssm_ba`` projection split per K head, Q and K repeated
  per K head to the V heads (``ggml_repeat_4d``, interleaved), gated attention with
  NEOX RoPE, MoE with a gated shared expert in every layer;
* ``llama-graph.cpp`` ``build_moe_ffn``: softmax gating, top-k by ``argsort``,
  weights normalised over the chosen experts, ``mul_mat_id`` per expert, the expert
  outputs summed in order.

All three take the output rows after the output norm (``embeddings_nextn_masked`` is
off): the last layer runs over every token. The engine norms what ``build`` returns,
so ``build`` returns the output rows of the last layer's result: RMS norm is per row,
so the rows are the reference's bit for bit. MTP / NextN layers are not run in the main
pass (as the reference); fused attention QKV, biases and LoRA are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import pymem.ggml as gg
from pymem.batch import GGML_MROPE_SECTIONS
from pymem.errors import ConfigError
from pymem.runtime.arch_graph import ArchGraph, f32_div
from pymem.runtime.graph_attention import GATING_SOFTMAX

F32 = 4  # bytes per float32


class DeltaNetGraph:
    """Graph builders of this family (mixed into the engine's graph builder)."""

    # provided by the engine's graph builder (pymem.runtime.gguf_llama._Graph)
    ctx: Any
    hp: Any
    m: Any
    ubatch: Any
    inputs: Any
    refuse_tensors: Any

    # --- inputs ---------------------------------------------------------------------------
    def gdn_inp_pos(self) -> Any:
        """``build_inp_pos`` with 4 positions per token (M-RoPE): for token input the
        reference writes each text position three times, then 0 (section-major).

        E.g. positions [5, 6] -> [5, 6, 5, 6, 5, 6, 0, 0].
        """
        g: Any = self
        if getattr(self, "_gdn_inp_pos", None) is None:
            pos = self.ubatch.pos0.astype(np.int32)
            values = np.concatenate([pos, pos, pos, np.zeros_like(pos)])
            self._gdn_inp_pos = g.input("i32", (values.size,), values, "inp_pos")
        return self._gdn_inp_pos

    def _gdn_rope_sections(self) -> list[int]:
        key = f"{self.hp.arch}.rope.dimension_sections"
        field = self.m.keys.fields.get(key)
        if field is None:
            raise ConfigError(f"{self.m.path}: key not found in model: {key}")
        sections = [int(v) for v in field.contents()]
        if not 1 <= len(sections) <= GGML_MROPE_SECTIONS:
            raise ConfigError(f"{self.m.path}: key {key} has {len(sections)} entries, expected 4")
        return sections + [0] * (GGML_MROPE_SECTIONS - len(sections))

    # --- gated attention ------------------------------------------------------------------
    def gdn_attention(self, il: int, cur: Any, mrope: bool) -> Any:
        """``build_layer_attn`` of qwen35 (``mrope``) / qwen3next: Q with its output gate
        from one projection, Q/K RMS norms, RoPE, ``build_attn``, ``sigmoid(gate)``, ``wo``."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        n_tokens = self.ubatch.n_tokens
        hd, nh, nkv = hp.n_embd_head, hp.n_head[il], hp.n_head_kv[il]
        q_full = ctx.mul_mat(w(il, "attn_q.weight"), cur)  # [2 * hd * nh, n_tokens]
        k = ctx.mul_mat(w(il, "attn_k.weight"), cur)
        v = ctx.mul_mat(w(il, "attn_v.weight"), cur)
        # per head: hd query values, then hd gate values
        if mrope:
            nb1, nb2 = 2 * hd * F32, 2 * hd * nh * F32
            q = ctx.view_3d(q_full, hd, nh, n_tokens, nb1, nb2, 0)
            q = g.norm(q, w(il, "attn_q_norm.weight"))
            k = g.norm(ctx.reshape_3d(k, hd, nkv, n_tokens), w(il, "attn_k_norm.weight"))
            gate = ctx.cont_2d(ctx.view_3d(q_full, hd, nh, n_tokens, nb1, nb2, hd * F32),
                               hd * nh, n_tokens)  # fmt: skip
            v = ctx.reshape_3d(v, hd, nkv, n_tokens)
            q = self._gdn_rope_multi(q, il)
            k = self._gdn_rope_multi(k, il)
        else:
            q_full = ctx.reshape_4d(q_full, 2 * hd, nh, n_tokens, 1)
            nb = (q_full.nb[1], q_full.nb[2], q_full.nb[3])
            q = ctx.view_4d(q_full, hd, nh, n_tokens, 1, *nb, 0)
            gate = ctx.view_4d(q_full, hd, nh, n_tokens, 1, *nb, hd * F32)
            k = ctx.reshape_3d(k, hd, nkv, n_tokens)
            v = ctx.reshape_3d(v, hd, nkv, n_tokens)
            q = g.norm(q, w(il, "attn_q_norm.weight"))
            k = g.norm(k, w(il, "attn_k_norm.weight"))
            rope = self.m.spec.layers[il].rope
            q = g.rope(q, rope)
            k = g.rope(k, rope)

        part = self.inputs.attn_part(il)
        ai = self.inputs.attn[part]
        t_mask, t_kidx, t_vidx = g.attn_inputs(part)
        # build_attn over a KV cache expands K last (rope fusion), then the stores
        g.expand(q, v, k)
        g.expand(ai.cpy_k(ctx, k, t_kidx, il))
        g.expand(ai.cpy_v(ctx, v, t_vidx, il))
        cur = g.attn_mha(q, ai.get_k(ctx, il), ai.get_v(ctx, il), t_mask, hp.kq_scale)
        g.expand(cur)
        if not mrope:
            gate = ctx.cont_2d(gate, hd * nh, n_tokens)
        cur = ctx.mul(cur, ctx.sigmoid(gate))
        return ctx.mul_mat(w(il, "attn_output.weight"), cur)

    def _gdn_rope_multi(self, t: Any, il: int) -> Any:
        rope = self.m.spec.layers[il].rope
        if rope is None:
            raise ConfigError(f"layer {il}: an M-RoPE attention layer without RoPE parameters")
        sections = gg.ffi.new(f"int[{GGML_MROPE_SECTIONS}]", self._gdn_rope_sections())
        return self.ctx.rope_multi(
            t,
            self.gdn_inp_pos(),
            gg.ffi.NULL,
            rope.n_rot,
            sections,
            int(rope.rope_type),
            rope.n_ctx_orig,
            rope.freq_base,
            rope.freq_scale,
            rope.ext_factor,
            rope.attn_factor,
            rope.beta_fast,
            rope.beta_slow,
        )

    # --- the gated delta-net layer ----------------------------------------------------------
    def gdn_layer(self, il: int, cur: Any, qwen35: bool) -> Any:
        """``build_layer_attn_linear`` of qwen35 (``qwen35``) / qwen3next.

        Conv state R: the last ``d_conv - 1`` columns of [state | Q K V] of each ubatch
        sequence go to rows ``[head, head + n_seqs)`` (plane ``slot`` with rollback: the
        columns ending ``slot`` tokens before the last). SSM state S: the fused op's final
        state (and with rollback its snapshots 1..n_rs_seq tokens back, planes 1..) goes
        to the same rows.
        """
        ctx, ub = self.ctx, self.ubatch
        g: Any = self
        rs = g._recr()
        w = self.m._w
        hpf = self.m.hp_file
        n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        if not ub.equal_seqs or n_seqs * n_seq_tokens != ub.n_tokens:
            raise ConfigError(
                "ubatch: gated delta-net layers need an equal-sequence split (split_equal or "
                "split_seq)"
            )
        d_conv, d_inner = hpf.ssm_d_conv, hpf.ssm_d_inner
        head_k_dim, n_k_heads, n_v_heads = hpf.ssm_d_state, hpf.ssm_n_group, hpf.ssm_dt_rank
        if n_k_heads <= 0 or n_v_heads <= 0 or d_inner % n_v_heads or n_v_heads % n_k_heads:
            raise ConfigError(
                f"{self.m.path}: ssm.inner_size {d_inner}, ssm.time_step_rank {n_v_heads} and "
                f"ssm.group_count {n_k_heads} do not make V heads over K heads"
            )
        head_v_dim = d_inner // n_v_heads
        if head_v_dim != head_k_dim:
            raise ConfigError(
                f"{self.m.path}: V head size {head_v_dim} != ssm.state_size {head_k_dim}"
            )
        conv_dim = d_inner + 2 * n_k_heads * head_k_dim
        n_embd_r, n_embd_s = (d_conv - 1) * conv_dim, head_k_dim * d_inner
        r_all, s_all = rs.r_tensor(il).ptr, rs.s_tensor(il).ptr

        # projections: qkv_mixed [conv_dim, n_seq_tokens, n_seqs], z, beta, gate
        if qwen35 or w(il, "attn_qkv.weight", required=False) is not None:
            qkv = ctx.mul_mat(w(il, "attn_qkv.weight"), cur)
            qkv = ctx.reshape_3d(qkv, qkv.ne[0], n_seq_tokens, n_seqs)
            z = ctx.mul_mat(w(il, "attn_gate.weight"), cur)
        else:
            qkv, z = self._gdn_qkvz_legacy(il, cur, head_k_dim, n_k_heads, head_v_dim, n_v_heads)
        if qwen35:
            beta = ctx.mul_mat(w(il, "ssm_beta.weight"), cur)
            beta = ctx.sigmoid(ctx.reshape_4d(beta, 1, n_v_heads, n_seq_tokens, n_seqs))
            alpha = ctx.mul_mat(w(il, "ssm_alpha.weight"), cur)
            alpha = ctx.reshape_3d(alpha, n_v_heads, n_seq_tokens, n_seqs)
        else:
            # per K head: n_v_heads / n_k_heads betas, then as many alphas
            per = n_v_heads // n_k_heads
            ba = ctx.mul_mat(w(il, "ssm_ba.weight"), cur)
            ba = ctx.reshape_4d(ba, 2 * per, n_k_heads, n_seq_tokens, n_seqs)
            nb = (ba.nb[1], ba.nb[2], ba.nb[3])
            b = ctx.view_4d(ba, per, n_k_heads, n_seq_tokens, n_seqs, *nb, 0)
            a = ctx.view_4d(ba, per, n_k_heads, n_seq_tokens, n_seqs, *nb, per * F32)
            beta = ctx.sigmoid(ctx.cont(b))
            alpha = ctx.cont_3d(a, n_v_heads, n_seq_tokens, n_seqs)
        gate = ctx.softplus(ctx.add(alpha, w(il, "ssm_dt.bias")))
        gate = ctx.mul(gate, w(il, "ssm_a"))  # -exp(A_log) * softplus
        if not qwen35:
            beta = ctx.reshape_4d(beta, 1, n_v_heads, n_seq_tokens, n_seqs)
        gate = ctx.reshape_4d(gate, 1, n_v_heads, n_seq_tokens, n_seqs)

        # build_conv_state
        conv = g.build_rs(r_all, n_embd_r, ctx.get_rows)
        conv = ctx.reshape_3d(conv, d_conv - 1, conv_dim, n_seqs)
        conv_in = ctx.concat(conv, ctx.transpose(qkv), 0)
        row_size = int(gg.lib.ggml_row_size(r_all.type, n_embd_r))
        big_k = rs.n_rs_seq + 1 if rs.n_rs_seq > 0 else 1
        # plane `slot` holds the columns ending `slot` tokens before the last (clamped to
        # the first column), written from the last plane down as the reference does.
        # E.g. d_conv 4, 1 token, K 3: planes 2, 1, 0 get columns [0, 3), [0, 3), [1, 4)
        for slot in reversed(range(big_k)):
            s_idx = max(0, n_seq_tokens - slot)
            last = ctx.view_3d(conv_in, d_conv - 1, conv_dim, n_seqs, conv_in.nb[1],
                               conv_in.nb[2], s_idx * int(conv_in.nb[0]))  # fmt: skip
            dst = ctx.view_2d(r_all, n_embd_r, n_seqs, r_all.nb[1],
                              (slot * rs.size + rs.head) * row_size)  # fmt: skip
            g.expand(ctx.cpy(last, dst))

        state = g.build_rs(s_all, n_embd_s, ctx.get_rows)
        state = ctx.reshape_4d(state, head_v_dim, head_v_dim, n_v_heads, n_seqs)

        x = ctx.silu(ctx.ssm_conv(conv_in, w(il, "ssm_conv1d.weight")))
        nb1 = int(x.nb[1])
        nb2 = nb1 * n_seq_tokens
        q = ctx.view_4d(x, head_k_dim, n_k_heads, n_seq_tokens, n_seqs, head_k_dim * F32,
                        nb1, nb2, 0)  # fmt: skip
        k = ctx.view_4d(x, head_k_dim, n_k_heads, n_seq_tokens, n_seqs, head_k_dim * F32,
                        nb1, nb2, head_k_dim * n_k_heads * F32)  # fmt: skip
        v = ctx.view_4d(x, head_v_dim, n_v_heads, n_seq_tokens, n_seqs, head_v_dim * F32,
                        nb1, nb2, 2 * head_k_dim * n_k_heads * F32)  # fmt: skip
        q = self._gdn_l2_norm(q)
        k = self._gdn_l2_norm(k)
        if not qwen35 and n_k_heads != n_v_heads:
            # repeat interleave: K head h serves V heads [h * r, (h + 1) * r)
            r = n_v_heads // n_k_heads
            n = n_seq_tokens * n_seqs
            q = ctx.repeat_4d(ctx.reshape_4d(q, head_k_dim, 1, n_k_heads, n), head_k_dim, r,
                              n_k_heads, n)  # fmt: skip
            k = ctx.repeat_4d(ctx.reshape_4d(k, head_k_dim, 1, n_k_heads, n), head_k_dim, r,
                              n_k_heads, n)  # fmt: skip
            q = ctx.reshape_4d(q, head_k_dim, n_v_heads, n_seq_tokens, n_seqs)
            k = ctx.reshape_4d(k, head_k_dim, n_v_heads, n_seq_tokens, n_seqs)

        output = self._gdn_recurrent_attn(rs, s_all, q, k, v, gate, beta, state, n_embd_s)

        z = ctx.reshape_4d(z, head_v_dim, n_v_heads, n_seq_tokens, n_seqs)
        out = ctx.mul(g.norm(output, w(il, "ssm_norm.weight")), ctx.silu(z))
        out = ctx.reshape_3d(out, head_v_dim * n_v_heads, n_seq_tokens, n_seqs)
        out = ctx.mul_mat(w(il, "ssm_out.weight"), out)
        return ctx.reshape_2d(out, self.hp.n_embd, n_seq_tokens * n_seqs)

    def _gdn_recurrent_attn(
        self, rs: Any, s_all: Any, q: Any, k: Any, v: Any, gate: Any, beta: Any, state: Any,
        n_embd_s: int,
    ) -> Any:  # fmt: skip
        """``build_recurrent_attn``: the fused op's output rows, and its K state snapshots
        (slot 0 the final state) stored into planes 0 .. min(n_seq_tokens, K) - 1."""
        ctx = self.ctx
        g: Any = self
        s_v, h_v, n_seqs = int(state.ne[0]), int(state.ne[2]), int(state.ne[3])
        n_seq_tokens = int(q.ne[2])
        big_k = rs.n_rs_seq + 1 if rs.n_rs_seq > 0 else 1
        out = ctx.gated_delta_net(q, k, v, gate, beta, state, big_k)
        # out = [S_v x H_v x n_seq_tokens x n_seqs scores | K x n_seqs states]
        output = ctx.view_4d(out, s_v, h_v, n_seq_tokens, n_seqs, s_v * F32, s_v * h_v * F32,
                             s_v * h_v * n_seq_tokens * F32, 0)  # fmt: skip
        score_bytes = s_v * h_v * n_seq_tokens * n_seqs * F32
        s_row = int(gg.lib.ggml_element_size(s_all)) * n_embd_s
        if rs.n_rs_seq == 0:
            new_state = ctx.view_4d(out, s_v, s_v, h_v, n_seqs, s_v * F32, s_v * s_v * F32,
                                    s_v * s_v * h_v * F32, score_bytes)  # fmt: skip
            dst = ctx.view_2d(s_all, n_embd_s, n_seqs, s_all.nb[1], rs.head * s_row)
            g.expand(ctx.cpy(new_state, dst))
            return output
        d = s_v * s_v * h_v
        n_written = min(n_seq_tokens, big_k)
        src = ctx.view_3d(out, d, n_seqs, n_written, d * F32, d * n_seqs * F32, score_bytes)
        dst = ctx.view_3d(s_all, d, n_seqs, n_written, s_all.nb[1], rs.size * s_row,
                          rs.head * s_row)  # fmt: skip
        g.expand(ctx.cpy(src, dst))
        return output

    def _gdn_l2_norm(self, x: Any) -> Any:
        """``build_gdn_l2_norm``: ``rms_norm(x, eps / n) / sqrt(n)`` over rows of ``n``."""
        n = float(x.ne[0])
        eps = f32_div(self.hp.f_norm_rms_eps, n)
        return self.ctx.scale(
            self.ctx.rms_norm(x, eps), f32_div(1.0, float(np.sqrt(np.float32(n))))
        )

    def _gdn_qkvz_legacy(
        self, il: int, cur: Any, head_k_dim: int, n_k_heads: int, head_v_dim: int, n_v_heads: int
    ) -> tuple[Any, Any]:
        """qwen3next's legacy ``ssm_in``: per K head [q | k | v | z], regrouped into
        qkv_mixed = [all q | all k | all v] and a contiguous z."""
        ctx, ub = self.ctx, self.ubatch
        n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        v_per = head_v_dim * n_v_heads // n_k_heads
        mixed = ctx.mul_mat(self.m._w(il, "ssm_in.weight"), cur)
        mixed = ctx.reshape_4d(mixed, 2 * head_k_dim + 2 * v_per, n_k_heads, n_seq_tokens, n_seqs)
        nb = (mixed.nb[1], mixed.nb[2], mixed.nb[3])
        sizes = (head_k_dim, head_k_dim, v_per, v_per)
        offs = np.concatenate([[0], np.cumsum(sizes)])  # E.g. [0, 4, 8, 16, 24]
        parts = [
            ctx.view_4d(mixed, n, n_k_heads, n_seq_tokens, n_seqs, *nb, int(o) * F32)
            for n, o in zip(sizes, offs)
        ]
        z = ctx.cont(parts[3])
        q = ctx.cont_3d(parts[0], head_k_dim * n_k_heads, n_seq_tokens, n_seqs)
        k = ctx.cont_3d(parts[1], head_k_dim * n_k_heads, n_seq_tokens, n_seqs)
        v = ctx.cont_3d(parts[2], head_v_dim * n_v_heads, n_seq_tokens, n_seqs)
        return ctx.concat(ctx.concat(q, k, 0), v, 0), z

    # --- feed-forward -----------------------------------------------------------------------
    def gdn_moe_ffn(self, il: int, cur: Any) -> Any:
        """``build_moe_ffn`` (softmax gating, normalised top-k weights, SiLU experts; the
        engine's shared block ``graph_attention.AttentionGraph.moe_ffn``), plus the shared
        expert gated by ``sigmoid(ffn_gate_inp_shexp . x)`` when present."""
        ctx, w = self.ctx, self.m._w
        g: Any = self
        # the loaders read no expert_weights_scale: unscaled
        moe_out = g.moe_ffn(il, cur, GATING_SOFTMAX, norm_w=True, exp_probs_b=False)
        if w(il, "ffn_up_shexp.weight", required=False) is None:
            return moe_out
        shexp = g.swiglu_ffn(il, cur, "_shexp")
        shared_gate = ctx.sigmoid(ctx.mul_mat(w(il, "ffn_gate_inp_shexp.weight"), cur))
        return ctx.add(moe_out, ctx.mul(shexp, shared_gate))

    # --- architectures ------------------------------------------------------------------
    def _gdn_refuse_unbuilt(self, il: int, recurrent: bool, moe: bool) -> None:
        names = ["ffn_up.bias", "ffn_gate.bias", "ffn_down.bias"]
        if not recurrent:
            names += ["attn_qkv.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias",
                      "attn_output.bias"]  # fmt: skip
        self.refuse_tensors(il, names)
        has_moe = self.m._w(il, "ffn_gate_inp.weight", required=False) is not None
        if has_moe != moe:
            raise ConfigError(
                f"layer {il}: {self.hp.arch} expects a {'MoE' if moe else 'dense'} feed-forward"
            )

    def _gdn_model(self, inp: Any, out_ids: Any, qwen35: bool, moe: bool) -> Any:
        """The qwen35 / qwen35moe / qwen3next trunk: norm, mixer (delta-net or gated
        attention), residual, post-attention norm, FFN, residual; the output rows of the
        last layer's result (see the module docstring)."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        recurrent = self.m.spec.layers
        for il in range(hp.n_layer):
            self._gdn_refuse_unbuilt(il, recurrent[il].recurrent, moe)
        if any(layer.recurrent for layer in recurrent):
            g.s_copy()
        inpL = inp
        for il in range(hp.n_layer):
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            g.expand(cur)
            if recurrent[il].recurrent:
                cur = self.gdn_layer(il, cur, qwen35)
            else:
                cur = self.gdn_attention(il, cur, mrope=qwen35)
            cur = ctx.add(cur, inpL)
            ffn_residual = cur
            cur = g.norm(cur, w(il, "post_attention_norm.weight"))
            cur = self.gdn_moe_ffn(il, cur) if moe else g.swiglu_ffn(il, cur)
            inpL = ctx.add(cur, ffn_residual)
        return ctx.get_rows(inpL, out_ids)

    def qwen35(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_qwen35::graph`` (dense SwiGLU FFN) up to the output norm."""
        return self._gdn_model(inp, out_ids, qwen35=True, moe=False)

    def qwen35moe(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_qwen35moe::graph`` (MoE FFN, gated shared expert)."""
        return self._gdn_model(inp, out_ids, qwen35=True, moe=True)

    def qwen3next(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_qwen3next::graph`` (MoE FFN in every layer, gated shared expert)."""
        return self._gdn_model(inp, out_ids, qwen35=False, moe=True)


ARCH_GRAPHS: dict[str, ArchGraph] = {
    "qwen35": ArchGraph(DeltaNetGraph.qwen35),
    "qwen35moe": ArchGraph(DeltaNetGraph.qwen35moe),
    "qwen3next": ArchGraph(DeltaNetGraph.qwen3next),
}
