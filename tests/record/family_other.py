"""Short-conv (LFM2-MoE) and RWKV architectures: tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models import N_VOCAB, _common, _ffn, _lfm2_mixer, _Model, _moe
from runconfig import Play, RunConfig


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
            _moe(m, il, n_embd, n_ff_exp, n_expert)
            m.weight(f"blk.{il}.exp_probs_b.bias", (n_expert,), scale=0.1)
        _lfm2_mixer(m, il, n_embd, n_head, kv_heads[il], head, l_cache)
    m.finish()
    return path


# RWKV widths shared by the tiny RWKV models: n_embd 16 in heads of 8 (2 heads), so the
# recurrent state is R rows of token_shift_count * 16 floats and S rows of 16 * 8 = 128
RWKV_EMBD, RWKV_HEAD, RWKV_FF, RWKV_LAYERS = 16, 8, 32, 2
# RWKV-7 needs heads of 64: ggml's CPU rwkv_wkv7 kernel walks a head row in whole SIMD
# steps (64 floats with AVX-512, 32 with AVX2) and overruns smaller heads (reads and
# writes past each head and past the tensor: the numbers depend on neighbouring memory,
# and the heap is corrupted). One head of 64: S rows of 64 * 64 = 4096 floats.
RWKV7_EMBD, RWKV7_HEAD = 64, 64


def _rwkv_common(
    m: _Model, *, ln0: bool, output_norm_b: bool, n: int = RWKV_EMBD, head: int = RWKV_HEAD
) -> None:
    """Keys and tensors every RWKV writer shares: no attention heads, ``wkv.head_size``,
    both norm epsilons, the embeddings (``ln0``: RWKV's token_embd_norm weight and bias)
    and the output norm (``output_norm_b``: with its bias) and head."""
    _common(m, n, RWKV_LAYERS, RWKV_FF, 0)
    m.f32("attention.layer_norm_epsilon", 1e-5)
    m.u32("wkv.head_size", head)
    m.weight("token_embd.weight", (n, N_VOCAB))
    if ln0:
        m.norm("token_embd_norm.weight", n)
        m.weight("token_embd_norm.bias", (n,), scale=0.1)
    m.norm("output_norm.weight", n)
    if output_norm_b:
        m.weight("output_norm.bias", (n,), scale=0.1)
    m.weight("output.weight", (n, N_VOCAB))


def _lerp(m: _Model, name: str, n_fused: int = 0, n: int = RWKV_EMBD) -> None:
    """A token-shift interpolation weight in [0, 1): {n_embd, 1, 1} or {n_embd, 1, 1, n_fused}."""
    shape = (n_fused, 1, 1, n) if n_fused else (1, 1, n)
    m.w.add_tensor(name, m.rng.random(shape).astype("float32"))


def _rwkv7_time_mix(m: _Model, il: int, *, lora: int, gate: bool, ln: bool) -> None:
    """One layer's RWKV-7 time mix (llama_model_rwkv7 / arwkv7 load_arch_tensors); every
    LoRA of rank ``lora``; ``gate``: the g1/g2 LoRA and a 6-way lerp (else 5-way)."""
    n, b = RWKV7_EMBD, f"blk.{il}"
    for x in ("w", "a", "v"):
        m.weight(f"{b}.time_mix_{x}0.weight", (n,), scale=0.5)
        m.weight(f"{b}.time_mix_{x}1.weight", (n, lora))
        m.weight(f"{b}.time_mix_{x}2.weight", (lora, n))
    if gate:
        m.weight(f"{b}.time_mix_g1.weight", (n, lora))
        m.weight(f"{b}.time_mix_g2.weight", (lora, n))
    _lerp(m, f"{b}.time_mix_lerp_fused.weight", 6 if gate else 5, n)
    for x in ("k_k", "k_a", "r_k"):
        m.weight(f"{b}.time_mix_{x}.weight", (n,), scale=0.5)
    for x in ("key", "value", "receptance"):
        m.weight(f"{b}.time_mix_{x}.weight", (n, n))
    if ln:
        m.norm(f"{b}.time_mix_ln.weight", n)
        m.weight(f"{b}.time_mix_ln.bias", (n,), scale=0.1)
    m.weight(f"{b}.time_mix_output.weight", (n, n))


def write_rwkv7(path: Path) -> Path:
    """rwkv7: 2 recurrent layers of RWKV-7 time mix and channel mix.

    llama_model_rwkv7::load_arch_hparams requires ``wkv.head_size`` and the decay, ICLR
    and value-residual LoRA ranks (the gate rank is optional, but load_arch_tensors
    requires the gate LoRA); token_shift_count defaults to 2 (the graph asserts 2):
    R rows of 2 * 64 = 128 floats (attention and FFN shifts), S rows of 64 * 64 = 4096
    (one head of 64, see RWKV7_HEAD).
    """
    n, lora = RWKV7_EMBD, 4
    m = _Model(path, "rwkv7", "tiny-rwkv7", seed=41)
    _rwkv_common(m, ln0=True, output_norm_b=True, n=n, head=RWKV7_HEAD)
    for key in ("decay", "iclr", "value_residual_mix", "gate"):
        m.u32(f"attention.{key}_lora_rank", lora)
    for il in range(RWKV_LAYERS):
        b = f"blk.{il}"
        for norm in ("attn_norm", "attn_norm_2"):
            m.norm(f"{b}.{norm}.weight", n)
            m.weight(f"{b}.{norm}.bias", (n,), scale=0.1)
        _rwkv7_time_mix(m, il, lora=lora, gate=True, ln=True)
        _lerp(m, f"{b}.channel_mix_lerp_k.weight", n=n)
        m.weight(f"{b}.channel_mix_key.weight", (n, RWKV_FF))
        m.weight(f"{b}.channel_mix_value.weight", (RWKV_FF, n))
    m.finish()
    return path


def write_arwkv7(path: Path) -> Path:
    """arwkv7: 2 recurrent layers of RWKV-7 time mix with a Qwen-style RMS-norm SwiGLU FFN.

    llama_model_arwkv7::load_arch_hparams reads rwkv7's keys; the graph asserts
    n_embd_r == n_embd, so ``token_shift_count`` is 1 (one attention shift per layer):
    R rows of 64 floats, S rows of 64 * 64 = 4096 (one head of 64, see RWKV7_HEAD). No
    ln0, no output-norm bias; this model has no gate LoRA (a 5-way lerp) and no time-mix
    group norm, both optional for arwkv7.
    """
    n, lora = RWKV7_EMBD, 4
    m = _Model(path, "arwkv7", "tiny-arwkv7", seed=43)
    _rwkv_common(m, ln0=False, output_norm_b=False, n=n, head=RWKV7_HEAD)
    m.u32("token_shift_count", 1)
    for key in ("decay", "iclr", "value_residual_mix"):
        m.u32(f"attention.{key}_lora_rank", lora)
    for il in range(RWKV_LAYERS):
        m.norm(f"blk.{il}.attn_norm.weight", n)
        _rwkv7_time_mix(m, il, lora=lora, gate=False, ln=False)
        m.norm(f"blk.{il}.ffn_norm.weight", n)
        _ffn(m, il, n, RWKV_FF)
    m.finish()
    return path


def _rwkv6_time_mix(m: _Model, il: int, *, qwen: bool) -> None:
    """One layer's RWKV-6 time mix (llama_model_rwkv6 / rwkv6qwen2 load_arch_tensors):
    the data-dependent lerp (LoRA of 4 x 5) and decay (LoRA of 4). ``qwen``: no
    ``time_mix_first`` (the graph then runs gated linear attention) and no group norm."""
    n, b, extra = RWKV_EMBD, f"blk.{il}", 4
    m.weight(f"{b}.time_mix_w1.weight", (n, extra * 5))
    m.weight(f"{b}.time_mix_w2.weight", (extra, n, 5))
    _lerp(m, f"{b}.time_mix_lerp_x.weight")
    _lerp(m, f"{b}.time_mix_lerp_fused.weight", 5)
    if not qwen:
        m.weight(f"{b}.time_mix_first.weight", (RWKV_HEAD, n // RWKV_HEAD), scale=0.5)
    m.weight(f"{b}.time_mix_decay.weight", (n,), scale=0.5)
    m.weight(f"{b}.time_mix_decay_w1.weight", (n, extra))
    m.weight(f"{b}.time_mix_decay_w2.weight", (extra, n))
    for x in ("key", "value", "receptance", "gate"):
        m.weight(f"{b}.time_mix_{x}.weight", (n, n))
    if not qwen:
        m.norm(f"{b}.time_mix_ln.weight", n)
        m.weight(f"{b}.time_mix_ln.bias", (n,), scale=0.1)
    m.weight(f"{b}.time_mix_output.weight", (n, n))


def write_rwkv6(path: Path) -> Path:
    """rwkv6: 2 recurrent layers of RWKV-6 time mix and channel mix.

    llama_model_rwkv6::load_arch_hparams requires ``wkv.head_size`` and the time-mix /
    time-decay LoRA widths; token_shift_count defaults to 2 (the graph asserts 2):
    R rows of 2 * 16 = 32 floats, S rows of 16 * 8 = 128.
    """
    n = RWKV_EMBD
    m = _Model(path, "rwkv6", "tiny-rwkv6", seed=45)
    _rwkv_common(m, ln0=True, output_norm_b=True)
    m.u32("time_mix_extra_dim", 4)
    m.u32("time_decay_extra_dim", 4)
    for il in range(RWKV_LAYERS):
        b = f"blk.{il}"
        for norm in ("attn_norm", "attn_norm_2"):
            m.norm(f"{b}.{norm}.weight", n)
            m.weight(f"{b}.{norm}.bias", (n,), scale=0.1)
        _rwkv6_time_mix(m, il, qwen=False)
        _lerp(m, f"{b}.channel_mix_lerp_k.weight")
        _lerp(m, f"{b}.channel_mix_lerp_r.weight")
        m.weight(f"{b}.channel_mix_key.weight", (n, RWKV_FF))
        m.weight(f"{b}.channel_mix_value.weight", (RWKV_FF, n))
        m.weight(f"{b}.channel_mix_receptance.weight", (n, n))
    m.finish()
    return path


def write_rwkv6qwen2(path: Path) -> Path:
    """rwkv6qwen2: 2 recurrent layers of RWKV-6 time mix (gated linear attention, no
    ``time_mix_first``) with a Qwen-style RMS-norm SwiGLU FFN.

    The graph asserts n_embd_r == n_embd: ``token_shift_count`` 1, R rows of 16 floats,
    S rows of 128. No ln0; K/V as wide as n_embd (no KV heads).
    """
    n = RWKV_EMBD
    m = _Model(path, "rwkv6qwen2", "tiny-rwkv6qwen2", seed=47)
    _rwkv_common(m, ln0=False, output_norm_b=False)
    m.u32("token_shift_count", 1)
    m.u32("time_mix_extra_dim", 4)
    m.u32("time_decay_extra_dim", 4)
    for il in range(RWKV_LAYERS):
        m.norm(f"blk.{il}.attn_norm.weight", n)
        _rwkv6_time_mix(m, il, qwen=True)
        m.norm(f"blk.{il}.ffn_norm.weight", n)
        _ffn(m, il, n, RWKV_FF)
    m.finish()
    return path


MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-lfm2moe.gguf": write_lfm2moe,
    "tiny-rwkv7.gguf": write_rwkv7,
    "tiny-arwkv7.gguf": write_arwkv7,
    "tiny-rwkv6.gguf": write_rwkv6,
    "tiny-rwkv6qwen2.gguf": write_rwkv6qwen2,
}

RUNS: list[RunConfig] = [
    # hybrid (no window: lfm2moe reads none), unified
    RunConfig.of("lfm2moe", "tiny-lfm2moe.gguf", "main", 256, 64, True, True),
    # one stream per sequence: 4 x 256 cells
    RunConfig.of("lfm2moe", "tiny-lfm2moe.gguf", "main", 1024, 64, False, False),
    # recurrent rollback (llm_arch_supports_rs_rollback): n_rs_seq 2
    RunConfig.of("lfm2moe", "tiny-lfm2moe.gguf", "rollback", 256, 64, True, True,
        n_rs_seq=2,
    ),
    RunConfig.of("lfm2moe", "tiny-lfm2moe.gguf", "ops", 256, 32, True, True, play=Play.OPS),
    # PARTIAL_ONLY checkpoints (the recurrent part only), one stream per sequence
    RunConfig.of("lfm2moe", "tiny-lfm2moe.gguf", "checkpoint", 1024, 32, False,
        False, play=Play.CHECKPOINT,
    ),
    # recurrent (RWKV-7): every layer holds a token-shift R row and a WKV S row per sequence
    RunConfig("rwkv7.main.u1", "rwkv7", "tiny-rwkv7.gguf", "main", 256, 64, False, True),
    RunConfig("rwkv7.ops.u1", "rwkv7", "tiny-rwkv7.gguf", "ops", 256, 32, False, True, play=Play.OPS),
    # n_rs_seq 2 asked of an arch without rollback support: the reference clamps it to 0,
    # so the scenario's rollbacks (partial seq_rm of a recurrent state) are refused
    RunConfig(
        "rwkv7.rollback-clamped.u1", "rwkv7", "tiny-rwkv7.gguf", "rollback-clamped", 256, 64, False,
        True, n_rs_seq=2,
    ),
    # RWKV-6: two token shifts per layer, like rwkv7
    RunConfig("rwkv6.main.u1", "rwkv6", "tiny-rwkv6.gguf", "main", 256, 64, False, True),
    RunConfig("rwkv6.ops.u1", "rwkv6", "tiny-rwkv6.gguf", "ops", 256, 32, False, True, play=Play.OPS),
    # the Qwen-based RWKV flavours keep one token shift per layer (R rows of n_embd)
    RunConfig("arwkv7.main.u1", "arwkv7", "tiny-arwkv7.gguf", "main", 256, 64, False, True),
    RunConfig("arwkv7.ops.u1", "arwkv7", "tiny-arwkv7.gguf", "ops", 256, 32, False, True, play=Play.OPS),
    RunConfig("rwkv6qwen2.main.u1", "rwkv6qwen2", "tiny-rwkv6qwen2.gguf", "main", 256, 64, False, True),
    RunConfig(
        "rwkv6qwen2.ops.u1", "rwkv6qwen2", "tiny-rwkv6qwen2.gguf", "ops", 256, 32, False, True,
        play=Play.OPS,
    ),
]  # fmt: skip
