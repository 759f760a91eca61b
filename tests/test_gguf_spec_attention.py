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

from pymem.errors import UnsupportedError
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


def test_unsupported_attention_arch_says_why(tmp_path: Path) -> None:
    for arch in ("gemma3n", "gemma4"):
        with pytest.raises(UnsupportedError, match="reuse"):
            _spec(tmp_path, arch, 2)
