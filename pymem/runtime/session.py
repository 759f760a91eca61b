"""Serve sequences of the tiny model through a pymem memory and check every step.

A :class:`Session` is what a serving loop does with pymem (continuous batching: decode
requests of several sequences per step, sequences joining and finishing, forks with
``seq_cp``, speculative rollbacks with ``seq_rm``, ``seq_keep``, context shifts with
``seq_rm`` + ``seq_add``, save / restore with ``state_write`` / ``state_read``), plus a
:class:`SeqHistory` per sequence that records what the model has seen. After each decode
the logits of every new token are compared with :class:`~pymem.runtime.oracle.Oracle`
recomputing that sequence from its history, from scratch.

A history is more than a token list once the past is edited. Each token keeps the
position it was computed at, the step it was computed at, the step it was dropped at (a
context shift removes cells from attention, while a recurrent state keeps everything it
folded in), and the shifts applied to it later (``seq_add``: the cache rotates K, so a
later token sees the key at the new position)::

    token     a    b    c    d    e         seq_rm [1, 3) at step 5, seq_add [3, inf) -2
    pos       0    1    2    3    4
    born      0    0    0    0    0         f (born 6, pos 3) sees a at 0, d at 1, e at 2
    removed   -    5    5    -    -         and not b, c; its recurrent layers saw all five

Rollbacks (``seq_rm`` of the tail) remove tokens outright: the KV cells are freed and the
recurrent state goes back to a snapshot.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pymem.batch import Batch
from pymem.container import model_fingerprint
from pymem.errors import ConfigError
from pymem.memory import Memory
from pymem.reuse import Attach, PrefixCache, as_tokens
from pymem.reuse.checkpoints import Where
from pymem.reuse.prefix_cache import RequestKind
from pymem.runtime.decoder import Decoder
from pymem.runtime.graph import TinyModel
from pymem.runtime.oracle import Oracle

INF = math.inf

TOLERANCES = {"f32": 2e-5, "f16": 1e-2, "bf16": 6e-2, "q8_0": 0.15}
"""Max abs logit error against the float64 oracle, by the coarsest K/V cache type.

f32: graph arithmetic in f32 (observed ~3e-6 on logits of magnitude ~4). f16 keeps 11
significant bits (relative rounding <= 4.9e-4 per K/V value, and Q is rounded to f16 for
the dot products of flash attention on CPU): observed ~2e-3. bf16 keeps 8 bits (8x f16's
rounding). q8_0 stores 8-bit values per block of 32 with one scale (error up to
max|block|/254 per value, and Q is quantised to q8_0 for the CPU dot products): observed
~0.04. Each bound is about 5x the worst error seen over the end-to-end runs.
"""


def tolerance_for(
    type_k: str, type_v: str, model: TinyModel | None = None, flash_attn: bool = False
) -> float:
    """The tolerance of the coarser of the two cache types (see :data:`TOLERANCES`).

    With ``flash_attn`` on a device that cannot attend over these types as stored, the
    graph casts K/V to f16 first (as the reference does for f32), so f16's bound applies.
    """
    types = [str(type_k).lower(), str(type_v).lower()]
    if flash_attn and model is not None and not model.flash_attn_supports(*types):
        types.append("f16")
    unknown = [t for t in types if t not in TOLERANCES]
    if unknown:
        raise ConfigError(
            f"cache type {unknown[0]!r}: no stated tolerance; known {sorted(TOLERANCES)}"
        )
    return max(TOLERANCES[t] for t in types)


@dataclass
class SeqHistory:
    """Everything the model has seen of one sequence (see the module docstring)."""

    tokens: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)  # position when computed
    born: list[int] = field(default_factory=list)  # step when computed
    removed: list[float] = field(default_factory=list)  # step when dropped from attention
    # (step, delta, token count then, mask of shifted tokens among them)
    shifts: list[tuple[int, int, np.ndarray]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def current_pos(self) -> np.ndarray:
        """Each token's position now (after every shift)."""
        cur = np.asarray(self.pos, dtype=np.int64).copy()
        for _, delta, mask in self.shifts:
            cur[: mask.size] += delta * mask
        return cur

    def present(self) -> np.ndarray:
        return np.asarray(self.removed, dtype=np.float64) == INF

    def next_pos(self) -> int:
        """The position the next token must have: the last token's current position + 1."""
        return int(self.current_pos()[-1]) + 1 if self.tokens else 0

    def is_plain(self) -> bool:
        """Whether the history is a plain prefix: positions 0.., nothing dropped or shifted
        (what a prefix cache can reason about)."""
        return not self.shifts and all(r == INF for r in self.removed)

    @classmethod
    def plain(cls, tokens: Iterable[int], step: int) -> SeqHistory:
        """Tokens at positions ``0..``, all computed at ``step`` and visible."""
        h = cls()
        h.append(tokens, step)
        return h

    def append(self, tokens: Iterable[int], step: int) -> None:
        p = self.next_pos()
        for i, t in enumerate(tokens):
            self.tokens.append(int(t))
            self.pos.append(p + i)
            self.born.append(step)
            self.removed.append(INF)

    def truncate(self, n: int) -> None:
        """Forget the last ``n`` tokens entirely (a rollback)."""
        keep = len(self) - n
        for lst in (self.tokens, self.pos, self.born, self.removed):
            del lst[keep:]

    def context_shift(self, p0: int, p1: int, step: int) -> None:
        """Drop current positions ``[p0, p1)`` from attention, move later ones by ``p0 - p1``."""
        cur = self.current_pos()
        present = self.present()
        drop = present & (cur >= p0) & (cur < p1)
        for i in np.flatnonzero(drop):
            self.removed[i] = step
        moved = present & (cur >= p1)
        self.shifts.append((step, p0 - p1, moved.astype(np.int64)))

    def oracle_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, pos, visible, key_pos) for :meth:`Oracle.logits`."""
        n = len(self)
        born = np.asarray(self.born, dtype=np.int64)
        removed = np.asarray(self.removed, dtype=np.float64)
        pos = np.asarray(self.pos, dtype=np.int64)
        # token i saw token j if j came no later and was not dropped before i was computed
        visible = np.tril(np.ones((n, n), dtype=bool)) & (removed[None, :] > born[:, None])
        key_pos = np.broadcast_to(pos[None, :], (n, n)).copy()
        for step, delta, mask in self.shifts:
            # a shift at `step` moved the keys every token computed after it sees
            # E.g. born [0, 0, 7], step 5, mask [0, 1] -> row 2 gets [0, delta, 0]
            full = np.zeros(n, dtype=np.int64)
            full[: mask.size] = mask
            key_pos += np.outer(born > step, full * delta)
        return np.asarray(self.tokens, dtype=np.int64), pos, visible, key_pos


@dataclass
class PartUsage:
    """One memory part at one moment: which sequence holds each cell."""

    name: str
    owners: np.ndarray  # int32 per cell (all streams / planes-0 rows): seq id, -1 free, -2 shared
    bytes_by_device: dict[str, int]


def memory_parts(memory: Memory) -> dict[str, Any]:
    """The innermost memories of any pymem memory, by name."""
    return dict(memory.parts())


def part_owners(part: Memory) -> np.ndarray:
    """Owner of every cell of a KV cache (streams concatenated) or recurrent memory."""
    return part.cell_owners()


def usage(memory: Memory) -> list[PartUsage]:
    return [
        PartUsage(name, part_owners(p), dict(p.memory_breakdown()))
        for name, p in memory_parts(memory).items()
    ]


@dataclass
class CheckResult:
    label: str
    seq_id: int
    n_tokens: int
    max_err: float
    ok: bool


def fingerprint_of(model: Any) -> str:
    """A name for the model a saved session belongs to: a GGUF model's
    :func:`~pymem.container.model_fingerprint`; for the tiny model, ``"tiny:"`` and a
    SHA-256 over its config and its embedding and output weights (two seeds differ there).
    """
    path = getattr(model, "path", None)
    if isinstance(path, str):
        return model_fingerprint(path)
    w = getattr(model, "weights", None)
    h = hashlib.sha256(repr(getattr(model, "config", None)).encode())
    for name in ("tok_embd", "output"):
        arr = getattr(w, name, None)
        if isinstance(arr, np.ndarray):
            h.update(np.ascontiguousarray(arr).tobytes())
    return f"tiny:{h.hexdigest()[:32]}"


@dataclass(frozen=True)
class Submitted:
    """What :meth:`Session.submit` did: the last token's logits, tokens decoded and reused."""

    logits: np.ndarray  # float32 [n_vocab]
    n_decoded: int
    n_reused: int
    attach: Attach


class Session:
    """A serving loop over one memory, checked against the oracle after every decode.

    ``tol``: max abs logit error allowed (default from the memory's cache types).
    ``check``: compare with the oracle (``False`` only to time the memory alone; the model
    may then be any model the decoder runs, e.g. a GGUF model). ``prefix_cache``: the cache
    :meth:`submit` reuses prefixes through (default: one made on first use); while a
    session has one, every sequence operation keeps it informed.
    """

    def __init__(self, model: TinyModel, memory: Memory, *, n_seq_max: int, n_ubatch: int = 512,
                 flash_attn: bool = False, tol: float | None = None, oracle: Oracle | None = None,
                 check: bool = True, prefix_cache: PrefixCache | None = None) -> None:  # fmt: skip
        self.model = model
        self.memory = memory
        self.decoder = Decoder(
            model, memory, n_seq_max=n_seq_max, n_ubatch=n_ubatch, flash_attn=flash_attn
        )
        self.oracle: Oracle | None = oracle
        if self.oracle is None and check:
            self.oracle = Oracle(model.weights)
        self._cache = prefix_cache
        self.tol = tol if tol is not None else 2e-5
        self.check = check
        self.histories: dict[int, SeqHistory] = {}
        self.step = 0
        self.results: list[CheckResult] = []
        self.timeline: list[tuple[str, list[PartUsage]]] = []
        self.events: list[str] = []
        self.t_ops = 0.0  # seconds in sequence operations and state I/O
        self.n_started = 0  # sequences started: joins, forks, restores

    # --- checks -----------------------------------------------------------------------
    @property
    def max_err(self) -> float:
        return max((r.max_err for r in self.results), default=0.0)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def _tick(self, label: str) -> None:
        self.step += 1
        self.events.append(label)
        self.timeline.append((label, usage(self.memory)))

    def expect_positions(self) -> None:
        """Invariant: the memory's last position of each sequence is its history's."""
        for s, h in self.histories.items():
            got = self.memory.seq_pos_max(s)
            want = h.next_pos() - 1
            if got != want:
                raise AssertionError(f"seq {s}: memory seq_pos_max {got}, history says {want}")

    # --- decoding -----------------------------------------------------------------------
    def decode(
        self, requests: Mapping[int, Iterable[int]], label: str = "decode", record: bool = True
    ) -> dict[int, np.ndarray]:
        """Decode the given tokens of each sequence in one batch; check every new token.

        A sequence id not seen before joins with these tokens as its prompt. Returns the
        logits ``[n_new, n_vocab]`` per sequence. With a prefix cache, ``record`` tells it
        what each sequence now holds (:meth:`submit` records itself).
        """
        items = [(s, [int(t) for t in toks]) for s, toks in requests.items()]
        tok: list[int] = []
        pos: list[int] = []
        seq: list[int] = []
        for s, toks in items:
            h = self.histories.get(s, SeqHistory())
            p = h.next_pos()
            tok += toks
            pos += range(p, p + len(toks))
            seq += [s] * len(toks)
        batch = Batch(np.asarray(tok, dtype=np.int32), pos=np.asarray(pos, dtype=np.int32),
                      seq_id=np.asarray(seq, dtype=np.int32), output=np.ones(len(tok), dtype=bool))  # fmt: skip
        logits = self.decoder.decode(batch)
        out: dict[int, np.ndarray] = {}
        i = 0
        for s, toks in items:
            if s not in self.histories:
                self.n_started += 1
            h = self.histories.setdefault(s, SeqHistory())
            h.append(toks, self.step)
            got = logits[i : i + len(toks)]
            i += len(toks)
            out[s] = got
            if self.check:
                assert self.oracle is not None
                want = self.oracle.logits(*h.oracle_inputs())[-len(toks) :]
                err = float(np.abs(got - want).max())
                self.results.append(CheckResult(label, s, len(toks), err, bool(err <= self.tol)))
        self._tick(label)
        if self._cache is not None and record:
            for s, _ in items:
                self._cache_sync(s)
        return out

    # --- sequence operations ------------------------------------------------------------
    def _timed(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.t_ops += time.perf_counter() - t0

    def fork(self, src: int, dst: int) -> None:
        """``seq_cp(src, dst)``: dst continues from everything src has."""
        self._timed(self.memory.seq_cp, src, dst, -1, -1)
        self.histories[dst] = copy.deepcopy(self.histories[src])
        self._cache_sync(dst)
        self.n_started += 1
        self._tick(f"fork {src}->{dst}")

    def finish(self, seq_id: int) -> None:
        """``seq_rm(seq_id)``: the sequence is done, its cells free."""
        self._timed(self.memory.seq_rm, seq_id, -1, -1)
        self.histories.pop(seq_id, None)
        self._cache_sync(seq_id)
        self._tick(f"finish {seq_id}")

    def keep(self, seq_id: int) -> None:
        """``seq_keep(seq_id)``: every other sequence is dropped.

        With one KV stream per sequence the reference clears only ``seq_id``'s own stream,
        so the others stay: histories are kept for the sequences the memory still reports.
        """
        self._timed(self.memory.seq_keep, seq_id)
        self.histories = {
            s: h
            for s, h in self.histories.items()
            if s == seq_id or self.memory.seq_pos_max(s) >= 0
        }
        if self._cache is not None:
            for s in list(self._cache.held_seqs()):
                self._cache_sync(s)
        self._tick(f"keep {seq_id}")

    def rollback(self, seq_id: int, n: int) -> bool:
        """``seq_rm(seq_id, pos_max + 1 - n, -1)``: drop the last ``n`` tokens if the memory can.

        Returns the memory's answer; on False nothing changed (checked).
        """
        h = self.histories[seq_id]
        p0 = h.next_pos() - n
        before = (self.memory.seq_pos_min(seq_id), self.memory.seq_pos_max(seq_id))
        ok = bool(self._timed(self.memory.seq_rm, seq_id, p0, -1))
        if ok:
            h.truncate(n)
            self._cache_sync(seq_id)
        else:
            after = (self.memory.seq_pos_min(seq_id), self.memory.seq_pos_max(seq_id))
            if after != before:
                raise AssertionError(
                    f"seq_rm({seq_id}, {p0}, -1) returned False but changed {before} -> {after}"
                )
        self._tick(f"rollback {seq_id} by {n}: {'ok' if ok else 'refused'}")
        return ok

    def context_shift(self, seq_id: int, p0: int, p1: int) -> None:
        """Drop positions ``[p0, p1)`` and shift the rest back: ``seq_rm`` then ``seq_add``.

        The K-shift itself runs at the next decode (``init_update``), as in the reference.
        Positions belong to cells: in a unified cache, cells the sequence still shares with
        a fork move for the fork too (the reference's behaviour), which the histories do
        not model, so shift only sequences that share no cells. With SWA layers, shift
        only ranges whose kept prefix stays outside the window: an SWA cache may already
        have reused the cells that left it.
        """
        self._timed(self.memory.seq_rm, seq_id, p0, p1)
        self._timed(self.memory.seq_add, seq_id, p1, -1, p0 - p1)
        self.histories[seq_id].context_shift(p0, p1, self.step)
        self._cache_sync(seq_id)
        self._tick(f"shift {seq_id}: drop [{p0}, {p1})")

    def save(self, seq_id: int, path: str | Path | None = None) -> bytes | int:
        """``state_write(seq_id)``: the blob, or its size when streamed to ``path``.

        A pending K-shift is applied first: a blob holds positions already shifted but K as
        stored, so saving between ``seq_add`` and the next decode would save unrotated K.
        """
        self.decoder.update()
        if path is None:
            return self._timed(self.memory.state_write, seq_id)
        with open(path, "wb") as f:
            return int(self._timed(self.memory.state_write_to, f, seq_id))

    def restore(
        self, source: bytes | str | Path | BinaryIO, seq_id: int, history: SeqHistory
    ) -> int:
        """``state_read(blob, seq_id)``: adopt ``history`` for ``seq_id``; returns bytes read."""
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                n = int(self._timed(self.memory.state_read_from, f, seq_id))
        elif isinstance(source, (bytes, bytearray, memoryview)):
            n = int(self._timed(self.memory.state_read, source, seq_id))
        else:
            n = int(self._timed(self.memory.state_read_from, source, seq_id))
        self.histories[seq_id] = copy.deepcopy(history)
        self._cache_sync(seq_id)
        self.n_started += 1
        self._tick(f"restore into {seq_id}")
        return n

    # --- the whole session, with its prefix cache ---------------------------------------
    def save_session(self, path: str | os.PathLike[str], *, fingerprint: str | None = None) -> int:
        """Write the memory's whole state and what the prefix cache knows (each sequence's
        tokens, every checkpoint) to one checksummed file (:meth:`PrefixCache.save`);
        bytes written. ``fingerprint``: the model (default: the cache's, else
        :func:`fingerprint_of`). A pending K-shift is applied first (see :meth:`save`).

        Why: a restarted server that restores only the memory state has the cells but no
        prefix cache knowing them, so every restored conversation decodes its prompt again.
        Sequences whose history is not a plain prefix (edited by a context shift) are not
        the cache's to know, and are not restorable by :meth:`load_session`.
        """
        self.decoder.update()
        cache = self.prefix_cache
        fp = fingerprint or cache.fingerprint or fingerprint_of(self.model)
        return int(self._timed(lambda: cache.save(path, fingerprint=fp)))

    def load_session(
        self,
        path: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        budget_bytes: int | None = None,
        where: Where | None = None,
    ) -> list[int]:
        """Replace this session's memory state and prefix cache with a
        :meth:`save_session` file; returns the sequences now held, whose histories are
        rebuilt as plain prefixes of the saved tokens (what the oracle checks against).

        ``fingerprint``: this model (default as in :meth:`save_session`); a file of another
        model, another memory layout, or a damaged one raises
        :class:`~pymem.errors.StateError` with the memory, the cache and the histories
        unchanged (the load is two-phase). ``where``: where the loaded cache holds its RAM
        checkpoints (default: as the session's current cache did, else the cache's default).
        Sequences the saved cache did not know (see :meth:`save_session`) are removed.
        """
        old = self._cache
        fp = (
            fingerprint
            or (old.fingerprint if old is not None else "")
            or fingerprint_of(self.model)
        )
        t0 = time.perf_counter()
        hold = where if where is not None else (old.where if old is not None else None)
        new = PrefixCache.load(
            path, self.memory, fingerprint=fp, budget_bytes=budget_bytes, where=hold
        )
        self.t_ops += time.perf_counter() - t0
        # --- committed: the memory holds the saved state ---
        if old is not None:
            old.close()
        self._cache = new
        held = new.held_seqs()
        for seq_id in range(self.decoder.n_seq_max):
            if seq_id not in held and self.memory.seq_pos_max(seq_id) >= 0:
                # cells of a sequence the cache did not know (an edited history): the file
                # has no history to check them against, so they go
                self.memory.seq_rm(seq_id, -1, -1)
        self.histories = {}
        for seq_id in held:
            toks = new.held(seq_id)
            assert toks is not None
            self.histories[seq_id] = SeqHistory.plain(toks.tolist(), self.step)
        self.n_started += len(held)
        self._tick(f"load session: {len(held)} sequences")
        return held

    # --- prefix reuse -------------------------------------------------------------------
    @property
    def prefix_cache(self) -> PrefixCache:
        """The session's prefix cache (a default one is made on first use)."""
        if self._cache is None:
            self._cache = PrefixCache(self.memory)
            for s in self.histories:
                self._cache_sync(s)
        return self._cache

    def _cache_sync(self, seq_id: int) -> None:
        """Tell the prefix cache what ``seq_id`` holds: its tokens when the history is a
        plain prefix the memory agrees with, else nothing (released)."""
        if self._cache is None:
            return
        h = self.histories.get(seq_id)
        if (
            h is not None
            and len(h)
            and h.is_plain()
            and self.memory.seq_pos_max(seq_id) == len(h) - 1
        ):
            self._cache.record(seq_id, h.tokens)
        else:
            self._cache.release(seq_id)

    def submit(
        self, seq_id: int, tokens: Iterable[int] | np.ndarray, kind: RequestKind = "prompt"
    ) -> Submitted:
        """Serve a request given as ``seq_id``'s whole token history: decode only what the
        prefix cache cannot supply exactly.

        The cache sets ``seq_id`` up (continue, trim, roll back, copy another sequence's
        cells, restore a checkpoint: :meth:`pymem.reuse.PrefixCache.attach`), then the rest
        is decoded in the chunks its checkpoint policy asks for (every new token checked
        against the oracle when ``check``). ``kind``: ``"prompt"``, ``"generate"`` or
        ``"draft"`` (see the cache). Returns the last token's logits and the counts.
        """
        cache = self.prefix_cache
        toks = as_tokens(tokens)
        t0 = time.perf_counter()
        att = cache.attach(seq_id, toks, kind)
        self.t_ops += time.perf_counter() - t0
        resume = att.resume_from
        if resume:
            self.histories[seq_id] = SeqHistory.plain(toks[:resume].tolist(), self.step)
        else:
            self.histories.pop(seq_id, None)
        last: np.ndarray | None = None
        for p0, p1 in att.chunks:
            out = self.decode(
                {seq_id: toks[p0:p1].tolist()}, label=f"submit {seq_id}", record=False
            )
            last = out[seq_id][-1]
            t0 = time.perf_counter()
            cache.record(seq_id, toks[:p1])
            self.t_ops += time.perf_counter() - t0
        assert last is not None
        return Submitted(last, len(toks) - resume, resume, att)
