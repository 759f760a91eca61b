"""The one-call per-sequence blob paths (``state_io.SeqBlob``: ``pm_kv_write_seq_blob`` and
``pm_kv_read_seq_blob``) against the general writer and the two-phase restore: the same
sizes, bytes and restores for every layout and buffer kind; what they decline goes to the
general path, which keeps its errors."""

from __future__ import annotations

import numpy as np
import pytest
from test_kv_state import CFGS, build, randomize
from test_kv_state_paths import _interleaved
from test_kv_state_section import _fragmented

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.errors import ClosedError, RangeError, StateError
from pymem.spec import SWAType

LAYOUTS = list(CFGS)


def _general(kv, m) -> None:
    """Send kv through the general writer and restore (no whole-sequence one-call path)."""
    m.setattr(kv, "_seq_blob", lambda *a: None)


@pytest.mark.parametrize("name", LAYOUTS)
def test_size_write_and_buffer_kinds_equal_the_general_writer(monkeypatch, name: str) -> None:
    kv = _fragmented(name, 5)
    calls = []
    real_size, real_write = state_io.SeqBlob.size, state_io.SeqBlob.write
    monkeypatch.setattr(state_io.SeqBlob, "size", lambda *a: calls.append("size") or real_size(*a))
    monkeypatch.setattr(
        state_io.SeqBlob, "write", lambda *a, **k: calls.append("write") or real_write(*a, **k)
    )
    for seq_id in range(3):
        with monkeypatch.context() as m:
            _general(kv, m)
            want = bytes(kv.state_write(seq_id))
            want_size = kv.state_size(seq_id)
        calls.clear()
        assert kv.state_size(seq_id) == want_size == len(want)
        assert bytes(kv.state_write(seq_id)) == want
        assert calls == ["size", "size", "write"]  # one call each, the write reusing the search
        # any writable contiguous buffer, its size counted in bytes
        words = np.full(len(want) // 4 + 2, -1, dtype=np.int32)
        assert kv.state_write_buffer(words, seq_id) == len(want)
        assert words.tobytes()[: len(want)] == want
        assert words.tobytes()[len(want) :] == b"\xff" * (len(words) * 4 - len(want))
        view = memoryview(bytearray(len(want) + 9))
        assert kv.state_write_buffer(view[3:], seq_id) == len(want)
        assert bytes(view[3 : 3 + len(want)]) == want
        # a numpy integer id takes the general path, with the same bytes
        assert bytes(kv.state_write(np.int64(seq_id))) == want
    # what is no buffer at all is the general path's to refuse
    with pytest.raises(TypeError):
        kv.state_write_buffer([0] * 64, 0)


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans-streams"])
def test_reuse_searches_again_unless_the_scratch_holds_that_sequence(name: str) -> None:
    kv = _fragmented(name, 6)
    blob = state_io.seq_blob(kv.layout, kv.v_cells, kv.v_heads, kv._native_section())
    assert blob is not None
    out = bytearray(1 << 16)
    want = {s: bytes(kv.state_write(s)) for s in (0, 1)}
    # no search yet in this view, or the scratch holds another sequence's runs: searched
    assert blob.write(out, 0, "test", reuse=True) == len(want[0])
    assert bytes(out[: len(want[0])]) == want[0]
    assert blob.size(1) == len(want[1])
    assert blob.write(out, 0, "test", reuse=True) == len(want[0])  # not seq 1's runs
    assert bytes(out[: len(want[0])]) == want[0]
    for seq_id in (1, 0):
        size = blob.size(seq_id)
        assert size is not None
        assert blob.write(out, seq_id, "test", reuse=True) == size
        assert bytes(out[:size]) == want[seq_id]


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans"])
def test_a_parse_between_sizing_and_filling_does_not_leave_stale_runs(name: str) -> None:
    # a one-call read check fills the stream's run scratch with another sequence's runs:
    # the sized writer's fill must search again (it raised, or wrote sequence 1's runs)
    from pymem.state import StateReader

    kv = _fragmented(name, 6)
    want, blob1 = bytes(kv.state_write(0)), bytes(kv.state_write(1))
    one = kv.seq_writer(0, 0)  # sized: sequence 0's runs in the scratch
    assert one is not None
    size, fill = one
    kv.state_read_parse(StateReader(blob1), 1)  # its native check searches sequence 1
    out = bytearray(size)
    assert fill(memoryview(out)) == size and bytes(out) == want


def test_sized_writer_refuses_a_cache_changed_after_sizing() -> None:
    kv = _fragmented("f16-trans", 6)
    one = kv.seq_writer(1, 0)
    assert one is not None
    size, fill = one
    kv.seq_rm(1, 0, 2)  # the size no longer holds
    with pytest.raises(StateError, match="changed between sizing and writing"):
        fill(memoryview(bytearray(size)))


def test_flag_errors_name_the_call() -> None:
    kv = _fragmented("f16-trans", 6)
    with pytest.raises(RangeError, match="state_size: flags 0x8"):
        kv.state_size(0, 8)
    with pytest.raises(RangeError, match="state_write_buffer: flags 0x8"):
        kv.state_write_buffer(bytearray(1 << 16), 0, 8)
    with pytest.raises(RangeError, match="state_write: flags 0x8"):
        kv.state_write(0, 8)


def test_shared_cells_are_written_by_their_bits_and_never_read_back_in_place(
    monkeypatch,
) -> None:
    """Sequence 0's cells all shared with 2: its blob and 2's are written by the one call
    (the general writer's bytes); a read of 0 cannot go back into those cells (the
    same-cells check declines); without the cells' bitsets in the view every shared
    stream declines to the general writer."""
    kv = _fragmented("f16-trans", 7, drop=False)
    blob = kv._seq_blob(0, 0, "test")
    assert blob is not None
    own = bytes(kv.state_write(0))
    # the one-call roads take sequence 0 while no cell is shared ...
    assert blob.size(0) == len(own) and blob.read(own, 0, store=False) == len(own)
    kv.seq_cp(0, 2, -1, -1)  # seq 2 shares every cell of seq 0 in the one stream
    # ... and write it by its bits once they are shared, but never read it in place
    assert blob.size(0) == len(own)
    out = bytearray(len(own))
    assert blob.write(out, 0, "test") == len(own) and bytes(out) == own
    assert blob.read(own, 0, store=False) is None
    cells = blob.view.cells
    blob.view.cells = ffi.NULL  # no bitsets to tell: declined
    assert blob.size(0) is None and blob.write(out, 1, "test") is None
    blob.view.cells = cells
    with monkeypatch.context() as m:
        _general(kv, m)
        want = [bytes(kv.state_write(s)) for s in range(3)]
    assert [bytes(kv.state_write(s)) for s in range(3)] == want
    assert [kv.state_size(s) for s in range(3)] == [len(w) for w in want]
    kv.state_read(want[2], 2)  # the two-phase restore takes it
    assert bytes(kv.state_write(2)) == want[2]


def test_bad_ids_flags_and_closed_cache_keep_their_errors() -> None:
    kv = _fragmented("f16-trans", 8)
    blob = bytes(kv.state_write(0))
    for bad in (len(kv.seq_to_stream), -2, 1.0, True):
        with pytest.raises(RangeError, match="seq_id"):
            kv.state_write(bad)
        with pytest.raises(RangeError, match="seq_id"):
            kv.state_size(bad)
        with pytest.raises(RangeError, match="seq_id"):
            kv.state_read(blob, bad)
    # the call is named, and the value and the known bits
    with pytest.raises(RangeError, match=r"state_write_buffer: flags 0x80 .*known"):
        kv.state_write_buffer(bytearray(len(blob)), 0, flags=0x80)
    with pytest.raises(RangeError, match=r"state_read: flags 0x80"):
        kv.state_read(blob, 0, flags=0x80)
    with pytest.raises(RangeError, match=r"state_write: flags 0x80"):
        kv.state_write(0, flags=0x80)
    assert kv.state_write(0, flags=0x2) == blob  # ON_DEVICE: the same bytes
    with pytest.raises(RangeError, match=f"needs {len(blob)}"):
        kv.state_write_buffer(bytearray(4), 0)
    kv.close()
    with pytest.raises(ClosedError):
        kv.state_write(0)
    with pytest.raises(ClosedError):
        kv.state_read(blob, 0)


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans-streams", "mrope-ext"])
def test_one_call_read_moves_the_head_as_the_plan_does(monkeypatch, name: str) -> None:
    fast, plan = _fragmented(name, 9, drop=False), _fragmented(name, 9, drop=False)
    blobs = [bytes(fast.state_write(s)) for s in range(3)]
    hits = []
    real = state_io.SeqBlob.read

    def counted(*a, **kw):
        done = real(*a, **kw)
        hits.append(done is not None)  # the one-call road took it
        return done

    monkeypatch.setattr(state_io.SeqBlob, "read", counted)
    for seq_id in (2, 0, 1):
        fast.v_heads[:] = [0] * fast.n_stream
        plan.v_heads[:] = [0] * plan.n_stream
        assert fast.state_read(blobs[seq_id], seq_id) == len(blobs[seq_id])
        with monkeypatch.context() as m:
            _general(plan, m)
            assert plan.state_read(blobs[seq_id], seq_id) == len(blobs[seq_id])
        assert list(fast.v_heads) == list(plan.v_heads)
        assert bytes(fast.state_write()) == bytes(plan.state_write())
    assert hits == [True] * 3
    # a blob with a word after its part that is not an empty stream's zero count: declined,
    # and the general restore names it
    bad = blobs[0] + b"\x07\x00\x00\x00"
    before = bytes(fast.state_write())
    if fast.n_stream == 1:
        assert fast.state_read(bad, 0) == len(blobs[0])  # the reference reads no further
    else:
        damaged = bytearray(blobs[0])
        damaged[-4] = 7  # the last stream's count, after the part with cells
        with pytest.raises(StateError):
            fast.state_read(bytes(damaged), 0)
        assert bytes(fast.state_write()) == before


@pytest.mark.parametrize("swa_type", [SWAType.STANDARD, SWAType.CHUNKED, SWAType.SYMMETRIC])
@pytest.mark.parametrize("n_swa", [1, 3, 8])
def test_window_keeps_what_selected_cells_keeps(monkeypatch, swa_type: SWAType, n_swa: int) -> None:
    # a sliding-window cache's blob of one sequence holds the cells its last token still
    # sees; the native window ([lo, hi] from the sequence's largest position) selects what
    # the general writer's masked_swa selects, for every window type and width
    cfg = dict(CFGS["swa"], swa_type=swa_type, n_swa=n_swa)
    kv = build(cfg, n_cells=512, n_seq=3)
    _interleaved(kv, np.random.default_rng(n_swa), 3, 90, 7)
    randomize(kv, n_swa)
    blob = kv._seq_blob(0, 0, "test")
    assert blob is not None
    for seq_id in range(3):
        with monkeypatch.context() as m:
            _general(kv, m)
            want = bytes(kv.state_write(seq_id))
        assert bytes(kv.state_write(seq_id)) == want
        assert kv.state_size(seq_id) == len(want)
        # the window leaves cells behind, so the selection is not every cell of the sequence
        cells = state_io.selected_cells(kv.layout, kv.v_cells[0], seq_id)
        assert 0 < cells.size < kv.v_cells[0].seq_cells(seq_id).size
    # a restore of a sliding-window cache is placed anew, never proved into the same cells
    # (no check alone); in one call, it leaves what the general two-phase restore leaves
    data = bytes(kv.state_write(1))
    assert blob.read(data, 1, store=False) is None
    twin = build(cfg, n_cells=512, n_seq=3)
    _interleaved(twin, np.random.default_rng(n_swa), 3, 90, 7)
    randomize(twin, n_swa)
    assert blob.read(data, 1) == len(data)
    with monkeypatch.context() as m:
        _general(twin, m)
        assert twin.state_read(data, 1) == len(data)
    assert list(kv.v_heads) == list(twin.v_heads)
    assert bytes(kv.state_write()) == bytes(twin.state_write())


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans-streams", "mrope-ext"])
def test_same_cells_plan_commits_what_the_general_plan_commits(monkeypatch, name: str) -> None:
    # a two-phase restore of a sequence's own blob from host memory parses to a
    # SameCellsPlan (one native check; one native store at commit): the same state as the
    # general plan, stale and repeated commits refused as every plan refuses them
    from pymem.state import StateReader

    fast, general = _fragmented(name, 11, drop=False), _fragmented(name, 11, drop=False)
    for seq_id in (1, 0, 2):
        blob = bytes(fast.state_write(seq_id))
        plan = fast.state_read_parse(StateReader(blob), seq_id)
        assert isinstance(plan, state_io.SameCellsPlan)
        with monkeypatch.context() as m:
            _general(general, m)
            other = general.state_read_parse(StateReader(blob), seq_id)
        assert isinstance(other, state_io.KVStatePlan)
        plan.commit()
        other.commit()
        assert list(fast.v_heads) == list(general.v_heads)
        assert bytes(fast.state_write()) == bytes(general.state_write())
        with pytest.raises(StateError, match="already committed"):
            plan.commit()
    stale = fast.state_read_parse(StateReader(bytes(fast.state_write(0))), 0)
    fast.seq_rm(2, 0, 1)
    with pytest.raises(StateError, match="parse it again"):
        stale.commit()


def test_a_composite_verifies_every_part_before_committing_any() -> None:
    # a hybrid's restore: the KV part parsed to a SameCellsPlan, the recurrent part to its
    # plan; a blob changed after the parse is refused by the KV part's verify before any
    # part commits, so neither changes
    from test_hybrid import make_hybrid
    from test_iswa import decode

    from pymem.state import StateReader

    mem = make_hybrid("RAR", kv_size=64, n_seq_max=4, unified=True, n_ubatch=4)
    decode(mem, [[1 + p, p, [s], p == 5] for s in range(2) for p in range(6)], n_ubatch=4)
    blob = bytearray(mem.state_write(1))
    plan = mem.state_read_parse(StateReader(blob), 1)
    assert any(isinstance(p, state_io.SameCellsPlan) for p in plan.parts)
    before = bytes(mem.state_write())
    blob[4] ^= 0xFF  # the KV part's cell count
    with pytest.raises(StateError, match="blob changed"):
        plan.commit()
    assert bytes(mem.state_write()) == before
    mem.close()


def test_native_paths_come_back_when_native_runs_is_switched_on_again(monkeypatch) -> None:
    # a first state call made while NATIVE_RUNS is off must not leave the cache on the
    # general path for good (its "no native section" answer was cached once)
    kv = _fragmented(LAYOUTS[0], 3)
    with monkeypatch.context() as m:
        m.setattr(state_io, "NATIVE_RUNS", False)
        want = bytes(kv.state_write(0))
        assert kv._seq_blob(0, 0, "test") is None
    assert kv._seq_blob(0, 0, "test") is not None
    assert bytes(kv.state_write(0)) == want


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans"])
def test_a_plan_commits_into_the_runs_its_parse_found(name: str) -> None:
    """A same-cells plan's commit stores into the runs its own check left (store 2, no
    owner scan again): the cache it leaves is the one-call restore's; a check of another
    sequence (or a write) in between makes the commit search again; and the kernel's
    store 2 declines without a check's runs, or runs whose cells do not add up."""
    from pymem._native import ffi, lib
    from pymem.state import StateReader

    for mid in (None, "other", "write"):
        kv, twin = _fragmented(name, 11, drop=False), _fragmented(name, 11, drop=False)
        blob = kv._seq_blob(0, 0, "test")
        blobs = [bytes(kv.state_write(s)) for s in range(3)]
        plan = kv.state_read_parse(StateReader(blobs[0]), 0)
        assert isinstance(plan, state_io.SameCellsPlan)
        strm = int(kv.seq_to_stream[0])
        assert blob._checked[strm] == (0, plan.token)
        if mid == "other":
            assert blob.read(blobs[1], 1, store=False) is not None  # its own runs now
        elif mid == "write":
            kv.state_write(1)
        plan.commit()
        twin.state_read(blobs[0], 0)  # the one-call restore: check and store in one
        assert bytes(kv.state_write(0)) == bytes(twin.state_write(0)) == blobs[0], mid
        assert list(kv.v_heads) == list(twin.v_heads), mid
        for c in (kv, twin):
            c.close()
    # the kernel alone: store 2 with no check's runs declines, after a check it stores
    kv = _fragmented(name, 11, drop=False)
    blob = kv._seq_blob(0, 0, "test")
    own = bytes(kv.state_write(0))
    src = ffi.from_buffer(own)
    consumed, done = ffi.new("int64_t *"), ffi.new("int32_t *")
    strm = int(kv.seq_to_stream[0])
    sel = blob._view.selected
    assert (
        lib.pm_kv_read_seq_blob(blob._view, 0, src, len(own), 3, consumed, done) == lib.PM_ERR_ARG
    )
    sel[2 * strm + 1] = -1
    assert lib.pm_kv_read_seq_blob(blob._view, 0, src, len(own), 2, consumed, done) == lib.PM_OK
    assert done[0] == 0
    assert lib.pm_kv_read_seq_blob(blob._view, 0, src, len(own), 0, consumed, done) == lib.PM_OK
    assert done[0] == 1 and sel[2 * strm + 1] >= 1
    ends = blob._view.run_ends[strm]
    ends[0] -= 1  # one cell short of the blob's count: declined
    assert lib.pm_kv_read_seq_blob(blob._view, 0, src, len(own), 2, consumed, done) == lib.PM_OK
    assert done[0] == 0 and sel[2 * strm + 1] == -1
    assert lib.pm_kv_read_seq_blob(blob._view, 0, src, len(own), 0, consumed, done) == lib.PM_OK
    assert lib.pm_kv_read_seq_blob(blob._view, 0, src, len(own), 2, consumed, done) == lib.PM_OK
    assert done[0] == 1 and consumed[0] == len(own)
    kv.close()


def test_a_held_plan_checks_its_records_again_at_commit() -> None:
    """Only a plan committed right after its parse (state_read) stores into its parse's
    runs unchecked: a same-cells plan a caller holds, whose blob's record changed after
    the parse, is refused at commit with nothing changed."""
    from pymem.state import StateReader

    kv = _fragmented("f16-trans", 11, drop=False)
    blob = bytearray(kv.state_write(0))
    before = bytes(kv.state_write())
    plan = kv.state_read_parse(StateReader(blob), 0)
    assert isinstance(plan, state_io.SameCellsPlan) and not plan.parsed_now
    at = 4 + 4 * int(kv.seq_to_stream[0]) + 4  # the first record's position
    blob[at : at + 4] = (10**6).to_bytes(4, "little")
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.commit()
    assert bytes(kv.state_write()) == before
    kv.close()


def test_a_commit_whose_runs_another_selection_overwrote_checks_in_full() -> None:
    """The whole writer shares the stream's run scratch: a whole write between a plan's
    parse and its commit (committed_at_once, so the commit would reuse the parse's runs)
    leaves other runs there; the commit then checks and stores in full, as it should."""
    from pymem.state import StateReader

    kv, twin = _fragmented("f16-trans", 11, drop=False), _fragmented("f16-trans", 11, drop=False)
    blob = bytes(kv.state_write(0))
    plan = kv.state_read_parse(StateReader(blob), 0)
    plan.committed_at_once()
    kv.state_write()  # the whole writer selects every cell into the same scratch
    plan.commit()
    twin.state_read(blob, 0)
    assert bytes(kv.state_write()) == bytes(twin.state_write())
    assert list(kv.v_heads) == list(twin.v_heads)
    for c in (kv, twin):
        c.close()


@pytest.mark.parametrize("n_cells", [512, 500])
@pytest.mark.parametrize("forked", [False, True])
def test_position_window_selects_its_cells_ends_included(forked: bool, n_cells: int) -> None:
    # the one-sequence writer's window [lo, hi] (pm_kv_select_window: blocks as the held
    # cells' and the range's masks, shared cells by their bits; 500 cells: a last, partial
    # block of 20, cell by cell) against numpy, both ends inclusive: windows ending exactly
    # on a held position, empty ones, ones reaching below 0 and to INT32_MAX
    kv = build(CFGS["f32-notrans"], n_cells=n_cells, n_seq=3)
    _interleaved(kv, np.random.default_rng(9), 2, 245, 7)  # 490 cells: into the last block
    randomize(kv, 9)
    assert int(kv.v_cells[0].used) == 490 and int(kv.v_cells[0].pos[480:490].min()) >= 0
    if forked:
        kv.seq_cp(0, 2, -1, -1)  # sequence 2 shares every cell of sequence 0
    blob = kv._seq_blob(0, 0, "test")
    assert blob is not None
    cells = kv.v_cells[0]
    rng = np.random.default_rng(9)
    top = np.iinfo(np.int32).max
    written = ffi.new("int64_t[2]")
    declined = ffi.cast("int32_t *", written + 1)
    for seq_id in (0, 1, 2):
        held = cells.seq_cells(seq_id)
        pos = cells.pos[held].astype(np.int64)
        if pos.size == 0:
            continue
        tail = cells.pos[held[held >= cells.size // 32 * 32]]  # (the partial block's)
        picks = (
            [int(p) for p in rng.choice(pos, 6)]
            + [int(p) for p in tail[:1]]
            + [int(p) for p in tail[-1:]]
        )
        windows = [(a, b) for a in picks for b in picks] + [(-5, picks[0]), (picks[0], top), (3, 2)]
        for lo, hi in windows:
            status = lib.pm_kv_write_seq_blob(
                blob.view, seq_id, 0, lo, hi, ffi.NULL, 0, written, declined
            )  # fmt: skip
            assert status in (lib.PM_OK, lib.PM_ERR_RANGE) and not declined[0]
            want = int(np.count_nonzero((pos >= lo) & (pos <= hi)))
            assert int(blob.view.selected[0]) == want, (seq_id, lo, hi)
    blob.scratch_taken()
