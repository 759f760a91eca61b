"""The part of ggml's API a runtime needs to build and run graphs over pymem's tensors.

pymem and the runtime share one ggml (see :mod:`pymem._native`), so graph nodes built
here read and write pymem's K/V/R/S buffers directly::

    import pymem.ggml as gg
    with gg.Context() as ctx:
        q = ctx.new_tensor("f32", (head_dim, n_head, n_tokens), input=True)
        k = ctx.view_3d(cache_k.ptr, ...)           # a view of a pymem tensor
        kq = ctx.mul_mat(k, q)                      # any ggml op taking a context first
        runner = gg.GraphRunner(device)
        (out,) = runner.run(ctx, [kq], inputs={q: q_values})

Every ``ggml_<op>(ctx, ...)`` in the cdef is available as ``ctx.<op>(...)``; tensors are
cffi ``struct ggml_tensor *`` pointers. Context-free helpers live at module level.

A graph whose tensors live on several devices (a memory with layers placed on other
devices than the weights: rpc-servers, GPUs) runs on :class:`MultiDeviceRunner`, ggml's
backend scheduler; :func:`graph_devices` tells which devices a built graph touches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pymem._native import check, ffi, lib
from pymem.backend import Device, get_device
from pymem.backend import devices as registry_devices
from pymem.errors import DeviceError, NativeError, TypeSpecError
from pymem.rpc_link import ServerLink, server_link
from pymem.types import ggml_type

if TYPE_CHECKING:
    from pymem.spec import RopeSpec

_log = logging.getLogger(__name__)

DEFAULT_GRAPH_SIZE = 8192

# ggml functions whose first argument is the context: exposed as Context methods
OPS = frozenset(
    [
        "new_tensor_1d",
        "new_tensor_2d",
        "new_tensor_3d",
        "new_tensor_4d",
        "view_1d",
        "view_2d",
        "view_3d",
        "view_4d",
        "reshape_1d",
        "reshape_2d",
        "reshape_3d",
        "reshape_4d",
        "permute",
        "transpose",
        "cont",
        "cont_2d",
        "cont_3d",
        "cpy",
        "cast",
        "get_rows",
        "set_rows",
        "rope_ext",
        "mul_mat",
        "soft_max_ext",
        "flash_attn_ext",
        "ssm_conv",
        "ssm_scan",
        "rms_norm",
        "norm",
        "add",
        "mul",
        "sub",
        "div",
        "scale",
        "scale_bias",
        "silu",
        "gelu",
        "sigmoid",
        "neg",
        "exp",
        "softplus",
        "sqr",
        "relu",
        "sqrt",
        "concat",
        "sum_rows",
        "repeat",
        "clamp",
        "pad",
        "scale_inplace",
        "tanh",
        "swiglu_split",
        "geglu_split",
        "rope_multi",
        "gated_delta_net",
        "repeat_4d",
        "soft_max",
        "argsort_top_k",
        "mul_mat_id",
        "rwkv_wkv6",
        "gated_linear_attn",
        "rwkv_wkv7",
        "l2_norm",
        "add_id",
        "swiglu_oai",
        "reglu_split",
        "swiglu",
        "mean",
        "cont_4d",
    ]
)


class Context:
    """A ggml context for graph nodes. Metadata only: data comes from the graph allocator
    (intermediates, inputs) or from pymem tensors (views)."""

    def __init__(
        self, max_tensors: int = 4 * DEFAULT_GRAPH_SIZE, graph_size: int = DEFAULT_GRAPH_SIZE
    ) -> None:
        params = ffi.new("struct ggml_init_params *")
        params.mem_size = max_tensors * lib.ggml_tensor_overhead() + lib.ggml_graph_overhead_custom(
            graph_size, False
        )
        params.mem_buffer = ffi.NULL
        params.no_alloc = True
        self.ptr = lib.ggml_init(params[0])
        if self.ptr == ffi.NULL:
            raise NativeError("ggml_init failed for a graph context")
        self.graph_size = graph_size

    def close(self) -> None:
        if self.ptr != ffi.NULL:
            lib.ggml_free(self.ptr)
            self.ptr = ffi.NULL

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name in OPS:
            fn = getattr(lib, "ggml_" + name)
            ctx = self.ptr
            return lambda *args: fn(ctx, *args)
        raise AttributeError(f"pymem.ggml.Context has no op {name!r}")

    def rope(
        self, t: Any, pos: Any, rope: RopeSpec, mode: int | None = None, factors: Any = None
    ) -> Any:
        """``ggml_rope_ext`` of ``t`` at positions ``pos`` with a layer's RoPE parameters;
        ``factors``: an F32 tensor of frequency factors (None: none); ``mode`` defaults to
        the spec's rope type."""
        return lib.ggml_rope_ext(
            self.ptr,
            t,
            pos,
            ffi.NULL if factors is None else factors,
            rope.n_rot,
            int(rope.rope_type) if mode is None else mode,
            rope.n_ctx_orig,
            rope.freq_base,
            rope.freq_scale,
            rope.ext_factor,
            rope.attn_factor,
            rope.beta_fast,
            rope.beta_slow,
        )

    def new_tensor(
        self, type: str | int, shape: Sequence[int], name: str | None = None, input: bool = False
    ) -> Any:
        """A new tensor of ``type`` and ggml-order ``shape`` (up to 4 dims)."""
        gtype = ggml_type(type)
        ne = list(shape) + [1] * (4 - len(shape))
        if not 1 <= len(shape) <= 4:
            raise TypeSpecError(f"shape: needs 1 to 4 dims, got {tuple(shape)}")
        t = lib.ggml_new_tensor_4d(self.ptr, gtype.id, *ne)
        if name:
            lib.ggml_set_name(t, name.encode())
        if input:
            lib.ggml_set_input(t)
        return t

    def graph(self, outputs: Sequence[Any]) -> Any:
        """A forward graph computing ``outputs`` (and everything they depend on)."""
        gf = lib.ggml_new_graph_custom(self.ptr, self.graph_size, False)
        for out in outputs:
            lib.ggml_build_forward_expand(gf, out)
        return gf


def shape(t: Any) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in t.ne)  # type: ignore[return-value]


def strides(t: Any) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in t.nb)  # type: ignore[return-value]


def nbytes(t: Any) -> int:
    return int(lib.ggml_nbytes(t))


def type_of(t: Any) -> str:
    return ffi.string(lib.ggml_type_name(t.type)).decode()


def set_data(t: Any, values: np.ndarray) -> None:
    """Copy ``values`` (C-contiguous, exactly the tensor's bytes) into an allocated tensor."""
    arr = np.ascontiguousarray(values)
    if arr.nbytes != nbytes(t):
        raise TypeSpecError(f"set_data: {arr.nbytes} bytes given, tensor holds {nbytes(t)}")
    lib.ggml_backend_tensor_set(t, ffi.from_buffer(arr), 0, arr.nbytes)


def get_data(t: Any) -> np.ndarray:
    """The tensor's values as numpy (shape ``ne`` reversed; raw bytes for quantised types)."""
    gtype = ggml_type(int(t.type))
    out = np.empty(nbytes(t), dtype=np.uint8)
    lib.ggml_backend_tensor_get(t, ffi.from_buffer(out), 0, out.nbytes)
    dims = [int(t.ne[3]), int(t.ne[2]), int(t.ne[1])]
    if gtype.numpy_dtype is None:
        return out.reshape(*dims, -1)
    return out.view(gtype.numpy_dtype).reshape(*dims, int(t.ne[0]))


class _Runner:
    """What every graph runner shares: :meth:`run` builds the graph and hands it to the
    runner's own ``compute``."""

    def compute(
        self, gf: Any, inputs: Mapping[Any, np.ndarray] | None, read: Sequence[Any]
    ) -> list[np.ndarray]:
        raise NotImplementedError

    def run(
        self,
        ctx: Context,
        outputs: Sequence[Any],
        inputs: Mapping[Any, np.ndarray] | None = None,
        read: Sequence[Any] | None = None,
    ) -> list[np.ndarray]:
        """Build, allocate and compute the graph of ``outputs``; set ``inputs`` first.

        Returns the values of ``read`` (default: ``outputs``) as numpy arrays. Outputs that
        are ``set_rows`` / ``cpy`` nodes into pymem tensors write those tensors in place.
        """
        return self.compute(ctx.graph(outputs), inputs, outputs if read is None else read)


class GraphRunner(_Runner):
    """Allocates and computes graphs on one device, keeping its allocator between runs
    (stable graph shapes reuse the same compute buffer)."""

    def __init__(self, device: str | Device | None = None, n_threads: int | None = None) -> None:
        self.device = get_device(device)
        self._link = server_link(self.device)
        self._galloc = lib.ggml_gallocr_new(self.device.buffer_type)
        if self._galloc == ffi.NULL:
            raise NativeError(f"ggml_gallocr_new failed on {self.device.name}")
        self._backend = self.device.backend()
        self.n_threads = n_threads or os.cpu_count() or 1
        if self.device.kind == "cpu":
            check(lib.pm_backend_set_n_threads(self._backend, self.n_threads), "set_n_threads")

    def close(self) -> None:
        """Free the compute buffer; on an rpc-server that is gone it is left unfreed (ggml
        would abort the process on the free), with a warning."""
        if self._galloc != ffi.NULL:
            if self._link is not None and self._link.is_down():
                _log.warning(
                    "GraphRunner on %s: its rpc-server is gone, the compute buffer is left unfreed",
                    self.device.name,
                )
            else:
                lib.ggml_gallocr_free(self._galloc)
            self._galloc = ffi.NULL

    def __del__(self) -> None:
        self.close()

    def compute(
        self, gf: Any, inputs: Mapping[Any, np.ndarray] | None, read: Sequence[Any]
    ) -> list[np.ndarray]:
        """Allocate and compute a built graph ``gf``; set ``inputs`` first; ``read`` back.

        Every tensor ``gf`` reads or writes must be in a buffer this device can use (its
        own, or a host buffer for the CPU): a graph over a memory with layers on other
        devices raises :class:`DeviceError` (computing it here would hand the backend
        another device's addresses); :class:`DeviceRunners` picks the scheduler for it.
        """
        self.check_graph(gf)
        return self._compute_checked(gf, inputs, read)

    def _compute_checked(
        self, gf: Any, inputs: Mapping[Any, np.ndarray] | None, read: Sequence[Any]
    ) -> list[np.ndarray]:
        """:meth:`compute` once the graph's buffers are known to be this device's."""
        if self._link is not None:
            self._link.check(self.device.name)
        if not lib.ggml_gallocr_alloc_graph(self._galloc, gf):
            raise NativeError(f"graph allocation failed on {self.device.name}")
        for t, values in (inputs or {}).items():
            set_data(t, values)
        if self.device.kind == "cpu":
            # the backend is shared by every runner of the device: apply this runner's count
            check(lib.pm_backend_set_n_threads(self._backend, self.n_threads), "set_n_threads")
        status = lib.ggml_backend_graph_compute(self._backend, gf)
        if status != lib.GGML_STATUS_SUCCESS:
            raise NativeError(f"graph compute failed on {self.device.name}: status {status}")
        return [get_data(t) for t in read]

    def check_graph(self, gf: Any, bufts: Sequence[Any] | None = None) -> None:
        """Raise :class:`DeviceError` when ``gf`` touches a buffer this device cannot use
        (``bufts``: the graph's :func:`graph_buffer_types`, when already known)."""
        own = self.device.buffer_type
        cpu = self.device.kind == "cpu"
        for buft in graph_buffer_types(gf) if bufts is None else bufts:
            if buft == own or (cpu and lib.ggml_backend_buft_is_host(buft)):
                continue
            names = [d.name for d in graph_devices(gf) if d != self.device]
            raise DeviceError(
                f"graph: reads or writes tensors on {names}, but this runner computes on "
                f"{self.device.name!r} alone; compute it with a MultiDeviceRunner over those "
                f"devices (DeviceRunners picks one per graph)"
            )


# --- graphs over several devices ---------------------------------------------------------

SCHED_MAX_BACKENDS = 16  # GGML_SCHED_MAX_BACKENDS, private to ggml-backend.cpp
_MAX_BUFFER_TYPES = 64


def graph_buffer_types(gf: Any) -> list[Any]:
    """The buffer types of the tensors graph ``gf`` reads or writes (see graph_devices)."""
    out = ffi.new("ggml_backend_buffer_type_t[]", _MAX_BUFFER_TYPES)
    n = ffi.new("int32_t *")
    check(lib.pm_graph_buffer_types(gf, out, _MAX_BUFFER_TYPES, n), "graph_buffer_types")
    return [out[i] for i in range(n[0])]


def graph_devices(gf: Any) -> list[Device]:
    """The devices whose buffers hold tensors graph ``gf`` reads or writes, first use first.

    Counted before allocation: weights, pymem's K/V/R/S tensors and views of them (a
    ``set_rows`` into the cache counts as the cache's device); inputs and intermediates
    have no buffer yet. One C call over every node and its sources. E.g. weights on the
    CPU and a memory with layers on CPU and RPC0 -> [CPU, RPC0].
    """
    return devices_of_buffer_types(graph_buffer_types(gf))


def devices_of_buffer_types(bufts: Sequence[Any]) -> list[Device]:
    """The devices of buffer types ``bufts`` (:func:`graph_buffer_types`), first use first."""
    known = registry_devices()
    by_buft = {d.buffer_type: d for d in known}
    by_handle = {d.handle: d for d in known}
    found: list[Device] = []
    for buft in bufts:
        # a device's own buffer type first: ggml's CPU buffer type names no device
        dev = by_buft.get(buft) or by_handle.get(lib.ggml_backend_buft_get_device(buft))
        if dev is None and lib.ggml_backend_buft_is_host(buft):
            dev = get_device("CPU")
        if dev is None:
            name = ffi.string(lib.ggml_backend_buft_name(buft)).decode()
            raise DeviceError(f"graph: a tensor lives in a {name!r} buffer of no registered device")
        if dev not in found:
            found.append(dev)
    return found


def mark_weights(t: Any) -> None:
    """Mark the backend buffer holding tensor ``t`` as weights.

    ggml's scheduler runs an op that reads weights on the weights' device; unmarked, a
    matmul between a CPU weight and activations that came from another device may be
    placed there, and the weight copied over every step. The single-device allocator
    ignores the mark.
    """
    if t.buffer == ffi.NULL:
        raise TypeSpecError("mark_weights: the tensor has no backend buffer")
    lib.ggml_backend_buffer_set_usage(t.buffer, lib.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)


class MultiDeviceRunner(_Runner):
    """Computes graphs whose tensors live on several devices, with ggml's backend scheduler.

    Why: a memory may place layers' K/V or R/S on other devices (``device={il: ...}``;
    rpc-servers, GPUs) while the weights stay on one. ``ggml_backend_sched`` splits each
    graph into runs of nodes per device: a node that writes a tensor runs where that
    tensor lives (a ``set_rows`` into layer ``il``'s cache on that layer's device), an op
    reading weights runs where the weights are (see :func:`mark_weights`), the others
    follow their neighbours, and sources from another device are copied in at the start
    of a run. Graph inputs live on the CPU. Every device runs ggml's kernels for its op,
    so over rpc-servers of the same ggml on the same CPU type the results equal one
    device's bit for bit.

    Devices take priority in the order given; the CPU is always added, last (ggml needs
    a CPU backend last: it runs what no other backend supports). Errors are typed: a
    graph touching a device outside the runner, or an rpc-server that is gone (checked
    before each compute on Linux and macOS, where ggml would otherwise abort the process), raise
    :class:`~pymem.errors.DeviceError`; a graph the scheduler cannot allocate or compute
    raises :class:`~pymem.errors.NativeError`.
    """

    def __init__(self, devices: Sequence[str | Device], n_threads: int | None = None) -> None:
        given = [get_device(d) for d in devices]
        cpu = get_device("CPU")
        order: list[Device] = []
        for dev in given:
            if dev != cpu and dev not in order:
                order.append(dev)
        order.append(cpu)
        if len(order) > SCHED_MAX_BACKENDS:
            raise DeviceError(
                f"devices: {len(order)} with the CPU, ggml's scheduler takes at most "
                f"{SCHED_MAX_BACKENDS}"
            )
        self.devices: tuple[Device, ...] = tuple(order)
        self.n_threads = n_threads or os.cpu_count() or 1
        self._rpc: dict[Device, ServerLink] = {}
        for dev in order:
            link = server_link(dev)
            if link is not None:
                self._rpc[dev] = link
        self.check_devices()
        self._backends = ffi.new("ggml_backend_t[]", [d.backend() for d in order])
        self._cpu = self._backends[len(order) - 1]
        self._sched: Any = ffi.NULL
        self._sched_size = 0
        self.n_splits = 0  # of the last graph computed

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def check_devices(self) -> None:
        """Raise :class:`DeviceError` for an rpc-server of the runner that is gone
        (:meth:`ServerLink.check`: its connection closed, or no connection and none
        accepted). Where the OS lists no sockets (Windows) nothing is checked."""
        for dev, link in self._rpc.items():
            link.check(dev.name)

    def close(self) -> None:
        """Free the scheduler and its compute buffers; with an rpc-server gone they are
        left unfreed (ggml would abort the process on the free), with a warning."""
        if self._sched != ffi.NULL:
            gone = [dev.name for dev, link in self._rpc.items() if link.is_down()]
            if gone:
                _log.warning(
                    "MultiDeviceRunner over %s: rpc-server of %s gone, its compute buffers "
                    "are left unfreed",
                    self.names,
                    gone,
                )
            else:
                lib.ggml_backend_sched_free(self._sched)
            self._sched = ffi.NULL

    def __del__(self) -> None:
        self.close()

    def compute(
        self, gf: Any, inputs: Mapping[Any, np.ndarray] | None, read: Sequence[Any]
    ) -> list[np.ndarray]:
        """Schedule, allocate and compute a built graph ``gf``; set ``inputs``; ``read``."""
        self.check_spans(graph_devices(gf))
        return self._compute_checked(gf, inputs, read)

    def check_spans(self, spans: Sequence[Device]) -> None:
        """Raise :class:`DeviceError` when a graph spanning ``spans`` (its
        :func:`graph_devices`) touches a device outside this runner."""
        foreign = [d.name for d in spans if d not in self.devices]
        if foreign:
            raise DeviceError(
                f"graph: reads or writes tensors on {foreign}; this runner computes over "
                f"{self.names}"
            )

    def _compute_checked(
        self, gf: Any, inputs: Mapping[Any, np.ndarray] | None, read: Sequence[Any]
    ) -> list[np.ndarray]:
        """:meth:`compute` once the graph's devices are known to be the runner's."""
        self.check_devices()
        # nodes and leafs each up to the graph's size: the scheduler's table holds both
        size = 2 * int(lib.ggml_graph_size(gf))
        if size > self._sched_size:
            self.close()
            self._sched = lib.ggml_backend_sched_new(
                self._backends, ffi.NULL, len(self.devices), size, False, False
            )
            if self._sched == ffi.NULL:
                raise NativeError(f"ggml_backend_sched_new failed over {self.names}")
            self._sched_size = size
        lib.ggml_backend_sched_reset(self._sched)
        for t in read:  # kept out of the allocator's reuse
            lib.ggml_set_output(t)
        if not lib.ggml_backend_sched_alloc_graph(self._sched, gf):
            raise NativeError(
                f"graph of {lib.ggml_graph_n_nodes(gf)} nodes cannot be scheduled over "
                f"{self.names}: compute buffer allocation failed"
            )
        self.n_splits = int(lib.ggml_backend_sched_get_n_splits(self._sched))
        for t, values in (inputs or {}).items():
            set_data(t, values)
        check(lib.pm_backend_set_n_threads(self._cpu, self.n_threads), "set_n_threads")
        status = lib.ggml_backend_sched_graph_compute(self._sched, gf)
        if status != lib.GGML_STATUS_SUCCESS:
            raise NativeError(f"graph compute failed over {self.names}: status {status}")
        return [get_data(t) for t in read]


class DeviceRunners(_Runner):
    """The runner for each graph of a model: its one-device :class:`GraphRunner` when every
    tensor the graph touches is on the model's device, else a :class:`MultiDeviceRunner`
    over the devices the graph spans (one per set of devices, kept between steps).

    Why: a memory may place layers on other devices than the weights' (``device={il:
    ...}``); a model runtime then needs ggml's scheduler for exactly the graphs that reach
    them, and the cheaper one-device runner, bit for bit what the recordings computed,
    everywhere else. ``weights`` (a tensor of the weights' buffer) is marked as weights
    before the first split graph, so the scheduler keeps weight ops on their device.
    """

    def __init__(
        self, device: str | Device | None, n_threads: int | None = None, weights: Any = None
    ) -> None:
        self.device = get_device(device)
        self.n_threads = n_threads
        self.one = GraphRunner(self.device, n_threads=n_threads)
        self.split: dict[tuple[str, ...], MultiDeviceRunner] = {}
        self._weights = weights

    def for_graph(self, gf: Any) -> GraphRunner | MultiDeviceRunner:
        """The runner for built graph ``gf`` (see the class docstring)."""
        return self._for_spans(graph_devices(gf))

    def _for_spans(self, spans: Sequence[Device]) -> GraphRunner | MultiDeviceRunner:
        if all(d == self.device for d in spans):
            return self.one
        key = tuple(sorted(d.name for d in spans))
        runner = self.split.get(key)
        if runner is None:
            if self._weights is not None:
                mark_weights(self._weights)
            runner = MultiDeviceRunner([*spans, self.device], n_threads=self.n_threads)
            self.split[key] = runner
        return runner

    def compute(
        self, gf: Any, inputs: Mapping[Any, np.ndarray] | None, read: Sequence[Any]
    ) -> list[np.ndarray]:
        """Compute ``gf`` with :meth:`for_graph`'s runner; the graph's buffers are walked
        once, for the choice and the runner's own check."""
        bufts = graph_buffer_types(gf)
        runner = self._for_spans(devices_of_buffer_types(bufts))
        if isinstance(runner, GraphRunner):
            runner.check_graph(gf, bufts)
        return runner._compute_checked(gf, inputs, read)

    def close(self) -> None:
        self.one.close()
        for runner in self.split.values():
            runner.close()
