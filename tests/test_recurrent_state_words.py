"""The recurrent state writer's numpy helpers against plain-Python readings of the
format: META words of a whole-state blob (``pos, n_seq_id, ids ascending`` per cell, in
cell order; a per-sequence blob has ``pos, 0``) and the runs of consecutive rows its
tensor sections gather. Random cell states, with and without cells shared by several
sequences (the one-sequence-per-cell states take a shortcut that must agree)."""

from __future__ import annotations

import numpy as np
import pytest

from pymem.recurrent import state_io as rs
from pymem.recurrent.cells import RecurrentCells


def _cells(rng: np.random.Generator, size: int, shared: bool) -> RecurrentCells:
    c = RecurrentCells(size, size)
    n_seq = int(rng.integers(0, size + 1))
    if shared:
        tail = rng.integers(-1, size, size)  # any cell, several sequences may share one
    else:
        tail = np.full(size, -1)
        tail[rng.permutation(size)[:n_seq]] = rng.permutation(size)[:n_seq]
    c.tail[:] = tail
    held = np.unique(tail[tail >= 0])
    c.pos[held] = rng.integers(-5, 1 << 20, held.size)
    return c


def _meta_reference(c: RecurrentCells, cells: np.ndarray, seq_id: int) -> list[int]:
    words: list[int] = []
    for cell in cells.tolist():
        if seq_id != -1:
            words += [int(c.pos[cell]), 0]
            continue
        ids = [s for s in range(c.size) if c.tail[s] == cell]
        words += [int(c.pos[cell]), len(ids), *ids]
    return words


def _runs_reference(rows: list[int]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for r in rows:
        if ends and r == ends[-1]:
            ends[-1] += 1
        else:
            starts.append(r)
            ends.append(r + 1)
    return starts, ends


@pytest.mark.parametrize("shared", [False, True])
def test_meta_words_and_runs_read_as_the_format_says(shared: bool) -> None:
    rng = np.random.default_rng(7 + shared)
    fast_path = 0
    for _ in range(300):
        size = int(rng.integers(1, 24))
        c = _cells(rng, size, shared)
        cells, rows = rs.select_rows(c, -1, 0)
        assert cells.tolist() == sorted(set(c.tail[c.tail >= 0].tolist()))
        got = rs.meta_words(c, cells, -1)
        assert got.dtype == np.int32
        assert got.tolist() == _meta_reference(c, cells, -1)
        fast_path += cells.size == np.count_nonzero(c.tail >= 0)
        s = int(rng.integers(0, size))
        one, _ = rs.select_rows(c, s, 0)
        assert rs.meta_words(c, one, s).tolist() == _meta_reference(c, one, s)
        shuffled = rng.permutation(size)[: int(rng.integers(0, size + 1))]
        for probe in (rows, shuffled, np.sort(shuffled)):
            starts, ends = rs.index_runs(probe)
            assert (starts.tolist(), ends.tolist()) == _runs_reference(probe.tolist())
            assert starts.dtype == ends.dtype == np.int64
    # both roads taken: every state one sequence per cell, or mostly shared cells
    assert fast_path == 300 if not shared else 0 < fast_path < 250


@pytest.mark.parametrize("n_rs_seq", [0, 2])
def test_native_whole_section_equals_the_numpy_writer(n_rs_seq: int) -> None:
    """``SeqRows.whole`` (pm_rs_write_whole: META, runs and rows in one call) against
    ``write_state``'s numpy walk, over random cell states: shared cells, pending copies
    (src), pending rollback planes, and cells whose sequences disagree on theirs (both
    refuse, and the kernel names the cell the numpy walk names)."""
    import re

    from pymem._native import ffi, lib
    from pymem.errors import StateError
    from pymem.recurrent import RecurrentMemory
    from pymem.spec import LayerSpec, ModelSpec
    from pymem.state import write_state

    size = 9
    spec = ModelSpec(layers=(LayerSpec.ssm(4, 8), LayerSpec.ssm(3, 5)), arch="mamba")
    mem = RecurrentMemory(spec, n_seq_max=size, n_rs_seq=n_rs_seq)
    rng = np.random.default_rng(11 + n_rs_seq)
    for il in mem.layers:
        for t in (mem.get_r_l(il), mem.get_s_l(il)):
            t.write_bytes(rng.integers(0, 255, t.nbytes, np.uint8))
    layers, native = mem._state_layers, mem._native_rows()
    assert native is not None
    c = mem.cells
    seen = {"shared": 0, "refused": 0, "written": 0}
    for _ in range(400):
        shared = bool(rng.integers(0, 2))
        fresh = _cells(rng, size, shared)
        c.tail[:], c.pos[:] = fresh.tail, fresh.pos
        c.src[:] = np.where(rng.random(size) < 0.3, rng.integers(0, size, size), -1)
        c.rs_idx[:] = rng.integers(0, n_rs_seq + 1, c.rs_idx.size) if n_rs_seq else 0
        if n_rs_seq and rng.random() < 0.6:  # every cell's sequences agree on a plane
            plane = rng.integers(0, n_rs_seq + 1, size)
            held = c.tail >= 0
            c.rs_idx[:size][held] = plane[c.tail[held]]
        try:
            want = write_state(lambda w: rs.write_state(w, c, layers, n_rs_seq, -1, None))
        except StateError as exc:
            assert native.whole(c, n_rs_seq) is None
            out = ffi.new("int64_t[2]")
            lib.pm_rs_write_whole(
                ffi.from_buffer("int32_t[]", c.tail), ffi.from_buffer("int32_t[]", c.pos),
                ffi.from_buffer("int32_t[]", c.src), ffi.from_buffer("uint32_t[]", c.rs_idx),
                size, n_rs_seq, layers.n_layer, native._tensors, native._spec_c, native.n_tensors,
                ffi.NULL, 0, out, out + 1,
            )  # fmt: skip
            assert f"cell {out[1]} " in str(exc), (str(exc), out[1])
            assert re.search(r"cell \d+ is shared", str(exc))
            seen["refused"] += 1
            continue
        got = native.whole(c, n_rs_seq)
        assert got is not None
        n, fill = got
        buf = bytearray(b"\xee" * (n + 2))
        assert fill(memoryview(buf)[:n]) == n == len(want)
        assert bytes(buf[:n]) == want and buf[n:] == b"\xee\xee"
        seen["written"] += 1
        seen["shared"] += int(np.unique(c.tail[c.tail >= 0]).size < np.count_nonzero(c.tail >= 0))
    assert seen["written"] > 100 and seen["shared"] > 30
    assert (seen["refused"] > 20) == (n_rs_seq > 0)
    mem.close()


def test_native_whole_section_refuses_bad_arguments() -> None:
    """pm_rs_write_whole: a null pointer, a size below 1 or a tail outside [-1, size) is
    refused; a buffer smaller than the section gets PM_ERR_RANGE with the size."""
    from pymem._native import ffi, lib
    from pymem.recurrent import RecurrentMemory
    from pymem.spec import LayerSpec, ModelSpec

    spec = ModelSpec(layers=(LayerSpec.ssm(4, 8),), arch="mamba")
    mem = RecurrentMemory(spec, n_seq_max=4)
    native = mem._native_rows()
    c = mem.cells
    c.tail[:] = [0, -1, 1, -1]
    c.pos[:] = [3, 5, -1, -1]
    out = ffi.new("int64_t[2]")

    def call(tail=c.tail, size=4, dest=ffi.NULL, cap=0) -> int:
        return lib.pm_rs_write_whole(
            ffi.from_buffer("int32_t[]", tail), ffi.from_buffer("int32_t[]", c.pos),
            ffi.from_buffer("int32_t[]", c.src), ffi.from_buffer("uint32_t[]", c.rs_idx), size, 0,
            1, native._tensors, native._spec_c, native.n_tensors, dest, cap, out, out + 1,
        )  # fmt: skip

    assert call(size=0) == lib.PM_ERR_ARG
    assert call(tail=np.array([0, -2, 1, -1], dtype=np.int32)) == lib.PM_ERR_ARG
    assert call(tail=np.array([0, 4, 1, -1], dtype=np.int32)) == lib.PM_ERR_ARG
    assert call() == lib.PM_ERR_RANGE
    need = int(out[0])
    small = bytearray(need - 1)
    assert call(dest=ffi.from_buffer(small), cap=need - 1) == lib.PM_ERR_RANGE
    assert out[0] == need and small == bytearray(need - 1)
    mem.close()


def _cells_state(c: RecurrentCells) -> tuple:
    return (c.pos.tolist(), c.src.tolist(), c.src0.tolist(), c.tail.tolist(), c.rs_idx.tolist(),
            c.head, c.used, c.n, c.rs_z)  # fmt: skip


def test_native_whole_read_equals_the_numpy_parse() -> None:
    """``SeqRows.read_whole`` (pm_rs_read_whole: META, headers, rows and the zeroing of
    the rows after them in one call) against the numpy parse and ``zero_rows``: the same
    cells and bytes for random whole blobs (shared cells, cells without sequences), and
    for hostile ones (a repeated id, an id out of range, a wrong header, truncations)
    the native call declines where the numpy parse raises, changing nothing."""
    from pymem.errors import StateError
    from pymem.recurrent import RecurrentMemory
    from pymem.spec import LayerSpec, ModelSpec
    from pymem.state import StateReader

    size = 7
    spec = ModelSpec(layers=(LayerSpec.ssm(4, 8), LayerSpec.ssm(3, 5)), arch="mamba")
    mems = [RecurrentMemory(spec, n_seq_max=size - 1, n_rs_seq=1) for _ in range(2)]
    rng = np.random.default_rng(5)
    tensors = [m_tensors(m) for m in mems]
    counts = {"read": 0, "refused": 0}
    for case in range(300):
        k = int(rng.integers(0, size + 1))
        words: list[int] = [k]
        owners = rng.permutation(size - 1)
        used = 0
        for _cell in range(k):
            n = int(rng.integers(0, 3)) if case % 3 else 1
            ids = sorted(owners[used : used + n].tolist())
            used += len(ids)
            words += [int(rng.integers(-3, 50)), len(ids), *ids]
        head = np.array(words, dtype="<i4").tobytes() + np.array([0, 2], "<u4").tobytes()
        body = b""
        for t in tensors[0]:
            body += np.array([t.type.id], "<i4").tobytes() + np.array([t.row_size], "<u8").tobytes()
            body += rng.integers(0, 255, k * t.row_size, np.uint8).tobytes()
        blob = bytearray(head + body + b"tail")
        fault = case % 5 == 4
        if fault:  # a hostile change the parse must name
            what = int(rng.integers(0, 3))
            if what == 0 and k and used:
                blob[12:16] = (size + 3).to_bytes(4, "little")  # an id out of range (or a count)
            elif what == 1:
                blob = blob[: int(rng.integers(0, len(blob) - 4))]
            else:
                blob[len(head) : len(head) + 4] = (77).to_bytes(4, "little")  # a tensor type
        for t in tensors[0]:
            t.write_bytes(rng.integers(0, 255, t.nbytes, np.uint8))
        for t0, t1 in zip(*tensors):
            t1.write_bytes(t0.read_bytes())
        # a decode history's src0, n and rs_z, which a whole restore keeps (as clear does)
        n_cells = mems[0].cells.size
        src0 = rng.integers(-1, n_cells, n_cells).astype(np.int32)
        n_last, rs_z = int(rng.integers(0, size + 1)), int(rng.integers(-1, size))
        for m in mems:
            m.cells.src0[:] = src0
            m.cells.n, m.cells.rs_z = n_last, rs_z
        results = []
        for m, native in zip(mems, (True, False)):
            if not native:
                m._seq_rows = None  # the numpy parse and zero_rows
            try:
                plan = m.state_read_parse(StateReader(bytes(blob)))
            except StateError as exc:
                results.append(("error", type(exc)))
                continue
            plan.commit()
            results.append(("ok", _cells_state(m.cells), [t.read_bytes() for t in m_tensors(m)]))
            m._seq_rows = False  # built again on the next call
        assert results[0][0] == results[1][0], (case, results)
        if results[0][0] == "ok":
            assert results[0][1:] == results[1][1:], case
            counts["read"] += 1
        else:
            counts["refused"] += 1
    assert counts["read"] > 150 and counts["refused"] > 20
    for m in mems:
        m.close()


def _two_sequences(mem):  # type: ignore[no-untyped-def]
    """``mem`` (4 cells) holding sequences 0 and 1 in cells 0 and 1, at positions 3, 5."""
    mem.cells.tail[:] = [0, 1, -1, -1]
    mem.cells.pos[:2] = [3, 5]
    mem.cells.src[:2] = [0, 1]
    mem.cells.used = 2
    return mem


def m_tensors(m) -> list:
    """The R/S tensors in their blob order: every R, then every S."""
    return [*m._state_layers.r, *m._state_layers.s]


@pytest.mark.parametrize(("size", "n_rs_seq"), [(4, 0), (7, 2)])
def test_native_sequence_restore_equals_the_numpy_parse(
    monkeypatch, size: int, n_rs_seq: int
) -> None:
    """``SeqRows.restore_seq`` (pm_rs_restore_seq: the seq_rm, the placement of the
    blob's one cell and the header checks in one call) against the numpy parse
    (seq_rm_cells + place_new_sequence or find_slot), over the states of random
    operation sequences: every sequence's blob (with and without a cell) restored into
    every sequence; the same cells, counters and bytes, or the same refusal."""
    import random

    from test_recurrent_oracle import Oracle, random_step

    from pymem.recurrent import RecurrentMemory
    from pymem.spec import LayerSpec, ModelSpec

    answers: list[bool] = []
    real = rs.SeqRows.restore_seq

    def counted(self, data, live, seq_id):
        done = real(self, data, live, seq_id)
        answers.append(done is not None)
        return done

    monkeypatch.setattr(rs.SeqRows, "restore_seq", counted)
    spec = ModelSpec(layers=(LayerSpec.ssm(4, 8),))
    mems = [RecurrentMemory(spec, n_seq_max=size, n_rs_seq=n_rs_seq) for _ in range(2)]
    o = Oracle(size, size, n_rs_seq)
    rng = random.Random(size)
    gen = np.random.default_rng(size)
    for step in range(60):
        random_step(rng, mems[0], o)
        for t in m_tensors(mems[0]):
            t.write_bytes(gen.integers(0, 255, t.nbytes, np.uint8))
        blobs = [bytes(mems[0].state_write(s)) for s in range(size)]
        live, data = mems[0].cells.copy(), [t.read_bytes() for t in m_tensors(mems[0])]
        # every head the memory may hold, every 6th step (the search starts there, or at
        # 0 past used + 2); the head the operations left otherwise
        heads = range(size) if step % 6 == 5 else [live.head]
        cases = [(h, src, dst) for h in heads for src in range(size) for dst in range(size)]
        head0 = live.head
        for head, src, dst in cases:
            live.head = head
            results = []
            for m, native in zip(mems, (True, False)):
                m.cells = live.copy()
                for t, b in zip(m_tensors(m), data):
                    t.write_bytes(b)
                m._seq_rows = False if native else None  # None: the numpy parse
                try:
                    m.state_read(blobs[src], dst)
                    got = [t.read_bytes() for t in m_tensors(m)]
                    results.append(("ok", _cells_state(m.cells), got))
                except Exception as exc:  # the same refusal on both roads
                    results.append(("error", type(exc).__name__))
            assert results[0] == results[1], (step, head, src, dst)
        live.head = head0
        mems[0].cells = live
    # the native call took most restores (the rest went to the general parse)
    assert sum(answers) > 0.6 * len(answers), (sum(answers), len(answers))
    for m in mems:
        m.close()


def test_a_whole_section_changed_before_its_commit_is_refused() -> None:
    """The native whole read checks the section again when it stores: a blob whose META
    changed after the parse (an id out of range) is refused at commit, nothing stored and
    the cells as they were."""
    from pymem.errors import StateError
    from pymem.recurrent import RecurrentMemory
    from pymem.spec import LayerSpec, ModelSpec
    from pymem.state import StateReader

    spec = ModelSpec(layers=(LayerSpec.ssm(4, 8),), arch="mamba")
    src = _two_sequences(RecurrentMemory(spec, n_seq_max=4))
    for t in m_tensors(src):
        t.write_bytes(np.arange(t.nbytes, dtype=np.uint8))
    blob = bytearray(src.state_write())
    mem = RecurrentMemory(spec, n_seq_max=4)
    before = (_cells_state(mem.cells), [t.read_bytes() for t in m_tensors(mem)])
    plan = mem.state_read_parse(StateReader(blob))
    blob[12:16] = (9).to_bytes(4, "little")  # record 0's id: out of range
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.commit()
    assert (_cells_state(mem.cells), [t.read_bytes() for t in m_tensors(mem)]) == before
    for m in (src, mem):
        m.close()


@pytest.mark.parametrize("seq_id", [-1, 1])
def test_the_sized_writer_refuses_a_memory_changed_since_its_sizing(seq_id: int) -> None:
    """``seq_writer`` sizes the section first; a change of the memory before the fill
    (the size no longer holds) is refused, nothing written."""
    from pymem.errors import StateError
    from pymem.recurrent import RecurrentMemory
    from pymem.spec import LayerSpec, ModelSpec

    spec = ModelSpec(layers=(LayerSpec.ssm(4, 8),), arch="mamba")
    mem = _two_sequences(RecurrentMemory(spec, n_seq_max=4))
    sized = mem.seq_writer(seq_id, 0)
    assert sized is not None
    size, fill = sized
    assert mem.seq_rm(1, -1, -1)
    out = bytearray(b"\xee" * size)
    with pytest.raises(StateError, match="changed between sizing and writing"):
        fill(memoryview(out))
    assert out == bytearray(b"\xee" * size)
    mem.close()
