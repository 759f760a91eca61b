"""Short-conv (LFM2-MoE) and RWKV architectures: tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models import N_VOCAB, _common, _ffn, _Model, _qkvo
from runconfig import RunConfig


def write_lfm2moe(path: Path) -> Path:
    """lfm2moe: 4 layers [short-conv, attention, short-conv, attention], layer 0 dense.

    llama_model_lfm2moe::load_arch_hparams: like lfm2 (a layer recurs when its
    ``head_count_kv`` is 0, ``shortconv.l_cache`` sizes the conv state) but never reads a
    sliding window, so create_memory always builds llama_memory_hybrid. It requires
    ``expert_feed_forward_length`` and ``expert_gating_func``; layers from
    ``leading_dense_block_count`` on use 4 experts (2 used, sigmoid gating with a bias).
    n_embd 16, 2 heads of 8, 1 KV head: K/V rows of 8, R rows of n_embd * 2 = 32.
    """
    n_embd, n_layer, n_ff, n_head, head, l_cache = 16, 4, 32, 2, 8, 3
    n_expert, n_expert_used, n_ff_exp, n_dense = 4, 2, 8, 1
    kv_heads = [0, 1, 0, 1]
    m = _Model(path, "lfm2moe", "tiny-lfm2moe", seed=31)
    _common(m, n_embd, n_layer, n_ff, n_head)
    m.arr("attention.head_count_kv", kv_heads)
    m.u32("shortconv.l_cache", l_cache)
    m.u32("leading_dense_block_count", n_dense)
    m.u32("expert_count", n_expert)
    m.u32("expert_used_count", n_expert_used)
    m.u32("expert_feed_forward_length", n_ff_exp)
    m.u32("expert_gating_func", 2)  # LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
    m.weight("token_embd.weight", (n_embd, N_VOCAB))
    m.norm("token_embd_norm.weight", n_embd)  # the output norm (LLM_TENSOR_OUTPUT_NORM_LFM2)
    for il in range(n_layer):
        m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
        if il < n_dense:
            _ffn(m, il, n_embd, n_ff)
        else:
            m.weight(f"blk.{il}.ffn_gate_inp.weight", (n_embd, n_expert))
            m.weight(f"blk.{il}.ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert))
            m.weight(f"blk.{il}.ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert))
            m.weight(f"blk.{il}.ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert))
            m.weight(f"blk.{il}.exp_probs_b.bias", (n_expert,), scale=0.1)
        m.norm(f"blk.{il}.attn_norm.weight", n_embd)
        if kv_heads[il]:
            m.norm(f"blk.{il}.attn_q_norm.weight", head)
            m.norm(f"blk.{il}.attn_k_norm.weight", head)
            _qkvo(m, il, n_embd, n_head * head, kv_heads[il] * head)
        else:
            m.weight(f"blk.{il}.shortconv.conv.weight", (l_cache, n_embd), scale=0.5)
            m.weight(f"blk.{il}.shortconv.in_proj.weight", (n_embd, 3 * n_embd))
            m.weight(f"blk.{il}.shortconv.out_proj.weight", (n_embd, n_embd))
    m.finish()
    return path


MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-lfm2moe.gguf": write_lfm2moe,
}

RUNS: list[RunConfig] = [
    # hybrid (no window: lfm2moe reads none), unified
    RunConfig("lfm2moe.main.fa1.u1", "lfm2moe", "tiny-lfm2moe.gguf", "main", 256, 64, True, True),
    # one stream per sequence: 4 x 256 cells
    RunConfig("lfm2moe.main.fa0.u0", "lfm2moe", "tiny-lfm2moe.gguf", "main", 1024, 64, False, False),
    # recurrent rollback (llm_arch_supports_rs_rollback): n_rs_seq 2
    RunConfig(
        "lfm2moe.rollback.fa1.u1", "lfm2moe", "tiny-lfm2moe.gguf", "rollback", 256, 64, True, True,
        n_rs_seq=2,
    ),
]  # fmt: skip
