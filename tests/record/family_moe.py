"""MoE variants of attention architectures whose tiny models in family_attention.py are all
dense: tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).

Why: family_attention's afmoe, laguna, exaone-moe, cohere2moe, mimo2, step35,
granite_swa and gemma4 models have no MoE layer, so their recorded runs never reach
``build_moe_ffn``. These variants keep the same attention (and so the same memory) with
dense and MoE layers (4 experts, 2 used; each writer says which routing, bias,
normalisation, scale and shared expert), so the GGUF engine's MoE path of each graph is
checked against llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from family_attention import (
    HEAD,
    N_EMBD,
    N_HEAD,
    N_HEAD_KV,
    N_SWA,
    _gated_attn_norms,
    _gemma4_keys,
)
from models import _attn, _common, _ffn, _gemma_layer, _head, _Model, _moe, _shexp
from runconfig import RunConfig

N_EXPERT, N_EXPERT_USED, N_FF_EXP = 4, 2, 8


def _moe_keys(m: _Model, n_dense: int, gating: int | None) -> None:
    """Expert counts and sizes, one shared expert, normalised weights scaled by 2.5."""
    m.u32("leading_dense_block_count", n_dense)
    m.u32("expert_count", N_EXPERT)
    m.u32("expert_used_count", N_EXPERT_USED)
    m.u32("expert_feed_forward_length", N_FF_EXP)
    m.u32("expert_shared_count", 1)
    m.u32("expert_shared_feed_forward_length", N_FF_EXP)
    m.w.add_bool(f"{m.arch}.expert_weights_norm", True)
    m.f32("expert_weights_scale", 2.5)
    if gating is not None:
        m.u32("expert_gating_func", gating)


def _moe_tensors(m: _Model, il: int) -> None:
    """Router, selection bias, expert and shared-expert matrices of layer ``il``."""
    _moe(m, il, N_EMBD, N_FF_EXP, N_EXPERT, probs_b=True)
    _shexp(m, il, N_EMBD, N_FF_EXP)


def write_afmoe_moe(path: Path) -> Path:
    """afmoe: family_attention's 4 layers (window 8, layers 0..2 slide), layer 0 dense,
    layers 1..3 MoE. No ``expert_gating_func``: the loader's default, sigmoid."""
    n_layer, n_ff, n_dense = 4, 24, 1
    m = _Model(path, "afmoe", "tiny-afmoe-moe", seed=179)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    _moe_keys(m, n_dense, None)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _gated_attn_norms(m, il)
        if il < n_dense:
            _ffn(m, il, N_EMBD, n_ff)
        else:
            _moe_tensors(m, il)
    m.finish()
    return path


def write_laguna_moe(path: Path) -> Path:
    """laguna: family_attention's 4 layers (layer 0 full, 1..3 slide; per-head gate),
    layer 0 dense, layers 1..3 MoE with sigmoid routing (``expert_gating_func`` 2)."""
    n_layer, n_ff, n_dense = 4, 24, 1
    m = _Model(path, "laguna", "tiny-laguna-moe", seed=183)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.u32("rope.dimension_count", HEAD // 2)
    m.u32("rope.dimension_count_swa", HEAD)
    m.f32("rope.freq_base", 500000.0)
    _moe_keys(m, n_dense, 2)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, qk_norm=True)
        m.weight(f"blk.{il}.attn_gate.weight", (N_EMBD, N_HEAD))
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        if il < n_dense:
            _ffn(m, il, N_EMBD, n_ff)
        else:
            _moe_tensors(m, il)
    m.finish()
    return path


def write_exaone_moe_moe(path: Path) -> Path:
    """exaone-moe: family_attention's 4 layers (layers 0..2 slide), layer 0 dense, layers
    1..3 MoE with sigmoid routing (``expert_gating_func`` 2) and the selection bias."""
    n_layer, n_ff, n_dense = 4, 24, 1
    m = _Model(path, "exaone-moe", "tiny-exaone-moe-moe", seed=197)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    _moe_keys(m, n_dense, 2)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, qk_norm=True)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        if il < n_dense:
            _ffn(m, il, N_EMBD, n_ff)
        else:
            _moe_tensors(m, il)
    m.finish()
    return path


def write_cohere2moe_moe(path: Path) -> Path:
    """cohere2moe: family_attention's 4 layers (layer 0 full, 1..3 slide; parallel
    attention and ffn), layer 0 dense, layers 1..3 MoE with softmax routing and fused
    gate|up experts (``ffn_gate_up_exps``), no selection bias; the shared expert's sum
    is halved by the graph."""
    n_layer, n_ff, n_dense = 4, 24, 1
    m = _Model(path, "cohere2moe", "tiny-cohere2moe-moe", seed=227)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.f32("logit_scale", 0.5)
    _moe_keys(m, n_dense, 1)
    _head(m, N_EMBD, tied=True)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        if il < n_dense:
            _ffn(m, il, N_EMBD, n_ff)
            continue
        m.weight(f"blk.{il}.ffn_gate_inp.weight", (N_EMBD, N_EXPERT))
        m.weight(f"blk.{il}.ffn_gate_up_exps.weight", (N_EMBD, 2 * N_FF_EXP, N_EXPERT))
        m.weight(f"blk.{il}.ffn_down_exps.weight", (N_FF_EXP, N_EMBD, N_EXPERT))
        _shexp(m, il, N_EMBD, N_FF_EXP)
    m.finish()
    return path


def write_mimo2_moe(path: Path) -> Path:
    """mimo2: family_attention's 2 layers (pattern [1, 0], K/V heads [2, 1]), layer 0
    dense, layer 1 MoE (a layer is MoE when it has a router): sigmoid routing with the
    selection bias and normalised weights, no shared expert, no weight scale."""
    n_layer, n_ff = 2, 24
    kv_heads = [2, 1]
    m = _Model(path, "mimo2", "tiny-mimo2-moe", seed=173)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.arr("attention.head_count_kv", kv_heads)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [1, 0])
    m.u32("expert_count", N_EXPERT)
    m.u32("expert_used_count", N_EXPERT_USED)
    m.u32("expert_feed_forward_length", N_FF_EXP)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, kv_heads[il], HEAD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        if il == 0:
            _ffn(m, il, N_EMBD, n_ff)
            continue
        _moe(m, il, N_EMBD, N_FF_EXP, N_EXPERT, probs_b=True)
    m.finish()
    return path


def write_step35_moe(path: Path) -> Path:
    """step35: family_attention's 2 layers (pattern [1, 0]), layer 0 dense, layer 1 MoE
    (it has a router): sigmoid routing by default, the selection bias, normalised weights
    scaled by 2.5 and a shared expert. ``swiglu_clamp_exp`` 0.5 clamps the experts'
    SwiGLU and ``swiglu_clamp_shexp`` 0.7 the shared expert's and the dense layer's (the
    reference clamps every parallel SiLU FFN of step35 with it), both with separate ops.
    The optional per-head Q/K norms (both layers) and head gate (layer 1) are present."""
    n_layer, n_ff = 2, 24
    m = _Model(path, "step35", "tiny-step35-moe", seed=171)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [1, 0])
    m.f32("rope.freq_base_swa", 5000.0)
    m.u32("expert_count", N_EXPERT)
    m.u32("expert_used_count", N_EXPERT_USED)
    m.u32("expert_feed_forward_length", N_FF_EXP)
    m.u32("expert_shared_feed_forward_length", N_FF_EXP)
    m.w.add_bool(f"{m.arch}.expert_weights_norm", True)
    m.f32("expert_weights_scale", 2.5)
    m.f32("swiglu_clamp_exp", 0.5)
    m.f32("swiglu_clamp_shexp", 0.7)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, qk_norm=True)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        if il == 0:
            _ffn(m, il, N_EMBD, n_ff)
        else:
            m.weight(f"blk.{il}.attn_gate.weight", (N_EMBD, N_HEAD))
            _moe_tensors(m, il)
    m.finish()
    return path


def write_granite_swa_moe(path: Path) -> Path:
    """granite_swa: family_attention's 3 layers (pattern [1, 0, 1], rope_pattern [1, 1, 0],
    sinks), every layer MoE (``expert_count`` > 0; ``feed_forward_length`` is the experts'
    width): softmax routing, normalised weights, the shared expert's gate|up fused in
    ``ffn_up_shexp``. Granite's embedding, residual and attention scales are set too."""
    n_layer = 3
    m = _Model(path, "granite_swa", "tiny-granite-swa-moe", seed=189)
    _common(m, N_EMBD, n_layer, N_FF_EXP, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [1, 0, 1])
    m.arr("attention.rope_pattern", [1, 1, 0])
    m.f32("logit_scale", 0.5)
    m.f32("embedding_scale", 2.0)
    m.f32("residual_scale", 0.5)
    m.f32("attention.scale", 0.25)
    m.f32("rope.freq_base", 100000.0)
    m.u32("expert_count", N_EXPERT)
    m.u32("expert_used_count", N_EXPERT_USED)
    m.u32("expert_shared_feed_forward_length", N_FF_EXP)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        m.weight(f"blk.{il}.attn_sinks.weight", (N_HEAD,), scale=1.0)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _moe(m, il, N_EMBD, N_FF_EXP, N_EXPERT)
        m.weight(f"blk.{il}.ffn_up_shexp.weight", (N_EMBD, 2 * N_FF_EXP))
        m.weight(f"blk.{il}.ffn_down_shexp.weight", (N_FF_EXP, N_EMBD))
    m.finish()
    return path


def write_gemma4_moe(path: Path) -> Path:
    """gemma4: family_attention's 2 layers (pattern [1, 0]; SWA heads of 4, full 8), layer 1
    with experts beside its dense GeGLU: the router reads the unweighted-normed layer
    input scaled by 1/sqrt(n_embd) and ``ffn_gate_inp.scale``; softmax, normalised
    weights, GeGLU experts; the dense and expert branches have their own norms. The full
    layer's ``rope_freqs`` are random in [1, 2] (family_attention's are ones)."""
    n_layer, n_ff, head_swa = 2, 24, 4
    m = _Model(path, "gemma4", "tiny-gemma4-moe", seed=209)
    _gemma4_keys(m, n_layer, n_ff, head_swa)
    m.u32("expert_count", N_EXPERT)
    m.u32("expert_used_count", N_EXPERT_USED)
    m.u32("expert_feed_forward_length", N_FF_EXP)
    _head(m, N_EMBD, tied=True)
    m.w.add_tensor("rope_freqs.weight", (1.0 + m.rng.random(HEAD // 2)).astype(np.float32))
    for il in range(n_layer):
        head = head_swa if il == 0 else HEAD
        _gemma_layer(m, il, N_EMBD, N_HEAD, N_HEAD_KV, head, n_ff, qk_norm=True)
        if il == 0:
            continue
        m.weight(f"blk.{il}.ffn_gate_inp.weight", (N_EMBD, N_EXPERT))
        m.norm(f"blk.{il}.ffn_gate_inp.scale", N_EMBD)
        m.norm(f"blk.{il}.pre_ffw_norm_2.weight", N_EMBD)
        m.norm(f"blk.{il}.post_ffw_norm_1.weight", N_EMBD)
        m.norm(f"blk.{il}.post_ffw_norm_2.weight", N_EMBD)
        m.weight(f"blk.{il}.ffn_gate_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT))
        m.weight(f"blk.{il}.ffn_up_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT))
        m.weight(f"blk.{il}.ffn_down_exps.weight", (N_FF_EXP, N_EMBD, N_EXPERT))
    m.finish()
    return path


MODEL_WRITERS = {
    "tiny-afmoe-moe.gguf": write_afmoe_moe,
    "tiny-laguna-moe.gguf": write_laguna_moe,
    "tiny-exaone-moe-moe.gguf": write_exaone_moe_moe,
    "tiny-cohere2moe-moe.gguf": write_cohere2moe_moe,
    "tiny-mimo2-moe.gguf": write_mimo2_moe,
    "tiny-step35-moe.gguf": write_step35_moe,
    "tiny-granite-swa-moe.gguf": write_granite_swa_moe,
    "tiny-gemma4-moe.gguf": write_gemma4_moe,
}

# the family_attention runs' scenario and sizes, on the MoE variants
RUNS = [
    RunConfig.of("afmoe-moe", "tiny-afmoe-moe.gguf", "main", 512, 64, True, True),
    RunConfig.of("laguna-moe", "tiny-laguna-moe.gguf", "main", 512, 64, False, True),
    RunConfig.of("exaone-moe-moe", "tiny-exaone-moe-moe.gguf", "main", 1024, 64, True, False),
    RunConfig.of("cohere2moe-moe", "tiny-cohere2moe-moe.gguf", "main", 512, 64, True, True),
    RunConfig.of("mimo2-moe", "tiny-mimo2-moe.gguf", "main", 512, 64, False, True),
    RunConfig.of("granite-swa-moe", "tiny-granite-swa-moe.gguf", "main", 512, 64, False, True),
    # noshift: pymem's K-shift has no RoPE frequency factors (pymem/kv/shift.py), and this
    # model's full layer has rope_freqs other than ones; the decodes check the graph's
    RunConfig.of("gemma4-moe", "tiny-gemma4-moe.gguf", "noshift", 512, 64, True, True,
        kshift=False, seq_shift=False,
    ),
    # the reference cannot K-shift step35: family_attention's noshift variant
    RunConfig.of("step35-moe", "tiny-step35-moe.gguf", "noshift", 512, 64, True, True,
        kshift=False, seq_shift=False,
    ),
]  # fmt: skip
