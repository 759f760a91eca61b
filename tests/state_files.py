"""Filled memories of every type for the state-file tests (test_inspect, test_container).

No model forward: a bookkeeping decode (BatchAllocator + init_batch + apply) places the
cells, then every K/V/R/S tensor gets seeded random bytes, so a state blob holds exact,
known cells and non-trivial tensor bytes (zeros would let wrong readings of a blob parse).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pymem
from pymem.batch import Batch, BatchAllocator
from pymem.factory import ContextParams, create_memory
from pymem.kv import KVCache
from pymem.memory import Memory, MemoryStatus
from pymem.recurrent import RecurrentMemory

MODELS = Path(__file__).parent / "data" / "models"
N_SEQ = 4

# model -> (arch, memory type, context options)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "tiny-llama.gguf": ("llama", "kv_cache", dict(n_ctx=256, flash_attn=False, kv_unified=True)),
    "tiny-gemma2.gguf": ("gemma2", "kv_cache_iswa", dict(n_ctx=512, flash_attn=True, kv_unified=True)),
    "tiny-jamba.gguf": ("jamba", "hybrid", dict(n_ctx=256, flash_attn=False, kv_unified=False)),
    "tiny-lfm2-swa.gguf": ("lfm2", "hybrid_iswa", dict(n_ctx=512, flash_attn=True, kv_unified=True)),
    "tiny-mamba.gguf": ("mamba", "recurrent", dict()),
}  # fmt: skip

# seq 0: the 12-token prompt (pos 0..11); seq 1: 5 tokens (pos 0..4)
PROMPT = [(7 * i + 3) % 60 + 1 for i in range(12)]
ITEMS = [(t, p, [0], False) for p, t in enumerate(PROMPT)] + [
    (t, p, [1], False) for p, t in enumerate(PROMPT[:5])
]


def params(model: str) -> ContextParams:
    return ContextParams(n_seq_max=N_SEQ, n_batch=64, n_ubatch=64, **CASES[model][2])


def make_memory(model: str) -> Memory:
    mem = create_memory(pymem.spec_from_gguf(MODELS / model), params(model))
    assert mem is not None
    return mem


def decode(mem: Memory, items: list) -> None:
    """Place ``items`` ((token, pos, [seq ids], output)) without a forward."""
    balloc = BatchAllocator()
    balloc.init(Batch.from_items(items), memory=mem, n_seq_max=N_SEQ)
    upd = mem.init_update()
    if upd.get_status() == MemoryStatus.SUCCESS:
        upd.apply()
    ctx = mem.init_batch(balloc, 64, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    while True:
        ctx.apply()
        if not ctx.next():
            break


def randomize(mem: Memory, seed: int = 0) -> None:
    """Seeded random bytes in every K/V/R/S tensor of ``mem``."""
    rng = np.random.default_rng(seed)
    for part in mem.parts().values():
        tensors = []
        if isinstance(part, KVCache):
            for lay in part.layers:
                tensors += [lay.k] if lay.v is None else [lay.k, lay.v]
        elif isinstance(part, RecurrentMemory):
            for il in part.layers:
                tensors += [part.get_r_l(il), part.get_s_l(il)]
        for t in tensors:
            if t.nbytes:
                t.write_bytes(rng.integers(0, 256, t.nbytes, dtype=np.uint8).tobytes())


def filled(model: str, seed: int = 0) -> Memory:
    """A memory holding seq 0 (pos 0..11) and seq 1 (pos 0..4), random tensor bytes."""
    mem = make_memory(model)
    decode(mem, ITEMS)
    randomize(mem, seed)
    return mem


def check_seq_writer(mem: Memory[Any], seq_id: int, flags: int = 0) -> bool:
    """The sized one-sequence writer (``Memory.seq_writer``: a new blob, a reused buffer,
    the size) gives the general writer's bytes (recorder + replay of ``state_write_into``),
    or raises the same error. Returns whether the sized writer took the call (when it
    declines, the public calls fall back to the general writer and agree trivially:
    callers count the calls it took)."""
    from pymem.state import write_state

    try:
        want = write_state(lambda w: mem.state_write_into(w, seq_id, flags))
    except Exception as exc:  # whatever it is, the sized path must raise it too
        with pytest.raises(type(exc)):
            mem.state_write(seq_id, flags)
        return False
    took = mem.seq_writer(seq_id, flags) is not None
    assert mem.state_write(seq_id, flags) == want
    assert mem.state_size(seq_id, flags) == len(want)
    out = bytearray(b"\xee" * (len(want) + 3))
    assert mem.state_write_buffer(out, seq_id, flags) == len(want)
    assert bytes(out[: len(want)]) == want and out[len(want) :] == b"\xee" * 3
    return took
