"""Tiny random-weight GGUF models that llama.cpp (llama-cpp-python 0.3.36) loads.

Why: the recorder drives the real llama.cpp, which needs a complete model file: every
metadata key ``load_hparams`` reads for the architecture and every tensor
``load_tensors`` creates, with the shapes it expects. The memory under test only cares
about the layer layout (which layers attend, slide or recur, and their widths); the
weights are random F32 so that the K/V/R/S rows in the state blobs are not trivial.

Shapes below are ggml's ``{ne0, ne1}``; numpy arrays are the reverse (``(ne1, ne0)``).
Each builder returns the GGUF bytes' path and writes nothing else. Every model shares
the 64-token SPM vocabulary of tests/data/models/tiny-llama.gguf.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

N_VOCAB = 64

# the vocabulary of tiny-llama.gguf: 4 specials, 26 "▁x" words, 26 letters, punctuation
_TOKENS = (
    ["<unk>", "<s>", "</s>", "<0x0A>"]
    + [f"\u2581{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    + list("abcdefghijklmnopqrstuvwxyz")
    + ["\u2581", ".", ",", "!", "?", "-", "'", ":"]
)
assert len(_TOKENS) == N_VOCAB


def _tokenizer(w: gguf.GGUFWriter) -> None:
    """The SPM ("llama") tokenizer keys, as tiny-llama.gguf carries them."""
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", _TOKENS)
    w.add_array("tokenizer.ggml.scores", [0.0] * 4 + [-float(i) for i in range(N_VOCAB - 4)])
    w.add_array("tokenizer.ggml.token_type", [2, 3, 3, 6] + [1] * (N_VOCAB - 4))
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_bool("tokenizer.ggml.add_eos_token", False)


class _Model:
    """A GGUF being written: arch-prefixed keys, then tensors (random or ones)."""

    def __init__(self, path: Path, arch: str, name: str, seed: int) -> None:
        self.w = gguf.GGUFWriter(str(path), arch)
        self.arch = arch
        self.rng = np.random.default_rng(seed)
        self.w.add_string("general.name", name)
        self.w.add_uint32("general.file_type", 0)

    def u32(self, key: str, v: int) -> None:
        self.w.add_uint32(f"{self.arch}.{key}", v)

    def f32(self, key: str, v: float) -> None:
        self.w.add_float32(f"{self.arch}.{key}", v)

    def arr(self, key: str, v: list[int]) -> None:
        self.w.add_array(f"{self.arch}.{key}", v)

    def weight(self, name: str, ne: tuple[int, ...], scale: float | None = None) -> None:
        """Random N(0, 1/sqrt(ne0)) weights of ggml shape ``ne``."""
        s = scale if scale is not None else 1.0 / np.sqrt(ne[0])
        data = (self.rng.standard_normal(tuple(reversed(ne))) * s).astype(np.float32)
        self.w.add_tensor(name, data)

    def norm(self, name: str, n: int) -> None:
        """A norm weight near 1 (random around 1, so that rows still differ)."""
        data = (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32)
        self.w.add_tensor(name, data)

    def finish(self) -> None:
        _tokenizer(self.w)
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def _common(
    m: _Model,
    n_embd: int,
    n_layer: int,
    n_ff: int | list[int],
    n_head: int,
    *,
    rms_eps: float | None = 1e-5,
) -> None:
    """The keys every model has; ``n_ff`` a list for per-layer widths, ``rms_eps`` None
    for a writer that adds its norm epsilons later (keys are written in call order)."""
    m.u32("vocab_size", N_VOCAB)
    m.u32("context_length", 4096)
    m.u32("embedding_length", n_embd)
    m.u32("block_count", n_layer)
    if isinstance(n_ff, list):
        m.arr("feed_forward_length", n_ff)
    else:
        m.u32("feed_forward_length", n_ff)
    m.u32("attention.head_count", n_head)
    if rms_eps is not None:
        m.f32("attention.layer_norm_rms_epsilon", rms_eps)


def _head(m: _Model, n_embd: int, *, tied: bool = False) -> None:
    """token_embd, output_norm and (unless tied to token_embd) output."""
    m.weight("token_embd.weight", (n_embd, N_VOCAB))
    m.norm("output_norm.weight", n_embd)
    if not tied:
        m.weight("output.weight", (n_embd, N_VOCAB))


def _ffn(m: _Model, il: int, n_embd: int, n_ff: int) -> None:
    m.weight(f"blk.{il}.ffn_gate.weight", (n_embd, n_ff))
    m.weight(f"blk.{il}.ffn_up.weight", (n_embd, n_ff))
    m.weight(f"blk.{il}.ffn_down.weight", (n_ff, n_embd))


def _qkvo(m: _Model, il: int, n_embd: int, n_q: int, n_kv: int) -> None:
    m.weight(f"blk.{il}.attn_q.weight", (n_embd, n_q))
    m.weight(f"blk.{il}.attn_k.weight", (n_embd, n_kv))
    m.weight(f"blk.{il}.attn_v.weight", (n_embd, n_kv))
    m.weight(f"blk.{il}.attn_output.weight", (n_q, n_embd))


def _attn(
    m: _Model,
    il: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    head: int,
    *,
    qk_norm: bool = False,
) -> None:
    """attn_norm, then Q/K/V/O (``n_head`` / ``n_head_kv`` heads of ``head``), then with
    ``qk_norm`` the per-head Q and K norms, in this order (the RNG is drawn in writing order)."""
    m.norm(f"blk.{il}.attn_norm.weight", n_embd)
    _qkvo(m, il, n_embd, n_head * head, n_head_kv * head)
    if qk_norm:
        m.norm(f"blk.{il}.attn_q_norm.weight", head)
        m.norm(f"blk.{il}.attn_k_norm.weight", head)


def _gemma_layer(
    m: _Model,
    il: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    head: int,
    n_ff: int,
    *,
    qk_norm: bool = False,
) -> None:
    """A gemma layer: :func:`_attn`, its post-norm, then the ffn between its pre/post norms."""
    _attn(m, il, n_embd, n_head, n_head_kv, head, qk_norm=qk_norm)
    m.norm(f"blk.{il}.post_attention_norm.weight", n_embd)
    m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
    _ffn(m, il, n_embd, n_ff)
    m.norm(f"blk.{il}.post_ffw_norm.weight", n_embd)


def _moe(
    m: _Model,
    il: int,
    n_embd: int,
    n_ff_exp: int,
    n_expert: int,
    *,
    probs_b: bool = False,
    gate: bool = True,
) -> None:
    """The router, with ``probs_b`` its selection bias, and the stacked expert weights
    (``ffn_*_exps``: {ne0, ne1, n_expert}); ``gate`` False for ungated (ReLU^2) experts."""
    m.weight(f"blk.{il}.ffn_gate_inp.weight", (n_embd, n_expert))
    if probs_b:
        m.weight(f"blk.{il}.exp_probs_b.bias", (n_expert,), scale=0.1)
    if gate:
        m.weight(f"blk.{il}.ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert))
    m.weight(f"blk.{il}.ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert))
    m.weight(f"blk.{il}.ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert))


def _shexp(m: _Model, il: int, n_embd: int, n_ff: int, *, gate: bool = True) -> None:
    """The shared expert's weights (``ffn_*_shexp``); ``gate`` False for an ungated one."""
    if gate:
        m.weight(f"blk.{il}.ffn_gate_shexp.weight", (n_embd, n_ff))
    m.weight(f"blk.{il}.ffn_up_shexp.weight", (n_embd, n_ff))
    m.weight(f"blk.{il}.ffn_down_shexp.weight", (n_ff, n_embd))


def write_gemma2(path: Path, *, n_swa: int = 8, n_embd: int = 16) -> Path:
    """gemma2: 2 layers, SWA pattern 2 (layer 0 slides with window ``n_swa``, layer 1 is full).

    llama_model_gemma2::load_arch_hparams: swa_type STANDARD, n_swa from
    ``attention.sliding_window``, pattern 2; tensors: attn and ffn with post-norms,
    output tied to token_embd. 2 heads of n_embd / 2, 1 KV head: K/V rows of n_embd / 2
    (8 for tiny-gemma2, 4 for the narrower model of the fill and ops runs).
    """
    n_layer, n_ff, n_head, n_head_kv = 2, n_embd * 3 // 2, 2, 1
    head = n_embd // n_head
    name = "tiny-gemma2" if n_embd == 16 else f"tiny-gemma2-e{n_embd}"
    m = _Model(path, "gemma2", name, seed=2 + n_embd)
    _common(m, n_embd, n_layer, n_ff, n_head)
    m.u32("attention.head_count_kv", n_head_kv)
    m.u32("attention.sliding_window", n_swa)
    m.f32("attn_logit_softcapping", 50.0)
    m.f32("final_logit_softcapping", 30.0)
    _head(m, n_embd, tied=True)
    for il in range(n_layer):
        _gemma_layer(m, il, n_embd, n_head, n_head_kv, head, n_ff)
    m.finish()
    return path


def _llama(
    path: Path, name: str, seed: int, *, n_embd: int, n_ff: int, n_head: int, rope_freqs: bool
) -> Path:
    """A 2-layer F32 llama with 1 KV head; ``rope.dimension_count`` is the head size."""
    n_layer, n_head_kv = 2, 1
    head = n_embd // n_head
    m = _Model(path, "llama", name, seed=seed)
    _common(m, n_embd, n_layer, n_ff, n_head)
    m.u32("attention.head_count_kv", n_head_kv)
    m.u32("rope.dimension_count", head)
    m.f32("rope.freq_base", 10000.0)
    _head(m, n_embd)
    if rope_freqs:
        # Llama-3.1-style frequency divisors (>= 1), one per rotated pair, shared by the
        # layers; random so that a K-shift that ignores them rotates by visibly wrong angles
        factors = m.rng.uniform(1.0, 8.0, head // 2).astype(np.float32)
        m.w.add_tensor("rope_freqs.weight", factors)
    for il in range(n_layer):
        _attn(m, il, n_embd, n_head, n_head_kv, head)
        m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
        _ffn(m, il, n_embd, n_ff)
    m.finish()
    return path


def write_llama(path: Path, *, n_embd: int = 8, rope_freqs: bool = False) -> Path:
    """llama: 2 layers, 2 heads of n_embd / 2, 1 KV head (K/V rows of 4 for n_embd 8).

    Narrower than the shared tiny-llama.gguf, so that runs filling hundreds of cells
    keep their state blobs small.
    """
    name = f"tiny-llama-e{n_embd}" + ("-rf" if rope_freqs else "")
    seed = 7 + n_embd + (100 if rope_freqs else 0)
    n_ff = n_embd * 3 // 2
    return _llama(path, name, seed, n_embd=n_embd, n_ff=n_ff, n_head=2, rope_freqs=rope_freqs)


def _lfm2_mixer(
    m: _Model, il: int, n_embd: int, n_head: int, n_head_kv: int, head: int, l_cache: int
) -> None:
    """An lfm2 layer's mixer: attention with Q/K norms when it has KV heads, else the
    short convolution (``l_cache`` taps)."""
    m.norm(f"blk.{il}.attn_norm.weight", n_embd)
    if n_head_kv:
        m.norm(f"blk.{il}.attn_q_norm.weight", head)
        m.norm(f"blk.{il}.attn_k_norm.weight", head)
        _qkvo(m, il, n_embd, n_head * head, n_head_kv * head)
    else:
        m.weight(f"blk.{il}.shortconv.conv.weight", (l_cache, n_embd), scale=0.5)
        m.weight(f"blk.{il}.shortconv.in_proj.weight", (n_embd, 3 * n_embd))
        m.weight(f"blk.{il}.shortconv.out_proj.weight", (n_embd, n_embd))


def write_lfm2(path: Path, *, n_swa: int = 0) -> Path:
    """lfm2: 4 layers [short-conv, attention, short-conv, attention].

    llama_model_lfm2::load_arch_hparams: a layer recurs when its ``head_count_kv`` is 0;
    ``shortconv.l_cache`` 3 gives R rows of n_embd * 2 = 32 floats and S rows of width 0.
    With ``attention.sliding_window`` > 0 every attention layer slides (swa STANDARD), so
    create_memory builds llama_memory_hybrid_iswa with an empty base cache; without it,
    llama_memory_hybrid. n_embd 16, 2 heads of 8, 1 KV head: K/V rows of 8, R rows of 32.
    """
    n_embd, n_layer, n_ff, n_head, head, l_cache = 16, 4, 32, 2, 8, 3
    kv_heads = [0, 1, 0, 1]
    name = "tiny-lfm2-swa" if n_swa else "tiny-lfm2"
    m = _Model(path, "lfm2", name, seed=5 if n_swa else 4)
    _common(m, n_embd, n_layer, n_ff, n_head)
    m.arr("attention.head_count_kv", kv_heads)
    m.u32("shortconv.l_cache", l_cache)
    if n_swa:
        m.u32("attention.sliding_window", n_swa)
    m.weight("token_embd.weight", (n_embd, N_VOCAB))
    m.norm("token_embd_norm.weight", n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.ffn_norm.weight", n_embd)
        _ffn(m, il, n_embd, n_ff)
        _lfm2_mixer(m, il, n_embd, n_head, kv_heads[il], head, l_cache)
    m.finish()
    return path


def write_llama_quantized(path: Path, *, ftype: str) -> Path:
    """llama with quantised weights: a 2-layer F32 model of width 256 quantised by the reference.

    Why 256: the K-quants pack 256 values per block, so every weight row (ne0: n_embd, and
    n_ff for ffn_down) must be a multiple of it. 4 heads of 64, 1 KV head (K/V rows of 64).
    ``llama_model_quantize`` with ``pure`` set gives every 2-D weight ``ftype`` (``"q8_0"`` or
    ``"q4_K"``); the norms stay F32, as the reference keeps them.
    """
    import ctypes
    import tempfile

    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32.gguf"
        name = f"tiny-llama-{ftype}"
        _llama(src, name, 11, n_embd=256, n_ff=256, n_head=4, rope_freqs=False)
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread = 1
        params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                        "q4_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[ftype]  # fmt: skip
        params.pure = True
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(path).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({ftype}) failed: {rc}")
    return path


# model file name -> writer; tiny-llama / tiny-mamba / tiny-jamba come with the shared data
MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-gemma2.gguf": write_gemma2,
    "tiny-gemma2-e8.gguf": lambda p: write_gemma2(p, n_embd=8),
    "tiny-llama-e8.gguf": write_llama,
    "tiny-llama-e8-rf.gguf": lambda p: write_llama(p, rope_freqs=True),
    "tiny-lfm2.gguf": write_lfm2,
    "tiny-lfm2-swa.gguf": lambda p: write_lfm2(p, n_swa=8),
    "tiny-llama-q8_0.gguf": lambda p: write_llama_quantized(p, ftype="q8_0"),
    "tiny-llama-q4_K.gguf": lambda p: write_llama_quantized(p, ftype="q4_K"),
}
