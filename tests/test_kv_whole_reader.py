"""A KV cache's whole restore as a native check and a native store (``_whole_reader``,
what ``seq_reader(-1)`` offers a composite and what ``state_read(data, -1)`` takes):
``pm_kv_read_whole_blob`` parses, ``pm_kv_read_whole_commit`` places, stores and zeroes
what ``WholeBlobPlan.commit`` does in several calls. Pins it to that plan (the reader
turned off) on every layout: own blobs (no cell moves), donors' blobs (every cell placed
anew, rows past them zeroed), shared cells (the general parse), hostile words; and the
kernel's refusals."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants
from state_files import decode
from test_hybrid import make_hybrid
from test_kv_state_same import NAMES, _scenario, _state

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.composite import CompositeMemory
from pymem.errors import StateError
from pymem.kv import KVCache
from pymem.kv.cells import StackedCells


def _read(monkeypatch: pytest.MonkeyPatch, kv: KVCache, data: object, reader: bool) -> object:
    with monkeypatch.context() as m:
        if not reader:
            m.setattr(KVCache, "_whole_reader", lambda self: None)
        try:
            return kv.state_read(data)  # type: ignore[arg-type]
        except StateError as exc:
            return str(exc)


@pytest.mark.parametrize("name", NAMES)
def test_the_whole_reader_leaves_what_the_whole_plan_leaves(monkeypatch, name: str) -> None:
    """Own blob, donors' blobs (a smaller cache's too: rows past its cells zeroed), a
    blob with a fork's shared cells, trailing bytes: twins on either road end equal; the
    one-call commit is taken wherever no ext applies."""
    commits: list[bool] = []
    real = state_io.SeqBlob.commit_whole

    def counted(self, data, found):  # type: ignore[no-untyped-def]
        done = real(self, data, found)
        commits.append(done)
        return done

    monkeypatch.setattr(state_io.SeqBlob, "commit_whole", counted)
    for seed in range(6):
        donor = _scenario(name, seed + 30)
        small = _scenario(name, seed + 60, n_cells=20)
        fork = _scenario(name, seed + 90)
        fork.seq_cp(0, 2)
        base = _scenario(name, seed)
        blobs = [bytes(base.state_write()), bytes(donor.state_write()),
                 bytes(small.state_write()), bytes(fork.state_write()),
                 bytearray(bytes(donor.state_write()) + b"\x01\x02")]  # fmt: skip
        for i, blob in enumerate(blobs):
            fast, ref = _scenario(name, seed), _scenario(name, seed)
            got = _read(monkeypatch, fast, blob, True)
            want = _read(monkeypatch, ref, blob, False)
            assert got == want, (seed, i)
            assert _state(fast) == _state(ref), (seed, i)
            check_invariants(fast)
            fast.close()
            ref.close()
    if name == "mrope-ext":
        assert not commits  # ext: the plan writes the ext words
    else:
        assert sum(commits) >= 18, commits


def test_hostile_whole_blobs_change_nothing_and_get_the_general_message(monkeypatch) -> None:
    """Random words of the counts, records and headers set to hostile values, and
    truncations: both roads answer alike and a refused blob changes nothing."""
    rng = np.random.default_rng(5)
    hostile = [0, 1, 2, 3, -1, -2, 2**31 - 1, 48, 64, 65, 256]
    refused = 0
    for seed, name in enumerate(["f16-trans", "q8_0-notrans", "f16-trans-streams"]):
        blob = bytes(_scenario(name, seed + 40).state_write())
        n_words = min(len(blob) // 4, 96)
        for trial in range(30):
            if trial % 6 == 5:
                data = blob[: int(rng.integers(0, len(blob)))]
            else:
                b = bytearray(blob)
                w = int(rng.integers(0, n_words))
                b[4 * w : 4 * w + 4] = int(rng.choice(hostile)).to_bytes(4, "little", signed=True)
                data = bytes(b)
            outcomes, states = [], []
            for reader in (True, False):
                kv = _scenario(name, seed)
                before = _state(kv)
                outcomes.append(_read(monkeypatch, kv, data, reader))
                states.append(_state(kv))
                if isinstance(outcomes[-1], str):
                    assert states[-1] == before, (name, trial)
                kv.close()
            assert outcomes[0] == outcomes[1], (name, trial)
            assert states[0] == states[1], (name, trial)
            refused += isinstance(outcomes[0], str)
    assert refused >= 30, refused


def test_under_a_journal_or_with_native_placement_off_the_plan_commits(monkeypatch) -> None:
    """The one-call commit declines under an undo journal and with ``NATIVE_PLACE`` off
    (nothing changed): the reader's store falls back to the plan, which ends alike."""
    donor = bytes(_scenario("f16-trans", 31).state_write())
    kv = _scenario("f16-trans", 1)
    view = kv._blob_view()
    assert view is not None
    found = view.read_whole(memoryview(donor), 0)
    assert found is not None and not found.same
    before = _state(kv)
    with kv._planning():
        assert view.commit_whole(memoryview(donor), found) is False
    assert _state(kv) == before
    monkeypatch.setattr(state_io, "NATIVE_PLACE", False)
    assert view.commit_whole(memoryview(donor), found) is False
    assert _state(kv) == before
    assert kv.state_read(donor) == len(donor)  # the reader's store: the plan commits
    fallback = _state(kv)
    monkeypatch.setattr(state_io, "NATIVE_PLACE", True)
    again = _scenario("f16-trans", 1)
    assert again.state_read(donor) == len(donor)
    assert _state(again) == fallback


def test_the_commit_kernel_refuses_and_declines_without_change() -> None:
    """Null pointers, offsets past the blob and counts past the cache are refused; a record
    changed after the parse into one the refill cannot take is declined with nothing
    changed; a header changed after the parse fails the store's checks (StateError)."""
    donor = _scenario("f16-trans", 33)
    blob = bytearray(donor.state_write())
    kv = _scenario("f16-trans", 3)
    view = kv._blob_view()
    assert view is not None
    found = view.read_whole(memoryview(blob), 0)
    assert found is not None and not found.same
    cells = kv._native_cells()[0]
    done = ffi.new("int32_t *")
    before = _state(kv)

    def call(c=cells, counts=found.counts, offsets=found.offsets, out=done) -> int:
        return lib.pm_kv_read_whole_commit(
            view._view, c, ffi.from_buffer(blob), len(blob), ffi.from_buffer("int64_t[]", counts),
            ffi.from_buffer("int64_t[]", offsets), 0, lib.PM_RECORDS_PARSED, out,
        )  # fmt: skip

    assert call(c=ffi.NULL) == lib.PM_ERR_ARG
    assert call(out=ffi.NULL) == lib.PM_ERR_ARG
    assert call(offsets=np.array([len(blob) + 4], np.int64)) == lib.PM_ERR_ARG
    assert call(counts=np.array([kv.layout.kv_size + 1], np.int64)) == lib.PM_ERR_ARG
    assert _state(kv) == before
    at = int(found.offsets[0])
    blob[at + 4 : at + 8] = (2).to_bytes(4, "little")  # the first record's n_seq_id
    assert call() == lib.PM_OK and done[0] == 0
    assert _state(kv) == before
    blob[at + 4 : at + 8] = (1).to_bytes(4, "little")
    n = int(found.counts[0])
    blob[at + 12 * n + 4 : at + 12 * n + 8] = (99).to_bytes(4, "little")  # n_layer
    with pytest.raises(StateError, match="changed while it was restored"):
        view.commit_whole(memoryview(blob), found)


def _spoiled(blob: bytes) -> tuple[bytes, bytes]:
    """A one-stream forked blob with its first record of two ids spoiled: the second id
    made the first's (a record the refill must refuse, of the same length), and that
    record's id count made huge (its length runs past the blob)."""
    words = np.frombuffer(blob, dtype="<i4", count=len(blob) // 4).copy()
    assert words[0] == 1  # (one stream)
    o = 2
    for _ in range(int(words[1])):
        if words[o + 1] == 2:
            break
        o += 2 + int(words[o + 1])
    assert words[o + 1] == 2
    same_ids, huge = words.copy(), words.copy()
    same_ids[o + 3] = same_ids[o + 2]
    huge[o + 1] = 1 << 30
    tail = blob[4 * len(words) :]
    return same_ids.tobytes() + tail, huge.tobytes() + tail


def _general(monkeypatch: pytest.MonkeyPatch, name: str, seed: int, blob: bytes) -> object:
    """What the general parse leaves after ``clear(False)`` then a whole read of ``blob``
    (the native roads off): the state, or the error it names."""
    kv = _scenario(name, seed)
    kv.clear(False)
    with monkeypatch.context() as m:
        m.setattr(state_io, "NATIVE_RUNS", False)
        m.setattr(state_io, "NATIVE_PLACE", False)
        try:
            kv.state_read(blob)
        except StateError as exc:
            kv.close()
            return str(exc)
    out = _state(kv)
    kv.close()
    return out


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans", "f16-trans-streams"])
def test_a_whole_read_into_empty_cells_places_each_record_as_it_checks_it(
    monkeypatch, name: str
) -> None:
    """Into a cache whose every stream is empty (a cleared one's) a whole read places each
    record as it checks it (pm_kv_place_whole_empty, then pm_whole_read's store): fixed
    records and a fork's variable ones end as the general parse leaves them, and the road
    is taken (it answers, not None). A record it refuses (two equal ids: the same length;
    an id count past the blob) or a data section it refuses (a layer count) after the
    records were placed leaves every stream empty again, with nothing else changed; the
    general parse then names the fault. A cache with a cell is not this road's."""
    donor = _scenario(name, 35)
    plain = bytes(donor.state_write())
    donor.seq_cp(0, 2)  # cells shared by two sequences: records of two ids
    forked = bytes(donor.state_write())
    for blob in (plain, forked):
        kv = _scenario(name, 5)
        assert kv._read_whole_into_empty(blob) is None  # (cells in use: not its road)
        kv.clear(False)
        assert kv._read_whole_into_empty(blob) == len(blob)
        check_invariants(kv)
        assert _state(kv) == _general(monkeypatch, name, 5, blob)
        kv.close()
    kv = _scenario(name, 5)
    spoiled = list(_spoiled(forked)) if kv.n_stream == 1 else []
    words = np.frombuffer(forked, dtype="<i4").copy()
    # the last stream's data: its layer count, past its records (the records placed first)
    view = kv._blob_view()
    assert view is not None
    kv.clear(False)
    found = view.read_whole(memoryview(forked), 0)
    assert found is not None
    s = kv.n_stream - 1
    at = int(found.offsets[s]) // 4
    o = at
    for _ in range(int(found.counts[s])):
        o += 2 + int(words[o + 1])
    words[o + 1] = 99  # (v_trans, then n_layer)
    spoiled.append(words.tobytes())
    for bad in spoiled:
        kv.clear(True)  # (rows bound 0: records placed then counted would raise it)
        empty = _state(kv)
        assert kv._read_whole_into_empty(bad) is None
        assert _state(kv) == empty
        assert kv.cells.rows_hi.tolist() == [0] * kv.n_stream
        check_invariants(kv)
        want = _general(monkeypatch, name, 5, bad)
        assert isinstance(want, str)
        with pytest.raises(StateError) as exc:
            kv.state_read(bad)
        assert str(exc.value) == want
        assert _state(kv) == empty
    kv.close()
    donor.close()


def test_a_composites_later_refusal_empties_the_placed_records_again() -> None:
    """pm_whole_read of a cleared hybrid: its KV part's check places the records, and its
    recurrent part's check then refuses the blob (a cell count past the memory): the KV
    records are emptied again, the memory as the clear left it; the same blob unspoiled
    then reads in one call."""
    donor, mem = make_hybrid("RAR", n_seq_max=4), make_hybrid("RAR", n_seq_max=4)
    for step in range(6):
        items = [[1 + q, step, [q], False] for q in range(3)]
        decode(donor, items)
    donor.seq_cp(0, 3)
    blob = bytes(donor.state_write())
    kv = mem.parts()["attention"]
    rec = mem.parts()["recurrent"]
    n_kv = len(bytes(donor.parts()["attention"].state_write()))
    bad = bytearray(blob)
    bad[n_kv : n_kv + 4] = (rec.size + 1).to_bytes(4, "little")  # (the recurrent cell count)
    mem.clear(False)
    empty = (_state(kv), bytes(rec.state_write()))
    assert CompositeMemory._native_read(mem, bytes(bad), -1, 0) is None
    assert (_state(kv), bytes(rec.state_write())) == empty
    check_invariants(kv)
    assert CompositeMemory._native_read(mem, blob, -1, 0) == len(blob)
    assert bytes(mem.state_write()) == blob
    donor.close()
    mem.close()


@pytest.mark.parametrize("seed, fork", [(41, False), (43, True)])
def test_a_commit_after_a_parse_in_the_same_call_checks_as_it_writes(seed: int, fork: bool) -> None:
    """``records`` 1 (pm_whole_read's: its parse ran in the same call): the refill writes
    without checking every record first. Its result equals the two-phase restore's, fixed
    and variable records alike; a record that fails after all (the blob changed since the
    parse) leaves every cell emptied, the cache consistent, and answers PM_ERR_RANGE;
    ``records`` outside [0, 1] is refused."""
    donor = _scenario("f16-trans", seed)
    if fork:
        donor.seq_cp(0, 2)  # records of two ids: the variable fill
    blob = bytearray(donor.state_write())
    donor.close()
    kv, twin = _scenario("f16-trans", 7), _scenario("f16-trans", 7)
    view = kv._blob_view()
    assert view is not None
    found = view.read_whole(memoryview(blob), 0)
    assert found is not None and not found.same
    done = ffi.new("int32_t *")

    def commit(records: int) -> int:
        return lib.pm_kv_read_whole_commit(
            view._view, kv._native_cells()[0], ffi.from_buffer(blob), len(blob),
            ffi.from_buffer("int64_t[]", found.counts),
            ffi.from_buffer("int64_t[]", found.offsets), 0, records, done,
        )  # fmt: skip

    assert commit(2) == lib.PM_ERR_ARG and commit(-1) == lib.PM_ERR_ARG
    assert commit(lib.PM_RECORDS_PARSED_HERE) == lib.PM_OK and done[0] == 1
    kv._whole_committed()
    assert twin.state_read(bytes(blob)) == len(blob)
    assert _state(kv) == _state(twin)
    check_invariants(kv)
    if not fork:  # the last record's id past n_seq_max, after the parse: emptied, RANGE
        at, n = int(found.offsets[0]), int(found.counts[0])
        last = at + 12 * (n - 1) + 8
        blob[last : last + 4] = (kv.n_seq_max + 5).to_bytes(4, "little")
        assert commit(lib.PM_RECORDS_PARSED_HERE) == lib.PM_ERR_RANGE
        kv._whole_committed()
        assert all(int(u) == 0 for u in kv.cells.used)
        assert (kv.v_cells[0].pos < 0).all()
        check_invariants(kv)
    kv.close()
    twin.close()


@pytest.mark.parametrize("n_seq_ids", [8, 256])  # one-word bitsets (the blocks' road), four
@pytest.mark.parametrize("into_empty", [True, False])
@pytest.mark.parametrize("order", ["run", "shuffled"])
def test_refill_declines_a_fault_anywhere_in_a_block_of_sixteen(
    into_empty: bool, n_seq_ids: int, order: str
) -> None:
    """pm_step_kv_refill's fixed records in blocks of sixteen of one sequence (checked at
    once, word against pattern; a run of consecutive positions against the run's): a
    negative position, a count other than 1 or another id or an id past n_seq_max at any
    record of a block is declined with nothing changed; a record of another sequence
    inside a block is placed as its own; the good records are placed with their
    positions, owner and bit, in a run or in any order."""
    n = 40  # two blocks of sixteen, then the four-record and one-record steps
    positions = 100 + np.arange(n)
    if order == "shuffled":
        positions = 100 + np.random.default_rng(1).permutation(n)
    good = np.array([w for p in positions for w in (p, 1, 3)], dtype=np.int32)
    st = StackedCells(1, 64, n_seq_ids=n_seq_ids)
    if not into_empty:  # a used stack: checked before the first write
        st.set_new(np.array([0]), np.array([[50]]), np.array([7]), np.array([[2]], np.int32))
    c = st.native()
    placed = ffi.new("int32_t *")

    def refill(words: np.ndarray, count: int = n) -> int:
        ptrs = ffi.new("int32_t *[]", [ffi.from_buffer("int32_t[]", words)])
        counts = ffi.new("int64_t[]", [count])
        assert lib.pm_step_kv_refill(c, ptrs, counts, ffi.NULL, 3, 8, placed) == lib.PM_OK
        return int(placed[0])

    before = (st.pos.tobytes(), st.owner.tobytes(), st.seq.tobytes(), st.used.tolist())
    for i in range(n):
        for word, value in ((0, -1), (1, 2), (1, 0), (2, 8), (2, -1)):
            bad = good.copy()
            bad[3 * i + word] = value
            assert refill(bad) == 0, (i, word, value)
            assert (
                st.pos.tobytes(),
                st.owner.tobytes(),
                st.seq.tobytes(),
                st.used.tolist(),
            ) == before
    for i in (0, 7, 15, 16, 31, 33):
        other = good.copy()
        other[3 * i + 2] = 4
        assert refill(other) == 1, i
        assert st.owner[0, i] == 4 and st.seq[0, i, 0] == 1 << 4, i
        assert st.pmin[0, 4] == st.pmax[0, 4] == positions[i], i
        assert (np.delete(st.owner[0, :n], i) == 3).all(), i
    assert refill(good) == 1
    assert st.pos[0, :n].tolist() == positions.tolist()
    assert (st.owner[0, :n] == 3).all() and (st.seq[0, :n, 0] == 1 << 3).all()
    assert not st.seq[0, :, 1:].any()
    assert (st.pos[0, n:] == -1).all() and int(st.used[0]) == n
    assert st.pmin[0, 3] == 100 and st.pmax[0, 3] == 100 + n - 1
    # one block, two blocks alone: their bounds are the blocks' own
    for count in (16, 32):
        assert refill(good, count) == 1 and int(st.used[0]) == count
        assert st.pmin[0, 3] == positions[:count].min(), count
        assert st.pmax[0, 3] == positions[:count].max(), count


def test_refill_declines_a_run_of_positions_past_int32_max() -> None:
    """A block of sixteen records whose positions run from INT32_MAX - 3 and wrap to
    negative ones matches the run pattern in unsigned words: it is still declined."""
    top = 2**31 - 1
    wrapped = ((np.arange(16, dtype=np.int64) + top - 3 + 2**31) % 2**32 - 2**31).astype(np.int32)
    words = np.array([w for p in wrapped for w in (p, 1, 0)], dtype=np.int32)
    st = StackedCells(1, 16, n_seq_ids=8)
    c = st.native()
    placed = ffi.new("int32_t *")
    ptrs = ffi.new("int32_t *[]", [ffi.from_buffer("int32_t[]", words)])
    counts = ffi.new("int64_t[]", [16])
    assert lib.pm_step_kv_refill(c, ptrs, counts, ffi.NULL, 3, 8, placed) == lib.PM_OK
    assert placed[0] == 0 and (st.pos == -1).all() and int(st.used[0]) == 0
