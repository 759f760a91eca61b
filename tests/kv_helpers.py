"""Factories, an invariant checker, a decode driver and an independent blob parser for
the KV cache tests."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError
from pymem.kv import KVCache
from pymem.kv.cells import OWNER_MULTI, OWNER_NONE
from pymem.kv.state_rows import rows_view, v_trans_view
from pymem.memory import MemoryStatus
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType
from pymem.ubatch import LLAMA_MAX_SEQ


def make_spec(
    n_layer: int = 2,
    n_head_kv: int = 2,
    head_dim: int = 8,
    *,
    n_pos_per_embd: int = 1,
    rope: RopeSpec | None = None,
    **kw,
) -> ModelSpec:
    rope = rope or RopeSpec(n_rot=head_dim, rope_type=RopeType.NORM)
    layers = tuple(LayerSpec.attention(n_head_kv, head_dim, rope=rope) for _ in range(n_layer))
    return ModelSpec(
        layers=layers, n_pos_per_embd=n_pos_per_embd, arch=kw.pop("arch", "llama"), **kw
    )


def make_kv(n_cells: int = 16, n_seq: int = 4, *, spec: ModelSpec | None = None, **kw) -> KVCache:
    return KVCache(spec or make_spec(), kv_size=n_cells, n_seq_max=n_seq, **kw)


def tiny_llama_spec() -> ModelSpec:
    """tiny-llama.gguf as the KV cache sees it: 2 layers, 1 KV head of 32, RoPE NORM 32."""
    rope = RopeSpec(n_rot=32, rope_type=RopeType.NORM, freq_base=10000.0, n_ctx_orig=4096)
    return ModelSpec(layers=(LayerSpec.attention(1, 32, rope=rope),) * 2, arch="llama")


# ---------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------


def check_invariants(kv: KVCache, contiguous: tuple[int, ...] | str = ()) -> None:
    """Every cache invariant, recomputed from scratch with plain loops.

    ``contiguous``: sequences whose positions must fill ``[pos_min, pos_max]`` ("all" for
    every sequence); a middle ``seq_rm`` legitimately breaks that.
    """
    for s, cells in enumerate(kv.v_cells):
        used = cells.pos >= 0
        assert int(used.sum()) == cells.used, f"stream {s}: used count"
        nz = np.flatnonzero(used)
        assert cells.used_max_p1() == (int(nz[-1]) + 1 if nz.size else 0), (
            f"stream {s}: used_max_p1"
        )
        assert (cells.pos >= -1).all()
        assert not cells.seq[~used].any(), f"stream {s}: empty cells with sequence bits"
        assert not cells.shift[~used].any(), f"stream {s}: empty cells with a shift"
        assert cells.has_shift or not cells.shift.any(), f"stream {s}: a shift, has_shift off"
        assert cells.n_multi == int((cells.owner == OWNER_MULTI).sum()), f"stream {s}: n_multi"
        for i in range(cells.size):
            ids = cells.seq_ids_of(i)
            want = OWNER_NONE if not ids else (ids[0] if len(ids) == 1 else OWNER_MULTI)
            assert cells.owner[i] == want, f"stream {s} cell {i}: owner {cells.owner[i]} != {want}"
        present = {q for i in range(cells.size) for q in cells.seq_ids_of(i)}
        for seq in range(LLAMA_MAX_SEQ):
            if seq not in present:
                assert cells.seq_pos_min(seq) == -1 and cells.seq_pos_max(seq) == -1, f"seq {seq}"
                continue
            ps = [int(cells.pos[i]) for i in range(cells.size) if used[i] and cells.seq_has(i, seq)]
            lo, hi = (min(ps), max(ps)) if ps else (-1, -1)
            assert cells.seq_pos_min(seq) == lo, f"stream {s} seq {seq}: pos_min"
            assert cells.seq_pos_max(seq) == hi, f"stream {s} seq {seq}: pos_max"
            if ps and (contiguous == "all" or seq in contiguous):
                assert set(ps) == set(range(lo, hi + 1)), (
                    f"seq {seq}: positions not contiguous {sorted(ps)}"
                )
            if ps and kv.n_stream > 1:
                assert int(kv.seq_to_stream[seq]) == s, f"seq {seq} in stream {s}"
    for h in kv.v_heads:
        assert 0 <= h <= kv.kv_size
    check_rows_past_zero(kv)


def check_rows_past_zero(kv: KVCache) -> None:
    """Every host K/V row (cell) of a stream from its ``rows_bound`` on is zero: a whole
    restore zeroes only the rows below it."""
    for s in range(kv.n_stream):
        bound = kv.cells.rows_bound(s)
        for lay in kv.layers:
            for t, trans in ((lay.k, False), (lay.v, kv.layout.v_trans)):
                if t is None or not t.device.is_host:
                    continue
                if trans:
                    past = v_trans_view(kv.layout, lay, s)[:, bound:]  # type: ignore[index]
                else:
                    past = rows_view(t).reshape(kv.n_stream, kv.kv_size, -1)[s, bound:]  # type: ignore[union-attr]
                assert not past.any(), f"stream {s}: {t.name} holds bytes past cell {bound}"


# ---------------------------------------------------------------------------------------
# decode driver (the reference's llama_context::decode memory flow)
# ---------------------------------------------------------------------------------------


@dataclass
class DecodeResult:
    code: int  # 0 ok, 1 no memory slot, -1 invalid batch
    placed: list = field(default_factory=list)  # (sinfo, ubatch) per applied ubatch
    error: Exception | None = None


def decode(kv: KVCache, items: list, n_ubatch: int = 256, on_ubatch=None) -> DecodeResult:
    """Validate, update, plan and apply a batch of ``[token, pos, [seq ids], output]``.

    ``on_ubatch(ctx)`` runs after each ``apply()`` (tests write K/V rows there).
    """
    balloc = BatchAllocator(kv.n_pos_per_embd)
    try:
        balloc.init(Batch.from_items(items), memory=kv, n_seq_max=kv.n_seq_max)
    except BatchError as e:
        return DecodeResult(-1, error=e)
    upd = kv.init_update()
    if upd.get_status() == MemoryStatus.SUCCESS:
        upd.apply()
    ctx = kv.init_batch(balloc, n_ubatch, False)
    if ctx.get_status() != MemoryStatus.SUCCESS:
        return DecodeResult(1)
    res = DecodeResult(0)
    while True:
        ctx.apply()
        res.placed.append((ctx.get_sinfo(), ctx.get_ubatch()))
        if on_ubatch is not None:
            on_ubatch(ctx)
        if not ctx.next():
            break
    return res


# ---------------------------------------------------------------------------------------
# blob parsing, written independently of pymem.kv.state_io (plain loops)
# ---------------------------------------------------------------------------------------


@dataclass
class StreamPart:
    cells: list  # (pos, [seq ids], ext tuple | None)
    v_trans: int
    k: list  # per layer: (type, row bytes, bytes)
    v: list  # per layer: (type, el or row, n_embd or None, bytes)


@dataclass
class KVPart:
    streams: list  # StreamPart | None per stream
    end: int


def parse_kv_part(
    data: bytes, n_layer: int, has_ext: bool = False, offset: int = 0, has_v: bool = True
) -> KVPart:
    o = offset

    def u32() -> int:
        nonlocal o
        v = struct.unpack_from("<I", data, o)[0]
        o += 4
        return v

    def i32() -> int:
        nonlocal o
        v = struct.unpack_from("<i", data, o)[0]
        o += 4
        return v

    def u64() -> int:
        nonlocal o
        v = struct.unpack_from("<Q", data, o)[0]
        o += 8
        return v

    def raw(n: int) -> bytes:
        nonlocal o
        assert o + n <= len(data), "truncated"
        v = data[o : o + n]
        o += n
        return v

    streams = []
    for _ in range(u32()):
        n = u32()
        if n == 0:
            streams.append(None)
            continue
        cells = []
        for _ in range(n):
            pos = i32()
            nseq = u32()
            ext = (i32(), i32(), i32()) if has_ext else None
            cells.append((pos, [i32() for _ in range(nseq)], ext))
        v_trans = u32()
        assert u32() == n_layer
        ks = []
        for _ in range(n_layer):
            t = i32()
            row = u64()
            ks.append((t, row, raw(n * row)))
        vs = []
        for _ in range(n_layer if has_v else 0):  # MLA caches hold K only
            t = i32()
            if v_trans:
                el = u32()
                ne = u32()
                vs.append((t, el, ne, raw(el * ne * n)))
            else:
                row = u64()
                vs.append((t, row, None, raw(n * row)))
        streams.append(StreamPart(cells, v_trans, ks, vs))
    return KVPart(streams, o)


def fill_rows_from_part(
    kv: KVCache, part: KVPart, strm: int, cells_idx: np.ndarray, rank: np.ndarray
) -> None:
    """Write K/V of cells ``cells_idx`` of stream ``strm`` from a parsed whole-state part,
    whose cell ``rank[i]`` (ascending-order index) is cell ``cells_idx[i]``."""
    sp = part.streams[strm]
    n = len(sp.cells)
    for li, layer in enumerate(kv.layers):
        _, row, kb = sp.k[li]
        k = np.frombuffer(kb, dtype=np.uint8).reshape(n, row)
        layer.k.write_rows(strm * kv.kv_size + cells_idx, k[rank])
        if layer.v is None:
            continue
        _, el, ne, vb = sp.v[li]
        if sp.v_trans:
            v = np.frombuffer(vb, dtype=np.uint8).reshape(ne, n, el)
            full = layer.v.numpy().view(np.uint8).reshape(kv.n_stream, -1, kv.kv_size, el)
            full[strm, :ne, cells_idx] = v[:, rank].transpose(1, 0, 2)
        else:
            v = np.frombuffer(vb, dtype=np.uint8).reshape(n, el)
            layer.v.write_rows(strm * kv.kv_size + cells_idx, v[rank])
