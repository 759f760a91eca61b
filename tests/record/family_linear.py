"""Linear-attention hybrids (gated delta-net, KDA, lightning attention): tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).

The gated delta-net models (qwen3next, qwen35, qwen35moe) share :data:`GDN`: n_embd 16,
2 K heads and 4 V heads of 4 (``ssm.group_count`` 2, ``ssm.time_step_rank`` 4,
``ssm.state_size`` 4, ``ssm.inner_size`` 16), conv kernel 4 over Q, K and V (32
channels): R rows of 3 * 32 = 96 floats, S rows of 4 * 16 = 64 floats (4 matrices of
4 x 4). Their attention layers: 2 query heads and 1 KV head of 8 (K/V rows of 8), Q
projected with its output gate (2 * 8 per head), Q and K RMS-normed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models import _common, _ffn, _head, _Model, _moe, _shexp
from runconfig import Play, RunConfig


@dataclass(frozen=True)
class _GDN:
    """Gated delta-net widths (the ``ssm.*`` keys) and the attention layers' heads."""

    n_embd: int = 16
    d_conv: int = 4
    head_dim: int = 4  # ssm.state_size: K and V head size
    n_k_heads: int = 2  # ssm.group_count
    n_v_heads: int = 4  # ssm.time_step_rank
    n_head: int = 2  # attention query heads
    n_head_kv: int = 1
    head: int = 8  # attention head size
    n_rot: int = 8

    @property
    def d_inner(self) -> int:
        """ssm.inner_size: V heads * head size."""
        return self.n_v_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """The conv covers Q, K and V."""
        return 2 * self.n_k_heads * self.head_dim + self.d_inner


GDN = _GDN()


def _gdn_keys(m: _Model, s: _GDN, n_rot: int | None = None) -> None:
    m.u32("ssm.conv_kernel", s.d_conv)
    m.u32("ssm.inner_size", s.d_inner)
    m.u32("ssm.state_size", s.head_dim)
    m.u32("ssm.time_step_rank", s.n_v_heads)
    m.u32("ssm.group_count", s.n_k_heads)
    m.u32("attention.head_count_kv", s.n_head_kv)
    m.u32("attention.key_length", s.head)
    m.u32("attention.value_length", s.head)
    m.u32("rope.dimension_count", s.n_rot if n_rot is None else n_rot)
    m.f32("rope.freq_base", 10000.0)


def _gdn_mixer(m: _Model, il: int, s: _GDN) -> None:
    """One gated delta-net layer: fused QKV and Z (gate) projections, conv, decay, norm, out."""
    m.weight(f"blk.{il}.attn_qkv.weight", (s.n_embd, s.conv_dim))
    m.weight(f"blk.{il}.attn_gate.weight", (s.n_embd, s.d_inner))
    m.weight(f"blk.{il}.ssm_conv1d.weight", (s.d_conv, s.conv_dim), scale=0.5)
    m.weight(f"blk.{il}.ssm_dt.bias", (s.n_v_heads,), scale=0.5)
    # ssm_a = -exp(A_log) < 0: the gate decays the state
    a = -(0.5 + m.rng.random(s.n_v_heads)).astype("float32")
    m.w.add_tensor(f"blk.{il}.ssm_a", a)
    m.weight(f"blk.{il}.ssm_beta.weight", (s.n_embd, s.n_v_heads))
    m.weight(f"blk.{il}.ssm_alpha.weight", (s.n_embd, s.n_v_heads))
    m.norm(f"blk.{il}.ssm_norm.weight", s.head_dim)
    m.weight(f"blk.{il}.ssm_out.weight", (s.d_inner, s.n_embd))


def _gdn_mixer_ba(m: _Model, il: int, s: _GDN) -> None:
    """qwen3next's delta-net layer: as :func:`_gdn_mixer`, but beta and alpha come from one
    projection (``ssm_ba``: per K head, its V heads' betas then their alphas)."""
    m.weight(f"blk.{il}.attn_qkv.weight", (s.n_embd, s.conv_dim))
    m.weight(f"blk.{il}.attn_gate.weight", (s.n_embd, s.d_inner))
    m.weight(f"blk.{il}.ssm_conv1d.weight", (s.d_conv, s.conv_dim), scale=0.5)
    m.weight(f"blk.{il}.ssm_dt.bias", (s.n_v_heads,), scale=0.5)
    a = -(0.5 + m.rng.random(s.n_v_heads)).astype("float32")
    m.w.add_tensor(f"blk.{il}.ssm_a", a)
    m.weight(f"blk.{il}.ssm_ba.weight", (s.n_embd, 2 * s.n_v_heads))
    m.norm(f"blk.{il}.ssm_norm.weight", s.head_dim)
    m.weight(f"blk.{il}.ssm_out.weight", (s.d_inner, s.n_embd))


@dataclass(frozen=True)
class _MoE:
    """Routed experts (softmax gating) plus one sigmoid-gated shared expert."""

    n_expert: int = 4
    n_expert_used: int = 2
    n_ff_exp: int = 8
    n_ff_shexp: int = 16


MOE = _MoE()


def _moe_keys(m: _Model, e: _MoE) -> None:
    m.u32("expert_count", e.n_expert)
    m.u32("expert_used_count", e.n_expert_used)
    m.u32("expert_feed_forward_length", e.n_ff_exp)
    m.u32("expert_shared_feed_forward_length", e.n_ff_shexp)


def _moe_ffn(m: _Model, il: int, n_embd: int, e: _MoE) -> None:
    """The router, the stacked expert weights {.., .., n_expert} and the shared expert."""
    _moe(m, il, n_embd, e.n_ff_exp, e.n_expert)
    m.weight(f"blk.{il}.ffn_gate_inp_shexp.weight", (n_embd,))
    _shexp(m, il, n_embd, e.n_ff_shexp)


def _gated_attention(m: _Model, il: int, s: _GDN) -> None:
    """One full-attention layer: Q with its gate (2 * head per query head), K, V, Q/K norms."""
    n_q, n_kv = s.n_head * s.head, s.n_head_kv * s.head
    m.weight(f"blk.{il}.attn_q.weight", (s.n_embd, 2 * n_q))
    m.weight(f"blk.{il}.attn_k.weight", (s.n_embd, n_kv))
    m.weight(f"blk.{il}.attn_v.weight", (s.n_embd, n_kv))
    m.weight(f"blk.{il}.attn_output.weight", (n_q, s.n_embd))
    m.norm(f"blk.{il}.attn_q_norm.weight", s.head)
    m.norm(f"blk.{il}.attn_k_norm.weight", s.head)


def write_qwen35(path: Path, *, mtp: bool = False) -> Path:
    """qwen35 (Qwen3.5 dense): 4 layers [delta-net, attention, delta-net, attention].

    llama_model_qwen35::load_arch_hparams: the five ``ssm.*`` keys, ``rope.dimension_sections``
    (4 entries; interleaved M-RoPE, rope type 40), ``full_attention_interval`` 2 (layer il
    recurs unless (il + 1) % 2 == 0). Every layer: attn_norm, post_attention_norm and a
    SwiGLU FFN. RoPE over the whole head (n_rot 8, sections [2, 1, 1, 0]).

    ``mtp``: a fifth, NextN (MTP) layer (``nextn_predict_layers`` 1): an attention block
    plus ``nextn.eh_proj`` / ``enorm`` / ``hnorm`` (the loader requires them even when it
    skips MTP). The reference's filters keep it out of both memories: the KV cache holds
    layers 1 and 3, the recurrent state header counts 4 layers.
    """
    s, n_layer, n_ff = GDN, 4, 32
    name = "tiny-qwen35-mtp" if mtp else "tiny-qwen35"
    m = _Model(path, "qwen35", name, seed=41)
    _common(m, s.n_embd, n_layer + mtp, n_ff, s.n_head)
    if mtp:
        m.u32("nextn_predict_layers", 1)
    _gdn_keys(m, s)
    m.u32("full_attention_interval", 2)
    m.arr("rope.dimension_sections", [2, 1, 1, 0])
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        m.norm(f"blk.{il}.post_attention_norm.weight", s.n_embd)
        if (il + 1) % 2:
            _gdn_mixer(m, il, s)
        else:
            _gated_attention(m, il, s)
        _ffn(m, il, s.n_embd, n_ff)
    if mtp:
        il = n_layer
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        m.norm(f"blk.{il}.post_attention_norm.weight", s.n_embd)
        _gated_attention(m, il, s)
        _ffn(m, il, s.n_embd, n_ff)
        m.weight(f"blk.{il}.nextn.eh_proj.weight", (2 * s.n_embd, s.n_embd))
        m.norm(f"blk.{il}.nextn.enorm.weight", s.n_embd)
        m.norm(f"blk.{il}.nextn.hnorm.weight", s.n_embd)
    m.finish()
    return path


def write_qwen35moe(path: Path) -> Path:
    """qwen35moe (Qwen3.5 MoE): as :func:`write_qwen35`, with MoE FFNs (:data:`MOE`: 4
    experts, 2 used, plus a shared expert) and the recurrent layers given as an explicit
    ``attention.recurrent_layers`` bool array [T, F, T, F] (no full_attention_interval).
    """
    s, e, n_layer, n_ff = GDN, MOE, 4, 32
    recr = [True, False, True, False]
    m = _Model(path, "qwen35moe", "tiny-qwen35moe", seed=42)
    _common(m, s.n_embd, n_layer, n_ff, s.n_head)
    _gdn_keys(m, s)
    _moe_keys(m, e)
    m.w.add_array("qwen35moe.attention.recurrent_layers", recr)
    m.arr("rope.dimension_sections", [2, 1, 1, 0])
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        m.norm(f"blk.{il}.post_attention_norm.weight", s.n_embd)
        if recr[il]:
            _gdn_mixer(m, il, s)
        else:
            _gated_attention(m, il, s)
        _moe_ffn(m, il, s.n_embd, e)
    m.finish()
    return path


def write_qwen3next(path: Path) -> Path:
    """qwen3next (Qwen3-Next): 4 layers [delta-net x 3, attention] (the default
    full_attention_interval 4), NeoX RoPE over half the head (n_rot 4), MoE FFNs
    (:data:`MOE`), beta / alpha from one ``ssm_ba`` projection.

    llama_model_qwen3next::load_tensors refuses a model without experts.
    """
    s, e, n_layer, n_ff = GDN, MOE, 4, 32
    m = _Model(path, "qwen3next", "tiny-qwen3next", seed=43)
    _common(m, s.n_embd, n_layer, n_ff, s.n_head)
    _gdn_keys(m, s, n_rot=4)
    _moe_keys(m, e)
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        m.norm(f"blk.{il}.post_attention_norm.weight", s.n_embd)
        if (il + 1) % 4:
            _gdn_mixer_ba(m, il, s)
        else:
            _gated_attention(m, il, s)
        _moe_ffn(m, il, s.n_embd, e)
    m.finish()
    return path


def write_minimax_01(path: Path) -> Path:
    """minimax-01 (MiniMax-Text-01): 4 layers [lightning, attention, lightning, attention]
    (``full_attention_interval`` 2), MoE FFNs (4 experts, 2 used, no shared expert).

    llama_model_minimax_01::load_arch_hparams: ``residual_scale`` is required; the
    lightning layers' state is one head x head matrix per head (n_embd_head_la = head
    size 8, 2 heads: S rows of 128 floats) and no conv state (R rows of 0). Attention: 2
    heads of 8, 1 KV head (K/V rows of 8), NeoX over half the head (n_rot 4).
    """
    n_embd, n_layer, n_ff, n_head, n_head_kv, head = 16, 4, 8, 2, 1, 8
    e = MOE
    m = _Model(path, "minimax-01", "tiny-minimax-01", seed=44)
    _common(m, n_embd, n_layer, n_ff, n_head)
    m.u32("attention.head_count_kv", n_head_kv)
    m.u32("attention.key_length", head)
    m.u32("attention.value_length", head)
    m.u32("rope.dimension_count", 4)
    m.f32("rope.freq_base", 10000.0)
    m.f32("residual_scale", 1.0)
    m.u32("full_attention_interval", 2)
    m.u32("expert_count", e.n_expert)
    m.u32("expert_used_count", e.n_expert_used)
    _head(m, n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", n_embd)
        if (il + 1) % 2:
            m.norm(f"blk.{il}.attn_norm_2.weight", n_head * head)
            m.weight(f"blk.{il}.attn_qkv.weight", (n_embd, 3 * n_head * head))
            m.weight(f"blk.{il}.attn_gate.weight", (n_embd, n_head * head))
        else:
            m.weight(f"blk.{il}.attn_q.weight", (n_embd, n_head * head))
            m.weight(f"blk.{il}.attn_k.weight", (n_embd, n_head_kv * head))
            m.weight(f"blk.{il}.attn_v.weight", (n_embd, n_head_kv * head))
        m.weight(f"blk.{il}.attn_output.weight", (n_head * head, n_embd))
        m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
        _moe(m, il, n_embd, n_ff, e.n_expert)
    m.finish()
    return path


@dataclass(frozen=True)
class _KDA:
    """Kimi delta attention (KDA) layers and the MLA attention layers beside them."""

    n_embd: int = 16
    n_head: int = 2  # KDA heads and MLA query heads
    head_dim: int = 4  # kda.head_dim
    d_conv: int = 4
    kv_lora_rank: int = 8  # the MLA latent: K rows of kv_lora_rank + n_rot, no V
    n_rot: int = 4  # qk_rope_head_dim (Kimi-Linear applies no RoPE)
    head_k_mla: int = 8  # qk_nope (4) + qk_rope (4)
    head_v_mla: int = 8

    @property
    def d_inner(self) -> int:
        return self.n_head * self.head_dim


KDA = _KDA()


def _mla_keys(m: _Model, s: _KDA, value_length: int) -> None:
    """The MLA layers' keys: K rows of the latent plus its RoPE part, the MLA head sizes."""
    m.u32("attention.key_length", s.kv_lora_rank + s.n_rot)
    m.u32("attention.value_length", value_length)
    m.u32("attention.key_length_mla", s.head_k_mla)
    m.u32("attention.value_length_mla", s.head_v_mla)
    m.u32("attention.kv_lora_rank", s.kv_lora_rank)
    m.u32("rope.dimension_count", s.n_rot)


def _kda_moe_keys(m: _Model, e: _MoE) -> None:
    """One shared expert, layer 0 dense, sigmoid routing (kimi-linear and its kin)."""
    m.u32("expert_count", e.n_expert)
    m.u32("expert_used_count", e.n_expert_used)
    m.u32("expert_feed_forward_length", e.n_ff_exp)
    m.u32("expert_shared_count", 1)
    m.u32("leading_dense_block_count", 1)
    m.u32("expert_gating_func", 2)  # sigmoid


def _kda_mixer(m: _Model, il: int, s: _KDA) -> None:
    """One KDA layer: Q/K/V projections and their depthwise convs, the f (decay) and g
    (output gate) low-rank projections, beta, A, dt bias, the gated output norm."""
    for x in "qkv":
        m.weight(f"blk.{il}.ssm_conv1d_{x}.weight", (s.d_conv, 1, s.d_inner), scale=0.5)
        m.weight(f"blk.{il}.attn_{x}.weight", (s.n_embd, s.d_inner))
    m.weight(f"blk.{il}.ssm_f_a.weight", (s.n_embd, s.head_dim))
    m.weight(f"blk.{il}.ssm_f_b.weight", (s.head_dim, s.d_inner))
    m.weight(f"blk.{il}.ssm_beta.weight", (s.n_embd, s.n_head))
    a = -(0.5 + m.rng.random((s.n_head, 1))).astype("float32")
    m.w.add_tensor(f"blk.{il}.ssm_a", a)
    m.weight(f"blk.{il}.ssm_dt.bias", (s.d_inner,), scale=0.5)
    m.weight(f"blk.{il}.ssm_g_a.weight", (s.n_embd, s.head_dim))
    m.weight(f"blk.{il}.ssm_g_b.weight", (s.head_dim, s.d_inner))
    m.norm(f"blk.{il}.ssm_norm.weight", s.head_dim)
    m.weight(f"blk.{il}.attn_output.weight", (s.d_inner, s.n_embd))


def _mla(m: _Model, il: int, s: _KDA) -> None:
    """One MLA layer with the MLA KV cache (split wk_b / wv_b, no wkv_b; no Q compression)."""
    m.weight(f"blk.{il}.attn_q.weight", (s.n_embd, s.n_head * s.head_k_mla))
    m.weight(f"blk.{il}.attn_kv_a_mqa.weight", (s.n_embd, s.kv_lora_rank + s.n_rot))
    m.norm(f"blk.{il}.attn_kv_a_norm.weight", s.kv_lora_rank)
    nope = s.head_k_mla - s.n_rot
    m.weight(f"blk.{il}.attn_k_b.weight", (nope, s.kv_lora_rank, s.n_head))
    m.weight(f"blk.{il}.attn_v_b.weight", (s.kv_lora_rank, s.head_v_mla, s.n_head))
    m.weight(f"blk.{il}.attn_output.weight", (s.n_head * s.head_v_mla, s.n_embd))


def write_kimi_linear(path: Path) -> Path:
    """kimi-linear (Kimi-Linear): 4 layers [KDA, MLA, KDA, MLA]; layer 0's FFN is dense
    (``leading_dense_block_count`` 1), the others MoE (sigmoid gating, expert bias, one
    shared expert).

    llama_model_kimi_linear::load_arch_hparams: a layer recurs iff its ``head_count_kv``
    is 0; KDA widths from ``kda.head_dim`` 4 and the first layer's head count 2: R rows of
    3 * (d_conv - 1) * 2 * 4 = 72 floats (Q, K and V convs), S rows of 4 * 4 * 2 = 32. The
    MLA layers (``key_length_mla`` / ``value_length_mla`` set: is_mla) cache only K, the
    latent: ``key_length`` = kv_lora_rank + n_rot = 12 per token, 1 KV head.
    """
    s, e, n_layer, n_ff = KDA, MOE, 4, 32
    kv_heads = [0, 1, 0, 1]
    m = _Model(path, "kimi-linear", "tiny-kimi-linear", seed=45)
    _common(m, s.n_embd, n_layer, n_ff, s.n_head)
    m.arr("attention.head_count_kv", kv_heads)
    _mla_keys(m, s, s.kv_lora_rank)
    m.u32("ssm.conv_kernel", s.d_conv)
    m.u32("kda.head_dim", s.head_dim)
    _kda_moe_keys(m, e)
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        if kv_heads[il]:
            _mla(m, il, s)
        else:
            _kda_mixer(m, il, s)
        m.norm(f"blk.{il}.ffn_norm.weight", s.n_embd)
        if il == 0:
            _ffn(m, il, s.n_embd, n_ff)
            continue
        _moe(m, il, s.n_embd, e.n_ff_exp, e.n_expert)
        m.weight(f"blk.{il}.exp_probs_b.bias", (e.n_expert,), scale=0.1)
        _shexp(m, il, s.n_embd, e.n_ff_exp)
    m.finish()
    return path


def write_bailingmoe3(path: Path) -> Path:
    """bailingmoe3 (Ling 2.5): 4 trunk layers [KDA, MLA, KDA, MLA] and a NextN (MTP) MLA
    layer 4 without its tensors (a trunk-only file); layer 0's FFN is dense, the others
    sigmoid-gated MoE with an expert bias and a shared expert.

    llama_model_bailingmoe3::load_arch_hparams: a trunk layer recurs iff its
    ``head_count_kv`` is 0; ``kda.gate_lower_bound`` (< 0) is required. KDA widths as in
    kimi-linear (R rows of 72, S rows of 32); its f / g projections are full rank. MLA
    with normal RoPE over the latent's last 4 values (no rope sections): K-only rows of
    12, one KV head; the reference's plain hybrid filter caches the NextN layer too.
    """
    s, e, n_trunk, n_ff = KDA, MOE, 4, 32
    kv_heads = [0, 1, 0, 1, 1]
    m = _Model(path, "bailingmoe3", "tiny-bailingmoe3", seed=46)
    _common(m, s.n_embd, len(kv_heads), n_ff, s.n_head)
    m.u32("nextn_predict_layers", 1)
    m.arr("attention.head_count_kv", kv_heads)
    _mla_keys(m, s, s.kv_lora_rank)
    m.f32("rope.freq_base", 10000.0)
    m.u32("ssm.conv_kernel", s.d_conv)
    m.u32("kda.head_dim", s.head_dim)
    m.f32("kda.gate_lower_bound", -5.0)
    _kda_moe_keys(m, e)
    _head(m, s.n_embd)
    for il in range(n_trunk):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        if kv_heads[il]:
            _mla(m, il, s)
            m.weight(f"blk.{il}.attn_gate.weight", (s.n_embd, s.n_head))
        else:
            for x in "qkv":
                m.weight(f"blk.{il}.ssm_conv1d_{x}.weight", (s.d_conv, 1, s.d_inner, 1), 0.5)
                m.weight(f"blk.{il}.attn_{x}.weight", (s.n_embd, s.d_inner))
            m.weight(f"blk.{il}.ssm_f_a.weight", (s.n_embd, s.d_inner))
            m.weight(f"blk.{il}.ssm_beta.weight", (s.n_embd, s.n_head))
            a = -(0.5 + m.rng.random((s.n_head, 1))).astype("float32")
            m.w.add_tensor(f"blk.{il}.ssm_a", a)
            m.weight(f"blk.{il}.ssm_dt.bias", (s.d_inner,), scale=0.5)
            m.weight(f"blk.{il}.ssm_g_a.weight", (s.n_embd, s.d_inner))
            m.norm(f"blk.{il}.ssm_norm.weight", s.head_dim)
            m.weight(f"blk.{il}.attn_output.weight", (s.d_inner, s.n_embd))
        m.norm(f"blk.{il}.ffn_norm.weight", s.n_embd)
        if il == 0:
            _ffn(m, il, s.n_embd, n_ff)
            continue
        _moe(m, il, s.n_embd, e.n_ff_exp, e.n_expert, probs_b=True)
        _shexp(m, il, s.n_embd, e.n_ff_exp)
    m.finish()
    return path


def write_kimi_k3(path: Path) -> Path:
    """kimi-k3 (Kimi-K3): kimi-linear's layout [KDA, MLA, KDA, MLA] with K3's tensors (a
    full-rank output gate ``ssm_g``, a 1-D A, a sigmoid attention gate), situ activations
    (``activation.situ_beta`` / ``situ_linear_beta``) and no cross-layer residual
    attention (``attn_res.block_size`` 0).

    llama_model_kimi_k3::load_arch_hparams sets the V head size to ``kv_lora_rank`` (8),
    so n_embd_v_gqa is 8 whatever ``value_length`` says (written as 6 here); the cache
    is K-only (MLA): K rows of 12. KDA: R rows of 72, S rows of 32.
    """
    s, e, n_layer, n_ff = KDA, MOE, 4, 32
    kv_heads = [0, 1, 0, 1]
    m = _Model(path, "kimi-k3", "tiny-kimi-k3", seed=47)
    _common(m, s.n_embd, n_layer, n_ff, s.n_head)
    m.arr("attention.head_count_kv", kv_heads)
    _mla_keys(m, s, 6)
    m.u32("ssm.conv_kernel", s.d_conv)
    m.u32("kda.head_dim", s.head_dim)
    _kda_moe_keys(m, e)
    m.u32("attn_res.block_size", 0)
    m.f32("activation.situ_beta", 2.0)
    m.f32("activation.situ_linear_beta", 4.0)
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        m.norm(f"blk.{il}.ffn_norm.weight", s.n_embd)
        if kv_heads[il]:
            _mla(m, il, s)
            m.weight(f"blk.{il}.attn_gate.weight", (s.n_embd, s.n_head * s.head_v_mla))
        else:
            for x in "qkv":
                m.weight(f"blk.{il}.ssm_conv1d_{x}.weight", (s.d_conv, 1, s.d_inner, 1), 0.5)
                m.weight(f"blk.{il}.attn_{x}.weight", (s.n_embd, s.d_inner))
            m.weight(f"blk.{il}.ssm_f_a.weight", (s.n_embd, s.head_dim))
            m.weight(f"blk.{il}.ssm_f_b.weight", (s.head_dim, s.d_inner))
            m.weight(f"blk.{il}.ssm_beta.weight", (s.n_embd, s.n_head))
            a = -(0.5 + m.rng.random(s.n_head)).astype("float32")
            m.w.add_tensor(f"blk.{il}.ssm_a", a)
            m.weight(f"blk.{il}.ssm_dt.bias", (s.d_inner,), scale=0.5)
            m.weight(f"blk.{il}.ssm_g.weight", (s.n_embd, s.d_inner))
            m.norm(f"blk.{il}.ssm_norm.weight", s.head_dim)
            m.weight(f"blk.{il}.attn_output.weight", (s.d_inner, s.n_embd))
        if il == 0:
            _ffn(m, il, s.n_embd, n_ff)
            continue
        _moe(m, il, s.n_embd, e.n_ff_exp, e.n_expert, probs_b=True)
        _shexp(m, il, s.n_embd, e.n_ff_exp)
    m.finish()
    return path


MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-kimi-k3.gguf": write_kimi_k3,
    "tiny-bailingmoe3.gguf": write_bailingmoe3,
    "tiny-kimi-linear.gguf": write_kimi_linear,
    "tiny-minimax-01.gguf": write_minimax_01,
    "tiny-qwen35.gguf": write_qwen35,
    "tiny-qwen35-mtp.gguf": lambda p: write_qwen35(p, mtp=True),
    "tiny-qwen35moe.gguf": write_qwen35moe,
    "tiny-qwen3next.gguf": write_qwen3next,
}

_MM01, _KIMI = "tiny-minimax-01.gguf", "tiny-kimi-linear.gguf"
_BAIL, _K3 = "tiny-bailingmoe3.gguf", "tiny-kimi-k3.gguf"
_Q35, _Q35M, _Q3N = "tiny-qwen35.gguf", "tiny-qwen35moe.gguf", "tiny-qwen3next.gguf"

RUNS: list[RunConfig] = [
    # qwen35: hybrid memory, attention layers 1 and 3 (M-RoPE: cells carry ext positions),
    # gated delta-net layers 0 and 2
    RunConfig.of("qwen35", _Q35, "main", 256, 64, True, True),
    RunConfig.of("qwen35", _Q35, "main", 1024, 64, False, False),
    RunConfig.of("qwen35", _Q35, "rollback", 256, 64, True, True, n_rs_seq=2),
    # ubatches of 4: prompts span several ubatches (split_equal keeps each sequence's
    # last n_rs_seq + 1 tokens together)
    RunConfig.of(
        "qwen35",
        _Q35,
        "rollback-ub4",
        256,
        4,
        True,
        True,
        n_rs_seq=2,
    ),
    # context checkpoints as llama-server takes them for hybrids (PARTIAL_ONLY: the
    # recurrent part)
    RunConfig.of(
        "qwen35",
        _Q35,
        "checkpoint",
        256,
        64,
        True,
        True,
        play=Play.CHECKPOINT,
    ),
    # 256 cells run out (M-RoPE: kshift=False, a prefix seq_rm instead of a negative shift)
    RunConfig.of(
        "qwen35",
        _Q35,
        "fill-noshift",
        256,
        32,
        True,
        True,
        n_batch=512,
        kshift=False,
        play=Play.FILL,
    ),
    # a trunk-only file with a NextN layer: neither memory holds layer 4
    RunConfig(
        "qwen35-mtp.main.fa1.u1", "qwen35", "tiny-qwen35-mtp.gguf", "main", 256, 64, True, True
    ),
    # qwen3next: delta-net layers 0-2, attention layer 3 (NeoX, half the head rotated);
    # no rollback (not in llm_arch_supports_rs_rollback: n_rs_seq is clamped to 0)
    RunConfig.of("qwen3next", _Q3N, "main", 256, 64, True, True),
    RunConfig.of("qwen3next", _Q3N, "main", 1024, 64, False, False),
    RunConfig.of("qwen3next", _Q3N, "ops", 256, 32, True, True, play=Play.OPS),
    # qwen35moe: the qwen35 layout from an explicit recurrent_layers array, MoE FFNs
    RunConfig.of("qwen35moe", _Q35M, "main", 256, 64, True, True),
    RunConfig.of(
        "qwen35moe",
        _Q35M,
        "rollback",
        1024,
        64,
        False,
        False,
        n_rs_seq=2,
    ),
    # minimax-01: lightning layers 0 and 2 (R rows of 0), attention layers 1 and 3
    RunConfig.of("minimax-01", _MM01, "main", 256, 64, True, True),
    RunConfig.of("minimax-01", _MM01, "main", 1024, 64, False, False),
    # kimi-linear: KDA layers 0 and 2, MLA layers 1 and 3 (a K-only cache)
    RunConfig.of("kimi-linear", _KIMI, "main", 256, 64, True, True),
    RunConfig.of("kimi-linear", _KIMI, "main", 1024, 64, False, False),
    # bailingmoe3: KDA layers 0 and 2; MLA layers 1, 3 and the NextN layer 4 (K-only cache)
    RunConfig.of("bailingmoe3", _BAIL, "main", 256, 64, True, True),
    RunConfig.of(
        "bailingmoe3",
        _BAIL,
        "rollback",
        1024,
        64,
        False,
        False,
        n_rs_seq=2,
    ),
    # kimi-k3: KDA layers 0 and 2, MLA layers 1 and 3 (K-only cache, V width = kv_lora_rank)
    RunConfig.of("kimi-k3", _K3, "rollback", 256, 64, True, True, n_rs_seq=2),
    RunConfig.of("kimi-k3", _K3, "main", 1024, 64, False, False),
]
