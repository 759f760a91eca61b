"""Hybrid-iSWA memory: per-step bookkeeping, state I/O throughput, bytes allocated vs needed.

The model: 8 layers ``R S A R S A R S`` (R a Mamba-2 block, S sliding-window attention
with n_swa 256, A full attention), 4 KV heads of 64, Mamba-2 d_inner 1024, d_state 16,
1 group, d_conv 4. Memory is built by ``pymem.factory.create_memory`` with n_ctx 32768,
one unified stream, swa_full off, n_ubatch 512: a HybridISWAMemory (base cache 32768
cells, SWA cache PAD(256 * n_seq + 512) cells, recurrent cells = n_seq_max).

* Per decode step (n_seq sequences x 1 token, after a 256-token prompt per sequence):
  the memory's part of ``llama_context::decode`` (init_update, init_batch = split +
  prepare of every part, apply, next) and the same with batch validation
  (``BatchAllocator.init``). No graph is computed: this is the bookkeeping a runtime waits on.
* State I/O: per-sequence get / set (a 256-token sequence) and whole-state get / set.
* Bytes allocated (``memory_breakdown``) vs bytes the layer spec needs, per part.

Run: python benchmarks/bench_hybrid.py [--quick]   (table + results/bench_hybrid.json)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
from _util import best_of, print_table, write_results

from pymem.batch import Batch, BatchAllocator
from pymem.factory import ContextParams, create_memory, plan_memory
from pymem.hybrid import HybridMemory
from pymem.memory import MemoryStatus
from pymem.runtime.describe import describe_plan
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType, SWAType

N_CTX = 32768
PROMPT = 256
N_SWA = 256


def model_spec() -> ModelSpec:
    rope = RopeSpec(n_rot=64, rope_type=RopeType.NEOX)
    d_conv, d_inner, d_state, n_group = 4, 1024, 16, 1
    ssm = LayerSpec.ssm((d_conv - 1) * (d_inner + 2 * n_group * d_state), d_state * d_inner)
    layers = []
    for c in "RSARSARS":
        layers.append(ssm if c == "R" else LayerSpec.attention(4, 64, swa=c == "S", rope=rope))
    return ModelSpec(layers=tuple(layers), n_swa=N_SWA, swa_type=SWAType.STANDARD, arch="")


def build(n_seq: int) -> HybridMemory:
    params = ContextParams(
        n_ctx=N_CTX, n_seq_max=n_seq, n_ubatch=512, n_batch=N_CTX, kv_unified=True, swa_full=False
    )
    mem = create_memory(model_spec(), params)
    assert isinstance(mem, HybridMemory)
    rng = np.random.default_rng(0)
    for part in mem.parts().values():  # random bytes stand in for what graphs would write
        tensors = (
            [t for lay in part.layers for t in (lay.k, lay.v) if t is not None]
            if hasattr(part, "v_cells")
            else [t for il in part.layers for t in (part.get_r_l(il), part.get_s_l(il))]
        )
        for t in tensors:
            v = t.numpy().view(np.uint8)
            v[...] = rng.integers(0, 256, v.shape, dtype=np.uint8)
    return mem


def decode(
    mem: HybridMemory, balloc: BatchAllocator, batch: Batch, n_ubatch: int = 512
) -> tuple[float, float]:
    """One decode's memory flow; returns (seconds with validation, seconds memory only)."""
    t0 = time.perf_counter()
    balloc.init(batch, memory=mem, n_seq_max=mem.n_seq_max)
    t1 = time.perf_counter()
    upd = mem.init_update()
    if upd.get_status() == MemoryStatus.SUCCESS:
        upd.apply()
    ctx = mem.init_batch(balloc, n_ubatch)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    while True:
        ctx.apply()
        if not ctx.next():
            break
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def prompt_batch(seqs: range, p0: int, n: int) -> Batch:
    tok = np.arange(len(seqs) * n, dtype=np.int32) % 60
    pos = np.tile(np.arange(p0, p0 + n, dtype=np.int32), len(seqs))
    sid = np.repeat(np.array(list(seqs), dtype=np.int32), n)
    out = np.zeros(len(seqs) * n, dtype=np.bool_)
    out[n - 1 :: n] = True
    return Batch(tok, pos=pos, seq_id=sid, output=out)


def bench_steps(n_seq: int, n_steps: int) -> dict[str, float]:
    mem = build(n_seq)
    balloc = BatchAllocator()
    for s0 in range(0, n_seq, 8):  # prompts, 8 sequences per batch
        decode(mem, balloc, prompt_batch(range(s0, min(n_seq, s0 + 8)), 0, PROMPT), n_ubatch=512)
    full, only = [], []
    for step in range(n_steps):
        p = PROMPT + step
        batch = Batch(
            np.full(n_seq, 7, dtype=np.int32),
            pos=np.full(n_seq, p, dtype=np.int32),
            seq_id=np.arange(n_seq, dtype=np.int32),
            output=np.ones(n_seq, dtype=np.bool_),
        )
        a, b = decode(mem, balloc, batch)
        full.append(a)
        only.append(b)
    mem.close()
    return {
        "n_seq": n_seq,
        "step_ms_median": statistics.median(full) * 1e3,
        "step_ms_min": min(full) * 1e3,
        "memory_ms_median": statistics.median(only) * 1e3,
        "memory_ms_min": min(only) * 1e3,
        "per_token_us": statistics.median(only) / n_seq * 1e6,
    }


def bench_state(n_seq: int) -> dict[str, float]:
    mem = build(n_seq)
    balloc = BatchAllocator()
    for s0 in range(0, n_seq, 8):
        decode(mem, balloc, prompt_batch(range(s0, min(n_seq, s0 + 8)), 0, PROMPT))
    seq_blob = mem.state_write(0)
    whole = mem.state_write()

    def seq_set() -> None:
        mem.state_read(seq_blob, 0)

    def whole_set() -> None:
        mem.state_read(whole)

    t_seq_get = best_of(lambda: mem.state_write(0), repeat=9)
    t_seq_set = best_of(seq_set, repeat=9)
    t_whole_get = best_of(lambda: mem.state_write(), repeat=7)
    t_whole_set = best_of(whole_set, repeat=7)
    assert mem.state_write() == whole
    allocated = sum(sum(d.values()) for d in mem.memory_breakdown_by_part().values())
    mem.close()
    out = {
        "seq_blob_bytes": len(seq_blob),
        "whole_blob_bytes": len(whole),
        "seq_get_gbs": len(seq_blob) / t_seq_get / 1e9,
        "seq_set_gbs": len(seq_blob) / t_seq_set / 1e9,
        "whole_get_gbs": len(whole) / t_whole_get / 1e9,
        "whole_set_gbs": len(whole) / t_whole_set / 1e9,
        "seq_get_ms": t_seq_get * 1e3,
        "seq_set_ms": t_seq_set * 1e3,
        "whole_get_ms": t_whole_get * 1e3,
        "whole_set_ms": t_whole_set * 1e3,
    }
    # numpy baselines: a new copy of the blob (what a get makes), a copy into an existing
    # buffer (what a set does), and for a whole set also zeroing every other allocated
    # byte (a whole restore clears the memory first, as the reference's clear(true))
    for name, blob in (("seq", seq_blob), ("whole", whole)):
        src = np.frombuffer(blob, np.uint8)
        dst = np.empty_like(src)
        out[f"{name}_np_copy_ms"] = best_of(lambda src=src: np.copy(src), repeat=7) * 1e3
        out[f"{name}_np_copyto_ms"] = (
            best_of(lambda src=src, dst=dst: np.copyto(dst, src), repeat=7) * 1e3
        )
    rest = np.empty(max(0, allocated - len(whole)), np.uint8)
    out["whole_np_copyto_and_zero_ms"] = out["whole_np_copyto_ms"] + (
        best_of(lambda: rest.fill(0), repeat=7) * 1e3
    )
    return out


def bench_bytes(n_seq: int) -> list[dict[str, object]]:
    """Allocated bytes per part vs what the layer spec needs (rows x row bytes)."""
    spec = model_spec()
    params = ContextParams(
        n_ctx=N_CTX, n_seq_max=n_seq, n_ubatch=512, kv_unified=True, swa_full=False
    )
    plan = describe_plan(plan_memory(spec, params))
    mem = create_memory(spec, params)
    assert isinstance(mem, HybridMemory)
    alloc = {name: sum(d.values()) for name, d in mem.memory_breakdown_by_part().items()}
    out = []
    for p, (name, got) in zip(plan["parts"], alloc.items(), strict=True):
        if p["kind"] == "kv":
            cells = p["kv_size"] * p["n_stream"]
            need = sum(cells * (lay["k_row_bytes"] + lay["v_row_bytes"]) for lay in p["layers"])
            what = f"{len(p['layers'])} layers x {cells} cells"
        else:
            rows = p["mem_size"] * (1 + p["n_rs_seq"])
            need = sum(rows * (lay["r_row_bytes"] + lay["s_row_bytes"]) for lay in p["layers"])
            what = f"{len(p['layers'])} layers x {rows} states"
        out.append({"part": name, "what": what, "allocated": got, "needed": need})
    mem.close()
    return out


def main() -> None:
    quick = "--quick" in sys.argv
    n_steps = 8 if quick else 40
    steps = [bench_steps(n, n_steps) for n in (1, 8, 64)]
    print_table(
        f"Decode step bookkeeping, hybrid-iSWA RSARSARS, n_ctx {N_CTX} unified, {PROMPT}-token prompts "
        f"(median of {n_steps} steps)",
        [
            "sequences",
            "memory (init_update+init_batch+apply), median (min)",
            "with batch validation",
            "per token",
        ],
        [
            [
                s["n_seq"],
                f"{s['memory_ms_median']:.3f} ms ({s['memory_ms_min']:.3f})",
                f"{s['step_ms_median']:.3f} ms ({s['step_ms_min']:.3f})",
                f"{s['per_token_us']:.1f} us",
            ]
            for s in steps
        ],
    )
    state = bench_state(8)
    st = state
    print_table(
        "State I/O, hybrid-iSWA RSARSARS, 8 sequences x 256 tokens (numpy: np.copy of the blob "
        "for get, np.copyto for set; whole set also zeroes the rest of the allocation)",
        ["blob", "bytes", "get", "numpy get", "set", "numpy set"],
        [
            ["per sequence", st["seq_blob_bytes"], f"{st['seq_get_gbs']:.2f} GB/s ({st['seq_get_ms']:.2f} ms)",
             f"{st['seq_np_copy_ms']:.2f} ms", f"{st['seq_set_gbs']:.2f} GB/s ({st['seq_set_ms']:.2f} ms)",
             f"{st['seq_np_copyto_ms']:.2f} ms"],
            ["whole", st["whole_blob_bytes"], f"{st['whole_get_gbs']:.2f} GB/s ({st['whole_get_ms']:.2f} ms)",
             f"{st['whole_np_copy_ms']:.2f} ms", f"{st['whole_set_gbs']:.2f} GB/s ({st['whole_set_ms']:.2f} ms)",
             f"{st['whole_np_copyto_ms']:.2f} ms (+ zeroing: {st['whole_np_copyto_and_zero_ms']:.2f} ms)"],
        ],
    )  # fmt: skip
    sizes = bench_bytes(64)
    print_table(
        "Bytes allocated vs needed (64 sequences, one stream)",
        ["part", "layout", "allocated", "needed", "equal"],
        [
            [r["part"], r["what"], r["allocated"], r["needed"], r["allocated"] == r["needed"]]
            for r in sizes
        ],
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.1f}, {os.cpu_count()} CPUs")
    path = write_results(
        "bench_hybrid",
        {"steps": steps, "state": state, "bytes": sizes, "quick": quick, "load_average": load},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
