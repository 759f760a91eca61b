"""The GGUF engine's attention family and MoE block (pymem/runtime/graph_attention.py)
refuse what they do not build.

The recorded runs of every architecture in :data:`MODELS` replay bit for bit
through the engine in tests/test_gguf_llama.py. Here:
a model the engine would decode wrongly by ignoring a tensor or key (per-expert scales,
expert groups, biases a graph does not add, fused QKV where the
graph reads separate projections, RoPE frequency factors, a fixed attention scale)
raises UnsupportedError naming it, before any state is written. The models are the
recorded tiny ones, written again by their writers with one tensor or key more.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pymem.batch import Batch
from pymem.errors import ConfigError, UnsupportedError
from pymem.factory import ContextParams, create_memory
from pymem.runtime.decoder import Decoder
from pymem.runtime.gguf_llama import SUPPORTED, GGUFModel

sys.path.insert(0, str(Path(__file__).parent / "record"))
import family_attention
import family_gemma3n
import family_moe
import family_other
import family_ssm
import models

RUNS = Path(__file__).parent / "data" / "runs"


def _write_with(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    writer: Callable[[Path], Path],
    extra: dict[str, tuple[int, ...]],
    keys: dict[str, int] | None = None,
) -> Path:
    """The writer's model plus the ``extra`` tensors (name -> ggml shape, zeros) and
    ``keys`` (``<key>`` after the arch prefix -> u32)."""
    finish = models._Model.finish

    def finish_with_extra(self: models._Model) -> None:
        for name, ne in extra.items():
            self.w.add_tensor(name, np.zeros(tuple(reversed(ne)), np.float32))
        for key, value in (keys or {}).items():
            self.u32(key, value)
        finish(self)

    monkeypatch.setattr(models._Model, "finish", finish_with_extra)
    return writer(tmp_path / "model.gguf")


def _first_decode(
    path: Path, run: str, memory_of: Callable[..., Any] = create_memory
) -> np.ndarray:
    """Decode the first batch of a recorded run with the model at ``path``; its logits.
    ``memory_of(spec, params)`` builds the memory (the factory's ``create_memory``)."""
    data = json.loads((RUNS / f"{run}.json").read_text())
    step = next(s for s in data["steps"] if s["op"] == "decode")
    params = data["context_params"]
    with GGUFModel(path) as model:
        mem = memory_of(model.spec, ContextParams.from_dict(params))
        assert mem is not None
        try:
            dec = Decoder(model, mem, n_seq_max=params["n_seq_max"], n_ubatch=params["n_ubatch"],
                          flash_attn=params["flash_attn"])  # fmt: skip
            return dec.decode(Batch.from_items(step["items"]))
        finally:
            mem.close()


# model -> (writer, a recorded run of it); the family_moe models are MoE variants
MODELS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "lfm2moe": (family_other.write_lfm2moe, "lfm2moe.main.fa1.u1"),
    "nemotron_h_moe": (family_ssm.write_nemotron_h_moe, "nemotron_h_moe.main.fa0.u1"),
    "qwen3moe": (family_attention.write_qwen3moe, "qwen3moe.main.fa1.u0"),
    "gpt-oss": (family_attention.write_openai_moe, "openai-moe.main.fa1.u1"),
    "cohere2": (family_attention.write_cohere2, "cohere2.main.fa1.u1"),
    "olmo2": (family_attention.write_olmo2, "olmo2.main.fa0.u1"),
    "phi3": (family_attention.write_phi3, "phi3.main.fa1.u1"),
    "llama4": (family_attention.write_llama4, "llama4.main.fa1.u1"),
    "exaone4": (family_attention.write_exaone4, "exaone4.main.fa0.u1"),
    "maple": (family_attention.write_maple, "maple.main.fa1.u0"),
    "gemma3n": (family_gemma3n.write_gemma3n, "gemma3n.main.fa1.u1"),
    "afmoe-moe": (family_moe.write_afmoe_moe, "afmoe-moe.main.fa1.u1"),
    "laguna-moe": (family_moe.write_laguna_moe, "laguna-moe.main.fa0.u1"),
    "exaone-moe-moe": (family_moe.write_exaone_moe_moe, "exaone-moe-moe.main.fa1.u0"),
    "cohere2moe-moe": (family_moe.write_cohere2moe_moe, "cohere2moe-moe.main.fa1.u1"),
    "mimo2-moe": (family_moe.write_mimo2_moe, "mimo2-moe.main.fa0.u1"),
    "step35-moe": (family_moe.write_step35_moe, "step35-moe.noshift.fa1.u1"),
    "granite-swa-moe": (family_moe.write_granite_swa_moe, "granite-swa-moe.main.fa0.u1"),
    "gemma4-moe": (family_moe.write_gemma4_moe, "gemma4-moe.noshift.fa1.u1"),
    "cohere2moe": (family_attention.write_cohere2moe, "cohere2moe.main.fa0.u1"),
    "exaone-moe": (family_attention.write_exaone_moe, "exaone-moe.main.fa1.u1"),
    "smallthinker": (family_attention.write_smallthinker, "smallthinker.main.fa1.u1"),
    "mellum": (family_attention.write_mellum, "mellum.main.fa1.u1"),
    "granite_swa": (family_attention.write_granite_swa, "granite-swa.main.fa1.u1"),
    "mimo2": (family_attention.write_mimo2, "mimo2.main.fa0.u1"),
    "afmoe": (family_attention.write_afmoe, "afmoe.main.fa1.u1"),
    "muse-glimmer": (family_attention.write_muse_glimmer, "muse-glimmer.main.fa0.u1"),
    "spark2_5": (family_attention.write_spark2_5, "spark2-5.main.fa0.u1"),
    "plamo3": (family_attention.write_plamo3, "plamo3.main.fa1.u0"),
    "laguna": (family_attention.write_laguna, "laguna.main.fa0.u1"),
    "step35": (family_attention.write_step35, "step35.noshift.fa1.u1"),
    "gemma4": (family_attention.write_gemma4, "gemma4.main.fa0.u1"),
}


def test_family_is_registered() -> None:
    archs = {json.loads((RUNS / f"{run}.json").read_text())["memory"]["arch"] for _, run in
             MODELS.values()}  # fmt: skip
    assert archs <= set(SUPPORTED), sorted(archs - set(SUPPORTED))


@pytest.mark.parametrize("arch", list(MODELS), ids=list(MODELS))
def test_unchanged_model_decodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    """The control: the writer's model with nothing added decodes."""
    writer, run = MODELS[arch]
    _first_decode(_write_with(tmp_path, monkeypatch, writer, {}), run)


E = family_attention.N_EMBD  # 16 (lfm2moe's too); nemotron_h_moe: 8

# (arch, extra tensors, extra keys, error)
CASES = {
    "moe-expert-scale": (
        "lfm2moe", {"blk.1.ffn_up_exps.scale": (4,)}, {}, r"ffn_up_exps\.scale",
    ),
    "moe-expert-groups": (
        "lfm2moe", {}, {"expert_group_count": 2}, r"expert groups",
    ),
    "lfm2-ffn-bias": (
        "lfm2moe", {"blk.0.ffn_up.bias": (32,)}, {}, r"ffn_up\.bias",
    ),
    "nemotron-shared-expert-bias": (
        "nemotron_h_moe", {"blk.2.ffn_up_shexp.bias": (8,)}, {}, r"ffn_up_shexp\.bias",
    ),
    "qwen3moe-q-bias": (
        "qwen3moe", {"blk.0.attn_q.bias": (E,)}, {}, r"attn_q\.bias",
    ),
    "gpt-oss-q-norm": (
        "gpt-oss", {"blk.1.attn_q_norm.weight": (8,)}, {}, r"attn_q_norm\.weight",
    ),
    "olmo2-fused-qkv": (
        "olmo2", {"blk.0.attn_qkv.weight": (E, 32)}, {}, r"attn_qkv\.weight",
    ),
    "phi3-output-norm-bias": (
        "phi3", {"output_norm.bias": (E,)}, {}, r"output_norm\.bias",
    ),
    "phi3-router": (
        "phi3", {"blk.0.ffn_gate_inp.weight": (E, 2)}, {}, r"ffn_gate_inp\.weight",
    ),
    "llama4-attention-scale": (
        "llama4", {}, {"attention.scale": 2}, r"llama4\.attention\.scale",
    ),
    "llama4-q-norm": (
        "llama4", {"blk.0.attn_q_norm.weight": (8,)}, {}, r"attn_q_norm\.weight",
    ),
    "exaone4-output-bias": (
        "exaone4", {"blk.0.attn_output.bias": (E,)}, {}, r"attn_output\.bias",
    ),
    "clamp-kqv": (
        "exaone4", {}, {"attention.clamp_kqv": 8}, r"clamp_kqv",
    ),
    "smallthinker-expert-scale": (
        "smallthinker", {"blk.0.ffn_down_exps.scale": (2,)}, {}, r"ffn_down_exps\.scale",
    ),
    "mellum-q-bias": (
        "mellum", {"blk.1.attn_q.bias": (E,)}, {}, r"attn_q\.bias",
    ),
    "granite-swa-deepstack": (
        "granite_swa", {}, {"deepstack_mapping": 0}, r"deepstack_mapping",
    ),
    "muse-glimmer-output-bias": (
        "muse-glimmer", {"blk.0.attn_output.bias": (E,)}, {}, r"attn_output\.bias",
    ),
    "spark2-5-k-bias": (
        "spark2_5", {"blk.0.attn_k.bias": (8,)}, {}, r"attn_k\.bias",
    ),
    "plamo3-qkv-bias": (
        "plamo3", {"blk.1.attn_qkv.bias": (32,)}, {}, r"attn_qkv\.bias",
    ),
    "step35-fused-qkv": (
        "step35", {"blk.0.attn_qkv.weight": (E, 32)}, {}, r"attn_qkv\.weight",
    ),
    "gemma4-layer-output-scale": (
        "gemma4", {"blk.1.layer_output_scale.weight": (1,)}, {}, r"layer_output_scale",
    ),
    "laguna-moe-expert-groups": (
        "laguna-moe", {}, {"expert_group_count": 2}, r"expert groups",
    ),
    "exaone-moe-moe-expert-scale": (
        "exaone-moe-moe", {"blk.2.ffn_gate_exps.scale": (4,)}, {}, r"ffn_gate_exps\.scale",
    ),
    "cohere2moe-moe-expert-scale": (
        "cohere2moe-moe", {"blk.1.ffn_down_exps.scale": (4,)}, {}, r"ffn_down_exps\.scale",
    ),
    "granite-swa-moe-expert-groups": (
        "granite-swa-moe", {}, {"expert_group_count": 4}, r"expert groups",
    ),
    "gemma4-moe-expert-scale": (
        "gemma4-moe", {"blk.1.ffn_down_exps.scale": (4,)}, {}, r"ffn_down_exps\.scale",
    ),
    "gemma3n-v-bias": (
        "gemma3n", {"blk.2.attn_v.bias": (8,)}, {}, r"attn_v\.bias",
    ),
    "gemma4-per-layer-embeddings": (
        "gemma4", {"per_layer_token_embd.weight": (4, 64)}, {}, r"per-layer embeddings",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_unbuilt_variant_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    arch, extra, keys, error = CASES[case]
    writer, run = MODELS[arch]
    path = _write_with(tmp_path, monkeypatch, writer, extra, keys)
    with pytest.raises(UnsupportedError, match=error):
        _first_decode(path, run)


def test_factor_tensor_the_loader_does_not_create_is_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cohere2's loader creates no RoPE factor tensor: llama.cpp fails to load such a file,
    # so pymem refuses it when reading the spec, before any graph
    writer, run = MODELS["cohere2"]
    path = _write_with(tmp_path, monkeypatch, writer, {"rope_freqs.weight": (4,)}, {})
    with pytest.raises(
        ConfigError, match=r"tensor\(s\) rope_freqs\.weight: llama\.cpp's 'cohere2' loader"
    ):
        _first_decode(path, run)


@pytest.mark.parametrize(
    ("model", "key"),
    [("qwen3moe", "swiglu_clamp_exp"), ("qwen3moe", "expert_weights_scale"),
     ("lfm2moe", "expert_weights_scale"), ("gpt-oss", "expert_weights_scale")],
)  # fmt: skip
def test_key_ignored_where_the_loader_ignores_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, key: str
) -> None:
    """A key the architecture's load_arch_hparams does not read changes nothing (the
    reference ignores it): the same logits with and without it."""
    writer, run = MODELS[model]
    plain = _first_decode(_write_with(tmp_path, monkeypatch, writer, {}), run)
    monkeypatch.undo()
    (tmp_path / "model.gguf").unlink()
    keyed = _first_decode(_write_with(tmp_path, monkeypatch, writer, {}, {key: 7}), run)
    np.testing.assert_array_equal(keyed, plain)
