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
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pymem._native import check, ffi, lib
from pymem.backend import Device, get_device
from pymem.errors import NativeError, TypeSpecError
from pymem.types import ggml_type

if TYPE_CHECKING:
    from pymem.spec import RopeSpec

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

    def rope(self, t: Any, pos: Any, rope: RopeSpec, mode: int | None = None) -> Any:
        """``ggml_rope_ext`` of ``t`` at positions ``pos`` with a layer's RoPE parameters
        (no frequency factors); ``mode`` defaults to the spec's rope type."""
        return lib.ggml_rope_ext(
            self.ptr,
            t,
            pos,
            ffi.NULL,
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


class GraphRunner:
    """Allocates and computes graphs on one device, keeping its allocator between runs
    (stable graph shapes reuse the same compute buffer)."""

    def __init__(self, device: str | Device | None = None, n_threads: int | None = None) -> None:
        self.device = get_device(device)
        self._galloc = lib.ggml_gallocr_new(self.device.buffer_type)
        if self._galloc == ffi.NULL:
            raise NativeError(f"ggml_gallocr_new failed on {self.device.name}")
        self._backend = self.device.backend()
        self.n_threads = n_threads or os.cpu_count() or 1
        if self.device.kind == "cpu":
            check(lib.pm_backend_set_n_threads(self._backend, self.n_threads), "set_n_threads")

    def close(self) -> None:
        if self._galloc != ffi.NULL:
            lib.ggml_gallocr_free(self._galloc)
            self._galloc = ffi.NULL

    def __del__(self) -> None:
        self.close()

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
        gf = ctx.graph(outputs)
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
        return [get_data(t) for t in (outputs if read is None else read)]
