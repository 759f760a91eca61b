"""Attention-only architectures beyond llama and Gemma-2, and the MoE feed-forward.

A mixin of the engine's graph builder (``pymem.runtime.gguf_llama._Graph``): methods
here use its context (``self.ctx``), hyper-parameters (``self.hp``), weights
(``self.m._w``), inputs and shared blocks (``norm``, ``ffn``, ``attention``,
``attn_mha``, ``gemma_layers``, ...). :data:`ARCH_GRAPHS` registers the architectures
built here; each follows ``vendor/llama.cpp/src/models/<arch>.cpp`` op for op.

Shared blocks (``llama-graph.cpp``):

* :meth:`AttentionGraph.build_qkv` / :meth:`~AttentionGraph.attn_store_read`:
  ``build_qkv`` (separate or fused QKV, biases) and ``build_attn`` (the cache stores,
  ``build_attn_mha`` with optional sinks, ``wo`` and its bias; or no ``wo`` for the
  graphs that gate the heads first). RoPE uses the layer's own base where the
  reference calls ``get_rope_freq_base(il)`` and the context's base elsewhere
  (:meth:`~AttentionGraph.global_rope`);
* :meth:`AttentionGraph.moe_ffn`: ``build_moe_ffn``: the router (softmax, sigmoid or
  softmax over the chosen logits; caller-made logits), an optional selection bias
  (``exp_probs_b``, used to choose, not to weigh), top-k by ``argsort_top_k``, optional
  normalisation and scale of the chosen weights, one ``mul_mat_id`` per expert matrix
  (per-expert biases through ``add_id``), SwiGLU / GeGLU / ReGLU / ReLU² / SwiGLU-OAI /
  maple's fused clamped SwiGLU, the weighted outputs summed in slot order (llama4
  weighs the inputs instead). Expert groups, per-layer expert counts and per-expert
  scales are refused.

Architectures: gemma3, gemma3n, gemma4, lfm2moe (LFM2's trunk), qwen3moe,
gpt-oss, cohere2, cohere2moe, olmo2, exaone4, exaone-moe, phi3, llama4, smallthinker,
mellum, granite_swa, mimo2, afmoe, muse-glimmer, spark2_5, plamo3, laguna, step35,
maple. "Dense": no recorded tiny model has an MoE layer of that architecture,
so its MoE layers are refused rather than built unchecked (afmoe, laguna, exaone-moe,
cohere2moe, mimo2, step35, granite_swa and gemma4 have MoE variants in
tests/record/family_moe.py). Nemotron-H's MoE
layers (graph_ssm2) use :meth:`moe_ffn` too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

import pymem.ggml as gg
from pymem.errors import ConfigError, UnsupportedError
from pymem.runtime.arch_graph import ArchGraph, f32, f32_div

NULL = gg.ffi.NULL

# llama_expert_gating_func_type
GATING_NONE, GATING_SOFTMAX, GATING_SIGMOID, GATING_SOFTMAX_WEIGHT = 0, 1, 2, 3
F16_MIN_NORMAL = 6.103515625e-5  # the weight-sum clamp: the smallest normal F16
# the architectures of this module whose load_arch_hparams reads swiglu_clamp_exp
_READS_SWIGLU_CLAMP = frozenset({"maple", "step35"})
_READS_SWIGLU_CLAMP_SH = frozenset({"step35"})  # ... and swiglu_clamp_shexp
# attention tensors the engine's separate-Q/K/V attention would ignore
_QKV_EXTRA = ("attn_qkv.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")


class AttentionGraph:
    """Graph builders of this family (mixed into the engine's graph builder)."""

    # provided by the engine's graph builder (pymem.runtime.gguf_llama._Graph)
    ctx: Any
    hp: Any
    m: Any
    ubatch: Any
    inputs: Any
    refuse_tensors: Any

    def gemma3(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_gemma3::graph`` up to the output norm (text tokens only).

        As Gemma-2 with Q/K RMS norms and no KQ soft-capping; SWA layers take the SWA
        RoPE base (the spec's per-layer RopeSpec) and read the iSWA cache's SWA half.
        """
        return self.gemma_layers(inp, out_ids, qk_norm=True)  # type: ignore[attr-defined]

    # --- pre-norm trunks -------------------------------------------------------------------
    def prenorm_layers(
        self,
        inp: Any,
        out_ids: Any,
        mixer: Callable[[int, Any], Any],
        ffn: Callable[[int, Any], Any],
    ) -> Any:
        """The llama-style layer loop: ``attn_norm`` -> ``mixer`` -> residual (the output
        rows only in the last layer) -> ``ffn_norm`` -> ``ffn`` -> residual."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        inpL = inp
        for il in range(hp.n_layer):
            inpSA = inpL
            cur = mixer(il, g.norm(inpL, w(il, "attn_norm.weight")))
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpSA = ctx.get_rows(inpSA, out_ids)
            ffn_inp = ctx.add(cur, inpSA)
            cur = ffn(il, g.norm(ffn_inp, w(il, "ffn_norm.weight")))
            inpL = ctx.add(cur, ffn_inp)
        return inpL

    # --- attention ----------------------------------------------------------------------
    def build_qkv(self, il: int, cur: Any, hd: int) -> tuple[Any, Any, Any]:
        """``build_qkv``: fused ``attn_qkv`` (+ its bias, or the three Q/K/V biases
        concatenated) split by views, or separate Q/K/V projections (+ biases) reshaped
        to ``[hd, heads, n_tokens]``. ``clamp_kqv`` is refused."""
        ctx, hp, w = self.ctx, self.hp, self.m._w
        n_tokens = self.ubatch.n_tokens
        nh, nkv = hp.n_head[il], hp.n_head_kv[il]
        if self.m.keys.f32(f"{hp.arch}.attention.clamp_kqv", 0.0) > 0.0:
            raise UnsupportedError(f"{self.m.path}: {hp.arch}.attention.clamp_kqv")
        biases = [w(il, f"attn_{n}.bias", required=False) for n in "qkv"]
        wqkv = w(il, "attn_qkv.weight", required=False)
        if wqkv is None:
            out = []
            for name, bias, heads in zip("qkv", biases, (nh, nkv, nkv)):
                t = ctx.mul_mat(w(il, f"attn_{name}.weight"), cur)
                if bias is not None:
                    t = ctx.add(t, bias)
                out.append(ctx.reshape_3d(t, hd, heads, n_tokens))
            return out[0], out[1], out[2]
        qkv = ctx.mul_mat(wqkv, cur)
        qkv_b = w(il, "attn_qkv.bias", required=False)
        if qkv_b is not None:
            qkv = ctx.add(qkv, qkv_b)
        elif all(b is not None for b in biases):
            qkv = ctx.add(qkv, ctx.concat(ctx.concat(biases[0], biases[1], 0), biases[2], 0))
        el = int(qkv.nb[0])
        # rows of [Q (hd * nh) | K (hd * nkv) | V (hd * nkv)]
        q = ctx.view_3d(qkv, hd, nh, n_tokens, hd * el, qkv.nb[1], 0)
        k = ctx.view_3d(qkv, hd, nkv, n_tokens, hd * el, qkv.nb[1], hd * nh * el)
        v = ctx.view_3d(qkv, hd, nkv, n_tokens, hd * el, qkv.nb[1], hd * (nh + nkv) * el)
        return q, k, v

    def attn_block(
        self,
        il: int,
        cur: Any,
        qk_norm: bool = False,
        kq_scale: float | None = None,
        sinks: bool = False,
        rope: bool = True,
        per_layer_base: bool = False,
    ) -> Any:
        """``build_qkv`` (+ Q/K RMS norms per head) + RoPE (when ``rope`` and the layer has
        one; the context's base unless ``per_layer_base``) + ``build_attn`` (+
        ``attn_sinks``) + ``wo`` (+ ``attn_output.bias``)."""
        hp = self.hp
        g: Any = self
        w = self.m._w
        q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
        if qk_norm:
            q = g.norm(q, w(il, "attn_q_norm.weight"))
            k = g.norm(k, w(il, "attn_k_norm.weight"))
        # the graph's RoPE: the context's base on every layer (global_rope), or the
        # layer's own (get_rope_freq_base(il): gpt-oss, smallthinker)
        layer_rope = None
        if rope:
            layer_rope = self.m.spec.layers[il].rope if per_layer_base else self.global_rope(il)
        if layer_rope is not None:
            q = g.rope(q, layer_rope)
            k = g.rope(k, layer_rope)
        return self.attn_store_read(il, q, k, v, kq_scale, sinks)

    def attn_store_read(
        self,
        il: int,
        q: Any,
        k: Any,
        v: Any,
        kq_scale: float | None,
        sinks: bool = False,
        wo: bool = True,
    ) -> Any:
        """``build_attn`` from Q/K/V: the stores into the cache, ``build_attn_mha`` over the
        cache views (+ ``attn_sinks.weight``), ``wo`` (+ ``attn_output.bias``)."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        part = self.inputs.attn_part(il)
        ai = self.inputs.attn[part]
        t_mask, t_kidx, t_vidx = g.attn_inputs(part)
        # a plain KV cache expands K last (rope fusion); iSWA expands Q, K, V
        g.expand(*((q, v, k) if part == "kv" else (q, k, v)))
        g.expand(ai.cpy_k(ctx, k, t_kidx, il))
        g.expand(ai.cpy_v(ctx, v, t_vidx, il))
        scale = hp.kq_scale if kq_scale is None else kq_scale
        t_sinks = w(il, "attn_sinks.weight") if sinks else None
        cur = g.attn_mha(q, ai.get_k(ctx, il), ai.get_v(ctx, il), t_mask, scale, t_sinks)
        g.expand(cur)
        if not wo:  # the caller gates the heads before wo
            return cur
        cur = ctx.mul_mat(w(il, "attn_output.weight"), cur)
        wo_b = w(il, "attn_output.bias", required=False)
        return cur if wo_b is None else ctx.add(cur, wo_b)

    def layer_norm(self, cur: Any, weight: str, il: int | None = None) -> Any:
        """``build_norm(LLM_NORM)``: ``ggml_norm`` with ``layer_norm_epsilon``, times the
        weight, plus the bias of the same name (``.weight`` -> ``.bias``) when present."""
        ctx = self.ctx
        eps = self.m.keys.f32(f"{self.hp.arch}.attention.layer_norm_epsilon")
        bias_name = weight.removesuffix(".weight") + ".bias"
        if il is None:
            w, b = self.m.weights.get(weight), self.m.weights.get(bias_name, required=False)
        else:
            w, b = self.m._w(il, weight), self.m._w(il, bias_name, required=False)
        cur = ctx.mul(ctx.norm(cur, eps), w)
        return cur if b is None else ctx.add(cur, b)

    def cohere2(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_cohere2::graph``: LayerNorm, attention (RoPE on SWA layers only)
        and SwiGLU FFN in parallel from the same norm, both added to the residual."""

        def norm(cur: Any, weight: str, il: int | None = None) -> Any:
            return self.layer_norm(cur, weight, il)

        g: Any = self
        return self.cohere_layers(
            inp, out_ids, norm, lambda il: self.m.spec.layers[il].swa, True, g.ffn
        )

    def cohere2moe(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_cohere2moe::graph``: cohere2's parallel layers with RMS norms,
        RoPE on SWA and leading dense layers, the output rows taken after the output norm
        (the last layer runs over every token); from ``leading_dense_block_count`` on, the
        FFN is ``build_moe_ffn`` (file gating, no selection bias, fused or separate
        gate/up experts) plus the shared expert, the sum halved."""
        g: Any = self
        ctx, keys, arch = self.ctx, self.m.keys, self.hp.arch
        n_dense = int(keys.f32(f"{arch}.leading_dense_block_count", 0.0))

        def ffn(il: int, cur: Any) -> Any:
            if il < n_dense:
                return g.ffn(il, cur)
            out = self.moe_ffn(
                il, cur, int(keys.f32(f"{arch}.expert_gating_func", 0.0)),
                norm_w=keys.bool_(f"{arch}.expert_weights_norm"),
                w_scale=keys.f32(f"{arch}.expert_weights_scale", 0.0), exp_probs_b=False,
            )  # fmt: skip
            if self.m._w(il, "ffn_up_shexp.weight", required=False) is None:
                return out
            return ctx.scale(ctx.add(out, self.swiglu_ffn(il, cur, "_shexp")), 0.5)

        def norm(cur: Any, weight: str, il: int | None = None) -> Any:
            w = self.m.weights.get(weight) if il is None else self.m._w(il, weight)
            return g.norm(cur, w)

        def use_rope(il: int) -> bool:
            return self.m.spec.layers[il].swa or il < n_dense

        cur = self.cohere_layers(inp, out_ids, norm, use_rope, False, ffn)
        return ctx.get_rows(cur, out_ids)

    def cohere_layers(
        self,
        inp: Any,
        out_ids: Any,
        norm: Callable[..., Any],
        use_rope: Callable[[int], bool],
        rows_in_last: bool,
        ffn: Callable[[int, Any], Any],
    ) -> Any:
        """Cohere's parallel layers through the output norm: ``norm``, attention and
        ``ffn`` from the same normed input, ``residual + ffn + attn``; the last layer
        takes the output rows when ``rows_in_last``."""
        ctx, hp = self.ctx, self.hp
        inpL = inp
        for il in range(hp.n_layer):
            self.refuse_tensors(il, ("ffn_up.bias", "ffn_gate.bias", "ffn_down.bias"), "cohere")
            cur = norm(inpL, "attn_norm.weight", il)
            ffn_inp = cur
            cur = self.attn_block(il, cur, rope=use_rope(il))
            if il == hp.n_layer - 1 and rows_in_last:
                cur = ctx.get_rows(cur, out_ids)
                inpL = ctx.get_rows(inpL, out_ids)
                ffn_inp = ctx.get_rows(ffn_inp, out_ids)
            attn_out = cur
            cur = ffn(il, ffn_inp)
            inpL = ctx.add(ctx.add(cur, inpL), attn_out)
        return norm(inpL, "output_norm.weight")

    def olmo2(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_olmo2::graph``: Q/K RMS norms over the whole projection (before
        the head reshape), NEOX RoPE (plain on SWA layers: no YaRN scaling), post-norms
        after attention and FFN instead of pre-norms."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        n_tokens, hd = self.ubatch.n_tokens, hp.n_embd_head

        def mixer(il: int, cur: Any) -> Any:
            self.refuse_tensors(il, _QKV_EXTRA, "olmo2")
            q, k, v = (ctx.mul_mat(w(il, f"attn_{n}.weight"), cur) for n in "qkv")
            q = g.norm(q, w(il, "attn_q_norm.weight"))
            k = g.norm(k, w(il, "attn_k_norm.weight"))
            q = ctx.reshape_3d(q, hd, hp.n_head[il], n_tokens)
            k = ctx.reshape_3d(k, hd, hp.n_head_kv[il], n_tokens)
            v = ctx.reshape_3d(v, hd, hp.n_head_kv[il], n_tokens)
            rope = self.swa_plain_rope(il)
            q, k = g.rope(q, rope), g.rope(k, rope)
            return self.attn_store_read(il, q, k, v, None)

        return self.postnorm_layers(inp, out_ids, mixer)

    def postnorm_layers(self, inp: Any, out_ids: Any, mixer: Callable[[int, Any], Any]) -> Any:
        """OLMo-2 / EXAONE-4 layers: ``mixer`` on the raw residual, ``post_attention_norm``,
        residual, SwiGLU, ``post_ffw_norm``, residual (the output rows in the last layer)."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        inpL = inp
        for il in range(hp.n_layer):
            cur = mixer(il, inpL)
            inpSA = inpL
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpSA = ctx.get_rows(inpSA, out_ids)
            cur = g.norm(cur, w(il, "post_attention_norm.weight"))
            ffn_inp = ctx.add(cur, inpSA)
            cur = g.norm(g.ffn(il, ffn_inp), w(il, "post_ffw_norm.weight"))
            inpL = ctx.add(cur, ffn_inp)
        return inpL

    def exaone4(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_exaone4::graph``: OLMo-2's post-norm layers with per-head Q/K RMS
        norms; RoPE on SWA layers only (on every layer of a model without SWA)."""
        no_swa = not any(layer.swa for layer in self.m.spec.layers)

        def mixer(il: int, cur: Any) -> Any:
            self.refuse_tensors(il, ("attn_output.bias",), "exaone4")
            rope = no_swa or self.m.spec.layers[il].swa
            return self.attn_block(il, cur, qk_norm=True, rope=rope)

        return self.postnorm_layers(inp, out_ids, mixer)

    def phi3(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_phi3::graph``: RMS pre-norms, attention with Q scaled by
        ``1/sqrt(head)`` after RoPE (KQ scale 1, the LongRoPE factors of 128k models as
        :meth:`rope_factors` picks them), a fused gate|up SwiGLU FFN (``ggml_swiglu`` over
        one projection)."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        found = [n for n in ("output_norm.bias", "output.bias") if n in self.m.weights.names]
        if found:
            raise UnsupportedError(f"{self.m.path}: tensors the engine does not build: {found}")
        q_scale = f32_div(1.0, float(np.sqrt(np.float32(hp.n_embd_head))))

        def mixer(il: int, cur: Any) -> Any:
            q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
            rope = self.m.spec.layers[il].rope
            q, k = g.rope(q, rope), g.rope(k, rope)
            return self.attn_store_read(il, ctx.scale(q, q_scale), k, v, 1.0)

        def ffn(il: int, cur: Any) -> Any:
            cur = ctx.swiglu(ctx.mul_mat(w(il, "ffn_up.weight"), cur))
            return ctx.mul_mat(w(il, "ffn_down.weight"), cur)

        # the graph's MoE branch is unreachable: phi3's loader reads no router (phimoe's does)
        names = ("attn_norm.bias", "ffn_norm.bias", "ffn_up.bias", "ffn_down.bias",
                 "ffn_gate_inp.weight")  # fmt: skip
        for il in range(hp.n_layer):
            self.refuse_tensors(il, names, "phi3")
        return self.prenorm_layers(inp, out_ids, mixer, ffn)

    def swiglu_ffn(self, il: int, cur: Any, suffix: str = "") -> Any:
        """``build_ffn(up, gate, down, LLM_FFN_SILU, LLM_FFN_PAR)`` over ``ffn_*{suffix}``,
        with the up / gate / down biases the file has; clamped by ``swiglu_clamp_shexp``
        where the architecture reads it (step35)."""
        ctx, w = self.ctx, self.m._w
        limit = self.swiglu_clamp_limit(il, "swiglu_clamp_shexp")

        def proj(name: str, x: Any) -> Any:
            t = ctx.mul_mat(w(il, f"ffn_{name}{suffix}.weight"), x)
            bias = w(il, f"ffn_{name}{suffix}.bias", required=False)
            return t if bias is None else ctx.add(t, bias)

        up = proj("up", cur)
        gate = proj("gate", cur)
        if limit > 1e-6:
            return proj("down", _clamped_swiglu(ctx, gate, up, limit))
        return proj("down", ctx.swiglu_split(gate, up))

    def llama4_attn_scale(self) -> Any:
        """``build_inp_attn_scale``: per-token Q temperature of the NoPE layers,
        ``log(floor((pos + 1) / 8192) + 1) * 0.1 + 1`` (float, then double, as the
        reference computes it). E.g. pos 0..8190 -> 1.0, pos 8191 -> 1.0693147."""
        pos = self.ubatch.pos0.astype(np.float32)
        # float: (pos + offset) / floor_scale; then double: log(floor + 1) * scale + 1
        q = np.floor((pos + np.float32(1.0)) / np.float32(8192)).astype(np.float64)
        values = (np.log(q + 1.0) * float(np.float32(0.1)) + 1.0).astype(np.float32)
        g: Any = self
        return g.input("f32", (1, 1, values.size), values, "inp_attn_scale")

    def llama4(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_llama4::graph``: every 4th layer without RoPE (its Q scaled by the
        position temperature), RMS-normed (unweighted) Q/K after RoPE, dense SwiGLU or
        sigmoid-routed experts that weigh their inputs (top-1 by raw logits) plus a
        shared expert."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        if self.m.keys.f32(f"{hp.arch}.attention.scale", 0.0) != 0.0:
            raise UnsupportedError(f"{self.m.path}: {hp.arch}.attention.scale")
        n_expert = int(self.m.keys.f32(f"{hp.arch}.expert_count", 0.0))
        # the 17B-128E model skips the Q/K norm; the reference knows it by its expert count
        use_kq_norm = n_expert != 128
        swa_key = self.m.keys.fields.get(f"{hp.arch}.attention.sliding_window")
        no_swa = swa_key is not None and int(swa_key.contents()) == 0
        no_rope_step = hp.n_layer if no_swa else 4
        # made only when a layer uses it (the reference's unused input is computed by none)
        attn_scale: list[Any] = []

        def mixer(il: int, cur: Any) -> Any:
            self.refuse_tensors(il, ("attn_q_norm.weight", "attn_k_norm.weight"), "llama4")
            q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
            use_rope = (il + 1) % no_rope_step != 0
            rope = self.m.spec.layers[il].rope
            if use_rope:
                q, k = g.rope(q, rope), g.rope(k, rope)
                if use_kq_norm:
                    q = ctx.rms_norm(q, hp.f_norm_rms_eps)
                    k = ctx.rms_norm(k, hp.f_norm_rms_eps)
            else:
                if not attn_scale:
                    attn_scale.append(self.llama4_attn_scale())
                q = ctx.mul(q, attn_scale[0])
            return self.attn_store_read(il, q, k, v, None)

        def ffn(il: int, cur: Any) -> Any:
            if w(il, "ffn_gate_inp.weight", required=False) is None:
                return self.swiglu_ffn(il, cur)
            moe_out = self.moe_ffn(il, cur, GATING_SIGMOID, norm_w=False, exp_probs_b=False,
                                   weight_before_ffn=True)  # fmt: skip
            return ctx.add(moe_out, self.swiglu_ffn(il, cur, "_shexp"))

        return self.prenorm_layers(inp, out_ids, mixer, ffn)

    def exaone_moe(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_exaone_moe::graph``: pre-norm layers, per-head Q/K RMS norms, RoPE
        on SWA layers only, SwiGLU FFN or (layers with a router) :meth:`moe_shared_ffn`."""
        g: Any = self
        w = self.m._w
        for il in range(self.hp.n_layer):
            self.refuse_tensors(il, ("attn_output.bias",), "exaone-moe wo bias")

        def mixer(il: int, cur: Any) -> Any:
            return self.attn_block(il, cur, qk_norm=True, rope=self.m.spec.layers[il].swa)

        def ffn(il: int, cur: Any) -> Any:
            if w(il, "ffn_gate_inp.weight", required=False) is None:
                return g.ffn(il, cur)
            return self.moe_shared_ffn(il, cur)

        return self.prenorm_layers(inp, out_ids, mixer, ffn)

    def smallthinker(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_smallthinker::graph``: the router reads the layer input (before the
        attention norm); RoPE skipped every 4th layer from 0 when SWA is on; ReGLU experts
        with normalised weights in every layer."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        swa = any(layer.swa for layer in self.m.spec.layers)
        step = 4 if swa else hp.n_layer
        gating = int(self.m.keys.f32(f"{hp.arch}.expert_gating_func", 0.0))
        inpL = inp
        for il in range(hp.n_layer):
            use_rope = step == hp.n_layer or il % step != 0
            probs = ctx.mul_mat(w(il, "ffn_gate_inp.weight"), inpL)  # [n_expert, n_tokens]
            inpSA = inpL
            cur = self.attn_block(
                il, g.norm(inpL, w(il, "attn_norm.weight")), rope=use_rope, per_layer_base=True
            )
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpSA = ctx.get_rows(inpSA, out_ids)
                probs = ctx.get_rows(probs, out_ids)
            ffn_inp = ctx.add(cur, inpSA)
            cur = g.norm(ffn_inp, w(il, "ffn_norm.weight"))
            cur = self.moe_ffn(il, cur, gating, norm_w=True, act="relu", exp_probs_b=False,
                               logits=probs)  # fmt: skip
            inpL = ctx.add(cur, ffn_inp)
        return inpL

    def mellum(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_mellum::graph``: qwen3moe's layers (per-head Q/K norms, softmax
        SwiGLU experts) with OLMo-2's RoPE: unscaled (no YaRN) on SWA layers."""
        hp = self.hp
        g: Any = self
        for il in range(hp.n_layer):
            self.refuse_tensors(il, ("attn_qkv.weight", "attn_q.bias"), "mellum")

        def mixer(il: int, cur: Any) -> Any:
            q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
            q = g.norm(q, self.m._w(il, "attn_q_norm.weight"))
            k = g.norm(k, self.m._w(il, "attn_k_norm.weight"))
            rope = self.swa_plain_rope(il)
            return self.attn_store_read(il, g.rope(q, rope), g.rope(k, rope), v, None)

        def moe(il: int, cur: Any) -> Any:
            return self.moe_ffn(il, cur, GATING_SOFTMAX, norm_w=True, exp_probs_b=False)

        return self.prenorm_layers(inp, out_ids, mixer, moe)

    def global_rope(self, il: int) -> Any:
        """Layer ``il``'s RoPE with the context's ``freq_base`` / ``freq_scale``: the graphs
        that rotate every layer by the global values (not ``get_rope_freq_base(il)``),
        even SWA layers whose K-shift uses the SWA base. E.g. granite_swa with
        rope.freq_base 1e5: SWA layers shift K with 1e4 but rotate Q/K with 1e5."""
        layers = self.m.spec.layers
        rope = layers[il].rope
        if rope is None or not layers[il].swa:
            return rope
        full = [la.rope for la in layers if not la.swa and la.rope is not None]
        if full:
            return replace(rope, freq_base=full[0].freq_base, freq_scale=full[0].freq_scale)
        arch = self.hp.arch
        if f"{arch}.rope.scaling.factor" in self.m.keys.fields:
            raise UnsupportedError(f"{self.m.path}: {arch}.rope.scaling.factor on SWA-only layers")
        base = self.m.keys.f32(f"{arch}.rope.freq_base", 10000.0)
        return replace(rope, freq_base=base, freq_scale=1.0)

    def swa_plain_rope(self, il: int) -> Any:
        """Layer ``il``'s RoPE; on SWA layers without YaRN scaling (freq_scale 1,
        ext_factor 0, attn_factor 1), as OLMo-2 / Mellum rotate them."""
        rope = self.global_rope(il)
        if not self.m.spec.layers[il].swa:
            return rope
        return replace(rope, freq_scale=1.0, ext_factor=0.0, attn_factor=1.0)

    def granite_swa(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_granite_swa::graph``: Granite's embedding, residual, attention and
        logit scales; RoPE on the layers ``rope_pattern`` marks, with the global base;
        attention sinks where a layer has them; SwiGLU FFN with biases, or (a model with
        experts) softmax-routed experts with normalised weights plus the shared expert
        (gate|up fused in ``ffn_up_shexp``). Deepstack inputs are refused."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        keys, arch = self.m.keys, hp.arch
        if f"{arch}.deepstack_mapping" in keys.fields:
            raise UnsupportedError(f"{self.m.path}: {arch}.deepstack_mapping (vision deepstack)")
        n_ff_shexp = int(keys.f32(f"{arch}.expert_shared_feed_forward_length", 0.0))
        embd_scale = keys.f32(f"{arch}.embedding_scale", 0.0)
        residual_scale = keys.f32(f"{arch}.residual_scale", 0.0)
        attn_scale = keys.f32(f"{arch}.attention.scale", 0.0)
        kq_scale = hp.kq_scale if attn_scale == 0.0 else f32(attn_scale)
        if embd_scale != 0.0:
            inp = ctx.scale(inp, f32(embd_scale))
            g.expand(inp)

        def mixer(il: int, cur: Any) -> Any:
            q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
            rope = self.global_rope(il)
            if rope is not None:
                q, k = g.rope(q, rope), g.rope(k, rope)
            sinks = w(il, "attn_sinks.weight", required=False) is not None
            cur = self.attn_store_read(il, q, k, v, kq_scale, sinks)
            return cur if residual_scale == 0.0 else ctx.scale(cur, f32(residual_scale))

        def ffn(il: int, cur: Any) -> Any:
            if w(il, "ffn_gate_inp.weight", required=False) is None:
                cur = self.swiglu_ffn(il, cur)
            else:
                # granite_swa's loader reads no expert_weights_scale: unscaled
                out = self.moe_ffn(il, cur, GATING_SOFTMAX, norm_w=True, exp_probs_b=False)
                if n_ff_shexp > 0:  # LLM_FFN_SWIGLU, LLM_FFN_SEQ: one fused projection
                    shexp = ctx.swiglu(ctx.mul_mat(w(il, "ffn_up_shexp.weight"), cur))
                    out = ctx.add(out, ctx.mul_mat(w(il, "ffn_down_shexp.weight"), shexp))
                cur = out
            return cur if residual_scale == 0.0 else ctx.scale(cur, f32(residual_scale))

        return self.prenorm_layers(inp, out_ids, mixer, ffn)

    def mimo2(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_mimo2::graph`` (dense layers): pre-norm layers, per-layer head
        counts and RoPE bases, optional attention sinks, the attention output scaled by
        ``attention.value_scale`` (after ``wo``), SwiGLU FFN with biases, or (layers with
        a router) sigmoid-routed experts with the selection bias and normalised weights."""
        ctx, hp = self.ctx, self.hp
        w = self.m._w
        v_scale = self.m.keys.f32(f"{hp.arch}.attention.value_scale", 1.0)

        def ffn(il: int, cur: Any) -> Any:
            if w(il, "ffn_gate_inp.weight", required=False) is None:
                return self.swiglu_ffn(il, cur)
            # mimo2's loader reads no expert_weights_scale: unscaled
            return self.moe_ffn(il, cur, GATING_SIGMOID, norm_w=True)

        def mixer(il: int, cur: Any) -> Any:
            sinks = w(il, "attn_sinks.weight", required=False) is not None
            cur = self.attn_block(il, cur, sinks=sinks, per_layer_base=True)
            return cur if v_scale == 1.0 else ctx.scale(cur, f32(v_scale))

        return self.prenorm_layers(inp, out_ids, mixer, ffn)

    def afmoe(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_afmoe::graph``: embeddings times ``sqrt(n_embd)``, NoPE every 4th
        layer, :meth:`gated_attn_layers`; from ``leading_dense_block_count`` on the FFN is
        :meth:`moe_shared_ffn` (gating sigmoid unless the file says otherwise)."""
        g: Any = self
        hp = self.hp
        for il in range(hp.n_layer):
            self.refuse_tensors(il, _QKV_EXTRA, "afmoe")
        n_dense = int(self.m.keys.f32(f"{hp.arch}.leading_dense_block_count", 0.0))

        def ffn(il: int, cur: Any) -> Any:
            if il < n_dense:
                return g.ffn(il, cur)
            return self.moe_shared_ffn(il, cur, gating_default=GATING_SIGMOID)

        inp = self.ctx.scale(inp, float(np.sqrt(np.float32(hp.n_embd))))
        # n_no_rope_layer_step 4
        return self.gated_attn_layers(inp, out_ids, lambda il: (il + 1) % 4 != 0, None, ffn)

    def muse_glimmer(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_muse_glimmer::graph``: unweighted RMS norm of the embeddings,
        RoPE on SWA layers only, :meth:`gated_attn_layers` with post-norms of eps 1e-8;
        the logits scaled by ``logit_scale`` then soft-capped (:func:`_muse_logits`)."""
        hp = self.hp
        for il in range(hp.n_layer):
            self.refuse_tensors(il, _QKV_EXTRA, "muse-glimmer")
        inp = self.ctx.rms_norm(inp, hp.f_norm_rms_eps)
        layers = self.m.spec.layers
        g: Any = self
        return self.gated_attn_layers(inp, out_ids, lambda il: layers[il].swa, 1e-8, g.ffn)

    def gated_attn_layers(
        self,
        inp: Any,
        out_ids: Any,
        use_rope: Callable[[int], bool],
        post_eps: float | None,
        ffn: Callable[[int, Any], Any],
    ) -> Any:
        """AFMoE / Muse-Glimmer layers: per-head Q/K norms, RoPE (the layer's own base)
        where ``use_rope``, the attention heads gated by ``sigmoid(attn_gate . x)`` before
        ``wo``, pre- and post-norms around attention and ``ffn`` (post-norm eps:
        ``post_eps``, or the model's)."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w

        def post_norm(cur: Any, weight: str, il: int) -> Any:
            if post_eps is None:
                return g.norm(cur, w(il, weight))
            return ctx.mul(ctx.rms_norm(cur, post_eps), w(il, weight))

        inpL = inp
        for il in range(hp.n_layer):
            inpSA = inpL
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
            gate = ctx.mul_mat(w(il, "attn_gate.weight"), cur)
            q = g.norm(q, w(il, "attn_q_norm.weight"))
            k = g.norm(k, w(il, "attn_k_norm.weight"))
            if use_rope(il):
                rope = self.m.spec.layers[il].rope
                q, k = g.rope(q, rope), g.rope(k, rope)
            cur = self.attn_store_read(il, q, k, v, None, wo=False)
            cur = ctx.mul(cur, ctx.sigmoid(gate))
            cur = ctx.mul_mat(w(il, "attn_output.weight"), cur)
            cur = post_norm(cur, "post_attention_norm.weight", il)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpSA = ctx.get_rows(inpSA, out_ids)
            ffn_inp = ctx.add(cur, inpSA)
            cur = ffn(il, g.norm(ffn_inp, w(il, "ffn_norm.weight")))
            cur = post_norm(cur, "post_ffw_norm.weight", il)
            inpL = ctx.add(cur, ffn_inp)
        return inpL

    def spark2_5(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_spark2_5::graph``: per-layer heads and RoPE, one sigmoid gate per
        head (``attn_gate``: ``[n_embd, n_head]``) on the attention output before ``wo``,
        GeGLU FFN."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        for il in range(hp.n_layer):
            self.refuse_tensors(il, _QKV_EXTRA, "spark2_5")

        def mixer(il: int, cur: Any) -> Any:
            q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
            rope = self.m.spec.layers[il].rope
            q, k = g.rope(q, rope), g.rope(k, rope)
            out = self.attn_store_read(il, q, k, v, None, wo=False)
            gate = ctx.sigmoid(ctx.mul_mat(w(il, "attn_gate.weight"), cur))
            n_tokens, nh = int(out.ne[1]), hp.n_head[il]
            # E.g. [hd * nh, T] * [nh, T] per head: [hd, nh, T] * [1, nh, T]
            out = ctx.reshape_3d(out, hp.n_embd_head, nh, n_tokens)
            out = ctx.mul(out, ctx.reshape_3d(gate, 1, nh, n_tokens))
            out = ctx.reshape_2d(out, hp.n_embd_head * nh, n_tokens)
            return ctx.mul_mat(w(il, "attn_output.weight"), out)

        return self.prenorm_layers(inp, out_ids, mixer, lambda il, cur: g.ffn(il, cur, gelu=True))

    def plamo3(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_plamo3::graph``: fused QKV, per-head Q/K norms, RoPE with the
        layer's own base, sandwich norms (pre and post, around attention and a fused
        gate|up SwiGLU); the post-norm tensors have no ``.weight`` suffix."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        for il in range(hp.n_layer):
            self.refuse_tensors(il, ("attn_qkv.bias", "attn_output.bias"), "plamo3")
        inpL = inp
        for il in range(hp.n_layer):
            residual = inpL
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            cur = self.attn_block(il, cur, qk_norm=True, per_layer_base=True)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                residual = ctx.get_rows(residual, out_ids)
            cur = ctx.add(g.norm(cur, w(il, "post_attention_norm")), residual)
            residual = cur
            cur = g.norm(cur, w(il, "ffn_norm.weight"))
            cur = ctx.swiglu(ctx.mul_mat(w(il, "ffn_up.weight"), cur))
            cur = ctx.mul_mat(w(il, "ffn_down.weight"), cur)
            inpL = ctx.add(g.norm(cur, w(il, "post_ffw_norm")), residual)
        return inpL

    def laguna(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_laguna::graph``: per-head Q/K norms, RoPE (SWA
        layers: their own rotation width and base, plain: no YaRN, betas 0), the heads
        gated by ``softplus(attn_gate . x)`` (one per head, or per element) before ``wo``,
        SwiGLU FFN, from ``leading_dense_block_count`` on :meth:`moe_shared_ffn`."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        for il in range(hp.n_layer):
            self.refuse_tensors(il, _QKV_EXTRA, "laguna")
        n_dense = int(self.m.keys.f32(f"{hp.arch}.leading_dense_block_count"))

        def ffn(il: int, cur: Any) -> Any:
            return g.ffn(il, cur) if il < n_dense else self.moe_shared_ffn(il, cur)

        def mixer(il: int, cur: Any) -> Any:
            q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
            gate_w = w(il, "attn_gate.weight")
            gate = ctx.mul_mat(gate_w, cur)
            q = g.norm(q, w(il, "attn_q_norm.weight"))
            k = g.norm(k, w(il, "attn_k_norm.weight"))
            rope = self.m.spec.layers[il].rope
            if self.m.spec.layers[il].swa:
                rope = replace(rope, ext_factor=0.0, attn_factor=1.0, beta_fast=0.0,
                               beta_slow=0.0, n_ctx_orig=self.m.spec.n_ctx_train)  # fmt: skip
            q, k = g.rope(q, rope), g.rope(k, rope)
            out = self.attn_store_read(il, q, k, v, None, wo=False)
            gate = ctx.softplus(gate)
            n_tokens, nh = int(out.ne[1]), hp.n_head[il]
            if int(gate_w.ne[1]) == nh:  # one gate per head
                out = ctx.reshape_3d(out, hp.n_embd_head, nh, n_tokens)
                out = ctx.mul(out, ctx.reshape_3d(gate, 1, nh, n_tokens))
                out = ctx.reshape_2d(out, hp.n_embd_head * nh, n_tokens)
            else:
                out = ctx.mul(out, gate)
            return ctx.mul_mat(w(il, "attn_output.weight"), out)

        return self.prenorm_layers(inp, out_ids, mixer, ffn)

    def step35(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_step35::graph`` (dense layers): per-layer heads, rotation widths
        and RoPE bases, optional per-head Q/K norms and per-head sigmoid gate before
        ``wo``, SwiGLU FFN with biases; the last layer runs over every token and the output
        rows are taken before the output norm. Layers with a router: experts (sigmoid by
        default, selection bias) plus the shared expert; SwiGLUs clamped by
        ``swiglu_clamp_exp`` / ``swiglu_clamp_shexp``. Fused QKV and RoPE factors are
        refused."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        for il in range(hp.n_layer):
            self.refuse_tensors(il, ("attn_qkv.weight",), "step35")
        inpL = inp
        for il in range(hp.n_layer):
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            q, k, v = self.build_qkv(il, cur, hp.n_embd_head)
            if w(il, "attn_q_norm.weight", required=False) is not None:
                q = g.norm(q, w(il, "attn_q_norm.weight"))
            if w(il, "attn_k_norm.weight", required=False) is not None:
                k = g.norm(k, w(il, "attn_k_norm.weight"))
            rope = self.m.spec.layers[il].rope
            q, k = g.rope(q, rope), g.rope(k, rope)
            out = self.attn_store_read(il, q, k, v, None, wo=False)
            gate_w = w(il, "attn_gate.weight", required=False)
            if gate_w is not None:
                n_tokens, nh = int(out.ne[1]), hp.n_head[il]
                gate = ctx.sigmoid(ctx.mul_mat(gate_w, cur))  # [n_head, n_tokens]
                out = ctx.reshape_3d(out, hp.n_embd_head, nh, n_tokens)
                out = ctx.mul(out, ctx.reshape_3d(gate, 1, nh, n_tokens))
                out = ctx.reshape_2d(out, hp.n_embd_head * nh, n_tokens)
            cur = ctx.mul_mat(w(il, "attn_output.weight"), out)
            ffn_inp = ctx.add(cur, inpL)
            cur = g.norm(ffn_inp, w(il, "ffn_norm.weight"))
            if w(il, "ffn_gate_inp.weight", required=False) is None:
                cur = self.swiglu_ffn(il, cur)
            else:
                cur = self.moe_shared_ffn(il, cur, gating_default=GATING_SIGMOID)
            inpL = ctx.add(cur, ffn_inp)
        return ctx.get_rows(inpL, out_ids)

    def gemma4(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_gemma4::graph`` (dense, text): embeddings times ``sqrt(n_embd)``,
        per-layer head sizes / rotation widths / bases, Q/K RMS norms, V RMS-normed
        without weight, ``rope_freqs`` factors on full layers, KQ scale 1, sandwich
        norms, GeGLU FFN; the last layer and output norm run over every token, then the
        output rows; layers with a router add :meth:`_gemma4_experts` to their dense
        branch. Per-layer embeddings, fused QKV, K/V sharing and layer output scales are
        refused (no recorded run has them)."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        layers = self.m.spec.layers
        if "per_layer_token_embd.weight" in self.m.weights.names:
            raise UnsupportedError(f"{self.m.path}: gemma4 per-layer embeddings")
        if self.m.keys.f32(f"{hp.arch}.attention.shared_kv_layers", 0.0) > 0:
            raise UnsupportedError(f"{self.m.path}: gemma4 K/V sharing (shared_kv_layers)")
        for il in range(hp.n_layer):
            self.refuse_tensors(
                il, ("attn_qkv.weight", "layer_output_scale.weight"), "gemma4",
            )  # fmt: skip
        n_tokens = self.ubatch.n_tokens
        inpL = ctx.scale(inp, float(np.sqrt(np.float32(hp.n_embd))))
        for il in range(hp.n_layer):
            hd, nh, nkv = layers[il].n_embd_head_k, hp.n_head[il], hp.n_head_kv[il]
            rope = layers[il].rope
            cur = g.norm(inpL, w(il, "attn_norm.weight"))
            q = ctx.reshape_3d(ctx.mul_mat(w(il, "attn_q.weight"), cur), hd, nh, n_tokens)
            q = g.rope(g.norm(q, w(il, "attn_q_norm.weight")), rope)
            k = ctx.reshape_3d(ctx.mul_mat(w(il, "attn_k.weight"), cur), hd, nkv, n_tokens)
            v = ctx.reshape_3d(ctx.mul_mat(w(il, "attn_v.weight"), cur), hd, nkv, n_tokens)
            k = g.norm(k, w(il, "attn_k_norm.weight"))
            v = ctx.rms_norm(v, hp.f_norm_rms_eps)
            k = g.rope(k, rope)
            cur = self.attn_store_read(il, q, k, v, 1.0)
            cur = g.norm(cur, w(il, "post_attention_norm.weight"))
            attn_out = ctx.add(cur, inpL)
            cur = g.ffn(il, g.norm(attn_out, w(il, "ffn_norm.weight")), gelu=True)
            if w(il, "ffn_gate_inp.weight", required=False) is not None:
                cur = ctx.add(g.norm(cur, w(il, "post_ffw_norm_1.weight")),
                              self._gemma4_experts(il, attn_out))  # fmt: skip
            cur = g.norm(cur, w(il, "post_ffw_norm.weight"))
            inpL = ctx.add(cur, attn_out)
        cur = g.norm(inpL, self.m.weights.get("output_norm.weight"))
        return ctx.get_rows(cur, out_ids)

    # --- Gemma-3n ---------------------------------------------------------------------------
    def gemma3n(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_gemma3n::graph`` (text tokens): AltUp over 4 streams of the
        residual (predict before the layer, correct after it; stream 0 active), LAuReL
        low-rank branch beside attention, per-layer token embeddings projected and gated
        into each layer, gaussian top-k activation sparsity in the first 10 FFN gates,
        Q/K norms and a weightless V norm, KQ scale 1; the streams are merged back before
        the output rows. K/V reuse across layers is refused (by the spec, 20+ layers)."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        n_embd, n_tokens, n_layer = hp.n_embd, self.ubatch.n_tokens, hp.n_layer
        n_altup, i_act, n_embd_altup = 4, 0, 256  # llama_hparams defaults (no GGUF keys)
        for il in range(n_layer):
            self.refuse_tensors(il, _QKV_EXTRA, "gemma3n")
        inpL = ctx.scale(inp, _sqrtf(n_embd))

        # build_inp_per_layer: [n_embd_altup, n_layer, n_tokens], expanded at once
        tokens = g.input("i32", (n_tokens,), self.ubatch.token.astype(np.int32), "inp_tokens_pl")
        per_layer = ctx.get_rows(self.m.weights.get("per_layer_token_embd.weight"), tokens)
        per_layer = ctx.reshape_3d(per_layer, n_embd_altup, n_layer, n_tokens)
        per_layer = ctx.scale(per_layer, _sqrtf(n_embd_altup))
        g.expand(per_layer)
        # project_per_layer_inputs: -> [n_embd_altup, n_tokens, n_layer]
        proj = ctx.mul_mat(self.m.weights.get("per_layer_model_proj.weight"), inpL)
        proj = ctx.scale(proj, f32_div(1.0, _sqrtf(n_embd)))
        proj = ctx.reshape_3d(proj, n_embd_altup, n_layer, n_tokens)
        proj = g.norm(proj, self.m.weights.get("per_layer_proj_norm.weight"))
        per_layer = ctx.scale(ctx.add(proj, per_layer), f32_div(1.0, _sqrtf(2)))
        per_layer = ctx.cont(ctx.permute(per_layer, 0, 2, 1, 3))

        # streams 1..3: projections of the embeddings at the embeddings' magnitude
        target = self._magnitude(inpL)
        added = ctx.mul_mat(
            self.m.weights.get("altup_proj.weight"),
            ctx.repeat_4d(inpL, n_embd, n_tokens, n_altup - 1, 1),
        )
        added = ctx.div(ctx.mul(added, target), self._magnitude(added))
        inpL = ctx.concat(inpL, added, 2)  # [n_embd, n_tokens, n_altup]

        for il in range(n_layer):
            predictions = self._altup_predict(inpL, il, n_altup, i_act)
            active = _slice(ctx, predictions, i_act)
            cur = g.norm(active, w(il, "attn_norm.weight"))
            laurel = ctx.mul_mat(
                w(il, "laurel_r.weight"), ctx.mul_mat(w(il, "laurel_l.weight"), cur)
            )
            laurel = ctx.add(g.norm(laurel, w(il, "laurel_post_norm.weight")), cur)
            q, k, v = self.build_qkv(il, cur, self.m.spec.layers[il].n_embd_head_k)
            q = g.norm(q, w(il, "attn_q_norm.weight"))
            k = g.norm(k, w(il, "attn_k_norm.weight"))
            v = ctx.rms_norm(v, hp.f_norm_rms_eps)
            rope = self.m.spec.layers[il].rope
            q, k = g.rope(q, rope), g.rope(k, rope)
            cur = self.attn_store_read(il, q, k, v, 1.0)
            cur = ctx.add(g.norm(cur, w(il, "post_attention_norm.weight")), active)
            attn_laurel = ctx.scale(ctx.add(cur, laurel), f32_div(1.0, _sqrtf(2)))
            cur = g.norm(attn_laurel, w(il, "ffn_norm.weight"))
            up = ctx.mul_mat(w(il, "ffn_up.weight"), cur)
            gate = ctx.mul_mat(w(il, "ffn_gate.weight"), cur)
            if il < 10:  # n_layer_sparsity
                gate = self._gaussian_topk(gate)
            cur = ctx.mul_mat(w(il, "ffn_down.weight"), ctx.mul(up, ctx.gelu(gate)))
            cur = ctx.add(g.norm(cur, w(il, "post_ffw_norm.weight")), attn_laurel)

            corrected = self._altup_correct(predictions, cur, il, n_altup, i_act)
            first = ctx.mul(_slice(ctx, corrected, i_act), w(il, "altup_correct_scale.weight"))
            first = ctx.gelu(ctx.mul_mat(w(il, "inp_gate.weight"), first))
            first = ctx.mul(first, _slice(ctx, per_layer, il))
            first = g.norm(ctx.mul_mat(w(il, "proj.weight"), first), w(il, "post_norm.weight"))
            # streams 1.. += first
            el = int(corrected.nb[0])
            rest = ctx.view_3d(corrected, n_embd, n_tokens, n_altup - 1, n_embd * el,
                               n_embd * n_tokens * el, n_embd * n_tokens * el)  # fmt: skip
            inpL = ctx.concat(_slice(ctx, corrected, 0), ctx.add(rest, first), 2)

        # merge the streams: 1.. unembedded at stream i_act's magnitude, then the mean
        target = self._magnitude(_slice(ctx, inpL, i_act))
        el = int(inpL.nb[0])
        alt = ctx.view_3d(inpL, n_embd, n_tokens, n_altup - 1, n_embd * el,
                          n_embd * n_tokens * el, n_embd * n_tokens * el)  # fmt: skip
        unembd = ctx.mul_mat(self.m.weights.get("altup_unembd_proj.weight"), alt)
        unembd = ctx.div(ctx.mul(unembd, target), self._magnitude(unembd))
        cur = _slice(ctx, inpL, 0)
        for i in range(n_altup - 1):
            cur = ctx.add(cur, _slice(ctx, unembd, i))
        cur = ctx.scale(cur, f32_div(1.0, float(n_altup)))
        return ctx.get_rows(cur, out_ids)

    def _magnitude(self, x: Any) -> Any:
        """``calc_magnitude``: the L2 norm of each row, ``sqrt(sum(x^2))``."""
        return self.ctx.sqrt(self.ctx.sum_rows(self.ctx.sqr(x)))

    def _gaussian_topk(self, x: Any) -> Any:
        """``gaussian_topk``: ``relu(x - (mean + 1.6448534 * std))`` per row (sample std)."""
        ctx = self.ctx
        mean = ctx.mean(x)
        var = ctx.scale(ctx.sum_rows(ctx.sqr(ctx.sub(x, mean))), f32_div(1.0, float(x.ne[0] - 1)))
        cutoff = ctx.add(mean, ctx.scale(ctx.sqrt(var), 1.6448533535003662))
        return ctx.relu(ctx.sub(x, cutoff))

    def _altup_router(self, x: Any, il: int) -> Any:
        """``altup_compute_router_modalities``: ``tanh(router . (norm(x) / n_embd))``."""
        ctx, w = self.ctx, self.m._w
        g: Any = self
        inputs = ctx.scale(g.norm(x, w(il, "altup_router_norm.weight")),
                           f32_div(1.0, float(self.hp.n_embd)))  # fmt: skip
        return ctx.tanh(ctx.mul_mat(w(il, "altup_router.weight"), inputs))

    def _altup_predict(self, cur: Any, il: int, n_altup: int, i_act: int) -> Any:
        """``altup_predict``: each stream plus a mix of all streams, the mixing
        coefficients predicted per token from the active stream."""
        ctx, w = self.ctx, self.m._w
        n_tokens = int(cur.ne[1])
        modalities = self._altup_router(_slice(ctx, cur, i_act), il)
        coefs = ctx.mul_mat(w(il, "altup_predict_coef.weight"), modalities)
        coefs = ctx.reshape_3d(coefs, n_altup, n_altup, n_tokens)
        permuted = ctx.cont(ctx.permute(cur, 1, 2, 0, 3))  # [n_altup, n_embd, n_tokens]
        predictions = ctx.mul_mat(permuted, coefs)
        predictions = ctx.cont(ctx.permute(predictions, 0, 2, 1, 3))
        return ctx.add(predictions, cur)

    def _altup_correct(
        self, predictions: Any, activated: Any, il: int, n_altup: int, i_act: int
    ) -> Any:
        """``altup_correct``: every stream plus the layer's innovation (its output minus
        the active prediction) times ``1 + coef`` per token and stream."""
        ctx, w = self.ctx, self.m._w
        n_embd, n_tokens = int(activated.ne[0]), int(activated.ne[1])
        modalities = self._altup_router(activated, il)
        innovation = ctx.sub(activated, _slice(ctx, predictions, i_act))
        coefs = ctx.mul_mat(w(il, "altup_correct_coef.weight"), modalities)
        coefs = ctx.scale_bias(coefs, 1.0, 1.0)
        coefs = ctx.cont_3d(ctx.transpose(coefs), 1, n_tokens, n_altup)
        innovation = ctx.repeat_4d(innovation, n_embd, n_tokens, n_altup, 1)
        return ctx.add(ctx.mul(innovation, coefs), predictions)

    def _gemma4_experts(self, il: int, attn_out: Any) -> Any:
        """Gemma-4's expert branch: ``pre_ffw_norm_2``, GeGLU experts chosen by softmax
        over ``ffn_gate_inp . (rms_norm(x) / sqrt(n_embd) * ffn_gate_inp.scale)`` with
        normalised weights, ``post_ffw_norm_2``."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        cur = g.norm(attn_out, w(il, "pre_ffw_norm_2.weight"))
        tmp = ctx.rms_norm(attn_out, hp.f_norm_rms_eps)
        tmp = ctx.scale(tmp, f32_div(1.0, _sqrtf(hp.n_embd)))
        tmp = ctx.mul(tmp, w(il, "ffn_gate_inp.scale"))
        logits = ctx.mul_mat(w(il, "ffn_gate_inp.weight"), tmp)
        cur = self.moe_ffn(il, cur, GATING_SOFTMAX, norm_w=True, act="gelu",
                           exp_probs_b=False, logits=logits)  # fmt: skip
        return g.norm(cur, w(il, "post_ffw_norm_2.weight"))

    def maple(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_maple::graph``: per-head Q/K norms, RoPE on SWA layers only (the
        layer's own width and base), softmax-routed experts with normalised weights and
        the fused clamped SwiGLU (``swiglu_clamp_exp``) in every layer."""
        hp = self.hp
        for il in range(hp.n_layer):
            self.refuse_tensors(il, _QKV_EXTRA, "maple")

        def mixer(il: int, cur: Any) -> Any:
            layer = self.m.spec.layers[il]
            return self.attn_block(il, cur, qk_norm=True, rope=layer.swa, per_layer_base=True)

        def moe(il: int, cur: Any) -> Any:
            return self.moe_ffn(il, cur, GATING_SOFTMAX, norm_w=True, exp_probs_b=False)

        return self.prenorm_layers(inp, out_ids, mixer, moe)

    def qwen3moe(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_qwen3moe::graph``: Q/K RMS norms, RoPE, softmax-routed SwiGLU
        experts with normalised top-k weights in every layer."""
        g: Any = self
        for il in range(self.hp.n_layer):
            self.refuse_tensors(il, _QKV_EXTRA, "fused QKV, biases")

        def moe(il: int, cur: Any) -> Any:
            return self.moe_ffn(il, cur, GATING_SOFTMAX, norm_w=True, exp_probs_b=False)

        return self.prenorm_layers(
            inp, out_ids, lambda il, cur: g.attention(il, cur, qk_norm=True), moe
        )

    def gpt_oss(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_openai_moe::graph``: RoPE attention with per-head sinks and output
        bias over the iSWA cache, post-attention norm, softmax-over-chosen-logits router
        (with bias) to SwiGLU-OAI experts with biases. The last layer runs over every
        token (``embeddings_nextn_masked`` off); the output rows are taken before the norm."""
        ctx, hp = self.ctx, self.hp
        g: Any = self
        w = self.m._w
        for il in range(hp.n_layer):
            self.refuse_tensors(il, ("attn_qkv.weight", "attn_q_norm.weight"), "gpt-oss")
        inpL = inp
        for il in range(hp.n_layer):
            cur = self.attn_block(
                il, g.norm(inpL, w(il, "attn_norm.weight")), sinks=True, per_layer_base=True
            )
            ffn_inp = ctx.add(cur, inpL)
            cur = g.norm(ffn_inp, w(il, "post_attention_norm.weight"))
            cur = self.moe_ffn(il, cur, GATING_SOFTMAX_WEIGHT, norm_w=False, act="swiglu_oai",
                               exp_probs_b=False)  # fmt: skip
            inpL = ctx.add(cur, ffn_inp)
        return ctx.get_rows(inpL, out_ids)

    # --- MoE ------------------------------------------------------------------------------
    def moe_counts(self, il: int) -> tuple[int, int]:
        """(n_expert, n_expert_used) of the file; per-layer used counts and expert groups
        are refused (the reference's group masking is not built)."""
        arch = self.hp.arch
        fields = self.m.keys.fields
        count, used = fields.get(f"{arch}.expert_count"), fields.get(f"{arch}.expert_used_count")
        if count is None or used is None:
            raise ConfigError(
                f"{self.m.path}: layer {il} has MoE tensors, but {arch}.expert_count / "
                f"{arch}.expert_used_count are missing"
            )
        n_used = used.contents()
        if isinstance(n_used, list):
            raise UnsupportedError(f"{self.m.path}: a per-layer {arch}.expert_used_count")
        if self.m.keys.f32(f"{arch}.expert_group_count", 0.0) > 1:
            raise UnsupportedError(f"{self.m.path}: MoE expert groups ({arch}.expert_group_count)")
        n_expert, n_used = int(count.contents()), int(n_used)
        if not 0 < n_used <= n_expert:
            raise ConfigError(
                f"{self.m.path}: {arch}.expert_used_count {n_used} not in [1, {n_expert}]"
            )
        return n_expert, n_used

    def moe_shared_ffn(self, il: int, cur: Any, gating_default: int = GATING_NONE) -> Any:
        """The MoE layer of afmoe / laguna / exaone-moe / step35: ``build_moe_ffn`` with
        the file's gating (``expert_gating_func``; ``gating_default`` when 0 or absent),
        selection bias, ``expert_weights_norm`` and ``expert_weights_scale``, plus the
        SwiGLU shared expert (``ffn_*_shexp``) when the layer has one."""
        keys, arch = self.m.keys, self.hp.arch
        gating = int(keys.f32(f"{arch}.expert_gating_func", 0.0)) or gating_default
        out = self.moe_ffn(
            il, cur, gating, norm_w=keys.bool_(f"{arch}.expert_weights_norm"),
            w_scale=keys.f32(f"{arch}.expert_weights_scale", 0.0),
        )  # fmt: skip
        if self.m._w(il, "ffn_up_shexp.weight", required=False) is None:
            return out
        return self.ctx.add(out, self.swiglu_ffn(il, cur, "_shexp"))

    def swiglu_clamp_limit(self, il: int, key: str = "swiglu_clamp_exp") -> float:
        """Layer ``il``'s ``swiglu_clamp_exp`` (experts) or ``swiglu_clamp_shexp`` (every
        other parallel SiLU FFN), one value or one per layer, 0: none; for the
        architectures whose loader reads it (any other ignores the key, as the reference
        does)."""
        field = self.m.keys.fields.get(f"{self.hp.arch}.{key}")
        readers = _READS_SWIGLU_CLAMP if key == "swiglu_clamp_exp" else _READS_SWIGLU_CLAMP_SH
        if field is None or self.hp.arch not in readers:
            return 0.0
        value = field.contents()
        if isinstance(value, list):
            if len(value) <= il:
                raise ConfigError(
                    f"{self.m.path}: {self.hp.arch}.{key} has {len(value)} entries, "
                    f"layer {il} needs one"
                )
            value = value[il]
        return float(value)

    def moe_ffn(
        self,
        il: int,
        cur: Any,
        gating: int,
        norm_w: bool,
        w_scale: float = 0.0,
        act: str | Callable[[Any, Any], Any] = "silu",
        exp_probs_b: bool = True,
        weight_before_ffn: bool = False,
        logits: Any = None,
    ) -> Any:
        """``build_moe_ffn`` over layer ``il``'s ``ffn_*_exps`` (see the module docstring).

        Callers pass the hyper-parameters their architecture's loader reads (e.g.
        ``expert_weights_scale`` only where ``load_arch_hparams`` reads it: a key another
        architecture's file carries is ignored by the reference, so here too).

        ``gating``: a ``GATING_*`` value; ``norm_w``: divide the chosen weights by their sum
        (clamped to :data:`F16_MIN_NORMAL`); ``w_scale``: scale them (0 or 1: not);
        ``act``: ``silu`` (SwiGLU, or SiLU without gate experts), ``gelu``, ``relu``,
        ``relu_sqr`` (no gate), ``swiglu_oai``, or a callable ``(gate, up) -> act`` (Kimi-K3's
        SiTU); ``exp_probs_b``: add
        ``exp_probs_b.bias`` (when the file has it) to the probabilities used for the
        choice only;
        ``weight_before_ffn``: llama4 weighs the input rows, not the outputs, and chooses
        by the raw logits; ``logits``: router logits the caller computed (``probs_in``:
        Nemotron-H routes on the layer input but runs the experts on a latent).
        """
        ctx, w = self.ctx, self.m._w
        g: Any = self
        n_embd, n_tokens = int(cur.ne[0]), int(cur.ne[1])
        n_expert, n_used = self.moe_counts(il)
        limit = self.swiglu_clamp_limit(il)
        scales = [n for n in ("ffn_up_exps.scale", "ffn_gate_exps.scale", "ffn_down_exps.scale")
                  if w(il, n, required=False) is not None]  # fmt: skip
        if scales:
            raise UnsupportedError(f"layer {il}: per-expert scale tensors {scales}")

        if logits is None:
            logits = ctx.mul_mat(w(il, "ffn_gate_inp.weight"), cur)  # [n_expert, n_tokens]
        gate_inp_b = w(il, "ffn_gate_inp.bias", required=False)
        if gate_inp_b is not None:
            logits = ctx.add(logits, gate_inp_b)
        if gating == GATING_SOFTMAX:
            probs = ctx.soft_max(logits)
        elif gating == GATING_SIGMOID:
            probs = ctx.sigmoid(logits)
        elif gating == GATING_SOFTMAX_WEIGHT:
            probs = logits
        else:
            raise UnsupportedError(f"{self.m.path}: MoE gating function {gating}")
        selection = probs
        probs_b = w(il, "exp_probs_b.bias", required=False) if exp_probs_b else None
        if probs_b is not None:
            selection = ctx.add(probs, probs_b)
        if weight_before_ffn:
            selection = logits
        selected = ctx.argsort_top_k(selection, n_used)  # [n_used, n_tokens]
        weights = ctx.get_rows(ctx.reshape_3d(probs, 1, n_expert, n_tokens), selected)
        if gating == GATING_SOFTMAX_WEIGHT:
            weights = ctx.soft_max(ctx.reshape_2d(weights, n_used, n_tokens))
            weights = ctx.reshape_3d(weights, 1, n_used, n_tokens)
        if norm_w:
            weights = ctx.reshape_2d(weights, n_used, n_tokens)
            weights_sum = ctx.clamp(ctx.sum_rows(weights), F16_MIN_NORMAL, float("inf"))
            weights = ctx.reshape_3d(ctx.div(weights, weights_sum), 1, n_used, n_tokens)
        if w_scale not in (0.0, 1.0):
            weights = ctx.scale(weights, w_scale)
        g.expand(weights)  # early, as the reference (its top-k MoE fusion)

        x = ctx.reshape_3d(cur, n_embd, 1, n_tokens)
        if weight_before_ffn:
            x = ctx.mul(ctx.repeat_4d(x, n_embd, n_used, n_tokens, 1), weights)

        def biased(t: Any, name: str) -> Any:
            bias = w(il, name, required=False)
            return t if bias is None else ctx.add_id(t, bias, selected)

        gate_up_exps = w(il, "ffn_gate_up_exps.weight", required=False)
        if gate_up_exps is not None:
            gate_up = biased(ctx.mul_mat_id(gate_up_exps, x, selected), "ffn_gate_up_exps.bias")
            n_ff = int(gate_up.ne[0]) // 2
            nb = (gate_up.nb[1], gate_up.nb[2])
            gate = ctx.view_3d(gate_up, n_ff, gate_up.ne[1], gate_up.ne[2], *nb, 0)
            up = ctx.view_3d(gate_up, n_ff, gate_up.ne[1], gate_up.ne[2], *nb,
                             n_ff * int(gate_up.nb[0]))  # fmt: skip
            has_gate = True
        else:
            up = biased(ctx.mul_mat_id(w(il, "ffn_up_exps.weight"), x, selected),
                        "ffn_up_exps.bias")  # fmt: skip
            gate_exps = w(il, "ffn_gate_exps.weight", required=False)
            has_gate = gate_exps is not None
            gate = ctx.mul_mat_id(gate_exps, x, selected) if has_gate else up
            gate = biased(gate, "ffn_gate_exps.bias")

        if callable(act) and has_gate:
            cur = act(gate, up)
        elif act == "silu" and limit > 1e-6 and gate_up_exps is None and has_gate:
            if self.hp.arch == "maple":
                # the fused clamp: silu(min(gate, limit)) * clamp(up, -limit, limit)
                cur = gg.lib.pm_swiglu_clamp(ctx.ptr, gate, up, f32(limit))
                if cur == NULL:
                    raise UnsupportedError("ggml_swiglu_clamp: not in this process's ggml")
            else:
                cur = _clamped_swiglu(ctx, gate, up, limit)
        elif act == "silu":
            cur = ctx.swiglu_split(gate, up) if has_gate else ctx.silu(gate)
        elif act == "gelu":
            cur = ctx.geglu_split(gate, up) if has_gate else ctx.gelu(gate)
        elif act == "swiglu_oai":
            cur = ctx.swiglu_oai(gate, up, 1.702, 7.0)
        elif act == "relu":
            cur = ctx.reglu_split(gate, up) if has_gate else ctx.relu(gate)
        elif act == "relu_sqr" and not has_gate:
            cur = ctx.sqr(ctx.relu(gate))
        else:
            raise UnsupportedError(f"layer {il}: MoE activation {act!r} (gate: {has_gate})")

        experts = ctx.mul_mat_id(w(il, "ffn_down_exps.weight"), cur, selected)
        experts = biased(experts, "ffn_down_exps.bias")  # [n_embd, n_used, n_tokens]
        if not weight_before_ffn:
            experts = ctx.mul(experts, weights)
        g.expand(experts)
        # the views first, then their sum in expert-slot order
        views = [
            ctx.view_2d(experts, n_embd, n_tokens, experts.nb[2], i * int(experts.nb[1]))
            for i in range(n_used)
        ]
        g.expand(*views)
        moe_out = views[0]
        for view in views[1:]:
            moe_out = ctx.add(moe_out, view)
            g.expand(moe_out)
        if n_used == 1:
            moe_out = ctx.cont(moe_out)  # no non-contiguous result
        return moe_out

    def lfm2moe(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_lfm2::graph`` for lfm2moe: LFM2's trunk, whose FFN
        (:meth:`lfm2_ffn`) is MoE from ``leading_dense_block_count`` on."""
        return self.lfm2(inp, out_ids)  # type: ignore[attr-defined]

    def lfm2_ffn(self, il: int, cur: Any) -> Any:
        """LFM2's feed-forward: dense SwiGLU, or (lfm2moe, from ``leading_dense_block_count``
        on) sigmoid-routed MoE with the selection bias and normalised weights."""
        g: Any = self
        self.refuse_tensors(il, ("ffn_up.bias", "ffn_gate.bias", "ffn_down.bias"), "LFM2's FFN")
        if self.hp.arch != "lfm2moe":
            return g.ffn(il, cur)
        n_dense = int(self.m.keys.f32("lfm2moe.leading_dense_block_count", 0.0))
        if il < n_dense:
            return g.ffn(il, cur)
        gating = int(self.m.keys.f32("lfm2moe.expert_gating_func", 0.0))
        return self.moe_ffn(il, cur, gating, norm_w=True)


def _clamped_swiglu(ctx: Any, gate: Any, up: Any, limit: float) -> Any:
    """The reference's unfused clamped SwiGLU: ``min(silu(gate), limit) * clamp(up,
    -limit, limit)`` (``build_ffn`` / ``build_moe_ffn`` with a ``swiglu_clamp_*`` limit)."""
    up = ctx.clamp(up, -limit, limit)
    act = ctx.clamp(ctx.silu(gate), float("-inf"), limit)
    return ctx.mul(act, up)


def _sqrtf(x: float) -> float:
    """``sqrtf((float) x)``: float32 square root."""
    return float(np.sqrt(np.float32(x)))


def _slice(ctx: Any, x: Any, idx: int) -> Any:
    """``gemma3n_view_2d_slice``: the 2-D slice ``idx`` of a 3-D tensor along dim 2."""
    return ctx.view_2d(x, x.ne[0], x.ne[1], int(x.nb[1]), idx * int(x.ne[0] * x.ne[1] * x.nb[0]))


def _logit_scale(g: Any, cur: Any) -> Any:
    """Cohere's ``logit_scale`` multiplies the logits (0 or absent: unscaled)."""
    scale = g.m.keys.f32(f"{g.hp.arch}.logit_scale", 0.0)
    return cur if scale == 0.0 else g.ctx.scale(cur, scale)


def _inverse_logit_scale(g: Any, cur: Any) -> Any:
    """Granite divides the logits by the (required) ``logit_scale``."""
    return g.ctx.scale(cur, f32_div(1.0, g.m.keys.f32(f"{g.hp.arch}.logit_scale")))


def _softcap(g: Any, cur: Any, cap: float) -> Any:
    """Logit soft-capping ``cap * tanh(cur / cap)`` (``cap`` 0: none)."""
    if cap == 0.0:
        return cur
    return g.ctx.scale(g.ctx.tanh(g.ctx.scale(cur, f32_div(1.0, cap))), cap)


def _muse_logits(g: Any, cur: Any) -> Any:
    """Muse-Glimmer: logits times ``logit_scale``, then ``cap * tanh(logits / cap)`` with
    ``final_logit_softcapping`` (30 when the file has none: the reference's default)."""
    cur = g.ctx.scale(cur, g.m.keys.f32(f"{g.hp.arch}.logit_scale"))
    cap = g.m.keys.f32(f"{g.hp.arch}.final_logit_softcapping", 30.0)
    return _softcap(g, cur, cap)


def _gemma4_logits(g: Any, cur: Any) -> Any:
    """Gemma-3n / Gemma-4 final soft-capping: ``final_logit_softcapping``, 30 when the
    file has none (the reference's default; 0 turns it off)."""
    cap = g.m.keys.f32(f"{g.hp.arch}.final_logit_softcapping", 30.0)
    return _softcap(g, cur, cap)


def _gemma3_logits(g: Any, cur: Any) -> Any:
    """Final logit soft-capping, only when the file sets ``final_logit_softcapping``."""
    field = g.m.keys.fields.get(f"{g.hp.arch}.final_logit_softcapping")
    cap = float(field.contents()) if field is not None else 0.0
    return _softcap(g, cur, cap)


ARCH_GRAPHS: dict[str, ArchGraph] = {
    "gemma3": ArchGraph(AttentionGraph.gemma3, finish=_gemma3_logits),
    # LFM2 names its output norm after the embeddings
    "qwen3moe": ArchGraph(AttentionGraph.qwen3moe),
    "exaone4": ArchGraph(AttentionGraph.exaone4),
    "maple": ArchGraph(AttentionGraph.maple),
    "gemma4": ArchGraph(AttentionGraph.gemma4, output_norm=None, finish=_gemma4_logits),
    "gemma3n": ArchGraph(AttentionGraph.gemma3n, finish=_gemma4_logits),
    "step35": ArchGraph(AttentionGraph.step35),
    "laguna": ArchGraph(AttentionGraph.laguna),
    "plamo3": ArchGraph(AttentionGraph.plamo3),
    "muse-glimmer": ArchGraph(AttentionGraph.muse_glimmer, finish=_muse_logits),
    "spark2_5": ArchGraph(AttentionGraph.spark2_5),
    "afmoe": ArchGraph(AttentionGraph.afmoe),
    "mimo2": ArchGraph(AttentionGraph.mimo2),
    "granite_swa": ArchGraph(AttentionGraph.granite_swa, finish=_inverse_logit_scale),
    "mellum": ArchGraph(AttentionGraph.mellum),
    "smallthinker": ArchGraph(AttentionGraph.smallthinker),
    "exaone-moe": ArchGraph(AttentionGraph.exaone_moe),
    "llama4": ArchGraph(AttentionGraph.llama4),
    "phi3": ArchGraph(AttentionGraph.phi3),
    "olmo2": ArchGraph(AttentionGraph.olmo2),
    # LayerNorm output norm, applied by the builder
    "cohere2": ArchGraph(AttentionGraph.cohere2, output_norm=None, finish=_logit_scale),
    "cohere2moe": ArchGraph(AttentionGraph.cohere2moe, output_norm=None, finish=_logit_scale),
    "gpt-oss": ArchGraph(AttentionGraph.gpt_oss),
    "lfm2moe": ArchGraph(AttentionGraph.lfm2moe, output_norm="token_embd_norm.weight"),
}
