"""The prefix cache: decode only what no cached state can supply, on every memory type.

Why: when a request's history diverges from what a sequence holds (a regenerated answer,
an edited turn, a new session on the same system prompt, rejected draft tokens),
attention K/V can be trimmed to the common prefix but a recurrent state and a sliding
window cannot, and runtimes then decode the whole prompt again. The cache keeps, per
token prefix, what makes the prefix exactly reusable and picks the cheapest way back::

    source        what it supplies                         how a sequence gets it
    live          a sequence's own cells (its held tokens)  continue / trim / snapshot
                                                            (same sequence), copy (seq_cp)
    checkpoint    the untrimmable state at one position      restore_checkpoint, with the
                  (pymem.reuse.checkpoints), in RAM           full-attention cells from a
                                                            live sequence holding the prefix
    disk          an evicted checkpoint in a container file  the same, after its checksum,
                                                            model and layout checks

A memory whose checkpoint is its whole sequence state (recurrent only) restores a
checkpoint into any sequence; the others (hybrids, iSWA) need a live sequence whose
full-attention cells hold the checkpoint's prefix, and the cache drops a checkpoint as
soon as no live sequence does (it could never be restored exactly again).

Layouts and their costs, for a new sequence that shares ``L`` tokens with sequence ``src``:

* one stream (``kv_unified=True``): ``seq_cp(src, dst, 0, L)`` adds ``dst`` to the
  cells: no copy, no bytes; then the checkpoint (recurrent rows, SWA window) is read in.
* one stream per sequence (``kv_unified=False``): ``seq_cp`` across streams copies the
  whole of ``src``'s stream (every layer's K/V rows, ``O(cells of src)`` bytes, run at
  the update applied right away), then the full-attention cells after ``L`` are trimmed.
  Where a memory refuses the copy, the cache falls back to ``src``'s whole-sequence state
  (``state_write`` + ``state_read``: the same bytes, through host memory).

Protocol for a runtime (:meth:`pymem.runtime.session.Session.submit` is one)::

    att = cache.attach(seq_id, tokens)        # seq_id now holds tokens[:att.resume_from]
    for p0, p1 in att.chunks:                 # checkpoints land on chunk ends
        decode(tokens[p0:p1], positions p0..p1-1, seq_id)
        cache.record(seq_id, tokens[:p1])     # what seq_id holds now; may checkpoint
    ...
    cache.release(seq_id)                     # its cells were freed (or shifted)

Every sequence operation the runtime does behind the cache's back (``seq_rm``,
``seq_add``, restores) must be followed by ``record`` (the new tokens) or ``release``. In
one stream, positions belong to cells: a context shift of a sequence that shares prefix
cells with others moves them for all of them, so release every sequence sharing them.

Budget: checkpoint bytes in RAM never exceed ``budget_bytes``. When a checkpoint does not
fit, the cache evicts the least shared, then least recently used one (``shared`` =
live sequences through its node: a system prompt's checkpoint that 16 sessions sit on is
kept over a turn only one session reached); with ``disk_dir`` an evicted checkpoint is
spilled as a :mod:`pymem.container` file, within ``disk_budget_bytes``. A file that is
damaged, truncated, foreign or not what the cache wrote is refused with a
:class:`~pymem.errors.StateError` before the memory changes, dropped, and the request is
served by the next best source (at worst, decoding from position 0).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pymem.container import check_layout, read_container, write_container_payload
from pymem.errors import ClosedError, ConfigError, RangeError, StateError, UnsupportedError
from pymem.kv import KVCache
from pymem.memory import Memory, MemoryStatus, StateFlags
from pymem.recurrent import RecurrentMemory
from pymem.reuse.checkpoints import (
    WHERE,
    Checkpoint,
    CheckpointArena,
    Where,
    checkpoint,
    layout_of,
    memory_device,
    needs_checkpoints,
    restore_checkpoint,
    trimmed_parts,
)
from pymem.reuse.planner import apply_rollback, plan_rollback, window_start
from pymem.reuse.radix import RadixNode, RadixTree, Walk, as_tokens
from pymem.spec import SWAType
from pymem.state import StateReader

Source = Literal["none", "live", "checkpoint", "disk"]
How = Literal["continue", "trim", "snapshot", "copy", "restore", "recompute"]
RequestKind = Literal["prompt", "generate", "draft"]
Tier = Literal["ram", "disk"]

# tie-break between equally long matches: cheapest first
_RANK: dict[tuple[str, str], int] = {
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


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the cache takes checkpoints, and how a request is cut into decode calls.

    ``interval``: a checkpoint after every position ``k * interval - 1`` a request or a
    generation passes (0: none); the tokens decoded beyond a request's new tokens are then
    at most ``interval``. ``before_last_turn``: a prompt's first checkpoint is the state
    it continues from (so an edit of this turn replays nothing of the history).
    ``before_last_token``: one before a prompt's last token (regenerating the answer
    decodes that one token, for its logits). ``branch_points``: where a request leaves
    a cached path while being replayed (the next request that branches there replays
    nothing). ``n_batch``: the longest decode call. Checkpoints are taken only for
    memories that need them (:func:`pymem.reuse.needs_checkpoints`).
    """

    interval: int = 256
    before_last_turn: bool = True
    before_last_token: bool = True
    branch_points: bool = True
    n_batch: int = 512

    def __post_init__(self) -> None:
        if (
            isinstance(self.interval, bool)
            or not isinstance(self.interval, int)
            or self.interval < 0
        ):
            raise ConfigError(f"interval: must be an int >= 0, got {self.interval!r}")
        if isinstance(self.n_batch, bool) or not isinstance(self.n_batch, int) or self.n_batch < 1:
            raise ConfigError(f"n_batch: must be an int >= 1, got {self.n_batch!r}")


@dataclass(frozen=True)
class PrefixMatch:
    """What :meth:`PrefixCache.lookup` found for a request of ``n_tokens`` tokens.

    ``n_common``: tokens shared with something cached. ``n_reuse``: positions
    ``[0, n_reuse)`` that can be had exactly; decoding continues from ``n_reuse``
    (never past ``n_tokens - 1``: the last token is decoded for its logits). ``source``
    and ``how`` say where they come from (see the module docstring); ``src_seq`` is the
    live sequence whose cells are used (-1: none), ``pos`` the checkpoint's position
    (-1: none). ``reason`` says why nothing longer is reusable.
    """

    n_tokens: int
    n_common: int
    n_reuse: int
    source: Source
    how: How
    src_seq: int
    pos: int
    reason: str

    @property
    def n_decode(self) -> int:
        return self.n_tokens - self.n_reuse


@dataclass(frozen=True)
class Attach:
    """What :meth:`PrefixCache.attach` did: ``seq_id`` holds ``tokens[:resume_from]``.

    ``chunks``: the ``[p0, p1)`` ranges to decode, in order (checkpoints land on their
    ends; none longer than the policy's ``n_batch``). ``checkpoints``: the positions the
    policy checkpoints while they decode. ``refused``: why stored entries were refused on
    the way (damaged or foreign files), each already dropped.
    """

    seq_id: int
    match: PrefixMatch
    resume_from: int
    chunks: tuple[tuple[int, int], ...]
    checkpoints: tuple[int, ...]
    refused: tuple[str, ...] = ()

    @property
    def n_decode(self) -> int:
        return self.match.n_tokens - self.resume_from


@dataclass(frozen=True)
class EntryInfo:
    """One stored checkpoint: its position, tier, size and eviction keys."""

    pos: int
    tier: Tier
    nbytes: int
    last_used: int
    shared: int  # live sequences through its node
    path: str | None  # the container file (disk tier)


@dataclass(eq=False)
class _Entry:
    """A stored checkpoint: a payload on the radix tree at ``depth`` (= position + 1)."""

    node: RadixNode
    depth: int
    pos_min: int
    nbytes: int
    last_used: int
    ckpt: Checkpoint | None = field(default=None, repr=False)  # RAM tier
    file: str | None = None  # disk tier
    durable: bool = True  # worth a disk file when evicted (a draft's is not)

    @property
    def pos(self) -> int:
        return self.depth - 1


def _bits(mask: int) -> list[int]:
    """Sequence ids of a bitmask. E.g. 0b10110 -> [1, 2, 4]."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class PrefixCache:
    """A prefix cache over one memory (see the module docstring).

    ``fingerprint`` names the model (e.g. :func:`pymem.container.model_fingerprint`);
    disk entries written under another one are refused. ``disk_dir``: where evicted
    checkpoints go (a private folder is made inside it and removed by :meth:`close`).
    ``where``: where the RAM tier holds checkpoint bytes, ``"device"`` (the default: a
    buffer on the memory's device each, see :func:`pymem.reuse.checkpoint`) or ``"host"``
    (Python bytes); ``budget_bytes`` counts both, and
    :meth:`memory_breakdown` tells them apart. A dropped or evicted entry's buffer is
    freed at once. ``arena_bytes`` (with ``"device"``): one device buffer of that size,
    allocated at the first checkpoint, that checkpoints take ranges of (see
    :class:`~pymem.reuse.checkpoints.CheckpointArena`; 0: a buffer per checkpoint).
    """

    def __init__(
        self,
        mem: Memory,
        *,
        policy: CheckpointPolicy | None = None,
        budget_bytes: int = 64 << 20,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_budget_bytes: int = 1 << 30,
        fingerprint: str = "",
        where: Where = "device",
        arena_bytes: int = 0,
    ) -> None:
        if where not in WHERE:
            raise ConfigError(f"where: must be one of {WHERE}, got {where!r}")
        if isinstance(arena_bytes, bool) or not isinstance(arena_bytes, int) or arena_bytes < 0:
            raise ConfigError(f"arena_bytes: must be an int >= 0, got {arena_bytes!r}")
        for name, v in (("budget_bytes", budget_bytes), ("disk_budget_bytes", disk_budget_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}: must be an int >= 0, got {v!r}")
        if disk_dir is not None and not fingerprint:
            raise ConfigError("fingerprint: a disk tier needs the model's fingerprint, got ''")
        self.mem = mem
        self.policy = policy if policy is not None else CheckpointPolicy()
        self.budget_bytes = budget_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.fingerprint = fingerprint
        self.where: Where = where
        self._device = memory_device(mem)
        self.arena_bytes = arena_bytes
        self._arena: CheckpointArena | None = None
        self.tree = RadixTree()
        self.needs_checkpoints = needs_checkpoints(mem)
        # a checkpoint restores the whole sequence when no full-attention cells are trimmed
        self.self_sufficient = not trimmed_parts(mem)
        self._layout = layout_of(mem)
        kv = [p for p in mem.parts().values() if isinstance(p, KVCache)]
        self._unified = all(p.get_n_stream() == 1 for p in kv)
        self._swa = [p for p in kv if p.swa_type != SWAType.NONE]
        # sliding windows a checkpoint leaves out (a hybrid whose attention cache slides)
        self._trimmed_swa = [p for p in trimmed_parts(mem) if p.swa_type != SWAType.NONE]
        recr = [p for p in mem.parts().values() if isinstance(p, RecurrentMemory)]
        self._recurrent = bool(recr)
        self._recr = recr
        self._n_rs_seq = min((p.n_rs_seq for p in recr), default=0)
        self._held: dict[int, np.ndarray] = {}
        self._end: dict[int, RadixNode] = {}
        self._pending: dict[int, set[int]] = {}
        self._ram: dict[_Entry, None] = {}  # insertion-ordered set
        self._disk: dict[_Entry, None] = {}
        self._clock = 0
        self._serial = 0
        self.bytes_ram = 0
        self.bytes_disk = 0
        self.peak_ram = 0
        self.peak_disk = 0
        self.n_taken = 0
        self.n_evicted = 0
        self.n_spilled = 0
        self.n_refused = 0
        self._disk_dir: str | None = None
        if disk_dir is not None:
            os.makedirs(disk_dir, exist_ok=True)
            self._disk_dir = tempfile.mkdtemp(prefix="pymem-prefix-", dir=os.fspath(disk_dir))
        self._closed = False

    # --- what sequences hold ------------------------------------------------------------
    def held(self, seq_id: int) -> np.ndarray | None:
        """The tokens ``seq_id`` holds as far as the cache knows (None: not tracked)."""
        return self._held.get(seq_id)

    def held_seqs(self) -> list[int]:
        """The sequences the cache tracks."""
        return sorted(self._held)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _is_current(self, seq_id: int) -> bool:
        """Whether the memory still agrees with what the cache recorded for ``seq_id``."""
        held = self._held.get(seq_id)
        return held is not None and self.mem.seq_pos_max(seq_id) == len(held) - 1

    def _set_held(self, seq_id: int, toks: np.ndarray, node: RadixNode | None = None) -> RadixNode:
        """``seq_id`` holds ``toks`` (``node``: the node ending after them, when known)."""
        old = self._end.get(seq_id)
        held = self._held.get(seq_id)
        bit = 1 << seq_id
        if (
            node is None
            and old is not None
            and held is not None
            and len(toks) > len(held)
            and not old.children
            and old.live == old.ends == bit
            and np.array_equal(toks[: len(held)], held)
        ):
            # a generation step: the sequence's own leaf grows (no walk from the root)
            old.key += toks[len(held) :].tobytes()
            old.depth = len(toks)
            self._held[seq_id] = toks
            return old
        if node is None:
            node = self.tree.insert(toks)
        self._held[seq_id] = toks
        if old is node:
            return node
        if old is not None:
            self.tree.set_live(old, seq_id, False)
        self.tree.set_live(node, seq_id, True)
        self._end[seq_id] = node
        if old is not None:
            self._drop_orphans(old)
        return node

    def _drop_orphans(self, node: RadixNode) -> None:
        """After a sequence left ``node``'s path: drop the checkpoints no live sequence's
        cells can take any more (unless a checkpoint is a whole state), prune the tree."""
        cur: RadixNode | None = node
        while cur is not None and cur.parent is not None and not cur.live:
            if not self.self_sufficient:
                for e in list(cur.payloads.values()):
                    self._drop(e, prune=False)  # type: ignore[arg-type]
            cur = cur.parent
        self.tree.prune(node)

    def record(self, seq_id: int, tokens: Any) -> None:
        """``seq_id`` now holds exactly ``tokens`` (positions ``0..len-1``), e.g. after a
        decode; takes a checkpoint where the policy wants one.

        Raises :class:`~pymem.errors.RangeError` when the memory says otherwise.
        """
        self._check_open()
        toks = as_tokens(tokens)
        if len(toks) == 0:
            self.release(seq_id)
            return
        have = self.mem.seq_pos_max(seq_id)
        if have != len(toks) - 1:
            raise RangeError(
                f"record: sequence {seq_id} holds positions up to {have} in the memory, "
                f"tokens has {len(toks)} (last position {len(toks) - 1})"
            )
        held = self._held.get(seq_id)
        if held is not None and len(held) == len(toks) and np.array_equal(held, toks):
            return
        node = self._set_held(seq_id, toks.copy())
        p = len(toks) - 1
        pending = self._pending.get(seq_id, set())
        iv = self.policy.interval
        want = p in pending or (iv > 0 and (p + 1) % iv == 0)
        pending.discard(p)
        if want and self.needs_checkpoints and len(toks) not in node.payloads:
            self._take(seq_id, node)

    def release(self, seq_id: int) -> None:
        """``seq_id``'s cells are gone (or no longer a plain prefix): forget them."""
        self._pending.pop(seq_id, None)
        self._held.pop(seq_id, None)
        old = self._end.pop(seq_id, None)
        if old is not None:
            self.tree.set_live(old, seq_id, False)
            self._drop_orphans(old)

    # --- lookup -------------------------------------------------------------------------
    def lookup(self, tokens: Any, seq_id: int = -1) -> PrefixMatch:
        """The longest exactly reusable prefix of ``tokens`` for ``seq_id`` (-1: a
        sequence holding nothing). Changes nothing.

        O(len(tokens)): one walk down the tree (an edge compare per node) and a look at
        the checkpoints on that path, deepest first.
        """
        self._check_open()
        toks = as_tokens(tokens)
        n = len(toks)
        if n == 0:
            raise RangeError("tokens: a request needs at least one token")
        w = self.tree.walk(toks)
        return self._match(toks, w, seq_id)

    def _live_through(self, w: Walk, length: int) -> int:
        """Bitmask of sequences holding the request's first ``length`` tokens (>= 1)."""
        for node in w.path:
            if node.depth >= length:
                return node.live if node is not w.partial or w.n_common >= length else 0
        return 0

    def _pick(self, mask: int, prefer: int, whole: bool = False) -> int:
        """A current sequence from ``mask``: ``prefer`` if it is one, else the lowest id.

        ``whole``: a source whose whole state is copied; a recurrent rollback pending on
        it disqualifies it (``seq_cp`` copies the state before the rollback: the copy
        would continue from there)."""
        if prefer >= 0 and mask >> prefer & 1 and self._is_current(prefer):
            return prefer
        for s in _bits(mask):
            if self._is_current(s) and not (whole and self._rollback_pending(s)):
                return s
        return -1

    def _rollback_pending(self, seq_id: int) -> bool:
        return any(0 <= seq_id < p.n_seq_max and p.rs_idx[seq_id] != 0 for p in self._recr)

    def _window_ok(self, src: int, length: int, parts: list[KVCache] | None = None) -> bool:
        """Whether ``src``'s SWA caches (``parts``, default all) still hold the window of
        a token at ``length``, and the cell at ``length - 1`` (a window that starts at
        ``length`` itself, a new chunk, needs none; but a sequence cut or copied there
        would hold nothing in that cache and end before ``length - 1``)."""
        for part in self._swa if parts is None else parts:
            need = min(window_start(part.swa_type, part.n_swa, length), length - 1)
            have = part.seq_pos_min(src)
            if have < 0 or have > need:
                return False
        return True

    def _match(self, toks: np.ndarray, w: Walk, seq_id: int) -> PrefixMatch:
        n = len(toks)
        cap = n - 1  # the last token is always decoded, for its logits
        n_common = w.n_common
        cands: list[PrefixMatch] = []
        notes: list[str] = []

        def cand(n_reuse: int, source: Source, how: How, src: int, pos: int) -> None:
            cands.append(PrefixMatch(n, n_common, n_reuse, source, how, src, pos, ""))

        # 1. the sequence's own cells: continue, trim, or a snapshot plane
        if seq_id >= 0 and self._is_current(seq_id):
            bit = 1 << seq_id
            lcp_self = 0
            for node in w.path:
                if node.live & bit:
                    lcp_self = min(node.depth, n_common)
            target = min(lcp_self, cap)
            if target > 0:
                plan = plan_rollback(self.mem, seq_id, target)
                if plan.kind == "none":
                    cand(target, "live", "continue", seq_id, -1)
                elif plan.kind in ("trim", "snapshot") and self._window_ok(seq_id, target):
                    cand(target, "live", plan.kind, seq_id, -1)
                else:
                    why = plan.reason.split("; ")[0]
                    notes.append(f"sequence {seq_id} holds {lcp_self} of these tokens, {why}")
        # 2. another sequence's cells, copied
        length = min(n_common, cap)
        if length > 0:
            if not self.needs_checkpoints or (not self._recurrent and self._swa):
                # the deepest node first: its sequences hold the request up to its depth;
                # a window must still hold what a token there attends to
                tried = 0 if seq_id < 0 else 1 << seq_id
                for node in reversed(w.path):
                    if node.start >= length:
                        continue
                    at = min(node.depth, length)
                    mask = self._live_through(w, at) & ~tried
                    tried |= mask
                    src = next(
                        (s for s in _bits(mask) if self._is_current(s) and self._window_ok(s, at)),
                        -1,
                    )
                    if src >= 0:
                        cand(at, "live", "copy", src, -1)
                        break
            # a sequence that ends on the path, at `length` or before, is copied whole,
            # state and all (the deepest such end; a longer way may still win)
            for node in reversed(w.nodes):
                if node.depth > length or not node.ends:
                    continue
                ends = node.ends & ~(1 << seq_id) if seq_id >= 0 else node.ends
                src = self._pick(ends, -1, whole=True)
                if src >= 0:
                    cand(node.depth, "live", "copy", src, -1)
                    break
        # 3. the deepest usable checkpoint on the path
        if self.needs_checkpoints:
            # the edges searched deepest first; on an edge, numpy finds the payload
            limit = min(cap, n_common)
            for node in reversed(w.path):
                if node.start >= limit or not node.payloads:
                    continue
                e = node.deepest_payload(limit)
                if e is None:
                    continue
                src = -1
                if not self.self_sufficient:
                    # a live sequence keeps the full-attention cells (and the windows the
                    # checkpoint leaves out) of the entry's prefix
                    ok = [s for s in _bits(node.live) if self._is_current(s)]
                    ok = [s for s in ok if self._window_ok(s, e.depth, self._trimmed_swa)]
                    src = seq_id if seq_id in ok else (ok[0] if ok else -1)
                    if src < 0:
                        continue
                assert isinstance(e, _Entry)
                source: Source = "checkpoint" if e.ckpt is not None else "disk"
                how: How = "restore" if src in (-1, seq_id) else "copy"
                cand(e.depth, source, how, src, e.pos)
                break
        cands.append(PrefixMatch(n, n_common, 0, "none", "recompute", -1, -1, ""))
        best = min(cands, key=lambda c: (-c.n_reuse, _RANK[(c.source, c.how)]))
        return PrefixMatch(
            n, n_common, best.n_reuse, best.source, best.how, best.src_seq, best.pos,
            self._reason(best, n_common, n, notes),
        )  # fmt: skip

    def _reason(self, best: PrefixMatch, n_common: int, n: int, notes: list[str]) -> str:
        if n_common == 0:
            return "nothing cached starts with these tokens"
        if best.n_reuse >= min(n_common, n - 1):
            if n_common >= n:
                return f"all {n} tokens are cached; the last one is decoded again for its logits"
            return f"the cache holds the first {n_common} tokens; the rest is new"
        what = []
        if self._recurrent:
            what.append("recurrent state")
        if self._swa:
            what.append("sliding window")
        at = f"the nearest checkpoint is at {best.pos}" if best.pos >= 0 else "no usable checkpoint"
        if n_common < n:
            where = f"the request leaves the cached tokens at {n_common}"
        else:
            where = f"the request is cached whole ({n} tokens)"
        return "; ".join([f"{' and '.join(what)}: {at}, {where}", *notes])

    # --- attach -------------------------------------------------------------------------
    def attach(self, seq_id: int, tokens: Any, kind: RequestKind = "prompt") -> Attach:
        """Set ``seq_id`` up from the best match for ``tokens``; returns where decoding
        continues and how to cut the rest (see :class:`Attach`).

        ``kind``: ``"prompt"`` (every checkpoint rule of the policy), ``"generate"``
        (tokens the runtime generated: the interval only), ``"draft"`` (speculative
        tokens: a checkpoint before them unless the snapshot planes reach over them; it is
        dropped rather than spilled when evicted, and the interval applies).
        Entries that fail their checks are dropped and listed in ``refused``; nothing
        changes in the memory before an entry passed them.
        """
        self._check_open()
        if kind not in ("prompt", "generate", "draft"):
            raise ConfigError(f"kind: 'prompt', 'generate' or 'draft', got {kind!r}")
        toks = as_tokens(tokens).copy()
        n = len(toks)
        if n == 0:
            raise RangeError("tokens: a request needs at least one token")
        if seq_id in self._held and not self._is_current(seq_id):
            self.release(seq_id)  # the memory changed behind the cache's back
        refused: list[str] = []
        while True:
            w = self.tree.walk(toks)
            m = self._match(toks, w, seq_id)
            try:
                resume = self._carry_out(seq_id, m, w)
                break
            except StateError as exc:
                refused.append(str(exc))
                self.n_refused += 1
                entry = self._entry_at(w, m.pos)
                assert entry is not None
                self._drop(entry)
        if resume > 0:
            at = w.node_at(resume)
            known = at if at is not None and at.depth == resume else None
            self._set_held(seq_id, toks[:resume], known)
        else:
            self.release(seq_id)
        want = self._plan_checkpoints(seq_id, toks, resume, m, kind)
        cuts = sorted({resume, n, *(p + 1 for p in want if resume < p + 1 < n)})
        chunks: list[tuple[int, int]] = []
        for a, b in itertools.pairwise(cuts):
            chunks += [
                (p, min(p + self.policy.n_batch, b)) for p in range(a, b, self.policy.n_batch)
            ]
        return Attach(seq_id, m, resume, tuple(chunks), tuple(sorted(want)), tuple(refused))

    def _entry_at(self, w: Walk, pos: int) -> _Entry | None:
        node = w.node_at(pos + 1)
        e = node.payloads.get(pos + 1) if node is not None else None
        assert e is None or isinstance(e, _Entry)
        return e

    def _plan_checkpoints(
        self, seq_id: int, toks: np.ndarray, resume: int, m: PrefixMatch, kind: RequestKind
    ) -> set[int]:
        """Positions the policy checkpoints during this request; takes the one at
        ``resume - 1`` right away (the memory is there now)."""
        self._pending.pop(seq_id, None)
        if not self.needs_checkpoints:
            return set()
        pol, n = self.policy, len(toks)
        want: set[int] = set()
        now = False
        if kind == "prompt" and pol.before_last_turn:
            now = True
        elif kind == "draft":
            # drafts roll back only within the snapshot planes unless a checkpoint is there
            now = bool(self._swa) or n - resume > self._n_rs_seq
        if now and resume > 0:
            node = self._end[seq_id]
            if resume not in node.payloads:
                # a draft's checkpoint matters until the draft is settled: never spilled
                self._take(seq_id, node, durable=kind != "draft")
        if kind == "prompt" and pol.branch_points and resume < m.n_common < n:
            want.add(m.n_common - 1)
        if kind == "prompt" and pol.before_last_token and n >= 2 and n - 2 >= resume:
            want.add(n - 2)
        if pol.interval > 0:
            # E.g. interval 256, resume 300, n 900 -> 511, 767
            first = (resume // pol.interval + 1) * pol.interval - 1
            want.update(range(first, n, pol.interval))
        want = {p for p in want if resume <= p < n}
        self._pending[seq_id] = want
        return want

    def _carry_out(self, seq_id: int, m: PrefixMatch, w: Walk) -> int:
        """Make ``seq_id`` hold ``tokens[:m.n_reuse]``; returns the resume position.
        A refused entry raises :class:`StateError` before the memory changes."""
        mem = self.mem
        if m.how == "continue":
            return m.n_reuse
        if m.how in ("trim", "snapshot"):
            plan = plan_rollback(mem, seq_id, m.n_reuse)
            assert plan.kind == m.how, plan
            return apply_rollback(mem, plan)
        if m.how == "recompute":
            self._clear(seq_id)
            return 0
        entry = self._entry_at(w, m.pos) if m.pos >= 0 else None
        if entry is None:  # a live copy
            self._copy(m.src_seq, seq_id, m.n_reuse, trim=True)
            entry_used = None
        else:
            ck = self._load(entry)
            if entry.file is not None:
                # a file passed its checks; parse it once more against this memory (a dry run)
                mem.state_read_parse(StateReader(ck.blob), seq_id, StateFlags.PARTIAL_ONLY)
            if m.src_seq == seq_id:
                pass
            elif m.src_seq < 0:
                self._clear(seq_id)
            else:
                self._copy(m.src_seq, seq_id, m.n_reuse, trim=False)
            restore_checkpoint(mem, seq_id, ck)
            entry_used = entry
        if entry_used is not None:
            entry_used.last_used = self._tick()
        got = mem.seq_pos_max(seq_id)
        assert got == m.n_reuse - 1, (got, m)
        return m.n_reuse

    def _copy(self, src: int, dst: int, length: int, trim: bool) -> None:
        """``dst`` holds ``src``'s cells of positions ``[0, length)`` (``trim``: cut the
        rest; else a checkpoint restore trims the full-attention cells next)."""
        mem = self.mem
        self._clear(dst)
        whole = length == len(self._held[src])
        try:
            if self._unified and not whole:
                mem.seq_cp(src, dst, 0, length)
            else:
                mem.seq_cp(src, dst, -1, -1)
                self._update()
        except UnsupportedError:
            # the memory cannot copy this pair: its whole-sequence state can
            mem.state_read(mem.state_write(src), dst)
        trimmed = not (trim and not whole and mem.seq_pos_max(dst) >= length)
        if not trimmed and not mem.seq_rm(dst, length, -1):
            raise AssertionError(f"copy {src} -> {dst}: trimming to {length} was refused")

    def _clear(self, seq_id: int) -> None:
        """``seq_rm(seq_id)``, skipped when no part holds the sequence (a cache-wide scan
        saved: ~0.3 ms on 128k cells)."""
        if any(p.seq_pos_max(seq_id) >= 0 for p in self.mem.parts().values()):
            self.mem.seq_rm(seq_id, -1, -1)

    def _update(self) -> None:
        """Apply pending stream copies now: a checkpoint read next must land after them."""
        uctx = self.mem.init_update()
        if uctx.get_status() == MemoryStatus.SUCCESS:
            uctx.apply()

    # --- entries: taking, budget, disk ---------------------------------------------------
    def _take(self, seq_id: int, node: RadixNode, durable: bool = True) -> None:
        ck = checkpoint(self.mem, seq_id, self.where, self._get_arena())
        assert ck.pos == node.depth - 1, (ck.pos, node.depth)
        e = _Entry(node, node.depth, self.mem.seq_pos_min(seq_id), ck.nbytes, self._tick(), ckpt=ck,
                   durable=durable)  # fmt: skip
        node.add_payload(e)
        self.n_taken += 1
        self._admit(e)

    def _get_arena(self) -> CheckpointArena | None:
        """The cache's checkpoint arena, made on first use (None: a buffer per checkpoint)."""
        if self._arena is None and self.where == "device" and self.arena_bytes:
            self._arena = CheckpointArena(
                self._device, max(self.arena_bytes, CheckpointArena.ALIGN)
            )
        return self._arena

    def _shared(self, e: _Entry) -> int:
        return e.node.live.bit_count()

    def _admit(self, e: _Entry) -> None:
        """Keep ``e`` in RAM within the budget: evict others first, or spill / drop it."""
        if e.nbytes > self.budget_bytes:
            self._evict(e)
            return
        if self.where == "device" and e.ckpt is not None and e.ckpt.where == "host":
            e.ckpt.to_device(self._device, self._get_arena(), self.mem)  # e.g. a saved cache
        while self.bytes_ram + e.nbytes > self.budget_bytes:
            victim = min(self._ram, key=lambda x: (self._shared(x), x.last_used))
            self._evict(victim)
        self._ram[e] = None
        self.bytes_ram += e.nbytes
        self.peak_ram = max(self.peak_ram, self.bytes_ram)
        assert self.bytes_ram <= self.budget_bytes

    def _evict(self, e: _Entry) -> None:
        """Move ``e`` from RAM to disk when there is a disk tier and room, else drop it."""
        self.n_evicted += 1
        if e in self._ram:
            del self._ram[e]
            self.bytes_ram -= e.nbytes
        assert e.ckpt is not None
        if self._disk_dir is None or not e.durable:
            self._drop(e)
            return
        path = os.path.join(self._disk_dir, f"ckpt-{self._serial:06d}-p{e.pos}.pymem")
        self._serial += 1
        ck = e.ckpt
        n = write_container_payload(
            path, ck.blob, self.mem, ck.seq_id, int(StateFlags.PARTIAL_ONLY),
            fingerprint=self.fingerprint, pos={ck.seq_id: (e.pos_min, e.pos)},
            tokens=e.node.tokens(e.depth),
        )  # fmt: skip
        if n > self.disk_budget_bytes:
            os.unlink(path)
            self._drop(e)
            return
        while self.bytes_disk + n > self.disk_budget_bytes:
            victim = min(self._disk, key=lambda x: (self._shared(x), x.last_used))
            self._drop(victim)
        ck.close()
        e.ckpt, e.file, e.nbytes = None, path, n
        self._disk[e] = None
        self.bytes_disk += n
        self.peak_disk = max(self.peak_disk, self.bytes_disk)
        self.n_spilled += 1

    def _drop(self, e: _Entry, prune: bool = True) -> None:
        """Forget ``e`` entirely (RAM freed, file deleted), prune its node."""
        if e in self._ram:
            del self._ram[e]
            self.bytes_ram -= e.nbytes
        if e in self._disk:
            del self._disk[e]
            self.bytes_disk -= e.nbytes
            if e.file is not None:
                with contextlib.suppress(OSError):
                    os.unlink(e.file)
        if e.ckpt is not None:
            e.ckpt.close()
        e.ckpt = None
        node = e.node
        if node.payloads.get(e.depth) is e:
            node.remove_payload(e)
            if prune:
                self.tree.prune(node)

    def _load(self, e: _Entry) -> Checkpoint:
        """The checkpoint of ``e``; a disk entry is read and checked first (checksum,
        model, layout, flags, tokens, position): :class:`StateError` when any fails."""
        if e.ckpt is not None:
            return e.ckpt
        assert e.file is not None
        try:
            header, payload = read_container(e.file)
        except OSError as exc:
            raise StateError(f"{e.file}: cannot read the entry: {exc}") from None
        where = e.file
        if header.fingerprint != self.fingerprint:
            raise StateError(
                f"{where}: container header field fingerprint is {header.fingerprint!r}, this "
                f"cache's model is {self.fingerprint!r} (a foreign model's state)"
            )
        try:
            check_layout(header.memory, self.mem)
        except StateError as exc:
            raise StateError(f"{where}: {exc}") from None
        if header.kind != "sequence" or header.flags != int(StateFlags.PARTIAL_ONLY):
            raise StateError(
                f"{where}: a {header.kind} state with flags {header.flags}; a checkpoint is one "
                f"sequence's PARTIAL_ONLY state (flags {int(StateFlags.PARTIAL_ONLY)})"
            )
        want = e.node.tokens(e.depth)
        if header.n_tokens != len(want) or not np.array_equal(np.asarray(header.tokens), want):
            raise StateError(
                f"{where}: the container holds a state after {header.n_tokens} other tokens, "
                f"not this entry's {len(want)}"
            )
        if header.pos.get(header.seq_id, (-1, -1))[1] != e.pos:
            raise StateError(
                f"{where}: container header pos {header.pos} does not end at position {e.pos}"
            )
        return Checkpoint(header.seq_id, e.pos, bytes(payload), self._layout)

    def restore_entry(self, seq_id: int, pos: int) -> int:
        """Restore the stored checkpoint at ``pos`` on ``seq_id``'s path into ``seq_id``
        (its own cells); returns the resume position. A refused entry raises
        :class:`StateError` with the memory unchanged (the entry stays: see ``attach``)."""
        self._check_open()
        end = self._end.get(seq_id)
        node = end
        while node is not None and node.parent is not None and node.start >= pos + 1:
            node = node.parent
        e = node.payloads.get(pos + 1) if node is not None else None
        if not isinstance(e, _Entry):
            raise RangeError(f"pos = {pos}: no stored checkpoint on sequence {seq_id}'s path")
        ck = self._load(e)
        resume = restore_checkpoint(self.mem, seq_id, ck)
        assert end is not None
        self._set_held(seq_id, self._held[seq_id][:resume].copy())
        e.last_used = self._tick()
        return resume

    # --- saved with the memory ----------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, fingerprint: str | None = None) -> int:
        """Write the memory's whole state and what this cache knows (held tokens, every
        checkpoint, policy, budgets) to one checksummed container at ``path``; bytes
        written. See :func:`pymem.reuse.persist.save_prefix_cache`."""
        from pymem.reuse.persist import save_prefix_cache  # persist imports this module

        return save_prefix_cache(self, path, fingerprint=fingerprint)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | bytes | bytearray | memoryview,
        mem: Memory,
        *,
        fingerprint: str,
        budget_bytes: int | None = None,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_budget_bytes: int | None = None,
        where: Where | None = None,
    ) -> PrefixCache:
        """Restore a :meth:`save` file into ``mem`` and return a cache that knows what the
        saved one knew; a damaged, truncated or foreign file raises :class:`StateError`
        with ``mem`` unchanged. See :func:`pymem.reuse.persist.load_prefix_cache`.
        ``where``: where the new cache holds its RAM checkpoints (default: the cache's
        default); they are read as host bytes and moved after the commit."""
        from pymem.reuse.persist import load_prefix_cache  # persist imports this module

        if where is not None and where not in WHERE:
            raise ConfigError(f"where: must be one of {WHERE}, got {where!r}")
        cache = load_prefix_cache(
            path, mem, fingerprint=fingerprint, budget_bytes=budget_bytes, disk_dir=disk_dir,
            disk_budget_bytes=disk_budget_bytes,
        )  # fmt: skip
        cache.hold_on(where if where is not None else cache.where)
        return cache

    def hold_on(self, where: Where) -> None:
        """Hold the RAM tier's checkpoints (those there now and those taken later) on the
        memory's device or in host bytes; e.g. after :meth:`load`, whose entries arrive as
        host bytes. The budget does not change: a checkpoint has one size wherever it is."""
        self._check_open()
        if where not in WHERE:
            raise ConfigError(f"where: must be one of {WHERE}, got {where!r}")
        self.where = where
        for e in self._ram:
            if e.ckpt is not None:
                if where == "device":
                    e.ckpt.to_device(self._device, self._get_arena(), self.mem)
                else:
                    e.ckpt.to_host()

    # --- accounting ---------------------------------------------------------------------
    def entries(self) -> list[EntryInfo]:
        """Every stored checkpoint, RAM then disk, each in the order it entered its tier."""
        out = []
        for tier, group in (("ram", self._ram), ("disk", self._disk)):
            for e in group:
                out.append(EntryInfo(e.pos, tier, e.nbytes, e.last_used, self._shared(e), e.file))  # type: ignore[arg-type]
        return out

    def eviction_order(self) -> list[int]:
        """Positions of the RAM checkpoints in the order they would be evicted."""
        return [e.pos for e in sorted(self._ram, key=lambda x: (self._shared(x), x.last_used))]

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes held: ``"ram"`` (checkpoint blobs of the RAM tier, wherever held),
        ``"arena"`` (the checkpoint arena's buffer, when there is one),
        ``"disk"`` (container files), ``"tree"`` (token keys of the radix tree),
        ``"ram_device"`` / ``"ram_host"`` (the part of ``"ram"`` in device buffers / in host
        bytes), ``"ram_device_meta"`` (host bytes device checkpoints keep beside their
        buffers: the blobs' metadata a restore parses; not part of ``"ram"``)."""
        tree = sum(len(node.key) for node in self.tree.iter_nodes())
        out = {"ram": self.bytes_ram, "disk": self.bytes_disk, "tree": tree}
        on_dev = [e.ckpt for e in self._ram if e.ckpt is not None and e.ckpt.where == "device"]
        out["ram_device"] = sum(c.nbytes for c in on_dev)
        out["ram_host"] = self.bytes_ram - out["ram_device"]
        out["ram_device_meta"] = sum(c.host_nbytes for c in on_dev)
        if self._arena is not None:
            out["arena"] = self._arena.capacity  # allocated, whatever is in use
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("prefix cache: already closed")

    def close(self) -> None:
        """Free every checkpoint, delete the disk tier, forget every sequence. Idempotent."""
        if self._closed:
            return
        for e in list(self._ram) + list(self._disk):
            self._drop(e)
        self._held.clear()
        self._end.clear()
        self._pending.clear()
        self.tree = RadixTree()
        if self._disk_dir is not None:
            shutil.rmtree(self._disk_dir, ignore_errors=True)
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        self._closed = True

    def __enter__(self) -> PrefixCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__: Sequence[str] = [
    "Attach",
    "CheckpointPolicy",
    "EntryInfo",
    "PrefixCache",
    "PrefixMatch",
]
