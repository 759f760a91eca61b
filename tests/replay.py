"""Generic replay of a run recorded from the real llama.cpp, for any memory type.

A run (``runs/<name>.json`` beside ``blobs/`` and ``models/``, the layout of
tests/data/ and of the shared test data) lists decodes, sequence ops and restores with
the reference's results, positions and state blobs after every step. :func:`replay`
drives pymem through the same steps and checks, after each one:

* the step's result (decode return code, ``seq_rm``'s bool, bytes a restore consumed);
* ``[seq_pos_min, seq_pos_max]`` of every sequence;
* the sizes of every per-sequence state and of the whole state;
* the blobs themselves, byte for byte.

The memory is built by :func:`pymem.factory.create_memory` from the run's GGUF model
when it is present (else from the per-layer widths in the run's ``memory`` section) and
the run's context parameters, so the factory's sizing is under test as well.

K/V and R/S bytes are computed by llama.cpp's kernels, which pymem does not run. After
each successful decode the harness plays the graph's part: it checks that pymem's cells
hold exactly the reference's cells (positions and sequence sets, stream by stream, in
ascending cell order), then copies the reference's rows into those cells. Everything the
blobs contain besides the kernels' numbers (selection, order, positions, sequence sets,
headers, layouts, pending stream copies, rows restored from blobs) is pymem's own.

With a model (:class:`ReplayHooks` with a ``forward``, e.g. tests/test_gguf_llama.py
running :mod:`pymem.runtime.gguf_llama`), nothing is copied: the model computes every
ubatch over pymem's memory and the blobs then hold pymem's own K/V/R/S rows.

A restore that fails is where pymem differs on purpose: pymem changes nothing (checked on
the whole state), while the reference leaves side effects that later steps depend on.
:func:`emulate_reference_failed_restore` re-enacts them with pymem's public operations.

Point ``PYMEM_REPLAY_RUNS`` at more run directories (``os.pathsep``-separated) to replay
other recordings with the same tests.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kv_helpers import fill_rows_from_part, parse_kv_part

from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError, StateError
from pymem.factory import ContextParams, create_memory
from pymem.hybrid import HybridMemory
from pymem.kv import KVCache
from pymem.kv.iswa import KVCacheISWA
from pymem.kv.state_io import zero_cells
from pymem.memory import Memory, MemoryContext, MemoryStatus, StateFlags
from pymem.recurrent import RecurrentMemory
from pymem.spec import LayerSpec, ModelSpec, SWAType
from pymem.state import StateReader
from pymem.ubatch import UBatch

DATA = Path(__file__).parent / "data"
SEQ_MAGIC = 0xAF143CD8


def run_files() -> list[Path]:
    """Every recorded run: tests/data/runs plus the directories in ``PYMEM_REPLAY_RUNS``."""
    dirs = [DATA / "runs"]
    for extra in filter(None, os.environ.get("PYMEM_REPLAY_RUNS", "").split(os.pathsep)):
        path = Path(extra)
        dirs.append(path / "runs" if (path / "runs").is_dir() else path)
    return sorted({p.resolve() for d in dirs for p in d.glob("*.json")})


@dataclass
class Run:
    path: Path
    data: dict[str, Any]
    root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.path.parent.parent

    @classmethod
    def load(cls, path: Path) -> Run:
        return cls(path, json.loads(path.read_text()))

    def blob(self, blob_id: str) -> bytes:
        for base in (self.root / "blobs", DATA / "blobs"):
            f = base / f"{blob_id}.bin"
            if f.exists():
                return f.read_bytes()
        raise FileNotFoundError(f"blob {blob_id} of run {self.path.name}")

    @property
    def arch(self) -> str:
        return str(self.data["memory"]["arch"])

    @property
    def n_seq(self) -> int:
        return int(self.data.get("n_seq", self.data["memory"]["n_seq_max"]))

    def model_path(self) -> Path | None:
        name = self.data.get("model_file")
        for base in (self.root / "models", DATA / "models"):
            if name and (base / name).exists():
                return base / name
        return None

    def spec(self) -> ModelSpec:
        model = self.model_path()
        if model is not None:
            from pymem.gguf_spec import spec_from_gguf

            return spec_from_gguf(model)
        return spec_from_memory_section(self.data["memory"])


def spec_from_memory_section(mem: dict[str, Any]) -> ModelSpec:
    """A layer spec with the widths the run reports (one KV head per layer).

    Enough for bookkeeping and state bytes; RoPE details only matter to K-shift numbers,
    which the replay takes from the reference anyway.
    """
    layers = tuple(
        LayerSpec(
            recurrent=bool(lay["recurrent"]),
            swa=bool(lay["swa"]),
            n_head_kv=1 if lay["n_embd_k_gqa"] else 0,
            n_embd_head_k=int(lay["n_embd_k_gqa"]),
            n_embd_head_v=int(lay["n_embd_v_gqa"]),
            n_embd_r=int(lay["n_embd_r"]),
            n_embd_s=int(lay["n_embd_s"]),
        )
        for lay in mem["layers"]
    )
    swa_type = SWAType[str(mem.get("swa_type", "none")).upper()]
    kv_layers = [lay for p in mem["parts"] if p["kind"] == "kv" for lay in p["layers"]]
    return ModelSpec(
        layers=layers,
        n_swa=int(mem.get("n_swa", 0)),
        swa_type=swa_type,
        arch=str(mem["arch"]),
        is_mla=any(not lay["has_v"] for lay in kv_layers),
    )


def build_memory(run: Run) -> Memory:
    mem = create_memory(run.spec(), ContextParams.from_dict(run.data["context_params"]))
    assert mem is not None, f"{run.path.name}: the factory built no memory"
    return mem


# --- the memory's parts, in serialisation order ---------------------------------------


def parts(mem: Memory, flags: int = 0) -> list[tuple[str, Any]]:
    """``[("kv", KVCache) | ("rs", RecurrentMemory), ...]`` as a state with ``flags`` lists
    them: ``PARTIAL_ONLY`` leaves out an iSWA base cache and a plain hybrid's attention
    cache (a plain KV cache and recurrent memory ignore the flag)."""
    partial = bool(flags & StateFlags.PARTIAL_ONLY)
    if isinstance(mem, KVCache):
        return [("kv", mem)]
    if isinstance(mem, KVCacheISWA):
        return (
            [("kv", mem.get_swa())] if partial else [("kv", mem.get_base()), ("kv", mem.get_swa())]
        )
    if isinstance(mem, RecurrentMemory):
        return [("rs", mem)]
    if isinstance(mem, HybridMemory):
        attn = mem.get_mem_attn()
        attn_parts = [] if partial and isinstance(attn, KVCache) else parts(attn, flags)
        return [*attn_parts, ("rs", mem.get_mem_recr())]
    raise TypeError(f"unknown memory type {type(mem).__name__}")


def _has_v(kv: KVCache) -> bool:
    """False for an MLA model's K-only cache: its state has no V sections."""
    return any(lay.v is not None for lay in kv.layers)


def _parse_rs_part(data: bytes, off: int, n_layer: int, n_sections: int, row_r: int, row_s: int):
    """A whole-state recurrent part (b.3) -> (cells [(pos, ids)], R rows, S rows, end)."""

    def take(fmt: str) -> tuple:
        nonlocal off
        v = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return v

    (count,) = take("<I")
    cells = []
    for _ in range(count):
        pos, n = take("<iI")
        cells.append((pos, list(take(f"<{n}i"))))
    assert take("<II") == (0, n_layer)
    planes = []
    for row in (row_r, row_s):
        layers = []
        for _ in range(n_sections):
            _, size_row = take("<iQ")
            assert size_row == row
            layers.append(np.frombuffer(data, np.uint8, count * row, off).reshape(count, row))
            off += count * row
        planes.append(layers)
    return cells, planes[0], planes[1], off


def _kv_cells_of_stream(kv: KVCache, strm: int) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    cells = kv.v_cells[strm]
    filled = np.flatnonzero(cells.pos >= 0)
    listed = []
    for c in filled:
        ids = [s for s in cells.seq_ids_of(int(c)) if s < kv.get_n_seq_max()]
        listed.append((int(cells.pos[c]), ids))
    return filled, listed


def sync_tensors_from_reference(
    mem: Memory, ref: bytes, where: str, copy_rows: bool = True
) -> None:
    """Check pymem's cells equal the reference's, then copy the reference's rows in
    (``copy_rows=False``: only check the cells, the rows are pymem's own computation)."""
    off = 0
    for kind, part in parts(mem):
        if kind == "kv":
            kvp = parse_kv_part(
                ref, len(part.layers), part.has_cell_ext(), offset=off, has_v=_has_v(part)
            )
            for strm, sp in enumerate(kvp.streams):
                filled, listed = _kv_cells_of_stream(part, strm)
                got = [(c[0], c[1]) for c in sp.cells] if sp is not None else []
                assert listed == got, f"{where}: KV stream {strm} cells differ from the reference"
                if sp is not None and copy_rows:
                    fill_rows_from_part(part, kvp, strm, filled, np.arange(len(filled)))
            off = kvp.end
        else:
            rec: RecurrentMemory = part
            r0, s0 = rec.get_r_l(rec.layers[0]), rec.get_s_l(rec.layers[0])
            cells, r_rows, s_rows, off = _parse_rs_part(
                ref, off, rec.n_layer_trunk, len(rec.layers), r0.row_size, s0.row_size
            )
            filled = np.flatnonzero(rec.cells.seq_counts())
            assert [c[0] for c in cells] == rec.cells.pos[filled].tolist(), (
                f"{where}: recurrent cells differ"
            )
            for k, il in enumerate(rec.layers):
                if len(filled) and copy_rows:
                    rec.get_r_l(il).write_rows(filled, r_rows[k])
                    rec.get_s_l(il).write_rows(filled, s_rows[k])
    assert off == len(ref), f"{where}: the reference blob has {len(ref) - off} bytes past the parts"


# --- the reference's side effects of a failed per-sequence restore ----------------------
#
# The reference reads a per-sequence blob part by part (and a KV part stream by stream)
# through an ``llama_io_read_host`` that only *queues* tensor writes; when anything throws,
# ``llama_context::state_seq_set_data`` discards the queue. So:
#
# * parts and streams that parsed completely before the failure keep the cells they
#   placed, but not the rows they read (those cells hold whatever they held before);
# * the part that fails removes the sequence and zeroes, directly (not queued), the rows
#   of the cells it had placed, when it got as far as placing them (a truncated cell
#   count or cell list throws before that, and a KV part's count throws before anything);
# * the plain hybrid then undoes its attention part (``state_clear``); iSWA and
#   hybrid-iSWA have no undo path.


def _restore_ubatch(seq_id: int, pos: list[int]) -> UBatch:
    ub = UBatch.reserve(len(pos), 1)
    ub.seq_id[:, 0] = seq_id
    ub.seq_id_unq[0] = seq_id
    ub.seq_idx[:] = -1
    ub.seq_idx[seq_id] = 0
    ub.pos[: len(pos)] = pos
    return ub


class _Cursor:
    """Reads little-endian values from a blob; None once the blob runs out."""

    def __init__(self, data: bytes, off: int) -> None:
        self.data, self.off = data, off

    def take(self, fmt: str) -> tuple | None:
        size = struct.calcsize("<" + fmt)
        if self.off + size > len(self.data):
            return None
        v = struct.unpack_from("<" + fmt, self.data, self.off)
        self.off += size
        return v

    def skip(self, n: int) -> bool:
        self.off += n
        return self.off <= len(self.data)


def _kv_stream_meta(cur: _Cursor, n: int, has_ext: bool) -> list[int] | None:
    """Positions of a per-sequence stream's ``n`` cells (None when the list is truncated)."""
    pos = []
    for _ in range(n):
        cell = cur.take("iI")
        if cell is None or not cur.skip((12 if has_ext else 0) + 4 * cell[1]):
            return None
        pos.append(cell[0])
    return pos


def _kv_stream_data_fits(cur: _Cursor, n: int) -> bool:
    """Whether a stream's data section (b.2: K rows, then V rows or V columns) is complete."""
    head = cur.take("II")
    if head is None:
        return False
    v_trans, n_layer = head
    for _ in range(n_layer):
        k = cur.take("iQ")
        if k is None or not cur.skip(n * k[1]):
            return False
    for _ in range(n_layer):
        v = cur.take("iII") if v_trans else cur.take("iQ")
        if v is None or not cur.skip(n * (v[1] * v[2] if v_trans else v[1])):
            return False
    return True


def _tensors(part: Any) -> list[Any]:
    if isinstance(part, KVCache):
        return [t for lay in part.layers for t in (lay.k, lay.v) if t is not None]
    return [t for il in part.layers for t in (part.get_r_l(il), part.get_s_l(il)) if t.nbytes]


def _restore_cells_not_rows(part: Any, data: bytes, seq_id: int) -> None:
    """Restore ``data`` into ``seq_id`` of ``part``, then put every row back as it was.

    A whole restore (``seq_id`` -1) first clears the part with its data, as the
    reference's does directly (not queued), so its rows end up zero.
    """
    if seq_id == -1:
        part.clear(True)
    saved = [(t, t.read_bytes()) for t in _tensors(part)]
    part.state_read(data, seq_id)
    for t, raw in saved:
        t.write_bytes(raw)


def _emulate_kv_failure(kv: KVCache, data: bytes, off: int, seq_id: int) -> None:
    """``llama_kv_cache::state_read`` of one sequence failing inside this part."""
    cur = _Cursor(data, off)
    n_stream = cur.take("I")
    if n_stream is None or n_stream[0] != kv.get_n_stream():
        return  # refused before anything changed
    n_stream = n_stream[0]
    strm = int(kv.seq_to_stream[seq_id])
    for s in range(n_stream):
        count = cur.take("I")
        if count is None:
            return  # the count read throws outside the cleanup
        n = count[0]
        if n == 0:
            continue
        start = cur.off
        if n > kv.get_size():
            kv.seq_rm(seq_id, -1, -1)  # no cells placed, state_clear removes the sequence
            return
        pos = _kv_stream_meta(cur, n, kv.has_cell_ext())
        kv.seq_rm(seq_id, -1, -1)
        if pos is None:
            return  # the cell list ran out: the reader threw after the removal
        if not _kv_stream_data_fits(cur, n):
            # placed, then the data read fails: state_clear zeroes the placement's rows
            ub = _restore_ubatch(seq_id, pos)
            sinfo = kv.find_slot(ub, False)
            if sinfo is not None:
                kv.apply_ubatch(sinfo, ub)
                kv.seq_rm(seq_id, -1, -1)
                zero_cells(kv.layout, kv.layers, strm, np.asarray(sinfo.idxs[0], dtype=np.int64))
            return
        # this stream parses: its cells stay, its rows are discarded with the reader
        counts = [struct.pack("<I", 0)] * n_stream
        counts[s] = data[start - 4 : cur.off]
        _restore_cells_not_rows(kv, struct.pack("<I", n_stream) + b"".join(counts), seq_id)


def _emulate_rs_failure(rec: RecurrentMemory, data: bytes, off: int, seq_id: int) -> None:
    """``llama_memory_recurrent::state_read`` of one sequence failing inside this part (b.3)."""
    cur = _Cursor(data, off)
    count = cur.take("I")
    if count is None:
        return  # the count read throws before anything changed
    n = count[0]
    rec.seq_rm(seq_id, -1, -1)
    if n != 1:
        return  # 0: nothing placed; > 1 is refused for a per-sequence blob
    cell = cur.take("iI")
    if cell is None:
        return  # the cell list ran out: the reader threw after the removal
    if rec.find_slot(_restore_ubatch(seq_id, [cell[0]])):
        # placed, then the data read fails: state_clear zeroes the placement's rows
        placed = np.array([int(rec.cells.tail[seq_id])], dtype=np.int64)
        rec.seq_rm(seq_id, -1, -1)
        for il in rec.layers:
            for t in (rec.get_r_l(il), rec.get_s_l(il)):
                if t.nbytes:
                    t.fill_rows(placed, 0)


def emulate_reference_failed_restore(mem: Memory, data: bytes, seq_id: int, flags: int = 0) -> None:
    """Re-enact what the reference leaves behind when a per-sequence restore fails.

    Parts are read in order (``flags``: the parts a ``PARTIAL_ONLY`` state holds); the
    ones that parse completely keep their cells (not their rows, see above), the failing
    one leaves the sequence removed, and then the plain hybrid undoes its attention part
    (iSWA and hybrid-iSWA have no undo path).
    """
    reader = StateReader(data)
    restored: list[Any] = []
    for kind, part in parts(mem, flags):
        start = reader.offset
        try:
            part.state_read_parse(reader, seq_id, 0)
        except StateError:
            if kind == "kv":
                _emulate_kv_failure(part, data, start, seq_id)
            else:
                _emulate_rs_failure(part, data, start, seq_id)
            break
        _restore_cells_not_rows(part, data[start : reader.offset], seq_id)
        restored.append(part)
    if isinstance(mem, HybridMemory) and not isinstance(mem.get_mem_attn(), KVCacheISWA):
        for part in restored:
            if isinstance(part, KVCache):
                part.state_clear(seq_id)


# A whole restore that fails: every part empties itself before reading (``clear(true)``
# zeroes its buffers directly), so parts that parsed keep their cells with zero rows, and
# the failing part is cleared (``state_clear(-1)``) when its data section fails. Its
# count or cell list running out is re-enacted for a KV part's stream counts only
# (earlier streams stay); a cell list that stops part-way leaves half-written cells in the
# reference, which no recorded run does (NotImplementedError).


def _emulate_kv_whole_failure(kv: KVCache, data: bytes, off: int) -> None:
    cur = _Cursor(data, off)
    n_stream = cur.take("I")
    if n_stream is None or n_stream[0] != kv.get_n_stream():
        return  # refused before the clear
    n_stream = n_stream[0]
    kv.clear(True)
    done = [struct.pack("<I", 0)] * n_stream
    for s in range(n_stream):
        start = cur.off
        count = cur.take("I")
        if count is None:
            # thrown outside the cleanup: the streams before stay (cells, zero rows)
            blob = struct.pack("<I", n_stream) + b"".join(done)
            _restore_cells_not_rows(kv, blob, -1)
            return
        n = count[0]
        if n > kv.get_size():
            kv.clear(True)
            return
        if _kv_stream_meta(cur, n, kv.has_cell_ext()) is None:
            raise NotImplementedError("a whole KV restore whose cell list stops part-way")
        if n and not _kv_stream_data_fits(cur, n):
            kv.clear(True)
            return
        done[s] = data[start : cur.off]
    raise AssertionError("the KV part parses completely, yet pymem refused it")


def _emulate_rs_whole_failure(rec: RecurrentMemory, data: bytes, off: int) -> None:
    cur = _Cursor(data, off)
    count = cur.take("I")
    if count is None:
        return  # thrown before anything changed
    n = count[0]
    for _ in range(n if n <= rec.size else 0):
        cell = cur.take("iI")
        if cell is None or not cur.skip(4 * cell[1]):
            raise NotImplementedError("a whole recurrent restore whose cell list stops part-way")
    rec.clear(True)  # too many cells, or the data section fails: state_clear(-1)


def emulate_reference_failed_whole_restore(mem: Memory, data: bytes) -> None:
    """Re-enact what the reference leaves behind when a whole-state restore fails."""
    reader = StateReader(data)
    for kind, part in parts(mem):
        start = reader.offset
        try:
            part.state_read_parse(reader, -1, 0)
        except StateError:
            if kind == "kv":
                _emulate_kv_whole_failure(part, data, start)
            else:
                _emulate_rs_whole_failure(part, data, start)
            break
        _restore_cells_not_rows(part, data[start : reader.offset], -1)
    if isinstance(mem, HybridMemory) and not isinstance(mem.get_mem_attn(), KVCacheISWA):
        mem.get_mem_attn().state_clear(-1)


# --- rows the reference's kernels wrote that no whole-state blob shows -----------------


def sync_rollback_plane(mem: Memory, ref: bytes, seq_id: int, plane: int, where: str) -> None:
    """After a recurrent rollback of ``plane`` tokens, give pymem the snapshot the kernel
    wrote into that plane at the last decode (``n_rs_seq`` > 0).

    The reference's state after the rollback shows the rolled-back state as the
    sequence's row; the row goes to plane ``plane`` of the sequence's tail cell (of the
    cell it copies from, when a copy is pending), which is where the reference reads it
    from. If pymem picked another plane, its blobs will not match.
    """
    off = 0
    for kind, part in parts(mem):
        if kind == "kv":
            off = parse_kv_part(
                ref, len(part.layers), part.has_cell_ext(), offset=off, has_v=_has_v(part)
            ).end
            continue
        rec: RecurrentMemory = part
        r0, s0 = rec.get_r_l(rec.layers[0]), rec.get_s_l(rec.layers[0])
        cells, r_rows, s_rows, off = _parse_rs_part(
            ref, off, rec.n_layer_trunk, len(rec.layers), r0.row_size, s0.row_size
        )
        tail = int(rec.cells.tail[seq_id])
        assert tail >= 0, f"{where}: seq {seq_id} has no recurrent cell after a rollback"
        k = int(np.searchsorted(np.flatnonzero(rec.cells.seq_counts()), tail))
        assert seq_id in cells[k][1], f"{where}: recurrent cell {tail} is not seq {seq_id}'s"
        src = int(rec.cells.src[tail])
        row = np.array([plane * rec.size + (src if src >= 0 else tail)], dtype=np.int64)
        for j, il in enumerate(rec.layers):
            rec.get_r_l(il).write_rows(row, r_rows[j][k : k + 1])
            if s0.nbytes:
                rec.get_s_l(il).write_rows(row, s_rows[j][k : k + 1])


# --- the replay ------------------------------------------------------------------------


def strip_seq(data: bytes) -> bytes:
    magic, _seq = struct.unpack_from("<Ii", data, 0)
    assert magic == SEQ_MAGIC
    return data[8:]


def strip_whole(data: bytes, arch: str) -> bytes:
    (n,) = struct.unpack_from("<I", data, 0)
    assert data[4 : 4 + n].decode() == arch
    return data[4 + n :]


Forward = Callable[[MemoryContext, UBatch], None]


def decode(
    mem: Memory,
    balloc: BatchAllocator,
    items: list,
    n_seq_max: int,
    n_ubatch: int,
    forward: Forward | None = None,
) -> int:
    """``llama_context::decode``'s memory flow; returns its code (0, 1 or -1).

    ``forward(mctx, ubatch)``, when given, is called for every ubatch right after its
    ``apply()``, where llama.cpp builds and computes the graph.
    """
    try:
        balloc.init(Batch.from_items(items), memory=mem, n_seq_max=n_seq_max)
    except BatchError:
        return -1
    upd = mem.init_update(False)
    if upd.get_status() == MemoryStatus.SUCCESS:
        upd.apply()
    ctx = mem.init_batch(balloc, n_ubatch, embd_all=False)
    if ctx.get_status() != MemoryStatus.SUCCESS:
        assert ctx.get_status() == MemoryStatus.FAILED_PREPARE
        upd = mem.init_update(True)
        if upd.get_status() == MemoryStatus.SUCCESS:
            upd.apply()
        return 1
    while True:
        ctx.apply()
        if forward is not None:
            forward(ctx, ctx.get_ubatch())
        if not ctx.next():
            return 0


class ReplayHooks:
    """What a caller can change in :func:`replay` (the default changes nothing).

    * :meth:`forward`: a model's forward pass per ubatch. When a subclass defines it, the
      replay no longer copies the reference's rows after a decode (it still checks that
      pymem's cells equal the reference's): the rows are the model's own.
    * :meth:`before_op` / :meth:`after_op`: around each step's operation, before its
      checks (e.g. compare the decode's logits, re-enact a reference quirk).
    * :meth:`compare_blob`: how a state blob is compared (default: byte for byte).
    """

    forward: Forward | None = None

    def before_op(self, step: dict[str, Any], mem: Memory, where: str) -> None:
        pass

    def after_op(self, step: dict[str, Any], mem: Memory, result: Any, where: str) -> None:
        pass

    def compare_blob(self, kind: str, got: bytes, want: bytes, where: str) -> None:
        """``kind``: "seq", "whole" or "partial" (a PARTIAL_ONLY per-sequence blob)."""
        assert got == want, f"{where}: {kind} blob differs"


@dataclass
class ReplayReport:
    steps: int = 0
    blobs_compared: int = 0
    failed_restores: int = 0


def replay(run: Run, mem: Memory, hooks: ReplayHooks | None = None) -> ReplayReport:
    arch = run.arch
    meta = run.data["memory"]
    n_seq_max = int(meta["n_seq_max"])
    n_ubatch = int(meta["n_ubatch"])
    n_seq = run.n_seq
    balloc = BatchAllocator(getattr(mem, "n_pos_per_embd", 1))
    report = ReplayReport()
    rollback = any(kind == "rs" and part.n_rs_seq > 0 for kind, part in parts(mem))
    hooks = hooks or ReplayHooks()
    forward = hooks.forward
    prev_pos: list[list[int]] = []
    for step in run.data["steps"]:
        op = step["op"]
        where = f"{run.path.name} step {step['i']} ({op}: {step.get('note', '')})"
        result: Any = None
        hooks.before_op(step, mem, where)
        if op == "decode":
            result = decode(mem, balloc, step["items"], n_seq_max, n_ubatch, forward)
            if result == 0 and "state" in step:
                ref = strip_whole(run.blob(step["state"]), arch)
                sync_tensors_from_reference(mem, ref, where, copy_rows=forward is None)
        elif op == "seq_rm":
            result = mem.seq_rm(step["seq"], step["p0"], step["p1"])
            seq = step["seq"]
            if (
                result
                and rollback
                and forward is None
                and seq >= 0
                and step["p0"] > 0
                and "state" in step
            ):
                # a recurrent rollback: the reference reads a snapshot plane from now on
                # (a model's forward wrote the planes itself)
                plane = prev_pos[seq][1] - step["pos"][seq][1]
                if plane > 0:
                    ref = strip_whole(run.blob(step["state"]), arch)
                    sync_rollback_plane(mem, ref, seq, plane, where)
        elif op == "seq_cp":
            mem.seq_cp(step["src"], step["dst"], step["p0"], step["p1"])
        elif op == "seq_keep":
            mem.seq_keep(step["seq"])
        elif op == "seq_add":
            mem.seq_add(step["seq"], step["p0"], step["p1"], step["delta"])
        elif op == "seq_div":
            mem.seq_div(step["seq"], step["p0"], step["p1"], step["d"])
        elif op == "clear":
            mem.clear(step.get("data", True))
        elif op == "state_seq_set":
            data = strip_seq(run.blob(step["blob"]))
            flags = int(step.get("flags", 0))
            before = mem.state_write()
            try:
                result = 8 + mem.state_read(data, step["seq"], flags)
            except StateError:
                result = 0
                report.failed_restores += 1
                assert mem.state_write() == before, f"{where}: a failed restore changed pymem"
                emulate_reference_failed_restore(mem, data, step["seq"], flags)
        elif op == "state_set":
            data = strip_whole(run.blob(step["blob"]), arch)
            before = mem.state_write()
            try:
                result = 4 + len(arch) + mem.state_read(data)
            except StateError:
                result = 0
                report.failed_restores += 1
                assert mem.state_write() == before, f"{where}: a failed restore changed pymem"
                emulate_reference_failed_whole_restore(mem, data)
        else:
            assert op == "none", f"{where}: unknown op"
        hooks.after_op(step, mem, result, where)
        report.steps += 1

        assert result == step["result"], f"{where}: result {result} != reference {step['result']}"
        pos = [[mem.seq_pos_min(s), mem.seq_pos_max(s)] for s in range(n_seq)]
        assert pos == step["pos"], f"{where}: positions {pos} != reference {step['pos']}"
        seq_blobs = [mem.state_write(s) for s in range(n_seq)]
        whole = mem.state_write()
        assert [8 + len(b) for b in seq_blobs] == step["seq_state_bytes"], f"{where}: per-seq sizes"
        assert 4 + len(arch) + len(whole) == step["state_bytes"], f"{where}: whole-state size"
        for s, blob_id in enumerate(step.get("seq_state", [])):
            want = strip_seq(run.blob(blob_id))
            hooks.compare_blob("seq", bytes(seq_blobs[s]), want, f"{where}: seq {s}")
            report.blobs_compared += 1
        if "state" in step:
            want = strip_whole(run.blob(step["state"]), arch)
            hooks.compare_blob("whole", bytes(whole), want, where)
            report.blobs_compared += 1
        for s, blob_id in enumerate(step.get("seq_state_partial", [])):
            got = bytes(mem.state_write(s, StateFlags.PARTIAL_ONLY))
            want = strip_seq(run.blob(blob_id))
            hooks.compare_blob("partial", got, want, f"{where}: seq {s} PARTIAL_ONLY")
            report.blobs_compared += 1
        prev_pos = step["pos"]
    return report
