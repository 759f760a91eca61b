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


def _fragmented(name: str, seed: int):
    kv = build(CFGS[name], n_cells=512, n_seq=3)
    _interleaved(kv, np.random.default_rng(seed), 3, 90, 7)
    kv.seq_rm(2, -1, -1)  # an empty sequence: its stream part is a bare zero count
    randomize(kv, seed)
    return kv


def _blobs(kv) -> list[bytes]:
    return [bytes(kv.state_write(s)) for s in range(3)] + [bytes(kv.state_write())]


@pytest.mark.parametrize("name", [n for n in CFGS if n != "swa"])
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
        m.setattr(kv, "_section", None)  # the piecewise native path into a buffer
        assert _blobs(kv) == section_blobs
    with monkeypatch.context() as m:
        m.setattr(state_io, "NATIVE_RUNS", False)  # the reference
        assert _blobs(kv) == section_blobs
    # and the blobs restore: each sequence into a fresh cache, written back the same
    dst = build(CFGS[name], n_cells=512, n_seq=3)
    for s in (1, 0):
        dst.state_read(section_blobs[s], s)
        assert bytes(dst.state_write(s)) == section_blobs[s]


def _section_call(kv, out: bytearray, n: int, n_runs: int, cap: int) -> tuple[int, int]:
    cells = kv.v_cells[0]
    section = state_io.native_section(kv.layout, kv.layers)
    assert section is not None
    runs = np.empty(2 * max(n_runs, 1), dtype=np.int64)
    runs_p = ffi.from_buffer("int64_t[]", runs, require_writable=True)
    written = ffi.new("int64_t *")
    status = lib.pm_kv_write_section(
        ffi.from_buffer("int32_t[]", cells.pos), ffi.from_buffer("int32_t[]", cells.owner),
        ffi.NULL, 0, cells.size, 1, 1, ffi.from_buffer("int64_t[]", section.specs[0]),
        section.tensors, n, n_runs, runs_p, runs_p + max(n_runs, 1),
        ffi.from_buffer(out, require_writable=True), cap, written,
    )  # fmt: skip
    return int(status), int(written[0])


def test_section_writer_refusals_write_nothing() -> None:
    kv = _fragmented("f16-trans", 5)
    blob = bytes(kv.state_write(1))
    counts = ffi.new("int64_t[2]")
    shared = ffi.new("int32_t *")
    cells = kv.v_cells[0]
    lib.pm_kv_select_count(
        ffi.from_buffer("int32_t[]", cells.pos), ffi.from_buffer("int32_t[]", cells.owner),
        cells.size, 1, 3, counts, counts + 1, shared,
    )  # fmt: skip
    n, n_runs = int(counts[0]), int(counts[1])
    assert n_runs > 5
    size = len(blob) - 4  # the blob: u32 n_stream, then the one stream's section
    pad = 4096  # room for a larger count's section: refused for the count, not the size
    out = bytearray(b"\xab" * (size + pad))
    # too small: the size it needs, nothing written
    assert _section_call(kv, out, n, n_runs, size - 1) == (lib.PM_ERR_RANGE, size)
    assert out == b"\xab" * (size + pad)
    # a cell count or run count that is not the cells': refused before any byte moves
    for bad_n, bad_runs in ((n + 1, n_runs), (n, n_runs - 1), (n, n_runs + 1), (0, n_runs)):
        status, _ = _section_call(kv, out, bad_n, bad_runs, len(out))
        assert status == lib.PM_ERR_ARG, (bad_n, bad_runs)
        assert out == b"\xab" * (size + pad)
    assert _section_call(kv, out, n, n_runs, len(out)) == (lib.PM_OK, size)
    assert bytes(out[:size]) == blob[4:] and out[size:] == b"\xab" * pad
