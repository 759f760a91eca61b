"""Configuration of the tiny hybrid decoder and the five memory-type presets.

A model is a stack of layers, one letter each::

    A   full causal attention with RoPE and grouped-query heads (GQA)
    S   sliding-window attention (same block, masked to the last ``n_swa`` positions)
    R   a Mamba-2 block: short causal conv over the conv state R, selective scan over S

Every layer is followed by a SwiGLU MLP, with RMS norms before each block. The presets
pick the layer pattern that makes :func:`pymem.factory.create_memory` (and llama.cpp's
``create_memory``) choose each memory type::

    kv            "AA"      attention only                -> KVCache
    iswa          "SAS"     SWA + full attention          -> KVCacheISWA
    recurrent     "RR"      recurrent only                -> RecurrentMemory
    hybrid        "RAR"     attention + recurrent         -> HybridMemory
    hybrid_iswa   "RSAR"    SWA + attention + recurrent   -> HybridISWAMemory
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pymem.errors import ConfigError
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType, SWAType

LAYER_KINDS = {"A": "attention", "S": "sliding-window attention", "R": "recurrent (Mamba-2)"}

PRESETS: dict[str, str] = {
    "kv": "AA",
    "iswa": "SAS",
    "recurrent": "RR",
    "hybrid": "RAR",
    "hybrid_iswa": "RSAR",
}
"""Memory type -> layer pattern of the tiny model that needs it."""


@dataclass(frozen=True)
class TinyConfig:
    """Hyper-parameters of the tiny hybrid decoder (names as ``llama_hparams``).

    Widths default to the smallest sizes that still exercise every code path: two KV
    heads shared by four query heads (GQA), heads of 32 values (one q8_0 block: quantised
    caches need head sizes that are whole blocks), two
    SSM groups of two heads each.
    """

    layers: str = PRESETS["hybrid_iswa"]
    n_vocab: int = 64
    n_embd: int = 32
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 64
    n_swa: int = 6
    swa_type: SWAType = SWAType.STANDARD
    rope_type: RopeType = RopeType.NORM
    freq_base: float = 10000.0
    norm_eps: float = 1e-5
    # Mamba-2 (llama_hparams.ssm_*): d_inner = ssm_n_head * ssm_head_dim
    d_conv: int = 4
    d_inner: int = 64
    d_state: int = 16
    n_group: int = 2
    ssm_n_head: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers: needs at least one layer letter, got ''")
        bad = sorted(set(self.layers) - set(LAYER_KINDS))
        if bad:
            raise ConfigError(
                f"layers: unknown layer kinds {bad} in {self.layers!r}; known: {sorted(LAYER_KINDS)}"
            )
        if self.n_head % self.n_head_kv:
            raise ConfigError(
                f"n_head: {self.n_head} is not a multiple of n_head_kv={self.n_head_kv}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: RoPE needs an even head size, got {self.head_dim}")
        if (
            self.d_inner % self.ssm_n_head
            or self.d_inner % self.n_group
            or self.ssm_n_head % self.n_group
        ):
            raise ConfigError(
                f"d_inner={self.d_inner}, ssm_n_head={self.ssm_n_head}, n_group={self.n_group}: d_inner must be a "
                "multiple of both and ssm_n_head a multiple of n_group"
            )
        if self.d_conv < 2:
            raise ConfigError(
                f"d_conv: needs >= 2 (the conv state keeps d_conv - 1 columns), got {self.d_conv}"
            )
        if "S" in self.layers and self.n_swa <= 0:
            raise ConfigError(f"n_swa: sliding-window layers need n_swa > 0, got {self.n_swa}")

    @classmethod
    def preset(cls, memory_type: str, **overrides: object) -> TinyConfig:
        """The tiny model whose layer pattern needs ``memory_type`` (a key of PRESETS)."""
        if memory_type not in PRESETS:
            raise ConfigError(f"memory_type: unknown {memory_type!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(cls(layers=PRESETS[memory_type]), **overrides)  # type: ignore[arg-type]

    # --- derived sizes --------------------------------------------------------------
    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def ssm_head_dim(self) -> int:
        return self.d_inner // self.ssm_n_head

    @property
    def conv_channels(self) -> int:
        """Channels through the short conv: x, B and C (``d_inner + 2*n_group*d_state``)."""
        return self.d_inner + 2 * self.n_group * self.d_state

    @property
    def d_in_proj(self) -> int:
        """Width of the input projection: z, xBC and dt."""
        return self.d_inner + self.conv_channels + self.ssm_n_head

    @property
    def n_embd_r(self) -> int:
        """Conv state per sequence: the last ``d_conv - 1`` inputs of every channel."""
        return (self.d_conv - 1) * self.conv_channels

    @property
    def n_embd_s(self) -> int:
        """SSM state per sequence: ``d_state`` values per inner channel."""
        return self.d_state * self.d_inner

    @property
    def has_swa(self) -> bool:
        return "S" in self.layers

    def rope(self) -> RopeSpec:
        return RopeSpec(n_rot=self.head_dim, rope_type=self.rope_type, freq_base=self.freq_base)

    def spec(self) -> ModelSpec:
        """What the memory needs to know about this model's layers."""
        layers = []
        for kind in self.layers:
            if kind == "R":
                layers.append(LayerSpec.ssm(n_embd_r=self.n_embd_r, n_embd_s=self.n_embd_s))
            else:
                layers.append(
                    LayerSpec.attention(
                        self.n_head_kv, self.head_dim, swa=kind == "S", rope=self.rope()
                    )
                )
        return ModelSpec(
            layers=tuple(layers),
            n_swa=self.n_swa if self.has_swa else 0,
            swa_type=self.swa_type if self.has_swa else SWAType.NONE,
            # no llama.cpp arch name: pymem.factory then classifies the memory by the
            # layers and keeps n_rs_seq (a named arch would clamp it unless it is one of
            # the reference's rollback archs)
            arch="",
        )
