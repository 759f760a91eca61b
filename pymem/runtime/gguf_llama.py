"""Real GGUF models decoded through pymem, graph for graph as llama.cpp builds them.

Why: the recorded llama.cpp runs (tests/data/runs) carry the reference's logits and
K/V/R/S bytes. A forward pass that builds *the same* ggml graph as llama.cpp, over the
memory pymem planned, on the same ggml, reproduces those numbers bit for bit; any
difference then points at pymem's memory (a wrong cell, row, mask entry, ``n_kv`` view,
state-copy index, snapshot plane), not at the model.

"The same graph" means the reference's builders, op for op (vendor/llama.cpp/src):

* ``models/llama.cpp`` with ``llm_graph_context::build_norm`` (RMS), ``build_qkv``
  (separate Q/K/V), ``ggml_rope_ext``, ``build_attn`` / ``build_attn_mha``,
  ``build_inp_out_ids`` (only output rows go through the last layer's tail) and
  ``build_ffn`` (SiLU, parallel gate: ``ggml_swiglu_split``);
* ``models/mamba.cpp`` with ``llm_build_mamba_base::build_mamba_layer`` and
  ``build_rs`` (conv state R and SSM state S gathered through ``s_copy``);
* ``models/jamba.cpp``: Mamba and attention layers (no RoPE) over the hybrid memory;
* ``models/gemma2.cpp``: embedding scale, Q scale, KQ and final logit soft-capping
  (``tanh``), post-attention / post-FFN norms, GELU FFN; SWA layers read the iSWA
  cache's SWA half;
* ``models/lfm2.cpp``: Q/K norms, and the short-convolution block whose conv state is
  written for the last ``n_rs_seq + 1`` tokens (the rollback planes).

Node order matters where ggml's CPU backend fuses adjacent nodes (``RMS_NORM`` followed
by ``MUL``) and where a store into the cache must precede the reads of it, so nodes are
expanded in the reference's order. Attention follows ``build_attn_mha``: flash attention
(``flash_attn_ext`` over K/V rows, F16 mask, F32 precision) when the context has it,
else ``mul_mat`` + ``soft_max_ext`` over transposed V (F32 mask), with attention sinks
where a graph passes them. MoE feed-forwards are built by the family modules
(``graph_attention.AttentionGraph.moe_ffn``, ``graph_delta``); LoRA, control vectors,
embeddings input and non-causal LFM2 are not built (:class:`~pymem.errors.UnsupportedError`).

Weights keep their file's type (F32, F16, Q8_0, the K-quants, ...; see
:class:`GGUFWeights`); the recorded q8_0 and q4_K models decode as llama.cpp decodes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

import pymem.ggml as gg
from pymem.backend import Device, TensorSpec, TensorStore, get_device
from pymem.errors import ConfigError, TypeSpecError, UnsupportedError
from pymem.gguf_spec import GGUFHParams, hparams_from_gguf, spec_from_gguf
from pymem.runtime import graph_attention, graph_delta, graph_rwkv, graph_ssm2
from pymem.runtime.arch_graph import ArchGraph, f32, f32_div
from pymem.runtime.graph import RecurrentInputs, StepInputs
from pymem.spec import ModelSpec, RopeSpec
from pymem.types import ggml_type
from pymem.ubatch import UBatch

NULL = gg.ffi.NULL
F32 = 4  # bytes per float32


# --- weights -------------------------------------------------------------------------


class GGUFWeights:
    """Every tensor of a GGUF file in one :class:`TensorStore`, by GGUF name.

    Tensors keep the file's type (F32, F16, BF16, Q8_0, the K-quants, ...): the bytes are
    copied as stored, and ggml's kernels (``mul_mat``, ``get_rows``) read them as
    llama.cpp's do. A type this ggml build does not know raises
    :class:`~pymem.errors.UnsupportedError` naming the tensor.
    """

    def __init__(self, path: str | os.PathLike[str], device: Device, reader: Any = None) -> None:
        reader = reader if reader is not None else gguf.GGUFReader(os.fspath(path))
        specs, payloads = [], []
        for t in reader.tensors:
            type_id = int(t.tensor_type)
            try:
                gtype = ggml_type(type_id)
            except TypeSpecError as exc:
                raise UnsupportedError(
                    f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, unknown to this "
                    f"ggml build"
                ) from exc
            # GGUF lists ggml's ne (ne0 first); the data is the stored bytes in that order
            specs.append(TensorSpec(t.name, gtype, tuple(int(n) for n in t.shape)))
            payloads.append(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))
        self.store = TensorStore(device, specs)
        for spec, data in zip(specs, payloads):
            self.store[spec.name].write_bytes(data)
        self.names = frozenset(s.name for s in specs)
        self.types = {s.name: ggml_type(s.type).name for s in specs}

    def get(self, name: str, required: bool = True) -> Any:
        """The ``ggml_tensor *`` of ``name`` (None when optional and absent)."""
        if name not in self.names:
            if required:
                raise ConfigError(f"model: tensor {name!r} not found")
            return None
        return self.store[name].ptr

    def close(self) -> None:
        self.store.close()


class _Keys:
    """Scalar metadata of a GGUF file (one reader for every key)."""

    def __init__(self, path: str, reader: Any) -> None:
        self.path = path
        self.fields = reader.fields

    def f32(self, key: str, default: float | None = None) -> float:
        field = self.fields.get(key)
        if field is None:
            if default is None:
                raise ConfigError(f"{self.path}: key not found in model: {key}")
            return default
        return float(field.contents())

    def bool_(self, key: str) -> bool:
        field = self.fields.get(key)
        return bool(field.contents()) if field is not None else False


# --- the model -----------------------------------------------------------------------


@dataclass(frozen=True)
class HParams:
    """What the graphs read besides the memory spec (``llama_hparams`` / ``llama_cparams``)."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_embd_head: int
    f_norm_rms_eps: float
    kq_scale: float  # 1/sqrtf(n_embd_head) in float32, as llama.cpp computes it
    ssm_d_conv: int
    ssm_d_inner: int
    ssm_d_state: int
    ssm_dt_rank: int
    ssm_dt_b_c_rms: bool  # RMS-norm dt, B and C (Falcon-Mamba; Jamba has the norm tensors)
    causal_attn: bool
    n_shortconv_l_cache: int  # LFM2
    attn_soft_cap: bool  # Gemma-2: tanh soft-capping of KQ and of the logits
    f_attn_logit_softcapping: float
    f_final_logit_softcapping: float
    f_attention_scale: float  # Gemma-2 scales Q (then KQ by 1)

    @classmethod
    def from_gguf(cls, keys: _Keys, hp: GGUFHParams, n_vocab: int) -> HParams:
        path = keys.path
        head = hp.n_embd_head_v_full
        # MLA (Kimi-Linear) keys K as [latent | rope] and V as the latent: the graphs that
        # build it use their own sizes and scale
        if hp.n_embd_head_k_full != head and max(hp.n_head) > 0 and not hp.is_mla:
            raise UnsupportedError(
                f"{path}: n_embd_head_k {hp.n_embd_head_k_full} != n_embd_head_v {head}"
            )
        kq_scale = float(np.float32(1.0) / np.sqrt(np.float32(head))) if head else 0.0
        attn_cap = keys.f32(f"{hp.arch}.attn_logit_softcapping", 50.0)
        final_cap = keys.f32(f"{hp.arch}.final_logit_softcapping", 30.0)
        if hp.arch == "gemma2":
            # the reference divides by both caps: 0 (or less) would give NaN logits silently
            for key, cap in (
                ("attn_logit_softcapping", attn_cap),
                ("final_logit_softcapping", final_cap),
            ):
                if not cap > 0.0:
                    raise ConfigError(
                        f"{path}: gemma2.{key} = {cap}; Gemma-2 soft-caps by dividing by it, "
                        f"so it must be > 0"
                    )
        return cls(
            arch=hp.arch,
            n_vocab=n_vocab,
            n_embd=hp.n_embd,
            n_layer=hp.n_layer,
            n_head=tuple(hp.n_head),
            n_head_kv=tuple(hp.n_head_kv),
            n_embd_head=head,
            # optional for RWKV (rwkv6 / rwkv7 files carry only the layer-norm epsilon)
            f_norm_rms_eps=keys.f32(
                f"{hp.arch}.attention.layer_norm_rms_epsilon", 0.0 if hp.wkv_head_size else None
            ),
            kq_scale=kq_scale,
            ssm_d_conv=hp.ssm_d_conv,
            ssm_d_inner=hp.ssm_d_inner,
            ssm_d_state=hp.ssm_d_state,
            ssm_dt_rank=hp.ssm_dt_rank,
            ssm_dt_b_c_rms=keys.bool_(f"{hp.arch}.ssm.dt_b_c_rms"),
            causal_attn=hp.causal_attn,
            n_shortconv_l_cache=hp.n_shortconv_l_cache,
            attn_soft_cap=hp.arch == "gemma2",
            f_attn_logit_softcapping=attn_cap,
            f_final_logit_softcapping=final_cap,
            # Gemma-2 of unknown size: 1/sqrtf(n_embd_head_k) (the 27B variant differs)
            f_attention_scale=kq_scale,
        )


class GGUFModel:
    """A llama / mamba / jamba / gemma2 / lfm2 GGUF model with its weights on one device.

    ``forward(ubatch, inputs, flash_attn)`` builds and computes llama.cpp's graph for one
    ubatch after its memory context was applied (K/V/R/S are written in place) and returns
    ``float32 [n_tokens, n_vocab]``: the logits of the ubatch's output tokens, NaN rows
    for the others (the graph computes only output rows, as ``build_inp_out_ids`` does).
    Drop-in for :class:`pymem.runtime.decoder.Decoder` (``config.n_vocab``). A memory
    whose layers sit on other devices than the weights (``device={il: "RPC0", ...}``) is
    computed with ggml's backend scheduler (``runners``: :class:`pymem.ggml.DeviceRunners`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str | Device | None = None,
        n_threads: int = 1,
    ) -> None:
        self.path = os.fspath(path)
        self.hp_file = hparams_from_gguf(self.path)
        arch_graph = ARCH_GRAPHS.get(self.hp_file.arch)
        if arch_graph is None:
            raise UnsupportedError(
                f"{self.path}: architecture {self.hp_file.arch!r}; supported: "
                f"{', '.join(sorted(ARCH_GRAPHS))}"
            )
        self.arch_graph: ArchGraph = arch_graph
        self.device = get_device(device)
        reader = gguf.GGUFReader(self.path)
        self.weights = GGUFWeights(self.path, self.device, reader)
        n_vocab = int(self.weights.store["token_embd.weight"].shape[1])
        # the file's keys, for architecture graphs that read keys of their own
        self.keys = _Keys(self.path, reader)
        self.hp = HParams.from_gguf(self.keys, self.hp_file, n_vocab)
        self.spec: ModelSpec = spec_from_gguf(self.path)
        # llama.cpp: a missing output.weight means tied embeddings (TENSOR_DUPLICATED)
        self.output = self.weights.get("output.weight", required=False)
        if self.output is None:
            self.output = self.weights.get("token_embd.weight")
        # one thread: the recorded runs were computed with one, and it is what keeps
        # every kernel's reduction order identical to the recording
        # a memory with layers on other devices: ggml's scheduler, one per set of devices
        self.runners = gg.DeviceRunners(
            self.device, n_threads=n_threads, weights=self.weights.get("token_embd.weight")
        )
        self.n_threads = n_threads

    @property
    def config(self) -> Any:
        """``n_vocab`` for :class:`pymem.runtime.decoder.Decoder`."""
        return self.hp

    def close(self) -> None:
        self.runners.close()
        self.weights.close()

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _w(self, il: int, name: str, required: bool = True) -> Any:
        return self.weights.get(f"blk.{il}.{name}", required)

    # --- one ubatch ---------------------------------------------------------------------
    def forward(self, ubatch: UBatch, inputs: StepInputs, flash_attn: bool = False) -> np.ndarray:
        """Compute one ubatch; K/V/R/S are written in place. See the class docstring."""
        hp = self.hp
        n_tokens = ubatch.n_tokens
        if ubatch.token is None:
            raise UnsupportedError("ubatch: embedding input; the GGUF models read token ids")
        out_ids = np.flatnonzero(ubatch.output != 0).astype(np.int32)
        n_outputs = int(out_ids.size)
        logits = np.full((n_tokens, hp.n_vocab), np.nan, dtype=np.float32)
        with gg.Context() as ctx:
            g = _Graph(self, ctx, ubatch, inputs, flash_attn)
            g.input("i32", (n_tokens,), ubatch.token.astype(np.int32), "inp_tokens")
            inp_tokens = g.last_input
            cur = ctx.get_rows(self.weights.get("token_embd.weight"), inp_tokens)
            g.expand(cur)
            t_out_ids = g.input("i32", (n_outputs,), out_ids, "inp_out_ids")
            arch = self.arch_graph
            cur = arch.build(g, cur, t_out_ids)
            if arch.output_norm is not None:
                cur = g.norm(cur, self.weights.get(arch.output_norm))
            cur = ctx.mul_mat(self.output, cur)
            if arch.finish is not None:
                cur = arch.finish(g, cur)
            g.expand(cur)
            gf = ctx.graph(g.nodes)
            if n_outputs:
                (out,) = self.runners.compute(gf, g.feed, [cur])
                logits[out_ids] = out.reshape(n_outputs, hp.n_vocab)
            else:
                self.runners.compute(gf, g.feed, [])
        return logits


class _Graph(
    graph_ssm2.SSM2Graph,
    graph_delta.DeltaNetGraph,
    graph_attention.AttentionGraph,
    graph_rwkv.RWKVGraph,
):
    """The nodes of one ubatch's graph, expanded in llama.cpp's order."""

    def __init__(
        self, model: GGUFModel, ctx: gg.Context, ubatch: UBatch, inputs: StepInputs, fa: bool
    ) -> None:
        self.m = model
        self.hp = model.hp
        self.ctx = ctx
        self.ubatch = ubatch
        self.inputs = inputs
        self.flash_attn = fa
        self.feed: dict[Any, np.ndarray] = {}
        self.nodes: list[Any] = []  # ggml_build_forward_expand order
        self.last_input: Any = None
        self._attn_in: dict[str, tuple[Any, Any, Any]] = {}
        self._inp_pos: Any = None
        self._s_copy: Any = None

    def expand(self, *nodes: Any) -> None:
        self.nodes.extend(nodes)

    def refuse_tensors(
        self, il: int, names: Sequence[str], why: str = "", rope_freqs: bool = False
    ) -> None:
        """:class:`UnsupportedError` naming the tensors of layer ``il`` among ``names`` that
        exist, and (``rope_freqs``) the file's one ``rope_freqs.weight`` (no layer index)."""
        found = [n for n in names if self.m._w(il, n, required=False) is not None]
        if rope_freqs and self.m.weights.get("rope_freqs.weight", required=False) is not None:
            found.append("rope_freqs.weight")
        if found:
            why = f" ({why})" if why else ""
            raise UnsupportedError(f"layer {il}: tensors the engine does not build{why}: {found}")

    def input(self, type_: str, shape: Sequence[int], values: np.ndarray, name: str) -> Any:
        t = self.ctx.new_tensor(type_, shape, name=name, input=True)
        self.feed[t] = values
        self.last_input = t
        return t

    def norm(self, cur: Any, w: Any) -> Any:
        """``build_norm(LLM_NORM_RMS)``: rms_norm then mul (fused by the CPU backend)."""
        return self.ctx.mul(self.ctx.rms_norm(cur, self.hp.f_norm_rms_eps), w)

    def ffn(self, il: int, cur: Any, gelu: bool = False) -> Any:
        """``build_ffn(up, gate, down, LLM_FFN_SILU or LLM_FFN_GELU, LLM_FFN_PAR)``."""
        ctx = self.ctx
        up = ctx.mul_mat(self.m._w(il, "ffn_up.weight"), cur)
        gate = ctx.mul_mat(self.m._w(il, "ffn_gate.weight"), cur)
        cur = geglu_split(ctx, gate, up) if gelu else swiglu_split(ctx, gate, up)
        return ctx.mul_mat(self.m._w(il, "ffn_down.weight"), cur)

    # --- inputs shared by the layers --------------------------------------------------
    def inp_pos(self) -> Any:
        if self._inp_pos is None:
            self._inp_pos = self.input(
                "i32", (self.ubatch.n_tokens,), self.ubatch.pos0.astype(np.int32), "inp_pos"
            )
        return self._inp_pos

    def attn_inputs(self, part: str) -> tuple[Any, Any, Any]:
        """(KQ mask, k_idxs, v_idxs) of one attention memory (``build_attn_inp_kv``)."""
        if part not in self._attn_in:
            ai = self.inputs.attn[part]
            n_tps = self.ubatch.n_tokens // ai.n_stream
            mask = ai.kq_mask(self.ubatch)
            if mask.shape != (ai.n_stream, n_tps, ai.n_kv):
                raise ConfigError(
                    f"kq_mask[{part}]: shape {mask.shape}, expected {(ai.n_stream, n_tps, ai.n_kv)}"
                )
            # flash attention takes an F16 mask, soft_max_ext an F32 one
            mask_type = "f16" if self.flash_attn else "f32"
            dtype = np.float16 if self.flash_attn else np.float32
            t_mask = self.input(
                mask_type, (ai.n_kv, n_tps, 1, ai.n_stream), mask.astype(dtype), f"kq_mask_{part}"
            )
            k_idxs = ai.k_idxs(self.ubatch).astype(np.int64)
            v_idxs = ai.v_idxs(self.ubatch).astype(np.int64)
            t_k = self.input("i64", (k_idxs.size,), k_idxs, f"k_idxs_{part}")
            t_v = self.input("i64", (v_idxs.size,), v_idxs, f"v_idxs_{part}")
            self._attn_in[part] = (t_mask, t_k, t_v)
        return self._attn_in[part]

    def s_copy(self) -> Any:
        if self._s_copy is None:
            rs = self._recr()
            s_copy = rs.s_copy().astype(np.int32)
            self._s_copy = self.input("i32", (s_copy.size,), s_copy, "inp_s_copy")
        return self._s_copy

    def _recr(self) -> RecurrentInputs:
        if self.inputs.recr is None:
            raise ConfigError("recurrent layer, but the memory gave no recurrent inputs")
        return self.inputs.recr

    # --- architectures ------------------------------------------------------------------
    def llama(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_llama::graph`` up to (not including) the output norm."""
        ctx, hp = self.ctx, self.hp
        inpL = inp
        for il in range(hp.n_layer):
            inpSA = inpL
            cur = self.norm(inpL, self.m._w(il, "attn_norm.weight"))
            cur = self.attention(il, cur)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpSA = ctx.get_rows(inpSA, out_ids)
            ffn_inp = ctx.add(cur, inpSA)
            cur = self.norm(ffn_inp, self.m._w(il, "ffn_norm.weight"))
            cur = self.ffn(il, cur)
            inpL = ctx.add(cur, ffn_inp)
        return inpL

    def mamba(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_mamba::graph`` up to the output norm."""
        ctx, hp = self.ctx, self.hp
        self.s_copy()  # build_rs_inp comes before build_inp_out_ids
        inpL = inp
        for il in range(hp.n_layer):
            cur = self.norm(inpL, self.m._w(il, "attn_norm.weight"))
            cur = self.mamba_layer(il, cur)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpL = ctx.get_rows(inpL, out_ids)
            inpL = ctx.add(cur, inpL)
        return inpL

    def jamba(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_jamba::graph`` up to the output norm (dense FFN layers only)."""
        ctx, hp = self.ctx, self.hp
        inpL = inp
        for il in range(hp.n_layer):
            cur = self.norm(inpL, self.m._w(il, "attn_norm.weight"))
            cur = self.mamba_layer(il, cur) if hp.n_head_kv[il] == 0 else self.attention(il, cur)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpL = ctx.get_rows(inpL, out_ids)
            ffn_inp = ctx.add(inpL, cur)
            cur = self.norm(ffn_inp, self.m._w(il, "ffn_norm.weight"))
            if self.m._w(il, "ffn_gate_inp.weight", required=False) is not None:
                raise UnsupportedError(f"layer {il}: MoE feed-forward is not supported")
            cur = self.ffn(il, cur)
            inpL = ctx.add(ffn_inp, cur)
        return inpL

    def gemma2(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_gemma2::graph`` up to the output norm."""
        return self.gemma_layers(inp, out_ids, qk_norm=False)

    def gemma_layers(self, inp: Any, out_ids: Any, qk_norm: bool) -> Any:
        """Gemma-2 / Gemma-3 layers: scaled embeddings, Q scaled before KQ, post-norms, GELU FFN.

        Gemma-3 adds RMS norms of Q and K before RoPE (``qk_norm``); its KQ is not
        soft-capped (``HParams.attn_soft_cap`` is Gemma-2's alone).
        """
        ctx, hp, w = self.ctx, self.hp, self.m._w
        inpL = ctx.scale(inp, float(np.sqrt(np.float32(hp.n_embd))))
        for il in range(hp.n_layer):
            cur = self.norm(inpL, w(il, "attn_norm.weight"))
            cur = self.attention(
                il, cur, qk_norm=qk_norm, q_scale=hp.f_attention_scale, kq_scale=1.0
            )
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                inpL = ctx.get_rows(inpL, out_ids)
            cur = self.norm(cur, w(il, "post_attention_norm.weight"))
            sa_out = ctx.add(cur, inpL)
            cur = self.norm(sa_out, w(il, "ffn_norm.weight"))
            cur = self.ffn(il, cur, gelu=True)
            cur = self.norm(cur, w(il, "post_ffw_norm.weight"))
            inpL = ctx.add(cur, sa_out)
        return inpL

    def lfm2(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_lfm2::graph`` (dense FFN) up to the output norm."""
        ctx, hp, w = self.ctx, self.hp, self.m._w
        cur = inp
        for il in range(hp.n_layer):
            prev_cur = cur
            cur = self.norm(cur, w(il, "attn_norm.weight"))
            if self.m.spec.layers[il].recurrent:
                cur = self.shortconv(il, cur)
            else:
                cur = self.attention(il, cur, qk_norm=True)
            if il == hp.n_layer - 1:
                cur = ctx.get_rows(cur, out_ids)
                prev_cur = ctx.get_rows(prev_cur, out_ids)
            cur = ctx.add(prev_cur, cur)
            # dense, or MoE layers of lfm2moe (graph_attention.AttentionGraph.lfm2_ffn)
            ffn_out = self.lfm2_ffn(il, self.norm(cur, w(il, "ffn_norm.weight")))
            cur = ctx.add(cur, ffn_out)
        return cur

    # --- attention ----------------------------------------------------------------------
    def attention(
        self,
        il: int,
        cur: Any,
        qk_norm: bool = False,
        q_scale: float | None = None,
        kq_scale: float | None = None,
    ) -> Any:
        """``build_qkv`` (+ Q/K RMS norms) + RoPE (+ Q scale) + ``build_attn`` + ``wo``."""
        ctx, hp = self.ctx, self.hp
        n_tokens = self.ubatch.n_tokens
        hd, nh, nkv = hp.n_embd_head, hp.n_head[il], hp.n_head_kv[il]
        q = ctx.mul_mat(self.m._w(il, "attn_q.weight"), cur)
        k = ctx.mul_mat(self.m._w(il, "attn_k.weight"), cur)
        v = ctx.mul_mat(self.m._w(il, "attn_v.weight"), cur)
        q = ctx.reshape_3d(q, hd, nh, n_tokens)
        k = ctx.reshape_3d(k, hd, nkv, n_tokens)
        v = ctx.reshape_3d(v, hd, nkv, n_tokens)
        if qk_norm:
            q = self.norm(q, self.m._w(il, "attn_q_norm.weight"))
            k = self.norm(k, self.m._w(il, "attn_k_norm.weight"))
        rope = self.m.spec.layers[il].rope
        if rope is not None:
            q = self.rope(q, rope)
            k = self.rope(k, rope)
        if q_scale is not None:
            q = ctx.scale(q, q_scale)

        part = self.inputs.attn_part(il)
        ai = self.inputs.attn[part]
        t_mask, t_kidx, t_vidx = self.attn_inputs(part)
        # build_attn keeps q, k, v together (a plain KV cache expands K last, for rope
        # fusion), then the stores, then the cache views
        self.expand(*((q, v, k) if part == "kv" else (q, k, v)))
        self.expand(ai.cpy_k(ctx, k, t_kidx, il))
        self.expand(ai.cpy_v(ctx, v, t_vidx, il))
        k_view = ai.get_k(ctx, il)
        v_view = ai.get_v(ctx, il)
        scale = hp.kq_scale if kq_scale is None else kq_scale
        cur = self.attn_mha(q, k_view, v_view, t_mask, scale)
        self.expand(cur)
        return ctx.mul_mat(self.m._w(il, "attn_output.weight"), cur)

    def rope(self, t: Any, rope: RopeSpec) -> Any:
        """``ggml_rope_ext`` at the ubatch's positions, with the layer's frequency factors
        (``rope_freqs.weight``, as ``llama_model::get_rope_factors`` gives them)."""
        return self.ctx.rope_ext(
            t,
            self.inp_pos(),
            self.rope_factors(rope),
            rope.n_rot,
            int(rope.rope_type),
            rope.n_ctx_orig,
            rope.freq_base,
            rope.freq_scale,
            rope.ext_factor,
            rope.attn_factor,
            rope.beta_fast,
            rope.beta_slow,
        )

    def rope_factors(self, rope: RopeSpec) -> Any:
        """The factors tensor of a layer whose spec carries factors (``NULL``: none), as
        ``llama_model::get_rope_factors`` picks it: ``rope_freqs`` when the file has it,
        else ``rope_factors_long`` when the context's ``n_ctx_seq`` exceeds the original
        context and ``rope_factors_short`` otherwise (``NULL`` where that one is missing).
        """
        if rope.freq_factors is None and rope.freq_factors_long is None:
            return NULL
        weights = self.m.weights
        if "rope_freqs.weight" in weights.names:
            return weights.get("rope_freqs.weight")
        n_ctx_seq = self.inputs.n_ctx_seq
        if n_ctx_seq is None:
            raise UnsupportedError(
                f"{self.m.path}: long / short RoPE factors need the context's n_ctx_seq "
                f"(decode with a memory made by pymem.factory.create_memory)"
            )
        name = "rope_factors_long" if rope.uses_long(n_ctx_seq) else "rope_factors_short"
        factors = weights.get(f"{name}.weight", required=False)
        return NULL if factors is None else factors

    def attn_mha(
        self, q: Any, k: Any, v: Any, kq_mask: Any, kq_scale: float, sinks: Any = None
    ) -> Any:
        """``build_attn_mha`` without KQ bias, MLA or ALiBi (``sinks``: per-head attention
        sink logits, gpt-oss)."""
        ctx, hp = self.ctx, self.hp
        softcap = hp.f_attn_logit_softcapping if hp.attn_soft_cap else 0.0
        v_trans = int(v.nb[1]) > int(v.nb[2])
        n_stream = int(k.ne[3])
        n_tps = int(q.ne[2]) // n_stream
        q = ctx.view_4d(q, q.ne[0], q.ne[1], n_tps, n_stream, q.nb[1], q.nb[2], q.nb[2] * n_tps, 0)
        q = ctx.permute(q, 0, 2, 1, 3)
        k = ctx.permute(k, 0, 2, 1, 3)
        v = ctx.permute(v, 0, 2, 1, 3)
        if self.flash_attn:
            if v_trans:
                v = ctx.transpose(v)
            # the reference casts only F32 K/V (a cache is never F32 with its own types)
            if k.type == gg.lib.GGML_TYPE_F32:
                k = ctx.cast(k, gg.lib.GGML_TYPE_F16)
            if v.type == gg.lib.GGML_TYPE_F32:
                v = ctx.cast(v, gg.lib.GGML_TYPE_F16)
            cur = ctx.flash_attn_ext(q, k, v, kq_mask, f32(kq_scale), 0.0, softcap)
            if sinks is not None:
                gg.lib.ggml_flash_attn_ext_add_sinks(cur, sinks)
            gg.lib.ggml_flash_attn_ext_set_prec(cur, gg.lib.GGML_PREC_F32)
            return ctx.reshape_2d(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])
        kq = ctx.mul_mat(k, q)
        gg.lib.ggml_mul_mat_set_prec(kq, gg.lib.GGML_PREC_F32)
        if softcap:
            kq = ctx.scale(kq, f32_div(1.0, softcap))
            kq = tanh(ctx, kq)
            kq = ctx.scale(kq, softcap)
        kq = ctx.soft_max_ext(kq, kq_mask, f32(kq_scale), 0.0)
        if sinks is not None:
            gg.lib.ggml_soft_max_add_sinks(kq, sinks)
        if not v_trans:
            v = ctx.cont(ctx.transpose(v))
        kqv = ctx.mul_mat(v, kq)
        cur = ctx.permute(kqv, 0, 2, 1, 3)
        return ctx.cont_2d(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])

    # --- mamba ----------------------------------------------------------------------------
    def build_rs(self, s: Any, state_size: int, get_state_rows: Callable[[Any, Any], Any]) -> Any:
        """``llm_graph_context::build_rs``: zero row ``rs_z``, read the ubatch's states
        through ``s_copy[:n_seqs]`` (``get_state_rows``), then copy the other moved states
        (``s_copy[n_seqs:n_rs]``) to rows ``[head + n_seqs, head + n_rs)``."""
        ctx, rs = self.ctx, self._recr()
        n_seqs = self.ubatch.n_seqs
        s_copy = self.s_copy()
        states = ctx.reshape_2d(s, state_size, int(gg.lib.ggml_nelements(s)) // state_size)
        nb1 = int(states.nb[1])
        if rs.rs_z >= 0:
            # the reference scales the row by 0 in place: x * 0 (NaN stays NaN, -x gives -0)
            zero = ctx.view_1d(states, state_size, rs.rs_z * nb1)
            self.expand(ctx.cpy(ctx.scale(zero, 0.0), zero))
        output_states = get_state_rows(states, ctx.view_1d(s_copy, n_seqs, 0))
        self.expand(output_states)
        if rs.n_rs > n_seqs:
            extra_ids = ctx.view_1d(s_copy, rs.n_rs - n_seqs, n_seqs * int(s_copy.nb[0]))
            dst = ctx.view_2d(s, state_size, rs.n_rs - n_seqs, nb1, (rs.head + n_seqs) * nb1)
            self.expand(ctx.cpy(ctx.get_rows(states, extra_ids), dst))
        return output_states

    def mamba_layer(self, il: int, cur: Any) -> Any:
        """``llm_build_mamba_base::build_mamba_layer`` (Mamba-1: one head per channel)."""
        ctx, hp, ub = self.ctx, self.hp, self.ubatch
        rs = self._recr()
        w = self.m._w
        n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        if not ub.equal_seqs or n_seqs * n_seq_tokens != ub.n_tokens:
            raise ConfigError(
                "ubatch: Mamba layers need an equal-sequence split (split_equal or split_seq)"
            )
        if rs.n_rs_seq:
            raise UnsupportedError("Mamba-1 layers: rollback snapshots (n_rs_seq > 0)")
        d_conv, d_inner, d_state = hp.ssm_d_conv, hp.ssm_d_inner, hp.ssm_d_state
        dt_rank, n_head, head_dim = hp.ssm_dt_rank, hp.ssm_d_inner, 1
        head = rs.head
        r_all, s_all = rs.r_tensor(il).ptr, rs.s_tensor(il).ptr
        r_el, s_el = int(r_all.nb[0]), int(s_all.nb[0])

        conv = self.build_rs(r_all, (d_conv - 1) * d_inner, ctx.get_rows)
        conv = ctx.reshape_3d(conv, d_conv - 1, d_inner, n_seqs)

        cur = ctx.reshape_3d(cur, cur.ne[0], n_seq_tokens, n_seqs)
        xz = ctx.mul_mat(w(il, "ssm_in.weight"), cur)  # [2 * d_inner, n_seq_tokens, n_seqs]
        x = ctx.view_3d(xz, d_inner, xz.ne[1], xz.ne[2], xz.nb[1], xz.nb[2], 0)
        z = ctx.view_3d(xz, d_inner, xz.ne[1], xz.ne[2], xz.nb[1], xz.nb[2], d_inner * F32)

        # conv over [d_conv - 1 state columns | the tokens]; the last d_conv - 1 columns
        # are the new conv state, stored at rows [head, head + n_seqs)
        conv_x = ctx.concat(conv, ctx.transpose(x), 0)
        last_conv = ctx.view_3d(
            conv_x, d_conv - 1, d_inner, n_seqs, conv_x.nb[1], conv_x.nb[2],
            n_seq_tokens * int(conv_x.nb[0]),
        )  # fmt: skip
        n_conv = (d_conv - 1) * d_inner * n_seqs
        dst = ctx.view_1d(r_all, n_conv, head * (d_conv - 1) * d_inner * r_el)
        self.expand(ctx.cpy(last_conv, dst))
        x = ctx.ssm_conv(conv_x, w(il, "ssm_conv1d.weight"))
        x = ctx.add(x, w(il, "ssm_conv1d.bias"))
        x = ctx.silu(x)

        x_db = ctx.mul_mat(w(il, "ssm_x.weight"), x)  # [dt_rank + 2 * d_state, ...]
        nb0, nb1, nb2 = int(x_db.nb[0]), int(x_db.nb[1]), int(x_db.nb[2])
        dt = ctx.view_3d(x_db, dt_rank, n_seq_tokens, n_seqs, nb1, nb2, 0)
        b = ctx.view_4d(x_db, d_state, 1, n_seq_tokens, n_seqs, d_state * nb0, nb1, nb2,
                        F32 * dt_rank)  # fmt: skip
        c = ctx.view_4d(x_db, d_state, 1, n_seq_tokens, n_seqs, d_state * nb0, nb1, nb2,
                        F32 * (dt_rank + d_state))  # fmt: skip
        norms = [w(il, f"ssm_{n}_norm.weight", required=False) for n in ("dt", "b", "c")]
        if hp.ssm_dt_b_c_rms or all(n is not None for n in norms):
            dt, b, c = (self.norm(t, n) for t, n in zip((dt, b, c), norms))
        else:
            dt = ctx.cont(dt)
        dt = ctx.mul_mat(w(il, "ssm_dt.weight"), dt)
        dt = ctx.add(dt, w(il, "ssm_dt.bias"))

        cur = x
        x = ctx.reshape_4d(x, head_dim, n_head, n_seq_tokens, n_seqs)
        a = w(il, "ssm_a")

        def get_ssm_rows(states: Any, ids: Any) -> Any:
            ssm = ctx.reshape_4d(states, d_state, head_dim, n_head, rs.size)
            return ctx.ssm_scan(ssm, x, dt, a, b, c, ids, 1)

        y_ssm = self.build_rs(s_all, d_state * d_inner, get_ssm_rows)
        # y_ssm = [y of every token | the last state of each sequence]
        n_state = d_state * d_inner * n_seqs
        y_bytes = int(x.nb[3]) * int(x.ne[3])
        self.expand(
            ctx.cpy(
                ctx.view_1d(y_ssm, n_state, y_bytes),
                ctx.view_1d(s_all, n_state, head * d_state * d_inner * s_el),
            )
        )
        y = ctx.view_3d(y_ssm, d_inner, n_seq_tokens, n_seqs, x.nb[2], x.nb[3], 0)
        y = ctx.add(y, ctx.mul(cur, w(il, "ssm_d")))
        y = swiglu_split(ctx, ctx.cont(z), y)
        cur = ctx.mul_mat(w(il, "ssm_out.weight"), y)
        return ctx.reshape_2d(cur, cur.ne[0], n_seq_tokens * n_seqs)

    # --- LFM2 short convolution -------------------------------------------------------
    def shortconv(self, il: int, cur: Any) -> Any:
        """LFM2's ``build_shortconv_block`` (causal): gated depthwise conv over the last
        ``L_cache - 1`` inputs, whose state (and, with ``n_rs_seq``, the states 1..n_rs_seq
        tokens back, planes 1..) is stored at rows ``[head, head + n_seqs)``."""
        ctx, hp, ub = self.ctx, self.hp, self.ubatch
        rs = self._recr()
        w = self.m._w
        n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        if not ub.equal_seqs or n_seqs * n_seq_tokens != ub.n_tokens:
            raise ConfigError(
                "ubatch: short-conv layers need an equal-sequence split (split_equal or split_seq)"
            )
        if not hp.causal_attn:
            raise UnsupportedError("LFM2 short convolution: non-causal (needs ggml_pad_ext)")
        d_conv = hp.n_shortconv_l_cache - 1
        n_embd = hp.n_embd

        cur = ctx.reshape_3d(cur, cur.ne[0], n_seq_tokens, n_seqs)
        bcx = ctx.mul_mat(w(il, "shortconv.in_proj.weight"), cur)
        chunk = int(bcx.ne[0]) // 3
        b, c, x = (
            ctx.view_3d(bcx, chunk, bcx.ne[1], bcx.ne[2], bcx.nb[1], bcx.nb[2], j * chunk * F32)
            for j in range(3)
        )
        bx = ctx.transpose(ctx.mul(b, x))

        conv_state = rs.r_tensor(il).ptr
        conv_rs = self.build_rs(conv_state, d_conv * n_embd, ctx.get_rows)
        conv = ctx.reshape_3d(conv_rs, d_conv, n_embd, n_seqs)
        bx = ctx.concat(conv, bx, 0)

        # slot 0 = the final state, slot s = the state s tokens back (rollback planes)
        big_k = rs.n_rs_seq + 1 if rs.n_rs_seq > 0 else 1
        n_written = min(n_seq_tokens, big_k)
        row_size = int(gg.lib.ggml_row_size(conv_state.type, d_conv * n_embd))
        el = int(bx.nb[0])
        for slot in range(n_written):
            snap = ctx.view_3d(bx, d_conv, bx.ne[1], bx.ne[2], bx.nb[1], bx.nb[2],
                               (int(bx.ne[0]) - d_conv - slot) * el)  # fmt: skip
            dst = ctx.view_2d(conv_state, d_conv * n_embd, n_seqs, conv_state.nb[1],
                              (slot * rs.size + rs.head) * row_size)  # fmt: skip
            self.expand(ctx.cpy(snap, dst))

        conv_out = ctx.ssm_conv(bx, w(il, "shortconv.conv.weight"))
        y = ctx.mul(c, conv_out)
        y = ctx.mul_mat(w(il, "shortconv.out_proj.weight"), y)
        return ctx.reshape_2d(y, y.ne[0], n_seq_tokens * n_seqs)


# --- fused ops, named as llama.cpp's graph uses them ----------------------------------


def swiglu_split(ctx: gg.Context, gate: Any, up: Any) -> Any:
    """``ggml_swiglu_split(ctx, gate, up)``: silu(gate) * up in one node, as llama.cpp's FFN."""
    return ctx.swiglu_split(gate, up)


def geglu_split(ctx: gg.Context, gate: Any, up: Any) -> Any:
    """``ggml_geglu_split(ctx, gate, up)``: gelu(gate) * up, Gemma-2's FFN."""
    return ctx.geglu_split(gate, up)


def tanh(ctx: gg.Context, a: Any) -> Any:
    """``ggml_tanh(ctx, a)`` (soft-capping)."""
    return ctx.tanh(a)


def _soft_cap_logits(g: _Graph, cur: Any) -> Any:
    """Gemma-2's final logit soft-capping: ``cap * tanh(logits / cap)``."""
    cap = g.hp.f_final_logit_softcapping
    cur = g.ctx.scale(cur, f32_div(1.0, cap))
    return g.ctx.scale(tanh(g.ctx, cur), cap)


ARCH_GRAPHS: dict[str, ArchGraph] = {
    "llama": ArchGraph(_Graph.llama),
    "mamba": ArchGraph(_Graph.mamba),
    "jamba": ArchGraph(_Graph.jamba),
    "gemma2": ArchGraph(_Graph.gemma2, finish=_soft_cap_logits),
    # LFM2 names its output norm after the embeddings
    "lfm2": ArchGraph(_Graph.lfm2, output_norm="token_embd_norm.weight"),
}
for _family in (graph_ssm2, graph_attention, graph_delta, graph_rwkv):
    if ARCH_GRAPHS.keys() & _family.ARCH_GRAPHS.keys():
        raise RuntimeError(f"{_family.__name__}: architectures registered twice")
    ARCH_GRAPHS.update(_family.ARCH_GRAPHS)
SUPPORTED = tuple(ARCH_GRAPHS)
"""Every architecture the engine builds (llama.cpp's graph, op for op)."""
