"""State I/O at memory speed: pymem's state bytes against a numpy copy of as many bytes
and against llama.cpp, in one process, interleaved (noise on the shared machine hits all).

Why: a state blob is mostly tensor bytes, so writing or reading one should cost about what
copying that many bytes costs (target: >= 0.8x a numpy ``copyto`` of the blob's size);
where the layout itself bounds it (transposed V scattered over the cache, a restore's cell
placement), pymem should still be >= 2x llama.cpp, and the bound is measured beside it.

Setup (bench_vs_llama_cpp's filled cache): tiny-llama, f16 K/V, a unified cache of 32,768
cells filled with 4 sequences x 8,192 tokens, decoded in interleaved chunks of 128 (each
sequence is 64 runs of 128 cells), flash attention off (V transposed) and on. Per blob
(one sequence, the whole cache), median milliseconds of:

* ``numpy_copy``: ``np.copyto`` of a blob-sized array into a warm one (the target's unit);
* ``pymem_write``: ``state_write`` (a new bytes-like blob); ``pymem_write_file``:
  ``state_write_to`` an open ``/dev/null`` (the streaming path, 4 MiB windows);
* ``pymem_read``: ``state_read``; split into ``pymem_parse`` (validation, nothing changes)
  and the rest (``commit``: cell placement, then the tensor bytes);
* ``llama_cpp_write`` / ``_read``: ``llama_state_seq_get_data`` / ``_set_data``
  (``llama_state_get_data`` / ``_set_data`` for the whole cache) into a preallocated buffer;
* the bounds: ``numpy_gather`` / ``numpy_scatter``, the same tensor bytes moved between the
  cache and a packed buffer with numpy (``kv.state_io``'s numpy reference path: per-run
  slices, lockstep strided views), i.e. the cost of the layout alone; and ``placement``,
  the bookkeeping a per-sequence restore must do (``seq_rm`` + ``find_slot`` +
  ``apply_ubatch`` of the sequence's cells, as the reference does).

Run: python benchmarks/bench_state_io.py [--quick] (full: writes results/bench_state_io.json)
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp.llama_cpp as lc
from _util import print_table, write_results
from bench_vs_llama_cpp import MODELS, STATE_N_CTX, STATE_N_SEQ, LlamaModels, Pair, filled_pair

import pymem.kv.state_io as sio
from pymem.gguf_spec import spec_from_gguf
from pymem.state import StateReader

TARGET_NUMPY = 0.8  # pymem / numpy copy, as a throughput ratio
TARGET_LLAMA = 2.0  # pymem / llama.cpp where the layout bounds it


def interleaved(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn (order rotated each round)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def _row_blocks(view: np.ndarray, runs: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """The rows of ``view`` (``[n_rows, row]``) in the runs, as few numpy views as possible:
    one strided ``[R, L, row]`` view when the runs are a constant stride apart (sequences
    decoded in lockstep), else one slice per run. E.g. runs [0, 2), [4, 6) -> [2, 2, row]."""
    starts, ends = runs
    if sio._lockstep(starts, ends):
        shape = (starts.size, int(ends[0] - starts[0]), view.shape[1])
        strides = (int(starts[1] - starts[0]) * view.strides[0], view.strides[0], view.strides[1])
        return [np.lib.stride_tricks.as_strided(view[int(starts[0]) :], shape, strides)]
    return [view[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def numpy_bounds(mem: Any, seq_id: int) -> tuple[Any, Any]:
    """(gather, scatter): the blob's tensor bytes moved with numpy alone, same cells, same
    order, into / out of one packed buffer (nothing else: no meta, no placement)."""
    layout, cells = mem.layout, mem.v_cells[0]
    idx = sio.selected_cells(layout, cells, seq_id)
    runs = sio.cell_runs(idx)
    row_parts: list[tuple[list[np.ndarray], np.ndarray]] = []  # (row blocks, packed rows)
    col_parts: list[tuple[np.ndarray, np.ndarray]] = []  # (V^T [ch, cells], packed [ch, n])
    tensors = [layer.k for layer in mem.layers]
    if not layout.v_trans:
        tensors += [layer.v for layer in mem.layers]
    for t in tensors:
        blocks = _row_blocks(sio.rows_view(t), runs)
        row_parts.append((blocks, np.empty(idx.size * t.row_size, np.uint8)))
    if layout.v_trans:
        for layer in mem.layers:
            vt = sio.v_trans_view(layout, layer, 0)[: layer.n_embd_v_gqa]
            col_parts.append((vt, np.empty((vt.shape[0], idx.size), vt.dtype)))

    def gather() -> None:
        for blocks, out in row_parts:
            at = 0
            for b in blocks:
                out[at : at + b.size].reshape(b.shape)[...] = b
                at += b.size
        for src, packed in col_parts:
            sio.gather_cols(src, idx, packed, runs)

    def scatter() -> None:
        for blocks, data in row_parts:
            at = 0
            for b in blocks:
                b[...] = data[at : at + b.size].reshape(b.shape)
                at += b.size
        for dst, packed in col_parts:
            sio.scatter_cols(dst, idx, packed, runs)

    return gather, scatter


def placement(mem: Any, blob: bytes, seq_id: int) -> Any:
    """The cell bookkeeping of a per-sequence restore alone (seq_rm + find_slot + apply of
    the blob's cells); None for the whole cache (its restore places nothing)."""
    if seq_id < 0:
        return None
    reader = StateReader(blob)
    plan = mem.state_read_parse(reader, seq_id)
    ub = plan.place[0]  # the KVStatePlan's deferred placement: (ubatch, ext, cells)
    return lambda: mem._place_restored(seq_id, ub)


def bench_pair(pair: Pair, repeats: int) -> list[dict[str, Any]]:
    ref, mem = pair.ref, pair.mem
    rows = []
    for what, seq_id in (("one sequence", 0), ("whole cache", -1)):
        blob = mem.state_write(seq_id)
        n_mem = len(blob)
        if seq_id >= 0:
            n_ref = int(lc.llama_state_seq_get_size(ref.ctx, seq_id))
        else:
            n_ref = int(lc.llama_state_get_size(ref.ctx))
        buf = (ctypes.c_uint8 * n_ref)()

        def ref_get(buf: Any = buf, n_ref: int = n_ref, seq_id: int = seq_id) -> None:
            if seq_id >= 0:
                n = lc.llama_state_seq_get_data(ref.ctx, buf, n_ref, seq_id)
            else:
                n = lc.llama_state_get_data(ref.ctx, buf, n_ref)
            if n != n_ref:
                raise RuntimeError(f"llama.cpp wrote {n} bytes, expected {n_ref}")

        def ref_set(buf: Any = buf, n_ref: int = n_ref, seq_id: int = seq_id) -> None:
            if seq_id >= 0:
                n = lc.llama_state_seq_set_data(ref.ctx, buf, n_ref, seq_id)
            else:
                n = lc.llama_state_set_data(ref.ctx, buf, n_ref)
            if n != n_ref:
                raise RuntimeError(f"llama.cpp read {n} bytes, expected {n_ref}")

        ref_get()
        src = np.frombuffer(blob, np.uint8)
        dst = np.empty_like(src)
        gather, scatter = numpy_bounds(mem, seq_id)
        devnull = open(os.devnull, "wb")  # noqa: SIM115 (closed below)
        fns = {
            "numpy_copy": lambda src=src, dst=dst: np.copyto(dst, src),
            "pymem_write": lambda seq_id=seq_id: mem.state_write(seq_id),
            "pymem_write_file": lambda seq_id=seq_id, f=devnull: mem.state_write_to(f, seq_id),
            "pymem_read": lambda blob=blob, seq_id=seq_id: mem.state_read(blob, seq_id),
            "pymem_parse": lambda blob=blob, seq_id=seq_id: mem.state_read_parse(
                StateReader(blob), seq_id
            ),
            "llama_cpp_write": ref_get,
            "llama_cpp_read": ref_set,
            "numpy_gather": gather,
            "numpy_scatter": scatter,
        }
        place = placement(mem, blob, seq_id)
        if place is not None:
            fns["placement"] = place
        t = interleaved(fns, repeats)
        devnull.close()
        mem.state_read(blob, seq_id)  # the placement runs left stale bytes: put them back
        if bytes(mem.state_write(seq_id)) != bytes(blob):
            raise RuntimeError("the state changed while benchmarking")
        row: dict[str, Any] = dict(
            v_trans=not pair.flash_attn, blob=what, pymem_bytes=n_mem, llama_cpp_bytes=n_ref
        )
        row.update({f"{k}_ms": v * 1e3 for k, v in t.items()})
        # throughput ratios on pymem's byte count (llama.cpp's whole blob adds its outputs)
        row["write_vs_numpy"] = t["numpy_copy"] / t["pymem_write"]
        row["read_vs_numpy"] = t["numpy_copy"] / t["pymem_read"]
        row["write_file_vs_numpy"] = t["numpy_copy"] / t["pymem_write_file"]
        row["write_vs_llama_cpp"] = t["llama_cpp_write"] / t["pymem_write"]
        row["read_vs_llama_cpp"] = t["llama_cpp_read"] / t["pymem_read"]
        row["layout_gather_vs_numpy"] = t["numpy_copy"] / t["numpy_gather"]
        row["layout_scatter_vs_numpy"] = t["numpy_copy"] / t["numpy_scatter"]
        rows.append(row)
    return rows


def main() -> None:
    quick = "--quick" in sys.argv
    n_tokens = 2048 if quick else 8192
    repeats = 7 if quick else 31
    models = LlamaModels()
    spec = spec_from_gguf(str(MODELS["llama"]))
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    try:
        for fa in (False, True):
            t0 = time.perf_counter()
            pair = filled_pair(models, spec, fa, n_tokens)
            print(f"  filled fa {int(fa)}: {time.perf_counter() - t0:.1f} s", flush=True)
            try:
                rows += bench_pair(pair, repeats)
            finally:
                pair.close()
    finally:
        models.close()
    print_table(
        f"State I/O, tiny-llama f16, {STATE_N_SEQ} x {n_tokens} tokens in a unified "
        f"{STATE_N_CTX}-cell cache (median ms; ratios are throughput, higher is better)",
        ["v_trans", "blob", "bytes", "numpy copy", "pymem write", "write to file",
         "pymem read", "(parse)", "llama.cpp write", "llama.cpp read", "write/numpy",
         "read/numpy", "write/llama", "read/llama"],
        [
            [r["v_trans"], r["blob"], r["pymem_bytes"], f"{r['numpy_copy_ms']:.3f}",
             f"{r['pymem_write_ms']:.3f}", f"{r['pymem_write_file_ms']:.3f}",
             f"{r['pymem_read_ms']:.3f}", f"{r['pymem_parse_ms']:.3f}",
             f"{r['llama_cpp_write_ms']:.3f}", f"{r['llama_cpp_read_ms']:.3f}",
             f"{r['write_vs_numpy']:.2f}", f"{r['read_vs_numpy']:.2f}",
             f"{r['write_vs_llama_cpp']:.2f}", f"{r['read_vs_llama_cpp']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    print_table(
        "Bounds in the same run (median ms): the blob's tensor bytes moved with numpy alone "
        "(the layout's cost), and a per-sequence restore's cell placement",
        ["v_trans", "blob", "numpy copy", "numpy gather", "numpy scatter", "placement",
         "gather/copy", "scatter/copy"],
        [
            [r["v_trans"], r["blob"], f"{r['numpy_copy_ms']:.3f}", f"{r['numpy_gather_ms']:.3f}",
             f"{r['numpy_scatter_ms']:.3f}",
             f"{r['placement_ms']:.3f}" if "placement_ms" in r else "-",
             f"{r['layout_gather_vs_numpy']:.2f}", f"{r['layout_scatter_vs_numpy']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    load_after = os.getloadavg()
    print(
        f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; {os.cpu_count()} CPUs"
    )
    if not quick:
        path = write_results(
            "bench_state_io",
            dict(rows=rows, n_tokens=n_tokens, repeats=repeats, target_vs_numpy=TARGET_NUMPY,
                 target_vs_llama_cpp=TARGET_LLAMA, load_average_before=load_before,
                 load_average_after=load_after, cpus=os.cpu_count()),
        )  # fmt: skip
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
