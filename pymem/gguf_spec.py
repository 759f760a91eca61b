"""Read a GGUF model file's metadata into the :class:`~pymem.spec.ModelSpec` memory needs.

Why: a runtime should not have to know, per architecture, which layers are recurrent,
which use a sliding window, how wide a Mamba conv state is or how an LFM2 short-conv
cache is sized. llama.cpp derives all of that in ``llama_model::load_hparams`` (the
general keys) and each architecture's ``load_arch_hparams``; this module repeats those
derivations for the architectures below, so that ``create_memory(spec_from_gguf(path),
params)`` builds the memory the reference builds for the same file.

Supported architectures (``general.architecture``): llama, qwen2, qwen3, gemma2, gemma3,
mamba, mamba2, jamba, granitehybrid, falcon-h1, lfm2, rwkv6, rwkv7. Anything else raises
:class:`~pymem.errors.UnsupportedError`, naming the architecture.

Keys are read with the reference's type rules: a scalar must have the GGUF type the
reference expects (``u32``, ``f32``, ``bool``, ``string``), a per-layer key is either a
scalar (broadcast) or an int array of exactly ``block_count`` entries. Violations raise
:class:`~pymem.errors.ConfigError` naming the key, where the reference throws.

Only metadata is read (``gguf.GGUFReader`` memory-maps the file; tensor data is never
touched). Per-layer RoPE frequency-factor tensors (``rope_freqs``) are not represented.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gguf

from pymem.errors import ConfigError, UnsupportedError
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType, SWAType

LLAMA_MAX_LAYERS = 512
GGML_MROPE_SECTIONS = 4

# llm_arch_is_recurrent / llm_arch_is_hybrid, restricted to the names pymem knows
NO_KV_SHIFT_ARCHS = frozenset({"step35"})
"""Architectures whose K the reference refuses to shift (``get_can_shift`` false)."""
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID_ARCHS = frozenset(
    {
        "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h",
        "nemotron_h_moe", "qwen3next", "kimi-linear", "qwen35", "qwen35moe", "minimax-01",
    }
)  # fmt: skip

# llama_model_rope_type for the architectures read here
_ROPE_TYPE: dict[str, RopeType] = {
    "llama": RopeType.NORM,
    "granitehybrid": RopeType.NORM,
    "qwen2": RopeType.NEOX,
    "qwen3": RopeType.NEOX,
    "gemma2": RopeType.NEOX,
    "gemma3": RopeType.NEOX,
    "lfm2": RopeType.NEOX,
    "falcon-h1": RopeType.NEOX,
    "mamba": RopeType.NONE,
    "mamba2": RopeType.NONE,
    "jamba": RopeType.NONE,
    "rwkv6": RopeType.NONE,
    "rwkv7": RopeType.NONE,
}

SUPPORTED_ARCHS = frozenset(_ROPE_TYPE)

# llama_rope_scaling_type_from_string
_ROPE_SCALING = {"none": 0, "linear": 1, "yarn": 2, "longrope": 3}
ROPE_SCALING_NONE, ROPE_SCALING_LINEAR, ROPE_SCALING_YARN = 0, 1, 2

# GGUF value type ids (gguf.GGUFValueType) the reference's GKV<T> accepts per C++ type
_GT_U32, _GT_I32, _GT_F32, _GT_BOOL, _GT_STRING, _GT_ARRAY = 4, 5, 6, 7, 8, 9
_GT_NAMES = {
    0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool",
    8: "str", 9: "arr", 10: "u64", 11: "i64", 12: "f64",
}  # fmt: skip


class _Meta:
    """Typed access to a GGUF file's key/value metadata, with the reference's type rules."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            reader = gguf.GGUFReader(os.fspath(path), "r")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"path: cannot read GGUF file {os.fspath(path)!r}: {exc}") from exc
        self.path = os.fspath(path)
        self._fields = reader.fields
        self.arch = self.str_req("general.architecture")

    def k(self, suffix: str) -> str:
        """The arch-prefixed key name, e.g. ``"block_count"`` -> ``"llama.block_count"``."""
        return f"{self.arch}.{suffix}"

    def _field(self, key: str) -> Any | None:
        return self._fields.get(key)

    def _scalar(self, key: str, gt: int, required: bool) -> Any:
        f = self._field(key)
        if f is None:
            if required:
                raise ConfigError(f"{self.path}: key not found in model: {key}")
            return None
        found = int(f.types[0])
        if found != gt:
            raise ConfigError(
                f"{self.path}: key {key} has wrong type {_GT_NAMES.get(found, found)} "
                f"but expected type {_GT_NAMES[gt]}"
            )
        return f.contents()

    def u32_opt(self, key: str) -> int | None:
        v = self._scalar(key, _GT_U32, False)
        return None if v is None else int(v)

    def u32(self, key: str, default: int) -> int:
        v = self.u32_opt(key)
        return default if v is None else v

    def u32_req(self, key: str) -> int:
        return int(self._scalar(key, _GT_U32, True))

    def f32_opt(self, key: str) -> float | None:
        v = self._scalar(key, _GT_F32, False)
        return None if v is None else float(v)

    def f32(self, key: str, default: float) -> float:
        v = self.f32_opt(key)
        return default if v is None else v

    def bool_(self, key: str, default: bool) -> bool:
        v = self._scalar(key, _GT_BOOL, False)
        return default if v is None else bool(v)

    def str_(self, key: str, default: str) -> str:
        v = self._scalar(key, _GT_STRING, False)
        return default if v is None else str(v)

    def str_req(self, key: str) -> str:
        return str(self._scalar(key, _GT_STRING, True))

    def is_array(self, key: str) -> bool:
        f = self._field(key)
        return f is not None and int(f.types[0]) == _GT_ARRAY

    def int_array(self, key: str, *, allow_bool: bool = False) -> list[int] | None:
        """An int (u32/i32, or bool where the reference reads into an int array) array."""
        f = self._field(key)
        if f is None or int(f.types[0]) != _GT_ARRAY:
            return None
        elem = int(f.types[1]) if len(f.types) > 1 else _GT_U32
        ok = (_GT_U32, _GT_I32, _GT_BOOL) if allow_bool else (_GT_U32, _GT_I32)
        if elem not in ok:
            raise ConfigError(
                f"{self.path}: {key} has wrong array element type {_GT_NAMES.get(elem, elem)}"
            )
        if len(f.contents()) > LLAMA_MAX_LAYERS:
            raise ConfigError(
                f"{self.path}: array length {len(f.contents())} for key {key} exceeds max {LLAMA_MAX_LAYERS}"
            )
        return [int(x) for x in f.contents()]

    def u32_or_arr(self, key: str, n: int, default: Sequence[int]) -> list[int]:
        """``get_key_or_arr``: a scalar broadcast to ``n`` layers, or an array of length ``n``."""
        f = self._field(key)
        if f is None:
            return list(default)
        if int(f.types[0]) == _GT_ARRAY:
            arr = self.int_array(key)
            assert arr is not None
            if len(arr) != n:
                raise ConfigError(
                    f"{self.path}: key {key} has wrong array length; expected {n}, got {len(arr)}"
                )
            return arr
        return [self.u32_req(key)] * n


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
        d_conv = self.ssm_d_conv - 1 if self.ssm_d_conv > 0 else 0
        return d_conv * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    def n_embd_s(self) -> int:
        """Width of a recurrent layer's SSM / WKV state (``llama_hparams::n_embd_s``)."""
        if self.wkv_head_size:
            return self.n_embd * self.wkv_head_size
        return self.ssm_d_state * self.ssm_d_inner

    def n_pos_per_embd(self) -> int:
        return GGML_MROPE_SECTIONS if self.rope_type in (RopeType.MROPE, RopeType.IMROPE) else 1

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


def _swa_pattern(n_layer: int, n_layer_all: int, n_pattern: int, dense_first: bool) -> list[bool]:
    """``llama_hparams::set_swa_pattern``: which layers slide.

    E.g. n_pattern=2 -> [T, F, T, F, ...] (every 2nd layer is dense, last in its group);
    n_pattern=6 -> 5 SWA layers then 1 dense; n_pattern=0 -> every layer SWA.
    NextN layers (il >= n_layer) never slide.
    """
    out = []
    for il in range(n_layer_all):
        if il >= n_layer:
            out.append(False)
        elif dense_first:
            out.append(n_pattern == 0 or il % n_pattern != 0)
        else:
            out.append(n_pattern == 0 or il % n_pattern < n_pattern - 1)
    return out


def hparams_from_gguf(path: str | os.PathLike[str]) -> GGUFHParams:
    """Read the memory-relevant hyper-parameters of a GGUF model file.

    Raises :class:`UnsupportedError` for an architecture pymem does not map, and
    :class:`ConfigError` for a missing required key or a key of the wrong type / length.
    """
    m = _Meta(path)
    arch = m.arch
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(
            f"general.architecture: {arch!r} is not supported by pymem.gguf_spec; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHS))}"
        )
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
    n_layer = n_layer_all - n_layer_nextn
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
        if arch == "llama" and n_rot_full != n_embd_head_k_full:
            raise ConfigError(
                f"{k('rope.dimension_count')}: invalid n_rot: {n_rot_full}, expected {n_embd_head_k_full}"
            )
    else:
        n_embd_head_k_full = n_embd_head_v_full = n_rot_full = 0
    n_embd_head_k_swa = m.u32(k("attention.key_length_swa"), n_embd_head_k_full)
    n_embd_head_v_swa = m.u32(k("attention.value_length_swa"), n_embd_head_v_full)
    n_rot_swa = m.u32(k("rope.dimension_count_swa"), n_rot_full)

    is_swa = [False] * n_layer_all
    is_recr = [arch in RECURRENT_ARCHS] * n_layer_all
    rope_pattern = [True] * n_layer_all
    swa_type = SWAType.NONE
    n_swa = 0
    rope_freq_base_swa = 10000.0
    rope_freq_scale_swa = 1.0
    ssm: dict[str, int] = {}
    n_shortconv_l_cache = 0
    wkv_head_size = 0
    token_shift_count = 2

    def load_swa_pattern(n_pattern: int, dense_first: bool = False) -> list[bool]:
        key = k("attention.sliding_window_pattern")
        if m.is_array(key):
            arr = m.int_array(key, allow_bool=True)
            assert arr is not None
            # get_arr into the fixed-size array: entries past the array keep their zero
            return [bool(arr[il]) if il < len(arr) else False for il in range(n_layer_all)]
        n_pattern = m.u32(key, n_pattern)
        return _swa_pattern(n_layer, n_layer_all, n_pattern, dense_first)

    def load_ssm(group: bool) -> None:
        ssm["ssm_d_conv"] = m.u32_req(k("ssm.conv_kernel"))
        ssm["ssm_d_inner"] = m.u32_req(k("ssm.inner_size"))
        ssm["ssm_d_state"] = m.u32_req(k("ssm.state_size"))
        ssm["ssm_dt_rank"] = m.u32_req(k("ssm.time_step_rank"))
        if group:
            ssm["ssm_n_group"] = m.u32_req(k("ssm.group_count"))

    # --- per-architecture keys (load_arch_hparams) --------------------------------------
    if arch == "gemma2":
        swa_type, n_swa = SWAType.STANDARD, 4096
        is_swa = load_swa_pattern(2)
        rope_freq_base_swa = m.f32(k("rope.freq_base_swa"), rope_freq_base)
        rope_freq_scale_swa = rope_freq_scale
        n_swa = m.u32(k("attention.sliding_window"), n_swa)
    elif arch == "gemma3":
        found = m.u32_opt(k("attention.sliding_window"))
        if found:
            swa_type, n_swa = SWAType.STANDARD, found
            is_swa = load_swa_pattern(6)
            rope_freq_base_swa = m.f32(k("rope.freq_base_swa"), 10000.0)
    elif arch in ("mamba", "jamba"):
        load_ssm(group=False)
        if arch == "jamba":
            is_recr = [n_head_kv[il] == 0 for il in range(n_layer)] + [False] * n_layer_nextn
    elif arch == "mamba2":
        load_ssm(group=True)
    elif arch == "falcon-h1":
        load_ssm(group=True)
        is_recr = [True] * n_layer_all
    elif arch == "granitehybrid":
        load_ssm(group=True)
        finetuned = m.bool_(k("rope.scaling.finetuned"), True)
        rope_pattern = [bool(finetuned)] * n_layer_all
        is_recr = [n_head_kv[il] == 0 for il in range(n_layer)] + [False] * n_layer_nextn
    elif arch == "lfm2":
        n_shortconv_l_cache = m.u32_req(k("shortconv.l_cache"))
        is_recr = [n_head_kv[il] == 0 for il in range(n_layer)] + [False] * n_layer_nextn
        window = m.u32_opt(k("attention.sliding_window"))
        if window:
            swa_type, n_swa = SWAType.STANDARD, window
            is_swa = [not r for r in is_recr[:n_layer]] + is_swa[n_layer:]
    elif arch in ("rwkv6", "rwkv7"):
        wkv_head_size = m.u32_req(k("wkv.head_size"))
        token_shift_count = m.u32(k("token_shift_count"), 2)

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

    return GGUFHParams(
        arch=arch,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_layer_all=n_layer_all,
        n_layer_nextn=n_layer_nextn,
        n_head=tuple(n_head),
        n_head_kv=tuple(n_head_kv),
        n_ff=tuple(n_ff),
        n_embd_head_k_full=n_embd_head_k_full,
        n_embd_head_v_full=n_embd_head_v_full,
        n_embd_head_k_swa=n_embd_head_k_swa,
        n_embd_head_v_swa=n_embd_head_v_swa,
        n_rot_full=n_rot_full,
        n_rot_swa=n_rot_swa,
        is_swa=tuple(is_swa),
        is_recr=tuple(is_recr),
        rope_pattern=tuple(rope_pattern),
        swa_type=swa_type,
        n_swa=n_swa,
        rope_type=_ROPE_TYPE[arch],
        rope_freq_base=rope_freq_base,
        rope_freq_scale=rope_freq_scale,
        rope_freq_base_swa=rope_freq_base_swa,
        rope_freq_scale_swa=rope_freq_scale_swa,
        rope_scaling_type=rope_scaling_type,
        yarn_ext_factor=yarn_ext_factor,
        yarn_attn_factor=attn,
        yarn_beta_fast=yarn_beta_fast,
        yarn_beta_slow=yarn_beta_slow,
        n_ctx_orig_yarn=n_ctx_orig_yarn,
        causal_attn=bool(causal_attn),
        use_alibi=use_alibi,
        n_shortconv_l_cache=n_shortconv_l_cache,
        wkv_head_size=wkv_head_size,
        token_shift_count=token_shift_count,
        ssm_d_conv=ssm.get("ssm_d_conv", 0),
        ssm_d_inner=ssm.get("ssm_d_inner", 0),
        ssm_d_state=ssm.get("ssm_d_state", 0),
        ssm_n_group=ssm.get("ssm_n_group", 0),
        ssm_dt_rank=ssm.get("ssm_dt_rank", 0),
    )


def spec_from_gguf(path: str | os.PathLike[str]) -> ModelSpec:
    """The :class:`ModelSpec` of a GGUF model file (what its memory must hold).

    Besides the layers, the spec carries ``n_ctx_train`` (used when ``ContextParams.n_ctx
    == 0``), ``n_layer_nextn``, ``n_ff`` (per layer), whether the architecture is
    recurrent or hybrid in the reference's classification (``is_recurrent_arch``,
    ``is_hybrid_arch``), which decides the memory type as ``create_memory`` does, and
    ``kv_shiftable``.
    """
    return hparams_from_gguf(path).to_model_spec()
