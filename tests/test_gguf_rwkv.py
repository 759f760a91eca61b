"""The GGUF engine's linear-recurrence family (pymem/runtime/graph_rwkv.py: RWKV-6/7 and
their Qwen flavours, PLaMo-2, Kimi-Linear, Kimi-K3, BailingMoE-3, MiniMax-01) refuses what
it does not build.

The recorded runs of these architectures replay through the engine in
tests/test_gguf_llama.py, except minimax-01.main.fa1.u1, where the reference reads memory
it never wrote from step 28 on: here its steps before that match and step 28 is refused.

Here: a model the engine would decode wrongly by ignoring a tensor or key (K/V/R biases,
the unfused lerp of old RWKV-6 files, rescaling every n layers, repeated K/V heads, a
PLaMo-2 QKV bias, Kimi-Linear's fused KDA QKV or MHA-cache MLA, MiniMax-01 attention
biases, Kimi-K3's latent MoE or sigmoid KDA gate, BailingMoE-3's Q LoRA) raises UnsupportedError naming it,
before any state is written; an RWKV-7 head size ggml's CPU ``rwkv_wkv7`` kernel overruns
(it steps 64 floats at a time with AVX-512: heads of 8 read and write past each head,
corrupting the heap) is refused instead of computed. The models are the recorded tiny
ones, written again by their writers with one tensor or key more.
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
from pymem.errors import UnsupportedError
from pymem.factory import ContextParams, create_memory
from pymem.runtime.decoder import Decoder
from pymem.runtime.gguf_llama import SUPPORTED, GGUFModel

sys.path.insert(0, str(Path(__file__).parent / "record"))
import family_linear
import family_other
import family_ssm
import models

RUNS = Path(__file__).parent / "data" / "runs"


def _write_with(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    writer: Callable[[Path], Path],
    extra: dict[str, tuple[int, ...]],
    keys: dict[str, int | float] | None = None,
) -> Path:
    """The writer's model plus the ``extra`` tensors (name -> ggml shape, zeros) and
    ``keys`` (``<key>`` after the arch prefix -> u32, or f32 for a float)."""
    finish = models._Model.finish

    def finish_with_extra(self: models._Model) -> None:
        for name, ne in extra.items():
            self.w.add_tensor(name, np.zeros(tuple(reversed(ne)), np.float32))
        for key, value in (keys or {}).items():
            if isinstance(value, float):
                self.f32(key, value)
            else:
                self.u32(key, value)
        finish(self)

    monkeypatch.setattr(models._Model, "finish", finish_with_extra)
    return writer(tmp_path / "model.gguf")


def _first_decode(path: Path, run: str) -> np.ndarray:
    """Decode the first batch of a recorded run with the model at ``path``: the logits of
    its output tokens."""
    data = json.loads((RUNS / f"{run}.json").read_text())
    step = next(s for s in data["steps"] if s["op"] == "decode")
    params = data["context_params"]
    with GGUFModel(path) as model:
        mem = create_memory(model.spec, ContextParams.from_dict(params))
        assert mem is not None
        try:
            dec = Decoder(model, mem, n_seq_max=params["n_seq_max"], n_ubatch=params["n_ubatch"],
                          flash_attn=params["flash_attn"])  # fmt: skip
            logits = dec.decode(Batch.from_items(step["items"]))
        finally:
            mem.close()
    return logits[[i for i, item in enumerate(step["items"]) if item[3]]]


def test_family_is_registered() -> None:
    family = {"rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "plamo2", "kimi-linear", "minimax-01"}
    family |= {"kimi-k3", "bailingmoe3"}
    assert family <= set(SUPPORTED)


@pytest.mark.parametrize(
    ("writer", "run"),
    [
        (family_other.write_rwkv6, "rwkv6.main.u1"),
        (family_other.write_rwkv6qwen2, "rwkv6qwen2.main.u1"),
        (family_ssm.write_plamo2, "plamo2.main.fa1.u1"),
        (family_linear.write_kimi_linear, "kimi-linear.main.fa1.u1"),
        (family_linear.write_minimax_01, "minimax-01.main.fa0.u0"),
        (family_linear.write_kimi_k3, "kimi-k3.main.fa0.u0"),
        (family_linear.write_bailingmoe3, "bailingmoe3.main.fa1.u1"),
    ],
    ids=["rwkv6", "rwkv6qwen2", "plamo2", "kimi-linear", "minimax-01", "kimi-k3", "bailingmoe3"],
)
def test_unchanged_model_decodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Callable[[Path], Path], run: str
) -> None:
    """The control: the writer's model with nothing added decodes."""
    _first_decode(_write_with(tmp_path, monkeypatch, writer, {}), run)


N = family_other.RWKV_EMBD

# (writer, recorded run, extra tensors, extra keys, error)
CASES = {
    "rwkv6qwen2-key-bias": (
        family_other.write_rwkv6qwen2, "rwkv6qwen2.main.u1",
        {"blk.1.time_mix_key.bias": (N,)}, {}, r"blk\.1\.time_mix_key\.bias",
    ),
    "rwkv6qwen2-receptance-bias": (
        family_other.write_rwkv6qwen2, "rwkv6qwen2.main.u1",
        {"blk.0.time_mix_receptance.bias": (N,)}, {}, r"blk\.0\.time_mix_receptance\.bias",
    ),
    "rwkv6-value-bias": (
        family_other.write_rwkv6, "rwkv6.main.u1",
        {"blk.0.time_mix_value.bias": (N,)}, {}, r"blk\.0\.time_mix_value\.bias",
    ),
    "rwkv6-unfused-lerp": (
        family_other.write_rwkv6, "rwkv6.main.u1",
        {"blk.0.time_mix_lerp_w.weight": (N, 1, 1)}, {}, r"blk\.0\.time_mix_lerp_w\.weight",
    ),
    "rwkv6-rescale": (
        family_other.write_rwkv6, "rwkv6.main.u1",
        {}, {"rescale_every_n_layers": 1}, r"rwkv6\.rescale_every_n_layers",
    ),
    "plamo2-qkv-bias": (
        family_ssm.write_plamo2, "plamo2.main.fa1.u1",
        {"blk.1.attn_qkv.bias": (24,)}, {}, r"blk\.1\.attn_qkv\.bias",
    ),
    "kimi-fused-kda-qkv": (
        family_linear.write_kimi_linear, "kimi-linear.main.fa1.u1",
        {"blk.0.attn_qkv.weight": (16, 24)}, {}, r"blk\.0\.attn_qkv\.weight",
    ),
    "kimi-mla-kv-b": (
        family_linear.write_kimi_linear, "kimi-linear.main.fa1.u1",
        {"blk.1.attn_kv_b.weight": (8, 24)}, {}, r"blk\.1\.attn_kv_b\.weight",
    ),
    "minimax-attn-q-bias": (
        family_linear.write_minimax_01, "minimax-01.main.fa0.u0",
        {"blk.1.attn_q.bias": (16,)}, {}, r"blk\.1\.attn_q\.bias",
    ),
    "kimi-k3-latent-moe": (
        family_linear.write_kimi_k3, "kimi-k3.main.fa0.u0",
        {"blk.1.ffn_routed_down.weight": (16, 8)}, {}, r"blk\.1\.ffn_routed_down\.weight",
    ),
    "kimi-k3-gate-lower-bound": (
        family_linear.write_kimi_k3, "kimi-k3.main.fa0.u0",
        {}, {"kda.gate_lower_bound": -5.0}, r"kimi-k3\.kda\.gate_lower_bound",
    ),
    "bailingmoe3-q-lora": (
        family_linear.write_bailingmoe3, "bailingmoe3.main.fa1.u1",
        {"blk.1.attn_q_a.weight": (16, 8)}, {}, r"blk\.1\.attn_q_a\.weight",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_unbuilt_variant_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    writer, run, extra, keys, error = CASES[case]
    path = _write_with(tmp_path, monkeypatch, writer, extra, keys)
    with pytest.raises(UnsupportedError, match=error):
        _first_decode(path, run)


def test_repeated_kv_heads_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rwkv6qwen2 with fewer K/V heads than WKV heads (the reference repeats K and V)."""
    path = _write_with(
        tmp_path, monkeypatch, family_other.write_rwkv6qwen2, {}, {"attention.head_count_kv": 1}
    )
    with pytest.raises(UnsupportedError, match=r"head_count_kv 1 != 2 heads"):
        _first_decode(path, "rwkv6qwen2.main.u1")


@pytest.mark.parametrize(
    ("writer", "run"),
    [
        (family_other.write_rwkv7, "rwkv7.main.u1"),
        (family_other.write_arwkv7, "arwkv7.main.u1"),
    ],
    ids=["rwkv7", "arwkv7"],
)
def test_rwkv7_small_heads_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Callable[[Path], Path], run: str
) -> None:
    """An RWKV-7 model with heads of 8 (the first tiny models had them) is refused before
    any node is computed: ggml's rwkv_wkv7 would overrun every head row. The recorded
    models (one head of 64) decode (tests/test_gguf_llama.py)."""
    monkeypatch.setattr(family_other, "RWKV7_EMBD", 16)
    monkeypatch.setattr(family_other, "RWKV7_HEAD", 8)
    path = _write_with(tmp_path, monkeypatch, writer, {})
    with pytest.raises(UnsupportedError, match=r"wkv\.head_size 8 is not a multiple of 64"):
        _first_decode(path, run)


def test_tolerant_comparison_reads_k_only_caches() -> None:
    """tests/test_gguf_llama.py's tolerant blob comparison (another ggml build) parses an
    MLA model's K-only cache, which has no V sections: every state blob of
    kimi-linear.main.fa1.u1 compared with itself passes (it used to fail "truncated")."""
    from replay import Run
    from test_gguf_llama import ModelHooks, Stats, compare_close, replay_with_model

    path = RUNS / "kimi-linear.main.fa1.u1.json"
    compared: list[int] = []

    class Hooks(ModelHooks):
        def compare_blob(self, kind: str, got: bytes, want: bytes, where: str) -> None:
            assert self.mem is not None
            compare_close(self.mem, kind, want, want, where, Stats())
            compared.append(1)
            super().compare_blob(kind, got, want, where)

    run = Run.load(path)
    with GGUFModel(run.model_path()) as model, pytest.MonkeyPatch.context() as mp:
        import test_gguf_llama

        mp.setattr(test_gguf_llama, "ModelHooks", Hooks)
        replay_with_model(path, model)
    assert len(compared) > 100


def test_lightning_attention_refuses_what_the_reference_leaves_undefined() -> None:
    """minimax-01.main.fa1.u1: every step before 28 (10 decodes) gives the recorded logits
    and state bytes (bit for bit where the kernels reproduce the recording, else within
    test_gguf_llama's tolerances); step 28 decodes a prompt shared by seqs 2 and 3, whose
    ubatch has a set indexed past the lightning-attention inputs in the reference
    (llm_graph_input_la writes rows by unique-sequence index): the engine refuses it."""
    from replay import Run, build_memory, replay
    from test_gguf_llama import REFERENCE_UNDEFINED, ModelHooks

    stem = "minimax-01.main.fa1.u1"
    step = REFERENCE_UNDEFINED[stem]
    run = Run.load(RUNS / f"{stem}.json")
    wheres: list[str] = []

    class Hooks(ModelHooks):
        def before_op(self, step: dict, mem: Any, where: str) -> None:
            wheres.append(where)
            super().before_op(step, mem, where)

    with GGUFModel(run.model_path()) as model:
        mem = build_memory(run)
        hooks = Hooks(run, model)
        try:
            with pytest.raises(UnsupportedError, match=r"sequence indices \[2, 0\] are not 0\.\.1"):
                replay(run, mem, hooks)
        finally:
            mem.close()
    assert wheres[-1].startswith(f"{stem}.json step {step} ")
    n_before = sum(1 for s in run.data["steps"][:step] if s["op"] == "decode" and "logits" in s)
    st = hooks.stats
    assert st.logits_checked == n_before == 10
    assert st.blobs_identical + st.blobs_close >= step
    if st.exact:  # (where the kernels reproduce the recording: every byte)
        assert st.blobs_close == 0


def test_rwkv7_without_rms_epsilon_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An rwkv7 file with only the layer-norm epsilon (as converted RWKV-6/7 models are;
    the reference reads the RMS one as optional) loads, and its first decode gives the
    logits of the recording's file (both epsilons) bit for bit on the same machine (RWKV-7
    uses no RMS norm), and the recorded ones within test_gguf_llama's tolerance (bit for
    bit where the kernels reproduce the recording)."""
    from replay import Run
    from test_gguf_llama import LOGIT_RTOL

    f32 = models._Model.f32

    def f32_without_rms(self: models._Model, key: str, v: float) -> None:
        if key != "attention.layer_norm_rms_epsilon":
            f32(self, key, v)

    monkeypatch.setattr(models._Model, "f32", f32_without_rms)
    path = _write_with(tmp_path, monkeypatch, family_other.write_rwkv7, {})
    data = json.loads((RUNS / "rwkv7.main.u1.json").read_text())
    step = next(s for s in data["steps"] if s["op"] == "decode")
    blobs = RUNS.parent / "blobs"
    want = np.frombuffer((blobs / f"{step['logits']}.bin").read_bytes(), dtype=np.float32)
    got = _first_decode(path, "rwkv7.main.u1")
    recorded_file = Run.load(RUNS / "rwkv7.main.u1.json").model_path()
    assert recorded_file is not None
    both = _first_decode(recorded_file, "rwkv7.main.u1")
    assert np.array_equal(got.view(np.uint32), both.view(np.uint32))
    got = got.reshape(-1)
    assert np.abs(got - want).max() <= LOGIT_RTOL * np.abs(want).max()
