"""Forked sequences: after ``seq_cp`` some cells are held by several sequences (owner
``OWNER_MULTI``, the bitset names them). The one-call roads take every sequence: a
write selects a sequence's shared cells by its bit, a removal takes its bit out of them
(the cell keeps its position), a read that cannot go back into the cells a sequence
holds places it anew, and the window's purge and refresh count shared cells for each of
their sequences. Pins the roads to the numpy reference on random runs of ops over twin
memories (``pm_step_seq_shared`` tells a sequence in a shared cell from one beside them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from kv_helpers import check_invariants, make_kv
from test_hybrid import make_hybrid
from test_iswa import decode, iswa_spec, make_iswa
from test_iswa import randomize as randomize_any
from test_kv_state import randomize

import pymem.kv.cache as kv_cache
import pymem.kv.state_io as kv_state_io
from pymem._native import ffi, lib
from pymem.composite import CompositeMemory
from pymem.errors import RangeError, StateError, UnsupportedError
from pymem.kv import KVCache
from pymem.kv.cells import KVCells, StackedCells
from pymem.spec import SWAType

N_SEQ = 6


def test_shared_test_names_only_the_sequences_of_shared_cells() -> None:
    """A stream with cells {0}, {1, 5} and {2, 70}: sequences 1, 5, 2 and 70 share a cell,
    0 and 3 do not; a stream without shared cells, an id past the bitsets or a stream
    outside the stack answer 0."""
    st = StackedCells(2, 8)
    st.fit(70)
    gid = np.array([0, 1, 2])
    st.pos_f[gid] = [0, 1, 2]
    st.seq_f[gid] = 0
    st.seq_f[0, 0] = 1 << 0
    st.seq_f[1, 0] = (1 << 1) | (1 << 5)
    st.seq_f[2, 0], st.seq_f[2, 1] = 1 << 2, 1 << (70 - 64)
    st.owner_f[gid] = [0, -2, -2]
    st.n_multi[0] = 2
    st.used[0] = st.used_max_p1[0] = 3
    for q, (lo, hi) in {0: (0, 0), 1: (1, 1), 5: (1, 1), 2: (2, 2), 70: (2, 2)}.items():
        st.pmin[0, q], st.pmax[0, q] = lo, hi
    c = st.native()
    shared = {q for q in range(128) if lib.pm_step_seq_shared(c, 0, q)}
    assert shared == {1, 2, 5, 70}
    # a sequence without cells is answered from its bounds, unless they are stale
    st.pmax[0, 5] = -1
    assert lib.pm_step_seq_shared(c, 0, 5) == 0
    st.pdirty[0, 5] = 2
    assert lib.pm_step_seq_shared(c, 0, 5) == 1
    # whole blocks of 32 cells are passed by their count of shared cells: a shared cell
    # in the third block, one past the last used cell (never scanned), sequences 3 and 4
    big = StackedCells(1, 200)
    for cell, q in ((40, 3), (70, 4), (71, 4)):
        big.pos_f[cell], big.owner_f[cell], big.seq_f[cell, 0] = cell, q, 1 << q
    big.pos_f[70], big.owner_f[70], big.seq_f[70, 0] = 70, -2, (1 << 3) | (1 << 4)
    big.n_multi[0], big.used[0], big.used_max_p1[0] = 1, 3, 72
    big.pmin[0, 3], big.pmax[0, 3], big.pmin[0, 4], big.pmax[0, 4] = 40, 70, 70, 71
    cb = big.native()
    assert [lib.pm_step_seq_shared(cb, 0, q) for q in (2, 3, 4)] == [0, 1, 1]
    big.used_max_p1[0] = 70  # (a wrong bound: the shared cell is past the scan)
    assert lib.pm_step_seq_shared(cb, 0, 3) == 0
    assert lib.pm_step_seq_shared(c, 1, 1) == 0  # stream 1 holds no shared cell
    assert lib.pm_step_seq_shared(c, 2, 1) == 0  # no stream 2
    assert lib.pm_step_seq_shared(c, 0, 200) == 0  # past the bitsets: in no cell


def _forked_kv(unified: bool, v_trans: bool, seed: int, **swa: Any) -> KVCache:
    kv = make_kv(96, N_SEQ, unified=unified, v_trans=v_trans, **swa)
    randomize(kv, seed)
    return kv


def _state(mem: Any) -> tuple:
    parts = mem.parts().values() if isinstance(mem, CompositeMemory) else [mem]
    extra = []
    for part in parts:
        if isinstance(part, KVCache):
            st = part.cells
            extra.append((list(part.v_heads), st.pos.tobytes(), st.owner.tobytes(),
                          st.seq.tobytes(), st.n_multi.tolist(), st.used.tolist()))  # fmt: skip
    bounds = [(mem.seq_pos_min(s), mem.seq_pos_max(s)) for s in range(N_SEQ)]
    return bytes(mem.state_write()), bounds, extra


@pytest.mark.parametrize(
    "kind, unified, v_trans",
    [("kv", True, True), ("kv", True, False), ("kv", False, True), ("hybrid", True, False),
     ("window", True, False), ("iswa", True, True)],
)  # fmt: skip
@pytest.mark.parametrize("seed", range(3))
def test_forked_runs_match_the_numpy_roads(monkeypatch, kind, unified, v_trans, seed) -> None:
    """Random decodes, forks (seq_cp), removals (tails and whole sequences) and sequence
    blobs written, read back into their own and other sequences and swapped back in, and
    whole blobs read back (into the memory as it is or cleared), on twins: one with every native road, one with them off (the numpy state rows and
    placement); a plain cache, one with a sliding window (whose blobs hold the window's
    cells), a hybrid and an iSWA cache (windows: overwrites whose purge meets shared
    cells). The same answers and states after every op; the one-call roads
    ran beside shared cells, and a whole blob with shared cells was read natively."""
    rng = np.random.default_rng(500 + seed)
    if kind in ("kv", "window"):
        swa = {"swa_type": SWAType.STANDARD, "n_swa": 3} if kind == "window" else {}
        twins = [_forked_kv(unified, v_trans, seed, **swa) for _ in range(2)]
    elif kind == "hybrid":
        twins = [make_hybrid("RAR", n_seq_max=N_SEQ, unified=unified) for _ in range(2)]
    else:  # a window of 3 over 96 cells: masked cells to overwrite, forks to purge
        twins = [make_iswa(96, N_SEQ, v_trans=v_trans, spec=iswa_spec(n_swa=3)) for _ in range(2)]
        for mem in twins:
            randomize_any(mem, seed)
    # one-call roads taken while the stream held shared cells: "beside" them, or "inside"
    # (by a sequence that held one of them)
    roads = dict.fromkeys(("beside", "inside", "whole"), 0)
    real_write, real_read = kv_state_io.SeqBlob.write, kv_state_io.SeqBlob.read
    real_rm = KVCache._seq_rm_native
    real_whole, real_one_call = kv_state_io.SeqBlob.read_whole, CompositeMemory._native_read
    whole_taken: list[int] = []  # whole parses that took the blob natively (twin 0's)

    def whole_spy(self, data, mode):  # type: ignore[no-untyped-def]
        found = real_whole(self, data, mode)
        if mode == 0 and found is not None:
            whole_taken.append(1)
        return found

    def one_call_spy(self, data, seq_id, flags):  # type: ignore[no-untyped-def]
        done = real_one_call(self, data, seq_id, flags)
        if seq_id == -1 and done is not None:
            whole_taken.append(1)
        return done

    monkeypatch.setattr(kv_state_io.SeqBlob, "read_whole", whole_spy)
    monkeypatch.setattr(CompositeMemory, "_native_read", one_call_spy)

    def shared(mem: Any) -> bool:
        parts = mem.parts().values() if isinstance(mem, CompositeMemory) else [mem]
        return any(int(p.cells.n_multi.sum()) for p in parts if isinstance(p, KVCache))

    def where(cells: Any, strm: int, seq_id: int) -> str | None:
        """Whether ``seq_id`` is beside or inside stream ``strm``'s shared cells, if any."""
        if not cells.n_multi[strm]:
            return None
        return "inside" if lib.pm_step_seq_shared(cells.native(), strm, seq_id) else "beside"

    def counted(real: Any) -> Any:
        """``real``, a SeqBlob method, counting the roads it takes."""

        def spy(self, first, seq_id, *args, **kw):  # type: ignore[no-untyped-def]
            at = where(self._cells[0].store, int(self._stream_of[seq_id]), seq_id)
            done = real(self, first, seq_id, *args, **kw)
            if at is not None and done is not None:
                roads[at] += 1
            return done

        return spy

    def rm(self, strm, seq_id, p0, p1):  # type: ignore[no-untyped-def]
        at = where(self.cells, strm, seq_id)
        done = real_rm(self, strm, seq_id, p0, p1)
        if at is not None and done:
            roads[at] += 1
        return done

    write, read = counted(real_write), counted(real_read)
    monkeypatch.setattr(kv_state_io.SeqBlob, "write", write)
    monkeypatch.setattr(kv_state_io.SeqBlob, "read", read)
    monkeypatch.setattr(KVCache, "_seq_rm_native", rm)

    def call(i: int, name: str, *args: Any) -> Any:
        """``name(*args)`` on twin i, its native roads on (0) or off (1); ``decode``: the
        test's decode."""
        mem = twins[i]
        with monkeypatch.context() as m:
            if i == 1:
                m.setattr(kv_state_io, "NATIVE_RUNS", False)
                m.setattr(kv_state_io, "NATIVE_PLACE", False)
                m.setattr(kv_cache, "USE_NATIVE_RM", False)
                m.setattr(CompositeMemory, "_native_read", lambda self, d, s, f: None)
                m.setattr(CompositeMemory, "_native_write", lambda self, *a, **k: None)
                m.setattr(CompositeMemory, "seq_reader", lambda self, s, f: None)
            try:
                if name == "decode":
                    return decode(mem, *args, n_ubatch=16)
                result = getattr(mem, name)(*args)
                return bytes(result) if isinstance(result, (bytes, bytearray)) else result
            except (UnsupportedError, StateError, RangeError) as exc:
                return type(exc).__name__, str(exc)

    def both(name: str, *args: Any) -> list[Any]:
        return [call(i, name, *args) for i in range(2)]

    pos = [0] * N_SEQ
    for step in range(70):
        op = rng.choice(["decode", "decode", "cp", "cp", "rm_tail", "rm_all", "write", "read",
                         "swap", "whole"])  # fmt: skip
        s = int(rng.integers(0, N_SEQ))
        t = int((s + 1 + rng.integers(0, N_SEQ - 1)) % N_SEQ)
        if op == "decode":
            items = [[1 + q, pos[q] + j, [q], False] for q in range(N_SEQ)
                     for j in range(int(rng.integers(0, 3)))]  # fmt: skip
            if not items:
                continue
            got = both("decode", items)
        elif op == "cp":  # t becomes a fork of s (a copy across streams)
            assert both("seq_rm", t, -1, -1) == [True, True]
            got = both("seq_cp", s, t, -1, -1)
        elif op == "rm_tail":
            got = both("seq_rm", s, max(0, pos[s] - int(rng.integers(1, 4))), -1)
        elif op == "rm_all":
            got = both("seq_rm", s, -1, -1)
        elif op == "write":
            got = both("state_write", s)
        elif op == "whole":  # the whole blob back, into the memory as it is or cleared
            blob = call(0, "state_write", -1)
            assert call(1, "state_write", -1) == blob
            if rng.integers(0, 2):
                both("clear", False)
            whole_taken.clear()
            got = both("state_read", blob)
            roads["whole"] += int(shared(twins[0]) and bool(whole_taken))
        else:
            blob = call(0, "state_write", s)
            assert call(1, "state_write", s) == blob
            dst = s if op == "swap" else t
            if op == "swap":
                both("seq_rm", dst, -1, -1)
            got = both("state_read", blob, dst)
        assert got[0] == got[1], (seed, step, op, got)
        assert _state(twins[0]) == _state(twins[1]), (seed, step, op)
        if kind in ("kv", "window"):
            check_invariants(twins[0])
        for q in range(N_SEQ):
            pos[q] = max(twins[0].seq_pos_max(q) + 1, 0)
    if kind in ("kv", "window") and unified:
        assert roads["beside"] > 0 and roads["inside"] > 0, roads
    if unified:
        assert roads["whole"] > 0, roads
    for mem in twins:
        mem.close()


def test_a_sequence_in_shared_cells_is_written_and_read_in_one_call(monkeypatch) -> None:
    """After seq_cp(1, 5): sequence 1's blob (its cells all shared with 5) is written by
    the one call with the general writer's bytes; read back, it cannot go into the cells
    it holds (the same-cells check declines: seq_rm takes only its bit out of them), so
    one call removes its bits and places it anew, as the numpy restore does. Sequence 0,
    beside the shared cells, goes back into its own cells."""
    twins = []
    for _ in range(2):
        kv = make_kv(64, N_SEQ, unified=True)
        randomize(kv, 7)
        items = [[1 + q, p, [q], False] for p in range(6) for q in range(3)]
        assert decode(kv, items) == 0
        kv.seq_cp(1, 5, -1, -1)
        twins.append(kv)
    kv, ref = twins
    view = kv._blob_view()
    assert view is not None
    out = bytearray(4096)
    with monkeypatch.context() as m:
        m.setattr(kv_state_io, "NATIVE_RUNS", False)
        want = {q: bytes(ref.state_write(q)) for q in (0, 1, 5)}
    for q in (0, 1, 5):
        n = view.write(out, q, "state_write")
        assert n is not None and bytes(out[:n]) == want[q], q
    placed: list[bool] = []
    real = kv_state_io.SeqBlob._placed
    monkeypatch.setattr(
        kv_state_io.SeqBlob, "_placed", lambda self, *a: placed.append(True) or real(self, *a)
    )
    n_multi = int(kv.cells.n_multi[0])
    assert n_multi == 6
    assert view.read(want[0], 0, store=False) == len(want[0]) and not placed  # its own cells
    assert view.read(want[1], 1, store=False) is None  # (no same cells; no store asked)
    assert kv.state_read(want[1], 1) == len(want[1]) and placed == [True]
    with monkeypatch.context() as m:
        m.setattr(kv_state_io, "NATIVE_RUNS", False)
        m.setattr(kv_state_io, "NATIVE_PLACE", False)
        m.setattr(kv_cache, "USE_NATIVE_RM", False)
        assert ref.state_read(want[1], 1) == len(want[1])
    assert _state(kv) == _state(ref)
    assert int(kv.cells.n_multi[0]) == 0  # 1 moved to cells of its own; 5 keeps the old
    check_invariants(kv)
    for k in twins:
        k.close()


@pytest.mark.parametrize("swa", [False, True], ids=["full", "window"])
@pytest.mark.parametrize("seed", range(3))
def test_forked_decode_runs_match_the_numpy_step(monkeypatch, swa: bool, seed: int) -> None:
    """Random steps of 1-3 tokens per sequence (so both one-stream mask kernels run),
    forks, tail removals and whole removals on a unified cache, with or without a window:
    one twin with every step kernel, one with none (the numpy step and masks). The same
    slots, indices, mask bytes and cells after every op."""
    from test_kv_decode_path import _drive

    from pymem.batch import BatchAllocator
    from pymem.kv import inputs as kv_inputs

    rng = np.random.default_rng(900 + seed + 10 * swa)
    kw: dict[str, Any] = {"swa_type": SWAType.STANDARD, "n_swa": 4} if swa else {}
    twins = [make_kv(160, N_SEQ, unified=True, **kw) for _ in range(2)]
    allocs = [BatchAllocator(), BatchAllocator()]
    kinds: set[str] = set()  # which one-stream kernels ran on shared cells
    real_one, real_lists = kv_inputs._mask_one_per_seq, kv_inputs._mask_seq_lists

    def spy(kind: str, real: Any) -> Any:
        def run(cells, *args):  # type: ignore[no-untyped-def]
            if cells.n_multi:
                kinds.add(kind)
            return real(cells, *args)

        return run

    monkeypatch.setattr(kv_inputs, "_mask_one_per_seq", spy("one", real_one))
    monkeypatch.setattr(kv_inputs, "_mask_seq_lists", spy("lists", real_lists))

    def step(i: int, seqs: list[int], pos: list[int]) -> Any:
        with monkeypatch.context() as m:
            m.setattr(kv_cache, "USE_NATIVE", i == 0)
            m.setattr(kv_inputs, "USE_NATIVE", i == 0)
            # a step that finds no slot answers its status: both twins must agree on it
            return _drive(twins[i], allocs[i], seqs, pos, np.float16, may_fail=True)

    for n in range(60):
        op = rng.choice(["step", "step", "step", "fork", "rm_tail", "rm_all"])
        s = int(rng.integers(0, N_SEQ))
        t = int((s + 1 + rng.integers(0, N_SEQ - 1)) % N_SEQ)
        if op == "step":
            seqs, pos = [], []
            for q in rng.permutation(N_SEQ)[: int(rng.integers(1, N_SEQ + 1))].tolist():
                k = int(rng.integers(1, 4)) if rng.random() < 0.5 else 1
                start = twins[0].seq_pos_max(q) + 1
                seqs += [q] * k
                pos += list(range(start, start + k))
            got = [step(i, seqs, pos) for i in range(2)]
        elif op == "fork":
            for kv in twins:
                kv.seq_rm(t, -1, -1)
                kv.seq_cp(s, t, -1, -1)
            got = [None, None]
        elif op == "rm_tail":
            got = [kv.seq_rm(s, max(0, kv.seq_pos_max(s) - 2), -1) for kv in twins]
        else:
            got = [kv.seq_rm(s, -1, -1) for kv in twins]
        assert got[0] == got[1], (seed, n, op)
        assert _state(twins[0]) == _state(twins[1]), (seed, n, op)
        check_invariants(twins[0])
    assert kinds == {"one", "lists"}, kinds
    for kv in twins:
        kv.close()


@pytest.mark.parametrize("seed", range(40))
def test_native_record_chase_equals_numpy(monkeypatch, seed: int) -> None:
    """The offsets of a whole blob's variable-length records (cells shared by several
    sequences list several ids): the one-pass native chase gives the offsets, end and
    error message of numpy's pointer doubling, for well-formed streams and for ones cut
    short or with a count past n_seq_max anywhere."""
    rng = np.random.default_rng(seed)
    n_seq_max, fixed = int(rng.integers(1, 9)), int(rng.choice([2, 5]))
    n = int(rng.integers(1, 40))
    words: list[int] = []
    for _ in range(n):
        count = int(rng.integers(0, n_seq_max + 1))
        words += [int(rng.integers(0, 99)), count] + [7] * (fixed - 2) + [1] * count
    words += [int(rng.integers(-5, 99)) for _ in range(int(rng.integers(0, 30)))]  # the rest
    arr = np.array(words, dtype=np.int32)
    fault = rng.integers(0, 3)
    if fault == 1:  # a count past n_seq_max (or read as a huge unsigned one)
        at = 1 + fixed * int(rng.integers(0, n))
        arr[min(at, arr.size - 1)] = int(rng.choice([n_seq_max + 1, n_seq_max + 50, -1]))
    elif fault == 2:  # cut short
        arr = arr[: int(rng.integers(fixed, arr.size + 1))]
    got = []
    for native in (True, False):
        monkeypatch.setattr(kv_state_io, "NATIVE_CHASE", native)
        try:
            offs, end = kv_state_io._chase_records(arr, n, fixed, n_seq_max, "kv")
            got.append((offs.tolist(), end))
        except kv_state_io.StateError as exc:
            got.append(str(exc))
    assert got[0] == got[1], (seed, got)


@pytest.mark.parametrize(
    "words, n, message",
    [
        ([0, 2, 1], 1, "truncated reading the sequence ids of cell 0"),
        ([0, 1, 3, 0], 2, "truncated reading cell 1"),
        ([0, 9, 1, 1], 1, "cell 0 has n_seq_id = 9 > n_seq_max = 4"),
        ([0], 1, r"truncated reading cell 0 \(need 2 words, 1 left\)"),
    ],
)
def test_record_chase_names_each_fault(monkeypatch, words, n, message) -> None:
    """Each fault of a record stream (fixed 2 words, n_seq_max 4), both roads."""
    arr = np.array(words, dtype=np.int32)
    for native in (True, False):
        monkeypatch.setattr(kv_state_io, "NATIVE_CHASE", native)
        with pytest.raises(kv_state_io.StateError, match=message):
            kv_state_io._chase_records(arr, n, 2, 4, "kv")


def _records_var(words: np.ndarray, span: int, n: int, fixed: int, n_seq_max: int) -> tuple:
    """pm_kv_records_var on ``words`` (any alignment) -> (end, multi)."""
    out = ffi.new("int64_t[2]")
    status = lib.pm_kv_records_var(
        ffi.from_buffer("int32_t[]", words), span, n, fixed, n_seq_max, out, out + 1
    )
    assert status == lib.PM_OK
    return int(out[0]), int(out[1])


def _records_var_reference(words: np.ndarray, n: int, fixed: int, n_seq_max: int) -> tuple:
    """The general parse's decode of the same records, which also names faults; the
    native test adds one rule, that a record lists one id at least."""
    try:
        _, _, seq, end = kv_state_io._decode_meta_whole(words, n, fixed - 2, n_seq_max, "kv")
    except StateError:
        return -1, 0
    counts = (seq >= 0).sum(axis=1)
    if (counts == 0).any():
        return -1, 0
    return end, int((counts > 1).sum())


def _cells_snapshot(st: StackedCells) -> tuple:
    return (st.pos_f.tobytes(), st.owner_f.tobytes(), st.seq_f.tobytes(), st.n_multi.tolist(),
            st.used.tolist(), st.used_max_p1.tolist(), st.pmin.tobytes(), st.pmax.tobytes())  # fmt: skip


@pytest.mark.parametrize("seed", range(80))
def test_variable_records_test_equals_the_general_parse(seed: int) -> None:
    """Whole-blob records of one to three ids (a forked cache's: runs of records with as
    many ids, which the kernels take eight at a time), with or without ext, read at every
    alignment and with at most one fault anywhere (no id, too many, an id listed twice or
    out of range, a negative position, cut short): pm_kv_records_var's end and
    shared-cell count are the general parse's; a fault it finds, the parse refuses.
    Without ext the refill places the same records (into an emptied stack and into a
    used one) as numpy's set_new of the parse's decode, or declines the fault with
    nothing changed."""
    rng = np.random.default_rng(seed)
    n_seq_max, fixed = int(rng.integers(2, 9)), int(rng.choice([2, 2, 5]))
    words: list[int] = []
    starts: list[int] = []  # each record's first word
    while len(starts) < 40:
        k = int(rng.integers(1, min(3, n_seq_max) + 1))
        one_set = rng.random() < 0.5  # a run of one id set (a sequence and its fork)
        ids = rng.choice(n_seq_max, size=k, replace=False).tolist()
        for _ in range(int(rng.integers(1, 13))):
            starts.append(len(words))
            if not one_set:
                ids = rng.choice(n_seq_max, size=k, replace=False).tolist()
            words += [int(rng.integers(0, 99)), k] + [7] * (fixed - 2) + ids
    n = len(starts)
    arr = np.array(words, dtype=np.int32)
    span = arr.size
    at = starts[int(rng.integers(0, n))]
    fault = int(rng.integers(0, 7))
    if fault == 1:
        arr[at + 1] = 0  # no id
    elif fault == 2:
        arr[at + 1] = n_seq_max + 1  # more ids than sequences
    elif fault == 3 and arr[at + 1] >= 2:
        arr[at + fixed + 1] = arr[at + fixed]  # an id twice
    elif fault == 4:
        arr[at + fixed + int(arr[at + 1]) - 1] = int(rng.choice([-1, n_seq_max]))
    elif fault == 5:
        arr[at] = -int(rng.integers(1, 9))
    elif fault == 6:
        span = int(rng.integers(0, arr.size))  # cut short
    want = _records_var_reference(arr[:span], n, fixed, n_seq_max)
    shift = seed % 4
    buf = bytes(shift) + arr.tobytes()
    view = np.frombuffer(buf, dtype="<i4", offset=shift, count=arr.size)
    assert _records_var(view, span, n, fixed, n_seq_max) == want, (seed, fault)
    if fault == 0:
        assert want[0] == arr.size
    if fixed == 2:
        _refill_as_the_reference(view, span, n, n_seq_max, want, 256, seed)


def _refill_as_the_reference(
    view: np.ndarray, span: int, n: int, n_seq_max: int, want: tuple, n_seq_ids: int, label: object
) -> None:
    """pm_step_kv_refill with spans of the ``n`` variable records at ``view`` (no ext)
    into stream 1 of a two-stream stack with bitsets for ``n_seq_ids`` ids, emptied and
    used: the cells numpy's set_new of the general parse's decode leaves, or (``want``
    end -1: the parse refuses them) declined with nothing changed."""
    for used in (False, True):
        twins = [StackedCells(2, max(64, n + 8), n_seq_ids=n_seq_ids) for _ in range(2)]
        for st in twins:
            st.fit(n_seq_max - 1)
            if used:
                st.set_new(
                    np.array([1]), np.array([[n + 3]]), np.array([9]), np.array([[1]], np.int32)
                )
        before = _cells_snapshot(twins[0])
        placed = ffi.new("int32_t *")
        ptrs = ffi.new("int32_t *[]", [ffi.NULL, ffi.from_buffer("int32_t[]", view)])
        status = lib.pm_step_kv_refill(
            twins[0].native(), ptrs, ffi.new("int64_t[]", [0, n]), ffi.new("int64_t[]", [0, span]),
            3, n_seq_max, placed,
        )  # fmt: skip
        assert status == lib.PM_OK and placed[0] == int(want[0] >= 0), (label, used)
        if want[0] < 0:
            assert _cells_snapshot(twins[0]) == before, (label, used)
            continue
        pos, _, seq, _ = kv_state_io._decode_meta_whole(view[:span], n, 0, n_seq_max, "kv")
        twins[1].reset()
        twins[1].set_new(np.array([1]), np.arange(n)[None, :], pos, seq)
        assert _cells_snapshot(twins[0]) == _cells_snapshot(twins[1]), (label, used)


def _run_blocks(blocks: list[tuple[int, list[int]]], p0: int = 100) -> np.ndarray:
    """Variable records (no ext) of runs of consecutive positions from ``p0``: each block
    ``(length, ids)`` is that many records listing ``ids``. E.g. [(2, [1, 5]), (1, [0])]
    from 100: 100, 2, 1, 5, 101, 2, 1, 5, 102, 1, 0."""
    words: list[int] = []
    p = p0
    for length, ids in blocks:
        for _ in range(length):
            words += [p, len(ids), *ids]
            p += 1
    return np.array(words, dtype=np.int64).astype(np.int32)  # (positions past INT32_MAX wrap)


@pytest.mark.parametrize("n_seq_ids", [8, 256])  # one-word bitsets (one store a cell), four
def test_variable_blocks_of_sixteen_equal_the_general_parse(n_seq_ids: int) -> None:
    """A forked blob's records come in blocks of sixteen of one sequence or one pair of
    sequences at consecutive positions, which pm_kv_records_var and the variable refill
    check at once (word against the run's pattern) and store without reading them one by
    one. Every word of every record of such blocks, faulted (a negative position, another
    count, an id past n_seq_max or negative, the pair's ids equal, another id or pair, a
    position off the run), and a block cut short by the readable span, gives the general
    parse's answer: its end and shared-cell count, and the refill places its decode or
    declines with nothing changed."""
    n_seq_max = 6
    layout = [(16, [1, 5]), (32, [0]), (16, [5, 1]), (16, [2]), (16, [3, 4]), (7, [1, 5])]
    good = _run_blocks(layout)
    n = sum(length for length, _ in layout)
    cases: list[tuple[str, np.ndarray]] = [("good", good)]
    starts = np.cumsum([0] + [2 + len(ids) for length, ids in layout for _ in range(length)])
    for i in range(n):
        at, k = int(starts[i]), int(good[starts[i] + 1])
        p = int(good[at])
        faults = [(0, -1), (0, p + 1), (0, p - 1), (1, k + 1), (1, k - 1), (2, n_seq_max), (2, -1)]
        if k == 2:
            faults += [(3, n_seq_max), (3, -1), (3, int(good[at + 2])), (3, 0), (2, 4)]
        else:
            faults += [(2, 4)]
        for word, value in faults:
            bad = good.copy()
            bad[at + word] = value
            cases.append((f"record {i} word {word} = {value}", bad))
    # whole blocks that match a run's pattern but not the rules: ids out of range, a pair
    # of one id; positions that would wrap past INT32_MAX
    # of one id; positions that would wrap past INT32_MAX (each block then a good one: a
    # block is taken whole only with words past it)
    after = _run_blocks([(16, [0])])
    for ids in ([1, 1], [1, n_seq_max], [n_seq_max, 1], [-1, 1], [1, -1], [n_seq_max], [-1]):
        cases.append((f"a block of {ids}", np.concatenate([_run_blocks([(16, ids)]), after])))
    last = _run_blocks([(16, [n_seq_max])], p0=116)  # (a last block: 48 words left)
    cases.append(("a last block of [n_seq_max]", np.concatenate([after, last])))
    wrapping = _run_blocks([(16, [1, 5])], p0=2**31 - 4)
    cases.append(("past INT32_MAX", np.concatenate([wrapping, after])))
    for label, arr in cases:
        count = n if label.startswith(("good", "record")) else 32
        want = _records_var_reference(arr, count, 2, n_seq_max)
        assert _records_var(arr, arr.size, count, 2, n_seq_max) == want, label
        _refill_as_the_reference(arr, arr.size, count, n_seq_max, want, n_seq_ids, label)
    # a last block whose last word lies past the readable span (the buffer holds it)
    for ids in ([1, 5], [0]):
        cut = _run_blocks([(16, [2]), (16, ids)])
        want = _records_var_reference(cut[:-1], 32, 2, n_seq_max)
        assert want[0] == -1 and _records_var(cut, cut.size - 1, 32, 2, n_seq_max) == want
        _refill_as_the_reference(cut, cut.size - 1, 32, n_seq_max, want, n_seq_ids, ids)
    assert _records_var(good, good.size, n, 2, n_seq_max) == (good.size, 16 * 3 + 7)
    assert all(_records_var_reference(a, 32, 2, n_seq_max)[0] == -1 for _, a in cases[-9:])


def test_variable_records_test_refuses_bad_arguments() -> None:
    words = np.array([0, 1, 0], dtype=np.int32)
    wp = ffi.from_buffer("int32_t[]", words)
    out = ffi.new("int64_t[2]")
    assert lib.pm_kv_records_var(ffi.NULL, 3, 1, 2, 4, out, out + 1) == lib.PM_ERR_ARG
    for span, n, fixed, n_seq_max in ((-1, 1, 2, 4), (3, -1, 2, 4), (3, 1, 1, 4), (3, 1, 2, 0),
                                      (3, 1, 2, 257)):  # fmt: skip
        assert lib.pm_kv_records_var(wp, span, n, fixed, n_seq_max, out, out + 1) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_var(wp, 3, 1, 2, 4, ffi.NULL, out) == lib.PM_ERR_ARG


@pytest.mark.parametrize("into_empty", [True, False])
def test_refill_places_variable_records_and_declines_bad_ones(into_empty: bool) -> None:
    """pm_step_kv_refill with spans: records listing several ids become shared cells
    (owner -2, every id's bit, n_multi counted, each id's bounds), as numpy's set_new of
    the same records leaves them; a bad variable record in the last stream (an id twice,
    no id, past the span) is declined with nothing changed, into an emptied stack (checked
    as it writes, undone) and into a used one (checked first)."""
    records = [[0, 1, 0], [1, 2, 0, 2], [2, 3, 2, 1, 0], [3, 1, 1]]
    good = np.array([w for r in records for w in r], dtype=np.int32)
    twins = [StackedCells(2, 16) for _ in range(2)]
    for st in twins:
        st.fit(3)
        if not into_empty:  # a used stack: cells to empty around the refill
            st.set_new(np.array([1]), np.array([[5]]), np.array([9]), np.array([[1]], np.int32))
    # numpy's reference: the decoded records into stream 1's cells [0, 4) of twin 1
    ref = twins[1]
    pos, _, seq, end = kv_state_io._decode_meta_whole(good, 4, 0, 3, "kv")
    assert end == good.size
    placed = ffi.new("int32_t *")
    c = twins[0].native()

    def refill(words: np.ndarray, span: int) -> int:
        ptrs = ffi.new("int32_t *[]", [ffi.NULL, ffi.from_buffer("int32_t[]", words)])
        counts = ffi.new("int64_t[]", [0, 4])
        spans = ffi.new("int64_t[]", [0, span])
        return lib.pm_step_kv_refill(c, ptrs, counts, spans, 3, 3, placed)

    before = _cells_snapshot(twins[0])
    twice = good.copy()
    twice[6 + 3] = twice[6 + 2]  # record 2 lists id 2 twice
    none = good.copy()
    none[3 + 1] = 0  # record 1 lists no id
    for bad, span in ((twice, good.size), (none, good.size), (good, good.size - 1)):
        assert refill(bad, span) == lib.PM_OK and placed[0] == 0
        assert _cells_snapshot(twins[0]) == before
    # and without spans only fixed records are taken
    ptrs = ffi.new("int32_t *[]", [ffi.NULL, ffi.from_buffer("int32_t[]", good)])
    counts = ffi.new("int64_t[]", [0, 4])
    assert lib.pm_step_kv_refill(c, ptrs, counts, ffi.NULL, 3, 3, placed) == lib.PM_OK
    assert placed[0] == 0 and _cells_snapshot(twins[0]) == before
    assert refill(good, good.size) == lib.PM_OK and placed[0] == 1
    ref.reset()
    ref.set_new(np.array([1]), np.arange(4)[None, :], pos, seq)
    st = twins[0]
    assert st.owner_f[16:20].tolist() == [0, -2, -2, 1]
    assert st.n_multi.tolist() == [0, 2] and st.used.tolist() == [0, 4]
    assert _cells_snapshot(st) == _cells_snapshot(ref)


def _memory_of(kind: str, unified: bool, v_trans: bool, seed: int) -> Any:
    """An empty memory of ``kind`` (kv, window, hybrid or iswa) with random tensors."""
    if kind in ("kv", "window"):
        swa = {"swa_type": SWAType.STANDARD, "n_swa": 3} if kind == "window" else {}
        return _forked_kv(unified, v_trans, seed, **swa)
    if kind == "hybrid":
        return make_hybrid("RAR", n_seq_max=N_SEQ, unified=unified)
    mem = make_iswa(96, N_SEQ, v_trans=v_trans, spec=iswa_spec(n_swa=3))
    randomize_any(mem, seed)
    return mem


def _written_as_the_general_writer(monkeypatch, mem: Any) -> int:
    """Assert that ``mem``'s whole blob, written, sized and written into a buffer by the
    native writers (a composite's one call taken), has the general writer's bytes; its
    length."""
    with monkeypatch.context() as m:
        m.setattr(kv_state_io, "NATIVE_RUNS", False)
        m.setattr(CompositeMemory, "_native_write", lambda self, *a, **k: None)
        want = bytes(mem.state_write())
    assert bytes(mem.state_write()) == want
    assert mem.state_size() == len(want)
    buf = bytearray(len(want) + 8)
    assert mem.state_write_buffer(buf) == len(want) and bytes(buf[: len(want)]) == want
    if isinstance(mem, CompositeMemory):
        assert mem._native_write(bytearray(len(want)), -1, 0) == len(want)
    return len(want)


@pytest.mark.parametrize(
    "kind, unified, v_trans",
    [("kv", True, True), ("kv", True, False), ("kv", False, True), ("window", True, False),
     ("hybrid", True, False), ("iswa", True, True)],
)  # fmt: skip
def test_whole_blob_of_a_forked_memory_is_written_natively(
    monkeypatch, kind, unified, v_trans
) -> None:
    """A memory whose cells are shared by two or three sequences (nested forks) and held
    by one: its whole blob, whose records list each cell's ids in ascending order, is
    written by the native writers (the single cache's per-stream sections, a composite's
    one call) with the bytes of the general writer, and sized exactly."""
    mem = _memory_of(kind, unified, v_trans, 3)
    items = [[1 + q, p, [q], False] for p in range(5) for q in range(3)]
    assert decode(mem, items, n_ubatch=16) == 0
    mem.seq_cp(0, 4, -1, -1)
    # cells of 0, 4 and 5; of 0 and 4; of 0 alone (across streams: a whole copy)
    mem.seq_cp(4, 5, 1, 4) if unified else mem.seq_cp(4, 5, -1, -1)
    _written_as_the_general_writer(monkeypatch, mem)
    if not isinstance(mem, CompositeMemory):  # a single cache's per-stream sections
        assert mem._whole_writer(0) is not None
    if unified:
        assert any(
            int(p.cells.n_multi.sum()) for p in mem.parts().values() if hasattr(p, "v_cells")
        )
    mem.close()


@pytest.mark.parametrize("kind", ["kv", "kv-rows", "hybrid", "iswa"])
def test_whole_blob_of_long_one_id_runs_beside_shared_cells(monkeypatch, kind) -> None:
    """A forked memory whose cells are a run of 40 one-id cells and one of 40 cells
    shared by one pair of sequences (the native kernels take such records sixteen or
    eight at a time; the writer's blocks of sixteen cells of one set, at cells 48 and 64):
    its whole blob, written natively, has the general writer's bytes, and read back
    natively into the cleared memory (taken by the one-call roads) leaves what the numpy
    roads leave."""
    if kind.startswith("kv"):
        mem = _forked_kv(True, kind == "kv", 7)
    elif kind == "hybrid":
        mem = make_hybrid("RAR", n_seq_max=N_SEQ, unified=True)
    else:
        mem = make_iswa(96, N_SEQ, v_trans=True, spec=iswa_spec(n_swa=3))
        randomize_any(mem, 7)
    mem.clear(True)
    items = [[1 + q, p, [q], False] for q in (1, 2) for p in range(20)]  # 40 cells of one id
    assert decode(mem, items, n_ubatch=40) == 0
    assert decode(mem, [[3, p, [0], False] for p in range(40)], n_ubatch=40) == 0
    mem.seq_cp(0, 4, -1, -1)  # forty cells shared by 0 and 4 after them
    _written_as_the_general_writer(monkeypatch, mem)
    blob = bytes(mem.state_write())
    taken: list[bool] = []  # whether each whole parse of the one-call roads took the blob
    real_whole, real_one_call = kv_state_io.SeqBlob.read_whole, CompositeMemory._native_read
    real_empty = KVCache._read_whole_into_empty

    def whole(self, data, mode):  # type: ignore[no-untyped-def]
        found = real_whole(self, data, mode)
        taken.append(found is not None)
        return found

    def into_empty(self, data):  # type: ignore[no-untyped-def]
        done = real_empty(self, data)
        taken.append(done is not None)
        return done

    def one_call(self, data, seq_id, flags):  # type: ignore[no-untyped-def]
        done = real_one_call(self, data, seq_id, flags)
        taken.append(done is not None)
        return done

    states = []
    for native in (True, False):
        with monkeypatch.context() as m:
            if native:
                m.setattr(kv_state_io.SeqBlob, "read_whole", whole)
                m.setattr(KVCache, "_read_whole_into_empty", into_empty)
                m.setattr(CompositeMemory, "_native_read", one_call)
            else:
                m.setattr(kv_state_io, "NATIVE_RUNS", False)
                m.setattr(kv_state_io, "NATIVE_PLACE", False)
                m.setattr(CompositeMemory, "_native_read", lambda self, d, q, f: None)
                m.setattr(CompositeMemory, "seq_reader", lambda self, q, f: None)
            mem.clear(False)
            assert mem.state_read(blob) == len(blob)
            states.append(_state(mem))
    assert states[0] == states[1]
    assert states[0][0] == blob
    assert taken and all(taken), taken  # the one-call roads took the blob
    mem.close()


@pytest.mark.parametrize("kind", ["kv", "iswa"])
@pytest.mark.parametrize("forked", [False, True])
def test_whole_blob_of_cells_past_n_seq_max_is_the_general_writers(monkeypatch, kind, forked):
    """A unified memory holding cells of a sequence at or past n_seq_max (the reference's
    quirk: such ids are accepted, and whole records list only ids below n_seq_max), alone
    or beside a fork: its whole blob, written natively (a composite's one call, whose
    fixed-record writer takes only streams of one id below n_seq_max per cell), has the
    general writer's bytes. A writer that took such a stream as fixed records wrote the
    hidden id (found by the spec's random programs with prefix reuse)."""
    if kind == "kv":
        mem = _forked_kv(True, True, 5)
    else:
        mem = make_iswa(96, N_SEQ, v_trans=True, spec=iswa_spec(n_swa=3))
        randomize_any(mem, 5)
    items = [[1 + q, p, [q], False] for p in range(5) for q in range(3)]
    assert decode(mem, items, n_ubatch=16) == 0
    hidden = N_SEQ + 3  # (< 256: a unified cache takes it)
    mem.seq_cp(0, hidden, -1, -1)
    mem.seq_rm(0, -1, -1)  # cells of the hidden sequence alone
    if forked:
        mem.seq_cp(1, 4, -1, -1)
    parts = mem.parts().values() if isinstance(mem, CompositeMemory) else [mem]
    kvs = [p for p in parts if isinstance(p, KVCache)]
    assert any((p.cells.owner == hidden).any() for p in kvs)
    assert bool(sum(int(p.cells.n_multi.sum()) for p in kvs)) == forked
    _written_as_the_general_writer(monkeypatch, mem)
    mem.close()


def test_a_composite_rolls_a_live_sequence_back_in_one_call(monkeypatch) -> None:
    """A hybrid's sequence read back from an older, shorter blob while it holds more cells
    (a rollback: its blob does not go back into the cells it holds) is placed anew by
    the composite's one call (``pm_seq_read`` falls back from the same-cells check to the
    placed read), leaving what the general two-phase restore leaves."""
    twins = [make_hybrid("RAR", n_seq_max=N_SEQ, unified=True) for _ in range(2)]
    old = None
    for mem in twins:
        assert decode(mem, [[1 + q, p, [q], False] for p in range(4) for q in range(3)]) == 0
        old = bytes(mem.state_write(0))
        assert decode(mem, [[7, p, [0], False] for p in range(4, 7)]) == 0
    assert old is not None
    assert twins[0]._native_read(old, 0, 0) == len(old)  # taken by the one call
    with monkeypatch.context() as m:
        m.setattr(CompositeMemory, "_native_read", lambda self, d, s, f: None)
        m.setattr(CompositeMemory, "seq_reader", lambda self, s, f: None)
        m.setattr(kv_state_io, "NATIVE_PLACE", False)
        assert twins[1].state_read(old, 0) == len(old)
    assert _state(twins[0]) == _state(twins[1])
    assert twins[0].seq_pos_max(0) == 3
    for mem in twins:
        mem.close()


@pytest.mark.parametrize("seed", range(30))
def test_record_id_count_equals_numpy(seed: int) -> None:
    """pm_kv_record_ids (the ids a whole blob's records list: a cell of one sequence below
    n_seq_max one, a shared cell each of its ids below n_seq_max, a cell of a sequence
    at or past n_seq_max none) against numpy on random streams of 1-4 bitset words with
    blocks of one-id cells (the kernel passes those sixteen at a time) between shared
    ones, any n_seq_max, over random runs."""
    rng = np.random.default_rng(seed)
    n_words = int(rng.integers(1, 5))
    n_seq_max = int(rng.integers(1, 64 * n_words + 1))
    size = int(rng.integers(1, 200))
    owner = np.full(size, -1, dtype=np.int32)
    bits = np.zeros((size, n_words), dtype=np.uint64)
    kinds = np.repeat(rng.random(size), rng.integers(1, 40, size))[:size]  # segments
    for c in range(size):
        kind = kinds[c]
        if kind < 0.1:
            continue  # empty
        if kind < 0.3:  # shared: two to four ids anywhere in the bitset
            ids = rng.choice(64 * n_words, size=int(rng.integers(2, 5)), replace=False)
            owner[c] = -2
        else:  # one sequence, mostly below n_seq_max
            ids = [int(rng.integers(0, n_seq_max)) if rng.random() < 0.97
                   else int(rng.integers(0, 64 * n_words))]  # fmt: skip
            owner[c] = ids[0]
        for q in ids:
            bits[c, q >> 6] |= np.uint64(1) << np.uint64(q & 63)
    want_per_cell = np.zeros(size, dtype=np.int64)
    for c in range(size):
        if owner[c] == -2:
            qs = [64 * w + b for w in range(n_words) for b in range(64) if int(bits[c, w]) >> b & 1]
            want_per_cell[c] = sum(q < n_seq_max for q in qs)
        elif owner[c] >= 0:
            want_per_cell[c] = int(owner[c] < n_seq_max)
    # random ascending runs
    edges = np.unique(rng.integers(0, size + 1, size=2 * int(rng.integers(1, 6))))
    if edges.size % 2:
        edges = edges[:-1]
    starts, ends = edges[0::2].astype(np.int64), edges[1::2].astype(np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    want = sum(int(want_per_cell[a:e].sum()) for a, e in zip(starts, ends))
    ids = ffi.new("int64_t *")
    status = lib.pm_kv_record_ids(
        ffi.from_buffer("int32_t[]", owner), size, ffi.from_buffer("uint64_t[]", bits), n_words,
        n_seq_max, ffi.from_buffer("int64_t[]", starts), ffi.from_buffer("int64_t[]", ends),
        starts.size, ids,
    )  # fmt: skip
    assert status == lib.PM_OK
    assert ids[0] == want, (seed, n_words, n_seq_max)


def _forked_memory(kind: str) -> Any:
    """A memory whose cells are shared by two and three sequences (nested forks), packed
    from cell 0 by a whole read of its own blob (so that its blob is its cells)."""
    mem = _memory_of(kind, True, True, 5)
    items = [[1 + q, p, [q], False] for p in range(6) for q in range(3)]
    assert decode(mem, items, n_ubatch=18) == 0
    mem.seq_cp(0, 4, -1, -1)
    mem.seq_cp(4, 5, 1, 4)
    mem.seq_rm(1, 2, 3)  # a hole: the blob packs the cells
    assert mem.state_read(bytes(mem.state_write())) > 0
    return mem


def _decode_records(words: np.ndarray, n: int) -> list[tuple[int, list[int]]]:
    """n variable records (position, count, ids) -> [(position, ids)]."""
    out, o = [], 0
    for _ in range(n):
        k = int(words[o + 1])
        out.append((int(words[o]), [int(q) for q in words[o + 2 : o + 2 + k]]))
        o += 2 + k
    return out


def _encode_records(recs: list[tuple[int, list[int]]]) -> np.ndarray:
    return np.array([w for p, ids in recs for w in (p, len(ids), *ids)], dtype=np.int32)


def _equal_var(c: Any, words: np.ndarray, n: int, n_seq_max: int, span: int | None = None) -> int:
    """pm_step_kv_cells_equal_var on stream 0: the words the records take, or -1."""
    end = ffi.new("int64_t *")
    span = words.size if span is None else span
    buf = ffi.from_buffer("int32_t[]", words)
    assert lib.pm_step_kv_cells_equal_var(c, 0, buf, span, n, n_seq_max, end) == lib.PM_OK
    return int(end[0])


def _equal_var_reference(kv: KVCache, recs: list[tuple[int, list[int]]]) -> bool | None:
    """whole_same_reference on the records, None when they are not valid ones (the
    native pass must then say "not the cells")."""
    for p, ids in recs:
        if p < 0 or not ids or len(set(ids)) != len(ids) or not all(0 <= q < N_SEQ for q in ids):
            return None
    k = max(len(ids) for _, ids in recs)
    seq = np.full((len(recs), k), -1, dtype=np.int32)
    for i, (_, ids) in enumerate(recs):
        seq[i, : len(ids)] = ids
    pos = np.array([p for p, _ in recs], dtype=np.int32)
    return kv_state_io.whole_same_reference(kv.v_cells[0], pos, np.zeros((pos.size, 0)), seq)


@pytest.mark.parametrize("seed", range(6))
def test_variable_records_equality_equals_numpy(seed: int) -> None:
    """pm_step_kv_cells_equal_var (do a forked cache's cells already hold its whole blob's
    variable records?) against whole_same_reference, on the cache's own records and on
    each of a dozen changes to them: a position, an id swapped, dropped, added or
    repeated, the ids of a shared cell in another order (still the cells), an id past
    n_seq_max, a count of 0, a record cut off, one record more or fewer."""
    rng = np.random.default_rng(seed)
    kv = _forked_memory("kv")
    blob = bytes(kv.state_write())
    found = kv._blob_view().read_whole(memoryview(blob), 2)
    assert found is not None
    n, at = int(found.counts[0]), int(found.offsets[0])
    words = np.frombuffer(blob, "<i4", offset=at, count=(len(blob) - at) // 4)
    own = _decode_records(words, n)
    c = kv._native_cells()[0]
    shared = [i for i, (_, ids) in enumerate(own) if len(ids) > 1]
    single = [i for i, (_, ids) in enumerate(own) if len(ids) == 1]
    assert shared and single and int(kv.cells.n_multi[0]) == len(shared)
    own_words = _encode_records(own)
    assert _equal_var(c, own_words, n, N_SEQ) == own_words.size  # the cells: same
    assert _equal_var_reference(kv, own) is True
    i_sh, i_one = int(rng.choice(shared)), int(rng.choice(single))

    def changed(i: int, p: int | None = None, ids: list[int] | None = None) -> list:
        recs = [(q, list(x)) for q, x in own]
        recs[i] = (recs[i][0] if p is None else p, recs[i][1] if ids is None else ids)
        return recs

    sh_ids, one_id = own[i_sh][1], own[i_one][1][0]
    other = next(q for q in range(N_SEQ) if q not in sh_ids)
    cases = {
        "position": changed(i_one, p=own[i_one][0] + 1),
        "shared position": changed(i_sh, p=own[i_sh][0] + 1),
        "id swapped": changed(i_one, ids=[(one_id + 1) % N_SEQ]),
        "shared id swapped": changed(i_sh, ids=[other, *sh_ids[1:]]),
        "id dropped": changed(i_sh, ids=sh_ids[:-1]),
        "id added": changed(i_one, ids=[one_id, (one_id + 1) % N_SEQ]),
        "shared id added": changed(i_sh, ids=[*sh_ids, other]),
        "id repeated": changed(i_sh, ids=[sh_ids[0]] * len(sh_ids)),
        "ids reversed": changed(i_sh, ids=sh_ids[::-1]),
        "id past n_seq_max": changed(i_one, ids=[N_SEQ]),
        "negative position": changed(i_one, p=-1),
        "no id": changed(i_one, ids=[]),
    }
    for what, recs in cases.items():
        w = _encode_records(recs)
        want = _equal_var_reference(kv, recs)
        got = _equal_var(c, w, n, N_SEQ)
        assert (got >= 0) == bool(want), what
        assert got in (-1, w.size), what
    assert (
        cases["ids reversed"]
        and _equal_var(c, _encode_records(cases["ids reversed"]), n, N_SEQ) > 0
    )
    # a record cut off, one record fewer or more than the cells used
    assert _equal_var(c, own_words, n, N_SEQ, span=own_words.size - 1) == -1
    assert _equal_var(c, own_words, n - 1, N_SEQ) == -1
    more = _encode_records([*own, (99, [0])])
    assert _equal_var(c, more, n + 1, N_SEQ) == -1
    kv.close()


def test_variable_records_equality_in_blocks_of_sixteen_equals_numpy() -> None:
    """A forked stream's records in blocks of sixteen of one sequence or one pair at
    consecutive positions (one-word bitsets: the blocks are compared with the cells at
    once): its own records are the cells; each record of the blocks with its position,
    an id, its ids' order or its count changed is what whole_same_reference says, and
    so is a cell changed under unchanged records (its owner, its bits, its position)."""
    n_seq_max = 6
    layout = [(16, [1, 5]), (32, [0]), (16, [5, 1]), (16, [2]), (5, [3, 4])]
    words = _run_blocks(layout)
    n = sum(length for length, _ in layout)
    recs = _decode_records(words, n)
    st = StackedCells(1, n + 8, n_seq_ids=8)
    pos, _, seq, _ = kv_state_io._decode_meta_whole(words, n, 0, n_seq_max, "kv")
    st.set_new(np.array([0]), np.arange(n)[None, :], pos, seq)
    cells = KVCells.view(st, 0)
    c = st.native()

    def agrees(records: list[tuple[int, list[int]]], label: object) -> None:
        w = _encode_records(records)
        want = None
        if all(p >= 0 and ids and len(set(ids)) == len(ids) for p, ids in records) and all(
            0 <= q < n_seq_max for _, ids in records for q in ids
        ):
            k = max(len(ids) for _, ids in records)
            ids = np.full((len(records), k), -1, dtype=np.int32)
            for i, (_, r) in enumerate(records):
                ids[i, : len(r)] = r
            at = np.array([p for p, _ in records], dtype=np.int32)
            want = kv_state_io.whole_same_reference(cells, at, np.zeros((n, 0)), ids)
        got = _equal_var(c, w, len(records), n_seq_max)
        assert got in (-1, w.size) and (got >= 0) == bool(want), label

    agrees(recs, "own")
    assert _equal_var(c, words, n, n_seq_max) == words.size
    for i, (p, ids) in enumerate(recs):
        others = [q for q in range(n_seq_max) if q not in ids]
        for label, change in (("position", (p + 1, ids)), ("position back", (p - 1, ids)),
                              ("id", (p, [others[0], *ids[1:]])), ("order", (p, ids[::-1])),
                              ("one more id", (p, [*ids, others[0]])),
                              ("one id less", (p, ids[:1])), ("an id twice", (p, [ids[0]] * 2))):  # fmt: skip
            changed = list(recs)
            changed[i] = change
            agrees(changed, (i, label))
    shared = (0, 15, 48, 63, 80)  # a cell changed under the records (bits: shared cells')
    for i in (*shared, 16, 40, 47, 64, 79):
        for field, value in (("owner_f", 3), ("seq_f", 1 << 3), ("pos_f", 999)):
            if field == "seq_f" and i not in shared:
                continue  # (a cell of one owner is compared by its owner)
            arr = getattr(st, field)
            keep = arr[i].copy()
            arr[i] = value
            assert _equal_var(c, words, n, n_seq_max) == -1, (i, field)
            arr[i] = keep
    assert _equal_var(c, words, n, n_seq_max) == words.size


def test_variable_records_equality_reads_bitsets_and_refuses_bad_arguments() -> None:
    """A hand-built stream: a cell shared with an id past n_seq_max (hidden: its record,
    which cannot name it, is never the cell), ids in the second bitset word; the bad
    arguments refused."""
    st = StackedCells(2, 8)
    st.fit(70)
    gid = np.arange(3)
    st.pos_f[gid] = [0, 1, 2]
    st.seq_f[gid] = 0
    st.seq_f[0, 0] = 1 << 0
    st.seq_f[1, 0], st.seq_f[1, 1] = 1 << 1, 1 << (66 - 64)
    st.seq_f[2, 0], st.seq_f[2, 1] = 1 << 2, 1 << (70 - 64)
    st.owner_f[gid] = [0, -2, -2]
    st.n_multi[0] = 2
    st.used[0] = st.used_max_p1[0] = 3
    c = st.native()
    recs = [(0, [0]), (1, [66, 1]), (2, [2, 70])]
    w = _encode_records(recs)
    assert _equal_var(c, w, 3, 128) == w.size
    assert _equal_var(c, w, 3, 70) == -1  # 70 is past n_seq_max: not a record's id
    assert _equal_var(c, _encode_records([(0, [0]), (1, [66, 1]), (2, [2])]), 3, 128) == -1
    end = ffi.new("int64_t *")
    buf = ffi.from_buffer("int32_t[]", w)
    past = 64 * st.n_words + 1  # an n_seq_max past the bitsets' ids
    for args in [(ffi.NULL, 0, buf, w.size, 3, 128, end), (c, 0, ffi.NULL, w.size, 3, 128, end),
                 (c, 0, buf, w.size, 3, 128, ffi.NULL), (c, 2, buf, w.size, 3, 128, end),
                 (c, -1, buf, w.size, 3, 128, end), (c, 0, buf, -1, 3, 128, end),
                 (c, 0, buf, w.size, -1, 128, end), (c, 0, buf, w.size, 3, 0, end),
                 (c, 0, buf, w.size, 3, past, end)]:  # fmt: skip
        assert lib.pm_step_kv_cells_equal_var(*args) == lib.PM_ERR_ARG, args


@pytest.mark.parametrize("kind", ["kv", "hybrid", "iswa"])
def test_forked_memory_reads_its_own_blob_into_the_same_cells(monkeypatch, kind) -> None:
    """A forked memory reading its own whole blob: the parse finds the cells already are
    its records (a KV part's ``same``), so only the bytes are stored; the memory is then
    what a read into a cleared twin leaves (cells, bounds, bytes), and the bytes are the
    blob's even after every tensor was scrambled."""
    mem, twin = _forked_memory(kind), _forked_memory(kind)
    blob = bytes(mem.state_write())
    seen: list[int] = []
    real_commit = kv_cache._KVWholePart.commit

    def commit(self: Any, part: Any) -> None:
        seen.append(int(part.same))
        real_commit(self, part)

    monkeypatch.setattr(kv_cache._KVWholePart, "commit", commit)
    randomize_any(mem, 11)
    if isinstance(mem, KVCache):
        found = mem._blob_view().read_whole(memoryview(blob), 0)
        assert found is not None and found.same
    assert mem.state_read(blob) == len(blob)
    if isinstance(mem, CompositeMemory):
        assert seen and all(seen), seen  # every KV part: the same cells
    twin.clear()
    assert twin.state_read(blob) == len(blob)
    assert _state(mem) == _state(twin)
    assert bytes(mem.state_write()) == blob
    if isinstance(mem, KVCache):
        check_invariants(mem)
    mem.close()
    twin.close()


@pytest.mark.parametrize("native", [True, False])
def test_a_record_naming_a_hidden_sequence_is_refused_on_the_same_cells(
    monkeypatch, native: bool
) -> None:
    """Cells held by a sequence at or past n_seq_max (the reference's prefix quirk), and a
    blob whose records name it where the whole-cache writer names none: the same-cells
    test must not take the cells for those records (the parse refuses the id), on the
    one-call road and the general one; nothing changes."""
    hidden = N_SEQ + 3
    mems = []
    for q in (hidden, 5):  # twins, but for the id of the forked-off sequence
        mem = _forked_kv(True, True, 5)
        assert decode(mem, [[1 + s, p, [s], False] for p in range(5) for s in range(3)]) == 0
        mem.seq_cp(0, q, -1, -1)
        mem.seq_rm(0, -1, -1)
        mems.append(mem)
    blob = bytearray(mems[1].state_write())
    n = int.from_bytes(blob[4:8], "little")  # one stream: its cell count, then the records
    words = np.frombuffer(blob, "<i4", count=n * 3, offset=8).reshape(n, 3).copy()
    words[words[:, 2] == 5, 2] = hidden
    blob[8 : 8 + n * 12] = words.tobytes()
    if not native:
        monkeypatch.setattr(kv_state_io, "NATIVE_RUNS", False)
    before = _state(mems[0])
    with pytest.raises(StateError, match=rf"seq_id {hidden}"):
        mems[0].state_read(bytes(blob))
    assert _state(mems[0]) == before
    for mem in mems:
        mem.close()
