"""Short-convolution (LFM2) and RWKV architectures."""

from __future__ import annotations

from pymem.gguf_spec.draft import ArchRule, Draft
from pymem.gguf_spec.meta import GGUFMeta
from pymem.spec import RopeType, SWAType


def _lfm2(m: GGUFMeta, d: Draft) -> None:
    d.n_shortconv_l_cache = m.u32_req(d.key("shortconv.l_cache"))
    d.recurrent_where_no_kv_heads()
    window = m.u32_opt(d.key("attention.sliding_window"))
    if window:
        # every attention layer slides
        d.swa_type, d.n_swa = SWAType.STANDARD, window
        d.is_swa = [il < d.n_layer and not d.is_recr[il] for il in range(d.n_layer_all)]


def _lfm2moe(m: GGUFMeta, d: Draft) -> None:
    # lfm2's layout without its sliding window: lfm2moe reads no window key
    d.n_shortconv_l_cache = m.u32_req(d.key("shortconv.l_cache"))
    d.recurrent_where_no_kv_heads()


def _rwkv(m: GGUFMeta, d: Draft) -> None:
    # every RWKV flavour reads the same two state keys; the Qwen-based ones (rwkv6qwen2,
    # arwkv7) carry token_shift_count 1 (their graphs assert n_embd_r == n_embd)
    d.wkv_head_size = m.u32_req(d.key("wkv.head_size"))
    d.token_shift_count = m.u32(d.key("token_shift_count"), 2)


RULES: dict[str, ArchRule] = {
    "lfm2": ArchRule(RopeType.NEOX, _lfm2),
    "lfm2moe": ArchRule(RopeType.NEOX, _lfm2moe),
    "rwkv6": ArchRule(RopeType.NONE, _rwkv),
    "rwkv6qwen2": ArchRule(RopeType.NONE, _rwkv),
    "rwkv7": ArchRule(RopeType.NONE, _rwkv),
    "arwkv7": ArchRule(RopeType.NONE, _rwkv),
}
