"""Attention-only architectures (dense and sliding-window): tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).

Every model is n_embd 16 with 2 query heads of 8 and 1 KV head (K/V rows of 8 floats)
unless its docstring says otherwise, and slides on a window of 8 so that the ``main``
scenario's prompts (up to ~20 positions per sequence) leave the window.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from models import _attn, _common, _ffn, _gemma_layer, _head, _Model, _moe, _qkvo, _shexp
from runconfig import RunConfig

N_EMBD, N_HEAD, N_HEAD_KV, HEAD = 16, 2, 1, 8
N_SWA = 8


def _moe_keys(m: _Model, n_expert: int, n_ff_exp: int) -> None:
    """Expert count and width, one expert used per token."""
    m.u32("expert_count", n_expert)
    m.u32("expert_used_count", 1)
    m.u32("expert_feed_forward_length", n_ff_exp)


def write_gemma3(path: Path) -> Path:
    """gemma3: 3 layers, ``attention.sliding_window_pattern`` 3 -> layers 0 and 1 slide, 2 is full.

    llama_model_gemma3::load_arch_hparams: a window > 0 turns on swa_type STANDARD and the
    pattern (default 6); ``rope.freq_base_swa`` (default 10000, not the full base) is the
    SWA layers' base: 10000 here against 1e6 for the full layer. Tensors: attention with
    Q/K norms and post-norms, ffn with post-norm, output tied to token_embd.
    """
    n_layer, n_ff = 3, 24
    m = _Model(path, "gemma3", "tiny-gemma3", seed=31)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.key_length", HEAD)
    m.u32("attention.value_length", HEAD)
    m.u32("attention.sliding_window", N_SWA)
    m.u32("attention.sliding_window_pattern", 3)
    m.f32("rope.freq_base", 1000000.0)
    m.f32("rope.freq_base_swa", 10000.0)
    _head(m, N_EMBD, tied=True)
    for il in range(n_layer):
        _gemma_layer(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, n_ff, qk_norm=True)
    m.finish()
    return path


def write_llama4(path: Path, factors: str | None = None) -> Path:
    """llama4: 4 layers, default pattern 4 -> layers 0..2 chunked, layer 3 full.

    llama_model_llama4::load_arch_hparams: unless ``attention.sliding_window`` is 0 the
    layers are chunked (swa_type CHUNKED) with chunks of 8192 whatever the key says, so the
    scenario never crosses a chunk and the SWA cache is as large as the base cache
    (PAD(min(n_ctx, 8192 * n_seq + n_ubatch), 256)). MoE is required (``expert_count`` > 0):
    every 2nd layer (``interleave_moe_layer_step`` 2) has 2 experts of width 8, one used,
    and a shared expert; the others a dense ffn.
    """
    n_layer, n_ff, n_expert, n_ff_exp = 4, 24, 2, 8
    m = _Model(path, "llama4", "tiny-llama4", seed=41)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("rope.dimension_count", HEAD)
    m.f32("rope.freq_base", 500000.0)
    _moe_keys(m, n_expert, n_ff_exp)
    m.u32("interleave_moe_layer_step", 2)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        if (il + 1) % 2 == 0:
            _moe(m, il, N_EMBD, n_ff_exp, n_expert)
            _shexp(m, il, N_EMBD, n_ff_exp)
        else:
            _ffn(m, il, N_EMBD, n_ff)
    rope_factors(m, factors)
    m.finish()
    return path


def write_cohere2(path: Path) -> Path:
    """cohere2: 4 layers, default pattern 4 -> layers 0..2 slide, layer 3 is full.

    llama_model_cohere2::load_arch_hparams: swa_type STANDARD, required
    ``attention.sliding_window``, ``logit_scale`` and ``attention.layer_norm_epsilon``; the
    SWA layers' RoPE base defaults to the full one. Tensors: one (layer) norm per block,
    attention and gated ffn in parallel, output tied to token_embd.
    """
    n_layer, n_ff = 4, 24
    m = _Model(path, "cohere2", "tiny-cohere2", seed=43)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.f32("attention.layer_norm_epsilon", 1e-5)
    m.f32("logit_scale", 0.5)
    _head(m, N_EMBD, tied=True)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        _ffn(m, il, N_EMBD, n_ff)
    m.finish()
    return path


def write_openai_moe(path: Path) -> Path:
    """openai-moe (gpt-oss): 2 layers, default pattern 2 -> layer 0 slides, layer 1 is full.

    llama_model_openai_moe::load_arch_hparams: required window, swa_type STANDARD. Every
    layer: attention with sinks and an output bias, a post-attention norm, 2 experts of
    width 8 (one used) with biases.
    """
    n_layer, n_expert, n_ff_exp = 2, 2, 8
    m = _Model(path, "gpt-oss", "tiny-openai-moe", seed=47)
    _common(m, N_EMBD, n_layer, 24, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    _moe_keys(m, n_expert, n_ff_exp)
    _head(m, N_EMBD)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", N_EMBD)
        m.norm(f"blk.{il}.post_attention_norm.weight", N_EMBD)
        _qkvo(m, il, N_EMBD, N_HEAD * HEAD, N_HEAD_KV * HEAD)
        m.weight(f"blk.{il}.attn_output.bias", (N_EMBD,), scale=0.1)
        m.weight(f"blk.{il}.attn_sinks.weight", (N_HEAD,), scale=1.0)
        _moe(m, il, N_EMBD, n_ff_exp, n_expert)
        m.weight(f"blk.{il}.ffn_gate_inp.bias", (n_expert,), scale=0.1)
        m.weight(f"blk.{il}.ffn_gate_exps.bias", (n_ff_exp, n_expert), scale=0.1)
        m.weight(f"blk.{il}.ffn_up_exps.bias", (n_ff_exp, n_expert), scale=0.1)
        m.weight(f"blk.{il}.ffn_down_exps.bias", (N_EMBD, n_expert), scale=0.1)
    m.finish()
    return path


def write_phi3(
    path: Path,
    factors: str | None = None,
    *,
    window: int = N_SWA,
    name: str = "tiny-ph3",
    seed: int = 53,
) -> Path:
    """phi3 with ``attention.sliding_window`` 8: the reference switches Phi's window off.

    llama_model_phi3::load_arch_hparams: a window > 0 gives swa_type NONE, n_swa 0 and no
    sliding layer, so the memory is a plain KV cache. 2 layers; the ffn's up projection
    holds gate and up (2 * n_ff). ``factors``: see :func:`rope_factors`; ``window`` 0
    writes no window key.
    """
    n_layer, n_ff = 2, 24
    # general.name must not contain "phi3": the vocab then wants an <|endoftext|> token
    m = _Model(path, "phi3", name, seed=seed)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    if window:
        m.u32("attention.sliding_window", window)
    m.u32("rope.dimension_count", HEAD)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        m.weight(f"blk.{il}.ffn_up.weight", (N_EMBD, 2 * n_ff))
        m.weight(f"blk.{il}.ffn_down.weight", (n_ff, N_EMBD))
    rope_factors(m, factors)
    m.finish()
    return path


PHI3_LONGROPE_ORIG_CTX = 384  # n_ctx_orig_yarn: runs of 256 cells per sequence take the
# short factors, runs of 512 the long ones (llama_model::get_rope_factors)


def rope_factors(m: _Model, kind: str | None) -> None:
    """RoPE frequency factors of ``n_rot / 2`` = 4 floats: ``freqs`` adds ``rope_freqs``
    (in [1, 2]); ``longrope`` adds ``rope_factors_long`` (in [1, 8]) and
    ``rope_factors_short`` (in [1, 2]) with ``rope.scaling.type`` longrope and
    ``rope.scaling.original_context_length`` :data:`PHI3_LONGROPE_ORIG_CTX`; None adds
    nothing. Drawn after every other weight, so the model's other tensors are those of the
    writer without factors."""
    if kind == "freqs":
        m.w.add_tensor("rope_freqs.weight", (1.0 + m.rng.random(HEAD // 2)).astype(np.float32))
    elif kind == "longrope":
        # llama / granite / step35 load long and short factors only under this type (and
        # then no rope_freqs); phi3 loads them whatever the type
        m.w.add_string(f"{m.arch}.rope.scaling.type", "longrope")
        m.u32("rope.scaling.original_context_length", PHI3_LONGROPE_ORIG_CTX)
        long = (1.0 + 7.0 * m.rng.random(HEAD // 2)).astype(np.float32)
        short = (1.0 + m.rng.random(HEAD // 2)).astype(np.float32)
        m.w.add_tensor("rope_factors_long.weight", long)
        m.w.add_tensor("rope_factors_short.weight", short)
    elif kind is not None:
        raise ValueError(f"rope factors: unknown kind {kind!r}")


def write_phi3_longrope(path: Path) -> Path:
    """phi3 with LongRoPE factors (Phi-3-*-128k): ``rope_factors_long`` and
    ``rope_factors_short`` (``n_rot / 2`` = 4 floats each, in [1, 8] and [1, 2]) and
    ``rope.scaling.original_context_length`` 384; no sliding window.

    llama_model::get_rope_factors: without ``rope_freqs``, a context whose ``n_ctx_seq``
    exceeds ``n_ctx_orig_yarn`` rotates by the long factors, any other by the short ones;
    the K-shift (llama_kv_cache::build_graph_shift) takes the same. Layer 0 loads both and
    the other layers duplicate them.
    """
    return write_phi3(path, "longrope", window=0, name="tiny-ph3-longrope", seed=59)


def write_exaone4(path: Path, factors: str | None = None) -> Path:
    """exaone4 with 2 layers and ``attention.sliding_window`` 8: no layer slides.

    llama_model_exaone4::load_arch_hparams slides only for 64 layers (the 32B model) but
    reads the window for every size: a plain KV cache whose n_swa is 8 with swa_type NONE.
    Tensors: post-norms only (no pre-norm), Q/K norms.
    """
    n_layer, n_ff = 2, 24
    m = _Model(path, "exaone4", "tiny-exaone4", seed=59)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _qkvo(m, il, N_EMBD, N_HEAD * HEAD, N_HEAD_KV * HEAD)
        m.norm(f"blk.{il}.post_attention_norm.weight", N_EMBD)
        m.norm(f"blk.{il}.attn_q_norm.weight", HEAD)
        m.norm(f"blk.{il}.attn_k_norm.weight", HEAD)
        _ffn(m, il, N_EMBD, n_ff)
        m.norm(f"blk.{il}.post_ffw_norm.weight", N_EMBD)
    rope_factors(m, factors)
    m.finish()
    return path


def write_olmo2(path: Path) -> Path:
    """olmo2: 4 layers, window 8, default pattern 4 -> layers 0..2 slide, layer 3 is full.

    llama_model_olmo2::load_arch_hparams: a window > 0 turns on swa_type STANDARD; the SWA
    layers' RoPE scale is 1 whatever the full layers' is. Tensors: post-norms, Q/K norms
    over all heads (n_embd and n_head_kv * head).
    """
    n_layer, n_ff = 4, 24
    m = _Model(path, "olmo2", "tiny-olmo2", seed=61)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _qkvo(m, il, N_EMBD, N_HEAD * HEAD, N_HEAD_KV * HEAD)
        m.norm(f"blk.{il}.attn_q_norm.weight", N_EMBD)
        m.norm(f"blk.{il}.attn_k_norm.weight", N_HEAD_KV * HEAD)
        m.norm(f"blk.{il}.post_attention_norm.weight", N_EMBD)
        _ffn(m, il, N_EMBD, n_ff)
        m.norm(f"blk.{il}.post_ffw_norm.weight", N_EMBD)
    m.finish()
    return path


def write_smallthinker(path: Path) -> Path:
    """smallthinker: 2 layers, window > 0 -> layer 0 full, layer 1 slides (pattern 4, dense first).

    llama_model_smallthinker::load_arch_hparams replaces the window with 4096, so the SWA
    cache is as large as the base cache. Every layer is MoE (2 experts of 8, one used).
    """
    n_layer, n_expert, n_ff_exp = 2, 2, 8
    m = _Model(path, "smallthinker", "tiny-smallthinker", seed=67)
    _common(m, N_EMBD, n_layer, 24, N_HEAD)
    m.u32("expert_gating_func", 1)  # softmax (the graph aborts on none)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    _moe_keys(m, n_expert, n_ff_exp)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _moe(m, il, N_EMBD, n_ff_exp, n_expert)
    m.finish()
    return path


def write_step35(path: Path, factors: str | None = None) -> Path:
    """step35: 2 layers, ``attention.sliding_window_pattern`` [1, 0] -> layer 0 slides.

    llama_model_step35::load_arch_hparams: swa_type STANDARD, required window and pattern
    array; the full layers rotate n_rot / 2 = 4 dimensions, the SWA layer 8. The reference
    refuses to K-shift step35 (``get_can_shift`` false), so the run plays no seq_add /
    seq_div. Dense ffn (no router), no experts, though
    ``expert_feed_forward_length`` is required.
    """
    n_layer, n_ff = 2, 24
    m = _Model(path, "step35", "tiny-step35", seed=71)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [1, 0])
    m.u32("expert_feed_forward_length", 8)
    m.f32("rope.freq_base_swa", 5000.0)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _ffn(m, il, N_EMBD, n_ff)
    rope_factors(m, factors)
    m.finish()
    return path


def write_mimo2(path: Path) -> Path:
    """mimo2: 2 layers, pattern array [1, 0]; the SWA layer has 2 KV heads, the full one 1.

    llama_model_mimo2::load_arch_hparams: swa_type STANDARD, required window and pattern
    array, the SWA RoPE base defaults to 10000. Per-layer ``head_count_kv`` [2, 1]: K/V rows
    of 16 (layer 0, SWA cache) and 8 (layer 1, base cache); without flash attention the
    reference pads every transposed V cache to the widest layer (16). Dense ffn.
    """
    n_layer, n_ff = 2, 24
    kv_heads = [2, 1]
    m = _Model(path, "mimo2", "tiny-mimo2", seed=73)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.arr("attention.head_count_kv", kv_heads)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [1, 0])
    m.u32("expert_feed_forward_length", 8)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, kv_heads[il], HEAD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _ffn(m, il, N_EMBD, n_ff)
    m.finish()
    return path


def _gated_attn_norms(m: _Model, il: int) -> None:
    """afmoe / muse-glimmer: pre/post attention norms, Q/K/V/O with per-head Q/K norms,
    the per-element attention gate, then the pre/post ffn norms (the ffn is the caller's)."""
    m.norm(f"blk.{il}.attn_norm.weight", N_EMBD)
    m.norm(f"blk.{il}.post_attention_norm.weight", N_EMBD)
    _qkvo(m, il, N_EMBD, N_HEAD * HEAD, N_HEAD_KV * HEAD)
    m.norm(f"blk.{il}.attn_q_norm.weight", HEAD)
    m.norm(f"blk.{il}.attn_k_norm.weight", HEAD)
    m.weight(f"blk.{il}.attn_gate.weight", (N_EMBD, N_HEAD * HEAD))
    m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
    m.norm(f"blk.{il}.post_ffw_norm.weight", N_EMBD)


def write_afmoe(path: Path) -> Path:
    """afmoe: 4 layers, window 8, default pattern 4 -> layers 0..2 slide, layer 3 is full.

    llama_model_afmoe::load_arch_hparams: a window > 0 turns on swa_type STANDARD. Every
    layer is a leading dense block (``leading_dense_block_count`` 4), so no expert tensors,
    though ``expert_feed_forward_length`` and ``expert_shared_count`` are required. Tensors:
    pre/post norms, Q/K norms, a per-element attention gate.
    """
    n_layer, n_ff = 4, 24
    m = _Model(path, "afmoe", "tiny-afmoe", seed=79)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.u32("leading_dense_block_count", n_layer)
    m.u32("expert_feed_forward_length", 8)
    m.u32("expert_shared_count", 0)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _gated_attn_norms(m, il)
        _ffn(m, il, N_EMBD, n_ff)
    m.finish()
    return path


def write_laguna(path: Path) -> Path:
    """laguna: 4 layers, window 8, pattern 4 dense first -> layer 0 full, layers 1..3 slide.

    llama_model_laguna::load_arch_hparams: the SWA layers rotate ``rope.dimension_count_swa``
    (8) dimensions with plain RoPE (scale 1), the full layer 4 (partial RoPE). Every layer is
    a leading dense block; a per-head attention gate ({n_embd, n_head}).
    """
    n_layer, n_ff = 4, 24
    m = _Model(path, "laguna", "tiny-laguna", seed=83)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.u32("rope.dimension_count", HEAD // 2)
    m.u32("rope.dimension_count_swa", HEAD)
    m.f32("rope.freq_base", 500000.0)
    m.u32("leading_dense_block_count", n_layer)
    m.u32("expert_feed_forward_length", 8)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, qk_norm=True)
        m.weight(f"blk.{il}.attn_gate.weight", (N_EMBD, N_HEAD))
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _ffn(m, il, N_EMBD, n_ff)
    m.finish()
    return path


def write_granite_swa(path: Path, factors: str | None = None) -> Path:
    """granite_swa: 3 layers, pattern array [1, 0, 1], ``attention.rope_pattern`` [1, 1, 0].

    llama_model_granite_swa::load_arch_hparams: swa_type STANDARD, required window and
    pattern array, ``logit_scale`` required; layer 2 slides without RoPE (the K-shift skips
    it). The SWA layers' RoPE keeps the defaults (base 10000). Attention sinks; dense ffn.
    """
    n_layer, n_ff = 3, 24
    m = _Model(path, "granite_swa", "tiny-granite-swa", seed=89)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [1, 0, 1])
    m.arr("attention.rope_pattern", [1, 1, 0])
    m.f32("logit_scale", 0.5)
    m.f32("rope.freq_base", 100000.0)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        m.weight(f"blk.{il}.attn_sinks.weight", (N_HEAD,), scale=1.0)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _ffn(m, il, N_EMBD, n_ff)
    rope_factors(m, factors)
    m.finish()
    return path


def write_exaone_moe(path: Path, factors: str | None = None) -> Path:
    """exaone-moe: 4 layers, window 8, default pattern 4 -> layers 0..2 slide, layer 3 is full.

    llama_model_exaone_moe::load_arch_hparams: swa_type STANDARD, required window and
    ``expert_gating_func``. Every layer is a leading dense block (no experts); Q/K norms.
    """
    n_layer, n_ff = 4, 24
    m = _Model(path, "exaone-moe", "tiny-exaone-moe", seed=97)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.u32("leading_dense_block_count", n_layer)
    m.u32("expert_feed_forward_length", 8)
    m.u32("expert_gating_func", 1)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, qk_norm=True)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _ffn(m, il, N_EMBD, n_ff)
    rope_factors(m, factors)
    m.finish()
    return path


def write_plamo3(path: Path) -> Path:
    """plamo3: 2 layers, window 8, ``attention.sliding_window_pattern`` 2 -> layer 0 slides.

    llama_model_plamo3::load_arch_hparams: a window > 0 turns on swa_type STANDARD
    (default period 8); the SWA layers' RoPE base defaults to 10000 (the full base is 1e6
    here). Fused QKV, post-norms (their names carry no ``.weight``), fused gate/up ffn.
    """
    n_layer, n_ff = 2, 24
    m = _Model(path, "plamo3", "tiny-plamo3", seed=101)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.u32("attention.sliding_window_pattern", 2)
    m.f32("rope.freq_base", 1000000.0)
    _head(m, N_EMBD)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", N_EMBD)
        m.weight(f"blk.{il}.attn_qkv.weight", (N_EMBD, (N_HEAD + 2 * N_HEAD_KV) * HEAD))
        m.norm(f"blk.{il}.attn_q_norm.weight", HEAD)
        m.norm(f"blk.{il}.attn_k_norm.weight", HEAD)
        m.weight(f"blk.{il}.attn_output.weight", (N_HEAD * HEAD, N_EMBD))
        m.norm(f"blk.{il}.post_attention_norm", N_EMBD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        m.norm(f"blk.{il}.post_ffw_norm", N_EMBD)
        m.weight(f"blk.{il}.ffn_up.weight", (N_EMBD, 2 * n_ff))
        m.weight(f"blk.{il}.ffn_down.weight", (n_ff, N_EMBD))
    m.finish()
    return path


def write_muse_glimmer(path: Path) -> Path:
    """muse-glimmer: 4 layers, window 8, default pattern 4 -> layers 0..2 slide, layer 3 is full.

    llama_model_muse_glimmer::load_arch_hparams: swa_type STANDARD, required window and
    ``logit_scale``; the SWA base defaults to the full one. Pre/post norms, Q/K norms, a
    per-element attention gate.
    """
    n_layer, n_ff = 4, 24
    m = _Model(path, "muse-glimmer", "tiny-muse-glimmer", seed=103)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.f32("logit_scale", 0.5)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _gated_attn_norms(m, il)
        _ffn(m, il, N_EMBD, n_ff)
    m.finish()
    return path


def write_spark2_5(path: Path) -> Path:
    """spark2_5: 2 layers, pattern array [1, 0] -> layer 0 slides, layer 1 is full.

    llama_model_spark2_5::load_arch_hparams: swa_type STANDARD, required window and pattern
    array; the SWA base defaults to the full one. (Its graph takes one head size for every
    layer, so the per-layer head sizes it reads are left equal.) A per-head attention gate;
    dense ffn.
    """
    n_layer, n_ff = 2, 24
    m = _Model(path, "spark2_5", "tiny-spark2-5", seed=107)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [1, 0])
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        m.weight(f"blk.{il}.attn_gate.weight", (N_EMBD, N_HEAD))
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _ffn(m, il, N_EMBD, n_ff)
    m.finish()
    return path


def _gemma4_keys(m: _Model, n_layer: int, n_ff: int, head_swa: int) -> None:
    """gemma4's keys: pattern [1, 0], SWA heads of ``head_swa`` and full ones of HEAD, no
    shared KV layers, no per-layer embeddings."""
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [True, False])
    m.u32("attention.key_length", HEAD)
    m.u32("attention.value_length", HEAD)
    m.u32("attention.key_length_swa", head_swa)
    m.u32("attention.value_length_swa", head_swa)
    m.u32("rope.dimension_count_swa", head_swa)
    m.u32("attention.shared_kv_layers", 0)
    m.u32("embedding_length_per_layer_input", 0)
    m.f32("rope.freq_base", 1000000.0)


def write_gemma4(path: Path) -> Path:
    """gemma4 without shared KV layers: 2 layers, pattern array [1, 0]; SWA heads of 4, full 8.

    llama_model_gemma4::load_arch_hparams: swa_type STANDARD, required pattern array,
    window and ``attention.key_length_swa`` / ``value_length_swa``; ``shared_kv_layers`` 0
    leaves n_layer_kv_from_start = n_layer, so create_memory's layer reuse never applies
    (pymem refuses models where it does). K/V rows: 4 (SWA layer) and 8 (full layer). The
    full layer's RoPE factors (``rope_freqs``) are ones, so they change nothing. No
    per-layer embeddings (``embedding_length_per_layer_input`` 0), dense ffn.
    """
    n_layer, n_ff, head_swa = 2, 24, 4
    m = _Model(path, "gemma4", "tiny-gemma4", seed=109)
    _gemma4_keys(m, n_layer, n_ff, head_swa)
    _head(m, N_EMBD, tied=True)
    m.w.add_tensor("rope_freqs.weight", np.ones(HEAD // 2, dtype=np.float32))
    for il in range(n_layer):
        head = head_swa if il == 0 else HEAD
        _gemma_layer(m, il, N_EMBD, N_HEAD, N_HEAD_KV, head, n_ff, qk_norm=True)
    m.finish()
    return path


def write_mellum(path: Path) -> Path:
    """mellum: 4 layers, window 8, default pattern 4 -> layers 0..2 slide, layer 3 is full.

    llama_model_mellum::load_arch_hparams: a window > 0 turns on swa_type STANDARD. Every
    layer is MoE (2 experts of 8, one used); Q/K norms.
    """
    n_layer, n_expert, n_ff_exp = 4, 2, 8
    m = _Model(path, "mellum", "tiny-mellum", seed=113)
    _common(m, N_EMBD, n_layer, 24, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    _moe_keys(m, n_expert, n_ff_exp)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, qk_norm=True)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _moe(m, il, N_EMBD, n_ff_exp, n_expert)
    m.finish()
    return path


def write_cohere2moe(path: Path) -> Path:
    """cohere2moe: 4 layers, window 8, pattern 4 dense first -> layer 0 full, 1..3 slide.

    llama_model_cohere2moe::load_arch_hparams: swa_type STANDARD, required window,
    ``logit_scale`` and ``leading_dense_block_count`` (4 here: every layer is dense, though
    experts must be declared). One (layer) norm per block, attention and ffn in parallel.
    """
    n_layer, n_ff = 4, 24
    m = _Model(path, "cohere2moe", "tiny-cohere2moe", seed=127)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.f32("logit_scale", 0.5)
    m.u32("leading_dense_block_count", n_layer)
    _moe_keys(m, 2, 8)
    _head(m, N_EMBD, tied=True)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD)
        _ffn(m, il, N_EMBD, n_ff)
    m.finish()
    return path


def write_maple(path: Path) -> Path:
    """maple: 2 layers, pattern array [1, 0] -> layer 0 slides, layer 1 is full.

    llama_model_maple::load_arch_hparams: swa_type STANDARD, required window, pattern array
    and ``swiglu_clamp_exp``. Every layer is MoE (2 experts of 8, one used); Q/K norms.
    """
    n_layer, n_expert, n_ff_exp = 2, 2, 8
    m = _Model(path, "maple", "tiny-maple", seed=131)
    _common(m, N_EMBD, n_layer, 24, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.sliding_window", N_SWA)
    m.arr("attention.sliding_window_pattern", [1, 0])
    m.f32("swiglu_clamp_exp", 7.0)
    _moe_keys(m, n_expert, n_ff_exp)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, qk_norm=True)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _moe(m, il, N_EMBD, n_ff_exp, n_expert)
    m.finish()
    return path


def write_qwen3moe(path: Path) -> Path:
    """qwen3moe: 2 layers, no window: a plain KV cache. Every layer is MoE (2 experts of 8,
    one used); Q/K norms."""
    n_layer, n_expert, n_ff_exp = 2, 2, 8
    m = _Model(path, "qwen3moe", "tiny-qwen3moe", seed=137)
    _common(m, N_EMBD, n_layer, 24, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    _moe_keys(m, n_expert, n_ff_exp)
    _head(m, N_EMBD)
    for il in range(n_layer):
        _attn(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, qk_norm=True)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _moe(m, il, N_EMBD, n_ff_exp, n_expert)
    m.finish()
    return path


def chunk_scenario(sc: Any) -> None:
    """llama4's chunked SWA across a chunk boundary (the reference's chunks are 8192 long).

    ``sc`` is record_llama_cpp's Scenario. A ``seq_add`` moves seq 0 just below position
    8192 (a K-shift, applied by the next decode); decodes then cross the boundary, so the
    SWA cells of the previous chunk become masked for seq 0 (and reusable), while seq 1
    stays in chunk 0. Partial removals across the boundary, a per-sequence round trip into
    another sequence, a whole round trip and a negative shift back below the boundary follow.
    """
    tk = sc.toks
    sc.op("none", "fresh context")
    sc.decode(tk(0, 10) + tk(1, 6), "two prompts in chunk 0")
    sc.op("seq_add", "move seq 0 to [8176, 8186)", seq=0, p0=-1, p1=-1, delta=8176)
    sc.decode(tk(0, 1), "seq 0 at 8186 (applies the K-shift)")
    sc.decode(tk(0, 8) + tk(1, 2), "seq 0 crosses 8192 (chunk 1 starts), seq 1 advances")
    sc.decode(tk(0, 4), "seq 0 continues in chunk 1")
    sc.op(
        "seq_rm",
        "remove [8190, 8194) of seq 0 (both sides of the boundary)",
        seq=0,
        p0=8190,
        p1=8194,
    )
    saved = sc.decode(tk(1, 1), "seq 1 advances")
    sc.op("state_seq_set", "load seq 0's state into seq 2", blob=saved["seq_state"][0], seq=2)
    sc.decode(tk(2, 3) + tk(0, 2), "seq 2 (a copy of seq 0) and seq 0 advance")
    sc.op("clear", "llama_memory_clear(data=true)", data=True)
    sc.op("state_set", "restore the whole state saved above", blob=saved["state"])
    sc.decode(tk(0, 1) + tk(1, 1), "decode after the whole restore")
    sc.op("seq_add", "move seq 0 back by 20 (below the boundary)", seq=0, p0=-1, p1=-1, delta=-20)
    sc.decode(tk(0, 3), "seq 0 continues in chunk 0")
    sc.decode(tk(3, 5) + tk(0, 30), "a new sequence; seq 0 crosses the boundary again")


MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-gemma3.gguf": write_gemma3,
    "tiny-llama4.gguf": write_llama4,
    "tiny-cohere2.gguf": write_cohere2,
    "tiny-openai-moe.gguf": write_openai_moe,
    "tiny-phi3.gguf": write_phi3,
    "tiny-phi3-longrope.gguf": write_phi3_longrope,
    "tiny-exaone4.gguf": write_exaone4,
    "tiny-olmo2.gguf": write_olmo2,
    "tiny-smallthinker.gguf": write_smallthinker,
    "tiny-step35.gguf": write_step35,
    "tiny-mimo2.gguf": write_mimo2,
    "tiny-afmoe.gguf": write_afmoe,
    "tiny-laguna.gguf": write_laguna,
    "tiny-granite-swa.gguf": write_granite_swa,
    "tiny-exaone-moe.gguf": write_exaone_moe,
    # the same models with RoPE frequency factors (rope_factors)
    "tiny-llama4-rf.gguf": partial(write_llama4, factors="freqs"),
    "tiny-exaone4-rf.gguf": partial(write_exaone4, factors="freqs"),
    "tiny-step35-rf.gguf": partial(write_step35, factors="freqs"),
    "tiny-exaone-moe-rf.gguf": partial(write_exaone_moe, factors="freqs"),
    "tiny-granite-swa-longrope.gguf": partial(write_granite_swa, factors="longrope"),
    "tiny-plamo3.gguf": write_plamo3,
    "tiny-muse-glimmer.gguf": write_muse_glimmer,
    "tiny-spark2-5.gguf": write_spark2_5,
    "tiny-gemma4.gguf": write_gemma4,
    "tiny-mellum.gguf": write_mellum,
    "tiny-cohere2moe.gguf": write_cohere2moe,
    "tiny-maple.gguf": write_maple,
    "tiny-qwen3moe.gguf": write_qwen3moe,
}

SCENARIOS: dict[str, Callable[[Any], None]] = {"chunk": chunk_scenario}
"""Scenarios of this family, by run scenario label (record_llama_cpp plays them)."""

SWA_TYPES: dict[str, str] = {"llama4": "chunked"}
"""The arch's swa_type where it is not ``standard`` (the reference does not log it)."""

RUNS: list[RunConfig] = [
    # gemma3 iSWA, unified: base 512 cells, SWA PAD(min(512, 8 * 4 + 64), 256) = 256
    RunConfig.of("gemma3", "tiny-gemma3.gguf", "main", 512, 64, True, True),
    # one stream per sequence: 4 x 512 base cells, 4 x PAD(min(512, 8 + 64), 256) = 256
    RunConfig.of("gemma3", "tiny-gemma3.gguf", "main", 2048, 64, False, False),
    # chunked iSWA (chunks of 8192): base 512 / SWA PAD(min(512, 8192 * 4 + 64), 256) = 512
    RunConfig.of("llama4", "tiny-llama4.gguf", "main", 512, 64, True, True),
    # iSWA with window 8: base 512 / SWA 256 cells, unified
    RunConfig.of("cohere2", "tiny-cohere2.gguf", "main", 512, 64, True, True),
    RunConfig.of("openai-moe", "tiny-openai-moe.gguf", "main", 512, 64, True, True),
    RunConfig.of("olmo2", "tiny-olmo2.gguf", "main", 512, 64, False, True),
    # a window in the file that the reference does not use: plain KV caches
    RunConfig.of("phi3", "tiny-phi3.gguf", "main", 256, 64, True, True),
    # LongRoPE: 256 cells per sequence <= 384 -> short factors; 4 x 512 > 384 -> long ones
    # (the main scenario's seq_add / seq_div K-shift with them too)
    RunConfig.of("phi3-longrope", "tiny-phi3-longrope.gguf", "short", 256, 64, True, True),
    RunConfig.of("phi3-longrope", "tiny-phi3-longrope.gguf", "long", 2048, 64, False, False),
    RunConfig.of("exaone4", "tiny-exaone4.gguf", "main", 256, 64, False, True),
    # window replaced by 4096: base 512 / SWA PAD(min(512, 4096 * 4 + 64), 256) = 512
    RunConfig.of("smallthinker", "tiny-smallthinker.gguf", "main", 512, 64, True, True),
    # the reference cannot K-shift step35 (get_can_shift false: it takes seq_add / seq_div and
    # aborts at the next decode; pymem refuses them): no seq_add / seq_div at all
    RunConfig.of("step35", "tiny-step35.gguf", "noshift", 512, 64, True, True,
        kshift=False, seq_shift=False,
    ),
    # V rows of 16 / 8 per layer, transposed (fa0): padded to 16 in both caches
    RunConfig.of("mimo2", "tiny-mimo2.gguf", "main", 512, 64, False, True),
    RunConfig.of("afmoe", "tiny-afmoe.gguf", "main", 512, 64, True, True),
    RunConfig.of("laguna", "tiny-laguna.gguf", "main", 512, 64, False, True),
    RunConfig.of("granite-swa", "tiny-granite-swa.gguf", "main", 512, 64, True, True),
    RunConfig.of("exaone-moe", "tiny-exaone-moe.gguf", "main", 512, 64, True, True),
    # with RoPE frequency factors: rope_freqs on every rotated layer (step35: its full
    # layers only; no K-shift there), LongRoPE's long factors (512 cells > 384)
    RunConfig.of("llama4-rf", "tiny-llama4-rf.gguf", "main", 512, 64, True, True),
    RunConfig.of("exaone4-rf", "tiny-exaone4-rf.gguf", "main", 256, 64, False, True),
    RunConfig.of("exaone-moe-rf", "tiny-exaone-moe-rf.gguf", "main", 512, 64, True, True),
    RunConfig.of("step35-rf", "tiny-step35-rf.gguf", "noshift", 512, 64, True, True,
        kshift=False, seq_shift=False,
    ),
    RunConfig.of("granite-swa-longrope", "tiny-granite-swa-longrope.gguf", "long", 512, 64,
        True, True,
    ),
    RunConfig.of("plamo3", "tiny-plamo3.gguf", "main", 2048, 64, True, False),
    RunConfig.of("muse-glimmer", "tiny-muse-glimmer.gguf", "main", 512, 64, False, True),
    RunConfig.of("spark2-5", "tiny-spark2-5.gguf", "main", 512, 64, False, True),
    # K/V rows of 4 (SWA cache) and 8 (base cache); V transposed: each cache padded to 8
    RunConfig.of("gemma4", "tiny-gemma4.gguf", "main", 512, 64, False, True),
    RunConfig.of("mellum", "tiny-mellum.gguf", "main", 512, 64, True, True),
    RunConfig.of("cohere2moe", "tiny-cohere2moe.gguf", "main", 512, 64, False, True),
    RunConfig.of("maple", "tiny-maple.gguf", "main", 2048, 64, True, False),
    # chunked SWA across the 8192 boundary (chunk_scenario), one stream per sequence
    RunConfig.of("llama4", "tiny-llama4.gguf", "chunk", 1024, 64, True, False),
    # the same, unified (V transposed): every sequence's chunks in one stream of 512 cells
    RunConfig.of("llama4", "tiny-llama4.gguf", "chunk", 512, 64, False, True),
    # dense (no window): a plain KV cache, one stream per sequence
    RunConfig.of("qwen3moe", "tiny-qwen3moe.gguf", "main", 1024, 64, True, False),
]  # fmt: skip
