"""What a model's layers need from memory: a frozen description, independent of devices.

A :class:`ModelSpec` lists every model layer (attention or recurrent, SWA or not, widths,
RoPE parameters). Memories take the spec plus a layer filter and allocate exactly the
tensors those layers need. Names follow ``llama_hparams``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import numpy as np

from pymem.errors import ConfigError


class SWAType(enum.IntEnum):
    """``llama_swa_type``."""

    NONE = 0
    STANDARD = 1
    CHUNKED = 2
    SYMMETRIC = 3


class RopeType(enum.IntEnum):
    """``llama_rope_type`` (the ggml rope ``mode``)."""

    NONE = -1
    NORM = 0
    NEOX = 2
    MROPE = 8
    IMROPE = 40
    VISION = 24


class NonCausalType(enum.IntEnum):
    """``llama_non_causal_type``: how non-causal attention treats SWA layers."""

    ALL = 0  # all layers non-causal, SWA still applied
    SWA_ONLY = 1  # SWA layers non-causal, dense layers stay causal
    SWA_FULL = 2  # all layers non-causal, no SWA among tokens of the current ubatch


def masked_swa(
    n_swa: int, swa_type: SWAType, p0: np.ndarray | int, p1: np.ndarray | int
) -> np.ndarray:
    """Whether a cell at ``p0`` is outside the window of a token at ``p1`` (broadcasting).

    The one definition of ``llama_hparams::is_masked_swa`` in pymem (slot search, masks,
    state I/O and the runtime's oracle all use it). STANDARD masks ``p1 - p0 >= n_swa``;
    CHUNKED masks cells before the chunk of ``p1`` (``p0 < (p1 // n_swa) * n_swa``);
    SYMMETRIC masks ``|p1 - p0| > n_swa // 2``.
    E.g. STANDARD, n_swa 4: p0 [0, 1, 2, 3, 4], p1 5 -> [True, True, False, False, False].
    """
    p0 = np.asarray(p0, dtype=np.int64)
    p1 = np.asarray(p1, dtype=np.int64)
    if swa_type == SWAType.NONE:
        return np.zeros(np.broadcast_shapes(p0.shape, p1.shape), dtype=bool)
    if swa_type == SWAType.STANDARD:
        return p1 - p0 >= n_swa
    if swa_type == SWAType.CHUNKED:
        # positions are >= 0, so floor division is the reference's truncating division
        return p0 < (p1 // n_swa) * n_swa
    if swa_type == SWAType.SYMMETRIC:
        return np.abs(p1 - p0) > n_swa // 2
    raise ConfigError(f"swa_type: unknown value {swa_type!r}")


def window_start(swa_type: SWAType, n_swa: int, pos: int) -> int:
    """The first position ``>= 0`` a token at ``pos`` (``>= 0``) attends to in a layer of
    ``swa_type``: the smallest ``p0`` that :func:`masked_swa` leaves visible (and every
    position from it up to ``pos`` is). Arithmetic, no arrays: state writes and the reuse
    planner ask it per call; tests/test_reuse.py pins it to ``masked_swa``.

    E.g. STANDARD, n_swa 4, pos 10 -> 7 (7, 8, 9 and 10 itself); CHUNKED, 4, 10 -> 8;
    SYMMETRIC, 4, 10 -> 8; NONE -> 0.
    """
    if swa_type == SWAType.NONE:
        return 0
    if swa_type == SWAType.STANDARD:
        lo = pos - n_swa + 1
    elif swa_type == SWAType.CHUNKED:
        lo = (pos // n_swa) * n_swa
    elif swa_type == SWAType.SYMMETRIC:
        lo = pos - n_swa // 2
    else:
        raise ConfigError(f"swa_type: unknown value {swa_type!r}")
    return lo if lo > 0 else 0


@dataclass(frozen=True)
class RopeSpec:
    """Per-layer RoPE parameters used by the K-shift (``ggml_rope_ext`` arguments)."""

    n_rot: int
    rope_type: RopeType = RopeType.NORM
    freq_base: float = 10000.0
    freq_scale: float = 1.0
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    freq_factors: tuple[float, ...] | None = None
    """Per-frequency divisors of the rotation (``rope_freqs``, or ``rope_factors_short``;
    ggml reads the first ``n_rot / 2``). Llama-3.1-style files carry them; a K-shift that
    ignored them would rotate K by the wrong angles."""
    freq_factors_long: tuple[float, ...] | None = None
    """``rope_factors_long``: used instead of :attr:`freq_factors` when the context's
    ``n_ctx_seq`` exceeds ``n_ctx_orig`` (see :meth:`for_context`); ``()`` for a file with
    short factors only, which rotates such a context without factors."""

    def __post_init__(self) -> None:
        for name in ("freq_factors", "freq_factors_long"):
            factors = getattr(self, name)
            if name == "freq_factors_long" and factors == ():
                continue  # no long factors: none beyond the original context
            if factors is not None and len(factors) < self.n_rot // 2:
                raise ConfigError(
                    f"rope.{name}: {len(factors)} factors, a rotation of n_rot {self.n_rot} "
                    f"needs at least {self.n_rot // 2}"
                )

    def uses_long(self, n_ctx_seq: int) -> bool:
        """Whether a context of ``n_ctx_seq`` cells per sequence takes the long factors
        (a file with long / short factors, a context beyond the original length)."""
        return self.freq_factors_long is not None and n_ctx_seq > self.n_ctx_orig

    def for_context(self, n_ctx_seq: int) -> RopeSpec:
        """The factors a context of ``n_ctx_seq`` cells per sequence uses
        (``llama_model::get_rope_factors``): ``rope_freqs`` when the file has them, else
        the long factors beyond the original context and the short ones within it."""
        if self.freq_factors_long is None:
            return self
        if self.uses_long(n_ctx_seq):
            return replace(
                self, freq_factors=self.freq_factors_long or None, freq_factors_long=None
            )
        return replace(self, freq_factors_long=None)


@dataclass(frozen=True)
class LayerSpec:
    """One model layer as memory sees it.

    Attention layers have ``n_head_kv * n_embd_head_k`` K and ``n_head_kv * n_embd_head_v``
    V values per cell; recurrent layers have ``n_embd_r`` conv/shift and ``n_embd_s`` SSM
    state values per sequence.
    """

    recurrent: bool = False
    swa: bool = False
    n_head_kv: int = 0
    n_embd_head_k: int = 0
    n_embd_head_v: int = 0
    n_embd_r: int = 0
    n_embd_s: int = 0
    rope: RopeSpec | None = None

    @property
    def n_embd_k_gqa(self) -> int:
        return self.n_head_kv * self.n_embd_head_k

    @property
    def n_embd_v_gqa(self) -> int:
        return self.n_head_kv * self.n_embd_head_v

    @classmethod
    def attention(
        cls,
        n_head_kv: int,
        head_dim: int,
        *,
        swa: bool = False,
        rope: RopeSpec | None = None,
        head_dim_v: int | None = None,
    ) -> LayerSpec:
        return cls(
            n_head_kv=n_head_kv,
            n_embd_head_k=head_dim,
            n_embd_head_v=head_dim if head_dim_v is None else head_dim_v,
            swa=swa,
            rope=rope if rope is not None else RopeSpec(n_rot=head_dim),
        )

    @classmethod
    def ssm(cls, n_embd_r: int, n_embd_s: int) -> LayerSpec:
        return cls(recurrent=True, n_embd_r=n_embd_r, n_embd_s=n_embd_s)


@dataclass(frozen=True)
class ModelSpec:
    """All layers of a model, plus the attention properties shared by every layer."""

    layers: tuple[LayerSpec, ...]
    n_swa: int = 0
    swa_type: SWAType = SWAType.NONE
    n_pos_per_embd: int = 1
    causal_attn: bool = True
    use_alibi: bool = False
    non_causal_type: NonCausalType = NonCausalType.ALL
    kv_shiftable: bool = True
    """False where the architecture's K cannot be RoPE-shifted (the model layer decides)."""
    ple_n_heads: int = 0
    """Per-layer-embedding heads; > 0 makes KV cells carry ``(x, y, tok)`` ext."""
    ple_embd_token: int = -1
    """The ``ext.tok`` an embedding input gets in a PLE model (the model layer picks it)."""
    is_mla: bool = False
    """``llama_hparams::is_mla``: attention caches hold K only (MLA keeps its compressed
    latent there and reads V from it), no V tensors; ``n_embd_v_gqa`` is still reported."""
    # what the model-to-memory layer reads (pymem.factory); memories ignore these
    arch: str = ""
    n_ctx_train: int = 0
    n_layer_nextn: int = 0
    """Trailing NextN / MTP layers outside the main context's memory."""
    n_ff: tuple[int, ...] = ()
    """Feed-forward width per layer, where an architecture's layer filter needs it."""
    is_recurrent_arch: bool | None = None
    """``llm_arch_is_recurrent``; None: decide from the layers."""
    is_hybrid_arch: bool | None = None
    """``llm_arch_is_hybrid``; None: decide from the layers."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers: a model spec needs at least one layer, got 0")
        for il, layer in enumerate(self.layers):
            if layer.recurrent and (layer.n_embd_r < 0 or layer.n_embd_s < 0):
                raise ConfigError(f"layers[{il}]: negative recurrent widths")
            if not layer.recurrent and layer.n_head_kv < 0:
                raise ConfigError(f"layers[{il}].n_head_kv: must be >= 0, got {layer.n_head_kv}")
        if self.n_ff and len(self.n_ff) != len(self.layers):
            raise ConfigError(
                f"n_ff: one width per layer, got {len(self.n_ff)} for {len(self.layers)} layers"
            )
        if not 0 <= self.n_layer_nextn < len(self.layers):
            raise ConfigError(
                f"n_layer_nextn: must be in [0, {len(self.layers)}), got {self.n_layer_nextn}"
            )
        if self.swa_type != SWAType.NONE and self.n_swa <= 0:
            raise ConfigError(
                f"n_swa: must be > 0 when swa_type is {self.swa_type.name}, got {self.n_swa}"
            )

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def for_context(self, n_ctx_seq: int) -> ModelSpec:
        """This spec with every layer's RoPE factors chosen for a context of ``n_ctx_seq``
        cells per sequence (:meth:`RopeSpec.for_context`); the factory builds from it."""
        layers = tuple(
            replace(lay, rope=lay.rope.for_context(n_ctx_seq)) if lay.rope is not None else lay
            for lay in self.layers
        )
        if layers == self.layers:
            return self
        return replace(self, layers=layers)

    def is_recurrent(self, il: int) -> bool:
        return self.layers[il].recurrent

    def is_swa(self, il: int) -> bool:
        return self.layers[il].swa

    def n_embd_k_gqa(self, il: int) -> int:
        return self.layers[il].n_embd_k_gqa

    def n_embd_v_gqa(self, il: int) -> int:
        return self.layers[il].n_embd_v_gqa

    def n_embd_r(self, il: int = 0) -> int:
        """The recurrent conv-state width (the reference uses one width for all layers)."""
        return max((lay.n_embd_r for lay in self.layers if lay.recurrent), default=0)

    def n_embd_s(self, il: int = 0) -> int:
        return max((lay.n_embd_s for lay in self.layers if lay.recurrent), default=0)

    def has_swa_layers(self) -> bool:
        return any(lay.swa for lay in self.layers if not lay.recurrent)
