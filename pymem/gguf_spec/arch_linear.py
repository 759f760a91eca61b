"""Linear-attention hybrids: gated delta-net (Qwen3-Next, Qwen3.5), KDA (Kimi-Linear),
lightning attention (MiniMax-01) and their relatives.

Their recurrent layers keep a conv state (R) and a per-head square state matrix (S).
Gated delta-net reads the Mamba keys: ``ssm.state_size`` is the head size (keys and
values), ``ssm.group_count`` the K heads, ``ssm.time_step_rank`` the V heads and
``ssm.inner_size`` = V heads * head size. The conv covers Q, K and V
(``inner_size + 2 * group_count * state_size`` channels), so ``llama_hparams::n_embd_r``'s
Mamba formula holds as it is; S is ``state_size * inner_size`` (one head x head matrix per
V head). KDA layers (kimi-linear, kimi-k3, bailingmoe3) sit beside MLA attention layers,
whose caches hold K only (``ModelSpec.is_mla``). Architectures the reference serves with
a memory type pymem does not implement are refused with that reason.
"""

from __future__ import annotations

from pymem.errors import ConfigError
from pymem.gguf_spec.draft import ArchRule, Draft
from pymem.gguf_spec.meta import GGUFMeta
from pymem.spec import RopeType


def _recurrent_layers(m: GGUFMeta, d: Draft, full_attn_interval: int) -> None:
    """Which layers recur: ``attention.recurrent_layers`` (a per-layer array, or one value
    for every layer), else every layer but each ``full_attention_interval``-th one.

    E.g. 8 trunk layers, interval 4 -> [T, T, T, F, T, T, T, F]; NextN / MTP layers never
    recur under the interval rule (an explicit array is taken as written).
    """
    key = d.key("attention.recurrent_layers")
    if m.is_array(key):
        arr = m.int_array(key, allow_bool=True)
        assert arr is not None
        if len(arr) != d.n_layer_all:
            raise ConfigError(
                f"{m.path}: key {key} has wrong array length; "
                f"expected {d.n_layer_all}, got {len(arr)}"
            )
        d.is_recr = [bool(v) for v in arr]
        return
    value = m.u32_opt(key)
    if value is not None:
        d.is_recr = [bool(value)] * d.n_layer_all
        return
    interval = m.u32(d.key("full_attention_interval"), full_attn_interval)
    if interval == 0:
        raise ConfigError(f"{m.path}: key {d.key('full_attention_interval')} must be > 0")
    d.is_recr = [il < d.n_layer and (il + 1) % interval != 0 for il in range(d.n_layer_all)]


def _gated_delta_net(m: GGUFMeta, d: Draft) -> None:
    """qwen3next / qwen35 / qwen35moe: the five ``ssm.*`` keys, then the recurrent layers
    (default: one full-attention layer in 4)."""
    d.load_ssm(group=True)
    _recurrent_layers(m, d, 4)


def _load_mla(m: GGUFMeta, d: Draft) -> None:
    """The MLA head sizes (``attention.key_length_mla`` / ``value_length_mla``, required):
    both set makes the attention caches K-only (``llama_hparams::is_mla``)."""
    k_mla = m.u32_req(d.key("attention.key_length_mla"))
    v_mla = m.u32_req(d.key("attention.value_length_mla"))
    d.is_mla = k_mla != 0 and v_mla != 0


def _kimi_linear(m: GGUFMeta, d: Draft) -> None:
    """kimi-linear: KDA layers (those without KV heads) beside MLA attention layers.

    KDA widths: R = 3 * (d_conv - 1) * n_head * head_dim (Q, K and V convs), S = head_dim^2
    * n_head, with the first layer's head count (``llama_hparams::n_embd_r/s``).
    """
    _load_mla(m, d)
    m.u32_req(d.key("attention.kv_lora_rank"))
    d.ssm_d_conv = m.u32_req(d.key("ssm.conv_kernel"))
    d.n_embd_head_kda = m.u32_req(d.key("kda.head_dim"))
    d.recurrent_where_no_kv_heads()


def _kimi_k3(m: GGUFMeta, d: Draft) -> None:
    """kimi-k3: kimi-linear's layout (KDA where ``head_count_kv`` is 0, MLA elsewhere);
    the V width is the MLA latent (``kv_lora_rank``), whatever ``value_length`` says."""
    _load_mla(m, d)
    d.n_embd_head_v_full = m.u32_req(d.key("attention.kv_lora_rank"))
    d.ssm_d_conv = m.u32_req(d.key("ssm.conv_kernel"))
    d.n_embd_head_kda = m.u32_req(d.key("kda.head_dim"))
    d.recurrent_where_no_kv_heads()


def _bailingmoe3(m: GGUFMeta, d: Draft) -> None:
    """bailingmoe3 (Ling / Ring 2.5): KDA layers (trunk layers without KV heads) beside MLA
    attention layers; its NextN layer is an MLA layer, cached beside the trunk's (the
    plain hybrid filter). RoPE: M-RoPE when ``rope.dimension_sections`` gives the first
    two sections, else normal (``llama_hparams::use_mrope``).
    """
    _load_mla(m, d)
    m.u32_req(d.key("attention.kv_lora_rank"))
    d.ssm_d_conv = m.u32_req(d.key("ssm.conv_kernel"))
    d.n_embd_head_kda = m.u32_req(d.key("kda.head_dim"))
    bound = m.f32_opt(d.key("kda.gate_lower_bound"))
    if bound is None:
        raise ConfigError(f"{m.path}: key not found in model: {d.key('kda.gate_lower_bound')}")
    if not m.bool_(d.key("kda.safe_gate"), True) or bound >= 0.0:
        # GGML_ASSERTs in the reference's loader
        raise ConfigError(
            f"{m.path}: {d.arch} needs kda.safe_gate true and kda.gate_lower_bound < 0, got {bound}"
        )
    sections = m.u32_or_arr(d.key("rope.dimension_sections"), 4, [0, 0, 0, 0])
    if sections[0] > 0 and sections[1] > 0:
        d.rope_type = RopeType.MROPE
    d.recurrent_where_no_kv_heads()


def _minimax_01(m: GGUFMeta, d: Draft) -> None:
    """minimax-01: lightning-attention layers keep one head x head state per attention head
    (``n_embd_head_la`` = the attention head size) and no conv state (R width 0); default:
    one full-attention layer in 8."""
    d.n_embd_head_la = d.n_embd_head_k_full
    _recurrent_layers(m, d, 8)


_HYBRID_IDX = (
    "the reference serves it with llama_memory_hybrid_idx (a per-token indexer key cache "
    "beside the attention KV cache and the recurrent states, for sparse attention), "
    "which pymem does not implement"
)

RULES: dict[str, ArchRule] = {
    # interleaved M-RoPE (rope.dimension_sections): cells carry an ext position
    "qwen35": ArchRule(RopeType.IMROPE, _gated_delta_net),
    "qwen35moe": ArchRule(RopeType.IMROPE, _gated_delta_net),
    "qwen3next": ArchRule(RopeType.NEOX, _gated_delta_net),
    "minimax-01": ArchRule(RopeType.NEOX, _minimax_01),
    "kimi-linear": ArchRule(RopeType.NONE, _kimi_linear),
    "kimi-k3": ArchRule(RopeType.NONE, _kimi_k3),
    "bailingmoe3": ArchRule(RopeType.NORM, _bailingmoe3),  # MROPE with rope sections
    # the indexer keys (attention.indexer.*) are required, so every file needs the idx memory
    "qwen4exp": ArchRule(RopeType.IMROPE, unsupported=_HYBRID_IDX),
    # KDA layers + DSA layers (a K-only MLA cache and an indexer cache)
    "glm5-next": ArchRule(RopeType.NONE, unsupported=_HYBRID_IDX),
    "deepseek4": ArchRule(
        RopeType.NORM,
        unsupported=(
            "the reference serves it with llama_kv_cache_dsv4 (a sliding-window cache plus "
            "per-layer compressed-KV states with their own rollback rows), which pymem does "
            "not implement"
        ),
    ),
}
