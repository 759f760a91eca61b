"""The one-call stream writer (``pm_kv_write_section``) against the piecewise native path
and the reference (``NATIVE_RUNS = False``): the same blob bytes for every layout, and its
refusals leave the output untouched."""

from __future__ import annotations

import io

import numpy as np
import pytest
from test_kv_state import CFGS, build, randomize
from test_kv_state_paths import _interleaved

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.errors import RangeError


def _fragmented(name: str, seed: int, drop: bool = True):
    kv = build(CFGS[name], n_cells=512, n_seq=3)
    _interleaved(kv, np.random.default_rng(seed), 3, 90, 7)
    if drop:  # an empty sequence: its stream part is a bare zero count
        kv.seq_rm(2, -1, -1)
    randomize(kv, seed)
    return kv


def _blobs(kv) -> list[bytes]:
    return [bytes(kv.state_write(s)) for s in range(3)] + [bytes(kv.state_write())]


@pytest.mark.parametrize("name", list(CFGS))
def test_section_writer_gives_every_path_the_same_bytes(monkeypatch, name: str) -> None:
    kv = _fragmented(name, 3)
    assert isinstance(kv._section, (bool, type(None)))  # not built before the first write
    section_blobs = _blobs(kv)
    assert isinstance(kv._section, state_io.NativeSection)
    # a file does not fill in place: the per-tensor native runs path
    to_file = []
    for s in (0, 1, 2, -1):
        f = io.BytesIO()
        kv.state_write_to(f, s)
        to_file.append(f.getvalue())
    assert to_file == section_blobs
    buf = bytearray(len(section_blobs[-1]) + 7)
    assert kv.state_write_buffer(buf, 0) == len(section_blobs[0])
    assert bytes(buf[: len(section_blobs[0])]) == section_blobs[0]
    with monkeypatch.context() as m:
        m.setattr(kv, "_native_section", lambda: None)  # piecewise native path, buffer
        m.setattr(kv, "_blob", None)  # (and no whole-sequence one-call path)
        assert _blobs(kv) == section_blobs
    with monkeypatch.context() as m:
        m.setattr(state_io, "NATIVE_RUNS", False)  # the reference
        assert _blobs(kv) == section_blobs
    # and the blobs restore: each sequence into a fresh cache, written back the same
    dst = build(CFGS[name], n_cells=512, n_seq=3)
    for s in (1, 0):
        dst.state_read(section_blobs[s], s)
        assert bytes(dst.state_write(s)) == section_blobs[s]


def _select(kv, seq_id: int, expect_shared: bool = False) -> tuple[int, np.ndarray]:
    """(cells, runs [2, n_runs]) of seq_id in stream 0, by pm_kv_select."""
    cells = kv.v_cells[0]
    cap = cells.size // 2 + 1
    scratch = np.empty((2, cap), dtype=np.int64)
    found = ffi.from_buffer("int64_t[]", scratch, require_writable=True)
    counts = ffi.new("int64_t[2]")
    shared = ffi.new("int32_t *")
    status = lib.pm_kv_select(
        ffi.from_buffer("int32_t[]", cells.pos), ffi.from_buffer("int32_t[]", cells.owner),
        cells.size, seq_id, 3, found, found + cap, cap, counts, counts + 1, shared,
    )  # fmt: skip
    assert status == lib.PM_OK and shared[0] == int(expect_shared)
    return int(counts[0]), scratch[:, : int(counts[1])].copy()


def _section_call(kv, out: bytearray, n: int, runs: np.ndarray, cap: int) -> tuple[int, int]:
    cells = kv.v_cells[0]
    section = state_io.native_section(kv.layout, kv.layers)
    assert section is not None
    runs = np.ascontiguousarray(runs, dtype=np.int64)
    n_runs = runs.shape[1]
    runs_p = ffi.from_buffer("int64_t[]", runs)
    written = ffi.new("int64_t *")
    status = lib.pm_kv_write_section(
        ffi.from_buffer("int32_t[]", cells.pos), ffi.from_buffer("int32_t[]", cells.owner),
        ffi.NULL, 0, cells.size, 1, 1, ffi.from_buffer("int64_t[]", section.specs[0]),
        section.tensors, n, n_runs, runs_p, runs_p + n_runs, ffi.NULL, 0, 0,
        ffi.from_buffer(out, require_writable=True), cap, written,
    )  # fmt: skip
    return int(status), int(written[0])


def test_select_matches_the_numpy_selection() -> None:
    # the one-pass search finds every sequence's cells (and, for -1, every non-empty cell)
    # in the runs numpy finds; a shared cell is flagged for the whole stream only
    kv = _fragmented("f32-notrans", 4)
    cells = kv.v_cells[0]
    pos = ffi.from_buffer("int32_t[]", cells.pos)
    owner = ffi.from_buffer("int32_t[]", cells.owner)
    for seq_id in (-1, 0, 1, 2):
        n, runs = _select(kv, seq_id)
        idx = state_io.selected_cells(kv.layout, cells, seq_id)
        want = state_io.cell_runs(idx)
        assert n == idx.size and runs.tolist() == [list(want[0]), list(want[1])]
    kv.seq_cp(0, 2, -1, -1)  # every cell of seq 0 shared with seq 2
    assert _select(kv, -1, expect_shared=True)[0] == int(np.count_nonzero(cells.pos >= 0))
    # too little room for the runs: refused
    counts = ffi.new("int64_t[2]")
    shared = ffi.new("int32_t *")
    room = np.empty(4, dtype=np.int64)
    p = ffi.from_buffer("int64_t[]", room, require_writable=True)
    assert lib.pm_kv_select(pos, owner, cells.size, 1, 3, p, p + 2, 2, counts, counts + 1,
                            shared) == lib.PM_ERR_RANGE  # fmt: skip


def _raw_select(pos: np.ndarray, owner: np.ndarray, seq_id: int, cap: int) -> tuple:
    """pm_kv_select over bare cell arrays: (status, n, runs [2, n_runs], shared)."""
    room = np.full((2, max(cap, 1)), -7, dtype=np.int64)
    found = ffi.from_buffer("int64_t[]", room, require_writable=True)
    counts = ffi.new("int64_t[2]")
    shared = ffi.new("int32_t *")
    status = lib.pm_kv_select(
        ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("int32_t[]", owner), pos.size, seq_id, 4,
        found, found + room.shape[1], cap, counts, counts + 1, shared,
    )  # fmt: skip
    return int(status), int(counts[0]), room[:, : int(counts[1])], bool(shared[0])


def test_select_finds_the_runs_a_cell_by_cell_pass_finds() -> None:
    # the block masks (32 cells a block, edges by bit) against numpy on patterns that put
    # edges at every place in a block: runs of 1-70 cells, whole blocks, alternate cells,
    # a last partial block; the run count exactly at the room and one past it
    rng = np.random.default_rng(14)
    for size in (31, 32, 64, 100, 1000, 1024):
        for trial in range(12):
            owner = np.full(size, -1, dtype=np.int32)
            c = 0
            while c < size:
                length = int(rng.choice([1, 2, 31, 32, 33, int(rng.integers(1, 70))]))
                owner[c : c + length] = rng.choice([-1, 0, 1, 2, 3, -2] if trial % 3 else [0, 1])
                c += length
            if trial == 5:
                owner[::2] = 0
            pos = np.where(owner == -1, -1, rng.integers(0, 1000, size)).astype(np.int32)
            for seq_id in (-1, 0, 1):
                sel = pos >= 0 if seq_id < 0 else owner == seq_id
                edges = np.flatnonzero(np.diff(np.concatenate(([0], sel.astype(np.int8), [0]))))
                want = edges.reshape(-1, 2).T
                n_runs = want.shape[1]
                status, n, runs, shared = _raw_select(pos, owner, seq_id, n_runs)
                assert status == lib.PM_OK and n == int(sel.sum()), (size, trial, seq_id)
                assert runs.tolist() == want.tolist(), (size, trial, seq_id)
                odd = (owner[sel] < 0) | (owner[sel] >= 4)
                assert shared == (seq_id < 0 and bool(odd.any()))
                if n_runs > 0:  # one run more than the room: refused
                    assert _raw_select(pos, owner, seq_id, n_runs - 1)[0] == lib.PM_ERR_RANGE


def test_section_writer_refusals_write_nothing() -> None:
    kv = _fragmented("f16-trans", 5)
    blob = bytes(kv.state_write(1))
    n, runs = _select(kv, 1)
    assert runs.shape[1] > 5
    size = len(blob) - 4  # the blob: u32 n_stream, then the one stream's section
    pad = 4096  # room for a larger count's section: refused for the count, not the size
    out = bytearray(b"\xab" * (size + pad))
    # too small: the size it needs, nothing written
    assert _section_call(kv, out, n, runs, size - 1) == (lib.PM_ERR_RANGE, size)
    assert out == b"\xab" * (size + pad)
    # runs that are not the count's, overlap, descend or leave the stream: refused before
    # any byte moves
    last = kv.v_cells[0].size
    bad = [
        (n + 1, runs),
        (n, runs[:, :-1]),
        (n, np.concatenate((runs, [[last - 1], [last]]), axis=1)),
        (n, runs[:, ::-1]),
        (n, runs + np.array([[1], [1]]) * (last - int(runs[1, -1]) + 1)),
        (n, np.concatenate(([[0], [0]], runs), axis=1)),
    ]
    for bad_n, bad_runs in bad:
        status, _ = _section_call(kv, out, bad_n, bad_runs, len(out))
        assert status == lib.PM_ERR_ARG, (bad_n, bad_runs)
        assert out == b"\xab" * (size + pad)
    assert _section_call(kv, out, n, runs, len(out)) == (lib.PM_OK, size)
    assert bytes(out[:size]) == blob[4:] and out[size:] == b"\xab" * pad


def _outcome(kv, blob: bytes, seq_id: int) -> tuple[str, bytes, list[int]]:
    """What a restore did: its result or error, then the whole state and the heads."""
    try:
        result = str(kv.state_read(blob, seq_id))
    except Exception as exc:  # compared between the two paths, type and message
        result = f"{type(exc).__name__}: {exc}"
    return result, bytes(kv.state_write()), [int(h) for h in kv.v_heads.a]


def _damaged(blob: bytes, rec: int) -> list[bytes]:
    out = [blob[:cut] for cut in (3, 4, 9, len(blob) // 3, len(blob) - 1)]
    out.append(blob + b"\x00" * 5)  # trailing bytes: not part of the state
    n = int.from_bytes(blob[4:8], "little")
    data = 8 + 4 * rec * n  # v_trans, n_layer, then the first layer's type and row size
    for at in [*range(0, 96, 4), *range(data, data + 24, 4)]:  # first records, headers
        b = bytearray(blob)
        b[at] ^= 0x01
        out.append(bytes(b))
    return out


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans-streams", "mrope-ext"])
def test_one_call_restore_matches_the_plan_on_damaged_blobs(monkeypatch, name: str) -> None:
    # the one-call restore (SeqBlob.read) and the two-phase plan agree on every blob: the
    # own sequence's (the one call's case), damaged anywhere in its headers or cut short
    # (the one call declines, the plan names the field) and another sequence's
    kv = _fragmented(name, 7, drop=False)  # no holes: a sequence's own blob goes back in place
    blobs = [bytes(kv.state_write(s)) for s in range(2)]
    cases = [(blobs[0], 0), (blobs[1], 1), (blobs[1], 0)]
    cases += [(b, 0) for b in _damaged(blobs[0], 6 if name == "mrope-ext" else 3)]
    hits = []
    real = state_io.SeqBlob.read

    def counted(*a, **kw):
        done = real(*a, **kw)
        hits.append(done is not None)
        return done

    for blob, seq_id in cases:
        fast, plan = _fragmented(name, 7, drop=False), _fragmented(name, 7, drop=False)
        with monkeypatch.context() as m:
            m.setattr(state_io.SeqBlob, "read", counted)
            got = _outcome(fast, blob, seq_id)
        with monkeypatch.context() as m:
            m.setattr(state_io.SeqBlob, "read", lambda *a, **kw: None)
            want = _outcome(plan, blob, seq_id)
        assert got == want, (name, seq_id, len(blob))
    assert hits[:2] == [True, True]  # the own blobs: one call each
    assert not all(hits)  # the damaged ones: declined


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans-streams"])
def test_one_call_write_refuses_a_small_buffer_untouched(monkeypatch, name: str) -> None:
    # one sequence's blob in one call (state_io.SeqBlob.write): the general writer's
    # bytes; a buffer one byte short or read-only is refused with nothing written
    kv = _fragmented(name, 9)
    direct = []
    real = state_io.SeqBlob.write

    def counted(*a, **kw):
        done = real(*a, **kw)
        direct.append(done)
        return done

    monkeypatch.setattr(state_io.SeqBlob, "write", counted)
    for seq_id in (0, 1, 2):
        blob = bytes(kv.state_write(seq_id))
        with monkeypatch.context() as m:
            m.setattr(kv, "_seq_blob", lambda *a: None)
            assert bytes(kv.state_write(seq_id)) == blob  # the general writer
        out = bytearray(b"\xcd" * (len(blob) - 1))
        with pytest.raises(RangeError, match=f"needs {len(blob)}"):
            kv.state_write_buffer(out, seq_id)
        assert out == b"\xcd" * (len(blob) - 1)
        with pytest.raises(RangeError, match="read-only"):
            kv.state_write_buffer(bytes(len(blob)), seq_id)
        out = bytearray(b"\xcd" * (len(blob) + 3))
        assert kv.state_write_buffer(out, seq_id) == len(blob)
        assert bytes(out[: len(blob)]) == blob and out[len(blob) :] == b"\xcd" * 3
    # per sequence: the new blob and the roomy buffer in one call each; the read-only
    # buffer declined to the general writer (which refuses it), the short one refused
    assert [d is None for d in direct] == [False, True, False] * 3


def test_section_writer_takes_bitsets_for_a_whole_stream_only() -> None:
    """Bitsets (records of each cell's ids) go with a whole stream's section: with a
    sequence id, without an id word or with a width outside [1, 4] words they are
    refused before a byte moves; the id count refuses a null pointer and runs past the
    stream, and counts one id a cell of one sequence."""
    kv = _fragmented("f16-trans", 5)
    cells = kv.v_cells[0]
    section = state_io.native_section(kv.layout, kv.layers)
    assert section is not None
    n, runs = _select(kv, 1)
    runs = np.ascontiguousarray(runs, dtype=np.int64)
    runs_p = ffi.from_buffer("int64_t[]", runs)
    bits = ffi.from_buffer("uint64_t[]", cells.seq)
    out = bytearray(b"\xab" * (1 << 16))
    written = ffi.new("int64_t *")
    for seq_id, with_id, n_words in ((1, 1, 1), (-1, 0, 1), (-1, 1, 0), (-1, 1, 5)):
        status = lib.pm_kv_write_section(
            ffi.from_buffer("int32_t[]", cells.pos), ffi.from_buffer("int32_t[]", cells.owner),
            ffi.NULL, 0, cells.size, seq_id, with_id, ffi.from_buffer("int64_t[]", section.specs[0]),
            section.tensors, n, runs.shape[1], runs_p, runs_p + runs.shape[1], bits, n_words, 3,
            ffi.from_buffer(out, require_writable=True), len(out), written,
        )  # fmt: skip
        assert status == lib.PM_ERR_ARG, (seq_id, with_id, n_words)
    assert out == b"\xab" * (1 << 16)
    ids = ffi.new("int64_t *")
    owner = ffi.from_buffer("int32_t[]", cells.owner)
    n_runs = runs.shape[1]

    def record_ids(owner_p: object, size: int) -> int:
        return lib.pm_kv_record_ids(owner_p, size, bits, 1, 3, runs_p, runs_p + n_runs, n_runs, ids)

    assert record_ids(ffi.NULL, cells.size) == lib.PM_ERR_ARG
    # runs past the stream's cells are refused; inside it, one id per cell of one sequence
    assert record_ids(owner, int(runs[1, -1]) - 1) == lib.PM_ERR_ARG
    assert record_ids(owner, cells.size) == lib.PM_OK and ids[0] == n
