"""A whole restore into a cache whose cells differ (a session loaded into a fresh or
another context) places its records with one native pass (``pm_kv_records_fixed`` at
parse, ``pm_step_kv_place_records`` at commit) where every record is a fixed one (one
sequence id). Pins that the native placement leaves exactly what the numpy ``set_new``
reference leaves, that records it cannot take (shared cells, hostile words) go to the
general parse with its own errors, and that the kernels refuse without changing anything."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants
from test_kv_state_same import NAMES, _scenario, _state

import pymem.kv.state_io as state_io
from pymem._native import ffi, lib
from pymem.errors import StateError
from pymem.kv import KVCache


def _count_native(monkeypatch) -> list[bool]:
    """Every answer of KVCache._place_whole, in order."""
    seen: list[bool] = []
    real = KVCache._place_whole

    def counted(self, strm, words):
        done = real(self, strm, words)
        seen.append(done)
        return done

    monkeypatch.setattr(KVCache, "_place_whole", counted)
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_native_whole_placement_equals_numpy(monkeypatch, name: str) -> None:
    """A donor's blob (and one with cells shared by two sequences, whose records hold two
    ids) read into twin caches, one through the native placement, one through set_new:
    the same cells, counters, bounds, heads and bytes; the native road was taken exactly
    where every record is fixed."""
    seen = _count_native(monkeypatch)
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
            # the native road for every stream with cells and none shared
            plain = sum(1 for c in src.v_cells if c.used and not c.n_multi)
            assert took == [True] * plain, (seed, took)
            shared_seen += int(not fixed and any(c.n_multi for c in src.v_cells))
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
    kind, read from a buffer at every alignment: the kernel's first fault is numpy's."""
    rng = np.random.default_rng(7)
    bad = ffi.new("int64_t *")
    for case in range(300):
        n_ext = 3 if case % 2 else 0
        rec = 3 + n_ext
        n = int(rng.integers(1, 40))
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
    """Bad arguments are refused; a stream with a taken cell, or a record the kernel
    cannot place, is declined with nothing written."""
    bad = ffi.new("int64_t *")
    words = np.array([[0, 1, 0], [1, 1, 0]], dtype=np.int32)
    wp = ffi.from_buffer("int32_t[]", words)
    assert lib.pm_kv_records_fixed(ffi.NULL, 2, 3, 4, bad) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_fixed(wp, -1, 3, 4, bad) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_fixed(wp, 2, 2, 4, bad) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_fixed(wp, 2, 3, 0, bad) == lib.PM_ERR_ARG
    assert lib.pm_kv_records_fixed(wp, 2, 3, 257, bad) == lib.PM_ERR_ARG

    kv = _scenario("f16-trans", 3)
    c, _, _, _, placed = kv._native_cells()
    before = _state(kv)
    assert lib.pm_step_kv_place_records(c, kv.n_stream, wp, 2, 3, placed) == lib.PM_ERR_RANGE
    assert (
        lib.pm_step_kv_place_records(c, 0, wp, kv.layout.kv_size + 1, 3, placed) == lib.PM_ERR_RANGE
    )
    assert lib.pm_step_kv_place_records(c, 0, wp, 2, 2, placed) == lib.PM_ERR_ARG
    assert lib.pm_step_kv_place_records(ffi.NULL, 0, wp, 2, 3, placed) == lib.PM_ERR_ARG
    # cells 0 and 1 of the scenario's stream 0 are taken: declined
    assert kv.v_cells[0].pos[0] >= 0
    assert lib.pm_step_kv_place_records(c, 0, wp, 2, 3, placed) == lib.PM_OK
    assert placed[0] == 0
    kv.clear(False)
    cleared = _state(kv)
    for hostile in ([[0, 2, 0], [1, 1, 0]], [[0, 1, 0], [1, 1, 256]], [[-1, 1, 0], [1, 1, 0]]):
        h = np.array(hostile, dtype=np.int32)
        assert (
            lib.pm_step_kv_place_records(c, 0, ffi.from_buffer("int32_t[]", h), 2, 3, placed)
            == lib.PM_OK
        )
        assert placed[0] == 0, hostile
        assert _state(kv) == cleared
    assert before != cleared


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
