"""KV cache bookkeeping, sequence operations and state I/O.

Run: python benchmarks/bench_kv.py [--quick]   (tables on stdout, results/bench_kv.json)

1. Decode steps: N sequences x 1 token (N = 1, 8, 64) and a 512-token prefill, at
   kv_size 4096, 32768, 262144. Each sequence holds ``ctx`` tokens when timing starts.
   Timed per step: ``init_batch`` (split + plan under the undo journal) + ``apply`` +
   K/V row indices ("bookkeeping"), and the KQ mask ``[n_tokens, n_kv]`` separately
   (its size grows with n_kv). Batch validation (pymem.batch) is not included. Median
   of the steps.
2. Sequence operations on a full 32768-cell cache (64 sequences x 512 tokens).
3. State write/read (whole cache and one sequence) against a numpy copy of as many bytes:
   a write makes a new blob (compare with ``np.copy``), a read fills existing tensors
   (compare with ``np.copyto``).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import best_of, print_table, write_results

from pymem.batch import Batch, BatchAllocator
from pymem.kv import KVCache
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
        for case in ("decode 1", "decode 8", "decode 64", "prefill 512"):
            n_seq = int(case.split()[1]) if case.startswith("decode") else 1
            ctx = min(256, kv_size // (2 * n_seq))
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
        cells._pdirty[7] = True
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


def bench_state(quick: bool) -> list[dict]:
    rows = []
    n_layer = 4 if quick else 8
    for v_trans in (True, False):
        kv = KVCache(spec(n_layer, 8, 128), kv_size=4096, n_seq_max=4, v_trans=v_trans)
        # 4 sequences decoded in lockstep: each sequence's cells are every 4th cell
        kv.init_batch(
            batch([[1, p, [s], False] for p in range(1024) for s in range(4)]), 4096, False
        ).apply()
        for layer in kv.layers:
            for t in (layer.k, layer.v):
                t.write_bytes(
                    np.random.default_rng(0).integers(0, 255, t.nbytes, np.uint8).tobytes()
                )
        for what, seq in (("whole", -1), ("one seq (1024 runs)", 2)):
            blob = kv.state_write(seq)
            n = len(blob)
            t_w = best_of(lambda kv=kv, seq=seq: kv.state_write(seq), repeat=5, number=1)
            t_r = best_of(
                lambda kv=kv, blob=blob, seq=seq: kv.state_read(blob, seq), repeat=5, number=1
            )
            src = np.frombuffer(blob, np.uint8)
            dst = np.empty_like(src)
            t_np = best_of(lambda src=src, dst=dst: np.copyto(dst, src), repeat=5, number=1)
            t_new = best_of(lambda src=src: np.copy(src), repeat=5, number=1)
            rows.append(
                dict(
                    v_trans=v_trans,
                    blob=what,
                    mib=n / 2**20,
                    write_gbs=n / t_w / 1e9,
                    read_gbs=n / t_r / 1e9,
                    numpy_copy_gbs=n / t_np / 1e9,
                    numpy_new_copy_gbs=n / t_new / 1e9,
                )
            )
        kv.close()
    print_table(
        "State I/O (best of 5) vs numpy copy of the same bytes",
        [
            "v_trans",
            "blob",
            "MiB",
            "write GB/s",
            "read GB/s",
            "np.copyto (into existing) GB/s",
            "np.copy (new array) GB/s",
        ],
        [
            [
                r["v_trans"],
                r["blob"],
                f"{r['mib']:.1f}",
                f"{r['write_gbs']:.2f}",
                f"{r['read_gbs']:.2f}",
                f"{r['numpy_copy_gbs']:.2f}",
                f"{r['numpy_new_copy_gbs']:.2f}",
            ]
            for r in rows
        ],
    )
    return rows


def main() -> None:
    quick = "--quick" in sys.argv
    decode = bench_decode(quick)
    ops = bench_seq_ops()
    state = bench_state(quick)
    path = write_results("bench_kv", dict(decode=decode, seq_ops=ops, state=state, quick=quick))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
