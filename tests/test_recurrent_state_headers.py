"""Recurrent state_read checks all per-layer section headers at once; a bad header in any
layer (not only the first) must still be refused with the field-by-field message naming
that layer, and change nothing."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from test_recurrent import fill_rows, make_rec, place

from pymem.errors import StateError
from pymem.recurrent import RecurrentMemory
from pymem.spec import LayerSpec, ModelSpec


@pytest.mark.parametrize("seq", [-1, 0])
def test_bad_header_of_a_later_layer_is_named(seq: int) -> None:
    mem = make_rec(n_layer=3)
    fill_rows(mem)
    place(mem, (0, 3), (1, 5))
    blob = mem.state_write(seq)
    before = mem.state_write()
    n_cells = 2 if seq == -1 else 1
    rows = [32] * 3 + [48] * 3  # R sections of layers 0-2, then S sections
    start = len(blob) - sum(12 + n_cells * r for r in rows)
    # the S section of layer 2 (the last) and the R section of layer 1
    s2 = start + sum(12 + n_cells * r for r in rows[:5])
    r1 = start + 12 + n_cells * rows[0]
    cases = [(s2, "<i", 1, "s type .*layer 2"), (s2 + 4, "<Q", 8, "s row size .*layer 2"),
             (r1 + 4, "<Q", 0, "r row size .*layer 1")]  # fmt: skip
    for at, fmt, value, match in cases:
        bad = bytearray(blob)
        struct.pack_into(fmt, bad, at, value)
        with pytest.raises(StateError, match=match):
            mem.state_read(bytes(bad), seq if seq == -1 else 2)
        assert mem.state_write() == before
    other = make_rec(n_layer=3)
    other.state_read(blob, seq if seq == -1 else 2)
    dest = -1 if seq == -1 else 2
    assert np.array_equal(
        np.frombuffer(other.state_write(dest), np.uint8)[-100:],
        np.frombuffer(blob, np.uint8)[-100:],
    )


def test_rows_section_refuses_before_writing() -> None:
    # pm_rows_section (one sequence's recurrent rows in one call): a short buffer, a row
    # size other than the tensor's and a row past its end are refused, nothing written
    from pymem._native import ffi, lib
    from pymem.recurrent.state_io import SeqRows

    mem = RecurrentMemory(ModelSpec(layers=(LayerSpec.ssm(4, 8), LayerSpec.ssm(4, 8))), n_seq_max=2)
    layers = mem._state_layers
    tensors = (*layers.r, *layers.s)
    rows = SeqRows(layers)
    need = sum(12 + t.row_size for t in tensors)
    out = bytearray(b"\xab" * (need + 4))
    written = ffi.new("int64_t *")

    def call(spec, row, cap):  # type: ignore[no-untyped-def]
        return lib.pm_rows_section(
            rows._tensors, ffi.from_buffer("int64_t[]", spec), len(tensors), row,
            ffi.from_buffer(out, require_writable=True), cap, written,
        )  # fmt: skip

    spec = rows._spec.copy()
    assert call(spec, 1, need - 1) == lib.PM_ERR_RANGE and written[0] == need
    bad = spec.copy()
    bad[1, 1] += 4  # a row size the tensor does not have
    assert call(bad, 1, need) == lib.PM_ERR_ARG
    assert call(spec, mem.size * 1000, need) == lib.PM_ERR_ARG  # past the tensor's end
    assert call(spec, (1 << 63) - 1, need) == lib.PM_ERR_ARG  # the largest row: no overflow
    assert out == bytearray(b"\xab" * (need + 4))
    assert call(spec, 1, need) == lib.PM_OK and written[0] == need
    assert out[need:] == b"\xab" * 4

    # pm_rows_sections (several cells' runs): an empty, a reversed or a negative run and a
    # run past the tensors' end are refused before a byte is written
    big = bytearray(b"\xab" * (1 << 16))

    def sections(starts, ends):  # type: ignore[no-untyped-def]
        st, en = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        return lib.pm_rows_sections(
            rows._tensors, ffi.from_buffer("int64_t[]", spec), len(tensors),
            ffi.from_buffer("int64_t[]", st), ffi.from_buffer("int64_t[]", en), st.size,
            ffi.from_buffer(big, require_writable=True), len(big), written,
        )  # fmt: skip

    n_rows = tensors[0].n_rows
    for starts, ends in (([0, 1], [1, 1]), ([1], [0]), ([-1], [1]), ([0], [n_rows + 1]),
                         ([(1 << 63) - 2], [(1 << 63) - 1])):  # fmt: skip
        assert sections(starts, ends) == lib.PM_ERR_ARG, (starts, ends)
    assert big == bytearray(b"\xab" * (1 << 16))
    assert sections([1, 0], [2, 1]) == lib.PM_OK  # two runs, out of order
    assert written[0] == sum(12 + 2 * t.row_size for t in tensors)
    mem.close()


def test_native_rows_restore_commits_whatever_a_parse_checked() -> None:
    # a restore of host rows checks every section in one native walk when parsed and
    # stores the rows in one more at commit, without failing there (in a composite a part
    # that failed at commit would leave the parts before it restored): bytes changed in
    # between are written as they are, as a payload write does
    from pymem.state import StateReader

    mem = make_rec(n_seq=4)
    place(mem, (0, 3), (1, 5))
    fill_rows(mem)
    blob = bytearray(mem.state_write(1))
    plan = mem.state_read_parse(StateReader(blob), 1)
    last = mem._state_layers.s[-1]
    blob[-last.row_size - 12] ^= 0x01  # the last S section's type word
    blob[-1] ^= 0xFF  # and its row's last byte
    plan.commit()
    row = bytes(mem.state_write(1)[-last.row_size :])
    assert row == bytes(blob[-last.row_size :])
    mem.close()


def test_zero_wide_r_restores_through_the_native_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    # a zero-wide R section (MiniMax-01's lightning layers) ends the blob with no row bytes:
    # the native walk takes it (no fallback to the Python loop)
    from pymem.recurrent import state_io as rs_io

    mem = RecurrentMemory(ModelSpec(layers=(LayerSpec.ssm(0, 8),)), n_seq_max=2)
    place(mem, (0, 3))
    blob = mem.state_write(0)
    fallback = []
    real = rs_io.StateReader.read_bytes
    monkeypatch.setattr(
        rs_io.StateReader, "read_bytes", lambda *a: fallback.append(a[2]) or real(*a)
    )
    mem.seq_rm(0)
    assert mem.state_read(blob, 1) == len(blob)
    assert not [w for w in fallback if "type and row size" in w]
    assert mem.seq_pos_max(1) == 3
    mem.close()
