"""The attention family's GGUF rules (pymem/gguf_spec/arch_attention.py).

Pins, per architecture, what the reference's ``load_arch_hparams`` decides for memory:
which layers slide, the window, the SWA type, the SWA layers' RoPE base / scale and head
sizes, and the RoPE type; and, for every run recorded with tests/record/family_attention.py,
that the factory's plan (and the memory it builds) is exactly what the reference built.
The metadata-level tests write GGUF files with only the keys (no tensors).
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
from pymem.spec import ModelSpec, RopeType, SWAType

sys.path.insert(0, str(Path(__file__).parent / "record"))
import family_attention
from test_factory import write_gguf

DATA = Path(__file__).parent / "data"

# n_embd 64, 4 heads of 16 unless a test says otherwise
BASE: dict[str, Any] = {
    "context_length": 4096,
    "embedding_length": 64,
    "attention.layer_norm_rms_epsilon": 1e-5,
    "attention.head_count": 4,
    "attention.head_count_kv": 2,
}


def _spec(tmp_path: Path, arch: str, n_layer: int, **kv: Any) -> ModelSpec:
    keys = {**BASE, "block_count": n_layer, **kv}
    return spec_from_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch, keys))


def _slides(spec: ModelSpec) -> list[bool]:
    return [lay.swa for lay in spec.layers]


def _bases(spec: ModelSpec) -> list[float | None]:
    return [lay.rope.freq_base if lay.rope else None for lay in spec.layers]


# --------------------------------------------------------------------------------------
# recorded runs: the plan equals what the reference built
# --------------------------------------------------------------------------------------

RECORDED = sorted(
    r.name for r in family_attention.RUNS if (DATA / "runs" / f"{r.name}.json").exists()
)


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
    assert len(RECORDED) == len(family_attention.RUNS)


# --------------------------------------------------------------------------------------
# gemma3
# --------------------------------------------------------------------------------------


def test_gemma3_pattern_window_and_swa_base(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "gemma3", 7, **{"attention.sliding_window": 512, "rope.freq_base": 1e6})
    # pattern 6: five SWA layers, then one full
    assert _slides(spec) == [True] * 5 + [False] + [True]
    assert (spec.n_swa, spec.swa_type) == (512, SWAType.STANDARD)
    # the SWA base defaults to 10000, not to the full layers' base
    assert _bases(spec) == [10000.0] * 5 + [1e6] + [10000.0]
    assert spec.layers[0].rope is not None and spec.layers[0].rope.rope_type == RopeType.NEOX
    spec = _spec(
        tmp_path,
        "gemma3",
        4,
        **{
            "attention.sliding_window": 8,
            "attention.sliding_window_pattern": 2,
            "rope.freq_base_swa": 5000.0,
        },
    )
    assert _slides(spec) == [True, False, True, False]
    assert _bases(spec) == [5000.0, 10000.0, 5000.0, 10000.0]
    # a window of 0 is no window: a plain KV cache
    spec = _spec(tmp_path, "gemma3", 2, **{"attention.sliding_window": 0})
    assert spec.swa_type == SWAType.NONE and not any(_slides(spec))


def test_gemma3n_gemma4_refused_when_a_layer_reuses_kv(tmp_path: Path) -> None:
    # create_memory's layer_reuse_cb: layers from n_layer_kv_from_start on reuse K/V
    # (Gemma-3n: 20; Gemma-4: n_layer - attention.shared_kv_layers)
    with pytest.raises(UnsupportedError, match=r"layers 20\.\.20 reuse"):
        _spec(tmp_path, "gemma3n", 21, **{"attention.sliding_window": 512})
    g4 = {
        "attention.sliding_window": 512,
        "attention.sliding_window_pattern": [1, 1, 0, 1],
        "attention.key_length_swa": 8,
        "attention.value_length_swa": 8,
    }
    with pytest.raises(UnsupportedError, match=r"layers 2\.\.3 reuse"):
        _spec(tmp_path, "gemma4", 4, **g4, **{"attention.shared_kv_layers": 2})
    # without reuse: an iSWA model whose SWA layers have their own head size
    spec = _spec(tmp_path, "gemma4", 4, **g4, **{"rope.freq_base": 1e6})
    assert _slides(spec) == [True, True, False, True]
    assert [lay.n_embd_head_k for lay in spec.layers] == [8, 8, 16, 8]
    assert _bases(spec) == [10000.0, 10000.0, 1e6, 10000.0]
    spec = _spec(tmp_path, "gemma3n", 6, **{"attention.sliding_window": 512})
    assert _slides(spec) == [True] * 4 + [False, True]  # pattern 5
    with pytest.raises(UnsupportedError, match="ctx_other"):
        _spec(tmp_path, "gemma4-assistant", 2)
    with pytest.raises(ConfigError, match="key_length_swa"):
        _spec(tmp_path, "gemma4", 4, **{k: v for k, v in g4.items() if "key_length" not in k})


# --------------------------------------------------------------------------------------
# llama4: chunked
# --------------------------------------------------------------------------------------


def test_llama4_chunks_of_8192_unless_the_window_is_zero(tmp_path: Path) -> None:
    kv = {"rope.freq_base": 500000.0}
    # no window key, or any window but 0: chunks of 8192, pattern 4 (3 chunked, 1 full)
    for extra in ({}, {"attention.sliding_window": 16}):
        spec = _spec(tmp_path, "llama4", 5, **kv, **extra)
        assert (spec.n_swa, spec.swa_type) == (8192, SWAType.CHUNKED)
        assert _slides(spec) == [True, True, True, False, True]
        # the SWA base defaults to the full one
        assert _bases(spec) == [500000.0] * 5
        assert spec.layers[0].rope is not None and spec.layers[0].rope.rope_type == RopeType.NORM
    spec = _spec(tmp_path, "llama4", 4, **kv, **{"rope.freq_base_swa": 1000.0})
    assert _bases(spec) == [1000.0, 1000.0, 1000.0, 500000.0]
    spec = _spec(tmp_path, "llama4", 4, **{"attention.sliding_window": 0})
    assert (spec.n_swa, spec.swa_type) == (0, SWAType.NONE) and not any(_slides(spec))
    plan = plan_memory(
        _spec(tmp_path, "llama4", 4), ContextParams(n_ctx=4096, n_seq_max=2, swa_full=False)
    )
    assert plan.type == "kv_cache_iswa"
    assert plan.parts[1].swa_type == SWAType.CHUNKED and plan.parts[1].n_swa == 8192


def test_n_rot_must_equal_the_head_for_llama_deci_falcon_llama_embed_only(tmp_path: Path) -> None:
    # llama_model_base::load_hparams checks n_rot for llama, deci, falcon and llama-embed;
    # llama4 is not in that list (its graph asserts instead)
    spec = _spec(tmp_path, "llama4", 4, **{"rope.dimension_count": 8})
    assert spec.layers[0].rope is not None and spec.layers[0].rope.n_rot == 8
    with pytest.raises(ConfigError, match="invalid n_rot"):
        _spec(tmp_path, "llama", 2, **{"rope.dimension_count": 8})


# --------------------------------------------------------------------------------------
# standard windows with a pattern period
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "n_layer", "slides", "rope_type"),
    [
        # period 4, the dense layer last in each group
        ("cohere2", 5, [True, True, True, False, True], RopeType.NORM),
        ("exaone-moe", 5, [True, True, True, False, True], RopeType.NEOX),
        ("olmo2", 5, [True, True, True, False, True], RopeType.NEOX),
        ("afmoe", 5, [True, True, True, False, True], RopeType.NEOX),
        ("mellum", 5, [True, True, True, False, True], RopeType.NEOX),
        ("muse-glimmer", 5, [True, True, True, False, True], RopeType.NORM),
        # period 4, dense first
        ("cohere2moe", 5, [False, True, True, True, False], RopeType.NORM),
        ("laguna", 5, [False, True, True, True, False], RopeType.NEOX),
        # period 2 (gpt-oss) and 8 (plamo3)
        ("gpt-oss", 3, [True, False, True], RopeType.NEOX),
        ("plamo3", 9, [True] * 7 + [False, True], RopeType.NEOX),
    ],
)
def test_default_patterns(
    tmp_path: Path, arch: str, n_layer: int, slides: list[bool], rope_type: RopeType
) -> None:
    spec = _spec(tmp_path, arch, n_layer, **{"attention.sliding_window": 128})
    assert _slides(spec) == slides
    assert (spec.n_swa, spec.swa_type) == (128, SWAType.STANDARD)
    assert spec.layers[0].rope is not None and spec.layers[0].rope.rope_type == rope_type
    # the pattern key overrides the period
    spec = _spec(
        tmp_path,
        arch,
        3,
        **{"attention.sliding_window": 128, "attention.sliding_window_pattern": [0, 1, 0]},
    )
    assert _slides(spec) == [False, True, False]


@pytest.mark.parametrize(
    ("arch", "swa_base", "swa_scale"),
    [
        # rope.freq_base_swa defaults to the full base; the SWA scale to the full one
        ("cohere2", 1e6, 0.25),
        ("cohere2moe", 1e6, 0.25),
        ("gpt-oss", 1e6, 0.25),
        ("exaone-moe", 1e6, 0.25),
        ("afmoe", 1e6, 0.25),
        ("mellum", 1e6, 0.25),
        ("spark2_5", 1e6, 0.25),
        ("maple", 1e6, 0.25),
        # the SWA scale stays 1 (olmo2, laguna: plain RoPE on SWA layers; muse-glimmer: unset)
        ("olmo2", 1e6, 1.0),
        ("laguna", 1e6, 1.0),
        ("muse-glimmer", 1e6, 1.0),
        # the SWA base defaults to 10000, not to the full base
        ("plamo3", 10000.0, 1.0),
        ("mimo2", 10000.0, 1.0),
        ("step35", 10000.0, 1.0),
        ("granite_swa", 10000.0, 1.0),
    ],
)
def test_swa_rope_defaults(tmp_path: Path, arch: str, swa_base: float, swa_scale: float) -> None:
    kv = {
        "attention.sliding_window": 64,
        "attention.sliding_window_pattern": [True, False],
        "rope.freq_base": 1e6,
        "rope.scaling.factor": 4.0,
    }
    spec = _spec(tmp_path, arch, 2, **kv)
    swa, full = spec.layers[0].rope, spec.layers[1].rope
    assert swa is not None and full is not None
    assert (swa.freq_base, swa.freq_scale) == (swa_base, swa_scale)
    assert (full.freq_base, full.freq_scale) == (1e6, 0.25)
    spec = _spec(tmp_path, arch, 2, **kv, **{"rope.freq_base_swa": 5000.0})
    # granite_swa never reads rope.freq_base_swa
    want = 10000.0 if arch == "granite_swa" else 5000.0
    assert spec.layers[0].rope is not None and spec.layers[0].rope.freq_base == want


@pytest.mark.parametrize("arch", ["olmo2", "afmoe", "mellum", "laguna", "plamo3", "smallthinker"])
def test_no_window_or_zero_is_a_plain_kv_cache(tmp_path: Path, arch: str) -> None:
    for extra in ({}, {"attention.sliding_window": 0}):
        spec = _spec(tmp_path, arch, 4, **extra)
        assert (spec.n_swa, spec.swa_type) == (0, SWAType.NONE) and not any(_slides(spec))
        assert plan_memory(spec, ContextParams()).type == "kv_cache"


@pytest.mark.parametrize(
    "arch", ["cohere2", "cohere2moe", "gpt-oss", "exaone-moe", "muse-glimmer", "mimo2", "step35"]
)
def test_required_window(tmp_path: Path, arch: str) -> None:
    kv = {"attention.sliding_window_pattern": [True, False]}
    with pytest.raises(ConfigError, match=r"attention\.sliding_window"):
        _spec(tmp_path, arch, 2, **kv)


@pytest.mark.parametrize("arch", ["granite_swa", "mimo2", "step35", "spark2_5", "maple"])
def test_required_pattern_array(tmp_path: Path, arch: str) -> None:
    spec = _spec(
        tmp_path,
        arch,
        4,
        **{"attention.sliding_window": 32, "attention.sliding_window_pattern": [1, 0, 1]},
    )
    # entries past the array keep their 0 (full)
    assert _slides(spec) == [True, False, True, False]
    assert (spec.n_swa, spec.swa_type) == (32, SWAType.STANDARD)
    for pattern in ({}, {"attention.sliding_window_pattern": 2}):
        with pytest.raises(ConfigError, match="sliding_window_pattern"):
            _spec(tmp_path, arch, 2, **{"attention.sliding_window": 32}, **pattern)


def test_smallthinker_window_is_4096_dense_first(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "smallthinker", 5, **{"attention.sliding_window": 16})
    assert (spec.n_swa, spec.swa_type) == (4096, SWAType.STANDARD)
    assert _slides(spec) == [False, True, True, True, False]


def test_step35_halves_the_full_layers_rotation(tmp_path: Path) -> None:
    kv = {"attention.sliding_window": 32, "attention.sliding_window_pattern": [1, 0]}
    spec = _spec(tmp_path, "step35", 2, **kv)
    swa, full = spec.layers[0].rope, spec.layers[1].rope
    assert swa is not None and full is not None
    assert (swa.n_rot, full.n_rot) == (16, 8)  # head 16
    assert not spec.kv_shiftable


def test_granite_swa_rope_pattern(tmp_path: Path) -> None:
    kv = {
        "attention.sliding_window": 32,
        "attention.sliding_window_pattern": [1, 0, 1, 0],
        "attention.rope_pattern": [True, False],
    }
    spec = _spec(tmp_path, "granite_swa", 4, **kv)
    # entries past the rope pattern keep their 1 (RoPE on)
    assert [lay.rope is not None for lay in spec.layers] == [True, False, True, True]


# --------------------------------------------------------------------------------------
# windows the reference reads and does not use
# --------------------------------------------------------------------------------------


def test_phi3_window_is_switched_off(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "phi3", 4, **{"attention.sliding_window": 2048})
    assert (spec.n_swa, spec.swa_type) == (0, SWAType.NONE) and not any(_slides(spec))


def test_exaone4_slides_only_with_64_layers(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "exaone4", 4, **{"attention.sliding_window": 128})
    # swa_type NONE, but n_swa keeps the key (the plain KV cache is given it)
    assert (spec.n_swa, spec.swa_type) == (128, SWAType.NONE) and not any(_slides(spec))
    assert plan_memory(spec, ContextParams()).parts[0].n_swa == 128
    spec = _spec(tmp_path, "exaone4", 64, **{"rope.freq_base": 1e6})
    assert (spec.n_swa, spec.swa_type) == (4096, SWAType.STANDARD)
    assert _slides(spec) == [True, True, True, False] * 16
    assert _bases(spec)[:4] == [1e6] * 4
    spec = _spec(tmp_path, "exaone4", 64, **{"attention.sliding_window": 128})
    assert spec.n_swa == 128


# --------------------------------------------------------------------------------------
# dense architectures
# --------------------------------------------------------------------------------------


_DENSE = {
    RopeType.NEOX: [
        "qwen2moe", "qwen3moe", "phi2", "phimoe", "olmoe", "phi3", "exaone4", "gemma",
        "starcoder2", "stablelm", "qwen", "hunyuan-dense", "seed_oss", "apertus", "exaone",
        "dbrx", "orion", "codeshell", "nemotron", "bitnet", "gptneox", "falcon", "jais2",
        "openelm",
    ],
    RopeType.NORM: [
        "command-r", "olmo", "internlm2", "minicpm", "granite", "granitemoe", "smollm3",
        "arcee", "xverse", "starcoder",
    ],
    RopeType.NONE: ["gpt2", "mpt", "jais"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "rope_type"), [(a, rt) for rt, archs in _DENSE.items() for a in archs]
)
def test_dense_archs_are_plain_kv_caches(tmp_path: Path, arch: str, rope_type: RopeType) -> None:
    spec = _spec(tmp_path, arch, 3)
    assert spec.swa_type == SWAType.NONE and not any(_slides(spec))
    if rope_type == RopeType.NONE:
        assert all(lay.rope is None for lay in spec.layers)
    else:
        assert all(lay.rope is not None and lay.rope.rope_type == rope_type for lay in spec.layers)
    assert [lay.n_embd_k_gqa for lay in spec.layers] == [32] * 3  # 2 KV heads of 16
    assert plan_memory(spec, ContextParams()).type == "kv_cache"


def test_granite_rope_switch_and_alibi(tmp_path: Path) -> None:
    # granite: rope.scaling.finetuned = false turns RoPE off on every layer (default on)
    spec = _spec(tmp_path, "granite", 2, **{"rope.scaling.finetuned": False})
    assert all(lay.rope is None for lay in spec.layers)
    assert all(lay.rope is not None for lay in _spec(tmp_path, "granite", 2).layers)
    # mpt / jais: ALiBi when attention.max_alibi_bias > 0
    assert _spec(tmp_path, "mpt", 2, **{"attention.max_alibi_bias": 8.0}).use_alibi
    assert not _spec(tmp_path, "jais", 2).use_alibi
    # falcon is one of the archs whose n_rot must equal the head size
    with pytest.raises(ConfigError, match="invalid n_rot"):
        _spec(tmp_path, "falcon", 2, **{"rope.dimension_count": 8})
