"""A byte writer and reader for the spec's state blobs (little-endian, no padding)."""

from __future__ import annotations

import struct

from .common import SpecStateError


class Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def u32(self, v: int) -> None:
        self.buf += struct.pack("<I", v)

    def i32(self, v: int) -> None:
        self.buf += struct.pack("<i", v)

    def u64(self, v: int) -> None:
        self.buf += struct.pack("<Q", v)

    def raw(self, b: bytes | bytearray) -> None:
        self.buf += b


class Reader:
    """Reads fields in order; running past the end is a SpecStateError (the reference throws).

    ``Reader.record``, when a list, receives ``(offset, size)`` of every raw (tensor) read:
    the hostile tests use it to tell metadata bytes from tensor bytes.
    """

    record: list | None = None

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        self.data = bytes(data)
        self.off = offset

    def _take(self, n: int, what: str) -> bytes:
        if n < 0 or self.off + n > len(self.data):
            raise SpecStateError(
                f"truncated blob: {what} needs {n} bytes at offset {self.off}, "
                f"{len(self.data) - self.off} left"
            )
        b = self.data[self.off : self.off + n]
        self.off += n
        return b

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self._take(4, what))[0]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self._take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self._take(8, what))[0]

    def raw(self, n: int, what: str) -> bytes:
        if Reader.record is not None:
            Reader.record.append((self.off, n))
        return self._take(n, what)
