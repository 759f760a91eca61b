"""A sliding-window cache's per-sequence restore is placed at commit, unsimulated, when its
empty cells after the seq_rm prove that the sequence fits (``state_io.SWA_DEFERRED``);
otherwise (too few empty cells, masked ones may still take it; shared cells) it is
simulated under an undo journal at parse and redone at commit. Pins the two equal on
random iSWA memories (every window type, small caches full of masked cells, own, other
and foreign sequences' blobs): the same cells, heads, bounds and bytes after every
restore, the same refusals, and both roads taken."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants
from test_iswa import decode, iswa_spec, randomize
from test_kv_state_same import _state

import pymem.kv.state_io as state_io
from pymem.errors import StateError
from pymem.kv import KVCache
from pymem.spec import SWAType


def _memory(seed: int, swa_type: SWAType, n_swa: int, kv_size: int) -> KVCache:
    """A sliding-window cache of ``kv_size`` cells holding 3 sequences decoded in random
    chunks (small sizes fill it with masked cells), some cut, bytes random."""
    rng = np.random.default_rng(seed)
    spec = iswa_spec("SS", n_swa=n_swa, swa_type=swa_type)
    kv = KVCache(spec, kv_size=kv_size, n_swa=n_swa, swa_type=swa_type, type_k="f16",
                 type_v="f16", v_trans=bool(seed % 2), unified=True, n_seq_max=3)  # fmt: skip
    pos = [0, 0, 0]
    for _ in range(int(rng.integers(3, 12))):
        items = []
        for s in range(3):
            for _ in range(int(rng.integers(0, 6))):
                items.append([1 + s, pos[s], [s], False])
                pos[s] += 1
        if items and decode(kv, items, n_ubatch=8) != 0:
            break
    if rng.random() < 0.5:
        s = int(rng.integers(0, 3))
        kv.seq_rm(s, max(0, pos[s] - 2), -1)
    randomize(kv, seed)
    return kv


def _planned(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per sliding-window placement (the numpy one, the one native call, or the
    one-call read), whether it ran under the parse's journal."""
    seen: list[bool] = []
    real = KVCache._place_restored

    def place(self: KVCache, seq_id: int, ub: object) -> object:
        if self.layout.swa_type != SWAType.NONE:
            seen.append(self.cells.journaling)
        return real(self, seq_id, ub)  # type: ignore[arg-type]

    monkeypatch.setattr(KVCache, "_place_restored", place)
    real_seq = KVCache._place_seq_native

    def place_seq(self: KVCache, seq_id: int, pos: object) -> object:
        done = real_seq(self, seq_id, pos)  # type: ignore[arg-type]
        if done is not None and self.layout.swa_type != SWAType.NONE:
            seen.append(self.cells.journaling)  # (the one native call: no _place_restored)
        return done

    monkeypatch.setattr(KVCache, "_place_seq_native", place_seq)
    real_placed = state_io.SeqBlob._placed

    def placed(self: state_io.SeqBlob, *args: object) -> object:
        done = real_placed(self, *args)  # type: ignore[arg-type]
        if done is not None and self._swa is not None:
            seen.append(False)  # (the one-call read: never under a journal)
        return done

    monkeypatch.setattr(state_io.SeqBlob, "_placed", placed)
    return seen


def test_deferred_sliding_window_restore_equals_the_simulated_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simulated = _planned(monkeypatch)
    roads = {"deferred": 0, "simulated": 0}
    cases = [(swa_type, kv_size, seed)
             for swa_type in (SWAType.STANDARD, SWAType.CHUNKED, SWAType.SYMMETRIC)
             for kv_size in (16, 24, 48) for seed in range(8)]  # fmt: skip
    for swa_type, kv_size, seed in cases:
        n_swa = 2 + seed % 4
        fast = _memory(seed, swa_type, n_swa, kv_size)
        slow = _memory(seed, swa_type, n_swa, kv_size)
        donor = _memory(seed + 50, swa_type, n_swa, kv_size)
        blobs = [bytes(fast.state_write(s)) for s in range(3)]
        blobs += [bytes(donor.state_write(s)) for s in range(3)]
        for i, blob in enumerate(blobs):
            s = (i + seed) % 3
            if i % 2:
                # the sequence gone first, its cells taken by another one's next tokens: only
                # the few empty cells left, or masked ones, can take it
                t = (s + 1) % 3
                for kv in (fast, slow):
                    kv.seq_rm(s, -1, -1)
                    p0 = kv.seq_pos_max(t) + 1
                    decode(kv, [[1, p0 + j, [t], False] for j in range(6)], n_ubatch=8)
            refused = []
            for kv, deferred in ((fast, True), (slow, False)):
                monkeypatch.setattr(state_io, "SWA_DEFERRED", deferred)
                simulated.clear()
                try:
                    kv.state_read(blob, s)
                    refused.append(False)
                except StateError:
                    refused.append(True)
                if deferred and simulated:
                    roads["simulated" if simulated[0] else "deferred"] += 1
            assert refused[0] == refused[1], (swa_type, kv_size, seed, i)
            assert _state(fast) == _state(slow), (swa_type, kv_size, seed, i)
        check_invariants(fast)
        for kv in (fast, slow, donor):
            kv.close()
    # both roads taken by the deferring cache: placed at commit where the empty cells
    # sufficed, simulated where only masked cells could take the sequence
    assert roads["deferred"] and roads["simulated"], roads


def test_a_restore_keeps_the_decode_steps_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    # the restore's synthetic ubatch is frozen so that its placement takes the native
    # paths; the step memo that builds must not evict the decode steps' one
    seen = _planned(monkeypatch)
    # the frozen-ubatch road (where the one-call placement declines) builds the memo
    monkeypatch.setattr(KVCache, "_place_seq_native", lambda self, seq_id, pos: None)
    monkeypatch.setattr(state_io.SeqBlob, "_placed", lambda self, *args: None)
    kv = _memory(3, SWAType.STANDARD, 3, 48)
    step_memo = kv._memo
    assert step_memo is not None, "decode left no step memo to keep"
    blob = bytes(kv.state_write(1))
    kv.seq_rm(1, -1, -1)
    kv.state_read(blob, 1)
    assert seen == [False], "the restore was not placed at commit"
    assert kv._memo is step_memo
    assert bytes(kv.state_write(1)) == blob


def test_shared_cells_restore_the_same_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # cells held by two sequences (a seq_cp): a shared cell the seq_rm leaves to the other
    # sequence is not free, and the window's search never takes it. The one native call
    # (its seq_rm takes the bits out, its purge handles shared cells) ends exactly where
    # the always-simulating cache does
    _planned(monkeypatch)
    real = state_io.SeqBlob._placed
    roads: list[bool] = []  # per one-call read: whether it took the blob

    def placed(self, *args):  # type: ignore[no-untyped-def]
        done = real(self, *args)
        roads.append(done is not None)
        return done

    monkeypatch.setattr(state_io.SeqBlob, "_placed", placed)
    for seed in range(6):
        fast = _memory(seed, SWAType.STANDARD, 3, 48)
        slow = _memory(seed, SWAType.STANDARD, 3, 48)
        for kv in (fast, slow):
            kv.seq_cp(0, 2, -1, -1)  # sequence 2 now shares sequence 0's cells
        assert fast.cells.n_multi.sum() > 0 or fast.seq_pos_max(0) < 0
        blob = bytes(fast.state_write(2))
        for kv, deferred in ((fast, True), (slow, False)):
            monkeypatch.setattr(state_io, "SWA_DEFERRED", deferred)
            n_roads = len(roads)
            kv.state_read(blob, 2)
            assert len(roads) == n_roads + deferred  # (not deferred: the simulated restore)
        assert _state(fast) == _state(slow), seed
        check_invariants(fast)
        for kv in (fast, slow):
            kv.close()
    assert roads == [True] * 6


@pytest.mark.parametrize("swa_type", [SWAType.NONE, SWAType.STANDARD])
def test_native_and_numpy_restore_placements_agree(
    monkeypatch: pytest.MonkeyPatch, swa_type: SWAType
) -> None:
    # a restore is placed through the native paths (a frozen ubatch; without a window
    # one call, pm_step_kv_restore_seq); the numpy paths are the reference: both must
    # leave the same cache
    placed_natively = []
    real = KVCache._place_native

    def counting(self: KVCache, *args: object, **kw: object) -> bool:
        done = real(self, *args, **kw)  # type: ignore[arg-type]
        placed_natively.append(done)
        return done

    monkeypatch.setattr(KVCache, "_place_native", counting)
    real_seq = KVCache._place_seq_native

    def counting_seq(self: KVCache, *args: object) -> object:
        done = real_seq(self, *args)  # type: ignore[arg-type]
        placed_natively.append(done is not None)  # (no window: one call places it all)
        return done

    monkeypatch.setattr(KVCache, "_place_seq_native", counting_seq)
    real_swap_in = state_io.SeqBlob._placed

    def counting_swap_in(self: state_io.SeqBlob, *args: object) -> object:
        done = real_swap_in(self, *args)  # type: ignore[arg-type]
        if done is not None:
            placed_natively.append(True)  # (no window: a swap-in in one call)
        return done

    monkeypatch.setattr(state_io.SeqBlob, "_placed", counting_swap_in)

    def run(native: bool) -> tuple:
        monkeypatch.setattr(state_io, "NATIVE_PLACE", native)
        placed_natively.clear()
        kv = _memory(5, swa_type if swa_type != SWAType.NONE else SWAType.STANDARD, 4, 48)
        if swa_type == SWAType.NONE:  # the same decode history, no window
            kv.close()
            spec = iswa_spec("AA")
            kv = KVCache(spec, kv_size=48, type_k="f16", type_v="f16", v_trans=True,
                         unified=True, n_seq_max=3)  # fmt: skip
            decode(kv, [[1 + s, p, [s], False] for p in range(9) for s in range(3)], n_ubatch=8)
            randomize(kv, 5)
        blobs = [bytes(kv.state_write(s)) for s in range(3)]
        placed_natively.clear()  # (the decodes' own placements: replayed prompts place natively)
        for s in (1, 0, 2):
            kv.seq_rm(s, -1, -1)
            kv.state_read(blobs[s], s)
        out = _state(kv)
        kv.close()
        # the road asked for is the one taken: native placements only when frozen
        assert any(placed_natively) == native, (native, placed_natively)
        return out

    assert run(False) == run(True)
