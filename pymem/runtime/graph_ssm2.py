"""Mamba-2 layers and the hybrids built on them: Mamba-2, Granite-4 (granitehybrid), Falcon-H1, Nemotron-H.

A mixin of the engine's graph builder (``pymem.runtime.gguf_llama._Graph``): methods
here use its context (``self.ctx``), hyper-parameters (``self.hp``), weights
(``self.m._w``), inputs and shared blocks (``norm``, ``ffn``, ``attention``,
``build_rs``, ...). :data:`ARCH_GRAPHS` registers the architectures built here.

The reference builders (vendor/llama.cpp/src/models):

* ``mamba-base.cpp`` ``build_mamba2_layer``: one projection into z | xBC | dt, a causal
  conv over x, B and C (conv state R, with ``n_rs_seq`` rollback planes), the selective
  scan over heads of ``d_inner / n_head`` channels with ``n_group`` groups of B and C
  (SSM state S, planes likewise), the D skip, the gate ``silu(z) * y`` and a grouped
  RMS norm;
* ``mamba2.cpp`` (``llama_model_mamba::graph`` with the Mamba-2 layer): every layer recurs;
* ``granite-hybrid.cpp``: Mamba-2 or attention layers (no KV heads = recurrent), the
  embedding, residual, attention and logit scales of Granite, dense SiLU FFN;
* ``falcon-h1.cpp``: attention and Mamba-2 side by side in every layer, their sum is the
  residual branch, then a dense SiLU FFN (the µP multipliers are folded into the
  weights by the converter; this graph has none);
* ``nemotron-h.cpp``: each layer is one of Mamba-2, attention (no RoPE) or a ReLU²
  FFN (no gate); the last layer runs over every token and the output rows are taken
  after the output norm.
"""

from __future__ import annotations

from typing import Any

import pymem.ggml as gg
from pymem.errors import ConfigError, UnsupportedError
from pymem.runtime.arch_graph import ArchGraph, f32, f32_div

F32 = 4  # bytes per float32


class SSM2Graph:
    """Graph builders of this family (mixed into the engine's graph builder)."""

    # provided by the engine's graph builder (pymem.runtime.gguf_llama._Graph)
    ctx: Any
    hp: Any
    m: Any
    ubatch: Any
    refuse_tensors: Any

    # --- the Mamba-2 mixer ------------------------------------------------------------
    def mamba2_layer(self, il: int, cur: Any) -> Any:
        """``llm_build_mamba_base::build_mamba2_layer``.

        The conv state (the last ``d_conv - 1`` columns of x | B | C) and the SSM state of
        each ubatch sequence go to rows ``[head, head + n_seqs)``; with ``n_rs_seq`` > 0
        the states 1..n_rs_seq tokens back go to the same rows of planes 1.. (the scan
        returns them after the final states).
        """
        ctx, ub = self.ctx, self.ubatch
        g: Any = self
        rs = g._recr()
        w = self.m._w
        hp_file = self.m.hp_file
        n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        if not ub.equal_seqs or n_seqs * n_seq_tokens != ub.n_tokens:
            raise ConfigError(
                "ubatch: Mamba-2 layers need an equal-sequence split (split_equal or split_seq)"
            )
        d_conv, d_inner, d_state = hp_file.ssm_d_conv, hp_file.ssm_d_inner, hp_file.ssm_d_state
        n_head, n_group = hp_file.ssm_dt_rank, hp_file.ssm_n_group
        if n_head <= 0 or n_group <= 0 or d_inner % n_head or d_inner % n_group:
            raise ConfigError(
                f"{self.m.path}: ssm.inner_size {d_inner} must split into ssm.time_step_rank "
                f"{n_head} heads and ssm.group_count {n_group} groups"
            )
        head_dim = d_inner // n_head
        conv_dim = d_inner + 2 * n_group * d_state
        # K: the final state plus n_rs_seq rollback snapshots
        big_k = rs.n_rs_seq + 1 if rs.n_rs_seq > 0 else 1
        n_written = min(n_seq_tokens, big_k)
        r_all, s_all = rs.r_tensor(il).ptr, rs.s_tensor(il).ptr

        conv = g.build_rs(r_all, (d_conv - 1) * conv_dim, ctx.get_rows)
        conv = ctx.reshape_3d(conv, d_conv - 1, conv_dim, n_seqs)

        # {n_embd, n_tokens} -> {d_in_proj, n_seq_tokens, n_seqs} = z | xBC | dt
        zxbcdt = ctx.mul_mat(w(il, "ssm_in.weight"), cur)
        zxbcdt = ctx.reshape_3d(zxbcdt, zxbcdt.ne[0], n_seq_tokens, n_seqs)
        nb1, nb2 = zxbcdt.nb[1], zxbcdt.nb[2]
        z = ctx.view_4d(zxbcdt, head_dim, n_head, n_seq_tokens, n_seqs, head_dim * F32, nb1, nb2, 0)
        xbc = ctx.view_3d(zxbcdt, conv_dim, n_seq_tokens, n_seqs, nb1, nb2, d_inner * F32)
        dt = ctx.view_3d(zxbcdt, n_head, n_seq_tokens, n_seqs, nb1, nb2,
                         (d_inner + conv_dim) * F32)  # fmt: skip

        # conv over [d_conv - 1 state columns | the tokens]; the d_conv - 1 columns ending
        # `slot` tokens before the last are plane `slot`'s state
        conv_x = ctx.concat(conv, ctx.transpose(xbc), 0)
        row_count = (d_conv - 1) * conv_dim
        row_size = int(gg.lib.ggml_row_size(r_all.type, row_count))
        for slot in range(n_written):
            last_conv = ctx.view_3d(conv_x, d_conv - 1, conv_dim, n_seqs, conv_x.nb[1],
                                    conv_x.nb[2], (n_seq_tokens - slot) * int(conv_x.nb[0]))  # fmt: skip
            dst = ctx.view_2d(r_all, row_count, n_seqs, r_all.nb[1],
                              (slot * rs.size + rs.head) * row_size)  # fmt: skip
            g.expand(ctx.cpy(last_conv, dst))
        xbc = ctx.ssm_conv(conv_x, w(il, "ssm_conv1d.weight"))
        xbc = ctx.add(xbc, w(il, "ssm_conv1d.bias"))
        xbc = ctx.silu(xbc)

        # x, B, C: the "V, K, Q" of the scan
        xb1, xb2 = xbc.nb[1], xbc.nb[2]
        x = ctx.view_4d(xbc, head_dim, n_head, n_seq_tokens, n_seqs, head_dim * F32, xb1, xb2, 0)
        b = ctx.view_4d(xbc, d_state, n_group, n_seq_tokens, n_seqs, d_state * F32, xb1, xb2,
                        d_inner * F32)  # fmt: skip
        c = ctx.view_4d(xbc, d_state, n_group, n_seq_tokens, n_seqs, d_state * F32, xb1, xb2,
                        (d_inner + n_group * d_state) * F32)  # fmt: skip
        dt = ctx.add(ctx.cont(dt), w(il, "ssm_dt.bias"))
        a = w(il, "ssm_a")

        def get_ssm_rows(states: Any, ids: Any) -> Any:
            ssm = ctx.reshape_4d(states, d_state, head_dim, n_head, states.ne[1])
            return ctx.ssm_scan(ssm, x, dt, a, b, c, ids, big_k)

        d = d_state * d_inner
        y_ssm = g.build_rs(s_all, d, get_ssm_rows)
        # y_ssm = [y of every token | n_written planes of n_seqs states]
        s_row = int(gg.lib.ggml_row_size(s_all.type, d))
        y_row = d * F32
        y_bytes = int(gg.lib.ggml_nelements(x)) * F32
        g.expand(
            ctx.cpy(
                ctx.view_3d(y_ssm, d, n_seqs, n_written, y_row, y_row * n_seqs, y_bytes),
                ctx.view_3d(
                    s_all, d, n_seqs, n_written, s_all.nb[1], rs.size * s_row, rs.head * s_row
                ),
            )
        )
        xr = int(x.nb[1])
        y = ctx.view_4d(y_ssm, head_dim, n_head, n_seq_tokens, n_seqs, xr, n_head * xr,
                        n_seq_tokens * n_head * xr, 0)  # fmt: skip
        y = ctx.add(y, ctx.mul(x, w(il, "ssm_d")))
        y = ctx.swiglu_split(ctx.cont(z), y)
        ssm_norm = w(il, "ssm_norm.weight", required=False)
        if ssm_norm is not None:
            # grouped RMS norm: one norm per group of d_inner / n_group channels
            y = ctx.reshape_4d(y, d_inner // n_group, n_group, n_seq_tokens, n_seqs)
            y = g.norm(y, ssm_norm)
        y = ctx.reshape_2d(y, d_inner, n_seq_tokens * n_seqs)
        return ctx.mul_mat(w(il, "ssm_out.weight"), y)

    # --- architectures ------------------------------------------------------------------
    def mamba2(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_mamba::graph`` with Mamba-2 layers, up to the output norm."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        g.s_copy()  # build_rs_inp comes before build_inp_out_ids
        inpL = inp
        for il in range(hp.n_layer):
            cur = g.norm(inpL, self.m._w(il, "attn_norm.weight"))
            cur = self.mamba2_layer(il, cur)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpL = ctx.get_rows(inpL, out_ids)
            inpL = ctx.add(cur, inpL)
        return inpL

    def granitehybrid(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_granite_hybrid::graph`` (dense FFN) up to the output norm.

        Granite's scales: the embeddings times ``embedding_scale``, each residual branch
        (mixer and FFN) times ``residual_scale``, KQ by ``attention.scale`` (a key of 0
        or none: 1/sqrt(n_embd_head)); the logits' ``1 / logit_scale`` is
        :func:`_granite_logits`.
        """
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        keys = self.m.keys
        arch = hp.arch
        embd_scale = keys.f32(f"{arch}.embedding_scale", 0.0)
        residual_scale = keys.f32(f"{arch}.residual_scale", 0.0)
        attn_scale = keys.f32(f"{arch}.attention.scale", 0.0)
        kq_scale = hp.kq_scale if attn_scale == 0.0 else f32(attn_scale)
        for il in range(hp.n_layer):
            self._refuse_unbuilt(il, attention=not self.m.spec.layers[il].recurrent, ffn=True)
        inpL = inp
        if embd_scale != 0.0:
            inpL = ctx.scale(inpL, f32(embd_scale))
            g.expand(inpL)
        for il in range(hp.n_layer):
            inpSA = inpL
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            if self.m.spec.layers[il].recurrent:
                cur = self.mamba2_layer(il, cur)
            else:
                cur = g.attention(il, cur, kq_scale=kq_scale)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpSA = ctx.get_rows(inpSA, out_ids)
            if residual_scale != 0.0:
                cur = ctx.scale(cur, f32(residual_scale))
            ffn_inp = ctx.add(cur, inpSA)
            cur = g.ffn(il, g.norm(ffn_inp, w(il, "ffn_norm.weight")))
            if residual_scale != 0.0:
                cur = ctx.scale(cur, f32(residual_scale))
            inpL = ctx.add(cur, ffn_inp)
        return inpL

    def falcon_h1(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_falcon_h1::graph`` up to the output norm.

        Every layer runs attention (RoPE, no output bias: the reference passes none) and
        the Mamba-2 mixer on the same normed input (the norm is built twice, as the
        reference does); their sum is the residual branch.
        """
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        for il in range(hp.n_layer):
            self._refuse_unbuilt(il, attention=True, ffn=True, wo_b=False)
        inpL = inp
        for il in range(hp.n_layer):
            inpSA = inpL
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            attn_out = g.attention(il, cur)
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            ssm_out = self.mamba2_layer(il, cur)
            cur = ctx.add(attn_out, ssm_out)
            inpSA = ctx.add(cur, inpSA)
            if il == hp.n_layer - 1:
                inpSA = ctx.get_rows(inpSA, out_ids)
            # the FFN norm's tensor name has no ".weight" (tn(LLM_TENSOR_FFN_NORM, il))
            cur = g.ffn(il, g.norm(inpSA, w(il, "ffn_norm")))
            inpL = ctx.add(cur, inpSA)
        return inpL

    def nemotron_h(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_nemotron_h::graph`` (nemotron_h and nemotron_h_moe) through the
        output norm.

        A layer is Mamba-2 (recurrent), attention (KV heads, no FFN; no RoPE), a ReLU²
        FFN (``feed_forward_length`` > 0) or, with a router, :meth:`nemotron_moe_ffn`. With ``embeddings_nextn_masked`` off (the
        context's default) the last layer and the output norm run over every token and
        the output rows are taken after the norm (:data:`ARCH_GRAPHS` registers no
        output norm for the engine to apply).
        """
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        n_ff = self.m.hp_file.n_ff
        kinds = []
        for il in range(hp.n_layer):
            if self.m.spec.layers[il].recurrent:
                kind = "ssm"
            elif n_ff[il] == 0:
                kind = "attn"
            else:
                kind = "ffn"
            self._refuse_unbuilt(il, attention=kind == "attn", ffn=False)
            if kind == "ffn" and w(il, "ffn_gate_inp.weight", required=False) is not None:
                kind = "moe"
            kinds.append(kind)
        inpL = inp
        for il, kind in enumerate(kinds):
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            if kind == "ssm":
                cur = self.mamba2_layer(il, cur)
            elif kind == "attn":
                cur = g.attention(il, cur)
            elif kind == "moe":
                cur = self.nemotron_moe_ffn(il, cur)
            else:
                cur = self.relu_sqr_ffn(il, cur)
            inpL = ctx.add(cur, inpL)
        cur = g.norm(inpL, self.m.weights.get("output_norm.weight"))
        return ctx.get_rows(cur, out_ids)

    def nemotron_moe_ffn(self, il: int, cur: Any) -> Any:
        """Nemotron-H's MoE layer (nemotron_h_moe): router logits from the layer input,
        ``build_moe_ffn`` (sigmoid, ``exp_probs_b`` selection bias, ReLU² experts without
        gate, ``expert_weights_norm`` / ``expert_weights_scale``) over the input or its
        latent (``ffn_latent_down`` / ``ffn_latent_up``), plus the ReLU² shared expert."""
        ctx, w = self.ctx, self.m._w
        g: Any = self
        keys, arch = self.m.keys, self.hp.arch
        self.refuse_tensors(il, ("ffn_up_shexp.scale", "ffn_down_shexp.scale", "ffn_up_shexp.bias",
                                 "ffn_down_shexp.bias"))  # fmt: skip
        latent_down = w(il, "ffn_latent_down.weight", required=False)
        latent = cur if latent_down is None else ctx.mul_mat(latent_down, cur)
        logits = ctx.mul_mat(w(il, "ffn_gate_inp.weight"), cur)
        moe_out = g.moe_ffn(
            il, latent, gating=2, norm_w=keys.bool_(f"{arch}.expert_weights_norm"),
            w_scale=keys.f32(f"{arch}.expert_weights_scale", 0.0), act="relu_sqr",
            logits=logits,
        )  # fmt: skip
        latent_up = w(il, "ffn_latent_up.weight", required=False)
        if latent_up is not None:
            moe_out = ctx.mul_mat(latent_up, moe_out)
        shexp = ctx.mul_mat(w(il, "ffn_up_shexp.weight"), cur)
        shexp = ctx.mul_mat(w(il, "ffn_down_shexp.weight"), ctx.sqr(ctx.relu(shexp)))
        return ctx.add(moe_out, shexp)

    def relu_sqr_ffn(self, il: int, cur: Any) -> Any:
        """``build_ffn(up, no gate, down, LLM_FFN_RELU_SQR)`` with optional up/down biases."""
        ctx, w = self.ctx, self.m._w
        cur = ctx.mul_mat(w(il, "ffn_up.weight"), cur)
        up_b = w(il, "ffn_up.bias", required=False)
        if up_b is not None:
            cur = ctx.add(cur, up_b)
        cur = ctx.sqr(ctx.relu(cur))
        cur = ctx.mul_mat(w(il, "ffn_down.weight"), cur)
        down_b = w(il, "ffn_down.bias", required=False)
        if down_b is not None:
            cur = ctx.add(cur, down_b)
        return cur

    # --- what the shared blocks do not build ---------------------------------------------
    def _refuse_unbuilt(self, il: int, attention: bool, ffn: bool, wo_b: bool = True) -> None:
        """Raise :class:`UnsupportedError` for layer tensors the shared blocks would ignore:
        the engine's ``attention`` builds separate Q/K/V without biases (and RoPE without
        frequency factors), its ``ffn`` a
        dense FFN without biases (MoE layers are not built)."""
        names = (
            ["attn_qkv.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias"] if attention else []
        )
        if attention and wo_b:  # (Falcon-H1's graph ignores the output bias)
            names.append("attn_output.bias")
        if ffn:
            if self.m._w(il, "ffn_gate_inp.weight", required=False) is not None:
                raise UnsupportedError(f"layer {il}: MoE feed-forward is not supported")
            names += ["ffn_up.bias", "ffn_gate.bias", "ffn_down.bias"]
        self.refuse_tensors(il, names, rope_freqs=attention)


def _granite_logits(g: Any, cur: Any) -> Any:
    """Granite divides the logits by ``logit_scale`` (a key of 0 or none: unscaled)."""
    logit_scale = g.m.keys.f32(f"{g.hp.arch}.logit_scale", 0.0)
    if logit_scale == 0.0:
        return cur
    return g.ctx.scale(cur, f32_div(1.0, logit_scale))


ARCH_GRAPHS: dict[str, ArchGraph] = {
    "mamba2": ArchGraph(SSM2Graph.mamba2),
    "granitehybrid": ArchGraph(SSM2Graph.granitehybrid, finish=_granite_logits),
    "falcon-h1": ArchGraph(SSM2Graph.falcon_h1),
    # the output rows are taken after the output norm, which the builder applies itself
    "nemotron_h": ArchGraph(SSM2Graph.nemotron_h, output_norm=None),
    # with MoE layers (nemotron_moe_ffn, over graph_attention's moe_ffn)
    "nemotron_h_moe": ArchGraph(SSM2Graph.nemotron_h, output_norm=None),
}
