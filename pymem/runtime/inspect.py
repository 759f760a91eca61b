"""What a state file holds: ``python -m pymem inspect FILE [--model GGUF] [--json]``.

Reads llama.cpp's session files (``ggsn``), sequence files (``ggsq``), context blobs
(``llama_state_get_data``: arch name + memory state), sequence blobs
(``llama_state_seq_get_data``: magic, seq id, memory state), raw memory states, and
pymem containers (:mod:`pymem.container`), and says what is in them: the format, the architecture (context
blobs and session files carry it; containers carry the model fingerprint), the memory
type, and per part and stream the cells, sequences and their position ranges, the layers
with their K/V (R/S) types and row sizes, and bytes per layer.

Two ways to get those facts:

* **From the bytes** (:mod:`pymem.runtime.state_parse`), read-only and without a model:
  the parser tries every part sequence a memory type writes and reports the reading
  that consumes the state exactly. A session file or context blob names its
  architecture, which narrows the candidates (recurrent, hybrid or attention-only); a
  container names its memory type. What the bytes cannot say is reported as unknown.
  When nothing fits, a :class:`~pymem.errors.StateError` names, per candidate, the offset
  where it failed.
* **From a model** (:func:`inspect_file` with ``model``): build the memory the factory
  builds for that GGUF file, restore the state into it (which validates every byte the
  way a real load does) and describe the live memory: ``parts()``, positions, layers,
  ``memory_breakdown()``. Context options left unset are taken from the bytes where they
  show (``n_stream`` > 1: not unified, one stream per sequence; one stream holding
  several sequences: unified; ``v_trans``: flash attention off; cells per stream:
  ``n_ctx``), else llama.cpp's defaults.

Nothing here prints; :func:`run_inspect` is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import gguf
import numpy as np

from pymem.container import (
    DIGEST_SIZE,
    MAGIC,
    ContainerHeader,
    check_layout,
    model_fingerprint,
    parse_container,
)
from pymem.errors import PymemError, StateError
from pymem.factory import CTX_PAD, ContextParams, create_memory, memory_type, pad
from pymem.gguf_spec import HYBRID_ARCHS, RECURRENT_ARCHS, spec_from_gguf
from pymem.kv import KVCache
from pymem.memory import Memory
from pymem.recurrent import RecurrentMemory
from pymem.runtime.state_parse import (
    PART_SEQUENCES,
    LayerFacts,
    MemoryFacts,
    PartFacts,
    StreamFacts,
    TensorFacts,
    parse_memory,
    total_layers,
)
from pymem.sessions import SEQ_BLOB_MAGIC, SEQ_MAGIC, SESSION_MAGIC, read_header
from pymem.spec import ModelSpec
from pymem.state import StateReader

_ARCH_MAX = 256
_KNOWN_ARCHS = frozenset(gguf.MODEL_ARCH_NAMES.values())

FORMATS = {
    "container": "pymem container",
    "session": "llama.cpp session file",
    "sequence": "llama.cpp sequence file",
    "context": "context blob (llama_state_get_data: arch + memory state)",
    "sequence_blob": "sequence blob (llama_state_seq_get_data: magic, seq id, memory state)",
    "memory": "raw memory state",
}


@dataclass(frozen=True)
class StateFile:
    """A state file read and its envelope decoded; the memory state is ``state``."""

    path: str
    size: int
    format: str
    data: memoryview = field(repr=False, compare=False)
    state_offset: int
    version: int | None = None
    arch: str | None = None
    arch_offset: int | None = None  # where the arch name's length field sits
    tokens: tuple[int, ...] | None = None
    scope: str = "unknown"  # "whole" | "sequence" | "unknown"
    seq_id: int | None = None  # the sequence a per-sequence state came from, if the file says
    flags: int = 0
    container: ContainerHeader | None = None

    @property
    def state(self) -> memoryview:
        end = self.size - (DIGEST_SIZE if self.format == "container" else 0)
        return self.data[self.state_offset : end]


@dataclass(frozen=True)
class ModelFacts:
    """The model an inspection restored into, and the context it built."""

    path: str
    arch: str
    fingerprint: str
    context: dict[str, Any]
    derived: tuple[str, ...]  # context options taken from the state's bytes
    restored_seq_id: int
    memory_breakdown: dict[str, int]


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_file` found: the file, the memory facts (from the bytes, or
    with a model from the live memory), the state's scope (``"whole"``, ``"sequence"``
    or ``"unknown"``, from the file and its bytes) and the model, if one was given."""

    file: StateFile
    memory: MemoryFacts
    scope: str
    model: ModelFacts | None = None
    structure_error: str | None = None  # with a model: why the bytes alone did not parse


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------


def _arch_at(buf: memoryview, at: int) -> str | None:
    """The architecture name a context blob starts with at ``at``, if it is one llama.cpp
    knows (the check that tells a context blob from a raw memory state)."""
    if at + 4 > len(buf):
        return None
    n = struct.unpack_from("<I", buf, at)[0]
    if not 1 <= n <= _ARCH_MAX or at + 4 + n > len(buf):
        return None
    name = bytes(buf[at + 4 : at + 4 + n]).decode("ascii", errors="replace")
    return name if name in _KNOWN_ARCHS else None


def read_state_file(path: str | os.PathLike[str], format: str = "auto") -> StateFile:
    """Read a file and decode its envelope (see FORMATS); ``format`` forces one."""
    with open(path, "rb") as f:
        raw = f.read()
    return decode_state_file(raw, os.fspath(path), format)


def decode_state_file(raw: bytes, path: str = "<bytes>", format: str = "auto") -> StateFile:
    """:func:`read_state_file` on bytes already read."""
    buf = memoryview(raw)
    size = len(buf)
    u32_0 = struct.unpack_from("<I", buf, 0)[0] if size >= 4 else None
    if format == "auto":
        if bytes(buf[: len(MAGIC)]) == MAGIC:
            format = "container"
        elif u32_0 == SESSION_MAGIC:
            format = "session"
        elif u32_0 == SEQ_MAGIC:
            format = "sequence"
        elif u32_0 == SEQ_BLOB_MAGIC:
            format = "sequence_blob"
        elif _arch_at(buf, 0) is not None:
            format = "context"
        else:
            format = "memory"
    base = StateFile(path, size, format, buf, 0)
    if format == "container":
        header, _ = parse_container(buf)
        return replace(
            base,
            version=1,
            state_offset=header.payload_offset,
            tokens=header.tokens,
            scope=header.kind,
            seq_id=None if header.seq_id < 0 else header.seq_id,
            flags=header.flags,
            container=header,
        )
    if format in ("session", "sequence"):
        if size < 12:
            raise StateError(
                f"{format} file: truncated at offset {size}, inside the 12-byte header"
            )
        head = read_header(buf)
        if head.kind != format:
            raise StateError(f"{path}: a {head.kind} file, not a {format} file")
        sf = replace(
            base,
            version=head.version,
            tokens=tuple(int(t) for t in head.tokens),
            state_offset=head.state_offset,
            scope="whole" if format == "session" else "sequence",
        )
        if format == "sequence":
            return sf
        arch, at = _read_arch(buf, head.state_offset, "session file")
        return replace(sf, arch=arch, arch_offset=head.state_offset, state_offset=at)
    if format == "context":
        arch, at = _read_arch(buf, 0, "context blob")
        return replace(base, arch=arch, arch_offset=0, state_offset=at, scope="whole")
    if format == "sequence_blob":
        if size < 8:
            raise StateError(f"sequence blob: truncated at offset {size}, inside the 8-byte header")
        magic, seq = struct.unpack_from("<Ii", buf, 0)
        if magic != SEQ_BLOB_MAGIC:
            raise StateError(f"sequence blob: magic {magic:#010x} at offset 0")
        return replace(base, state_offset=8, scope="sequence", seq_id=seq)
    if format == "memory":
        return base
    raise StateError(f"format: unknown state file format {format!r} (known: {', '.join(FORMATS)})")


def _read_arch(buf: memoryview, at: int, where: str) -> tuple[str, int]:
    r = StateReader(buf[at:])
    n = r.read_u32(f"{where}: arch name length at offset {at}")
    if n > _ARCH_MAX:
        raise StateError(f"{where}: arch name length {n} at offset {at} exceeds {_ARCH_MAX}")
    name = bytes(r.read_view(n, f"{where}: arch name at offset {at + 4}")).decode(errors="replace")
    return name, at + 4 + n


def types_for_arch(arch: str) -> list[str]:
    """The memory types ``create_memory`` can build for an architecture (by name only:
    whether a model has SWA layers is in its hparams)."""
    if arch in RECURRENT_ARCHS:
        return ["recurrent"]
    if arch in HYBRID_ARCHS:
        return ["hybrid", "hybrid_iswa"]
    return ["kv_cache", "kv_cache_iswa"]


def parse_state_file(sf: StateFile) -> MemoryFacts:
    """The memory facts of a decoded file, from its bytes. Only the memory types the file
    allows are tried: a container's header names its type, a session file or context
    blob its architecture."""
    types = None
    if sf.container is not None:
        t = sf.container.memory.get("type")
        types = [t] if t in PART_SEQUENCES else None
    elif sf.arch is not None:
        types = types_for_arch(sf.arch)
    end = sf.state_offset + len(sf.state)
    return parse_memory(sf.data, sf.state_offset, end, types=types, flags=sf.flags)


def scope_of(sf: StateFile, facts: MemoryFacts | None) -> str:
    """``"whole"``, ``"sequence"`` or ``"unknown"``: what the file says, else what a
    recurrent part's cells say (per-sequence cells list no ids)."""
    if sf.scope != "unknown" or facts is None:
        return sf.scope
    for p in facts.parts:
        if p.per_sequence is not None:
            return "sequence" if p.per_sequence else "whole"
    return "unknown"


# ---------------------------------------------------------------------------------------
# with a model: restore and describe the live memory
# ---------------------------------------------------------------------------------------


def context_params(
    facts: MemoryFacts | None,
    *,
    n_ctx: int | None = None,
    n_seq_max: int | None = None,
    kv_unified: bool | None = None,
    flash_attn: bool | str | None = None,
    min_seq: int = 0,
) -> tuple[ContextParams, tuple[str, ...]]:
    """Context parameters for restoring a state: the given ones, the rest from the bytes
    (``facts``) where they show, else llama.cpp's defaults. Returns the names taken from
    the bytes. ``min_seq``: a sequence id the memory must hold."""
    d = ContextParams()
    derived: list[str] = []
    kv = [p for p in (facts.parts if facts else ()) if p.kind == "kv"]
    n_stream = max((len(p.streams) for p in kv), default=0)
    v_trans = next((s.v_trans for p in kv for s in p.streams if s.v_trans is not None), None)
    seqs = facts.seqs if facts else {}
    rec_cells = max(
        (p.cell_count for p in (facts.parts if facts else ()) if p.kind == "recurrent"), default=0
    )
    # n_stream > 1: one stream per sequence. One stream: unified, or a single sequence.
    if n_seq_max is None:
        if n_stream > 1 and kv_unified is not True:
            n_seq_max = n_stream
        else:
            n_seq_max = max(d.n_seq_max, max(seqs, default=-1) + 1, rec_cells, min_seq + 1)
        if n_seq_max != d.n_seq_max or n_stream > 1:
            derived.append("n_seq_max")
    if kv_unified is None:
        kv_unified = d.kv_unified
        if n_stream > 1 or (n_stream == 1 and n_seq_max > 1):
            kv_unified = n_stream == 1
            derived.append("kv_unified")
    if flash_attn is None:
        flash_attn = d.flash_attn
        if v_trans is not None:
            flash_attn = not v_trans
            derived.append("flash_attn")
    if n_ctx is None:
        n_ctx = d.n_ctx
        need = max((s.cell_count for p in kv for s in p.streams), default=0)
        per_stream = n_ctx if kv_unified else pad(n_ctx // max(1, n_seq_max), CTX_PAD)
        if need > per_stream:
            n_ctx = pad(need, CTX_PAD) * (1 if kv_unified else max(1, n_seq_max))
            derived.append("n_ctx")
    params = ContextParams(
        n_ctx=n_ctx, n_seq_max=n_seq_max, kv_unified=kv_unified, flash_attn=flash_attn
    )
    return params, tuple(derived)


def restore_state(mem: Memory, sf: StateFile, seq_id: int, facts: MemoryFacts | None) -> int:
    """Restore the file's memory state into ``mem``; returns the seq id it went to (-1:
    the whole memory). Whole states restore whole; per-sequence states into ``seq_id``;
    a raw state of unknown scope whole if that parses, else into ``seq_id``."""
    if sf.container is not None:
        check_layout(sf.container.memory, mem)
    scope = scope_of(sf, facts)
    tries = {"whole": [-1], "sequence": [seq_id], "unknown": [-1, seq_id]}[scope]
    first: StateError | None = None
    for dest in tries:
        try:
            _restore(mem, sf, dest)
            return dest
        except StateError as exc:
            first = first or exc
    assert first is not None
    raise first


def _restore(mem: Memory, sf: StateFile, dest: int) -> None:
    reader = StateReader(sf.state)
    try:
        plan = mem.state_read_parse(reader, dest, sf.flags)
    except StateError as exc:
        raise StateError(f"memory state at offset {sf.state_offset}: {exc}") from None
    if reader.remaining:
        raise StateError(
            f"memory state: {reader.remaining} bytes left after the state at offset "
            f"{sf.state_offset + reader.offset}"
        )
    plan.commit()


def describe_live(mem: Memory, seq_id: int = -1) -> MemoryFacts:
    """The facts of a live memory (what its state for ``seq_id`` holds; -1: all)."""
    parts: list[PartFacts] = []
    for name, part in mem.parts().items():
        if isinstance(part, KVCache):
            parts.append(_live_kv(name, part, seq_id))
        elif isinstance(part, RecurrentMemory):
            parts.append(_live_recurrent(name, part, seq_id))
    n_seq = max(
        p.n_seq_max for p in mem.parts().values() if isinstance(p, (KVCache, RecurrentMemory))
    )
    seqs = {
        q: (mem.seq_pos_min(q), mem.seq_pos_max(q))
        for q in (range(n_seq) if seq_id == -1 else (seq_id,))
        if mem.seq_pos_max(q) >= 0
    }
    return MemoryFacts(memory_type(mem), tuple(parts), "model", seqs)


def _live_kv(name: str, kv: KVCache, seq_id: int) -> PartFacts:
    el = kv.type_v.type_size
    template: list[LayerFacts] = []
    for lay in kv.layers:
        k_row = kv.type_k.row_size(lay.n_embd_k_gqa)
        tensors = [TensorFacts("k", kv.type_k.name, k_row, lay.n_embd_k_gqa, 0)]
        if lay.v is not None:
            n_v = lay.n_embd_v_gqa
            v_row = el * n_v if kv.v_trans else kv.type_v.row_size(n_v)
            tensors.append(TensorFacts("v", kv.type_v.name, v_row, n_v, 0, kv.v_trans))
        template.append(LayerFacts(lay.il, tuple(tensors)))
    seqs = range(kv.n_seq_max) if seq_id == -1 else (seq_id,)
    streams: list[StreamFacts] = []
    for s, cells in enumerate(kv.v_cells):
        mine = [q for q in seqs if kv.get_stream(q) == s and cells.seq_pos_max(q) >= 0]
        ranges = {q: (cells.seq_pos_min(q), cells.seq_pos_max(q)) for q in mine}
        # whole: every used cell; one sequence: its cells, in its stream only
        n = cells.used if seq_id == -1 else (int(cells.seq_cells(seq_id).size) if mine else 0)
        layers = tuple(
            LayerFacts(la.il, tuple(replace(t, bytes=n * t.row_bytes) for t in la.tensors))
            for la in template
        )
        streams.append(StreamFacts(s, n, ranges, layers if n else (), kv.v_trans if n else None))
    total = total_layers(streams)
    return PartFacts(
        name=name,
        kind="kv",
        streams=tuple(streams),
        layers=total or tuple(template),
        bytes=kv.state_size(seq_id),
        cell_ext="x,y,tok (12 B)" if kv.has_cell_ext() else "none",
    )


def _live_recurrent(name: str, rm: RecurrentMemory, seq_id: int) -> PartFacts:
    c = rm.cells
    if seq_id == -1:
        idx = np.flatnonzero(c.seq_counts())
    else:  # a sequence's state is its tail cell
        tail = int(c.tail[seq_id]) if 0 <= seq_id < c.size else -1
        idx = np.array([tail] if tail >= 0 else [], dtype=np.int64)
    n = int(idx.size)
    cells = tuple((int(c.pos[i]), tuple(c.seq_ids(int(i)))) for i in idx)
    # a sequence lives in one cell: its range is that cell's position
    ranges = {q: (pos, pos) for pos, ids in cells for q in ids}
    r_row, s_row = rm.type_r.row_size(rm.n_embd_r), rm.type_s.row_size(rm.n_embd_s)
    r = TensorFacts("r", rm.type_r.name, r_row, rm.n_embd_r, n * r_row)
    s = TensorFacts("s", rm.type_s.name, s_row, rm.n_embd_s, n * s_row)
    layers = tuple(LayerFacts(il, (r, s)) for il in rm.layers)
    return PartFacts(
        name=name,
        kind="recurrent",
        streams=(StreamFacts(0, n, dict(sorted(ranges.items())), layers),),
        layers=layers,
        bytes=rm.state_size(seq_id),
        n_layer_total=rm.n_layer_trunk,
        cells=cells,
        per_sequence=seq_id != -1 if n else None,
    )


def build_memory(
    model: str | os.PathLike[str], facts: MemoryFacts | None, **options: Any
) -> tuple[ModelSpec, Memory, ContextParams, tuple[str, ...]]:
    """The memory the factory builds for ``model``, its context from ``options``
    (:func:`context_params`) and the state's facts."""
    spec = spec_from_gguf(model)
    params, derived = context_params(facts, **options)
    mem = create_memory(spec, params)
    if mem is None:
        raise StateError(f"model: {spec.arch} has no memory (llama.cpp creates none)")
    return spec, mem, params, derived


def inspect_file(
    path: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    *,
    format: str = "auto",
    seq_id: int | None = None,
    **options: Any,
) -> Inspection:
    """Inspect a state file; with ``model``, restore it into that model's memory.

    ``seq_id``: where a per-sequence state is restored (default: the sequence the file
    names when the memory holds it, else 0). ``options``: context options for
    :func:`context_params`. Raises :class:`StateError` for a damaged file, or (with a
    model) one the model's memory refuses.
    """
    sf = read_state_file(path, format)
    if model is None:
        parsed = parse_state_file(sf)
        return Inspection(sf, parsed, scope_of(sf, parsed))
    facts: MemoryFacts | None
    try:
        facts = parse_state_file(sf)
        why = None
    except StateError as exc:
        facts, why = None, str(exc)
    fp = model_fingerprint(model)
    if sf.container is not None and sf.container.fingerprint != fp:
        raise StateError(
            f"{sf.path}: container header field fingerprint is {sf.container.fingerprint!r}, "
            f"the model {os.fspath(model)} is {fp!r}"
        )
    dest = _default_seq(sf, facts) if seq_id is None else seq_id
    spec, mem, params, derived = build_memory(model, facts, min_seq=dest, **options)
    try:
        if sf.arch is not None and sf.arch != spec.arch:
            raise StateError(
                f"{sf.path}: wrong model arch {sf.arch!r} at offset {sf.arch_offset}, the "
                f"model is {spec.arch!r}"
            )
        got = restore_state(mem, sf, dest, facts)
        live = describe_live(mem, got)
        info = ModelFacts(
            path=os.fspath(model),
            arch=spec.arch,
            fingerprint=fp,
            context={
                "n_ctx": params.n_ctx,
                "n_seq_max": params.n_seq_max,
                "kv_unified": params.kv_unified,
                "flash_attn": params.flash_attn,
            },
            derived=derived,
            restored_seq_id=got,
            memory_breakdown=mem.memory_breakdown(),
        )
    finally:
        mem.close()
    return Inspection(sf, live, scope_of(sf, facts), info, why)


def _default_seq(sf: StateFile, facts: MemoryFacts | None) -> int:
    if sf.seq_id is not None:
        return sf.seq_id
    if sf.scope != "whole" and facts is not None:
        seqs = facts.seqs
        if len(seqs) == 1:
            return next(iter(seqs))
    return 0


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------


def to_json(insp: Inspection) -> dict[str, Any]:
    """The inspection as one JSON-ready document."""
    sf = insp.file

    def tensors(la: LayerFacts) -> dict[str, Any]:
        out: dict[str, Any] = {"il": la.il, "bytes": la.bytes}
        for t in la.tensors:
            out[t.name] = {
                "type": t.type,
                "row_bytes": t.row_bytes,
                "n_embd": t.n_embd,
                "bytes": t.bytes,
                "transposed": t.transposed,
            }
        return out

    def seqs(d: dict[int, tuple[int, int]]) -> dict[str, list[int]]:
        return {str(k): list(v) for k, v in sorted(d.items())}

    parts = []
    for p in insp.memory.parts:
        doc: dict[str, Any] = {
            "name": p.name,
            "kind": p.kind,
            "offset": p.offset,
            "bytes": p.bytes,
            "cell_count": p.cell_count,
            "layers": [tensors(la) for la in p.layers],
            "streams": [
                {
                    "stream": s.stream,
                    "cell_count": s.cell_count,
                    "seqs": seqs(s.seqs),
                    "v_trans": s.v_trans,
                    "offset": s.offset,
                    "bytes": s.bytes,
                    "layer_bytes": [la.bytes for la in s.layers],
                }
                for s in p.streams
            ],
        }
        if p.kind == "kv":
            doc["n_stream"] = len(p.streams)
            doc["cell_ext"] = p.cell_ext
        else:
            doc["n_layer_total"] = p.n_layer_total
            doc["cells"] = [{"pos": pos, "seq_ids": list(ids)} for pos, ids in p.cells]
            doc["per_sequence"] = p.per_sequence
        parts.append(doc)
    out: dict[str, Any] = {
        "file": sf.path,
        "size": sf.size,
        "format": sf.format,
        "format_name": FORMATS[sf.format],
        "version": sf.version,
        "arch": sf.arch,
        "fingerprint": sf.container.fingerprint if sf.container else None,
        "tokens": None if sf.tokens is None else {"count": len(sf.tokens), "ids": list(sf.tokens)},
        "state": {
            "offset": sf.state_offset,
            "bytes": len(sf.state),
            "scope": insp.scope,
            "seq_id": sf.seq_id,
            "flags": sf.flags,
        },
        "memory": {
            "type": insp.memory.type,
            "source": insp.memory.source,
            "seqs": seqs(insp.memory.seqs),
            "parts": parts,
            "alternatives": list(insp.memory.alternatives),
        },
        "container": None,
        "model": None,
    }
    if sf.container is not None:
        h = sf.container
        out["container"] = {
            "kind": h.kind,
            "seq_id": h.seq_id,
            "flags": h.flags,
            "memory": h.memory,
            "pos": seqs(h.pos),
            "payload_len": h.payload_len,
        }
    if insp.model is not None:
        m = insp.model
        out["model"] = {
            "path": m.path,
            "arch": m.arch,
            "fingerprint": m.fingerprint,
            "context": m.context,
            "derived": list(m.derived),
            "restored_seq_id": m.restored_seq_id,
            "memory_breakdown": m.memory_breakdown,
            "structure_error": insp.structure_error,
        }
    return out


def _ranges(d: dict[int, tuple[int, int]]) -> str:
    return (
        ", ".join(f"seq {q} pos {lo}..{hi}" for q, (lo, hi) in sorted(d.items())) or "no sequences"
    )


def _tokens(toks: tuple[int, ...]) -> str:
    head = ", ".join(str(t) for t in toks[:8])
    return f"{len(toks)} [{head}{', ...' if len(toks) > 8 else ''}]"


def format_text(insp: Inspection) -> str:
    """The inspection as the command line prints it."""
    sf, mf = insp.file, insp.memory
    version = f" v{sf.version}" if sf.version is not None else ""
    lines = [f"{sf.path}: {FORMATS[sf.format]}{version}, {sf.size} bytes"]
    if sf.arch is not None:
        lines.append(f"  arch         {sf.arch}")
    if sf.container is not None:
        h = sf.container
        lines.append(f"  fingerprint  {h.fingerprint}")
        lines.append(f"  recorded     {h.memory.get('type')}, {_ranges(h.pos)}")
    if sf.tokens is not None:
        lines.append(f"  tokens       {_tokens(sf.tokens)}")
    scope = insp.scope
    what = {"whole": "whole memory", "sequence": "one sequence", "unknown": "whole or one sequence"}
    seq = f" (from seq {sf.seq_id})" if sf.seq_id is not None else ""
    lines.append(
        f"  state        {what[scope]}{seq}, {len(sf.state)} bytes at offset {sf.state_offset}, "
        f"flags {sf.flags}"
    )
    if insp.model is not None:
        m = insp.model
        ctx = ", ".join(f"{k} {v}" for k, v in m.context.items())
        derived = f" ({', '.join(m.derived)} from the state)" if m.derived else ""
        into = "the whole memory" if m.restored_seq_id == -1 else f"seq {m.restored_seq_id}"
        alloc = ", ".join(f"{d} {b} B" for d, b in m.memory_breakdown.items())
        lines.append(f"  model        {m.path} ({m.arch}, {m.fingerprint})")
        lines.append(f"  context      {ctx}{derived}")
        lines.append(f"  restored     into {into}; allocated {alloc}")
    source = "read from the bytes" if mf.source == "bytes" else "restored into the model's memory"
    held = _ranges(mf.seqs)
    if not mf.seqs and any(p.per_sequence for p in mf.parts):
        held = "one sequence (a per-sequence recurrent state stores no seq id)"
    lines.append(f"  memory       {mf.type} ({source}), {held}")
    for alt in mf.alternatives:
        lines.append(f"  also fits    {alt}")
    for p in mf.parts:
        at = f" at offset {p.offset}" if p.offset is not None else ""
        size = f"{p.bytes} bytes{at}" if p.bytes is not None else ""
        if p.kind == "kv":
            lines.append(
                f"  part {p.name} (kv): {size}, {len(p.streams)} stream(s), {p.cell_count} cells, "
                f"{len(p.layers)} layers, cell ext {p.cell_ext}"
            )
            for s in p.streams:
                lines.append(f"    stream {s.stream}: {s.cell_count} cells, {_ranges(s.seqs)}")
        else:
            cells = "; ".join(
                f"pos {pos} " + (f"seq {','.join(map(str, ids))}" if ids else "(no seq ids)")
                for pos, ids in p.cells
            )
            lines.append(
                f"  part {p.name} (recurrent): {size}, {p.cell_count} cells"
                f"{': ' + cells if cells else ''}, {len(p.layers)} layers of {p.n_layer_total}"
            )
        for i, la in enumerate(p.layers):
            il = f"il {la.il}" if la.il is not None else f"#{i}"
            # E.g. "K f16[32] 64 B/cell  V f16[32]^T 64 B/cell" (^T: V stored transposed)
            secs = "  ".join(
                f"{t.name.upper()} {t.type}[{t.n_embd}]{'^T' if t.transposed else ''} "
                f"{t.row_bytes} B/cell"
                for t in la.tensors
            )
            lines.append(f"    layer {il:6s} {secs}  {la.bytes} B")
    if insp.structure_error:
        lines.append(f"  note         the bytes alone did not parse: {insp.structure_error}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def add_context_options(p: argparse.ArgumentParser) -> None:
    """``--n-ctx --n-seq-max --kv-unified --flash-attn``: unset ones come from the state's
    bytes where they show, else llama.cpp's defaults."""
    p.add_argument(
        "--n-ctx",
        type=int,
        default=None,
        help="context size (default: 512, or what the state needs)",
    )
    p.add_argument(
        "--n-seq-max",
        type=int,
        default=None,
        help="max sequences (default: from the state, else 1)",
    )
    p.add_argument(
        "--kv-unified",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one KV stream for all sequences (default: from the state's n_stream)",
    )
    p.add_argument(
        "--flash-attn",
        choices=("on", "off", "auto"),
        default=None,
        help="flash attention: V by rows (default: from the state's v_trans, else auto)",
    )


def context_options(args: argparse.Namespace) -> dict[str, Any]:
    fa = {"on": True, "off": False, "auto": "auto", None: None}[args.flash_attn]
    return {
        "n_ctx": args.n_ctx,
        "n_seq_max": args.n_seq_max,
        "kv_unified": args.kv_unified,
        "flash_attn": fa,
    }


def run_inspect(args: argparse.Namespace) -> int:
    """``python -m pymem inspect``: exit 0, or 2 (message on stderr) for a refused file."""
    try:
        insp = inspect_file(
            args.file, args.model, format=args.format, seq_id=args.seq, **context_options(args)
        )
    except StateError as exc:
        print(f"pymem inspect: {exc}", file=sys.stderr)
        return 2
    except (PymemError, OSError) as exc:
        print(f"pymem inspect: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(insp), indent=2))
    else:
        print(format_text(insp))
    return 0


def add_inspect_parser(subparsers: Any) -> None:
    """Register ``inspect`` on the ``python -m pymem`` command line."""
    p = subparsers.add_parser(
        "inspect",
        help="what a llama.cpp state file, context blob or pymem container holds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="session / sequence file, context or memory blob, or container")
    p.add_argument("--model", help="a GGUF file: restore into its memory and describe that")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--format",
        choices=("auto", *FORMATS),
        default="auto",
        help="the file's format (default: detected)",
    )
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help="with --model: the sequence a per-sequence state restores into",
    )
    add_context_options(p)
    p.set_defaults(func=run_inspect)
