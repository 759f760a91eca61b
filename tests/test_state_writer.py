"""pymem.state writers: the one-pass recorder of write_state gives the same bytes, in the
same order, as streaming to a file and as the size counter says (regression: write_state
used to run the serialiser twice; the recorder must keep every write where it was)."""

from __future__ import annotations

import io

import numpy as np

from pymem.backend import TensorSpec, TensorStore
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
