"""Batch canonicalisation, validation and the three splitters (``llama_batch_allocr``).

Written from llama-batch.cpp: ``llama_batch_compat::init`` (defaults), then
``llama_batch_allocr::init`` (checks, in the reference's order), then ``split_simple``,
``split_equal(n_ubatch, sequential, n_keep_tail)`` and ``split_seq`` over a ``used``
bitmap. Sequence sets are Python ``frozenset``s, positions plain lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import LLAMA_MAX_SEQ, LLAMA_TOKEN_NULL, SpecAbort, SpecBatchError
from .stdset import unordered_set_order


@dataclass
class BatchIn:
    """What a caller hands to decode: the fields of ``llama_batch`` (None = not given).

    ``pos`` is flat: one position per token for token batches; ``n_pos * n_tokens``
    section-major positions for M-RoPE embedding batches.
    """

    token: list[int] | None = None
    embd: list[list[float]] | None = None
    pos: list[int] | None = None
    seq_id: list[list[int]] | None = None
    logits: list[bool] | None = None

    @property
    def n_tokens(self) -> int:
        if self.token is not None:
            return len(self.token)
        return len(self.embd) if self.embd is not None else 0

    @classmethod
    def from_items(cls, items: list) -> BatchIn:
        """``[token, pos, [seq ids], output]`` per token, as the recorded runs list them."""
        return cls(
            token=[int(it[0]) for it in items],
            pos=[int(it[1]) for it in items],
            seq_id=[[int(s) for s in it[2]] for it in items],
            logits=[bool(it[3]) for it in items],
        )


@dataclass
class Tok:
    """``llama_batch_ext::token``."""

    id: int
    has_embd: bool
    embd: list[float] | None
    output: bool
    seq_ids: list[int]  # unordered_set iteration order
    pos: list[int]  # GGML_MROPE_SECTIONS = 4 entries


def compat(batch: BatchIn, mem, n_seq_max: int, n_pos_per_embd: int) -> list[Tok]:
    """``llama_batch_compat::init``: defaults for missing seq ids, positions, outputs."""
    n = batch.n_tokens
    has_token = batch.token is not None
    has_embd = batch.embd is not None
    pos_next = [(mem.seq_pos_max(s) if mem is not None else -1) + 1 for s in range(n_seq_max)]
    toks = []
    for i in range(n):
        sids = batch.seq_id[i] if batch.seq_id is not None else [0]
        if len(sids) == 0:
            raise SpecAbort(f"token {i} has no sequence id (the reference misbehaves)")
        pos = [0, 0, 0, 0]
        if batch.pos is not None:
            if has_token:
                pos[0] = batch.pos[i]
            else:
                for j in range(n_pos_per_embd):
                    pos[j] = batch.pos[j * n + i]
        else:
            if not 0 <= sids[0] < n_seq_max:
                raise SpecAbort(f"auto position for seq {sids[0]} reads out of bounds")
            pos[0] = pos_next[sids[0]]
            pos_next[sids[0]] += 1
        output = bool(batch.logits[i]) if batch.logits is not None else (i == n - 1)
        toks.append(
            Tok(
                id=batch.token[i] if has_token else LLAMA_TOKEN_NULL,
                has_embd=has_embd,
                embd=list(batch.embd[i]) if has_embd else None,
                output=output,
                seq_ids=unordered_set_order(list(sids)),
                pos=pos,
            )
        )
    return toks


@dataclass
class UBatch:
    """``llama_ubatch`` as plain lists."""

    equal_seqs: bool
    n_tokens: int
    n_seq_tokens: int
    n_seqs: int
    n_seqs_unq: int
    n_pos: int
    token: list[int] | None
    embd: list[list[float]] | None
    pos: list[int]  # n_pos * n_tokens, section-major
    n_seq_id: list[int]
    seq_id: list[list[int]]
    seq_id_unq: list[int]
    seq_idx: dict[int, int]
    output: list[int]
    batch_idxs: list[int]

    def is_pos_2d(self) -> bool:
        return self.n_pos >= 3


def ubatch_reserve(n_seq_tokens: int, n_seqs: int, n_pos: int = 1) -> UBatch:
    """``llama_batch_allocr::ubatch_reserve``: a synthetic ubatch (token 0, pos 0)."""
    n_tokens = n_seq_tokens * n_seqs
    return UBatch(
        equal_seqs=True,
        n_tokens=n_tokens,
        n_seq_tokens=n_seq_tokens,
        n_seqs=n_seqs,
        n_seqs_unq=n_seqs,
        n_pos=n_pos,
        token=[0] * n_tokens,
        embd=None,
        pos=[0] * (n_tokens * n_pos),
        n_seq_id=[0] * n_tokens,
        seq_id=[[] for _ in range(n_tokens)],
        seq_id_unq=list(range(n_seqs)),
        seq_idx={s: s for s in range(n_seqs)},
        output=[0] * n_tokens,
        batch_idxs=list(range(n_tokens)),
    )


@dataclass
class Alloc:
    """A validated batch plus the splitters' state (``llama_batch_allocr``)."""

    n_seq_max: int
    n_pos_per_embd: int
    n_tokens: int
    token: list[int] | None
    embd: list[list[float]] | None
    pos: list[int]
    n_seq_id: list[int]
    seq_id: list[list[int]]
    output: list[int]
    n_outputs: int
    has_cpl: bool
    seq_set: list[frozenset]
    seq_set_map: dict[frozenset, list[int]]
    seq_id_unq: list[int]
    seq_pos: dict[int, set[int]]
    used: list[bool] = field(default_factory=list)
    n_used: int = 0
    out_ids: list[int] = field(default_factory=list)

    def seq_pos_min(self, s: int) -> int:
        return min(self.seq_pos[s]) if self.seq_pos.get(s) else -1

    def seq_pos_max(self, s: int) -> int:
        return max(self.seq_pos[s]) if self.seq_pos.get(s) else -1

    # ------------------------------------------------------------------ splits ---

    def split_reset(self) -> None:
        self.out_ids = []
        self.n_used = 0
        self.used = [False] * self.n_tokens

    def _use(self, idx: int) -> None:
        assert not self.used[idx]
        self.used[idx] = True
        self.n_used += 1

    def split_simple(self, n_ubatch: int) -> UBatch | None:
        cur = 0
        while cur < len(self.used) and self.used[cur]:
            cur += 1
        if cur >= len(self.used):
            return None
        idxs = []
        while True:
            idxs.append(cur)
            self._use(cur)
            cur += 1
            if cur >= len(self.used):
                break
            if len(idxs) >= n_ubatch:
                break
        return self.ubatch_add(idxs, len(idxs), False)

    def split_equal(self, n_ubatch: int, sequential: bool, n_keep_tail: int = 0) -> UBatch | None:
        if sequential and self.has_cpl:
            return None  # "sequential split is not supported when there are coupled sequences"
        cur_sets: list[frozenset] = []
        last_seq_id = -1
        for i in range(self.n_tokens):
            if self.used[i]:
                continue
            add = all(not (s & self.seq_set[i]) for s in cur_sets)
            if sequential:
                add = add and (not cur_sets or self.seq_id[i][0] == last_seq_id + 1)
            if add:
                cur_sets.append(self.seq_set[i])
                last_seq_id = self.seq_id[i][0]
                if len(cur_sets) > n_ubatch:  # quirk: breaks only after n_ubatch + 1 sets
                    break
        n_seqs = len(cur_sets)
        if n_seqs == 0:
            return None
        cur_idx = [0] * n_seqs
        for s in range(n_seqs):
            while self.used[self.seq_set_map[cur_sets[s]][cur_idx[s]]]:
                cur_idx[s] += 1
        per_set: list[list[int]] = [[] for _ in range(n_seqs)]
        while True:
            if any(cur_idx[s] >= len(self.seq_set_map[cur_sets[s]]) for s in range(n_seqs)):
                break
            for s in range(n_seqs):
                idx = self.seq_set_map[cur_sets[s]][cur_idx[s]]
                per_set[s].append(idx)
                self._use(idx)
                cur_idx[s] += 1
            if (len(per_set[0]) + 1) * n_seqs > n_ubatch:
                break

        if n_keep_tail > 0:
            if not n_ubatch > n_keep_tail:
                raise SpecAbort(f"GGML_ASSERT(n_ubatch > n_keep_tail): {n_ubatch} <= {n_keep_tail}")

            def remaining(s: int) -> int:
                return len(self.seq_set_map[cur_sets[s]]) - cur_idx[s]

            n_keep = 0
            while n_keep < n_seqs:
                r = remaining(n_keep)
                if r != 0 and r < n_keep_tail:
                    break
                n_keep += 1
            if n_keep == 0:
                idxs0 = per_set[0]
                members = self.seq_set_map[cur_sets[0]]
                if len(idxs0) + remaining(0) <= n_ubatch:
                    while remaining(0) > 0:
                        idx = members[cur_idx[0]]
                        idxs0.append(idx)
                        self._use(idx)
                        cur_idx[0] += 1
                else:
                    while remaining(0) < n_keep_tail:
                        self.used[idxs0[-1]] = False
                        self.n_used -= 1
                        idxs0.pop()
                        cur_idx[0] -= 1
                n_keep = 1
            for s in range(n_keep, n_seqs):
                for idx in per_set[s]:
                    self.used[idx] = False
                    self.n_used -= 1
            n_seqs = n_keep
        idxs = [idx for s in range(n_seqs) for idx in per_set[s]]
        return self.ubatch_add(idxs, n_seqs, True)

    def split_seq(self, n_ubatch: int) -> UBatch | None:
        cur = 0
        while cur < len(self.used) and self.used[cur]:
            cur += 1
        if cur >= len(self.used):
            return None
        cur_set = self.seq_set[cur]
        idxs = []
        while True:
            idxs.append(cur)
            self._use(cur)
            if len(idxs) >= n_ubatch:
                break
            cur += 1
            while cur < self.n_tokens and (self.used[cur] or not self.seq_set[cur] <= cur_set):
                cur += 1
            if cur == self.n_tokens:
                break
            cur_set = self.seq_set[cur]
        return self.ubatch_add(idxs, 1, True)

    def ubatch_add(self, idxs: list[int], n_seqs: int, equal_seqs: bool) -> UBatch:
        n_tokens = len(idxs)
        assert n_tokens % n_seqs == 0
        n_pos = self.n_pos_per_embd
        pos = [0] * (n_tokens * n_pos)
        seen: set[int] = set()
        for i, idx in enumerate(idxs):
            for j in range(n_pos):
                # token batch: broadcast the one position; embedding batch: copy sections
                src = idx if self.token is not None else j * self.n_tokens + idx
                pos[j * n_tokens + i] = self.pos[src]
            seen.update(self.seq_id[idx])
            if self.output[idx]:
                self.out_ids.append(idx)
        seq_id_unq = [s for s in range(self.n_seq_max) if s in seen]
        return UBatch(
            equal_seqs=equal_seqs,
            n_tokens=n_tokens,
            n_seq_tokens=n_tokens // n_seqs,
            n_seqs=n_seqs,
            n_seqs_unq=len(seq_id_unq),
            n_pos=n_pos,
            token=[self.token[i] for i in idxs] if self.token is not None else None,
            embd=[self.embd[i] for i in idxs] if self.embd is not None else None,
            pos=pos,
            n_seq_id=[self.n_seq_id[i] for i in idxs],
            seq_id=[list(self.seq_id[i]) for i in idxs],
            seq_id_unq=seq_id_unq,
            seq_idx={s: k for k, s in enumerate(seq_id_unq)},
            output=[self.output[i] for i in idxs],
            batch_idxs=list(idxs),
        )


def alloc_init(
    toks: list[Tok],
    mem,
    *,
    n_seq_max: int,
    n_vocab: int,
    n_pos_per_embd: int = 1,
    output_all: bool = False,
) -> Alloc:
    """``llama_batch_allocr::init``: every check in the reference's order."""
    n_tok = len(toks)
    if n_tok == 0:
        raise SpecBatchError("empty", "n_tokens == 0")
    if n_seq_max > LLAMA_MAX_SEQ:
        raise SpecBatchError("n_seq_max", f"n_seq_max = {n_seq_max} > {LLAMA_MAX_SEQ}")
    has_token = toks[0].id != LLAMA_TOKEN_NULL
    has_embd = toks[0].has_embd
    for t in toks[1:]:
        if (t.id != LLAMA_TOKEN_NULL) != has_token or t.has_embd != has_embd:
            raise SpecBatchError(
                "content", "all entries in the batch must have the same content types"
            )
    if not has_token and not has_embd:
        raise SpecBatchError("content", "batch has neither token ids nor embeddings")
    token = None
    if has_token:
        token = []
        for i, t in enumerate(toks):
            if t.id < 0 or t.id >= n_vocab:
                raise SpecBatchError("token", f"invalid token[{i}] = {t.id}")
            token.append(t.id)
    embd = [t.embd for t in toks] if has_embd else None
    if has_token:
        pos = [t.pos[0] for t in toks]
    else:
        pos = [0] * (n_tok * n_pos_per_embd)
        for i, t in enumerate(toks):
            for j in range(n_pos_per_embd):
                pos[j * n_tok + i] = t.pos[j]
    seq_id = [list(t.seq_ids) for t in toks]
    n_seq_id = [len(s) for s in seq_id]
    for i in range(n_tok):
        for k, s in enumerate(seq_id[i]):
            if s < 0 or s >= n_seq_max:
                raise SpecBatchError("seq_id", f"invalid seq_id[{i}][{k}] = {s} >= {n_seq_max}")
    output = [1 if t.output else 0 for t in toks]
    if output_all and not all(output):
        output = [1] * n_tok
    n_outputs = sum(output)

    has_cpl = False
    seq_pos: dict[int, set[int]] = {}
    seq_cpl: set[tuple[int, int]] = set()
    for i in range(n_tok):
        s0 = seq_id[i][0]
        for k, s1 in enumerate(seq_id[i]):
            seq_pos.setdefault(s1, set()).add(pos[i])
            if k > 0:
                seq_cpl.add((s1, s0))
                has_cpl = True
    seq_set = [frozenset(s) for s in seq_id]
    seq_set_map: dict[frozenset, list[int]] = {}
    for i, ss in enumerate(seq_set):
        seq_set_map.setdefault(ss, []).append(i)
    seq_id_unq = sorted({s for ss in seq_set for s in ss})

    alloc = Alloc(
        n_seq_max=n_seq_max,
        n_pos_per_embd=n_pos_per_embd,
        n_tokens=n_tok,
        token=token,
        embd=embd,
        pos=pos,
        n_seq_id=n_seq_id,
        seq_id=seq_id,
        output=output,
        n_outputs=n_outputs,
        has_cpl=has_cpl,
        seq_set=seq_set,
        seq_set_map=seq_set_map,
        seq_id_unq=seq_id_unq,
        seq_pos=seq_pos,
    )

    for s in range(n_seq_max):
        if not seq_pos.get(s):
            continue
        x = mem.seq_pos_max(s) if mem is not None else -1
        y = alloc.seq_pos_min(s)
        if n_pos_per_embd > 1:
            bad = (x >= 0 and x >= y) if has_token else (x >= 0 and x > y)
            if bad:
                rel = "X < Y" if has_token else "X <= Y"
                raise SpecBatchError(
                    "position",
                    f"the tokens of sequence {s} in the input batch have inconsistent "
                    f"sequence positions: X = {x}, Y = {y}, for M-RoPE {rel}",
                )
        else:
            if x >= 0 and y != x + 1:
                raise SpecBatchError(
                    "position",
                    f"the tokens of sequence {s} in the input batch have inconsistent "
                    f"sequence positions: X = {x}, Y = {y}, required Y = X + 1",
                )
            if alloc.seq_pos_max(s) - y + 1 > len(seq_pos[s]):
                raise SpecBatchError("gap", f"sequence {s} positions are not continuous")

    if mem is not None:
        for s0 in range(n_seq_max):
            for s1 in range(n_seq_max):
                if (s0, s1) in seq_cpl and (
                    mem.seq_pos_min(s0) != mem.seq_pos_min(s1)
                    or mem.seq_pos_max(s0) != mem.seq_pos_max(s1)
                ):
                    raise SpecBatchError(
                        "coupled",
                        f"sequence {s0} is coupled to {s1} in the input batch, but have divereged",
                    )

    cur_set: dict[int, frozenset | None] = {}
    cur_pos: dict[int, int] = {}
    for i in range(n_tok):
        for s in seq_id[i]:
            prev = cur_set.get(s)
            cur_set[s] = seq_set[i] if prev is None else (prev & seq_set[i])
            if not cur_set[s]:  # unreachable: a token's set contains s itself
                raise SpecBatchError(
                    "sets", f"sequence {s} belongs to incompatible sequence sets (not allowed)"
                )
            if pos[i] < cur_pos.get(s, -1):
                raise SpecBatchError(
                    "decreasing", f"sequence {s} positions are decreasing (not allowed)"
                )
            cur_pos[s] = pos[i]

    alloc.split_reset()
    return alloc
