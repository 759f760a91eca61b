"""A per-sequence restore that must place the sequence (a swap-in after its seq_rm, a
blob read into another sequence or into cells that changed, any sliding-window restore)
is parsed in one native call and stored in one more (``pm_kv_read_seq_place``,
``state_io.PlacedSeqPlan``), the placement between them ``hooks.place_seq``. Pins it to
the general two-phase restore (``NATIVE_RUNS`` off: numpy parse, numpy payload store) on
random caches (V layouts, quantised rows, streams, M-RoPE ext, every window type): the
same cells, heads, bounds and bytes after every restore, the same refusals, nothing
changed by a refused one; and the kernel's own refusals."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, decode
from test_kv_state_same import NAMES, _scenario, _state
from test_kv_swa_restore import _memory

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.errors import StateError
from pymem.kv import KVCache
from pymem.spec import SWAType


def _count_plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the placed plans the restores build and the swap-ins done in one call (the
    native roads taken)."""
    made: list[int] = []
    real = state_io.PlacedSeqPlan.__init__
    real_swap_in = state_io.SeqBlob._placed

    def init(self, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        made.append(1)
        real(self, *args, **kw)

    def swap_in(self, *args):  # type: ignore[no-untyped-def]
        done = real_swap_in(self, *args)
        if done is not None:
            made.append(1)
        return done

    monkeypatch.setattr(state_io.PlacedSeqPlan, "__init__", init)
    monkeypatch.setattr(state_io.SeqBlob, "_placed", swap_in)
    return made


def _restore(monkeypatch: pytest.MonkeyPatch, kv: KVCache, blob: bytes, dst: int, native: bool):
    """``kv.state_read(blob, dst)`` on the native roads or the general one: the bytes
    consumed, or the StateError's message."""
    with monkeypatch.context() as m:
        m.setattr(state_io, "NATIVE_RUNS", native)
        try:
            return kv.state_read(blob, dst)
        except StateError as exc:
            return str(exc)


def _walk(monkeypatch, native: KVCache, ref: KVCache, rng, swap_in: bool = True) -> None:
    """Every sequence swapped out and back in (its own blob), then blobs read into other
    sequences: the twins end equal after every step."""
    n_seq = native.n_seq_max
    blobs = {s: bytes(native.state_write(s)) for s in range(n_seq)}
    order = rng.permutation(n_seq).tolist()
    steps = [(s, s, swap_in) for s in order]
    steps += [(order[0], order[-1], False), (order[-1], order[0], True)]
    for src, dst, swap in steps:
        if swap:
            native.seq_rm(dst, -1, -1)
            ref.seq_rm(dst, -1, -1)
        got = _restore(monkeypatch, native, blobs[src], dst, True)
        want = _restore(monkeypatch, ref, blobs[src], dst, False)
        assert got == want, (src, dst)
        assert _state(native) == _state(ref), (src, dst)
        check_invariants(native)
    for s in range(n_seq):
        assert native.state_write(s) == ref.state_write(s)


@pytest.mark.parametrize("name", NAMES)
def test_placed_restore_equals_the_general_restore(monkeypatch, name: str) -> None:
    made = _count_plans(monkeypatch)
    for seed in range(8):
        _walk(
            monkeypatch,
            _scenario(name, seed, n_cells=48),
            _scenario(name, seed, n_cells=48),
            np.random.default_rng(seed),
        )
    assert len(made) >= 20, len(made)


@pytest.mark.parametrize("swa_type", [SWAType.STANDARD, SWAType.CHUNKED, SWAType.SYMMETRIC])
def test_placed_sliding_window_restore_equals_the_general_restore(monkeypatch, swa_type) -> None:
    """Small caches full of masked cells: the placement overwrites some of them, or the
    free cells do not suffice (the general road simulates those: both roads end equal)."""
    made = _count_plans(monkeypatch)
    for seed in range(12):
        size = (12, 24, 40)[seed % 3]
        native = _memory(seed, swa_type, 4, size)
        ref = _memory(seed, swa_type, 4, size)
        _walk(monkeypatch, native, ref, np.random.default_rng(seed), swap_in=seed % 2 == 0)
    assert len(made) >= 20, len(made)


def test_placed_restore_with_too_few_cells_is_refused_by_name(monkeypatch) -> None:
    """A blob larger than the stream's free cells (none here: another sequence took them
    all): the general parse names the count, nothing changes, the message the general
    restore gives."""
    messages = []
    for native in (True, False):
        kv = _scenario("f16-trans", 3, n_cells=48)
        blob = bytes(kv.state_write(0))
        kv.seq_rm(1, -1, -1)
        free = kv.layout.kv_size - kv.v_cells[0].used
        p0 = kv.seq_pos_max(2) + 1
        res = decode(kv, [[1, p0 + i, [2], False] for i in range(free)])
        assert res.code == 0, res
        assert kv.v_cells[0].used == kv.layout.kv_size
        before = _state(kv)
        messages.append(_restore(monkeypatch, kv, blob, 1, native))
        assert _state(kv) == before
    assert messages[0] == messages[1]
    assert "failed to find" in messages[0] and "has 0 free" in messages[0]


def _corrupt(blob: bytes, at: int, value: int) -> bytes:
    b = bytearray(blob)
    b[at : at + 4] = int(value).to_bytes(4, "little", signed=True)
    return bytes(b)


def test_hostile_blobs_are_refused_as_the_general_restore_refuses_them(monkeypatch) -> None:
    """A bad n_seq_id, a negative position, a wrong header, a truncation, a second stream
    with cells: the one call declines, the general parse names the fault, nothing
    changes; the same message as with the native roads off."""
    base = _scenario("f16-trans-streams", 5, n_cells=48)
    blob = bytes(base.state_write(1))
    n_stream = int.from_bytes(blob[:4], "little")
    strm = next(s for s in range(n_stream) if int.from_bytes(blob[4 + 4 * s : 8 + 4 * s], "little"))
    at = 4 + 4 * strm + 4  # the first record
    n = int.from_bytes(blob[at - 4 : at], "little")
    meta_end = at + 12 * n
    bad = {
        "n_seq_id": _corrupt(blob, at + 4, 2),
        "position": _corrupt(blob, at + 12 * (n - 1), -3),
        "v_trans": _corrupt(blob, meta_end, 7),
        "n_layer": _corrupt(blob, meta_end + 4, 99),
        "k_type": _corrupt(blob, meta_end + 8, 5),
        "truncated": blob[:-9],
        "second stream": blob[:-4] + (1).to_bytes(4, "little") if strm < n_stream - 1 else None,
    }
    for what, data in bad.items():
        if data is None:
            continue
        messages = []
        for native in (True, False):
            kv = _scenario("f16-trans-streams", 5, n_cells=48)
            kv.seq_rm(2, -1, -1)
            before = _state(kv)
            messages.append(_restore(monkeypatch, kv, data, 2, native))
            if what != "second stream":
                assert _state(kv) == before, what
        assert messages[0] == messages[1], what
        if what != "second stream":
            assert isinstance(messages[0], str), what


def test_a_held_plan_refuses_a_blob_changed_after_its_parse() -> None:
    """A plan a caller holds checks the blob again at commit: a position changed since
    is refused with nothing changed; unchanged, it commits as state_read would."""
    kv = _scenario("f32-notrans", 1, n_cells=48)
    twin = _scenario("f32-notrans", 1, n_cells=48)
    data = bytearray(kv.state_write(0))
    kv.seq_rm(0, -1, -1)
    twin.seq_rm(0, -1, -1)
    from pymem.state import StateReader

    plan = kv.state_read_parse(StateReader(memoryview(data)), 0)
    assert isinstance(plan, state_io.PlacedSeqPlan)
    n_stream = int.from_bytes(data[:4], "little")
    strm = next(s for s in range(n_stream) if int.from_bytes(data[4 + 4 * s : 8 + 4 * s], "little"))
    at = 4 + 4 * strm + 4
    saved = bytes(data[at : at + 4])
    data[at : at + 4] = (-1).to_bytes(4, "little", signed=True)
    before = _state(kv)
    with pytest.raises(StateError, match="changed"):
        plan.commit()
    assert _state(kv) == before
    data[at : at + 4] = saved
    plan.commit()
    twin.state_read(bytes(data), 0)
    assert _state(kv) == _state(twin)


def test_a_plan_whose_positions_another_parse_took_reads_them_again() -> None:
    """Two held plans of one cache share its scratch of positions: the first commits
    with its own (read again), the second is then stale and refused."""
    kv = _scenario("f16-trans", 4, n_cells=48)
    twin = _scenario("f16-trans", 4, n_cells=48)
    blobs = [bytes(kv.state_write(s)) for s in (0, 1)]
    for c in (kv, twin):
        c.seq_rm(0, -1, -1)
        c.seq_rm(1, -1, -1)
    from pymem.state import StateReader

    first = kv.state_read_parse(StateReader(blobs[0]), 0)
    second = kv.state_read_parse(StateReader(blobs[1]), 1)
    assert isinstance(first, state_io.PlacedSeqPlan)
    assert isinstance(second, state_io.PlacedSeqPlan)
    first.commit()
    twin.state_read(blobs[0], 0)
    assert _state(kv) == _state(twin)
    with pytest.raises(StateError):
        second.commit()
    assert _state(kv) == _state(twin)


def test_placed_store_refuses_runs_that_do_not_hold_the_cells() -> None:
    """The kernel: bad arguments are refused; runs whose cells do not add up to the
    blob's count, or reach past the stream, are declined with no byte stored; a
    parse's positions are the records'."""
    kv = _scenario("f16-trans", 6, n_cells=48)
    blob = bytes(kv.state_write(0))
    seq_blob = kv._seq_blob(0, 0, "test")
    assert seq_blob is not None
    found = seq_blob.read_place(blob, 0, token := object())
    assert found is not None
    pos = seq_blob.placed_positions(0, token, found.n)
    words = np.frombuffer(blob, np.int32, found.n * 3, found.records_at).reshape(found.n, 3)
    assert pos is not None and pos.tolist() == words[:, 0].tolist()
    assert found.consumed == len(blob)
    empty = kv.layout.kv_size - kv.v_cells[0].used
    held = int(np.count_nonzero(kv.v_cells[0].owner == 0))
    assert found.free == (empty if empty >= found.n else empty + held)
    before = _state(kv)
    n = found.n
    for starts, ends in (
        ([0], [n - 1]),
        ([0], [n + 1]),
        ([kv.layout.kv_size - n + 1], [kv.layout.kv_size + 1]),
        ([3, 0], [3, n]),
    ):
        ok = seq_blob.store_placed(blob, 0, (np.array(starts), np.array(ends)))
        assert not ok, (starts, ends)
    empty = np.zeros(0, dtype=np.int64)  # (no runs would ask the C call for a parse)
    assert not seq_blob.store_placed(blob, 0, (empty, empty))
    assert _state(kv) == before
    src = ffi.from_buffer(blob)
    out = ffi.new("int64_t[4]")
    done = ffi.new("int32_t *")
    view = seq_blob._view

    def parse(view, seq_id: int, n_runs: int = 0) -> int:
        return lib.pm_kv_read_seq_place(
            view, seq_id, src, len(blob), ffi.NULL, 0, ffi.NULL, ffi.NULL, n_runs, out, done
        )

    assert parse(ffi.NULL, 0) == lib.PM_ERR_ARG
    assert parse(view, seq_blob.n_seq) == lib.PM_ERR_ARG
    assert parse(view, -1) == lib.PM_ERR_ARG
    assert parse(view, 0, n_runs=-1) == lib.PM_ERR_ARG
    assert parse(view, 0, n_runs=1) == lib.PM_ERR_ARG  # runs without arrays
    # positions into too small a buffer: declined
    small = np.empty(max(0, found.n - 1), dtype=np.int32)
    st = lib.pm_kv_read_seq_place(
        view, 0, src, len(blob), ffi.from_buffer("int32_t[]", small, require_writable=True), small.size,
        ffi.NULL, ffi.NULL, 0, out, done,
    )  # fmt: skip
    assert st == lib.PM_OK and done[0] == 0
    assert _state(kv) == before


@pytest.mark.parametrize("name", ["f16-trans", "q8_0-notrans", "f16-trans-streams", "mrope-ext"])
def test_mutated_blobs_take_either_road_to_one_outcome(monkeypatch, name: str) -> None:
    """Random words of a blob's records and headers set to small or hostile values, and
    random truncations: the native roads and the general one answer alike (the bytes
    consumed or the same message) and leave equal caches."""
    made = _count_plans(monkeypatch)
    rng = np.random.default_rng(17)
    hostile = [0, 1, 2, 3, -1, -2, 2**31 - 1, 48, 49, 256]
    for seed in range(6):
        blob = bytes(_scenario(name, seed, n_cells=48).state_write(seed % 3))
        n_meta_words = min(len(blob) // 4, 64)  # the counts, records and first headers
        for trial in range(25):
            data = bytearray(blob)
            if trial % 5 == 4:
                data = data[: int(rng.integers(0, len(blob)))]
            else:
                for _ in range(int(rng.integers(1, 3))):
                    w = int(rng.integers(0, n_meta_words))
                    data[4 * w : 4 * w + 4] = int(rng.choice(hostile)).to_bytes(
                        4, "little", signed=True
                    )
            outcomes, states = [], []
            for native in (True, False):
                kv = _scenario(name, seed, n_cells=48)
                dst = (seed + trial) % 3
                if trial % 2:
                    kv.seq_rm(dst, -1, -1)
                outcomes.append(_restore(monkeypatch, kv, bytes(data), dst, native))
                states.append(_state(kv))
            assert outcomes[0] == outcomes[1], (seed, trial)
            assert states[0] == states[1], (seed, trial)
    assert made, "no mutated blob took the placed road"


def test_under_an_undo_journal_a_reset_is_undone_and_no_native_placement_runs() -> None:
    """The journal guards: a reset inside a planning context (an undo journal) is undone
    on exit, and the native placement declines there, before any seq_rm (the numpy
    placement, which journals, takes it)."""
    kv = _scenario("f16-trans", 2, n_cells=48)
    before = _state(kv)
    with kv._planning():
        kv.cells.reset()
        assert kv.v_cells[0].used == 0
    assert _state(kv) == before
    with kv._planning():
        held = kv.seq_pos_max(0)
        assert kv._place_seq_native(0, np.arange(3, dtype=np.int32)) is None
        assert kv.seq_pos_max(0) == held
    assert _state(kv) == before
