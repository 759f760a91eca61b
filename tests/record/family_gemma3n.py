"""Gemma-3n (altup, laurel, per-layer embeddings): a tiny model and its recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with it (record_llama_cpp.py adds both to its own).

Why a family of its own: Gemma-3n's layers from ``n_layer_kv_from_start`` (20, fixed in
llama_model_gemma3n::load_arch_hparams) on reuse an earlier layer's K/V, which pymem
refuses. A model of at most 20 layers reuses nothing, so the reference builds an ordinary
iSWA cache for it (create_memory's layer_reuse_cb answers -1 for every layer), and that is
what these runs check. (Checked against the reference with ``n_layer`` 20 and 21: the 20-layer
model logs "no reuse" for every layer, the 21-layer one "layer 20: reuse layer 18".) Its many extra tensors have widths fixed by the reference
(llama_hparams: n_altup 4, laurel_rank 64, n_embd_altup 256, read from no key), so the
model is larger than the others of its width.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models import N_VOCAB, _common, _gemma_layer, _head, _Model
from runconfig import RunConfig

N_EMBD, N_HEAD, N_HEAD_KV, HEAD = 16, 2, 1, 8
N_SWA = 8
# llama_hparams defaults that no GGUF key changes
N_ALTUP, LAUREL_RANK, N_EMBD_ALTUP = 4, 64, 256


def write_gemma3n(path: Path, *, n_layer: int = 5) -> Path:
    """gemma3n: 5 layers (unless ``n_layer`` says otherwise), default pattern 5 -> layers 0..3 slide, layer 4 is full.

    llama_model_gemma3n::load_arch_hparams: swa_type STANDARD, required
    ``attention.sliding_window`` (8), pattern 5 unless the file says otherwise, SWA RoPE base
    from ``rope.freq_base_swa`` (10000 here against 1e6 for the full layer). Every layer has
    K/V (5 < 20). n_embd 16, 2 query heads of 8, 1 KV head: K/V rows of 8. Tensors (per
    load_arch_tensors): gemma3-like attention and ffn with Q/K norms and post-norms, plus
    altup projections, per-layer token embeddings and projections, and laurel (low-rank
    residual) weights; output tied to token_embd. The coefficient matrices are scaled down
    so that the altup streams stay of the order of the embeddings.
    """
    n_ff = 24
    m = _Model(path, "gemma3n", "tiny-gemma3n", seed=113)
    _common(m, N_EMBD, n_layer, n_ff, N_HEAD)
    m.u32("attention.head_count_kv", N_HEAD_KV)
    m.u32("attention.key_length", HEAD)
    m.u32("attention.value_length", HEAD)
    m.u32("attention.sliding_window", N_SWA)
    m.f32("rope.freq_base", 1000000.0)
    m.f32("rope.freq_base_swa", 10000.0)
    _head(m, N_EMBD, tied=True)
    m.weight("altup_proj.weight", (N_EMBD, N_EMBD, N_ALTUP - 1))
    m.weight("altup_unembd_proj.weight", (N_EMBD, N_EMBD, N_ALTUP - 1))
    m.weight("per_layer_token_embd.weight", (N_EMBD_ALTUP * n_layer, N_VOCAB), scale=0.1)
    m.weight("per_layer_model_proj.weight", (N_EMBD, N_EMBD_ALTUP * n_layer))
    m.norm("per_layer_proj_norm.weight", N_EMBD_ALTUP)
    for il in range(n_layer):
        _gemma_layer(m, il, N_EMBD, N_HEAD, N_HEAD_KV, HEAD, n_ff, qk_norm=True)
        # altup: per-layer input gate and projection, router, predict / correct coefficients
        m.weight(f"blk.{il}.inp_gate.weight", (N_EMBD, N_EMBD_ALTUP))
        m.weight(f"blk.{il}.proj.weight", (N_EMBD_ALTUP, N_EMBD))
        m.norm(f"blk.{il}.post_norm.weight", N_EMBD)
        m.weight(f"blk.{il}.altup_correct_coef.weight", (N_ALTUP, N_ALTUP), scale=0.1)
        m.norm(f"blk.{il}.altup_correct_scale.weight", N_EMBD)
        m.weight(f"blk.{il}.altup_predict_coef.weight", (N_ALTUP, N_ALTUP * N_ALTUP), scale=0.1)
        m.weight(f"blk.{il}.altup_router.weight", (N_EMBD, N_ALTUP))
        m.norm(f"blk.{il}.altup_router_norm.weight", N_EMBD)
        # laurel: a rank-64 residual
        m.weight(f"blk.{il}.laurel_l.weight", (N_EMBD, LAUREL_RANK))
        m.weight(f"blk.{il}.laurel_r.weight", (LAUREL_RANK, N_EMBD))
        m.norm(f"blk.{il}.laurel_post_norm.weight", N_EMBD)
    m.finish()
    return path


MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-gemma3n.gguf": write_gemma3n,
}

RUNS: list[RunConfig] = [
    # iSWA, unified: base 512 cells (layer 4), SWA PAD(min(512, 8 * 4 + 64), 256) = 256 (0..3)
    RunConfig.of("gemma3n", "tiny-gemma3n.gguf", "main", 512, 64, True, True),
    # one stream per sequence: 4 x 512 base cells, 4 x PAD(min(512, 8 + 64), 256) = 256
    RunConfig.of("gemma3n", "tiny-gemma3n.gguf", "main", 2048, 64, False, False),
]  # fmt: skip
