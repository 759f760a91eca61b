"""MoE variants of attention architectures whose tiny models in family_attention.py are all
dense: tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).

Why: family_attention's afmoe, laguna and exaone-moe models make every layer a leading
dense block, so their recorded runs never reach ``build_moe_ffn``. These variants keep the
same attention (and so the same memory) with one dense layer and three MoE layers: 4
experts, 2 used, a selection bias (``exp_probs_b``), normalised and scaled weights and a
shared expert, so the GGUF engine's MoE path of each graph is checked against llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

from family_attention import HEAD, N_EMBD, N_HEAD, N_HEAD_KV, N_SWA, _head
from models import _common, _ffn, _Model, _qkvo
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
    m.weight(f"blk.{il}.ffn_gate_inp.weight", (N_EMBD, N_EXPERT))
    m.weight(f"blk.{il}.exp_probs_b.bias", (N_EXPERT,), scale=0.1)
    m.weight(f"blk.{il}.ffn_gate_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT))
    m.weight(f"blk.{il}.ffn_up_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT))
    m.weight(f"blk.{il}.ffn_down_exps.weight", (N_FF_EXP, N_EMBD, N_EXPERT))
    m.weight(f"blk.{il}.ffn_gate_shexp.weight", (N_EMBD, N_FF_EXP))
    m.weight(f"blk.{il}.ffn_up_shexp.weight", (N_EMBD, N_FF_EXP))
    m.weight(f"blk.{il}.ffn_down_shexp.weight", (N_FF_EXP, N_EMBD))


def write_afmoe_moe(path: Path) -> Path:
    """afmoe: family_attention's 4 layers (window 8, layers 0..2 slide), layer 0 dense,
    layers 1..3 MoE. No ``expert_gating_func``: the loader's default, sigmoid."""
    n_layer, n_ff, n_dense = 4, 24, 1
    m = _Model(path, "afmoe", "tiny-afmoe-moe", seed=179)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    _moe_keys(m, n_dense, None)
    _head(m)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", N_EMBD)
        m.norm(f"blk.{il}.post_attention_norm.weight", N_EMBD)
        _qkvo(m, il, N_EMBD, N_HEAD * HEAD, N_HEAD_KV * HEAD)
        m.norm(f"blk.{il}.attn_q_norm.weight", HEAD)
        m.norm(f"blk.{il}.attn_k_norm.weight", HEAD)
        m.weight(f"blk.{il}.attn_gate.weight", (N_EMBD, N_HEAD * HEAD))
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        m.norm(f"blk.{il}.post_ffw_norm.weight", N_EMBD)
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
    _head(m)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", N_EMBD)
        _qkvo(m, il, N_EMBD, N_HEAD * HEAD, N_HEAD_KV * HEAD)
        m.norm(f"blk.{il}.attn_q_norm.weight", HEAD)
        m.norm(f"blk.{il}.attn_k_norm.weight", HEAD)
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
    _head(m)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", N_EMBD)
        _qkvo(m, il, N_EMBD, N_HEAD * HEAD, N_HEAD_KV * HEAD)
        m.norm(f"blk.{il}.attn_q_norm.weight", HEAD)
        m.norm(f"blk.{il}.attn_k_norm.weight", HEAD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        if il < n_dense:
            _ffn(m, il, N_EMBD, n_ff)
        else:
            _moe_tensors(m, il)
    m.finish()
    return path


MODEL_WRITERS = {
    "tiny-afmoe-moe.gguf": write_afmoe_moe,
    "tiny-laguna-moe.gguf": write_laguna_moe,
    "tiny-exaone-moe-moe.gguf": write_exaone_moe_moe,
}

# the family_attention runs' scenario and sizes, on the MoE variants
RUNS = [
    RunConfig("afmoe-moe.main.fa1.u1", "afmoe-moe", "tiny-afmoe-moe.gguf", "main", 512, 64, True, True),
    RunConfig("laguna-moe.main.fa0.u1", "laguna-moe", "tiny-laguna-moe.gguf", "main", 512, 64, False, True),
    RunConfig("exaone-moe-moe.main.fa1.u0", "exaone-moe-moe", "tiny-exaone-moe-moe.gguf", "main", 1024, 64, True, False),
]  # fmt: skip
