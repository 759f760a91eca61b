"""Mamba-family architectures and their hybrids: tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).

Every model here uses the Mamba-2 mixer (``llm_build_mamba_base::build_mamba2_layer``)
with the same tiny widths (:data:`SSM2`): n_embd 8, d_inner 16 split into 4 heads of 4,
2 groups of d_state 4, conv kernel 4. The conv state covers x, B and C:
R rows of (d_conv - 1) * (d_inner + 2 * n_group * d_state) = 3 * 32 = 96 floats; the SSM
state S rows of d_state * d_inner = 64 floats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models import _attn, _common, _ffn, _head, _Model, _moe, _qkvo, _shexp
from runconfig import Play, RunConfig


@dataclass(frozen=True)
class _SSM2:
    """Mamba-2 mixer widths (the ``ssm.*`` keys)."""

    n_embd: int = 8
    d_conv: int = 4
    d_inner: int = 16  # 2 * n_embd (granitehybrid requires the expansion factor 2)
    d_state: int = 4
    n_head: int = 4  # ssm.time_step_rank; head_dim = d_inner / n_head = 4
    n_group: int = 2  # ssm_norm is a grouped RMS norm of d_inner / n_group = 8

    @property
    def conv_dim(self) -> int:
        """The conv covers x, B and C: d_inner + 2 * n_group * d_state."""
        return self.d_inner + 2 * self.n_group * self.d_state

    @property
    def d_in_proj(self) -> int:
        """ssm_in's output: z, xBC and dt (one per head)."""
        return self.d_inner + self.conv_dim + self.n_head


SSM2 = _SSM2()


def _ssm_keys(m: _Model, s: _SSM2) -> None:
    m.u32("ssm.conv_kernel", s.d_conv)
    m.u32("ssm.inner_size", s.d_inner)
    m.u32("ssm.state_size", s.d_state)
    m.u32("ssm.time_step_rank", s.n_head)
    m.u32("ssm.group_count", s.n_group)


def _mamba2_mixer(m: _Model, il: int, s: _SSM2) -> None:
    """One layer's Mamba-2 tensors (load_arch_tensors of mamba2 / granitehybrid / nemotron_h)."""
    m.weight(f"blk.{il}.ssm_in.weight", (s.n_embd, s.d_in_proj))
    m.weight(f"blk.{il}.ssm_conv1d.weight", (s.d_conv, s.conv_dim), scale=0.5)
    m.weight(f"blk.{il}.ssm_conv1d.bias", (s.conv_dim,), scale=0.1)
    m.weight(f"blk.{il}.ssm_dt.bias", (s.n_head,), scale=0.5)
    # A = -exp(A_log) < 0 keeps the scan decaying
    a = -(0.5 + m.rng.random((s.n_head, 1))).astype("float32")
    m.w.add_tensor(f"blk.{il}.ssm_a", a)
    m.weight(f"blk.{il}.ssm_d", (1, s.n_head), scale=1.0)
    # the grouped RMS norm's weight: {d_inner / n_group, n_group}, near 1
    g = 1.0 + 0.1 * m.rng.standard_normal((s.n_group, s.d_inner // s.n_group))
    m.w.add_tensor(f"blk.{il}.ssm_norm.weight", g.astype("float32"))
    m.weight(f"blk.{il}.ssm_out.weight", (s.d_inner, s.n_embd))


def write_mamba2(path: Path) -> Path:
    """mamba2: 2 recurrent layers of the Mamba-2 mixer (:data:`SSM2` widths).

    llama_model_mamba2::load_arch_hparams requires the five ``ssm.*`` keys (group_count
    included) and ``attention.layer_norm_rms_epsilon``; every layer recurs (recurrent
    architecture). No attention heads (``attention.head_count`` 0).
    """
    s, n_layer = SSM2, 2
    m = _Model(path, "mamba2", "tiny-mamba2", seed=21)
    _common(m, s.n_embd, n_layer, 0, 0)
    _ssm_keys(m, s)
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        _mamba2_mixer(m, il, s)
    m.finish()
    return path


def write_granitehybrid(path: Path, *, rope: bool = True) -> Path:
    """granitehybrid (Granite-4-H): 4 layers [Mamba-2, attention, Mamba-2, attention], each
    followed by a SwiGLU FFN.

    llama_model_granite_hybrid::load_arch_hparams: a layer recurs iff its
    ``head_count_kv`` is 0; ``rope.scaling.finetuned`` (default true) switches RoPE for
    every layer (``rope = False`` writes false, as Granite-4-H checkpoints without
    position embeddings do); load_arch_tensors requires d_inner == 2 * n_embd. The four
    Granite scales are set (logit, residual, embedding, attention). 2 heads of 4, 1 KV
    head: K/V rows of 4.
    """
    s, n_layer, n_ff, n_head, head = SSM2, 4, 16, 2, 4
    kv_heads = [0, 1, 0, 1]
    name = "tiny-granitehybrid" if rope else "tiny-granitehybrid-nope"
    m = _Model(path, "granitehybrid", name, seed=31 if rope else 32)
    _common(m, s.n_embd, n_layer, n_ff, n_head)
    m.arr("attention.head_count_kv", kv_heads)
    _ssm_keys(m, s)
    m.f32("logit_scale", 2.0)
    m.f32("residual_scale", 0.5)
    m.f32("embedding_scale", 1.5)
    m.f32("attention.scale", 0.25)
    if not rope:
        m.w.add_bool("granitehybrid.rope.scaling.finetuned", False)
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        if kv_heads[il]:
            _qkvo(m, il, s.n_embd, n_head * head, kv_heads[il] * head)
        else:
            _mamba2_mixer(m, il, s)
        m.norm(f"blk.{il}.ffn_norm.weight", s.n_embd)
        _ffn(m, il, s.n_embd, n_ff)
    m.finish()
    return path


def write_falcon_h1(path: Path) -> Path:
    """falcon-h1: 2 layers, each an attention and a Mamba-2 mixer side by side, then an FFN.

    llama_model_falcon_h1::load_arch_hparams marks every layer recurrent, and
    create_memory puts every layer in both parts of llama_memory_hybrid. The head size
    comes from ``attention.key_length`` (4), not n_embd / n_head (2), as in the real
    checkpoints; 4 heads, 2 KV heads: K/V rows of 8. The FFN norm tensor has no
    ``.weight`` suffix (``tn(LLM_TENSOR_FFN_NORM, i)``).
    """
    s, n_layer, n_ff, n_head, n_head_kv, head = SSM2, 2, 16, 4, 2, 4
    m = _Model(path, "falcon-h1", "tiny-falcon-h1", seed=41)
    _common(m, s.n_embd, n_layer, n_ff, n_head)
    m.u32("attention.head_count_kv", n_head_kv)
    m.u32("attention.key_length", head)
    m.u32("attention.value_length", head)
    m.f32("rope.freq_base", 10000.0)
    _ssm_keys(m, s)
    _head(m, s.n_embd)
    for il in range(n_layer):
        _attn(m, il, s.n_embd, n_head, n_head_kv, head)
        _mamba2_mixer(m, il, s)
        m.norm(f"blk.{il}.ffn_norm", s.n_embd)
        _ffn(m, il, s.n_embd, n_ff)
    m.finish()
    return path


def write_nemotron_h(path: Path) -> Path:
    """nemotron_h: 4 layers [Mamba-2, attention, Mamba-2, FFN-only].

    llama_model_nemotron_h::load_arch_hparams: a layer recurs iff its ``head_count_kv``
    and its ``feed_forward_length`` are both 0; a layer with KV heads and no FFN attends
    (no RoPE: rope type none); a layer with an FFN is a ReLU^2 MLP and belongs to neither
    memory part (create_memory's filters). ``attention.layer_norm_epsilon`` is required.
    2 heads of 4, 1 KV head: K/V rows of 4.
    """
    s, n_head, head, n_ff = SSM2, 2, 4, 16
    kv_heads, ffs = [0, 1, 0, 0], [0, 0, 0, n_ff]
    n_layer = len(kv_heads)
    m = _Model(path, "nemotron_h", "tiny-nemotron_h", seed=51)
    _common(m, s.n_embd, n_layer, ffs, n_head)
    m.arr("attention.head_count_kv", kv_heads)
    m.f32("attention.layer_norm_epsilon", 1e-5)
    _ssm_keys(m, s)
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        if ffs[il]:
            m.weight(f"blk.{il}.ffn_up.weight", (s.n_embd, ffs[il]))
            m.weight(f"blk.{il}.ffn_down.weight", (ffs[il], s.n_embd))
        elif kv_heads[il]:
            _qkvo(m, il, s.n_embd, n_head * head, kv_heads[il] * head)
        else:
            _mamba2_mixer(m, il, s)
    m.finish()
    return path


def _moe_relu2(m: _Model, il: int, n_embd: int, n_expert: int, n_ff_exp: int) -> None:
    """A Nemotron-H MoE FFN: router with a probability bias, experts and a shared expert."""
    _moe(m, il, n_embd, n_ff_exp, n_expert, probs_b=True, gate=False)
    _shexp(m, il, n_embd, n_ff_exp, gate=False)


def write_nemotron_h_moe(path: Path, *, mtp: bool = False) -> Path:
    """nemotron_h_moe: 3 layers [Mamba-2, attention, MoE] (Nemotron-3 Nano's layer kinds).

    The loader and graph are nemotron_h's: the MoE layer (``feed_forward_length`` > 0)
    belongs to neither memory part. 4 experts of 8 (2 used, sigmoid gating with a
    probability bias, normalised and scaled weights) plus a shared expert of 8, ReLU^2.
    2 heads of 4, 1 KV head: K/V rows of 4.

    ``mtp``: a 4th, NextN block (``nextn_predict_layers`` 1) as the converter writes it:
    KV heads and an FFN length (it is in both its attention and MLP layer lists), so the
    main context's memory holds it in neither part; its tensors must be present but are
    skipped (``load_mtp`` is off by default).
    """
    s, n_head, head, n_ff, n_expert, n_ff_exp = SSM2, 2, 4, 16, 4, 8
    kv_heads, ffs = [0, 1, 0] + [1] * mtp, [0, 0, n_ff] + [n_ff] * mtp
    n_layer = 3
    name = "tiny-nemotron_h_moe-mtp" if mtp else "tiny-nemotron_h_moe"
    m = _Model(path, "nemotron_h_moe", name, seed=52)
    _common(m, s.n_embd, len(kv_heads), ffs, n_head, rms_eps=None)
    m.arr("attention.head_count_kv", kv_heads)
    m.f32("attention.layer_norm_epsilon", 1e-5)
    m.f32("attention.layer_norm_rms_epsilon", 1e-5)
    if mtp:
        m.u32("nextn_predict_layers", 1)
    m.u32("expert_count", n_expert)
    m.u32("expert_used_count", 2)
    m.u32("expert_feed_forward_length", n_ff_exp)
    m.u32("expert_shared_feed_forward_length", n_ff_exp)
    m.w.add_bool("nemotron_h_moe.expert_weights_norm", True)
    m.f32("expert_weights_scale", 2.5)
    _ssm_keys(m, s)
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        if ffs[il]:
            _moe_relu2(m, il, s.n_embd, n_expert, n_ff_exp)
        elif kv_heads[il]:
            _qkvo(m, il, s.n_embd, n_head * head, kv_heads[il] * head)
        else:
            _mamba2_mixer(m, il, s)
    if mtp:
        il = n_layer
        for t in ("enorm", "hnorm", "shared_head_norm"):
            m.norm(f"blk.{il}.nextn.{t}.weight", s.n_embd)
        m.weight(f"blk.{il}.nextn.eh_proj.weight", (2 * s.n_embd, s.n_embd))
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        _qkvo(m, il, s.n_embd, n_head * head, head)
        m.norm(f"blk.{il}.post_attention_norm.weight", s.n_embd)
        _moe_relu2(m, il, s.n_embd, n_expert, n_ff_exp)
    m.finish()
    return path


def write_plamo2(path: Path) -> Path:
    """plamo2: 4 layers [Mamba, attention, Mamba, attention], each followed by a SwiGLU FFN.

    llama_model_plamo2::load_arch_hparams: a layer recurs iff its ``head_count_kv`` is 0;
    it re-reads ``attention.key_length`` / ``value_length`` (4 here, not n_embd / n_head
    = 2). convert_hf_to_gguf writes ``head_count`` as an array that is 0 on Mamba layers,
    so layer 0 has no heads, llama_model_base::load_hparams leaves n_rot at 0, and the
    reference's CPU decode then never returns (seen with this build); this model has a
    scalar ``head_count`` 4 instead (n_rot = key_length = 4). PLaMo-2's Mamba mixer has
    no groups (``ssm.group_count`` 0, asserted): conv over d_inner only, R rows of
    3 * 16 = 48 floats, S rows of 64; its dt projection is max(64, n_embd / 16) = 64
    wide. 4 heads of 4, 1 KV head: K/V rows of 4.
    """
    s = _SSM2(n_group=0)
    n_ff, head, dt_dim = 16, 4, 64
    n_head, kv_heads = 4, [0, 1, 0, 1]
    n_layer = len(kv_heads)
    m = _Model(path, "plamo2", "tiny-plamo2", seed=61)
    _common(m, s.n_embd, n_layer, n_ff, n_head, rms_eps=None)
    m.arr("attention.head_count_kv", kv_heads)
    m.u32("attention.key_length", head)
    m.u32("attention.value_length", head)
    m.f32("attention.layer_norm_rms_epsilon", 1e-6)
    m.f32("rope.freq_base", 10000.0)
    _ssm_keys(m, s)
    _head(m, s.n_embd)
    for il in range(n_layer):
        m.norm(f"blk.{il}.attn_norm.weight", s.n_embd)
        if kv_heads[il]:
            nq, nkv = n_head, kv_heads[il]
            m.weight(f"blk.{il}.attn_qkv.weight", (s.n_embd, (nq + 2 * nkv) * head))
            g = 1.0 + 0.1 * m.rng.standard_normal((nq, head))
            m.w.add_tensor(f"blk.{il}.attn_q_norm.weight", g.astype("float32"))
            g = 1.0 + 0.1 * m.rng.standard_normal((nkv, head))
            m.w.add_tensor(f"blk.{il}.attn_k_norm.weight", g.astype("float32"))
            m.weight(f"blk.{il}.attn_output.weight", (nq * head, s.n_embd))
        else:
            m.weight(f"blk.{il}.ssm_in.weight", (s.n_embd, 2 * s.d_inner))
            m.weight(f"blk.{il}.ssm_conv1d.weight", (s.d_conv, s.d_inner), scale=0.5)
            m.weight(f"blk.{il}.ssm_x.weight", (s.d_inner, dt_dim + 2 * s.d_state))
            m.weight(f"blk.{il}.ssm_dt.weight", (dt_dim, s.n_head))
            m.weight(f"blk.{il}.ssm_dt.bias", (s.n_head,), scale=0.5)
            m.w.add_tensor(f"blk.{il}.ssm_a", -(0.5 + m.rng.random(s.n_head)).astype("float32"))
            m.weight(f"blk.{il}.ssm_d", (s.n_head,), scale=1.0)
            m.weight(f"blk.{il}.ssm_out.weight", (s.d_inner, s.n_embd))
            m.norm(f"blk.{il}.ssm_dt_norm", dt_dim)
            m.norm(f"blk.{il}.ssm_b_norm", s.d_state)
            m.norm(f"blk.{il}.ssm_c_norm", s.d_state)
        m.norm(f"blk.{il}.post_attention_norm", s.n_embd)
        m.norm(f"blk.{il}.ffn_norm.weight", s.n_embd)
        m.weight(f"blk.{il}.ffn_up.weight", (s.n_embd, 2 * n_ff))
        m.weight(f"blk.{il}.ffn_down.weight", (n_ff, s.n_embd))
        m.norm(f"blk.{il}.post_ffw_norm", s.n_embd)
    m.finish()
    return path


MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-mamba2.gguf": write_mamba2,
    "tiny-granitehybrid.gguf": write_granitehybrid,
    "tiny-granitehybrid-nope.gguf": lambda p: write_granitehybrid(p, rope=False),
    "tiny-falcon-h1.gguf": write_falcon_h1,
    "tiny-nemotron_h.gguf": write_nemotron_h,
    "tiny-nemotron_h_moe.gguf": write_nemotron_h_moe,
    "tiny-nemotron_h_moe-mtp.gguf": lambda p: write_nemotron_h_moe(p, mtp=True),
    "tiny-plamo2.gguf": write_plamo2,
}

_GH, _GH_NOPE = "tiny-granitehybrid.gguf", "tiny-granitehybrid-nope.gguf"
_NH, _NHM = "tiny-nemotron_h.gguf", "tiny-nemotron_h_moe.gguf"

RUNS: list[RunConfig] = [
    RunConfig("mamba2.main.u1", "mamba2", "tiny-mamba2.gguf", "main", 256, 64, False, True),
    RunConfig(
        "mamba2.ops.u1", "mamba2", "tiny-mamba2.gguf", "ops", 256, 32, False, True, play=Play.OPS
    ),
    # n_rs_seq 2 on an architecture without recurrent rollback: the reference clamps it
    # to 0, so every rollback seq_rm is refused
    RunConfig(
        "mamba2.rollback-clamped.u1",
        "mamba2",
        "tiny-mamba2.gguf",
        "rollback-clamped",
        256,
        64,
        False,
        True,
        n_rs_seq=2,
    ),
    # granitehybrid: hybrid memory, attention layers 1 and 3, Mamba-2 layers 0 and 2
    RunConfig.of("granitehybrid", _GH, "main", 256, 64, True, True),
    RunConfig.of("granitehybrid", _GH, "main", 1024, 64, False, False),
    # RoPE off (rope.scaling.finetuned false): the reference aborts on a decode while a
    # K-shift is pending (its shift graph for layers without RoPE has no nodes:
    # GGML_ASSERT(buffer)), so no decode runs while one is pending (kshift=False)
    RunConfig(
        "granitehybrid-nope.noshift.fa1.u1",
        "granitehybrid",
        _GH_NOPE,
        "noshift",
        256,
        64,
        True,
        True,
        kshift=False,
    ),
    # falcon-h1: every layer in both parts of the hybrid memory
    RunConfig.of("falcon-h1", "tiny-falcon-h1.gguf", "main", 256, 64, True, True),
    RunConfig.of("falcon-h1", "tiny-falcon-h1.gguf", "main", 1024, 64, False, False),
    # nemotron_h: attention layer 1, Mamba-2 layers 0 and 2, FFN layer 3 in neither part;
    # recurrent rollback (llm_arch_supports_rs_rollback): n_rs_seq 2
    RunConfig.of("nemotron_h", _NH, "main", 256, 64, True, True),
    RunConfig.of("nemotron_h", _NH, "rollback", 256, 64, True, True, n_rs_seq=2),
    RunConfig.of(
        "nemotron_h",
        _NH,
        "rollback",
        1024,
        64,
        False,
        False,
        n_rs_seq=2,
    ),
    # nemotron_h_moe: nemotron_h's rules; the MoE layer 2 is in neither part
    RunConfig.of("nemotron_h_moe", _NHM, "main", 256, 64, False, True),
    RunConfig.of(
        "nemotron_h_moe",
        _NHM,
        "rollback",
        1024,
        64,
        True,
        False,
        n_rs_seq=2,
    ),
    # with a NextN block (layer 3): the main context's memory leaves it out
    RunConfig(
        "nemotron_h_moe-mtp.rollback.fa1.u1",
        "nemotron_h_moe",
        "tiny-nemotron_h_moe-mtp.gguf",
        "rollback",
        256,
        64,
        True,
        True,
        n_rs_seq=2,
    ),
    # plamo2: attention layers 1 and 3 (n_rot 0), Mamba layers 0 and 2 (no groups)
    RunConfig.of("plamo2", "tiny-plamo2.gguf", "main", 256, 64, True, True),
    RunConfig.of("plamo2", "tiny-plamo2.gguf", "main", 1024, 64, False, False),
    # more scenarios on the hybrids: ubatches of 4 with rollback (split_equal keeps each
    # sequence's last n_rs_seq + 1 tokens together; the scan writes K snapshots per
    # ubatch), unusual op arguments, PARTIAL_ONLY checkpoints (the recurrent part only)
    RunConfig.of(
        "nemotron_h",
        _NH,
        "rollback-ub4",
        256,
        4,
        True,
        True,
        n_rs_seq=2,
    ),
    RunConfig.of("nemotron_h", _NH, "ops", 256, 32, True, True, play=Play.OPS),
    RunConfig.of(
        "falcon-h1",
        "tiny-falcon-h1.gguf",
        "ops",
        256,
        32,
        False,
        True,
        play=Play.OPS,
    ),
    RunConfig.of(
        "granitehybrid",
        _GH,
        "checkpoint",
        256,
        64,
        True,
        True,
        play=Play.CHECKPOINT,
    ),
]
