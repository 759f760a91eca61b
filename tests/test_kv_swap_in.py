"""A sequence that holds no cell read back from its blob (a swap-in) takes one native call
(``pm_kv_read_seq_placed``: parse, placement, store) where no ext applies. Pins it to the two-phase restore it replaces (``PlacedSeqPlan``: the same parse,
placement and store in three calls) and through it to the numpy placement: the same
cells, heads, bounds, bytes and messages, and nothing changed wherever it declines."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from kv_helpers import check_invariants, decode
from test_kv_state_same import NAMES, _scenario, _state

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.errors import StateError
from pymem.kv import KVCache


@contextmanager
def _one_call(monkeypatch: pytest.MonkeyPatch, on: bool, taken: list[int]) -> Iterator[None]:
    """The one-call swap-in on (each one taken counted in ``taken``) or off (the
    two-phase restore places every swap-in)."""
    real = state_io.SeqBlob._placed

    def swap_in(self, *args):  # type: ignore[no-untyped-def]
        done = real(self, *args) if on else None
        if done is not None:
            taken.append(1)
        return done

    with monkeypatch.context() as m:
        m.setattr(state_io.SeqBlob, "_placed", swap_in)
        yield


def _read(kv: KVCache, data: object, seq_id: int) -> int | str:
    try:
        return kv.state_read(data, seq_id)  # type: ignore[arg-type]
    except StateError as exc:
        return str(exc)


@pytest.mark.parametrize("name", NAMES)
def test_one_call_swap_in_equals_the_two_phase_restore(monkeypatch, name: str) -> None:
    """Every sequence swapped out and back in (its own blob, then another sequence's),
    from random heads over caches with holes and pending shifts: twins on either road end
    equal after every step. The one call is taken for every layout without ext."""
    taken: list[int] = []
    for seed in range(8):
        twins = [_scenario(name, seed, n_cells=48) for _ in range(2)]
        blobs = {s: bytes(twins[0].state_write(s)) for s in range(3)}
        rng = np.random.default_rng(seed)
        order = rng.permutation(3).tolist()
        steps = [(s, s) for s in order] + [(order[0], order[1]), (order[2], order[0])]
        for src, dst in steps:
            outcomes = []
            head = int(rng.integers(0, 49))
            for kv, on in zip(twins, (True, False)):
                kv.seq_rm(dst, -1, -1)
                kv.v_heads[int(kv.seq_to_stream[dst])] = head
                with _one_call(monkeypatch, on, taken):
                    outcomes.append(_read(kv, blobs[src], dst))
            assert outcomes[0] == outcomes[1], (seed, src, dst)
            assert _state(twins[0]) == _state(twins[1]), (seed, src, dst)
            check_invariants(twins[0])
        for s in range(3):
            assert twins[0].state_write(s) == twins[1].state_write(s)
        for kv in twins:
            kv.close()
    if name == "mrope-ext":
        assert not taken  # ext: the two-phase restore writes it
    else:
        assert len(taken) >= 24, len(taken)


def test_a_swap_in_larger_than_the_free_cells_is_refused_by_name(monkeypatch) -> None:
    """Too few empty cells: the one call declines having changed nothing, and the general
    parse names the count, as with the one call off."""
    messages, states = [], []
    for on in (True, False):
        kv = _scenario("f16-trans", 3, n_cells=48)
        blob = bytes(kv.state_write(0))
        kv.seq_rm(0, -1, -1)
        p0 = kv.seq_pos_max(2) + 1
        free = kv.layout.kv_size - int(kv.v_cells[0].used)
        assert decode(kv, [[1, p0 + i, [2], False] for i in range(free - 1)]).code == 0
        before = _state(kv)
        with _one_call(monkeypatch, on, []):
            messages.append(_read(kv, blob, 0))
        assert _state(kv) == before
        states.append(before)
    assert messages[0] == messages[1]
    assert "failed to find" in str(messages[0]), messages[0]


def _corrupt(blob: bytes, at: int, value: int) -> bytes:
    b = bytearray(blob)
    b[at : at + 4] = int(value).to_bytes(4, "little", signed=True)
    return bytes(b)


def test_hostile_swap_in_blobs_change_nothing_and_get_the_general_message(monkeypatch) -> None:
    """Random words of the counts, records and headers set to hostile values, and
    truncations, read into a swapped-out sequence: both roads give the same answer and
    leave equal caches; a refused blob leaves the cache as it was."""
    rng = np.random.default_rng(23)
    hostile = [0, 1, 2, 3, -1, -2, 2**31 - 1, 48, 49, 256]
    refused = 0
    for seed in range(4):
        name = ("f16-trans", "q8_0-notrans", "f16-trans-streams", "f32-notrans")[seed]
        blob = bytes(_scenario(name, seed, n_cells=48).state_write(1))
        n_words = min(len(blob) // 4, 64)
        for trial in range(30):
            if trial % 6 == 5:
                data = blob[: int(rng.integers(0, len(blob)))]
            else:
                w = int(rng.integers(0, n_words))
                data = _corrupt(blob, 4 * w, int(rng.choice(hostile)))
            outcomes, states = [], []
            for on in (True, False):
                kv = _scenario(name, seed, n_cells=48)
                kv.seq_rm(1, -1, -1)
                before = _state(kv)
                with _one_call(monkeypatch, on, []):
                    outcomes.append(_read(kv, data, 1))
                states.append(_state(kv))
                if isinstance(outcomes[-1], str):
                    assert states[-1] == before, (seed, trial)
                kv.close()
            assert outcomes[0] == outcomes[1], (seed, trial)
            assert states[0] == states[1], (seed, trial)
            refused += isinstance(outcomes[0], str)
    assert refused >= 40, refused


def test_blob_buffers_of_every_kind_and_trailing_bytes(monkeypatch) -> None:
    """bytes, a bytearray with bytes after the blob, a numpy array and a memoryview: the
    one call takes each, consumes the blob alone and leaves what the two-phase one does."""
    base = _scenario("f16-trans-streams", 4, n_cells=48)
    blob = bytes(base.state_write(2))
    for data in (blob, bytearray(blob + b"\x07" * 11), np.frombuffer(blob, np.uint8),
                 memoryview(blob)):  # fmt: skip
        outs, states, taken = [], [], []
        for on in (True, False):
            kv = _scenario("f16-trans-streams", 4, n_cells=48)
            kv.seq_rm(2, -1, -1)
            with _one_call(monkeypatch, on, taken):
                outs.append(kv.state_read(data, 2))
            states.append(_state(kv))
            kv.close()
        assert outs == [len(blob), len(blob)]
        assert states[0] == states[1]
        assert taken == [1], type(data)


def test_no_one_call_swap_in_under_a_journal_or_with_native_placement_off(monkeypatch) -> None:
    """An undo journal (a planning context) or ``NATIVE_PLACE`` off: the one call is not
    made and nothing changes (the restore's numpy placement, which journals, runs)."""
    kv = _scenario("f16-trans", 2, n_cells=48)
    blob = bytes(kv.state_write(1))
    kv.seq_rm(1, -1, -1)
    view = kv._blob_view()
    assert view is not None
    before = _state(kv)
    with kv._planning():
        assert view._placed(blob, 1, 0, False) is None
    assert _state(kv) == before
    monkeypatch.setattr(state_io, "NATIVE_PLACE", False)
    assert view._placed(blob, 1, 0, False) is None
    assert _state(kv) == before
    monkeypatch.setattr(state_io, "NATIVE_PLACE", True)
    assert view._placed(blob, 1, 0, False) == len(blob)
    assert kv.seq_pos_max(1) >= 0


def _window_cache(seed: int, unified: bool) -> KVCache:
    """A 24-cell sliding-window cache (n_swa 4) of 3 sequences decoded in random chunks, as
    test_kv_swa_restore's; one stream per sequence unless ``unified``."""
    from test_iswa import decode as iswa_decode
    from test_iswa import iswa_spec, randomize

    from pymem.spec import SWAType

    rng = np.random.default_rng(seed)
    kv = KVCache(iswa_spec("SS", n_swa=4), kv_size=24, n_swa=4, swa_type=SWAType.STANDARD,
                 type_k="f16", type_v="f16", v_trans=True, unified=unified, n_seq_max=3)  # fmt: skip
    pos = [0, 0, 0]
    for _ in range(6):
        items = [
            [1 + s, pos[s] + j, [s], False]
            for s in range(3)
            for j in range(int(rng.integers(1, 4)))
        ]
        for s in range(3):
            pos[s] += sum(1 for it in items if it[2] == [s])
        assert iswa_decode(kv, items, n_ubatch=8) == 0
    randomize(kv, seed)
    return kv


def test_not_offered_with_ext_and_a_window_read_in_one_call(monkeypatch) -> None:
    """An ext layout's blob view has no one-call placement (Python writes the ext words).
    A sliding-window cache's read, swapped in or over the sequence's own cells, unified or
    one stream per sequence, is one call (its placement may overwrite and purge masked
    cells of the stream, in C too) and leaves what the numpy placement leaves, with other
    sequences' cached bounds stale too (the call recomputes them first: the search reads
    them). Beside cells shared by other sequences (1's oldest two copied to 2) it is one
    call too, its purge taking the losers' bits out of shared cells, and so is a read of
    a sequence that shares its cells itself (seq_cp 0 -> 2: its seq_rm takes only its
    bits out of them)."""
    from pymem.kv.cells import STALE_MAX

    kv = _scenario("mrope-ext", 1, n_cells=48)
    view = kv._blob_view()
    assert view is not None and view._step is None
    kv.close()
    cases = [(swap, stale, unified, "") for swap in (True, False) for stale in (False, True)
             for unified in (True, False)]  # fmt: skip
    cases += [(True, False, True, "beside"), (False, True, True, "beside"),
              (False, False, True, "inside")]  # fmt: skip
    unshared = 0  # shared cells a read turned into cells of one sequence or emptied
    for swap, stale, unified, shared in cases:
        states = []
        taken: list[int] = []
        for native in (True, False):
            swa = _window_cache(1, unified)
            blob = bytes(swa.state_write(0))
            if swap:
                swa.seq_rm(0, -1, -1)
            if shared:  # beside: 1's two oldest cells shared (its later ones masked alone)
                src = 1 if shared == "beside" else 0
                p0 = swa.seq_pos_min(src)
                swa.seq_rm(2, -1, -1)
                swa.seq_cp(src, 2, p0, p0 + 2 if shared == "beside" else -1)
                assert swa.cells.n_multi.any()
            strm = int(swa.seq_to_stream[0])
            mates = [
                q for q in range(3) if swa.seq_to_stream[q] == strm and swa.seq_pos_max(q) >= 0
            ]
            if stale:  # every sequence of the stream (a refresh finds the same bounds)
                swa.cells.pdirty[strm, mates] |= STALE_MAX
            view = swa._blob_view()
            assert view is not None
            n_multi = int(swa.cells.n_multi.sum())
            with monkeypatch.context() as m:
                m.setattr(state_io, "NATIVE_PLACE", native)
                with _one_call(monkeypatch, native, taken):
                    assert swa.state_read(blob, 0) == len(blob)
            if native and stale:
                assert not (swa.cells.pdirty[strm, mates] & STALE_MAX).any()
            if native and shared == "beside":
                unshared += n_multi - int(swa.cells.n_multi.sum())
            states.append(_state(swa))
            check_invariants(swa)
            swa.close()
        case = (swap, stale, unified, shared)
        assert states[0] == states[1], case
        assert taken == [1], case
    assert unshared > 0  # the purges reached shared cells


def test_the_kernel_refuses_bad_arguments_and_declines_without_change() -> None:
    """Null pointers and a seq_id outside the view are refused; scratch smaller than the
    blob's cells, or a blob whose cells exceed the empty ones, is declined with nothing
    changed."""
    kv = _scenario("f16-trans", 5, n_cells=48)
    blob = bytes(kv.state_write(0))
    assert kv.seq_pos_max(0) - kv.seq_pos_min(0) >= 2  # (cells enough for cap 1 to fail)
    kv.seq_rm(0, -1, -1)
    view = kv._blob_view()
    cells = kv._native_cells()[0]
    pos = np.empty(48, np.int32)
    idx = np.empty(48, np.int32)
    consumed = ffi.new("int64_t *")
    done = ffi.new("int32_t *")

    def call(c=cells, seq_id=0, data=blob, cap=48, out=consumed) -> int:
        return lib.pm_kv_read_seq_placed(
            view._view, c, seq_id, 0, 0, 0, data, len(data), ffi.from_buffer("int32_t[]", pos),
            cap, ffi.from_buffer("int32_t[]", idx), cap, out, done,
        )  # fmt: skip

    before = _state(kv)
    assert call(c=ffi.NULL) == lib.PM_ERR_ARG
    assert call(out=ffi.NULL) == lib.PM_ERR_ARG
    assert call(seq_id=view.n_seq) == lib.PM_ERR_ARG
    assert call(seq_id=-1) == lib.PM_ERR_ARG
    assert call(cap=1) == lib.PM_OK and done[0] == 0
    assert _state(kv) == before
    assert call() == lib.PM_OK and done[0] == 1 and consumed[0] == len(blob)
    assert kv.seq_pos_max(0) >= 0


@pytest.mark.parametrize("road", ["one call", "reader"])
def test_a_hybrid_swap_in_takes_the_one_call_for_its_attention_part(monkeypatch, road: str) -> None:
    """A hybrid memory's one-sequence read of a swapped-out sequence: in the composite's
    one native call (``pm_seq_read``), or, that turned off, through the readers, whose
    attention store (after every part's check) is the one-call swap-in; the memory ends
    as with the one-call swap-in off (the placed plan's commit)."""
    from test_seq_reader import _memory, _snapshot

    from pymem.composite import CompositeMemory

    taken: list[int] = []
    states = []
    for on in (True, False):
        mem = _memory("hybrid", 4)
        blob = bytes(mem.state_write(1))
        mem.seq_rm(1, -1, -1)
        with monkeypatch.context() as m:
            if road == "reader" or not on:
                m.setattr(CompositeMemory, "_native_read", lambda self, data, seq_id, flags: None)
            else:
                real = CompositeMemory._native_read

                def one(self, data, seq_id, flags, real=real):  # type: ignore[no-untyped-def]
                    done = real(self, data, seq_id, flags)
                    taken.append(int(done is not None))
                    return done

                m.setattr(CompositeMemory, "_native_read", one)
            with _one_call(monkeypatch, on and road == "reader", taken):
                assert mem.state_read(blob, 1) == len(blob)
        states.append(_snapshot(mem))
        mem.close()
    assert taken == [1]
    assert states[0] == states[1]


def test_a_held_placed_plan_commits_a_swap_in_in_one_call(monkeypatch) -> None:
    """The two-phase road (``state_read_parse`` then ``commit``) of a swapped-out sequence:
    the placed plan's commit is the one call, and it leaves what the plan's own placement
    and store leave."""
    from pymem.state import StateReader

    taken: list[int] = []
    states = []
    for on in (True, False):
        kv = _scenario("f16-trans-streams", 6, n_cells=48)
        blob = bytes(kv.state_write(1))
        kv.seq_rm(1, -1, -1)
        plan = kv.state_read_parse(StateReader(blob), 1)
        assert isinstance(plan, state_io.PlacedSeqPlan)
        with _one_call(monkeypatch, on, taken):
            plan.commit()
        states.append(_state(kv))
        check_invariants(kv)
        kv.close()
    assert taken == [1]
    assert states[0] == states[1]
