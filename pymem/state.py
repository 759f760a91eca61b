"""Binary state I/O shared by every memory type.

The byte format is llama.cpp's (raw little-endian fields, no padding, no tags). A
``bytes`` result runs the serialisation code once, into a :class:`_Recorder` that packs
the small fields and only notes each tensor read; the recorded size gives a
preallocated buffer, and replaying the notes fills its slices straight from the
tensors, so tensor bytes are copied exactly once and the bookkeeping (cell selection,
meta records) runs once. File output streams through a bounded scratch buffer.

Readers never touch memory while parsing: tensor payloads are collected as
:class:`PendingWrites` (zero-copy views of the blob) and committed only once every field
has been validated, so a bad blob changes nothing. Parsers take payloads with
``read_view`` only, so a blob held in a device buffer can be parsed from its host
metadata (:class:`DeviceBlobReader`): its payloads come out as :class:`DevicePayload`
ranges, copied tensor to tensor at commit (a device checkpoint's restore).
"""

from __future__ import annotations

import struct
from abc import abstractmethod
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Protocol, TypeAlias

import numpy as np

from pymem.errors import ConfigError, RangeError, StateError

if TYPE_CHECKING:
    from pymem.backend import Tensor

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")

FILE_CHUNK = 1 << 22  # 4 MiB scratch for streaming tensor bytes to a file
# a file writer hands a host tensor's runs to the file directly (no scratch copy) when
# they are this long on average and this few (one write call each)
_DIRECT_MIN_RUN = 1 << 16
_DIRECT_MAX_PIECES = 4096

Progress = Callable[[int, int], None]
"""``progress(done, total)`` in bytes, called while a state streams to or from a file:
about every :data:`PROGRESS_STEP` bytes and once at the end (``done == total``)."""
PROGRESS_STEP = 1 << 24  # 16 MiB


class StateWriter:
    """Sink for state bytes. Subclasses decide where bytes go.

    ``fills_in_place``: whether :meth:`write_fill` hands ``fill`` the destination itself
    (a buffer), so one fill may produce a large section with no copy; a writer that would
    stage it (a file) says False and gets sections piece by piece.
    """

    fills_in_place = False

    def __init__(self) -> None:
        self.n_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``. It must stay unchanged until the serialiser returns: a
        ``bytes`` result copies large buffers only once the size is known."""
        raise NotImplementedError

    def write_u32(self, v: int) -> None:
        self.write(_U32.pack(v))

    def write_i32(self, v: int) -> None:
        self.write(_I32.pack(v))

    def write_u64(self, v: int) -> None:
        self.write(_U64.pack(v))

    def write_array(self, arr: np.ndarray) -> None:
        """Raw bytes of a contiguous numpy array (little-endian host)."""
        self.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)

    def write_tensor(self, tensor: Tensor, offset: int, size: int) -> None:
        """``size`` contiguous bytes of ``tensor`` starting at byte ``offset``."""
        raise NotImplementedError

    def write_tensor_strided(
        self, tensor: Tensor, offset: int, chunk: int, stride: int, n_chunks: int
    ) -> None:
        """``n_chunks`` pieces of ``chunk`` bytes, ``stride`` bytes apart, from ``offset``."""
        raise NotImplementedError

    def write_tensor_runs(
        self, tensor: Tensor, offset: int, n_rep: int, rep_stride: int, starts: np.ndarray,
        sizes: np.ndarray,
    ) -> None:  # fmt: skip
        """The bytes of ``tensor.read_runs_into``: for each repetition ``r < n_rep``, the
        runs ``[offset + r * rep_stride + starts[i], + sizes[i])``. A whole K/V section
        (row runs, or transposed V with one repetition per channel) in one native call.

        ``starts`` / ``sizes`` are uint64 arrays the caller keeps unchanged until the
        serialiser returns.
        """
        size = n_rep * int(sizes.sum())
        self.write_fill(
            size,
            lambda out: tensor.read_runs_into(out, offset, n_rep, rep_stride, starts, sizes),
        )

    def write_fill(self, size: int, fill: Callable[[memoryview], object]) -> None:
        """``size`` bytes that ``fill(out)`` produces straight into the destination.

        Lets a memory gather tensor bytes (e.g. ``np.take`` over a host view) into the
        output with one copy. ``fill`` must write all of ``out``; it may run after the
        serialiser has returned (see :class:`_Recorder`), so it must not depend on
        anything the serialiser changes later.
        """
        buf = bytearray(size)
        fill(memoryview(buf))
        self.write(buf)


class SizeCounter(StateWriter):
    """Counts bytes without reading any tensor (the reference's dummy writer)."""

    fills_in_place = True  # no fill runs: a section counts as its size either way

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.n_written += len(data)

    def write_tensor(self, tensor: Tensor, offset: int, size: int) -> None:
        self.n_written += size

    def write_tensor_strided(
        self, tensor: Tensor, offset: int, chunk: int, stride: int, n_chunks: int
    ) -> None:
        self.n_written += chunk * n_chunks

    def write_tensor_runs(
        self, tensor: Tensor, offset: int, n_rep: int, rep_stride: int, starts: np.ndarray,
        sizes: np.ndarray,
    ) -> None:  # fmt: skip
        self.n_written += n_rep * int(sizes.sum())

    def write_fill(self, size: int, fill: Callable[[memoryview], object]) -> None:
        self.n_written += size


_SMALL = 512  # writes up to this size are packed at once; larger ones are deferred


class _Recorder(StateWriter):
    """The one serialisation pass of :func:`write_state`: learns the size and notes the
    copies without doing them, so no tensor byte is read before the output exists.

    Small writes (headers, fields) are packed into one pending chunk; large buffers,
    tensor reads and fills are kept as notes. :meth:`replay` then writes everything
    into the real writer in order.
    """

    fills_in_place = True  # it replays into a BufferWriter

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, ...]] = []
        self._small = bytearray()

    def _flush(self) -> None:
        if self._small:
            self.ops.append(("write", bytes(self._small)))
            self._small.clear()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n <= _SMALL:
            self._small += data
        else:
            self._flush()
            self.ops.append(("write", data))
        self.n_written += n

    def write_u32(self, v: int) -> None:
        self._small += _U32.pack(v)
        self.n_written += 4

    def write_i32(self, v: int) -> None:
        self._small += _I32.pack(v)
        self.n_written += 4

    def write_u64(self, v: int) -> None:
        self._small += _U64.pack(v)
        self.n_written += 8

    def write_tensor(self, tensor: Tensor, offset: int, size: int) -> None:
        self._flush()
        self.ops.append(("write_tensor", tensor, offset, size))
        self.n_written += size

    def write_tensor_strided(
        self, tensor: Tensor, offset: int, chunk: int, stride: int, n_chunks: int
    ) -> None:
        self._flush()
        self.ops.append(("write_tensor_strided", tensor, offset, chunk, stride, n_chunks))
        self.n_written += chunk * n_chunks

    def write_tensor_runs(
        self, tensor: Tensor, offset: int, n_rep: int, rep_stride: int, starts: np.ndarray,
        sizes: np.ndarray,
    ) -> None:  # fmt: skip
        self._flush()
        self.ops.append(("write_tensor_runs", tensor, offset, n_rep, rep_stride, starts, sizes))
        self.n_written += n_rep * int(sizes.sum())

    def write_fill(self, size: int, fill: Callable[[memoryview], object]) -> None:
        self._flush()
        self.ops.append(("write_fill", size, fill))
        self.n_written += size

    def replay(self, writer: StateWriter) -> None:
        """Perform every noted write on ``writer``, in order."""
        self._flush()
        for name, *args in self.ops:
            getattr(writer, name)(*args)


@cache
def _libc_madvise() -> Any:
    """libc's ``madvise`` through ctypes, looked up once (None: not Linux, or no libc)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _advise_huge_pages(buf: bytearray) -> None:
    """Ask Linux for transparent huge pages on a fresh large buffer (as numpy does for
    its arrays): first-touch page faults otherwise cost about as much as the copy."""
    huge = 1 << 21
    if len(buf) < 2 * huge:
        return
    madvise = _libc_madvise()
    if madvise is None:
        return
    import ctypes

    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return
    lo = (addr + huge - 1) & ~(huge - 1)
    hi = (addr + len(buf)) & ~(huge - 1)
    if hi > lo:
        madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE; a failure only costs speed


def set_state_threads(n: int, min_bytes: int | None = None) -> None:
    """How many threads move the tensor bytes of a large native state write or restore.

    A call whose tensor bytes reach ``min_bytes`` is copied by the calling thread and
    ``n - 1`` copy workers (started at the first such call and kept; a forked child starts
    its own), which claim its shares of about equal bytes in order: the caller never waits
    for a worker still waking, only for shares one is copying. A call made while another
    thread's call holds the workers copies alone. ``1`` copies on the calling thread
    alone, as llama.cpp does; ``0`` restores the defaults. ``min_bytes`` None keeps the
    default's.

    The defaults, read once from the environment at the first use: the count from
    ``PYMEM_STATE_THREADS`` (a count in [1, 64]), else min(4, online CPUs); ``min_bytes``
    from ``PYMEM_STATE_MIN_BYTES`` (a byte count in [0, 2**62]), else 1 MiB. A value
    outside its range, or anything but decimal digits, is ignored.

    Why: a gather of scattered runs (one sequence of an interleaved cache, a transposed V)
    is bound by the misses one core keeps in flight, not by memory bandwidth, so a second
    core nearly doubles it (docs/performance.md); below about 1 MB waking a worker costs
    what it saves on the 2-core machine that measured it, and a machine whose cores are
    busy may want more. The bytes moved are the same either way. Process-wide; set it
    while no state write runs. ConfigError (nothing changed) for ``n`` outside [0, 64], a
    ``min_bytes`` outside [0, 2**62], or a ``min_bytes`` with ``n == 0``.
    """
    from pymem._native import check, lib  # binds ggml: not at import time

    for name, value, lo, hi in (("n", n, 0, 64), ("min_bytes", min_bytes, 0, 1 << 62)):
        if value is None and name == "min_bytes":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(
                f"set_state_threads: {name} = {value!r}, expected an int in [{lo}, {hi}]"
            )
    if n == 0 and min_bytes is not None:
        raise ConfigError(
            f"set_state_threads: min_bytes = {min_bytes} with n = 0 (the defaults, whose "
            f"min_bytes is PYMEM_STATE_MIN_BYTES or {lib.PM_COPY_MIN_BYTES_DEFAULT}): give "
            f"n >= 1 to set it"
        )
    check(lib.pm_set_copy_threads(n, -1 if min_bytes is None else min_bytes), "set_state_threads")


def state_threads() -> tuple[int, int]:
    """``(n, min_bytes)`` in effect for state writes and restores (see
    :func:`set_state_threads`; the defaults resolved)."""
    from pymem._native import ffi, lib

    min_bytes = ffi.new("int64_t *")
    n = int(lib.pm_get_copy_threads(min_bytes))
    return n, int(min_bytes[0])


def uninit_bytearray(size: int) -> bytearray:
    """A bytearray whose bytes are not zeroed first (every byte gets written anyway).

    ``bytearray(n)`` zero-fills, which for a large blob costs about as much as the copy
    itself; CPython's ``PyByteArray_FromStringAndSize(NULL, n)`` does not.
    """
    if size >= 1 << 16:
        new = _bytearray_from_null()
        if new is not None:
            out = new(None, size)
            if isinstance(out, bytearray) and len(out) == size:
                _advise_huge_pages(out)
                return out
    return bytearray(size)


@cache
def _bytearray_from_null() -> Any:
    """CPython's ``PyByteArray_FromStringAndSize`` through ctypes, set up once (its
    lookup and signature cost ~2 µs a call otherwise); None where there is none."""
    try:
        import ctypes

        fn = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except (AttributeError, OSError):  # not CPython
        return None
    fn.restype = ctypes.py_object
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    return fn


class BufferWriter(StateWriter):
    """Writes into a preallocated buffer; tensor bytes land in place (one copy).

    ``out``: the caller's writable buffer (at least ``size`` bytes) instead of a new one.
    """

    fills_in_place = True

    def __init__(self, size: int, out: Any = None) -> None:
        super().__init__()
        self.buffer = uninit_bytearray(size) if out is None else out
        self._view = memoryview(self.buffer).cast("B")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._view[self.n_written : self.n_written + n] = data
        self.n_written += n

    def write_tensor(self, tensor: Tensor, offset: int, size: int) -> None:
        tensor.read_into(self._view[self.n_written : self.n_written + size], offset)
        self.n_written += size

    def write_tensor_strided(
        self, tensor: Tensor, offset: int, chunk: int, stride: int, n_chunks: int
    ) -> None:
        size = chunk * n_chunks
        out = self._view[self.n_written : self.n_written + size]
        tensor.read_strided_into(out, offset, chunk, stride, n_chunks)
        self.n_written += size

    def write_tensor_runs(
        self, tensor: Tensor, offset: int, n_rep: int, rep_stride: int, starts: np.ndarray,
        sizes: np.ndarray,
    ) -> None:  # fmt: skip
        size = n_rep * int(sizes.sum())
        out = self._view[self.n_written : self.n_written + size]
        tensor.read_runs_into(out, offset, n_rep, rep_stride, starts, sizes)
        self.n_written += size

    def write_fill(self, size: int, fill: Callable[[memoryview], object]) -> None:
        fill(self._view[self.n_written : self.n_written + size])
        self.n_written += size


class FileWriter(StateWriter):
    """Streams to a binary file object through a bounded scratch buffer.

    With ``progress``, reports ``(bytes written, total)`` about every PROGRESS_STEP bytes.
    """

    def __init__(self, fileobj: BinaryIO, progress: Progress | None = None, total: int = 0) -> None:
        super().__init__()
        self.fileobj = fileobj
        self._scratch = bytearray(0)
        self._progress = progress
        self._total = total
        self._next_report = PROGRESS_STEP

    def _scratch_view(self, n: int) -> memoryview:
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.fileobj.write(data)
        self.n_written += len(data)
        if self._progress is not None and self.n_written >= self._next_report:
            self._progress(self.n_written, self._total)
            self._next_report = self.n_written + PROGRESS_STEP

    def write_tensor(self, tensor: Tensor, offset: int, size: int) -> None:
        done = 0
        while done < size:
            n = min(FILE_CHUNK, size - done)
            view = self._scratch_view(n)
            tensor.read_into(view, offset + done)
            self.write(view)
            done += n

    def write_tensor_strided(
        self, tensor: Tensor, offset: int, chunk: int, stride: int, n_chunks: int
    ) -> None:
        per = max(1, FILE_CHUNK // max(chunk, 1))
        done = 0
        while done < n_chunks:
            n = min(per, n_chunks - done)
            view = self._scratch_view(n * chunk)
            tensor.read_strided_into(view, offset + done * stride, chunk, stride, n)
            self.write(view)
            done += n

    def write_tensor_runs(
        self, tensor: Tensor, offset: int, n_rep: int, rep_stride: int, starts: np.ndarray,
        sizes: np.ndarray,
    ) -> None:  # fmt: skip
        """Streams the section in FILE_CHUNK windows (a window may cut a run anywhere);
        a host tensor's long runs go to the file straight from its memory (no copy)."""
        size = n_rep * int(sizes.sum())
        n_pieces = n_rep * sizes.size
        if (
            tensor.device.is_host
            and 0 < n_pieces <= _DIRECT_MAX_PIECES
            and size >= _DIRECT_MIN_RUN * n_pieces
            # inside the tensor (a view past it would be cut short silently); else the
            # native path below refuses the set with a RangeError naming the run
            and offset >= 0
            and offset + (n_rep - 1) * rep_stride + int((starts + sizes).max()) <= tensor.nbytes
        ):
            raw = tensor.host_view().reshape(-1).view(np.uint8).data
            runs = list(zip(starts.tolist(), sizes.tolist()))
            for r in range(n_rep):
                at = offset + r * rep_stride
                for a, n in runs:
                    self.write(raw[at + a : at + a + n])
            return
        done = 0
        while done < size:
            n = min(FILE_CHUNK, size - done)
            view = self._scratch_view(n)
            tensor.read_runs_into(view, offset, n_rep, rep_stride, starts, sizes, skip=done)
            self.write(view)
            done += n

    def write_fill(self, size: int, fill: Callable[[memoryview], object]) -> None:
        """A fill that is not a tensor section: it needs its whole output at once."""
        view = self._scratch_view(size) if size <= FILE_CHUNK else memoryview(bytearray(size))
        fill(view)
        self.write(view)


def write_state(serialise: Callable[[StateWriter], None]) -> bytes:
    """Run ``serialise`` once into a bytes object with one copy of the tensor bytes."""
    recorder = _Recorder()
    serialise(recorder)
    writer = BufferWriter(recorder.n_written)
    recorder.replay(writer)
    assert writer.n_written == recorder.n_written, "state size changed during replay"
    return bytes(writer.buffer) if len(writer.buffer) < 4096 else writer.buffer  # type: ignore[return-value]


def out_view(out: Any, size: int) -> memoryview:
    """The first ``size`` bytes of the caller's buffer ``out`` as a byte view; RangeError
    (naming the sizes) for a read-only or too small buffer, before any byte is written."""
    view = memoryview(out)
    if view.readonly:
        raise RangeError("state_write_buffer: out is read-only (need a writable buffer)")
    view = view.cast("B")
    if size > view.nbytes:
        raise RangeError(
            f"state_write_buffer: out holds {view.nbytes} bytes, the state needs {size}"
        )
    return view[:size]


def write_state_buffer(out: Any, serialise: Callable[[StateWriter], None]) -> int:
    """Run ``serialise`` once into the caller's writable buffer ``out``; returns the size.

    The form of ``llama_state_seq_get_data(ctx, dst, size, seq_id)``: a buffer reused
    across calls skips what a fresh blob costs on top of the copy (the kernel zeroing
    new pages: for a 64 MiB state about as long as the copy itself). Raises
    :class:`~pymem.errors.RangeError` when ``out`` is too small, before any byte is written.
    """
    recorder = _Recorder()
    serialise(recorder)
    view = out_view(out, recorder.n_written)
    writer = BufferWriter(recorder.n_written, view)
    recorder.replay(writer)
    assert writer.n_written == recorder.n_written, "state size changed during replay"
    return writer.n_written


def write_state_to(
    fileobj: BinaryIO,
    serialise: Callable[[StateWriter], None],
    progress: Progress | None = None,
) -> int:
    """Stream the state into ``fileobj``; returns the bytes written.

    With ``progress`` the size is counted first (no tensor is read for that) so each report
    carries the total.
    """
    total = state_size(serialise) if progress is not None else 0
    writer = FileWriter(fileobj, progress, total)
    serialise(writer)
    if progress is not None:
        progress(writer.n_written, total)
    return writer.n_written


def state_size(serialise: Callable[[StateWriter], None]) -> int:
    counter = SizeCounter()
    serialise(counter)
    return counter.n_written


def index_runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of consecutive indices (cells, rows) in the order given, as half-open
    ``(starts, ends)`` int64 arrays: the pieces a state section moves in one copy each.

    E.g. ``[4, 5, 6, 9, 10, 2] -> ([4, 9, 2], [7, 11, 3])``.
    """
    idx = idx.astype(np.int64, copy=False)
    if idx.size == 0:
        return idx, idx
    # a run breaks wherever the next index is not the previous one + 1
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], brk))]
    ends = idx[np.concatenate((brk - 1, [idx.size - 1]))] + 1
    return starts, ends


class StateReader:
    """Cursor over a blob. Every read checks the remaining length first."""

    # whether read_payload hands out host views of the blob itself (a native parser may
    # then walk the unread bytes at once: host_rest); readers whose payloads are
    # something else (recorded ranges, device bytes) say False
    payloads_are_host_views: ClassVar[bool] = True

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self.offset = 0

    @classmethod
    def from_file(cls, fileobj: BinaryIO, progress: Progress | None = None) -> StateReader:
        """Read the remainder of a file once (the only copy held) and parse from it.

        With ``progress`` and a seekable file, the read goes in PROGRESS_STEP chunks into
        one preallocated buffer, reporting ``(bytes read, total)`` after each.
        """
        if progress is None or not fileobj.seekable():
            data = fileobj.read()
            if progress is not None:
                progress(len(data), len(data))
            return cls(data)
        start = fileobj.tell()
        total = fileobj.seek(0, 2) - start
        fileobj.seek(start)
        buf = bytearray(total)
        view = memoryview(buf)
        done = 0
        while done < total:
            n = fileobj.readinto(view[done : done + PROGRESS_STEP])  # type: ignore[attr-defined]
            if not n:
                break  # the file shrank while reading: parse what is there
            done += n
            progress(done, total)
        if total == 0:
            progress(0, 0)
        return cls(view[:done])

    @property
    def remaining(self) -> int:
        return len(self._view) - self.offset

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise StateError(
                f"state blob truncated reading {what}: need {n} bytes at offset {self.offset}, "
                f"{self.remaining} left"
            )
        view = self._view[self.offset : self.offset + n]
        self.offset += n
        return view

    def read_u32(self, what: str) -> int:
        return int(_U32.unpack(self._take(4, what))[0])

    def read_i32(self, what: str) -> int:
        return int(_I32.unpack(self._take(4, what))[0])

    def read_u64(self, what: str) -> int:
        return int(_U64.unpack(self._take(8, what))[0])

    def read_view(self, n: int, what: str) -> memoryview:
        """A zero-copy view of the next ``n`` bytes of host data."""
        return self._take(n, what)

    def read_payload(self, n: int, what: str) -> Payload:
        """The next ``n`` bytes as a tensor *payload* (K/V, R/S data): a host view here.

        Memory readers take payloads with this call only, and metadata with the other
        ``read_*`` calls: a :class:`PayloadRecorder` learns the payload ranges of a blob
        from it, and a :class:`DeviceBlobReader` answers it with a :class:`DevicePayload`.
        """
        return self._take(n, what)

    def host_rest(self) -> memoryview | None:
        """The unread bytes as one host view, where this reader hands out payloads as host
        views (a plain blob): a native parser may walk them at once and then :meth:`skip`.
        None for readers whose payloads are something else (recorders, device blobs)."""
        return self._view[self.offset :] if self.payloads_are_host_views else None

    def skip(self, n: int, what: str) -> None:
        """Pass over the next ``n`` bytes (walked by a native parser)."""
        self._take(n, what)

    def read_bytes(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes of metadata, copied (a header compared at once)."""
        return bytes(self._take(n, what))

    def read_array(self, dtype: type | str, count: int, what: str) -> np.ndarray:
        """``count`` items of ``dtype``, zero-copy (read-only) from the blob."""
        dt = np.dtype(dtype)
        return np.frombuffer(self._take(count * dt.itemsize, what), dtype=dt, count=count)


STATE_FLAGS_KNOWN = 0x3  # PARTIAL_ONLY (1) | ON_DEVICE (2), llama_state_seq_flags


def check_state_flags(flags: int, what: str) -> int:
    """The state flags every memory accepts, as an int; unknown bits raise RangeError.

    ``PARTIAL_ONLY`` selects the parts a sequence cannot get back by trimming (each
    composite says which). ``ON_DEVICE`` is accepted by every memory and changes nothing in
    the bytes: the reference keeps the tensor data of such a blob in device buffers of its
    own, while a pymem blob always carries it (device-resident copies of a sequence's state
    are :mod:`pymem.reuse` checkpoints).
    """
    flags = int(flags)
    if flags & ~STATE_FLAGS_KNOWN:
        raise RangeError(
            f"{what}: flags {flags:#x} has unknown bits (known: PARTIAL_ONLY 0x1, ON_DEVICE 0x2)"
        )
    return flags


def expect(cond: bool, message: str) -> None:
    """Raise :class:`StateError` with ``message`` unless ``cond`` (input checks in readers)."""
    if not cond:
        raise StateError(message)


BLOB_CHANGED = "state plan: the blob changed after it was parsed; parse it again"


class PendingWrites:
    """Tensor writes collected while parsing a blob, applied only after validation, in
    the order they were added."""

    def __init__(self) -> None:
        self._ops: list[Callable[[], None]] = []
        self._checks: list[Callable[[], bool]] = []

    def add(
        self,
        tensor: Tensor,
        offset: int,
        data: Payload,
        raise_bound: Callable[[], None] | None = None,
    ) -> None:
        """``data`` (host bytes or a device payload) into ``tensor`` at byte ``offset``.
        With ``raise_bound`` (rows whose owner keeps the bound of its written rows itself:
        a recurrent memory's ``rows_hi``) that is called first and the write is not
        reported to the owner (whose ``on_write`` would lift the bound to every row)."""
        self._ops.append(partial(_write_payload, tensor, offset, data, raise_bound))

    def add_call(self, store: Callable[[], None], check: Callable[[], bool] | None = None) -> None:
        """A store a native parser validated already (many tensors' rows in one call);
        ``check()`` (None: nothing to check) says whether the blob still holds what the
        parse took, for :meth:`verify`."""
        self._ops.append(store)
        if check is not None:
            self._checks.append(check)

    def verify(self) -> None:
        """StateError (nothing changed) when a store's blob no longer holds what its parse
        took: a composite's last look before any part commits."""
        if not all(check() for check in self._checks):
            raise StateError(BLOB_CHANGED)

    def __len__(self) -> int:
        return len(self._ops)

    def commit(self) -> None:
        for op in self._ops:
            op()
        self._ops.clear()


def _write_payload(
    tensor: Tensor, offset: int, data: Payload, raise_bound: Callable[[], None] | None
) -> None:
    if raise_bound is None:
        _copy_payload(tensor, offset, data)
        return
    from pymem.backend import unreported  # binds ggml: not at import time

    raise_bound()
    with unreported((tensor,)):
        _copy_payload(tensor, offset, data)


def _copy_payload(tensor: Tensor, offset: int, data: Payload) -> None:
    if isinstance(data, DevicePayload):
        data.copy_to(tensor, offset, 1, 0, _ONE_RUN_START, np.array([data.nbytes], np.uint64))
    else:
        tensor.write_bytes(data, offset)


_ONE_RUN_START = np.zeros(1, dtype=np.uint64)


# --------------------------------------------------------------------------------------
# payloads held on a device: a blob parsed from host metadata, its tensor bytes copied
# device to device
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePayload:
    """A tensor payload of a blob that lives in a backend buffer: ``nbytes`` bytes of
    ``tensor`` from byte ``offset`` on. Parsers pass it where they pass a memoryview;
    the payload writers copy it tensor to tensor (:meth:`Tensor.copy_runs_from`)."""

    tensor: Tensor
    offset: int
    nbytes: int

    def __len__(self) -> int:
        return self.nbytes

    def copy_to(
        self, dst: Tensor, offset: int, n_rep: int, rep_stride: int, starts: np.ndarray,
        sizes: np.ndarray,
    ) -> None:  # fmt: skip
        """Scatter the payload to ``dst``'s runs set (that of ``Tensor.write_runs``)."""
        dst.copy_runs_from(self.tensor, self.offset, offset, n_rep, rep_stride, starts, sizes)

    def to_host(self) -> bytearray:
        """The bytes, read to the host (for a writer that must rearrange them there)."""
        out = bytearray(self.nbytes)
        self.tensor.read_into(out, self.offset)
        return out


Payload: TypeAlias = "memoryview | DevicePayload"
"""What ``StateReader.read_payload`` gives a parser: host bytes, or bytes on a device."""


class PayloadRecorder(StateReader):
    """A :class:`StateReader` that notes the ranges a parse takes as payloads
    (:meth:`read_payload`), to split the blob into host metadata and payloads."""

    payloads_are_host_views = False  # every payload must pass through read_payload

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__(data)
        self.payloads: list[tuple[int, int]] = []  # (blob offset, size), in read order

    def read_payload(self, n: int, what: str) -> Payload:
        at = self.offset
        view = self._take(n, what)
        if n:
            self.payloads.append((at, n))
        return view

    def split(self) -> BlobSplit | None:
        """The blob as metadata + payload ranges, or None when the ranges are not
        ascending and apart (a parser read a payload twice: keep the whole blob)."""
        return BlobSplit.of(self._view, self.payloads)


@dataclass(frozen=True)
class BlobSplit:
    """A blob's metadata (every byte outside its payload ranges, in order) and the
    ranges: what a device-resident blob keeps on the host to be parsed there.

    E.g. a 100-byte blob with payloads (20, 30) and (60, 40) -> meta = bytes [0, 20) +
    [50, 60), starts [20, 60], sizes [30, 40], before [0, 30] (payload bytes before each).
    """

    nbytes: int
    meta: bytes
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    before: tuple[int, ...]

    @classmethod
    def of(cls, blob: memoryview, ranges: list[tuple[int, int]]) -> BlobSplit | None:
        pieces: list[bytes] = []
        before: list[int] = []
        end = done = 0
        for a, n in ranges:
            if a < end:
                return None
            pieces.append(bytes(blob[end:a]))
            before.append(done)
            done += n
            end = a + n
        pieces.append(bytes(blob[end:]))
        return cls(
            len(blob), b"".join(pieces), tuple(a for a, _ in ranges),
            tuple(n for _, n in ranges), tuple(before),
        )  # fmt: skip

    @property
    def payload_bytes(self) -> int:
        return self.nbytes - len(self.meta)


class SplitMismatch(StateError):
    """A parse over a :class:`DeviceBlobReader` read a payload as metadata (or across
    one): it does not follow the parse the split was recorded from. The caller parses
    the whole blob instead (nothing has changed)."""


class DeviceBlobReader(StateReader):
    """A :class:`StateReader` over a blob whose bytes live in ``tensor`` from ``base`` on
    and whose metadata is held on the host (``split``): metadata reads come from the host
    copy, and :meth:`read_payload` of a recorded payload range gives a
    :class:`DevicePayload` (nothing is read from the device while parsing).

    Bounds are checked as over the whole blob; a read that does not match the split
    raises :class:`SplitMismatch`.
    """

    payloads_are_host_views = False  # its payloads are DevicePayloads

    def __init__(self, split: BlobSplit, tensor: Tensor, base: int) -> None:
        super().__init__(split.meta)
        self.split = split
        self.tensor = tensor
        self.base = base
        # the metadata segment of the last read: blob bytes [lo, hi), `skipped` payload
        # bytes before it (parsers read forward, so most reads hit it)
        self._seg = (0, 0, 0)

    @property
    def remaining(self) -> int:
        return self.split.nbytes - self.offset

    def _payload_at(self, at: int) -> int:
        """Index of the last payload starting at or before ``at`` (-1: none)."""
        return bisect_right(self.split.starts, at) - 1

    def _segment(self, at: int, n: int, what: str) -> tuple[int, int, int]:
        """The metadata segment holding blob bytes ``[at, at + n)``; raises on a
        truncated blob, and :class:`SplitMismatch` when they touch a payload."""
        if n < 0 or n > self.remaining:
            raise StateError(
                f"state blob truncated reading {what}: need {n} bytes at offset {at}, "
                f"{self.remaining} left"
            )
        sp = self.split
        k = self._payload_at(at)
        lo = sp.starts[k] + sp.sizes[k] if k >= 0 else 0
        hi = sp.starts[k + 1] if k + 1 < len(sp.starts) else sp.nbytes
        if at < lo or at + n > hi:
            raise SplitMismatch(
                f"{what}: bytes [{at}, {at + n}) of the blob are a payload of the parse it "
                "was split by"
            )
        return lo, hi, (sp.before[k] + sp.sizes[k] if k >= 0 else 0)

    def _take(self, n: int, what: str) -> memoryview:
        at = self.offset
        lo, hi, skipped = self._seg
        if n < 0 or at < lo or at + n > hi:
            if n == 0:
                return self._view[:0]
            lo, hi, skipped = self._seg = self._segment(at, n, what)
        self.offset = at + n
        return self._view[at - skipped : at - skipped + n]

    def read_payload(self, n: int, what: str) -> Payload:
        """The payload at the cursor: a :class:`DevicePayload` when ``[offset, +n)`` is
        a recorded payload range, else as :meth:`_take` (metadata, or a mismatch)."""
        sp, at = self.split, self.offset
        k = self._payload_at(at)
        if n and k >= 0 and sp.starts[k] == at and sp.sizes[k] == n:
            self.offset += n
            return DevicePayload(self.tensor, self.base + at, n)
        return self._take(n, what)


# --------------------------------------------------------------------------------------
# two-phase restore: parse and validate everything, then commit
# --------------------------------------------------------------------------------------


class StatePlan(Protocol):
    """A parsed, validated state (or state part) that nothing has applied yet.

    ``is_current()`` says whether the memory it was parsed for is unchanged since;
    ``commit()`` applies it (and refuses a stale plan with :class:`StateError`).
    """

    def is_current(self) -> bool: ...

    def check_devices(self) -> None:
        """Raise :class:`~pymem.errors.DeviceError` when a device the commit writes is
        gone (an rpc-server), changing nothing."""
        ...

    def verify(self) -> None:
        """Raise :class:`StateError` where the commit would refuse the blob itself (a
        plan whose commit checks the blob's bytes again), changing nothing."""
        ...

    def commit(self) -> None: ...

    def committed_at_once(self) -> None:
        """Say that the caller commits right after the parse, with nothing in between
        (``state_read``): the blob cannot have changed, so the commit and verify need not
        read again what the parse read. A plan handed to a caller is never marked."""
        ...


def refuse_stale_commit(committed: bool, current: bool, what: str) -> None:
    """What every state plan checks before its commit changes anything: StateError for a
    second commit, and for a ``what`` (the memory, the cache) changed since the parse."""
    if committed:
        raise StateError("state plan: already committed")
    if not current:
        raise StateError(
            f"state plan: the {what} changed after the blob was parsed; parse it again"
        )


@dataclass
class CompositeStatePlan:
    """Parsed, validated state parts of several memories; :meth:`commit` applies all.

    Parts are committed in serialisation order only after every part was parsed and
    checked to be current, verified, and every device they write was found there, so a
    bad blob, a stale plan or a lost rpc-server changes nothing anywhere.
    """

    parts: list[StatePlan]
    committed: bool = False

    def is_current(self) -> bool:
        return all(p.is_current() for p in self.parts)

    def check_devices(self) -> None:
        for p in self.parts:
            p.check_devices()

    def verify(self) -> None:
        for p in self.parts:
            p.verify()

    def committed_at_once(self) -> None:
        for p in self.parts:
            p.committed_at_once()

    def commit(self) -> None:
        refuse_stale_commit(self.committed, self.is_current(), "memory")
        self.check_devices()
        # every part's own last look at the blob before any part changes; the first part's
        # commit makes it before it changes anything itself
        for p in self.parts[1:]:
            p.verify()
        self.committed = True
        for p in self.parts:
            p.commit()


STORE_TOO_LATE = "state_read: the memory changed between the check and the store"
"""A :data:`SeqReader` store called after another change of its memory (refused, nothing
changed)."""

SeqReader: TypeAlias = Callable[
    [memoryview], "tuple[int, Callable[[], None], Callable[[], bool]] | None"
]
"""A one-sequence restore in two native phases (:meth:`TwoPhaseStateIO.seq_reader`): the
check of the blob at the start of a byte view, which changes nothing and returns (the bytes
it takes, the store, whether the store still holds), or None where the general parse must
decide (it also names what is wrong); the store applies it and must be called right after:
it refuses a memory changed since the check (StateError, nothing changed), which the third
says beforehand (a composite asks every part before any part stores)."""

SeqWriter: TypeAlias = tuple[int, Callable[[memoryview], int]]
"""A one-sequence blob's size and the function that writes exactly it into a byte view
(:meth:`TwoPhaseStateIO.seq_writer`)."""


def stamped_store(
    taken: int, version: Callable[[], int], apply: Callable[[], None]
) -> tuple[int, Callable[[], None], Callable[[], bool]]:
    """A :data:`SeqReader` check's answer for a memory whose ``version()`` moves on every
    change: (``taken``, a store that runs ``apply`` only while the version is still the
    check's, else refuses with :data:`STORE_TOO_LATE`, whether it still is)."""
    at = version()

    def current() -> bool:
        return version() == at

    def store() -> None:
        if version() != at:
            raise StateError(STORE_TOO_LATE)
        apply()

    return taken, store, current


class WholePart(Protocol):
    """A memory's part of a composite's whole read in one native call
    (:c:func:`pm_whole_read`; :meth:`TwoPhaseStateIO.whole_part`)."""

    def fill(self, part: Any) -> None:
        """Set this part's fields of a ``pm_whole_part`` (once: they stay valid for the
        memory's life)."""

    def ready(self, part: Any) -> bool:
        """Whether a native read or write may run now (an open memory, the native roads
        on, no undo journal), checked before every call; refreshes the fields of ``part``
        that follow the memory (a recurrent memory's current cells)."""

    def commit(self, part: Any) -> None:
        """What Python keeps after the native store (versions, a recurrent memory's cells),
        from the outputs in ``part``."""

    def for_sequence(self, part: Any, seq_id: int) -> None:
        """Set the fields of ``part`` a one-sequence write of ``seq_id`` reads that depend
        on the sequence (a sliding window's positions), after :meth:`ready`."""

    def read_sequence(self, part: Any, seq_id: int) -> bool:
        """Set the fields of ``part`` a one-sequence read of ``seq_id`` needs (after
        :meth:`ready`); False where this part's read needs Python (a sliding window)."""

    def sequence_read(self, part: Any) -> None:
        """What Python keeps after a native one-sequence read (versions, a recurrent
        memory's new cells), from the outputs in ``part``."""

    def written(self) -> None:
        """What Python keeps after a native write (a KV cache's run scratch now holds what
        that write selected: the other calls must search again)."""


class TwoPhaseStateIO:
    """The byte-level state calls of a memory whose state I/O has two phases.

    The memory provides ``state_write_into(writer, seq_id, flags)`` and
    ``state_read_parse(reader, seq_id, flags) -> plan`` (parsing changes nothing;
    ``plan.commit()`` applies it); this mixin turns them into ``state_write`` (bytes),
    ``state_write_to`` (a binary file), ``state_size``, ``state_read`` and
    ``state_read_from``. A restore that fails changes nothing.
    """

    @abstractmethod
    def state_write_into(self, writer: StateWriter, seq_id: int = -1, flags: int = 0) -> None: ...

    @abstractmethod
    def state_read_parse(
        self, reader: StateReader, seq_id: int = -1, flags: int = 0
    ) -> StatePlan: ...

    def seq_writer(self, seq_id: int, flags: int) -> SeqWriter | None:
        """One sequence's blob (``seq_id`` -1: the whole memory's) as (size, fill) where
        this memory can size it before writing: ``fill(view)`` writes exactly ``size``
        bytes into ``view`` and returns that count, in one pass (no recorder, no replay).
        None: not offered (the general writer runs). Arguments that ``state_write_into``
        would refuse raise the same errors here. Composites offer one where every part
        does."""
        return None

    def seq_reader(self, seq_id: int, flags: int) -> SeqReader | None:
        """One sequence's restore (``seq_id`` -1: the whole memory's) as a native check and
        a native store (no parse into plans), where this memory offers one for ``seq_id``
        (already an int, >= -1) and ``flags`` (known bits); None: the general restore
        runs. Composites offer one where every part does: every part's check runs before
        any part's store, so a blob that any part declines changes nothing."""
        return None

    def whole_part(self) -> WholePart | None:
        """This memory's part of a composite's whole read in one native call (a KV cache's
        or a recurrent memory's, in host memory); None: not offered (the composite then
        reads part by part)."""
        return None

    def _one_seq(self, seq_id: Any, flags: int, what: str) -> SeqWriter | None:
        """The sized writer of one sequence, the flags checked first under the name of the
        call that asks (``what``)."""
        if type(seq_id) is not int or seq_id < -1:
            return None
        check_state_flags(flags, what)
        return self.seq_writer(seq_id, flags)

    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        one = self._one_seq(seq_id, flags, "state_write")
        if one is not None:
            size, fill = one
            out = uninit_bytearray(size)
            fill(memoryview(out))
            return bytes(out) if size < 4096 else out  # type: ignore[return-value]
        return write_state(lambda w: self.state_write_into(w, seq_id, flags))

    def state_write_buffer(self, out: Any, seq_id: int = -1, flags: int = 0) -> int:
        """Write the state into the caller's writable buffer ``out`` (as many bytes as
        ``state_size``, at its start); returns that size. Reusing one buffer is the
        fastest way to take states repeatedly (see :func:`write_state_buffer`)."""
        one = self._one_seq(seq_id, flags, "state_write_buffer")
        if one is None:
            return write_state_buffer(out, lambda w: self.state_write_into(w, seq_id, flags))
        size, fill = one
        written = fill(out_view(out, size))
        assert written == size, "the sized writer wrote another size"
        return size

    def state_write_to(
        self,
        fileobj: BinaryIO,
        seq_id: int = -1,
        flags: int = 0,
        progress: Progress | None = None,
    ) -> int:
        """Stream the state into a binary file object; returns the bytes written.

        ``progress(done, total)`` reports bytes written (see :data:`Progress`).
        """
        return write_state_to(fileobj, lambda w: self.state_write_into(w, seq_id, flags), progress)

    def state_size(self, seq_id: int = -1, flags: int = 0) -> int:
        one = self._one_seq(seq_id, flags, "state_size")
        if one is not None:
            return one[0]
        return state_size(lambda w: self.state_write_into(w, seq_id, flags))

    def state_read(
        self, data: bytes | bytearray | memoryview, seq_id: int = -1, flags: int = 0
    ) -> int:
        """Restore from a blob; returns the bytes consumed. Nothing changes on failure.

        One sequence (or the whole memory) of a memory that offers :meth:`seq_reader` is
        checked and stored in native calls; anything it declines takes the two-phase
        parse, which names what is wrong."""
        if (
            type(seq_id) is int
            and seq_id >= -1
            and isinstance(flags, int)
            and not (int(flags) & ~STATE_FLAGS_KNOWN)
        ):
            check = self.seq_reader(seq_id, int(flags))
            if check is not None:
                try:
                    view = memoryview(data).cast("B")
                except TypeError:  # not one contiguous run of bytes: the parse says so
                    view = None
                found = None if view is None else check(view)
                if found is not None:
                    found[1]()
                    return found[0]
        reader = StateReader(data)
        plan = self.state_read_parse(reader, seq_id, flags)
        plan.committed_at_once()
        plan.commit()
        return reader.offset

    def state_read_from(
        self,
        fileobj: BinaryIO,
        seq_id: int = -1,
        flags: int = 0,
        progress: Progress | None = None,
    ) -> int:
        """Restore from the rest of a binary file; returns the bytes consumed.

        A seekable file is left just after those bytes (whatever follows stays unread).
        ``progress(done, total)`` reports bytes read (see :data:`Progress`).
        """
        start = fileobj.tell() if fileobj.seekable() else None
        reader = StateReader.from_file(fileobj, progress)
        self.state_read_parse(reader, seq_id, flags).commit()
        if start is not None:
            fileobj.seek(start + reader.offset)
        return reader.offset
