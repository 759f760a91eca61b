"""Batch validation and ubatch splitting time (pymem.batch).

Shapes: a decode step (64 sequences x 1 token), one prompt (1 x 512) and a multi-prompt
batch (64 x 64 = 4,096 tokens, grouped by sequence and interleaved). Each sequence
continues a memory whose last position is 99. For every splitter the whole planning pass
is timed (``split_reset`` then split until None) with n_ubatch 512, the reference's
default; ``init`` (validation + indexes) is timed apart. Best of ``--repeat`` rounds
(default 7; raise it on a loaded machine: the best round approaches the unloaded time).

    PYTHONPATH=. python benchmarks/bench_batch.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _util import best_of, print_table, write_results

from pymem.batch import Batch, BatchAllocator

N_UBATCH = 512


class Memory:
    """Every sequence holds positions [0, 99]."""

    def seq_pos_min(self, s: int) -> int:
        return 0

    def seq_pos_max(self, s: int) -> int:
        return 99


def make_batch(n_seq: int, n_tok: int, interleaved: bool) -> Batch:
    n = n_seq * n_tok
    if interleaved:  # E.g. 2 x 2 -> seqs [0, 1, 0, 1], pos [100, 100, 101, 101]
        seq = np.tile(np.arange(n_seq, dtype=np.int32), n_tok)
        pos = np.repeat(np.arange(n_tok, dtype=np.int32), n_seq) + 100
    else:  # E.g. 2 x 2 -> seqs [0, 0, 1, 1], pos [100, 101, 100, 101]
        seq = np.repeat(np.arange(n_seq, dtype=np.int32), n_tok)
        pos = np.tile(np.arange(n_tok, dtype=np.int32), n_seq) + 100
    out = np.zeros(n, dtype=np.bool_)
    out[-1] = True
    token = (np.arange(n) % 1000).astype(np.int32)
    return Batch(token, pos=pos, seq_id=seq, output=out)


SPLITS = {
    "simple": lambda b: b.split_simple(N_UBATCH),
    "equal": lambda b: b.split_equal(N_UBATCH, False, 0),
    "equal seq": lambda b: b.split_equal(N_UBATCH, True, 0),
    "seq": lambda b: b.split_seq(N_UBATCH),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="rounds; the best one is kept")
    repeat = ap.parse_args().repeat
    shapes = [
        ("64 x 1 (decode)", 64, 1, False),
        ("1 x 512 (prompt)", 1, 512, False),
        ("64 x 64 grouped", 64, 64, False),
        ("64 x 64 interleaved", 64, 64, True),
    ]
    mem = Memory()
    rows, results = [], []
    for name, n_seq, n_tok, inter in shapes:
        batch = make_batch(n_seq, n_tok, inter)
        balloc = BatchAllocator()
        t_init = best_of(
            lambda balloc=balloc, batch=batch: balloc.init(
                batch, memory=mem, n_seq_max=64, n_vocab=1000
            ),
            repeat,
        )
        balloc.init(batch, memory=mem, n_seq_max=64, n_vocab=1000)
        for split, fn in SPLITS.items():

            def plan(fn=fn, balloc=balloc) -> int:
                balloc.split_reset()
                n_ub = 0
                while fn(balloc) is not None:
                    n_ub += 1
                return n_ub

            n_ub = plan()
            assert balloc.n_used == balloc.n_tokens
            t_split = best_of(plan, repeat)
            rows.append(
                [
                    name,
                    split,
                    n_ub,
                    f"{t_init * 1e6:.0f}",
                    f"{t_split * 1e6:.0f}",
                    f"{(t_init + t_split) * 1e6:.0f}",
                ]
            )
            results.append(
                {
                    "shape": name,
                    "n_seq": n_seq,
                    "n_tokens_per_seq": n_tok,
                    "interleaved": inter,
                    "splitter": split,
                    "n_ubatch": N_UBATCH,
                    "n_ubatches": n_ub,
                    "init_us": round(t_init * 1e6, 1),
                    "split_us": round(t_split * 1e6, 1),
                    "total_us": round((t_init + t_split) * 1e6, 1),
                }
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print_table(
        f"pymem.batch: init (validation) and one planning pass, n_ubatch {N_UBATCH}, "
        f"best of {repeat} (load average {load:.1f}, {os.cpu_count()} CPUs)",
        ["batch", "splitter", "ubatches", "init µs", "split µs", "total µs"],
        rows,
    )
    path = write_results(
        "bench_batch",
        {"repeat": repeat, "load_average": load, "n_cpu": os.cpu_count(), "results": results},
    )
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
