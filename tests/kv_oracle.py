"""A slow, literal pure-Python model of the reference KV cache metadata.

Cell by cell and token by token, as ``llama_kv_cells`` / ``llama_kv_cache`` do it (loops,
Python sets), so that pymem's vectorised code can be checked against it on random
operation sequences. Only metadata: positions, sequence sets, shifts, heads, and the
KQ mask (including the reference's row-reuse shortcut).
"""

from __future__ import annotations

import math

from spec.common import is_masked_swa

from pymem.spec import SWAType

INT32_MAX = 2**31 - 1


class OCells:
    def __init__(self, size: int) -> None:
        self.pos = [-1] * size
        self.shift = [0] * size
        self.seq: list[set[int]] = [set() for _ in range(size)]
        self.has_shift = False

    @property
    def size(self) -> int:
        return len(self.pos)

    def used(self) -> int:
        return sum(p != -1 for p in self.pos)

    def used_max_p1(self) -> int:
        for i in range(self.size - 1, -1, -1):
            if self.pos[i] != -1:
                return i + 1
        return 0

    def seq_pos_min(self, s: int) -> int:
        ps = [self.pos[i] for i in range(self.size) if s in self.seq[i]]
        return min(ps) if ps else -1

    def seq_pos_max(self, s: int) -> int:
        ps = [self.pos[i] for i in range(self.size) if s in self.seq[i]]
        return max(ps) if ps else -1

    def rm(self, i: int) -> None:
        self.pos[i] = -1
        self.shift[i] = 0
        self.seq[i] = set()

    def seq_rm(self, i: int, s: int) -> bool:
        self.seq[i].discard(s)
        if not self.seq[i]:
            self.rm(i)
            return True
        return False


class OKV:
    def __init__(
        self,
        size: int,
        n_seq_max: int,
        unified: bool = True,
        n_swa: int = 0,
        swa_type: SWAType = SWAType.NONE,
    ) -> None:
        self.n_stream = 1 if unified else n_seq_max
        self.size = size
        self.n_seq_max = n_seq_max
        self.cells = [OCells(size) for _ in range(self.n_stream)]
        self.heads = [0] * self.n_stream
        self.n_swa = n_swa
        self.swa_type = swa_type
        self.seq_to_stream = list(range(self.n_stream)) if self.n_stream > 1 else [0] * 256

    # --- seq ops -------------------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        p0 = max(p0, 0)
        p1 = INT32_MAX if p1 < 0 else p1
        streams = [self.seq_to_stream[seq_id]] if seq_id >= 0 else range(self.n_stream)
        for st in streams:
            c = self.cells[st]
            new_head = c.size
            for i in range(c.size):
                if not (c.pos[i] >= p0 and c.pos[i] < p1):
                    continue
                if seq_id >= 0:
                    if seq_id in c.seq[i] and c.seq_rm(i, seq_id) and new_head == c.size:
                        new_head = i
                else:
                    c.rm(i)
                    if new_head == c.size:
                        new_head = i
            if new_head != c.size and new_head < self.heads[st]:
                self.heads[st] = new_head
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        s0, s1 = self.seq_to_stream[src], self.seq_to_stream[dst]
        if s0 == s1:
            if src == dst:
                return
            p0 = max(p0, 0)
            p1 = INT32_MAX if p1 < 0 else p1
            c = self.cells[s0]
            for i in range(c.size):
                if p0 <= c.pos[i] < p1 and src in c.seq[i]:
                    c.seq[i].add(dst)
            return
        a, b = self.cells[s0], self.cells[s1]
        self.cells[s1] = OCells(self.size)
        b = self.cells[s1]
        for i in range(a.size):
            if src in a.seq[i]:
                b.pos[i] = a.pos[i]
                b.shift[i] = a.shift[i]
                b.seq[i] = {dst}
                if a.shift[i]:
                    b.has_shift = True
        self.heads[s1] = self.heads[s0]

    def seq_keep(self, seq_id: int) -> None:
        st = self.seq_to_stream[seq_id]
        c = self.cells[st]
        new_head = c.size
        for i in range(c.size):
            if seq_id in c.seq[i]:
                c.seq[i] = {seq_id}
            elif c.seq[i]:
                c.rm(i)
                if new_head == c.size:
                    new_head = i
        if new_head != c.size and new_head < self.heads[st]:
            self.heads[st] = new_head

    def seq_add(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        st = self.seq_to_stream[seq_id]
        c = self.cells[st]
        if d == 0:
            return
        p0 = max(p0, 0)
        p1 = INT32_MAX if p1 < 0 else p1
        if p0 == p1:
            return
        new_head = c.size
        for i in range(c.size):
            if p0 <= c.pos[i] < p1 and seq_id in c.seq[i]:
                c.pos[i] += d
                c.shift[i] += d
                c.has_shift = True
                if c.pos[i] < 0:
                    c.rm(i)
                    if new_head == c.size:
                        new_head = i
        self.heads[st] = new_head if new_head != c.size else 0

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        c = self.cells[self.seq_to_stream[seq_id]]
        if d == 1:
            return
        p0 = max(p0, 0)
        p1 = INT32_MAX if p1 < 0 else p1
        if p0 == p1:
            return
        for i in range(c.size):
            if p0 <= c.pos[i] < p1 and seq_id in c.seq[i]:
                old = c.pos[i]
                c.pos[i] = old // d
                c.shift[i] += c.pos[i] - old  # pymem's sign (the reference: old - new)
                c.has_shift = True

    # --- placement --------------------------------------------------------------------
    def find_slot(
        self, tokens: list[tuple[int, list[int]]], n_seqs_unq: list[int], cont: bool
    ) -> list[tuple[int, list[int]]] | None:
        """``tokens``: (pos, seq ids) in ubatch order; returns [(stream, idxs)] or None."""
        n_tokens = len(tokens)
        n_seqs = 1
        if self.n_stream > 1:
            n_seqs = len(n_seqs_unq)
            n_tokens //= n_seqs
        res = []
        for s in range(n_seqs):
            st = self.seq_to_stream[n_seqs_unq[s]]
            c = self.cells[st]
            head = self.heads[st]
            if head > c.used() + 2 * n_tokens:
                head = 0
            if n_tokens > c.size:
                return None
            idxs: list[int] = []
            n_tested = 0
            n_test = n_tokens if cont else 1
            while True:
                if head + n_test > c.size:
                    n_tested += c.size - head
                    head = 0
                    continue
                for _ in range(n_test):
                    idx = head
                    head += 1
                    n_tested += 1
                    can_use = c.pos[idx] == -1
                    if not can_use and len(c.seq[idx]) == 1:
                        (sid,) = c.seq[idx]
                        if is_masked_swa(
                            self.n_swa, self.swa_type, c.pos[idx], c.seq_pos_max(sid) + 1
                        ):
                            can_use = True
                    if can_use:
                        idxs.append(idx)
                    elif cont:
                        break
                if len(idxs) == n_tokens:
                    break
                if cont:
                    idxs = []
                if n_tested >= c.size:
                    return None
            res.append((st, idxs))
        return res

    def apply(self, slot: list[tuple[int, list[int]]], tokens: list[tuple[int, list[int]]]) -> None:
        max_rm: dict[int, int] = {}
        n_per = len(slot[0][1])
        for s, (st, idxs) in enumerate(slot):
            c = self.cells[st]
            for ii, idx in enumerate(idxs):
                pos, seqs = tokens[s * n_per + ii]
                if c.pos[idx] != -1:
                    (sid,) = c.seq[idx]
                    max_rm[sid] = max(max_rm.get(sid, -1), c.pos[idx])
                    c.rm(idx)
                c.pos[idx] = pos
                c.seq[idx] = set(seqs)
        for sid in sorted(max_rm):
            c = self.cells[self.seq_to_stream[sid]]
            if c.seq_pos_min(sid) <= max_rm[sid]:
                self.seq_rm(sid, c.seq_pos_min(sid), max_rm[sid] + 1)
        for st, idxs in slot:
            self.heads[st] = idxs[-1] + 1

    # --- mask -------------------------------------------------------------------------
    def kq_mask(
        self,
        tokens: list[tuple[int, list[int]]],
        n_stream: int,
        n_kv: int,
        causal: bool,
        alibi: bool = False,
    ) -> list[list[list[float]]]:
        """The reference algorithm, including its per-sequence row reuse."""
        n_tokens = len(tokens)
        n_tps = n_tokens // n_stream
        seq_pos_min: dict[int, int] = {}
        for pos, seqs in tokens:
            seq_pos_min[seqs[0]] = min(seq_pos_min.get(seqs[0], INT32_MAX), pos)
        data = [[[0.0] * n_kv for _ in range(n_tps)] for _ in range(n_stream)]
        swa = self.swa_type != SWAType.NONE
        for s in range(n_stream):
            seq_srct: dict[int, int] = {}
            seq_idxs: dict[int, list[int]] = {}
            for ii in range(n_tps):
                i = s * n_tps + ii
                p1, seqs = tokens[i]
                sid = seqs[0]
                c = self.cells[self.seq_to_stream[sid]]
                prev = False
                idxs = seq_idxs.setdefault(sid, [])
                row = data[s][ii]
                if not alibi:
                    if sid in seq_srct:
                        row[:] = data[s][seq_srct[sid]]
                        prev = True
                    else:
                        idxs.clear()
                        seq_srct[sid] = ii
                jj = 0
                while jj < n_kv:
                    j = jj
                    if not alibi and prev:
                        if jj >= len(idxs):
                            break
                        j = idxs[jj]
                    jj += 1
                    keep = True
                    if c.pos[j] == -1 or sid not in c.seq[j]:
                        keep = False
                    else:
                        p0 = c.pos[j]
                        if not alibi and not prev and p0 + self.n_swa + 32 >= seq_pos_min[sid]:
                            idxs.append(j)
                        if causal and p0 > p1:
                            keep = False
                        if keep and swa and is_masked_swa(self.n_swa, self.swa_type, p0, p1):
                            keep = False
                    if not keep:
                        row[j] = -math.inf
                    else:
                        row[j] = float(-abs(c.pos[j] - p1)) if alibi else 0.0
        return data
