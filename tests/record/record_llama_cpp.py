#!/usr/bin/env python
"""Record runs of the real llama.cpp (llama-cpp-python 0.3.36) for pymem's replay tests.

Why: pymem promises the cell placement, sequence-op results and state bytes of the
reference. tests/replay.py checks that against recorded runs; this script makes more of
them, in the format of the three shared runs (tests/data/runs/*.json + content-addressed
tests/data/blobs/*.bin, blob id = sha256(bytes)[:20]).

Each run drives the reference through the same ~30-step scenario (see :func:`scenario`)
through the low-level C API (``llama_cpp.llama_cpp``), one thread on the CPU, and records
after every step: the result, ``[pos_min, pos_max]`` of sequences 0..3, the per-sequence
and whole state sizes and blobs, and the logits of a successful decode. The ``memory``
section is what llama.cpp reports it built (its log lines and context getters, and the
type / row-size headers of its own state blobs), not what pymem would build.

Each run is recorded in a child process, so that an abort of the reference (it has
``GGML_ASSERT``s on some ops, see ``noshift`` below) loses only that run.

Usage (from the repository root)::

    /work/venv/bin/python tests/record/record_llama_cpp.py                 # every run -> tests/data
    /work/venv/bin/python tests/record/record_llama_cpp.py --out /tmp/rec gemma2.main.fa0.u1
    /work/venv/bin/python tests/record/record_llama_cpp.py --verify tests/data/runs/llama.main.fa0.u1.json

``--verify`` re-drives an existing run's steps verbatim and checks every result, position,
size and blob against it (a check of this recorder against the shared recordings).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_attention
import family_gemma3n
import family_linear
import family_moe
import family_other
import family_ssm
from runconfig import N_SEQ, Play, RunConfig

FAMILIES = (family_attention, family_ssm, family_linear, family_other, family_gemma3n, family_moe)

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
SEQ_MAGIC = 0xAF143CD8
PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
# LLAMA_ROPE_TYPE_MROPE / _IMROPE: cells carry (x, y) positions and the reference asserts
# n_pos_per_embd() == 1 in seq_add / seq_div
MROPE_TYPES = (8, 40)

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}
GGML_TYPE_NAMES = {v: k for k, v in GGML_TYPES.items()}


# --------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------


RUNS = [
    # iSWA (gemma2: layer 0 slides with a window of 8, layer 1 is full; K/V rows of 8).
    # Unified: the base cache has 512 cells, the SWA cache PAD(min(512, 8 * 4 + 64), 256) = 256.
    RunConfig.of("gemma2", "tiny-gemma2.gguf", "main", 512, 64, False, True),
    # one stream per sequence: 4 x 512 base cells, 4 x PAD(min(512, 8 + 64), 256) = 256
    RunConfig.of("gemma2", "tiny-gemma2.gguf", "main", 2048, 64, True, False),
    # ubatches of 4 tokens: the prompt is planned as 5 ubatches, SWA purges between them
    RunConfig.of("gemma2", "tiny-gemma2.gguf", "main-ub4", 512, 4, False, True),
    # swa_full: both caches have n_ctx cells, so the iSWA cache can shift
    RunConfig.of("gemma2", "tiny-gemma2.gguf", "main-swafull", 256, 64, True, True, swa_full=True),
    # hybrid-iSWA (lfm2 with a sliding window: every attention layer slides, the base
    # cache holds no layer, so a K-shift aborts the reference -> no K-shift)
    RunConfig.of("lfm2-swa", "tiny-lfm2-swa.gguf", "noshift", 512, 64, False, True, kshift=False),
    RunConfig.of("lfm2-swa", "tiny-lfm2-swa.gguf", "noshift", 1024, 64, True, False, kshift=False),
    RunConfig.of(
        "lfm2-swa", "tiny-lfm2-swa.gguf", "noshift-rollback", 512, 64, True, True, n_rs_seq=2,
        kshift=False,
    ),
    # plain KV cache, one stream per sequence
    RunConfig.of("llama-e8", "tiny-llama-e8.gguf", "main", 1024, 256, True, False),
    # recurrent rollback: lfm2 (hybrid, llm_arch_supports_rs_rollback) with n_rs_seq 2
    RunConfig.of("lfm2", "tiny-lfm2.gguf", "rollback", 256, 64, True, True, n_rs_seq=2),
    RunConfig.of("lfm2", "tiny-lfm2.gguf", "rollback", 1024, 64, False, False, n_rs_seq=2),
    # ubatches of 4 with n_rs_seq 2: split_equal keeps each sequence's last 3 tokens together
    RunConfig.of("lfm2", "tiny-lfm2.gguf", "rollback-ub4", 256, 4, True, True, n_rs_seq=2),
    # caches that run out of cells (narrow models keep the blobs small): a plain KV cache
    # of 256 cells, and an iSWA cache of 512 base / 256 SWA cells whose SWA part wraps
    RunConfig.of("llama-e8", "tiny-llama-e8.gguf", "fill", 256, 32, True, True, play=Play.FILL),
    RunConfig.of(
        "gemma2-e8", "tiny-gemma2-e8.gguf", "fill", 512, 32, False, True, n_batch=512, play=Play.FILL,
    ),
    # hybrid-iSWA running out of cells: 512 base cells (no layer) / 256 SWA cells
    RunConfig.of(
        "lfm2-swa", "tiny-lfm2-swa.gguf", "fill-noshift", 512, 32, True, True, n_batch=512,
        kshift=False, play=Play.FILL,
    ),
    # sequence ops with unusual arguments (unified: partial copies stay in one stream)
    RunConfig.of("llama-e8", "tiny-llama-e8.gguf", "ops", 256, 32, False, True, play=Play.OPS),
    RunConfig.of("gemma2-e8", "tiny-gemma2-e8.gguf", "ops", 256, 32, True, True, play=Play.OPS),
    RunConfig.of("lfm2", "tiny-lfm2.gguf", "ops", 256, 32, True, True, play=Play.OPS),
    RunConfig("mamba.ops.u1", "mamba", "tiny-mamba.gguf", "ops", 256, 32, False, True, play=Play.OPS),
    # context checkpoints (PARTIAL_ONLY states): iSWA, hybrid-iSWA, hybrid
    RunConfig.of(
        "gemma2-e8", "tiny-gemma2-e8.gguf", "checkpoint", 256, 32, True, True, play=Play.CHECKPOINT,
    ),
    RunConfig.of(
        "lfm2-swa", "tiny-lfm2-swa.gguf", "checkpoint", 1024, 32, False, False, play=Play.CHECKPOINT,
    ),
    RunConfig.of("lfm2", "tiny-lfm2.gguf", "checkpoint", 256, 32, True, True, play=Play.CHECKPOINT),
    # quantised K/V (q8_0 needs flash attention for V); a q8_0 K-shift crashes the
    # reference on CPU -> no K-shift
    RunConfig.of(
        "llama", "tiny-llama.gguf", "noshift-q8_0", 256, 256, True, True, type_k="q8_0",
        type_v="q8_0", kshift=False,
    ),
    # RoPE frequency factors (rope_freqs, as Llama-3.1 files carry): the K-shifts after
    # seq_add / seq_div must rotate with them (fa0: transposed V; fa1 u0: 4 streams)
    RunConfig.of("llama-e8-rf", "tiny-llama-e8-rf.gguf", "main", 256, 64, False, True),
    RunConfig.of("llama-e8-rf", "tiny-llama-e8-rf.gguf", "main", 1024, 64, True, False),
    # quantised weights (every 2-D weight q8_0 / q4_K, width 256): the engine's kernels
    # read them as the reference's; the memory is an ordinary F16 KV cache
    RunConfig.of("llama-q8_0", "tiny-llama-q8_0.gguf", "main", 256, 64, True, True),
    RunConfig.of("llama-q4_K", "tiny-llama-q4_K.gguf", "main", 1024, 64, False, False),
]  # fmt: skip
for _family in FAMILIES:
    RUNS += _family.RUNS
RUNS_BY_NAME = {r.name: r for r in RUNS}
assert len(RUNS_BY_NAME) == len(RUNS), "two runs share a name"


# --------------------------------------------------------------------------------------
# the reference, through llama_cpp's ctypes bindings
# --------------------------------------------------------------------------------------


class Reference:
    """One llama.cpp model + context (CPU, one thread), with its log lines kept."""

    def __init__(self, model_path: Path, cp: dict[str, Any]) -> None:
        import llama_cpp.llama_cpp as lc

        self.L = lc
        self.log: list[str] = []

        @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
        def on_log(level: int, text: bytes, user: Any) -> None:
            self.log.append(text.decode(errors="replace"))

        self._on_log = on_log  # keep the callback alive
        lc.llama_log_set(on_log, None)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        # weights in plain CPU buffers: no AMX / repacked copies of quantised weights (the
        # AMX path crashes on this machine kind, and repacked kernels round differently
        # from the plain ones a pymem runtime uses)
        mp.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        p = lc.llama_context_default_params()
        p.n_ctx = cp["n_ctx"]
        p.n_seq_max = cp["n_seq_max"]
        p.n_batch = cp["n_batch"]
        p.n_ubatch = cp["n_ubatch"]
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if cp["flash_attn"] else 0
        p.kv_unified = cp["kv_unified"]
        p.swa_full = cp["swa_full"]
        p.n_rs_seq = cp["n_rs_seq"]
        p.type_k = GGML_TYPES[cp["type_k"]]
        p.type_v = GGML_TYPES[cp["type_v"]]
        p.n_threads = 1
        p.n_threads_batch = 1
        p.offload_kqv = False
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_seq_max = cp["n_seq_max"]

    # --- ops ---------------------------------------------------------------------------

    def decode(self, items: list) -> tuple[int, bytes | None, int]:
        """(result, logits of the outputs in batch order as float32 bytes, n_outputs)."""
        lc = self.L
        b = lc.llama_batch_init(len(items), 0, self.n_seq_max)
        try:
            b.n_tokens = len(items)
            for i, (tok, pos, seqs, out) in enumerate(items):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = len(seqs)
                for k, s in enumerate(seqs):
                    b.seq_id[i][k] = s
                b.logits[i] = bool(out)
            res = int(lc.llama_decode(self.ctx, b))
        finally:
            lc.llama_batch_free(b)
        if res != 0:
            return res, None, 0
        rows = []
        for i, it in enumerate(items):
            if it[3]:
                ptr = lc.llama_get_logits_ith(self.ctx, i)
                rows.append(ctypes.string_at(ptr, 4 * self.n_vocab))
        return res, b"".join(rows), len(rows)

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        return bool(self.L.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.L.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        self.L.llama_memory_seq_keep(self.mem, seq)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        self.L.llama_memory_seq_add(self.mem, seq, p0, p1, delta)

    def seq_div(self, seq: int, p0: int, p1: int, d: int) -> None:
        self.L.llama_memory_seq_div(self.mem, seq, p0, p1, d)

    def clear(self, data: bool) -> None:
        self.L.llama_memory_clear(self.mem, data)

    def pos(self, seq: int) -> list[int]:
        lc = self.L
        return [
            lc.llama_memory_seq_pos_min(self.mem, seq),
            lc.llama_memory_seq_pos_max(self.mem, seq),
        ]

    def can_shift(self) -> bool:
        return bool(self.L.llama_memory_can_shift(self.mem))

    # --- state -------------------------------------------------------------------------

    def seq_state(self, seq: int) -> bytes:
        lc = self.L
        n = lc.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        m = lc.llama_state_seq_get_data(self.ctx, buf, n, seq)
        assert m == n, f"seq {seq}: get_size {n} != get_data {m}"
        return bytes(buf)

    def state(self) -> bytes:
        lc = self.L
        n = lc.llama_state_get_size(self.ctx)
        buf = (ctypes.c_uint8 * n)()
        m = lc.llama_state_get_data(self.ctx, buf, n)
        assert m == n, f"state: get_size {n} != get_data {m}"
        return bytes(buf)

    def seq_state_set(self, data: bytes, seq: int, flags: int = 0) -> int:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if flags:
            return int(self.L.llama_state_seq_set_data_ext(self.ctx, buf, len(data), seq, flags))
        return int(self.L.llama_state_seq_set_data(self.ctx, buf, len(data), seq))

    def seq_state_partial(self, seq: int) -> bytes:
        """``llama_state_seq_get_data_ext(..., LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)``."""
        lc = self.L
        n = lc.llama_state_seq_get_size_ext(self.ctx, seq, PARTIAL_ONLY)
        buf = (ctypes.c_uint8 * n)()
        m = lc.llama_state_seq_get_data_ext(self.ctx, buf, n, seq, PARTIAL_ONLY)
        assert m == n, f"seq {seq}: partial get_size {n} != get_data {m}"
        return bytes(buf)

    def state_set(self, data: bytes) -> int:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return int(self.L.llama_state_set_data(self.ctx, buf, len(data)))


# --------------------------------------------------------------------------------------
# the recording
# --------------------------------------------------------------------------------------


def blob_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


@dataclass
class Recorder:
    """Executes step dicts on the reference and records the state after each one."""

    ref: Reference
    steps: list[dict[str, Any]] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    partial: bool = False  # also record each sequence's PARTIAL_ONLY state after each step

    def put(self, data: bytes) -> str:
        bid = blob_id(data)
        self.blobs[bid] = data
        return bid

    def blob(self, bid: str) -> bytes:
        return self.blobs[bid]

    def run(self, step: dict[str, Any]) -> dict[str, Any]:
        """Execute one step (``op`` + arguments), then record its result and the state."""
        ref, op = self.ref, step["op"]
        rec: dict[str, Any] = {"i": len(self.steps), **step}
        result: Any = None
        if op == "decode":
            result, logits, n_out = ref.decode(step["items"])
            if result == 0:
                rec["logits"] = self.put(logits or b"")
                rec["logits_shape"] = [n_out, ref.n_vocab]
        elif op == "seq_rm":
            result = ref.seq_rm(step["seq"], step["p0"], step["p1"])
        elif op == "seq_cp":
            ref.seq_cp(step["src"], step["dst"], step["p0"], step["p1"])
        elif op == "seq_keep":
            ref.seq_keep(step["seq"])
        elif op == "seq_add":
            ref.seq_add(step["seq"], step["p0"], step["p1"], step["delta"])
        elif op == "seq_div":
            ref.seq_div(step["seq"], step["p0"], step["p1"], step["d"])
        elif op == "clear":
            ref.clear(step.get("data", True))
        elif op == "state_seq_set":
            data = self.blob(step["blob"])
            rec["blob_bytes"] = len(data)
            result = ref.seq_state_set(data, step["seq"], step.get("flags", 0))
        elif op == "state_set":
            data = self.blob(step["blob"])
            rec["blob_bytes"] = len(data)
            result = ref.state_set(data)
        elif op != "none":
            raise ValueError(f"unknown op {op!r}")
        rec["result"] = result
        # key order as in the shared runs: args, result, logits, note, then the state
        for k in ("logits", "logits_shape", "note"):
            if k in rec:
                rec[k] = rec.pop(k)
        seq_blobs = [ref.seq_state(s) for s in range(N_SEQ)]
        whole = ref.state()
        rec["pos"] = [ref.pos(s) for s in range(N_SEQ)]
        rec["seq_state_bytes"] = [len(b) for b in seq_blobs]
        rec["state_bytes"] = len(whole)
        rec["seq_state"] = [self.put(b) for b in seq_blobs]
        rec["state"] = self.put(whole)
        if self.partial:
            rec["seq_state_partial"] = [self.put(ref.seq_state_partial(s)) for s in range(N_SEQ)]
        self.steps.append(rec)
        return rec


# --------------------------------------------------------------------------------------
# the scenario
# --------------------------------------------------------------------------------------


def token(seq: int, pos: int, step: int) -> int:
    """A deterministic token id in [4, 64) (no special tokens)."""
    return 4 + (7 + 11 * seq + 29 * pos + 13 * step) % 60


class Scenario:
    """Builds each step from the reference's current positions, and runs it."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def pos_max(self, seq: int) -> int:
        return self.rec.ref.pos(seq)[1]

    def toks(self, seq: int, n: int, *, out: str = "last", start: int | None = None) -> list:
        """``n`` tokens of ``seq`` continuing its positions (``out``: last / all / none)."""
        p = self.pos_max(seq) + 1 if start is None else start
        i = len(self.rec.steps)
        return [
            [token(seq, p + k, i), p + k, [seq], out == "all" or (out == "last" and k == n - 1)]
            for k in range(n)
        ]

    def decode(self, items: list, note: str) -> dict[str, Any]:
        return self.rec.run({"op": "decode", "items": items, "note": note})

    def op(self, op: str, note: str | None = None, **args: Any) -> dict[str, Any]:
        step: dict[str, Any] = {"op": op, **args}
        if note:
            step["note"] = note
        return self.rec.run(step)


def scenario(
    sc: Scenario, *, kshift: bool, shared: bool, n_rs_seq: int, seq_shift: bool = True
) -> None:
    """The shared runs' scenario (tests/data/runs/*.json), with two variants.

    ``shared``: multi-sequence tokens are accepted (a unified attention memory), so the
    tail uses a prompt shared by seqs 2 and 3; else it copies seq 1 over seq 2 and then
    sends a multi-sequence batch that the sequential splitter refuses (decode -> 1).
    Not ``kshift``: ``seq_add`` / ``seq_div`` are recorded, but the pending K-shift is then
    dropped by a whole-state restore instead of being applied by a decode.
    ``n_rs_seq`` > 0: recurrent rollbacks (``seq_rm`` of the last 1 and ``n_rs_seq`` tokens,
    one refused while another is pending), each followed by a decode that reads the
    rolled-back state.
    Not ``seq_shift`` (M-RoPE models: the reference asserts ``n_pos_per_embd() == 1`` in
    ``seq_add`` / ``seq_div``): neither op is played; the decodes around them still are.
    """
    tk = sc.toks
    sc.op("none", "fresh context")
    prompt = tk(0, 5, out="none") + tk(1, 6) + tk(0, 5, start=5) + tk(2, 3)
    sc.decode(prompt, "multi-seq prompt batch, interleaved")
    sc.decode(tk(0, 1) + tk(1, 1) + tk(2, 1), "one token per sequence")
    sc.op("seq_cp", "fork seq 0 -> 3", src=0, dst=3, p0=-1, p1=-1)
    sc.decode(tk(0, 1) + tk(3, 2), "forks diverge")
    if n_rs_seq:
        p = sc.pos_max(3)
        sc.op("seq_rm", "roll back seq 3's last token (1 <= n_rs_seq)", seq=3, p0=p, p1=-1)
        p = sc.pos_max(3)
        sc.op("seq_rm", "a second rollback while one is pending is refused", seq=3, p0=p, p1=-1)
        sc.decode(tk(3, 1), "seq 3 continues from the rolled-back state")
    sc.op("seq_rm", "remove the last 3 positions of seq 1", seq=1, p0=4, p1=-1)
    sc.op("seq_rm", "remove positions [2,5) of seq 0", seq=0, p0=2, p1=5)
    if n_rs_seq:
        sc.decode(tk(1, n_rs_seq + 1), f"seq 1 continues ({n_rs_seq + 1} tokens)")
        p = sc.pos_max(1) - n_rs_seq + 1
        sc.op("seq_rm", f"roll back {n_rs_seq} tokens of seq 1 (= n_rs_seq)", seq=1, p0=p, p1=-1)
        sc.decode(tk(1, 1), "seq 1 continues from the rolled-back state")
    else:
        sc.decode(tk(1, 2), "seq 1 continues")
    before_shift = sc.rec.steps[-1]["state"]
    if not seq_shift:
        sc.decode(tk(2, 1) + tk(3, 1), "seqs 2 and 3 advance (no seq_add: M-RoPE)")
        sc.decode(tk(3, 1), "seq 3 advances (no seq_div: M-RoPE)")
    elif not kshift:
        sc.op("seq_add", "shift seq 2 by +5 (K-shift pending)", seq=2, p0=0, p1=-1, delta=5)
        sc.op("seq_div", "seq 3 positions /= 2", seq=3, p0=0, p1=-1, d=2)
        sc.op(
            "state_set",
            "whole restore of the state before the shifts (drops the pending K-shift)",
            blob=before_shift,
        )
        sc.decode(tk(2, 1) + tk(3, 1), "decode after the restore")
        sc.decode(tk(3, 1), "seq 3 advances")
    else:
        sc.op("seq_add", "shift seq 2 by +5 (K-shift pending)", seq=2, p0=0, p1=-1, delta=5)
        sc.decode(tk(2, 1) + tk(3, 1), "decode after shift (applies pending K-shift)")
        sc.op("seq_div", "seq 3 positions /= 2", seq=3, p0=0, p1=-1, d=2)
        sc.decode(tk(3, 1), "decode after seq_div")
    saved = sc.rec.steps[-1]
    sc.op("seq_rm", "remove seq 1 entirely", seq=1, p0=-1, p1=-1)
    sc.op(
        "state_seq_set",
        "restore seq 1 from its state saved above",
        blob=saved["seq_state"][1],
        seq=1,
    )
    sc.op("state_seq_set", "load seq 0's state into seq 2", blob=saved["seq_state"][0], seq=2)
    truncated = sc.rec.blob(saved["seq_state"][0])[:-7]
    sc.op("state_seq_set", "truncated blob -> restore fails (0)", blob=sc.rec.put(truncated), seq=3)
    sc.decode(tk(0, 1) + tk(1, 1) + tk(2, 1) + tk(3, 2), "all sequences advance")
    sc.op("seq_keep", "keep only seq 1", seq=1)
    sc.decode(tk(0, 2) + tk(1, 1), "seq 0 restarts, seq 1 advances")
    sc.op("seq_rm", "seq_id -1, whole range: remove all", seq=-1, p0=-1, p1=-1)
    sc.decode(tk(0, 3) + tk(1, 3) + tk(2, 3) + tk(3, 3), "fresh prompts for all sequences")
    sc.op("clear", "llama_memory_clear(data=true)", data=True)
    sc.op("state_set", "restore the whole state saved above", blob=saved["state"])
    sc.decode(tk(0, 1) + tk(1, 1) + tk(2, 1) + tk(3, 1), "decode after whole restore")
    sc.decode(tk(0, 1, start=sc.pos_max(0) + 3), "position gap -> decode fails (-1)")
    sc.op("seq_rm", "seq_id -1 with a partial range", seq=-1, p0=1, p1=3)
    if shared:
        sc.op("seq_rm", seq=2, p0=-1, p1=-1)
        sc.op("seq_rm", seq=3, p0=-1, p1=-1)
        i = len(sc.rec.steps)
        both = [[token(2, p, i), p, [2, 3], p == 3] for p in range(4)]
        sc.decode(both + tk(0, 1), "prompt shared by seqs 2 and 3 (multi-seq tokens)")
        sc.decode(tk(2, 1) + tk(3, 2), "shared-prefix sequences diverge")
        sc.op("seq_rm", "drop seq 3; shared cells now belong to seq 2 only", seq=3, p0=-1, p1=-1)
    else:
        sc.op("seq_cp", "copy seq 1 over non-empty seq 2", src=1, dst=2, p0=-1, p1=-1)
        sc.decode(tk(1, 1) + tk(2, 1), "seq 1 and its copy diverge")
        sc.op("seq_rm", seq=2, p0=-1, p1=-1)
        sc.op("seq_rm", seq=3, p0=-1, p1=-1)
        i = len(sc.rec.steps)
        both = [[token(2, p, i), p, [2, 3], p == 1] for p in range(2)]
        note = "multi-seq tokens with a sequential splitter -> no ubatch, decode fails"
        sc.decode(both, note)
    if not seq_shift:
        sc.op("seq_rm", "remove a prefix of seq 0 (no seq_add: M-RoPE)", seq=0, p0=0, p1=2)
        sc.decode(tk(0, 1), "decode after the removal")
        return
    note = "negative shift of a prefix (cells with pos<0 are removed)"
    sc.op("seq_add", note, seq=0, p0=0, p1=3, delta=-2)
    if kshift:
        sc.decode(tk(0, 1), "decode after negative shift")


def fill_scenario(sc: Scenario, *, n_cells: int, kshift: bool) -> None:
    """Run a unified cache of ``n_cells`` cells (256 or 512) out of cells, with holes.

    Multi-ubatch prompts fill it (an SWA cache of 256 cells wraps and reuses masked
    cells); tail and middle removals leave holes that the next batch fills without
    being contiguous; a batch that does not fit fails (decode -> 1, nothing placed); a
    negative ``seq_add`` frees a prefix (not ``kshift``: a removal instead); ``seq_keep``,
    a whole-state round trip that compacts the cells to [0, n), a decode after it, a
    truncated whole state (the restore fails) and a decode after that.
    """
    tk = sc.toks
    k = n_cells // 256  # 1 or 2: token counts scale with the cache
    sc.op("none", "fresh context")
    sc.decode(
        tk(0, 40 * k) + tk(1, 40 * k) + tk(2, 40 * k) + tk(3, 40 * k),
        "four prompts in one batch (several ubatches)",
    )
    sc.decode(tk(0, 24 * k) + tk(1, 24 * k) + tk(2, 24 * k) + tk(3, 24 * k), "the cache is full")
    sc.op("seq_rm", "free the tail of seq 1", seq=1, p0=30 * k, p1=-1)
    sc.op("seq_rm", "free a middle range of seq 2", seq=2, p0=10 * k, p1=20 * k)
    n = 10 * k
    sc.decode(
        tk(0, n) + tk(1, n) + tk(2, n) + tk(3, n),
        "refill the freed cells (not contiguous; fails if too few)",
    )
    sc.decode(
        tk(0, 3) + tk(1, 3) + tk(2, 3) + tk(3, 3),
        "12 more tokens (decode fails (1) if the cache is full)",
    )
    sc.op("seq_rm", "drop seq 3", seq=3, p0=-1, p1=-1)
    sc.decode(tk(0, 3) + tk(1, 3) + tk(2, 3) + tk(3, 3), "the same batch fits now")
    if kshift:
        sc.op("seq_add", "shift out a prefix of seq 0", seq=0, p0=0, p1=20 * k, delta=-20 * k)
        sc.decode(tk(0, 4) + tk(2, 4), "decode after the shift")
    else:
        sc.op("seq_rm", "free a prefix of seq 0", seq=0, p0=0, p1=20 * k)
        sc.decode(tk(0, 4) + tk(2, 4), "decode after the removal")
    sc.op("seq_keep", "keep only seq 2", seq=2)
    sc.decode(tk(0, 8) + tk(1, 8) + tk(2, 8) + tk(3, 8), "sequences restart beside seq 2")
    saved = sc.rec.steps[-1]
    sc.op("clear", "llama_memory_clear(data=true)", data=True)
    sc.op("state_set", "whole restore: the cells are compacted to [0, n)", blob=saved["state"])
    sc.decode(tk(0, 2) + tk(1, 2) + tk(2, 2) + tk(3, 2), "decode after the whole restore")
    truncated = sc.rec.blob(sc.rec.steps[-1]["state"])[:-7]
    sc.op("state_set", "truncated whole state -> restore fails (0)", blob=sc.rec.put(truncated))
    sc.decode(tk(0, 2) + tk(1, 2) + tk(2, 2) + tk(3, 2), "decode after the failed restore")


def checkpoint_scenario(sc: Scenario) -> None:
    """Context checkpoints as llama-server takes them: ``PARTIAL_ONLY`` states (the SWA
    cache of iSWA, the recurrent part of hybrids; every step records them as
    ``seq_state_partial``), restored with the same flag, then the tail removed.
    """
    tk = sc.toks
    sc.op("none", "fresh context")
    sc.decode(tk(0, 20) + tk(1, 12), "two prompts")
    ckpt = sc.rec.steps[-1]["seq_state_partial"][0]
    p_ckpt = sc.pos_max(0)
    sc.decode(tk(0, 6) + tk(1, 1), "seq 0 moves on (its window slides)")
    sc.op("state_seq_set", "restore seq 0's checkpoint (PARTIAL_ONLY)", blob=ckpt, seq=0, flags=1)
    p1 = p_ckpt + 1
    sc.op("seq_rm", "drop seq 0's tokens after the checkpoint", seq=0, p0=p1, p1=-1)
    sc.decode(tk(0, 2, start=p1), "seq 0 continues from the checkpoint")
    sc.op("state_seq_set", "seq 0's checkpoint into empty seq 2", blob=ckpt, seq=2, flags=1)
    truncated = sc.rec.blob(ckpt)[:-5]
    note = "truncated checkpoint -> restore fails (0)"
    sc.op("state_seq_set", note, blob=sc.rec.put(truncated), seq=1, flags=1)
    sc.decode(tk(0, 1) + tk(1, 1) + tk(2, 1), "all sequences advance")
    full = sc.rec.steps[-1]["seq_state"][1]
    sc.op("state_seq_set", "a full state of seq 1 into seq 3", blob=full, seq=3)
    sc.op(
        "state_seq_set",
        "seq 1's checkpoint over seq 3",
        blob=sc.rec.steps[-2]["seq_state_partial"][1],
        seq=3,
        flags=1,
    )
    sc.decode(tk(3, 2), "seq 3 continues")


def ops_scenario(sc: Scenario) -> None:
    """Sequence ops with unusual arguments on a unified memory (partial copies, overlapping
    and middle-range shifts, zero deltas, divisor 1, a shift that drops a whole sequence,
    ``seq_keep`` of an absent sequence), each followed by the state, with decodes between.
    """
    tk = sc.toks
    sc.op("none", "fresh context")
    sc.decode(tk(0, 12) + tk(1, 8), "two prompts")
    sc.op("seq_cp", "copy positions [3, 8) of seq 0 to seq 2", src=0, dst=2, p0=3, p1=8)
    sc.op(
        "seq_cp", "copy positions [0, 4) of seq 1 to seq 2 (pos 3 twice)", src=1, dst=2, p0=0, p1=4
    )
    sc.decode(tk(2, 1), "seq 2 continues after its copies")
    sc.op("seq_add", "shift the middle [4, 8) of seq 0 by +3", seq=0, p0=4, p1=8, delta=3)
    sc.op("seq_div", "divide [2, inf) of seq 1 by 3", seq=1, p0=2, p1=-1, d=3)
    sc.op("seq_rm", "remove [6, 9) of seq 0", seq=0, p0=6, p1=9)
    sc.decode(tk(0, 2) + tk(1, 1) + tk(2, 1), "decode with shifts pending")
    sc.op("seq_cp", "fork seq 2 -> 3", src=2, dst=3, p0=-1, p1=-1)
    sc.op("seq_rm", "drop seq 2", seq=2, p0=-1, p1=-1)
    sc.op("seq_add", "delta 0 changes nothing", seq=1, p0=0, p1=-1, delta=0)
    sc.op("seq_div", "divisor 1 changes nothing", seq=0, p0=0, p1=-1, d=1)
    sc.op("seq_add", "shift all of seq 3 below 0 (removed)", seq=3, p0=-1, p1=-1, delta=-100)
    sc.decode(tk(0, 1) + tk(1, 1) + tk(3, 2), "decode after the removals")
    sc.op("seq_add", "shift [5, 7) of seq 3 (beyond its cells)", seq=3, p0=5, p1=7, delta=4)
    sc.op("seq_keep", "keep seq 2, which is absent: everything goes", seq=2)
    sc.decode(tk(0, 3) + tk(1, 3), "fresh prompts")


# --------------------------------------------------------------------------------------
# what the reference built (the run's "memory" section)
# --------------------------------------------------------------------------------------


def _log_value(log: list[str], key: str) -> str:
    pat = re.compile(rf"^{re.escape(key)}\s*=\s*(.*)$")
    for line in log:
        m = pat.match(line.split(": ", 1)[-1].strip())
        if m:
            return m.group(1).strip()
    raise KeyError(key)


def _log_ints(log: list[str], key: str, n: int) -> list[int]:
    """A print_info per-layer value: a scalar (broadcast) or ``[a, b, ...]``."""
    v = _log_value(log, key)
    if v.startswith("["):
        return [int(x) for x in v.strip("[]").split(",")]
    return [int(v)] * n


@dataclass
class _LoggedCache:
    kind: str  # "kv" | "recurrent"
    layers: list[int]
    size: int = 0
    n_seq_max: int = 0
    n_stream: int = 0
    type_k: str = ""
    type_v: str = ""
    n_rs_seq: int = 0
    role: str = ""  # "base" / "swa" for the parts of an iSWA cache


def _caches_from_log(log: list[str]) -> list[_LoggedCache]:
    """The caches llama.cpp created, in creation order, from its log lines."""
    caches: list[_LoggedCache] = []
    cur: _LoggedCache | None = None
    role = ""
    for line in log:
        if "creating non-SWA KV cache" in line:
            role = "base"
        elif "creating     SWA KV cache" in line:
            role = "swa"
        m = re.match(r"llama_kv_cache: layer\s+(\d+): (dev|filtered)", line)
        if m:
            if cur is None or cur.kind != "kv" or cur.size:
                cur = _LoggedCache("kv", [], role=role)
                caches.append(cur)
            if m.group(2) == "dev":
                cur.layers.append(int(m.group(1)))
            continue
        m = re.match(
            r"llama_kv_cache: size = .*\(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\), "
            r"K \((\w+)\).*V \((\w+)\)",
            line,
        )
        if m:
            assert cur is not None and cur.kind == "kv"
            cur.size, n_layers = int(m.group(1)), int(m.group(2))
            assert n_layers == len(cur.layers), line
            cur.n_seq_max, cur.n_stream = int(m.group(3)), int(m.group(4))
            cur.type_k, cur.type_v = m.group(5), m.group(6)
            role = ""
            continue
        m = re.match(r"llama_memory_recurrent[,:] layer\s+(\d+): (dev|skipped)", line)
        if m:
            if cur is None or cur.kind != "recurrent" or cur.size:
                cur = _LoggedCache("recurrent", [])
                caches.append(cur)
            if m.group(2) == "dev":
                cur.layers.append(int(m.group(1)))
            continue
        m = re.match(
            r"llama_memory_recurrent: size = .*\(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+) seqs\s+(\d+) rs_seq\)",
            line,
        )
        if m:
            assert cur is not None and cur.kind == "recurrent"
            cur.size, cur.n_seq_max, cur.n_rs_seq = (
                int(m.group(1)),
                int(m.group(3)),
                int(m.group(4)),
            )
    return caches


class _Blob:
    def __init__(self, data: bytes, off: int = 0) -> None:
        self.data, self.off = data, off

    def take(self, fmt: str) -> tuple:
        v = struct.unpack_from("<" + fmt, self.data, self.off)
        self.off += struct.calcsize("<" + fmt)
        return v

    def skip(self, n: int) -> None:
        self.off += n


def _kv_part_headers(
    b: _Blob, n_layers: int, has_ext: bool, has_v: bool = True
) -> tuple[int, list[dict[str, Any]] | None]:
    """Parse one whole-state KV part (b.2); return (n_stream, the data headers of the
    first non-empty stream: per layer k type / row bytes, v type / row bytes, v_trans).
    Not ``has_v`` (MLA): the layers have no V section (v row bytes 0)."""
    (n_stream,) = b.take("I")
    found = None
    for _ in range(n_stream):
        (count,) = b.take("I")
        if count == 0:
            continue
        for _ in range(count):
            _pos, n_seq = b.take("iI")
            if has_ext:
                b.skip(12)
            b.skip(4 * n_seq)
        v_trans, n_layer = b.take("II")
        assert n_layer == n_layers, (n_layer, n_layers)
        layers: list[dict[str, Any]] = [{} for _ in range(n_layer)]
        for lay in layers:
            k_type, k_row = b.take("iQ")
            lay.update(k_type=k_type, k_row_bytes=k_row, v_trans=bool(v_trans))
            b.skip(count * k_row)
        for lay in layers:
            if not has_v:
                lay.update(v_type=None, v_row_bytes=0)
                continue
            if not v_trans:
                v_type, v_row = b.take("iQ")
                b.skip(count * v_row)
            else:
                v_type, el, n_embd_v = b.take("iII")
                v_row = el * n_embd_v
                b.skip(count * v_row)
            lay.update(v_type=v_type, v_row_bytes=v_row)
        if found is None:
            found = layers
    return n_stream, found


def _rs_part_headers(b: _Blob, n_layers: int) -> list[dict[str, Any]]:
    """Parse one whole-state recurrent part (b.3); per layer r/s type and row bytes."""
    (count,) = b.take("I")
    for _ in range(count):
        _pos, n_seq = b.take("iI")
        b.skip(4 * n_seq)
    s_trans, _n_layer_total = b.take("II")
    assert s_trans == 0
    layers: list[dict[str, Any]] = [{} for _ in range(n_layers)]
    for lay in layers:
        r_type, r_row = b.take("iQ")
        lay.update(r_type=r_type, r_row_bytes=r_row)
        b.skip(count * r_row)
    for lay in layers:
        s_type, s_row = b.take("iQ")
        lay.update(s_type=s_type, s_row_bytes=s_row)
        b.skip(count * s_row)
    return layers


def _meta_u32(ref: Reference, key: str) -> int:
    """A model metadata value as an int (0 when the key is absent)."""
    buf = ctypes.create_string_buffer(64)
    n = ref.L.llama_model_meta_val_str(ref.model, key.encode(), buf, len(buf))
    return int(buf.value) if n >= 0 else 0


def memory_section(ref: Reference, cfg: RunConfig, wholes: list[bytes]) -> tuple[dict, dict]:
    """(model_info, memory) of the run, from what llama.cpp logged and wrote."""
    lc, log = ref.L, ref.log
    arch = _log_value(log, "arch")
    n_layer = lc.llama_model_n_layer(ref.model)
    n_swa = int(_log_value(log, "n_swa"))
    is_swa = [False] * n_layer
    for line in log:
        m = re.match(r"load_tensors: layer\s+(\d+) assigned to device \w+, is_swa = (\d)", line)
        if m and int(m.group(1)) < n_layer:
            is_swa[int(m.group(1))] = m.group(2) == "1"
    k_gqa = _log_ints(log, "n_embd_k_gqa", n_layer)
    v_gqa = _log_ints(log, "n_embd_v_gqa", n_layer)
    caches = _caches_from_log(log)
    # the reference logs no swa_type: standard unless a family names the arch's (llama4: chunked)
    swa_name = next(
        (f.SWA_TYPES[arch] for f in FAMILIES if arch in getattr(f, "SWA_TYPES", {})), "standard"
    )
    recurrent_layers = {il for c in caches if c.kind == "recurrent" for il in c.layers}
    is_recurrent = bool(lc.llama_model_is_recurrent(ref.model))
    is_hybrid = bool(lc.llama_model_is_hybrid(ref.model))
    rope_type = int(lc.llama_model_rope_type(ref.model))
    model_info = {
        "n_layer": n_layer,
        "n_swa": n_swa,
        "rope_type": rope_type,
        "is_recurrent": is_recurrent,
        "is_hybrid": is_hybrid,
        "n_vocab": ref.n_vocab,
    }

    # the blob headers: the first whole state in which every KV part has a non-empty
    # stream (and, for recurrent parts, any state: their data header is always written)
    # cells carry (x, y) positions when the model uses M-RoPE / interleaved M-RoPE
    has_ext = rope_type in MROPE_TYPES
    # llama_hparams::is_mla (key_length_mla and value_length_mla set): K-only caches
    mla = [_meta_u32(ref, f"{arch}.attention.{kv}_length_mla") for kv in ("key", "value")]
    has_v = not all(mla)
    headers: list[Any] | None = None
    for whole in wholes:
        b = _Blob(whole)
        (n,) = b.take("I")
        b.skip(n)
        got: list[Any] = []
        for c in caches:
            if c.kind == "kv":
                n_stream, lays = _kv_part_headers(b, len(c.layers), has_ext, has_v)
                assert n_stream == c.n_stream
                got.append(lays)
            else:
                got.append(_rs_part_headers(b, len(c.layers)))
        assert b.off == len(whole), "trailing bytes after the memory parts"
        if all(g is not None for g in got):
            headers = got
            break
    if headers is None:
        raise RuntimeError("no recorded whole state has every KV part non-empty")

    kinds = [c.kind for c in caches]
    iswa = [c.role for c in caches if c.kind == "kv"] == ["base", "swa"]
    if kinds == ["kv"]:
        mem_type, names = "kv_cache", ["kv"]
    elif kinds == ["kv", "kv"] and iswa:
        mem_type, names = "kv_cache_iswa", ["base", "swa"]
    elif kinds == ["recurrent"]:
        mem_type, names = "recurrent", ["recr"]
    elif kinds == ["kv", "recurrent"]:
        mem_type, names = "hybrid", ["attn", "recr"]
    elif kinds == ["kv", "kv", "recurrent"] and iswa:
        mem_type, names = "hybrid_iswa", ["attn_base", "attn_swa", "recr"]
    else:
        raise RuntimeError(f"unexpected caches {kinds}")

    parts = []
    n_r = n_s = 0
    for c, name, hdr in zip(caches, names, headers, strict=True):
        if c.kind == "kv":
            v_trans = hdr[0]["v_trans"] if hdr else None
            parts.append(
                {
                    "kind": "kv",
                    "name": name,
                    "kv_size": c.size,
                    "n_pad": 1,
                    "n_stream": c.n_stream,
                    "n_seq_max": c.n_seq_max,
                    "n_swa": n_swa if c.role == "swa" or (not iswa and n_swa) else 0,
                    "swa_type": swa_name if c.role == "swa" else "none",
                    "v_trans": v_trans if hdr else not cfg.flash_attn,
                    "has_cell_ext": has_ext,
                    "k_type": c.type_k,
                    "v_type": c.type_v,
                    "layers": [
                        {
                            "il": il,
                            "n_embd_k_gqa": k_gqa[il],
                            "n_embd_v_gqa": v_gqa[il],
                            "has_v": has_v,
                            "k_row_bytes": lay["k_row_bytes"],
                            "v_row_bytes": lay["v_row_bytes"],
                        }
                        for il, lay in zip(c.layers, hdr, strict=True)
                    ],
                }
            )
            for lay in hdr:
                assert GGML_TYPE_NAMES[lay["k_type"]] == c.type_k
                assert not has_v or GGML_TYPE_NAMES[lay["v_type"]] == c.type_v
        else:
            n_r = hdr[0]["r_row_bytes"] // 4
            n_s = hdr[0]["s_row_bytes"] // 4
            parts.append(
                {
                    "kind": "recurrent",
                    "name": name,
                    "mem_size": c.size,
                    "n_seq_max": c.n_seq_max,
                    "n_layer_total": n_layer,
                    "n_rs_seq": c.n_rs_seq,
                    "s_trans": False,
                    "r_type": GGML_TYPE_NAMES[hdr[0]["r_type"]],
                    "s_type": GGML_TYPE_NAMES[hdr[0]["s_type"]],
                    "layers": [
                        {
                            "il": il,
                            "n_embd_r": lay["r_row_bytes"] // 4,
                            "n_embd_s": lay["s_row_bytes"] // 4,
                            "r_row_bytes": lay["r_row_bytes"],
                            "s_row_bytes": lay["s_row_bytes"],
                            "has_ple": False,
                        }
                        for il, lay in zip(c.layers, hdr, strict=True)
                    ],
                }
            )
    has_kv = "kv" in kinds
    n_stream = next((c.n_stream for c in caches if c.kind == "kv"), None)
    memory = {
        "type": mem_type,
        "arch": arch,
        "n_seq_max": lc.llama_n_seq_max(ref.ctx),
        "kv_unified": _log_value(log, "kv_unified") == "true",
        "n_stream": n_stream,
        "flash_attn": _log_value(log, "flash_attn") == "enabled",
        "v_trans": parts[0]["v_trans"] if has_kv else None,
        "swa_full": cfg.swa_full,
        "n_ctx": lc.llama_n_ctx(ref.ctx),
        "n_ctx_seq": lc.llama_n_ctx_seq(ref.ctx),
        "n_batch": lc.llama_n_batch(ref.ctx),
        "n_ubatch": lc.llama_n_ubatch(ref.ctx),
        "n_swa": n_swa,
        "swa_type": swa_name if n_swa and any(is_swa) else "none",
        "type_k": cfg.type_k,
        "type_v": cfg.type_v,
        "layers": [
            {
                "il": il,
                "recurrent": il in recurrent_layers,
                "swa": is_swa[il],
                "n_embd_k_gqa": k_gqa[il],
                "n_embd_v_gqa": v_gqa[il],
                "n_embd_r": n_r if il in recurrent_layers else 0,
                "n_embd_s": n_s if il in recurrent_layers else 0,
            }
            for il in range(n_layer)
        ],
        "parts": parts,
        "can_shift": ref.can_shift(),
    }
    return model_info, memory


# --------------------------------------------------------------------------------------
# one run (child process) and the driver (parent)
# --------------------------------------------------------------------------------------


def record_run(cfg: RunConfig, out: Path) -> Path:
    """Record one run into ``out`` (runs/, blobs/; the model must be in out/models)."""
    model_path = out / "models" / cfg.model_file
    cp = cfg.context_params()
    ref = Reference(model_path, cp)
    rec = Recorder(ref)
    # a unified attention memory accepts multi-sequence tokens; recurrent memory and one
    # stream per sequence refuse them (the sequential splitter)
    shared = cfg.kv_unified and not bool(ref.L.llama_model_is_recurrent(ref.model))
    # a family's own scenario, named by the run's scenario label (family SCENARIOS)
    custom = next(
        (
            f.SCENARIOS[cfg.scenario]
            for f in FAMILIES
            if cfg.scenario in getattr(f, "SCENARIOS", {})
        ),
        None,
    )
    if custom is not None:
        custom(Scenario(rec))
    elif cfg.play == Play.CHECKPOINT:
        rec.partial = True
        checkpoint_scenario(Scenario(rec))
    elif cfg.play == Play.OPS:
        ops_scenario(Scenario(rec))
    elif cfg.play == Play.FILL:
        fill_scenario(Scenario(rec), n_cells=cfg.n_ctx, kshift=cfg.kshift)
    else:
        mrope = int(ref.L.llama_model_rope_type(ref.model)) in MROPE_TYPES
        scenario(
            Scenario(rec),
            kshift=cfg.kshift,
            shared=shared,
            n_rs_seq=cfg.n_rs_seq,
            seq_shift=cfg.seq_shift and not mrope,
        )
    wholes = [rec.blobs[s["state"]] for s in rec.steps]
    model_info, memory = memory_section(ref, cfg, wholes)
    run = {
        "name": cfg.name,
        "model": cfg.model,
        "model_file": cfg.model_file,
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "scenario": cfg.scenario,
        "context_params": cp,
        "model_info": model_info,
        "memory": memory,
        "seq_magic": SEQ_MAGIC,
        "n_seq": N_SEQ,
        "steps": rec.steps,
    }
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "blobs").mkdir(parents=True, exist_ok=True)
    for bid, data in rec.blobs.items():
        f = out / "blobs" / f"{bid}.bin"
        if not f.exists():
            f.write_bytes(data)
    path = out / "runs" / f"{cfg.name}.json"
    path.write_text(dump_run(run))
    return path


def dump_run(run: dict[str, Any]) -> str:
    """The run as JSON in the shared runs' layout: one line per key of the run and of its
    ``memory`` section, one line per layer, part and step."""

    def c(v: Any) -> str:
        return json.dumps(v, separators=(",", ":"))

    def block(items: list[str], indent: str, open_: str, close: str) -> str:
        return f"{open_}\n" + ",\n".join(indent + x for x in items) + f"\n{indent[:-1]}{close}"

    def value(k: str, v: Any, indent: str) -> str:
        if k == "memory":
            keys = [f"{json.dumps(mk)}: {value(mk, mv, indent + ' ')}" for mk, mv in v.items()]
            return block(keys, indent + " ", "{", "}")
        if k in ("layers", "parts", "steps"):
            return block([c(x) for x in v], indent + " ", "[", "]")
        return json.dumps(v, separators=(", ", ": "))

    lines = [f"{json.dumps(k)}: {value(k, v, ' ')}" for k, v in run.items()]
    return block(lines, " ", "{", "}") + "\n"


def verify_run(path: Path) -> int:
    """Re-drive a recorded run's steps verbatim; count the differences (0 = identical)."""
    run = json.loads(path.read_text())
    root = path.parent.parent
    ref = Reference(root / "models" / run["model_file"], run["context_params"])
    rec = Recorder(ref, partial=any("seq_state_partial" in st for st in run["steps"]))
    n_diff = 0
    for st in run["steps"]:
        step = {k: st[k] for k in st if k in _ARG_KEYS}
        for k in ("blob",):
            if k in step:
                rec.blobs[step[k]] = (root / "blobs" / f"{step[k]}.bin").read_bytes()
        got = rec.run(step)
        for k in (
            "result",
            "pos",
            "seq_state_bytes",
            "state_bytes",
            "seq_state",
            "state",
            "logits",
            "seq_state_partial",
        ):
            if k in st and got.get(k) != st[k]:
                n_diff += 1
                print(f"step {st['i']} ({st['op']}): {k} differs: {got.get(k)} != {st.get(k)}")
    print(f"{path.name}: {len(run['steps'])} steps, {n_diff} differences")
    return n_diff


_ARG_KEYS = (
    "op",
    "items",
    "seq",
    "src",
    "dst",
    "p0",
    "p1",
    "delta",
    "d",
    "data",
    "blob",
    "flags",
    "note",
)


def write_models(out: Path, names: set[str]) -> None:
    from models import MODEL_WRITERS as writers

    writers = dict(writers)
    for family in FAMILIES:
        clash = writers.keys() & family.MODEL_WRITERS.keys()
        assert not clash, f"{family.__name__} rewrites {sorted(clash)}"
        writers.update(family.MODEL_WRITERS)
    (out / "models").mkdir(parents=True, exist_ok=True)
    for name in sorted(names):
        dst = out / "models" / name
        if name in writers:
            writers[name](dst)
        elif not dst.exists():
            shutil.copyfile(DATA / "models" / name, dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help=f"run names (default: all of {sorted(RUNS_BY_NAME)})")
    ap.add_argument("--out", type=Path, default=DATA, help="output root (runs/, blobs/, models/)")
    ap.add_argument("--verify", type=Path, help="re-drive a recorded run and compare")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.verify:
        return 1 if verify_run(args.verify) else 0
    if args.child:
        (name,) = args.runs
        path = record_run(RUNS_BY_NAME[name], args.out)
        print(f"recorded {path}")
        return 0

    names = args.runs or [r.name for r in RUNS]
    unknown = [n for n in names if n not in RUNS_BY_NAME]
    if unknown:
        ap.error(f"unknown runs {unknown}")
    write_models(args.out, {RUNS_BY_NAME[n].model_file for n in names})
    failed = []
    for name in names:
        # a child per run: an abort of the reference loses only that run
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "--out", str(args.out), name],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            failed.append(name)
            print(
                f"{name}: FAILED (exit {proc.returncode})\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
            )
        else:
            print(proc.stdout.strip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
