"""pymem.state writers: the one-pass recorder of write_state gives the same bytes, in the
same order, as streaming to a file and as the size counter says (regression: write_state
used to run the serialiser twice; the recorder must keep every write where it was)."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

import pymem.state as state_mod
from pymem.backend import TensorSpec, TensorStore
from pymem.errors import RangeError
from pymem.state import StateWriter, state_size, write_state, write_state_to


def _serialiser(store: TensorStore):
    t = store["t"]
    big = np.arange(300, dtype=np.int32)  # 1200 bytes: deferred, not packed

    def fill(out: memoryview) -> None:
        np.frombuffer(out, dtype=np.uint8)[:] = np.arange(len(out), dtype=np.uint8)[::-1]

    def serialise(w: StateWriter) -> None:
        w.write_u32(7)
        w.write_i32(-2)
        w.write_u64(1 << 40)
        w.write_array(big)
        w.write(b"xyz")
        w.write_tensor(t, 16, 40)
        w.write_u32(9)
        w.write_tensor_strided(t, 4, 8, 64, 5)
        w.write_fill(33, fill)
        w.write_array(np.array([1, 2], dtype=np.int16))

    return serialise, t, big


def test_write_state_matches_file_stream_and_expected_bytes() -> None:
    with TensorStore("CPU", [TensorSpec("t", "f32", (16, 8))]) as store:
        serialise, t, big = _serialiser(store)
        raw = np.arange(t.nbytes, dtype=np.uint32).astype(np.uint8)
        t.write_bytes(raw.tobytes())
        blob = write_state(serialise)
        f = io.BytesIO()
        assert write_state_to(f, serialise) == len(blob)
        assert f.getvalue() == bytes(blob)
        assert state_size(serialise) == len(blob)
        strided = b"".join(raw[4 + 64 * k : 12 + 64 * k].tobytes() for k in range(5))
        expected = (
            (7).to_bytes(4, "little")
            + (-2).to_bytes(4, "little", signed=True)
            + (1 << 40).to_bytes(8, "little")
            + big.tobytes()
            + b"xyz"
            + raw[16:56].tobytes()
            + (9).to_bytes(4, "little")
            + strided
            + bytes(range(32, -1, -1))
            + np.array([1, 2], dtype=np.int16).tobytes()
        )
        assert bytes(blob) == expected


def test_write_state_of_only_small_fields() -> None:
    def serialise(w: StateWriter) -> None:
        w.write_u32(1)
        w.write(b"ab")

    assert write_state(serialise) == b"\x01\x00\x00\x00ab"
    assert write_state(lambda w: None) == b""


def test_tensor_runs_same_bytes_in_memory_streamed_and_counted(monkeypatch) -> None:
    """write_tensor_runs (one native call per K/V section) gives the numpy reference's
    bytes through every writer; the file writer streams it in windows that cut runs and
    repetitions anywhere (FILE_CHUNK shrunk to 7 bytes) and never holds the section whole."""
    import pymem.state as state

    with TensorStore("CPU", [TensorSpec("t", "f16", (16, 8))]) as store:
        t = store["t"]
        raw = np.random.default_rng(3).integers(0, 256, t.nbytes, dtype=np.uint8)
        t.write_bytes(raw)
        starts = np.array([2, 10, 20], dtype=np.uint64)
        sizes = np.array([4, 2, 6], dtype=np.uint64)

        def serialise(w: StateWriter) -> None:
            w.write_u32(5)
            w.write_tensor_runs(t, 4, 8, 32, starts, sizes)  # 8 channels of 16 f16 cells
            w.write_tensor_runs(t, 0, 1, 0, starts[:0], sizes[:0])  # nothing
            w.write_u32(6)

        # E.g. channel 1: bytes [36, 40) [44, 46) [54, 60)
        ref = b"".join(
            raw[4 + 32 * r + a : 4 + 32 * r + a + n].tobytes()
            for r in range(8)
            for a, n in zip(starts.tolist(), sizes.tolist())
        )
        expected = (5).to_bytes(4, "little") + ref + (6).to_bytes(4, "little")
        assert bytes(write_state(serialise)) == expected
        assert state_size(serialise) == len(expected)
        seen: list[int] = []

        class Sink(io.BytesIO):
            def write(self, b) -> int:  # type: ignore[override]
                seen.append(memoryview(b).nbytes)
                return super().write(b)

        monkeypatch.setattr(state, "FILE_CHUNK", 7)
        f = Sink()
        assert write_state_to(f, serialise) == len(expected)
        assert f.getvalue() == expected
        assert max(seen) <= 7


def test_write_state_buffer_fills_the_callers_buffer_or_refuses_it() -> None:
    """write_state_buffer (llama_state_seq_get_data's form): the same bytes as write_state
    at the start of the caller's buffer; a short or read-only buffer is refused before
    anything is written."""
    import pytest

    from pymem.errors import RangeError
    from pymem.state import write_state_buffer

    with TensorStore("CPU", [TensorSpec("t", "f32", (16, 8))]) as store:
        serialise, t, _ = _serialiser(store)
        t.write_bytes(np.arange(t.nbytes, dtype=np.uint32).astype(np.uint8).tobytes())
        blob = bytes(write_state(serialise))
        out = bytearray(b"\xee" * (len(blob) + 5))
        assert write_state_buffer(out, serialise) == len(blob)
        assert bytes(out[: len(blob)]) == blob and out[len(blob) :] == b"\xee" * 5
        arr = np.zeros(len(blob), np.uint8)  # any writable buffer
        assert write_state_buffer(arr, serialise) == len(blob) and arr.tobytes() == blob
        short = bytearray(len(blob) - 1)
        with pytest.raises(
            RangeError, match=rf"holds {len(blob) - 1} bytes, the state needs {len(blob)}"
        ):
            write_state_buffer(short, serialise)
        assert short == bytearray(len(blob) - 1)
        with pytest.raises(RangeError, match="read-only"):
            write_state_buffer(bytes(len(blob)), serialise)


def test_long_runs_stream_to_a_file_from_tensor_memory() -> None:
    """A host tensor's long runs (>= 64 KiB each) go to the file as views of the tensor
    (no scratch copy): the same bytes as the buffer writer, one file write per run."""
    with TensorStore("CPU", [TensorSpec("t", "f16", (65536, 4))]) as store:
        t = store["t"]
        raw = np.random.default_rng(5).integers(0, 256, t.nbytes, dtype=np.uint8)
        t.write_bytes(raw)
        starts = np.array([0, 66000], dtype=np.uint64)
        sizes = np.array([65536, 65536], dtype=np.uint64)  # 4 runs of 64 KiB

        def serialise(w: StateWriter) -> None:
            w.write_tensor_runs(t, 100, 2, 131072, starts, sizes)

        writes: list[int] = []

        class Sink(io.BytesIO):
            def write(self, b) -> int:  # type: ignore[override]
                writes.append(memoryview(b).nbytes)
                return super().write(b)

        f = Sink()
        assert write_state_to(f, serialise) == 4 * 65536
        assert f.getvalue() == bytes(write_state(serialise))
        assert f.getvalue() == b"".join(
            raw[100 + 131072 * r + a : 100 + 131072 * r + a + n].tobytes()
            for r in range(2)
            for a, n in ((0, 65536), (66000, 65536))
        )
        assert writes == [65536] * 4
        # a run past the tensor is refused naming it, not written cut short
        bad = np.array([0, t.nbytes - 131072 - 100], dtype=np.uint64)

        def past(w: StateWriter) -> None:
            w.write_tensor_runs(t, 100, 2, 131072, bad, sizes)

        with pytest.raises(RangeError, match=r"run\[1\] .* ends past 524288"):
            write_state_to(io.BytesIO(), past)


def test_host_rest_only_where_payloads_are_host_views() -> None:
    from pymem.state import DeviceBlobReader, PayloadRecorder, StateReader

    class PlainSubclass(StateReader):  # a subclass that changes no payload: still views
        pass

    blob = bytes(range(16))
    for cls in (StateReader, PlainSubclass):
        reader = cls(blob)
        reader.skip(4, "head")
        rest = reader.host_rest()
        assert rest is not None and bytes(rest) == blob[4:]
    # payloads that must each pass through read_payload (recorded ranges, device bytes)
    assert PayloadRecorder(blob).host_rest() is None
    assert DeviceBlobReader.payloads_are_host_views is False


def test_pending_writes_apply_in_order_and_only_at_commit() -> None:
    from pymem.state import PendingWrites

    with TensorStore("cpu", [TensorSpec("t", "i8", (16,))]) as store:
        t = store["t"]
        t.write_bytes(bytes(16))
        pending, order = PendingWrites(), []
        pending.add(t, 0, memoryview(b"\x01\x02"))
        pending.add_call(lambda: order.append(bytes(t.read_bytes(0, 2))))
        pending.add(t, 0, memoryview(b"\x03"))
        assert len(pending) == 3 and t.read_bytes(0, 2) == bytes(2)  # nothing before commit
        pending.commit()
        assert order == [b"\x01\x02"] and t.read_bytes(0, 2) == b"\x03\x02"
        assert len(pending) == 0


def test_uninit_bytearray_gives_the_size_asked_and_sets_up_ctypes_once(monkeypatch) -> None:
    """Small sizes are plain bytearrays; from 64 KiB on CPython's uninitialised one (its
    ctypes function set up once, not per call), from 4 MiB with transparent huge pages
    asked for the whole 2 MiB pages inside it (madvise looked up once). Every result is a
    writable bytearray of the size asked."""
    state_mod._bytearray_from_null.cache_clear()
    advice = []
    monkeypatch.setattr(state_mod, "_libc_madvise", lambda: lambda *a: advice.append(a))
    sizes = (0, 100, (1 << 16) - 1, 1 << 16, 700_001, (5 << 20) + 3)
    huge = 1 << 21
    for _ in range(3):
        for n in sizes:
            out = state_mod.uninit_bytearray(n)
            assert type(out) is bytearray and len(out) == n
            if n:
                out[n - 1] = 7  # writable
            if n >= 2 * huge:
                lo, length, flag = advice.pop()
                assert flag == 14 and lo % huge == 0 and length % huge == 0 and length >= huge
    assert advice == []  # none for a buffer below 4 MiB
    assert state_mod._bytearray_from_null.cache_info().misses == 1
    monkeypatch.undo()
    if sys.platform.startswith("linux"):
        state_mod._libc_madvise.cache_clear()
        assert state_mod._libc_madvise() is not None and state_mod._libc_madvise() is not None
        assert state_mod._libc_madvise.cache_info().misses == 1
