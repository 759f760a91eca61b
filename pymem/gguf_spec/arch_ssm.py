"""Mamba-family architectures: Mamba, Mamba-2 and the hybrids built on their layers.

Recurrent widths come from the SSM keys (``Draft.load_ssm``); which layers recur is the
architecture's rule (every layer, or those without KV heads).
"""

from __future__ import annotations

from pymem.gguf_spec.draft import ArchRule, Draft
from pymem.gguf_spec.meta import GGUFMeta
from pymem.spec import RopeType


def _mamba(m: GGUFMeta, d: Draft) -> None:
    d.load_ssm(group=False)


def _jamba(m: GGUFMeta, d: Draft) -> None:
    d.load_ssm(group=False)
    d.recurrent_where_no_kv_heads()


def _mamba2(m: GGUFMeta, d: Draft) -> None:
    d.load_ssm(group=True)


def _falcon_h1(m: GGUFMeta, d: Draft) -> None:
    d.load_ssm(group=True)
    d.is_recr = [True] * d.n_layer_all


def _granitehybrid(m: GGUFMeta, d: Draft) -> None:
    d.load_ssm(group=True)
    # Granite switches RoPE off with rope.scaling.finetuned = false
    d.rope_pattern = [m.bool_(d.key("rope.scaling.finetuned"), True)] * d.n_layer_all
    d.recurrent_where_no_kv_heads()


def _nemotron_h(m: GGUFMeta, d: Draft) -> None:
    d.load_ssm(group=True)
    # a trunk layer recurs iff it has neither KV heads nor an FFN (the others attend, or
    # are MLP / MoE layers that no memory part holds); appended MTP blocks never recur
    d.is_recr = [
        il < d.n_layer and d.n_head_kv[il] == 0 and d.n_ff[il] == 0 for il in range(d.n_layer_all)
    ]


def _plamo2(m: GGUFMeta, d: Draft) -> None:
    d.load_ssm(group=True)
    # re-read after the general keys: converted PLaMo-2 files give layer 0 (a Mamba layer)
    # no heads, which zeroes the general head sizes (and n_rot, which stays 0)
    d.n_embd_head_k_full = m.u32(d.key("attention.key_length"), d.n_embd_head_k_full)
    d.n_embd_head_v_full = m.u32(d.key("attention.value_length"), d.n_embd_head_v_full)
    d.recurrent_where_no_kv_heads()


RULES: dict[str, ArchRule] = {
    "mamba": ArchRule(RopeType.NONE, _mamba),
    "mamba2": ArchRule(RopeType.NONE, _mamba2),
    "jamba": ArchRule(RopeType.NONE, _jamba),
    "falcon-h1": ArchRule(RopeType.NEOX, _falcon_h1),
    "granitehybrid": ArchRule(RopeType.NORM, _granitehybrid),
    "nemotron_h": ArchRule(RopeType.NONE, _nemotron_h),
    "nemotron_h_moe": ArchRule(RopeType.NONE, _nemotron_h),
    "plamo2": ArchRule(RopeType.NEOX, _plamo2),
}
