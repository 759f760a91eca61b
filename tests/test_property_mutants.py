"""The property harness has teeth: small bugs injected into pymem are caught.

Each mutant (a monkeypatched, deliberately wrong pymem behaviour) must make the seeded
random programs of tests/test_property.py fail with a Mismatch within a small budget.
A harness that compared too little would let these through.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import spec.harness as spec_harness
from spec.gen import PyRnd, random_config, random_step
from spec.harness import Config, Mismatch, Pair

import pymem.recurrent.memory as pm_recurrent
import pymem.reuse.planner as pm_planner
from pymem.errors import StateError
from pymem.hybrid import HybridMemory
from pymem.kv import KVCache, KVCacheContext
from pymem.kv.iswa import KVCacheISWA
from pymem.memory import StateFlags
from pymem.reuse import PrefixCache, layout_of, trimmed_parts
from pymem.state import StateReader


def _finds_mismatch(
    kind: str, programs: int, tweak: Callable[[Config], Config] | None = None
) -> bool:
    for seed in range(programs):
        r = PyRnd(random.Random(f"mutant-{kind}-{seed}"))
        cfg = random_config(kind, r)
        if tweak is not None:
            cfg = tweak(cfg)
        pair = Pair(cfg, check_seq_states=4)
        try:
            for _ in range(40):
                random_step(pair, r)
        except Mismatch:
            return True
        finally:
            pair.close()
    return False


def test_unmutated_programs_pass() -> None:
    assert not _finds_mismatch("kv", 4)


def test_catches_slot_search_ignoring_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    orig = KVCache.find_slot

    def from_zero(self, ubatch, cont=False):
        heads = list(self.v_heads)
        self.v_heads[:] = [0] * len(heads)  # search as if every head were at 0
        try:
            return orig(self, ubatch, cont)
        finally:
            self.v_heads[:] = heads

    monkeypatch.setattr(KVCache, "find_slot", from_zero)
    assert _finds_mismatch("kv", 20)


def test_catches_rollback_bound_off_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # memory.seq_rm calls seq_rm_cells by the name memory.py imported: patch that name
    orig = pm_recurrent.seq_rm_cells

    def lenient(c, n_seq_max, n_rs_seq, seq_id, p0, p1):
        return orig(c, n_seq_max, n_rs_seq + 1 if n_rs_seq else 0, seq_id, p0, p1)

    monkeypatch.setattr(pm_recurrent, "seq_rm_cells", lenient)

    def with_rollback(cfg: Config) -> Config:
        import dataclasses

        return dataclasses.replace(cfg, n_rs_seq=2, n_ubatch=max(cfg.n_ubatch, 8))

    # (the programs spend some steps on the prefix cache: 115 programs to the first catch)
    assert _finds_mismatch("recurrent", 160, with_rollback)


def test_catches_inexact_rollbacks_reported_as_done(monkeypatch: pytest.MonkeyPatch) -> None:
    # pymem refuses a rollback the last ubatch's snapshot planes cannot serve (the
    # reference's silent stale-plane restore); a memory that forgets how far its planes
    # reach must be caught
    orig = pm_recurrent.find_slot

    def forgetful(c, req):
        ok = orig(c, req)
        c.n_last[:] = 255
        return ok

    monkeypatch.setattr(pm_recurrent, "find_slot", forgetful)

    def with_rollback(cfg: Config) -> Config:
        import dataclasses

        return dataclasses.replace(cfg, n_rs_seq=2)

    assert _finds_mismatch("recurrent", 40, with_rollback)


def test_catches_iswa_positions_from_the_base_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KVCacheISWA, "seq_pos_min", lambda self, s: self.kv_base.seq_pos_min(s))
    assert _finds_mismatch("iswa", 20)


def test_catches_hybrid_pos_max_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        HybridMemory,
        "seq_pos_max",
        lambda self, s: max(self.mem_attn.seq_pos_max(s), self.mem_recr.seq_pos_max(s)),
    )
    assert _finds_mismatch("hybrid", 20)


def test_catches_a_wrong_k_row_index(monkeypatch: pytest.MonkeyPatch) -> None:
    orig = KVCacheContext.get_k_idxs

    def shifted(self):
        out = orig(self).copy()
        if out.size > 1:
            out[[0, -1]] = out[[-1, 0]]  # two tokens' rows swapped
        return out

    monkeypatch.setattr(KVCacheContext, "get_k_idxs", shifted)
    assert _finds_mismatch("kv", 10)


# --- checkpoints and rollback plans (pymem.reuse against tests/spec/reuse.py) ---------


def _programs_to_mismatch(kind: str, programs: int) -> int | None:
    """The number of seeded programs run until the first Mismatch (None: none found)."""
    for seed in range(programs):
        r = PyRnd(random.Random(f"mutant-reuse-{kind}-{seed}"))
        pair = Pair(random_config(kind, r), check_seq_states=4)
        try:
            for _ in range(40):
                random_step(pair, r)
        except Mismatch:
            return seed + 1
        finally:
            pair.close()
    return None


def test_catches_a_plan_that_ignores_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # a trim that drops what the sliding window of the next token still needs looks
    # exact to a planner that forgets the window check
    monkeypatch.setattr(pm_planner, "_window_holds", lambda mem, seq_id, pos: "")
    assert _programs_to_mismatch("iswa", 30) is not None


def test_catches_a_restore_that_skips_the_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    # the checkpoint's recurrent / window state comes back, but the full-attention cells
    # after its position stay: the sequence is inconsistent (and its pos_max wrong)
    def untrimmed(mem, seq_id, ckpt):
        if ckpt.layout != layout_of(mem):
            raise StateError("the checkpoint was taken on another layout")
        for part in trimmed_parts(mem):
            if part.seq_pos_max(seq_id) < ckpt.pos:
                raise StateError("full-attention cells end before the checkpoint")
        plan = mem.state_read_parse(StateReader(ckpt.blob), seq_id, StateFlags.PARTIAL_ONLY)
        plan.commit()
        return ckpt.pos + 1

    monkeypatch.setattr(spec_harness, "restore_checkpoint", untrimmed)
    monkeypatch.setattr(pm_planner, "restore_checkpoint", untrimmed)
    assert _programs_to_mismatch("hybrid", 30) is not None


# --- the prefix cache (pymem.reuse.PrefixCache against tests/spec/prefix.py) ----------


def test_catches_an_eviction_of_the_most_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # the budget still holds, but the victim is the entry just used: the stored entries
    # and the eviction order part from the contract's least shared, least recently used
    def admit(self: PrefixCache, e) -> None:
        if e.nbytes > self.budget_bytes:
            self._evict(e)
            return
        while self.bytes_ram + e.nbytes > self.budget_bytes:
            self._evict(max(self._ram, key=lambda x: x.last_used))
        self._ram[e] = None
        self.bytes_ram += e.nbytes

    monkeypatch.setattr(PrefixCache, "_admit", admit)
    assert _programs_to_mismatch("recurrent", 30) is not None


def test_catches_an_attach_that_copies_a_rolled_back_sequence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # regression C3's bug put back: a recurrent sequence with a pending snapshot rollback
    # is copied whole; the copy continues from the state before the rollback, which
    # holds_exactly (the state must be the fold of the request's tokens) catches
    monkeypatch.setattr(PrefixCache, "_rollback_pending", lambda self, seq_id: False)

    def with_rollback(cfg: Config) -> Config:
        import dataclasses

        return dataclasses.replace(cfg, n_rs_seq=2, n_ubatch=max(cfg.n_ubatch, 8))

    assert _finds_mismatch("recurrent", 60, with_rollback)


def test_catches_an_attach_that_ignores_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # a sequence copied up to L whose sliding window no longer holds what a token at L
    # attends to: the attached sequence misses window cells
    monkeypatch.setattr(PrefixCache, "_window_ok", lambda self, src, length, parts=None: True)
    assert _programs_to_mismatch("iswa", 40) is not None
