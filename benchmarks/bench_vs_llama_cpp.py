"""pymem against llama.cpp (llama-cpp-python 0.3.36) on the same tiny GGUF models.

Why: pymem's memory bookkeeping runs in Python beside a model graph; the project's
target is that a decode step's bookkeeping costs at most a quarter of what the whole
``llama_decode`` of the reference costs for the same step (ratio <= 0.25). Both sides
run in this one process, on the same models and context parameters, with their steps
interleaved so that noise on the shared machine hits both. llama.cpp always runs on the
CPU with one thread (``n_threads = n_threads_batch = 1``).

Tables on stdout; a full run writes results/bench_vs_llama_cpp.json and the plots
docs/perf_decode_vs_nseq.png and docs/perf_decode_vs_nctx.png.

1. Decode step: ``n_seq`` sequences x 1 token, after each sequence got a 64-token prompt.
   llama.cpp: the wall time of the whole ``llama_decode`` (graph build and compute
   included). pymem: the bookkeeping of the same step, as ``pymem.runtime.decoder``
   does it: ``BatchAllocator.init``, a pending ``init_update`` (none here),
   ``init_batch``, then per ubatch ``apply``, ``graph_inputs`` with the KQ mask of every
   attention part (f16 with flash attention, else f32), the K/V row indices and the
   recurrent ``s_copy``, and ``next``. The ``Batch`` itself is built outside the timer,
   as the ``llama_batch`` is. Matrix: tiny-llama (KV cache), tiny-jamba (hybrid),
   tiny-gemma2 (iSWA, ``swa_full`` off on both sides) x unified / one stream per
   sequence x 32 / 64 / 256 sequences x n_ctx 4096 / 32768 / 262144 (total; with streams
   each sequence gets PAD(n_ctx / n_seq, 256) cells) x flash attention off / on. f16 K/V,
   n_ubatch 512, n_batch 2048. A configuration is skipped, with the reason printed, when
   llama.cpp refuses the context or when the prompts plus the timed steps do not fit in
   a stream. Median of the timed steps (each step adds one token per sequence).
   ``--fork``: the unified configurations with one 64-token prompt decoded into
   sequence 0 and copied to every other sequence by ``seq_cp`` on both sides (a
   parallel-sampling run: the prompt's cells are shared by all sequences). ``--tokens N``:
   N tokens per sequence a step (draft tokens verified at once, say), every one an
   output.
2. State I/O: a unified cache of n_ctx 32768 (n_seq_max 8) filled with 4 sequences x
   8192 tokens, decoded in interleaved chunks of 128 (one decode call = one chunk of each
   sequence); f16 K/V. tiny-llama with flash attention off (V transposed) and on,
   tiny-jamba (hybrid) and tiny-gemma2 (iSWA) with it off. One sequence's state
   write / read and the whole state's, pymem (``state_write``: a new blob, and
   ``state_write_buffer`` into a preallocated buffer; ``state_read``) against llama.cpp
   (``llama_state_seq_get_data`` / ``_set_data``, ``llama_state_get_data`` / ``_set_data``
   into preallocated buffers) and a numpy ``copyto`` of as many bytes (into a preallocated
   array: the write into a buffer is the like-for-like row). The one-sequence rows are
   also run "beside a fork": sequence 1 copied to 5 by ``seq_cp`` first, so that the
   stream holds cells shared by two sequences (sequence 0 holds none of them), and the
   whole state "forked" with those shared cells (its records list two ids).
   GB/s on the byte count of pymem's blob (the memory part; llama.cpp's whole-state blob
   adds its output buffers in front).
3. Sequence ops on those filled memories (flash attention off), every op of the
   interface: ``seq_rm`` of a sequence's last 16 positions (re-decoded outside the
   timer; a recurrent state cannot lose them, so on tiny-jamba both sides refuse),
   ``seq_rm`` of a whole forked sequence (the fork ``seq_cp 0 -> 5`` redone outside the
   timer), ``seq_cp`` of all its positions (the copy removed outside the timer),
   ``seq_add`` by +1 (undone outside the timer), ``seq_div`` by 2 and ``seq_keep`` (the
   whole state restored outside the timer, on both sides), and ``seq_pos_max`` /
   ``seq_pos_min`` (1,000 calls per timing, the ctypes call included). Median µs.

Run: python benchmarks/bench_vs_llama_cpp.py [--quick] [--only decode|state|ops]
(the full run takes a few minutes; ``--quick``: a handful of configurations, seconds);
``--help`` lists the filters of the decode matrix (``--models``, ``--layouts``,
``--n-seq``, ``--n-ctx``, ``--fa``) and ``--rounds`` (repeat the decode selection, or
each state row on its filled memory, and keep medians).
``python benchmarks/bench_vs_llama_cpp.py --plot`` redraws the plots from the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp
import llama_cpp.llama_cpp as lc
from _util import RESULTS, copy_target, print_table, write_results

from pymem import state_threads
from pymem.batch import Batch, BatchAllocator
from pymem.factory import ContextParams, create_memory, resolve_context
from pymem.gguf_spec import spec_from_gguf
from pymem.kv import KVCache
from pymem.memory import Memory, MemoryStatus

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "llama": ROOT / "tests/data/models/tiny-llama.gguf",  # plain KV cache
    "jamba": ROOT / "tests/data/models/tiny-jamba.gguf",  # hybrid: KV + recurrent
    "gemma2": ROOT / "tests/data/models/tiny-gemma2.gguf",  # iSWA: base + SWA cache
}
DOCS = ROOT / "docs"
TARGET = 0.25  # pymem bookkeeping / llama.cpp decode
PROMPT = 64
N_UBATCH = 512
N_BATCH = 2048
F16 = 1  # GGML_TYPE_F16


# --------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python's ctypes bindings
# --------------------------------------------------------------------------------------


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level: int, text: bytes, user: Any) -> None:
    """llama.cpp's log callback: drop every line (kept alive at module level)."""


class LlamaModels:
    """Each model loaded once (CPU), reused by every context."""

    def __init__(self) -> None:
        lc.llama_log_set(_quiet, None)
        lc.llama_backend_init()
        self._models: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self._models:
            mp = lc.llama_model_default_params()
            mp.n_gpu_layers = 0
            model = lc.llama_model_load_from_file(str(MODELS[name]).encode(), mp)
            if not model:
                raise RuntimeError(f"llama.cpp could not load {MODELS[name]}")
            self._models[name] = model
        return self._models[name]

    def close(self) -> None:
        for model in self._models.values():
            lc.llama_model_free(model)
        self._models.clear()


class LlamaContext:
    """One llama.cpp context and one reusable ``llama_batch`` of ``N_BATCH`` tokens.

    The batch's token / pos / n_seq_id / logits arrays are filled through numpy views;
    only ``llama_decode`` itself is timed.
    """

    def __init__(self, model: Any, *, n_ctx: int, n_seq_max: int, flash_attn: bool,
                 kv_unified: bool) -> None:  # fmt: skip
        p = lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_seq_max = n_seq_max
        p.n_batch = N_BATCH
        p.n_ubatch = N_UBATCH
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else 0
        p.kv_unified = kv_unified
        p.swa_full = False
        p.type_k = F16
        p.type_v = F16
        p.n_threads = 1
        p.n_threads_batch = 1
        p.offload_kqv = False
        self.ctx = lc.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model returned NULL")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        self.n_ctx = int(lc.llama_n_ctx(self.ctx))
        self.n_ctx_seq = int(lc.llama_n_ctx_seq(self.ctx))
        self.batch = lc.llama_batch_init(N_BATCH, 0, 1)
        as_np = np.ctypeslib.as_array
        self.token = as_np(self.batch.token, shape=(N_BATCH,))
        self.pos = as_np(self.batch.pos, shape=(N_BATCH,))
        self.logits = as_np(self.batch.logits, shape=(N_BATCH,))
        as_np(self.batch.n_seq_id, shape=(N_BATCH,))[:] = 1
        self.seq = np.zeros(N_BATCH, dtype=np.int32)  # what seq_id[i][0] holds now
        for i in range(N_BATCH):
            self.batch.seq_id[i][0] = 0

    def decode(self, token: np.ndarray, pos: np.ndarray, seq: np.ndarray, out: np.ndarray) -> float:
        """``llama_decode`` of one batch; returns its wall time in seconds."""
        n = len(token)
        self.token[:n] = token
        self.pos[:n] = pos
        self.logits[:n] = out
        for i in np.flatnonzero(self.seq[:n] != seq):  # only the ids that changed
            self.batch.seq_id[i][0] = int(seq[i])
            self.seq[i] = seq[i]
        self.batch.n_tokens = n
        t0 = time.perf_counter()
        res = lc.llama_decode(self.ctx, self.batch)
        t = time.perf_counter() - t0
        if res != 0:
            raise RuntimeError(f"llama_decode returned {res} for {n} tokens")
        return t

    def close(self) -> None:
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)


# --------------------------------------------------------------------------------------
# pymem: the bookkeeping of one decode call (pymem.runtime.decoder.Decoder.decode)
# --------------------------------------------------------------------------------------


def pymem_decode(mem: Memory, balloc: BatchAllocator, batch: Batch, *, n_seq_max: int,
                 n_vocab: int, flash_attn: bool, inputs: bool = True) -> float:  # fmt: skip
    """Everything pymem does for one decode call but the graph; returns seconds.

    ``inputs=False`` skips the graph inputs (used to fill caches quickly, not timed).
    """
    mask_dtype = np.float16 if flash_attn else np.float32
    t0 = time.perf_counter()
    balloc.init(batch, memory=mem, n_seq_max=n_seq_max, n_vocab=n_vocab)
    uctx = mem.init_update(False)
    if uctx.get_status() == MemoryStatus.SUCCESS:
        uctx.apply()
    mctx = mem.init_batch(balloc, N_UBATCH, False)
    if mctx.get_status() != MemoryStatus.SUCCESS:
        raise RuntimeError(
            f"pymem init_batch: {mctx.get_status().name} for {batch.n_tokens} tokens"
        )
    while True:
        mctx.apply()
        if inputs:
            gi = mctx.graph_inputs()
            for inp in gi.attn.values():
                inp.kq_mask(dtype=mask_dtype)
                inp.k_idxs, inp.v_idxs  # noqa: B018 (built by graph_inputs; read as a runtime does)
            if gi.recr is not None:
                gi.recr.s_copy  # noqa: B018
        if not mctx.next():
            break
    return time.perf_counter() - t0


def tokens_of(seq: np.ndarray, pos: np.ndarray, n_vocab: int) -> np.ndarray:
    """A deterministic token id per (seq, pos), never 0. E.g. n_vocab 8: (0, 9) -> 3."""
    return (1 + (seq * 31 + pos) % (n_vocab - 1)).astype(np.int32)


def make_memory(
    spec: Any, *, n_ctx: int, n_seq_max: int, flash_attn: bool, kv_unified: bool
) -> Memory:
    params = ContextParams(n_ctx=n_ctx, n_seq_max=n_seq_max, n_ubatch=N_UBATCH, n_batch=N_BATCH,
                           kv_unified=kv_unified, flash_attn=flash_attn, swa_full=False,
                           type_k="f16", type_v="f16")  # fmt: skip
    mem = create_memory(spec, params)
    assert mem is not None
    return mem


@dataclass
class Pair:
    """The same context on both sides, fed the same batches."""

    ref: LlamaContext
    mem: Memory
    n_seq_max: int
    flash_attn: bool

    def __post_init__(self) -> None:
        self.balloc = BatchAllocator()

    def decode_both(self, seq: np.ndarray, pos: np.ndarray, out: np.ndarray, *,
                    inputs: bool = True, ref_first: bool = True) -> tuple[float, float]:  # fmt: skip
        """(llama.cpp seconds, pymem seconds) for one batch, in the given order."""
        token = tokens_of(seq, pos, self.ref.n_vocab)
        batch = Batch(token, pos=pos.astype(np.int32), seq_id=seq.astype(np.int32),
                      output=out.astype(np.bool_))  # fmt: skip
        kw = dict(n_seq_max=self.n_seq_max, n_vocab=self.ref.n_vocab, flash_attn=self.flash_attn)
        if ref_first:
            t_ref = self.ref.decode(token, pos, seq, out)
            t_mem = pymem_decode(self.mem, self.balloc, batch, inputs=inputs, **kw)
        else:
            t_mem = pymem_decode(self.mem, self.balloc, batch, inputs=inputs, **kw)
            t_ref = self.ref.decode(token, pos, seq, out)
        return t_ref, t_mem

    def close(self) -> None:
        self.ref.close()
        self.mem.close()


# --------------------------------------------------------------------------------------
# 1. decode step
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    model: str
    unified: bool
    n_seq: int
    n_ctx: int
    flash_attn: bool
    # one prompt, decoded into sequence 0 and copied to every other by seq_cp (a parallel
    # sampling run): its cells are shared by every sequence
    fork: bool = False
    # tokens per sequence per step (> 1: draft tokens checked at once, say)
    n_tok: int = 1

    @property
    def layout(self) -> str:
        return "unified" if self.unified else "streams"

    def label(self) -> str:
        forked = " forked prompt" if self.fork else ""
        tokens = f" x {self.n_tok} tokens" if self.n_tok > 1 else ""
        return (
            f"{self.model} {self.layout} n_seq {self.n_seq}{tokens} n_ctx {self.n_ctx} "
            f"fa {int(self.flash_attn)}{forked}"
        )


def decode_configs(quick: bool, sel: Selection | None = None) -> list[DecodeConfig]:
    """The matrix (or the quick handful), narrowed to ``sel`` when given."""
    if quick:
        configs = [
            DecodeConfig("llama", True, 32, 4096, False),
            DecodeConfig("llama", False, 32, 32768, True),
            DecodeConfig("llama", False, 256, 262144, False),
            DecodeConfig("jamba", True, 64, 32768, False),
            DecodeConfig("jamba", False, 64, 32768, True),
            DecodeConfig("gemma2", True, 256, 262144, True),
            DecodeConfig("gemma2", False, 32, 4096, False),
        ]
    else:
        configs = [
            DecodeConfig(model, unified, n_seq, n_ctx, fa)
            for model in MODELS
            for unified in (True, False)
            for n_seq in (32, 64, 256)
            for n_ctx in (4096, 32768, 262144)
            for fa in (False, True)
        ]
    return configs if sel is None else [c for c in configs if sel.admits(c)]


@dataclass(frozen=True)
class Selection:
    """A sub-matrix chosen on the command line (``None`` = every value of that axis)."""

    models: tuple[str, ...] | None = None
    layouts: tuple[str, ...] | None = None
    n_seq: tuple[int, ...] | None = None
    n_ctx: tuple[int, ...] | None = None
    fa: tuple[int, ...] | None = None

    def admits(self, c: DecodeConfig) -> bool:
        return all(
            allowed is None or value in allowed
            for allowed, value in (
                (self.models, c.model), (self.layouts, c.layout), (self.n_seq, c.n_seq),
                (self.n_ctx, c.n_ctx), (self.fa, int(c.flash_attn)),
            )
        )  # fmt: skip

    @property
    def is_all(self) -> bool:
        return all(v is None for v in (self.models, self.layouts, self.n_seq, self.n_ctx, self.fa))


def n_steps(cfg: DecodeConfig, quick: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps): fewer for the big configurations (their steps are slow)."""
    if quick:
        return 2, 5
    big = cfg.n_seq == 256 or (cfg.unified and cfg.n_ctx == 262144)
    return 2, (15 if big else 31)


def bench_decode_one(models: LlamaModels, specs: dict[str, Any], cfg: DecodeConfig,
                     quick: bool) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = dict(model=cfg.model, layout=cfg.layout, n_seq=cfg.n_seq, n_ctx=cfg.n_ctx,
                               flash_attn=cfg.flash_attn)  # fmt: skip
    if cfg.fork:
        row["fork"] = True
    if cfg.n_tok > 1:
        row["n_tok"] = cfg.n_tok
    warm, timed = n_steps(cfg, quick)
    sizes = resolve_context(specs[cfg.model], ContextParams(
        n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq, n_ubatch=N_UBATCH, n_batch=N_BATCH,
        kv_unified=cfg.unified, flash_attn=cfg.flash_attn))  # fmt: skip
    need = (cfg.n_seq if cfg.unified else 1) * (PROMPT + (warm + timed) * cfg.n_tok)
    if need > sizes.n_ctx_seq:
        row["skipped"] = (
            f"does not fit: {need} tokens per stream (prompts + steps) > {sizes.n_ctx_seq} cells"
        )
        return row
    try:
        ref = LlamaContext(models.get(cfg.model), n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq,
                           flash_attn=cfg.flash_attn, kv_unified=cfg.unified)  # fmt: skip
    except RuntimeError as e:
        row["skipped"] = f"llama.cpp refused the context: {e}"
        return row
    mem = make_memory(specs[cfg.model], n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq,
                      flash_attn=cfg.flash_attn, kv_unified=cfg.unified)  # fmt: skip
    pair = Pair(ref, mem, cfg.n_seq, cfg.flash_attn)
    try:
        row["n_ctx_seq"] = ref.n_ctx_seq
        row["n_ctx_llama_cpp"] = ref.n_ctx
        row["n_ctx_pymem"] = sizes.n_ctx
        # the prompts: PROMPT tokens per sequence, as many sequences per call as N_BATCH holds;
        # forked: sequence 0's alone, then copied to the others on both sides
        per_call = N_BATCH // PROMPT
        if cfg.fork:
            pos = np.arange(PROMPT)
            pair.decode_both(np.zeros(PROMPT, dtype=np.int64), pos, pos == PROMPT - 1, inputs=False)
            for s in range(1, cfg.n_seq):
                lc.llama_memory_seq_cp(ref.mem, 0, s, -1, -1)
                mem.seq_cp(0, s, -1, -1)
        for s0 in range(0, 0 if cfg.fork else cfg.n_seq, per_call):
            seqs = np.arange(s0, min(s0 + per_call, cfg.n_seq))
            # E.g. seqs [0, 1], PROMPT 3 -> seq [0, 0, 0, 1, 1, 1], pos [0, 1, 2, 0, 1, 2]
            seq = np.repeat(seqs, PROMPT)
            pos = np.tile(np.arange(PROMPT), len(seqs))
            out = pos == PROMPT - 1
            pair.decode_both(seq, pos, out, inputs=False)
        t_ref, t_mem = [], []
        # n_tok tokens per sequence a step, every one an output. E.g. 2 sequences x 2 tokens
        # at step 0 -> seq [0, 0, 1, 1], pos [64, 65, 64, 65]
        seq = np.repeat(np.arange(cfg.n_seq), cfg.n_tok)
        out = np.ones(seq.size, dtype=bool)
        for step in range(warm + timed):
            pos = PROMPT + step * cfg.n_tok + np.tile(np.arange(cfg.n_tok), cfg.n_seq)
            tr, tm = pair.decode_both(seq, pos, out, ref_first=step % 2 == 0)
            if step >= warm:
                t_ref.append(tr)
                t_mem.append(tm)
        # both sides hold the same positions (a cheap check that they did the same work)
        for s in (0, cfg.n_seq - 1):
            p_ref = lc.llama_memory_seq_pos_max(ref.mem, s)
            last = PROMPT + (warm + timed) * cfg.n_tok - 1
            assert p_ref == mem.seq_pos_max(s) == last, (s, p_ref)
    finally:
        pair.close()
    if ref.n_ctx != sizes.n_ctx:
        row["note"] = f"n_ctx: llama.cpp {ref.n_ctx} cells, pymem {sizes.n_ctx}"
    row["steps"] = timed
    row["llama_cpp_ms"] = statistics.median(t_ref) * 1e3
    row["pymem_ms"] = statistics.median(t_mem) * 1e3
    row["ratio"] = row["pymem_ms"] / row["llama_cpp_ms"]
    return row


def bench_decode(
    quick: bool, sel: Selection | None = None, rounds: int = 1, fork: bool = False,
    n_tok: int = 1,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every selected configuration, ``rounds`` times over the whole selection; ``fork``:
    the unified ones with a forked prompt, ``n_tok`` tokens per sequence a step
    (:class:`DecodeConfig`).

    With several rounds a row keeps the median over rounds of each side's median (and the
    ratio of those), plus every round's ratio in ``ratios``: a configuration's spread
    across rounds says how much the shared machine moved the figure.
    """
    models = LlamaModels()
    specs = {name: spec_from_gguf(str(path)) for name, path in MODELS.items()}
    configs = decode_configs(quick, sel)
    if fork:  # (across streams a seq_cp copies cells: nothing is shared there)
        configs = [dataclasses.replace(c, fork=True) for c in configs if c.unified]
    if n_tok > 1:
        configs = [dataclasses.replace(c, n_tok=n_tok) for c in configs]
    per_cfg: dict[DecodeConfig, list[dict[str, Any]]] = {c: [] for c in configs}
    t_start = time.perf_counter()
    try:
        for rnd in range(rounds):
            for cfg in configs:
                t0 = time.perf_counter()
                row = bench_decode_one(models, specs, cfg, quick)
                gc.collect()
                row["wall_s"] = time.perf_counter() - t0
                per_cfg[cfg].append(row)
                what = row.get("skipped") or f"ratio {row['ratio']:.3f}"
                tag = f"[{rnd + 1}/{rounds}] " if rounds > 1 else ""
                print(f"  {tag}{cfg.label()}: {what} ({row['wall_s']:.1f} s)", flush=True)
    finally:
        models.close()
    rows = []
    for cfg in configs:
        runs = per_cfg[cfg]
        row = dict(runs[0])
        if "skipped" not in row and rounds > 1:
            row["llama_cpp_ms"] = statistics.median(r["llama_cpp_ms"] for r in runs)
            row["pymem_ms"] = statistics.median(r["pymem_ms"] for r in runs)
            row["ratio"] = row["pymem_ms"] / row["llama_cpp_ms"]
            row["ratios"] = [r["ratio"] for r in runs]
            row["rounds"] = rounds
            row["wall_s"] = sum(r["wall_s"] for r in runs)
        rows.append(row)
    print(f"decode matrix: {time.perf_counter() - t_start:.0f} s")
    done = [r for r in rows if "skipped" not in r]
    print_table(
        f"Decode step (median): llama.cpp llama_decode vs pymem bookkeeping; target ratio <= {TARGET}",
        ["model", "layout", "n_seq", "n_ctx", "cells/stream", "fa", "llama.cpp ms", "pymem ms",
         "pymem/llama.cpp", ""],
        [
            [
                r["model"], r["layout"], r["n_seq"], r["n_ctx"], r["n_ctx_seq"], int(r["flash_attn"]),
                f"{r['llama_cpp_ms']:.3f}", f"{r['pymem_ms']:.3f}", f"{r['ratio']:.3f}",
                "" if r["ratio"] <= TARGET else "MISS",
            ]
            for r in done
        ],
    )  # fmt: skip
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        print(f"\nskipped ({len(skipped)}):")
        for r in skipped:
            cfg = DecodeConfig(r["model"], r["layout"] == "unified", r["n_seq"], r["n_ctx"],
                               r["flash_attn"], r.get("fork", False),
                               r.get("n_tok", 1))  # fmt: skip
            print(f"  {cfg.label()}: {r['skipped']}")
    miss = [r for r in done if r["ratio"] > TARGET]
    print(
        f"\ntarget ratio <= {TARGET}: met by {len(done) - len(miss)} of {len(done)} configurations"
    )
    for r in sorted(miss, key=lambda r: -r["ratio"]):
        cfg = DecodeConfig(r["model"], r["layout"] == "unified", r["n_seq"], r["n_ctx"],
                           r["flash_attn"], r.get("fork", False),
                           r.get("n_tok", 1))  # fmt: skip
        print(f"  MISS {cfg.label()}: {r['ratio']:.3f} ({r['ratio'] / TARGET:.1f}x the target)")
    return rows


# --------------------------------------------------------------------------------------
# 2. state I/O and 3. sequence ops on a filled cache
# --------------------------------------------------------------------------------------

STATE_N_CTX = 32768
STATE_N_SEQ = 4
STATE_SEQ_MAX = 8  # seq_cp needs destination 5
STATE_TOKENS = 8192
STATE_CHUNK = 128


def fill_chunks(n_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The batches that fill the state benchmarks' memories: STATE_N_SEQ sequences of
    ``n_tokens``, one chunk of each per batch, as ``(seq, pos, output)``. E.g. chunk 2:
    seq [0, 0, 1, 1], pos [p0, p0 + 1] x 2, output at each chunk's last token."""
    for p0 in range(0, n_tokens, STATE_CHUNK):
        seq = np.repeat(np.arange(STATE_N_SEQ), STATE_CHUNK)
        pos = np.tile(np.arange(p0, p0 + STATE_CHUNK), STATE_N_SEQ)
        yield seq, pos, pos == p0 + STATE_CHUNK - 1


def randomize_tensors(mem: Memory) -> None:
    """Random bytes in every tensor of ``mem`` (zero after bookkeeping-only decodes)."""
    rng = np.random.default_rng(0)
    for t in tensors_of(mem):
        t.write_bytes(rng.integers(0, 255, t.nbytes, np.uint8))


def filled_pair(
    models: LlamaModels, spec: Any, flash_attn: bool, n_tokens: int, name: str = "llama"
) -> Pair:
    """Model ``name`` (tiny-llama), unified: STATE_N_SEQ sequences of ``n_tokens``, in
    interleaved chunks; pymem's K/V bytes random (its decodes are bookkeeping only)."""
    ref = LlamaContext(models.get(name), n_ctx=STATE_N_CTX, n_seq_max=STATE_SEQ_MAX,
                       flash_attn=flash_attn, kv_unified=True)  # fmt: skip
    mem = make_memory(spec, n_ctx=STATE_N_CTX, n_seq_max=STATE_SEQ_MAX, flash_attn=flash_attn,
                      kv_unified=True)  # fmt: skip
    pair = Pair(ref, mem, STATE_SEQ_MAX, flash_attn)
    for seq, pos, out in fill_chunks(n_tokens):
        pair.decode_both(seq, pos, out, inputs=False)
    randomize_tensors(mem)
    return pair


def tensors_of(mem: Memory) -> list[Any]:
    """Every K/V and R/S tensor of ``mem`` (each part's)."""
    out: list[Any] = []
    for part in mem.parts().values():
        if isinstance(part, KVCache):
            out += [t for layer in part.layers for t in (layer.k, layer.v) if t is not None]
        else:
            out += [get(il) for il in part.layers for get in (part.get_r_l, part.get_s_l)]
    return out


def interleaved(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn, in a new order each round (a
    seeded shuffle). Rotating one order kept every function after the same one: the numpy
    copy always ran right after pymem's read of the same blob (its source warm), pymem's
    read right after llama.cpp's (which evicts the caches), pymem's write into a buffer
    right after its bytes write; a shuffle gives each function the same mix of
    predecessors, so the ratios compare calls in like cache states."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(1234)
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_state(pair: Pair, repeats: int) -> list[dict[str, Any]]:
    ref, mem = pair.ref, pair.mem
    rows = []
    # "swapped in": the sequence removed first (seq_rm, timed with the read on both
    # sides), so the restore places it among the others' cells instead of back into its
    # own, as a runtime that swaps sequences in and out does. "into a cleared memory":
    # the memory cleared first (clear without data, timed with the read on both sides),
    # as a session loaded into a fresh context (pymem cannot take its same-cells path).
    # "beside a fork": sequence 1 copied to 5 first (seq_cp on both sides: cells shared by
    # two sequences in the stream; sequence 0 holds none of them), undone afterwards;
    # "whole state, forked": the whole blob with those shared cells (records of two ids);
    # "whole state, another one": the read alternates between that state and one without
    # its last sequence (a checkpoint rollback: every restore changes cells; the numpy copy
    # alternates between the two blobs' sizes too)
    cases = (("one sequence", 0, None), ("whole state", -1, None),
             ("one sequence, swapped in", 0, "seq_rm"),
             ("whole state, into a cleared memory", -1, "clear"),
             ("one sequence, beside a fork", 0, None),
             ("one sequence, beside a fork, swapped in", 0, "seq_rm"),
             ("whole state, forked", -1, None),
             ("whole state, forked, into a cleared memory", -1, "clear"),
             ("whole state, another one", -1, "another"))  # fmt: skip
    for what, seq_id, prep in cases:
        if what == "one sequence, beside a fork":
            lc.llama_memory_seq_cp(ref.mem, 1, 5, -1, -1)
            mem.seq_cp(1, 5, -1, -1)
        if prep == "another":  # (without the fork)
            lc.llama_memory_seq_rm(ref.mem, 5, -1, -1)
            mem.seq_rm(5, -1, -1)
        blob = mem.state_write(seq_id)
        n_mem = len(blob)
        if seq_id >= 0:
            n_ref = int(lc.llama_state_seq_get_size(ref.ctx, seq_id))
        else:
            n_ref = int(lc.llama_state_get_size(ref.ctx))
        buf = (ctypes.c_uint8 * n_ref)()
        # (alternating states: the writes go to their own buffer, of either state's size)
        out_ref = (ctypes.c_uint8 * n_ref)() if prep == "another" else buf

        def ref_get(buf: Any = out_ref, n_ref: int = n_ref, seq_id: int = seq_id,
                    exact: bool = prep != "another") -> None:  # fmt: skip
            if seq_id >= 0:
                n = lc.llama_state_seq_get_data(ref.ctx, buf, n_ref, seq_id)
            else:
                n = lc.llama_state_get_data(ref.ctx, buf, n_ref)
            assert n == n_ref or (not exact and 0 < n <= n_ref), (n, n_ref)

        def ref_set(buf: Any = buf, n_ref: int = n_ref, seq_id: int = seq_id,
                    prep: str | None = prep) -> None:  # fmt: skip
            if prep == "seq_rm":
                lc.llama_memory_seq_rm(ref.mem, seq_id, -1, -1)
            elif prep == "clear":
                lc.llama_memory_clear(ref.mem, False)
            if seq_id >= 0:
                n = lc.llama_state_seq_set_data(ref.ctx, buf, n_ref, seq_id)
            else:
                n = lc.llama_state_set_data(ref.ctx, buf, n_ref)
            assert n == n_ref, (n, n_ref)

        ref_get()
        if prep == "another":  # the other state's blob on both sides, then back to this one
            assert lc.llama_state_get_data(ref.ctx, buf, n_ref) == n_ref
            gone = STATE_N_SEQ - 1  # (a whole sequence: a recurrent state cannot lose a tail)
            lc.llama_memory_seq_rm(ref.mem, gone, -1, -1)
            mem.seq_rm(gone, -1, -1)
            other = bytes(mem.state_write(-1))
            n_other = int(lc.llama_state_get_size(ref.ctx))
            buf_other = (ctypes.c_uint8 * n_other)()
            assert lc.llama_state_get_data(ref.ctx, buf_other, n_other) == n_other
            assert lc.llama_state_set_data(ref.ctx, buf, n_ref) == n_ref
            mem.state_read(blob)
            blobs_ref = [(buf_other, n_other), (buf, n_ref)]
            blobs_mem = [other, blob]
            turns = [0, 0]  # each side's reads: every one restores the other state

            def ref_set(blobs: Any = blobs_ref, turns: list[int] = turns) -> None:
                b, n_b = blobs[turns[0] & 1]
                turns[0] += 1
                assert lc.llama_state_set_data(ref.ctx, b, n_b) == n_b

            def mem_read(blobs: list[bytes] = blobs_mem, turns: list[int] = turns) -> None:
                mem.state_read(blobs[turns[1] & 1])
                turns[1] += 1
        else:

            def mem_read(blob: bytes = blob, seq_id: int = seq_id, prep: str | None = prep) -> None:
                if prep == "seq_rm":
                    mem.seq_rm(seq_id, -1, -1)
                elif prep == "clear":
                    mem.clear(False)
                mem.state_read(blob, seq_id)

        src = np.frombuffer(blob, np.uint8)
        dst = copy_target(src)
        copies = [(src, dst)]
        if prep == "another":
            other_src = np.frombuffer(other, np.uint8)
            copies.append((other_src, copy_target(other_src)))
        n_copy = [0]

        def numpy_copy(copies: list[Any] = copies, n_copy: list[int] = n_copy) -> None:
            a, b = copies[n_copy[0] % len(copies)]
            n_copy[0] += 1
            np.copyto(b, a)

        out = bytearray(n_mem)  # the caller's buffer, as llama.cpp and copyto are given one
        t = interleaved(
            {
                "llama_cpp_write": ref_get,
                "pymem_write": lambda seq_id=seq_id: mem.state_write(seq_id),
                "pymem_write_buffer": lambda seq_id=seq_id, out=out: mem.state_write_buffer(
                    out, seq_id
                ),
                "llama_cpp_read": ref_set,
                "pymem_read": mem_read,
                "numpy_copy": numpy_copy,
            },
            repeats,
        )
        if prep == "another":  # back to the filled state on both sides
            assert lc.llama_state_set_data(ref.ctx, buf, n_ref) == n_ref
            mem.state_read(blob)
        row: dict[str, Any] = dict(
            v_trans=not pair.flash_attn, blob=what, pymem_bytes=n_mem, llama_cpp_bytes=n_ref
        )
        row.update({f"{k}_gbs": n_mem / v / 1e9 for k, v in t.items()})
        rows.append(row)
    lc.llama_memory_seq_rm(ref.mem, 5, -1, -1)
    mem.seq_rm(5, -1, -1)
    return rows


class WholeState:
    """Both sides' whole state, taken once, to undo the ops that cannot be undone by
    another op (``seq_div``, ``seq_keep``). A full cache without holes comes back into
    the same cells on both sides (each restore fills cells from 0)."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.n_ref = int(lc.llama_state_get_size(pair.ref.ctx))
        self.ref_blob = (ctypes.c_uint8 * self.n_ref)()
        n = lc.llama_state_get_data(pair.ref.ctx, self.ref_blob, self.n_ref)
        if n != self.n_ref:
            raise RuntimeError(f"llama_state_get_data wrote {n} of {self.n_ref} bytes")
        self.mem_blob = bytes(pair.mem.state_write())

    def restore(self) -> None:
        n = lc.llama_state_set_data(self.pair.ref.ctx, self.ref_blob, self.n_ref)
        if n != self.n_ref:
            raise RuntimeError(f"llama_state_set_data read {n} of {self.n_ref} bytes")
        self.pair.mem.state_read(self.mem_blob)


def bench_ops(pair: Pair, repeats: int, n_tokens: int, model: str) -> list[dict[str, Any]]:
    """Every sequence op on the filled pair, llama.cpp and pymem alternating; each op's
    result and sequence 0's positions must agree on both sides."""
    ref, mem = pair.ref, pair.mem
    last = n_tokens - 16
    whole = WholeState(pair)

    def refill_tail() -> None:
        if mem.seq_pos_max(0) == n_tokens - 1:  # refused (a recurrent state): nothing to redo
            return
        seq = np.zeros(16, dtype=np.int64)
        pos = np.arange(last, n_tokens)
        pair.decode_both(seq, pos, pos == n_tokens - 1, inputs=False)

    def fork() -> None:
        lc.llama_memory_seq_cp(ref.mem, 0, 5, -1, -1)
        mem.seq_cp(0, 5, -1, -1)

    def unfork() -> None:
        lc.llama_memory_seq_rm(ref.mem, 5, -1, -1)
        mem.seq_rm(5, -1, -1)

    def unshift() -> None:
        lc.llama_memory_seq_add(ref.mem, 0, 0, -1, -1)
        mem.seq_add(0, 0, -1, -1)

    # (name, llama.cpp op, pymem op, untimed setup before, untimed cleanup after)
    cases = [
        (f"seq_rm(0, {last}, -1): last 16 of {n_tokens}",
         lambda: lc.llama_memory_seq_rm(ref.mem, 0, last, -1), lambda: mem.seq_rm(0, last, -1),
         None, refill_tail),
        (f"seq_rm(5, -1, -1): a fork of {n_tokens}",
         lambda: lc.llama_memory_seq_rm(ref.mem, 5, -1, -1), lambda: mem.seq_rm(5, -1, -1),
         fork, None),
        (f"seq_cp(0, 5, -1, -1): {n_tokens} positions",
         lambda: lc.llama_memory_seq_cp(ref.mem, 0, 5, -1, -1), lambda: mem.seq_cp(0, 5, -1, -1),
         None, unfork),
        (f"seq_add(0, 0, -1, 1): {n_tokens} positions",
         lambda: lc.llama_memory_seq_add(ref.mem, 0, 0, -1, 1), lambda: mem.seq_add(0, 0, -1, 1),
         None, unshift),
        (f"seq_div(0, 0, -1, 2): {n_tokens} positions",
         lambda: lc.llama_memory_seq_div(ref.mem, 0, 0, -1, 2), lambda: mem.seq_div(0, 0, -1, 2),
         None, whole.restore),
        (f"seq_keep(0): {STATE_N_SEQ} x {n_tokens} positions",
         lambda: lc.llama_memory_seq_keep(ref.mem, 0), lambda: mem.seq_keep(0),
         None, whole.restore),
    ]  # fmt: skip
    rows = []
    for name, f_ref, f_mem, setup, cleanup in cases:
        t_ref, t_mem = [], []
        for r in range(repeats):
            if setup is not None:
                setup()
            results = {}
            for side in ("ref", "mem") if r % 2 == 0 else ("mem", "ref"):
                fn = f_ref if side == "ref" else f_mem
                t0 = time.perf_counter()
                results[side] = fn()
                (t_ref if side == "ref" else t_mem).append(time.perf_counter() - t0)
            check_agree(pair, name, results)
            if cleanup is not None:
                cleanup()
        rows.append(dict(model=model, op=name, llama_cpp_us=statistics.median(t_ref) * 1e6,
                         pymem_us=statistics.median(t_mem) * 1e6))  # fmt: skip
    n = 1000
    for query in ("seq_pos_max", "seq_pos_min"):
        f_ref, f_mem = getattr(lc, f"llama_memory_{query}"), getattr(mem, query)
        if f_ref(ref.mem, 0) != f_mem(0):
            raise RuntimeError(
                f"{model} {query}(0): llama.cpp {f_ref(ref.mem, 0)}, pymem {f_mem(0)}"
            )
        t = interleaved(
            {
                "ref": lambda f_ref=f_ref: [f_ref(ref.mem, 0) for _ in range(n)],
                "mem": lambda f_mem=f_mem: [f_mem(0) for _ in range(n)],
            },
            repeats,
        )
        rows.append(dict(model=model, op=f"{query}(0) (ctypes call included)",
                         llama_cpp_us=t["ref"] / n * 1e6, pymem_us=t["mem"] / n * 1e6))  # fmt: skip
    for row in rows:
        row["ratio"] = row["pymem_us"] / row["llama_cpp_us"]
    return rows


def check_agree(pair: Pair, op: str, results: dict[str, Any]) -> None:
    """The op returned the same on both sides, and sequence 0's bounds agree after it."""
    ref, mem = pair.ref, pair.mem
    got = {k: (bool(v) if v is not None else None) for k, v in results.items()}
    bounds_ref = (lc.llama_memory_seq_pos_min(ref.mem, 0), lc.llama_memory_seq_pos_max(ref.mem, 0))
    bounds_mem = (mem.seq_pos_min(0), mem.seq_pos_max(0))
    if got["ref"] != got["mem"] or bounds_ref != bounds_mem:
        raise RuntimeError(
            f"{op}: llama.cpp returned {got['ref']}, bounds {bounds_ref}; "
            f"pymem {got['mem']}, bounds {bounds_mem}"
        )


FILLED = (("llama", False), ("llama", True), ("jamba", False), ("jamba", True), ("gemma2", False),
          ("gemma2", True))  # fmt: skip
"""(model, flash attention) of the filled memories: every model in both V layouts
(transposed without flash attention, the reference's default; in rows with it). The
sequence ops run on the flash-attention-off ones."""


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several runs of the same cases, merged: every ``*_gbs`` figure the median
    over the runs (the rounds of a state run; each row's copy moves by up to 0.2 of itself
    between runs on a shared machine, enough to flip a row near the 0.8 line), the rest
    taken from the first run, and ``rounds``: how many runs were merged."""
    merged = []
    for rows in zip(*runs, strict=True):
        if len({(r["blob"], r["v_trans"]) for r in rows}) != 1:
            raise ValueError(f"median_rows: the runs' rows differ: {[r['blob'] for r in rows]}")
        row = dict(rows[0])
        for key in row:
            if key.endswith("_gbs"):
                row[key] = statistics.median(r[key] for r in rows)
        row["rounds"] = len(rows)
        merged.append(row)
    return merged


def bench_filled(
    quick: bool, only: str | None, rounds: int = 1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The state rows (``rounds`` times on each filled pair, each figure the median over
    the rounds) and the sequence ops of every filled memory."""
    models = LlamaModels()
    n_tokens = 2048 if quick else STATE_TOKENS
    repeats = 5 if quick else 15
    # state rows: 45 rounds (a median of 15 moved rows by up to 0.2 of a copy between two
    # runs of the same code on this shared machine; the rounds cost seconds, the fills most)
    state_repeats = 5 if quick else 45
    state_rows: list[dict[str, Any]] = []
    op_rows: list[dict[str, Any]] = []
    try:
        for name, fa in FILLED:
            if only == "ops" and fa:
                continue
            spec = spec_from_gguf(str(MODELS[name]))
            t0 = time.perf_counter()
            pair = filled_pair(models, spec, fa, n_tokens, name)
            print(f"  filled {name} fa {int(fa)}: {time.perf_counter() - t0:.1f} s", flush=True)
            try:
                if only in (None, "state"):
                    runs = [bench_state(pair, state_repeats) for _ in range(rounds)]
                    state_rows += [dict(model=name, **r) for r in median_rows(runs)]
                if only in (None, "ops") and not fa:
                    op_rows += bench_ops(pair, 3 * repeats, n_tokens, name)
            finally:
                pair.close()
    finally:
        models.close()
    if state_rows:
        print_table(
            f"State I/O, f16, {STATE_N_SEQ} x {n_tokens} tokens in a unified "
            f"{STATE_N_CTX}-cell memory (median GB/s on pymem's blob bytes)",
            ["model", "v_trans", "blob", "pymem B", "llama.cpp B", "pymem write",
             "pymem write into a buffer", "llama.cpp write", "pymem read", "llama.cpp read",
             "numpy copy", "write / numpy", "write into a buffer / numpy", "read / numpy",
             "write / llama.cpp", "write into a buffer / llama.cpp", "read / llama.cpp"],
            [
                [
                    r["model"], r["v_trans"], r["blob"], r["pymem_bytes"], r["llama_cpp_bytes"],
                    f"{r['pymem_write_gbs']:.2f}", f"{r['pymem_write_buffer_gbs']:.2f}",
                    f"{r['llama_cpp_write_gbs']:.2f}",
                    f"{r['pymem_read_gbs']:.2f}", f"{r['llama_cpp_read_gbs']:.2f}",
                    f"{r['numpy_copy_gbs']:.2f}",
                    f"{r['pymem_write_gbs'] / r['numpy_copy_gbs']:.2f}",
                    f"{r['pymem_write_buffer_gbs'] / r['numpy_copy_gbs']:.2f}",
                    f"{r['pymem_read_gbs'] / r['numpy_copy_gbs']:.2f}",
                    f"{r['pymem_write_gbs'] / r['llama_cpp_write_gbs']:.2f}",
                    f"{r['pymem_write_buffer_gbs'] / r['llama_cpp_write_gbs']:.2f}",
                    f"{r['pymem_read_gbs'] / r['llama_cpp_read_gbs']:.2f}",
                ]
                for r in state_rows
            ],
        )  # fmt: skip
    if op_rows:
        print_table(
            f"Sequence ops on the filled memories (fa off; median µs, {STATE_N_SEQ} x "
            f"{n_tokens} tokens)",
            ["model", "op", "llama.cpp µs", "pymem µs", "pymem/llama.cpp", ""],
            [[r["model"], r["op"], f"{r['llama_cpp_us']:.2f}", f"{r['pymem_us']:.2f}",
              f"{r['ratio']:.2f}", "" if r["ratio"] <= 1 else "OVER"]
             for r in op_rows],
        )  # fmt: skip
    return state_rows, op_rows


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------


def plot(results: dict[str, Any]) -> list[Path]:
    """docs/perf_decode_vs_nseq.png and docs/perf_decode_vs_nctx.png (flash attention off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("decode", []) if "skipped" not in r and not r["flash_attn"]]
    paths = []
    for x_key, fixed_key, fixed, name in (
        ("n_seq", "n_ctx", 262144, "perf_decode_vs_nseq.png"),
        ("n_ctx", "n_seq", 32, "perf_decode_vs_nctx.png"),
    ):
        fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4), sharey=True)
        for ax, model in zip(axes, MODELS):
            for layout, style in (("unified", "-"), ("streams", "--")):
                sel = sorted(
                    (r for r in rows
                     if r["model"] == model and r["layout"] == layout and r[fixed_key] == fixed),
                    key=lambda r: r[x_key],
                )  # fmt: skip
                if not sel:
                    continue
                xs = [r[x_key] for r in sel]
                ax.plot(xs, [r["llama_cpp_ms"] for r in sel], style, marker="o", color="C0",
                        mfc="white" if layout == "streams" else "C0",
                        label=f"llama.cpp llama_decode, {layout}")  # fmt: skip
                ax.plot(xs, [r["pymem_ms"] for r in sel], style, marker="s", color="C3",
                        mfc="white" if layout == "streams" else "C3",
                        label=f"pymem bookkeeping, {layout}")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_key)
            ax.set_title(f"tiny-{model}, {fixed_key} {fixed}, fa off")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("decode step, ms (median)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
        fig.suptitle(f"Decode step ({x_key} x 1 token)" if x_key == "n_seq" else
                     "Decode step (32 sequences x 1 token)")  # fmt: skip
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = DOCS / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------


def _rounds(text: str) -> int:
    """``--rounds``: a count >= 1 (none would leave the state part without a row)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--rounds takes a count >= 1, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="pymem against llama.cpp (llama-cpp-python 0.3.36, 1 thread) on tiny GGUF "
        "models: decode-step bookkeeping, state I/O, sequence ops. A full run (no --only, no "
        "filter, not --quick) writes results/bench_vs_llama_cpp.json and the plots; a full "
        "decode matrix (--only decode, no filter) replaces the JSON's decode part only; "
        "--out NAME writes any run to results/NAME.json.",
    )
    ap.add_argument("--quick", action="store_true", help="a handful of configurations, seconds")
    ap.add_argument("--only", choices=("decode", "state", "ops"), help="run one part")
    ap.add_argument("--plot", action="store_true", help="only redraw the plots from the JSON")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), help="decode: these models")
    ap.add_argument("--layouts", nargs="+", choices=("unified", "streams"), help="decode: layouts")
    ap.add_argument("--n-seq", nargs="+", type=int, help="decode: these sequence counts")
    ap.add_argument("--n-ctx", nargs="+", type=int, help="decode: these n_ctx totals")
    ap.add_argument("--fa", nargs="+", type=int, choices=(0, 1), help="decode: flash attention")
    ap.add_argument(
        "--rounds",
        type=_rounds,
        default=1,
        help="decode: run the selection this many times, keep medians; state: run every "
        "row this many times on its filled memory, keep each figure's median (default 1)",
    )
    ap.add_argument(
        "--fork",
        action="store_true",
        help="decode: the unified configurations with one prompt forked by seq_cp to every "
        "sequence (never written to the main JSON; use --out)",
    )
    ap.add_argument(
        "--tokens",
        type=int,
        default=1,
        help="decode: tokens per sequence a step (default 1; more: never written to the "
        "main JSON; use --out)",
    )
    ap.add_argument("--out", help="also write the results to results/OUT.json")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    quick, only = args.quick, args.only
    if args.plot:
        results = json.loads((RESULTS / "bench_vs_llama_cpp.json").read_text())
        for p in plot(results):
            print(f"wrote {p}")
        return
    sel = Selection(
        models=tuple(args.models) if args.models else None,
        layouts=tuple(args.layouts) if args.layouts else None,
        n_seq=tuple(args.n_seq) if args.n_seq else None,
        n_ctx=tuple(args.n_ctx) if args.n_ctx else None,
        fa=tuple(args.fa) if args.fa else None,
    )
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    results: dict[str, Any] = dict(
        quick=quick, llama_cpp_python=llama_cpp.__version__,
        n_threads_llama_cpp=1, pymem_state_threads=state_threads(), cpus=os.cpu_count(),
        target_ratio=TARGET,
    )  # fmt: skip
    if only in (None, "decode"):
        results["decode"] = bench_decode(quick, sel, args.rounds, args.fork, args.tokens)
    if only in (None, "state", "ops") and sel.is_all:
        results["state"], results["seq_ops"] = bench_filled(quick, only, args.rounds)
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()
    results["load_average_before"] = load_before
    results["load_average_after"] = load_after
    results["wall_s"] = wall
    print(f"\nload average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
          f"{os.cpu_count()} CPUs; wall {wall:.0f} s")  # fmt: skip
    if args.out:
        print(f"wrote {write_results(args.out, results)}")
    if quick or not sel.is_all or args.fork or args.tokens > 1:
        return
    if only is None:
        path = write_results("bench_vs_llama_cpp", results)
        print(f"wrote {path}")
        for p in plot(results):
            print(f"wrote {p}")
    elif only == "decode":
        # the decode part alone: keep the JSON's state / ops parts from their last run
        path = RESULTS / "bench_vs_llama_cpp.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        merged = {k: v for k, v in old.items() if k in ("state", "seq_ops")}
        merged.update(state_time=old.get("state_time", old.get("time")), **results)
        path = write_results("bench_vs_llama_cpp", merged)
        print(f"wrote {path} (decode part; state and ops kept from {merged['state_time']})")
        for p in plot(merged):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
