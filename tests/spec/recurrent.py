"""Recurrent (SSM) state memory (``llama_memory_recurrent``), one cell at a time.

``cells[i]`` is both a state slot and, for ``i < n_seq_max``, the metadata holder of
sequence ``i`` (``cells[seq].tail`` is the cell holding that sequence's state). R and S
tensors have ``mem_size * (1 + n_rs_seq)`` rows: plane k of rollback snapshots starts
at row ``k * mem_size``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .batch import UBatch, ubatch_reserve
from .common import I32_MAX, SpecAbort, SpecStateError, norm_range, row_size, type_id
from .state import Reader, Writer

U32 = 1 << 32


@dataclass
class RSConfig:
    n_layer_total: int  # hparams.n_layer(): every model layer, written in the state header
    layers: list[int]  # model layer ids that hold R/S tensors
    n_embd_r: int
    n_embd_s: int
    mem_size: int
    n_seq_max: int
    n_rs_seq: int = 0
    type_r: str = "f32"
    type_s: str = "f32"
    # pymem's deliberate departure: a fresh cell gathers plane 0 even with a stale rollback
    fresh_reads_plane0: bool = False
    # models open pymem bug R1 (tests/test_property_regressions.py): pos_max = the tail's pos
    pos_max_from_tail: bool = False


@dataclass
class Cell:
    pos: int = -1
    src: int = -1
    src0: int = -1
    tail: int = -1
    seq_id: set[int] = field(default_factory=set)

    def is_empty(self) -> bool:
        return not self.seq_id


class Recurrent:
    def __init__(self, cfg: RSConfig) -> None:
        self.cfg = cfg
        self.size = cfg.mem_size
        self.head = 0
        self.used = 0
        self.n = 0
        self.rs_z = -1
        self.rs_idx = [0] * cfg.n_seq_max
        # pymem departure (not the reference): tokens of each sequence in the ubatch that
        # last wrote its state; a rollback of k tokens is exact only when k < this
        self.last_n = [0] * cfg.n_seq_max
        self.cells = [Cell() for _ in range(self.size)]
        self.r_row = row_size(cfg.type_r, cfg.n_embd_r)
        self.s_row = row_size(cfg.type_s, cfg.n_embd_s)
        n_rows = self.size * (1 + cfg.n_rs_seq)
        self.r_data = {il: bytearray(n_rows * self.r_row) for il in cfg.layers}
        self.s_data = {il: bytearray(n_rows * self.s_row) for il in cfg.layers}

    @property
    def n_rs_seq(self) -> int:
        return self.cfg.n_rs_seq

    def _dec_used(self) -> None:
        self.used = (self.used - 1) % U32

    def clear(self, data: bool = True) -> None:
        for c in self.cells:
            c.pos = -1
            c.seq_id = set()
            c.src = -1
            c.tail = -1
        self.head = 0
        self.used = 0
        if data:
            for il in self.cfg.layers:
                self.r_data[il] = bytearray(len(self.r_data[il]))
                self.s_data[il] = bytearray(len(self.s_data[il]))
        self.rs_idx = [0] * self.cfg.n_seq_max
        self.last_n = [0] * self.cfg.n_seq_max

    def set_rs_idx(self, seq_id: int, idx: int) -> None:
        if seq_id < 0:
            self.rs_idx = [0] * self.cfg.n_seq_max
            return
        if not (seq_id < self.cfg.n_seq_max and idx <= self.n_rs_seq):
            raise SpecAbort(f"GGML_ASSERT in set_rs_idx({seq_id}, {idx})")
        self.rs_idx[seq_id] = idx

    # ------------------------------------------------------------- sequence ops ---

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        new_head = self.size
        p0, p1 = norm_range(p0, p1)
        if seq_id % U32 >= self.cfg.n_seq_max:  # compared unsigned: -1 fails here
            return False
        rm_all = p0 == 0 and p1 == I32_MAX
        if rm_all:
            self.set_rs_idx(seq_id, 0)
            if 0 <= seq_id < len(self.last_n):
                self.last_n[seq_id] = 0
        if seq_id >= self.size:
            return False
        if seq_id >= 0:
            tail_id = self.cells[seq_id].tail
            if tail_id >= 0:
                cell = self.cells[tail_id]
                if 0 < p0 <= cell.pos < p1:
                    rollback = cell.pos - (p0 - 1)
                    pending = self.rs_idx[seq_id] != 0
                    exact = rollback < self.last_n[seq_id]  # pymem departure, see last_n
                    if not pending and 1 <= rollback <= self.n_rs_seq and exact:
                        self.set_rs_idx(seq_id, rollback)
                        cell.pos = p0 - 1
                        return True
                    return False
                if p0 <= cell.pos < p1:
                    self.cells[seq_id].tail = -1
        else:
            if p0 != p1 and (p0 != 0 or p1 != I32_MAX):
                return False
        for i in range(self.size):
            c = self.cells[i]
            if p0 <= c.pos < p1:
                if seq_id < 0:
                    c.seq_id = set()
                elif seq_id in c.seq_id:
                    c.seq_id.discard(seq_id)
                else:
                    continue
                if c.is_empty():
                    if c.pos >= 0:
                        self._dec_used()
                    c.pos = -1
                    c.src = -1
                    if new_head == self.size:
                        new_head = i
        if new_head != self.size and new_head < self.head:
            self.head = new_head
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        if src == dst:
            return
        if dst % U32 < self.size and src % U32 < self.size:
            tail_src = self.cells[src]
            tail_dst = self.cells[dst]
            if tail_dst.tail >= 0:
                cell_dst = self.cells[tail_dst.tail]
                cell_dst.seq_id.discard(dst)
                tail_dst.tail = -1
                if cell_dst.is_empty():
                    cell_dst.pos = -1
                    cell_dst.src = -1
                    self._dec_used()
            if tail_src.tail >= 0:
                self.cells[tail_src.tail].seq_id.add(dst)
                tail_dst.tail = tail_src.tail
            if dst < len(self.last_n) and src < len(self.last_n):
                self.last_n[dst] = self.last_n[src]

    def seq_keep(self, seq_id: int) -> None:
        new_head = self.size
        for i in range(self.size):
            c = self.cells[i]
            if i != seq_id:
                c.tail = -1
            if seq_id not in c.seq_id:
                if c.pos >= 0:
                    self._dec_used()
                c.pos = -1
                c.src = -1
                c.seq_id = set()
                if new_head == self.size:
                    new_head = i
            else:
                c.seq_id = {seq_id}
        if new_head != self.size and new_head < self.head:
            self.head = new_head

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        if shift == 0:
            return
        p0, p1 = norm_range(p0, p1)
        if p0 == p1:
            return
        if 0 <= seq_id < self.size:
            t = self.cells[seq_id].tail
            if t >= 0:
                c = self.cells[t]
                if seq_id in c.seq_id and p0 <= c.pos < p1:
                    c.pos += shift

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        if d == 1:
            return
        p0, p1 = norm_range(p0, p1)
        if p0 == p1:
            return
        if 0 <= seq_id < self.size:
            t = self.cells[seq_id].tail
            if t >= 0:
                c = self.cells[t]
                if seq_id in c.seq_id and p0 <= c.pos < p1:
                    if d == 0:
                        raise SpecAbort("seq_div by 0")
                    q = abs(c.pos) // abs(d)
                    c.pos = q if (c.pos >= 0) == (d >= 0) else -q

    def seq_pos_min(self, seq_id: int) -> int:
        ps = [c.pos for c in self.cells if seq_id in c.seq_id]
        return min(ps) if ps else -1

    def seq_pos_max(self, seq_id: int) -> int:
        ps = [c.pos for c in self.cells if seq_id in c.seq_id]
        if self.cfg.pos_max_from_tail and ps:
            return max(ps)
        return max([-1, *ps])

    # ------------------------------------------------------------------ placing ---

    def prepare(self, ubatches: list[UBatch]) -> bool:
        saved = (copy.deepcopy(self.cells), self.used, self.head, list(self.last_n))
        ok = True
        for ub in ubatches:
            if not self.find_slot(ub):
                ok = False
                break
        self.cells, self.used, self.head, self.last_n = saved
        return ok

    def find_slot(self, ub: UBatch) -> bool:
        n_seq_tokens = ub.n_seq_tokens
        n_seqs = ub.n_seqs
        size = self.size
        cells = self.cells
        if self.head > (self.used + 2 * n_seqs) % U32:
            self.head = 0
        if not ub.equal_seqs:
            raise SpecAbort("GGML_ASSERT(ubatch.equal_seqs())")
        lo = size - 1
        hi = 0
        for s in range(n_seqs):
            i = s * n_seq_tokens
            for j, seq_id in enumerate(ub.seq_id[i][: ub.n_seq_id[i]]):
                if seq_id < 0 or seq_id >= size:
                    return False  # "seq_id=%d >= n_seq_max=%u Try using a bigger --parallel value"
                if j > 0:
                    meta = cells[seq_id]
                    if meta.tail >= 0:
                        c = cells[meta.tail]
                        c.seq_id.discard(seq_id)
                        meta.tail = -1
                        if c.is_empty():
                            c.pos = -1
                            c.src = -1
                            self._dec_used()
        next_empty = self.head
        for _ in range(size):
            if next_empty >= size:
                next_empty -= size
            if cells[next_empty].is_empty():
                break
            next_empty += 1
        for s in range(n_seqs):
            i = s * n_seq_tokens
            seq_id = ub.seq_id[i][0]
            meta = cells[seq_id]
            has_cell = False
            if meta.tail >= 0:
                c = cells[meta.tail]
                if seq_id not in c.seq_id:
                    raise SpecAbort("GGML_ASSERT(cell.has_seq_id(seq_id))")
                if len(c.seq_id) == 1:
                    has_cell = True
            if not has_cell:
                if next_empty >= size or not cells[next_empty].is_empty():
                    raise SpecAbort("GGML_ASSERT(empty_cell.is_empty()): no empty cell")
                empty = cells[next_empty]
                if meta.tail >= 0:
                    orig = cells[meta.tail]
                    empty.pos = orig.pos
                    empty.src = orig.src
                    orig.seq_id.discard(seq_id)
                    empty.seq_id.add(seq_id)
                    if orig.is_empty():
                        raise SpecAbort("GGML_ASSERT(!orig_cell.is_empty())")
                meta.tail = next_empty
                if s + 1 < n_seqs:
                    for _ in range(size):
                        next_empty += 1
                        if next_empty >= size:
                            next_empty -= size
                        if cells[next_empty].is_empty():
                            break
            lo = min(lo, meta.tail)
            hi = max(hi, meta.tail)
        tails_before = [cells[j].tail for j in range(size)]
        for s in range(n_seqs):
            i = s * n_seq_tokens
            dst_id = s + lo
            src_id = cells[ub.seq_id[i][0]].tail
            if dst_id != src_id:
                d, c = cells[dst_id], cells[src_id]
                d.pos, c.pos = c.pos, d.pos
                d.src, c.src = c.src, d.src
                d.seq_id, c.seq_id = c.seq_id, d.seq_id
                for j in range(size):
                    if cells[j].tail == src_id:
                        cells[j].tail = dst_id
                    elif cells[j].tail == dst_id:
                        cells[j].tail = src_id
        # pymem departure: a sequence whose cell the swaps moved keeps its state (copied
        # in-graph) but not its snapshot planes, so its rollbacks are refused
        for j in range(min(size, len(self.last_n))):
            if cells[j].tail != tails_before[j]:
                self.last_n[j] = 0
        for s in range(n_seqs):
            i = s * n_seq_tokens
            last_pos = ub.pos[i + n_seq_tokens - 1]
            c = cells[s + lo]
            c.pos = last_pos  # non-consecutive positions only warn in the reference
            c.seq_id = set()
            for seq_id in ub.seq_id[i][: ub.n_seq_id[i]]:
                c.seq_id.add(seq_id)
                cells[seq_id].tail = s + lo
                if seq_id < len(self.last_n):
                    self.last_n[seq_id] = n_seq_tokens
        refcounts = [0] * size
        for c in cells:
            if c.src >= 0:
                refcounts[c.src] += 1
        self.rs_z = -1
        for i in range(lo, hi + 1):
            if refcounts[i] == 0:
                self.rs_z = i
                break
        for i in range(lo, hi + 1):
            if cells[i].src < 0:
                if self.rs_z < 0:
                    raise SpecAbort("GGML_ASSERT(rs_z >= 0)")
                cells[i].src0 = self.rs_z
            else:
                cells[i].src0 = cells[i].src
            cells[i].src = i
        self.head = lo
        self.n = hi - lo + 1
        self.used = sum(1 for c in cells if not c.is_empty())
        return self.n >= n_seqs

    # ------------------------------------------------------------- graph inputs ---

    def s_copy(self, i: int) -> int:
        """``llama_memory_recurrent_context::s_copy``; consumes a pending rollback."""
        idx_cell = i + self.head
        src0 = self.cells[idx_cell].src0
        if self.n_rs_seq == 0:
            return src0
        idx = 0
        if self.cells[idx_cell].seq_id:
            seq = min(self.cells[idx_cell].seq_id)
            if 0 <= seq < len(self.rs_idx):
                idx = self.rs_idx[seq]
                self.rs_idx[seq] = 0
        if self.cfg.fresh_reads_plane0 and src0 == self.rs_z:
            idx = 0
        return idx * self.size + src0

    def s_copy_inputs(self) -> list[int]:
        """The whole ``rs_s_copy`` input of the current ubatch (``n`` entries)."""
        return [self.s_copy(i) for i in range(self.n)]

    # ------------------------------------------------------------------- state ---

    def state_write(self, w: Writer, seq_id: int = -1) -> None:
        cfg = self.cfg
        sel = []
        rows = []
        for i, c in enumerate(self.cells):
            if (seq_id == -1 and not c.is_empty()) or seq_id in c.seq_id:
                rs = 0
                if self.n_rs_seq != 0:
                    if seq_id != -1:
                        if not 0 <= seq_id < len(self.rs_idx):
                            raise SpecAbort("GGML_ASSERT: seq_id outside rs_idx")
                        rs = self.rs_idx[seq_id]
                    else:
                        vals = {self.rs_idx[s] for s in c.seq_id}
                        if len(vals) > 1:
                            raise SpecAbort(
                                "cannot write shared recurrent state with different rollback indices"
                            )
                        rs = vals.pop()
                sel.append(i)
                rows.append(rs * self.size + (c.src if c.src >= 0 else i))
        w.u32(len(sel))
        for i in sel:
            c = self.cells[i]
            w.i32(c.pos)
            ids = sorted(c.seq_id) if seq_id == -1 else []
            w.u32(len(ids))
            for s in ids:
                w.i32(s)
        w.u32(0)  # s_trans
        w.u32(cfg.n_layer_total)
        for il in range(cfg.n_layer_total):
            if il not in self.r_data:
                continue
            w.i32(type_id(cfg.type_r))
            w.u64(self.r_row)
            for row in rows:
                w.raw(self.r_data[il][row * self.r_row : (row + 1) * self.r_row])
        for il in range(cfg.n_layer_total):
            if il not in self.s_data:
                continue
            w.i32(type_id(cfg.type_s))
            w.u64(self.s_row)
            for row in rows:
                w.raw(self.s_data[il][row * self.s_row : (row + 1) * self.s_row])

    def state_read(self, r: Reader, seq_id: int = -1, atomic: bool = True) -> None:
        work = copy.deepcopy(self)
        try:
            work._state_read(r, seq_id)
        except SpecStateError:
            if not atomic:
                self.__dict__.update(work.__dict__)
            raise
        self.__dict__.update(work.__dict__)

    def _state_read(self, r: Reader, seq_id: int) -> None:
        cell_count = r.u32("cell_count")
        meta_read = False
        try:
            self._read_meta(r, cell_count, seq_id)
            meta_read = True
            self._read_data(r, cell_count)
        except SpecStateError:
            self._state_clear(seq_id, self.head, cell_count if meta_read else 0)
            raise
        if self.n_rs_seq != 0:
            self.set_rs_idx(seq_id, 0)

    def _read_meta(self, r: Reader, cell_count: int, dest: int) -> None:
        if dest != -1:
            if cell_count > self.size:
                raise SpecStateError("not enough cells in kv cache")
            self.seq_rm(dest, -1, -1)
            if cell_count == 0:
                return
            ub = ubatch_reserve(cell_count, 1)
            for i in range(cell_count):
                pos = r.i32("cell pos")
                n_seq_id = r.u32("cell n_seq_id")
                if n_seq_id != 0:
                    raise SpecStateError("invalid seq_id-agnostic kv cell")
                ub.pos[i] = pos
            ub.n_seq_id[0] = 1
            ub.seq_id[0] = [dest]
            if not self.find_slot(ub):
                raise SpecStateError("failed to find available cells in kv cache")
            if cell_count > 1:
                raise SpecAbort("a per-sequence recurrent state with more than one cell")
        else:
            if cell_count > self.size:
                raise SpecStateError("not enough cells in kv cache")
            self.clear(True)
            for i in range(cell_count):
                c = self.cells[i]
                c.pos = r.i32("cell pos")
                n_seq_id = r.u32("cell n_seq_id")
                for _ in range(n_seq_id):
                    sid = r.i32("cell seq_id")
                    if sid < 0 or sid >= self.cfg.n_seq_max:
                        raise SpecStateError(
                            f"invalid seq_id, {sid} is out of range [0, {self.cfg.n_seq_max})"
                        )
                    c.seq_id.add(sid)
                    if self.cells[sid].tail != -1:
                        raise SpecStateError(f"duplicate tail for seq_id {sid}")
                    self.cells[sid].tail = i
            self.head = 0
            self.used = cell_count
        for i in range(cell_count):
            self.cells[self.head + i].src = self.head + i

    def _read_data(self, r: Reader, cell_count: int) -> None:
        cfg = self.cfg
        s_trans = r.u32("s_trans")
        n_layer = r.u32("n_layer")
        if n_layer != cfg.n_layer_total:
            raise SpecStateError(
                f"mismatched layer count ({n_layer} instead of {cfg.n_layer_total})"
            )
        if cell_count > self.size:
            raise SpecStateError("not enough cells in kv cache to restore state")
        if s_trans != 0:
            raise SpecStateError("incompatible s transposition")
        h = self.head
        for il in range(cfg.n_layer_total):
            if il not in self.r_data:
                continue
            if r.i32("r type") != type_id(cfg.type_r):
                raise SpecStateError(f"mismatched r type (layer {il})")
            if r.u64("r row size") != self.r_row:
                raise SpecStateError(f"mismatched r row size (layer {il})")
            if cell_count:
                n = cell_count * self.r_row
                self.r_data[il][h * self.r_row : h * self.r_row + n] = r.raw(n, "r rows")
        for il in range(cfg.n_layer_total):
            if il not in self.s_data:
                continue
            if r.i32("s type") != type_id(cfg.type_s):
                raise SpecStateError(f"mismatched s type (layer {il})")
            if r.u64("s row size") != self.s_row:
                raise SpecStateError(f"mismatched s row size (layer {il})")
            if cell_count:
                n = cell_count * self.s_row
                self.s_data[il][h * self.s_row : h * self.s_row + n] = r.raw(n, "s rows")

    def _state_clear(self, seq_id: int, cell_head: int, cell_count: int) -> None:
        if seq_id == -1:
            self.clear(True)
            return
        self.seq_rm(seq_id, -1, -1)
        for il in self.cfg.layers:
            a, b = cell_head * self.r_row, (cell_head + cell_count) * self.r_row
            self.r_data[il][a:b] = bytes(b - a)
            a, b = cell_head * self.s_row, (cell_head + cell_count) * self.s_row
            self.s_data[il][a:b] = bytes(b - a)
