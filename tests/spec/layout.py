"""Walk a memory state blob field by field (no restore): what the metadata says.

``layout(mem, payload, seq_id, flags)`` returns a list of ``(field, value)`` tuples for
every header and cell field, and ``("<kind> rows", il, n_bytes)`` for tensor data, using
the memory's configuration for what the blob cannot say by itself (which layers have
tensors, whether cells carry ``ext``). Comparing two layouts compares everything except
tensor bytes; ``with_data=True`` adds a digest of each tensor region.
"""

from __future__ import annotations

import hashlib

from .common import FLAG_PARTIAL_ONLY, SpecStateError
from .kv import KVCache
from .memory import HybridMemory, ISWAMemory, KVMemory, RecurrentMemory, SpecMemory
from .recurrent import Recurrent
from .state import Reader


def _tensor(out: list, r: Reader, kind: str, il: int, n: int, with_data: bool) -> None:
    b = r.raw(n, f"{kind} rows")
    out.append((f"{kind} rows", il, n, hashlib.sha1(b).hexdigest()[:12] if with_data else None))


def layout_kv(kv: KVCache, r: Reader, out: list, with_data: bool, seq_id: int) -> None:
    n_stream = r.u32("n_stream")
    out.append(("n_stream", n_stream))
    for s in range(n_stream):
        cc = r.u32("cell_count")
        out.append(("cell_count", s, cc))
        if cc == 0:
            continue
        for _ in range(cc):
            pos = r.i32("pos")
            n = r.u32("n_seq_id")
            if n > 256:
                raise SpecStateError(f"implausible n_seq_id {n}")
            ext = None
            if kv.cfg.has_cell_ext:
                ext = (r.i32("x"), r.i32("y"), r.i32("tok"))
            ids = [r.i32("seq_id") for _ in range(n)]
            out.append(("cell", pos, ids, ext))
        v_trans = r.u32("v_trans")
        n_layer = r.u32("n_layer")
        out.append(("v_trans", v_trans))
        out.append(("n_layer", n_layer))
        layers = kv.cfg.layers
        if n_layer != len(layers):
            raise SpecStateError("n_layer differs from the configuration")
        for ly in layers:
            t = r.i32("k_type")
            rs = r.u64("k_size_row")
            out.append(("k", ly.il, t, rs))
            _tensor(out, r, "k", ly.il, cc * rs, with_data)
        for ly in layers:
            if not ly.has_v:
                continue
            t = r.i32("v_type")
            if not v_trans:
                rs = r.u64("v_size_row")
                out.append(("v", ly.il, t, rs))
                _tensor(out, r, "v", ly.il, cc * rs, with_data)
            else:
                el = r.u32("v_size_el")
                ne = r.u32("n_embd_v_gqa")
                out.append(("v_trans", ly.il, t, el, ne))
                _tensor(out, r, "v", ly.il, cc * el * ne, with_data)


def layout_rs(rs: Recurrent, r: Reader, out: list, with_data: bool) -> None:
    cc = r.u32("cell_count")
    out.append(("rs cell_count", cc))
    for _ in range(cc):
        pos = r.i32("pos")
        n = r.u32("n_seq_id")
        if n > 256:
            raise SpecStateError(f"implausible n_seq_id {n}")
        ids = [r.i32("seq_id") for _ in range(n)]
        out.append(("rs cell", pos, ids))
    s_trans = r.u32("s_trans")
    n_layer = r.u32("n_layer")
    out.append(("s_trans", s_trans))
    out.append(("rs n_layer", n_layer))
    for kind in ("r", "s"):
        for il in range(n_layer):
            if il not in rs.cfg.layers:
                continue
            t = r.i32(f"{kind}_type")
            size = r.u64(f"{kind}_size_row")
            out.append((kind, il, t, size))
            _tensor(out, r, kind, il, cc * size, with_data)


def layout(
    mem: SpecMemory, payload: bytes, seq_id: int = -1, flags: int = 0, with_data: bool = False
) -> list:
    r = Reader(payload)
    out: list = []
    if isinstance(mem, HybridMemory):
        if isinstance(mem.attn, ISWAMemory):
            if not flags & FLAG_PARTIAL_ONLY:
                layout_kv(mem.attn.base, r, out, with_data, seq_id)
            layout_kv(mem.attn.swa, r, out, with_data, seq_id)
        elif not flags & FLAG_PARTIAL_ONLY:
            layout_kv(mem.attn.kv, r, out, with_data, seq_id)
        layout_rs(mem.rs, r, out, with_data)
    elif isinstance(mem, ISWAMemory):
        if not flags & FLAG_PARTIAL_ONLY:
            layout_kv(mem.base, r, out, with_data, seq_id)
        layout_kv(mem.swa, r, out, with_data, seq_id)
    elif isinstance(mem, KVMemory):
        layout_kv(mem.kv, r, out, with_data, seq_id)
    elif isinstance(mem, RecurrentMemory):
        layout_rs(mem.rs, r, out, with_data)
    if r.off != len(payload):
        out.append(("trailing bytes", len(payload) - r.off))
    return out
