"""A device checkpoint's restore copies its payload bytes tensor to tensor (issue 15:
"restore is a device copy"), parsed from the host metadata it keeps.

* ``Tensor.copy_runs_from`` / ``pm_tensor_copy_runs``: every run set equals a numpy
  reference; every bad argument is refused with a typed error before a byte moves.
* Restoring a device checkpoint gives byte-identical memory (every tensor, cells,
  positions) to restoring the same state from host bytes, on every memory type of
  tests/test_reuse.py, both V layouts, one stream and several, cells in one run and in
  several; and no host read of the checkpoint's buffer happens during that restore.
* A restore that must fail changes nothing; a parse that takes other payload ranges than
  the recorded ones falls back to the whole blob (and relearns them).

The CPU backend's buffers are host memory (the copies are memmoves; a fixture turns off
the in-place parse of such buffers so the device-copy path runs at all); buffers that are
not host memory take the backend-copy branch of pm_tensor_copy_runs, checked on ggml's
RPC backend (tests/rpc_devcopy_worker.py, a local rpc-server). Never run on CUDA here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pymem
from pymem._native import ffi, lib
from pymem.backend import Tensor, TensorSpec, TensorStore
from pymem.batch import Batch, BatchAllocator
from pymem.errors import ClosedError, RangeError, StateError
from pymem.factory import ContextParams, create_memory
from pymem.kv import KVCache
from pymem.memory import Memory, MemoryStatus
from pymem.reuse import CheckpointPolicy, PrefixCache, as_tokens, checkpoint, restore_checkpoint
from pymem.reuse import checkpoints as checkpoints_module
from pymem.reuse.checkpoints import Checkpoint, CheckpointArena, memory_device
from pymem.state import BlobSplit, DeviceBlobReader, DevicePayload, SplitMismatch

MODELS = Path(__file__).parent / "data" / "models"
TOKENS = np.array([(5 * i + 2) % 60 + 1 for i in range(256)], dtype=np.int32)
# the memory types of tests/test_reuse.py, plus the other V layout of the plain KV cache
CASES: dict[str, dict[str, Any]] = {
    "llama-vtrans": dict(model="tiny-llama.gguf", flash_attn=False),
    "llama-vrows": dict(model="tiny-llama.gguf", flash_attn=True),
    "gemma2-iswa": dict(model="tiny-gemma2.gguf", flash_attn=True, swa_full=False),
    "mamba": dict(model="tiny-mamba.gguf"),
    "jamba-hybrid": dict(model="tiny-jamba.gguf", flash_attn=False),
    "lfm2-hybrid": dict(model="tiny-lfm2.gguf", flash_attn=True),
    "lfm2-swa-hybrid-iswa": dict(model="tiny-lfm2-swa.gguf", flash_attn=False, swa_full=False),
}


def _memory(case: str, **over: Any) -> Memory:
    kw = dict(n_ctx=256, n_seq_max=3, n_batch=64, n_ubatch=64, kv_unified=True)
    kw.update(CASES[case])
    kw.update(over)
    model = kw.pop("model")
    mem = create_memory(pymem.spec_from_gguf(MODELS / model), ContextParams(**kw))
    assert mem is not None
    return mem


def _fill(mem: Memory, seq: int, p0: int, p1: int) -> None:
    """Apply the ubatches of ``TOKENS[p0:p1]`` for ``seq`` (bookkeeping, no graph)."""
    n = p1 - p0
    b = Batch(TOKENS[p0:p1], pos=np.arange(p0, p1, dtype=np.int32),
              seq_id=np.full(n, seq, np.int32), output=np.zeros(n, bool))  # fmt: skip
    balloc = BatchAllocator()
    balloc.init(b, memory=mem, n_seq_max=4)
    ctx = mem.init_batch(balloc, 64, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    while True:
        ctx.apply()
        if not ctx.next():
            break


def _tensors(mem: Memory) -> list[Tensor]:
    out: list[Tensor] = []
    for part in mem.parts().values():
        stores = part.stores.values() if isinstance(part, KVCache) else part._stores
        for store in stores:
            out.extend(store)
    return out


def _scramble(mem: Memory, seed: int) -> None:
    """Random bytes in every tensor (ubatches applied without a model leave zeros, and a
    restore of zeros over zeros would prove nothing)."""
    rng = np.random.default_rng(seed)
    for t in _tensors(mem):
        t.write_bytes(rng.integers(0, 256, t.nbytes, dtype=np.uint8))


def _snapshot(mem: Memory) -> tuple[bytes, list[bytes]]:
    return mem.state_write(), [t.read_bytes() for t in _tensors(mem)]


def _setup(mem: Memory, fragmented: bool) -> None:
    """Sequence 0 at positions [0, 24): in one run of cells, or (``fragmented``) in runs
    interleaved with sequence 1's, so a restore writes several runs per section."""
    if fragmented:
        for p in range(0, 24, 4):
            _fill(mem, 0, p, p + 4)
            _fill(mem, 1, p, p + 4)
    else:
        _fill(mem, 0, 0, 24)
    _scramble(mem, 1)


def _move_on(mem: Memory) -> None:
    """The state moves past the checkpoint (and its bytes change)."""
    _fill(mem, 0, 24, 40)
    _scramble(mem, 2)


class _HostReads:
    """Counts the host reads of any tensor while in the ``with`` block (the payload must
    not take one)."""

    NAMES = ("read_into", "read_runs_into", "read_strided_into", "read_ranges_into",
             "read_bytes", "read_rows")  # fmt: skip

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._mp = pytest.MonkeyPatch()

    def __enter__(self) -> _HostReads:
        for name in self.NAMES:
            orig = getattr(Tensor, name)

            def counted(*a: Any, _orig: Any = orig, _name: str = name, **k: Any) -> Any:
                self.calls.append(_name)
                return _orig(*a, **k)

            self._mp.setattr(Tensor, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        self._mp.undo()


@pytest.fixture(autouse=True)
def device_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drive the device-copy path on the CPU backend: a CPU buffer would otherwise be
    parsed in place (checkpoints.ZERO_COPY_HOST), never copied through the C call."""
    monkeypatch.setattr(checkpoints_module, "ZERO_COPY_HOST", False)


# --- the native copy ---------------------------------------------------------------------


def _runs_reference(
    dst: np.ndarray, src: np.ndarray, src_off: int, off: int, n_rep: int, stride: int,
    starts: np.ndarray, sizes: np.ndarray,
) -> None:  # fmt: skip
    at = src_off
    for r in range(n_rep):
        for a, n in zip(starts.tolist(), sizes.tolist()):
            d = off + r * stride + a
            dst[d : d + n] = src[at : at + n]
            at += n


@pytest.mark.parametrize("seed", range(6))
def test_copy_runs_matches_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    with TensorStore(None, [TensorSpec("src", "i8", (4096,)),
                            TensorSpec("dst", "f16", (64, 32))]) as store:  # fmt: skip
        src, dst = store["src"], store["dst"]
        src_bytes = rng.integers(0, 256, src.nbytes, dtype=np.uint8)
        dst_bytes = rng.integers(0, 256, dst.nbytes, dtype=np.uint8)
        src.write_bytes(src_bytes)
        dst.write_bytes(dst_bytes)
        n_runs = int(rng.integers(1, 6))
        # ascending, apart runs inside one 128-byte repetition
        cuts = np.sort(rng.choice(np.arange(0, 128, 2), 2 * n_runs, replace=False))
        starts, sizes = cuts[0::2].astype(np.uint64), (cuts[1::2] - cuts[0::2]).astype(np.uint64)
        n_rep, stride, off = int(rng.integers(1, 16)), 128 + 2 * int(rng.integers(0, 4)), 6
        src_off = int(rng.integers(0, 64))
        dst.copy_runs_from(src, src_off, off, n_rep, stride, starts, sizes)
        want = dst_bytes.copy()
        _runs_reference(want, src_bytes, src_off, off, n_rep, stride, starts, sizes)
        assert dst.read_bytes() == want.tobytes()
        assert src.read_bytes() == src_bytes.tobytes()  # the source is left alone


def test_copy_runs_refuses_bad_arguments_before_any_byte_moves() -> None:
    with TensorStore(None, [TensorSpec("a", "i8", (256,)), TensorSpec("b", "i8", (256,))]) as s:
        a, b = s["a"], s["b"]
        a.write_bytes(np.arange(256, dtype=np.uint8))
        before = b.read_bytes()
        one, eight = np.array([0], np.uint64), np.array([8], np.uint64)
        for call in (
            lambda: b.copy_runs_from(a, -1, 0, 1, 0, one, eight),  # src_offset < 0
            lambda: b.copy_runs_from(a, 250, 0, 1, 0, one, eight),  # source past its end
            lambda: b.copy_runs_from(a, 0, 252, 1, 0, one, eight),  # run past dst's end
            lambda: b.copy_runs_from(a, 0, 0, 3, 128, one, eight),  # last repetition past it
            lambda: b.copy_runs_from(a, 0, -4, 1, 0, one, eight),  # negative offset
            lambda: b.copy_runs_from(a, 0, 0, -1, 0, one, eight),  # negative n_rep
            lambda: b.copy_runs_from(a, 0, 0, 1, 0, one, np.array([8, 8], np.uint64)),
            lambda: a.copy_runs_from(a, 0, 4, 1, 0, one, eight),  # overlaps its source
        ):
            with pytest.raises(RangeError):
                call()
        assert b.read_bytes() == before
        a.copy_runs_from(a, 0, 8, 1, 0, one, eight)  # beside its source: fine
        assert a.read_bytes()[8:16] == bytes(range(8))
        # the C layer on its own: a typed status for every argument error
        st, sz = ffi.new("uint64_t[]", [0]), ffi.new("uint64_t[]", [8])
        copy = lib.pm_tensor_copy_runs
        assert copy(ffi.NULL, 0, b.ptr, 0, 1, 0, st, sz, 1) == lib.PM_ERR_ARG
        assert copy(a.ptr, 0, ffi.NULL, 0, 1, 0, st, sz, 1) == lib.PM_ERR_ARG
        assert copy(a.ptr, 0, b.ptr, 0, -1, 0, st, sz, 1) == lib.PM_ERR_ARG
        assert copy(a.ptr, 0, b.ptr, 0, 1, 0, st, sz, -1) == lib.PM_ERR_ARG
        assert copy(a.ptr, 0, b.ptr, 0, 1, 0, ffi.NULL, sz, 1) == lib.PM_ERR_ARG
        assert copy(a.ptr, 0, a.ptr, 4, 1, 0, st, sz, 1) == lib.PM_ERR_ARG  # overlap
        assert copy(a.ptr, 249, b.ptr, 0, 1, 0, st, sz, 1) == lib.PM_ERR_RANGE
        assert copy(a.ptr, 0, b.ptr, 257, 1, 0, st, sz, 1) == lib.PM_ERR_RANGE
        assert copy(a.ptr, 0, b.ptr, 249, 1, 0, st, sz, 1) == lib.PM_ERR_RANGE
        assert copy(a.ptr, 0, b.ptr, 0, 3, 128, st, sz, 1) == lib.PM_ERR_RANGE
        assert copy(a.ptr, 0, b.ptr, 0, 0, 0, st, sz, 1) == lib.PM_OK  # nothing to copy
        assert b.read_bytes() == before


# --- restores ------------------------------------------------------------------------------


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-run", "fragmented"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("case", list(CASES))
def test_device_copy_restore_equals_host_restore(
    case: str, unified: bool, fragmented: bool
) -> None:
    with _memory(case, kv_unified=unified) as a, _memory(case, kv_unified=unified) as b:
        for mem in (a, b):
            _setup(mem, fragmented)
        dev = checkpoint(a, 0)
        host = checkpoint(b, 0, where="host")
        assert dev.where == "device" and dev.blob == host.blob
        split = dev._split
        assert split is not None and split.payload_bytes > 0
        assert len(split.meta) + split.payload_bytes == dev.nbytes
        assert dev.host_nbytes == len(split.meta) < dev.nbytes and host.host_nbytes == 0
        for mem in (a, b):
            _move_on(mem)
        assert _snapshot(a) == _snapshot(b)
        with _HostReads() as reads:
            assert restore_checkpoint(a, 0, dev) == 24
        assert reads.calls == []  # no payload byte came back to the host
        assert restore_checkpoint(b, 0, host) == 24
        assert _snapshot(a) == _snapshot(b)
        # again: a checkpoint is not consumed
        for mem, ck in ((a, dev), (b, host)):
            _move_on(mem)
            restore_checkpoint(mem, 0, ck)
        assert _snapshot(a) == _snapshot(b)
        dev.close()
        host.close()


@pytest.mark.parametrize("case", ["llama-vtrans", "jamba-hybrid", "lfm2-swa-hybrid-iswa"])
def test_a_host_memory_buffer_is_parsed_in_place(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints_module, "ZERO_COPY_HOST", True)
    with _memory(case) as a, _memory(case) as b:
        for mem in (a, b):
            _setup(mem, True)
        dev = checkpoint(a, 0)
        host = checkpoint(b, 0, where="host")
        assert dev.device == "CPU" and dev._split is None  # nothing to learn at take
        for mem in (a, b):
            _move_on(mem)
        with _HostReads() as reads:
            restore_checkpoint(a, 0, dev)
        assert reads.calls == []
        restore_checkpoint(b, 0, host)
        assert _snapshot(a) == _snapshot(b)
        dev.close()
        before = _snapshot(a)
        with pytest.raises(ClosedError):
            restore_checkpoint(a, 0, dev)
        assert _snapshot(a) == before


@pytest.mark.parametrize("case", ["jamba-hybrid", "lfm2-swa-hybrid-iswa", "llama-vtrans"])
def test_a_checkpoint_in_an_arena_restores_by_device_copy(case: str) -> None:
    with _memory(case) as a, _memory(case) as b:
        for mem in (a, b):
            _setup(mem, False)
        want = checkpoint(b, 0, where="host")
        arena = CheckpointArena(memory_device(a), 4 * want.nbytes + 256)
        first = checkpoint(a, 0, arena=arena)  # a range at 0, then one further on
        ck = checkpoint(a, 0, arena=arena)
        assert ck._slot is not None and ck._slot[1] > 0
        first.close()
        for mem in (a, b):
            _move_on(mem)
        with _HostReads() as reads:
            restore_checkpoint(a, 0, ck)
        assert reads.calls == []
        restore_checkpoint(b, 0, want)
        assert _snapshot(a) == _snapshot(b)
        arena.close()
        before = _snapshot(a)
        with pytest.raises(ClosedError):
            restore_checkpoint(a, 0, ck)
        assert _snapshot(a) == before
        ck.close()


def test_a_moved_checkpoint_learns_its_payloads_at_the_first_restore() -> None:
    case = "lfm2-swa-hybrid-iswa"
    with _memory(case) as mem, _memory(case) as twin:
        for m in (mem, twin):
            _setup(m, False)
        ck = checkpoint(mem, 0, where="host")
        want = checkpoint(twin, 0, where="host")
        assert ck._split is None  # a host checkpoint needs no split
        ck.to_device(memory_device(mem))
        for m, c in ((mem, ck), (twin, want)):
            _move_on(m)
            restore_checkpoint(m, 0, c)  # the device one: the whole blob read back once ...
        assert ck._split is not None and _snapshot(mem) == _snapshot(twin)
        for m in (mem, twin):
            _move_on(m)
        with _HostReads() as reads:
            restore_checkpoint(mem, 0, ck)  # ... then device copies
        assert reads.calls == []
        restore_checkpoint(twin, 0, want)
        assert _snapshot(mem) == _snapshot(twin)
        ck.close()


def test_a_split_the_parse_does_not_follow_falls_back_to_the_whole_blob() -> None:
    with _memory("jamba-hybrid") as mem, _memory("jamba-hybrid") as twin:
        for m in (mem, twin):
            _setup(m, False)
        ck = checkpoint(mem, 0)
        want = checkpoint(twin, 0, where="host")
        good = ck._split
        assert good is not None
        # ranges shifted by 4 bytes: the parse meets a payload where it expects a header
        ck._split = dataclasses.replace(good, starts=tuple(s - 4 for s in good.starts))
        for m, c in ((mem, ck), (twin, want)):
            _move_on(m)
            restore_checkpoint(m, 0, c)
        assert _snapshot(mem) == _snapshot(twin)
        assert ck._split == good  # relearned from the whole blob
        ck.close()


def test_failed_device_restores_change_nothing() -> None:
    # layout mismatch
    with _memory("jamba-hybrid") as mem, _memory("jamba-hybrid", n_ctx=512) as other:
        _setup(mem, False)
        ck = checkpoint(mem, 0)
        _setup(other, False)
        before = _snapshot(other)
        with pytest.raises(StateError, match="laid out"):
            restore_checkpoint(other, 0, ck)
        assert _snapshot(other) == before
        ck.close()
        before = _snapshot(mem)
        with pytest.raises(ClosedError, match="already closed"):
            restore_checkpoint(mem, 0, ck)
        assert _snapshot(mem) == before
    # cells do not fit: sequence 2 has no cell to go to (0 and 1 hold all 256)
    with _memory("llama-vtrans") as mem:
        _fill(mem, 0, 0, 24)
        _scramble(mem, 1)
        ck = checkpoint(mem, 0)
        for p in range(0, 232, 58):
            _fill(mem, 1, p, p + 58)
        before = _snapshot(mem)
        with pytest.raises(StateError, match="available cells"):
            restore_checkpoint(mem, 2, ck)
        assert _snapshot(mem) == before
        ck.close()
    # the window is gone: the attention cells the checkpoint leaves out were trimmed
    with _memory("lfm2-swa-hybrid-iswa") as mem:
        _setup(mem, False)
        ck = checkpoint(mem, 0)
        _move_on(mem)
        mem.get_mem_attn().seq_rm(0, 5, -1)
        before = _snapshot(mem)
        with pytest.raises(StateError):
            restore_checkpoint(mem, 0, ck)
        assert _snapshot(mem) == before
        ck.close()
    # a blob that does not parse (a wrong R type), device metadata and all
    with _memory("mamba") as mem:
        _setup(mem, False)
        ck = checkpoint(mem, 0)
        split = ck._split
        assert split is not None
        blob = bytearray(ck.blob)
        at = split.starts[0] - 12  # the first section's header: i32 type, u64 row size
        blob[at : at + 4] = (99).to_bytes(4, "little")
        bad = Checkpoint(0, ck.pos, bytes(blob), ck.layout).to_device(memory_device(mem))
        bad._split = BlobSplit.of(memoryview(bytes(blob)), list(zip(split.starts, split.sizes)))
        _move_on(mem)
        before = _snapshot(mem)
        with pytest.raises(StateError, match="mismatched r type"):
            restore_checkpoint(mem, 0, bad)
        assert _snapshot(mem) == before
        bad.close()
        ck.close()


def test_a_device_blob_reader_reads_metadata_from_the_host_and_payloads_as_ranges() -> None:
    blob = bytes(range(100))
    split = BlobSplit.of(memoryview(blob), [(20, 30), (60, 40)])
    assert split is not None
    assert split.meta == blob[:20] + blob[50:60] and split.before == (0, 30)
    assert BlobSplit.of(memoryview(blob), [(20, 30), (40, 10)]) is None  # overlapping
    with TensorStore(None, [TensorSpec("blob", "i8", (164,))]) as store:
        reader = DeviceBlobReader(split, store["blob"], 64)
        assert bytes(reader.read_array(np.uint8, 20, "head")) == blob[:20]
        got = reader.read_payload(30, "first")
        assert got == DevicePayload(store["blob"], 84, 30)
        assert reader.read_bytes(10, "between") == blob[50:60]
        with pytest.raises(SplitMismatch):
            reader.read_u32("a header where a payload lies")
        assert reader.offset == 60  # nothing consumed
        with pytest.raises(SplitMismatch):
            reader.read_payload(20, "part of a payload")
        reader.offset = 45
        with pytest.raises(SplitMismatch):
            reader.read_bytes(10, "across a payload's end")
        reader.offset = 100
        with pytest.raises(StateError, match="truncated"):
            reader.read_u32("past the end")
        assert issubclass(SplitMismatch, StateError)


def test_a_cache_moving_host_checkpoints_to_the_device_learns_their_payloads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cache.pymem"
    toks = as_tokens(TOKENS[:24].tolist())
    with _memory("jamba-hybrid") as mem, _memory("jamba-hybrid") as fresh:
        pol = CheckpointPolicy(interval=8, n_batch=16)
        with PrefixCache(mem, policy=pol, where="host") as cache:
            att = cache.attach(0, toks, "prompt")
            for p0, p1 in att.chunks:
                _fill(mem, 0, p0, p1)
                _scramble(mem, p1)
                cache.record(0, toks[:p1])
            cache.save(path, fingerprint="jamba:test")
        with PrefixCache.load(path, fresh, fingerprint="jamba:test", where="device") as loaded:
            entries = list(loaded._ram)
            assert entries and all(
                e.ckpt is not None and e.ckpt.where == "device" and e.ckpt._split is not None
                for e in entries
            )
            e = min(entries, key=lambda e: e.pos)
            assert e.ckpt is not None
            want = e.ckpt.blob
            with _HostReads() as reads:
                assert loaded.restore_entry(0, e.pos) == e.pos + 1
            assert reads.calls == []
            assert fresh.state_write(0, 1) == want  # PARTIAL_ONLY: the checkpoint's bytes


# --- buffers that are not host memory: ggml's RPC backend -----------------------------------

RPC_BUILD = Path(__file__).resolve().parent.parent / "build-rpc"
RPC_SERVER = RPC_BUILD / "bin" / "rpc-server"


def test_the_device_copy_path_on_an_rpc_device() -> None:
    # the backend-copy branch of pm_tensor_copy_runs (I8 tensors placed in two non-host
    # buffers, ggml_backend_tensor_copy: a copy on the server), the payload writers'
    # transposed-V methods on a device, and checkpoint restores of memories held on an
    # rpc-server, in a fresh interpreter bound to the GGML_RPC build (as tests/test_rpc.py)
    if not (RPC_SERVER.exists() and (RPC_BUILD / "lib" / "libggml-rpc.so").exists()):
        if os.environ.get("CI"):
            pytest.fail(f"{RPC_BUILD}: no RPC ggml build; CI runs .ci/ggml_rpc build-rpc first")
        pytest.skip(f"no ggml built with GGML_RPC at {RPC_BUILD}")
    env = dict(os.environ, PYMEM_GGML_LIB_DIR=str(RPC_BUILD / "lib"))
    worker = Path(__file__).parent / "rpc_devcopy_worker.py"
    proc = subprocess.run([sys.executable, str(worker), str(RPC_SERVER)], env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["device"] == "RPC0"
    assert out["copy_runs"] == {
        "rpc->rpc": True, "rpc->cpu": True, "cpu->rpc": True, "rpc same buffer": True,
    }  # fmt: skip
    assert out["payload_writer"] == {"one run": True, "runs of 4": True, "single cells": True}
    assert len(out["restores"]) == 15
    for name, r in out["restores"].items():
        # the one documented exception: transposed V into single cells on a device is
        # "staged" (tiny-llama's 2 layers: each reads its payload and its span once)
        reads = 4 if name == "llama-vtrans-runs1" else 0
        assert r == dict(device="RPC0", split=True, identical=True, host_reads=reads), name


# --- random programs against the executable spec --------------------------------------------


@pytest.mark.parametrize("kind", ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"])
def test_random_programs_restore_device_copies_as_the_spec(kind: str) -> None:
    # tests/spec's harness (as tests/test_property.py's seeded programs): every checkpoint
    # restore, rollback and prefix-cache restore goes through the device-copy path (the
    # fixture above) and must match the spec's cells, state bytes and errors step by step
    import random

    from spec.gen import PyRnd, random_config, random_step
    from spec.harness import Pair

    restores = 0
    for seed in range(12):
        rnd = PyRnd(random.Random(f"devcopy-{kind}-{seed}"))
        pair = Pair(random_config(kind, rnd), check_seq_states=6)
        try:
            for _ in range(40):
                random_step(pair, rnd)
        finally:
            pair.close()
        restores += pair.stats.outcomes.get("restore_checkpoint:ok", 0)
    assert restores > 0
