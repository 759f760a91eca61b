"""Checkpoints held on the memory's device vs in host bytes (pymem.reuse.checkpoints).

Setup: one sequence of ``--tokens`` tokens on one memory (n_ctx 4096; bookkeeping only:
ubatches applied without a model, so the cells hold zeros; sizes and times do not depend
on the values). Models: tiny-llama (KV: a checkpoint is the whole sequence), tiny-jamba
(hybrid), tiny-lfm2-swa (hybrid-iSWA), tiny-mamba (recurrent).

Columns (best of 7, ms): ``take`` = :func:`checkpoint` with ``where="host"`` / ``"device"``
(the device one is the same ``state_write``, one parse of the host bytes that learns
where the payloads lie, and one upload into a new backend buffer); ``take dev old`` =
the device take without that parse (what it was before restores copied device to
device); ``restore`` = :func:`restore_checkpoint` of each; ``restore dev copy`` = the
device-copy path (host metadata parsed, payloads copied tensor to tensor by
``pm_tensor_copy_runs``), what a GPU takes, forced here with ``ZERO_COPY_HOST`` off;
``restore dev`` = the default on this machine: a CPU buffer is parsed in place
(``ZERO_COPY_HOST``); ``restore dev old`` = the same checkpoint restored the way it was
before (the whole blob read back to the host, parsed, the payloads written host ->
device); ``arena``: the same into a range of a :class:`CheckpointArena` (no allocation
per take); ``spill`` = ``to_host()`` of a device checkpoint (read back + free);
``close`` = freeing a device checkpoint. ``device`` is where the memory lives: on a
CPU-only machine the "device" buffer is a CPU backend buffer, so a device copy is a
memmove and the old path's cost is one extra host copy of the blob, not a GPU's two
PCIe transfers (device -> host -> device) that the device copy saves.

With ``--rpc HOST:PORT`` the same runs follow with the memory on an ``rpc-server`` (a
device whose buffers are not host memory, like a GPU's: the device-copy path is the
default there, a copy on the server, against a blob sent to the client and back).

Run: python benchmarks/bench_checkpoint_device.py [--tokens N] [--json PATH] [--rpc HOST:PORT]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import best_of, print_table, write_results

import pymem
from pymem.batch import Batch, BatchAllocator
from pymem.factory import ContextParams, create_memory
from pymem.memory import Memory, MemoryStatus, StateFlags
from pymem.reuse import checkpoint, checkpoints, restore_checkpoint
from pymem.reuse.checkpoints import (
    Checkpoint,
    CheckpointArena,
    layout_of,
    memory_device,
    restorable,
    trimmed_parts,
)
from pymem.state import StateReader

MODELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "models"
PARAMS = {
    "tiny-llama.gguf": dict(flash_attn=False),
    "tiny-jamba.gguf": dict(flash_attn=False),
    "tiny-lfm2-swa.gguf": dict(flash_attn=False, swa_full=False),
    "tiny-mamba.gguf": dict(),
}


def _memory(model: str, device: str | None = None) -> Memory:
    kw: dict[str, object] = dict(n_ctx=4096, n_seq_max=2, n_batch=256, n_ubatch=256,
                                 kv_unified=True, device=device)  # fmt: skip
    kw.update(PARAMS[model])
    mem = create_memory(pymem.spec_from_gguf(MODELS / model), ContextParams(**kw))
    assert mem is not None
    return mem


def _fill(mem: Memory, toks: np.ndarray) -> None:
    n = len(toks)
    b = Batch(toks, pos=np.arange(n, dtype=np.int32), seq_id=np.zeros(n, np.int32),
              output=np.zeros(n, bool))  # fmt: skip
    balloc = BatchAllocator()
    balloc.init(b, memory=mem, n_seq_max=2)
    ctx = mem.init_batch(balloc, 256, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    while True:
        ctx.apply()
        if not ctx.next():
            break


def _take_without_split(mem: Memory) -> Checkpoint:
    """The device take as it was: state_write, then one upload (no parse)."""
    blob = mem.state_write(0, StateFlags.PARTIAL_ONLY)
    ck = Checkpoint(0, mem.seq_pos_max(0), blob, layout_of(mem))
    return ck.to_device(memory_device(mem))


def _restore_through_host(mem: Memory, ck: Checkpoint) -> int:
    """The device restore as it was: the whole blob read back to the host, parsed there,
    its payloads written host -> device by the commit."""
    assert ck.layout == layout_of(mem) and not restorable(mem, 0, ck.pos)
    plan = mem.state_read_parse(StateReader(ck._read()), 0, StateFlags.PARTIAL_ONLY)
    for part in trimmed_parts(mem):
        if part.seq_pos_max(0) > ck.pos:
            part.seq_rm(0, ck.pos + 1, -1)
    plan.commit()
    return ck.pos + 1


def _restore_time(fn: Callable[[], object]) -> float:
    """Best of 7 rounds of 3 restores, after 5 untimed ones (an rpc-server's connection
    takes a few calls to reach its steady speed)."""
    for _ in range(5):
        fn()
    return best_of(fn, repeat=7, number=3)


def run(model: str, n_tokens: int, device: str | None = None) -> dict[str, object]:
    mem = _memory(model, device)
    _fill(mem, np.random.default_rng(0).integers(1, 60, n_tokens).astype(np.int32))
    host = checkpoint(mem, 0, where="host")
    dev = checkpoint(mem, 0, where="device")
    before = mem.state_write(0)  # the sequence (a window restored may sit in other cells)
    t_take_h = best_of(lambda: checkpoint(mem, 0, where="host").close(), repeat=7, number=3)
    t_take_d = best_of(lambda: checkpoint(mem, 0, where="device").close(), repeat=7, number=3)
    t_take_old = best_of(lambda: _take_without_split(mem).close(), repeat=7, number=3)
    checkpoints.ZERO_COPY_HOST = False  # what a device buffer gets: parse at take, copy
    t_take_copy = best_of(lambda: checkpoint(mem, 0, where="device").close(), repeat=7, number=3)
    copied = checkpoint(mem, 0, where="device")
    assert copied._split is not None
    t_rest_copy = _restore_time(lambda: restore_checkpoint(mem, 0, copied))
    same_copy = mem.state_write(0) == before
    meta_bytes = len(copied._split.meta)
    copied.close()
    checkpoints.ZERO_COPY_HOST = True
    arena = CheckpointArena(memory_device(mem), 4 * host.nbytes + 4096)
    t_take_a = best_of(lambda: checkpoint(mem, 0, arena=arena).close(), repeat=7, number=3)
    in_arena = checkpoint(mem, 0, arena=arena)
    t_rest_a = _restore_time(lambda: restore_checkpoint(mem, 0, in_arena))
    t_rest_h = _restore_time(lambda: restore_checkpoint(mem, 0, host))
    t_rest_d = _restore_time(lambda: restore_checkpoint(mem, 0, dev))
    same = mem.state_write(0) == before and dev.blob == host.blob
    t_rest_old = _restore_time(lambda: _restore_through_host(mem, dev))
    same = same and same_copy and mem.state_write(0) == before

    def spill() -> None:
        ck = checkpoint(mem, 0)
        ck.to_host()

    t_spill = best_of(spill, repeat=7, number=3) - t_take_d
    t_close = best_of(lambda: checkpoint(mem, 0).close(), repeat=7, number=3) - best_of(
        lambda: checkpoint(mem, 0), repeat=7, number=3
    )
    out = {
        "model": model,
        "device": memory_device(mem),
        "blob_bytes": host.nbytes,
        "take_host_ms": t_take_h * 1e3,
        "take_device_ms": t_take_d * 1e3,
        "take_device_old_ms": t_take_old * 1e3,
        "take_device_copy_ms": t_take_copy * 1e3,
        "take_arena_ms": t_take_a * 1e3,
        "restore_arena_ms": t_rest_a * 1e3,
        "restore_host_ms": t_rest_h * 1e3,
        "restore_device_ms": t_rest_d * 1e3,
        "restore_device_old_ms": t_rest_old * 1e3,
        "restore_device_copy_ms": t_rest_copy * 1e3,
        "host_metadata_bytes": meta_bytes,
        "spill_ms": max(t_spill, 0.0) * 1e3,
        "close_ms": max(t_close, 0.0) * 1e3,
        "restored_exact": same,
    }
    host.close()
    dev.close()
    in_arena.close()
    arena.close()
    mem.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rpc", default=None, metavar="HOST:PORT",
                    help="also with the memory on this rpc-server (a ggml built with GGML_RPC)")  # fmt: skip
    args = ap.parse_args()
    devices: list[str | None] = [None]
    if args.rpc:
        devices.append(pymem.add_rpc_device(args.rpc).name)
    rows, out = [], []
    for model, device in ((m, d) for d in devices for m in PARAMS):
        r = run(model, args.tokens, device)
        out.append(r)
        rows.append([
            model, r["device"], r["blob_bytes"], r["host_metadata_bytes"], f"{r['take_host_ms']:.3f}",
            f"{r['take_device_ms']:.3f}", f"{r['take_device_copy_ms']:.3f}",
            f"{r['take_device_old_ms']:.3f}", f"{r['take_arena_ms']:.3f}",
            f"{r['restore_host_ms']:.3f}", f"{r['restore_device_ms']:.3f}",
            f"{r['restore_device_copy_ms']:.3f}", f"{r['restore_device_old_ms']:.3f}",
            f"{r['restore_arena_ms']:.3f}",
            f"{r['restore_device_ms'] / r['restore_device_old_ms']:.2f}",
            f"{r['restore_device_copy_ms'] / r['restore_device_old_ms']:.2f}", f"{r['spill_ms']:.3f}",
            f"{r['close_ms']:.3f}", r["restored_exact"],
        ])  # fmt: skip
    print_table(
        f"checkpoint of one {args.tokens}-token sequence: host bytes vs a device buffer (ms, best of 7)",
        ["model", "device", "blob B", "meta B", "take host", "take dev", "take dev copy",
         "take dev old", "take arena", "restore host", "restore dev", "restore dev copy",
         "restore dev old", "restore arena", "dev/old", "copy/old", "spill", "close", "exact"],
        rows,
    )  # fmt: skip
    path = write_results("bench_checkpoint_device", {"tokens": args.tokens, "runs": out})
    if args.json:
        Path(args.json).write_text(path.read_text())
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
