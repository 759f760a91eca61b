"""BatchAllocator's decode-step fast path and its split replay equal the general path.

Pins: ``BatchAllocator.init`` of a batch with one token per sequence (each sequence once,
one id per token, positions given) takes a few whole-array checks and a sequence layout
cached between steps; ``split_all`` of a splitter given as a ``functools.partial`` replays
the ubatches recorded for that layout. Both must give exactly what the general path gives
(every accessor, every ubatch field, out_ids, n_used) and refuse exactly what it refuses,
with the same error.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import pymem.batch as batch_mod
from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch


class FakeMemory:
    """Per-sequence [pos_min, pos_max] (-1 when empty), vectorised as the memories give it."""

    def __init__(self, pmax: dict[int, int]) -> None:
        self.pmax = pmax

    def seq_pos_min_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return np.array([0 if self.pmax.get(int(s), -1) >= 0 else -1 for s in seq_ids], np.int64)

    def seq_pos_max_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return np.array([self.pmax.get(int(s), -1) for s in seq_ids], dtype=np.int64)


class GeneralOnly(BatchAllocator):
    """The reference: every batch through the general path, nothing recorded or replayed."""

    def _init_one_per_seq(self, *args, **kwargs) -> bool:
        return False


UB_FIELDS = ("token", "pos", "n_seq_id", "seq_id", "seq_id_unq", "seq_idx", "output", "batch_idxs")
UB_SCALARS = ("equal_seqs", "n_tokens", "n_seq_tokens", "n_seqs", "n_seqs_unq", "n_pos")


def same_ubatches(a: list[UBatch] | None, b: list[UBatch] | None) -> None:
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in UB_SCALARS:
            assert getattr(x, f) == getattr(y, f), f
        for f in UB_FIELDS:
            u, v = getattr(x, f), getattr(y, f)
            assert u.dtype == v.dtype and u.shape == v.shape and (u == v).all(), f


def same_allocators(fast: BatchAllocator, ref: BatchAllocator) -> None:
    for f in ("n_tokens", "n_outputs", "has_cpl", "n_seq_max", "n_used"):
        assert getattr(fast, f) == getattr(ref, f), f
    for f in ("token", "pos", "n_seq_id", "seq_id", "output", "seq_id_unq", "out_ids"):
        u, v = getattr(fast, f), getattr(ref, f)
        assert u.dtype == v.dtype and u.shape == v.shape and (u == v).all(), f
    for s in range(LLAMA_MAX_SEQ):
        assert fast.seq_pos_min(s) == ref.seq_pos_min(s)
        assert fast.seq_pos_max(s) == ref.seq_pos_max(s)


def splits_of(balloc: BatchAllocator) -> list[functools.partial]:
    return [
        functools.partial(balloc.split_simple, 3),
        functools.partial(balloc.split_simple, 512),
        functools.partial(balloc.split_equal, 512, True, 0),
        functools.partial(balloc.split_equal, 512, False, 0),
        functools.partial(balloc.split_equal, 2, True, 0),
        functools.partial(balloc.split_equal, 3, False, 0),
        functools.partial(balloc.split_equal, 512, True, 2),
        functools.partial(balloc.split_seq, 512),
    ]


def same_splits_twice(fast: BatchAllocator, ref: BatchAllocator) -> None:
    """Every splitter on both allocators, twice (recorded, then replayed): the same
    ubatches and allocator state each time, and nothing left to split after."""
    for _ in range(2):
        for fs, rs in zip(splits_of(fast), splits_of(ref)):
            same_ubatches(fast.split_all(fs), ref.split_all(rs))
            same_allocators(fast, ref)
            # after a split (recorded or replayed) the splitter has nothing left
            assert fs() is None and rs() is None


def decode_batch(rng: np.random.Generator, seqs: np.ndarray, pmax: dict[int, int]) -> Batch:
    n = seqs.size
    pos = np.array([pmax.get(int(s), -1) + 1 for s in seqs], dtype=np.int32)
    out = rng.random(n) < 0.7 if rng.random() < 0.8 else None
    return Batch(
        rng.integers(0, 100, n).astype(np.int32), pos=pos, seq_id=seqs.astype(np.int32), output=out
    )


@pytest.mark.parametrize("seed", range(12))
def test_decode_steps_equal_the_general_path(seed: int) -> None:
    """Several steps over a few layouts (sorted, shuffled, gapped ids): init, then every
    splitter twice (recorded, then replayed) match the general path field by field."""
    rng = np.random.default_rng(seed)
    n_seq_max = int(rng.integers(4, 40))
    layouts = [
        np.arange(n_seq_max),
        rng.permutation(n_seq_max)[: int(rng.integers(1, n_seq_max + 1))],
        np.sort(rng.choice(n_seq_max, int(rng.integers(1, n_seq_max + 1)), replace=False)),
    ]
    pmax = {int(s): int(rng.integers(-1, 50)) for s in range(n_seq_max)}
    fast, ref = BatchAllocator(), GeneralOnly()
    for step in range(9):
        seqs = layouts[step % len(layouts)]
        batch = decode_batch(rng, seqs, pmax)
        mem = FakeMemory(pmax)
        fast.init(batch, memory=mem, n_seq_max=n_seq_max, n_vocab=100)
        ref.init(batch, memory=mem, n_seq_max=n_seq_max, n_vocab=100)
        assert fast._b is not None and fast._b.layout is not None  # the fast path ran
        same_allocators(fast, ref)
        same_splits_twice(fast, ref)
        for s, p in zip(seqs.tolist(), batch.pos.tolist()):
            pmax[s] = p


def test_replayed_ubatches_share_frozen_layout_arrays() -> None:
    """The sequence fields a replay shares between steps cannot be written through."""
    balloc = BatchAllocator()
    seqs = np.arange(4, dtype=np.int32)
    for step in range(2):
        balloc.init(Batch(seqs, pos=np.full(4, step, np.int32), seq_id=seqs), n_seq_max=4)
        (ub,) = balloc.split_all(functools.partial(balloc.split_equal, 8, True, 0))
    with pytest.raises(ValueError):
        ub.seq_id[0, 0] = 3
    ub.pos[0] = 7  # this step's own copy
    assert balloc.pos[0] == 1


def error_of(balloc: BatchAllocator, batch: Batch, **kw) -> tuple[str, str]:
    with pytest.raises(BatchError) as e:
        balloc.init(batch, **kw)
    return e.value.rule, str(e.value)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "token, pos, seqs, n_seq_max",
    [
        ([1, 2, 100], [5, 0, 0], [0, 1, 2], 4),  # token >= n_vocab
        ([1, -1, 2], [5, 0, 0], [0, 1, 2], 4),  # one LLAMA_TOKEN_NULL
        ([-1, -1, -1], [5, 0, 0], [0, 1, 2], 4),  # only LLAMA_TOKEN_NULL, no embd
        ([1, 2, 3], [5, 0, 0], [0, 1, 4], 4),  # seq id >= n_seq_max
        ([1, 2, 3], [5, 0, 0], [0, -1, 2], 4),  # no sequence id
        ([1, 2, 3], [4, 0, 0], [0, 1, 2], 4),  # does not continue the memory (X = 4)
        ([1, 2, 3], [5, -3, 0], [0, 1, 2], 4),  # negative position
        ([1, 2, 3], [5, 0, 0], [0, 0, 2], 4),  # a sequence twice (general path)
    ],
)
def test_refusals_equal_the_general_path(token, pos, seqs, n_seq_max) -> None:
    mem = FakeMemory({0: 4})
    batch = Batch(np.array(token, np.int32), pos=np.array(pos, np.int32), seq_id=seqs)
    kw = dict(memory=mem, n_seq_max=n_seq_max, n_vocab=100)
    fast, ref = BatchAllocator(), GeneralOnly()
    good = Batch(np.array([1, 2, 3], np.int32), pos=np.array([5, 0, 0], np.int32), seq_id=[0, 1, 2])
    fast.init(good, **kw)
    ref.init(good, **kw)
    for _ in range(2):  # a layout seen before refuses the same way
        assert error_of(fast, batch, **kw) == error_of(ref, batch, **kw)
        same_allocators(fast, ref)  # the refused batch changed nothing


def test_other_batches_take_the_general_path() -> None:
    """Coupled tokens, batches without positions and a sequence in two runs build no
    layout; a one-sequence prompt is a run layout."""
    balloc = BatchAllocator()
    cases = [
        Batch(np.arange(2, dtype=np.int32), pos=np.zeros(2, np.int32), seq_id=[[0, 1], [2]]),
        Batch(np.arange(2, dtype=np.int32), seq_id=[0, 1]),
        Batch(np.arange(3, dtype=np.int32), pos=np.array([0, 0, 1], np.int32), seq_id=[0, 1, 0]),
    ]
    for batch in cases:
        balloc.init(batch, n_seq_max=4)
        assert balloc._b is not None and balloc._b.layout is None
    prompt = Batch(np.arange(4, dtype=np.int32), pos=np.arange(4, dtype=np.int32), seq_id=[0] * 4)
    balloc.init(prompt, n_seq_max=4)
    lay = balloc._b.layout
    assert lay is not None and lay.run_first.tolist() == [0] and lay.run_len.tolist() == [4]
    with pytest.MonkeyPatch.context() as m:  # the switch sends it to the general path
        m.setattr(batch_mod, "RUN_LAYOUTS", False)
        other = BatchAllocator()
        other.init(prompt, n_seq_max=4)
        assert other._b is not None and other._b.layout is None


# --------------------------------------------------------------------------------------
# k tokens a sequence (each sequence one run of consecutive tokens): the run layout
# --------------------------------------------------------------------------------------


def runs_batch(
    rng: np.random.Generator, seqs: np.ndarray, lens: np.ndarray, pmax: dict[int, int]
) -> Batch:
    """Sequence ``seqs[r]`` as a run of ``lens[r]`` tokens continuing ``pmax``."""
    seq = np.repeat(seqs, lens)
    pos = np.concatenate([pmax.get(int(q), -1) + 1 + np.arange(k) for q, k in zip(seqs, lens)])
    n = seq.size
    out = rng.random(n) < 0.5 if rng.random() < 0.8 else None
    token = rng.integers(0, 100, n).astype(np.int32)
    return Batch(token, pos=pos.astype(np.int32), seq_id=seq.astype(np.int32), output=out)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("seed", range(10))
def test_run_steps_equal_the_general_path(seed: int, native: bool, monkeypatch) -> None:
    """Draft steps of k tokens a sequence (equal or mixed k, ascending or shuffled
    sequences): init through the run layout, then every splitter recorded and replayed,
    field by field equal to the general path; the native check and the numpy one."""
    monkeypatch.setattr(batch_mod, "USE_NATIVE_RUNS", native)
    rng = np.random.default_rng(seed)
    n_seq_max = int(rng.integers(2, 24))
    k = int(rng.integers(2, 6))
    n_some = int(rng.integers(1, n_seq_max + 1))
    layouts = [
        (np.arange(n_seq_max), np.full(n_seq_max, k)),
        (rng.permutation(n_seq_max)[:n_some], rng.integers(1, 5, n_some)),
        (np.sort(rng.choice(n_seq_max, n_some, replace=False)), np.full(n_some, k)),
    ]
    layouts = [(q, n) for q, n in layouts if n.max() > 1]  # (a run longer than one token)
    pmax = {int(q): int(rng.integers(-1, 50)) for q in range(n_seq_max)}
    fast, ref = BatchAllocator(), GeneralOnly()
    for step in range(9):
        seqs, lens = layouts[step % len(layouts)]
        batch = runs_batch(rng, seqs, lens, pmax)
        mem = FakeMemory(pmax)
        fast.init(batch, memory=mem, n_seq_max=n_seq_max, n_vocab=100)
        ref.init(batch, memory=mem, n_seq_max=n_seq_max, n_vocab=100)
        assert fast._b is not None and fast._b.layout is not None  # the run layout ran
        assert fast._b.layout.run_first is not None
        same_allocators(fast, ref)
        same_splits_twice(fast, ref)
        pmax.update({int(q): int(p) for q, p in zip(batch.seq_id[:, 0], batch.pos)})


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(
    "token, pos, seqs",
    [
        ([1, 2, 3, 100], [5, 6, 0, 1], [0, 0, 1, 1]),  # token >= n_vocab
        ([1, 2, 3, 4], [5, 7, 0, 1], [0, 0, 1, 1]),  # a gap inside a run
        ([1, 2, 3, 4], [6, 5, 0, 1], [0, 0, 1, 1]),  # decreasing inside a run
        ([1, 2, 3, 4], [4, 5, 0, 1], [0, 0, 1, 1]),  # does not continue the memory (X = 4)
        ([1, 2, 3, 4], [5, 6, -1, 0], [0, 0, 1, 1]),  # negative position
        ([1, 2, 3, 4], [5, 6, 0, 1], [0, 0, 1, 4]),  # seq id >= n_seq_max
    ],
)
def test_run_refusals_equal_the_general_path(token, pos, seqs, native, monkeypatch) -> None:
    monkeypatch.setattr(batch_mod, "USE_NATIVE_RUNS", native)
    mem = FakeMemory({0: 4})
    batch = Batch(np.array(token, np.int32), pos=np.array(pos, np.int32), seq_id=seqs)
    kw = dict(memory=mem, n_seq_max=4, n_vocab=100)
    fast, ref = BatchAllocator(), GeneralOnly()
    good = Batch(np.array([1, 2, 3, 4], np.int32), pos=np.array([5, 6, 0, 1], np.int32),
                 seq_id=[0, 0, 1, 1])  # fmt: skip
    fast.init(good, **kw)
    ref.init(good, **kw)
    for _ in range(2):  # a layout seen before refuses the same way
        assert error_of(fast, batch, **kw) == error_of(ref, batch, **kw)
        same_allocators(fast, ref)  # the refused batch changed nothing


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(
    "pos, seqs",
    [
        ([5, 5, 0, 1], [0, 0, 1, 1]),  # a position twice in a run: the run check declines
        ([5, 0, 6, 1], [0, 1, 0, 1]),  # sequences in two runs: no run layout
    ],
)
def test_valid_batches_the_run_check_declines_are_accepted(pos, seqs, native, monkeypatch) -> None:
    """What the run layout does not take, the general path accepts as the reference."""
    monkeypatch.setattr(batch_mod, "USE_NATIVE_RUNS", native)
    mem = FakeMemory({0: 4})
    batch = Batch(np.array([1, 2, 3, 4], np.int32), pos=np.array(pos, np.int32), seq_id=seqs)
    fast, ref = BatchAllocator(), GeneralOnly()
    for b in (fast, ref):
        b.init(batch, memory=mem, n_seq_max=4, n_vocab=100)
    same_allocators(fast, ref)
    for fs, rs in zip(splits_of(fast), splits_of(ref)):
        same_ubatches(fast.split_all(fs), ref.split_all(rs))


def test_run_check_kernel_refuses_runs_outside_the_tokens() -> None:
    from pymem._native import ffi, lib

    token = np.zeros(4, np.int32)
    pos = np.arange(4, dtype=np.int32)
    out = np.empty(4, np.int8)
    tables = np.empty(512, np.int32)
    n_out = ffi.new("int64_t *")
    ok = ffi.new("int32_t *")

    def call(first: list[int], lens: list[int], seqs: list[int]) -> int:
        f, n, q = (np.array(a, np.int64) for a in (first, lens, seqs))
        c_tables = ffi.from_buffer("int32_t[]", tables, require_writable=True)
        return lib.pm_step_batch_check_runs(
            ffi.from_buffer("int32_t[]", token), ffi.from_buffer("int32_t[]", pos), 4,
            ffi.from_buffer("int64_t[]", f), ffi.from_buffer("int64_t[]", n),
            ffi.from_buffer("int64_t[]", q), f.size, ffi.NULL, -1, ffi.NULL,
            ffi.from_buffer("int8_t[]", out, require_writable=True), c_tables, c_tables + 256,
            n_out, ok,
        )  # fmt: skip

    assert call([0, 2], [2, 2], [3, 1]) == lib.PM_OK and ok[0] == 1
    assert tables[3] == 0 and tables[256 + 3] == 1 and tables[1] == 2 and tables[256 + 1] == 3
    assert call([0, 2], [2, 3], [3, 1]) == lib.PM_ERR_RANGE  # past the end
    assert call([0, 2], [2, 1], [3, 1]) == lib.PM_ERR_RANGE  # a token in no run
    assert call([0, 2], [2, 2], [3, 256]) == lib.PM_ERR_RANGE  # an id past the tables
    assert call([0, 2], [0, 2], [3, 1]) == lib.PM_ERR_RANGE  # an empty run
