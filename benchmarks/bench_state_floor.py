"""Where a state read's time goes, against the floor the layout and the format set.

Why: bench_state_io's target is a read at >= 0.8x a numpy copy of the blob. With 64-byte
K/V rows (tiny-llama) a per-sequence read still misses it; this splits the read into what
it must do and what it adds, each measured alone in the state a real read loop leaves
(every timed call right after an untimed ``state_read`` of the same blob: the cache
metadata and the blob are as cold as in bench_state_io's interleaved runs):

* ``numpy_copy``: ``np.copyto`` of the blob's bytes into a warm array (the unit);
* ``bytes``: the K/V payload stored into the sequence's cells alone
  (``state_io.put_payloads``, one native call for every layer): the floor the layout sets
  (scattered runs of 64-byte rows, or for transposed V runs of elements per channel);
* ``same_cells``: the native pass that finds the sequence's cells and proves a restore
  leaves them as they are (``seq_same_cells``; whole cache: ``_whole_same_words``): one
  scan of the stream's owners plus the blob's meta records, the floor the format sets
  (no index of a sequence's cells exists to skip the scan);
* ``zero`` (whole cache): zeroing the bytes of the cells the blob does not fill, as the
  reference's ``clear(true)`` leaves them (nothing when the blob fills the cache);
* ``placement``: what that pass replaces, the reference's seq_rm + find_slot +
  apply_ubatch of the sequence's cells (per sequence only);
* ``parse``: ``state_read_parse`` (headers, records, same-cells pass: changes nothing);
* ``read``: ``state_read``, all of it.

Derived: ``floor = bytes + same_cells (+ zero)`` (a read with no Python at all), ``python`` =
``read - floor`` (the fixed cost of the calls: headers, plan, checks), and the ratios of
``numpy_copy`` to ``floor`` and to ``read`` (throughput, higher is better; 0.8 is the
target). pymem alone (no llama.cpp), the cache of bench_state_io: f16 K/V, a unified
32,768-cell cache holding 4 sequences x 8,192 tokens decoded in interleaved chunks of 128.

The composite memories (``--composites``: tiny-jamba, hybrid; tiny-gemma2, iSWA; both V
layouts) have blobs of 0.36-2.5 MB whose parts each carry fixed costs, so their floor is
measured another way: ``native`` is the time spent inside pymem's native calls during a
``state_write_buffer`` / ``state_read`` (every ``lib`` call of the state modules timed
around the call itself: the cell search, the gather or scatter, the checks), i.e. what
the same calls would cost with no Python at all; ``python`` is the rest. The ratios of
``numpy_copy`` to ``native`` say whether 0.8 of a copy is in reach of any implementation
of these calls.

``--cold`` times every state call of tiny-llama, tiny-jamba and tiny-gemma2 cold (each
right after a 16 MiB copy, what a decode step between two calls leaves), split the same
way into native calls and the rest, against a cold numpy copy
(results/bench_state_floor_cold.json). Its last rows write and read a sequence of one
token: their time is the fixed cost of a call (the headers, one cell, a hybrid's
recurrent state), which bounds what a small blob's call can reach against a copy.

Run: python benchmarks/bench_state_floor.py [--quick] [--wide] [--composites | --cold]
(--quick: 2,048 tokens a sequence, no JSON; --wide: also tiny-llama-e512, 512-byte rows;
a full run writes results/bench_state_floor.json; with --composites alone,
results/bench_state_floor_composites.json)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_llama_cpp as bvl
from _util import copy_target, evict, finish_run, print_table, threads_label

import pymem.kv.state_io as sio
from pymem.batch import Batch, BatchAllocator
from pymem.gguf_spec import spec_from_gguf
from pymem.state import StateReader

TARGET_NUMPY = 0.8


def filled(model: Path, fa: bool, n_tokens: int) -> Any:
    """pymem's side of bench_vs_llama_cpp.filled_pair alone (no llama.cpp context), for
    any of its models (a KV cache, a hybrid or an iSWA memory)."""
    spec = spec_from_gguf(str(model))
    mem = bvl.make_memory(spec, n_ctx=bvl.STATE_N_CTX, n_seq_max=bvl.STATE_SEQ_MAX,
                          flash_attn=fa, kv_unified=True)  # fmt: skip
    balloc = BatchAllocator()
    for seq, pos, out in bvl.fill_chunks(n_tokens):
        batch = Batch(bvl.tokens_of(seq, pos, 100), pos=pos.astype(np.int32),
                      seq_id=seq.astype(np.int32), output=out)  # fmt: skip
        bvl.pymem_decode(mem, balloc, batch, n_seq_max=bvl.STATE_SEQ_MAX, n_vocab=100,
                         flash_attn=fa, inputs=False)  # fmt: skip
    bvl.randomize_tensors(mem)  # every part's K/V (and R/S) tensors
    return mem


def _parts(mem: Any, blob: bytes, seq_id: int) -> dict[str, Any]:
    """The pieces of a read of ``blob``, each a call on the parsed blob (nothing else)."""
    layout = mem.layout
    cells = mem.v_cells[0]
    n_ext = 3 if layout.with_ext else 0
    reader = StateReader(blob)
    reader.read_u32("n_stream")
    n = reader.read_u32("cell_count")
    start = reader.offset
    words = reader.read_array("<i4", n * (3 + n_ext), "cells").reshape(n, 3 + n_ext)
    payloads = sio._parse_data(layout, mem.layers, reader, n, "kv.stream[0]")
    parts: dict[str, Any] = {}
    if seq_id >= 0:
        runs = sio.seq_same_cells(cells, int(mem.v_heads.a[0]), seq_id, words, n_ext)
        if runs is None:
            raise RuntimeError("the benchmark's blob should go back to its own cells")
        parts["same_cells"] = lambda: sio.seq_same_cells(
            cells, int(mem.v_heads.a[0]), seq_id, words, n_ext
        )
        ext = words[:, 2 : 2 + n_ext] if n_ext else None
        ub = sio._restore_ubatch(layout.n_pos_per_embd, seq_id, words[:, 0], ext)
        parts["placement"] = lambda: mem._place_restored(seq_id, ub)
    else:
        runs = (np.zeros(1, np.int64), np.full(1, n, np.int64))

        def whole_same() -> None:
            r = StateReader(blob)
            r.offset = start
            if sio._whole_same_words(cells, r, n, n_ext) is None:
                raise RuntimeError("the benchmark's whole blob should match its cells")

        parts["same_cells"] = whole_same

        # a whole restore zeroes the bytes of the cells it does not fill (clear(true)), in
        # one native call where the tensors are in host memory (as the read does)
        def zero() -> None:
            if not sio.zero_range_native(layout, mem.layers, 0, n, layout.kv_size):
                sio.zero_range(layout, mem.layers, 0, n, layout.kv_size)

        parts["zero"] = zero
    parts["bytes"] = lambda: sio.put_payloads(layout, 0, n, lambda: runs, payloads)
    return parts


def bench(mem: Any, model: str, fa: bool, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for what, seq_id in (("one sequence", 0), ("whole cache", -1)):
        blob = bytes(mem.state_write(seq_id))
        src = np.frombuffer(blob, np.uint8)
        dst = copy_target(src)
        fns: dict[str, Any] = {
            "numpy_copy": lambda src=src, dst=dst: np.copyto(dst, src),
            "read": lambda blob=blob, seq_id=seq_id: mem.state_read(blob, seq_id),
            "parse": lambda blob=blob, seq_id=seq_id: mem.state_read_parse(
                StateReader(blob), seq_id
            ),
            **_parts(mem, blob, seq_id),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                mem.state_read(blob, seq_id)  # what a read loop leaves behind
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
        mem.state_read(blob, seq_id)  # a placement run left its cells: put them back
        if bytes(mem.state_write(seq_id)) != blob:
            raise RuntimeError("the state changed while benchmarking")
        t = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        floor = t["bytes"] + t["same_cells"] + t.get("zero", 0.0)
        row: dict[str, Any] = dict(model=model, v_trans=not fa, blob=what, bytes=len(blob))
        row.update({f"{k}_ms": v for k, v in t.items()})
        row.update(floor_ms=floor, python_ms=t["read"] - floor,
                   floor_vs_numpy=t["numpy_copy"] / floor,
                   bytes_vs_numpy=t["numpy_copy"] / t["bytes"],
                   read_vs_numpy=t["numpy_copy"] / t["read"])  # fmt: skip
        rows.append(row)
    return rows


# the modules whose native calls a state write or read makes (their ``lib`` is swapped
# for a timing proxy while the composites' floor is measured)
_STATE_MODULES = ("pymem.kv.state_io", "pymem.kv.cache", "pymem.kv.cells",
                  "pymem.recurrent.state_io", "pymem.recurrent.memory", "pymem.recurrent.cells",
                  "pymem.backend", "pymem.composite")  # fmt: skip


class _NativeClock:
    """Stands in for ``lib`` in the state modules: every call of a native function adds
    its own duration to :attr:`spent` (constants and types pass through)."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.spent = 0.0

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._lib, name)
        if not callable(fn):
            return fn

        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.spent += time.perf_counter() - t0

        return timed


def _plain(fn: Any, setup: Any, repeats: int) -> float:
    """Median ms of ``fn``, each call right after an untimed ``setup()`` (no wrapper)."""
    times = []
    for _ in range(repeats):
        setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _native_share(fn: Any, setup: Any, repeats: int) -> float:
    """Median ms ``fn`` spends inside native calls, each call right after an untimed
    ``setup()`` (each native call timed by a wrapper; the whole call, which the wrappers
    slow down, is timed apart by :func:`_plain`)."""
    import importlib

    mods = [importlib.import_module(m) for m in _STATE_MODULES]
    real = [m.lib for m in mods]  # type: ignore[attr-defined]
    clock = _NativeClock(real[0])
    natives = []
    try:
        for m in mods:
            m.lib = clock  # type: ignore[attr-defined]
        for _ in range(repeats):
            setup()
            clock.spent = 0.0
            fn()
            natives.append(clock.spent)
    finally:
        for m, lib in zip(mods, real):
            m.lib = lib  # type: ignore[attr-defined]
    return statistics.median(natives) * 1e3


def bench_composite(mem: Any, model: str, fa: bool, repeats: int) -> list[dict[str, Any]]:
    """Write and read of one sequence and of the whole memory, each split into its native
    part and the rest, against a numpy copy of the blob (each call after a read, as
    :func:`bench`)."""
    rows = []
    for what, seq_id in (("one sequence", 0), ("whole memory", -1)):
        blob = bytes(mem.state_write(seq_id))
        out = bytearray(len(blob))
        src = np.frombuffer(blob, np.uint8)
        dst = copy_target(src)
        copies = []
        for _ in range(repeats):
            mem.state_read(blob, seq_id)
            t0 = time.perf_counter()
            np.copyto(dst, src)
            copies.append(time.perf_counter() - t0)

        def read(blob: bytes = blob, seq_id: int = seq_id) -> None:
            mem.state_read(blob, seq_id)

        def write(seq_id: int = seq_id, out: bytearray = out) -> None:
            mem.state_write_buffer(out, seq_id)

        write_t, write_n = _plain(write, read, repeats), _native_share(write, read, repeats)
        read_t, read_n = _plain(read, read, repeats), _native_share(read, read, repeats)
        if bytes(mem.state_write(seq_id)) != blob:
            raise RuntimeError("the state changed while benchmarking")
        copy_ms = statistics.median(copies) * 1e3
        row: dict[str, Any] = dict(model=model, v_trans=not fa, blob=what, bytes=len(blob),
                                   numpy_copy_ms=copy_ms, write_ms=write_t,
                                   write_native_ms=write_n, read_ms=read_t,
                                   read_native_ms=read_n)  # fmt: skip
        for k in ("write", "read"):
            row[f"{k}_vs_numpy"] = copy_ms / row[f"{k}_ms"]
            row[f"{k}_native_vs_numpy"] = copy_ms / row[f"{k}_native_ms"]
        rows.append(row)
    return rows


def composites(quick: bool) -> None:
    n_tokens = 2048 if quick else 8192
    repeats = 31 if quick else 301
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name in ("jamba", "gemma2"):
        for fa in (False, True):
            mem = filled(bvl.MODELS[name], fa, n_tokens)
            try:
                rows += bench_composite(mem, f"tiny-{name}", fa, repeats)
            finally:
                mem.close()
    print_table(
        f"Composite blobs, f16, {bvl.STATE_N_SEQ} x {n_tokens} tokens, unified "
        f"{bvl.STATE_N_CTX} cells (median ms; native = inside pymem's native calls; ratios "
        f"are throughput against the numpy copy, higher is better, 0.8 the target; pymem on "
        f"{threads_label()})",
        ["model", "v_trans", "blob", "bytes", "numpy copy", "write", "write native",
         "read", "read native", "write/numpy", "native write/numpy", "read/numpy",
         "native read/numpy"],
        [
            [r["model"], r["v_trans"], r["blob"], r["bytes"], f"{r['numpy_copy_ms']:.3f}",
             f"{r['write_ms']:.3f}", f"{r['write_native_ms']:.3f}", f"{r['read_ms']:.3f}",
             f"{r['read_native_ms']:.3f}", f"{r['write_vs_numpy']:.2f}",
             f"{r['write_native_vs_numpy']:.2f}", f"{r['read_vs_numpy']:.2f}",
             f"{r['read_native_vs_numpy']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    finish_run("bench_state_floor_composites", quick, load_before, rows=rows,
               n_tokens=n_tokens, repeats=repeats, target_vs_numpy=TARGET_NUMPY)  # fmt: skip


def _cold_ms(fn: Any, setup: Any, repeats: int, native: bool = False) -> float:
    """Median ms of ``fn`` (or, with ``native``, of its native calls alone), each call
    after an untimed ``setup()`` and then :func:`_util.evict`: the caches a decode step
    between two state calls leaves."""
    if native:
        return _native_share(fn, lambda: (setup(), evict()), repeats)
    return _plain(fn, lambda: (setup(), evict()), repeats)


# a sequence of one token (decoded into an otherwise unused id): its blob is headers, one
# cell and (a hybrid) the recurrent state, so its calls show the fixed cost of a call
_ONE_TOKEN_SEQ = bvl.STATE_N_SEQ
_COLD_CALLS = (("whole, write", -1, None), ("whole, read", -1, "read"),
               ("whole, read into a cleared memory", -1, "clear"),
               ("one sequence, write", 0, None), ("one sequence, read", 0, "read"),
               ("one sequence, swapped in", 0, "seq_rm"),
               ("a one-token sequence, write", _ONE_TOKEN_SEQ, None),
               ("a one-token sequence, read", _ONE_TOKEN_SEQ, "read"))  # fmt: skip


def _decode_one_token(mem: Any, seq_id: int) -> None:
    """One token of ``seq_id`` at position 0, decoded into ``mem`` (full: the sequence
    before it is removed to make room; a recurrent state cannot lose its last token)."""
    mem.seq_rm(seq_id - 1, -1, -1)
    batch = Batch(np.array([7], np.int32), pos=np.zeros(1, np.int32),
                  seq_id=np.array([seq_id], np.int32), output=np.ones(1, bool))  # fmt: skip
    bvl.pymem_decode(mem, BatchAllocator(), batch, n_seq_max=bvl.STATE_SEQ_MAX, n_vocab=100,
                     flash_attn=False, inputs=False)  # fmt: skip


def _cold_rows(mem: Any, model: str, repeats: int) -> list[dict[str, Any]]:
    """:func:`cold`'s rows of one memory: every call of :data:`_COLD_CALLS`."""
    rows = []
    for what, seq_id, prep in _COLD_CALLS:
        if seq_id == _ONE_TOKEN_SEQ and mem.seq_pos_max(seq_id) < 0:
            _decode_one_token(mem, seq_id)  # (after the whole-memory rows: not in their blob)
        blob = bytes(mem.state_write(seq_id))
        out = bytearray(len(blob))
        src = np.frombuffer(blob, np.uint8)
        dst = copy_target(src)

        def setup(prep: str | None = prep, blob: bytes = blob, seq_id: int = seq_id) -> None:
            mem.state_read(blob, seq_id)  # the state the blob holds
            if prep == "clear":
                mem.clear(False)
            elif prep == "seq_rm":
                mem.seq_rm(seq_id, -1, -1)

        def call(prep: str | None = prep, blob: bytes = blob, seq_id: int = seq_id,
                 out: bytearray = out) -> None:  # fmt: skip
            if prep is None:
                mem.state_write_buffer(out, seq_id)
            else:
                mem.state_read(blob, seq_id)

        copy = _cold_ms(lambda src=src, dst=dst: np.copyto(dst, src), setup, repeats)
        total = _cold_ms(call, setup, repeats)
        native = _cold_ms(call, setup, repeats, native=True)
        warm = _plain(call, setup, repeats)
        mem.state_read(blob, seq_id)
        rows.append(dict(model=model, call=what, bytes=len(blob), numpy_copy_cold_ms=copy,
                         cold_ms=total, native_cold_ms=native, rest_cold_ms=total - native,
                         warm_ms=warm, cold_vs_numpy=copy / total))  # fmt: skip
    return rows


def cold(quick: bool) -> None:
    """Every state call of every model (V transposed), cold: each call right after a
    16 MiB copy evicts L1/L2 (:func:`_util.evict`), split into native calls and the rest,
    against a cold numpy copy of the blob. The rest (Python, numpy, cffi) costs several
    times its warm time cold: each distinct numpy routine and Python function a call
    touches is fetched again."""
    n_tokens = 2048 if quick else 8192
    repeats = 15 if quick else 61
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name in ("llama", "jamba", "gemma2"):
        mem = filled(bvl.MODELS[name], False, n_tokens)
        try:
            rows += _cold_rows(mem, f"tiny-{name}", repeats)
        finally:
            mem.close()
    print_table(
        f"State calls, cold (each after a 16 MiB copy), f16, V transposed, {bvl.STATE_N_SEQ} x "
        f"{n_tokens} tokens, unified {bvl.STATE_N_CTX} cells (median ms; native = inside "
        f"pymem's native calls, rest = Python, numpy and cffi; pymem on {threads_label()})",
        ["model", "call", "bytes", "numpy copy", "pymem", "native", "rest", "pymem warm",
         "pymem/numpy (throughput)"],
        [[r["model"], r["call"], r["bytes"], f"{r['numpy_copy_cold_ms']:.3f}",
          f"{r['cold_ms']:.3f}", f"{r['native_cold_ms']:.3f}", f"{r['rest_cold_ms']:.3f}",
          f"{r['warm_ms']:.3f}", f"{r['cold_vs_numpy']:.2f}"] for r in rows],
    )  # fmt: skip
    finish_run("bench_state_floor_cold", quick, load_before, rows=rows, n_tokens=n_tokens,
               repeats=repeats)  # fmt: skip


def main() -> None:
    quick = "--quick" in sys.argv
    if "--composites" in sys.argv:
        composites(quick)
        return
    if "--cold" in sys.argv:
        cold(quick)
        return
    n_tokens = 2048 if quick else 8192
    repeats = 15 if quick else 101
    models = {"tiny-llama": bvl.MODELS["llama"]}
    if "--wide" in sys.argv:
        import bench_state_io

        models["tiny-llama-e512"] = bench_state_io.wide_model()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name, path in models.items():
        for fa in (False, True):
            mem = filled(path, fa, n_tokens)
            try:
                rows += bench(mem, name, fa, repeats)
            finally:
                mem.close()
    print_table(
        f"Read floor, f16, {bvl.STATE_N_SEQ} x {n_tokens} tokens in a unified "
        f"{bvl.STATE_N_CTX}-cell cache (median ms, each call after a read; ratios are "
        "throughput against the numpy copy, higher is better)",
        ["model", "v_trans", "blob", "numpy copy", "bytes", "same cells", "zero", "placement",
         "parse", "read", "floor", "python", "bytes/numpy", "floor/numpy", "read/numpy"],
        [
            [r["model"], r["v_trans"], r["blob"], f"{r['numpy_copy_ms']:.3f}",
             f"{r['bytes_ms']:.3f}", f"{r['same_cells_ms']:.3f}",
             f"{r['zero_ms']:.3f}" if "zero_ms" in r else "-",
             f"{r['placement_ms']:.3f}" if "placement_ms" in r else "-",
             f"{r['parse_ms']:.3f}", f"{r['read_ms']:.3f}", f"{r['floor_ms']:.3f}",
             f"{r['python_ms']:.3f}", f"{r['bytes_vs_numpy']:.2f}",
             f"{r['floor_vs_numpy']:.2f}", f"{r['read_vs_numpy']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    finish_run("bench_state_floor", quick, load_before, rows=rows, n_tokens=n_tokens,
               repeats=repeats, target_vs_numpy=TARGET_NUMPY)  # fmt: skip


if __name__ == "__main__":
    main()
