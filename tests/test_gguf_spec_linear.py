"""The linear-attention family's GGUF rules (pymem/gguf_spec/arch_linear.py).

Pins, per architecture, what the reference's ``load_arch_hparams`` decides for memory:
which layers recur (``attention.recurrent_layers`` vs ``full_attention_interval``, NextN
layers), the R / S widths of gated delta-net / KDA / lightning-attention layers, the RoPE
type (M-RoPE: cells carry an ext position), and the architectures refused because the
reference serves them with a memory type pymem does not implement; and, for every run
recorded with tests/record/family_linear.py, that the factory's plan (and the memory it
builds) is exactly what the reference built. Metadata-level tests write GGUF files with
only the keys (no tensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from pymem.errors import ConfigError, UnsupportedError
from pymem.factory import ContextParams, create_memory, plan_memory
from pymem.gguf_spec import spec_from_gguf
from pymem.runtime.describe import describe_memory, describe_plan
from pymem.spec import ModelSpec, RopeType

sys.path.insert(0, str(Path(__file__).parent / "record"))
import family_linear
from test_factory import write_gguf

DATA = Path(__file__).parent / "data"

# n_embd 64, 4 heads of 16, 2 KV heads
BASE: dict[str, Any] = {
    "context_length": 4096,
    "embedding_length": 64,
    "attention.layer_norm_rms_epsilon": 1e-5,
    "attention.head_count": 4,
    "attention.head_count_kv": 2,
}

# gated delta-net: head 8, 2 K heads, 4 V heads (d_inner 32), conv kernel 4
GDN_KEYS: dict[str, Any] = {
    "ssm.conv_kernel": 4,
    "ssm.inner_size": 32,
    "ssm.state_size": 8,
    "ssm.time_step_rank": 4,
    "ssm.group_count": 2,
    "rope.dimension_sections": [2, 2, 4, 0],
}


def _spec(tmp_path: Path, arch: str, n_layer: int, **kv: Any) -> ModelSpec:
    keys = {**BASE, "block_count": n_layer, **kv}
    return spec_from_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch, keys))


def _recurs(spec: ModelSpec) -> list[bool]:
    return [lay.recurrent for lay in spec.layers]


# --------------------------------------------------------------------------------------
# recorded runs: the plan equals what the reference built
# --------------------------------------------------------------------------------------

RECORDED = sorted(r.name for r in family_linear.RUNS if (DATA / "runs" / f"{r.name}.json").exists())


@pytest.mark.parametrize("run", RECORDED)
def test_plan_matches_recorded_memory(run: str) -> None:
    d = json.loads((DATA / "runs" / f"{run}.json").read_text())
    spec = spec_from_gguf(DATA / "models" / d["model_file"])
    params = ContextParams.from_dict(d["context_params"])
    assert describe_plan(plan_memory(spec, params)) == d["memory"]
    mem = create_memory(spec, params)
    assert mem is not None
    try:
        assert describe_memory(mem) == {k: d["memory"][k] for k in ("type", "parts", "can_shift")}
    finally:
        mem.close()


def test_every_run_is_recorded() -> None:
    assert len(RECORDED) == len(family_linear.RUNS)


# --------------------------------------------------------------------------------------
# gated delta-net (qwen3next, qwen35, qwen35moe)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe", "qwen3next"])
def test_gated_delta_net_default_interval_and_widths(arch: str, tmp_path: Path) -> None:
    # no recurrent_layers / full_attention_interval: one attention layer in 4
    spec = _spec(tmp_path, arch, 8, **GDN_KEYS)
    assert _recurs(spec) == [True, True, True, False] * 2
    # R: (d_conv - 1) * (d_inner + 2 * n_group * d_state) = 3 * (32 + 32) = 192 (Q, K, V)
    # S: d_state * d_inner = 8 * 32 = 256 (4 V heads of 8 x 8)
    assert {(lay.n_embd_r, lay.n_embd_s) for lay in spec.layers if lay.recurrent} == {(192, 256)}
    attn = spec.layers[3]
    assert (attn.n_embd_r, attn.n_embd_s, attn.n_embd_k_gqa) == (0, 0, 32)
    want = RopeType.NEOX if arch == "qwen3next" else RopeType.IMROPE
    assert attn.rope is not None and attn.rope.rope_type == want
    assert spec.n_pos_per_embd == (1 if arch == "qwen3next" else 4)


def test_full_attention_interval_and_nextn(tmp_path: Path) -> None:
    # interval 2 over 4 trunk layers; the NextN (MTP) layer 4 is attention-only
    spec = _spec(
        tmp_path, "qwen35", 5, full_attention_interval=2, nextn_predict_layers=1, **GDN_KEYS
    )
    assert _recurs(spec) == [True, False, True, False, False]
    assert spec.n_layer_nextn == 1


def test_recurrent_layers_array_overrides_the_interval(tmp_path: Path) -> None:
    # an explicit per-layer array wins over full_attention_interval, taken as written
    spec = _spec(
        tmp_path,
        "qwen35moe",
        4,
        full_attention_interval=2,
        **{"attention.recurrent_layers": [1, 1, 0, 1]},
        **GDN_KEYS,
    )
    assert _recurs(spec) == [True, True, False, True]


def test_recurrent_layers_array_of_wrong_length_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recurrent_layers has wrong array length"):
        _spec(tmp_path, "qwen3next", 4, **{"attention.recurrent_layers": [1, 0]}, **GDN_KEYS)


def test_gated_delta_net_requires_the_ssm_keys(tmp_path: Path) -> None:
    keys = {k: v for k, v in GDN_KEYS.items() if k != "ssm.group_count"}
    with pytest.raises(ConfigError, match=r"ssm\.group_count"):
        _spec(tmp_path, "qwen35", 4, **keys)


# --------------------------------------------------------------------------------------
# lightning attention (minimax-01)
# --------------------------------------------------------------------------------------


def test_minimax_01_lightning_layers(tmp_path: Path) -> None:
    # default: one full-attention layer in 8; S = head * head * n_head = 16 * 16 * 4, no R
    spec = _spec(tmp_path, "minimax-01", 16, residual_scale=1.0)
    assert _recurs(spec) == ([True] * 7 + [False]) * 2
    assert {(lay.n_embd_r, lay.n_embd_s) for lay in spec.layers if lay.recurrent} == {(0, 1024)}
    assert spec.layers[7].rope is not None and spec.layers[7].rope.rope_type == RopeType.NEOX


# --------------------------------------------------------------------------------------
# KDA + MLA (kimi-linear)
# --------------------------------------------------------------------------------------

KIMI_KEYS: dict[str, Any] = {
    "attention.head_count_kv": [0, 0, 0, 1],
    "attention.key_length": 576,
    "attention.value_length": 512,
    "attention.key_length_mla": 192,
    "attention.value_length_mla": 128,
    "attention.kv_lora_rank": 512,
    "ssm.conv_kernel": 4,
    "kda.head_dim": 16,
}


def test_kimi_linear_kda_widths_and_k_only_cache(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "kimi-linear", 4, **KIMI_KEYS)
    assert _recurs(spec) == [True, True, True, False]
    # R: 3 * (d_conv - 1) * n_head * head_dim = 3 * 3 * 4 * 16; S: 16 * 16 * 4
    assert {(lay.n_embd_r, lay.n_embd_s) for lay in spec.layers if lay.recurrent} == {(576, 1024)}
    # MLA: K holds the latent (576 per token), no V tensor, but V's width is still reported
    assert spec.is_mla and (spec.layers[3].n_embd_k_gqa, spec.layers[3].n_embd_v_gqa) == (576, 512)
    assert spec.layers[3].rope is None  # Kimi-Linear applies no RoPE
    mem = create_memory(spec, ContextParams(n_ctx=64, n_seq_max=1))
    assert mem is not None
    try:
        (kv,) = describe_memory(mem)["parts"][:1]
        assert [(lay["has_v"], lay["v_row_bytes"]) for lay in kv["layers"]] == [(False, 0)]
    finally:
        mem.close()


def test_kimi_linear_requires_the_mla_keys(tmp_path: Path) -> None:
    keys = {k: v for k, v in KIMI_KEYS.items() if k != "attention.key_length_mla"}
    with pytest.raises(ConfigError, match=r"attention\.key_length_mla"):
        _spec(tmp_path, "kimi-linear", 4, **keys)


def test_kimi_k3_v_width_is_the_latent(tmp_path: Path) -> None:
    # kimi-k3 sets the V head size to kv_lora_rank, whatever value_length says
    spec = _spec(tmp_path, "kimi-k3", 4, **{**KIMI_KEYS, "attention.value_length": 6})
    assert _recurs(spec) == [True, True, True, False]
    assert spec.is_mla and (spec.layers[3].n_embd_k_gqa, spec.layers[3].n_embd_v_gqa) == (576, 512)


BAILING_KEYS: dict[str, Any] = {
    **KIMI_KEYS,
    "attention.head_count_kv": [0, 1, 0, 1, 1],
    "nextn_predict_layers": 1,
    "kda.gate_lower_bound": -5.0,
}


def test_bailingmoe3_nextn_layer_and_rope_type(tmp_path: Path) -> None:
    # the NextN layer 4 is attention (MLA); RoPE is normal without rope sections
    spec = _spec(tmp_path, "bailingmoe3", 5, **BAILING_KEYS)
    assert _recurs(spec) == [True, False, True, False, False]
    assert spec.is_mla and spec.n_layer_nextn == 1 and spec.n_pos_per_embd == 1
    assert spec.layers[1].rope is not None and spec.layers[1].rope.rope_type == RopeType.NORM
    # the plain hybrid filter caches the NextN layer beside the trunk's attention layers;
    # the recurrent memory covers the trunk (its state header says 4 layers)
    mem = create_memory(spec, ContextParams(n_ctx=64, n_seq_max=1))
    assert mem is not None
    try:
        kv, rs = describe_memory(mem)["parts"]
        assert [lay["il"] for lay in kv["layers"]] == [1, 3, 4]
        assert (rs["n_layer_total"], [lay["il"] for lay in rs["layers"]]) == (4, [0, 2])
    finally:
        mem.close()
    # the first two rope sections set: M-RoPE (cells carry ext positions)
    sections = {**BAILING_KEYS, "rope.dimension_sections": [2, 2, 0, 0]}
    spec = _spec(tmp_path, "bailingmoe3", 5, **sections)
    assert spec.layers[1].rope is not None and spec.layers[1].rope.rope_type == RopeType.MROPE
    assert spec.n_pos_per_embd == 4


def test_bailingmoe3_gate_bound_must_be_negative(tmp_path: Path) -> None:
    keys = {**BAILING_KEYS, "kda.gate_lower_bound": 0.5}
    with pytest.raises(ConfigError, match="gate_lower_bound < 0"):
        _spec(tmp_path, "bailingmoe3", 5, **keys)


# --------------------------------------------------------------------------------------
# refused: memory types pymem does not implement
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "memory"),
    [
        ("qwen4exp", "llama_memory_hybrid_idx"),
        ("glm5-next", "llama_memory_hybrid_idx"),
        ("deepseek4", "llama_kv_cache_dsv4"),
    ],
)
def test_unsupported_memory_types_are_refused_with_the_reason(
    arch: str, memory: str, tmp_path: Path
) -> None:
    # the rule refuses before any key is read: the reason names the reference's memory type
    with pytest.raises(UnsupportedError, match=f"{arch!r}: the reference serves it with {memory}"):
        _spec(tmp_path, arch, 4, **GDN_KEYS)
