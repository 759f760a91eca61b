"""Attention-only architectures: dense KV caches and sliding-window (iSWA) caches.

Each loader repeats what the reference's ``load_arch_hparams`` decides for memory: which
layers slide (``set_swa_pattern`` or a per-layer array), the window, the SWA type, the
SWA layers' RoPE base and scale, and head sizes where they differ per layer kind.
"""

from __future__ import annotations

from pymem.errors import ConfigError, UnsupportedError
from pymem.gguf_spec.draft import ArchRule, Draft
from pymem.gguf_spec.meta import GGUFMeta
from pymem.spec import RopeType, SWAType


def _gemma2(m: GGUFMeta, d: Draft) -> None:
    d.swa_type, d.n_swa = SWAType.STANDARD, 4096
    d.load_swa_pattern(2)
    d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), d.rope_freq_base)
    d.rope_freq_scale_swa = d.rope_freq_scale
    d.n_swa = m.u32(d.key("attention.sliding_window"), d.n_swa)


def _gemma3(m: GGUFMeta, d: Draft) -> None:
    found = m.u32_opt(d.key("attention.sliding_window"))
    if found:
        d.swa_type, d.n_swa = SWAType.STANDARD, found
        d.load_swa_pattern(6)
        d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), 10000.0)


def _swa_rope(m: GGUFMeta, d: Draft, scale: float | None = None) -> None:
    """SWA layers' RoPE: ``rope.freq_base_swa`` or the full base; the full scale unless given."""
    d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), d.rope_freq_base)
    d.rope_freq_scale_swa = d.rope_freq_scale if scale is None else scale


def _swa_array(m: GGUFMeta, d: Draft) -> None:
    """A required per-layer ``attention.sliding_window_pattern`` array (``get_arr``, required)."""
    key = d.key("attention.sliding_window_pattern")
    if not m.is_array(key):
        raise ConfigError(f"{m.path}: array key not found in model: {key}")
    d.load_swa_pattern(0)


def _window_opt(m: GGUFMeta, d: Draft) -> int:
    """``attention.sliding_window`` if present (0 if not): most archs slide only when > 0."""
    d.n_swa = m.u32(d.key("attention.sliding_window"), 0)
    return d.n_swa


def _window_req(m: GGUFMeta, d: Draft) -> None:
    d.n_swa = m.u32_req(d.key("attention.sliding_window"))


def _llama4(m: GGUFMeta, d: Draft) -> None:
    # only an explicit window of 0 turns SWA off; any other value is replaced by 8192 chunks
    if m.u32_opt(d.key("attention.sliding_window")) == 0:
        d.swa_type, d.n_swa = SWAType.NONE, 0
        return
    d.swa_type, d.n_swa = SWAType.CHUNKED, 8192
    d.load_swa_pattern(4)  # 3 chunked, then 1 full
    _swa_rope(m, d)


def _cohere2(m: GGUFMeta, d: Draft) -> None:
    d.swa_type = SWAType.STANDARD
    d.load_swa_pattern(4)
    _swa_rope(m, d)
    _window_req(m, d)


def _cohere2moe(m: GGUFMeta, d: Draft) -> None:
    _window_req(m, d)
    d.swa_type = SWAType.STANDARD
    d.load_swa_pattern(4, dense_first=True)
    _swa_rope(m, d)


def _openai_moe(m: GGUFMeta, d: Draft) -> None:
    _window_req(m, d)
    d.swa_type = SWAType.STANDARD
    d.load_swa_pattern(2)
    _swa_rope(m, d)


def _phi3(m: GGUFMeta, d: Draft) -> None:
    # Phi-3's window is read and then switched off (llama.cpp PR 13676): no layer slides
    m.u32_opt(d.key("attention.sliding_window"))
    d.swa_type, d.n_swa = SWAType.NONE, 0


def _exaone4(m: GGUFMeta, d: Draft) -> None:
    # only the 64-layer (32B) model slides; the window key is read for every size, so a
    # smaller model keeps n_swa with swa_type NONE (a plain KV cache)
    if d.n_layer == 64:
        d.swa_type, d.n_swa = SWAType.STANDARD, 4096
        d.load_swa_pattern(4)
        _swa_rope(m, d)
    d.n_swa = m.u32(d.key("attention.sliding_window"), d.n_swa)


def _exaone_moe(m: GGUFMeta, d: Draft) -> None:
    d.swa_type = SWAType.STANDARD
    d.load_swa_pattern(4)
    _swa_rope(m, d)
    _window_req(m, d)


def _olmo2(m: GGUFMeta, d: Draft) -> None:
    if _window_opt(m, d):
        d.swa_type = SWAType.STANDARD
        d.load_swa_pattern(4)
        _swa_rope(m, d, scale=1.0)


def _smallthinker(m: GGUFMeta, d: Draft) -> None:
    if _window_opt(m, d):
        d.swa_type, d.n_swa = SWAType.STANDARD, 4096  # the file's window is replaced
        d.load_swa_pattern(4, dense_first=True)
        _swa_rope(m, d)
    else:
        d.n_swa = 0


def _afmoe(m: GGUFMeta, d: Draft) -> None:
    if _window_opt(m, d):
        d.swa_type = SWAType.STANDARD
        d.load_swa_pattern(4)
        _swa_rope(m, d)


def _mellum(m: GGUFMeta, d: Draft) -> None:
    _afmoe(m, d)  # the same rule: pattern 4 when the window is > 0


def _laguna(m: GGUFMeta, d: Draft) -> None:
    if _window_opt(m, d):
        d.swa_type = SWAType.STANDARD
        d.load_swa_pattern(4, dense_first=True)
        _swa_rope(m, d, scale=1.0)  # SWA layers: plain RoPE, no YaRN factor


def _plamo3(m: GGUFMeta, d: Draft) -> None:
    if _window_opt(m, d):
        d.swa_type = SWAType.STANDARD
        d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), d.rope_freq_base_swa)
        d.load_swa_pattern(8)


def _granite_swa(m: GGUFMeta, d: Draft) -> None:
    # the SWA layers' RoPE keeps the defaults (base 10000, scale 1): the K-shift uses them
    _swa_array(m, d)
    _window_req(m, d)
    d.swa_type = SWAType.STANDARD
    pattern = m.int_array(d.key("attention.rope_pattern"), allow_bool=True)
    if pattern is not None:
        # get_arr over rope_pattern: entries past the array keep their 1
        d.rope_pattern = [
            bool(pattern[il]) if il < len(pattern) else d.rope_pattern[il]
            for il in range(d.n_layer_all)
        ]


def _mimo2(m: GGUFMeta, d: Draft) -> None:
    d.swa_type = SWAType.STANDARD
    _window_req(m, d)
    d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), d.rope_freq_base_swa)
    _swa_array(m, d)


def _step35(m: GGUFMeta, d: Draft) -> None:
    d.swa_type = SWAType.STANDARD
    d.n_rot_full //= 2  # full-attention layers rotate half the dimensions
    _window_req(m, d)
    d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), d.rope_freq_base_swa)
    _swa_array(m, d)
    # its graph rotates sliding layers without the factors (rope_freqs / long / short)
    d.rope_factor_layers = [not swa for swa in d.is_swa]


def _spark2_5(m: GGUFMeta, d: Draft) -> None:
    _window_req(m, d)
    d.swa_type = SWAType.STANDARD
    _swa_array(m, d)
    _swa_rope(m, d)


def _maple(m: GGUFMeta, d: Draft) -> None:
    d.swa_type = SWAType.STANDARD
    _window_req(m, d)
    _swa_array(m, d)
    _swa_rope(m, d)


def _muse_glimmer(m: GGUFMeta, d: Draft) -> None:
    _window_req(m, d)
    d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), d.rope_freq_base)
    d.swa_type = SWAType.STANDARD
    d.load_swa_pattern(4)


def _granite(m: GGUFMeta, d: Draft) -> None:
    # Granite switches RoPE off with rope.scaling.finetuned = false (default true)
    d.rope_pattern = [m.bool_(d.key("rope.scaling.finetuned"), True)] * d.n_layer_all


def _refuse_layer_reuse(d: Draft, n_layer_kv_from_start: int) -> None:
    """Layers from ``n_layer_kv_from_start`` on reuse an earlier layer's K/V in the reference
    (create_memory's layer_reuse_cb, Gemma-3n / Gemma-4): pymem gives every attention layer
    its own K/V, so a model where any layer reuses is refused."""
    if n_layer_kv_from_start < d.n_layer_all:
        raise UnsupportedError(
            f"general.architecture: {d.arch!r}: layers {n_layer_kv_from_start}..{d.n_layer_all - 1} "
            "reuse the K/V of an earlier layer (the reference's layer_reuse_cb); pymem's KV "
            "caches have no layer reuse"
        )


def _gemma3n(m: GGUFMeta, d: Draft) -> None:
    d.swa_type = SWAType.STANDARD
    d.load_swa_pattern(5)
    d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), d.rope_freq_base_swa)
    _window_req(m, d)
    _refuse_layer_reuse(d, 20)  # n_layer_kv_from_start is 20 for every Gemma-3n


def _gemma4(m: GGUFMeta, d: Draft) -> None:
    d.swa_type = SWAType.STANDARD
    _swa_array(m, d)
    n_shared = m.u32(d.key("attention.shared_kv_layers"), 0)
    d.rope_freq_base_swa = m.f32(d.key("rope.freq_base_swa"), d.rope_freq_base_swa)
    _window_req(m, d)
    d.n_embd_head_k_swa = m.u32_req(d.key("attention.key_length_swa"))
    d.n_embd_head_v_swa = m.u32_req(d.key("attention.value_length_swa"))
    # non_causal_type SWA_ONLY is not carried: it matters only to non-causal attention
    _refuse_layer_reuse(d, d.n_layer_all - n_shared)
    # its loader creates rope_freqs for the full-attention layers only
    d.rope_factor_layers = [not swa for swa in d.is_swa]


RULES: dict[str, ArchRule] = {
    # dense: nothing in load_arch_hparams matters for memory
    "llama": ArchRule(RopeType.NORM),
    "qwen2": ArchRule(RopeType.NEOX),
    "qwen3": ArchRule(RopeType.NEOX),
    "qwen2moe": ArchRule(RopeType.NEOX),
    "qwen3moe": ArchRule(RopeType.NEOX),
    "phi2": ArchRule(RopeType.NEOX),
    "phimoe": ArchRule(RopeType.NEOX),
    "olmoe": ArchRule(RopeType.NEOX),
    "command-r": ArchRule(RopeType.NORM),
    "olmo": ArchRule(RopeType.NORM),
    "internlm2": ArchRule(RopeType.NORM),
    "minicpm": ArchRule(RopeType.NORM),
    "granite": ArchRule(RopeType.NORM, _granite),
    "granitemoe": ArchRule(RopeType.NORM),
    "smollm3": ArchRule(
        RopeType.NORM
    ),  # its no-RoPE layers are a graph matter: K-shift rotates all
    "arcee": ArchRule(RopeType.NORM),
    "xverse": ArchRule(RopeType.NORM),
    "starcoder": ArchRule(RopeType.NORM),
    "gemma": ArchRule(RopeType.NEOX),
    "starcoder2": ArchRule(RopeType.NEOX),
    "stablelm": ArchRule(RopeType.NEOX),
    "qwen": ArchRule(RopeType.NEOX),
    "hunyuan-dense": ArchRule(RopeType.NEOX),
    "seed_oss": ArchRule(RopeType.NEOX),
    "apertus": ArchRule(RopeType.NEOX),
    "exaone": ArchRule(RopeType.NEOX),
    "dbrx": ArchRule(RopeType.NEOX),
    "orion": ArchRule(RopeType.NEOX),
    "codeshell": ArchRule(RopeType.NEOX),
    "nemotron": ArchRule(RopeType.NEOX),
    "bitnet": ArchRule(RopeType.NEOX),
    "gptneox": ArchRule(RopeType.NEOX),
    "falcon": ArchRule(RopeType.NEOX),
    "jais2": ArchRule(RopeType.NEOX),
    "openelm": ArchRule(RopeType.NEOX),
    "gpt2": ArchRule(RopeType.NONE),
    "mpt": ArchRule(RopeType.NONE),  # ALiBi from attention.max_alibi_bias
    "jais": ArchRule(RopeType.NONE),  # ALiBi from attention.max_alibi_bias
    "phi3": ArchRule(RopeType.NEOX, _phi3),
    "exaone4": ArchRule(RopeType.NEOX, _exaone4),
    # sliding window (standard unless said)
    "gemma2": ArchRule(RopeType.NEOX, _gemma2),
    "gemma3": ArchRule(RopeType.NEOX, _gemma3),
    "llama4": ArchRule(RopeType.NORM, _llama4),  # chunked
    "cohere2": ArchRule(RopeType.NORM, _cohere2),
    "cohere2moe": ArchRule(RopeType.NORM, _cohere2moe),
    "gpt-oss": ArchRule(RopeType.NEOX, _openai_moe),  # LLM_ARCH_OPENAI_MOE
    "exaone-moe": ArchRule(RopeType.NEOX, _exaone_moe),
    "olmo2": ArchRule(RopeType.NEOX, _olmo2),
    "smallthinker": ArchRule(RopeType.NEOX, _smallthinker),
    "afmoe": ArchRule(RopeType.NEOX, _afmoe),
    "mellum": ArchRule(RopeType.NEOX, _mellum),
    "laguna": ArchRule(RopeType.NEOX, _laguna),
    "plamo3": ArchRule(RopeType.NEOX, _plamo3),
    "granite_swa": ArchRule(RopeType.NORM, _granite_swa),
    "mimo2": ArchRule(RopeType.NEOX, _mimo2),
    "step35": ArchRule(RopeType.NEOX, _step35),
    "spark2_5": ArchRule(RopeType.NEOX, _spark2_5),
    "maple": ArchRule(RopeType.NEOX, _maple),
    "muse-glimmer": ArchRule(RopeType.NORM, _muse_glimmer),
    "gemma3n": ArchRule(RopeType.NEOX, _gemma3n),  # refused when a layer reuses K/V
    "gemma4": ArchRule(RopeType.NEOX, _gemma4),  # refused when a layer reuses K/V
    "gemma4-assistant": ArchRule(
        RopeType.NEOX,
        unsupported="a Gemma-4 assistant (draft) model attends over the K/V of its target "
        "model's context (create_memory's layer_share_cb over ctx_other's memory); pymem's "
        "caches hold only their own layers",
    ),
}

SLIDING_WINDOW_ARCHS = frozenset(
    {
        "gemma2", "gemma3", "llama4", "cohere2", "cohere2moe", "gpt-oss", "exaone-moe", "olmo2",
        "smallthinker", "afmoe", "mellum", "laguna", "plamo3", "granite_swa", "mimo2", "step35",
        "spark2_5", "maple", "muse-glimmer", "gemma3n", "gemma4", "gemma4-assistant", "phi3",
        "exaone4",
    }
)  # fmt: skip
"""Architectures whose ``load_arch_hparams`` reads or sets a sliding window (the reference
then builds an iSWA or SWA cache when the file's values ask for one)."""
