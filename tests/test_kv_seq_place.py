"""A per-sequence restore that must be placed (a sequence swapped back in after its
seq_rm, or a blob read into another sequence) takes one native call for find_slot +
apply_ubatch (``pm_step_kv_restore_seq``; with a sliding window, the overwrite of
masked cells included). Pins it to the numpy find_slot + apply (``NATIVE_PLACE`` off) in
random caches with holes, random heads (wrapped slots), shifts, ext and windows of every
type, and the kernel's refusals."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from kv_helpers import check_invariants, decode
from test_kv_state_same import NAMES, _scenario, _state

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.errors import StateError
from pymem.kv import KVCache
from pymem.spec import SWAType


def _count_native_placements(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each placement asked of the native roads with ``NATIVE_PLACE`` on took
    one: ``_place_seq_native`` (the two-phase restore's) or the one-call swap-in."""
    took: list[bool] = []
    real = KVCache._place_seq_native
    real_swap_in = state_io.SeqBlob._placed

    def counted(self, seq_id, pos):
        done = real(self, seq_id, pos)
        if state_io.NATIVE_PLACE:
            took.append(done is not None)
        return done

    def swap_in(self, *args):
        done = real_swap_in(self, *args)
        if state_io.NATIVE_PLACE and done is not None:
            took.append(True)  # (a decline goes on to _place_seq_native, counted there)
        return done

    monkeypatch.setattr(KVCache, "_place_seq_native", counted)
    monkeypatch.setattr(state_io.SeqBlob, "_placed", swap_in)
    return took


@pytest.mark.parametrize("name", NAMES)
def test_native_restore_placement_equals_numpy(monkeypatch, name: str) -> None:
    """Each sequence swapped out and back in (its own blob), then another sequence's blob
    read into a third: twin caches, native and numpy placement, end equal after every
    restore; the native road is taken for every placement it applies to."""
    took = _count_native_placements(monkeypatch)
    for seed in range(8):
        native, ref = _scenario(name, seed, n_cells=48), _scenario(name, seed, n_cells=48)
        rng = np.random.default_rng(seed)
        blobs = {s: bytes(native.state_write(s)) for s in range(native.n_seq_max)}
        order = rng.permutation(native.n_seq_max).tolist()
        steps = [(s, s, True) for s in order] + [(order[0], order[-1], False)]
        for src, dst, swap in steps:
            for kv, on in ((native, True), (ref, False)):
                with monkeypatch.context() as m:
                    m.setattr(state_io, "NATIVE_PLACE", on)
                    if swap:
                        kv.seq_rm(dst, -1, -1)
                    try:
                        kv.state_read(blobs[src], dst)
                        outcome = "ok"
                    except StateError as exc:
                        outcome = str(exc)
                if on:
                    got = outcome
                else:
                    assert outcome == got, (seed, src, dst)
            assert _state(native) == _state(ref), (seed, src, dst)
            check_invariants(native)
        for s in range(native.n_seq_max):
            assert native.state_write(s) == ref.state_write(s)
    assert sum(took) >= 20, took


def test_restore_kernel_refuses_and_declines_without_change() -> None:
    """Bad arguments are refused; too few usable cells, a negative position or an id
    outside [0, 256) are declined with nothing written. Shared cells are never taken:
    without a window they are left as they are, a window takes masked cells of one
    sequence only."""
    kv = _scenario("f16-trans", 2, n_cells=48)
    c, heads, _, placed = kv._native_cells()
    idx = np.empty(64, dtype=np.int32)
    runs = np.empty((2, 64), dtype=np.int64)
    n_runs = ffi.new("int64_t *")
    rp = ffi.from_buffer("int64_t[]", runs, require_writable=True)
    ip = ffi.from_buffer("int32_t[]", idx, require_writable=True)

    def call(seq_id=0, pos=(5, 6), s=0, cells=c, swa_type=0, n_swa=0) -> int:
        p = np.array(pos, dtype=np.int32)
        return lib.pm_step_kv_restore_seq(
            cells, s, seq_id, ffi.from_buffer("int32_t[]", p), p.size, swa_type, n_swa, heads,
            ip, rp, rp + 64, n_runs, placed,
        )  # fmt: skip

    before = _state(kv)
    assert call(cells=ffi.NULL) == lib.PM_ERR_ARG
    assert call(pos=()) == lib.PM_ERR_ARG
    assert call(s=kv.n_stream) == lib.PM_ERR_RANGE
    free = kv.layout.kv_size - int(kv.v_cells[0].used)
    # (a chunked window of width 0 would divide by zero: declined, as pm_step_kv_find does)
    for args in (
        {"pos": tuple(range(free + 1))},
        {"pos": (3, -1)},
        {"seq_id": 256},
        {"seq_id": -1},
        {"swa_type": 2, "n_swa": 0},
        {"swa_type": 4, "n_swa": 3},
        {"swa_type": -1},
    ):
        assert call(**args) == lib.PM_OK and placed[0] == 0, args
        assert _state(kv) == before, args
    kv.seq_cp(1, 2)  # a shared cell in the stream
    shared = _state(kv)
    n_multi = int(kv.cells.n_multi[0])
    owners = kv.cells.owner[0].copy()
    assert n_multi > 0 and call() == lib.PM_OK and placed[0] == 1
    taken = idx[:2]
    assert (owners[taken] == -1).all() and (kv.cells.owner[0][taken] == 0).all()
    assert int(kv.cells.n_multi[0]) == n_multi  # the shared cells are untouched
    assert (kv.cells.owner[0] == -2).sum() == n_multi
    # a window: masked cells of one sequence are taken beside the empty ones, never a
    # shared one (one cell more than the empty ones: the search must take a masked one)
    owners = kv.cells.owner[0].copy()
    free = kv.layout.kv_size - int(kv.v_cells[0].used)
    far = tuple(range(1000, 1000 + free + 1))
    assert call(seq_id=3, pos=far, swa_type=1, n_swa=3) == lib.PM_OK and placed[0] == 1
    assert (owners[idx[: len(far)]] != -2).all() and (owners[idx[: len(far)]] >= 0).any()
    assert _state(kv) != shared


@pytest.mark.parametrize("name", ["f16-trans", "f16-trans-streams"])
def test_native_restore_placement_from_every_head(monkeypatch, name: str) -> None:
    """A sequence swapped back in from every head position of its stream (the search
    starts there, or at 0 when the head lies more than 2 n past the used cells; it wraps
    at the end): native and numpy placement leave the same cache."""
    for seed in (1, 3):
        kv0 = _scenario(name, seed, n_cells=48)
        seq = int(np.argmax([kv0.seq_pos_max(s) for s in range(kv0.n_seq_max)]))
        blob = bytes(kv0.state_write(seq))
        strm = int(kv0.seq_to_stream[seq])
        for head in range(kv0.layout.kv_size + 1):
            states = []
            for on in (True, False):
                kv = _scenario(name, seed, n_cells=48)
                kv.seq_rm(seq, -1, -1)
                kv.v_heads[strm] = head
                with monkeypatch.context() as m:
                    m.setattr(state_io, "NATIVE_PLACE", on)
                    kv.state_read(blob, seq)
                states.append(_state(kv))
                kv.close()
            assert states[0] == states[1], (seed, head)
        kv0.close()


@pytest.mark.parametrize("swa_type", [SWAType.STANDARD, SWAType.CHUNKED, SWAType.SYMMETRIC])
def test_native_window_restore_equals_numpy(monkeypatch, swa_type: SWAType) -> None:
    """Sliding-window caches: sequences swapped back in after other sequences' tokens took
    their cells (only masked cells left for some), native and numpy placement leave the
    same cache; the native call (the one-call placed read, or the two-phase restore's
    placement where that declines) overwrote masked cells in some of them."""
    from test_kv_swa_restore import _memory

    overwrote = 0
    real = KVCache._place_seq_native

    def counted(self, seq_id, pos):
        before = self.cells.pos[0].copy()
        done = real(self, seq_id, pos)
        nonlocal overwrote
        if done is not None:
            overwrote += int((before[done[0]] >= 0).any())
        return done

    monkeypatch.setattr(KVCache, "_place_seq_native", counted)
    real_placed = state_io.SeqBlob._placed

    def placed(self, data, seq_id, strm, held):
        cells = self._cells[strm]
        before = cells.owner.copy()
        done = real_placed(self, data, seq_id, strm, held)
        nonlocal overwrote
        if done is not None:  # a cell another sequence held now holds seq_id
            overwrote += int(((before >= 0) & (before != seq_id) & (cells.owner == seq_id)).any())
        return done

    monkeypatch.setattr(state_io.SeqBlob, "_placed", placed)
    for kv_size in (16, 24, 48):
        for seed in range(6):
            n_swa = 2 + seed % 4
            twins = [_memory(seed, swa_type, n_swa, kv_size) for _ in range(2)]
            blobs = [bytes(twins[0].state_write(s)) for s in range(3)]
            for i in range(6):
                s, t = (i + seed) % 3, (i + seed + 1) % 3
                outcomes = []
                for kv, on in zip(twins, (True, False)):
                    with monkeypatch.context() as m:
                        m.setattr(state_io, "NATIVE_PLACE", on)
                        kv.seq_rm(s, -1, -1)
                        p0 = kv.seq_pos_max(t) + 1
                        decode(kv, [[1, p0 + j, [t], False] for j in range(i % 4 + 1)], n_ubatch=8)
                        try:
                            kv.state_read(blobs[s], s)
                            outcomes.append("ok")
                        except StateError as exc:
                            outcomes.append(str(exc))
                assert outcomes[0] == outcomes[1], (kv_size, seed, i)
                assert _state(twins[0]) == _state(twins[1]), (kv_size, seed, i)
                check_invariants(twins[0])
            for kv in twins:
                kv.close()
    assert overwrote >= 3, overwrote


def _long_runs_cache(chunk: int) -> KVCache:
    """Three sequences of 90 tokens decoded in interleaved chunks of ``chunk`` into 320
    cells, then a hole cut inside the filled cells (sequence 2 from position 60)."""
    from test_kv_state_same import CFGS, build

    kv = build(CFGS["f16-trans"], n_cells=320, n_seq=3)
    for p0 in range(0, 90, chunk):
        for s in range(3):
            n = min(chunk, 90 - p0)
            decode(kv, [[1 + s, p0 + j, [s], False] for j in range(n)], n_ubatch=n)
    kv.seq_rm(2, 60, -1)
    return kv


@pytest.mark.parametrize("chunk", [5, 32, 45, 64])
def test_native_restore_placement_long_runs(monkeypatch, chunk: int) -> None:
    """Sequences of long runs (chunks of ``chunk`` tokens, three sequences interleaved) in a
    cache of a few hundred cells: the kernel's search counts whole blocks of 32 cells, skips
    those with no empty cell and takes the all-empty ones whole. A sequence swapped back in
    from heads all over the stream (its own cells free again, plus a free tail), native and
    numpy placement leave the same cache, and the native road is taken."""
    took = _count_native_placements(monkeypatch)

    def filled() -> KVCache:
        return _long_runs_cache(chunk)

    blob = bytes(filled().state_write(1))
    for head in range(0, 321, 9):
        states = []
        for on in (True, False):
            kv = filled()
            kv.seq_rm(1, -1, -1)
            kv.v_heads[0] = head
            with monkeypatch.context() as m:
                m.setattr(state_io, "NATIVE_PLACE", on)
                kv.state_read(blob, 1)
            states.append(_state(kv))
            check_invariants(kv)
            kv.close()
        assert states[0] == states[1], (chunk, head)
    assert len(took) == 36 and all(took), took  # (every swap-in: one call)


@pytest.mark.parametrize("chunk", [1, 5, 32, 45])
def test_restore_kernel_runs_road_equals_its_cell_list_road(chunk: int) -> None:
    """Without a window the kernel may be given no cell list (``idx`` NULL: the one-call
    swap-in's road): the same runs, count, head and cells as with the list, from every
    head (wrapped searches, blocks taken whole or cell by cell, a block whole but more
    than the cells left), and the runs are the maximal runs of the list's cells, the head
    one past its last (the search writes the runs itself, the list's walk is not run).
    With a window the list is required."""

    def filled() -> KVCache:
        kv = _long_runs_cache(chunk)
        kv.seq_rm(1, -1, -1)
        return kv

    def place(kv: KVCache, head: int, n: int, with_list: bool) -> tuple:
        c, heads, _, placed = kv._native_cells()
        kv.v_heads[0] = head
        # the first n empty cells from the search's start, wrapping: the head, or 0 past
        # used + 2 n (the reference's restart), taken before the placement fills them
        empty = np.flatnonzero(kv.v_cells[0].pos < 0)
        h = head if head <= int(kv.v_cells[0].used) + 2 * n else 0
        first_n = np.concatenate((empty[empty >= h], empty[empty < h]))[:n].tolist()
        pos = np.arange(100, 100 + n, dtype=np.int32)
        idx = np.empty(n, dtype=np.int32)
        runs = np.full((2, n), -7, dtype=np.int64)
        n_runs = ffi.new("int64_t *")
        rp = ffi.from_buffer("int64_t[]", runs, require_writable=True)
        ip = ffi.from_buffer("int32_t[]", idx, require_writable=True) if with_list else ffi.NULL
        status = lib.pm_step_kv_restore_seq(
            c, 0, 1, ffi.from_buffer("int32_t[]", pos), n, 0, 0, heads, ip, rp, rp + n, n_runs,
            placed,
        )  # fmt: skip
        assert status == lib.PM_OK
        k = int(n_runs[0])
        cells = idx.tolist() if with_list and placed[0] else None
        assert cells is None or cells == first_n
        return (placed[0], runs[:, :k].tolist(), int(kv.v_heads[0]), _state(kv)), cells

    def maximal_runs(cells: list[int]) -> list[list[int]]:
        """E.g. [4, 5, 6, 9, 0, 1] -> [[4, 9, 0], [7, 10, 2]]."""
        starts, ends = [cells[0]], []
        for a, b in pairwise(cells):
            if b != a + 1:
                ends.append(a + 1)
                starts.append(b)
        return [starts, [*ends, cells[-1] + 1]]

    free = 320 - int(filled().v_cells[0].used)
    for n in (1, 31, 33, 90, free, free + 1):
        for head in range(0, 321, 23):
            (listed, cells), (bare, _) = (place(filled(), head, n, w) for w in (True, False))
            assert listed == bare, (chunk, n, head)
            assert listed[0] == (n <= free)
            if cells is not None:
                assert listed[1] == maximal_runs(cells) and listed[2] == cells[-1] + 1
    kv = filled()
    c, heads, _, placed = kv._native_cells()
    runs = np.empty((2, 4), dtype=np.int64)
    rp = ffi.from_buffer("int64_t[]", runs, require_writable=True)
    pos = np.arange(2, dtype=np.int32)
    assert lib.pm_step_kv_restore_seq(
        c, 0, 1, ffi.from_buffer("int32_t[]", pos), 2, 1, 4, heads, ffi.NULL, rp, rp + 2,
        ffi.new("int64_t *"), placed,
    ) == lib.PM_ERR_ARG  # fmt: skip
