"""LongRoPE (Phi-3-*-128k): ``rope_factors_long`` / ``rope_factors_short`` chosen by the
context's cells per sequence, as ``llama_model::get_rope_factors`` chooses them.

The recorded llama.cpp runs ``phi3-longrope.short.fa1.u1`` (256 cells per sequence, under
the model's original 384: short factors) and ``phi3-longrope.long.fa0.u0`` (512: long)
replay bit for bit through the engine and the memory (K-shift included) in
tests/test_gguf_llama.py and tests/test_replay_runs.py. Here: which factors each context
takes, that a file missing the chosen ones rotates without factors, as the reference
does, and the clear error where the context is unknown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pymem.errors import UnsupportedError
from pymem.factory import build_from_plan, plan_memory
from pymem.runtime.gguf_llama import GGUFWeights

sys.path.insert(0, str(Path(__file__).parent / "record"))
import family_attention
from test_gguf_attention_moe import _first_decode

DATA = Path(__file__).parent / "data"
MODEL = DATA / "models" / "tiny-phi3-longrope.gguf"
SHORT, LONG = "phi3-longrope.short.fa1.u1", "phi3-longrope.long.fa0.u0"
FACTORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _run(name: str) -> dict:
    return json.loads((DATA / "runs" / f"{name}.json").read_text())


def _factors_asked(monkeypatch: pytest.MonkeyPatch, run: str, path: Path = MODEL) -> set[str]:
    asked: list[str] = []
    real = GGUFWeights.get

    def get(self: GGUFWeights, name: str, required: bool = True):
        asked.append(name)
        return real(self, name, required)

    with monkeypatch.context() as m:
        m.setattr(GGUFWeights, "get", get)
        _first_decode(path, run)
    return {n for n in asked if n in FACTORS}


def test_recorded_contexts_take_short_and_long_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    orig = family_attention.PHI3_LONGROPE_ORIG_CTX
    assert _run(SHORT)["memory"]["n_ctx_seq"] <= orig < _run(LONG)["memory"]["n_ctx_seq"]
    assert _factors_asked(monkeypatch, SHORT) == {"rope_factors_short.weight"}
    assert _factors_asked(monkeypatch, LONG) == {"rope_factors_long.weight"}


def _without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop: tuple[str, ...]) -> Path:
    """The LongRoPE model written again without the ``drop`` tensors."""
    import gguf

    real = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, *a, **k):  # type: ignore[no-untyped-def]
        if name not in drop:
            real(self, name, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
        return family_attention.write_phi3_longrope(tmp_path / ("-".join(drop) + ".gguf"))


def test_a_missing_factor_tensor_means_no_factors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the reference's get_rope_factors returns the chosen tensor or NULL: a file with long
    # factors only rotates a short context without factors, like a file with none
    long_only = _without(tmp_path, monkeypatch, ("rope_factors_short.weight",))
    plain = _without(tmp_path, monkeypatch, FACTORS[1:])
    assert _factors_asked(monkeypatch, SHORT, long_only) == {"rope_factors_short.weight"}
    np.testing.assert_array_equal(_first_decode(long_only, SHORT), _first_decode(plain, SHORT))
    # and the long context does use them: other logits
    assert not np.array_equal(_first_decode(long_only, LONG), _first_decode(plain, LONG))
    assert not np.array_equal(_first_decode(MODEL, SHORT), _first_decode(plain, SHORT))
    # short factors alone: a long context rotates without factors
    short_only = _without(tmp_path, monkeypatch, ("rope_factors_long.weight",))
    assert _factors_asked(monkeypatch, LONG, short_only) == {"rope_factors_long.weight"}
    np.testing.assert_array_equal(_first_decode(short_only, LONG), _first_decode(plain, LONG))
    assert not np.array_equal(_first_decode(short_only, SHORT), _first_decode(plain, SHORT))


def test_unknown_context_is_refused_by_name() -> None:
    # a memory built without create_memory has no plan: the engine cannot pick the factors
    def bare(spec, params):  # type: ignore[no-untyped-def]
        return build_from_plan(plan_memory(spec, params))

    with pytest.raises(UnsupportedError, match="n_ctx_seq"):
        _first_decode(MODEL, SHORT, memory_of=bare)
