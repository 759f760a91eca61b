"""Moving K/V bytes between cache tensors and state blobs: the row runs and transposed-V
column runs of a set of cells, read into a blob, written from one, or zeroed.

Tensor bytes move in one native call per section and layer: the selected cells form runs
of consecutive cells, and ``Tensor.read_runs_into`` / ``write_runs`` copy every run (a K/V
row run, or for transposed V one run per channel) straight between the tensor and the
blob, on any device. Host tensors keep numpy views where those are faster (a single run,
sequences decoded in lockstep, transposed V whose runs are too short for a call each);
the numpy paths are also the tested reference of the native ones. The blob format around
these bytes, and where restored cells go, is :mod:`pymem.kv.state_io`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pymem.backend import Tensor, unreported
from pymem.kv.layout import KVLayer, KVLayout
from pymem.state import DevicePayload, Payload, StateWriter
from pymem.state import index_runs as cell_runs  # the runs of a stream's cells

_RUNS_LOOP = 32  # up to this many runs of cells, move each run as one slice


# transposed V: from this mean run length (bytes per channel) on, one native range copy per
# channel and run beats numpy's element gather / scatter (measured on a host: runs of 1-16
# f16 cells are even, longer runs 3x faster; the scatter side wins earlier)
_RANGES_MIN_GATHER = 16


_RANGES_MIN_SCATTER = 8


def uint_dtype(size: int) -> np.dtype:
    return np.dtype(f"<u{size}")


def rows_view(t: Tensor) -> np.ndarray | None:
    """``uint8[n_rows, row_size]`` zero-copy view of a host tensor, else None."""
    if not t.device.is_host:
        return None
    return t.host_view().view(np.uint8).reshape(t.n_rows, t.row_size)


def v_trans_view(layout: KVLayout, layer: KVLayer, strm: int) -> np.ndarray | None:
    """Transposed V of one stream as ``[n_embd_v_gqa_max, kv_size]`` elements (host only)."""
    v = layer.v
    if v is None or not v.device.is_host:
        return None
    el = uint_dtype(layout.v_el_size)
    raw = v.host_view().view(np.uint8).reshape(layout.n_stream, -1)
    return raw[strm].view(el).reshape(v.shape[0], layout.kv_size)


def _strided_runs(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """A ``[rows, R, L]`` view of the columns of ``a`` (``[rows, K]``) in the runs, when
    all ``R`` runs have one length ``L`` and start a constant stride apart; else None.

    E.g. starts [2, 6, 10], ends [3, 7, 11] (every 4th cell, as sequences decoded in
    lockstep leave them) -> view of columns 2, 6, 10 as shape [rows, 3, 1].
    """
    if not _lockstep(starts, ends):
        return None
    base = a[:, int(starts[0]) :]
    return np.lib.stride_tricks.as_strided(
        base,
        shape=(a.shape[0], starts.size, int(ends[0] - starts[0])),
        strides=(a.strides[0], int(starts[1] - starts[0]) * a.strides[1], a.strides[1]),
    )


def _lockstep(starts: np.ndarray, ends: np.ndarray) -> bool:
    """Whether at least two runs all have one length and start a constant stride apart."""
    if starts.size < 2:
        return False
    length = ends - starts
    gaps = np.diff(starts)
    return not ((length != length[0]).any() or (gaps != gaps[0]).any())


def gather_cols(
    src: np.ndarray,
    idx: np.ndarray,
    out: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """``out[:, k] = src[:, idx[k]]`` for ascending ``idx`` (``src`` 2-D, ``out`` contiguous).

    ``runs``: ``cell_runs(idx)`` when the caller has it already.
    """
    starts, ends = cell_runs(idx) if runs is None else runs
    if starts.size <= _RUNS_LOOP:
        col = 0
        for a, b in zip(starts.tolist(), ends.tolist()):
            out[:, col : col + b - a] = src[:, a:b]
            col += b - a
        return
    strided = _strided_runs(src, starts, ends)
    if strided is not None:
        out.reshape(strided.shape)[...] = strided
    else:
        np.take(src, idx, axis=1, out=out)


def scatter_cols(
    dst: np.ndarray,
    idx: np.ndarray,
    src: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """``dst[:, idx[k]] = src[:, k]`` for ascending ``idx`` (``runs`` as in gather_cols)."""
    starts, ends = cell_runs(idx) if runs is None else runs
    if starts.size <= _RUNS_LOOP:
        col = 0
        for a, b in zip(starts.tolist(), ends.tolist()):
            dst[:, a:b] = src[:, col : col + b - a]
            col += b - a
        return
    strided = _strided_runs(dst, starts, ends)
    if strided is not None:
        strided[...] = src.reshape(strided.shape)
        return
    # one flat index per element, a block of rows at a time (a flat scatter beats a 2-D one)
    flat = dst.reshape(-1) if dst.flags.c_contiguous else None
    if flat is None:
        dst[:, idx] = src
        return
    k = dst.shape[1]
    block = max(1, (1 << 20) // max(1, idx.size))
    for r0 in range(0, dst.shape[0], block):
        r1 = min(dst.shape[0], r0 + block)
        where = (np.arange(r0, r1, dtype=np.int64)[:, None] * k + idx[None, :]).ravel()
        flat[where] = src[r0:r1].ravel()


def row_ranges(
    t: Tensor, base_row: int, idx: np.ndarray, runs: tuple[np.ndarray, np.ndarray], row: int
) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges ``(offsets, sizes)`` of the first ``row`` bytes of rows ``base_row + idx``
    of ``t``, in order: one range per run of cells when whole rows are used.

    E.g. row_size 8, base_row 0, runs [2, 5) and [9, 10) -> offsets [16, 72], sizes [24, 8].
    """
    starts, ends = runs
    if row == t.row_size:
        offsets, sizes = (base_row + starts) * row, (ends - starts) * row
    else:
        offsets, sizes = (base_row + idx) * t.row_size, np.full(idx.size, row, dtype=np.int64)
    # the native call's type: converted once here, not on every call that reuses them
    return offsets.astype(np.uint64), sizes.astype(np.uint64)


def row_runs(
    t: Tensor, base_row: int, idx: np.ndarray, runs: tuple[np.ndarray, np.ndarray], row: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """Rows ``base_row + idx`` of ``t`` (the first ``row`` bytes of each) as one runs set
    ``(offset, starts, sizes)`` for ``Tensor.read_runs_into`` / ``write_runs`` (one
    repetition): one run per run of cells when whole rows are used, else one per cell.

    E.g. row_size 8, base_row 4, runs [2, 5) and [9, 10) -> (32, [16, 72], [24, 8]).
    """
    starts, ends = runs
    if row == t.row_size:
        return (
            base_row * row,
            (starts * row).astype(np.uint64),
            ((ends - starts) * row).astype(np.uint64),
        )
    st = (idx * t.row_size).astype(np.uint64)
    return base_row * t.row_size, st, np.full(idx.size, row, dtype=np.uint64)


def col_runs(runs: tuple[np.ndarray, np.ndarray], el: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte runs of one transposed-V channel, relative to the channel's first cell: with
    ``n_rep = n_embd`` and ``rep_stride = kv_size * el`` they give the whole section in
    blob order (channel by channel, the runs of each).

    E.g. runs [2, 5) and [9, 10), el 2 -> starts [4, 18], sizes [6, 2].
    """
    starts, ends = runs
    return (starts * el).astype(np.uint64), ((ends - starts) * el).astype(np.uint64)


# runs sets shared by the tensors of one stream: ("rows", row_size, row) -> (offset, starts,
# sizes), ("cols", el, 0) -> (0, starts, sizes)
RangeMemo = dict[tuple[str, int, int], tuple[int, np.ndarray, np.ndarray]]


def row_runs_memo(
    memo: RangeMemo,
    t: Tensor,
    base_row: int,
    idx: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray],
    row: int,
) -> tuple[int, np.ndarray, np.ndarray]:
    """:func:`row_runs`, shared by the tensors of one stream with the same row sizes."""
    key = ("rows", t.row_size, row)
    if key not in memo:
        memo[key] = row_runs(t, base_row, idx, runs, row)
    return memo[key]


def col_runs_memo(
    memo: RangeMemo, runs: tuple[np.ndarray, np.ndarray], el: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`col_runs`, shared by every V layer of one stream."""
    key = ("cols", el, 0)
    if key not in memo:
        memo[key] = (0, *col_runs(runs, el))
    return memo[key][1], memo[key][2]


def col_ranges(
    base: int, stride: int, n_embd: int, runs: tuple[np.ndarray, np.ndarray], el: int
) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges of transposed-V elements in blob order: channel by channel, the runs of
    each channel (channel ``j`` starts at ``base + j * stride``).

    E.g. base 0, stride 100, 2 channels, runs [2, 5) and [9, 10), el 2
    -> offsets [4, 18, 104, 118], sizes [6, 2, 6, 2].
    """
    starts, ends = runs
    chan = base + np.arange(n_embd, dtype=np.int64) * stride
    offsets = (chan[:, None] + starts[None, :] * el).ravel()
    return offsets.astype(np.uint64), np.tile((ends - starts) * el, n_embd).astype(np.uint64)


def cols_method(
    host: bool, runs: tuple[np.ndarray, np.ndarray], el: int, min_run_bytes: int
) -> str:
    """How to move a transposed-V section whose cells form ``runs`` (``el``-byte elements).

    * ``"ranges"``: one native call for the whole section (``Tensor.read_runs_into`` /
      ``write_runs``: every channel's runs, short ones copied inline); every host tensor,
      and any device when the runs are long or few;
    * ``"numpy"`` (host): per-run slices, a lockstep strided view, or an element gather;
      the tested reference of the native path (tests force it);
    * ``"staged"`` (not host, many short runs): copy the span from the first to the last
      cell of every channel to the host, move the elements there with numpy (and, when
      restoring, put the span back), instead of a device copy per element.
    """
    if host:
        return "ranges"
    starts, ends = runs
    short = int((ends - starts).sum()) * el < min_run_bytes * starts.size
    return "staged" if starts.size > 1 and short else "ranges"


def _span(
    v: Tensor, base: int, stride: int, n_embd: int, runs: tuple[np.ndarray, np.ndarray], el: int
) -> tuple[int, np.ndarray]:
    """Elements of cells ``[first run start, last run end)`` of every channel, read to the
    host as ``[n_embd, span]`` (one strided read); returns ``(first cell, array)``."""
    lo, hi = int(runs[0][0]), int(runs[1][-1])
    span = v.read_strided(base + lo * el, (hi - lo) * el, stride, n_embd)
    return lo, span.view(uint_dtype(el)).reshape(n_embd, hi - lo)


def write_rows(
    writer: StateWriter,
    t: Tensor,
    base_row: int,
    idx: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray],
    row: int,
    memo: RangeMemo,
) -> None:
    """Rows ``base_row + idx`` of ``t`` (each ``row`` bytes used), in order."""
    starts, ends = runs
    if starts.size == 1 and row == t.row_size:
        a, b = base_row + int(starts[0]), base_row + int(ends[0])
        view = rows_view(t)
        if view is not None:
            writer.write(view[a:b].data.cast("B"))
        else:
            writer.write_tensor(t, a * row, (b - a) * row)
        return
    offset, st, sz = row_runs_memo(memo, t, base_row, idx, runs, row)
    writer.write_tensor_runs(t, offset, 1, 0, st, sz)


def write_v_trans(
    writer: StateWriter,
    layout: KVLayout,
    layer: KVLayer,
    strm: int,
    idx: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray],
    memo: RangeMemo,
) -> None:
    n_embd = layer.n_embd_v_gqa
    el = layout.v_el_size
    size = n_embd * idx.size * el
    view = v_trans_view(layout, layer, strm)
    method = cols_method(view is not None, runs, el, _RANGES_MIN_GATHER)
    if view is not None and method == "numpy":
        sub = view[:n_embd]

        def fill(out: memoryview) -> None:
            dst = np.frombuffer(out, dtype=view.dtype).reshape(n_embd, idx.size)
            gather_cols(sub, idx, dst, runs)

        writer.write_fill(size, fill)
        return
    v = layer.v
    assert v is not None
    base = strm * v.nb[2]
    stride = layout.kv_size * el
    if method == "staged":

        def fill_staged(out: memoryview) -> None:
            lo, span = _span(v, base, stride, n_embd, runs, el)
            dst = np.frombuffer(out, dtype=span.dtype).reshape(n_embd, idx.size)
            gather_cols(span, idx - lo, dst, (runs[0] - lo, runs[1] - lo))

        writer.write_fill(size, fill_staged)
        return
    # one call: channel j's runs start at base + j * stride
    writer.write_tensor_runs(v, base, n_embd, stride, *col_runs_memo(memo, runs, el))


def zero_cols(layout: KVLayout, layer: KVLayer, strm: int, idx: np.ndarray) -> None:
    """Zero the transposed-V elements of cells ``idx`` of a non-host V, every channel:
    one native range write, or for many short runs a zeroed span written back."""
    v = layer.v
    assert v is not None
    el = layout.v_el_size
    n_ch = v.shape[0]
    base, stride = strm * v.nb[2], layout.kv_size * el
    idx = np.sort(idx)
    runs = cell_runs(idx)
    with unreported((v,)):  # (zeros, and the span's own bytes: no bound to lift)
        if cols_method(False, runs, el, _RANGES_MIN_SCATTER) == "staged":
            lo, span = _span(v, base, stride, n_ch, runs, el)
            zeros = np.zeros((n_ch, idx.size), dtype=span.dtype)
            scatter_cols(span, idx - lo, zeros, (runs[0] - lo, runs[1] - lo))
            v.write_strided(span, base + lo * el, span.shape[1] * el, stride, n_ch)
            return
        offsets, sizes = col_ranges(base, stride, n_ch, runs, el)
        v.write_ranges(bytes(int(sizes.sum())), offsets, sizes)


def zero_range(layout: KVLayout, layers: Sequence[KVLayer], strm: int, a: int, b: int) -> None:
    """Zero the K/V bytes of cells ``[a, b)`` of stream ``strm`` in every layer."""
    if b <= a:
        return
    r0, r1 = strm * layout.kv_size + a, strm * layout.kv_size + b
    for layer in layers:
        for t in (layer.k, layer.v):
            if t is None or (t is layer.v and layout.v_trans):
                continue
            view = rows_view(t)
            if view is not None:
                view[r0:r1] = 0
            else:
                t.fill_rows(np.arange(r0, r1, dtype=np.int64), 0)
        if layer.v is not None and layout.v_trans:
            vt = v_trans_view(layout, layer, strm)
            if vt is not None:
                vt[:, a:b] = 0
            else:
                el = layout.v_el_size
                n_ch = layer.v.shape[0]
                zero = bytes(el * (b - a) * n_ch)
                base = strm * layer.v.nb[2] + a * el
                layer.v.write_strided(zero, base, el * (b - a), layout.kv_size * el, n_ch)


def zero_cells(layout: KVLayout, layers: Sequence[KVLayer], strm: int, idx: np.ndarray) -> None:
    """Zero the K/V bytes of cells ``idx`` of stream ``strm`` in every layer."""
    if idx.size == 0:
        return
    rows = strm * layout.kv_size + np.asarray(idx, dtype=np.int64)
    for layer in layers:
        layer.k.fill_rows(rows, 0)
        if layer.v is None:
            continue
        if not layout.v_trans:
            layer.v.fill_rows(rows, 0)
            continue
        view = v_trans_view(layout, layer, strm)
        if view is not None:
            view[:, idx] = 0
        else:
            zero_cols(layout, layer, strm, np.asarray(idx, dtype=np.int64))


def write_payloads(
    layout: KVLayout,
    strm: int,
    idx: np.ndarray,
    payloads: Sequence[tuple[KVLayer, str, Payload]],
) -> None:
    """Store parsed K/V bytes into cells ``idx`` of stream ``strm``.

    A payload is host bytes, or a :class:`~pymem.state.DevicePayload` (a device-resident
    checkpoint's bytes) copied tensor to tensor in the same runs,
    never through the host; except transposed V into many short runs on a device (the
    "staged" method below: a backend copy per element would cost far more than reading
    the payload once), and the numpy reference path tests force.
    """
    n = idx.size
    if n == 0:
        return
    base = strm * layout.kv_size
    runs = cell_runs(idx)
    memo: RangeMemo = {}
    for layer, kind, data in payloads:
        if kind == "k" or not layout.v_trans:
            t = layer.k if kind == "k" else layer.v
            assert t is not None
            offset, st, sz = row_runs_memo(memo, t, base, idx, runs, len(data) // n)
            if isinstance(data, DevicePayload):
                data.copy_to(t, offset, 1, 0, st, sz)
            else:
                t.write_runs(data, offset, 1, 0, st, sz)
            continue
        v = layer.v
        assert v is not None
        n_embd = layer.n_embd_v_gqa
        el = layout.v_el_size
        vt = v_trans_view(layout, layer, strm)
        method = cols_method(vt is not None, runs, el, _RANGES_MIN_SCATTER)
        if method == "ranges" and isinstance(data, DevicePayload):
            base_v, stride = strm * v.nb[2], layout.kv_size * el
            data.copy_to(v, base_v, n_embd, stride, *col_runs_memo(memo, runs, el))
            continue
        if isinstance(data, DevicePayload):
            data = memoryview(data.to_host())
        src = np.frombuffer(data, dtype=uint_dtype(el)).reshape(n_embd, n)
        if vt is not None and method == "numpy":
            scatter_cols(vt[:n_embd], idx, src, runs)
            continue
        base, stride = strm * v.nb[2], layout.kv_size * el
        if method == "staged":
            # read-modify-write of the span: the cells between the runs get their own bytes
            lo, span = _span(v, base, stride, n_embd, runs, el)
            scatter_cols(span, idx - lo, src, (runs[0] - lo, runs[1] - lo))
            v.write_strided(span, base + lo * el, span.shape[1] * el, stride, n_embd)
            continue
        v.write_runs(data, base, n_embd, stride, *col_runs_memo(memo, runs, el))
