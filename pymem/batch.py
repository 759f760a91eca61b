"""Batches, the validating batch allocator and the three ubatch splitters.

This is llama.cpp's ``llama_batch_allocr`` (llama-batch.cpp) with the canonicalisation
``llama_batch_compat`` does first: the same batch in gives the same accept/reject
decision and the same ubatches out, field by field. A refused batch raises
:class:`pymem.errors.BatchError` (the reference's decode returns -1) and the allocator
keeps the batch it held before.

Flow, as a memory's ``init_batch`` drives it::

    balloc.init(batch, memory=mem, n_seq_max=4)          # validate, fill defaults
    balloc.split_reset(); ubatches = []
    while (ub := balloc.split_equal(n_ubatch, True, 0)) is not None:
        ubatches.append(ub)
    if balloc.n_used < balloc.n_tokens: ...              # the split failed: FAILED_PREPARE

Canonicalisation (``llama_batch_compat`` + ``llama_batch_ext``):

* a token's sequence ids are a set: duplicates collapse, and the order in which they come
  out (so ``seq_id[i][0]``, the token's *primary* sequence) is the iteration order of a
  libstdc++ ``std::unordered_set<int>`` filled in the caller's order. E.g. ``[2, 3]`` ->
  ``[3, 2]``, ``[0, 1, 13]`` -> ``[1, 13, 0]``. The primary sequence matters: it names
  the recurrent cell a coupled token writes to and the KQ-mask row it reads. Builds of
  the reference against libc++ (macOS) order differently; pymem follows Linux/GCC.
* missing positions continue each token's *first given* sequence id from
  ``memory.seq_pos_max(s) + 1``; missing output flags mean "last token only"; with
  ``output_all`` every token is an output.
* token batches carry one position per token, broadcast to all ``n_pos_per_embd``
  sections in the ubatch; embedding batches carry ``n_pos_per_embd`` sections,
  section-major (``pos[j * n_tokens + i]``).

Decisions on the reference's quirks (each pinned by a test in tests/test_batch.py):

* ``split_equal`` stops accepting sequence sets only after it holds *more than*
  ``n_ubatch`` of them, so with more than ``n_ubatch`` disjoint sets pending a ubatch
  has ``n_ubatch + 1`` tokens (one per set). This is reachable (``n_ubatch`` may be
  smaller than ``n_seq_max``; e.g. n_ubatch 2 and four one-token sequences give
  ubatches of 3 and 1 tokens) and pymem reproduces it exactly, because which tokens
  share a ubatch decides cell placement. Memories must not assume
  ``ubatch.n_tokens <= n_ubatch``.
* The check "sequence %d belongs to incompatible sequence sets" can never fire in the
  reference (a token's own set always contains the sequence, so the running
  intersection is never empty). pymem keeps the reference's decision: partial subsets
  such as tokens in {0, 1, 2}, {0, 1, 2}, {1, 2} are accepted. Enforcing the comment's
  intent would refuse batches llama.cpp decodes.
* ``split_simple`` / ``split_equal`` take *consecutive* entries after the first unused
  token (as the reference does). That is only meaningful while one splitter is used per
  planning pass, which is what every memory does; pymem refuses a different splitter
  before ``split_reset()`` instead of silently producing a mixed plan.

Checks the reference lacks (all raise BatchError before anything changes): wrong
dtypes or shapes, an empty batch, a token with no sequence id, negative positions,
NaN/inf embeddings, too few position sections for an M-RoPE embedding batch. Splitter
arguments the reference never sees or asserts on (``n_ubatch < 1``,
``n_keep_tail >= n_ubatch``) raise ConfigError.

UBatch ``seq_id`` is ``[n_tokens, k]`` with ``k`` the largest ``n_seq_id`` inside that
ubatch (1 when no token in it is coupled), padded with -1.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pymem._native import check, ffi, lib
from pymem.errors import BatchError, ConfigError, RangeError
from pymem.stdset import unordered_set_order
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch, seq_bitsets

__all__ = [
    "GGML_MROPE_SECTIONS",
    "LLAMA_TOKEN_NULL",
    "Batch",
    "BatchAllocator",
    "SeqPosSource",
    "unordered_set_order",
]

log = logging.getLogger(__name__)

LLAMA_TOKEN_NULL = -1
"""A token id meaning "this entry carries no token" (``LLAMA_TOKEN_NULL``)."""

GGML_MROPE_SECTIONS = 4
"""Most position sections a token can carry (``GGML_MROPE_SECTIONS``)."""

_NO_SEQ_IDX = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1


class SeqPosSource(Protocol):
    """What the allocator needs from a memory: the position bounds of several sequences at
    once (-1 where a sequence is empty), as every :class:`pymem.memory.Memory` gives them."""

    def seq_pos_min_of(self, seq_ids: np.ndarray) -> np.ndarray: ...

    def seq_pos_max_of(self, seq_ids: np.ndarray) -> np.ndarray: ...


def _pos_bounds(memory: SeqPosSource, seq_ids: np.ndarray, which: str) -> np.ndarray:
    """``seq_pos_min_of`` / ``seq_pos_max_of`` of ``seq_ids`` as int64, one call per batch.
    E.g. which "max", ids [0, 3] -> [41, -1]."""
    get = memory.seq_pos_min_of if which == "min" else memory.seq_pos_max_of
    return np.asarray(get(seq_ids), dtype=np.int64)


def _tokens_in_vocab(token: np.ndarray, n_vocab: int | None) -> bool:
    """Every token id in ``[0, n_vocab)`` (only ``>= 0`` without a vocabulary size): one
    unsigned compare covers both bounds. E.g. -1 -> 0xFFFFFFFF >= n_vocab."""
    if n_vocab is not None:
        return not bool((token.view(np.uint32) >= n_vocab).any())
    return int(token.min()) >= 0


def _output_flags(batch: Batch) -> np.ndarray:
    """The batch's output flags as int8 (only the last token's without any given)."""
    if batch.output is None:
        output = np.zeros(batch.n_tokens, dtype=np.int8)
        output[-1] = 1
        return output
    return (batch.output != 0).view(np.int8)


def _check_one_per_seq(
    batch: Batch, lay: _Layout, memory: SeqPosSource | None, n_vocab: int | None
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The value checks of a one-token-per-sequence batch (ids already checked by the
    layout): ``(output int8, seq_pos table, n_outputs)``, or None when one fails (the
    general path then names the error). The reference of
    :func:`_check_one_per_seq_native`."""
    token, pos = batch.token, batch.pos
    assert token is not None and pos is not None
    if not _tokens_in_vocab(token, n_vocab):
        return None
    # positions continue each sequence in memory: E.g. X [4, -1], pos [5, 0] -> fine
    pos_sorted = pos if lay.order is None else pos[lay.order]
    if memory is not None:
        x = _pos_bounds(memory, lay.seq_sorted, "max")
        if ((x >= 0) & (pos_sorted != x + 1)).any():
            return None
    if int(pos.min()) < 0:
        return None
    output = _output_flags(batch)
    # each sequence's only position is its minimum and its maximum
    pmin = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
    pmin[lay.seq] = pos
    return output, pmin, int(np.count_nonzero(output))


def _check_one_per_seq_native(
    batch: Batch, lay: _Layout, memory: SeqPosSource | None, n_vocab: int | None
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """:func:`_check_one_per_seq` in one ``pm_step_batch_check`` call (the same results)."""
    token, pos, n = batch.token, batch.pos, batch.n_tokens
    assert token is not None and pos is not None
    mem_max = None if memory is None else _pos_bounds(memory, lay.seq_sorted, "max")
    output = np.empty(n, dtype=np.int8)
    pmin = np.empty(LLAMA_MAX_SEQ, dtype=np.int32)
    n_outputs = ffi.new("int64_t *")
    ok = ffi.new("int32_t *")
    out_in = batch.output  # bool or int8 (Batch made it one): read as bytes
    if lay.c_args is None:
        lay.c_args = (
            ffi.from_buffer("int64_t[]", lay.seq),
            ffi.NULL if lay.order is None else ffi.from_buffer("int64_t[]", lay.order),
        )
    c_seq, c_order = lay.c_args
    status = lib.pm_step_batch_check(
        ffi.from_buffer("int32_t[]", token), ffi.from_buffer("int32_t[]", pos), c_seq, n, c_order,
        ffi.NULL if mem_max is None else ffi.from_buffer("int64_t[]", mem_max),
        -1 if n_vocab is None else n_vocab,
        ffi.NULL if out_in is None else ffi.from_buffer("uint8_t[]", out_in),
        ffi.from_buffer("int8_t[]", output, require_writable=True),
        ffi.from_buffer("int32_t[]", pmin, require_writable=True), n_outputs, ok,
    )  # fmt: skip
    if status != lib.PM_OK:
        check(status, f"pm_step_batch_check ({n} tokens, ids of the layout)")
    if not ok[0]:
        return None
    return output, pmin, int(n_outputs[0])


def _check_runs(
    batch: Batch, lay: _Layout, memory: SeqPosSource | None, n_vocab: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """The value checks of a batch whose every sequence is one run of consecutive tokens
    (:meth:`BatchAllocator._runs_layout`): ``(output int8, seq_pos_min table,
    seq_pos_max table, n_outputs)``, or None when one fails (the general path then names
    the error). The reference of :func:`_check_runs_native`."""
    token, pos = batch.token, batch.pos
    assert token is not None and pos is not None
    assert lay.run_first is not None and lay.run_len is not None
    if not _tokens_in_vocab(token, n_vocab) or int(pos.min()) < 0:
        return None
    # inside a run each position is the one before plus 1: E.g. seqs [0, 0, 1, 1], pos
    # [4, 5, 9, 10] -> steps [1, 4, 1], same sequence [T, F, T] -> fine
    same = lay.seq[1:] == lay.seq[:-1]
    if (same & (np.diff(pos.astype(np.int64)) != 1)).any():
        return None
    p_first = pos[lay.run_first]
    p_last = pos[lay.run_first + lay.run_len - 1]
    if memory is not None:
        x = _pos_bounds(memory, lay.seq_sorted, "max")
        if ((x >= 0) & (p_first != x + 1)).any():
            return None
    output = _output_flags(batch)
    pmin = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
    pmax = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
    pmin[lay.seq_sorted] = p_first
    pmax[lay.seq_sorted] = p_last
    return output, pmin, pmax, int(np.count_nonzero(output))


def _check_runs_native(
    batch: Batch, lay: _Layout, memory: SeqPosSource | None, n_vocab: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """:func:`_check_runs` in one ``pm_step_batch_check_runs`` call (the same results)."""
    token, pos, n = batch.token, batch.pos, batch.n_tokens
    assert token is not None and pos is not None
    mem_max = None if memory is None else _pos_bounds(memory, lay.seq_sorted, "max")
    output = np.empty(n, dtype=np.int8)
    tables = np.empty((2, LLAMA_MAX_SEQ), dtype=np.int32)
    n_outputs = ffi.new("int64_t *")
    ok = ffi.new("int32_t *")
    out_in = batch.output  # bool or int8 (Batch made it one): read as bytes
    if lay.c_args is None:
        lay.c_args = tuple(
            ffi.from_buffer("int64_t[]", a) for a in (lay.run_first, lay.run_len, lay.seq_sorted)
        )
    c_first, c_len, c_seq = lay.c_args
    c_tables = ffi.from_buffer("int32_t[]", tables, require_writable=True)
    status = lib.pm_step_batch_check_runs(
        ffi.from_buffer("int32_t[]", token), ffi.from_buffer("int32_t[]", pos), n, c_first, c_len,
        c_seq, lay.seq_sorted.size, ffi.NULL if mem_max is None else ffi.from_buffer("int64_t[]", mem_max),
        -1 if n_vocab is None else n_vocab,
        ffi.NULL if out_in is None else ffi.from_buffer("uint8_t[]", out_in),
        ffi.from_buffer("int8_t[]", output, require_writable=True), c_tables,
        c_tables + LLAMA_MAX_SEQ, n_outputs, ok,
    )  # fmt: skip
    if status != lib.PM_OK:
        check(status, f"pm_step_batch_check_runs ({n} tokens, runs of the layout)")
    if not ok[0]:
        return None
    return output, tables[0], tables[1], int(n_outputs[0])


def _reject(rule: str, message: str, **where: int | None) -> BatchError:
    """A BatchError whose attributes say which rule failed where (token, seq_id, value)."""
    err = BatchError(message)
    err.rule = rule  # type: ignore[attr-defined]
    for key in ("token", "seq_id", "value"):
        setattr(err, key, where.get(key))
    return err


# --------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------


def _int_array(name: str, value: Any, ndim: tuple[int, ...]) -> np.ndarray:
    """An int32 C-contiguous array, zero-copy when it already is one; range-checked."""
    arr = np.asarray(value)
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int32)  # np.asarray([]) is float64
    if arr.dtype.kind not in "iu":
        raise _reject("dtype", f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim not in ndim:
        raise _reject(
            "shape",
            f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {arr.shape}",
        )
    if arr.dtype != np.int32 and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < _I32_MIN or hi > _I32_MAX:
            bad = lo if lo < _I32_MIN else hi
            raise _reject("range", f"{name} value {bad} does not fit in int32", value=bad)
    return np.ascontiguousarray(arr, dtype=np.int32)


class Batch:
    """The tokens (or embeddings) of one decode call, as llama.cpp's ``llama_batch``.

    Per token: a token id and/or an embedding row, a position (optional; with M-RoPE
    ``n_pos`` sections, section-major), one or more sequence ids, an output flag
    (optional). Arrays that already have the right dtype are kept without a copy:
    ``token``/``pos``/``seq_id`` int32, ``embd`` float32 ``[n_tokens, n_embd]``,
    ``output`` bool or int8.

    ``seq_id`` is an int array ``[n]`` (one sequence per token), an int matrix ``[n, k]``
    (ids after ``n_seq_id[i]``, or from the first -1, are ignored), or a list of lists.
    ``None`` means sequence 0 for every token. Content is validated by
    :meth:`BatchAllocator.init`; the constructor checks only dtypes and shapes.
    Arrays are referenced, not copied: leave them unchanged while the allocator holds
    the batch (ubatches gather copies).
    """

    __slots__ = ("embd", "n_seq_id", "n_tokens", "output", "pos", "seq_id", "token")

    token: np.ndarray | None
    embd: np.ndarray | None
    pos: np.ndarray | None
    seq_id: np.ndarray
    n_seq_id: np.ndarray
    output: np.ndarray | None
    n_tokens: int

    def __init__(
        self,
        token: Any = None,
        *,
        embd: Any = None,
        pos: Any = None,
        seq_id: Any = None,
        n_seq_id: Any = None,
        output: Any = None,
    ) -> None:
        self.token = None if token is None else _int_array("token", token, (1,))
        self.embd = None
        if embd is not None:
            e = np.asarray(embd)
            if e.dtype.kind != "f":
                raise _reject("dtype", f"embd must be a floating array, got dtype {e.dtype}")
            if e.ndim != 2 or e.shape[1] < 1:
                raise _reject(
                    "shape", f"embd must have shape [n_tokens, n_embd >= 1], got {e.shape}"
                )
            self.embd = np.ascontiguousarray(e, dtype=np.float32)
        if self.token is None and self.embd is None:
            raise _reject("content", "a batch needs token ids or embeddings (both are None)")
        n = len(self.token) if self.token is not None else len(self.embd)  # type: ignore[arg-type]
        if self.embd is not None and len(self.embd) != n:
            raise _reject(
                "shape",
                f"embd has {len(self.embd)} rows but token has {n} entries",
                value=len(self.embd),
            )
        self.n_tokens = n

        self.pos = None
        if pos is not None:
            p = _int_array("pos", pos, (1, 2))
            self.pos = p if p.ndim == 1 else p.reshape(-1)  # [n_pos, n] -> section-major

        self.seq_id, self.n_seq_id = self._seq_ids(seq_id, n_seq_id, n)

        self.output = None
        if output is not None:
            o = np.asarray(output)
            if o.dtype.kind not in "biu":
                raise _reject("dtype", f"output must be a bool or integer array, got {o.dtype}")
            if o.shape != (n,):
                raise _reject("shape", f"output must have shape ({n},), got {o.shape}")
            if o.dtype == np.bool_ or o.dtype == np.int8:
                self.output = np.ascontiguousarray(o)
            else:
                self.output = (o != 0).view(np.int8)

    @staticmethod
    def _seq_ids(seq_id: Any, n_seq_id: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        if seq_id is None:
            return np.zeros((n, 1), dtype=np.int32), np.ones(n, dtype=np.int32)
        if isinstance(seq_id, (list, tuple)) and seq_id and isinstance(seq_id[0], (list, tuple)):
            lens = [len(s) for s in seq_id]
            k = max(max(lens, default=1), 1)
            mat = np.full((len(seq_id), k), -1, dtype=np.int64)
            for i, s in enumerate(seq_id):
                mat[i, : len(s)] = s
            sid = _int_array("seq_id", mat, (2,))
            nsid = np.asarray(lens, dtype=np.int32)
        else:
            sid = _int_array("seq_id", seq_id, (1, 2))
            if sid.ndim == 1:
                sid = sid.reshape(-1, 1)
            if n_seq_id is None:
                # E.g. [[0, 1], [2, -1]] -> n_seq_id [2, 1]: a -1 ends the list
                pad = sid == -1
                nsid = np.where(pad.any(axis=1), pad.argmax(axis=1), sid.shape[1])
                nsid = nsid.astype(np.int32)
            else:
                nsid = _int_array("n_seq_id", n_seq_id, (1,))
        if sid.shape[0] != n or nsid.shape != (n,):
            raise _reject(
                "shape", f"seq_id has {sid.shape[0]} rows for {n} tokens", value=sid.shape[0]
            )
        if n and (nsid.min() < 0 or nsid.max() > sid.shape[1]):
            i = int(np.flatnonzero((nsid < 0) | (nsid > sid.shape[1]))[0])
            raise _reject(
                "shape",
                f"n_seq_id[{i}] = {nsid[i]} is outside [0, {sid.shape[1]}]",
                token=i,
                value=int(nsid[i]),
            )
        return sid, nsid

    @classmethod
    def from_embd(
        cls,
        embd: Any,
        *,
        pos: Any = None,
        seq_id: Any = None,
        n_seq_id: Any = None,
        output: Any = None,
        token: Any = None,
    ) -> Batch:
        """An embedding batch (``embd`` ``[n_tokens, n_embd]``); ``token`` too for MTP-style batches."""
        return cls(token, embd=embd, pos=pos, seq_id=seq_id, n_seq_id=n_seq_id, output=output)

    @classmethod
    def from_items(cls, items: Iterable[Sequence[Any]]) -> Batch:
        """A token batch from ``(token, pos, [seq ids], output)`` tuples, as the recorded runs list them."""
        items = list(items)
        return cls(
            [it[0] for it in items],
            pos=[it[1] for it in items],
            seq_id=[list(it[2]) for it in items],
            output=np.array([bool(it[3]) for it in items], dtype=np.bool_),
        )

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_embd(self) -> int:
        """Width of the embedding rows, 0 for a token batch."""
        return 0 if self.embd is None else int(self.embd.shape[1])

    def __repr__(self) -> str:
        kind = "+".join(k for k, v in (("token", self.token), ("embd", self.embd)) if v is not None)
        return f"Batch(n_tokens={self.n_tokens}, {kind}, seq_id width={self.seq_id.shape[1]})"


# --------------------------------------------------------------------------------------
# BatchAllocator
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Prepared:
    """A validated batch and the indexes the splitters use. Built whole, then swapped in."""

    n_tokens: int
    n_outputs: int
    has_cpl: bool
    n_seq_max: int
    token: np.ndarray | None
    embd: np.ndarray | None
    pos: np.ndarray  # int32 [n] (token batch) or [n_pos * n] (embedding batch)
    n_seq_id: np.ndarray  # int32 [n], after de-duplication
    seq_id: np.ndarray  # int32 [n, k], canonical order, padded with -1
    output: np.ndarray  # int8 [n], 0/1
    seq_pos_min: np.ndarray  # int32 [LLAMA_MAX_SEQ], -1 when the seq is not in the batch
    seq_pos_max: np.ndarray
    seq_id_unq: np.ndarray  # int32, ascending
    # sequence sets: the set of seq ids of each token, numbered. Without coupled tokens a
    # set is one sequence and its number is the seq id.
    set_id: np.ndarray  # int32 [n]
    n_sets: int
    set_bits: list[int] | None  # per set, the 256-bit set as a Python int (coupled only)
    csr_tok: np.ndarray  # token indices grouped by set, batch order inside a set
    set_start: np.ndarray  # int64 [n_sets + 1], offsets into csr_tok
    csr_key: np.ndarray  # int64, set * (n + 1) + token for csr_tok: sorted ascending
    layout: _Layout | None = None  # set by the one-token-per-sequence fast path


@dataclass(eq=False)
class _UbatchPlan:
    """One ubatch of a recorded split: which tokens, and every field that depends only on
    the batch's sequence layout (read-only arrays, shared by the ubatches replayed from it)."""

    idxs: np.ndarray  # int64 batch indices, in ubatch order
    whole: bool  # idxs is [0, n): the ubatch is the batch in order (no gathers)
    n_seqs: int
    equal_seqs: bool
    n_seq_id: np.ndarray
    seq_id: np.ndarray
    seq_id_unq: np.ndarray
    seq_idx: np.ndarray
    batch_idxs: np.ndarray


@dataclass(eq=False)
class _Layout:
    """What a batch of one token per sequence (each sequence once, one id per token)
    derives from its sequence ids alone, kept between decode steps.

    A decode step sends the same sequences in the same order step after step; the split
    indexes and the ubatches' sequence fields then come out the same each time, since the
    splitters never read positions, tokens or outputs. ``splits`` records each splitter's
    ubatches the first time (key: splitter name and arguments) and
    :meth:`BatchAllocator.split_all` replays them.
    """

    seq: np.ndarray  # int64 [n], the sequence of each token, batch order
    seq_sorted: np.ndarray  # int64 [n_seqs]: the batch's sequences, ascending
    order: np.ndarray | None  # batch order -> ascending order, None when already ascending
    seq_id_unq: np.ndarray  # int32, ascending
    csr_tok: np.ndarray
    set_start: np.ndarray
    csr_key: np.ndarray
    set_count: np.ndarray  # int64 [n_sets]: tokens per set
    # several tokens a sequence (:meth:`BatchAllocator._runs_layout`): each sequence's
    # run of consecutive tokens, in ascending sequence order, as int64 [n_seqs] (batch
    # index of its first token, token count); None for one token per sequence
    run_first: np.ndarray | None = None
    run_len: np.ndarray | None = None
    splits: dict[tuple[Any, ...], list[_UbatchPlan]] = field(default_factory=dict)
    # (seq, order or NULL) as cffi buffers for pm_step_batch_check (one token a
    # sequence) or (first, len, seq_sorted) for pm_step_batch_check_runs, on first use
    c_args: tuple[Any, ...] | None = None


# the one-token-per-sequence checks of init run as one native call (pymem_step.c); tests
# turn it off to compare with the numpy checks, which stay the reference (False with an
# older extension that lacks the kernel)
USE_NATIVE = hasattr(lib, "pm_step_batch_check")
USE_NATIVE_RUNS = hasattr(lib, "pm_step_batch_check_runs")  # (the same, for k tokens a sequence)
# batches of several tokens a sequence (each sequence one run) take a cached layout too;
# False sends them to the general path (a switch to isolate that road, as the tests do)
RUN_LAYOUTS = True
_LAYOUTS_KEPT = 8  # sequence layouts a BatchAllocator remembers (prompt + decode shapes)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class BatchAllocator:
    """Validates a batch, fills its defaults and splits it into ubatches (``llama_batch_allocr``).

    ``init`` either accepts the batch (and resets the split state) or raises BatchError
    and keeps whatever it held before. Splitters return ``None`` when nothing is left,
    and also on the reference's split error (sequential split of coupled sequences),
    after which ``n_used < n_tokens`` tells the memory the plan failed.
    """

    def __init__(self, n_pos_per_embd: int = 1) -> None:
        if not 1 <= n_pos_per_embd <= GGML_MROPE_SECTIONS:
            raise ConfigError(
                f"n_pos_per_embd = {n_pos_per_embd} is outside [1, {GGML_MROPE_SECTIONS}]"
            )
        self.n_pos_per_embd = n_pos_per_embd
        self._b: _Prepared | None = None
        self._used = np.zeros(0, dtype=np.bool_)
        self._n_used = 0
        self._first_unused = 0  # a lower bound of the first unused token
        self._out_ids: list[np.ndarray] = []
        self._splitter: str | None = None
        # tokens taken from the front of each set's list (split_equal; split_seq when no
        # token is coupled): the first unused token of set a is csr entry set_used[a]
        self._set_used = np.zeros(0, dtype=np.int64)
        # sequence layouts of recent one-token-per-sequence batches (None: not one)
        self._layouts: dict[tuple[Any, ...], _Layout | None] = {}

    # ---------------------------------------------------------------- validation ----

    def init(
        self,
        batch: Batch,
        *,
        memory: SeqPosSource | None = None,
        n_seq_max: int,
        n_vocab: int | None = None,
        n_embd: int | None = None,
        output_all: bool = False,
    ) -> None:
        """Validate ``batch`` against ``memory`` and make it the batch to split.

        Checks, in the reference's order (decode, then ``llama_batch_allocr::init``):
        empty batch; embedding width vs ``n_embd``; ``n_seq_max`` bound; content kinds;
        token ids in ``[0, n_vocab)``; sequence ids in ``[0, n_seq_max)``; positions
        consecutive with ``memory.seq_pos_max`` (M-RoPE: increasing / non-decreasing)
        and without gaps; coupled sequences equal in memory; positions not decreasing
        per sequence. Raises BatchError (attributes ``rule``, ``token``, ``seq_id``,
        ``value``) and changes nothing on a refused batch.
        """
        if not isinstance(batch, Batch):
            raise _reject("type", f"batch must be a pymem.batch.Batch, got {type(batch).__name__}")
        if self._init_one_per_seq(batch, memory, n_seq_max, n_vocab, output_all):
            return
        n = batch.n_tokens
        n_pos = self.n_pos_per_embd
        if n == 0:
            raise _reject("empty", "n_tokens == 0: the batch has no tokens", value=0)
        if batch.embd is not None and n_embd is not None and batch.n_embd != n_embd:
            raise _reject(
                "embd_width",
                f"embd row width {batch.n_embd} does not match the decoder input {n_embd}",
                value=batch.n_embd,
            )
        if n_seq_max > LLAMA_MAX_SEQ or n_seq_max < 1:
            raise _reject(
                "n_seq_max",
                f"n_seq_max = {n_seq_max} is outside [1, {LLAMA_MAX_SEQ}]",
                value=n_seq_max,
            )

        # -- content kinds: an entry with token LLAMA_TOKEN_NULL carries no token id ----
        token = batch.token
        embd = batch.embd
        if token is not None:
            has_tok = token != LLAMA_TOKEN_NULL
            if not has_tok.all():
                if has_tok.any():
                    i = int(np.flatnonzero(has_tok != has_tok[0])[0])
                    raise _reject(
                        "content",
                        "all entries in the batch must have the same "
                        f"content types: token[0] = {token[0]} but token[{i}] = "
                        f"{token[i]} (LLAMA_TOKEN_NULL = -1 means no token)",
                        token=i,
                        value=int(token[i]),
                    )
                token = None  # every entry is LLAMA_TOKEN_NULL: an embedding batch, if any
        if token is None and embd is None:
            raise _reject(
                "content",
                "batch has neither token ids nor embeddings (every token id is LLAMA_TOKEN_NULL)",
            )
        if token is not None:
            bad = token < 0 if n_vocab is None else (token < 0) | (token >= n_vocab)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise _reject(
                    "token",
                    f"invalid token[{i}] = {token[i]}: token ids must be in "
                    f"[0, {n_vocab if n_vocab is not None else 'n_vocab'})",
                    token=i,
                    value=int(token[i]),
                )
        if embd is not None:
            finite = np.isfinite(embd)
            if not finite.all():
                i, j = (int(x) for x in np.argwhere(~finite)[0])
                raise _reject("embd", f"embd[{i}][{j}] = {embd[i, j]} is not finite", token=i)

        # -- sequence ids ---------------------------------------------------------------
        raw, raw_n = batch.seq_id, batch.n_seq_id
        k_raw = raw.shape[1]
        valid = np.arange(k_raw) < raw_n[:, None]  # E.g. n_seq_id [2, 1] -> [[T, T], [T, F]]
        bad = valid & ((raw < 0) | (raw >= n_seq_max))
        if bad.any():
            i, j = (int(x) for x in np.argwhere(bad)[0])
            raise _reject(
                "seq_id",
                f"invalid seq_id[{i}][{j}] = {raw[i, j]} >= {n_seq_max}: "
                f"sequence ids must be in [0, n_seq_max = {n_seq_max})",
                token=i,
                seq_id=int(raw[i, j]),
                value=int(raw[i, j]),
            )
        if (raw_n < 1).any():
            i = int(np.flatnonzero(raw_n < 1)[0])
            raise _reject(
                "seq_id",
                f"token {i} has no sequence id (n_seq_id = {raw_n[i]})",
                token=i,
                value=int(raw_n[i]),
            )
        seq_id, n_seq_id = _canonical_seq_ids(raw, raw_n)
        has_cpl = seq_id.shape[1] > 1

        # -- positions ------------------------------------------------------------------
        emb_only = token is None
        n_pos_total = n * n_pos if emb_only else n
        if batch.pos is None:
            pos = np.zeros(n_pos_total, dtype=np.int32)
            pos[:n] = _auto_positions(raw[:, 0], memory, n_seq_max)
        else:
            pos = batch.pos
            if emb_only and n_pos > 1:
                if pos.size != n_pos_total:
                    raise _reject(
                        "pos",
                        f"an M-RoPE embedding batch needs {n_pos} position "
                        f"sections of {n} (pos of size {n_pos_total}, section-major), "
                        f"got {pos.size}",
                        value=pos.size,
                    )
            elif pos.size == n * n_pos and n_pos > 1:
                pos = pos[:n]  # a token batch uses only section 0 (broadcast to all sections)
            elif pos.size != n:
                raise _reject(
                    "pos",
                    f"pos must have {n} entries (one per token), got {pos.size}",
                    value=pos.size,
                )
        if pos.size and pos.min() < 0:
            f = int(np.flatnonzero(pos < 0)[0])
            raise _reject(
                "pos",
                f"pos[{f}] = {pos[f]} is negative (token {f % n}, section {f // n})",
                token=f % n,
                value=int(pos[f]),
            )
        pos0 = pos[:n]

        # -- outputs --------------------------------------------------------------------
        if batch.output is None:
            output = np.zeros(n, dtype=np.int8)
            output[-1] = 1
        else:
            output = (batch.output != 0).view(np.int8)
        if output_all and not output.all():
            log.warning(
                "embeddings required but some input tokens were not marked as outputs -> overriding"
            )
            output = np.ones(n, dtype=np.int8)
        n_outputs = int(np.count_nonzero(output))

        # -- per-sequence positions of the batch -----------------------------------------
        # (token, seq) pairs in batch order: E.g. seq_id [[3, 2], [0, -1]] -> rows [0, 0, 1],
        # seqs [3, 2, 0]
        if has_cpl:
            rows, cols = np.nonzero(seq_id >= 0)
            pair_seq = seq_id[rows, cols].astype(np.int64)
            pair_pos = pos0[rows].astype(np.int64)
        else:
            rows = None
            pair_seq = seq_id[:, 0].astype(np.int64)
            pair_pos = pos0.astype(np.int64)
        # sort by (seq, pos), ties in batch order. E.g. seqs [1, 0, 1], pos [5, 2, 4]
        # -> order [1, 2, 0]
        key = (pair_seq << 32) | pair_pos
        order = np.argsort(key, kind="stable")
        skey = key[order]
        sseq = skey >> 32
        spos = (skey & 0xFFFFFFFF).astype(np.int32)
        new_seq = _changes(sseq)
        starts = np.flatnonzero(new_seq)
        ends = np.append(starts[1:], len(skey)) - 1
        seqs_present = sseq[starts]
        pmin = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
        pmax = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
        pmin[seqs_present] = spos[starts]
        pmax[seqs_present] = spos[ends]
        # distinct positions per sequence: E.g. seq 0 at pos [2, 2, 3] -> 2
        distinct = np.bincount(sseq[_changes(skey)], minlength=LLAMA_MAX_SEQ)

        # X: the last position the memory holds for each sequence of the batch
        if memory is None:
            mem_max = np.full(len(seqs_present), -1, dtype=np.int64)
        else:
            mem_max = _pos_bounds(memory, seqs_present, "max")
        self._check_positions(
            seqs_present, pmin, pmax, distinct, mem_max, emb_only, (pair_seq, pair_pos, rows)
        )

        if has_cpl and memory is not None:
            _check_coupled(seq_id, n_seq_id, memory)

        # -- positions must not decrease per sequence, in batch order ----------------------
        # in (seq, pos) order the tokens of one sequence keep batch order iff no position
        # decreases; E.g. seq 0 at pos [4, 5, 2] sorts to batch indices [2, 0, 1]
        same = sseq[1:] == sseq[:-1]
        if (same & (order[1:] < order[:-1])).any():
            raise _first_decrease(pair_seq, pair_pos, rows)

        # -- accepted: build the split indexes ----------------------------------------------
        seq_id_unq = seqs_present.astype(np.int32)
        set_id: np.ndarray
        if has_cpl:
            # number the distinct 256-bit sets (rows viewed as 32-byte scalars)
            bits = seq_bitsets(seq_id)
            uniq, inverse = np.unique(
                bits.view(np.dtype((np.void, bits.shape[1] * 8))).ravel(), return_inverse=True
            )
            set_id = inverse.astype(np.int32).ravel()
            n_sets = len(uniq)
            set_words = uniq.view(np.uint64).reshape(n_sets, -1)
            set_bits = [sum(int(w) << (64 * q) for q, w in enumerate(row)) for row in set_words]
        else:
            set_id = seq_id[:, 0]
            n_sets = n_seq_max
            set_bits = None
        csr_tok = np.argsort(set_id, kind="stable")
        set_start = np.zeros(n_sets + 1, dtype=np.int64)
        np.cumsum(np.bincount(set_id, minlength=n_sets), out=set_start[1:])
        # E.g. set_id [1, 0, 1] (n 3) -> csr_tok [1, 0, 2], set_start [0, 1, 3], keys [1, 4, 6]
        csr_key = set_id[csr_tok].astype(np.int64) * (n + 1) + csr_tok

        self._b = _Prepared(
            n_tokens=n,
            n_outputs=n_outputs,
            has_cpl=has_cpl,
            n_seq_max=n_seq_max,
            token=token,
            embd=embd,
            pos=pos,
            n_seq_id=n_seq_id,
            seq_id=seq_id,
            output=output,
            seq_pos_min=pmin,
            seq_pos_max=pmax,
            seq_id_unq=seq_id_unq,
            set_id=set_id,
            n_sets=n_sets,
            set_bits=set_bits,
            csr_tok=csr_tok,
            set_start=set_start,
            csr_key=csr_key,
        )
        self.split_reset()

    def _layout_of(self, batch: Batch, n_seq_max: int) -> _Layout | None:
        """The cached layout of ``batch``'s sequence ids, built on first sight; None when
        the batch is not one token per sequence with valid ids (the general path decides)."""
        key = (n_seq_max, batch.seq_id.tobytes(), batch.n_seq_id.tobytes())
        if key in self._layouts:
            return self._layouts[key]
        lay = None
        raw = batch.seq_id[:, 0].astype(np.int64)
        if (
            raw.size
            and (batch.n_seq_id == 1).all()
            and int(raw.min()) >= 0
            and int(raw.max()) < n_seq_max
            and int(np.bincount(raw).max()) == 1
        ):
            n = raw.size
            order = np.argsort(raw, kind="stable")
            seq_sorted = raw[order]
            set_start = np.zeros(n_seq_max + 1, dtype=np.int64)
            set_count = np.bincount(raw, minlength=n_seq_max)
            np.cumsum(set_count, out=set_start[1:])
            lay = _Layout(
                seq=_readonly(raw),
                seq_sorted=_readonly(seq_sorted),
                order=None if (np.diff(raw) > 0).all() else _readonly(order),
                seq_id_unq=_readonly(seq_sorted.astype(np.int32)),
                csr_tok=_readonly(order),
                set_start=_readonly(set_start),
                # as init's general path: set * (n + 1) + token, E.g. seq [1, 0] -> [1, 3]
                csr_key=_readonly(seq_sorted * (n + 1) + order),
                set_count=_readonly(set_count.astype(np.int64)),
            )
        elif RUN_LAYOUTS and raw.size and (batch.n_seq_id == 1).all():
            lay = self._runs_layout(raw, n_seq_max)
        if len(self._layouts) >= _LAYOUTS_KEPT:
            del self._layouts[next(iter(self._layouts))]  # the oldest
        self._layouts[key] = lay
        return lay

    @staticmethod
    def _runs_layout(raw: np.ndarray, n_seq_max: int) -> _Layout | None:
        """The layout of a batch whose every sequence is one run of consecutive tokens,
        some run longer than one (a draft or speculative step: k tokens a sequence; a
        one-sequence prompt), ids ``raw`` (one a token, int64); None for any other batch.
        E.g. raw [3, 3, 1, 1, 1] -> runs of 3 at 0 (2 tokens) and of 1 at 2 (3 tokens):
        seq_sorted [1, 3], run_first [2, 0], run_len [3, 2]."""
        if int(raw.min()) < 0 or int(raw.max()) >= n_seq_max:
            return None
        n = raw.size
        starts = np.flatnonzero(_changes(raw))  # (runs of equal ids, sorted or not)
        run_seq = raw[starts]
        if int(np.bincount(run_seq).max()) != 1 or starts.size == n:
            return None  # a sequence in two runs (general path), or one token each
        by_seq = np.argsort(run_seq)
        order = np.argsort(raw, kind="stable")
        seq_tok = raw[order]
        set_count = np.bincount(raw, minlength=n_seq_max)
        set_start = np.zeros(n_seq_max + 1, dtype=np.int64)
        np.cumsum(set_count, out=set_start[1:])
        seq_sorted = run_seq[by_seq]
        return _Layout(
            seq=_readonly(raw),
            seq_sorted=_readonly(seq_sorted),
            order=None if (np.diff(raw) >= 0).all() else _readonly(order),
            seq_id_unq=_readonly(seq_sorted.astype(np.int32)),
            csr_tok=_readonly(order),
            set_start=_readonly(set_start),
            csr_key=_readonly(seq_tok * (n + 1) + order),
            set_count=_readonly(set_count.astype(np.int64)),
            run_first=_readonly(starts[by_seq].astype(np.int64)),
            run_len=_readonly(set_count[seq_sorted].astype(np.int64)),  # (one run each)
        )

    def _init_one_per_seq(
        self,
        batch: Batch,
        memory: SeqPosSource | None,
        n_seq_max: int,
        n_vocab: int | None,
        output_all: bool,
    ) -> bool:
        """``init`` of the decode-step batch in a few whole-array checks: token ids and
        positions given, one sequence id per token, no sequence twice (so each position is
        its sequence's whole span in the batch: no gap, no decrease, no coupling); or
        each sequence one run of consecutive tokens (k tokens a sequence: a draft step,
        a one-sequence prompt), whose positions must then step by one inside the run.

        Returns False, having changed nothing, for any other batch and for any check that
        fails: the general path then decides, and names the error as always.
        """
        token, pos, n = batch.token, batch.pos, batch.n_tokens
        if (
            token is None
            or batch.embd is not None
            or pos is None
            or pos.size != n
            or output_all
            or self.n_pos_per_embd != 1
            or batch.seq_id.shape[1] != 1
            or not 1 <= n_seq_max <= LLAMA_MAX_SEQ
        ):
            return False
        lay = self._layout_of(batch, n_seq_max)
        if lay is None:
            return False
        if lay.run_first is not None:
            runs = _check_runs_native if USE_NATIVE_RUNS else _check_runs
            checked_runs = runs(batch, lay, memory, n_vocab)
            if checked_runs is None:
                return False
            output, pmin, pmax, n_outputs = checked_runs
        else:
            checks = _check_one_per_seq_native if USE_NATIVE else _check_one_per_seq
            checked = checks(batch, lay, memory, n_vocab)
            if checked is None:
                return False
            output, pmin, n_outputs = checked
            pmax = pmin  # each sequence's only position is its minimum and its maximum
        seq_id = batch.seq_id
        self._b = _Prepared(
            n_tokens=n,
            n_outputs=n_outputs,
            has_cpl=False,
            n_seq_max=n_seq_max,
            token=token,
            embd=None,
            pos=pos,
            n_seq_id=batch.n_seq_id,
            seq_id=seq_id,
            output=output,
            seq_pos_min=pmin,
            seq_pos_max=pmax,
            seq_id_unq=lay.seq_id_unq,
            set_id=seq_id[:, 0],
            n_sets=n_seq_max,
            set_bits=None,
            csr_tok=lay.csr_tok,
            set_start=lay.set_start,
            csr_key=lay.csr_key,
            layout=lay,
        )
        self.split_reset()
        return True

    def _check_positions(
        self,
        seqs: np.ndarray,
        pmin: np.ndarray,
        pmax: np.ndarray,
        distinct: np.ndarray,
        mem_max: np.ndarray,
        emb_only: bool,
        pairs: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    ) -> None:
        """Rule 5: positions continue the memory (and have no gaps), first failing seq reported.

        ``pairs`` = (seq, pos, token row or None for one seq per token) of every
        (token, seq) pair, in batch order; used only to name a token in the error.
        """
        x = mem_max
        y = pmin[seqs].astype(np.int64)
        if self.n_pos_per_embd > 1:
            fail_mem = (x >= 0) & ((x > y) if emb_only else (x >= y))
            fail_gap = np.zeros_like(fail_mem)
        else:
            fail_mem = (x >= 0) & (y != x + 1)
            fail_gap = pmax[seqs].astype(np.int64) - y + 1 > distinct[seqs]
        bad = fail_mem | fail_gap
        if not bad.any():
            return
        k = int(np.flatnonzero(bad)[0])
        s, xs, ys = int(seqs[k]), int(x[k]), int(y[k])
        pair_seq, pair_pos, rows = pairs

        def token_at(p: int) -> int:  # first token of seq s at position p
            j = int(np.flatnonzero((pair_seq == s) & (pair_pos == p))[0])
            return int(rows[j]) if rows is not None else j

        if fail_mem[k]:
            if self.n_pos_per_embd > 1:
                rule = "X <= Y" if emb_only else "X < Y"
                need = f" for M-RoPE, it is required that the position satisfies: {rule}"
            else:
                need = " it is required that the sequence positions remain consecutive: Y = X + 1"
            tok = token_at(ys)
            raise _reject(
                "pos_memory",
                f"the tokens of sequence {s} in the input batch have inconsistent sequence "
                "positions:\n"
                " - the last position stored in the memory module of the context (i.e. the KV "
                f"cache) for sequence {s} is X = {xs}\n"
                f" - the tokens for sequence {s} in the input batch have a starting position "
                f"of Y = {ys} (token {tok})\n" + need,
                token=tok,
                seq_id=s,
                value=ys,
            )
        # the first hole: E.g. positions {3, 4, 7} -> 5 is missing, token at 7 named
        held = np.unique(pair_pos[pair_seq == s])
        after = int(held[1:][np.diff(held) > 1][0])
        tok = token_at(after)
        raise _reject(
            "pos_gap",
            f"sequence {s} positions are not continuous: position {after} (token {tok}) "
            f"follows {int(held[held < after].max())} in the batch; positions "
            f"[{ys}, {pmax[s]}] must all be present",
            token=tok,
            seq_id=s,
            value=after,
        )

    # ---------------------------------------------------------------- accessors -----

    def _prepared(self) -> _Prepared:
        if self._b is None:
            raise BatchError("no batch: call BatchAllocator.init(batch, ...) first")
        return self._b

    @property
    def n_tokens(self) -> int:
        return 0 if self._b is None else self._b.n_tokens

    @property
    def n_outputs(self) -> int:
        return 0 if self._b is None else self._b.n_outputs

    @property
    def n_used(self) -> int:
        """Tokens placed in ubatches since the last ``split_reset()``."""
        return self._n_used

    @property
    def has_cpl(self) -> bool:
        """Whether some token belongs to more than one sequence (coupled sequences)."""
        return self._prepared().has_cpl

    @property
    def n_seq_max(self) -> int:
        return self._prepared().n_seq_max

    @property
    def token(self) -> np.ndarray | None:
        return self._prepared().token

    @property
    def embd(self) -> np.ndarray | None:
        return self._prepared().embd

    @property
    def pos(self) -> np.ndarray:
        """Positions: ``[n_tokens]`` for token batches, ``[n_pos * n_tokens]`` section-major else."""
        return self._prepared().pos

    @property
    def n_seq_id(self) -> np.ndarray:
        return self._prepared().n_seq_id

    @property
    def seq_id(self) -> np.ndarray:
        """Canonical sequence ids ``[n_tokens, k]`` (reference order, padded with -1)."""
        return self._prepared().seq_id

    @property
    def output(self) -> np.ndarray:
        return self._prepared().output

    @property
    def seq_id_unq(self) -> np.ndarray:
        """The batch's sequence ids, ascending."""
        return self._prepared().seq_id_unq

    @property
    def out_ids(self) -> np.ndarray:
        """Batch indices of the outputs in the order the ubatches emitted them."""
        if not self._out_ids:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate(self._out_ids)

    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position of ``seq_id`` in the batch, -1 if it has none."""
        return int(self._seq_pos(seq_id, self._prepared().seq_pos_min))

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position of ``seq_id`` in the batch, -1 if it has none."""
        return int(self._seq_pos(seq_id, self._prepared().seq_pos_max))

    @staticmethod
    def _seq_pos(seq_id: int, table: np.ndarray) -> int:
        if not 0 <= seq_id < LLAMA_MAX_SEQ:
            raise RangeError(f"seq_id = {seq_id} is outside [0, {LLAMA_MAX_SEQ})")
        return int(table[seq_id])

    # ---------------------------------------------------------------- splitting -----

    def split_reset(self) -> None:
        """Forget the previous plan: every token is unused again, out_ids empty."""
        n = self.n_tokens
        self._used = np.zeros(n, dtype=np.bool_)
        self._n_used = 0
        self._first_unused = 0
        self._out_ids = []
        self._splitter = None
        self._set_used = np.zeros(0 if self._b is None else self._b.n_sets, dtype=np.int64)

    def split_all(self, split: Callable[[], UBatch | None]) -> list[UBatch] | None:
        """Every ubatch of the batch from one splitter, or None when that split fails.

        Resets the plan, then calls ``split`` (e.g. ``lambda: balloc.split_equal(n_ubatch,
        True)``) until it returns no ubatch (None or an empty one). None when tokens are
        left unused or no ubatch came out: the memories then report FAILED_PREPARE (or
        try another splitter).
        """
        lay = None if self._b is None else self._b.layout
        key = _split_key(split, self) if lay is not None else None
        if lay is not None and key is not None and key in lay.splits:
            return self._replay(lay, key[0], lay.splits[key])  # sets what a reset would
        self.split_reset()
        ubatches: list[UBatch] = []
        while (ub := split()) is not None and ub.n_tokens > 0:
            ubatches.append(ub)
        if self.n_used < self.n_tokens or not ubatches:
            return None
        if lay is not None and key is not None:
            lay.splits[key] = [self._plan_of(ub, len(ubatches) == 1) for ub in ubatches]
        return ubatches

    @staticmethod
    def _plan_of(ub: UBatch, only: bool) -> _UbatchPlan:
        """What a replay of ``ub`` reuses (its arrays are frozen: the replays share them)."""
        idxs = ub.batch_idxs.astype(np.int64)
        whole = only and bool((idxs == np.arange(idxs.size)).all())
        return _UbatchPlan(
            idxs=_readonly(idxs),
            whole=whole,
            n_seqs=ub.n_seqs,
            equal_seqs=ub.equal_seqs,
            n_seq_id=_readonly(ub.n_seq_id),
            seq_id=_readonly(ub.seq_id),
            seq_id_unq=_readonly(ub.seq_id_unq),
            seq_idx=_readonly(ub.seq_idx),
            batch_idxs=_readonly(ub.batch_idxs),
        )

    def _replay(self, lay: _Layout, splitter: str, plans: list[_UbatchPlan]) -> list[UBatch]:
        """The ubatches ``plans`` recorded, with this batch's tokens, positions and output
        flags, and the split state the splitter would have left (every token used); every
        field of :meth:`split_reset` is set, so the replay needs no reset first."""
        b = self._prepared()
        self._splitter = splitter
        self._used = np.ones(b.n_tokens, dtype=np.bool_)
        self._out_ids = []
        self._n_used = b.n_tokens
        self._first_unused = b.n_tokens
        self._set_used = lay.set_count.copy()
        out: list[UBatch] = []
        for pl in plans:
            assert b.token is not None
            if pl.whole:
                token, pos, output = b.token.copy(), b.pos.copy(), b.output
            else:
                token, pos, output = b.token[pl.idxs], b.pos[pl.idxs], b.output[pl.idxs]
            if output.any():
                self._out_ids.append(pl.batch_idxs[output.view(np.bool_)])
            n_tok = pl.idxs.size
            out.append(
                UBatch(
                    equal_seqs=pl.equal_seqs,
                    n_tokens=n_tok,
                    n_seq_tokens=n_tok // pl.n_seqs,
                    n_seqs=pl.n_seqs,
                    n_seqs_unq=pl.seq_id_unq.size,
                    n_pos=1,
                    token=token,
                    embd=None,
                    pos=pos,
                    n_seq_id=pl.n_seq_id,
                    seq_id=pl.seq_id,
                    seq_id_unq=pl.seq_id_unq,
                    seq_idx=pl.seq_idx,
                    output=output,
                    batch_idxs=pl.batch_idxs,
                )
            )
        return out

    def _begin(self, name: str, n_ubatch: int) -> _Prepared:
        b = self._prepared()
        if isinstance(n_ubatch, bool) or int(n_ubatch) != n_ubatch or n_ubatch < 1:
            raise ConfigError(f"n_ubatch = {n_ubatch} must be an integer >= 1")
        if self._splitter not in (None, name):
            raise BatchError(
                f"{name} after {self._splitter} in one planning pass: call "
                "split_reset() before switching splitters"
            )
        self._splitter = name
        return b

    def _next_unused(self) -> int:
        """Index of the first unused token, or n_tokens."""
        used = self._used
        k = self._first_unused
        if k < len(used):
            k += int(np.argmin(used[k:]))
            if used[k]:
                k = len(used)
        self._first_unused = k
        return k

    def _take(self, idxs: np.ndarray) -> None:
        self._used[idxs] = True
        self._n_used += len(idxs)

    def split_simple(self, n_ubatch: int) -> UBatch | None:
        """The next ``n_ubatch`` tokens in batch order, whatever their sequences.

        ``equal_seqs`` is False, ``n_seq_tokens`` 1, ``n_seqs == n_tokens``.
        """
        b = self._begin("split_simple", n_ubatch)
        cur = self._next_unused()
        if cur >= b.n_tokens:
            return None
        idxs = np.arange(cur, min(cur + n_ubatch, b.n_tokens), dtype=np.int64)
        self._take(idxs)
        return self._ubatch_add(idxs, len(idxs), equal_seqs=False)

    def split_equal(self, n_ubatch: int, sequential: bool, n_keep_tail: int = 0) -> UBatch | None:
        """A ubatch of disjoint sequence sets, the same number of tokens from each.

        Sets are accepted in batch order of their unused tokens (with ``sequential``,
        only a set whose sequence id is the previous one plus 1), up to ``n_ubatch + 1``
        of them (the reference's bound, see the module docstring). Each set then gives
        ``min(shortest remaining set, max(1, n_ubatch // n_sets))`` tokens, starting at
        its first unused token. With ``n_keep_tail > 0`` the last ``n_keep_tail`` tokens
        of a sequence never land in different ubatches: sets that would leave fewer
        behind are deferred. Returns None when nothing is left, or when ``sequential``
        meets coupled sequences (the reference's error; the memory then sees
        ``n_used < n_tokens``). Output is set-major: all tokens of set 0, then set 1, ...
        """
        b = self._begin("split_equal", n_ubatch)
        if n_keep_tail < 0 or (n_keep_tail > 0 and n_ubatch <= n_keep_tail):
            raise ConfigError(
                f"split_equal: n_ubatch = {n_ubatch} must be greater than "
                f"n_keep_tail = {n_keep_tail}"
            )
        if sequential and b.has_cpl:
            log.error(
                "split_equal: sequential split is not supported when there are coupled "
                "sequences in the input batch (you may need to use the -kvu flag)"
            )
            return None
        cur = self._next_unused()
        if cur >= b.n_tokens:
            return None
        cap = n_ubatch + 1  # the reference stops only after exceeding n_ubatch sets
        acc = self._accept_sequential(b, cur, cap) if sequential else self._accept_disjoint(b, cap)

        # split_equal consumes each set's token list from the front, so the first unused
        # token of set a is entry set_used[a] of its list
        n_seqs = len(acc)
        start = b.set_start[acc] + self._set_used[acc]
        avail = b.set_start[acc + 1] - start
        n_rounds = min(int(avail.min()), max(1, n_ubatch // n_seqs))
        count0 = n_rounds
        if n_keep_tail > 0:
            rem = avail - n_rounds
            ok = (rem == 0) | (rem >= n_keep_tail)
            n_keep = n_seqs if ok.all() else int(np.argmin(ok))
            if n_keep == 0:
                # every set would leave a short tail: finish set 0 if it fits, else leave
                # it exactly n_keep_tail tokens; either way it goes alone
                r0 = int(rem[0])
                fits = n_rounds + r0 <= n_ubatch
                count0 = n_rounds + r0 if fits else n_rounds + r0 - n_keep_tail
                n_keep = 1
            n_seqs = n_keep
            acc, start = acc[:n_keep], start[:n_keep]
        if n_seqs > 1:
            # E.g. start [4, 0], 2 rounds -> csr positions [4, 5, 0, 1] (set-major)
            flat = (start[:, None] + np.arange(n_rounds)).ravel()
            self._set_used[acc] += n_rounds
        else:
            flat = np.arange(start[0], start[0] + count0)
            self._set_used[acc] += count0
        idxs = b.csr_tok[flat]
        self._take(idxs)
        return self._ubatch_add(idxs, n_seqs, equal_seqs=True)

    def _accept_disjoint(self, b: _Prepared, cap: int) -> np.ndarray:
        """Sets in batch order of their first unused token, kept while disjoint, at most ``cap``."""
        pending = np.flatnonzero(b.set_start[:-1] + self._set_used < b.set_start[1:])
        # E.g. set 0 next at token 5, set 2 next at token 3 -> order [2, 0]
        first = b.csr_tok[b.set_start[pending] + self._set_used[pending]]
        sets = pending[np.argsort(first, kind="stable")]
        if b.set_bits is None:  # one sequence per set: all disjoint
            return sets[:cap]
        keep: list[int] = []
        acc_bits = 0
        for k, s in enumerate(sets.tolist()):
            if b.set_bits[s] & acc_bits:
                continue  # overlaps an accepted set (now and at its later tokens)
            acc_bits |= b.set_bits[s]
            keep.append(k)
            if len(keep) >= cap:
                break
        return sets[keep]

    def _accept_sequential(self, b: _Prepared, cur: int, cap: int) -> np.ndarray:
        """Sequences s, s+1, s+2, ..., each found at an unused token after the previous one.

        No coupled tokens here, so a set is one sequence and its number is the seq id.
        E.g. seqs [0, 2, 1, 2]: 0 at token 0, 2 at 1 refused (not 0+1), 1 at 2, 2 at 3.
        """
        n = b.n_tokens
        acc = [int(b.set_id[cur])]
        p = cur  # token at which the last set was accepted
        while len(acc) < cap:
            last = acc[-1]
            vs = np.arange(last + 1, min(b.n_sets, last + 1 + cap - len(acc)), dtype=np.int64)
            if len(vs) == 0:
                break
            # first unused token of each candidate sequence after token p: csr_key is
            # sorted by (seq, token); skip entries before p and the set's used prefix
            q = np.searchsorted(b.csr_key, vs * (n + 1) + p + 1)
            q = np.maximum(q, b.set_start[vs] + self._set_used[vs])
            found = q < b.set_start[vs + 1]
            nxt = np.where(found, b.csr_tok[np.minimum(q, n - 1)], -1)
            n_found = len(vs) if found.all() else int(np.argmin(found))
            if n_found == 0:
                break  # last+1 has no unused token after p, so nothing more is accepted
            # a candidate found after p and after the previous candidate's token is also
            # the first after that token: the chain is exact while these tokens increase
            rising = nxt[1:n_found] > nxt[: n_found - 1]
            n_ok = n_found if rising.all() else int(np.argmin(rising)) + 1
            acc.extend(vs[:n_ok].tolist())
            p = int(nxt[n_ok - 1])
            if n_ok == n_found:
                # the cap or the last sequence was reached, or the next sequence has no
                # unused token after p (so none after any later token either)
                break
        return np.asarray(acc, dtype=np.int64)

    def split_seq(self, n_ubatch: int) -> UBatch | None:
        """One sequence set per ubatch: the first unused token, then later tokens whose set
        is a subset of the current one (narrowing it), up to ``n_ubatch`` tokens.
        """
        b = self._begin("split_seq", n_ubatch)
        cur = self._next_unused()
        if cur >= b.n_tokens:
            return None
        cur_set = int(b.set_id[cur])
        if b.set_bits is None:
            # one sequence per token: the ubatch is the next tokens of cur's sequence, and
            # split_seq takes every sequence's tokens from the front of its list
            at = b.set_start[cur_set] + self._set_used[cur_set]
            idxs = b.csr_tok[at : min(at + n_ubatch, b.set_start[cur_set + 1])]
            self._set_used[cur_set] += len(idxs)
            self._take(idxs)
            return self._ubatch_add(idxs, 1, equal_seqs=True)
        take = [np.array([cur], dtype=np.int64)]
        n_taken = 1
        rest = np.flatnonzero(~self._used[cur + 1 :]) + cur + 1
        while n_taken < n_ubatch and len(rest):
            sub = self._subsets_of(b, cur_set)  # bool per set id
            cand = rest[sub[b.set_id[rest]]]
            if len(cand) == 0:
                break
            # tokens of exactly the current set are taken in bulk; the first one of a strict
            # subset narrows the set. E.g. sets [A, A, B⊂A, A] -> take 3, then narrow to B
            strict = b.set_id[cand] != cur_set
            k = int(np.argmax(strict)) if strict.any() else len(cand)
            need = n_ubatch - n_taken
            if k >= need:
                take.append(cand[:need])
                n_taken += need
                break
            if k == len(cand):  # no strict subset ahead: all of them fit
                take.append(cand)
                n_taken += k
                break
            take.append(cand[: k + 1])
            n_taken += k + 1
            cur_set = int(b.set_id[cand[k]])
            rest = rest[rest > cand[k]]
        idxs = np.concatenate(take)
        self._take(idxs)
        return self._ubatch_add(idxs, 1, equal_seqs=True)

    @staticmethod
    def _subsets_of(b: _Prepared, s: int) -> np.ndarray:
        if b.set_bits is None:  # singleton sets: only s itself
            sub = np.zeros(b.n_sets, dtype=np.bool_)
            sub[s] = True
            return sub
        bits = b.set_bits[s]
        return np.fromiter(((x & ~bits) == 0 for x in b.set_bits), dtype=np.bool_, count=b.n_sets)

    def _ubatch_add(self, idxs: np.ndarray, n_seqs: int, equal_seqs: bool) -> UBatch:
        """Gather the tokens ``idxs`` (in this order) into a UBatch, as ``ubatch_add``."""
        b = self._prepared()
        n_tok = len(idxs)
        n_pos = self.n_pos_per_embd
        assert n_tok % n_seqs == 0, (n_tok, n_seqs)
        if b.token is not None:
            # token positions broadcast to every section. E.g. [7, 8], 2 sections -> [7, 8, 7, 8]
            pos = b.pos[idxs]
            if n_pos > 1:
                pos = np.tile(pos, n_pos)
        else:
            pos = b.pos.reshape(n_pos, b.n_tokens)[:, idxs].reshape(-1)
        n_seq_id = b.n_seq_id[idxs]
        if b.has_cpl:
            seq_id = b.seq_id[idxs, : int(n_seq_id.max())]
            ids = seq_id[seq_id >= 0]
        else:
            seq_id = b.seq_id[idxs]
            ids = seq_id[:, 0]
        present = np.zeros(LLAMA_MAX_SEQ, dtype=np.bool_)
        present[ids] = True
        seq_id_unq = np.flatnonzero(present).astype(np.int32)
        seq_idx = _NO_SEQ_IDX.copy()
        seq_idx[seq_id_unq] = np.arange(len(seq_id_unq), dtype=np.int32)
        output = b.output[idxs]
        batch_idxs = idxs.astype(np.int32)
        if output.any():
            self._out_ids.append(batch_idxs[output.view(np.bool_)])
        return UBatch(
            equal_seqs=equal_seqs,
            n_tokens=n_tok,
            n_seq_tokens=n_tok // n_seqs,
            n_seqs=n_seqs,
            n_seqs_unq=len(seq_id_unq),
            n_pos=n_pos,
            token=None if b.token is None else b.token[idxs],
            embd=None if b.embd is None else b.embd[idxs],
            pos=pos,
            n_seq_id=n_seq_id,
            seq_id=seq_id,
            seq_id_unq=seq_id_unq,
            seq_idx=seq_idx,
            output=output,
            batch_idxs=batch_idxs,
        )


# --------------------------------------------------------------------------------------
# helpers of init
# --------------------------------------------------------------------------------------


def _canonical_seq_ids(raw: np.ndarray, raw_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """De-duplicate each token's sequence ids and put them in the reference's order.

    Single-sequence tokens pass through untouched (a view); rows with several ids are
    reordered once per distinct row. E.g. [[2, 3], [0, -1], [2, 3]] -> [[3, 2], [0, -1], [3, 2]].
    """
    n = len(raw)
    multi = np.flatnonzero(raw_n > 1)
    if len(multi) == 0:
        return raw[:, :1], raw_n  # raw_n is all ones here
    sub = raw[multi].copy()
    sub[np.arange(sub.shape[1]) >= raw_n[multi][:, None]] = -1  # ignore ids past n_seq_id
    rows, inverse = np.unique(sub, axis=0, return_inverse=True)
    canon = [unordered_set_order(tuple(int(v) for v in r if v >= 0)) for r in rows]
    width = max(len(c) for c in canon)
    table = np.full((len(rows), width), -1, dtype=np.int32)
    lens = np.empty(len(rows), dtype=np.int32)
    for r, c in enumerate(canon):
        table[r, : len(c)] = c
        lens[r] = len(c)
    seq_id = np.full((n, width), -1, dtype=np.int32)
    seq_id[:, 0] = raw[:, 0]
    inverse = inverse.ravel()
    seq_id[multi] = table[inverse]
    n_seq_id = np.ones(n, dtype=np.int32)
    n_seq_id[multi] = lens[inverse]
    if width == 1:  # every multi-id row was a duplicate of one id
        return seq_id[:, :1], n_seq_id
    return seq_id, n_seq_id


def _auto_positions(
    first_seq: np.ndarray, memory: SeqPosSource | None, n_seq_max: int
) -> np.ndarray:
    """Positions for a batch that gave none: each token continues its first sequence id.

    E.g. first seq [0, 1, 0], memory pos_max {0: 4, 1: -1} -> [5, 0, 6].
    """
    nxt = np.zeros(n_seq_max, dtype=np.int64)
    if memory is not None:
        seqs = np.unique(first_seq)
        nxt[seqs] = _pos_bounds(memory, seqs, "max") + 1
    # rank of each token among the earlier tokens with the same first sequence
    order = np.argsort(first_seq, kind="stable")
    sorted_seq = first_seq[order]
    starts = np.flatnonzero(_changes(sorted_seq))
    group_start = np.repeat(starts, np.diff(np.append(starts, len(order))))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - group_start
    return (nxt[first_seq] + rank).astype(np.int32)


def _check_coupled(seq_id: np.ndarray, n_seq_id: np.ndarray, memory: SeqPosSource) -> None:
    """Rule 6: a sequence coupled to another (same token) must agree with it in memory."""
    multi = np.flatnonzero(n_seq_id > 1)
    sub = seq_id[multi]
    # pairs (coupled seq s1 = seq_id[i][j>0], primary s0 = seq_id[i][0]), each once,
    # in the reference's scan order (s1 ascending, then s0)
    s1 = sub[:, 1:]
    s0 = np.broadcast_to(sub[:, :1], s1.shape)
    ok = s1 >= 0
    pairs = np.unique(np.stack([s1[ok], s0[ok]], axis=1), axis=0)
    # both bounds of every sequence in a pair, asked once: E.g. pairs [[1, 0], [2, 0]]
    # -> ids [0, 1, 2], pair rows [[1, 0], [2, 0]] into them
    ids, at = np.unique(pairs, return_inverse=True)
    at = at.reshape(pairs.shape)
    lo, hi = _pos_bounds(memory, ids, "min"), _pos_bounds(memory, ids, "max")
    differ = (lo[at[:, 0]] != lo[at[:, 1]]) | (hi[at[:, 0]] != hi[at[:, 1]])
    if differ.any():
        k = int(np.argmax(differ))  # the first pair in scan order
        a, c = pairs[k].tolist()
        ma = (int(lo[at[k, 0]]), int(hi[at[k, 0]]))
        mc = (int(lo[at[k, 1]]), int(hi[at[k, 1]]))
        tok = int(multi[np.flatnonzero(((sub == a).any(axis=1)) & (sub[:, 0] == c))[0]])
        raise _reject(
            "coupled",
            f"sequence {a} is coupled to {c} in the input batch, but have divereged: "
            f"token {tok} belongs to both, but in memory sequence {a} spans "
            f"[{ma[0]}, {ma[1]}] and sequence {c} spans [{mc[0]}, {mc[1]}]",
            token=tok,
            seq_id=a,
            value=ma[1],
        )


def _first_decrease(
    pair_seq: np.ndarray, pair_pos: np.ndarray, rows: np.ndarray | None
) -> BatchError:
    """Rule 7's error: the first (token, seq) pair, in batch order, below its predecessor."""
    order = np.argsort(pair_seq, kind="stable")  # batch order inside each sequence
    s, p = pair_seq[order], pair_pos[order]
    drop = np.concatenate(([False], (s[1:] == s[:-1]) & (p[1:] < p[:-1])))
    k = order[drop].min()  # earliest offending pair in batch order
    j = int(np.flatnonzero(order == k)[0])
    tok = int(rows[k]) if rows is not None else int(k)
    prev = int(rows[order[j - 1]]) if rows is not None else int(order[j - 1])
    seq = int(pair_seq[k])
    return _reject(
        "pos_decreasing",
        f"sequence {seq} positions are decreasing (not allowed): token {tok} has position "
        f"{pair_pos[k]} after token {prev} at position {p[j - 1]}",
        token=tok,
        seq_id=seq,
        value=int(pair_pos[k]),
    )


def _split_key(
    split: Callable[[], UBatch | None], balloc: BatchAllocator
) -> tuple[Any, ...] | None:
    """``(splitter name, arguments)`` of a ``functools.partial`` of one of ``balloc``'s
    splitters (what the memories' ``splits`` return); None for any other callable, whose
    ubatches are then never recorded. E.g. partial(balloc.split_equal, 512, True, 0) ->
    ("split_equal", (512, True, 0), ())."""
    if not isinstance(split, functools.partial):
        return None
    if getattr(split.func, "__self__", None) is not balloc:
        return None
    name = getattr(split.func, "__name__", None)
    if name not in ("split_simple", "split_equal", "split_seq"):
        return None
    return (name, split.args, tuple(sorted(split.keywords.items())))


def _changes(x: np.ndarray) -> np.ndarray:
    """Where an array starts a run of equal values (in a sorted one: a new value). E.g.
    [3, 3, 5, 7, 7] -> [T, F, T, T, F]; [3, 3, 1, 3] -> [T, F, T, T]."""
    out = np.empty(len(x), dtype=np.bool_)
    out[:1] = True
    np.not_equal(x[1:], x[:-1], out=out[1:])
    return out
