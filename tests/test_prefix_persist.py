"""A prefix cache saved with its memory (pymem.reuse.persist) comes back exactly, or not at all.

* Round trip on a hybrid (tiny-jamba, tiny-lfm2-swa) and an iSWA (tiny-gemma2) memory, one
  stream and one per sequence: after load the memory's state bytes equal the saved ones,
  the cache tracks the same tokens and checkpoints, every lookup gives the same answer,
  and an attach + decode on the loaded pair takes the same way and gives bit-identical
  logits (tiny-gemma2's flash attention over f16 K/V: within 2e-3 of the largest, as after
  any whole-state restore, which packs the cells anew). Recurrent checkpoints no sequence
  holds (tiny-mamba) keep their own tokens; a sequence changed behind the cache's back is
  not saved.
* Every truncation point and every single-byte flip of a saved file, a byte appended, an
  index that disagrees with itself under a valid checksum, another model's file and
  another layout's file: refused with a typed error, the memory and the cache over it
  unchanged.
* Saving changes nothing; a spill file that fails its checks is left out of the save.
* Budgets: a smaller budget at load evicts in the cache's own order; disk-tier entries are
  copied into the file and spilled again into the new cache's disk tier.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pymem.container import MAGIC, VERSION, model_fingerprint, write_container
from pymem.errors import ConfigError, StateError
from pymem.memory import Memory
from pymem.reuse import CheckpointPolicy, PrefixCache, load_prefix_cache, save_prefix_cache
from pymem.runtime.gguf_llama import GGUFModel

sys.path.insert(0, str(Path(__file__).parent))
from test_prefix_cache import (
    MODELS,
    PARAMS,
    P,
    R,
    _check_tree,
    _checkpoint_size,
    _decode,
    _memory,
    _serve,
)

POL = CheckpointPolicy(interval=8, n_batch=8, before_last_token=False)
QUERIES = [P, R, [*P[:20], 9], [*R[:10], 1, 2], P[:5], [7, 7, 7]]


@pytest.fixture(scope="module")
def engines():
    cache: dict[str, GGUFModel] = {}
    yield lambda model: cache.setdefault(model, GGUFModel(MODELS / model))
    for e in cache.values():
        e.close()


def _fp(model: str) -> str:
    return model_fingerprint(MODELS / model)


def _build(mem: Memory, engine: GGUFModel, model: str, **kw: Any) -> PrefixCache:
    """Sequence 0 decodes P, sequence 1 decodes R (13 tokens shared): checkpoints at
    7, 15, 23 on P's path and 12, 15 on R's."""
    fa = bool(PARAMS[model].get("flash_attn", False))
    cache = PrefixCache(mem, policy=POL, fingerprint=_fp(model), **kw)
    for seq, toks in ((0, P), (1, R)):
        att = cache.attach(seq, toks)
        for p0, p1 in att.chunks:
            _decode(engine, mem, toks[p0:p1], p0, seq, fa)
            cache.record(seq, toks[:p1])
    return cache


def _view(cache: PrefixCache) -> Any:
    """Everything a caller can observe of a cache (but file paths)."""
    entries = [(e.pos, e.tier, e.nbytes, e.last_used, e.shared) for e in cache.entries()]
    held = {s: cache.held(s).tolist() for s in cache.held_seqs()}  # type: ignore[union-attr]
    looks = [cache.lookup(q, s) for q in QUERIES for s in (-1, 0, 1, 2)]
    return entries, held, looks, cache.eviction_order(), cache.memory_breakdown()


def _other_state(mem: Memory) -> PrefixCache:
    """A memory that holds something else (sequence 3: 10 other tokens), with its cache."""
    cache = PrefixCache(mem, policy=POL)
    _serve(cache, 3, [9, 8, 7, 6, 5, 4, 3, 2, 1, 9])
    return cache


def _repack(good: bytes, edit: Any) -> bytes:
    """``good`` with its header JSON edited by ``edit(doc)`` and the checksum recomputed."""
    n_header = int.from_bytes(good[12:16], "little")
    doc = json.loads(good[16 : 16 + n_header])
    edit(doc)
    text = json.dumps(doc, separators=(",", ":")).encode()
    body = struct.pack("<8sII", MAGIC, VERSION, len(text)) + text + good[16 + n_header : -32]
    return body + hashlib.sha256(body).digest()


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("model", ["tiny-jamba.gguf", "tiny-gemma2.gguf", "tiny-lfm2-swa.gguf"])
def test_round_trip_restores_memory_and_cache_exactly(
    model: str, unified: bool, engines, tmp_path: Path
) -> None:
    engine = engines(model)
    fa = bool(PARAMS[model].get("flash_attn", False))
    with _memory(model, kv_unified=unified) as mem, _memory(model, kv_unified=unified) as fresh:
        cache = _build(mem, engine, model)
        before, view = mem.state_write(), _view(cache)
        n = cache.save(tmp_path / "c.pymem")
        assert n == (tmp_path / "c.pymem").stat().st_size
        assert mem.state_write() == before and _view(cache) == view  # saving changes nothing
        old = _other_state(fresh)
        loaded = PrefixCache.load(tmp_path / "c.pymem", fresh, fingerprint=_fp(model))
        old.close()
        assert fresh.state_write() == mem.state_write()
        assert [(e.pos, e.tier) for e in loaded.entries()] == [
            (7, "ram"), (15, "ram"), (23, "ram"), (12, "ram"), (15, "ram")
        ]  # fmt: skip
        assert _view(loaded) == _view(cache)
        # a new conversation on R's prefix, and sequence 0 continuing, on both pairs
        q = [*R[:14], 3, 4, 5]
        outs = []
        for c, m in ((cache, mem), (loaded, fresh)):
            att = c.attach(2, q)
            got = None
            for p0, p1 in att.chunks:
                got = _decode(engine, m, q[p0:p1], p0, 2, fa)
                c.record(2, q[:p1])
            cont = _decode(engine, m, [9], len(P), 0, fa)
            outs.append((att.match, att.chunks, got, cont))
        assert outs[0][:2] == outs[1][:2] and outs[0][0].n_reuse > 0
        for a, b in zip(outs[0][2:], outs[1][2:]):
            if fa:
                # a whole-state restore packs the cells anew (llama.cpp's too); flash
                # attention over f16 K/V then sums them in another order: a plain
                # state_write -> state_read of tiny-gemma2 differs by 2.9e-3 of 2.89 here
                np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * float(np.abs(a).max()))
            else:
                assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        # from here on the two memories may part: a restore packs the cells anew, so a
        # later slot search in a sliding-window cache overwrites other stale cells (here
        # tiny-gemma2's window keeps sequence 0 from 16 in one and from 0 in the other);
        # a plain state_write -> state_read does the same
        cache.close()
        loaded.close()


def test_a_sequence_changed_behind_the_caches_back_is_not_saved(engines, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    with _memory(model) as mem, _memory(model) as fresh:
        cache = _build(mem, engines(model), model)
        _decode(engines(model), mem, [9], len(P), 0, False)  # no record: sequence 0 is stale
        cache.save(tmp_path / "c.pymem")
        loaded = PrefixCache.load(tmp_path / "c.pymem", fresh, fingerprint=_fp(model))
        assert fresh.state_write() == mem.state_write()
        assert loaded.held_seqs() == [1]
        # 15 and 23 on P's path needed sequence 0's cells: dropped; 7 is on R's path too
        assert sorted(e.pos for e in loaded.entries()) == [7, 12, 15]
        for q in QUERIES:  # the same ways back (n_common may be shorter: P's tail is gone)
            for s in (-1, 1, 2):
                a, b = loaded.lookup(q, s), cache.lookup(q, s)
                assert (a.n_reuse, a.source, a.how, a.src_seq, a.pos) == (
                    b.n_reuse, b.source, b.how, b.src_seq, b.pos
                )  # fmt: skip
        loaded.close()
        cache.close()


def test_checkpoints_no_sequence_holds_keep_their_own_tokens(engines, tmp_path: Path) -> None:
    # a recurrent checkpoint is a whole state: the cache keeps it after its sequence left
    model = "tiny-mamba.gguf"
    with _memory(model) as mem, _memory(model) as fresh:
        cache = _build(mem, engines(model), model)
        cache.release(0)
        assert any(e.shared == 0 for e in cache.entries())
        cache.save(tmp_path / "c.pymem")
        loaded = PrefixCache.load(tmp_path / "c.pymem", fresh, fingerprint=_fp(model))
        assert fresh.state_write() == mem.state_write()
        assert _view(loaded) == _view(cache)
        loaded.close()
        cache.close()


def test_load_from_bytes_and_the_module_functions(engines, tmp_path: Path) -> None:
    model = "tiny-gemma2.gguf"
    with _memory(model) as mem, _memory(model) as fresh:
        cache = _build(mem, engines(model), model)
        # save needs a fingerprint: the cache's own, or one given
        bare = PrefixCache(fresh, policy=POL)
        with pytest.raises(ConfigError, match="fingerprint"):
            bare.save(tmp_path / "x.pymem")
        bare.close()
        save_prefix_cache(cache, tmp_path / "c.pymem")
        data = (tmp_path / "c.pymem").read_bytes()
        loaded = load_prefix_cache(data, fresh, fingerprint=_fp(model))
        assert _view(loaded) == _view(cache)
        with pytest.raises(ConfigError, match="fingerprint"):
            load_prefix_cache(data, fresh, fingerprint="")
        loaded.close()
        cache.close()


# --- refusals ----------------------------------------------------------------------------


def test_every_truncation_and_byte_flip_is_refused_without_change(engines, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    fp = _fp(model)
    with _memory(model) as mem, _memory(model) as fresh:
        cache = _build(mem, engines(model), model)
        cache.save(tmp_path / "c.pymem")
        good = (tmp_path / "c.pymem").read_bytes()
        other = _other_state(fresh)
        before, view = fresh.state_write(), _view(other)
        for k in range(len(good)):
            with pytest.raises(StateError):
                load_prefix_cache(good[:k], fresh, fingerprint=fp)
        bad = bytearray(good)
        for k in range(len(good)):
            bad[k] ^= 0x41
            with pytest.raises(StateError):
                load_prefix_cache(bad, fresh, fingerprint=fp)
            bad[k] ^= 0x41
        with pytest.raises(StateError, match="bytes after the checksum"):
            load_prefix_cache(good + b"\0", fresh, fingerprint=fp)
        assert fresh.state_write() == before and _view(other) == view
        # a sane file still loads after all that
        loaded = load_prefix_cache(good, fresh, fingerprint=fp)
        assert fresh.state_write() == mem.state_write()
        loaded.close()
        other.close()
        cache.close()


def _held(doc: dict[str, Any]) -> None:
    doc["prefix_cache"]["held"][0][1] += 1


def _blob_len(doc: dict[str, Any]) -> None:
    doc["prefix_cache"]["entries"][0]["blob_len"] += 4
    doc["prefix_cache"]["state_len"] -= 4


def _seq(doc: dict[str, Any]) -> None:
    doc["prefix_cache"]["held"][1][0] = 99


def _twice(doc: dict[str, Any]) -> None:
    doc["prefix_cache"]["entries"][4]["ref"] = 0  # R's 15 -> P's 16 tokens: P's 15 twice


def _sections(doc: dict[str, Any]) -> None:
    doc["prefix_cache"]["state_len"] += 4


@pytest.mark.parametrize(
    ("edit", "err", "match"),
    [
        (lambda d: d.pop("prefix_cache"), StateError, "prefix_cache' is missing"),
        (lambda d: d["prefix_cache"].update(version=2), StateError, "version 2"),
        (_held, StateError, "held"),
        (_seq, StateError, "seq_id 99"),
        (_blob_len, StateError, "state"),
        (_twice, StateError, "same prefix"),
        (_sections, StateError, "payload of"),
        (lambda d: d["prefix_cache"]["entries"][0].update(ref=7), StateError, "ref 7"),
        (lambda d: d["prefix_cache"]["entries"][2].update(n_tokens=99), StateError, "ref 0"),
        (lambda d: d["prefix_cache"]["entries"][0].update(tier="tape"), StateError, "tier"),
        (lambda d: d["prefix_cache"]["policy"].update(interval=-1), ConfigError, "interval"),
        (lambda d: d["prefix_cache"]["policy"].update(speed=1), StateError, "policy"),
        (lambda d: d.update(flags=1), StateError, "flags"),
    ],
    ids=[
        "no-index",
        "version",
        "held-len",
        "held-seq",
        "state-len",
        "same-prefix",
        "sections",
        "ref-seq",
        "ref-len",
        "tier",
        "policy-value",
        "policy-field",
        "flags",
    ],
)
def test_an_index_that_disagrees_under_a_valid_checksum_is_refused(
    edit: Any, err: type[Exception], match: str, engines, tmp_path: Path
) -> None:
    model = "tiny-jamba.gguf"
    with _memory(model) as mem, _memory(model) as fresh:
        cache = _build(mem, engines(model), model)
        cache.save(tmp_path / "c.pymem")
        bad = _repack((tmp_path / "c.pymem").read_bytes(), edit)
        other = _other_state(fresh)
        before, view = fresh.state_write(), _view(other)
        with pytest.raises(err, match=match):
            load_prefix_cache(bad, fresh, fingerprint=_fp(model))
        assert fresh.state_write() == before and _view(other) == view
        other.close()
        cache.close()


def test_foreign_and_other_layout_files_are_refused(engines, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    fp = _fp(model)
    with _memory(model) as mem, _memory(model, kv_unified=False) as streams, \
         _memory("tiny-lfm2-swa.gguf") as lfm:  # fmt: skip
        cache = _build(mem, engines(model), model)
        path = tmp_path / "c.pymem"
        cache.save(path)
        for target in (streams, lfm):
            before = target.state_write()
            with pytest.raises(StateError, match="memory"):
                load_prefix_cache(path, target, fingerprint=fp)
            assert target.state_write() == before
        with pytest.raises(StateError, match="foreign"):
            load_prefix_cache(path, mem, fingerprint=_fp("tiny-lfm2-swa.gguf"))
        # a plain whole-memory container is no saved cache
        write_container(tmp_path / "plain.pymem", mem, fingerprint=fp)
        with pytest.raises(StateError, match="prefix_cache"):
            load_prefix_cache(tmp_path / "plain.pymem", mem, fingerprint=fp)
        with pytest.raises(StateError, match="cannot read"):
            load_prefix_cache(tmp_path / "missing.pymem", mem, fingerprint=fp)
        cache.close()


# --- budgets and the disk tier --------------------------------------------------------------


def test_a_smaller_budget_at_load_evicts_in_the_cache_order(engines, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    with _memory(model) as mem, _memory(model) as fresh:
        cache = _build(mem, engines(model), model)
        cache.save(tmp_path / "c.pymem")
        size = cache.entries()[0].nbytes
        order = cache.eviction_order()
        loaded = PrefixCache.load(tmp_path / "c.pymem", fresh, fingerprint=_fp(model),
                                  budget_bytes=2 * size)  # fmt: skip
        assert loaded.bytes_ram <= 2 * size and loaded.peak_ram <= 2 * size
        kept = sorted(e.pos for e in loaded.entries())
        assert len(kept) == 2 and kept == sorted(order[-2:])
        assert fresh.state_write() == mem.state_write()
        loaded.close()
        cache.close()


def test_disk_tier_entries_are_copied_in_and_spilled_again(engines, tmp_path: Path) -> None:
    model = "tiny-lfm2-swa.gguf"
    engine = engines(model)
    fp = _fp(model)
    with _memory(model) as mem, _memory(model) as fresh, _memory(model) as scratch:
        cache = _build(mem, engine, model, budget_bytes=0, disk_dir=tmp_path / "a")
        assert {e.tier for e in cache.entries()} == {"disk"}
        cache.save(tmp_path / "c.pymem")
        view = _view(cache)
        cache.close()  # its spill folder is gone: the saved file stands alone
        # without a disk tier the disk entries are dropped; with one they are spilled again
        bare = load_prefix_cache(tmp_path / "c.pymem", scratch, fingerprint=fp)
        assert bare.entries() == []
        bare.close()
        loaded = load_prefix_cache(tmp_path / "c.pymem", fresh, fingerprint=fp,
                                   disk_dir=tmp_path / "b")  # fmt: skip
        got = _view(loaded)
        assert [e[:3] for e in got[0]] == [e[:3] for e in view[0]] and got[1:] == view[1:]
        assert loaded.bytes_disk <= loaded.disk_budget_bytes
        assert all(e.path and e.path.startswith(str(tmp_path / "b")) for e in loaded.entries())
        m = loaded.lookup(R, 2)
        assert (m.source, m.how, m.pos) == ("disk", "copy", 12)
        att = loaded.attach(2, R)
        assert att.refused == () and att.resume_from == 13
        loaded.close()


def test_a_damaged_spill_file_is_left_out_of_the_save(engines, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    fp = _fp(model)
    with _memory(model) as mem, _memory(model) as fresh:
        cache = _build(mem, engines(model), model, budget_bytes=0, disk_dir=tmp_path / "a")
        bad = next(e for e in cache.entries() if e.pos == 23)
        assert bad.path is not None
        Path(bad.path).write_bytes(Path(bad.path).read_bytes()[:-1])
        n_before = len(cache.entries())
        cache.save(tmp_path / "c.pymem")
        assert len(cache.entries()) == n_before  # the cache itself drops it at its next use
        loaded = load_prefix_cache(tmp_path / "c.pymem", fresh, fingerprint=fp,
                                   disk_dir=tmp_path / "b")  # fmt: skip
        assert sorted(e.pos for e in loaded.entries()) == [7, 12, 15, 15]
        loaded.close()
        cache.close()


@pytest.mark.parametrize(
    ("model", "unified"),
    [("tiny-lfm2-swa.gguf", True), ("tiny-lfm2-swa.gguf", False), ("tiny-gemma2.gguf", True),
     ("tiny-mamba.gguf", True)],
)  # fmt: skip
def test_saves_during_a_random_workload_restore_what_the_cache_knew(
    model: str, unified: bool, tmp_path: Path
) -> None:
    # bookkeeping only (ubatches applied without a model): a seeded program of prompts,
    # generations and drafts on 4 sequences, a RAM budget of 3 checkpoints and a disk
    # tier; every 8 steps the cache is saved and loaded into a second memory
    rng = np.random.default_rng(99)
    with _memory(model, n_ctx=2048, kv_unified=unified) as mem, \
         _memory(model, n_ctx=2048, kv_unified=unified) as fresh:  # fmt: skip
        budget = 3 * _checkpoint_size(mem)
        cache = PrefixCache(mem, policy=CheckpointPolicy(interval=16, n_batch=32),
                            budget_bytes=budget, disk_dir=tmp_path / "a", fingerprint="test")  # fmt: skip
        hist: dict[int, list[int]] = {}
        base = rng.integers(1, 60, 40).tolist()
        n_loads = 0
        for step in range(48):
            seq = int(rng.integers(0, 4))
            src = hist.get(int(rng.integers(0, 4)), base)
            keep = int(rng.integers(1, len(src) + 1))
            toks = src[:keep] + rng.integers(1, 60, int(rng.integers(1, 40))).tolist()
            toks = toks[:20] if len(toks) > 300 else toks
            _serve(cache, seq, toks, kind=("prompt", "generate", "draft")[int(rng.integers(0, 3))])
            hist[seq] = toks
            if step % 8 != 7:
                continue
            path = tmp_path / f"s{step}.pymem"
            cache.save(path)
            loaded = load_prefix_cache(path, fresh, fingerprint="test",
                                       disk_dir=tmp_path / f"b{step}")  # fmt: skip
            assert fresh.state_write() == mem.state_write()
            _check_tree(loaded)
            assert loaded.bytes_ram <= budget and loaded.bytes_ram == cache.bytes_ram
            got = [(e.pos, e.tier, e.nbytes, e.last_used, e.shared) for e in loaded.entries()]
            want = [(e.pos, e.tier, e.nbytes, e.last_used, e.shared) for e in cache.entries()]
            assert got == want and loaded.eviction_order() == cache.eviction_order()
            queries = [[*h[: int(rng.integers(1, len(h) + 1))], 61] for h in hist.values()]
            for q in [*hist.values(), *queries, base]:
                for s in (-1, 0, 1, 2, 3):
                    assert loaded.lookup(q, s) == cache.lookup(q, s), (step, s)
            loaded.close()
            n_loads += 1
        assert n_loads == 6 and cache.n_spilled > 0
        cache.close()
