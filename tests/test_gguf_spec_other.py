"""The short-conv and RWKV GGUF rules (pymem/gguf_spec/arch_other.py).

Pins, per architecture, what the reference's ``load_arch_hparams`` decides for memory:
which layers recur, the short-conv / token-shift / WKV state widths, the sliding window
(lfm2 only: lfm2moe reads none) and the RoPE type; and, for every run recorded with
tests/record/family_other.py, that the factory's plan (and the memory it builds) is exactly
what the reference built. The metadata-level tests write GGUF files with only the keys.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from pymem.errors import ConfigError
from pymem.factory import ContextParams, create_memory, plan_memory
from pymem.gguf_spec import hparams_from_gguf, spec_from_gguf
from pymem.runtime.describe import describe_memory, describe_plan
from pymem.spec import RopeType, SWAType

sys.path.insert(0, str(Path(__file__).parent / "record"))
import family_other
from test_factory import write_gguf

DATA = Path(__file__).parent / "data"

# n_embd 64 unless a test says otherwise
BASE: dict[str, Any] = {
    "context_length": 4096,
    "embedding_length": 64,
    "attention.layer_norm_rms_epsilon": 1e-5,
}


# --------------------------------------------------------------------------------------
# recorded runs: the plan equals what the reference built
# --------------------------------------------------------------------------------------

RECORDED = sorted(r.name for r in family_other.RUNS if (DATA / "runs" / f"{r.name}.json").exists())


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
    assert len(RECORDED) == len(family_other.RUNS)


# --------------------------------------------------------------------------------------
# short-conv: lfm2 and lfm2moe
# --------------------------------------------------------------------------------------


def _lfm2_keys(**kv: Any) -> dict[str, Any]:
    return {
        **BASE,
        "block_count": 4,
        "attention.head_count": 4,
        "attention.head_count_kv": [0, 2, 0, 2],
        "shortconv.l_cache": 3,
        **kv,
    }


@pytest.mark.parametrize("arch", ["lfm2", "lfm2moe"])
def test_shortconv_layers_recur_where_no_kv_heads(arch: str, tmp_path: Path) -> None:
    hp = hparams_from_gguf(write_gguf(tmp_path / "m.gguf", arch, _lfm2_keys()))
    assert hp.is_recr == (True, False, True, False)
    assert hp.rope_type == RopeType.NEOX
    # R rows: n_embd * (l_cache - 1); no S state
    assert (hp.n_embd_r(), hp.n_embd_s()) == (128, 0)
    assert hp.is_swa == (False,) * 4 and hp.swa_type == SWAType.NONE


def test_lfm2_window_slides_every_attention_layer(tmp_path: Path) -> None:
    keys = _lfm2_keys(**{"attention.sliding_window": 8})
    hp = hparams_from_gguf(write_gguf(tmp_path / "m.gguf", "lfm2", keys))
    assert hp.is_swa == (False, True, False, True)
    assert (hp.swa_type, hp.n_swa) == (SWAType.STANDARD, 8)
    # a window of 0 is no window
    keys = _lfm2_keys(**{"attention.sliding_window": 0})
    hp = hparams_from_gguf(write_gguf(tmp_path / "m0.gguf", "lfm2", keys))
    assert hp.swa_type == SWAType.NONE and not any(hp.is_swa)


def test_lfm2moe_ignores_a_sliding_window(tmp_path: Path) -> None:
    # llama_model_lfm2moe::load_arch_hparams reads no window: the memory stays a plain hybrid
    keys = _lfm2_keys(**{"attention.sliding_window": 8})
    hp = hparams_from_gguf(write_gguf(tmp_path / "m.gguf", "lfm2moe", keys))
    assert hp.swa_type == SWAType.NONE and hp.n_swa == 0 and not any(hp.is_swa)


def test_shortconv_requires_l_cache(tmp_path: Path) -> None:
    keys = _lfm2_keys()
    del keys["shortconv.l_cache"]
    for arch in ("lfm2", "lfm2moe"):
        with pytest.raises(ConfigError, match=r"shortconv\.l_cache"):
            hparams_from_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch, keys))


# --------------------------------------------------------------------------------------
# RWKV: rwkv6, rwkv6qwen2, rwkv7, arwkv7
# --------------------------------------------------------------------------------------

RWKV_ARCHS = ["rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"]


def _rwkv_keys(**kv: Any) -> dict[str, Any]:
    # n_embd 64 in WKV heads of 16; no attention heads
    return {**BASE, "block_count": 3, "attention.head_count": 0, "wkv.head_size": 16, **kv}


@pytest.mark.parametrize("arch", RWKV_ARCHS)
def test_rwkv_every_layer_recurs_with_two_shifts_by_default(arch: str, tmp_path: Path) -> None:
    hp = hparams_from_gguf(write_gguf(tmp_path / "m.gguf", arch, _rwkv_keys()))
    assert hp.is_recr == (True, True, True) and hp.rope_type == RopeType.NONE
    # R: token_shift_count (2) * n_embd; S: n_embd * wkv.head_size
    assert (hp.n_embd_r(), hp.n_embd_s()) == (128, 1024)
    spec = spec_from_gguf(tmp_path / "m.gguf")
    assert spec.is_recurrent_arch and not spec.is_hybrid_arch
    plan = describe_plan(plan_memory(spec, ContextParams(n_ctx=256, n_seq_max=2)))
    assert plan["type"] == "recurrent"
    assert [p["kind"] for p in plan["parts"]] == ["recurrent"]


@pytest.mark.parametrize("arch", RWKV_ARCHS)
def test_rwkv_token_shift_count_sets_the_r_width(arch: str, tmp_path: Path) -> None:
    # the Qwen-based flavours (rwkv6qwen2, arwkv7) ship token_shift_count 1
    keys = _rwkv_keys(token_shift_count=1)
    hp = hparams_from_gguf(write_gguf(tmp_path / "m.gguf", arch, keys))
    assert (hp.n_embd_r(), hp.n_embd_s()) == (64, 1024)


@pytest.mark.parametrize("arch", RWKV_ARCHS)
def test_rwkv_requires_wkv_head_size(arch: str, tmp_path: Path) -> None:
    keys = _rwkv_keys()
    del keys["wkv.head_size"]
    with pytest.raises(ConfigError, match=r"wkv\.head_size"):
        hparams_from_gguf(write_gguf(tmp_path / "m.gguf", arch, keys))
