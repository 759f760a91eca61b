"""RecurrentMemory: per-step bookkeeping, sequence ops and state I/O throughput.

Run: python benchmarks/bench_recurrent.py   (prints tables, writes results/bench_recurrent.json)

Model: Mamba-130m-like widths (24 layers, d_inner 1536, d_conv 4, d_state 16), f32:
R row 18 KiB, S row 96 KiB, one sequence's state 2.7 MiB. Bookkeeping does not depend
on the widths; state I/O moves exactly those bytes.

* decode step: n sequences x 1 token, steady state (every sequence already has its own
  cell). ``plan`` is ``prepare`` (planning on a copy), ``apply`` is ``find_slot`` on the
  memory plus the graph input ``s_copy``; ``init_batch + apply`` also includes the
  BatchAllocator's validation and split of the batch.
* a reordering step: the ubatch's sets are in the reverse of the cells' order, so every
  set is swapped (the one step that walks the sets one by one).
* sequence ops at 256 cells; state I/O of one sequence and of the whole memory against a
  numpy copy of the same number of bytes (into a reused buffer, and into a new one, which
  is what producing a blob costs).
* a whole memory of one sequence read into a memory of 16 cells, without and with two
  rollback planes (what zeroing the other cells' rows costs on top of the copy).
"""

from __future__ import annotations

import os

import numpy as np
from _util import best_of, print_table, write_results

from pymem.batch import Batch, BatchAllocator
from pymem.recurrent import RecurrentMemory, RecurrentMemoryContext
from pymem.spec import LayerSpec, ModelSpec
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

N_LAYER, D_INNER, D_CONV, D_STATE = 24, 1536, 4, 16
SPEC = ModelSpec(
    layers=(LayerSpec.ssm((D_CONV - 1) * D_INNER, D_STATE * D_INNER),) * N_LAYER, arch="mamba"
)
SMALL = ModelSpec(layers=(LayerSpec.ssm(8, 8),) * 2, arch="mamba")


def one_token_ubatch(seqs: list[int], pos: list[int]) -> UBatch:
    n = len(seqs)
    seq_idx = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
    unq = np.sort(np.asarray(seqs, dtype=np.int32))
    seq_idx[unq] = np.arange(n)
    return UBatch(
        equal_seqs=True, n_tokens=n, n_seq_tokens=1, n_seqs=n, n_seqs_unq=n, n_pos=1,
        token=np.zeros(n, dtype=np.int32), embd=None, pos=np.asarray(pos, dtype=np.int32),
        n_seq_id=np.ones(n, dtype=np.int32), seq_id=np.asarray(seqs, dtype=np.int32)[:, None],
        seq_id_unq=unq, seq_idx=seq_idx, output=np.ones(n, dtype=np.int8),
        batch_idxs=np.arange(n, dtype=np.int32),
    )  # fmt: skip


def bench_steps(data: dict) -> None:
    rows = []
    for n in (1, 8, 64, 256):
        mem = RecurrentMemory(SMALL, n_seq_max=n)
        seqs = list(range(n))
        assert mem.find_slot(one_token_ubatch(seqs, [0] * n))
        step = one_token_ubatch(seqs, [1] * n)

        base = mem.cells.copy()

        def reset(mem: RecurrentMemory = mem, base=base) -> None:
            mem.cells = base.copy()  # back to pos 0 so every apply is the same step

        def apply(mem: RecurrentMemory = mem, step: UBatch = step) -> None:
            reset()
            ctx = RecurrentMemoryContext(mem, [step])
            ctx.apply()
            ctx.s_copy()

        t_plan = best_of(lambda mem=mem, step=step: mem.prepare([step]))
        t_apply = best_of(apply) - best_of(reset)

        batch = Batch.from_items([(1, 1, [s], True) for s in seqs])
        balloc = BatchAllocator()

        def full(
            mem: RecurrentMemory = mem, batch: Batch = batch, balloc=balloc, n: int = n
        ) -> None:
            reset()  # positions are validated against the memory
            balloc.init(batch, memory=mem, n_seq_max=n)
            ctx = mem.init_batch(balloc, 512, embd_all=False)
            ctx.apply()
            ctx.s_copy()

        t_full = best_of(full) - best_of(reset)

        # the reordering case: cells hold seqs in reverse order, the ubatch is ascending
        rev = RecurrentMemory(SMALL, n_seq_max=n)
        assert rev.find_slot(one_token_ubatch(seqs[::-1], [0] * n))
        t_swap = best_of(lambda rev=rev, step=step: rev.prepare([step]))
        mem.close()
        rev.close()
        rows.append([n, f"{t_plan * 1e6:.1f}", f"{t_apply * 1e6:.1f}", f"{t_full * 1e6:.1f}",
                     f"{t_swap * 1e6:.1f}"])  # fmt: skip
        data[f"step_n{n}"] = {
            "plan_us": t_plan * 1e6,
            "apply_us": t_apply * 1e6,
            "init_batch_apply_us": t_full * 1e6,
            "plan_reorder_all_us": t_swap * 1e6,
        }
    print_table(
        "decode step, n sequences x 1 token (microseconds)",
        [
            "n seqs",
            "plan (prepare)",
            "apply + s_copy",
            "balloc.init + init_batch + apply",
            "plan, all sets swapped",
        ],
        rows,
    )


def bench_seq_ops(data: dict) -> None:
    n = 256
    mem = RecurrentMemory(SMALL, n_seq_max=n)
    assert mem.find_slot(one_token_ubatch(list(range(n)), [5] * n))
    base = mem.cells.copy()

    def reset() -> None:
        mem.cells = base.copy()

    ops = {
        "seq_rm(s, -1, -1)": lambda: mem.seq_rm(100),
        "seq_rm partial (False)": lambda: mem.seq_rm(100, 3, -1),
        "seq_cp(s, d)": lambda: mem.seq_cp(100, 101),
        "seq_keep(s)": lambda: mem.seq_keep(100),
        "seq_add(s, 0, -1, 3)": lambda: mem.seq_add(100, 0, -1, 3),
        "seq_div(s, 0, -1, 2)": lambda: mem.seq_div(100, 0, -1, 2),
        "seq_pos_max(s)": lambda: mem.seq_pos_max(100),
    }
    t_reset = best_of(reset)
    rows = []
    for name, fn in ops.items():

        def run(fn=fn) -> None:
            reset()
            fn()

        t = max(best_of(run) - t_reset, 0.0)
        rows.append([name, f"{t * 1e6:.1f}"])
        data[f"op {name}"] = {"us": t * 1e6}
    mem.close()
    print_table(
        f"sequence ops, {n} cells (microseconds, cell-state reset subtracted)", ["op", "time"], rows
    )


def bench_state_io(data: dict) -> None:
    n = 8
    mem = RecurrentMemory(SPEC, n_seq_max=n)
    assert mem.find_slot(one_token_ubatch(list(range(n)), [5] * n))
    rng = np.random.default_rng(0)
    for il in mem.layers:
        for t in (mem.get_r_l(il), mem.get_s_l(il)):
            t.numpy()[:] = rng.standard_normal(t.numpy().shape, dtype=np.float32)
    rows = []
    for label, seq in (("one sequence", 3), ("whole memory (8 seqs)", -1)):
        blob = mem.state_write(seq)
        size = len(blob)
        t_w = best_of(lambda seq=seq: mem.state_write(seq), repeat=5)
        t_r = best_of(lambda blob=blob, seq=seq: mem.state_read(blob, seq), repeat=5)
        src = np.frombuffer(blob, dtype=np.uint8)
        dst = np.empty_like(src)
        t_np = best_of(lambda src=src, dst=dst: np.copyto(dst, src), repeat=5)
        t_np_new = best_of(lambda src=src: src.copy(), repeat=5)  # what a new blob costs
        gbs = [size / t / 1e9 for t in (t_w, t_r, t_np, t_np_new)]
        rows.append([label, f"{size / 2**20:.2f} MiB", *(f"{g:.1f}" for g in gbs)])
        data[f"state {label}"] = {
            "bytes": size,
            "write_GBps": gbs[0],
            "read_GBps": gbs[1],
            "numpy_copy_GBps": gbs[2],
            "numpy_copy_new_buffer_GBps": gbs[3],
        }
    mem.close()
    print_table(
        "state I/O (GB/s)",
        ["blob", "size", "state_write", "state_read", "numpy copy", "numpy copy (new buffer)"],
        rows,
    )


def bench_restore_into_larger(data: dict) -> None:
    """A whole memory of one sequence restored into a memory of 16 cells (a session loaded
    into a server's memory): the cells past the blob's, in every rollback plane, must be
    zero after it, as the reference's clear(true) leaves them; pymem zeroes only those a
    placement, graph or store wrote since they were last zeroed (``rows_hi``)."""
    rows = []
    for planes in (0, 2):
        mem = RecurrentMemory(SPEC, n_seq_max=16, n_rs_seq=planes)
        assert mem.find_slot(one_token_ubatch([0], [5]))
        blob = mem.state_write()
        t_r = best_of(lambda mem=mem, blob=blob: mem.state_read(blob), repeat=5)
        src = np.frombuffer(blob, dtype=np.uint8)
        dst = np.empty_like(src)
        t_np = best_of(lambda src=src, dst=dst: np.copyto(dst, src), repeat=5)
        rows.append(
            [planes, f"{len(blob) / 2**20:.2f} MiB", f"{t_r * 1e6:.0f}", f"{t_np / t_r:.2f}"]
        )
        data[f"whole read into 16 cells, {planes} rollback planes"] = {
            "bytes": len(blob),
            "read_us": t_r * 1e6,
            "read_vs_numpy_copy": t_np / t_r,
        }
        mem.close()
    print_table(
        "whole read of one sequence into a 16-cell memory",
        ["rollback planes", "blob", "state_read µs", "numpy copy / read"],
        rows,
    )


def main() -> None:
    data: dict = {}
    bench_steps(data)
    bench_seq_ops(data)
    bench_state_io(data)
    bench_restore_into_larger(data)
    data["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {data['load_average']:.1f}, {os.cpu_count()} CPUs")
    path = write_results("bench_recurrent", data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
