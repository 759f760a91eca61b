"""The prefix cache's contract, stated naively over the spec memories.

pymem's ``PrefixCache`` (pymem/reuse/prefix_cache.py) keeps, per token prefix, what makes
the prefix exactly reusable: the cells of live sequences and checkpoints (in RAM, or
spilled to disk). Here the same contract is written from its documentation with no code
shared with pymem: what each sequence holds is a tuple of tokens, the checkpoints are a
plain list, a lookup enumerates every way back and keeps the exact ones. The harness
(tests/spec/harness.py) runs both and compares lookups, attaches, the memory afterwards,
the stored entries, their tiers and the eviction order.

What a sequence holds. ``held[s]``: the tokens the cache was told ``s`` holds (``attach``
and ``record``); ``s`` is *current* while the memory agrees (``seq_pos_max(s) ==
len(held[s]) - 1``). The runtime follows the documented protocol: after every operation
behind the cache's back it calls ``record`` or ``release`` (the harness does, for every
sequence an operation can change).

Lookup of request ``T`` (``n`` tokens) for sequence ``d`` (-1: none). ``n_common``: the
longest common prefix of ``T`` with anything cached (a held sequence, a checkpoint's
prefix). The ways back, each reusing ``L`` tokens, ``0 < L <= n - 1`` (the last token is
always decoded, for its logits), and exact when:

* ``live/continue``   ``d`` is current and holds exactly ``T[:L]``;
* ``live/trim``, ``live/snapshot``  ``d`` is current, holds ``T[:L]`` and more, the
                      rollback plan to ``L`` (tests/spec/reuse.py) is a trim or a snapshot,
                      and every sliding window of ``d`` keeps its cell at ``L - 1`` (a
                      window that starts at ``L``, a new chunk, needs nothing before it,
                      but the cut sequence would end before ``L - 1``);
* ``live/copy``       another current sequence ``s`` holds exactly ``T[:L]`` (its whole
                      state is copied; not while a recurrent rollback is pending on
                      ``s``: ``seq_cp`` copies the state before it), or holds ``T[:L]``
                      and more while the memory has no recurrent part and every sliding
                      window of ``s`` still holds what a token at ``L`` attends to (and
                      its cell at ``L - 1``);
* ``checkpoint|disk / restore``  a stored checkpoint of ``T[:L]`` (position ``L - 1``):
                      a memory whose checkpoint is the whole sequence state (no
                      full-attention cache is left out of a ``PARTIAL_ONLY`` state)
                      restores it into ``d`` emptied first; the others need a current
                      sequence holding ``T[:L]`` whose full-attention cells are kept
                      (``d`` itself: restore; another: ``copy``, its cells copied first),
                      and whose trimmed sliding-window cells (a hybrid with a sliding
                      attention cache: the checkpoint leaves them out) still hold the
                      window of a token at ``L`` (tests/spec/reuse.py's ``restorable``);
* ``none/recompute``  ``L = 0``.

``lookup`` must return the longest (``n_reuse``), and among equally long ways one of the
cheapest (``RANK``, the documented tie-break). ``attach`` must carry one out and leave
``d`` holding exactly ``T[:resume_from]`` (``holds_exactly``: every full-attention cell
of ``d`` is the token of ``T`` at its position, decoded there, one per position; every
sliding-window cell too, the window of a token at ``resume_from`` complete; the recurrent
state is the fold of ``T[:resume_from]`` from zero). A way the memory refuses when it is
carried out (a restore that finds no free cell, a disk file that fails its checks) drops
its entry and the next best way is taken; the harness checks that each refusal pymem
reports is one the spec makes too.

Checkpoints (for memories with a recurrent part or a sliding window only), by the policy:
on ``attach`` of a prompt (``before_last_turn``) or of a draft that the snapshot planes
cannot undo, one at ``resume_from - 1`` right away; then the positions of the request
``[resume, n)`` at a branch point (``n_common - 1`` when the request leaves the cache
there), before the last token (``n - 2``), and at every ``k * interval - 1``; each taken
when ``record`` reports that position. One entry per prefix. A memory whose checkpoints
need a live sequence drops a checkpoint as soon as no tracked sequence holds its prefix.

Budget: checkpoint bytes in RAM never exceed ``budget``. A new checkpoint that does not fit
evicts, one at a time, the RAM entry with the fewest tracked sequences holding its prefix,
then the least recently used (taken or restored); one larger than the budget is evicted at
once. Evicted entries of a draft, or with no disk tier (or a disk budget of 0), are
dropped; the others move to disk (this harness gives the disk room for all of them).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from . import reuse as sreuse
from .common import SpecAbort, SpecStateError, SwaType
from .decode import rs_step

# equally long ways: cheapest first (the prefix cache's documented tie-break)
RANK = {
    ("live", "continue"): 0,
    ("live", "trim"): 1,
    ("live", "snapshot"): 2,
    ("checkpoint", "restore"): 3,
    ("live", "copy"): 4,
    ("checkpoint", "copy"): 5,
    ("disk", "restore"): 6,
    ("disk", "copy"): 7,
    ("none", "recompute"): 8,
}


def lcp(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Policy:
    interval: int = 4
    before_last_turn: bool = True
    before_last_token: bool = True
    branch_points: bool = True
    n_batch: int = 8


@dataclass(frozen=True)
class Way:
    """One exact way to reuse ``n_reuse`` tokens (see the module docstring)."""

    n_reuse: int
    source: str
    how: str
    src: int  # the live sequence whose cells are used (-1: none)
    pos: int  # the checkpoint's position (-1: none)


@dataclass(eq=False)
class Entry:
    tokens: tuple  # the prefix: positions 0 .. len - 1
    ckpt: sreuse.SpecCheckpoint
    last_used: int
    durable: bool
    tier: str = "ram"
    damaged: bool = False  # its disk file was corrupted: reading it back fails

    @property
    def pos(self) -> int:
        return len(self.tokens) - 1

    @property
    def nbytes(self) -> int:
        return len(self.ckpt.blob)


@dataclass
class Counters:
    taken: int = 0
    evicted: int = 0
    spilled: int = 0
    refused: int = 0


def _window_ok(kv, s: int, length: int) -> bool:
    """Whether sliding-window cache ``kv`` still holds ``s``'s window of a token at
    ``length`` and its cell at ``length - 1`` (a sequence cut there keeps its last
    position; a window starting at ``length`` itself would otherwise leave it empty)."""
    start = min(sreuse.window_start(kv.cfg.n_swa, kv.cfg.swa_type, length), length - 1)
    have = kv.seq_pos_min(s)
    return 0 <= have <= start


class SpecPrefixCache:
    """The contract's state: what each sequence holds, the entries, a use clock.

    The spec memory is passed to every call (the harness may replace its object).
    """

    def __init__(self, policy: Policy, budget: int, disk: str) -> None:
        assert disk in ("none", "keep", "drop")
        self.policy = policy
        self.budget = budget
        self.disk = disk
        self.held: dict[int, tuple] = {}
        self.pending: dict[int, set[int]] = {}
        self.ram: list[Entry] = []  # in the order they entered RAM
        self.on_disk: list[Entry] = []  # in the order they were spilled
        self.clock = 0
        self.n = Counters()

    # --- what the memory is ----------------------------------------------------------
    @staticmethod
    def swa_parts(mem) -> list:
        return [kv for kv in mem.kv_parts.values() if kv.cfg.swa_type != SwaType.NONE]

    def needs_checkpoints(self, mem) -> bool:
        return mem.rs is not None or bool(self.swa_parts(mem))

    @staticmethod
    def self_sufficient(mem) -> bool:
        return not sreuse.full_attention_parts(mem)

    @staticmethod
    def unified(mem) -> bool:
        return all(kv.n_stream == 1 for kv in mem.kv_parts.values())

    # --- bookkeeping -----------------------------------------------------------------
    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def entries(self) -> list[Entry]:
        return self.ram + self.on_disk

    def entry_of(self, tokens: tuple) -> Entry | None:
        for e in self.entries():
            if e.tokens == tokens:
                return e
        return None

    def current(self, mem, s: int) -> bool:
        return s in self.held and mem.seq_pos_max(s) == len(self.held[s]) - 1

    def shared(self, e: Entry) -> int:
        """Tracked sequences holding ``e``'s prefix."""
        n = len(e.tokens)
        return sum(1 for h in self.held.values() if h[:n] == e.tokens)

    def eviction_order(self) -> list[Entry]:
        return sorted(self.ram, key=lambda e: (self.shared(e), e.last_used))

    def drop(self, e: Entry) -> None:
        if e in self.ram:
            self.ram.remove(e)
        if e in self.on_disk:
            self.on_disk.remove(e)

    def drop_orphans(self, mem) -> None:
        if self.self_sufficient(mem):
            return
        for e in list(self.entries()):
            if self.shared(e) == 0:
                self.drop(e)

    def set_held(self, mem, s: int, toks: tuple) -> None:
        self.held[s] = toks
        self.drop_orphans(mem)

    def release(self, mem, s: int) -> None:
        self.pending.pop(s, None)
        self.held.pop(s, None)
        self.drop_orphans(mem)

    def record(self, mem, s: int, toks: tuple) -> None:
        if not toks:
            self.release(mem, s)
            return
        assert mem.seq_pos_max(s) == len(toks) - 1
        if self.held.get(s) == toks:
            return
        self.set_held(mem, s, toks)
        p = len(toks) - 1
        pending = self.pending.get(s, set())
        iv = self.policy.interval
        want = p in pending or (iv > 0 and (p + 1) % iv == 0)
        pending.discard(p)
        if want and self.needs_checkpoints(mem) and self.entry_of(toks) is None:
            self.take(mem, s, durable=True)

    def take(self, mem, s: int, durable: bool) -> None:
        ck = sreuse.checkpoint(mem, s)
        assert ck.pos == len(self.held[s]) - 1
        e = Entry(self.held[s], ck, self.tick(), durable)
        self.n.taken += 1
        if e.nbytes > self.budget:
            self.evict(e)
            return
        while sum(x.nbytes for x in self.ram) + e.nbytes > self.budget:
            self.evict(self.eviction_order()[0])
        self.ram.append(e)

    def evict(self, e: Entry) -> None:
        self.n.evicted += 1
        if e in self.ram:
            self.ram.remove(e)
        if self.disk != "keep" or not e.durable:
            self.drop(e)
            return
        e.tier = "disk"
        self.on_disk.append(e)
        self.n.spilled += 1

    # --- lookup ----------------------------------------------------------------------
    def ways(self, mem, toks: tuple, d: int) -> tuple[int, list[Way]]:
        """``(n_common, every exact way)`` for request ``toks`` and sequence ``d``."""
        n = len(toks)
        cap = n - 1
        known = [*self.held.values(), *(e.tokens for e in self.entries())]
        n_common = max((lcp(toks, k) for k in known), default=0)
        out = [Way(0, "none", "recompute", -1, -1)]
        live = [s for s in sorted(self.held) if self.current(mem, s)]
        swa = self.swa_parts(mem)
        if d in live:
            k = min(lcp(toks, self.held[d]), cap)
            if k > 0:
                kind = sreuse.plan_rollback(mem, d, k, [])[0]
                if kind == "none":
                    out.append(Way(k, "live", "continue", d, -1))
                elif kind in ("trim", "snapshot") and all(_window_ok(kv, d, k) for kv in swa):
                    out.append(Way(k, "live", kind, d, -1))
        for s in live:
            if s == d:
                continue
            h = self.held[s]
            k = lcp(toks, h)
            pending = mem.rs is not None and mem.rs.rs_idx[s] != 0
            if k == len(h) and 0 < k <= cap and not pending:
                out.append(Way(k, "live", "copy", s, -1))  # its whole state
            k = min(k, cap)
            if k > 0 and mem.rs is None and all(_window_ok(kv, s, k) for kv in swa):
                out.append(Way(k, "live", "copy", s, -1))
        trimmed_swa = [
            kv for kv in sreuse.full_attention_parts(mem) if kv.cfg.swa_type != SwaType.NONE
        ]
        for e in self.entries():
            k = len(e.tokens)
            if k > cap or toks[:k] != e.tokens:
                continue
            source = "checkpoint" if e.tier == "ram" else "disk"
            if self.self_sufficient(mem):
                out.append(Way(k, source, "restore", -1, k - 1))
                continue
            for s in live:
                if self.held[s][:k] != e.tokens:
                    continue
                if not all(_window_ok(kv, s, k) for kv in trimmed_swa):
                    continue
                out.append(Way(k, source, "restore" if s == d else "copy", s, k - 1))
        return n_common, out

    @staticmethod
    def best(ways: list[Way]) -> list[Way]:
        """The longest ways, cheapest first."""
        top = max(w.n_reuse for w in ways)
        return sorted((w for w in ways if w.n_reuse == top), key=lambda w: RANK[w.source, w.how])

    # --- attach ----------------------------------------------------------------------
    def carry_out(self, mem, d: int, toks: tuple, way: Way) -> int:
        """Make ``d`` hold ``toks[:way.n_reuse]`` with the spec's own operations."""
        if way.how == "continue":
            return way.n_reuse
        if way.how in ("trim", "snapshot"):
            plan = sreuse.plan_rollback(mem, d, way.n_reuse, [])
            assert plan[0] == way.how, plan
            return sreuse.apply_rollback(mem, d, way.n_reuse, plan)
        if way.how == "recompute":
            self._clear(mem, d)
            return 0
        entry = self.entry_of(toks[: way.pos + 1]) if way.pos >= 0 else None
        if entry is None:
            self._copy(mem, way.src, d, way.n_reuse, trim=True)
            return way.n_reuse
        if entry.damaged:
            raise SpecStateError(f"the file of the entry at {entry.pos} is damaged")
        if way.src < 0:
            self._clear(mem, d)
        elif way.src != d:
            self._copy(mem, way.src, d, way.n_reuse, trim=False)
        sreuse.restore(mem, d, entry.ckpt)
        entry.last_used = self.tick()
        return way.n_reuse

    @staticmethod
    def _clear(mem, s: int) -> None:
        """``s`` holds nothing afterwards (a ``seq_rm`` when any part holds it). A
        recurrent state that ``seq_add`` moved below position 0 stays: ``seq_rm(s, -1,
        -1)`` does not reach it, in the reference too (the harness stops checking
        recurrent states once one exists)."""
        held = [kv.seq_pos_max(s) for kv in mem.kv_parts.values()]
        if mem.rs is not None:
            held.append(mem.rs.seq_pos_max(s))
        if any(p >= 0 for p in held):
            mem.seq_rm(s, -1, -1)

    def _copy(self, mem, src: int, dst: int, length: int, trim: bool) -> None:
        """``dst`` gets ``src``'s cells of ``[0, length)``: in one stream a ranged seq_cp;
        else (or for a whole sequence) the whole sequence, the stream copy applied, then
        the rest trimmed; a copy the memory refuses goes through the state bytes."""
        self._clear(mem, dst)
        whole = length == len(self.held[src])
        saved = copy.deepcopy(mem)
        try:
            if self.unified(mem) and not whole:
                mem.seq_cp(src, dst, 0, length)
            else:
                mem.seq_cp(src, dst, -1, -1)
                mem.update()
        except SpecAbort:
            mem.__dict__.update(saved.__dict__)
            mem.state_read(mem.state_write(src), dst)
        cut = trim and not whole and mem.seq_pos_max(dst) >= length
        if cut and not mem.seq_rm(dst, length, -1):
            raise SpecStateError(f"copy {src} -> {dst}: trim to {length} refused")

    def attach(self, mem, d: int, toks: tuple, kind: str, way: Way, n_common: int):
        """After ``way`` (one of ``ways``) was chosen: carry it out, track ``d``, plan
        the request's checkpoints. Returns ``(resume, chunks, checkpoints)``."""
        resume = self.carry_out(mem, d, toks, way)
        if resume > 0:
            self.set_held(mem, d, toks[:resume])
        else:
            self.release(mem, d)
        want = self.plan_checkpoints(mem, d, toks, resume, n_common, kind)
        n = len(toks)
        cuts = sorted({resume, n, *(p + 1 for p in want if resume < p + 1 < n)})
        chunks = []
        for a, b in itertools.pairwise(cuts):
            p = a
            while p < b:
                chunks.append((p, min(p + self.policy.n_batch, b)))
                p += self.policy.n_batch
        return resume, tuple(chunks), tuple(sorted(want))

    def plan_checkpoints(
        self, mem, d: int, toks: tuple, resume: int, n_common: int, kind: str
    ) -> set[int]:
        self.pending.pop(d, None)
        if not self.needs_checkpoints(mem):
            return set()
        pol, n = self.policy, len(toks)
        n_rs_seq = mem.rs.n_rs_seq if mem.rs is not None else 0
        if kind == "prompt":
            now = pol.before_last_turn
        elif kind == "draft":
            now = bool(self.swa_parts(mem)) or n - resume > n_rs_seq
        else:
            now = False
        if now and resume > 0 and self.entry_of(toks[:resume]) is None:
            self.take(mem, d, durable=kind != "draft")
        want: set[int] = set()
        if kind == "prompt" and pol.branch_points and resume < n_common < n:
            want.add(n_common - 1)
        if kind == "prompt" and pol.before_last_token and n >= 2:
            want.add(n - 2)
        if pol.interval > 0:
            want.update(p for p in range(n) if (p + 1) % pol.interval == 0)
        want = {p for p in want if resume <= p < n}
        self.pending[d] = want
        return want

    def restore_entry(self, mem, d: int, pos: int) -> int:
        """Restore the entry of ``held[d][:pos + 1]`` into ``d``'s own cells."""
        e = self.entry_of(self.held.get(d, ())[: pos + 1]) if d in self.held else None
        if e is None or e.pos != pos:
            raise SpecAbort(f"restore_entry: no entry at {pos} on {d}'s path")
        if e.damaged:
            raise SpecStateError(f"the file of the entry at {pos} is damaged")
        resume = sreuse.restore(mem, d, e.ckpt)
        self.set_held(mem, d, self.held[d][:resume])
        e.last_used = self.tick()
        return resume


# --- exactness: what a sequence holds, read back from the memory --------------------------


@dataclass
class RowIndex:
    """K rows written by decodes: ``(part, row bytes) -> (pos, token)``. The harness adds
    every token it decodes, so a cell's K row says which token was decoded there."""

    rows: dict = field(default_factory=dict)

    def add(self, part: str, row: bytes, pos: int, tok: int) -> None:
        self.rows[part, row] = (pos, tok)


def _fold(width: int, kind: str, il: int, toks: tuple) -> bytes:
    state = bytes(width)
    for p, t in enumerate(toks):
        state = rs_step(state, kind, il, p, t)
    return state


def holds_exactly(mem, s: int, toks: tuple, index: RowIndex, check_states: bool = True) -> str:
    """Why sequence ``s`` does not hold exactly ``toks`` at positions ``0..len - 1``
    (as a decode of them from scratch would), or "" when it does. ``check_states``:
    compare the recurrent state with the fold of the tokens (the harness turns it off
    once a decode may have started from a stale cell, see harness.py)."""
    n = len(toks)
    for name, kv in mem.kv_parts.items():
        kr = kv.k_row[0]
        seen: dict[int, int] = {}
        for st, cells in enumerate(kv.cells):
            for i in range(cells.size()):
                if cells.pos[i] < 0 or s not in cells.seq[i]:
                    continue
                p = cells.pos[i]
                row = bytes(kv.k_data[0][st][i * kr : (i + 1) * kr])
                got = index.rows.get((name, row))
                if p >= n or got != (p, toks[p]):
                    return f"{name} cell {st}:{i} at {p} holds {got} (pos, token), not {p}, {toks[p] if p < n else None}"
                seen[p] = seen.get(p, 0) + 1
        if any(c > 1 for c in seen.values()):
            return f"{name}: a position held twice: {sorted(p for p, c in seen.items() if c > 1)}"
        if kv.cfg.swa_type == SwaType.NONE:
            need = set(range(n))
        else:  # the window of a token at n, and the last position
            need = set(range(sreuse.window_start(kv.cfg.n_swa, kv.cfg.swa_type, n), n))
            need |= {n - 1} if n else set()
        if not need <= set(seen):
            return f"{name}: positions {sorted(need - set(seen))} missing"
    rs = mem.rs
    if rs is not None and check_states:
        tail = rs.cells[s].tail if 0 <= s < rs.size else -1
        if n == 0:
            return "" if tail < 0 else f"recurrent: a state at {rs.cells[tail].pos}, none wanted"
        if tail < 0 or rs.cells[tail].pos != n - 1:
            return f"recurrent: tail {tail} not at position {n - 1}"
        c = rs.cells[tail]
        row = rs.rs_idx[s] * rs.size + (c.src if c.src >= 0 else tail)
        for il in rs.cfg.layers:
            for kind, data, w in (("r", rs.r_data, rs.r_row), ("s", rs.s_data, rs.s_row)):
                if bytes(data[il][row * w : (row + 1) * w]) != _fold(w, kind, il, toks):
                    return f"recurrent: layer {il} {kind} state is not the fold of the tokens"
    return ""
