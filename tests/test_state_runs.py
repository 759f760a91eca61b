"""The repeated-runs kernel (``pm_tensor_read_runs`` / ``_write_runs`` behind
``Tensor.read_runs_into`` / ``write_runs``), which moves a whole K/V state section in one
native call. Pinned against the numpy reference (fancy indexing of the raw bytes): runs of
one element, contiguous and non-contiguous runs, empty runs, zero repetitions, windows
(``skip``) that cut runs and repetitions anywhere, and bad arguments refused with a typed
error before any byte moves."""

from __future__ import annotations

import numpy as np
import pytest

from pymem.backend import TensorSpec, TensorStore
from pymem.errors import RangeError


def _reference(
    full: np.ndarray, offset: int, n_rep: int, stride: int, starts: list[int], sizes: list[int]
) -> np.ndarray:
    """The logical stream, built byte by byte with numpy (the tested reference)."""
    pieces = [
        full[offset + r * stride + a : offset + r * stride + a + n]
        for r in range(n_rep)
        for a, n in zip(starts, sizes)
    ]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)


CASES = [
    # (offset, n_rep, rep_stride, starts, sizes): K rows, transposed V, odd shapes
    (0, 1, 0, [0], [1024]),  # one run, the whole tensor
    (64, 1, 0, [0, 256, 512], [128, 64, 2]),  # row runs with gaps
    (0, 8, 128, [4, 18, 40], [6, 2, 30]),  # transposed V: 8 channels, 3 runs
    (2, 16, 64, [0], [2]),  # one cell (one element per channel)
    (0, 32, 32, [2 * i for i in range(0, 16, 2)], [2] * 8),  # every other element
    (0, 4, 256, [0, 100], [0, 50]),  # an empty run among others
    (0, 0, 64, [0, 8], [4, 4]),  # zero repetitions
    (0, 3, 0, [0, 4], [4, 4]),  # stride 0: the same bytes repeated
    (0, 1, 0, [], []),  # no runs
]


@pytest.mark.parametrize("case", CASES)
def test_runs_match_the_numpy_reference(device: str, case: tuple) -> None:
    offset, n_rep, stride, starts, sizes = case
    rng = np.random.default_rng(len(starts) + n_rep)
    with TensorStore(device, [TensorSpec("t", "f16", (64, 8))]) as store:
        t = store["t"]
        full = rng.integers(0, 256, t.nbytes, dtype=np.uint8)
        t.write_bytes(full)
        want = _reference(full, offset, n_rep, stride, starts, sizes)
        out = bytearray(want.size)
        t.read_runs_into(out, offset, n_rep, stride, starts, sizes)
        assert bytes(out) == want.tobytes()
        # every window of the stream, as a file writer streams it (cuts inside runs too)
        for skip, n in ((0, 0), (1, 3), (want.size // 3, want.size // 2), (want.size, 0)):
            skip = min(skip, want.size)
            n = max(0, min(n, want.size - skip))
            part = bytearray(n)
            t.read_runs_into(part, offset, n_rep, stride, starts, sizes, skip=skip)
            assert bytes(part) == want[skip : skip + n].tobytes()
        if stride == 0 and n_rep > 1:
            return  # overlapping repetitions: the last write wins, checked elsewhere
        new = rng.integers(0, 256, want.size, dtype=np.uint8)
        t.write_runs(new, offset, n_rep, stride, starts, sizes)
        expect = full.copy()
        k = 0
        for r in range(n_rep):
            for a, n in zip(starts, sizes):
                expect[offset + r * stride + a : offset + r * stride + a + n] = new[k : k + n]
                k += n
        assert t.read_bytes() == expect.tobytes()
        # a window written alone changes only its bytes
        if want.size > 4:
            t.write_runs(new[2:5] ^ 0xFF, offset, n_rep, stride, starts, sizes, skip=2)
            got = bytearray(want.size)
            t.read_runs_into(got, offset, n_rep, stride, starts, sizes)
            exp = new.copy()
            exp[2:5] ^= 0xFF
            assert bytes(got) == exp.tobytes()


def test_runs_gather_equals_a_transposed_v_column_gather() -> None:
    """The transposed-V use: channel-major elements of cells ``idx`` (numpy ``[:, idx]``)."""
    kv_size, n_ch = 200, 12
    with TensorStore("cpu", [TensorSpec("v", "f16", (kv_size, n_ch))]) as store:
        v = store["v"]
        v.write_bytes(np.random.default_rng(1).integers(0, 256, v.nbytes, dtype=np.uint8))
        idx = np.array([0, 1, 2, 7, 9, 10, 11, 50, 199])
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        # E.g. [0, 1, 2, 7, 9, 10, 11, 50, 199] -> starts [0, 7, 9, 50, 199], lengths [3, 1, 3, 1, 1]
        starts = idx[np.concatenate(([0], brk))]
        lengths = np.diff(np.concatenate(([0], brk, [idx.size])))
        out = np.empty((n_ch, idx.size), dtype=np.uint16)
        v.read_runs_into(out, 0, n_ch, kv_size * 2, starts * 2, lengths * 2)
        np.testing.assert_array_equal(out, v.numpy().view(np.uint16)[:, idx])


BAD = [
    # (offset, n_rep, rep_stride, starts, sizes, skip, out size, message)
    (0, 1, 0, [1020], [8], 0, 8, r"run\[0\] = \[1020, 1028\) of repetition 0"),
    (0, 9, 128, [0], [2], 0, 18, r"run\[0\] = \[0, 2\) of repetition 8"),
    (-1, 1, 0, [0], [2], 0, 2, r"offset=-1"),
    (0, -2, 0, [0], [2], 0, 0, r"n_rep=-2"),
    (0, 1, 0, [0, 4], [2], 0, 2, r"starts \(2,\) and sizes \(1,\)"),
    (0, 2, 64, [0], [4], 6, 4, r"bytes \[6, 10\) outside the 8 bytes of 2 x 4"),
    (0, 1, 0, [0], [4], 0, 6, r"bytes \[0, 6\) outside the 4 bytes"),
]


@pytest.mark.parametrize("bad", BAD)
def test_bad_runs_are_refused_before_any_byte_moves(bad: tuple) -> None:
    offset, n_rep, stride, starts, sizes, skip, n, msg = bad
    with TensorStore("cpu", [TensorSpec("t", "f16", (64, 8))]) as store:
        t = store["t"]
        full = np.random.default_rng(2).integers(0, 256, t.nbytes, dtype=np.uint8)
        t.write_bytes(full)
        with pytest.raises(RangeError, match=msg):
            t.read_runs_into(bytearray(n), offset, n_rep, stride, starts, sizes, skip=skip)
        with pytest.raises(RangeError, match=msg):
            t.write_runs(bytes(n), offset, n_rep, stride, starts, sizes, skip=skip)
        assert t.read_bytes() == full.tobytes()


def test_native_layer_refuses_what_python_would() -> None:
    """The C checks stand on their own (a caller that skips the Python ones)."""
    from pymem._native import ffi, lib

    with TensorStore("cpu", [TensorSpec("t", "f16", (64, 8))]) as store:
        t = store["t"]
        st = np.array([1020], dtype=np.uint64)
        sz = np.array([8], dtype=np.uint64)
        buf = bytearray(8)
        args = (ffi.from_buffer("uint64_t[]", st), ffi.from_buffer("uint64_t[]", sz), 1)
        assert lib.pm_tensor_read_runs(t.ptr, 0, 1, 0, *args, 0, 8, ffi.from_buffer(buf)) == (
            lib.PM_ERR_RANGE
        )
        assert lib.pm_tensor_write_runs(t.ptr, 0, 1, 0, *args, 0, 8, ffi.from_buffer(buf)) == (
            lib.PM_ERR_RANGE
        )
        # a repetition count that overflows the tensor
        st[0], sz[0] = 0, 2
        assert lib.pm_tensor_read_runs(
            t.ptr, 0, 1 << 40, 64, *args, 0, 8, ffi.from_buffer(buf)
        ) == (lib.PM_ERR_RANGE)
        assert lib.pm_tensor_read_runs(t.ptr, 0, -1, 64, *args, 0, 0, ffi.NULL) == lib.PM_ERR_ARG
        assert lib.pm_tensor_read_runs(t.ptr, 0, 1, 0, *args, 0, 2, ffi.NULL) == lib.PM_ERR_ARG
