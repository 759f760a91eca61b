"""One sequence's state in every memory type: pymem's one-call roads against its general
two-phase path, and a numpy copy of the blob, in one run.

Why: a runtime saves and restores single sequences all the time (prompt caches, rollbacks,
checkpoints). Each memory offers a sized one-sequence writer (``Memory.seq_writer``: a KV
cache's one-call blob, a recurrent memory's one native call for its cell's rows, a
composite's parts one after the other), and a KV cache restores a sequence that goes back
into exactly its own cells in one native call, inside composites too (``SameCellsPlan``).
Here each of those is timed against the same memory with the roads switched off (the
general writer: recorder + replay; the general restore: Python parse + placement).

Memories (f16 K/V, unified, 4 sequences, every call timed cold: right after a 16 MiB copy
evicted L1/L2, shuffled order, median of the rounds):

* ``kv``: tiny-llama's KV cache (2 layers, 64-byte K/V rows);
* ``iswa``: tiny-gemma2's base + sliding-window caches;
* ``hybrid-1`` / ``hybrid-15`` / ``hybrid-30``: a recurrent layer, 1 / 15 / 30 attention
  layers (8 heads of 32), a recurrent layer (R 384, S 4096 floats);
* ``recurrent``: tiny-mamba's recurrent memory.

Each sequence holds 512 tokens decoded in chunks of 64, interleaved with the others.

Run: python benchmarks/bench_seq_state.py [--quick]   (table + results/bench_seq_state.json)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from _util import cold_each, print_table, write_results

from pymem.batch import Batch, BatchAllocator
from pymem.factory import ContextParams, create_memory
from pymem.gguf_spec import spec_from_gguf
from pymem.kv import KVCache
from pymem.memory import Memory, MemoryStatus
from pymem.recurrent import RecurrentMemory
from pymem.spec import LayerSpec, ModelSpec

MODELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "models"
N_SEQ, N_TOKENS, CHUNK = 4, 512, 64


def hybrid_spec(n_attn: int) -> ModelSpec:
    ssm = LayerSpec.ssm(384, 4096)
    return ModelSpec(layers=(ssm, *([LayerSpec.attention(8, 32)] * n_attn), ssm))


def memories() -> dict[str, Any]:
    gguf = {"kv": "tiny-llama.gguf", "iswa": "tiny-gemma2.gguf", "recurrent": "tiny-mamba.gguf"}
    specs: dict[str, Any] = {k: spec_from_gguf(str(MODELS / f)) for k, f in gguf.items()}
    for n in (1, 15, 30):
        specs[f"hybrid-{n}"] = hybrid_spec(n)
    return specs


def filled(spec: ModelSpec, n_tokens: int) -> Memory[Any]:
    params = ContextParams(n_ctx=4096, n_seq_max=8, n_batch=512, n_ubatch=512, flash_attn=True,
                           type_k="f16", type_v="f16", kv_unified=True)  # fmt: skip
    mem = create_memory(spec, params)
    assert mem is not None
    balloc = BatchAllocator()
    for p0 in range(0, n_tokens, CHUNK):
        for s in range(N_SEQ):
            items = [(1 + (p0 + i) % 50, p0 + i, [s], i == CHUNK - 1) for i in range(CHUNK)]
            balloc.init(Batch.from_items(items), memory=mem, n_seq_max=8)
            upd = mem.init_update()
            if upd.get_status() == MemoryStatus.SUCCESS:
                upd.apply()
            ctx = mem.init_batch(balloc, 512, False)
            assert ctx.get_status() == MemoryStatus.SUCCESS
            while True:
                ctx.apply()
                if not ctx.next():
                    break
    return mem  # the tensors' bytes stay as the decodes left them: a copy costs the same


class Roads:
    """Switches a memory's one-call roads off and on (innermost parts and the top)."""

    def __init__(self, mem: Memory[Any]) -> None:
        self.mem = mem
        self.parts = list(mem.parts().values())

    def _set(self, kv: Any, rows: Any) -> None:
        for p in self.parts:
            if isinstance(p, KVCache):
                p._blob = kv  # the one-call blob (False: rebuilt on first use; None: off)
            elif isinstance(p, RecurrentMemory):
                p._seq_rows = rows  # the recurrent rows in one call

    def general(self) -> None:
        self._set(None, None)
        self.mem._one_seq = lambda *a: None  # type: ignore[method-assign]

    def fast(self) -> None:
        self._set(False, False)
        self.mem.__dict__.pop("_one_seq", None)


def bench(name: str, mem: Memory[Any], repeats: int) -> dict[str, Any]:
    roads = Roads(mem)
    blob = bytes(mem.state_write(1))
    out = bytearray(len(blob))
    src = np.frombuffer(blob, np.uint8).copy()
    dst = np.empty_like(src)

    calls = {
        "numpy_copy": lambda: np.copyto(dst, src),
        "write_buffer": lambda: mem.state_write_buffer(out, 1),
        "write": lambda: mem.state_write(1),
        "size": lambda: mem.state_size(1),
        "read": lambda: mem.state_read(blob, 1),
    }
    # the roads are switched between the two timings, not inside them
    roads.general()
    general = cold_each(calls, repeats, seed=1)
    roads.fast()
    fast = cold_each(calls, repeats, seed=2)
    t = {f"{k}_fast": v for k, v in fast.items() if k != "numpy_copy"}
    t.update({f"{k}_general": v for k, v in general.items() if k != "numpy_copy"})
    t["numpy_copy"] = fast["numpy_copy"]
    roads.fast()
    if bytes(mem.state_write(1)) != blob:
        raise RuntimeError(f"{name}: the state changed while benchmarking")
    row: dict[str, Any] = {"memory": name, "type": type(mem).__name__, "bytes": len(blob)}
    row.update({f"{k}_us": v * 1e6 for k, v in t.items()})
    return row


def main() -> None:
    quick = "--quick" in sys.argv
    repeats = 11 if quick else 61
    rows = []
    for name, spec in memories().items():
        mem = filled(spec, 128 if quick else N_TOKENS)
        try:
            rows.append(bench(name, mem, repeats))
        finally:
            mem.close()
    what = ("write_buffer", "write", "size", "read")
    print_table(
        f"One sequence's state, {N_SEQ} sequences x {128 if quick else N_TOKENS} tokens, each "
        "call after an L2 eviction (median us; one-call roads -> general path)",
        ["memory", "type", "bytes", "numpy copy", *what, "write / numpy", "read / numpy"],
        [
            [r["memory"], r["type"], r["bytes"], f"{r['numpy_copy_us']:.1f}",
             *(f"{r[f'{w}_fast_us']:.1f} ({r[f'{w}_general_us']:.1f})" for w in what),
             f"{r['numpy_copy_us'] / r['write_buffer_fast_us']:.2f}",
             f"{r['numpy_copy_us'] / r['read_fast_us']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    if not quick:
        print(f"wrote {write_results('bench_seq_state', {'rows': rows, 'repeats': repeats})}")


if __name__ == "__main__":
    main()
