"""What one architecture's loader may set: the mutable draft of a model's hyper-parameters.

Why: llama.cpp reads the general keys once (``llama_model::load_hparams``) and then lets
each architecture's ``load_arch_hparams`` fill in or override what is particular to it
(recurrent layers, sliding windows, state widths). :class:`Draft` is that hand-over: the
general values, already read, plus every field an architecture's rule may set, with the
reference's defaults. :class:`ArchRule` names one architecture's RoPE type and loader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pymem.gguf_spec.meta import GGUFMeta
from pymem.spec import RopeType, SWAType


@dataclass
class Draft:
    """``llama_hparams`` while ``load_arch_hparams`` runs (per-layer lists: ``n_layer_all``)."""

    meta: GGUFMeta
    arch: str
    n_embd: int
    n_layer_all: int
    n_layer_nextn: int
    n_head: list[int]
    n_head_kv: list[int]
    n_ff: list[int]
    n_embd_head_k_full: int
    n_embd_head_v_full: int
    n_embd_head_k_swa: int
    n_embd_head_v_swa: int
    n_rot_full: int
    n_rot_swa: int
    rope_freq_base: float
    rope_freq_scale: float
    rope_type: RopeType
    is_recr: list[bool]
    is_swa: list[bool] = field(default_factory=list)
    rope_pattern: list[bool] = field(default_factory=list)
    swa_type: SWAType = SWAType.NONE
    n_swa: int = 0
    rope_freq_base_swa: float = 10000.0
    rope_freq_scale_swa: float = 1.0
    causal_attn: bool = True
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
    rope_factor_layers: list[bool] | None = None
    """Which layers' RoPE takes the file's frequency factors (None: every layer; Gemma-4:
    the full-attention layers only, as its loader creates ``rope_freqs`` for them alone)."""
    is_mla: bool = False  # attention.key_length_mla and value_length_mla both set

    def __post_init__(self) -> None:
        if not self.is_swa:
            self.is_swa = [False] * self.n_layer_all
        if not self.rope_pattern:
            self.rope_pattern = [True] * self.n_layer_all

    @property
    def n_layer(self) -> int:
        """Trunk layers (NextN / MTP layers excluded)."""
        return self.n_layer_all - self.n_layer_nextn

    def key(self, suffix: str) -> str:
        return self.meta.k(suffix)

    # --- the reference's shared loading steps --------------------------------------------

    def set_swa_pattern(self, n_pattern: int, dense_first: bool = False) -> None:
        """``llama_hparams::set_swa_pattern``: which trunk layers slide.

        E.g. n_pattern=2 -> [T, F, T, F, ...] (every 2nd layer is dense, last in its
        group); n_pattern=6 -> 5 SWA layers then 1 dense; n_pattern=0 -> every layer;
        ``dense_first``: the dense layer opens each group. NextN layers never slide.
        """
        out = []
        for il in range(self.n_layer_all):
            if il >= self.n_layer:
                out.append(False)
            elif dense_first:
                out.append(n_pattern == 0 or il % n_pattern != 0)
            else:
                out.append(n_pattern == 0 or il % n_pattern < n_pattern - 1)
        self.is_swa = out

    def load_swa_pattern(self, n_pattern: int, dense_first: bool = False) -> None:
        """``attention.sliding_window_pattern``: a per-layer (bool / int) array, or the
        period (default ``n_pattern``) given to :meth:`set_swa_pattern`."""
        m = self.meta
        key = self.key("attention.sliding_window_pattern")
        if m.is_array(key):
            arr = m.int_array(key, allow_bool=True)
            assert arr is not None
            # get_arr into the fixed-size array: entries past the array keep their zero
            self.is_swa = [
                bool(arr[il]) if il < len(arr) else False for il in range(self.n_layer_all)
            ]
            return
        self.set_swa_pattern(m.u32(key, n_pattern), dense_first)

    def load_ssm(self, group: bool) -> None:
        """The Mamba keys (conv kernel, inner size, state size, dt rank, and the groups)."""
        m, k = self.meta, self.key
        self.ssm_d_conv = m.u32_req(k("ssm.conv_kernel"))
        self.ssm_d_inner = m.u32_req(k("ssm.inner_size"))
        self.ssm_d_state = m.u32_req(k("ssm.state_size"))
        self.ssm_dt_rank = m.u32_req(k("ssm.time_step_rank"))
        if group:
            self.ssm_n_group = m.u32_req(k("ssm.group_count"))

    def recurrent_where_no_kv_heads(self) -> None:
        """A trunk layer recurs iff its ``head_count_kv`` is 0 (Jamba, LFM2, Granite-4, ...)."""
        self.is_recr = [
            il < self.n_layer and self.n_head_kv[il] == 0 for il in range(self.n_layer_all)
        ]


Loader = Callable[[GGUFMeta, Draft], None]


@dataclass(frozen=True)
class ArchRule:
    """One architecture: its ``llama_model_rope_type`` and its ``load_arch_hparams``.

    ``unsupported`` names why pymem refuses the architecture (a memory type it does not
    implement); such rules exist so that the refusal says so instead of "unknown".
    """

    rope_type: RopeType
    load: Loader | None = None
    unsupported: str = ""
