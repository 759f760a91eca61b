"""Whole restores in few native calls: the parse checks the blob in one
(``pm_kv_read_whole_blob``: fixed records of one sequence id, or variable ones listing
the ids of a cell shared by several sequences; for tensors outside host memory
``pm_kv_records_fixed`` per stream), the commit clears and places every stream's cells in
one more (``pm_step_kv_refill``) and stores the bytes in a third. Pins that this leaves
exactly what the numpy clear + ``set_new`` reference leaves (into a cache whose cells
differ: a session loaded into another context), that blobs it cannot take (hostile
words) go to the general parse with its own errors, and that the kernels refuse without
changing anything."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, decode, make_kv
from test_kv_state_same import NAMES, _scenario, _state

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.errors import StateError
from pymem.kv import KVCache
from pymem.state import StateReader


def _count_native(monkeypatch) -> list[bool]:
    """Every answer of a native refill with records, in order (a clear refills none):
    KVCache._refill's (the two-phase restore's) or the whole reader's one-call commit."""
    seen: list[bool] = []
    real = KVCache._refill
    real_commit = state_io.SeqBlob.commit_whole

    def counted(self, records):
        done = real(self, records)
        if records is not None and any(w is not None for w in records):
            seen.append(done)
        return done

    def counted_commit(self, data, found):
        done = real_commit(self, data, found)
        if not found.same and (done or state_io.NATIVE_PLACE):
            seen.append(done)
        return done

    monkeypatch.setattr(KVCache, "_refill", counted)
    monkeypatch.setattr(state_io.SeqBlob, "commit_whole", counted_commit)
    return seen


@pytest.mark.parametrize("one_call", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_native_whole_placement_equals_numpy(monkeypatch, name: str, one_call: bool) -> None:
    """A donor's blob (and one with cells shared by two sequences, whose records hold two
    ids) read into twin caches, one through the native refill, one through clear +
    set_new: the same cells, counters, bounds, heads and bytes; the refill taken for
    both, except that the general parse (``one_call`` False, as for tensors outside host
    memory, with its per-stream records test) places variable records with numpy."""
    seen = _count_native(monkeypatch)
    if not one_call:
        monkeypatch.setattr(KVCache, "_whole_blob_plan", lambda self, reader, hooks: None)
        monkeypatch.setattr(KVCache, "_whole_reader", lambda self: None)
    shared_seen = 0
    for seed in range(6):
        donor = _scenario(name, seed + 100)
        shared = _scenario(name, seed + 200)
        shared.seq_cp(0, shared.n_seq_max - 1)  # shared cells: variable records
        for src, fixed in ((donor, True), (shared, False)):
            blob = bytes(src.state_write())
            native, ref = _scenario(name, seed), _scenario(name, seed)
            seen.clear()
            native.state_read(blob)
            took = list(seen)
            with monkeypatch.context() as m:
                m.setattr(state_io, "NATIVE_PLACE", False)
                ref.state_read(blob)
            assert _state(native) == _state(ref), (seed, fixed)
            assert bytes(native.state_write()) == blob
            check_invariants(native)
            # the refill wherever no cell is shared, and for shared ones on the one-call road
            # without ext (variable records with ext go to the general parse)
            has_shared = any(c.n_multi for c in src.v_cells)
            numpy_placed = has_shared and (not one_call or src.layout.n_ext > 0)
            assert took == ([] if numpy_placed else [True]), (seed, took)
            shared_seen += int(not fixed and has_shared)
    # the variable records were exercised (one stream per sequence: seq_cp copies cells)
    assert shared_seen >= 3 or donor.n_stream > 1


def _fixed_reference(words: np.ndarray, n_seq_max: int) -> int:
    """pm_kv_records_fixed's rule in numpy: the first record that is not [pos >= 0, 1,
    ext..., id in [0, n_seq_max)], -1 when none."""
    bad = (words[:, 1] != 1) | (words[:, 0] < 0) | (words[:, -1] < 0) | (words[:, -1] >= n_seq_max)
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else -1


def test_records_test_equals_reference_at_any_alignment() -> None:
    """Random record blocks, with and without ext, each with up to two faults of every
    kind, read from a buffer at every alignment: the kernel's first fault is numpy's.
    Every third block is long (the kernel passes chunks of 256 records at once and
    searches the first chunk with a fault)."""
    rng = np.random.default_rng(7)
    bad = ffi.new("int64_t *")
    for case in range(300):
        n_ext = 3 if case % 2 else 0
        rec = 3 + n_ext
        n = int(rng.integers(1, 40)) if case % 3 else int(rng.integers(200, 800))
        n_seq_max = int(rng.integers(1, 257))
        w = np.empty((n, rec), dtype=np.int32)
        w[:, 0] = rng.integers(0, 1000, n)
        w[:, 1] = 1
        w[:, 2:-1] = rng.integers(-5, 5, (n, n_ext))
        w[:, -1] = rng.integers(0, n_seq_max, n)
        for _ in range(int(rng.integers(0, 3))):
            i = int(rng.integers(0, n))
            kind = int(rng.integers(0, 4))
            if kind == 0:
                w[i, 1] = int(rng.choice([0, 2, -1]))
            elif kind == 1:
                w[i, 0] = -int(rng.integers(1, 5))
            elif kind == 2:
                w[i, -1] = n_seq_max + int(rng.integers(0, 3))
            else:
                w[i, -1] = -1
        shift = case % 4
        buf = bytearray(shift) + w.tobytes()
        view = np.frombuffer(bytes(buf), dtype="<i4", offset=shift, count=n * rec)
        check = lib.pm_kv_records_fixed(ffi.from_buffer("int32_t[]", view), n, rec, n_seq_max, bad)
        assert check == lib.PM_OK
        assert bad[0] == _fixed_reference(w, n_seq_max), case


def test_records_kernels_refuse_and_decline_without_change() -> None:
    """Bad arguments are refused; a record the refill cannot place (in any stream) is
    declined with nothing written."""
    bad = ffi.new("int64_t *")
    words = np.array([[0, 1, 0], [1, 1, 0]], dtype=np.int32)
    wp = ffi.from_buffer("int32_t[]", words)
    assert lib.pm_kv_records_fixed(ffi.NULL, 2, 3, 4, bad) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_fixed(wp, -1, 3, 4, bad) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_fixed(wp, 2, 2, 4, bad) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_fixed(wp, 2, 3, 0, bad) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_fixed(wp, 2, 3, 257, bad) == lib.PM_ERR_ARG

    kv = _scenario("f16-trans-streams", 3)
    c, _, _, placed = kv._native_cells()
    n_stream = kv.n_stream
    before = _state(kv)

    def refill(per_stream: list, counts: list, rec: int = 3, cells=c, n_seq_max: int = 3) -> int:
        ptrs = ffi.new("int32_t *[]", per_stream)
        return lib.pm_step_kv_refill(
            cells, ptrs, ffi.new("int64_t[]", counts), ffi.NULL, rec, n_seq_max, placed
        )

    ok = [wp] + [ffi.NULL] * (n_stream - 1)
    two = [2] + [0] * (n_stream - 1)
    assert refill(ok, [kv.layout.kv_size + 1] + [0] * (n_stream - 1)) == lib.PM_ERR_RANGE
    assert refill(ok, [-1] + [0] * (n_stream - 1)) == lib.PM_ERR_RANGE
    assert refill([ffi.NULL] * n_stream, two) == lib.PM_ERR_ARG  # cells without records
    assert refill(ok, two, rec=2) == lib.PM_ERR_ARG
    assert refill(ok, two, cells=ffi.NULL) == lib.PM_ERR_ARG
    assert refill(ok, two, n_seq_max=0) == lib.PM_ERR_ARG
    assert refill(ok, two, n_seq_max=257) == lib.PM_ERR_ARG
    hostiles = (
        [[0, 2, 0], [1, 1, 0]],
        [[0, 1, 0], [1, 1, 256]],
        [[-1, 1, 0], [1, 1, 0]],
        [[0, 1, 0], [1, 1, 3]],
    )  # fmt: skip  (the last: an id past n_seq_max 3)
    for hostile in hostiles:
        h = np.array(hostile, dtype=np.int32)
        # the bad records in the last stream: the first streams are not written either
        hp = ffi.from_buffer("int32_t[]", h)
        assert refill([wp] * (n_stream - 1) + [hp], [2] * n_stream) == lib.PM_OK
        assert placed[0] == 0, hostile
        assert _state(kv) == before
    assert refill(ok, two) == lib.PM_OK and placed[0] == 1
    assert _state(kv) != before


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("word, value", [(1, 3), (2, None)])  # n_seq_id 3; id n_seq_max
@pytest.mark.parametrize("one_call", [True, False])
def test_refill_refuses_a_blob_changed_after_its_parse(
    monkeypatch, one_call: bool, word: int, value: int | None, same: bool
) -> None:
    """A two-phase whole restore whose blob (a bytearray) gets a hostile record between
    parse and commit (an n_seq_id of 3, or an id past n_seq_max that the placement's
    own bound of 256 would take), into another cache's cells or into the very cells it
    holds: verify (a composite's last look) and commit refuse it, the cache as it was, on
    both parse roads."""
    if not one_call:
        monkeypatch.setattr(KVCache, "_whole_blob_plan", lambda self, reader, hooks: None)
    kv = _scenario("f32-notrans", 4)
    if same:
        kv.state_read(bytes(kv.state_write()))  # cells packed from 0: the blob's own
    blob = bytearray((kv if same else _scenario("f32-notrans", 5)).state_write())
    before = _state(kv)
    plan = kv.state_read_parse(StateReader(blob))
    assert isinstance(plan, state_io.WholeBlobPlan) == one_call
    at = 8 + 4 * word  # record 0's word
    blob[at : at + 4] = (kv.n_seq_max if value is None else value).to_bytes(4, "little")
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.verify()
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.commit()
    assert _state(kv) == before


@pytest.mark.parametrize("one_call", [True, False])
def test_a_valid_record_changed_after_the_parse_is_refused(monkeypatch, one_call: bool) -> None:
    """A whole blob that goes back into its own cells, whose first record gets another
    valid position after the parse: no longer the same cells, so verify and commit refuse
    it (a commit that only moved the heads would leave cells the blob does not hold)."""
    if not one_call:
        monkeypatch.setattr(KVCache, "_whole_blob_plan", lambda self, reader, hooks: None)
    kv = _scenario("f32-notrans", 4)
    kv.state_read(bytes(kv.state_write()))  # packed from 0: the blob's own cells
    blob = bytearray(kv.state_write())
    before = _state(kv)
    plan = kv.state_read_parse(StateReader(blob))
    pos0 = int.from_bytes(blob[8:12], "little")
    blob[8:12] = (pos0 + 1000).to_bytes(4, "little")
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.verify()
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.commit()
    assert _state(kv) == before


@pytest.mark.parametrize(
    "word, value, message",
    [(1, 2, "lists a sequence id twice"), (2, 9999, "invalid seq_id"), (0, -3, "< 0")],
)
def test_hostile_records_take_the_general_parse_and_change_nothing(
    word: int, value: int, message: str
) -> None:
    """A whole blob whose records the native test refuses is parsed by the general
    reader, which names the fault; the cache is left as it was."""
    kv = _scenario("f32-notrans", 1)
    donor = _scenario("f32-notrans", 2)
    blob = bytearray(donor.state_write())
    rec0 = 8  # u32 n_stream, u32 cell_count: the first record of stream 0
    if word == 1:  # n_seq_id 2 listing the same id twice
        blob[rec0 + 4 : rec0 + 8] = (2).to_bytes(4, "little")
        blob[rec0 + 12 : rec0 + 12] = blob[rec0 + 8 : rec0 + 12]
    else:
        blob[rec0 + 4 * (word if word == 0 else 2) : rec0 + 4 * (word if word == 0 else 2) + 4] = (
            value.to_bytes(4, "little", signed=True)
        )
    before = _state(kv)
    with pytest.raises(StateError, match=message):
        kv.state_read(bytes(blob))
    assert _state(kv) == before


def test_whole_blob_call_refuses_bad_arguments_and_declines_truncations() -> None:
    """pm_kv_read_whole_blob: a mode outside [0, 2] or a null pointer is refused; every
    truncation of a blob is declined (done 0, the general parse then names it) and a
    state_read of it raises StateError with the cache unchanged."""
    kv = _scenario("f16-trans", 6)
    donor = _scenario("f16-trans", 7)
    blob = bytes(donor.state_write())
    view = kv._seq_blob(0, 0, "t")._view
    counts = ffi.new("int64_t[]", kv.n_stream)
    offsets = ffi.new("int64_t[]", kv.n_stream)
    flags = ffi.new("int32_t[2]")
    consumed = ffi.new("int64_t *")
    src = ffi.from_buffer(blob)

    def call(data=src, n=None, mode=0, v=view) -> int:
        n = len(blob) if n is None else n
        return lib.pm_kv_read_whole_blob(
            v, data, n, mode, counts, offsets, flags, consumed, flags + 1
        )

    assert call(mode=3) == lib.PM_ERR_ARG
    assert call(mode=-1) == lib.PM_ERR_ARG
    assert call(data=ffi.NULL) == lib.PM_ERR_ARG
    assert call(v=ffi.NULL) == lib.PM_ERR_ARG
    assert call(n=-1) == lib.PM_ERR_ARG
    assert call() == lib.PM_OK and flags[1] == 1 and consumed[0] == len(blob)
    before = _state(kv)
    for cut in sorted({0, 3, 4, 7, 8, 20, len(blob) // 2, len(blob) - 1}):
        assert call(n=cut) == lib.PM_OK and flags[1] == 0, cut
        with pytest.raises(StateError, match="truncated"):
            kv.state_read(blob[:cut])
        assert _state(kv) == before, cut


def test_composite_verify_refuses_a_header_changed_after_the_parse() -> None:
    """The whole-blob plan's verify (a composite's last look before any part commits)
    re-reads the headers: a layer's type changed after the parse is refused."""
    kv = _scenario("f16-trans", 8)
    blob = bytearray(_scenario("f16-trans", 9).state_write())
    plan = kv.state_read_parse(StateReader(blob))
    assert isinstance(plan, state_io.WholeBlobPlan)
    plan.verify()
    n = int(plan.found.counts[0])
    at = 8 + 12 * n + 8  # n_stream, cell count, records, v_trans, n_layer: layer 0's type
    blob[at : at + 4] = (99).to_bytes(4, "little")
    before = _state(kv)
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.verify()
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.commit()
    assert _state(kv) == before


@pytest.mark.parametrize("name", NAMES)
def test_sized_whole_writer_equals_the_numpy_writer(monkeypatch, name: str) -> None:
    """``seq_writer(-1)`` (every stream sized, then one native call each: new blobs,
    reused buffers and sizes) gives the bytes of the numpy writer (``NATIVE_RUNS`` off),
    also for a cache with shared cells (their records list every id, from the bitsets)."""
    from state_files import check_seq_writer

    took, shared = [], []
    for seed in range(6):
        kv = _scenario(name, seed)
        if seed % 2:
            kv.seq_cp(0, kv.n_seq_max - 1)  # shared cells in a unified cache
        with monkeypatch.context() as m:
            m.setattr(state_io, "NATIVE_RUNS", False)
            want = bytes(kv.state_write())
        took.append(check_seq_writer(kv, -1))
        assert bytes(kv.state_write()) == want
        assert took[-1], seed  # (shared cells too: their records list every id)
        shared.append(any(c.n_multi for c in kv.v_cells))
    assert any(shared) or "streams" in name  # (across streams a seq_cp copies)


@pytest.mark.parametrize("fork", [True, False])
@pytest.mark.parametrize("past", [0, 1, 2])  # the id just past n_seq_max, and beyond
def test_whole_writer_takes_cells_of_ids_past_n_seq_max(monkeypatch, past: int, fork: bool) -> None:
    """A unified cache keeps ids up to 255 whatever its n_seq_max: cells a sequence at or
    past n_seq_max holds alone (a copy of sequence 0 whose source is then removed) list no
    id in a whole blob. The native writer (blocks of sixteen one-id cells told apart from
    such cells: ``pm_block_odd``; the ids counted in the selection's pass beside shared
    cells, after it without them) gives the numpy writer's bytes."""
    from state_files import check_seq_writer

    kv = make_kv(96, 3)
    at = [0, 0]
    for run in range(5):  # sequences 0 and 1 in runs of 8 (blocks of 16 cells hold both)
        q = run % 2
        assert decode(kv, [[1, at[q] + i, [q], False] for i in range(8)], n_ubatch=8).code == 0
        at[q] += 8
    assert decode(kv, [[1, at[0] + i, [0], False] for i in range(24)], n_ubatch=24).code == 0
    kv.seq_cp(0, kv.n_seq_max + past)  # the copy holds sequence 0's cells
    if fork:
        kv.seq_cp(1, 2)  # shared cells of ids below n_seq_max too
    kv.seq_rm(0, -1, -1)  # the copy's cells alone: owner n_seq_max + past
    owners = kv.v_cells[0].owner
    assert int(np.count_nonzero(owners == kv.n_seq_max + past)) == 48
    with monkeypatch.context() as m:
        m.setattr(state_io, "NATIVE_RUNS", False)
        want = bytes(kv.state_write())
    assert check_seq_writer(kv, -1)
    assert bytes(kv.state_write()) == want


@pytest.mark.parametrize("run", [1, 2, 3, 8, 12])
def test_whole_writer_tells_shared_cells_of_two_sets_apart(monkeypatch, run: int) -> None:
    """Every cell shared, by two sets of sequences ({0, 2} and {1, 3}) alternating in runs
    of ``run`` cells: a block of sixteen is one set only when all its cells are
    (``pm_block_one_set``, which compares four owners and two bitsets a step): the native
    whole writer gives the numpy writer's bytes."""
    from state_files import check_seq_writer

    kv = make_kv(96, 4)
    at = [0, 0]
    for k in range(64 // run):
        q = k % 2
        assert decode(kv, [[1, at[q] + i, [q], False] for i in range(run)], n_ubatch=run).code == 0
        at[q] += run
    kv.seq_cp(0, 2)
    kv.seq_cp(1, 3)
    assert (kv.v_cells[0].owner[: 64 // run * run] == -2).all()
    with monkeypatch.context() as m:
        m.setattr(state_io, "NATIVE_RUNS", False)
        want = bytes(kv.state_write())
    assert check_seq_writer(kv, -1)
    assert bytes(kv.state_write()) == want


@pytest.mark.parametrize("name", NAMES)
def test_native_clear_equals_reset(monkeypatch, name: str) -> None:
    """``clear`` empties every stream, its pending shifts and its head with one native
    call (``pm_step_kv_clear``): the cache it leaves (cells, counters, bounds, heads,
    n_multi, used_max_p1; with ``data`` the bytes) is the one ``StackedCells.reset``
    leaves, with shared cells, pending shifts and bitsets of one or two words, and it
    restores as before."""
    cleared: list[bool] = []
    real = KVCache._clear_native

    def counted(self):
        done = real(self)
        cleared.append(done)
        return done

    monkeypatch.setattr(KVCache, "_clear_native", counted)
    wide = "streams" not in name  # (70 sequences: 70 streams otherwise)
    for seed in range(6):
        for data in (False, True):
            n_seq = 70 if wide and seed >= 4 else 3  # ids past 63: two-word bitsets
            n_cells = 512 if n_seq == 70 else 64
            native, ref = (_scenario(name, seed, n_cells, n_seq) for _ in range(2))
            for kv in (native, ref):
                if seed % 2:
                    kv.seq_cp(0, n_seq - 1)  # shared cells (a copy across streams)
                if seed % 3 == 0 and kv.n_pos_per_embd == 1:
                    kv.seq_add(1, 0, -1, 2)  # a pending shift
            assert native.cells.n_words == (2 if n_seq == 70 else 1)
            used_before = [int(c.used) for c in native.v_cells]
            cleared.clear()
            native.clear(data)
            assert cleared == [True]  # the one native call emptied it
            with monkeypatch.context() as m:
                m.setattr(state_io, "NATIVE_PLACE", False)
                ref.clear(data)
            assert cleared == [True, False]  # (the reference's reset)
            assert _state(native) == _state(ref), (seed, data)
            st = native.cells
            assert st.n_multi.tolist() == [0] * native.n_stream
            assert st.used_max_p1.tolist() == [0] * native.n_stream
            assert not st.has_shift.any() and not st.shift.any() and not st.seq.any()
            assert list(native.v_heads) == [0] * native.n_stream
            assert any(used_before), seed
            check_invariants(native)
            blob = bytes(ref.state_write())
            native.state_read(blob)
            assert bytes(native.state_write()) == blob


def test_native_clear_refuses_bad_views() -> None:
    """``pm_step_kv_clear`` names a view it cannot clear (null pointers, bitsets of no or
    five words) with PM_ERR_ARG and writes nothing."""
    kv = make_kv(16, 2)
    decode(kv, [[1, 0, [0], False], [2, 1, [0], False]], n_ubatch=2)
    c = kv.cells.native()
    before = _state(kv)
    assert lib.pm_step_kv_clear(ffi.NULL, ffi.NULL) == lib.PM_ERR_ARG
    for n_words in (0, 5):
        saved, c.n_words = c.n_words, n_words
        assert lib.pm_step_kv_clear(c, ffi.NULL) == lib.PM_ERR_ARG
        c.n_words = saved
    saved, c.pos = c.pos, ffi.NULL
    assert lib.pm_step_kv_clear(c, ffi.NULL) == lib.PM_ERR_ARG
    c.pos = saved
    assert _state(kv) == before
    assert lib.pm_step_kv_clear(c, ffi.NULL) == lib.PM_OK  # (heads NULL: left as they are)
    assert int(kv.cells.used[0]) == 0 and kv.v_heads[0] != 0


def test_a_record_at_position_minus_one_never_matches_an_empty_cell() -> None:
    """The same-cells test (native and numpy) requires positions >= 0: a whole blob whose
    record says position -1, id -1 where the cache has an empty cell inside its first n
    (found by review) goes to the general parse, which refuses it; nothing changes."""
    from test_kv_state_same import NAMES as _  # noqa: F401 (the scenarios' module)

    from pymem.kv.cells import OWNER_NONE

    kv = _scenario("f32-notrans", 2)
    kv.state_read(bytes(kv.state_write()))  # packed from 0
    n = int(kv.v_cells[0].used)
    blob = bytearray(kv.state_write())
    # empty cell 1 and move its sequence's record to a cell past n - 1: used stays n
    q, p = int(kv.v_cells[0].owner[1]), int(kv.v_cells[0].pos[1])
    kv.seq_rm(q, p, p + 1)
    # one more token of that sequence past cell n - 1: used is n again, cell 1 empty
    kv.v_heads[0] = n
    decode(kv, [[1, kv.seq_pos_max(q) + 1, [q], False]], n_ubatch=1)
    assert kv.v_cells[0].owner[1] == OWNER_NONE and int(kv.v_cells[0].used) == n
    rec = 8 + 12 * 1  # record 1: pos, n_seq_id, id
    blob[rec : rec + 4] = (-1).to_bytes(4, "little", signed=True)
    blob[rec + 8 : rec + 12] = (-1).to_bytes(4, "little", signed=True)
    words = np.frombuffer(bytes(blob), "<i4", count=3 * n, offset=8).reshape(n, 3)
    assert not state_io.whole_same_reference(
        kv.v_cells[0], words[:, 0], np.zeros((n, 0), np.int32), words[:, 2:]
    )
    before = _state(kv)
    with pytest.raises(StateError):
        kv.state_read(bytes(blob))
    assert _state(kv) == before


def test_the_sized_whole_writer_refuses_a_cache_changed_since_its_sizing() -> None:
    """``seq_writer(-1)`` sizes every stream first; a change before the fill is refused
    (the size no longer holds), nothing written."""
    kv = _scenario("f16-trans", 5)
    sized = kv.seq_writer(-1, 0)
    assert sized is not None
    size, fill = sized
    kv.seq_rm(0, -1, -1)
    out = bytearray(b"\xee" * size)
    with pytest.raises(StateError, match="changed between sizing and writing"):
        fill(memoryview(out))
    assert out == bytearray(b"\xee" * size)


@pytest.mark.parametrize("one_call", [True, False])
def test_a_declined_refill_leaves_the_placement_to_set_new(monkeypatch, one_call: bool) -> None:
    """A refill that declines (as under an undo journal) leaves the cells to the numpy
    clear + set_new on both parse roads: the cache ends as the native refill leaves it,
    and a journal around the restore makes the real refill decline too."""
    if not one_call:
        monkeypatch.setattr(KVCache, "_whole_blob_plan", lambda self, reader, hooks: None)
        monkeypatch.setattr(KVCache, "_whole_reader", lambda self: None)
    real = KVCache._refill
    declined: list[int] = []

    def decline(self, records):
        if records is not None and any(w is not None for w in records):
            declined.append(1)
            return False
        return real(self, records)

    for seed in range(4):
        blob = bytes(_scenario("f16-trans-streams", seed + 100).state_write())
        native = _scenario("f16-trans-streams", seed)
        fallback = _scenario("f16-trans-streams", seed)
        native.state_read(blob)
        with monkeypatch.context() as m:
            m.setattr(KVCache, "_refill", decline)
            # (the whole reader's one-call commit declines too: its plan's refill runs)
            m.setattr(state_io.SeqBlob, "commit_whole", lambda self, data, found: False)
            fallback.state_read(blob)
        assert _state(native) == _state(fallback), seed
        check_invariants(fallback)
    assert len(declined) == 4
    journaled = _scenario("f16-trans", 1)
    with journaled._planning():
        assert journaled._refill([np.zeros((1, 3), dtype=np.int32)]) is False


@pytest.mark.parametrize("name", ["f16-trans-streams", "f32-notrans"])
def test_refill_into_empty_cells_checks_as_it_writes_and_undoes_a_refusal(name: str) -> None:
    """Into a stack whose every stream is empty the refill checks each record as it writes
    it (one pass); a bad record, in any stream at any place, empties the cells written so
    far and puts the bounds back (raw, dirty flags included): nothing changed."""
    kv = _scenario(name, 3)
    kv.clear(False)
    st = kv.cells
    st.pdirty[:, 5] = 3  # raw bound state a refusal must put back as it was
    st.pmin[:, 5], st.pmax[:, 5] = 17, 19
    c, _, _, placed = kv._native_cells()
    n_stream, size = kv.n_stream, kv.layout.kv_size
    names = ("pos", "shift", "seq", "owner", "used", "used_max_p1", "used_max_dirty", "n_multi",
             "pmin", "pmax", "pdirty")  # fmt: skip

    def raw() -> list[np.ndarray]:
        return [getattr(st, name).copy() for name in names]

    before = raw()
    n = min(size, 40)

    def good(s: int) -> np.ndarray:  # (one stream per sequence: stream s holds s alone)
        ids = np.arange(n) % 3 if n_stream == 1 else np.full(n, s)
        return np.stack([np.arange(n), np.ones(n), ids], axis=1).astype(np.int32)

    keep = []

    def refill(per_stream: list[np.ndarray]) -> int:
        keep[:] = [ffi.from_buffer("int32_t[]", w) for w in per_stream]
        ptrs = ffi.new("int32_t *[]", keep)
        counts = ffi.new("int64_t[]", [len(w) for w in per_stream])
        return lib.pm_step_kv_refill(c, ptrs, counts, ffi.NULL, 3, kv.n_seq_max, placed)

    for bad_stream in range(n_stream):
        for at in (0, n // 2, n - 1):
            for word, value in ((0, -1), (1, 2), (2, 3)):
                words = [good(s) for s in range(n_stream)]
                words[bad_stream][at, word] = value
                assert refill(words) == lib.PM_OK and placed[0] == 0
                for a, b in zip(raw(), before):
                    np.testing.assert_array_equal(a, b)
    assert refill([good(s) for s in range(n_stream)]) == lib.PM_OK and placed[0] == 1
    assert st.used.tolist() == [n] * n_stream
    np.testing.assert_array_equal(st.pos[:, :n], np.broadcast_to(np.arange(n), (n_stream, n)))
    np.testing.assert_array_equal(st.owner[:, n:], -1)
    assert not st.seq[:, n:].any() and (st.pdirty == 0).all()
    check_invariants(kv)


@pytest.mark.parametrize("into", ["empty", "filled"])
def test_refill_bounds_take_every_record_of_a_run(into: str) -> None:
    """A sequence's records in cell order need not ascend (cells 0-7 shifted to 100-107,
    cells 8-15 at 8-15): the refill's bounds take every record of a run, both into an
    empty stack (the one-pass road, four records a step) and into a filled one."""
    kv = make_kv(64, 2)
    decode(kv, [[1, p, [0], False] for p in range(16)])
    kv.seq_add(0, 0, 8, 100)
    blob = bytes(kv.state_write())
    dest = make_kv(64, 2)
    if into == "filled":
        decode(dest, [[1, p, [1], False] for p in range(20)])
    dest.state_read(blob)
    assert (dest.seq_pos_min(0), dest.seq_pos_max(0)) == (8, 107)
    assert dest.seq_pos_max(1) == -1
    check_invariants(dest)


@pytest.mark.parametrize("donor_seed", [9, 4])
@pytest.mark.parametrize("bad", ["first K", "last V"])
def test_a_whole_commit_declines_a_tensor_it_cannot_store_before_any_change(
    bad: str, donor_seed: int
) -> None:
    """A view whose tensor is not in host memory (its buffer gone, as a device tensor's
    host view would be): the whole commit checks every tensor the store and the zeroing
    write before its refill, so it declines (``done`` 0) with the cells, heads, bounds and
    bytes as they were. Before, the refill ran first and the store's refusal came after
    it (PM_ERR_RANGE on a changed cache)."""
    kv = _scenario("f16-trans", 3, n_cells=48)
    blob = bytes(_scenario("f16-trans", donor_seed, n_cells=48).state_write())
    view = kv._blob_view()
    assert view is not None
    counts = np.zeros(kv.n_stream, np.int64)
    offsets = np.zeros(kv.n_stream, np.int64)
    same = ffi.new("int32_t *")
    consumed = ffi.new("int64_t *")
    done = ffi.new("int32_t *")
    counts_c = ffi.from_buffer("int64_t[]", counts, require_writable=True)
    offsets_c = ffi.from_buffer("int64_t[]", offsets, require_writable=True)
    status = lib.pm_kv_read_whole_blob(
        view._view, blob, len(blob), 0, counts_c, offsets_c, same, consumed, done
    )
    assert status == lib.PM_OK and done[0] == 1 and not same[0]
    copy = ffi.new("pm_kv_seq_blob *")
    ffi.memmove(copy, view._view, ffi.sizeof("pm_kv_seq_blob"))
    n = 2 * len(kv.layers)
    tensors = ffi.new("struct ggml_tensor *[]", [view._view.tensors[i] for i in range(n)])
    k = 0 if bad == "first K" else n - 1
    fake = ffi.new("struct ggml_tensor *")
    ffi.memmove(fake, tensors[k], ffi.sizeof("struct ggml_tensor"))
    fake.buffer = ffi.NULL
    tensors[k] = fake
    copy.tensors = tensors
    before = _state(kv)
    cells = kv._native_cells()[0]
    status = lib.pm_kv_read_whole_commit(
        copy, cells, blob, len(blob), counts_c, offsets_c, same[0], lib.PM_RECORDS_PARSED, done
    )
    assert status == lib.PM_OK and done[0] == 0
    assert _state(kv) == before
    # the real view commits the same blob
    status = lib.pm_kv_read_whole_commit(
        view._view,
        cells,
        blob,
        len(blob),
        counts_c,
        offsets_c,
        same[0],
        lib.PM_RECORDS_PARSED,
        done,
    )
    assert status == lib.PM_OK and done[0] == 1
    kv._whole_committed()
    assert _state(kv) != before
    check_invariants(kv)
    kv.close()
