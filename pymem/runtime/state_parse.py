"""Memory state bytes read without a model: which memory wrote them, and what they hold.

A state blob does not name its topology: llama.cpp's memories concatenate their parts
with no tags or lengths (KV cache: one KV part; iSWA: base + SWA; recurrent; hybrid: KV +
recurrent; hybrid-iSWA: base + SWA + recurrent), and inside a part only the field values
say how long the next field is. :func:`parse_memory` therefore tries every part sequence
and, within a KV part, every cell ``ext`` width the reference versions wrote (none, the
12-byte ``{x, y, tok}``, the earlier 8-byte ``{x, y}``) with and without V sections (MLA
caches have none), and keeps the readings that consume the bytes exactly. Each reading
checks what the format allows (stream and layer counts, positions >= 0, seq ids, ggml
type ids, row sizes that fit their type, ``v_trans`` and ``s_trans`` flags, uniform R and
S sections), so wrong readings fail early; the failure that got furthest is kept per
candidate for the error message.

What the bytes cannot say stays unknown (None / "n/a"): the model layer of each section,
the ext of a KV part without cells, whether a KV-only blob was written for one sequence.
A cut exactly at a section boundary can read as a smaller valid state; a model
(pymem.runtime.inspect) or a container's checksum tells those apart.

Read-only and independent of pymem.kv / pymem.recurrent's own readers (those restore;
this describes). Offsets in facts and messages are those of the buffer passed in.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from pymem.errors import StateError, TypeSpecError
from pymem.memory import StateFlags
from pymem.types import ggml_type
from pymem.ubatch import LLAMA_MAX_SEQ

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: a larger n_layer is not a header

# memory type -> the parts its state writes, in order (names as Memory.parts() has them)
PART_SEQUENCES: dict[str, tuple[str, ...]] = {
    "kv_cache": ("kv",),
    "kv_cache_iswa": ("base", "swa"),
    "recurrent": ("recurrent",),
    "hybrid": ("attention", "recurrent"),
    "hybrid_iswa": ("attention", "swa", "recurrent"),
}
# ... and with LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY (an iSWA's SWA cache, a hybrid's recurrent part)
_PARTIAL_SEQUENCES: dict[str, tuple[str, ...]] = {
    "kv_cache": ("kv",),
    "kv_cache_iswa": ("swa",),
    "recurrent": ("recurrent",),
    "hybrid": ("recurrent",),
    "hybrid_iswa": ("swa", "recurrent"),
}
# ext bytes per KV cell meta record, as the reference versions wrote them
CELL_EXT = {0: "none", 12: "x,y,tok (12 B)", 8: "x,y (8 B)"}

# ---------------------------------------------------------------------------------------
# facts
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorFacts:
    """One K, V, R or S section of a layer: ``row_bytes`` per cell (for a transposed V:
    element size x ``n_embd``), ``bytes`` in the state (cells x row_bytes)."""

    name: str
    type: str
    row_bytes: int
    n_embd: int
    bytes: int
    transposed: bool = False


@dataclass(frozen=True)
class LayerFacts:
    """One layer of a part; ``il`` is the model layer (None: the bytes do not say)."""

    il: int | None
    tensors: tuple[TensorFacts, ...]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)


@dataclass(frozen=True)
class StreamFacts:
    """One KV stream (a recurrent part has one): its cells, the sequences in them with
    ``(pos_min, pos_max)``, and the layer sections written for them (none for a KV stream
    without cells). ``offset`` / ``bytes``: where it sits in the file (None from a model)."""

    stream: int
    cell_count: int
    seqs: dict[int, tuple[int, int]]
    layers: tuple[LayerFacts, ...] = ()
    v_trans: bool | None = None
    offset: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class PartFacts:
    """One part of a memory state (a KV cache or recurrent memory), as
    ``Memory.parts()`` names it.

    ``cell_ext``: KV cell ext as stored (``"n/a"`` when no cell says). Recurrent parts:
    ``n_layer_total`` (the header's model layer count) and ``cells``, ``(pos, seq ids)``
    per cell; a per-sequence recurrent state stores no seq ids (``per_sequence``).
    """

    name: str
    kind: str
    streams: tuple[StreamFacts, ...]
    layers: tuple[LayerFacts, ...]
    offset: int | None = None
    bytes: int | None = None
    cell_ext: str | None = None
    n_layer_total: int | None = None
    cells: tuple[tuple[int, tuple[int, ...]], ...] = ()
    per_sequence: bool | None = None

    @property
    def cell_count(self) -> int:
        return sum(s.cell_count for s in self.streams)


@dataclass(frozen=True)
class MemoryFacts:
    """A memory state's type and parts; ``source`` is ``"bytes"`` or ``"model"``.

    ``seqs``: ``seq -> (seq_pos_min, seq_pos_max)`` as the memory reports them (an iSWA
    memory answers from its SWA cache; a hybrid with the later minimum and the earlier
    maximum of its attention and recurrent parts, so a sequence missing from either is
    absent). ``alternatives``: other readings of the same bytes that also consume them
    exactly (empty unless the bytes are ambiguous).
    """

    type: str
    parts: tuple[PartFacts, ...]
    source: str
    seqs: dict[int, tuple[int, int]]
    alternatives: tuple[str, ...] = ()


def part_ranges(part: PartFacts) -> dict[int, tuple[int, int]]:
    """``seq -> (min, max)`` over a part's streams."""
    out: dict[int, tuple[int, int]] = {}
    for s in part.streams:
        for q, (lo, hi) in s.seqs.items():
            a, b = out.get(q, (lo, hi))
            out[q] = (min(a, lo), max(b, hi))
    return dict(sorted(out.items()))


def memory_ranges(parts: Sequence[PartFacts]) -> dict[int, tuple[int, int]]:
    """The memory-level ranges of :attr:`MemoryFacts.seqs` from its parts' ranges."""
    named = {p.name: part_ranges(p) for p in parts}
    attn = next((named[n] for n in ("swa", "kv", "attention") if n in named), None)
    recr = named.get("recurrent")
    rec_part = next((p for p in parts if p.kind == "recurrent"), None)
    if rec_part is not None and rec_part.per_sequence and attn is not None and len(attn) == 1:
        # a per-sequence recurrent state stores no seq id: it is the attention part's one
        pos = rec_part.cells[0][0]
        recr = {next(iter(attn)): (pos, pos)}
    if attn is None or recr is None:
        return attn if attn is not None else recr or {}
    both = sorted(set(attn) & set(recr))
    return {q: (max(attn[q][0], recr[q][0]), min(attn[q][1], recr[q][1])) for q in both}


# ---------------------------------------------------------------------------------------
# the structural parser
# ---------------------------------------------------------------------------------------


class _Fail(Exception):
    """One candidate reading failed at ``offset`` (collected, then reported together)."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class _Cursor:
    """Bounds-checked reads of ``buf[pos:end]``; offsets are the file's."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def skip(self, n: int, what: str) -> int:
        if n > self.left:
            raise _Fail(self.pos, f"truncated reading {what}: need {n} bytes, {self.left} left")
        at = self.pos
        self.pos += n
        return at

    def _unpack(self, fmt: str, n: int, what: str) -> int:
        at = self.skip(n, what)
        return int(struct.unpack_from(fmt, self.buf, at)[0])

    def u32(self, what: str) -> int:
        return self._unpack("<I", 4, what)

    def i32(self, what: str) -> int:
        return self._unpack("<i", 4, what)

    def u64(self, what: str) -> int:
        return self._unpack("<Q", 8, what)

    def ggml_type(self, what: str) -> Any:
        at = self.pos
        tid = self.i32(what)
        try:
            return ggml_type(tid)
        except TypeSpecError:
            raise _Fail(at, f"{what}: {tid} is not a ggml type id") from None


def _n_embd(t: Any, row: int, at: int, what: str) -> int:
    """Elements per row from a row size. E.g. f16, 64 B -> 32; q8_0 (32 per 34 B), 68 B -> 64."""
    if row % t.type_size:
        raise _Fail(at, f"{what}: row size {row} is not a multiple of {t.name}'s {t.type_size} B")
    return row // t.type_size * t.block_size


def _meta(c: _Cursor, n: int, fixed: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` cell records of ``fixed`` int32 words (pos, n_seq_id, ext...) + the ids.

    Returns ``(pos, counts, ids)`` with ``ids`` all cells' seq ids concatenated.
    """
    n_words = min(c.left // 4, n * (fixed + LLAMA_MAX_SEQ))
    words = np.frombuffer(c.buf, dtype="<i4", count=n_words, offset=c.pos)
    if n * fixed > n_words:
        raise _Fail(c.pos, f"{what}: truncated: {n} cells need at least {n * fixed * 4} bytes")
    k0 = int(words[1])
    rec = fixed + k0
    if 0 <= k0 <= LLAMA_MAX_SEQ and n * rec <= n_words and (words[1 : n * rec : rec] == k0).all():
        # every record has k0 ids: E.g. fixed 2, k0 1 -> offsets [0, 3, 6, ...]
        offs = np.arange(n, dtype=np.int64) * rec
    else:
        # cells with different id counts (shared cells in a whole state): follow the
        # chain; inspect reads one blob once, and a wrong reading stops at the first bad count
        offs = np.empty(n, dtype=np.int64)
        o = 0
        for i in range(n):
            if o + fixed > n_words:
                raise _Fail(c.pos + 4 * o, f"{what}: truncated reading cell {i}")
            cnt = int(words[o + 1])
            if not 0 <= cnt <= LLAMA_MAX_SEQ:
                raise _Fail(c.pos + 4 * o + 4, f"{what}: cell {i} has n_seq_id {cnt & 0xFFFFFFFF}")
            offs[i] = o
            o += fixed + cnt
    counts = words[offs + 1].astype(np.int64)
    end = int(offs[-1] + fixed + counts[-1])
    if end > n_words:
        raise _Fail(c.pos + 4 * int(offs[-1]), f"{what}: truncated reading cell {n - 1}'s seq ids")
    pos = words[offs].astype(np.int64)
    bad = np.flatnonzero(pos < 0)
    if bad.size:
        i = int(bad[0])
        raise _Fail(c.pos + 4 * int(offs[i]), f"{what}: cell {i} has position {int(pos[i])} < 0")
    # E.g. counts [1, 2] -> rows [0, 1, 1], ranks [0, 0, 1]
    rows = np.repeat(np.arange(n), counts)
    rank = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = words[np.repeat(offs + fixed, counts) + rank].astype(np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= LLAMA_MAX_SEQ))
    if bad.size:
        i = int(rows[bad[0]])
        raise _Fail(
            c.pos + 4 * int(offs[i]),
            f"{what}: cell {i} has seq_id {int(ids[bad[0]])}, not a seq id",
        )
    c.pos += 4 * end
    return pos, counts, ids


def _seq_ranges(pos: np.ndarray, counts: np.ndarray, ids: np.ndarray) -> dict[int, tuple[int, int]]:
    """``seq -> (min pos, max pos)`` over the cells that hold it."""
    cell_pos = np.repeat(pos, counts)  # one entry per (cell, seq id)
    lo = np.full(LLAMA_MAX_SEQ, np.iinfo(np.int64).max)
    hi = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int64)
    np.minimum.at(lo, ids, cell_pos)
    np.maximum.at(hi, ids, cell_pos)
    return {int(s): (int(lo[s]), int(hi[s])) for s in np.flatnonzero(hi >= 0)}


def _kv_data(c: _Cursor, n: int, with_v: bool, what: str) -> tuple[tuple[LayerFacts, ...], bool]:
    at = c.pos
    v_trans = c.u32(f"{what}.v_trans")
    if v_trans not in (0, 1):
        raise _Fail(at, f"{what}.v_trans: {v_trans} is neither 0 nor 1")
    at = c.pos
    n_layer = c.u32(f"{what}.n_layer")
    if n_layer > MAX_LAYERS:
        raise _Fail(at, f"{what}.n_layer: {n_layer} > {MAX_LAYERS} layers")
    ks: list[TensorFacts] = []
    for i in range(n_layer):
        w = f"{what}.layer[{i}]"
        t = c.ggml_type(f"{w}.k_type")
        at = c.pos
        row = c.u64(f"{w}.k_size_row")
        if row == 0:
            raise _Fail(at, f"{w}.k_size_row: 0")
        n_embd = _n_embd(t, row, at, f"{w}.k_size_row")
        c.skip(n * row, f"{w}.k_data")
        ks.append(TensorFacts("k", t.name, row, n_embd, n * row))
    vs: list[TensorFacts | None] = [None] * n_layer
    for i in range(n_layer if with_v else 0):
        w = f"{what}.layer[{i}]"
        t = c.ggml_type(f"{w}.v_type")
        if not v_trans:
            at = c.pos
            row = c.u64(f"{w}.v_size_row")
            n_embd = _n_embd(t, row, at, f"{w}.v_size_row")
            c.skip(n * row, f"{w}.v_data")
            vs[i] = TensorFacts("v", t.name, row, n_embd, n * row)
            continue
        at = c.pos
        el = c.u32(f"{w}.v_size_el")
        if el != t.type_size or t.block_size != 1:
            raise _Fail(at, f"{w}.v_size_el: {el} is not the element size of {t.name}")
        n_embd = c.u32(f"{w}.n_embd_v_gqa")
        c.skip(n_embd * n * el, f"{w}.v_data")
        vs[i] = TensorFacts("v", t.name, el * n_embd, n_embd, n * el * n_embd, transposed=True)
    layers = tuple(LayerFacts(None, (k,) if v is None else (k, v)) for k, v in zip(ks, vs))
    return layers, bool(v_trans)


def _parse_kv(
    buf: memoryview, start: int, end: int, name: str, ext: int, with_v: bool
) -> tuple[PartFacts, int]:
    """One KV part read with cell ext of ``ext`` bytes and V sections or none."""
    c = _Cursor(buf, start, end)
    at = c.pos
    n_stream = c.u32(f"{name}.n_stream")
    if not 1 <= n_stream <= LLAMA_MAX_SEQ:
        raise _Fail(at, f"{name}.n_stream: {n_stream} is not in [1, {LLAMA_MAX_SEQ}]")
    streams: list[StreamFacts] = []
    first: StreamFacts | None = None
    for s in range(n_stream):
        what = f"{name}.stream[{s}]"
        s0 = c.pos
        n = c.u32(f"{what}.cell_count")
        if n == 0:
            streams.append(StreamFacts(s, 0, {}, offset=s0, bytes=4))
            continue
        pos, counts, ids = _meta(c, n, 2 + ext // 4, f"{what}.cells")
        layers, v_trans = _kv_data(c, n, with_v, what)
        st = StreamFacts(s, n, _seq_ranges(pos, counts, ids), layers, v_trans, s0, c.pos - s0)
        if first is not None and (
            st.v_trans != first.v_trans or _shape(st.layers) != _shape(first.layers)
        ):
            raise _Fail(s0, f"{what}: layers or V layout differ from stream {first.stream}'s")
        first = first or st
        streams.append(st)
    facts = PartFacts(
        name=name,
        kind="kv",
        streams=tuple(streams),
        layers=total_layers(streams),
        offset=start,
        bytes=c.pos - start,
        cell_ext="n/a" if first is None else CELL_EXT[ext],
    )
    return facts, c.pos


def total_layers(streams: Sequence[StreamFacts]) -> tuple[LayerFacts, ...]:
    """The layers of the streams that have cells, bytes summed over those streams."""
    full = [s.layers for s in streams if s.layers]
    if not full:
        return ()
    return tuple(
        LayerFacts(
            la.il,
            tuple(
                replace(t, bytes=sum(ls[i].tensors[j].bytes for ls in full))
                for j, t in enumerate(la.tensors)
            ),
        )
        for i, la in enumerate(full[0])
    )


def _shape(layers: Sequence[LayerFacts]) -> list[tuple[tuple[str, str, int, bool], ...]]:
    return [tuple((t.name, t.type, t.row_bytes, t.transposed) for t in la.tensors) for la in layers]


def _parse_recurrent(
    buf: memoryview, start: int, end: int, name: str, every_layer: bool
) -> tuple[PartFacts, int]:
    """A recurrent part; it is always the last part, so its R/S sections run to ``end``.

    The sections carry no count: R sections of every recurrent layer, then S sections,
    so they split in halves. ``every_layer``: a recurrent memory of its own (not part of
    a hybrid) has R/S for every model layer, so the halves must count ``n_layer``.
    """
    c = _Cursor(buf, start, end)
    n = c.u32(f"{name}.cell_count")
    if n:
        pos, counts, ids = _meta(c, n, 2, f"{name}.cells")
    else:
        pos = counts = ids = np.zeros(0, dtype=np.int64)
    per_seq = bool(n) and not counts.any()
    if n and not per_seq and not counts.all():
        raise _Fail(start, f"{name}.cells: some cells list sequences and some list none")
    at = c.pos
    s_trans = c.u32(f"{name}.s_trans")
    if s_trans != 0:
        raise _Fail(at, f"{name}.s_trans: {s_trans}, the reference writes 0")
    at = c.pos
    n_layer = c.u32(f"{name}.n_layer")
    if n_layer > MAX_LAYERS:
        raise _Fail(at, f"{name}.n_layer: {n_layer} > {MAX_LAYERS} layers")
    sections: list[tuple[Any, int, int]] = []  # (type, row, offset)
    while c.left:
        i = len(sections)
        at = c.pos
        t = c.ggml_type(f"{name}.section[{i}].type")
        row = c.u64(f"{name}.section[{i}].size_row")
        _n_embd(t, row, at + 4, f"{name}.section[{i}].size_row")
        c.skip(n * row, f"{name}.section[{i}].data")
        sections.append((t, row, at))
    k = len(sections) // 2
    if len(sections) % 2 or k > n_layer or (every_layer and k != n_layer):
        limit = f"every one of {n_layer}" if every_layer else f"at most {n_layer}"
        raise _Fail(
            c.pos,
            f"{name}: {len(sections)} R/S sections; need one R and one S per recurrent layer "
            f"({limit} layers)",
        )
    for group, label in ((sections[:k], "R"), (sections[k:], "S")):
        for t, row, at in group[1:]:
            if (t, row) != group[0][:2]:
                raise _Fail(at, f"{name}: {label} sections differ in type or row size")
    layers = tuple(
        LayerFacts(
            None,
            (
                TensorFacts("r", r[0].name, r[1], _n_embd(r[0], r[1], 0, ""), n * r[1]),
                TensorFacts("s", s[0].name, s[1], _n_embd(s[0], s[1], 0, ""), n * s[1]),
            ),
        )
        for r, s in zip(sections[:k], sections[k:])
    )
    # E.g. counts [1, 2], ids [0, 1, 2] -> cells ((pos0, (0,)), (pos1, (1, 2)))
    splits = np.split(ids, np.cumsum(counts)[:-1]) if n else []
    cells = tuple((int(p), tuple(int(q) for q in g)) for p, g in zip(pos, splits))
    stream = StreamFacts(0, n, _seq_ranges(pos, counts, ids), layers, None, start, c.pos - start)
    facts = PartFacts(
        name=name,
        kind="recurrent",
        streams=(stream,),
        layers=layers,
        offset=start,
        bytes=c.pos - start,
        n_layer_total=n_layer,
        cells=cells,
        per_sequence=per_seq if n else None,
    )
    return facts, c.pos


def _part_readings(
    buf: memoryview, start: int, end: int, name: str, mtype: str
) -> list[Callable[[], tuple[PartFacts, int]]]:
    """The ways to read part ``name`` at ``start``: a recurrent part one, a KV part one per
    cell ext width and with or without V sections."""
    if name == "recurrent":
        return [partial(_parse_recurrent, buf, start, end, name, mtype == "recurrent")]
    return [
        partial(_parse_kv, buf, start, end, name, ext, with_v)
        for with_v in (True, False)
        for ext in CELL_EXT
    ]


def _fit(
    buf: memoryview, start: int, end: int, names: tuple[str, ...], mtype: str
) -> tuple[list[tuple[PartFacts, ...]], _Fail | None]:
    """Every reading of ``buf[start:end]`` as the parts ``names`` (of a ``mtype`` state)
    that consumes it exactly (duplicates dropped), and the failure that got furthest."""
    found: list[tuple[PartFacts, ...]] = []
    deepest: _Fail | None = None

    def walk(i: int, at: int, acc: tuple[PartFacts, ...]) -> None:
        nonlocal deepest
        if i == len(names):
            if at == end:
                if acc not in found:
                    found.append(acc)
                return
            fail = _Fail(at, f"{end - at} bytes left after the {names[-1]} part")
            deepest = fail if deepest is None or fail.offset > deepest.offset else deepest
            return
        for read in _part_readings(buf, at, end, names[i], mtype):
            try:
                part, nxt = read()
            except _Fail as fail:
                deepest = fail if deepest is None or fail.offset > deepest.offset else deepest
                continue
            walk(i + 1, nxt, (*acc, part))

    walk(0, start, ())
    return found, deepest


def _oddness(parts: Sequence[PartFacts]) -> int:
    """How much a reading assumes beyond the common case: KV cells with ext, KV layers
    without V sections, sequences whose memory-level range is empty (min > max)."""
    n = 0
    for p in parts:
        if p.kind == "kv":
            n += p.cell_ext not in ("none", "n/a")
            n += any(len(la.tensors) == 1 for la in p.layers)
    return n + sum(lo > hi for lo, hi in memory_ranges(parts).values())


def parse_memory(
    data: bytes | bytearray | memoryview,
    start: int = 0,
    end: int | None = None,
    *,
    types: Sequence[str] | None = None,
    flags: int = 0,
) -> MemoryFacts:
    """Read a memory state (``data[start:end]``) without a model; offsets are ``data``'s.

    ``types``: the memory types to try (default all, in the order of PART_SEQUENCES);
    ``flags``: the state flags it was written with (PARTIAL_ONLY drops parts). Of the
    readings that consume the bytes exactly, the one that assumes least wins
    (:func:`_oddness`; ties: the type order); the others are listed as
    ``alternatives``. Raises :class:`StateError` naming, per candidate, the furthest
    offset it reached and why it stopped there.
    """
    buf = memoryview(data).cast("B")
    end = len(buf) if end is None else end
    table = _PARTIAL_SEQUENCES if flags & StateFlags.PARTIAL_ONLY else PART_SEQUENCES
    found: list[tuple[str, tuple[PartFacts, ...]]] = []
    failures: dict[str, _Fail] = {}
    for mtype in types or list(table):
        readings, deepest = _fit(buf, start, end, table[mtype], mtype)
        found += [(mtype, r) for r in readings]
        if deepest is not None and not readings:
            failures[mtype] = deepest
    if not found:
        why = "; ".join(f"{t}: {f.message} (offset {f.offset})" for t, f in failures.items())
        raise StateError(
            f"memory state at offset {start} ({end - start} bytes): no memory type's part "
            f"sequence consumes it exactly: {why}"
        )
    # several exact readings: the one that assumes least wins (e.g. an iSWA's empty base
    # part followed by its SWA part also reads as one KV part whose cells carry ext)
    found.sort(key=lambda f: _oddness(f[1]))
    alts = tuple(
        f"{t}: "
        + ", ".join(f"{p.name} (cell ext {p.cell_ext})" if p.kind == "kv" else p.name for p in ps)
        for t, ps in found[1:]
    )
    mtype, parts = found[0]
    return MemoryFacts(mtype, parts, "bytes", memory_ranges(parts), alts)
