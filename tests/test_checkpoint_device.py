"""Checkpoints held on the memory's device (pymem.reuse.checkpoints, ``where="device"``).

* A device and a host checkpoint of the same state hold the same bytes and restore to
  byte-identical memories, on every memory type the rollback tests cover.
* ``close`` frees the buffer now (the prefix cache's breakdown drops), twice is fine, any
  use after it raises ClosedError; ``to_host`` (spill) keeps the bytes.
* A prefix cache holding its RAM tier on the device serves a workload to the same memory
  bytes as one holding host bytes, counts them under the same budget, and reports them
  apart in ``memory_breakdown``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pymem
import pymem.reuse.checkpoints as ckpt_mod
from pymem.batch import Batch, BatchAllocator
from pymem.errors import ClosedError, ConfigError, StateError
from pymem.factory import ContextParams, create_memory
from pymem.memory import Memory, MemoryStatus
from pymem.reuse import CheckpointPolicy, PrefixCache, as_tokens, checkpoint, restore_checkpoint
from pymem.reuse.checkpoints import Checkpoint, CheckpointArena, memory_device
from pymem.runtime.decoder import Decoder
from pymem.runtime.gguf_llama import GGUFModel

MODELS = Path(__file__).parent / "data" / "models"
PROMPT = [(5 * i + 2) % 60 + 1 for i in range(24)]
# the memory types of tests/test_reuse.py (model -> context parameters)
CASES: dict[str, dict[str, Any]] = {
    "tiny-llama.gguf": dict(flash_attn=False),
    "tiny-gemma2.gguf": dict(flash_attn=True, swa_full=False),
    "tiny-mamba.gguf": dict(),
    "tiny-jamba.gguf": dict(flash_attn=False),
    "tiny-lfm2.gguf": dict(flash_attn=True),
    "tiny-lfm2-swa.gguf": dict(flash_attn=False, swa_full=False),
}


def _memory(model: str, **over: Any) -> Memory:
    kw = dict(n_ctx=256, n_seq_max=2, n_batch=64, n_ubatch=64, kv_unified=True)
    kw.update(CASES[model])
    kw.update(over)
    mem = create_memory(pymem.spec_from_gguf(MODELS / model), ContextParams(**kw))
    assert mem is not None
    return mem


def _decode(engine: GGUFModel, mem: Memory, toks: list[int], p0: int, fa: bool) -> np.ndarray:
    items = [(t, p0 + i, [0], i == len(toks) - 1) for i, t in enumerate(toks)]
    return Decoder(engine, mem, n_seq_max=2, n_ubatch=64, flash_attn=fa).decode(
        Batch.from_items(items)
    )[-1]


def _fill(mem: Memory, seq: int, toks: np.ndarray, p0: int, p1: int) -> None:
    """Apply the ubatches of ``toks[p0:p1]`` without computing a graph (bookkeeping only)."""
    balloc = BatchAllocator()
    b = Batch(np.asarray(toks[p0:p1], np.int32), pos=np.arange(p0, p1, dtype=np.int32),
              seq_id=np.full(p1 - p0, seq, np.int32), output=np.zeros(p1 - p0, bool))  # fmt: skip
    balloc.init(b, memory=mem, n_seq_max=4)
    ctx = mem.init_batch(balloc, 64, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    while True:
        ctx.apply()
        if not ctx.next():
            break


def _serve(cache: PrefixCache, seq: int, toks: list[int], kind: str = "prompt") -> None:
    arr = as_tokens(toks)
    att = cache.attach(seq, arr, kind)  # type: ignore[arg-type]
    for p0, p1 in att.chunks:
        _fill(cache.mem, seq, arr, p0, p1)
        cache.record(seq, arr[:p1])


@pytest.fixture(scope="module")
def engines():
    cache: dict[str, GGUFModel] = {}
    yield lambda model: cache.setdefault(model, GGUFModel(MODELS / model))
    for e in cache.values():
        e.close()


@pytest.mark.parametrize("model", list(CASES))
def test_device_and_host_checkpoints_restore_the_same_bytes(model: str, engines) -> None:
    engine = engines(model)
    fa = bool(CASES[model].get("flash_attn", False))
    with _memory(model) as a, _memory(model) as b:
        for mem in (a, b):
            _decode(engine, mem, PROMPT[:16], 0, fa)
        dev = checkpoint(a, 0)  # the default: on the memory's device
        host = checkpoint(b, 0, where="host")
        assert (dev.where, dev.device) == ("device", memory_device(a))
        assert (host.where, host.device) == ("host", "host")
        assert dev.nbytes == host.nbytes > 0 and dev.blob == host.blob
        at_16 = a.state_write(0)  # the sequence's state (cells may land elsewhere)
        for mem in (a, b):
            _decode(engine, mem, PROMPT[16:], 16, fa)  # moves the state (and any window) on
        assert restore_checkpoint(a, 0, dev) == restore_checkpoint(b, 0, host) == 16
        assert a.state_write() == b.state_write()
        assert a.state_write(0) == at_16
        # restored twice: the checkpoint is not consumed
        _decode(engine, a, PROMPT[16:20], 16, fa)
        restore_checkpoint(a, 0, dev)
        assert a.state_write(0) == at_16
        dev.close()
        host.close()


def test_close_frees_and_use_after_close_raises() -> None:
    with _memory("tiny-jamba.gguf") as mem:
        _fill(mem, 0, as_tokens(PROMPT), 0, 10)
        ck = checkpoint(mem, 0)
        store = ck._store
        assert store is not None and not store.closed
        blob = ck.blob
        ck.close()
        assert store.closed and ck.closed and ck.nbytes == 0
        ck.close()  # twice is fine
        for use in (lambda: ck.blob, ck.to_host, lambda: ck.to_device(None),
                    lambda: restore_checkpoint(mem, 0, ck)):  # fmt: skip
            with pytest.raises(ClosedError, match="already closed"):
                use()
        with checkpoint(mem, 0) as again:
            assert again.blob == blob
        assert again.closed
        with pytest.raises(ConfigError, match="where"):
            checkpoint(mem, 0, where="gpu")  # type: ignore[arg-type]


def test_spill_to_host_keeps_the_bytes() -> None:
    with _memory("tiny-lfm2-swa.gguf") as mem:
        _fill(mem, 0, as_tokens(PROMPT), 0, 20)
        ck = checkpoint(mem, 0)
        want = ck.blob
        store = ck._store
        assert ck.to_host() is ck
        assert ck.where == "host" and store is not None and store.closed
        assert ck.blob == want and ck.nbytes == len(want)
        ck.to_device(memory_device(mem))  # and back
        assert ck.where == "device" and ck.blob == want
        # a restore from the spilled bytes refuses what it must, the memory unchanged
        _fill(mem, 0, as_tokens(PROMPT), 20, 24)
        mem.get_mem_attn().seq_rm(0, 5, -1)
        before = mem.state_write()
        with pytest.raises(StateError):
            restore_checkpoint(mem, 0, ck)
        assert mem.state_write() == before
        ck.close()
        plain = Checkpoint(0, 3, b"", ("x",))
        assert plain.to_device(None).where == "host"  # nothing to allocate


@pytest.mark.parametrize("in_place", [True, False], ids=["parsed-in-place", "device-copy"])
@pytest.mark.parametrize("model", ["tiny-lfm2-swa.gguf", "tiny-jamba.gguf", "tiny-mamba.gguf"])
def test_a_device_tier_cache_serves_the_same_bytes_and_frees_on_drop(
    monkeypatch, model: str, in_place: bool
) -> None:
    # in_place False: the CPU's device checkpoints restore as a non-host device's do (host
    # metadata + device-to-device payload copies), so they keep metadata on the host
    monkeypatch.setattr(ckpt_mod, "ZERO_COPY_HOST", in_place)
    rng = np.random.default_rng(5)
    sys_ = rng.integers(1, 60, 30).tolist()
    turns = [[*sys_, *rng.integers(1, 60, 8).tolist()] for _ in range(3)]
    pol = CheckpointPolicy(interval=8, n_batch=16)
    states, breakdowns = [], []
    for where in ("host", "device"):
        with _memory(model, n_seq_max=4) as mem:
            cache = PrefixCache(mem, policy=pol, budget_bytes=1 << 20, where=where)  # type: ignore[arg-type]
            for i, t in enumerate(turns):
                _serve(cache, i, t)
            _serve(cache, 0, turns[0][:33])  # back into the history: a checkpoint restore
            _serve(cache, 3, [*sys_, 9, 9])
            states.append(mem.state_write())
            bd = cache.memory_breakdown()
            breakdowns.append(bd)
            ckpts = [e.ckpt for e in cache._ram]
            assert ckpts and all(c is not None and c.where == where for c in ckpts)
            if where == "device":
                assert bd["ram_device"] == bd["ram"] > 0 and bd["ram_host"] == 0
                # the metadata each device checkpoint keeps on the host, counted apart
                meta = sum(c.host_nbytes for c in ckpts if c is not None)
                assert bd["ram_device_meta"] == meta < bd["ram_device"]
                assert (meta == 0) == in_place  # parsed in place: nothing kept apart
                # an entry dropped by the budget is freed at once
                cache.budget_bytes = cache.bytes_ram // 2
                _serve(cache, 1, turns[1] + [4, 4, 4, 4, 4, 4, 4, 4, 4])
                dropped = [c for c in ckpts if c is not None and c.closed]
                assert dropped and cache.bytes_ram <= cache.budget_bytes
                assert cache.memory_breakdown()["ram_device"] == cache.bytes_ram
                cache.hold_on("host")  # spill the whole tier
                assert cache.memory_breakdown()["ram_device"] == 0
                assert all(e.ckpt is not None and e.ckpt.where == "host" for e in cache._ram)
            else:
                assert bd["ram_device"] == 0 and bd["ram_host"] == bd["ram"]
                assert bd["ram_device_meta"] == 0
            live = [e.ckpt for e in cache._ram]
            cache.close()
            assert all(c is not None and c.closed for c in live)
            assert cache.memory_breakdown()["ram"] == 0
    assert states[0] == states[1]
    assert breakdowns[0]["ram"] == breakdowns[1]["ram"]


def test_a_loaded_cache_holds_its_checkpoints_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "cache.pymem"
    with _memory("tiny-jamba.gguf") as mem, _memory("tiny-jamba.gguf") as fresh:
        with PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=16)) as cache:
            _serve(cache, 0, PROMPT)
            cache.save(path, fingerprint="jamba:test")
            want = [(e.pos, e.nbytes) for e in cache.entries()]
        with pytest.raises(ConfigError, match="where"):
            PrefixCache.load(path, fresh, fingerprint="jamba:test", where="gpu")  # type: ignore[arg-type]
        with PrefixCache.load(path, fresh, fingerprint="jamba:test", where="device") as loaded:
            assert [(e.pos, e.nbytes) for e in loaded.entries()] == want and want
            assert all(e.ckpt is not None and e.ckpt.where == "device" for e in loaded._ram)
            bd = loaded.memory_breakdown()
            assert bd["ram_device"] == bd["ram"] == sum(n for _, n in want)


def test_arena_ranges_are_reused_merged_and_fall_back_when_full() -> None:
    with _memory("tiny-jamba.gguf") as mem:
        _fill(mem, 0, as_tokens(PROMPT), 0, 20)
        want = checkpoint(mem, 0, where="host").blob
        span = -(-len(want) // CheckpointArena.ALIGN) * CheckpointArena.ALIGN
        arena = CheckpointArena(memory_device(mem), 2 * span)
        a, b = checkpoint(mem, 0, arena=arena), checkpoint(mem, 0, arena=arena)
        assert a._slot is not None and b._slot is not None and arena.used == 2 * span
        c = checkpoint(mem, 0, arena=arena)  # no room: a buffer of its own
        assert c._slot is None and c._store is not None and c.blob == want
        assert a.blob == b.blob == want and a.device == arena.device
        a.close()
        b.to_host()  # both ranges back, merged into one
        assert arena.used == 0 and arena._free == [(0, 2 * span)]
        d = checkpoint(mem, 0, arena=arena)
        assert d._slot == (arena, 0) and d.blob == want
        _fill(mem, 0, as_tokens(PROMPT), 20, 24)  # the state moves on
        restore_checkpoint(mem, 0, d)
        assert mem.state_write(0, 1) == want  # PARTIAL_ONLY
        arena.close()
        with pytest.raises(ClosedError):
            d.blob  # noqa: B018
        d.close()
        c.close()
        with pytest.raises(ConfigError, match="arena nbytes"):
            CheckpointArena(None, 1)


def test_a_cache_with_an_arena_serves_the_same_bytes() -> None:
    rng = np.random.default_rng(9)
    sys_ = rng.integers(1, 60, 30).tolist()
    turns = [[*sys_, *rng.integers(1, 60, 8).tolist()] for _ in range(3)]
    states = []
    for kw in (dict(where="host"), dict(where="device", arena_bytes=8 << 10)):
        with _memory("tiny-lfm2-swa.gguf", n_seq_max=4) as mem:
            cache = PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=16), **kw)  # type: ignore[arg-type]
            for i, t in enumerate(turns):
                _serve(cache, i, t)
            _serve(cache, 0, turns[0][:33])
            _serve(cache, 3, [*sys_, 9, 9])
            states.append(mem.state_write())
            bd = cache.memory_breakdown()
            if "arena_bytes" in kw:
                assert bd["arena"] == 8 << 10 and bd["ram_device"] == bd["ram"] > 0
                arena = cache._arena
                assert arena is not None and arena.used > 0
                assert any(e.ckpt is not None and e.ckpt._slot for e in cache._ram)
            cache.close()
            if "arena_bytes" in kw:
                assert arena.used == 0 and arena.store.closed
    assert states[0] == states[1]
