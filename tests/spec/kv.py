"""The attention KV cache (``llama_kv_cache`` + ``llama_kv_cells``), one cell at a time.

Cells of a stream are parallel Python lists: ``pos`` (-1 = empty), ``ext`` ((x, y, tok)),
``shift`` and ``seq`` (a set of sequence ids). Tensor data is kept per layer and stream
as one ``bytearray`` of rows (K row and V row of a cell; V is kept per cell even when
the cache stores it transposed, and transposed only when (de)serialising).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .batch import UBatch, ubatch_reserve
from .common import (
    I32_MAX,
    LLAMA_MAX_SEQ,
    SpecAbort,
    SpecStateError,
    Status,
    SwaType,
    is_masked_swa,
    norm_range,
    pad_to,
    row_size,
    type_id,
    type_size,
)
from .state import Reader, Writer

EXT_NONE = (0, 0, -1)


@dataclass(frozen=True)
class KVLayer:
    il: int
    n_embd_k: int
    n_embd_v: int
    has_v: bool = True


@dataclass
class KVConfig:
    layers: list[KVLayer]
    kv_size: int
    n_seq_max: int
    unified: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    v_trans: bool = True
    n_swa: int = 0
    swa_type: int = SwaType.NONE
    n_pad: int = 1
    n_pos_per_embd: int = 1
    has_cell_ext: bool = False
    n_embd_v_gqa_max: int = 0  # model-wide, for the transposed V row indices
    can_shift: bool = True
    use_alibi: bool = False
    non_causal_type: str = "all"  # "all" | "swa_only" | "swa_full"
    rope_none: bool = True  # K-shift is metadata only (no K rotation to model)
    # pymem's deliberate departures from the reference (off = the reference's behaviour)
    transactional_prepare: bool = False  # prepare undoes SWA purges done while planning
    true_div_shift: bool = False  # seq_div records new - old as the pending shift

    @property
    def n_stream(self) -> int:
        return 1 if self.unified else self.n_seq_max


class Cells:
    """``llama_kv_cells`` of one stream."""

    true_div_shift = False

    def __init__(self, size: int) -> None:
        self.pos = [-1] * size
        self.ext = [EXT_NONE] * size
        self.shift = [0] * size
        self.seq: list[set[int]] = [set() for _ in range(size)]
        self.has_shift = False

    def reset(self) -> None:
        n = len(self.pos)
        flag = self.true_div_shift
        self.__init__(n)  # type: ignore[misc]
        self.true_div_shift = flag

    def size(self) -> int:
        return len(self.pos)

    def is_empty(self, i: int) -> bool:
        return self.pos[i] == -1

    def used(self) -> list[int]:
        return [i for i in range(self.size()) if self.pos[i] != -1]

    def get_used(self) -> int:
        return len(self.used())

    def used_max_p1(self) -> int:
        u = self.used()
        return u[-1] + 1 if u else 0

    def seq_pos_min(self, s: int) -> int:
        ps = [self.pos[i] for i in range(self.size()) if s in self.seq[i]]
        return min(ps) if ps else -1

    def seq_pos_max(self, s: int) -> int:
        ps = [self.pos[i] for i in range(self.size()) if s in self.seq[i]]
        return max(ps) if ps else -1

    def rm(self, i: int) -> None:
        assert self.pos[i] != -1
        self.seq[i] = set()
        self.pos[i] = -1
        self.ext[i] = EXT_NONE
        self.shift[i] = 0

    def seq_rm(self, i: int, s: int) -> bool:
        self.seq[i].discard(s)
        if not self.seq[i]:
            self.pos[i] = -1
            self.ext[i] = EXT_NONE
            self.shift[i] = 0
            return True
        return False

    def seq_keep(self, i: int, s: int) -> bool:
        if s in self.seq[i]:
            self.seq[i] = {s}
            return False
        if self.seq[i]:
            self.seq[i] = set()
            self.pos[i] = -1
            self.ext[i] = EXT_NONE
            self.shift[i] = 0
            return True
        return False

    def pos_set(self, i: int, p: int) -> None:
        assert self.pos[i] == -1 and not self.seq[i]
        self.pos[i] = p

    def pos_add(self, i: int, d: int) -> bool:
        self.pos[i] += d
        self.shift[i] += d
        self.has_shift = True
        if self.pos[i] < 0:
            self.seq[i] = set()
            self.pos[i] = -1
            self.shift[i] = 0  # (the reference leaves ext as it was)
            return True
        return False

    def pos_div(self, i: int, d: int) -> None:
        old = self.pos[i]
        q = abs(old) // abs(d)
        self.pos[i] = q if (old >= 0) == (d >= 0) else -q
        if self.true_div_shift:
            self.shift[i] += self.pos[i] - old
        else:
            self.shift[i] += (
                old - self.pos[i]
            )  # the reference's sign (its K-shift rotates backwards)
        self.has_shift = True

    def snapshot(self, idxs: list[int]) -> list[tuple]:
        return [(self.pos[i], self.ext[i], set(self.seq[i])) for i in idxs]

    def restore(self, idxs: list[int], snap: list[tuple]) -> None:
        for i, (p, e, s) in zip(idxs, snap):
            self.pos[i] = p
            self.ext[i] = e
            self.seq[i] = set(s)


@dataclass
class SlotInfo:
    """``slot_info``: per stream of the ubatch, the cell indices its tokens go to."""

    strm: list[int] = field(default_factory=list)
    idxs: list[list[int]] = field(default_factory=list)

    def n_stream(self) -> int:
        return len(self.strm)

    def size(self) -> int:
        return len(self.idxs[0]) if self.idxs else 0


class KVCache:
    def __init__(self, cfg: KVConfig) -> None:
        self.cfg = cfg
        n_stream = cfg.n_stream
        self.cells = [Cells(cfg.kv_size) for _ in range(n_stream)]
        for c in self.cells:
            c.true_div_shift = cfg.true_div_shift
        self.heads = [0] * n_stream
        self.seq_to_stream = list(range(n_stream)) if n_stream > 1 else [0] * LLAMA_MAX_SEQ
        self.sc_ssrc: list[int] = []
        self.sc_sdst: list[int] = []
        self.k_row = [row_size(cfg.type_k, ly.n_embd_k) for ly in cfg.layers]
        self.v_row = [row_size(cfg.type_v, ly.n_embd_v) if ly.has_v else 0 for ly in cfg.layers]
        self.k_data = [
            [bytearray(cfg.kv_size * self.k_row[li]) for _ in range(n_stream)]
            for li in range(len(cfg.layers))
        ]
        self.v_data = [
            [bytearray(cfg.kv_size * self.v_row[li]) for _ in range(n_stream)]
            for li in range(len(cfg.layers))
        ]
        self.prepare_purge_leaks = not cfg.transactional_prepare
        self.k_bytes_unmodelled = False

    # ------------------------------------------------------------------ basics ---

    @property
    def n_stream(self) -> int:
        return self.cfg.n_stream

    def size(self) -> int:
        return self.cfg.kv_size

    def _check_seq(self, seq_id: int, allow_neg1: bool = False) -> None:
        if allow_neg1 and seq_id == -1:
            return
        if not 0 <= seq_id < len(self.seq_to_stream):
            raise SpecAbort(f"GGML_ASSERT: seq_id {seq_id} outside [0, {len(self.seq_to_stream)})")

    def clear(self, data: bool = True) -> None:
        for s in range(self.n_stream):
            self.cells[s].reset()
            self.heads[s] = 0
        if data:
            for li in range(len(self.cfg.layers)):
                for s in range(self.n_stream):
                    self.k_data[li][s] = bytearray(len(self.k_data[li][s]))
                    self.v_data[li][s] = bytearray(len(self.v_data[li][s]))

    # ------------------------------------------------------------- sequence ops ---

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        self._check_seq(seq_id, allow_neg1=True)
        p0, p1 = norm_range(p0, p1)
        streams = [self.seq_to_stream[seq_id]] if seq_id >= 0 else list(range(self.n_stream))
        for s in streams:
            cells = self.cells[s]
            new_head = cells.size()
            for i in range(cells.size()):
                if not (p0 <= cells.pos[i] < p1):
                    continue
                if seq_id >= 0:
                    if seq_id in cells.seq[i] and cells.seq_rm(i, seq_id):  # noqa: SIM102
                        if new_head == cells.size():
                            new_head = i
                else:
                    cells.rm(i)
                    if new_head == cells.size():
                        new_head = i
            if new_head != cells.size() and new_head < self.heads[s]:
                self.heads[s] = new_head
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._check_seq(src)
        self._check_seq(dst)
        s0 = self.seq_to_stream[src]
        s1 = self.seq_to_stream[dst]
        if s0 == s1:
            if src == dst:
                return
            p0, p1 = norm_range(p0, p1)
            cells = self.cells[s0]
            for i in range(cells.size()):
                if p0 <= cells.pos[i] < p1 and src in cells.seq[i]:
                    cells.seq[i].add(dst)
            return
        size = self.size()
        is_full = not ((p0 > 0 and p0 + 1 < size) or (p1 > 0 and p1 + 1 < size))
        if not is_full:
            raise SpecAbort("seq_cp() is only supported for full KV buffers (cross-stream)")
        self.sc_ssrc.append(s0)
        self.sc_sdst.append(s1)
        a, b = self.cells[s0], self.cells[s1]
        b.reset()
        for i in range(a.size()):
            if src in a.seq[i]:
                pos = a.pos[i]
                sh = a.shift[i]
                ext = a.ext[i]
                if sh != 0:
                    pos -= sh
                b.pos_set(i, pos)
                b.seq[i].add(dst)
                if sh != 0:
                    b.pos_add(i, sh)
                b.ext[i] = ext
        self.heads[s1] = self.heads[s0]

    def seq_keep(self, seq_id: int) -> None:
        self._check_seq(seq_id)
        s = self.seq_to_stream[seq_id]
        cells = self.cells[s]
        new_head = cells.size()
        for i in range(cells.size()):
            if cells.seq_keep(i, seq_id) and new_head == cells.size():
                new_head = i
        if new_head != cells.size() and new_head < self.heads[s]:
            self.heads[s] = new_head

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self._check_seq(seq_id)
        if self.cfg.n_pos_per_embd != 1:
            raise SpecAbort("seq_add() is only supported for n_pos_per_embd() == 1")
        s = self.seq_to_stream[seq_id]
        cells = self.cells[s]
        if shift == 0:
            return
        p0, p1 = norm_range(p0, p1)
        if p0 == p1:
            return
        new_head = cells.size()
        for i in range(cells.size()):
            if p0 <= cells.pos[i] < p1 and seq_id in cells.seq[i]:  # noqa: SIM102
                if cells.pos_add(i, shift) and new_head == cells.size():
                    new_head = i
        self.heads[s] = new_head if new_head != cells.size() else 0

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self._check_seq(seq_id)
        if self.cfg.n_pos_per_embd != 1:
            raise SpecAbort("seq_div() is only supported for n_pos_per_embd() == 1")
        cells = self.cells[self.seq_to_stream[seq_id]]
        if d == 1:
            return
        p0, p1 = norm_range(p0, p1)
        if p0 == p1:
            return
        if d == 0:
            raise SpecAbort("seq_div by 0")
        for i in range(cells.size()):
            if p0 <= cells.pos[i] < p1 and seq_id in cells.seq[i]:
                cells.pos_div(i, d)

    def seq_pos_min(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return self.cells[self.seq_to_stream[seq_id]].seq_pos_min(seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return self.cells[self.seq_to_stream[seq_id]].seq_pos_max(seq_id)

    def get_has_shift(self) -> bool:
        return any(c.has_shift for c in self.cells)

    def get_can_shift(self) -> bool:
        return self.cfg.can_shift

    # ------------------------------------------------------------------ update ---

    def init_update_status(self) -> Status:
        if not self.get_has_shift() and not self.sc_ssrc:
            return Status.NO_UPDATE
        return Status.SUCCESS

    def update(self) -> bool:
        """``init_update`` + ``apply``: pending stream copies, then the K-shift."""
        if self.init_update_status() == Status.NO_UPDATE:
            return False
        do_shift = self.get_has_shift()
        ssrc, sdst = self.sc_ssrc, self.sc_sdst
        self.sc_ssrc, self.sc_sdst = [], []
        for a, b in zip(ssrc, sdst):
            for li in range(len(self.cfg.layers)):
                self.k_data[li][b] = bytearray(self.k_data[li][a])
                self.v_data[li][b] = bytearray(self.v_data[li][a])
        if do_shift:
            if not self.get_can_shift():
                raise SpecAbort(
                    "The current KV cache / model configuration does not support K-shift"
                )
            if not self.cfg.rope_none:
                self.k_bytes_unmodelled = True  # RoPE would rotate K; the spec does not model it
            for c in self.cells:
                c.shift = [0] * c.size()
                c.has_shift = False
        return True

    def k_shift_input(self) -> list[int]:
        """``set_input_k_shift``: per cell (all streams), the pending shift (0 if empty)."""
        out = []
        for c in self.cells:
            out += [0 if c.is_empty(i) else c.shift[i] for i in range(c.size())]
        return out

    # ------------------------------------------------------------------ placing ---

    def find_slot(self, ub: UBatch, cont: bool = False) -> SlotInfo | None:
        n_tokens = ub.n_tokens
        n_seqs = 1
        if self.n_stream > 1:
            if n_tokens % ub.n_seqs_unq:
                raise SpecAbort("GGML_ASSERT(n_tokens % n_seqs_unq == 0)")
            n_seqs = ub.n_seqs_unq
            n_tokens = n_tokens // n_seqs
        res = SlotInfo()
        for s in range(n_seqs):
            seq_id = ub.seq_id_unq[s]
            if self.n_stream > 1:  # noqa: SIM102
                if ub.n_seq_id[s * n_tokens] != 1 or ub.seq_id[s * n_tokens][0] != seq_id:
                    raise SpecAbort("GGML_ASSERT: one sequence per stream block")
            strm = self.seq_to_stream[seq_id]
            res.strm.append(strm)
            idxs: list[int] = []
            res.idxs.append(idxs)
            cells = self.cells[strm]
            head_cur = self.heads[strm]
            if head_cur > cells.get_used() + 2 * n_tokens:
                head_cur = 0
            if n_tokens > cells.size():
                return None  # "n_tokens = %d > size = %u"
            n_tested = 0
            n_test = n_tokens if cont else 1
            while True:
                if head_cur + n_test > cells.size():
                    n_tested += cells.size() - head_cur
                    head_cur = 0
                    continue
                for _ in range(n_test):
                    idx = head_cur
                    head_cur += 1
                    n_tested += 1
                    can_use = cells.is_empty(idx)
                    if not can_use and len(cells.seq[idx]) == 1:
                        (seq_cell,) = tuple(cells.seq[idx])
                        if is_masked_swa(
                            self.cfg.n_swa,
                            self.cfg.swa_type,
                            cells.pos[idx],
                            cells.seq_pos_max(seq_cell) + 1,
                        ):
                            can_use = True
                    if can_use:
                        idxs.append(idx)
                    elif cont:
                        break
                if len(idxs) == n_tokens:
                    break
                if cont:
                    idxs.clear()
                if n_tested >= cells.size():
                    return None
            if len(idxs) < n_tokens:
                return None
        return res

    def apply_ubatch(self, sinfo: SlotInfo, ub: UBatch) -> None:
        max_rm: dict[int, int] = {}
        n = sinfo.size()
        assert ub.n_tokens == sinfo.n_stream() * n
        for s in range(sinfo.n_stream()):
            cells = self.cells[sinfo.strm[s]]
            for ii in range(n):
                i = s * n + ii
                idx = sinfo.idxs[s][ii]
                if not cells.is_empty(idx):
                    if len(cells.seq[idx]) != 1:
                        raise SpecAbort("overwriting a cell that is not single-sequence")
                    (sc,) = tuple(cells.seq[idx])
                    max_rm[sc] = max(max_rm.get(sc, -1), cells.pos[idx])
                    cells.rm(idx)
                cells.pos_set(idx, ub.pos[i])
                if ub.is_pos_2d() or ub.token is not None:
                    x = y = 0
                    if ub.is_pos_2d():
                        x = ub.pos[i + ub.n_tokens * 2]
                        y = ub.pos[i + ub.n_tokens]
                    tok = ub.token[i] if ub.token is not None else -1
                    cells.ext[idx] = (x, y, tok)
                for sid in ub.seq_id[i]:
                    cells.seq[idx].add(sid)
        for sc in sorted(max_rm):
            if max_rm[sc] == -1:
                continue
            cells = self.cells[self.seq_to_stream[sc]]
            if cells.seq_pos_min(sc) <= max_rm[sc]:
                self.seq_rm(sc, cells.seq_pos_min(sc), max_rm[sc] + 1)
        for s in range(sinfo.n_stream()):
            self.heads[sinfo.strm[s]] = sinfo.idxs[s][-1] + 1

    def prepare(self, ubatches: list[UBatch]) -> list[SlotInfo] | None:
        """Plan every ubatch by applying it, then undo the slot cells in reverse.

        As in the reference, only the slot cells and heads are restored: cells purged by
        ``apply_ubatch`` elsewhere stay purged (``prepare_purge_leaks``); with the option
        off, prepare is fully transactional.
        """
        backup = None if self.prepare_purge_leaks else copy.deepcopy((self.cells, self.heads))
        res: list[SlotInfo] = []
        states = []
        ok = True
        for ub in ubatches:
            sinfo = self.find_slot(ub, False)
            if sinfo is None:
                ok = False
                break
            res.append(sinfo)
            snaps = [self.cells[st].snapshot(sinfo.idxs[k]) for k, st in enumerate(sinfo.strm)]
            states.append((sinfo, list(self.heads), snaps))
            self.apply_ubatch(sinfo, ub)
        for sinfo, heads_old, snaps in reversed(states):
            for k, st in enumerate(sinfo.strm):
                self.cells[st].restore(sinfo.idxs[k], snaps[k])
                self.heads[st] = heads_old[st]
        if backup is not None:
            self.cells, self.heads = backup
        return res if ok else None

    def get_n_kv(self, sinfo: SlotInfo) -> int:
        p = max(self.cfg.n_pad, 256)
        result = 0
        for st in sinfo.strm:
            c = self.cells[st]
            result = max(min(c.size(), max(p, pad_to(c.used_max_p1(), p))), result)
        return result

    # ------------------------------------------------------------- graph inputs ---

    def k_idxs(self, sinfo: SlotInfo) -> list[int]:
        return [st * self.size() + i for st, idxs in zip(sinfo.strm, sinfo.idxs) for i in idxs]

    def v_idxs(self, sinfo: SlotInfo) -> list[int]:
        if not self.cfg.v_trans:
            return self.k_idxs(sinfo)
        nv = self.cfg.n_embd_v_gqa_max
        out = []
        for st, idxs in zip(sinfo.strm, sinfo.idxs):
            offs = st * self.size() * nv
            for i in idxs:
                out += [offs + j * self.size() + i for j in range(nv)]
        return out

    def kq_mask(self, ub: UBatch, n_kv: int, causal_attn: bool = True) -> list[list[list[float]]]:
        """``set_input_kq_mask``: [n_stream][n_tps][n_kv] of 0.0 / -inf (ALiBi: -|p0 - p1|)."""
        n_stream = 1 if self.cfg.unified else ub.n_seqs_unq
        n_tps = ub.n_tokens // n_stream
        if not causal_attn and self.cfg.non_causal_type == "swa_only":
            causal_attn = self.cfg.swa_type == SwaType.NONE
        swa = self.cfg.swa_type != SwaType.NONE
        pmin: dict[int, int] = {}
        for i in range(ub.n_tokens):
            sid = ub.seq_id[i][0]
            pmin[sid] = min(pmin.get(sid, I32_MAX), ub.pos[i])
        out = []
        for s in range(n_stream):
            rows = []
            for ii in range(n_tps):
                i = s * n_tps + ii
                sid = ub.seq_id[i][0]
                cells = self.cells[self.seq_to_stream[sid]]
                p1 = ub.pos[i]
                row = []
                for j in range(n_kv):
                    keep = True
                    if cells.is_empty(j) or sid not in cells.seq[j]:
                        keep = False
                    else:
                        p0 = cells.pos[j]
                        if causal_attn:
                            if p0 > p1:
                                keep = False
                            elif ub.is_pos_2d() and p0 == p1:
                                x1 = ub.pos[i + ub.n_tokens * 2]
                                y1 = ub.pos[i + ub.n_tokens]
                                ex, ey, _ = cells.ext[j]
                                if ey > y1 or (ey == y1 and ex > x1):
                                    keep = False
                        if keep and swa:
                            in_span = (
                                not causal_attn
                                and self.cfg.non_causal_type == "swa_full"
                                and p0 >= pmin[sid]
                            )
                            if not in_span and is_masked_swa(
                                self.cfg.n_swa, self.cfg.swa_type, p0, p1
                            ):
                                keep = False
                    if not keep:
                        row.append(float("-inf"))
                    elif self.cfg.use_alibi:
                        row.append(-float(abs(cells.pos[j] - p1)))
                    else:
                        row.append(0.0)
                rows.append(row)
            out.append(rows)
        return out

    # ---------------------------------------------------------------- tensor data ---

    def write_token_rows(self, li: int, global_row: int, k: bytes, v: bytes) -> None:
        """What the graph's ``set_rows`` does for one token: K and V rows of a cell."""
        st, i = divmod(global_row, self.size())
        kr, vr = self.k_row[li], self.v_row[li]
        self.k_data[li][st][i * kr : (i + 1) * kr] = k
        if vr:
            self.v_data[li][st][i * vr : (i + 1) * vr] = v

    # ------------------------------------------------------------------- state ---

    def state_write(self, w: Writer, seq_id: int = -1) -> None:
        cfg = self.cfg
        w.u32(self.n_stream)
        for s in range(self.n_stream):
            cells = self.cells[s]
            sel = []
            for i in range(cells.size()):
                add = not cells.is_empty(i) and (seq_id == -1 or seq_id in cells.seq[i])
                if add and seq_id != -1:
                    add = not is_masked_swa(
                        cfg.n_swa, cfg.swa_type, cells.pos[i], cells.seq_pos_max(seq_id)
                    )
                if add:
                    sel.append(i)
            w.u32(len(sel))
            if not sel:
                continue
            for i in sel:
                ids = [
                    c
                    for c in range(cfg.n_seq_max)
                    if (c == seq_id or seq_id == -1) and c in cells.seq[i]
                ]
                w.i32(cells.pos[i])
                w.u32(len(ids))
                if cfg.has_cell_ext:
                    x, y, tok = cells.ext[i]
                    w.i32(x)
                    w.i32(y)
                    w.i32(tok)
                for c in ids:
                    w.i32(c)
            self._write_data(w, s, sel)

    def _write_data(self, w: Writer, s: int, sel: list[int]) -> None:
        cfg = self.cfg
        w.u32(1 if cfg.v_trans else 0)
        w.u32(len(cfg.layers))
        for li in range(len(cfg.layers)):
            kr = self.k_row[li]
            w.i32(type_id(cfg.type_k))
            w.u64(kr)
            for i in sel:
                w.raw(self.k_data[li][s][i * kr : (i + 1) * kr])
        for li, ly in enumerate(cfg.layers):
            if not ly.has_v:
                continue
            vr = self.v_row[li]
            w.i32(type_id(cfg.type_v))
            if not cfg.v_trans:
                w.u64(vr)
                for i in sel:
                    w.raw(self.v_data[li][s][i * vr : (i + 1) * vr])
            else:
                el = type_size(cfg.type_v)
                w.u32(el)
                w.u32(ly.n_embd_v)
                for j in range(ly.n_embd_v):
                    for i in sel:
                        w.raw(self.v_data[li][s][i * vr + j * el : i * vr + (j + 1) * el])

    def state_read(self, r: Reader, seq_id: int = -1, atomic: bool = True) -> None:
        """Restore from ``r``. ``atomic``: a failure changes nothing (pymem's contract);
        otherwise the reference's failure path (``state_clear``) is applied too."""
        self._check_seq(seq_id, allow_neg1=True)
        work = copy.deepcopy(self)
        try:
            work._state_read(r, seq_id)
        except SpecStateError:
            if not atomic:
                self.__dict__.update(work.__dict__)
            raise
        self.__dict__.update(work.__dict__)

    def _state_read(self, r: Reader, seq_id: int) -> None:
        n_stream = r.u32("n_stream")
        if n_stream != self.n_stream:
            raise SpecStateError(f"n_stream mismatch ({n_stream} != {self.n_stream})")
        if seq_id == -1:
            self.clear(True)
        for s in range(n_stream):
            cell_count = r.u32("cell_count")
            if cell_count == 0:
                continue
            strm = s if seq_id == -1 else self.seq_to_stream[seq_id]
            sinfo: SlotInfo | None = None
            try:
                sinfo = self._read_meta(r, strm, cell_count, seq_id)
                self._read_data(r, strm, cell_count, sinfo)
            except SpecStateError:
                self._state_clear(seq_id, strm, sinfo)
                raise

    def _read_meta(self, r: Reader, strm: int, cell_count: int, dest: int) -> SlotInfo:
        cfg = self.cfg
        cells = self.cells[strm]
        if dest != -1:
            if cell_count > cells.size():
                raise SpecStateError("not enough cells in kv cache")
            self.seq_rm(dest, -1, -1)
            ub = ubatch_reserve(cell_count, 1, cfg.n_pos_per_embd)
            ub.seq_id_unq[0] = dest
            exts = []
            for i in range(cell_count):
                pos = r.i32("cell pos")
                n_seq_id = r.u32("cell n_seq_id")
                if n_seq_id != 1:
                    raise SpecStateError("invalid seq_id-agnostic kv cell")
                if cfg.has_cell_ext:
                    ext = (r.i32("ext x"), r.i32("ext y"), r.i32("ext tok"))
                    if cfg.n_pos_per_embd > 1:
                        ub.pos[i + ub.n_tokens] = ext[1]
                        ub.pos[i + ub.n_tokens * 2] = ext[0]
                    ub.token[i] = ext[2]  # type: ignore[index]
                    exts.append(ext)
                r.i32("cell seq_id")
                ub.pos[i] = pos
                ub.n_seq_id[i] = n_seq_id
                ub.seq_id[i] = [dest]
            sinfo = self.find_slot(ub, False)
            if sinfo is None:
                raise SpecStateError(f"failed to find {cell_count} available cells in kv cache")
            self.apply_ubatch(sinfo, ub)
            for i, ext in enumerate(exts):
                cells.ext[sinfo.idxs[0][i]] = ext
            return sinfo
        if cell_count > cells.size():
            raise SpecStateError("not enough cells in kv cache")
        for i in range(cell_count):
            pos = r.i32("cell pos")
            n_seq_id = r.u32("cell n_seq_id")
            cells.pos_set(i, pos)
            if cfg.has_cell_ext:
                cells.ext[i] = (r.i32("ext x"), r.i32("ext y"), r.i32("ext tok"))
            for _ in range(n_seq_id):
                sid = r.i32("cell seq_id")
                if sid < 0 or sid >= cfg.n_seq_max:
                    raise SpecStateError(
                        f"invalid seq_id, {sid} is out of range [0, {cfg.n_seq_max})"
                    )
                cells.seq[i].add(sid)
        self.heads[strm] = 0
        return SlotInfo(strm=[strm], idxs=[list(range(cell_count))])

    def _read_data(self, r: Reader, strm: int, cell_count: int, sinfo: SlotInfo) -> None:
        cfg = self.cfg
        idxs = sinfo.idxs[0]
        v_trans = r.u32("v_trans")
        n_layer = r.u32("n_layer")
        if n_layer != len(cfg.layers):
            raise SpecStateError(f"mismatched layer count ({n_layer} instead of {len(cfg.layers)})")
        if cell_count > self.size():
            raise SpecStateError("not enough cells in kv cache to restore state")
        if bool(v_trans) != cfg.v_trans:
            raise SpecStateError("incompatible V transposition")
        for li in range(len(cfg.layers)):
            kr = self.k_row[li]
            if r.i32("k type") != type_id(cfg.type_k):
                raise SpecStateError(f"mismatched key type (layer {cfg.layers[li].il})")
            if r.u64("k row size") != kr:
                raise SpecStateError(f"mismatched key row size (layer {cfg.layers[li].il})")
            for i in idxs:
                self.k_data[li][strm][i * kr : (i + 1) * kr] = r.raw(kr, "k rows")
        for li, ly in enumerate(cfg.layers):
            if not ly.has_v:
                continue
            vr = self.v_row[li]
            if r.i32("v type") != type_id(cfg.type_v):
                raise SpecStateError(f"mismatched value type (layer {ly.il})")
            if not cfg.v_trans:
                if r.u64("v row size") != vr:
                    raise SpecStateError(f"mismatched value row size (layer {ly.il})")
                for i in idxs:
                    self.v_data[li][strm][i * vr : (i + 1) * vr] = r.raw(vr, "v rows")
            else:
                el = type_size(cfg.type_v)
                if r.u32("v element size") != el:
                    raise SpecStateError(f"mismatched value element size (layer {ly.il})")
                if r.u32("n_embd_v_gqa") != ly.n_embd_v:
                    raise SpecStateError(f"mismatched GQA embedding size (layer {ly.il})")
                for j in range(ly.n_embd_v):
                    for i in idxs:
                        self.v_data[li][strm][i * vr + j * el : i * vr + (j + 1) * el] = r.raw(
                            el, "v elements"
                        )

    def _state_clear(self, seq_id: int, strm: int, sinfo: SlotInfo | None) -> None:
        """The reference's failure path: drop the sequence and zero the rows it took."""
        if seq_id == -1:
            self.clear(True)
            return
        self.seq_rm(seq_id, -1, -1)
        if sinfo is None:
            return
        for li in range(len(self.cfg.layers)):
            kr, vr = self.k_row[li], self.v_row[li]
            for i in sinfo.idxs[0]:
                self.k_data[li][strm][i * kr : (i + 1) * kr] = bytes(kr)
                self.v_data[li][strm][i * vr : (i + 1) * vr] = bytes(vr)

    def state_clear_seq(self, seq_id: int) -> None:
        """``state_clear(seq_id)`` (the hybrid's undo): drop the seq, zero its own cells."""
        if seq_id == -1:
            self.clear(True)
            return
        strm = self.seq_to_stream[seq_id]
        cells = self.cells[strm]
        own = [i for i in range(cells.size()) if seq_id in cells.seq[i] and len(cells.seq[i]) == 1]
        self._state_clear(seq_id, strm, SlotInfo(strm=[strm], idxs=[own]))


class KVContext:
    """``llama_kv_cache_context`` for a batch: slot plans, ``next`` and ``apply``."""

    def __init__(self, kv: KVCache, sinfos: list[SlotInfo], ubatches: list[UBatch]) -> None:
        self.kv = kv
        self.sinfos = sinfos
        self.ubatches = ubatches
        self.i_cur = 0
        self.n_kv = kv.size()

    def apply(self) -> None:
        self.kv.apply_ubatch(self.sinfos[self.i_cur], self.ubatches[self.i_cur])
        self.n_kv = self.kv.get_n_kv(self.sinfos[self.i_cur])

    def next(self) -> bool:
        self.i_cur += 1
        return self.i_cur < len(self.ubatches)

    @property
    def sinfo(self) -> SlotInfo:
        return self.sinfos[self.i_cur]
