"""Attention-only architectures (dense and sliding-window): tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).

Every model is n_embd 16 with 2 query heads of 8 and 1 KV head (K/V rows of 8 floats)
unless its docstring says otherwise, and slides on a window of 8 so that the ``main``
scenario's prompts (up to ~20 positions per sequence) leave the window.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models import N_VOCAB, _common, _ffn, _Model, _qkvo
from runconfig import RunConfig

N_EMBD, N_HEAD, N_HEAD_KV, HEAD = 16, 2, 1, 8
N_SWA = 8


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
    m.weight("token_embd.weight", (N_EMBD, N_VOCAB))
    m.norm("output_norm.weight", N_EMBD)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", N_EMBD)
        _qkvo(m, il, N_EMBD, N_HEAD * HEAD, N_HEAD_KV * HEAD)
        m.norm(f"blk.{il}.attn_q_norm.weight", HEAD)
        m.norm(f"blk.{il}.attn_k_norm.weight", HEAD)
        m.norm(f"blk.{il}.post_attention_norm.weight", N_EMBD)
        m.norm(f"blk.{il}.ffn_norm.weight", N_EMBD)
        _ffn(m, il, N_EMBD, n_ff)
        m.norm(f"blk.{il}.post_ffw_norm.weight", N_EMBD)
    m.finish()
    return path


MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-gemma3.gguf": write_gemma3,
}

RUNS: list[RunConfig] = [
    # gemma3 iSWA, unified: base 512 cells, SWA PAD(min(512, 8 * 4 + 64), 256) = 256
    RunConfig("gemma3.main.fa1.u1", "gemma3", "tiny-gemma3.gguf", "main", 512, 64, True, True),
    # one stream per sequence: 4 x 512 base cells, 4 x PAD(min(512, 8 + 64), 256) = 256
    RunConfig("gemma3.main.fa0.u0", "gemma3", "tiny-gemma3.gguf", "main", 2048, 64, False, False),
]  # fmt: skip
