"""The Mamba family's GGUF rules (pymem/gguf_spec/arch_ssm.py).

Pins, per architecture, what the reference's ``load_arch_hparams`` decides for memory:
which layers recur, the conv / SSM state widths, the head sizes and RoPE of the attention
layers, and which keys are required; and, for every run recorded with
tests/record/family_ssm.py, that the factory's plan (and the memory it builds) is exactly
what the reference built. The metadata-level tests write GGUF files with only the keys (no
tensors), for layouts the recordings cannot show (the reference hangs on them, or no
converter writes them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from pymem.errors import ConfigError
from pymem.factory import ContextParams, create_memory, plan_memory
from pymem.gguf_spec import RULES, spec_from_gguf
from pymem.runtime.describe import describe_memory, describe_plan
from pymem.spec import ModelSpec, RopeType

sys.path.insert(0, str(Path(__file__).parent / "record"))
import family_ssm
from test_factory import write_gguf

DATA = Path(__file__).parent / "data"

# n_embd 64; a Mamba-2 mixer of d_inner 128 (4 heads of 32), 2 groups of d_state 16
SSM: dict[str, Any] = {
    "context_length": 4096,
    "embedding_length": 64,
    "attention.layer_norm_rms_epsilon": 1e-5,
    "ssm.conv_kernel": 4,
    "ssm.inner_size": 128,
    "ssm.state_size": 16,
    "ssm.time_step_rank": 4,
    "ssm.group_count": 2,
}
N_EMBD_R = 3 * (128 + 2 * 2 * 16)  # (d_conv - 1) * (d_inner + 2 * n_group * d_state)
N_EMBD_S = 16 * 128  # d_state * d_inner


def _spec(tmp_path: Path, arch: str, **kv: Any) -> ModelSpec:
    return spec_from_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch, {**SSM, **kv}))


def _parts(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    plan = plan_memory(spec, ContextParams(n_ctx=256, n_seq_max=2, kv_unified=True))
    return {p.name: p.layers for p in plan.parts}


# --------------------------------------------------------------------------------------
# recorded runs: the plan equals what the reference built
# --------------------------------------------------------------------------------------

RECORDED = sorted(r.name for r in family_ssm.RUNS if (DATA / "runs" / f"{r.name}.json").exists())


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
    # llama_model_rope_type of the file
    assert int(RULES[d["memory"]["arch"]].rope_type) == d["model_info"]["rope_type"]


def test_every_run_is_recorded() -> None:
    assert len(RECORDED) == len(family_ssm.RUNS)


# --------------------------------------------------------------------------------------
# metadata-level rules
# --------------------------------------------------------------------------------------


def test_mamba2_conv_covers_x_b_and_c(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "mamba2", block_count=2)
    assert [lay.recurrent for lay in spec.layers] == [True, True]
    assert (spec.layers[0].n_embd_r, spec.layers[0].n_embd_s) == (N_EMBD_R, N_EMBD_S)
    assert _parts(spec) == {"recr": (0, 1)}


def test_nemotron_h_layer_kinds(tmp_path: Path) -> None:
    # recurrent (no KV heads, no FFN), attention (KV heads, no FFN), FFN-only (an FFN
    # length, whatever its KV heads): the FFN layers are in neither memory part
    spec = _spec(
        tmp_path,
        "nemotron_h",
        block_count=5,
        **{
            "attention.layer_norm_epsilon": 1e-5,
            "attention.head_count": 2,
            "attention.head_count_kv": [0, 1, 0, 0, 1],
            "feed_forward_length": [0, 0, 96, 0, 96],
        },
    )
    assert [lay.recurrent for lay in spec.layers] == [True, False, False, True, False]
    assert spec.layers[1].n_embd_k_gqa == 32 and spec.layers[1].rope is None  # rope none
    assert _parts(spec) == {"attn": (1,), "recr": (0, 3)}


def test_nemotron_h_moe_nextn_block_never_recurs(tmp_path: Path) -> None:
    kv = {
        "block_count": 4,
        "nextn_predict_layers": 1,
        "attention.layer_norm_epsilon": 1e-5,
        "attention.head_count": 2,
    }
    # as the converter writes it (KV heads and an FFN length): in neither part
    spec = _spec(
        tmp_path,
        "nemotron_h_moe",
        **kv,
        **{"attention.head_count_kv": [0, 1, 0, 1], "feed_forward_length": [0, 0, 64, 64]},
    )
    assert [lay.recurrent for lay in spec.layers] == [True, False, False, False]
    assert _parts(spec) == {"attn": (1,), "recr": (0,)}
    # without KV heads or FFN it still does not recur (trunk layers only), and
    # create_memory's attention filter (not recurrent, no FFN) then takes it: the filter
    # has no trunk bound for Nemotron-H
    spec = _spec(
        tmp_path,
        "nemotron_h_moe",
        **kv,
        **{"attention.head_count_kv": [0, 1, 0, 0], "feed_forward_length": [0, 0, 64, 0]},
    )
    assert [lay.recurrent for lay in spec.layers] == [True, False, False, False]
    assert _parts(spec) == {"attn": (1, 3), "recr": (0,)}


def test_plamo2_head_sizes_after_a_headless_first_layer(tmp_path: Path) -> None:
    # convert_hf_to_gguf's layout: per-layer head counts, 0 on the Mamba layers (layer 0
    # included). The general keys then give no head size and n_rot 0; PLaMo-2's loader
    # re-reads key_length / value_length but not n_rot.
    spec = _spec(
        tmp_path,
        "plamo2",
        block_count=4,
        **{
            "ssm.group_count": 0,
            "attention.head_count": [0, 4, 0, 4],
            "attention.head_count_kv": [0, 2, 0, 2],
            "attention.key_length": 32,
            "attention.value_length": 32,
        },
    )
    assert [lay.recurrent for lay in spec.layers] == [True, False, True, False]
    att = spec.layers[1]
    assert (att.n_embd_head_k, att.n_embd_head_v, att.n_embd_k_gqa) == (32, 32, 64)
    assert att.rope is not None and (att.rope.rope_type, att.rope.n_rot) == (RopeType.NEOX, 0)
    assert spec.layers[0].n_embd_r == 3 * 128  # no groups: the conv covers x only
    assert _parts(spec) == {"attn": (1, 3), "recr": (0, 2)}


def test_falcon_h1_nextn_layers_recur_too(tmp_path: Path) -> None:
    # load_arch_hparams fills is_recr for every layer, NextN ones included, and
    # create_memory's filters take every layer into both parts
    spec = _spec(
        tmp_path,
        "falcon-h1",
        block_count=3,
        nextn_predict_layers=1,
        **{"attention.head_count": 4, "attention.head_count_kv": 2},
    )
    assert [lay.recurrent for lay in spec.layers] == [True, True, True]
    assert _parts(spec) == {"attn": (0, 1, 2), "recr": (0, 1, 2)}


@pytest.mark.parametrize(
    "arch", ["mamba2", "granitehybrid", "falcon-h1", "nemotron_h", "nemotron_h_moe", "plamo2"]
)
def test_group_count_is_required(arch: str, tmp_path: Path) -> None:
    kv = {k: v for k, v in SSM.items() if k != "ssm.group_count"}
    path = write_gguf(tmp_path / "m.gguf", arch, {**kv, "block_count": 2})
    with pytest.raises(ConfigError, match=rf"key not found in model: {arch}\.ssm\.group_count"):
        spec_from_gguf(path)


@pytest.mark.parametrize("arch", ["mamba", "jamba"])
def test_mamba1_archs_do_not_read_group_count(arch: str, tmp_path: Path) -> None:
    spec = _spec(tmp_path, arch, block_count=2)
    assert spec.layers[0].n_embd_r == 3 * 128  # n_group stays 0


def test_ssm_key_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf", "nemotron_h", {**SSM, "block_count": 2, "ssm.state_size": ("i32", 16)}
    )
    with pytest.raises(ConfigError, match=r"nemotron_h\.ssm\.state_size has wrong type i32"):
        spec_from_gguf(path)
