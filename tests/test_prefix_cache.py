"""The prefix cache (pymem.reuse.prefix_cache) reuses exactly what it says and nothing else.

* The radix tree and lookups: exact common prefixes, reusable lengths, sources and reasons.
* attach on every memory type (KV, iSWA, recurrent, hybrid, hybrid-iSWA GGUF models; one
  stream and one per sequence; the same sequence and another one), then a decode whose
  logits equal a decode from scratch in the same chunks: bit-identical, except where the
  K/V of reused tokens were computed in a longer chunk (a trim) or where the stream holds
  another sequence's cells (a unified copy): there the kernels reduce over other shapes
  and the last bits may differ (stated tolerance).
* Budget: never exceeded under a seeded random workload; the eviction order is exact.
* Disk tier: every sampled truncation and byte flip of an entry, and a foreign model's
  or another memory's file, is refused with a StateError, the memory unchanged, and
  attach falls back to what it can do exactly (here: decoding from 0).
* Session.submit on the tiny model of every preset, checked against the float64 oracle.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pymem
from pymem.batch import Batch, BatchAllocator
from pymem.container import model_fingerprint, write_container_payload
from pymem.errors import ClosedError, ConfigError, RangeError, StateError, UnsupportedError
from pymem.factory import ContextParams, create_memory
from pymem.memory import Memory, MemoryStatus
from pymem.reuse import CheckpointPolicy, PrefixCache, RadixTree, as_tokens
from pymem.runtime.config import TinyConfig
from pymem.runtime.decoder import Decoder
from pymem.runtime.gguf_llama import GGUFModel
from pymem.runtime.graph import TinyModel
from pymem.runtime.session import Session

MODELS = Path(__file__).parent / "data" / "models"
P = [(5 * i + 2) % 60 + 1 for i in range(24)]
R = [*P[:13], 50, 51, 52]  # shares 13 tokens with P

# model -> context parameters (flash attention where the GGUF engine's parity runs use it)
PARAMS: dict[str, dict[str, Any]] = {
    "tiny-llama.gguf": dict(flash_attn=False),
    "tiny-gemma2.gguf": dict(flash_attn=True, swa_full=False),
    "tiny-mamba.gguf": dict(),
    "tiny-jamba.gguf": dict(flash_attn=False),
    "tiny-lfm2-swa.gguf": dict(flash_attn=False, swa_full=False),
}
# model -> (how the same sequence goes back to 13, resume), (how another sequence gets it)
EXPECT: dict[str, tuple[tuple[str, int], tuple[str, int]]] = {
    "tiny-llama.gguf": (("trim", 13), ("copy", 13)),
    "tiny-gemma2.gguf": (("trim", 13), ("copy", 13)),  # the window of 13 is still held
    "tiny-mamba.gguf": (("restore", 8), ("restore", 8)),  # a checkpoint is a whole state
    "tiny-jamba.gguf": (("restore", 8), ("copy", 8)),
    "tiny-lfm2-swa.gguf": (("restore", 8), ("copy", 8)),
}


def _memory(model: str, n_seq: int = 4, **over: Any) -> Memory:
    kw = dict(n_ctx=256, n_seq_max=n_seq, n_batch=64, n_ubatch=64, kv_unified=True)
    kw.update(PARAMS[model])
    kw.update(over)
    mem = create_memory(pymem.spec_from_gguf(MODELS / model), ContextParams(**kw))
    assert mem is not None
    return mem


def _decode(engine: GGUFModel, mem: Memory, toks: list[int], p0: int, seq: int, fa: bool) -> np.ndarray:  # fmt: skip
    """Decode ``toks`` at positions ``p0..`` of ``seq``; the last token's logits."""
    items = [(t, p0 + i, [seq], i == len(toks) - 1) for i, t in enumerate(toks)]
    dec = Decoder(engine, mem, n_seq_max=4, n_ubatch=64, flash_attn=fa)
    return dec.decode(Batch.from_items(items))[-1]


def _fill(mem: Memory, seq: int, toks: np.ndarray, p0: int, p1: int, n_seq: int = 4) -> None:
    """Apply the ubatches of ``toks[p0:p1]`` without computing a graph (bookkeeping only)."""
    balloc = BatchAllocator()
    b = Batch(np.asarray(toks[p0:p1], np.int32), pos=np.arange(p0, p1, dtype=np.int32),
              seq_id=np.full(p1 - p0, seq, np.int32), output=np.zeros(p1 - p0, bool))  # fmt: skip
    balloc.init(b, memory=mem, n_seq_max=n_seq)
    ctx = mem.init_batch(balloc, 64, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    while True:
        ctx.apply()
        if not ctx.next():
            break


def _serve(cache: PrefixCache, seq: int, toks: list[int], n_seq: int = 4, kind: str = "prompt"):
    """attach + bookkeeping-only decode of every chunk + record; returns the Attach."""
    arr = as_tokens(toks)
    att = cache.attach(seq, arr, kind)  # type: ignore[arg-type]
    for p0, p1 in att.chunks:
        _fill(cache.mem, seq, arr, p0, p1, n_seq)
        cache.record(seq, arr[:p1])
    return att


@pytest.fixture(scope="module")
def engines():
    cache: dict[str, GGUFModel] = {}
    yield lambda model: cache.setdefault(model, GGUFModel(MODELS / model))
    for e in cache.values():
        e.close()


# --- the radix tree ---------------------------------------------------------------------------


def test_radix_walk_split_and_prune_are_exact() -> None:
    t = RadixTree()
    a = as_tokens([1, 2, 3, 4, 5, 6])
    b = as_tokens([1, 2, 3, 9, 9])
    na = t.insert(a)
    t.set_live(na, 0, True)
    assert (na.depth, na.n_key, t.n_nodes) == (6, 6, 1)
    nb = t.insert(b)  # splits [1..6] at 3
    t.set_live(nb, 1, True)
    mid = na.parent
    assert mid is not None and (mid.depth, mid.n_key, mid.live, mid.ends) == (3, 3, 0b11, 0)
    assert (na.start, na.live, nb.live, t.n_nodes) == (3, 0b01, 0b10, 3)
    w = t.walk(as_tokens([1, 2, 3, 4, 7]))
    assert (w.n_common, [n.depth for n in w.nodes], w.partial) == (4, [3], na)
    assert w.live_at_common == 0b01
    w = t.walk(as_tokens([1, 2]))
    assert (w.n_common, w.nodes, w.partial, w.live_at_common) == (2, (), mid, 0b11)
    assert t.walk(as_tokens([7])).n_common == 0
    assert list(na.tokens()) == [1, 2, 3, 4, 5, 6] and list(na.tokens(4)) == [1, 2, 3, 4]

    class Pay:
        def __init__(self, depth: int) -> None:
            self.depth = depth
            self.node: Any = None

    p2, p5 = Pay(2), Pay(5)
    mid.add_payload(p2)
    na.add_payload(p5)
    assert na.deepest_payload(6) is p5 and na.deepest_payload(4) is None
    assert mid.deepest_payload(3) is p2
    # sequence 1 goes away: its leaf is pruned and [1,2,3] merges into [4,5,6] with p2
    t.set_live(nb, 1, False)
    t.prune(nb)
    assert t.n_nodes == 1 and na.parent is t.root and na.n_key == 6
    assert sorted(na.payloads) == [2, 5] and p2.node is na
    assert list(na.depths()) == [2, 5]


# --- lookups ------------------------------------------------------------------------------------


def test_lookup_reports_exact_lengths_sources_and_reasons() -> None:
    toks = list(range(1, 41))
    with _memory("tiny-jamba.gguf") as mem:
        cache = PrefixCache(mem, policy=CheckpointPolicy(interval=16, n_batch=16, before_last_token=False))  # fmt: skip
        att = _serve(cache, 0, toks)
        assert att.chunks == ((0, 16), (16, 32), (32, 40)) and att.checkpoints == (15, 31)
        assert [e.pos for e in cache.entries()] == [15, 31]
        # the same sequence, continuing
        m = cache.lookup([*toks, 99], 0)
        assert (m.n_common, m.n_reuse, m.source, m.how, m.src_seq) == (
            40,
            40,
            "live",
            "continue",
            0,
        )
        # the same sequence, going back to 20: the checkpoint at 15
        m = cache.lookup([*toks[:20], 99], 0)
        assert (m.n_common, m.n_reuse, m.source, m.how, m.pos) == (
            20,
            16,
            "checkpoint",
            "restore",
            15,
        )
        assert "the nearest checkpoint is at 15" in m.reason and "at 20" in m.reason
        # another sequence: sequence 0's cells up to 15, then the checkpoint
        m = cache.lookup([*toks[:20], 99], 1)
        assert (m.n_reuse, m.source, m.how, m.src_seq, m.pos) == (16, "checkpoint", "copy", 0, 15)
        # the whole history again: all but its last token (whose logits are needed)
        m = cache.lookup(toks, 1)
        assert (m.n_common, m.n_reuse, m.pos) == (40, 32, 31)
        # a sequence ending exactly where the request leaves it: copied whole, no checkpoint
        m = cache.lookup([*toks, 5, 6], 1)
        assert (m.n_reuse, m.source, m.how, m.src_seq, m.pos) == (40, "live", "copy", 0, -1)
        m = cache.lookup([7, 7, 7], 1)
        assert (m.n_reuse, m.source, m.how) == (0, "none", "recompute")
        assert m.reason == "nothing cached starts with these tokens"
        with pytest.raises(RangeError):
            cache.lookup([], 0)
        cache.close()
    with _memory("tiny-llama.gguf") as mem, PrefixCache(mem) as cache:
        _serve(cache, 0, toks)
        assert cache.entries() == []  # a KV cache trims: no checkpoint needed
        m = cache.lookup([*toks[:20], 99], 1)
        assert (m.n_reuse, m.source, m.how, m.src_seq) == (20, "live", "copy", 0)
        m = cache.lookup(toks, 0)
        assert (m.n_reuse, m.how) == (39, "trim")
        assert m.reason == "all 40 tokens are cached; the last one is decoded again for its logits"


def test_attach_chunks_land_on_the_policy_checkpoints() -> None:
    with _memory("tiny-jamba.gguf") as mem:
        cache = PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=6))
        att = _serve(cache, 0, list(range(1, 21)))
        # interval 7, 15; before the last token 18; no chunk longer than 6
        assert att.checkpoints == (7, 15, 18)
        assert att.chunks == ((0, 6), (6, 8), (8, 14), (14, 16), (16, 19), (19, 20))
        # the next turn: a checkpoint right away where it starts (19), then 23, and 26
        att = _serve(cache, 0, list(range(1, 29)))
        assert (att.resume_from, att.checkpoints) == (20, (23, 26))
        assert att.chunks == ((20, 24), (24, 27), (27, 28))
        assert [e.pos for e in cache.entries()] == [7, 15, 18, 19, 23, 26]
        # generated tokens: the interval only
        att = _serve(cache, 0, list(range(1, 35)), kind="generate")
        assert (att.checkpoints, att.chunks) == ((31,), ((28, 32), (32, 34)))
        # a branch replayed from 16 leaves the cached path at 30: a checkpoint at 29
        att = _serve(cache, 1, [*range(1, 31), 60, 61, 62])
        assert (att.match.how, att.resume_from) == ("copy", 27)
        assert att.checkpoints == (29, 31)
        with pytest.raises(ConfigError):
            cache.attach(0, [1], "chat")  # type: ignore[arg-type]
        cache.close()
    with pytest.raises(ConfigError):
        CheckpointPolicy(interval=-1)


# --- attach on every memory type, then logits equal a decode from scratch ----------------


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("cross", [False, True], ids=["same-seq", "other-seq"])
@pytest.mark.parametrize("model", list(PARAMS))
def test_attach_then_decode_equals_scratch(model: str, cross: bool, unified: bool, engines) -> None:  # fmt: skip
    engine = engines(model)
    fa = bool(PARAMS[model].get("flash_attn", False))
    dst = 1 if cross else 0
    pol = CheckpointPolicy(interval=8, n_batch=8, before_last_token=False)
    with _memory(model, kv_unified=unified) as mem, _memory(model, kv_unified=unified) as fresh:
        cache = PrefixCache(mem, policy=pol)
        att = cache.attach(0, P)
        for p0, p1 in att.chunks:
            _decode(engine, mem, P[p0:p1], p0, 0, fa)
            cache.record(0, P[:p1])
        att = cache.attach(dst, R)
        assert (att.match.how, att.resume_from) == EXPECT[model][int(cross)], att.match.reason
        assert mem.seq_pos_max(dst) == att.resume_from - 1
        got = None
        for p0, p1 in att.chunks:
            got = _decode(engine, mem, R[p0:p1], p0, dst, fa)
            cache.record(dst, R[:p1])
        assert got is not None and att.chunks[-1][1] == len(R)
        if cross:  # the source sequence is untouched: it continues as if nothing happened
            cont = _decode(engine, mem, [9], 24, 0, fa)
        # from scratch, in the chunks that built these cells
        cuts = sorted({0, *(c for c in (8, 16) if c <= att.resume_from), att.resume_from,
                       *(p1 for _, p1 in att.chunks)})  # fmt: skip
        for a, b in itertools.pairwise(cuts):
            want = _decode(engine, fresh, R[a:b], a, dst, fa)
        if cross:
            fresh.clear()
            for a in range(0, 24, 8):
                _decode(engine, fresh, P[a : a + 8], a, 0, fa)
            cont_want = _decode(engine, fresh, [9], 24, 0, fa)
        cache.close()
    exact = att.match.how != "trim" and not (unified and cross)
    if exact:
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    else:
        # a trim keeps K/V computed in the 8..16 chunk (here 8..13 + 13..16); a unified copy
        # puts another sequence's cells in the stream (more, masked, columns)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    if cross:
        np.testing.assert_allclose(cont, cont_want, rtol=0, atol=1e-5 * float(np.abs(cont_want).max()))  # fmt: skip
        if not unified:
            assert np.array_equal(cont.view(np.uint32), cont_want.view(np.uint32))


def test_a_refused_copy_falls_back_to_the_whole_sequence_state(engines, monkeypatch) -> None:
    # a memory that cannot seq_cp this pair: the cache copies the source's state bytes
    model, fa = "tiny-jamba.gguf", False
    engine = engines(model)
    with _memory(model, kv_unified=False) as mem, _memory(model, kv_unified=False) as fresh:
        cache = PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=8, before_last_token=False))  # fmt: skip
        att = cache.attach(0, P)
        for p0, p1 in att.chunks:
            _decode(engine, mem, P[p0:p1], p0, 0, fa)
            cache.record(0, P[:p1])

        def refuse(*args: Any) -> None:
            raise UnsupportedError("seq_cp: refused for this test")

        monkeypatch.setattr(mem, "seq_cp", refuse)
        att = cache.attach(1, R)
        assert (att.match.how, att.resume_from) == ("copy", 8)
        for p0, p1 in att.chunks:
            got = _decode(engine, mem, R[p0:p1], p0, 1, fa)
        for a, b in itertools.pairwise([0, 8, 13, 16]):
            want = _decode(engine, fresh, R[a:b], a, 1, fa)
        cache.close()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


# --- budget and eviction --------------------------------------------------------------------


def _check_tree(cache: PrefixCache) -> None:
    """Invariants of the tree and of what the cache believes (after every step)."""
    for node in cache.tree.iter_nodes():
        parent = node.parent
        assert parent is not None and node.depth == parent.depth + node.n_key > parent.depth
        assert parent.children[node.first_token()] is node
        below = node.ends
        for child in node.children.values():
            below |= child.live
        assert node.live == below, node  # a sequence runs through an edge iff it ends below
        assert node.children or node.live or node.payloads, node  # pruned otherwise
        assert list(node.depths()) == sorted(node.payloads)
        for d, p in node.payloads.items():
            assert p.node is node and p.depth == d and node.start < d <= node.depth
            assert cache.self_sufficient or node.live, node  # no orphaned checkpoint
    for s in cache.held_seqs():
        held = cache.held(s)
        assert held is not None and cache.mem.seq_pos_max(s) == len(held) - 1
        w = cache.tree.walk(held)
        assert w.n_common == len(held) and w.partial is None and w.nodes[-1].ends >> s & 1


def _checkpoint_size(mem: Memory) -> int:
    """Bytes of one checkpoint of a sequence holding 10 tokens (memory left empty)."""
    _fill(mem, 3, np.arange(1, 11), 0, 10)
    n = len(mem.state_write(3, 1))
    mem.seq_rm(3, -1, -1)
    return n


def test_budget_is_never_exceeded_under_a_random_workload(tmp_path: Path) -> None:
    rng = np.random.default_rng(1234)
    with _memory("tiny-lfm2-swa.gguf", n_ctx=2048) as mem:
        size = _checkpoint_size(mem)
        budget, disk_budget = 3 * size, 12 * size + 8 * 2048  # files carry a header too
        cache = PrefixCache(
            mem, policy=CheckpointPolicy(interval=16, n_batch=32), budget_bytes=budget,
            disk_dir=tmp_path, disk_budget_bytes=disk_budget, fingerprint="test",
        )  # fmt: skip
        hist: dict[int, list[int]] = {}
        base = rng.integers(1, 60, 40).tolist()
        for step in range(60):
            seq = int(rng.integers(0, 4))
            src = hist.get(int(rng.integers(0, 4)), base)
            keep = int(rng.integers(1, len(src) + 1))
            toks = src[:keep] + rng.integers(1, 60, int(rng.integers(1, 40))).tolist()
            if len(toks) > 300:
                toks = toks[:20]
            kind = ("prompt", "generate", "draft")[int(rng.integers(0, 3))]
            att = _serve(cache, seq, toks, kind=kind)
            assert att.resume_from <= len(toks) - 1
            assert mem.seq_pos_max(seq) == len(toks) - 1
            hist[seq] = toks
            assert cache.bytes_ram <= budget and cache.bytes_disk <= disk_budget, step
            ents = cache.entries()
            assert sum(e.nbytes for e in ents if e.tier == "ram") == cache.bytes_ram
            assert sum(e.nbytes for e in ents if e.tier == "disk") == cache.bytes_disk
            assert sum(os.path.getsize(e.path) for e in ents if e.path) == cache.bytes_disk
            for s, h in hist.items():  # what the cache believes each sequence holds
                assert list(cache.held(s)) == h  # type: ignore[arg-type]
            _check_tree(cache)
        assert cache.peak_ram <= budget and cache.n_spilled > 0
        files = [e.path for e in cache.entries() if e.path]
        cache.close()
        assert cache.memory_breakdown() == {
        "ram": 0, "disk": 0, "tree": 0, "ram_device": 0, "ram_host": 0, "ram_device_meta": 0,
    }  # fmt: skip
        assert not any(os.path.exists(f) for f in files)
        with pytest.raises(ClosedError):
            cache.lookup([1])


def test_eviction_is_least_shared_then_least_recently_used() -> None:
    with _memory("tiny-jamba.gguf") as mem:
        one = _checkpoint_size(mem)
        cache = PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=8, before_last_token=False),
                            budget_bytes=4 * one)  # fmt: skip
        _serve(cache, 0, list(range(1, 33)))  # checkpoints 7, 15, 23, 31
        assert cache.eviction_order() == [7, 15, 23, 31]
        # sequence 1 shares the first 16 tokens: 7 and 15 are shared by two sequences
        _serve(cache, 1, [*range(1, 17), 60, 61])
        assert [e.pos for e in cache.entries()] == [7, 15, 23, 31]
        assert {e.pos: e.shared for e in cache.entries()} == {7: 2, 15: 2, 23: 1, 31: 1}
        assert cache.eviction_order() == [23, 31, 7, 15]
        # sequence 0 goes back to 24 through the checkpoint at 23 (now the most recently
        # used of the least shared); 31 went with the dropped tail, a new 31 is on the new one
        att = _serve(cache, 0, [*range(1, 25), *range(70, 79)])
        assert (att.match.pos, att.resume_from) == (23, 24)
        assert cache.eviction_order() == [23, 31, 7, 15] and cache.n_evicted == 0
        # sequence 2 branches at 8 (7 is now shared by three): its checkpoint at 15 evicts
        # the least shared, least recently used one, 23
        att = _serve(cache, 2, [*range(1, 9), *range(90, 98)])
        assert (att.match.pos, att.resume_from) == (7, 8)
        assert cache.n_evicted == 1 and cache.bytes_ram <= 4 * one
        assert [(e.pos, e.shared) for e in cache.entries()] == [(7, 3), (15, 2), (31, 1), (15, 1)]
        assert cache.eviction_order() == [31, 15, 15, 7]
        _check_tree(cache)
        cache.close()


# --- the disk tier ---------------------------------------------------------------------------


def _spilled_cache(mem: Memory, engine: GGUFModel, tmp_path: Path, fp: str) -> PrefixCache:
    """Sequence 0 decodes P; every checkpoint (7, 15, 23) goes straight to disk."""
    cache = PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=8, before_last_token=False),
                        budget_bytes=0, disk_dir=tmp_path, fingerprint=fp)  # fmt: skip
    att = cache.attach(0, P)
    for p0, p1 in att.chunks:
        _decode(engine, mem, P[p0:p1], p0, 0, False)
        cache.record(0, P[:p1])
    assert [(e.pos, e.tier) for e in cache.entries()] == [(7, "disk"), (15, "disk"), (23, "disk")]
    return cache


def test_damaged_disk_entries_are_refused_and_change_nothing(engines, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    engine = engines(model)
    fp = model_fingerprint(MODELS / model)
    with _memory(model) as mem, _memory(model) as fresh:
        cache = _spilled_cache(mem, engine, tmp_path, fp)
        entry = next(e for e in cache.entries() if e.pos == 7)
        assert entry.path is not None
        good = Path(entry.path).read_bytes()
        n = len(good)
        n_header = int.from_bytes(good[12:16], "little")
        payload = 16 + n_header
        truncations = [0, 1, 7, 8, 12, 15, 16, payload - 1, payload, payload + 10, n - 33, n - 32, n - 1]  # fmt: skip
        flips = [0, 5, 8, 12, 14, 16, 40, payload - 2, payload + 3, (payload + n) // 2, n - 32, n - 1]  # fmt: skip
        damaged = [good[:k] for k in truncations]
        for k in flips:
            b = bytearray(good)
            b[k] ^= 0x41
            damaged.append(bytes(b))
        damaged.append(good + b"\0")
        before = mem.state_write()
        for bad in damaged:
            Path(entry.path).write_bytes(bad)
            with pytest.raises(StateError):
                cache.restore_entry(0, 7)
            assert mem.state_write() == before
        # going back to 13 needs the checkpoint at 7 (15 is past 13): attach refuses the
        # damaged file, drops it, and decodes from 0, the only other exact way
        Path(entry.path).write_bytes(good[: n // 2])
        att = cache.attach(0, R)
        assert len(att.refused) == 1 and "truncated" in att.refused[0]
        assert (att.match.how, att.resume_from) == ("recompute", 0)
        assert not os.path.exists(entry.path) and cache.n_refused == 1
        for p0, p1 in att.chunks:
            got = _decode(engine, mem, R[p0:p1], p0, 0, False)
            cache.record(0, R[:p1])
        for p0, p1 in att.chunks:
            want = _decode(engine, fresh, R[p0:p1], p0, 0, False)
        cache.close()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_foreign_and_mismatched_disk_entries_are_refused(engines, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    engine = engines(model)
    fp = model_fingerprint(MODELS / model)
    with _memory(model) as mem, _memory("tiny-lfm2-swa.gguf") as other:
        cache = _spilled_cache(mem, engine, tmp_path / "a", fp)
        entries = {e.pos: e.path for e in cache.entries()}
        blob = mem.state_write(0, 1)
        before = mem.state_write()
        # another model's fingerprint, the same bytes
        write_container_payload(entries[23], blob, mem, 0, 1, fingerprint="llama:" + "0" * 32,
                                pos={0: (23, 23)}, tokens=P)  # fmt: skip
        with pytest.raises(StateError, match="foreign"):
            cache.restore_entry(0, 23)
        # another memory's layout
        write_container_payload(entries[15], other.state_write(0, 1), other, 0, 1,
                                fingerprint=fp, pos={0: (15, 15)}, tokens=P[:16])  # fmt: skip
        with pytest.raises(StateError, match="memory"):
            cache.restore_entry(0, 15)
        # this model and memory, but another prefix's tokens
        write_container_payload(entries[7], blob, mem, 0, 1, fingerprint=fp,
                                pos={0: (7, 7)}, tokens=[1] * 8)  # fmt: skip
        with pytest.raises(StateError, match="other tokens"):
            cache.restore_entry(0, 7)
        assert mem.state_write() == before
        att = cache.attach(0, [*P[:20], 9])
        assert len(att.refused) == 2 and att.match.how == "recompute"  # 15, then 7 refused
        assert cache.entries() == [] or all(e.pos == 23 for e in cache.entries())
        cache.close()


def test_disk_entries_restore_exactly(engines, tmp_path: Path) -> None:
    model = "tiny-lfm2-swa.gguf"
    engine = engines(model)
    fp = model_fingerprint(MODELS / model)
    with _memory(model) as mem, _memory(model) as fresh:
        cache = PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=8, before_last_token=False),
                            budget_bytes=0, disk_dir=tmp_path, fingerprint=fp)  # fmt: skip
        att = cache.attach(0, P)
        for p0, p1 in att.chunks:
            _decode(engine, mem, P[p0:p1], p0, 0, False)
            cache.record(0, P[:p1])
        m = cache.lookup(R, 1)
        assert (m.source, m.how, m.pos) == ("disk", "copy", 7)
        att = cache.attach(1, R)
        assert att.resume_from == 8 and att.refused == ()
        for p0, p1 in att.chunks:
            got = _decode(engine, mem, R[p0:p1], p0, 1, False)
        for a, b in itertools.pairwise([0, 8, 13, 16]):
            want = _decode(engine, fresh, R[a:b], a, 1, False)
        assert cache.memory_breakdown()["disk"] > 0
        cache.close()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


# --- the serving session ------------------------------------------------------------------------


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("preset", ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"])
def test_session_submit_decodes_only_what_the_cache_cannot_supply(preset: str, unified: bool) -> None:  # fmt: skip
    cfg = TinyConfig.preset(preset)
    rng = np.random.default_rng(3)
    sys_ = rng.integers(1, 63, 40).tolist()
    user, answer = rng.integers(1, 63, 12).tolist(), rng.integers(1, 63, 8).tolist()
    with TinyModel(cfg) as model:
        mem = create_memory(cfg.spec(), ContextParams(n_ctx=256, n_seq_max=3, kv_unified=unified,
                            swa_full=False, type_k="f32", type_v="f32", flash_attn=False))  # fmt: skip
        assert mem is not None
        with mem, PrefixCache(mem, policy=CheckpointPolicy(interval=16, n_batch=32)) as cache:
            s = Session(model, mem, n_seq_max=3, prefix_cache=cache)
            r = s.submit(0, sys_ + user)
            assert (r.n_decoded, r.n_reused) == (52, 0)
            r = s.submit(0, sys_ + user + answer, "generate")
            assert (r.n_decoded, r.attach.match.how) == (8, "continue")
            r = s.submit(0, sys_ + user)  # regenerate: before the last token, or a trim
            assert r.n_decoded == 1
            r = s.submit(1, [*sys_, 7, 7, 7])  # a new session on the same system prompt
            assert r.n_decoded <= 3 + 16 and r.attach.match.how in ("copy", "restore")
            r = s.submit(2, [*sys_, 7, 7, 7, 8])  # branched at 40 by the last one
            assert r.n_decoded <= 2
            s.finish(1)
            assert cache.held(1) is None
            assert s.rollback(2, 1) or preset in ("recurrent", "hybrid", "hybrid_iswa")
            s.expect_positions()
            assert s.ok, s.failures
            assert s.max_err > 0 and s.max_err <= s.tol


# --- a random workload, every step against a decode from scratch ------------------------------


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("model", ["tiny-jamba.gguf", "tiny-lfm2-swa.gguf", "tiny-gemma2.gguf"])
def test_random_workload_logits_equal_scratch(model: str, unified: bool, engines, tmp_path: Path) -> None:  # fmt: skip
    # seeded: 4 sequences, requests branching off each other's histories at random points,
    # all three request kinds, a RAM budget of 3 checkpoints and a disk tier; f32 caches
    # without flash attention (which would round K/V to f16: ~5e-4 relative)
    engine = engines(model)
    rng = np.random.default_rng(5)
    kw = dict(n_ctx=1024, kv_unified=unified, type_k="f32", type_v="f32", flash_attn=False)
    with _memory(model, **kw) as mem, _memory(model, **kw) as fresh:
        cache = PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=16),
                            budget_bytes=3 * _checkpoint_size(mem), disk_dir=tmp_path,
                            fingerprint="test")  # fmt: skip
        hist: dict[int, list[int]] = {}
        base = rng.integers(1, 60, 30).tolist()
        n_reused = 0
        for step in range(25):
            seq = int(rng.integers(0, 4))
            src = hist.get(int(rng.integers(0, 4)), base)
            toks = src[: int(rng.integers(1, len(src) + 1))]
            toks = (toks + rng.integers(1, 60, int(rng.integers(1, 12))).tolist())[:120]
            kind = ("prompt", "generate", "draft")[int(rng.integers(0, 3))]
            att = cache.attach(seq, toks, kind)  # type: ignore[arg-type]
            for p0, p1 in att.chunks:
                got = _decode(engine, mem, toks[p0:p1], p0, seq, False)
                cache.record(seq, toks[:p1])
            hist[seq] = toks
            n_reused += att.resume_from
            fresh.clear()
            for p0 in range(0, len(toks), 16):
                want = _decode(engine, fresh, toks[p0 : p0 + 16], p0, 0, False)
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=f"step {step}")
            _check_tree(cache)
        assert n_reused > 100
        cache.close()
