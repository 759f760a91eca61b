"""Restores that change no cell: a per-sequence restore whose sequence lands back in the
very cells it holds (``state_io.seq_same_cells``) and a whole restore into cells that
already are the blob's (``_whole_same_words``) skip the reference's seq_rm + find_slot +
apply (or clear + set_new). Pins that the native passes answer exactly as their numpy
references, that the cache after such a restore is the one the full placement leaves
(cells, heads, counters, bytes) in random caches with holes, shifts, ext and random heads,
that the one-call native byte store equals state_rows' per-tensor path, and that a failed
restore decided on this path still changes nothing."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from kv_helpers import check_invariants, decode
from test_kv_state import CFGS, build, randomize

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.errors import StateError
from pymem.kv import KVCache
from pymem.state import StateReader

NAMES = ["f16-trans", "f32-notrans", "q8_0-notrans", "f16-trans-streams", "mrope-ext"]


def _scenario(name: str, seed: int, n_cells: int = 64, n_seq: int = 3) -> KVCache:
    """A cache of interleaved sequences with holes (seq_rm of a middle and of a tail),
    sometimes a pending shift, random K/V bytes, and random heads; deterministic in seed."""
    rng = np.random.default_rng(seed)
    kv = build(CFGS[name], n_cells=n_cells, n_seq=n_seq)
    mrope = kv.n_pos_per_embd > 1
    pos = [0] * n_seq
    for _ in range(int(rng.integers(2, 6))):
        items = []
        for s in range(n_seq):
            for _ in range(int(rng.integers(0, 5))):
                items.append([1 + s, pos[s], [s], False])
                pos[s] += 1
        if items:
            decode(kv, items, n_ubatch=len(items))
    for s in range(n_seq):
        if pos[s] > 3 and rng.random() < 0.5:
            p0 = int(rng.integers(0, pos[s] - 1))
            kv.seq_rm(s, p0, p0 + int(rng.integers(1, 3)) if rng.random() < 0.5 else -1)
    if not mrope and rng.random() < 0.3:
        kv.seq_add(int(rng.integers(0, n_seq)), 0, -1, int(rng.integers(1, 4)))
    for strm in range(kv.n_stream):
        kv.v_heads[strm] = int(rng.integers(0, n_cells + 1))
    randomize(kv, seed)
    return kv


def _twin(name: str, seed: int) -> tuple[KVCache, KVCache]:
    return _scenario(name, seed), _scenario(name, seed)


def _state(kv: KVCache) -> tuple:
    """Everything a restore may change: every stream's cells and counters, the heads,
    the sequences' bounds, the K/V bytes."""
    cells = [c.snapshot() for c in kv.v_cells]
    flat = []
    for snap in cells:
        for x in snap:
            flat.append(x.tobytes() if isinstance(x, np.ndarray) else x)
    bounds = [(kv.seq_pos_min(s), kv.seq_pos_max(s)) for s in range(kv.n_seq_max)]
    data = [t.read_bytes() for layer in kv.layers for t in (layer.k, layer.v) if t is not None]
    return tuple(flat), list(kv.v_heads), bounds, data


def _words(blob: bytes, n_ext: int) -> np.ndarray:
    """The meta records of the one stream with cells of a per-sequence blob."""
    r = StateReader(blob)
    for _ in range(r.read_u32("n_stream")):
        n = r.read_u32("cell_count")
        if n:
            return r.read_array("<i4", n * (3 + n_ext), "cells").reshape(n, 3 + n_ext).copy()
    return np.zeros((0, 3 + n_ext), dtype=np.int32)


def _runs_equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_native_same_cells_test_equals_numpy_reference(name: str) -> None:
    """Own blobs (usually the same cells), perturbed records (a position, n_seq_id, ext,
    one record fewer) and every head from 0 to past the end: both answers agree, and the
    own blob of an untouched cache is found at least once per config."""
    found = 0
    for seed in range(12):
        kv = _scenario(name, seed)
        n_ext = 3 if kv.layout.with_ext else 0
        for s in range(kv.n_seq_max):
            strm = int(kv.seq_to_stream[s])
            cells = kv.v_cells[strm]
            if cells.n_multi:
                continue
            words = _words(bytes(kv.state_write(s)), n_ext)
            if words.shape[0] == 0:
                continue
            variants = [words]
            n = words.shape[0]
            # a record changed at each place of a group of four (the native compare takes
            # four records a step) and in the middle and at the end
            for col, delta in ((0, 1), (1, 1)) + (((2, 1), (4, 1)) if n_ext else ()):
                for i in sorted({0, 1, 2, 3, n // 2, n - 1} & set(range(n))):
                    w = words.copy()
                    w[i, col] += delta
                    variants.append(w)
            variants.append(words[:-1])
            for w in variants:
                if w.shape[0] == 0:
                    continue
                for head in sorted({0, 1, cells.size // 2, cells.size, int(kv.v_heads[strm])}):
                    got = state_io.seq_same_cells(cells, head, s, w, n_ext)
                    want = state_io.seq_same_cells_reference(cells, head, s, w, n_ext)
                    assert _runs_equal(got, want), (seed, s, head)
                    found += got is not None
    assert found > 0


def _none(*a: object, **kw: object) -> None:
    return None


@pytest.mark.parametrize("fast_path", ["one-call", "plan"])
@pytest.mark.parametrize("name", NAMES)
def test_sequence_restore_without_placement_leaves_what_placement_leaves(
    monkeypatch, name: str, fast_path: str
) -> None:
    """Restoring every sequence's own blob, or another scenario's, into twin caches, one
    forced through seq_rm + find_slot + apply: the same cells, heads, bounds and bytes.
    The fast cache takes the one native call (state_io.SeqBlob.read, falling back to the
    plan) or the two-phase plan's same-cells shortcut alone."""
    taken = []  # whether the fast cache skipped the placement, per restore
    one_call_hits: list[int] = []
    real = state_io.seq_same_cells
    real_one_call = state_io.SeqBlob.read

    def counted(*a):
        runs = real(*a)
        taken.append(runs is not None)
        return runs

    def one_call(*a, **kw):
        done = real_one_call(*a, **kw) if fast_path == "one-call" else None
        if done is not None:
            taken.append(True)
            one_call_hits.append(done)
        return done

    real_place = state_io.SeqBlob.read_place

    def placed(*a, **kw):
        # the one-call road's placing parse (a restore that places); the plan road goes
        # to the general parse, whose same-cells shortcut is the one under test
        found = real_place(*a, **kw) if fast_path == "one-call" else None
        if found is not None:
            taken.append(False)
        return found

    monkeypatch.setattr(state_io.SeqBlob, "read_place", placed)
    for seed in range(10):
        fast, full = _twin(name, seed)
        donor = _scenario(name, seed + 100)
        blobs = [bytes(fast.state_write(s)) for s in range(fast.n_seq_max)]
        blobs += [bytes(donor.state_write(s)) for s in range(fast.n_seq_max)]
        for i, blob in enumerate(blobs):
            s = i % fast.n_seq_max
            for kv, same, first in ((fast, counted, one_call), (full, _none, _none)):
                with monkeypatch.context() as m:
                    m.setattr(state_io, "seq_same_cells", same)
                    m.setattr(state_io.SeqBlob, "read", first)
                    # the donor's sequence may not fit: then both refuse (and stay equal)
                    with contextlib.suppress(StateError):
                        kv.state_read(blob, s)
            assert _state(fast) == _state(full), (seed, i)
        check_invariants(fast)
    assert any(taken) and not all(taken)
    assert bool(one_call_hits) == (fast_path == "one-call")


@pytest.mark.parametrize("name", NAMES)
def test_whole_restore_into_its_own_cells_leaves_what_a_full_restore_leaves(
    monkeypatch, name: str
) -> None:
    """A whole blob read back into its own cache (the same cells) and into a twin forced
    through clear + set_new, then a donor's blob into both: the same everything."""
    for seed in range(6):
        fast, full = _twin(name, seed)
        donor = _scenario(name, seed + 50)
        for blob in (bytes(fast.state_write()), bytes(donor.state_write())):
            fast.state_read(blob)
            with monkeypatch.context() as m:
                m.setattr(state_io, "_whole_same_words", lambda *a: None)
                full.state_read(blob)
            assert _state(fast) == _state(full), seed
            check_invariants(fast)


@pytest.mark.parametrize("name", NAMES)
def test_whole_same_native_equals_reference(name: str) -> None:
    """pm_kv_cells_equal (through _whole_same_words) against whole_same_reference on the
    parsed records: an own blob after a whole restore (cells packed from 0: same), a
    donor's, and an own blob with one position changed."""
    for seed in range(6):
        kv = _scenario(name, seed)
        kv.state_read(bytes(kv.state_write()))  # packs the cells at 0
        n_ext = 3 if kv.layout.with_ext else 0
        donor = _scenario(name, seed + 7)
        for blob in (bytes(kv.state_write()), bytes(donor.state_write())):
            for bump in (False, True):
                r = StateReader(blob)
                r.read_u32("n_stream")
                for strm in range(kv.n_stream):
                    n = r.read_u32("cell_count")
                    if n == 0:
                        continue
                    start = r.offset
                    if bump:
                        # the first record's position + 1
                        arr = bytearray(blob)
                        p0 = int.from_bytes(blob[start : start + 4], "little")
                        arr[start : start + 4] = (p0 + 1).to_bytes(4, "little")
                        r = StateReader(bytes(arr))
                        r.offset = start
                    cells = kv.v_cells[strm]
                    got = state_io._whole_same_words(cells, r, n, n_ext, kv.n_seq_max)
                    if got is None:
                        assert r.offset == start  # left where it was
                    r.offset = start
                    pos, ext, seq = state_io._parse_meta_whole(r, n, n_ext, kv.n_seq_max, "t")
                    want = state_io.whole_same_reference(cells, pos, ext, seq)
                    assert (got is not None) == want, (seed, strm, bump)
                    break  # one stream per blob is enough here


@pytest.mark.parametrize("name", NAMES)
def test_native_byte_store_equals_state_rows_path(monkeypatch, name: str) -> None:
    """put_payloads (one native call for every layer) and state_rows.write_payloads leave
    the same tensor bytes, per sequence (runs anywhere, streams past the first) and whole."""
    for seed in range(4):
        src = _scenario(name, seed)
        blobs = [(bytes(src.state_write(s)), s) for s in range(src.n_seq_max)]
        blobs.append((bytes(src.state_write()), -1))
        native, rows = _twin(name, seed + 30)
        for blob, s in blobs:
            try:
                native.state_read(blob, s)
            except StateError:
                with pytest.raises(StateError):
                    rows.state_read(blob, s)
                continue
            with monkeypatch.context() as m:
                m.setattr(state_io, "NATIVE_RUNS", False)
                rows.state_read(blob, s)
            assert _state(native) == _state(rows)


def test_failed_restore_on_the_same_cells_path_changes_nothing() -> None:
    """A blob whose records put the sequence back in its cells, cut short in its K/V
    bytes, or whose plan went stale: refused, the cache exactly as before."""
    kv = _scenario("f16-trans", 3)
    blob = bytes(kv.state_write(1))
    n_ext = 0
    words = _words(blob, n_ext)
    cells = kv.v_cells[0]
    assert state_io.seq_same_cells(cells, int(kv.v_heads[0]), 1, words, n_ext) is not None
    before = _state(kv)
    with pytest.raises(StateError, match="truncated"):
        kv.state_read(blob[:-7], 1)
    assert _state(kv) == before
    plan = kv.state_read_parse(StateReader(blob), 1)
    kv.seq_rm(2, 0, 1)
    after_rm = _state(kv)
    with pytest.raises(StateError, match="parse it again"):
        plan.commit()
    assert _state(kv) == after_rm


def test_same_cells_rule_on_a_hand_built_stream() -> None:
    """The slot search after seq_rm takes the first empty cells from min(head, first
    cell), or from 0 when more than used + n cells lie before it: seq 0 in cells [4, 5, 9]
    (positions 0, 1, 2), empty cells 2, 3 and 10+, others in 0, 1, 6, 7, 8."""
    kv = build(CFGS["f32-notrans"], n_cells=16, n_seq=3)
    decode(kv, [[1, p, [1], False] for p in range(2)])  # cells 0, 1
    decode(kv, [[1, p, [2], False] for p in range(2, 4)])  # cells 2, 3 (freed below)
    decode(kv, [[1, p, [0], False] for p in range(2)])  # cells 4, 5
    decode(kv, [[1, p, [2], False] for p in range(4, 7)])  # cells 6, 7, 8
    decode(kv, [[1, 2, [0], False]])  # cell 9
    kv.seq_rm(2, 2, 4)  # cells 2, 3 empty
    cells = kv.v_cells[0]
    assert np.flatnonzero(cells.owner == 0).tolist() == [4, 5, 9]
    words = np.array([[0, 1, 0], [1, 1, 0], [2, 1, 0]], dtype=np.int32)
    # used 8, n 3: head 4 -> h 4, no empty cell in [4, 9]: the same cells
    runs = state_io.seq_same_cells(cells, 4, 0, words, 0)
    assert runs is not None and runs[0].tolist() == [4, 9] and runs[1].tolist() == [6, 10]
    # head 10 -> h = first cell 4: the same
    assert state_io.seq_same_cells(cells, 10, 0, words, 0) is not None
    # head 3 -> cell 3 is empty and taken first: placed elsewhere
    assert state_io.seq_same_cells(cells, 3, 0, words, 0) is None
    # another position, or n_seq_id 2: not the same
    for col, v in ((0, 5), (1, 2)):
        w = words.copy()
        w[1, col] = v
        assert state_io.seq_same_cells(cells, 4, 0, w, 0) is None
    for head in range(17):
        got = state_io.seq_same_cells(cells, head, 0, words, 0)
        assert _runs_equal(got, state_io.seq_same_cells_reference(cells, head, 0, words, 0))


def test_same_cells_finds_runs_with_edges_anywhere_in_a_block() -> None:
    """The same-cells pass's run search (32-cell masks) on bare arrays of full streams
    (no empty cell: the slot rule has nothing to take): runs of 1-70 cells of the
    sequence among others', whole blocks, alternate cells, a partial last block. Its
    own records: the runs numpy finds; one position changed anywhere: not the same."""
    rng = np.random.default_rng(37)
    for size in (31, 32, 33, 100, 1000, 1024):
        for trial in range(10):
            owner = np.empty(size, dtype=np.int32)
            c = 0
            while c < size:
                length = int(rng.choice([1, 2, 31, 32, 33, int(rng.integers(1, 70))]))
                owner[c : c + length] = rng.integers(0, 3)
                c += length
            if trial == 3:
                owner[:] = np.arange(size) % 2
            pos = rng.integers(0, 1 << 20, size).astype(np.int32)
            mine = np.flatnonzero(owner == 0)
            if mine.size == 0:
                continue
            words = np.stack([pos[mine], np.ones_like(mine), np.zeros_like(mine)], 1).astype(
                np.int32
            )
            edges = np.flatnonzero(
                np.diff(np.concatenate(([0], (owner == 0).astype(np.int8), [0])))
            )
            want = edges.reshape(-1, 2).T
            for changed in (None, 0, int(rng.integers(mine.size)), mine.size - 1):
                w = words.copy()
                if changed is not None:
                    w[changed, 0] += 1
                starts = np.empty(mine.size, dtype=np.int64)
                ends = np.empty(mine.size, dtype=np.int64)
                n_runs = ffi.new("int64_t *")
                same = ffi.new("int32_t *")
                status = lib.pm_kv_seq_same_cells(
                    ffi.from_buffer("int32_t[]", pos), ffi.NULL, ffi.from_buffer("int32_t[]", owner),
                    ffi.NULL, size, 0, size, size, ffi.from_buffer("int32_t[]", w), mine.size, 3, 0,
                    ffi.NULL, ffi.from_buffer("int64_t[]", starts, require_writable=True),
                    ffi.from_buffer("int64_t[]", ends, require_writable=True), n_runs, same,
                )  # fmt: skip
                assert status == lib.PM_OK
                assert same[0] == (changed is None), (size, trial, changed)
                if changed is None:
                    k = int(n_runs[0])
                    assert [starts[:k].tolist(), ends[:k].tolist()] == want.tolist(), (size, trial)


def test_cells_of_runs_and_put_cells_refusals() -> None:
    """cells_of_runs inverts cell_runs; pm_stateio_put_cells takes runs in source order
    (a wrapped slot), refuses an empty run, bytes past the tensor and overlapping
    repetitions before writing any."""
    idx = np.array([2, 3, 4, 9, 11, 12], dtype=np.int64)
    assert state_io.cells_of_runs(state_io.cell_runs(idx)).tolist() == idx.tolist()
    kv = build(CFGS["f32-notrans"], n_cells=16, n_seq=3)
    k = kv.layers[0].k
    before = k.read_bytes()
    src = np.repeat(np.arange(1, 5, dtype=np.uint8), k.row_size)  # rows of 1s, 2s, 3s, 4s
    tensors = ffi.new("struct ggml_tensor *[]", [k._live()])
    srcs = ffi.new("void *[]", [ffi.from_buffer(src)])

    def put(starts, ends, offset=0, reps=1, rep_stride=0):
        par = np.array([[offset, k.row_size, k.row_size, reps, rep_stride]], dtype=np.int64)
        st, en = np.array(starts, np.int64), np.array(ends, np.int64)
        return lib.pm_stateio_put_cells(
            tensors, srcs, ffi.from_buffer("int64_t[]", par), 1,
            ffi.from_buffer("int64_t[]", st), ffi.from_buffer("int64_t[]", en), st.size,
        )  # fmt: skip

    assert put([4, 0], [4, 2]) == lib.PM_ERR_ARG  # an empty run
    assert put([-1], [1]) == lib.PM_ERR_ARG
    assert put([0, 0], [2**62, 2**62]) == lib.PM_ERR_ARG  # a cell count past INT64_MAX
    assert put([14], [18]) == lib.PM_ERR_RANGE  # cells 16, 17 past the 16 rows
    assert put([0], [4], offset=13 * k.row_size) == lib.PM_ERR_RANGE
    # repetitions that overlap (each may move on its own thread): refused, any count
    assert put([0], [2], reps=2) == lib.PM_ERR_ARG
    assert put([0], [2], reps=2**61) == lib.PM_ERR_ARG
    assert put([0], [2], reps=2, rep_stride=k.row_size) == lib.PM_ERR_ARG
    assert k.read_bytes() == before
    assert put([14, 0], [16, 2]) == lib.PM_OK  # wrapped: cells 14, 15, then 0, 1
    rows = np.frombuffer(k.read_bytes(), np.uint8).reshape(-1, k.row_size)
    assert rows[[14, 15, 0, 1], 0].tolist() == [1, 2, 3, 4]
    assert not rows[2:14].any()


def test_restore_into_a_wrapped_slot(monkeypatch) -> None:
    """A restore the slot search places across the end of the stream (cells 14, 15, then
    0, 1, 2) stores the bytes in slot order, as state_rows does."""
    blobs = []
    for native in (True, False):
        kv = build(CFGS["f32-notrans"], n_cells=16, n_seq=3)
        decode(kv, [[1, p, [1], False] for p in range(4)])  # cells 0-3
        decode(kv, [[1, p, [2], False] for p in range(10)])  # cells 4-13
        kv.seq_rm(1, -1, -1)
        donor = build(CFGS["f32-notrans"], n_cells=16, n_seq=3)
        decode(donor, [[1, p, [0], False] for p in range(5)])
        randomize(donor, 9)
        blob = bytes(donor.state_write(0))
        kv.v_heads[0] = 14
        with monkeypatch.context() as m:
            m.setattr(state_io, "NATIVE_RUNS", native)
            kv.state_read(blob, 0)
        assert kv.v_cells[0].pos[[14, 15, 0, 1, 2]].tolist() == [0, 1, 2, 3, 4]
        assert bytes(kv.state_write(0)) != blob  # cells in slot order, not ascending
        blobs.append(_state(kv))
        got = [kv.layers[0].k.read_rows([c]).tobytes() for c in (14, 15, 0, 1, 2)]
        want = [donor.layers[0].k.read_rows([c]).tobytes() for c in range(5)]
        assert got == want
    assert blobs[0] == blobs[1]


@pytest.mark.parametrize("name", [*NAMES, "swa"])
def test_native_blob_writer_equals_reference_writer(monkeypatch, name: str) -> None:
    """_write_stream_native (count, runs, meta records written in place, byte runs) and
    the reference writer (selected_cells, _meta_words, state_rows) give the same blobs:
    every sequence and the whole cache, into bytes, a reused buffer and a file, also with
    shared cells (a fork: per sequence the native writer declines that stream) and with
    sequence ids past n_seq_max."""
    for seed in range(6):
        kv = _scenario(name, seed)
        if seed % 2 and kv.n_stream == 1:
            kv.seq_cp(0, 1, 0, 2)  # shared cells
        calls = [(s,) for s in range(kv.n_seq_max)] + [(-1,)]
        with monkeypatch.context() as m:
            m.setattr(state_io, "NATIVE_RUNS", False)
            want = [bytes(kv.state_write(*c)) for c in calls]
        assert [bytes(kv.state_write(*c)) for c in calls] == want
        for c, blob in zip(calls, want):
            out = bytearray(len(blob) + 5)
            assert kv.state_write_buffer(out, *c) == len(blob) and bytes(out[: len(blob)]) == blob
            f = io.BytesIO()
            kv.state_write_to(f, *c)
            assert f.getvalue() == blob


def test_native_selection_kernels_refuse_wrong_capacities() -> None:
    """pm_kv_select needs room for every run, pm_kv_meta_words for every record: both
    refuse (PM_ERR_RANGE) instead of writing past the arrays."""
    kv = _scenario("f32-notrans", 1)
    cells = kv.v_cells[0]
    pos = ffi.from_buffer("int32_t[]", cells.pos)
    owner = ffi.from_buffer("int32_t[]", cells.owner)
    counts = ffi.new("int64_t[2]")
    shared = ffi.new("int32_t *")
    want = state_io.cell_runs(np.flatnonzero(cells.owner == 0))
    n_runs = len(want[0])
    assert n_runs >= 1
    room = np.full((2, n_runs), -7, np.int64)
    st = ffi.from_buffer("int64_t[]", room, require_writable=True)
    if n_runs > 1:
        assert lib.pm_kv_select(pos, owner, cells.size, 0, 3, st, st + n_runs, n_runs - 1,
                                counts, counts + 1, shared) == lib.PM_ERR_RANGE  # fmt: skip
    assert lib.pm_kv_select(pos, owner, cells.size, 0, 3, st, st + n_runs, n_runs, counts,
                            counts + 1, shared) == lib.PM_OK  # fmt: skip
    n = int(counts[0])
    assert n == int(np.count_nonzero(cells.owner == 0)) and int(counts[1]) == n_runs
    runs = (room[0], room[1])
    assert _runs_equal(runs, want)
    en = st + n_runs
    out = np.full(3 * n, -7, dtype=np.int32)
    o = ffi.from_buffer("int32_t[]", out, require_writable=True)
    args = (pos, owner, ffi.NULL, 0, st, en, n_runs, 0, 1, o)
    assert lib.pm_kv_meta_words(*args, 3 * n - 1) == lib.PM_ERR_RANGE
    assert (out == -7).all()
    assert lib.pm_kv_meta_words(*args, 3 * n) == lib.PM_OK
    idx = np.flatnonzero(cells.owner == 0)
    assert out.reshape(n, 3).tolist() == [[int(cells.pos[c]), 1, 0] for c in idx]


def test_put_payloads_names_the_layer_of_a_payload_of_the_wrong_size() -> None:
    kv = build(CFGS["f32-notrans"], n_cells=16, n_seq=3)
    layer = kv.layers[0]
    good = memoryview(bytes(2 * layer.k.row_size))
    short = memoryview(bytes(2 * layer.k.row_size - 1))
    runs = (np.array([0], np.int64), np.array([2], np.int64))
    before = layer.k.read_bytes()
    with pytest.raises(StateError, match=rf"layer {layer.il} V payload of .* for 2 cells"):
        state_io.put_payloads(
            kv.layout, 0, 2, lambda: runs, [(layer, "k", good), (layer, "v", short)]
        )
    assert layer.k.read_bytes() == before  # refused before any byte moved
    kv.close()


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_whole_cells_test_finds_a_difference_anywhere(n: int) -> None:
    """pm_kv_cells_equal over n cells (blocks of 64 scanned at once, the first that
    differs ending the scan, then the rest one by one): the cells' own records are the
    same; a position, a count, an id changed, or a negative position at the first or last
    cell of a block or of the tail are not."""
    rng = np.random.default_rng(n)
    pos = rng.integers(0, 1000, n).astype(np.int32)
    owner = rng.integers(0, 4, n).astype(np.int32)
    words = np.stack([pos, np.ones(n, np.int32), owner], axis=1).astype(np.int32)

    def same(w: np.ndarray) -> bool:
        out = ffi.new("int32_t *")
        status = lib.pm_kv_cells_equal(
            ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("int32_t[]", owner), ffi.NULL,
            ffi.from_buffer("int32_t[]", w), n, 3, 0, 4, out,
        )  # fmt: skip
        assert status == lib.PM_OK
        return bool(out[0])

    assert same(words)
    at = sorted({0, min(63, n - 1), min(64, n - 1), n - 1, n // 2})
    for c in at:
        for col, delta in ((0, 1), (1, 1), (2, 1)):
            w = words.copy()
            w[c, col] += delta
            assert not same(w), (c, col)
    negative = words.copy()
    negative[n - 1, 0] = -1
    pos_neg = pos.copy()
    pos_neg[n - 1] = -1  # an empty cell never matches, even a record of its position
    out = ffi.new("int32_t *")
    status = lib.pm_kv_cells_equal(
        ffi.from_buffer("int32_t[]", pos_neg), ffi.from_buffer("int32_t[]", owner), ffi.NULL,
        ffi.from_buffer("int32_t[]", negative), n, 3, 0, 4, out,
    )  # fmt: skip
    assert status == lib.PM_OK and out[0] == 0
