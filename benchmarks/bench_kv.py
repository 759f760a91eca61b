"""KV cache bookkeeping, sequence operations and state I/O.

Tables on stdout, results in results/bench_kv.json.

1. Decode steps: N sequences x 1 token (N = 1, 8, 64) and a 512-token prefill, at
   kv_size 4096, 32768, 262144; and N = 64, 256 in the streams layout (one stream per
   sequence, ``unified=False``, the reference's default), kv_size cells in all (kv_size / N
   per stream). Each sequence holds ``ctx`` tokens when timing starts.
   Timed per step: ``init_batch`` (split + plan under the undo journal) + ``apply`` +
   K/V row indices ("bookkeeping"), and the KQ mask ``[n_tokens, n_kv]`` separately
   (its size grows with n_kv). Batch validation (pymem.batch) is not included. Median
   of the steps.
2. Sequence operations on a full 32768-cell cache (64 sequences x 512 tokens).
3. State write/read (whole cache and one sequence) against a numpy copy of as many bytes:
   a write makes a new blob (compare with ``np.copy``), a read fills existing tensors
   (compare with ``np.copyto``). 4 sequences of 1024 tokens in a 4096-cell cache, laid out
   in lockstep (each sequence every 4th cell: 1024 runs of one cell) or in irregular runs
   (decode steps of 0-24 tokens per sequence: 77 runs). One sequence also through the
   non-host code path (numpy views of the tensors hidden, as on a GPU; the bytes still
   move between host buffers). With transposed V a lockstep sequence's V elements are 2
   bytes 8 bytes apart: the copy reads every cache line of the stream's V, 4x the blob.

Run: python benchmarks/bench_kv.py [--quick] [--only decode|ops|state]
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import best_of, print_table, write_results

from pymem.batch import Batch, BatchAllocator
from pymem.kv import KVCache
from pymem.kv.cells import STALE
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType

NONE = RopeSpec(n_rot=64, rope_type=RopeType.NONE)


def spec(n_layer: int, n_head_kv: int, head_dim: int) -> ModelSpec:
    return ModelSpec(layers=(LayerSpec.attention(n_head_kv, head_dim, rope=NONE),) * n_layer)


def batch(items: list) -> BatchAllocator:
    b = BatchAllocator()
    b.init(Batch.from_items(items), n_seq_max=256)
    return b


def decode_items(kv: KVCache, seqs: range) -> list:
    return [[1, kv.seq_pos_max(s) + 1, [s], True] for s in seqs]


def fill(kv: KVCache, n_seq: int, ctx: int) -> None:
    """``ctx`` tokens for each of ``n_seq`` sequences, in prompt chunks of 512."""
    for s in range(n_seq):
        done = 0
        while done < ctx:
            n = min(512, ctx - done)
            ctx_kv = kv.init_batch(batch([[1, done + k, [s], False] for k in range(n)]), 512, False)
            ctx_kv.apply()
            done += n


def timed_step(kv: KVCache, items: list, n_ubatch: int) -> tuple[float, float, int]:
    b = batch(items)
    t0 = time.perf_counter()
    ctx = kv.init_batch(b, n_ubatch, False)
    ctx.apply()
    ctx.get_k_idxs()
    ctx.get_v_idxs()
    t1 = time.perf_counter()
    ctx.get_kq_mask()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, ctx.get_n_kv()


def bench_decode(quick: bool) -> list[dict]:
    rows = []
    sizes = [4096, 32768] if quick else [4096, 32768, 262144]
    for kv_size in sizes:
        cases = ("decode 1", "decode 8", "decode 64", "prefill 512")
        for case in (*cases, "decode 64 streams", "decode 256 streams"):
            n_seq = int(case.split()[1]) if case.startswith("decode") else 1
            ctx = min(256, kv_size // (2 * n_seq))
            if case.endswith("streams"):
                kv = KVCache(
                    spec(2, 1, 64), kv_size=kv_size // n_seq, n_seq_max=n_seq, unified=False
                )
            else:
                kv = KVCache(spec(2, 1, 64), kv_size=kv_size, n_seq_max=max(n_seq, 1))
            fill(kv, n_seq, ctx)
            book, mask, n_kv = [], [], 0
            # stay within the cache: the steps add n_seq cells each
            steps = min(20 if quick else 50, kv_size // 4 // n_seq)
            for _ in range(steps):
                if case.startswith("decode"):
                    b, m, n_kv = timed_step(kv, decode_items(kv, range(n_seq)), 512)
                else:
                    kv.seq_rm(0, ctx, -1)
                    b, m, n_kv = timed_step(
                        kv, [[1, ctx + k, [0], k == 511] for k in range(512)], 512
                    )
                book.append(b)
                mask.append(m)
            kv.close()
            rows.append(
                dict(
                    kv_size=kv_size,
                    case=case,
                    ctx_per_seq=ctx,
                    n_kv=n_kv,
                    bookkeeping_ms=statistics.median(book) * 1e3,
                    mask_ms=statistics.median(mask) * 1e3,
                )
            )
    print_table(
        "Decode step (median): init_batch + apply + row indices; KQ mask separately",
        ["kv_size", "case", "ctx/seq", "n_kv", "bookkeeping ms", "mask ms", "total ms"],
        [
            [
                r["kv_size"],
                r["case"],
                r["ctx_per_seq"],
                r["n_kv"],
                f"{r['bookkeeping_ms']:.3f}",
                f"{r['mask_ms']:.3f}",
                f"{r['bookkeeping_ms'] + r['mask_ms']:.3f}",
            ]
            for r in rows
        ],
    )
    return rows


def bench_seq_ops() -> list[dict]:
    kv = KVCache(spec(1, 1, 64), kv_size=32768, n_seq_max=64)
    fill(kv, 64, 512)
    assert kv.v_cells[0].used == 32768
    cells = kv.v_cells[0]
    res = []

    saved = copy.deepcopy(cells)

    def once(fn) -> float:
        """Time ``fn`` once on the full cache, then put the cells back (not timed)."""
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        kv.v_cells[0] = copy.deepcopy(saved)
        kv.v_heads[0] = 0
        return t

    def med(fn, n: int = 30) -> tuple[float, float]:
        ts = [once(fn) for _ in range(n)]
        return statistics.median(ts), min(ts)

    res.append(("seq_rm(s, 256, -1)  (256 cells)", med(lambda: kv.seq_rm(7, 256, -1))))
    res.append(("seq_rm(s, -1, -1)  (512 cells)", med(lambda: kv.seq_rm(7, -1, -1))))
    res.append(("seq_rm(-1, 100, 200)  (6400 cells)", med(lambda: kv.seq_rm(-1, 100, 200))))
    res.append(("seq_cp(s, 100)  (512 cells, shared)", med(lambda: kv.seq_cp(7, 100, -1, -1))))
    res.append(("seq_keep(s)", med(lambda: kv.seq_keep(7), 10)))
    res.append(("seq_add(s, -1, -1, 5)", med(lambda: kv.seq_add(7, -1, -1, 5))))
    res.append(("seq_div(s, -1, -1, 2)", med(lambda: kv.seq_div(7, -1, -1, 2))))

    cells = kv.v_cells[0]

    def pos_max_dirty() -> None:
        cells._pdirty[7] = STALE  # both cached bounds of sequence 7 stale
        kv.seq_pos_max(7)

    t = best_of(lambda: kv.seq_pos_max(7))
    res.append(("seq_pos_max(s)  (cached)", (t, t)))
    t = best_of(pos_max_dirty)
    res.append(("seq_pos_max(s)  (recomputed)", (t, t)))
    kv.close()
    rows = [dict(op=name, median_us=t[0] * 1e6, best_us=t[1] * 1e6) for name, t in res]
    print_table(
        "Sequence ops on a full 32768-cell cache (64 seqs x 512 tokens)",
        ["op", "median us", "best us"],
        [[r["op"], f"{r['median_us']:.1f}", f"{r['best_us']:.1f}"] for r in rows],
    )
    return rows


def irregular(kv: KVCache, n_seq: int, n_tok: int, max_run: int, seed: int = 0) -> None:
    """Decode steps of 0 to ``max_run`` tokens per sequence: irregular runs of cells."""
    rng = np.random.default_rng(seed)
    pos = [0] * n_seq
    while min(pos) < n_tok:
        items = []
        for s in range(n_seq):
            for _ in range(min(int(rng.integers(0, max_run + 1)), n_tok - pos[s])):
                items.append([1, pos[s], [s], False])
                pos[s] += 1
        if items:
            kv.init_batch(batch(items), 4096, False).apply()


def bench_state(quick: bool) -> list[dict]:
    import pymem.kv.state_io as sio

    rows = []
    n_layer = 4 if quick else 8
    for v_trans in (True, False):
        for layout in ("lockstep", "irregular"):
            kv = KVCache(spec(n_layer, 8, 128), kv_size=4096, n_seq_max=4, v_trans=v_trans)
            if layout == "lockstep":
                items = [[1, p, [s], False] for p in range(1024) for s in range(4)]
                kv.init_batch(batch(items), 4096, False).apply()
            else:
                irregular(kv, 4, 1000, 24)
            for layer in kv.layers:
                for t in (layer.k, layer.v):
                    t.write_bytes(
                        np.random.default_rng(0).integers(0, 255, t.nbytes, np.uint8).tobytes()
                    )
            cases = [("one seq", 2, False), ("one seq, non-host path", 2, True)]
            if layout == "lockstep":
                cases.insert(0, ("whole", -1, False))
            for what, seq, hide in cases:
                views = (sio.rows_view, sio.v_trans_view)
                if hide:
                    sio.rows_view = lambda t: None  # type: ignore[assignment]
                    sio.v_trans_view = lambda kv, layer, strm: None  # type: ignore[assignment]
                try:
                    blob = kv.state_write(seq)
                    n = len(blob)
                    runs = (
                        sio.cell_runs(sio.selected_cells(kv.layout, kv.v_cells[0], 2))[0].size
                        if seq >= 0
                        else 1
                    )
                    t_w = best_of(lambda kv=kv, seq=seq: kv.state_write(seq), repeat=5, number=1)
                    t_r = best_of(
                        lambda kv=kv, blob=blob, seq=seq: kv.state_read(blob, seq),
                        repeat=5,
                        number=1,
                    )
                finally:
                    sio.rows_view, sio.v_trans_view = views
                src = np.frombuffer(blob, np.uint8)
                dst = np.empty_like(src)
                t_np = best_of(lambda src=src, dst=dst: np.copyto(dst, src), repeat=5, number=1)
                t_new = best_of(lambda src=src: np.copy(src), repeat=5, number=1)
                rows.append(
                    dict(
                        v_trans=v_trans,
                        layout=layout,
                        blob=what,
                        runs=runs,
                        mib=n / 2**20,
                        write_gbs=n / t_w / 1e9,
                        read_gbs=n / t_r / 1e9,
                        numpy_copy_gbs=n / t_np / 1e9,
                        numpy_new_copy_gbs=n / t_new / 1e9,
                    )
                )
            kv.close()
    print_table(
        "State I/O (best of 5) vs numpy copy of the same bytes (write vs np.copy, read vs np.copyto)",
        [
            "v_trans",
            "layout",
            "blob",
            "runs",
            "MiB",
            "write GB/s",
            "read GB/s",
            "np.copyto (into existing) GB/s",
            "np.copy (new array) GB/s",
            "write / np.copy",
            "read / np.copyto",
        ],
        [
            [
                r["v_trans"],
                r["layout"],
                r["blob"],
                r["runs"],
                f"{r['mib']:.1f}",
                f"{r['write_gbs']:.2f}",
                f"{r['read_gbs']:.2f}",
                f"{r['numpy_copy_gbs']:.2f}",
                f"{r['numpy_new_copy_gbs']:.2f}",
                f"{r['write_gbs'] / r['numpy_new_copy_gbs']:.0%}",
                f"{r['read_gbs'] / r['numpy_copy_gbs']:.0%}",
            ]
            for r in rows
        ],
    )
    return rows


def main() -> None:
    quick = "--quick" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    results: dict = dict(quick=quick)
    if only in (None, "decode"):
        results["decode"] = bench_decode(quick)
    if only in (None, "ops"):
        results["seq_ops"] = bench_seq_ops()
    if only in (None, "state"):
        results["state"] = bench_state(quick)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results["load_average"] = load
    print(f"\nload average {load:.1f}, {os.cpu_count()} CPUs")
    if only is None:
        path = write_results("bench_kv", results)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
