"""The GGUF engine's Mamba-2 family (pymem/runtime/graph_ssm2.py) refuses what it does not build.

The recorded runs (mamba2.*, granitehybrid*.*, falcon-h1.*, nemotron_h.*) replay through
the engine in tests/test_gguf_llama.py. Here: a layer the engine would build wrongly by
ignoring a tensor (a MoE router, a Q bias) raises UnsupportedError naming the layer,
instead of decoding different numbers. The models are the recorded tiny ones, written
again by their writers with one tensor more.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pymem.batch import Batch
from pymem.errors import ConfigError, UnsupportedError
from pymem.factory import ContextParams, create_memory
from pymem.runtime.decoder import Decoder
from pymem.runtime.gguf_llama import SUPPORTED, GGUFModel

sys.path.insert(0, str(Path(__file__).parent / "record"))
import family_ssm
import models

RUNS = Path(__file__).parent / "data" / "runs"


def _write_with(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    writer: Callable[[Path], Path],
    extra: dict[str, tuple[int, ...]],
) -> Path:
    """The writer's model plus the ``extra`` tensors (name -> ggml shape), zeros."""
    finish = models._Model.finish

    def finish_with_extra(self: models._Model) -> None:
        for name, ne in extra.items():
            self.w.add_tensor(name, np.zeros(tuple(reversed(ne)), np.float32))
        finish(self)

    monkeypatch.setattr(models._Model, "finish", finish_with_extra)
    return writer(tmp_path / "model.gguf")


def _first_decode(path: Path, run: str) -> None:
    """Decode the first batch of a recorded run with the model at ``path``."""
    data = json.loads((RUNS / f"{run}.json").read_text())
    step = next(s for s in data["steps"] if s["op"] == "decode")
    params = data["context_params"]
    with GGUFModel(path) as model:
        mem = create_memory(model.spec, ContextParams.from_dict(params))
        assert mem is not None
        try:
            dec = Decoder(model, mem, n_seq_max=params["n_seq_max"], n_ubatch=params["n_ubatch"],
                          flash_attn=params["flash_attn"])  # fmt: skip
            dec.decode(Batch.from_items(step["items"]))
        finally:
            mem.close()


def test_family_is_registered() -> None:
    assert {"mamba2", "granitehybrid", "falcon-h1", "nemotron_h"} <= set(SUPPORTED)


def test_unchanged_model_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the writer's model with no extra tensor decodes."""
    path = _write_with(tmp_path, monkeypatch, family_ssm.write_granitehybrid, {})
    _first_decode(path, "granitehybrid.main.fa1.u1")


# (writer, recorded run, extra tensors, error)
CASES = {
    "granite-moe": (
        family_ssm.write_granitehybrid,
        "granitehybrid.main.fa1.u1",
        {"blk.1.ffn_gate_inp.weight": (8, 4)},
        r"layer 1: MoE feed-forward",
    ),
    "granite-q-bias": (
        family_ssm.write_granitehybrid,
        "granitehybrid.main.fa1.u1",
        {"blk.1.attn_q.bias": (8,)},
        r"layer 1: .*attn_q\.bias",
    ),
    # the MoE refusal wins over the other unbuilt tensors of the layer
    "granite-moe-and-ffn-bias": (
        family_ssm.write_granitehybrid,
        "granitehybrid.main.fa1.u1",
        {"blk.1.ffn_gate_inp.weight": (8, 4), "blk.1.ffn_up.bias": (16,)},
        r"layer 1: MoE feed-forward",
    ),
    # one model-wide tensor, refused at the first attention layer
    "granite-rope-freqs": (
        family_ssm.write_granitehybrid,
        "granitehybrid.main.fa1.u1",
        {"rope_freqs.weight": (2,)},
        r"layer 1: .*rope_freqs\.weight",
    ),
    "falcon-ffn-bias": (
        family_ssm.write_falcon_h1,
        "falcon-h1.main.fa1.u1",
        {"blk.0.ffn_up.bias": (16,)},
        r"layer 0: .*ffn_up\.bias",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unbuilt_tensors_are_refused(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, run, extra, error = CASES[case]
    path = _write_with(tmp_path, monkeypatch, writer, extra)
    with pytest.raises(UnsupportedError, match=error):
        _first_decode(path, run)


def test_nemotron_router_without_expert_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nemotron-H's MoE layers are built (graph_attention's moe_ffn; the nemotron_h_moe
    runs check them), but a router in a file without ``expert_count`` is a broken file
    (the reference's loader makes MoE layers only when n_expert != 0): ConfigError."""
    path = _write_with(
        tmp_path, monkeypatch, family_ssm.write_nemotron_h, {"blk.3.ffn_gate_inp.weight": (8, 4)}
    )
    with pytest.raises(ConfigError, match=r"layer 3 has MoE tensors.*expert_count"):
        _first_decode(path, "nemotron_h.main.fa1.u1")
