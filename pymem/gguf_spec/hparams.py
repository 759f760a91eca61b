"""The memory-relevant hyper-parameters of a GGUF model (``llama_hparams``' subset).

Why: a runtime should not have to know, per architecture, which layers are recurrent,
which use a sliding window, how wide a Mamba conv state is or how an LFM2 short-conv
cache is sized. llama.cpp derives all of that in ``llama_model::load_hparams`` (the
general keys, read here) and each architecture's ``load_arch_hparams`` (one
:class:`~pymem.gguf_spec.rules.ArchRule` per architecture in the ``arch_*`` modules),
so that ``create_memory(spec_from_gguf(path), params)`` builds the memory the reference
builds for the same file.

Keys are read with the reference's type rules (:class:`~pymem.gguf_spec.meta.GGUFMeta`).
Only metadata is read (``gguf.GGUFReader`` memory-maps the file; tensor data is never
touched). Per-layer RoPE frequency-factor tensors (``rope_freqs``) are not represented.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pymem.errors import ConfigError, UnsupportedError
from pymem.gguf_spec.draft import Draft
from pymem.gguf_spec.meta import LLAMA_MAX_LAYERS, GGUFMeta
from pymem.gguf_spec.rules import HYBRID_ARCHS, NO_KV_SHIFT_ARCHS, RECURRENT_ARCHS, RULES
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType, SWAType

GGML_MROPE_SECTIONS = 4

# llama_rope_scaling_type_from_string
_ROPE_SCALING = {"none": 0, "linear": 1, "yarn": 2, "longrope": 3}
ROPE_SCALING_NONE, ROPE_SCALING_LINEAR, ROPE_SCALING_YARN = 0, 1, 2


@dataclass(frozen=True)
class GGUFHParams:
    """The subset of ``llama_hparams`` that decides a model's memory, as read from a file.

    Per-layer lists cover ``n_layer_all`` layers (including NextN/MTP layers, if any).
    ``rope_*`` values already have the context defaults applied (a context that does not
    override RoPE): ``freq_scale`` 1 for scaling type none, YaRN ``ext_factor`` 1 for
    scaling type yarn, and YaRN's attention factor.
    """

    arch: str
    n_ctx_train: int
    n_embd: int
    n_layer_all: int
    n_layer_nextn: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    n_embd_head_k_full: int
    n_embd_head_v_full: int
    n_embd_head_k_swa: int
    n_embd_head_v_swa: int
    n_rot_full: int
    n_rot_swa: int
    is_swa: tuple[bool, ...]
    is_recr: tuple[bool, ...]
    rope_pattern: tuple[bool, ...]
    swa_type: SWAType
    n_swa: int
    rope_type: RopeType
    rope_freq_base: float
    rope_freq_scale: float
    rope_freq_base_swa: float
    rope_freq_scale_swa: float
    rope_scaling_type: int
    yarn_ext_factor: float
    yarn_attn_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    n_ctx_orig_yarn: int
    causal_attn: bool
    use_alibi: bool
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_n_group: int = 0
    ssm_dt_rank: int = 0
    n_shortconv_l_cache: int = 0
    wkv_head_size: int = 0
    token_shift_count: int = 2
    n_embd_head_kda: int = 0
    n_embd_head_la: int = 0
    is_mla: bool = False
    rope_freqs: tuple[float, ...] | None = None
    """``rope_freqs.weight`` (or ``rope_factors_short.weight``): RoPE frequency factors."""
    rope_freqs_long: tuple[float, ...] | None = None
    """``rope_factors_long.weight`` when the file has no ``rope_freqs``."""
    rope_factor_layers: tuple[bool, ...] = ()
    """Layers whose RoPE takes the factors (empty: every layer)."""

    @property
    def n_layer(self) -> int:
        """Trunk layers (``n_layer_all - n_layer_nextn``)."""
        return self.n_layer_all - self.n_layer_nextn

    def n_embd_r(self) -> int:
        """Width of a recurrent layer's conv / token-shift state (``llama_hparams::n_embd_r``).

        E.g. Mamba d_conv=4, d_inner=32, n_group=0 -> 3 * 32 = 96; LFM2 n_embd=16,
        L_cache=3 -> 32; RWKV token_shift_count=2, n_embd=64 -> 128.
        """
        if self.wkv_head_size:
            return self.token_shift_count * self.n_embd
        if self.n_shortconv_l_cache:
            return self.n_embd * (self.n_shortconv_l_cache - 1)
        if self.n_embd_head_kda:
            # Kimi KDA: conv states of Q, K and V, each n_head * head_dim wide
            d_conv = self.ssm_d_conv - 1 if self.ssm_d_conv > 0 else 3
            return 3 * d_conv * self.n_head[0] * self.n_embd_head_kda
        d_conv = self.ssm_d_conv - 1 if self.ssm_d_conv > 0 else 0
        return d_conv * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    def n_embd_s(self) -> int:
        """Width of a recurrent layer's SSM / WKV state (``llama_hparams::n_embd_s``)."""
        if self.wkv_head_size:
            return self.n_embd * self.wkv_head_size
        if self.n_embd_head_kda:
            return self.n_embd_head_kda * self.n_embd_head_kda * self.n_head[0]
        if self.n_embd_head_la:
            return self.n_embd_head_la * self.n_embd_head_la * self.n_head[0]
        return self.ssm_d_state * self.ssm_d_inner

    def n_pos_per_embd(self) -> int:
        return GGML_MROPE_SECTIONS if self.rope_type in (RopeType.MROPE, RopeType.IMROPE) else 1

    def _rope_factors(self, il: int) -> dict[str, tuple[float, ...] | None]:
        """Layer ``il``'s RoPE factors (``llama_model::get_rope_factors`` before the context
        picks long or short)."""
        if self.rope_factor_layers and not self.rope_factor_layers[il]:
            return {}
        return {"freq_factors": self.rope_freqs, "freq_factors_long": self.rope_freqs_long}

    def layer(self, il: int) -> LayerSpec:
        """Layer ``il`` as memory sees it: recurrent widths and / or attention widths and RoPE.

        A recurrent layer with KV heads (Falcon-H1: every layer has both) carries both
        sets of widths; which memory part holds it is the factory's layer filters' call.
        """
        recr = self.is_recr[il]
        swa = self.is_swa[il]
        rope = None
        if self.rope_type != RopeType.NONE and self.rope_pattern[il] and self.n_head_kv[il] > 0:
            rope = RopeSpec(
                n_rot=self.n_rot_swa if swa else self.n_rot_full,
                rope_type=self.rope_type,
                freq_base=self.rope_freq_base_swa if swa else self.rope_freq_base,
                freq_scale=self.rope_freq_scale_swa if swa else self.rope_freq_scale,
                ext_factor=self.yarn_ext_factor,
                attn_factor=self.yarn_attn_factor,
                beta_fast=self.yarn_beta_fast,
                beta_slow=self.yarn_beta_slow,
                n_ctx_orig=self.n_ctx_orig_yarn,
                **self._rope_factors(il),
            )
        return LayerSpec(
            recurrent=recr,
            swa=swa,
            n_head_kv=self.n_head_kv[il],
            n_embd_head_k=self.n_embd_head_k_swa if swa else self.n_embd_head_k_full,
            n_embd_head_v=self.n_embd_head_v_swa if swa else self.n_embd_head_v_full,
            n_embd_r=self.n_embd_r() if recr else 0,
            n_embd_s=self.n_embd_s() if recr else 0,
            rope=rope,
        )

    def to_model_spec(self) -> ModelSpec:
        """The :class:`ModelSpec` for this file, with what the factory needs to choose."""
        return ModelSpec(
            layers=tuple(self.layer(il) for il in range(self.n_layer_all)),
            n_swa=self.n_swa,
            swa_type=self.swa_type,
            n_pos_per_embd=self.n_pos_per_embd(),
            is_mla=self.is_mla,
            causal_attn=self.causal_attn,
            use_alibi=self.use_alibi,
            kv_shiftable=self.arch not in NO_KV_SHIFT_ARCHS,
            arch=self.arch,
            n_ctx_train=self.n_ctx_train,
            n_layer_nextn=self.n_layer_nextn,
            n_ff=tuple(self.n_ff) if self.n_ff else (),
            is_recurrent_arch=self.arch in RECURRENT_ARCHS,
            is_hybrid_arch=self.arch in HYBRID_ARCHS,
        )


def hparams_from_gguf(path: str | os.PathLike[str]) -> GGUFHParams:
    """Read the memory-relevant hyper-parameters of a GGUF model file.

    Raises :class:`UnsupportedError` for an architecture pymem does not map, and
    :class:`ConfigError` for a missing required key or a key of the wrong type / length.
    """
    m = GGUFMeta(path)
    arch = m.arch
    rule = RULES.get(arch)
    if rule is None:
        raise UnsupportedError(
            f"general.architecture: {arch!r} is not supported by pymem.gguf_spec; "
            f"supported: {', '.join(sorted(RULES))}"
        )
    if rule.unsupported:
        raise UnsupportedError(f"general.architecture: {arch!r}: {rule.unsupported}")
    k = m.k

    # --- general keys (llama_model_base::load_hparams) ----------------------------------
    n_ctx_train = m.u32_req(k("context_length"))
    n_embd = m.u32_req(k("embedding_length"))
    n_layer_all = m.u32_req(k("block_count"))
    if not 0 < n_layer_all <= LLAMA_MAX_LAYERS:
        raise ConfigError(
            f"{k('block_count')}: must be in [1, {LLAMA_MAX_LAYERS}], got {n_layer_all}"
        )
    n_layer_nextn = m.u32(k("nextn_predict_layers"), 0)
    if n_layer_nextn > n_layer_all:
        raise ConfigError(
            f"{k('nextn_predict_layers')}: {n_layer_nextn} exceeds {k('block_count')} {n_layer_all}"
        )
    causal_attn = m.bool_(k("attention.causal"), True)

    zeros = [0] * n_layer_all
    n_ff = m.u32_or_arr(k("feed_forward_length"), n_layer_all, zeros)
    n_head = m.u32_or_arr(k("attention.head_count"), n_layer_all, zeros)
    n_head_kv = m.u32_or_arr(k("attention.head_count_kv"), n_layer_all, n_head)

    n_ctx_orig_yarn = m.u32(k("rope.scaling.original_context_length"), n_ctx_train)
    rope_freq_base = m.f32(k("rope.freq_base"), 10000.0)
    scaling_name = m.str_(k("rope.scaling.type"), "linear")
    if scaling_name not in _ROPE_SCALING:
        raise ConfigError(f"{k('rope.scaling.type')}: unknown rope scaling type {scaling_name!r}")
    rope_scaling_type = _ROPE_SCALING[scaling_name]
    ropescale = m.f32_opt(k("rope.scaling.factor"))
    if ropescale is None:
        ropescale = m.f32(k("rope.scale_linear"), 0.0)
    rope_freq_scale = 1.0 if ropescale == 0.0 else 1.0 / ropescale
    rope_attn_factor = m.f32(k("rope.scaling.attn_factor"), 1.0)
    yarn_log_mul = m.f32(k("rope.scaling.yarn_log_multiplier"), 0.0)
    yarn_ext_factor = m.f32(k("rope.scaling.yarn_ext_factor"), -1.0)
    yarn_attn_factor = m.f32(k("rope.scaling.yarn_attn_factor"), 1.0)
    yarn_beta_fast = m.f32(k("rope.scaling.yarn_beta_fast"), 32.0)
    yarn_beta_slow = m.f32(k("rope.scaling.yarn_beta_slow"), 1.0)

    if n_head[0] > 0:
        head_k = n_embd // n_head[0]
        n_embd_head_k_full = m.u32(k("attention.key_length"), head_k)
        n_embd_head_v_full = m.u32(k("attention.value_length"), head_k)
        n_rot_full = m.u32(k("rope.dimension_count"), n_embd_head_k_full)
        if arch in ("llama", "deci", "falcon", "llama-embed") and n_rot_full != n_embd_head_k_full:
            raise ConfigError(
                f"{k('rope.dimension_count')}: invalid n_rot: {n_rot_full}, expected {n_embd_head_k_full}"
            )
    else:
        n_embd_head_k_full = n_embd_head_v_full = n_rot_full = 0

    d = Draft(
        meta=m,
        arch=arch,
        n_embd=n_embd,
        n_layer_all=n_layer_all,
        n_layer_nextn=n_layer_nextn,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_embd_head_k_full=n_embd_head_k_full,
        n_embd_head_v_full=n_embd_head_v_full,
        n_embd_head_k_swa=m.u32(k("attention.key_length_swa"), n_embd_head_k_full),
        n_embd_head_v_swa=m.u32(k("attention.value_length_swa"), n_embd_head_v_full),
        n_rot_full=n_rot_full,
        n_rot_swa=m.u32(k("rope.dimension_count_swa"), n_rot_full),
        rope_freq_base=rope_freq_base,
        rope_freq_scale=rope_freq_scale,
        rope_type=rule.rope_type,
        is_recr=[arch in RECURRENT_ARCHS] * n_layer_all,
    )
    # --- per-architecture keys (load_arch_hparams) --------------------------------------
    if rule.load is not None:
        rule.load(m, d)
    rope_freq_scale = d.rope_freq_scale

    # --- context-level RoPE defaults (llama_context constructor, no overrides) ----------
    if rope_scaling_type == ROPE_SCALING_NONE:
        rope_freq_scale = 1.0
    if yarn_ext_factor < 0.0:
        yarn_ext_factor = 1.0 if rope_scaling_type == ROPE_SCALING_YARN else 0.0
    attn = yarn_attn_factor
    if yarn_ext_factor != 0.0:
        factor = 1.0 / rope_freq_scale

        def mscale(scale: float, ms: float) -> float:
            return 1.0 if scale <= 1.0 else 0.1 * ms * math.log(scale) + 1.0

        attn = mscale(factor, 1.0)
        if yarn_log_mul:
            attn /= mscale(factor, yarn_log_mul)
        attn *= 1.0 / (1.0 + 0.1 * math.log(factor))
    attn *= rope_attn_factor

    use_alibi = m.f32(k("attention.max_alibi_bias"), 0.0) > 0.0

    rope_freqs, rope_freqs_long, rope_factor_layers = _rope_factor_tensors(m, d, arch, scaling_name)
    return GGUFHParams(
        arch=arch,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_layer_all=n_layer_all,
        n_layer_nextn=n_layer_nextn,
        n_head=tuple(d.n_head),
        n_head_kv=tuple(d.n_head_kv),
        n_ff=tuple(d.n_ff),
        n_embd_head_k_full=d.n_embd_head_k_full,
        n_embd_head_v_full=d.n_embd_head_v_full,
        n_embd_head_k_swa=d.n_embd_head_k_swa,
        n_embd_head_v_swa=d.n_embd_head_v_swa,
        n_rot_full=d.n_rot_full,
        n_rot_swa=d.n_rot_swa,
        is_swa=tuple(d.is_swa),
        is_recr=tuple(d.is_recr),
        rope_pattern=tuple(d.rope_pattern),
        swa_type=d.swa_type,
        n_swa=d.n_swa,
        rope_type=d.rope_type,
        rope_freq_base=d.rope_freq_base,
        rope_freq_scale=rope_freq_scale,
        rope_freq_base_swa=d.rope_freq_base_swa,
        rope_freq_scale_swa=d.rope_freq_scale_swa,
        rope_scaling_type=rope_scaling_type,
        yarn_ext_factor=yarn_ext_factor,
        yarn_attn_factor=attn,
        yarn_beta_fast=yarn_beta_fast,
        yarn_beta_slow=yarn_beta_slow,
        n_ctx_orig_yarn=n_ctx_orig_yarn,
        causal_attn=bool(causal_attn and d.causal_attn),
        use_alibi=use_alibi,
        n_shortconv_l_cache=d.n_shortconv_l_cache,
        wkv_head_size=d.wkv_head_size,
        token_shift_count=d.token_shift_count,
        ssm_d_conv=d.ssm_d_conv,
        ssm_d_inner=d.ssm_d_inner,
        ssm_d_state=d.ssm_d_state,
        ssm_n_group=d.ssm_n_group,
        ssm_dt_rank=d.ssm_dt_rank,
        n_embd_head_kda=d.n_embd_head_kda,
        n_embd_head_la=d.n_embd_head_la,
        is_mla=d.is_mla,
        rope_freqs=rope_freqs,
        rope_freqs_long=rope_freqs_long,
        rope_factor_layers=rope_factor_layers,
    )


_FREQS = "rope_freqs.weight"
_LONG_SHORT = ("rope_factors_long.weight", "rope_factors_short.weight")
# The RoPE factor tensors each architecture's loader creates (llama.cpp 0.3.36,
# models/*.cpp load_tensors). These take rope_freqs, or long + short under longrope:
_FACTORS_BY_SCALING = frozenset({
    "llama", "llama-embed", "deci", "refact", "minicpm", "granite", "granitemoe",
    "granite_swa", "apertus", "pangu-embedded", "mistral3", "step35",
})  # fmt: skip
_FACTORS_LONG_SHORT = frozenset({"phi3", "phimoe", "minicpm3"})  # whatever the scaling
_FACTORS_FREQS = frozenset({
    "arcee", "cogvlm", "dflash", "eagle3", "exaone", "exaone4", "exaone-moe", "falcon-h1",
    "gemma4", "gemma4-assistant", "granitehybrid", "llada", "llama4", "nanbeige",
})  # fmt: skip


def rope_factor_tensors_loaded(arch: str, longrope: bool) -> tuple[str, ...]:
    """The RoPE factor tensors llama.cpp's loader for ``arch`` creates (``longrope``: the
    file's ``rope.scaling.type`` is longrope). A file holding another one fails to load
    there ("wrong number of tensors"). E.g. ("llama", False) -> ("rope_freqs.weight",)."""
    if arch in _FACTORS_BY_SCALING:
        return _LONG_SHORT if longrope else (_FREQS,)
    if arch in _FACTORS_LONG_SHORT:
        return _LONG_SHORT
    return (_FREQS,) if arch in _FACTORS_FREQS else ()


def _rope_factor_tensors(
    m: GGUFMeta, d: Draft, arch: str, scaling_name: str
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None, tuple[bool, ...]]:
    """The file's RoPE factor tensors: ``rope_freqs``, or the short factors with the long
    ones kept for contexts beyond the original length (a loader creates one kind only).

    A factor tensor the architecture's loader does not create is refused (ConfigError):
    llama.cpp fails to load such a file, so its positions would mean nothing to compare."""
    loaded = rope_factor_tensors_loaded(arch, scaling_name == "longrope")
    stray = [n for n in (_FREQS, *_LONG_SHORT) if n not in loaded and m.has_tensor(n)]
    if stray:
        takes = ", ".join(loaded) if loaded else "none"
        raise ConfigError(
            f"tensor(s) {', '.join(stray)}: llama.cpp's {arch!r} loader does not create them "
            f"with {m.k('rope.scaling.type')} = {scaling_name!r} (it creates: {takes}), so "
            "the file fails to load there"
        )
    freqs = m.small_tensor(_FREQS)
    long = None
    if freqs is None:
        freqs = m.small_tensor("rope_factors_short.weight")
        long = m.small_tensor("rope_factors_long.weight")  # alone: no factors within n_ctx_orig
        if freqs is not None and long is None:
            long = ()  # short alone: no factors beyond n_ctx_orig (get_rope_factors' NULL)
    layers = tuple(d.rope_factor_layers) if d.rope_factor_layers is not None else ()
    return freqs, long, layers
