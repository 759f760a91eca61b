"""State calls against where the caller's buffer lies within a 4 KiB page.

Why: glibc's x86 memcpy copies long blocks with ``rep movsb``, which AMD Zen CPUs (this
project's EPYC) run several times slower when the destination lies just past the source
modulo 4 KiB. A state call's runs all share one such offset (the blob's position against
the tensors'), so a one-sequence write or read ran up to 4x slower, or not, by where the
caller's buffer happened to land; bench_guard once reported a 3x "regression" that was
only this. pymem's run copy (``pm_copy_bytes``) takes a backward loop of 64-byte moves
at those offsets.

For tiny-llama (f16, 4 sequences x ``--tokens`` decoded in interleaved chunks of 128, a
unified 32,768-cell cache, V in rows and transposed) it times, at every 16-byte offset of
a page: sequence 0's ``state_write_buffer`` into a buffer starting there, its
``state_read`` from a copy of the blob starting there, and numpy's copy of the blob's
bytes into that buffer (the same memcpy, for comparison). It prints the median over the
offsets and the worst offset's time, per call (a ratio near 1: the call does not care
where the buffer lies). Then ``Tensor.copy_rows`` of single rows a row apart, with rows
whose size puts the destination 0, 16, 64 or 128 bytes past the source modulo 4 KiB
(``pm_move_bytes``: the copy of rows and of tensor-to-tensor runs, such as a
checkpoint's restore).

Run: python benchmarks/bench_copy_offset.py [--quick] (--quick: every 64th offset, no
JSON; a full run writes results/bench_copy_offset.json)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_state_floor as bsf
import bench_vs_llama_cpp as bvl
from _util import finish_run, print_table


def _median_us(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def offsets_of(mem: Any, step: int, repeats: int) -> dict[str, list[float]]:
    """Per call, its median microseconds with the buffer at each offset (0, step, ...)."""
    blob = bytes(mem.state_write(0))
    n = len(blob)
    src = np.frombuffer(blob, np.uint8)
    big = bytearray(n + 8192)
    arr = np.frombuffer(big, np.uint8)
    addr = arr.ctypes.data
    times: dict[str, list[float]] = {"write": [], "read": [], "numpy copy": []}
    for off in range(0, 4096, step):
        at = (off - addr) % 4096  # the buffer starts `off` bytes into a page
        view, out = memoryview(big)[at : at + n], arr[at : at + n]
        write = lambda v=view: mem.state_write_buffer(v, 0)  # noqa: E731
        copy = lambda o=out: np.copyto(o, src)  # noqa: E731
        read = lambda v=view: mem.state_read(v, 0)  # noqa: E731
        times["write"].append(_median_us(write, repeats))
        times["numpy copy"].append(_median_us(copy, repeats))
        out[:] = src
        times["read"].append(_median_us(read, repeats))
    return times


def row_copies(repeats: int) -> list[dict[str, Any]]:
    """``Tensor.copy_rows`` of 128 single rows, each to the next row of one tensor, with
    rows of 16,384 + ``extra`` bytes: the copy's destination lies ``extra`` bytes past its
    source modulo 4 KiB (16: inside the slow window)."""
    from pymem.backend import TensorSpec, TensorStore

    rows = []
    for extra in (0, 16, 64, 128):
        row = 16384 + extra
        with TensorStore("cpu", [TensorSpec("a", "i8", (row, 256))]) as store:
            a = store["a"]
            a.write_bytes(np.ones(a.nbytes, np.uint8))
            src, dst = list(range(0, 256, 2)), list(range(1, 256, 2))
            us = _median_us(lambda a=a, src=src, dst=dst: a.copy_rows(src, a, dst), repeats)
            rows.append(dict(row_bytes=row, offset=row % 4096, us=us))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every 64th offset, no JSON")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per sequence")
    args = ap.parse_args()
    if args.tokens < bvl.STATE_CHUNK or args.tokens % bvl.STATE_CHUNK:
        ap.error(f"--tokens {args.tokens}: must be a positive multiple of {bvl.STATE_CHUNK}")
    step, repeats = (64, 9) if args.quick else (16, 15)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for fa in (True, False):
        mem = bsf.filled(bvl.MODELS["llama"], fa, args.tokens)
        try:
            for call, ts in offsets_of(mem, step, repeats).items():
                med, worst = statistics.median(ts), max(ts)
                rows.append(dict(v_trans=not fa, call=call, median_us=med, worst_us=worst,
                                 worst_offset=step * ts.index(worst), worst_vs_median=worst / med))  # fmt: skip
        finally:
            mem.close()
    print_table(
        f"tiny-llama, sequence 0 of 4 x {args.tokens} tokens, the buffer at each {step}-byte "
        "offset of a page (median µs over the offsets, and the worst)",
        ["v_trans", "call", "median", "worst", "worst offset", "worst / median"],
        [[r["v_trans"], r["call"], f"{r['median_us']:.1f}", f"{r['worst_us']:.1f}",
          r["worst_offset"], f"{r['worst_vs_median']:.2f}"] for r in rows],
    )  # fmt: skip
    copies = row_copies(3 * repeats)
    print_table(
        "Tensor.copy_rows of 128 single rows a row on (median µs)",
        ["row bytes", "offset mod 4 KiB", "µs"],
        [[r["row_bytes"], r["offset"], f"{r['us']:.1f}"] for r in copies],
    )
    finish_run("bench_copy_offset", args.quick, load_before, rows=rows, row_copies=copies,
               tokens=args.tokens, step=step, repeats=repeats)  # fmt: skip


if __name__ == "__main__":
    main()
