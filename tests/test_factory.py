"""The memory factory and the GGUF spec reader.

Pins: the context sizing rules of ``llama_context`` (n_ctx padded to 256, n_ctx_seq per
stream, n_batch / n_ubatch clamps, v_trans from flash attention, swa_full default, n_rs_seq
clamp), the memory type and layer routing of ``create_memory`` per architecture, the SWA
cache size formula, and, for every recorded run, that the planned memory is exactly
the one the reference built (``memory`` section of each run, byte widths included).
GGUF files for the architectures without a recorded model are written by the tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import pytest

from pymem.errors import ConfigError, UnsupportedError
from pymem.factory import (
    ContextParams,
    create_memory,
    plan_memory,
    resolve_context,
    swa_cache_size,
)
from pymem.gguf_spec import hparams_from_gguf, spec_from_gguf
from pymem.runtime.describe import describe_memory, describe_plan
from pymem.spec import LayerSpec, ModelSpec, RopeType, SWAType

DATA = Path(__file__).parent / "data"
# every recorded run (the shared three and tests/record's): run name -> its model file
RUNS = {
    path.stem: json.loads(path.read_text())["model_file"]
    for path in sorted((DATA / "runs").glob("*.json"))
}


def write_gguf(path: Path, arch: str, kv: dict[str, Any]) -> Path:
    """A tensor-less GGUF file with ``arch``-prefixed keys (``"."``-leading keys are global).

    Values: int -> u32, float -> f32, bool -> bool, str -> string, list -> array,
    ``("i32", v)`` / ``("u64", v)`` for other scalar types.
    """
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        name = key[1:] if key.startswith(".") else f"{arch}.{key}"
        if isinstance(value, tuple):
            kind, v = value
            {"i32": w.add_int32, "u64": w.add_uint64, "f32": w.add_float32}[kind](name, v)
        elif isinstance(value, bool):
            w.add_bool(name, value)
        elif isinstance(value, int):
            w.add_uint32(name, value)
        elif isinstance(value, float):
            w.add_float32(name, value)
        elif isinstance(value, str):
            w.add_string(name, value)
        else:
            w.add_array(name, list(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BASE = {"context_length": 4096, "embedding_length": 64, "attention.layer_norm_rms_epsilon": 1e-5}


# --------------------------------------------------------------------------------------
# recorded runs: the plan equals what the reference built
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", sorted(RUNS))
def test_plan_matches_recorded_memory(run: str) -> None:
    d = json.loads((DATA / "runs" / f"{run}.json").read_text())
    spec = spec_from_gguf(DATA / "models" / RUNS[run])
    plan = plan_memory(spec, ContextParams.from_dict(d["context_params"]))
    assert describe_plan(plan) == d["memory"]


@pytest.mark.parametrize("run", sorted(RUNS))
def test_built_memory_matches_recorded_memory(run: str) -> None:
    d = json.loads((DATA / "runs" / f"{run}.json").read_text())
    spec = spec_from_gguf(DATA / "models" / RUNS[run])
    mem = create_memory(spec, ContextParams.from_dict(d["context_params"]))
    assert mem is not None
    got = describe_memory(mem)
    assert got == {k: d["memory"][k] for k in ("type", "parts", "can_shift")}
    mem.close()


def test_recorded_models_specs() -> None:
    jamba = spec_from_gguf(DATA / "models" / "tiny-jamba.gguf")
    assert [lay.recurrent for lay in jamba.layers] == [True, False, True, False]
    assert [lay.n_embd_k_gqa for lay in jamba.layers] == [0, 8, 0, 8]
    assert jamba.n_embd_r() == 96 and jamba.n_embd_s() == 128  # 3 * 32, 4 * 32
    assert all(lay.rope is None for lay in jamba.layers)  # jamba has no RoPE
    llama = spec_from_gguf(DATA / "models" / "tiny-llama.gguf")
    rope = llama.layers[0].rope
    assert rope is not None and (rope.n_rot, rope.rope_type, rope.freq_base) == (
        32,
        RopeType.NORM,
        10000.0,
    )
    assert llama.n_ctx_train == 4096


# --------------------------------------------------------------------------------------
# context sizing
# --------------------------------------------------------------------------------------


def _attn_spec(n_layer: int = 2, **kw: Any) -> ModelSpec:
    return ModelSpec(layers=tuple(LayerSpec.attention(2, 16) for _ in range(n_layer)), **kw)


def test_context_defaults_are_the_reference_defaults() -> None:
    p = ContextParams()
    assert (p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max) == (512, 2048, 512, 1)
    assert p.swa_full is True and p.kv_unified is False and p.flash_attn == "auto"
    c = resolve_context(_attn_spec(), p)
    # n_batch is clamped to n_ctx with causal attention; auto flash attention -> no V transpose
    assert (c.n_ctx, c.n_ctx_seq, c.n_batch, c.n_ubatch, c.n_stream) == (512, 512, 512, 512, 1)
    assert c.flash_attn is True and c.v_trans is False


@pytest.mark.parametrize(
    ("n_ctx", "n_seq", "unified", "n_ctx_exp", "n_ctx_seq_exp"),
    [
        (256, 4, False, 1024, 256),  # observed: 4 x 256 cells
        (1000, 4, False, 1024, 256),  # PAD(1000) = 1024, 1024/4 = 256
        (1100, 4, False, 2048, 512),  # PAD(1100) = 1280, 1280/4 = 320 -> PAD 512, n_ctx 4 x 512
        (1000, 4, True, 1024, 1024),
        (300, 1, False, 512, 512),
        (256, 3, False, 768, 256),  # 256/3 = 85 -> PAD 256, n_ctx = 3 * 256
    ],
)
def test_n_ctx_seq(
    n_ctx: int, n_seq: int, unified: bool, n_ctx_exp: int, n_ctx_seq_exp: int
) -> None:
    c = resolve_context(
        _attn_spec(), ContextParams(n_ctx=n_ctx, n_seq_max=n_seq, kv_unified=unified)
    )
    assert (c.n_ctx, c.n_ctx_seq, c.n_stream) == (n_ctx_exp, n_ctx_seq_exp, 1 if unified else n_seq)


def test_batch_clamps_and_zero_defaults() -> None:
    spec = _attn_spec(n_ctx_train=2048)
    c = resolve_context(spec, ContextParams(n_ctx=0, n_batch=4096, n_ubatch=0))
    assert (c.n_ctx, c.n_batch, c.n_ubatch) == (2048, 2048, 2048)
    c = resolve_context(spec, ContextParams(n_ctx=300, n_batch=512, n_ubatch=1024))
    assert (c.n_ctx, c.n_batch, c.n_ubatch) == (512, 300, 300)  # clamped to the unpadded n_ctx
    nc = _attn_spec(causal_attn=False)
    c = resolve_context(nc, ContextParams(n_ctx=300, n_batch=512, n_ubatch=1024))
    assert (c.n_batch, c.n_ubatch) == (512, 512)  # non-causal: n_batch is not clamped
    with pytest.raises(ConfigError, match="n_ctx_train"):
        resolve_context(_attn_spec(), ContextParams(n_ctx=0))


def test_flash_attn_and_seq_max_rules() -> None:
    spec = _attn_spec()
    assert resolve_context(spec, ContextParams(flash_attn=False)).v_trans is True
    assert resolve_context(spec, ContextParams(flash_attn=True)).v_trans is False
    assert resolve_context(spec, ContextParams(flash_attn="disabled")).v_trans is True
    assert resolve_context(spec, ContextParams(n_seq_max=0)).n_seq_max == 1
    with pytest.raises(ConfigError, match="n_seq_max"):
        ContextParams(n_seq_max=257)
    with pytest.raises(ConfigError, match="flash_attn"):
        ContextParams(flash_attn="sometimes")
    with pytest.raises(ConfigError, match="n_ctx"):
        ContextParams(n_ctx=-1)


def test_cache_type_checks() -> None:
    spec = _attn_spec()  # head size 16
    with pytest.raises(ConfigError, match="requires flash_attn"):
        resolve_context(spec, ContextParams(type_v="q8_0", flash_attn=False))
    with pytest.raises(ConfigError, match="block size 32 does not divide n_embd_head_k=16"):
        resolve_context(spec, ContextParams(type_k="q8_0"))
    with pytest.raises(ConfigError, match="n_embd_head_v=16"):
        resolve_context(spec, ContextParams(type_v="q4_0", flash_attn=True))
    wide = ModelSpec(layers=(LayerSpec.attention(1, 64), LayerSpec.ssm(8, 8)))
    c = resolve_context(
        wide, ContextParams(type_k="q8_0", type_v="q8_0")
    )  # auto -> flash attention
    assert c.v_trans is False and (c.type_k, c.type_v) == ("q8_0", "q8_0")


def test_n_rs_seq_clamped_unless_the_arch_supports_rollback(tmp_path: Path) -> None:
    jamba = spec_from_gguf(DATA / "models" / "tiny-jamba.gguf")
    assert resolve_context(jamba, ContextParams(n_rs_seq=3)).n_rs_seq == 0
    lfm2 = spec_from_gguf(_lfm2(tmp_path))
    assert resolve_context(lfm2, ContextParams(n_rs_seq=3)).n_rs_seq == 3
    hand = ModelSpec(layers=(LayerSpec.ssm(8, 8),))  # hand-built: no arch, kept as asked
    assert resolve_context(hand, ContextParams(n_rs_seq=2)).n_rs_seq == 2


def test_swa_cache_size_formula() -> None:
    # PAD(min(kv_size, n_swa * (unified ? n_seq_max : 1) + n_ubatch), 256)
    assert swa_cache_size(4096, 128, True, 4, 512, False) == 1024
    assert swa_cache_size(4096, 128, False, 4, 512, False) == 768
    assert swa_cache_size(512, 4096, False, 1, 512, False) == 512  # capped at kv_size
    assert swa_cache_size(300, 10, False, 1, 7, False) == 256  # min(300, 17) -> PAD 256
    assert swa_cache_size(4096, 128, True, 4, 512, True) == 4096  # swa_full


# --------------------------------------------------------------------------------------
# per architecture, from GGUF files written here
# --------------------------------------------------------------------------------------


def _gemma2(tmp_path: Path, **over: Any) -> Path:
    kv = {
        **BASE,
        "block_count": 6,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 16,
        "attention.value_length": 16,
        "attention.sliding_window": 128,
        "rope.freq_base": 1000000.0,
        **over,
    }
    return write_gguf(tmp_path / "gemma2.gguf", "gemma2", kv)


def _lfm2(tmp_path: Path, **over: Any) -> Path:
    kv = {
        **BASE,
        "embedding_length": 32,
        "block_count": 6,
        "attention.head_count": 4,
        "attention.head_count_kv": [0, 2, 0, 2, 0, 2],
        "shortconv.l_cache": 3,
        **over,
    }
    return write_gguf(tmp_path / "lfm2.gguf", "lfm2", kv)


def test_gemma2_default_pattern_and_iswa_plan(tmp_path: Path) -> None:
    spec = spec_from_gguf(_gemma2(tmp_path))
    assert [lay.swa for lay in spec.layers] == [True, False] * 3  # pattern 2: every 2nd dense
    assert (spec.n_swa, spec.swa_type) == (128, SWAType.STANDARD)
    assert spec.layers[0].n_embd_k_gqa == 32
    r_swa, r_full = spec.layers[0].rope, spec.layers[1].rope
    assert r_swa is not None and r_full is not None
    # gemma2: the SWA base frequency defaults to the full one
    assert r_swa.rope_type == RopeType.NEOX and r_swa.freq_base == r_full.freq_base == 1000000.0

    plan = plan_memory(spec, ContextParams(n_ctx=4096, n_seq_max=4, swa_full=False))
    assert plan.type == "kv_cache_iswa"
    base, swa = plan.parts
    assert (base.layers, swa.layers) == ((1, 3, 5), (0, 2, 4))
    assert (base.kv_size, swa.kv_size) == (1024, 768)  # n_ctx_seq 1024; PAD(128 + 512)
    assert (base.swa_type, swa.swa_type, swa.n_swa) == (SWAType.NONE, SWAType.STANDARD, 128)
    assert base.n_stream == swa.n_stream == 4
    assert plan.can_shift is False  # sizes differ
    full = plan_memory(spec, ContextParams(n_ctx=4096, n_seq_max=4))  # swa_full defaults True
    assert full.parts[1].kv_size == 1024 and full.can_shift is True
    uni = plan_memory(spec, ContextParams(n_ctx=4096, n_seq_max=4, kv_unified=True, swa_full=False))
    assert (uni.parts[0].kv_size, uni.parts[1].kv_size) == (4096, 1024)  # PAD(128*4 + 512)


def test_gemma2_pattern_keys(tmp_path: Path) -> None:
    spec = spec_from_gguf(_gemma2(tmp_path, **{"attention.sliding_window_pattern": 3}))
    assert [lay.swa for lay in spec.layers] == [True, True, False, True, True, False]
    spec = spec_from_gguf(
        _gemma2(
            tmp_path,
            **{"attention.sliding_window_pattern": [False, True, True, False, False, True]},
        )
    )
    assert [lay.swa for lay in spec.layers] == [False, True, True, False, False, True]
    spec = spec_from_gguf(
        _gemma2(tmp_path, **{"rope.freq_base_swa": 10000.0, "attention.key_length_swa": 8})
    )
    assert spec.layers[0].rope.freq_base == 10000.0  # type: ignore[union-attr]
    assert spec.layers[1].rope.freq_base == 1000000.0  # type: ignore[union-attr]
    assert (spec.layers[0].n_embd_head_k, spec.layers[1].n_embd_head_k) == (8, 16)


def test_gemma3_without_window_is_a_plain_kv_cache(tmp_path: Path) -> None:
    kv = {**BASE, "block_count": 2, "attention.head_count": 4, "attention.head_count_kv": 1}
    spec = spec_from_gguf(write_gguf(tmp_path / "g3.gguf", "gemma3", kv))
    assert spec.swa_type == SWAType.NONE and not spec.has_swa_layers()
    assert plan_memory(spec, ContextParams()).type == "kv_cache"
    spec = spec_from_gguf(
        write_gguf(tmp_path / "g3s.gguf", "gemma3", {**kv, "attention.sliding_window": 512})
    )
    assert [lay.swa for lay in spec.layers] == [True, True]  # pattern 6: layers 0..4 slide
    assert spec.layers[0].rope.freq_base == 10000.0  # type: ignore[union-attr]


def test_mamba2_widths(tmp_path: Path) -> None:
    kv = {
        **BASE,
        "block_count": 3,
        "ssm.conv_kernel": 4,
        "ssm.inner_size": 64,
        "ssm.state_size": 16,
        "ssm.time_step_rank": 4,
        "ssm.group_count": 2,
    }
    spec = spec_from_gguf(write_gguf(tmp_path / "m2.gguf", "mamba2", kv))
    # (d_conv - 1) * (d_inner + 2 * n_group * d_state) = 3 * (64 + 64); d_state * d_inner
    assert all(lay.recurrent for lay in spec.layers)
    assert (spec.n_embd_r(), spec.n_embd_s()) == (384, 1024)
    plan = plan_memory(spec, ContextParams(n_seq_max=3))
    assert plan.type == "recurrent"
    (rec,) = plan.parts
    assert (rec.layers, rec.mem_size, rec.n_seq_max) == ((0, 1, 2), 3, 3)
    kv.pop("ssm.group_count")
    with pytest.raises(ConfigError, match=r"key not found in model: mamba2\.ssm\.group_count"):
        spec_from_gguf(write_gguf(tmp_path / "m2b.gguf", "mamba2", kv))


GRANITE_HYBRID = {
    **BASE,
    "block_count": 4,
    "attention.head_count": 4,
    "attention.head_count_kv": [0, 0, 2, 0],
    "ssm.conv_kernel": 4,
    "ssm.inner_size": 32,
    "ssm.state_size": 8,
    "ssm.time_step_rank": 2,
    "ssm.group_count": 1,
}
"""A ``granitehybrid`` file: recurrent layers 0, 1 and 3, attention layer 2 (2 KV heads)."""


def test_granitehybrid_routing_and_rope_switch(tmp_path: Path) -> None:
    spec = spec_from_gguf(write_gguf(tmp_path / "gh.gguf", "granitehybrid", GRANITE_HYBRID))
    assert [lay.recurrent for lay in spec.layers] == [True, True, False, True]
    assert spec.layers[2].rope is not None and spec.layers[2].rope.rope_type == RopeType.NORM
    assert spec.n_embd_r() == 3 * (32 + 2 * 8)
    plan = plan_memory(spec, ContextParams(n_ctx=512, n_seq_max=2))
    assert plan.type == "hybrid"
    attn, rec = plan.parts
    assert (attn.name, attn.layers, attn.kv_size, attn.n_stream) == ("attn", (2,), 256, 2)
    assert (rec.name, rec.layers, rec.mem_size) == ("recr", (0, 1, 3), 2)
    spec = spec_from_gguf(
        write_gguf(
            tmp_path / "gh2.gguf",
            "granitehybrid",
            {**GRANITE_HYBRID, "rope.scaling.finetuned": False},
        )
    )
    assert spec.layers[2].rope is None  # rope_finetuned=false switches RoPE (and K-shift) off


def test_lfm2_hybrid_and_hybrid_iswa(tmp_path: Path) -> None:
    spec = spec_from_gguf(_lfm2(tmp_path))
    assert [lay.recurrent for lay in spec.layers] == [True, False] * 3
    assert (spec.n_embd_r(), spec.n_embd_s()) == (64, 0)  # n_embd * (L_cache - 1); no S
    plan = plan_memory(spec, ContextParams(n_ctx=1024, n_seq_max=2, kv_unified=True))
    assert (
        plan.type == "hybrid"
        and plan.parts[0].layers == (1, 3, 5)
        and plan.parts[1].layers == (0, 2, 4)
    )

    spec = spec_from_gguf(_lfm2(tmp_path, **{"attention.sliding_window": 64}))
    assert [lay.swa for lay in spec.layers] == [False, True] * 3  # every attention layer slides
    plan = plan_memory(
        spec, ContextParams(n_ctx=1024, n_seq_max=2, kv_unified=True, swa_full=False, n_ubatch=64)
    )
    assert plan.type == "hybrid_iswa"
    base, swa, rec = plan.parts
    assert base.layers == ()  # the base cache has no layers at all (observed behaviour 3)
    assert (swa.layers, swa.kv_size, rec.layers) == ((1, 3, 5), 256, (0, 2, 4))


def test_rwkv_and_falcon_h1(tmp_path: Path) -> None:
    kv = {**BASE, "embedding_length": 128, "block_count": 2, "wkv.head_size": 64}
    spec = spec_from_gguf(write_gguf(tmp_path / "rwkv6.gguf", "rwkv6", kv))
    assert (spec.n_embd_r(), spec.n_embd_s()) == (2 * 128, 128 * 64)
    assert plan_memory(spec, ContextParams()).type == "recurrent"

    kv = {
        **BASE,
        "block_count": 2,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "ssm.conv_kernel": 4,
        "ssm.inner_size": 32,
        "ssm.state_size": 8,
        "ssm.time_step_rank": 2,
        "ssm.group_count": 1,
    }
    spec = spec_from_gguf(write_gguf(tmp_path / "fh1.gguf", "falcon-h1", kv))
    plan = plan_memory(spec, ContextParams())
    assert plan.type == "hybrid"
    assert plan.parts[0].layers == (0, 1) and plan.parts[1].layers == (0, 1)  # every layer in both
    assert spec.layers[0].n_embd_k_gqa == 32 and spec.layers[0].recurrent


def test_yarn_rope_context_defaults(tmp_path: Path) -> None:
    kv = {
        **BASE,
        "block_count": 1,
        "attention.head_count": 4,
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": 4.0,
        "rope.scaling.original_context_length": 1024,
        "rope.scaling.yarn_log_multiplier": 0.1,
    }
    hp = hparams_from_gguf(write_gguf(tmp_path / "y.gguf", "llama", kv))
    rope = hp.layer(0).rope
    assert rope is not None
    m = 0.1 * math.log(4.0) + 1.0
    m_all = 0.1 * 0.1 * math.log(4.0) + 1.0
    assert (rope.freq_scale, rope.ext_factor, rope.n_ctx_orig) == (0.25, 1.0, 1024)
    assert rope.attn_factor == pytest.approx(m / m_all / (1.0 + 0.1 * math.log(4.0)))
    hp = hparams_from_gguf(
        write_gguf(tmp_path / "n.gguf", "llama", {**kv, "rope.scaling.type": "none"})
    )
    assert hp.layer(0).rope.freq_scale == 1.0 and hp.layer(0).rope.ext_factor == 0.0  # type: ignore[union-attr]


def test_gguf_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="'bloom'"):
        spec_from_gguf(write_gguf(tmp_path / "b.gguf", "bloom", {**BASE, "block_count": 1}))
    with pytest.raises(ConfigError, match=r"key not found in model: llama\.block_count"):
        spec_from_gguf(write_gguf(tmp_path / "a.gguf", "llama", dict(BASE)))
    with pytest.raises(
        ConfigError, match=r"llama\.block_count has wrong type i32 but expected type u32"
    ):
        spec_from_gguf(
            write_gguf(tmp_path / "c.gguf", "llama", {**BASE, "block_count": ("i32", 2)})
        )
    with pytest.raises(ConfigError, match="wrong array length; expected 2, got 3"):
        spec_from_gguf(
            write_gguf(
                tmp_path / "d.gguf",
                "llama",
                {
                    **BASE,
                    "block_count": 2,
                    "attention.head_count": 2,
                    "attention.head_count_kv": [1, 1, 1],
                },
            )
        )
    with pytest.raises(ConfigError, match="invalid n_rot"):
        spec_from_gguf(
            write_gguf(
                tmp_path / "e.gguf",
                "llama",
                {**BASE, "block_count": 1, "attention.head_count": 2, "rope.dimension_count": 16},
            )
        )
    with pytest.raises(ConfigError, match="cannot read GGUF"):
        spec_from_gguf(tmp_path / "missing.gguf")


def test_classification_of_hand_built_specs() -> None:
    attn = LayerSpec.attention(1, 8)
    ssm = LayerSpec.ssm(24, 32)
    swa = LayerSpec.attention(1, 8, swa=True)
    assert plan_memory(ModelSpec(layers=(ssm, ssm)), ContextParams()).type == "recurrent"
    assert plan_memory(ModelSpec(layers=(ssm, attn)), ContextParams()).type == "hybrid"
    assert plan_memory(ModelSpec(layers=(attn, attn)), ContextParams()).type == "kv_cache"
    iswa = ModelSpec(layers=(swa, attn), n_swa=4, swa_type=SWAType.STANDARD)
    assert plan_memory(iswa, ContextParams()).type == "kv_cache_iswa"
    hiswa = ModelSpec(layers=(ssm, swa, attn), n_swa=4, swa_type=SWAType.STANDARD)
    plan = plan_memory(hiswa, ContextParams())
    assert plan.type == "hybrid_iswa"
    assert [p.layers for p in plan.parts] == [(2,), (1,), (0,)]
    with pytest.raises(ConfigError, match="no attention layer is SWA"):
        plan_memory(ModelSpec(layers=(attn,), n_swa=4, swa_type=SWAType.STANDARD), ContextParams())
    with pytest.raises(ConfigError, match="swa_type is NONE"):
        plan_memory(ModelSpec(layers=(swa,)), ContextParams())
    assert plan_memory(ModelSpec(layers=(attn,), arch="bert"), ContextParams()).type == "none"
    # a KV model with NextN layers keeps only its trunk
    mtp = ModelSpec(layers=(attn, attn, attn), n_layer_nextn=1)
    assert plan_memory(mtp, ContextParams()).parts[0].layers == (0, 1)


def _hand_hybrid_iswa() -> ModelSpec:
    ssm = LayerSpec.ssm(24, 32)
    return ModelSpec(
        layers=(ssm, LayerSpec.attention(2, 8, swa=True), LayerSpec.attention(2, 8), ssm),
        n_swa=16,
        swa_type=SWAType.STANDARD,
    )


@pytest.mark.parametrize(
    "which",
    ["gemma2", "gemma2_unified", "lfm2", "mamba2", "hybrid_iswa"],
)
def test_built_memory_matches_its_plan(which: str, tmp_path: Path) -> None:
    params = ContextParams(n_ctx=2048, n_seq_max=3, n_ubatch=64, swa_full=False, flash_attn=False)
    if which.startswith("gemma2"):
        spec = spec_from_gguf(_gemma2(tmp_path))
        if which == "gemma2_unified":
            params = ContextParams(n_ctx=2048, n_seq_max=3, kv_unified=True, swa_full=False)
    elif which == "lfm2":
        spec = spec_from_gguf(_lfm2(tmp_path))
    elif which == "mamba2":
        kv = {**BASE, "block_count": 2, "ssm.conv_kernel": 4, "ssm.inner_size": 64, "ssm.state_size": 16,
              "ssm.time_step_rank": 4, "ssm.group_count": 2}  # fmt: skip
        spec = spec_from_gguf(write_gguf(tmp_path / "m2.gguf", "mamba2", kv))
    else:
        spec = _hand_hybrid_iswa()
    plan = plan_memory(spec, params)
    mem = create_memory(spec, params)
    assert mem is not None
    want = describe_plan(plan)
    assert describe_memory(mem) == {k: want[k] for k in ("type", "parts", "can_shift")}
    # bytes allocated == bytes the parts need (V padded to the widest V when transposed,
    # as the reference does; every width here is uniform)
    need = 0
    for p in want["parts"]:
        if p["kind"] == "kv":
            need += sum(
                p["kv_size"] * p["n_stream"] * (lay["k_row_bytes"] + lay["v_row_bytes"])
                for lay in p["layers"]
            )
        else:
            need += sum(
                p["mem_size"] * (1 + p["n_rs_seq"]) * (lay["r_row_bytes"] + lay["s_row_bytes"])
                for lay in p["layers"]
            )
    assert sum(mem.memory_breakdown().values()) == need
    mem.close()


@pytest.mark.parametrize("failing", ["kv_cache_iswa", "hybrid_iswa"])
def test_a_failed_build_closes_the_parts_built_so_far(
    failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last part (the SWA cache, the recurrent memory) fails to build: every part
    built before it is closed, and the error reaches the caller."""
    import pymem.factory as factory

    spec = _hand_hybrid_iswa()
    if failing == "kv_cache_iswa":
        spec = ModelSpec(layers=spec.layers[1:3], n_swa=16, swa_type=SWAType.STANDARD)
    plan = plan_memory(spec, ContextParams(n_ctx=256, n_seq_max=2))
    assert plan.type == failing
    built: list[Any] = []
    n_built = len(plan.parts) - 1

    def build_kv(*args: Any) -> Any:
        if len(built) == n_built:
            raise ConfigError("injected")
        built.append(real_kv(*args))
        return built[-1]

    def build_recurrent(*args: Any) -> Any:
        raise ConfigError("injected")

    real_kv = factory.build_kv
    monkeypatch.setattr(factory, "build_kv", build_kv)
    monkeypatch.setattr(factory, "build_recurrent", build_recurrent)
    with pytest.raises(ConfigError, match="injected"):
        factory.build_from_plan(plan)
    assert len(built) == n_built and all(kv._closed for kv in built)
