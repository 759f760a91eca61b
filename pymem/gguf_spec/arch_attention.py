"""Attention-only architectures: dense KV caches and sliding-window (iSWA) caches.

Each loader repeats what the reference's ``load_arch_hparams`` decides for memory: which
layers slide (``set_swa_pattern`` or a per-layer array), the window, the SWA type, the
SWA layers' RoPE base and scale, and head sizes where they differ per layer kind.
"""

from __future__ import annotations

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


_LAYER_REUSE = (
    "the reference's KV cache lets the layers from n_layer_kv_from_start on reuse the K/V of an "
    "earlier layer (create_memory's layer_reuse_cb); pymem's caches give every attention layer "
    "its own K/V and have no layer reuse"
)


RULES: dict[str, ArchRule] = {
    "llama": ArchRule(RopeType.NORM),
    "qwen2": ArchRule(RopeType.NEOX),
    "qwen3": ArchRule(RopeType.NEOX),
    "gemma2": ArchRule(RopeType.NEOX, _gemma2),
    "gemma3": ArchRule(RopeType.NEOX, _gemma3),
    "gemma3n": ArchRule(RopeType.NEOX, unsupported=_LAYER_REUSE),
    "gemma4": ArchRule(RopeType.NEOX, unsupported=_LAYER_REUSE),
}
