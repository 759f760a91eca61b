"""Devices and tensor stores: where K/V/R/S tensors live.

A :class:`TensorStore` allocates N named tensors in one backend buffer on one device,
zero-filled, and frees them deterministically (``close()`` or ``with``; a finaliser is
only a safety net). A :class:`Tensor` moves bytes in whole row sets and regions: one
native call per operation, never one per row.
"""

from __future__ import annotations

import logging
import socket
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from pymem._native import check, cstr, ffi, ggml_info, lib
from pymem.errors import ClosedError, DeviceError, OutOfMemoryError, RangeError, TypeSpecError
from pymem.rpc_link import ServerLink, server_link
from pymem.types import GGMLType, ggml_type

_KINDS = {
    lib.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    lib.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    lib.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}

_log = logging.getLogger(__name__)


class Device:
    """A ggml backend device ("CPU", "CUDA0", "Metal", ...)."""

    def __init__(self, handle: Any) -> None:
        self._dev = handle
        self.name: str = cstr(lib.ggml_backend_dev_name(handle))
        self.description: str = cstr(lib.ggml_backend_dev_description(handle))
        self.kind: str = _KINDS.get(lib.ggml_backend_dev_type(handle), "other")
        self._buft = lib.ggml_backend_dev_buffer_type(handle)
        self._backend: Any = None
        # an rpc-server's device: this process's connection to it, looked at before each
        # call ggml would abort on when the server is gone (pymem.rpc_link)
        self.rpc_link: ServerLink | None = server_link(self)
        if self.rpc_link is not None:
            _LINKED_DEVICES.add(self.name)

    @property
    def handle(self) -> Any:
        """The ``ggml_backend_dev_t``."""
        return self._dev

    @property
    def buffer_type(self) -> Any:
        return self._buft

    @property
    def is_host(self) -> bool:
        """Whether this device's buffers are host memory (numpy views are zero-copy)."""
        return bool(lib.ggml_backend_buft_is_host(self._buft))

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes as the backend reports them."""
        free = ffi.new("size_t *")
        total = ffi.new("size_t *")
        lib.ggml_backend_dev_memory(self._dev, free, total)
        return int(free[0]), int(total[0])

    def backend(self) -> Any:
        """A ``ggml_backend_t`` for this device, created once and kept for the process."""
        if self._backend is None:
            backend = lib.ggml_backend_dev_init(self._dev, ffi.NULL)
            if backend == ffi.NULL:
                raise DeviceError(f"device {self.name!r}: ggml_backend_dev_init failed")
            self._backend = backend
        return self._backend

    def __repr__(self) -> str:
        free, total = self.memory()
        return (
            f"Device({self.name!r}, kind={self.kind!r}, description={self.description!r}, "
            f"free={free}, total={total})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and self._dev == other._dev

    def __hash__(self) -> int:
        return hash(self.name)


_DEVICES: dict[str, Device] = {}
# the names of the devices with an rpc-server link (check_reachable has nothing to do
# without one: a state restore of host memory pays no walk of its layers' devices)
_LINKED_DEVICES: set[str] = set()


def devices() -> list[Device]:
    """Every device of the bound ggml's backend registry, in registry order."""
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        handle = lib.ggml_backend_dev_get(i)
        name = cstr(lib.ggml_backend_dev_name(handle))
        if name not in _DEVICES:
            _DEVICES[name] = Device(handle)
        out.append(_DEVICES[name])
    return out


def get_device(device: str | Device | None = None) -> Device:
    """A device by name (case-insensitive), a Device, or None for the CPU."""
    if isinstance(device, Device):
        return device
    if device is None:
        device = "CPU"
    if not isinstance(device, str):
        raise DeviceError(f"device: expected a device name or Device, got {device!r}")
    known = devices()
    for dev in known:
        if dev.name.lower() == device.lower():
            return dev
    raise DeviceError(f"device: unknown device {device!r}; available: {[d.name for d in known]}")


def check_reachable(devices: Iterable[Device]) -> None:
    """Raise :class:`DeviceError` when one of ``devices`` is an rpc-server that is gone.

    Why: ggml aborts the process on a call to a lost server; an operation that writes
    several devices (a state restore) looks at all of them before it changes anything.
    """
    if not _LINKED_DEVICES:  # no rpc-server device in this process: nothing to ask
        return
    for dev in set(devices):
        if dev.rpc_link is not None:
            dev.rpc_link.check(dev.name)


_RPC_SERVERS: dict[str, list[Device]] = {}


def add_rpc_devices(endpoint: str) -> list[Device]:
    """The devices of the ggml ``rpc-server`` at ``endpoint`` ("host:port"), registered.

    They join :func:`devices` (named ``RPC0``, ``RPC1``, ... in the order servers are
    added; the description is the endpoint) and are placed like any device: a memory's
    ``device={il: "RPC0", ...}`` puts those layers' K/V or R/S in one backend buffer on
    that server. Their buffers are not host memory: rows move with the tensor get/set
    calls (one network round trip each). Adding the same endpoint again returns the same
    devices. Goes through the RPC backend's registry entry (no RPC symbol is linked), so a
    ggml built without ``GGML_RPC`` raises :class:`DeviceError` saying so; so does a server
    that does not answer. A server lost later is fatal to the process (ggml aborts).
    """
    if not isinstance(endpoint, str) or endpoint.count(":") != 1 or not endpoint.split(":")[1]:
        raise DeviceError(f"endpoint: expected 'host:port', got {endpoint!r}")
    known = _RPC_SERVERS.get(endpoint)
    if known is not None:
        return list(known)
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        info = ggml_info()
        raise DeviceError(
            f"add_rpc_device({endpoint!r}): the bound ggml {info.version} ({info.path}, "
            f"{info.source}) has no RPC backend (backends: {list(info.backends)}); build ggml "
            "with -DGGML_RPC=ON (.ci/ggml_rpc) and point PYMEM_GGML_LIB_DIR at it"
        )
    proc = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if proc == ffi.NULL:
        raise DeviceError(
            f"add_rpc_device({endpoint!r}): this ggml's RPC backend exports no "
            "ggml_backend_rpc_add_server (a ggml older than the multi-device RPC protocol)"
        )
    # this ggml aborts the process when a server does not answer: ask first
    host, port = endpoint.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise DeviceError(
            f"add_rpc_device({endpoint!r}): no rpc-server answers there: {exc}"
        ) from exc
    add_server = ffi.cast("ggml_backend_reg_t (*)(const char *)", proc)
    server = add_server(endpoint.encode())
    if server == ffi.NULL:
        raise DeviceError(
            f"add_rpc_device({endpoint!r}): no rpc-server answered there, or it has no devices"
        )
    handles = [
        lib.ggml_backend_reg_dev_get(server, i)
        for i in range(lib.ggml_backend_reg_dev_count(server))
    ]
    registered = {lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())}
    if not all(h in registered for h in handles):  # another user of this ggml may have added it
        lib.ggml_backend_register(server)
    by_handle = {d.handle: d for d in devices()}
    found = [by_handle[h] for h in handles]
    _RPC_SERVERS[endpoint] = found
    return list(found)


def add_rpc_device(endpoint: str) -> Device:
    """The one device of the ``rpc-server`` at ``endpoint``; see :func:`add_rpc_devices`.

    Raises :class:`DeviceError` when the server exposes several devices.
    """
    found = add_rpc_devices(endpoint)
    if len(found) != 1:
        raise DeviceError(
            f"add_rpc_device({endpoint!r}): the server has {len(found)} devices "
            f"{[d.name for d in found]}; use add_rpc_devices"
        )
    return found[0]


@dataclass(frozen=True)
class TensorSpec:
    """Name, ggml type and shape (ggml order: ne0 first, up to 4 dims) of one tensor."""

    name: str
    type: str | int | GGMLType
    shape: tuple[int, ...]

    def resolved(self) -> tuple[GGMLType, tuple[int, int, int, int]]:
        """Validated (type, ne[4]); raises a typed error naming the tensor and the value."""
        gtype = ggml_type(self.type)
        shape = tuple(self.shape)
        if not 1 <= len(shape) <= 4:
            raise TypeSpecError(f"tensor {self.name!r}: shape needs 1 to 4 dims, got {shape}")
        for axis, n in enumerate(shape):
            # a zero width is allowed (rows of 0 bytes, e.g. LFM2's empty SSM state); zero rows are not
            low = 0 if axis == 0 else 1
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < low:
                raise TypeSpecError(
                    f"tensor {self.name!r}: shape[{axis}] must be an int >= {low}, got {n!r}"
                )
        if shape[0] % gtype.block_size:
            raise TypeSpecError(
                f"tensor {self.name!r}: width shape[0]={shape[0]} is not a multiple of the block "
                f"size {gtype.block_size} of type {gtype.name}"
            )
        ne = tuple(int(n) for n in shape) + (1,) * (4 - len(shape))
        return gtype, ne  # type: ignore[return-value]

    def nbytes(self) -> int:
        gtype, ne = self.resolved()
        return gtype.row_size(ne[0]) * ne[1] * ne[2] * ne[3]


def _as_rows(rows: Any, n_rows: int, what: str) -> np.ndarray:
    """Validate a row-index array: int64, 1-D, every index in [0, n_rows)."""
    arr = np.ascontiguousarray(rows, dtype=np.int64)
    if arr.ndim != 1:
        raise RangeError(f"{what}: row indices must be 1-D, got shape {arr.shape}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n_rows:
            bad = int(np.flatnonzero((arr < 0) | (arr >= n_rows))[0])
            raise RangeError(f"{what}: rows[{bad}] = {int(arr[bad])} is outside [0, {n_rows})")
    return arr


def _as_bytes(data: Any, size: int, what: str) -> Any:
    """A C-contiguous byte view of ``data`` of exactly ``size`` bytes (no copy if possible)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
        n = data.nbytes
    else:
        n = memoryview(data).nbytes
    if n != size:
        raise RangeError(f"{what}: data holds {n} bytes, expected {size}")
    return ffi.from_buffer(data)


class Tensor:
    """A tensor in a store: type, shape (ne), strides (nb), and batch I/O.

    Rows are units of ``nb[1]`` bytes over all dims above 0, numbered
    ``i1 + ne1 * (i2 + ne2 * i3)``.
    """

    def __init__(
        self, store: TensorStore, ptr: Any, spec_type: GGMLType, name: str, ndim: int
    ) -> None:
        self._store = store
        self.ndim = ndim
        self.ptr = ptr
        self.type = spec_type
        self.name = name
        self.shape: tuple[int, int, int, int] = tuple(int(v) for v in ptr.ne)  # type: ignore[assignment]
        self.nb: tuple[int, int, int, int] = tuple(int(v) for v in ptr.nb)  # type: ignore[assignment]
        self.nbytes = int(lib.ggml_nbytes(ptr))
        self.row_size = self.nb[1]
        self.n_rows = self.shape[1] * self.shape[2] * self.shape[3]
        # called before each write through this API that may put nonzero bytes anywhere
        # (and by numpy(), whose view is writable): a KV cache keeps the rows past its
        # cells zero and is told its bound no longer holds. Graph writes through the
        # ggml tensor are the cells' rows, not reported
        self.on_write: Callable[[], None] | None = None

    @property
    def device(self) -> Device:
        return self._store.device

    def _live(self) -> Any:
        store = self._store
        if store.closed:
            raise ClosedError(f"tensor {self.name!r}: its store was closed")
        if store.link is not None:
            store.link.check(store.device.name)
        return self.ptr

    def _writing(self) -> None:
        if self.on_write is not None:
            self.on_write()

    def _check_region(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > self.nbytes:
            raise RangeError(
                f"{what} on {self.name!r}: bytes [{offset}, {offset + size}) outside [0, {self.nbytes})"
            )

    # --- contiguous bytes ---------------------------------------------------------
    def read_bytes(self, offset: int = 0, size: int | None = None) -> bytes:
        size = self.nbytes - offset if size is None else size
        out = bytearray(size)
        self.read_into(out, offset)
        return bytes(out)

    def read_into(self, out: Any, offset: int = 0) -> None:
        """Fill the writable buffer ``out`` with the tensor bytes starting at ``offset``."""
        view = memoryview(out).cast("B")
        self._check_region(offset, view.nbytes, "read")
        check(
            lib.pm_tensor_read(
                self._live(), offset, view.nbytes, ffi.from_buffer(view, require_writable=True)
            ),
            f"read {self.name}",
        )

    def write_bytes(self, data: Any, offset: int = 0) -> None:
        size = data.nbytes if isinstance(data, np.ndarray) else memoryview(data).nbytes
        self._check_region(offset, size, "write")
        self._writing()
        check(
            lib.pm_tensor_write(self._live(), offset, size, _as_bytes(data, size, "write")),
            f"write {self.name}",
        )

    # --- strided regions (transposed V) -------------------------------------------
    def _check_strided(
        self, offset: int, chunk: int, stride: int, n_chunks: int, what: str
    ) -> None:
        if chunk < 0 or stride < 0 or n_chunks < 0:
            raise RangeError(
                f"{what} on {self.name!r}: chunk={chunk}, stride={stride}, "
                f"n_chunks={n_chunks} must be >= 0"
            )
        end = offset + (n_chunks - 1) * stride + chunk if n_chunks and chunk else offset
        if offset < 0 or end > self.nbytes:
            raise RangeError(
                f"{what} on {self.name!r}: region [{offset}, {end}) outside [0, {self.nbytes})"
            )

    def read_strided_into(
        self, out: Any, offset: int, chunk: int, stride: int, n_chunks: int
    ) -> None:
        """``n_chunks`` pieces of ``chunk`` bytes, ``stride`` apart, packed into ``out``."""
        self._check_strided(offset, chunk, stride, n_chunks, "strided read")
        view = memoryview(out).cast("B")
        if view.nbytes != chunk * n_chunks:
            raise RangeError(
                f"strided read on {self.name!r}: out holds {view.nbytes} bytes, "
                f"expected {chunk * n_chunks}"
            )
        check(
            lib.pm_tensor_read_strided(
                self._live(),
                offset,
                chunk,
                stride,
                n_chunks,
                ffi.from_buffer(view, require_writable=True),
            ),
            f"strided read {self.name}",
        )

    def read_strided(self, offset: int, chunk: int, stride: int, n_chunks: int) -> np.ndarray:
        out = np.empty((n_chunks, chunk), dtype=np.uint8)
        self.read_strided_into(out, offset, chunk, stride, n_chunks)
        return out

    def write_strided(self, data: Any, offset: int, chunk: int, stride: int, n_chunks: int) -> None:
        self._check_strided(offset, chunk, stride, n_chunks, "strided write")
        buf = _as_bytes(data, chunk * n_chunks, f"strided write {self.name}")
        self._writing()
        check(
            lib.pm_tensor_write_strided(self._live(), offset, chunk, stride, n_chunks, buf),
            f"strided write {self.name}",
        )

    # --- scattered byte ranges (fragmented state sections) ----------------------------
    def _as_ranges(self, offsets: Any, sizes: Any, what: str) -> tuple[np.ndarray, np.ndarray, int]:
        off = np.ascontiguousarray(offsets, dtype=np.uint64)
        size = np.ascontiguousarray(sizes, dtype=np.uint64)
        if off.ndim != 1 or off.shape != size.shape:
            raise RangeError(
                f"{what} on {self.name!r}: offsets {off.shape} and sizes {size.shape} must be equal 1-D"
            )
        return off, size, int(size.sum())

    def _check_ranges_status(
        self, status: int, off: np.ndarray, size: np.ndarray, what: str
    ) -> None:
        """The C layer bounds-checks every range before copying anything (no second pass
        here); on its refusal, name the first bad range."""
        if status == lib.PM_ERR_RANGE:
            end = off + size
            i = int(np.flatnonzero((end > self.nbytes) | (end < off))[0])
            raise RangeError(
                f"{what} on {self.name!r}: range[{i}] = [{int(off[i])}, {int(off[i]) + int(size[i])}) "
                f"outside [0, {self.nbytes})"
            )
        check(status, f"{what} {self.name}")

    def read_ranges_into(self, out: Any, offsets: Any, sizes: Any) -> None:
        """Byte ranges ``[offsets[i], offsets[i] + sizes[i])`` packed into ``out``, one call."""
        off, size, total = self._as_ranges(offsets, sizes, "read_ranges")
        view = memoryview(out).cast("B")
        if view.nbytes != total:
            raise RangeError(
                f"read_ranges on {self.name!r}: out holds {view.nbytes} bytes, ranges {total}"
            )
        status = lib.pm_tensor_read_ranges(
            self._live(), ffi.from_buffer("uint64_t[]", off), ffi.from_buffer("uint64_t[]", size),
            off.size, ffi.from_buffer(view, require_writable=True),
        )  # fmt: skip
        self._check_ranges_status(status, off, size, "read_ranges")

    def write_ranges(self, data: Any, offsets: Any, sizes: Any) -> None:
        """Scatter the packed bytes of ``data`` to the ranges (inverse of read_ranges_into)."""
        off, size, total = self._as_ranges(offsets, sizes, "write_ranges")
        buf = _as_bytes(data, total, f"write_ranges {self.name}")
        self._writing()
        status = lib.pm_tensor_write_ranges(
            self._live(), ffi.from_buffer("uint64_t[]", off), ffi.from_buffer("uint64_t[]", size),
            off.size, buf,
        )  # fmt: skip
        self._check_ranges_status(status, off, size, "write_ranges")

    # --- repeated runs (state sections: K/V row runs, transposed V channels) -----------
    def _runs_args(
        self, offset: int, n_rep: int, rep_stride: int, starts: Any, sizes: Any, skip: int,
        size: int, what: str,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The cheap checks of a runs set (shapes, signs); the C layer bounds-checks every
        run before copying anything, and :meth:`_runs_refused` names what it refused."""
        st = np.ascontiguousarray(starts, dtype=np.uint64)
        sz = np.ascontiguousarray(sizes, dtype=np.uint64)
        if st.ndim != 1 or st.shape != sz.shape:
            raise RangeError(
                f"{what} on {self.name!r}: starts {st.shape} and sizes {sz.shape} must be equal 1-D"
            )
        if min(offset, n_rep, rep_stride, skip, size) < 0:
            raise RangeError(
                f"{what} on {self.name!r}: offset={offset}, n_rep={n_rep}, rep_stride={rep_stride}, "
                f"skip={skip}, size={size} must be >= 0"
            )
        return st, sz

    def _runs_refused(
        self, status: int, offset: int, n_rep: int, rep_stride: int, st: np.ndarray,
        sz: np.ndarray, skip: int, size: int, what: str,
    ) -> None:  # fmt: skip
        """Raise for a refused runs call: RangeError naming the first run past the end of
        the tensor, or the window past the end of the stream; else the status' error."""
        if status == lib.PM_ERR_RANGE:
            used = np.flatnonzero(sz)
            if n_rep and used.size:
                # the last repetition lies highest: E.g. offset 0, 2 reps of stride 32, run [18, 20) -> 52
                room = self.nbytes - offset - (n_rep - 1) * rep_stride  # room for a run's end
                ends = st[used].astype(object) + sz[used].astype(object)
                bad = [k for k, e in enumerate(ends) if e > room]
                if bad:
                    i = int(used[bad[0]])
                    raise RangeError(
                        f"{what} on {self.name!r}: run[{i}] = [{int(st[i])}, {int(st[i]) + int(sz[i])}) "
                        f"of repetition {n_rep - 1} (offset {offset}, stride {rep_stride}) ends past "
                        f"{self.nbytes}"
                    )
            total = n_rep * int(sz.sum())
            raise RangeError(
                f"{what} on {self.name!r}: bytes [{skip}, {skip + size}) outside the "
                f"{total} bytes of {n_rep} x {int(sz.sum())}"
            )
        check(status, f"{what} {self.name}")

    def read_runs_into(
        self, out: Any, offset: int, n_rep: int, rep_stride: int, starts: Any, sizes: Any,
        skip: int = 0,
    ) -> None:  # fmt: skip
        """Fill ``out`` with bytes ``[skip, skip + len(out))`` of the stream "for each
        repetition ``r < n_rep``, for each run ``i``: tensor bytes ``[offset + r *
        rep_stride + starts[i], + sizes[i])``", in one native call.

        E.g. transposed f16 V of cells [2, 5) and [9, 10), 2 channels of 16 cells:
        offset 0, n_rep 2, rep_stride 32, starts [4, 18], sizes [6, 2].
        """
        view = memoryview(out).cast("B")
        st, sz = self._runs_args(offset, n_rep, rep_stride, starts, sizes, skip, view.nbytes,
                                 "read_runs")  # fmt: skip
        status = lib.pm_tensor_read_runs(
            self._live(), offset, n_rep, rep_stride, ffi.from_buffer("uint64_t[]", st),
            ffi.from_buffer("uint64_t[]", sz), st.size, skip, view.nbytes,
            ffi.from_buffer(view, require_writable=True),
        )  # fmt: skip
        if status != lib.PM_OK:
            self._runs_refused(status, offset, n_rep, rep_stride, st, sz, skip, view.nbytes,
                               "read_runs")  # fmt: skip

    def write_runs(
        self, data: Any, offset: int, n_rep: int, rep_stride: int, starts: Any, sizes: Any,
        skip: int = 0,
    ) -> None:  # fmt: skip
        """Scatter ``data`` to bytes ``[skip, skip + len(data))`` of the stream of
        :meth:`read_runs_into` (its inverse), in one native call."""
        size = data.nbytes if isinstance(data, np.ndarray) else memoryview(data).nbytes
        st, sz = self._runs_args(offset, n_rep, rep_stride, starts, sizes, skip, size, "write_runs")
        buf = _as_bytes(data, size, f"write_runs {self.name}")
        self._writing()
        status = lib.pm_tensor_write_runs(
            self._live(), offset, n_rep, rep_stride, ffi.from_buffer("uint64_t[]", st),
            ffi.from_buffer("uint64_t[]", sz), st.size, skip, size, buf,
        )  # fmt: skip
        if status != lib.PM_OK:
            self._runs_refused(status, offset, n_rep, rep_stride, st, sz, skip, size, "write_runs")

    def copy_runs_from(
        self, src: Tensor, src_offset: int, offset: int, n_rep: int, rep_stride: int,
        starts: Any, sizes: Any,
    ) -> None:  # fmt: skip
        """Fill the runs set of :meth:`write_runs` with the contiguous bytes of ``src`` from
        ``src_offset`` on (``n_rep * sum(sizes)`` of them), tensor to tensor in one native
        call: no host round trip when both live on a device (a checkpoint restore moves its
        payload this way). The source bytes must not overlap a destination run.

        E.g. ``v.copy_runs_from(blob, 4096, 0, 2, 32, [4, 18], [6, 2])`` puts blob bytes
        [4096, 4112) into ``v`` bytes [4, 10) [18, 20) [36, 42) [50, 52).
        """
        st, sz = self._runs_args(offset, n_rep, rep_stride, starts, sizes, 0, 0, "copy_runs")
        if src_offset < 0:
            raise RangeError(f"copy_runs on {self.name!r}: src_offset={src_offset} must be >= 0")
        total = n_rep * int(sz.sum())
        if src_offset + total > src.nbytes:
            raise RangeError(
                f"copy_runs {src.name!r} -> {self.name!r}: source bytes [{src_offset}, "
                f"{src_offset + total}) outside [0, {src.nbytes})"
            )
        self._writing()
        status = lib.pm_tensor_copy_runs(
            src._live(), src_offset, self._live(), offset, n_rep, rep_stride,
            ffi.from_buffer("uint64_t[]", st), ffi.from_buffer("uint64_t[]", sz), st.size,
        )  # fmt: skip
        if status == lib.PM_ERR_ARG:
            raise RangeError(
                f"copy_runs {src.name!r} -> {self.name!r}: source bytes [{src_offset}, "
                f"{src_offset + total}) overlap a destination run (same buffer)"
            )
        if status != lib.PM_OK:
            self._runs_refused(status, offset, n_rep, rep_stride, st, sz, 0, total, "copy_runs")

    # --- row sets -------------------------------------------------------------------
    def read_rows(self, rows: Any) -> np.ndarray:
        """Rows ``rows`` as a ``uint8[n, row_size]`` array (one native call)."""
        idx = _as_rows(rows, self.n_rows, f"read_rows {self.name}")
        out = np.empty((idx.size, self.row_size), dtype=np.uint8)
        check(
            lib.pm_rows_read(
                self._live(), ffi.from_buffer("int64_t[]", idx), idx.size, ffi.from_buffer(out)
            ),
            f"read_rows {self.name}",
        )
        return out

    def write_rows(self, rows: Any, data: Any) -> None:
        idx = _as_rows(rows, self.n_rows, f"write_rows {self.name}")
        buf = _as_bytes(data, idx.size * self.row_size, f"write_rows {self.name}")
        self._writing()
        check(
            lib.pm_rows_write(self._live(), ffi.from_buffer("int64_t[]", idx), idx.size, buf),
            f"write_rows {self.name}",
        )

    def fill_rows(self, rows: Any, value: int = 0) -> None:
        if not 0 <= value <= 255:
            raise RangeError(f"fill_rows {self.name}: value {value} outside [0, 255]")
        idx = _as_rows(rows, self.n_rows, f"fill_rows {self.name}")
        if value:
            self._writing()
        check(
            lib.pm_rows_fill(self._live(), ffi.from_buffer("int64_t[]", idx), idx.size, value),
            f"fill_rows {self.name}",
        )

    def fill_row_range(self, first: int, count: int, value: int = 0) -> None:
        """Set rows ``[first, first + count)`` to ``value`` bytes: one device memset, no
        index list to build or check (what :meth:`fill_rows` of that range does)."""
        if not 0 <= value <= 255:
            raise RangeError(f"fill_row_range {self.name}: value {value} outside [0, 255]")
        if first < 0 or count < 0 or first + count > self.n_rows:
            raise RangeError(
                f"fill_row_range {self.name}: rows [{first}, {first + count}) outside "
                f"[0, {self.n_rows})"
            )
        if count and value:
            self._writing()
        if count:
            lib.ggml_backend_tensor_memset(
                self._live(), value, first * self.row_size, count * self.row_size
            )

    def copy_rows(self, src_rows: Any, dst: Tensor, dst_rows: Any) -> None:
        """``dst[dst_rows[i]] = self[src_rows[i]]`` on the device (overlap-safe per run)."""
        if dst.type != self.type or dst.row_size != self.row_size:
            raise TypeSpecError(
                f"copy_rows {self.name} -> {dst.name}: type/row size {self.type.name}/{self.row_size} "
                f"!= {dst.type.name}/{dst.row_size}"
            )
        s = _as_rows(src_rows, self.n_rows, f"copy_rows {self.name} (source)")
        d = _as_rows(dst_rows, dst.n_rows, f"copy_rows {dst.name} (destination)")
        if s.size != d.size:
            raise RangeError(
                f"copy_rows {self.name}: {s.size} source rows but {d.size} destination rows"
            )
        dst._writing()
        check(
            lib.pm_rows_copy(
                self._live(),
                ffi.from_buffer("int64_t[]", s),
                dst._live(),
                ffi.from_buffer("int64_t[]", d),
                s.size,
            ),
            f"copy_rows {self.name} -> {dst.name}",
        )

    # --- views ----------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """Zero-copy numpy view (host buffers only), shape ``ne`` reversed.

        Block-quantised types are viewed as ``uint8[..., row_size]``. The view is writable,
        so the tensor's owner is told of a write (``on_write``).
        """
        self._writing()
        return self.host_view()

    def host_view(self) -> np.ndarray:
        """:meth:`numpy` for pymem's own reads and its writes of rows it owns (a KV cache's
        cells): its owner is not told of a write."""
        if not self.device.is_host:
            raise DeviceError(
                f"tensor {self.name!r} lives on {self.device.name} (not host memory); use read_bytes/read_rows"
            )
        raw = np.frombuffer(ffi.buffer(self._live().data, self.nbytes), dtype=np.uint8)
        dims = [self.shape[3], self.shape[2], self.shape[1]][3 - (self.ndim - 1) :]
        dtype = self.type.numpy_dtype
        if dtype is None:
            return raw.reshape(*dims, self.row_size)
        return raw.view(dtype).reshape(*dims, self.shape[0])

    def __repr__(self) -> str:
        return (
            f"Tensor({self.name!r}, type={self.type.name}, shape={self.shape}, nb={self.nb}, "
            f"nbytes={self.nbytes}, device={self._store.device.name!r})"
        )


def report_writes(owner: Any, tensors: Iterable[Tensor], lift: Callable[[Any], None]) -> None:
    """Make each write through ``tensors``' own API (:attr:`Tensor.on_write`) call
    ``lift(owner)``: a memory that keeps the rows past its cells zero is told its bound no
    longer holds. The owner is held weakly (its tensors do not keep it alive)."""
    ref = weakref.ref(owner)
    for t in tensors:
        t.on_write = partial(_owner_wrote, ref, lift)


@contextmanager
def unreported(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Writes through ``tensors``' own API inside the block do not call their
    :attr:`Tensor.on_write`: pymem's writes of rows whose owner raised its bound over them
    first (a restore's rows on the numpy and device roads, zeros), which would otherwise
    lift that bound to every row."""
    saved = [(t, t.on_write) for t in tensors]
    for t, _ in saved:
        t.on_write = None
    try:
        yield
    finally:
        for t, hook in saved:
            t.on_write = hook


def _owner_wrote(ref: weakref.ref[Any], lift: Callable[[Any], None]) -> None:
    owner = ref()
    if owner is not None:
        lift(owner)


def _free_native(ctx: Any, buf: Any, link: ServerLink | None = None) -> None:
    if buf != ffi.NULL:
        if link is not None and link.is_down():
            # ggml's RPC backend aborts the process on a free the server cannot answer
            _log.warning(
                "TensorStore: the rpc-server at %s:%d is gone; its buffer is left unfreed",
                link.host,
                link.port,
            )
        else:
            lib.ggml_backend_buffer_free(buf)
    if ctx != ffi.NULL:
        lib.ggml_free(ctx)


class TensorStore:
    """N tensors in one backend buffer on one device, zero-filled at creation."""

    def __init__(self, device: str | Device | None, tensors: Iterable[TensorSpec]) -> None:
        self.device = get_device(device)
        self.link = self.device.rpc_link
        if self.link is not None:
            self.link.check(self.device.name)
        specs = list(tensors)
        if not specs:
            raise TypeSpecError("tensors: a store needs at least one tensor, got none")
        resolved = []
        names = set()
        for spec in specs:
            if not isinstance(spec, TensorSpec):
                raise TypeSpecError(f"tensors: expected TensorSpec items, got {spec!r}")
            if spec.name in names:
                raise TypeSpecError(f"tensors: duplicate tensor name {spec.name!r}")
            if len(spec.name.encode()) >= 64:
                raise TypeSpecError(f"tensor name {spec.name!r}: longer than ggml's 63-byte limit")
            names.add(spec.name)
            resolved.append(spec.resolved())
        align = int(lib.ggml_backend_buft_get_alignment(self.device.buffer_type))
        need = sum(
            -(-(g.row_size(ne[0]) * ne[1] * ne[2] * ne[3]) // align) * align for g, ne in resolved
        )
        if need == 0:
            raise TypeSpecError(
                f"tensors: every tensor of the store is empty ({[sp.name for sp in specs]}); nothing to allocate"
            )
        free, total = self.device.memory()
        limit = total if self.device.is_host else free
        if limit and need > limit:
            raise OutOfMemoryError(
                f"TensorStore on {self.device.name}: {need} bytes requested, the device has "
                f"{limit} bytes {'in total' if self.device.is_host else 'free'}"
            )
        params = ffi.new("struct ggml_init_params *")
        params.mem_size = (len(specs) + 1) * lib.ggml_tensor_overhead()
        params.mem_buffer = ffi.NULL
        params.no_alloc = True
        self._ctx = lib.ggml_init(params[0])
        if self._ctx == ffi.NULL:
            raise OutOfMemoryError("TensorStore: ggml_init failed for the tensor metadata context")
        self._buf = ffi.NULL
        self._finalizer = weakref.finalize(self, _free_native, self._ctx, ffi.NULL)
        self._tensors: dict[str, Tensor] = {}
        ptrs = []
        for spec, (gtype, ne) in zip(specs, resolved):
            ptr = lib.ggml_new_tensor_4d(self._ctx, gtype.id, *ne)
            lib.ggml_set_name(ptr, spec.name.encode())
            ptrs.append((spec.name, gtype, ptr, len(spec.shape)))
        buf = lib.ggml_backend_alloc_ctx_tensors_from_buft(self._ctx, self.device.buffer_type)
        if buf == ffi.NULL:
            self.close()
            raise OutOfMemoryError(
                f"TensorStore on {self.device.name}: allocating {need} bytes failed"
            )
        self._buf = buf
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _free_native, self._ctx, buf, self.link)
        lib.ggml_backend_buffer_clear(buf, 0)
        self.nbytes = int(lib.ggml_backend_buffer_get_size(buf))
        for name, gtype, ptr, ndim in ptrs:
            self._tensors[name] = Tensor(self, ptr, gtype, name, ndim)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Free the backend buffer now. Idempotent; tensors become unusable."""
        self._finalizer()

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Tensor:
        if self.closed:
            raise ClosedError("TensorStore: already closed")
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(
                f"no tensor {name!r} in this store; names: {list(self._tensors)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._tensors.values())

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def names(self) -> Sequence[str]:
        return list(self._tensors)

    def clear(self, value: int = 0) -> None:
        """Set every byte of the buffer to ``value``."""
        if self.closed:
            raise ClosedError("TensorStore: already closed")
        if self.link is not None:
            self.link.check(self.device.name)
        lib.ggml_backend_buffer_clear(self._buf, value)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes} bytes"
        return f"TensorStore({self.device.name!r}, {len(self._tensors)} tensors, {state})"
