"""Recurrent state_read checks all per-layer section headers at once; a bad header in any
layer (not only the first) must still be refused with the field-by-field message naming
that layer, and change nothing."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from test_recurrent import fill_rows, make_rec, place

from pymem.errors import StateError


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
