"""RoPE frequency factors reach the K-shift (llama_model::get_rope_factors).

Llama-3.1-style files carry ``rope_freqs.weight``; Phi-3-style ones long / short factors
chosen by the context length. A K-shift that ignored them rotated K by the wrong angles
without any error: the recorded runs llama-e8-rf.* (tests/test_gguf_llama.py) show the
decode after a shift differing by ~0.96 in the logits then. Here: what the spec reads, which
layers get the factors, and how the factory picks long or short.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from pymem.errors import ConfigError
from pymem.factory import ContextParams, plan_memory
from pymem.gguf_spec import spec_from_gguf
from pymem.spec import RopeSpec

MODELS = Path(__file__).resolve().parent / "data" / "models"


def _llama(
    path: Path, tensors: dict[str, np.ndarray], longrope: bool | None = None, arch: str = "llama"
) -> Path:
    """A tensor-light GGUF of ``arch`` (llama hparams): 2 layers, heads of 8 (4 rotated
    pairs), given tensors. ``rope.scaling.type`` longrope when ``longrope`` (by default:
    when the tensors hold long / short factors, the only way llama.cpp's llama loader
    takes them)."""
    if longrope is None:
        longrope = any(name.startswith("rope_factors_") for name in tensors)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"context_length": 4096, "embedding_length": 16, "block_count": 2,
                       "attention.head_count": 2, "attention.head_count_kv": 1}.items():  # fmt: skip
        w.add_uint32(f"{arch}.{key}", value)
    w.add_uint32(f"{arch}.rope.scaling.original_context_length", 512)
    if longrope:
        w.add_string(f"{arch}.rope.scaling.type", "longrope")
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_recorded_model_factors_reach_every_layer() -> None:
    spec = spec_from_gguf(MODELS / "tiny-llama-e8-rf.gguf")
    reader = gguf.GGUFReader(MODELS / "tiny-llama-e8-rf.gguf")
    want = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    for lay in spec.layers:
        assert lay.rope is not None
        assert lay.rope.freq_factors == tuple(float(x) for x in want)
    assert spec_from_gguf(MODELS / "tiny-llama-e8.gguf").layers[0].rope.freq_factors is None


def test_gemma4_factors_on_full_layers_only() -> None:
    spec = spec_from_gguf(MODELS / "tiny-gemma4.gguf")
    got = [(lay.swa, lay.rope.freq_factors is not None) for lay in spec.layers if lay.rope]
    assert got and all(has == (not swa) for swa, has in got)


def test_long_and_short_factors_follow_the_context(tmp_path: Path) -> None:
    short = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    long = np.array([5.0, 6.0, 7.0, 8.0], dtype=np.float32)
    path = _llama(
        tmp_path / "m.gguf", {"rope_factors_short.weight": short, "rope_factors_long.weight": long}
    )
    spec = spec_from_gguf(path)
    assert spec.layers[0].rope.freq_factors == (1.0, 2.0, 3.0, 4.0)
    assert spec.layers[0].rope.freq_factors_long == (5.0, 6.0, 7.0, 8.0)
    # n_ctx_seq 512 is within the original 512: short; 1024 is beyond it: long
    within = plan_memory(spec, ContextParams(n_ctx=512, n_seq_max=1)).spec
    beyond = plan_memory(spec, ContextParams(n_ctx=1024, n_seq_max=1)).spec
    assert within.layers[1].rope == RopeSpec(
        **{**vars(spec.layers[1].rope), "freq_factors_long": None}
    )
    assert beyond.layers[1].rope.freq_factors == (5.0, 6.0, 7.0, 8.0)
    assert beyond.layers[1].rope.freq_factors_long is None


def test_long_factors_alone_apply_beyond_the_original_context(tmp_path: Path) -> None:
    # get_rope_factors returns the (absent) short factors within n_ctx_orig: none at all
    path = _llama(tmp_path / "l.gguf", {"rope_factors_long.weight": np.full(4, 3.0, np.float32)})
    spec = spec_from_gguf(path)
    within = plan_memory(spec, ContextParams(n_ctx=512, n_seq_max=1)).spec
    beyond = plan_memory(spec, ContextParams(n_ctx=1024, n_seq_max=1)).spec
    assert within.layers[0].rope.freq_factors is None
    assert beyond.layers[0].rope.freq_factors == (3.0, 3.0, 3.0, 3.0)


def test_short_factors_alone_apply_within_the_original_context(tmp_path: Path) -> None:
    # and get_rope_factors returns the (absent) long factors beyond it: none at all
    path = _llama(tmp_path / "s.gguf", {"rope_factors_short.weight": np.full(4, 2.0, np.float32)})
    spec = spec_from_gguf(path)
    assert spec.layers[0].rope.freq_factors_long == ()
    within = plan_memory(spec, ContextParams(n_ctx=512, n_seq_max=1)).spec
    beyond = plan_memory(spec, ContextParams(n_ctx=1024, n_seq_max=1)).spec
    assert within.layers[0].rope.freq_factors == (2.0, 2.0, 2.0, 2.0)
    assert beyond.layers[0].rope.freq_factors is None
    assert beyond.layers[0].rope.freq_factors_long is None


@pytest.mark.parametrize("longrope", [False, True])
def test_factor_tensors_the_loader_does_not_create_are_refused(
    tmp_path: Path, longrope: bool
) -> None:
    # llama's loader creates rope_freqs, or long + short under longrope, never both: a file
    # holding the other kind fails to load in llama.cpp ("wrong number of tensors")
    ones = np.ones(4, dtype=np.float32)
    mixed = {"rope_freqs.weight": ones, "rope_factors_short.weight": ones,
             "rope_factors_long.weight": ones}  # fmt: skip
    stray = (
        r"rope_freqs\.weight"
        if longrope
        else r"rope_factors_long\.weight, rope_factors_short\.weight"
    )
    scaling = "longrope" if longrope else "linear"
    path = _llama(tmp_path / "m.gguf", mixed, longrope=longrope)
    with pytest.raises(
        ConfigError,
        match=rf"tensor\(s\) {stray}: llama\.cpp's 'llama' loader .*"
        rf"llama\.rope\.scaling\.type = '{scaling}'",
    ):
        spec_from_gguf(path)


def test_factor_tensors_of_fixed_loaders_are_refused(tmp_path: Path) -> None:
    # phi3 always takes long + short (never rope_freqs); an architecture whose loader
    # creates no factor tensor refuses every one
    ones = np.ones(4, dtype=np.float32)
    phi3 = _llama(tmp_path / "p.gguf", {"rope_freqs.weight": ones}, arch="phi3")
    with pytest.raises(
        ConfigError, match=r"rope_freqs\.weight: .*'phi3'.*creates: rope_factors_long"
    ):
        spec_from_gguf(phi3)
    qwen2 = _llama(tmp_path / "q.gguf", {"rope_freqs.weight": ones}, arch="qwen2")
    with pytest.raises(ConfigError, match=r"'qwen2' loader .*creates: none"):
        spec_from_gguf(qwen2)


def test_the_loaded_factor_tensors_per_architecture() -> None:
    from pymem.gguf_spec.hparams import rope_factor_tensors_loaded as loaded

    long_short = ("rope_factors_long.weight", "rope_factors_short.weight")
    assert loaded("llama", False) == ("rope_freqs.weight",)
    assert loaded("granite_swa", True) == long_short
    assert loaded("phi3", False) == loaded("phi3", True) == long_short
    assert loaded("llama4", True) == ("rope_freqs.weight",)
    assert loaded("gemma2", False) == ()


def test_bad_factors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rope\.freq_factors: 2 factors.*n_rot 8"):
        RopeSpec(n_rot=8, freq_factors=(1.0, 1.0))
    wrong = _llama(tmp_path / "q.gguf", {"rope_freqs.weight": np.ones(4, np.int32)})
    with pytest.raises(ConfigError, match=r"rope_freqs\.weight has type I32"):
        spec_from_gguf(wrong)
