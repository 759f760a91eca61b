"""pymem.batch: validation rules, the three splitters and the reference's quirks.

Expectations are hand-worked from llama-batch.cpp (reference version) unless a test says
otherwise. A slow loop-by-loop oracle of ``llama_batch_allocr`` (``Oracle`` below) is
compared with the vectorised allocator on random batches.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from pymem.batch import Batch, BatchAllocator, unordered_set_order
from pymem.errors import BatchError, ConfigError
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

DATA = Path(__file__).parent / "data"


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class FakeMemory:
    """Only what the allocator reads: per-sequence [pos_min, pos_max] (-1 when empty)."""

    def __init__(self, pos: dict[int, tuple[int, int]] | list[list[int]] | None = None) -> None:
        if isinstance(pos, list):
            pos = {s: (p[0], p[1]) for s, p in enumerate(pos)}
        self.pos = pos or {}
        self.calls = 0

    def seq_pos_min(self, s: int) -> int:
        self.calls += 1
        return self.pos.get(s, (-1, -1))[0]

    def seq_pos_max(self, s: int) -> int:
        self.calls += 1
        return self.pos.get(s, (-1, -1))[1]

    def seq_pos_min_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return np.array([self.seq_pos_min(int(s)) for s in seq_ids], dtype=np.int64)

    def seq_pos_max_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return np.array([self.seq_pos_max(int(s)) for s in seq_ids], dtype=np.int64)


def tok_batch(seqs, pos=None, output=None, token=None) -> Batch:
    """A token batch; ``seqs`` is a list of ints or of lists."""
    n = len(seqs)
    sid = [s if isinstance(s, list) else [s] for s in seqs]
    return Batch(
        np.arange(n, dtype=np.int32) if token is None else token,
        pos=None if pos is None else np.asarray(pos, dtype=np.int32),
        seq_id=sid,
        output=output,
    )


def split_all(balloc: BatchAllocator, how: str, n_ubatch: int, *args) -> list[UBatch]:
    balloc.split_reset()
    out = []
    fn = getattr(balloc, how)
    while (ub := fn(n_ubatch, *args)) is not None:
        out.append(ub)
    return out


def idxs(ubs: list[UBatch]) -> list[list[int]]:
    return [ub.batch_idxs.tolist() for ub in ubs]


def rejected(balloc: BatchAllocator, batch: Batch, **kw) -> BatchError:
    with pytest.raises(BatchError) as e:
        balloc.init(batch, **kw)
    return e.value


def check_ubatch(ub: UBatch, balloc: BatchAllocator) -> None:
    """Invariants every ubatch satisfies, whatever the splitter."""
    n = ub.n_tokens
    assert n == ub.n_seq_tokens * ub.n_seqs
    assert ub.n_pos == balloc.n_pos_per_embd
    assert ub.pos.shape == (n * ub.n_pos,) and ub.pos.dtype == np.int32
    assert ub.seq_id.shape[0] == n and ub.seq_id.dtype == np.int32
    assert ub.n_seq_id.tolist() == (ub.seq_id >= 0).sum(axis=1).tolist()
    present = sorted({int(s) for s in ub.seq_id[ub.seq_id >= 0]})
    assert ub.seq_id_unq.tolist() == present and ub.n_seqs_unq == len(present)
    assert ub.seq_idx.shape == (LLAMA_MAX_SEQ,)
    expect_idx = np.full(LLAMA_MAX_SEQ, -1)
    expect_idx[present] = np.arange(len(present))
    assert ub.seq_idx.tolist() == expect_idx.tolist()
    bi = ub.batch_idxs
    assert ub.output.tolist() == balloc.output[bi].tolist()
    assert ub.seq_id.tolist() == balloc.seq_id[bi, : ub.seq_id.shape[1]].tolist()
    if balloc.token is not None:
        assert ub.token.tolist() == balloc.token[bi].tolist()
        for j in range(ub.n_pos):  # token positions broadcast to all sections
            assert ub.pos[j * n : (j + 1) * n].tolist() == balloc.pos[bi].tolist()
    if balloc.embd is not None:
        assert np.array_equal(ub.embd, balloc.embd[bi])
    if ub.equal_seqs:
        # set-major blocks of n_seq_tokens tokens; split_equal gives each block one set,
        # split_seq (one block) sets that only narrow
        sets = [frozenset(r[r >= 0].tolist()) for r in ub.seq_id]
        for blk in range(ub.n_seqs):
            mine = sets[blk * ub.n_seq_tokens : (blk + 1) * ub.n_seq_tokens]
            assert all(b <= a for a, b in itertools.pairwise(mine))
            if ub.n_seqs > 1:
                assert len(set(mine)) == 1
    else:
        assert ub.n_seq_tokens == 1


# --------------------------------------------------------------------------------------
# Oracle: llama_batch_allocr written out loop by loop (slow, obviously sequential)
# --------------------------------------------------------------------------------------


class Oracle:
    """Validation rule and ubatch index lists the reference produces, for canonical seq lists."""

    def __init__(self, seqs: list[list[int]], pos0: list[int], n_pos: int = 1) -> None:
        self.seqs = seqs
        self.sets = [frozenset(s) for s in seqs]
        self.pos0 = pos0
        self.n_pos = n_pos
        self.n = len(seqs)
        self.has_cpl = any(len(s) > 1 for s in seqs)

    def validate(self, n_seq_max: int, mem: FakeMemory | None, emb_only: bool = False):
        seq_pos: dict[int, set[int]] = {}
        cpl: set[tuple[int, int]] = set()
        for ss in self.seqs:
            for s in ss:
                if not 0 <= s < n_seq_max:
                    return "seq_id", s
        for i, ss in enumerate(self.seqs):
            for j, s in enumerate(ss):
                seq_pos.setdefault(s, set()).add(self.pos0[i])
                if j > 0:
                    cpl.add((s, ss[0]))
        for s in range(n_seq_max):
            if s not in seq_pos:
                continue
            x = mem.seq_pos_max(s) if mem else -1
            y, ymax = min(seq_pos[s]), max(seq_pos[s])
            if self.n_pos > 1:
                if x >= 0 and (x > y if emb_only else x >= y):
                    return "pos_memory", s
            else:
                if x >= 0 and y != x + 1:
                    return "pos_memory", s
                if ymax - y + 1 > len(seq_pos[s]):
                    return "pos_gap", s
        if mem:
            for a, c in sorted(cpl):
                if (mem.seq_pos_min(a), mem.seq_pos_max(a)) != (
                    mem.seq_pos_min(c),
                    mem.seq_pos_max(c),
                ):
                    return "coupled", a
        last: dict[int, int] = {}
        inter: dict[int, frozenset[int]] = {}
        for i, ss in enumerate(self.seqs):
            for s in ss:
                inter[s] = inter.get(s, self.sets[i]) & self.sets[i]
                assert inter[s], "the reference's unreachable check fired"
                if self.pos0[i] < last.get(s, -1):
                    return "pos_decreasing", s
                last[s] = self.pos0[i]
        return None

    # splitting ------------------------------------------------------------------------
    def reset(self) -> None:
        self.used = [False] * self.n

    def first_unused(self) -> int:
        i = 0
        while i < self.n and self.used[i]:
            i += 1
        return i

    def simple(self, n_ubatch: int):
        i = self.first_unused()
        if i >= self.n:
            return None
        out = []
        while True:
            out.append(i)
            self.used[i] = True
            i += 1
            if i >= self.n or len(out) >= n_ubatch:
                break
        return out, len(out)

    def members(self, st: frozenset[int]) -> list[int]:
        return [i for i in range(self.n) if self.sets[i] == st]

    def equal(self, n_ubatch: int, sequential: bool, n_keep_tail: int):
        if sequential and self.has_cpl:
            return None
        chosen: list[frozenset[int]] = []
        last = -1
        for i in range(self.n):
            if self.used[i]:
                continue
            ok = all(not (c & self.sets[i]) for c in chosen)
            if sequential:
                ok = ok and (not chosen or self.seqs[i][0] == last + 1)
            if ok:
                chosen.append(self.sets[i])
                last = self.seqs[i][0]
                if len(chosen) > n_ubatch:
                    break
        if not chosen:
            return None
        lists = [self.members(c) for c in chosen]
        cur = []
        for lst in lists:
            k = 0
            while self.used[lst[k]]:
                k += 1
            cur.append(k)
        per = [[] for _ in chosen]
        while all(cur[s] < len(lists[s]) for s in range(len(chosen))):
            for s in range(len(chosen)):
                t = lists[s][cur[s]]
                per[s].append(t)
                self.used[t] = True
                cur[s] += 1
            if (len(per[0]) + 1) * len(chosen) > n_ubatch:
                break
        n_seqs = len(chosen)
        if n_keep_tail > 0:

            def remaining(s: int) -> int:
                return len(lists[s]) - cur[s]

            keep = 0
            while keep < n_seqs and not (0 < remaining(keep) < n_keep_tail):
                keep += 1
            if keep == 0:
                if len(per[0]) + remaining(0) <= n_ubatch:
                    while remaining(0) > 0:
                        t = lists[0][cur[0]]
                        per[0].append(t)
                        self.used[t] = True
                        cur[0] += 1
                else:
                    while remaining(0) < n_keep_tail:
                        self.used[per[0].pop()] = False
                        cur[0] -= 1
                keep = 1
            for s in range(keep, n_seqs):
                for t in per[s]:
                    self.used[t] = False
            n_seqs = keep
        return [t for s in range(n_seqs) for t in per[s]], n_seqs

    def seq(self, n_ubatch: int):
        i = self.first_unused()
        if i >= self.n:
            return None
        cur = self.sets[i]
        out = []
        while True:
            out.append(i)
            self.used[i] = True
            if len(out) >= n_ubatch:
                break
            i += 1
            while i < self.n and (self.used[i] or not self.sets[i] <= cur):
                i += 1
            if i == self.n:
                break
            cur = self.sets[i]
        return out, 1

    def run(self, how: str, n_ubatch: int, *args):
        self.reset()
        res = []
        while (r := getattr(self, how)(n_ubatch, *args)) is not None:
            res.append(r)
        return res, sum(self.used)


# --------------------------------------------------------------------------------------
# libstdc++ unordered_set order (decides seq_id[i][0] for coupled tokens)
# --------------------------------------------------------------------------------------


def test_unordered_set_order_matches_libstdcxx_vectors():
    # vectors produced by tests/data/unordered_set_order.cpp compiled with g++ 12
    data = json.loads((DATA / "unordered_set_order.json").read_text())
    assert len(data["cases"]) > 300
    for case in data["cases"]:
        assert list(unordered_set_order(tuple(case["insert"]))) == case["order"], case["insert"]


def test_unordered_set_order_small_cases():
    assert unordered_set_order((2, 3)) == (3, 2)
    assert unordered_set_order((0, 1, 13)) == (1, 13, 0)  # 0 and 13 share a bucket
    assert unordered_set_order((5, 5, 1)) == (1, 5)
    assert unordered_set_order((7,)) == (7,)


def test_coupled_token_primary_sequence_is_reference_order():
    # [2, 3] as given by the caller is [3, 2] in the reference: seq 3 is seq_id[i][0]
    balloc = BatchAllocator()
    balloc.init(tok_batch([[2, 3], [2, 3], 0], pos=[0, 1, 0]), n_seq_max=4)
    assert balloc.seq_id.tolist() == [[3, 2], [3, 2], [0, -1]]
    assert balloc.n_seq_id.tolist() == [2, 2, 1]
    ub = split_all(balloc, "split_simple", 8)[0]
    assert ub.seq_id.tolist() == [[3, 2], [3, 2], [0, -1]]
    assert ub.seq_id0.tolist() == [3, 3, 0]


def test_duplicate_seq_ids_collapse():
    balloc = BatchAllocator()
    balloc.init(tok_batch([[1, 1], [1]], pos=[0, 1]), n_seq_max=2)
    assert not balloc.has_cpl
    assert balloc.seq_id.tolist() == [[1], [1]] and balloc.n_seq_id.tolist() == [1, 1]


# --------------------------------------------------------------------------------------
# Batch construction
# --------------------------------------------------------------------------------------


def test_batch_is_zero_copy_for_right_dtypes():
    token = np.array([5, 6, 7], dtype=np.int32)
    pos = np.array([0, 1, 2], dtype=np.int32)
    sid = np.array([0, 0, 1], dtype=np.int32)
    out = np.array([0, 0, 1], dtype=np.int8)
    b = Batch(token, pos=pos, seq_id=sid, output=out)
    assert b.token is token and b.pos is pos and b.output is out
    assert np.shares_memory(b.seq_id, sid) and b.seq_id.shape == (3, 1)
    embd = np.zeros((3, 8), dtype=np.float32)
    e = Batch.from_embd(embd)
    assert e.embd is embd and e.token is None and e.n_embd == 8
    # other dtypes are converted
    b64 = Batch(token.astype(np.int64), pos=[0, 1, 2])
    assert b64.token.dtype == np.int32 and b64.pos.dtype == np.int32


def test_batch_seq_id_forms():
    m = Batch([1, 2], seq_id=np.array([[0, 1], [2, -1]]))
    assert m.n_seq_id.tolist() == [2, 1]
    ll = Batch([1, 2], seq_id=[[0, 1], [2]])
    assert ll.seq_id.tolist() == [[0, 1], [2, -1]] and ll.n_seq_id.tolist() == [2, 1]
    d = Batch([1, 2])
    assert d.seq_id.tolist() == [[0], [0]]
    items = Batch.from_items([(11, 0, [0], False), (42, 1, [0, 1], True)])
    assert items.token.tolist() == [11, 42] and items.pos.tolist() == [0, 1]
    assert items.seq_id.tolist() == [[0, -1], [0, 1]] and items.output.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"token": [1.5, 2.0]}, "dtype"),
        ({"token": [[1, 2]]}, "shape"),
        ({"token": [1, 2], "pos": [0.0, 1.0]}, "dtype"),
        ({"token": [1, 2], "seq_id": [0]}, "shape"),
        ({"token": [1, 2], "output": [1]}, "shape"),
        ({"token": [1, 2], "output": [0.5, 1.0]}, "dtype"),
        ({"token": [1, 2], "embd": np.zeros((3, 4))}, "shape"),
        ({"embd": np.zeros(4)}, "shape"),
        ({"embd": np.zeros((2, 4), dtype=np.int32)}, "dtype"),
        ({"token": np.array([2**40, 1])}, "range"),
        ({}, "content"),
    ],
)
def test_batch_constructor_rejects_bad_arrays(kwargs, rule):
    token = kwargs.pop("token", None)
    with pytest.raises(BatchError) as e:
        Batch(token, **kwargs)
    assert e.value.rule == rule


# --------------------------------------------------------------------------------------
# validation rules, one by one (accepted and rejected)
# --------------------------------------------------------------------------------------


def test_empty_batch_rejected():
    e = rejected(BatchAllocator(), Batch(np.zeros(0, dtype=np.int32)), n_seq_max=1)
    assert e.rule == "empty" and "n_tokens == 0" in str(e)


def test_embd_width_checked_against_n_embd():
    balloc = BatchAllocator()
    b = Batch.from_embd(np.ones((2, 4), dtype=np.float32), pos=[0, 1])
    balloc.init(b, n_seq_max=1, n_embd=4)
    e = rejected(balloc, b, n_seq_max=1, n_embd=8)
    assert e.rule == "embd_width" and e.value == 4


def test_n_seq_max_bound():
    b = tok_batch([0], pos=[0])
    BatchAllocator().init(b, n_seq_max=LLAMA_MAX_SEQ)
    e = rejected(BatchAllocator(), b, n_seq_max=LLAMA_MAX_SEQ + 1)
    assert e.rule == "n_seq_max" and e.value == 257


def test_content_kinds():
    balloc = BatchAllocator()
    # some entries with a token, some without (LLAMA_TOKEN_NULL)
    e = rejected(balloc, Batch([3, -1, 4], pos=[0, 1, 2]), n_seq_max=1)
    assert e.rule == "content" and e.token == 1
    assert "same content types" in str(e)
    e = rejected(balloc, Batch([-1, -1], pos=[0, 1]), n_seq_max=1)
    assert e.rule == "content" and "neither token ids nor embeddings" in str(e)
    # all LLAMA_TOKEN_NULL with embeddings: an embedding batch
    balloc.init(Batch([-1, -1], embd=np.ones((2, 3)), pos=[0, 1]), n_seq_max=1)
    assert balloc.token is None and balloc.embd.shape == (2, 3)
    # tokens and embeddings together (MTP hook batches) are one content kind
    balloc.init(Batch([1, 2], embd=np.ones((2, 3)), pos=[0, 1]), n_seq_max=1)
    assert balloc.token.tolist() == [1, 2] and balloc.embd is not None


def test_token_range():
    balloc = BatchAllocator()
    balloc.init(tok_batch([0, 0], pos=[0, 1], token=[0, 63]), n_seq_max=1, n_vocab=64)
    e = rejected(balloc, tok_batch([0, 0], pos=[0, 1], token=[0, 64]), n_seq_max=1, n_vocab=64)
    assert (e.rule, e.token, e.value) == ("token", 1, 64)
    assert "invalid token[1] = 64" in str(e)
    e = rejected(balloc, tok_batch([0], pos=[0], token=[-5]), n_seq_max=1)
    assert (e.rule, e.value) == ("token", -5)


def test_seq_id_range():
    balloc = BatchAllocator()
    balloc.init(tok_batch([0, 3], pos=[0, 0]), n_seq_max=4)
    e = rejected(balloc, tok_batch([0, [1, 4]], pos=[0, 0]), n_seq_max=4)
    assert (e.rule, e.token, e.seq_id) == ("seq_id", 1, 4)
    assert "invalid seq_id[1][1] = 4 >= 4" in str(e)
    e = rejected(balloc, Batch([1, 2], seq_id=np.array([0, -3])), n_seq_max=4)
    assert (e.rule, e.token, e.value) == ("seq_id", 1, -3)
    e = rejected(balloc, Batch([1, 2], seq_id=[[0], []]), n_seq_max=4)
    assert (e.rule, e.token) == ("seq_id", 1) and "no sequence id" in str(e)


def test_positions_must_continue_memory():
    balloc = BatchAllocator()
    mem = FakeMemory({0: (0, 9), 1: (0, 4)})
    balloc.init(tok_batch([0, 1, 2], pos=[10, 5, 0]), memory=mem, n_seq_max=4)
    e = rejected(balloc, tok_batch([0, 1], pos=[10, 6]), memory=mem, n_seq_max=4)
    assert (e.rule, e.seq_id, e.value, e.token) == ("pos_memory", 1, 6, 1)
    msg = str(e)
    assert "sequence 1 in the input batch have inconsistent sequence positions" in msg
    assert "X = 4" in msg and "Y = 6" in msg and "Y = X + 1" in msg
    # overlapping the memory is refused too
    e = rejected(balloc, tok_batch([0], pos=[9]), memory=mem, n_seq_max=4)
    assert (e.rule, e.seq_id) == ("pos_memory", 0)
    # the accepted batch above is still the one held
    assert balloc.n_tokens == 3 and balloc.seq_pos_max(0) == 10


def test_positions_without_gaps_duplicates_allowed():
    balloc = BatchAllocator()
    balloc.init(tok_batch([0, 0, 0], pos=[0, 0, 1]), n_seq_max=1)  # duplicates are fine
    assert (balloc.seq_pos_min(0), balloc.seq_pos_max(0)) == (0, 1)
    e = rejected(balloc, tok_batch([0, 0, 1, 1], pos=[0, 1, 0, 2]), n_seq_max=2)
    assert (e.rule, e.seq_id, e.token, e.value) == ("pos_gap", 1, 3, 2)
    assert "sequence 1 positions are not continuous" in str(e)


def test_positions_first_failing_sequence_is_reported():
    # seq 0 has a gap, seq 1 a memory mismatch: the reference checks seq 0 first
    mem = FakeMemory({1: (0, 3)})
    e = rejected(BatchAllocator(), tok_batch([0, 0, 1], pos=[0, 2, 7]), memory=mem, n_seq_max=2)
    assert (e.rule, e.seq_id) == ("pos_gap", 0)


def test_mrope_position_rules():
    mem = FakeMemory({0: (0, 4)})
    tok = BatchAllocator(n_pos_per_embd=4)
    # tokens: positions may jump forward but must exceed the memory (X < Y)
    tok.init(tok_batch([0, 0], pos=[9, 20]), memory=mem, n_seq_max=1)
    e = rejected(tok, tok_batch([0], pos=[4]), memory=mem, n_seq_max=1)
    assert e.rule == "pos_memory" and "X < Y" in str(e)
    # embeddings may overlap the last position (X <= Y)
    emb = BatchAllocator(n_pos_per_embd=4)
    pos = np.array([4, 5, 1, 1, 2, 3, 0, 0], dtype=np.int32)  # section-major, 2 tokens
    emb.init(Batch.from_embd(np.ones((2, 3)), pos=pos), memory=mem, n_seq_max=1)
    pos[:2] = [3, 5]
    e = rejected(emb, Batch.from_embd(np.ones((2, 3)), pos=pos), memory=mem, n_seq_max=1)
    assert e.rule == "pos_memory" and "X <= Y" in str(e)


def test_coupled_sequences_must_agree_in_memory():
    balloc = BatchAllocator()
    same = FakeMemory({2: (0, 3), 3: (0, 3)})
    balloc.init(tok_batch([[2, 3], [2, 3]], pos=[4, 5]), memory=same, n_seq_max=4)
    assert balloc.has_cpl
    differ = FakeMemory({2: (0, 3), 3: (1, 3)})
    e = rejected(balloc, tok_batch([[2, 3], [2, 3]], pos=[4, 5]), memory=differ, n_seq_max=4)
    # canonical order [3, 2]: seq 2 is coupled to 3
    assert (e.rule, e.seq_id, e.token) == ("coupled", 2, 0)
    assert "sequence 2 is coupled to 3 in the input batch, but have divereged" in str(e)
    # without a memory the rule does not apply
    balloc.init(tok_batch([[2, 3]], pos=[4]), n_seq_max=4)


def test_positions_must_not_decrease():
    # the reference's example: pos 4 5 0 1 6 2 3 with seqs 0 0 1 1 0 1 0 -> token 6 fails
    b = tok_batch([0, 0, 1, 1, 0, 1, 0], pos=[4, 5, 0, 1, 6, 2, 3])
    e = rejected(BatchAllocator(n_pos_per_embd=4), b, n_seq_max=2)
    assert (e.rule, e.seq_id, e.token, e.value) == ("pos_decreasing", 0, 6, 3)
    assert "sequence 0 positions are decreasing (not allowed)" in str(e)
    # within the no-gap rule (1-D positions) a swap is caught here too
    e = rejected(BatchAllocator(), tok_batch([0, 0], pos=[1, 0]), n_seq_max=1)
    assert (e.rule, e.token) == ("pos_decreasing", 1)


def test_incompatible_sequence_sets_accepted_like_the_reference():
    # quirk: the reference's "incompatible sequence sets" check cannot fire; the batch in
    # its own comment (sets {0,1,2}, {0,1,2}, {1,2}) is accepted, and so is it here
    balloc = BatchAllocator()
    balloc.init(tok_batch([[0, 1, 2], [0, 1, 2], [1, 2]], pos=[0, 1, 2]), n_seq_max=3)
    assert balloc.n_tokens == 3 and balloc.has_cpl


def test_negative_positions_and_nonfinite_embeddings_rejected():
    # checks the reference lacks
    e = rejected(BatchAllocator(), tok_batch([0, 0], pos=[-2, -1]), n_seq_max=1)
    assert (e.rule, e.token, e.value) == ("pos", 0, -2)
    embd = np.ones((2, 3), dtype=np.float32)
    embd[1, 2] = np.nan
    e = rejected(BatchAllocator(), Batch.from_embd(embd, pos=[0, 1]), n_seq_max=1)
    assert (e.rule, e.token) == ("embd", 1) and "embd[1][2]" in str(e)
    embd[1, 2] = np.inf
    assert rejected(BatchAllocator(), Batch.from_embd(embd), n_seq_max=1).rule == "embd"
    # an M-RoPE embedding batch needs every section
    e = rejected(BatchAllocator(4), Batch.from_embd(np.ones((2, 3)), pos=[0, 1]), n_seq_max=1)
    assert e.rule == "pos"
    e = rejected(BatchAllocator(), tok_batch([0, 0], pos=[0, 1, 2]), n_seq_max=1)
    assert e.rule == "pos"


def test_rejected_batch_keeps_previous_state():
    balloc = BatchAllocator()
    balloc.init(tok_batch([0, 1, 0], pos=[0, 0, 1]), n_seq_max=2)
    first = balloc.split_simple(2)
    assert first.batch_idxs.tolist() == [0, 1] and balloc.n_used == 2
    with pytest.raises(BatchError):
        balloc.init(tok_batch([0, 0], pos=[0, 5]), n_seq_max=2)
    assert balloc.n_tokens == 3 and balloc.n_used == 2
    assert balloc.split_simple(2).batch_idxs.tolist() == [2]


# --------------------------------------------------------------------------------------
# defaults: positions, outputs
# --------------------------------------------------------------------------------------


def test_auto_positions_continue_memory_per_first_seq():
    mem = FakeMemory({0: (0, 4), 2: (3, 7)})
    balloc = BatchAllocator()
    # tokens of seq 0, 1, 0, then a coupled one whose first *given* id is 2
    balloc.init(
        tok_batch([0, 1, 0, [2, 3]]), memory=FakeMemory({**mem.pos, 3: (3, 7)}), n_seq_max=4
    )
    assert balloc.pos.tolist() == [5, 0, 6, 8]
    # no memory: positions start at 0
    balloc.init(tok_batch([1, 1, 0]), n_seq_max=2)
    assert balloc.pos.tolist() == [0, 1, 0]
    # an embedding M-RoPE batch gets section 0 only; other sections are 0
    emb = BatchAllocator(n_pos_per_embd=3)
    emb.init(Batch.from_embd(np.ones((2, 2))), memory=mem, n_seq_max=1)
    assert emb.pos.tolist() == [5, 6, 0, 0, 0, 0]


def test_output_defaults():
    balloc = BatchAllocator()
    balloc.init(tok_batch([0, 0, 0], pos=[0, 1, 2]), n_seq_max=1)
    assert balloc.output.tolist() == [0, 0, 1] and balloc.n_outputs == 1
    balloc.init(tok_batch([0, 0, 0], pos=[0, 1, 2]), n_seq_max=1, output_all=True)
    assert balloc.output.tolist() == [1, 1, 1] and balloc.n_outputs == 3
    balloc.init(tok_batch([0, 0], pos=[0, 1], output=np.array([3, 0])), n_seq_max=1)
    assert balloc.output.tolist() == [1, 0]


# --------------------------------------------------------------------------------------
# splitters, hand-worked
# --------------------------------------------------------------------------------------

# seq ids [0, 1, 0, 1, 2, 0]: seq 0 at tokens 0, 2, 5; seq 1 at 1, 3; seq 2 at 4
INTERLEAVED = ([0, 1, 0, 1, 2, 0], [0, 0, 1, 1, 0, 2])


def interleaved(n_pos: int = 1) -> BatchAllocator:
    balloc = BatchAllocator(n_pos)
    balloc.init(tok_batch(*INTERLEAVED), n_seq_max=4)
    return balloc


def test_split_simple():
    balloc = interleaved()
    ubs = split_all(balloc, "split_simple", 4)
    assert idxs(ubs) == [[0, 1, 2, 3], [4, 5]]
    ub = ubs[0]
    assert (ub.equal_seqs, ub.n_seq_tokens, ub.n_seqs, ub.n_seqs_unq) == (False, 1, 4, 2)
    assert ub.seq_id_unq.tolist() == [0, 1] and ub.seq_idx[:3].tolist() == [0, 1, -1]
    assert balloc.n_used == 6
    for ub in ubs:
        check_ubatch(ub, balloc)


def test_split_equal_interleaved():
    balloc = interleaved()
    ubs = split_all(balloc, "split_equal", 4, False, 0)
    assert idxs(ubs) == [[0, 1, 4], [2, 3], [5]]
    assert [(u.n_seqs, u.n_seq_tokens) for u in ubs] == [(3, 1), (2, 1), (1, 1)]
    # a bigger ubatch changes nothing: seq 2 (then seq 1) has a single token left
    ubs = split_all(balloc, "split_equal", 8, False, 0)
    assert idxs(ubs) == [[0, 1, 4], [2, 3], [5]]
    for ub in ubs:
        check_ubatch(ub, balloc)


def test_split_equal_rounds_are_set_major():
    # seq 0: tokens 0..3, seq 1: tokens 4..7; n_ubatch 6 -> 3 rounds each, set-major
    balloc = BatchAllocator()
    balloc.init(tok_batch([0] * 4 + [1] * 4, pos=[0, 1, 2, 3] * 2), n_seq_max=2)
    ubs = split_all(balloc, "split_equal", 6, True, 0)
    assert idxs(ubs) == [[0, 1, 2, 4, 5, 6], [3, 7]]
    assert (ubs[0].n_seqs, ubs[0].n_seq_tokens, ubs[0].equal_seqs) == (2, 3, True)
    assert ubs[0].pos.tolist() == [0, 1, 2, 0, 1, 2]
    assert balloc.output.tolist() == [0] * 7 + [1]  # default: the last token only
    assert balloc.out_ids.tolist() == [7]


def test_split_equal_quirk_n_ubatch_plus_one():
    # quirk: more than n_ubatch disjoint sets -> n_ubatch + 1 tokens in one ubatch
    balloc = BatchAllocator()
    balloc.init(tok_batch([0, 1, 2, 3], pos=[0, 0, 0, 0]), n_seq_max=4)
    ubs = split_all(balloc, "split_equal", 2, True, 0)
    assert idxs(ubs) == [[0, 1, 2], [3]]
    assert ubs[0].n_tokens == 3 and ubs[0].n_seqs == 3
    assert idxs(split_all(balloc, "split_equal", 1, False, 0)) == [[0, 1], [2, 3]]
    # split_simple and split_seq respect n_ubatch
    assert idxs(split_all(balloc, "split_simple", 2)) == [[0, 1], [2, 3]]


def test_split_equal_sequential_needs_consecutive_seq_ids():
    balloc = BatchAllocator()
    balloc.init(tok_batch([1, 0, 1, 2], pos=[0, 0, 1, 0]), n_seq_max=4)
    assert idxs(split_all(balloc, "split_equal", 4, True, 0)) == [[0, 3], [1, 2]]
    assert idxs(split_all(balloc, "split_equal", 4, False, 0)) == [[0, 1, 3], [2]]
    # seq 2 is accepted at its *second* token, after seq 1 moved the chain on
    balloc.init(tok_batch([0, 2, 1, 2], pos=[0, 0, 0, 1]), n_seq_max=4)
    ubs = split_all(balloc, "split_equal", 4, True, 0)
    assert idxs(ubs) == [[0, 2, 1], [3]]
    assert ubs[0].seq_id0.tolist() == [0, 1, 2]


def test_split_all_collects_one_splitter_or_fails():
    # the memories' split loop: every ubatch of one splitter, after a reset
    balloc = interleaved()
    balloc.split_simple(4)  # a pass in progress is forgotten
    ubs = balloc.split_all(lambda: balloc.split_equal(4, False, 0))
    assert ubs is not None and idxs(ubs) == [[0, 1, 4], [2, 3], [5]] and balloc.n_used == 6
    # tokens left unused: a sequential split of coupled sequences takes nothing
    balloc = BatchAllocator()
    balloc.init(tok_batch([[0, 1], 0, 1], pos=[0, 1, 1]), n_seq_max=2)
    assert balloc.split_all(lambda: balloc.split_equal(4, True, 0)) is None
    assert balloc.n_used == 0
    # a splitter that stops before every token is used
    balloc = interleaved()
    calls = iter([balloc.split_simple, lambda n: None])
    assert balloc.split_all(lambda: next(calls)(2)) is None and balloc.n_used == 2


def test_split_equal_keep_tail():
    # seq 0: tokens 0..4, seq 1: tokens 5..7; n_ubatch 4, keep the last 2 together
    balloc = BatchAllocator()
    balloc.init(tok_batch([0] * 5 + [1] * 3, pos=[0, 1, 2, 3, 4, 0, 1, 2]), n_seq_max=2)
    assert idxs(split_all(balloc, "split_equal", 4, True, 0)) == [[0, 1, 5, 6], [2, 7], [3, 4]]
    # set 1 would leave 1 token behind -> deferred; then seq 0 is finished alone
    assert idxs(split_all(balloc, "split_equal", 4, True, 2)) == [[0, 1], [2, 3, 4], [5, 6, 7]]
    # too long to finish: truncate so that exactly n_keep_tail tokens remain
    balloc.init(tok_batch([0] * 4, pos=[0, 1, 2, 3]), n_seq_max=1)
    assert idxs(split_all(balloc, "split_equal", 3, True, 2)) == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError):
        balloc.split_equal(2, True, 2)


def test_split_seq_narrows_to_subsets():
    balloc = interleaved()
    assert idxs(split_all(balloc, "split_seq", 4)) == [[0, 2, 5], [1, 3], [4]]
    assert idxs(split_all(balloc, "split_seq", 2)) == [[0, 2], [1, 3], [4], [5]]
    # shared prompt {0,1} then seq-specific tokens: the prompt narrows to {0}
    balloc.init(tok_batch([[0, 1]] * 3 + [0, 1], pos=[0, 1, 2, 3, 3]), n_seq_max=2)
    ubs = split_all(balloc, "split_seq", 8)
    assert idxs(ubs) == [[0, 1, 2, 3], [4]]
    assert (ubs[0].n_seqs, ubs[0].n_seq_tokens, ubs[0].n_seqs_unq) == (1, 4, 2)
    for ub in ubs:
        check_ubatch(ub, balloc)


def test_coupled_batch_splits():
    balloc = BatchAllocator()
    balloc.init(tok_batch([[0, 1]] * 3 + [0, 1], pos=[0, 1, 2, 3, 3]), n_seq_max=2)
    assert balloc.has_cpl
    ubs = split_all(balloc, "split_equal", 8, False, 0)
    assert idxs(ubs) == [[0, 1, 2], [3, 4]]
    assert ubs[0].seq_id.tolist() == [[1, 0]] * 3 and ubs[1].seq_id.tolist() == [[0], [1]]
    # sequential split of coupled sequences fails: no ubatch, n_used < n_tokens
    assert split_all(balloc, "split_equal", 8, True, 0) == []
    assert balloc.n_used == 0 < balloc.n_tokens
    assert idxs(split_all(balloc, "split_simple", 8)) == [[0, 1, 2, 3, 4]]


def test_out_ids_follow_ubatch_order():
    balloc = BatchAllocator()
    b = tok_batch(*INTERLEAVED, output=np.array([1, 1, 0, 1, 1, 1], dtype=np.bool_))
    balloc.init(b, n_seq_max=4)
    split_all(balloc, "split_equal", 4, False, 0)  # [[0, 1, 4], [2, 3], [5]]
    assert balloc.out_ids.tolist() == [0, 1, 4, 3, 5]
    split_all(balloc, "split_seq", 4)  # [[0, 2, 5], [1, 3], [4]]
    assert balloc.out_ids.tolist() == [0, 5, 1, 3, 4]


def test_embedding_and_mrope_ubatches():
    n_pos = 3
    embd = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    seqs, p0 = INTERLEAVED
    pos = np.concatenate([p0, np.arange(6) + 100, np.arange(6) + 200]).astype(np.int32)
    balloc = BatchAllocator(n_pos)
    balloc.init(Batch.from_embd(embd, pos=pos, seq_id=np.array(seqs)), n_seq_max=4)
    ubs = split_all(balloc, "split_equal", 4, False, 0)
    assert idxs(ubs) == [[0, 1, 4], [2, 3], [5]]
    ub = ubs[0]
    assert ub.token is None and ub.embd.tolist() == [[0, 1], [2, 3], [8, 9]]
    # section-major: all section-0 positions, then section 1, then section 2
    assert ub.pos.tolist() == [0, 0, 0, 100, 101, 104, 200, 201, 204]
    assert ub.is_pos_2d()
    for u in ubs:
        check_ubatch(u, balloc)
    # token batch with M-RoPE: one position broadcast to every section
    tok = interleaved(n_pos)
    ub = split_all(tok, "split_simple", 2)[0]
    assert ub.pos.tolist() == [0, 0, 0, 0, 0, 0]
    ub = split_all(tok, "split_seq", 3)[0]
    assert ub.pos.tolist() == [0, 1, 2] * 3


def test_splitter_usage_errors():
    balloc = BatchAllocator()
    with pytest.raises(BatchError):
        balloc.split_simple(4)  # before init
    balloc.init(tok_batch(*INTERLEAVED), n_seq_max=4)
    with pytest.raises(ConfigError):
        balloc.split_simple(0)
    balloc.split_reset()
    balloc.split_simple(2)
    with pytest.raises(BatchError):
        balloc.split_equal(2, False)  # mixing splitters in one pass
    balloc.split_reset()
    assert balloc.split_equal(2, False) is not None
    with pytest.raises(ConfigError):
        BatchAllocator(n_pos_per_embd=5)


def test_ubatch_reserve_shape():
    ub = UBatch.reserve(4, 2)
    assert (ub.n_tokens, ub.n_seq_tokens, ub.n_seqs, ub.equal_seqs) == (8, 4, 2, True)


# --------------------------------------------------------------------------------------
# differential tests against the oracle
# --------------------------------------------------------------------------------------


def random_sets(rng: random.Random, n: int, n_seq: int, p_multi: float) -> list[list[int]]:
    out = []
    for _ in range(n):
        if rng.random() < p_multi:
            k = rng.randint(2, min(3, n_seq)) if n_seq > 1 else 1
            out.append(rng.sample(range(n_seq), k))
        else:
            out.append([rng.randrange(n_seq)])
    return out


@pytest.mark.parametrize("seed", range(60))
def test_splitters_match_oracle(seed):
    rng = random.Random(seed)
    n_seq = rng.choice([1, 2, 3, 4, 6, 8])
    n = rng.randint(1, 40)
    p_multi = rng.choice([0.0, 0.0, 0.2, 0.5])
    raw = random_sets(rng, n, n_seq, p_multi)
    if rng.random() < 0.5:  # grouped by sequence instead of interleaved
        raw.sort(key=lambda s: s[0])
    # M-RoPE token batch without memory: any non-decreasing positions are accepted
    balloc = BatchAllocator(n_pos_per_embd=4)
    balloc.init(tok_batch(raw, pos=list(range(n))), n_seq_max=n_seq)
    canon = [list(unordered_set_order(tuple(s))) for s in raw]
    assert [r[r >= 0].tolist() for r in balloc.seq_id] == canon
    oracle = Oracle(canon, list(range(n)), n_pos=4)
    for n_ubatch in (1, 2, 3, 5, 8, 64):
        cases = [("split_simple", ()), ("split_seq", ())]
        cases += [("split_equal", (seq, 0)) for seq in (False, True)]
        cases += [("split_equal", (seq, k)) for seq in (False, True) for k in (1, 2, 3)]
        for how, args in cases:
            if args and args[1] and n_ubatch <= args[1]:
                continue
            want, want_used = oracle.run(how.removeprefix("split_"), n_ubatch, *args)
            ubs = split_all(balloc, how, n_ubatch, *args)
            assert [(u.batch_idxs.tolist(), u.n_seqs) for u in ubs] == [
                (list(w), s) for w, s in want
            ], (how, n_ubatch, args, raw)
            assert balloc.n_used == want_used
            for ub in ubs:
                check_ubatch(ub, balloc)


def random_positions(rng: random.Random, seqs: list[list[int]], n_seq: int):
    """Mostly valid positions (per first seq, continuing a random memory), sometimes broken."""
    mem = {}
    for s in range(n_seq):
        if rng.random() < 0.6:
            hi = rng.randint(0, 9)
            mem[s] = (rng.randint(0, hi), hi)
    nxt = {s: mem.get(s, (-1, -1))[1] + 1 for s in range(n_seq)}
    pos = []
    for ss in seqs:
        p = max(nxt[s] for s in ss)
        for s in ss:
            nxt[s] = p + 1
        pos.append(p)
    r = rng.random()
    if r < 0.2 and pos:
        pos[rng.randrange(len(pos))] += rng.choice([-2, -1, 1, 2])
    elif r < 0.3 and len(pos) > 1:
        i = rng.randrange(len(pos) - 1)
        pos[i], pos[i + 1] = pos[i + 1], pos[i]
    elif r < 0.4:
        s = rng.randrange(n_seq)
        mem[s] = (mem.get(s, (0, 0))[0], rng.randint(0, 9))
    pos = [max(p, 0) for p in pos]
    return pos, FakeMemory(mem)


@pytest.mark.parametrize("seed", range(150))
def test_validation_matches_oracle(seed):
    rng = random.Random(1000 + seed)
    n_seq = rng.choice([1, 2, 3, 4])
    n = rng.randint(1, 12)
    raw = random_sets(rng, n, n_seq, rng.choice([0.0, 0.3]))
    pos, mem = random_positions(rng, raw, n_seq)
    n_pos = rng.choice([1, 1, 4])
    canon = [list(unordered_set_order(tuple(s))) for s in raw]
    want = Oracle(canon, pos, n_pos).validate(n_seq, mem)
    balloc = BatchAllocator(n_pos)
    try:
        balloc.init(tok_batch(raw, pos=pos), memory=mem, n_seq_max=n_seq)
        got = None
    except BatchError as e:
        got = (e.rule, e.seq_id)
    assert got == want, (raw, pos, mem.pos)


# --------------------------------------------------------------------------------------
# the recorded runs of the real llama.cpp
# --------------------------------------------------------------------------------------

RUNS = ["llama.main.fa0.u1", "mamba.main.u1", "jamba.main.fa1.u0"]


@pytest.mark.parametrize("run", RUNS)
def test_recorded_runs_accept_and_reject_like_the_reference(run):
    data = json.loads((DATA / "runs" / f"{run}.json").read_text())
    n_seq_max = data["context_params"]["n_seq_max"]
    assert n_seq_max == 4
    balloc = BatchAllocator()
    prev_pos = None
    n_checked = n_rejected = 0
    for step in data["steps"]:
        if step["op"] == "decode":
            assert prev_pos is not None
            mem = FakeMemory(prev_pos)
            batch = Batch.from_items(step["items"])
            if step["result"] == -1:
                with pytest.raises(BatchError) as e:
                    balloc.init(batch, memory=mem, n_seq_max=n_seq_max, n_vocab=64)
                # the recorded invalid batch skips positions: seq 0 at 15 after 12
                assert (e.value.rule, e.value.seq_id, e.value.value) == ("pos_memory", 0, 15)
                n_rejected += 1
            else:
                balloc.init(batch, memory=mem, n_seq_max=n_seq_max, n_vocab=64)
                assert balloc.n_tokens == len(step["items"])
                assert balloc.n_outputs == sum(1 for it in step["items"] if it[3])
                # every splitter places every token (or fails the coupled sequential way)
                for how, args in [("split_simple", ()), ("split_equal", (False, 0))]:
                    split_all(balloc, how, data["context_params"]["n_ubatch"], *args)
                    assert balloc.n_used == balloc.n_tokens
                split_all(balloc, "split_equal", data["context_params"]["n_ubatch"], True, 0)
                assert (balloc.n_used == balloc.n_tokens) == (not balloc.has_cpl)
            n_checked += 1
        prev_pos = step["pos"]
    assert n_checked >= 12 and n_rejected == 1


def test_recorded_multi_sequence_step_fails_sequential_split_like_the_reference():
    # mamba / jamba (one stream per sequence) return 1 for the [2, 3] prompt: the batch is
    # valid, but the sequential split refuses coupled sequences
    data = json.loads((DATA / "runs" / "mamba.main.u1.json").read_text())
    steps = data["steps"]
    k = next(i for i, s in enumerate(steps) if s["op"] == "decode" and s["result"] == 1)
    balloc = BatchAllocator()
    balloc.init(
        Batch.from_items(steps[k]["items"]), memory=FakeMemory(steps[k - 1]["pos"]), n_seq_max=4
    )
    assert balloc.has_cpl
    assert split_all(balloc, "split_equal", 256, True, 0) == [] and balloc.n_used == 0


# --------------------------------------------------------------------------------------
# cross-check with the team's executable spec (tests/spec/batch.py, written separately)
# --------------------------------------------------------------------------------------

SPEC_RULES = {"position": "pos_memory", "gap": "pos_gap", "decreasing": "pos_decreasing"}


@pytest.mark.parametrize("seed", range(120))
def test_matches_executable_spec(seed):
    from spec.batch import BatchIn, alloc_init, compat
    from spec.common import SpecBatchError

    rng = random.Random(5000 + seed)
    n_seq = rng.choice([1, 2, 3, 4])
    n = rng.randint(1, 16)
    n_pos = rng.choice([1, 1, 3])
    raw = random_sets(rng, n, n_seq, rng.choice([0.0, 0.3]))
    if rng.random() < 0.5:
        raw.sort(key=lambda s: s[0])
    pos, mem = random_positions(rng, raw, n_seq)
    emb = n_pos > 1 and rng.random() < 0.5
    if emb:  # section-major, later sections arbitrary
        pos = pos + [rng.randint(0, 50) for _ in range(n * (n_pos - 1))]
    give_pos = rng.random() < 0.8
    logits = [rng.random() < 0.3 for _ in range(n)] if rng.random() < 0.7 else None
    output_all = rng.random() < 0.2
    embd = [[float(i), 0.5] for i in range(n)] if emb else None
    token = None if emb else [rng.randrange(64) for _ in range(n)]

    spec_in = BatchIn(
        token=token, embd=embd, pos=pos if give_pos else None, seq_id=raw, logits=logits
    )
    try:
        want = alloc_init(
            compat(spec_in, mem, n_seq, n_pos),
            mem,
            n_seq_max=n_seq,
            n_vocab=64,
            n_pos_per_embd=n_pos,
            output_all=output_all,
        )
        want_rule = None
    except SpecBatchError as e:
        want, want_rule = None, SPEC_RULES.get(e.rule, e.rule)

    batch = Batch(
        token,
        embd=None if embd is None else np.array(embd),
        pos=pos if give_pos else None,
        seq_id=raw,
        output=None if logits is None else np.array(logits),
    )
    balloc = BatchAllocator(n_pos)
    try:
        balloc.init(batch, memory=mem, n_seq_max=n_seq, n_vocab=64, output_all=output_all)
        got_rule = None
    except BatchError as e:
        got_rule = e.rule
    assert got_rule == want_rule, (raw, pos, mem.pos)
    if want is None:
        return
    assert balloc.pos.tolist() == want.pos and balloc.output.tolist() == want.output
    assert [r[r >= 0].tolist() for r in balloc.seq_id] == want.seq_id
    assert balloc.has_cpl == want.has_cpl and balloc.n_outputs == want.n_outputs
    for s in range(n_seq):
        assert balloc.seq_pos_min(s) == want.seq_pos_min(s)
        assert balloc.seq_pos_max(s) == want.seq_pos_max(s)
    for n_ubatch in (1, 2, 3, 7):
        cases = [("split_simple", ()), ("split_seq", ())]
        cases += [("split_equal", (sq, k)) for sq in (False, True) for k in (0, 2)]
        for how, args in cases:
            if args and args[1] and n_ubatch <= args[1]:
                continue
            want.split_reset()
            ubs = split_all(balloc, how, n_ubatch, *args)
            spec_ubs = []
            while (u := getattr(want, how)(n_ubatch, *args)) is not None:
                spec_ubs.append(u)
            assert len(ubs) == len(spec_ubs) and balloc.n_used == want.n_used
            for ub, su in zip(ubs, spec_ubs):
                assert (ub.equal_seqs, ub.n_tokens, ub.n_seq_tokens, ub.n_seqs, ub.n_seqs_unq) == (
                    su.equal_seqs,
                    su.n_tokens,
                    su.n_seq_tokens,
                    su.n_seqs,
                    su.n_seqs_unq,
                )
                assert ub.batch_idxs.tolist() == su.batch_idxs and ub.pos.tolist() == su.pos
                assert [r[r >= 0].tolist() for r in ub.seq_id] == su.seq_id
                assert ub.n_seq_id.tolist() == su.n_seq_id
                assert ub.seq_id_unq.tolist() == su.seq_id_unq
                assert {s: int(ub.seq_idx[s]) for s in su.seq_id_unq} == su.seq_idx
                assert ub.output.tolist() == su.output
                if su.token is not None:
                    assert ub.token.tolist() == su.token
                if su.embd is not None:
                    assert ub.embd.tolist() == su.embd
            assert balloc.out_ids.tolist() == want.out_ids
