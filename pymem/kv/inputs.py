"""Graph inputs of the KV cache for one ubatch: K/V row indices and the KQ mask.

Each builder takes only what it reads: the cache's :class:`~pymem.kv.layout.KVLayout`,
its cells (``v_cells``, one :class:`~pymem.kv.cells.KVCells` view per stream of one
:class:`~pymem.kv.cells.StackedCells`), a :class:`~pymem.kv.layout.SlotInfo`, and for the
mask the model's attention options. All whole-array numpy; the values are exactly those
of the reference's ``set_input_*``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pymem._native import check, ffi, lib
from pymem.kv.cells import OWNER_MULTI, KVCells, StackedCells
from pymem.kv.layout import KVLayout, SlotInfo
from pymem.spec import ModelSpec, NonCausalType, SWAType, masked_swa
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch


def build_k_idxs(layout: KVLayout, sinfo: SlotInfo) -> np.ndarray:
    """Global K rows of the slot's tokens: ``strm * kv_size + cell`` (int64).

    E.g. kv_size 8, strm [0, 2], idxs [[3, 4], [0, 1]] -> [3, 4, 16, 17].
    """
    offs = sinfo.strm.astype(np.int64)[:, None] * layout.kv_size
    return (offs + sinfo.idxs).ravel()


def build_v_idxs(layout: KVLayout, sinfo: SlotInfo) -> np.ndarray:
    """V destinations of the slot's tokens (int64).

    Without ``v_trans``: rows, as :func:`build_k_idxs`. With ``v_trans``: one index per
    element, token-major then channel, ``strm * kv_size * E + j * kv_size + cell`` with
    ``E = n_embd_v_gqa_max``. E.g. kv_size 8, E 2, one stream 0, idxs [[3, 4]] ->
    [3, 11, 4, 12].
    """
    if not layout.v_trans:
        return build_k_idxs(layout, sinfo)
    e = layout.n_embd_v_gqa_max
    # E.g. kv_size 8, E 2, strm [1] -> offs [[[16]]], chan [[[0, 8]]]; + cell 3 -> [19, 27]
    offs = sinfo.strm.astype(np.int64)[:, None, None] * (layout.kv_size * e)
    chan = np.arange(e, dtype=np.int64)[None, None, :] * layout.kv_size
    return (offs + chan + sinfo.idxs[:, :, None].astype(np.int64)).ravel()


def _seq_members(cells: KVCells, seqs: np.ndarray, n_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence index, cell) pairs: cell ``j < n_kv`` of ``cells`` holds ``seqs[u]``.

    O(n_kv): single-sequence cells are mapped through a lookup table on ``owner``; only
    cells shared by several sequences need bit tests. Ungrouped.
    E.g. owner [0, 1, 0, -1], seqs [0, 1] -> u [0, 1, 0], cells [0, 1, 2].
    """
    owner = cells.owner[:n_kv]
    # E.g. seqs [0, 1] -> lut[2] = 0, lut[3] = 1, -1 elsewhere (owners -2 and -1 included)
    lut = np.full(LLAMA_MAX_SEQ + 2, -1, dtype=np.int32)
    lut[seqs + 2] = np.arange(seqs.size, dtype=np.int32)
    u_of = lut[owner + 2]
    members = np.flatnonzero(u_of >= 0)
    u = u_of[members]
    if cells.n_multi:
        m_u, m_cells = _shared_members(cells, seqs, n_kv)
        u = np.concatenate((u, m_u))
        members = np.concatenate((members, m_cells))
    return u, members


def _shared_members(cells: KVCells, seqs: np.ndarray, n_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """The (sequence index, cell) pairs of :func:`_seq_members` among the cells ``j < n_kv``
    held by several sequences (owner ``OWNER_MULTI``): bit tests of their bitsets.
    E.g. seqs [1, 65], a shared cell 4 whose words are [0b10, 0b00, ...] -> ([0], [4])."""
    multi = np.flatnonzero(cells.owner[:n_kv] == OWNER_MULTI)
    # (an id past the bitsets is in no cell: every ubatch id was fitted when placed)
    words = cells.seq[multi][:, np.minimum(seqs >> 6, cells.store.n_words - 1)]
    words[:, seqs >= 64 * cells.store.n_words] = 0  # [n_multi, U]
    bits = (words >> (seqs & 63).astype(np.uint64)[None, :]) & np.uint64(1)
    m_rows, m_u = np.nonzero(bits)
    return m_u.astype(np.int32), multi[m_rows]


def _seq_cells(cells: KVCells, seqs: np.ndarray, n_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """The cells ``j < n_kv`` of each of ``seqs`` in CSR form ``(ptr, members)``: those of
    ``seqs[u]`` are ``members[ptr[u]:ptr[u + 1]]``, ascending.
    E.g. owner [0, 1, 0, -1], seqs [0, 1] -> ptr [0, 2, 3], members [0, 2, 1].
    """
    u, members = _seq_members(cells, seqs, n_kv)
    # group by sequence, keeping cell order within each: E.g. u [0, 1, 0] -> order [0, 2, 1]
    order = np.argsort(u.astype(np.int16), kind="stable")
    counts = np.bincount(u, minlength=seqs.size)
    ptr = np.zeros(seqs.size + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, members[order]


@dataclass(frozen=True)
class _MaskRules:
    """What decides a (token, cell) pair, shared by the sparse and dense evaluators."""

    causal: bool
    swa_type: SWAType
    n_swa: int
    alibi: bool
    in_span_min: np.ndarray | None  # SWA_FULL: smallest ubatch position per sequence


@functools.lru_cache(maxsize=64)
def _rules(causal: bool, swa_type: SWAType, n_swa: int, alibi: bool) -> _MaskRules:
    """The :class:`_MaskRules` without a SWA_FULL span, made once per combination (a
    decode step asks for the same ones every time; nothing mutates them)."""
    return _MaskRules(causal, swa_type, n_swa, alibi, None)


def _keep(
    rules: _MaskRules,
    p0: np.ndarray,
    p1: np.ndarray,
    tie: np.ndarray | None,
    span_min: np.ndarray | None,
    keep: np.ndarray,
) -> np.ndarray:
    """Apply causality (with the M-RoPE tie ``tie``: cell later in 2-D) and the window to
    ``keep``, over broadcast-compatible ``p0`` (cells) and ``p1`` (tokens)."""
    if rules.causal:
        keep &= p0 <= p1
        if tie is not None:
            keep &= ~((p0 == p1) & tie)
    if rules.swa_type != SWAType.NONE:
        masked = masked_swa(rules.n_swa, rules.swa_type, p0, p1)
        if span_min is not None:
            masked &= ~(p0 >= span_min)
        keep &= ~masked
    return keep


_I32 = np.iinfo(np.int32)

USE_NATIVE = hasattr(lib, "pm_kq_mask_rows") and hasattr(lib, "pm_kq_mask_owner")
"""Whether the decode-step masks (one owner per cell, no M-RoPE tie, no SWA_FULL span, no
ALiBi, f16 / f32) are written by the native kernels ``pm_kq_mask_rows`` /
``pm_kq_mask_owner`` (one call per mask) instead of numpy; the numpy evaluation stays the
reference they are tested against (tests set this False to run it). False with an older
extension that lacks them."""


def _bounds_or_open(b: np.ndarray | None, n: int, open_end: int) -> np.ndarray:
    """A token's bound as a flat int32 array, ``open_end`` (int32 min / max) for None."""
    if b is None:
        return _open_bounds(n, open_end)
    return np.ascontiguousarray(b, dtype=np.int32).reshape(-1)


@functools.lru_cache(maxsize=32)
def _open_bounds(n: int, value: int) -> np.ndarray:
    """``n`` copies of ``value`` (int32, read-only), made once per (n, value)."""
    a = np.full(n, value, dtype=np.int32)
    a.flags.writeable = False
    return a


def _window(rules: _MaskRules, p1: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The cells a token at ``p1`` may attend as bounds on the cell position, ``lo <= p0 <=
    hi`` (int32, shaped as ``p1``; None: unbounded), for causality and the window alone
    (no M-RoPE tie, no SWA_FULL span). The same decisions as :func:`_keep`, taken once per
    token instead of once per (token, cell) pair:

    causal: ``p0 <= p1``; STANDARD: ``p1 - p0 >= n_swa`` masks, so ``p0 >= p1 - n_swa + 1``;
    CHUNKED: ``p0 >= (p1 // n_swa) * n_swa``; SYMMETRIC: ``|p1 - p0| <= n_swa // 2``.
    E.g. causal, STANDARD, n_swa 4, p1 9 -> lo 6, hi 9.
    """
    if rules.swa_type == SWAType.NONE:
        return None, (p1 if rules.causal else None)  # p1 is int32 already
    hi = p1 if rules.causal else None
    if rules.swa_type == SWAType.STANDARD and rules.n_swa <= _I32.max:
        # int32 is enough: p1 >= 0 and n_swa - 1 < 2**31. E.g. n_swa 4, p1 9 -> lo 6
        return p1 - np.int32(rules.n_swa - 1), hi
    if rules.swa_type == SWAType.CHUNKED:
        # the chunk start is in [0, p1]; floor is truncation on positions >= 0
        if rules.n_swa > _I32.max:  # one chunk holds every int32 position
            return np.zeros_like(p1), hi
        return (p1 // np.int32(rules.n_swa)) * np.int32(rules.n_swa), hi
    # SYMMETRIC (p1 + n_swa // 2 may pass 2**31 - 1) and windows wider than int32: int64,
    # then clamped into int32
    p = p1.astype(np.int64)
    if rules.swa_type == SWAType.STANDARD:
        lo = np.maximum(p - (rules.n_swa - 1), _I32.min)
        hi64 = None
    else:  # SYMMETRIC
        lo, hi64 = p - rules.n_swa // 2, np.minimum(p + rules.n_swa // 2, _I32.max)
    if rules.causal:
        hi64 = p if hi64 is None else np.minimum(hi64, p)
    return lo.astype(np.int32), (None if hi64 is None else hi64.astype(np.int32))


def build_kq_mask(
    layout: KVLayout,
    v_cells: Sequence[KVCells],
    spec: ModelSpec,
    ubatch: UBatch,
    n_kv: int,
    causal_attn: bool | None = None,
    dtype: Any = np.float32,
    non_causal_type: NonCausalType | None = None,
    strm: np.ndarray | None = None,
) -> np.ndarray:
    """The KQ mask ``[n_stream, n_tps, n_kv]`` of a ubatch (``set_input_kq_mask``).

    ``n_stream`` is 1 for a unified cache, else the ubatch's number of sequences; row
    ``(s, t)`` is token ``s * n_tps + t``. A cell is attended (0, or ``-|p0 - p1|`` with
    ALiBi; else -inf) when it holds the token's first sequence, is not in its future
    (causal; with M-RoPE, equal positions are ordered by ``(y, x)``), and is not outside
    the window. The reference reuses rows between tokens of a sequence; that shortcut
    gives the same values as this direct evaluation.

    The reference version allocates exactly ``n_tokens / n_stream`` rows (it no longer
    pads them to ``GGML_KQ_MASK_PAD``), and so does this.

    With one stream per sequence and no cell shared by several sequences in the ubatch's
    streams (the usual case: a stream holds its own sequence), a cell holds a token's
    sequence iff its ``owner`` is that id, and every stream's rows are evaluated at once
    as one ``[n_stream, n_tps, n_kv]`` comparison (:func:`_mask_streams`). Otherwise, per
    stream, only the (token, cell) pairs of a token's own sequence are evaluated: as a list
    of pairs scattered into a -inf matrix when they are a small part of it (many sequences,
    one token each), otherwise as dense rows.

    ``spec`` supplies the defaults of ``causal_attn`` and ``non_causal_type`` and says
    whether ALiBi is used; ``v_cells`` are the cache's cells, one :class:`KVCells` per stream.
    ``strm`` (int64, one stream per token block) is what the caller already knows of the
    ubatch's streams (with several streams); None: derived from the tokens' sequences.
    """
    causal = spec.causal_attn if causal_attn is None else bool(causal_attn)
    nct = None  # the non-causal kind matters only without causality
    if not causal:
        nct = NonCausalType(spec.non_causal_type if non_causal_type is None else non_causal_type)
        if nct == NonCausalType.SWA_ONLY:
            causal = layout.swa_type == SWAType.NONE
    dt = np.dtype(dtype)

    n_tokens = ubatch.n_tokens
    n_stream = 1 if layout.n_stream == 1 else ubatch.n_seqs_unq
    n_tps = n_tokens // n_stream
    seq0 = ubatch.seq_id[:, 0]
    p1_all = ubatch.pos[:n_tokens]
    is_2d = ubatch.is_pos_2d()

    span = None
    if layout.swa_type != SWAType.NONE and not causal and nct == NonCausalType.SWA_FULL:
        span = np.full(LLAMA_MAX_SEQ, np.iinfo(np.int32).max, dtype=np.int32)
        # E.g. seq0 [0, 0, 1], pos [4, 5, 2] -> span[0] 4, span[1] 2
        np.minimum.at(span, seq0, p1_all)
        rules = _MaskRules(causal, layout.swa_type, layout.n_swa, spec.use_alibi, span)
    else:
        rules = _rules(causal, layout.swa_type, layout.n_swa, spec.use_alibi)

    out = np.empty((n_stream, n_tps, n_kv), dtype=dt)
    if layout.n_stream > 1 and n_tokens:
        stack = v_cells[0].store
        # the stream of each token block: E.g. n_tps 2, seq0 [3, 3, 5, 5] -> [3, 5]
        if strm is None:
            strm = layout.seq_to_stream[seq0[::n_tps]].astype(np.int64)
        if not stack.n_multi[strm].any():
            shape = (n_stream, n_tps)
            p1x = ubatch.pos[2 * n_tokens : 3 * n_tokens].reshape(shape) if is_2d else None
            p1y = ubatch.pos[n_tokens : 2 * n_tokens].reshape(shape) if is_2d else None
            sq, p1 = seq0.reshape(shape), p1_all.reshape(shape)
            _mask_streams(stack, rules, strm, sq, p1, p1x, p1y, out)
            return out
    if (
        n_stream == 1
        and n_tokens
        and ubatch.seq_id.shape[1] == 1
        and not is_2d
        and span is None
        and not rules.alibi
    ):
        # one stream, one id per token: a decode step (one token per sequence), or any mix
        # of sequences and token counts in one native pass over the cells
        cells = v_cells[int(layout.seq_to_stream[int(seq0[0])])]
        if ubatch.n_seqs_unq == n_tokens:
            _mask_one_per_seq(cells, rules, seq0, p1_all, out[0], ubatch.seq_id)
            return out
        if USE_NATIVE and dt.itemsize in (2, 4):
            _mask_seq_lists(cells, rules, seq0, p1_all, out[0])
            return out
    out.fill(-np.inf)
    for s in range(n_stream):
        tok = slice(s * n_tps, (s + 1) * n_tps)
        sq = seq0[tok]
        cells = v_cells[int(layout.seq_to_stream[int(sq[0])])]
        uniq, inv = np.unique(sq, return_inverse=True)
        inv = inv.ravel()
        p1x = ubatch.pos[2 * n_tokens :][tok] if is_2d else None
        p1y = ubatch.pos[n_tokens:][tok] if is_2d else None
        if uniq.size == n_tps:
            # one token per sequence (decode): each member cell pairs with exactly one token
            u, j = _seq_members(cells, uniq, n_kv)
            # the token of each distinct sequence: E.g. sq [5, 2] -> inv [1, 0] -> tok_of [1, 0]
            tok_of = np.empty(n_tps, dtype=np.int64)
            tok_of[inv] = np.arange(n_tps)
            if 4 * j.size <= n_tps * n_kv:
                _mask_pair_list(cells, rules, sq, p1_all[tok], p1x, p1y, tok_of[u], j, out[s])
                continue
        ptr, members = _seq_cells(cells, uniq, n_kv)
        # own-sequence cells per token: E.g. ptr [0, 2, 3], inv [0, 0, 1] -> [2, 2, 1]
        counts = (ptr[1:] - ptr[:-1])[inv]
        n_pairs = int(counts.sum())
        if n_pairs == 0:
            continue
        args = (cells, rules, sq, p1_all[tok], p1x, p1y)
        if 4 * n_pairs <= n_tps * n_kv:
            _mask_pairs(*args, inv, ptr, members, counts, out[s])
        else:
            _mask_rows(*args, inv, ptr, members, out[s])
    return out


_TOK_OF: list[Any] = [None, None]  # (read-only seq_id matrix, its owner -> token table)


def _tok_of(sq: np.ndarray, seq_id: np.ndarray | None) -> np.ndarray:
    """Owner -> token of tokens of distinct sequences ``sq`` (-1 for no token; owners -1
    and -2 read the first two entries). E.g. sq [1, 0] -> tok[2] = 1, tok[3] = 0. Kept for
    the last read-only ``seq_id`` it was built from (the allocator's frozen layouts)."""
    if seq_id is not None and _TOK_OF[0] is seq_id:
        return _TOK_OF[1]
    tok = np.full(LLAMA_MAX_SEQ + 2, -1, dtype=np.int64)
    tok[sq + 2] = np.arange(sq.size)
    if seq_id is not None and not seq_id.flags.writeable:
        tok.flags.writeable = False
        _TOK_OF[:] = [seq_id, tok]
    return tok


def _mask_one_per_seq(
    cells: KVCells,
    rules: _MaskRules,
    sq: np.ndarray,
    p1: np.ndarray,
    out: np.ndarray,
    seq_id: np.ndarray | None = None,
) -> None:
    """The rows of tokens of distinct sequences (``sq``, positions ``p1``): a cell held by
    one sequence can only pair with the token of its owner, so each of the first ``n_kv``
    cells is decided once, against that token; a cell held by several (a prompt shared by
    ``seq_cp``) pairs with the token of each sequence of its bitset.

    E.g. owner [0, 1, 0, -1], pos [0, 0, 1, -1], tokens (seq 1, pos 1), (seq 0, pos 2):
    cell 0 -> token 1, cell 1 -> token 0, cell 2 -> token 1; all in the past -> kept.
    ``out`` is ``[n_tokens, n_kv]``, filled whole. ``seq_id``: the ubatch's sequence ids
    (``sq`` is their first column); a read-only one keys the owner -> token table, which
    a decode step's replayed ubatch then reuses.
    """
    n_kv = out.shape[1]
    own = cells.owner[:n_kv]
    tok = _tok_of(sq, seq_id)
    if USE_NATIVE and out.dtype.itemsize in (2, 4) and out.flags.c_contiguous:
        lo, hi = _window(rules, p1)
        n = sq.size
        n_words = cells.store.n_words
        bits = ffi.from_buffer("uint64_t[]", cells.seq) if cells.n_multi else ffi.NULL
        status = lib.pm_kq_mask_owner(
            ffi.from_buffer("int32_t[]", own), ffi.from_buffer("int32_t[]", cells.pos[:n_kv]),
            n_kv, ffi.from_buffer("int64_t[]", tok), tok.size, bits, n_words,
            ffi.from_buffer("int32_t[]", _bounds_or_open(lo, n, _I32.min)),
            ffi.from_buffer("int32_t[]", _bounds_or_open(hi, n, _I32.max)),
            n, n_kv, out.dtype.itemsize, ffi.from_buffer(out, require_writable=True),
        )  # fmt: skip
        if status != lib.PM_OK:  # an internal invariant broke: name what the kernel checks
            check(
                status,
                f"pm_kq_mask_owner (n_kv {n_kv} of {cells.owner.size} cells, owners "
                f"[{int(own.min(initial=0))}, {int(own.max(initial=0))}] + 2 < {tok.size}, "
                f"tokens < {n})",
            )
        return
    t = tok[own + 2]
    j = np.flatnonzero(t >= 0)
    t = t[j]
    if cells.n_multi:
        m_t, m_j = _shared_members(cells, sq, n_kv)  # sequence index u is token u here
        t, j = np.concatenate((t, m_t)), np.concatenate((j, m_j))
    keep = _keep(rules, cells.pos[j], p1[t], None, None, np.ones(j.size, dtype=bool))
    out.fill(-np.inf)
    # flat indices into the contiguous rows: E.g. n_kv 10, t [0, 2], j [3, 7] -> [3, 27]
    assert out.flags.c_contiguous, "the flat view must alias the mask rows"
    where = t * n_kv + j
    out.reshape(-1)[where if keep.all() else where[keep]] = 0


def _mask_seq_lists(
    cells: KVCells, rules: _MaskRules, sq: np.ndarray, p1: np.ndarray, out: np.ndarray
) -> None:
    """The rows of tokens of one stream, several per sequence (``sq``, positions ``p1``;
    no M-RoPE tie, SWA_FULL span or ALiBi), in one native pass over the cells
    (``pm_kq_mask_seqs``): each cell is decided against the tokens of the sequences it
    holds, listed per sequence. E.g. sq [3, 0, 3] -> tokens of 0: [1], of 3: [0, 2].
    ``out`` is ``[n_tokens, n_kv]`` (C-contiguous), filled whole."""
    n_kv = out.shape[1]
    n = sq.size
    order = np.argsort(sq, kind="stable").astype(np.int64, copy=False)
    ptr = np.zeros(LLAMA_MAX_SEQ + 1, dtype=np.int64)
    np.cumsum(np.bincount(sq, minlength=LLAMA_MAX_SEQ), out=ptr[1:])
    lo, hi = _window(rules, p1)
    bits = ffi.from_buffer("uint64_t[]", cells.seq) if cells.n_multi else ffi.NULL
    status = lib.pm_kq_mask_seqs(
        ffi.from_buffer("int32_t[]", cells.owner[:n_kv]),
        ffi.from_buffer("int32_t[]", cells.pos[:n_kv]), n_kv,
        ffi.from_buffer("int64_t[]", ptr), ffi.from_buffer("int64_t[]", order), LLAMA_MAX_SEQ,
        bits, cells.store.n_words,
        ffi.from_buffer("int32_t[]", _bounds_or_open(lo, n, _I32.min)),
        ffi.from_buffer("int32_t[]", _bounds_or_open(hi, n, _I32.max)),
        n, n_kv, out.dtype.itemsize, ffi.from_buffer(out, require_writable=True),
    )  # fmt: skip
    if status != lib.PM_OK:  # an internal invariant broke: name what the kernel checks
        check(status, f"pm_kq_mask_seqs ({n} tokens, n_kv {n_kv} of {cells.owner.size} cells)")


def _mask_pairs(
    cells: KVCells,
    rules: _MaskRules,
    sq: np.ndarray,
    p1: np.ndarray,
    p1x: np.ndarray | None,
    p1y: np.ndarray | None,
    inv: np.ndarray,
    ptr: np.ndarray,
    members: np.ndarray,
    counts: np.ndarray,
    out: np.ndarray,
) -> None:
    """Evaluate only the own-sequence pairs and scatter the kept ones into ``out``."""
    n_pairs = int(counts.sum())
    # E.g. counts [2, 3] -> t [0, 0, 1, 1, 1], j = members[ptr[u_t] + k] for k < count
    t = np.repeat(np.arange(counts.size), counts)
    first = np.repeat(ptr[:-1][inv] - (np.cumsum(counts) - counts), counts)
    j = members[first + np.arange(n_pairs)]
    _mask_pair_list(cells, rules, sq, p1, p1x, p1y, t, j, out)


def _mask_pair_list(
    cells: KVCells,
    rules: _MaskRules,
    sq: np.ndarray,
    p1: np.ndarray,
    p1x: np.ndarray | None,
    p1y: np.ndarray | None,
    t: np.ndarray,
    j: np.ndarray,
    out: np.ndarray,
) -> None:
    """Decide the pairs (token ``t[k]``, cell ``j[k]``) and write the kept ones."""
    n_pairs = t.size
    p0 = cells.pos[j]
    pt = p1[t]
    tie = None
    if p1x is not None and p1y is not None and cells.ext is not None:
        cx, cy = cells.ext[j, 0], cells.ext[j, 1]
        tx, ty = p1x[t], p1y[t]
        tie = (cy > ty) | ((cy == ty) & (cx > tx))
    span = None if rules.in_span_min is None else rules.in_span_min[sq][t]
    keep = _keep(rules, p0, pt, tie, span, np.ones(n_pairs, dtype=bool))
    # flat indices into the (contiguous) rows: a 1-D scatter is about twice as fast
    # E.g. n_kv 10, t [0, 2], j [3, 7] -> [3, 27]
    assert out.flags.c_contiguous, "the flat view must alias the mask rows"
    where = t.astype(np.int64) * out.shape[1] + j
    flat = out.reshape(-1)
    if keep.all():  # the usual decode: every cell of the sequence is in the past
        flat[where] = -np.abs(p0.astype(np.int64) - pt) if rules.alibi else 0
    elif rules.alibi:
        flat[where[keep]] = -np.abs(p0[keep].astype(np.int64) - pt[keep])
    else:
        flat[where[keep]] = 0


def _mask_rows(
    cells: KVCells,
    rules: _MaskRules,
    sq: np.ndarray,
    p1: np.ndarray,
    p1x: np.ndarray | None,
    p1y: np.ndarray | None,
    inv: np.ndarray,
    ptr: np.ndarray,
    members: np.ndarray,
    out: np.ndarray,
) -> None:
    """Evaluate whole rows: one own-sequence row per distinct sequence, repeated per token."""
    n_kv = out.shape[1]
    n_uniq = ptr.size - 1
    has = np.zeros((n_uniq, n_kv), dtype=bool)
    # E.g. ptr [0, 2, 3] -> rows [0, 0, 1]
    has[np.repeat(np.arange(n_uniq), ptr[1:] - ptr[:-1]), members] = True
    p0 = cells.pos[:n_kv][None, :]
    pt = p1[:, None]
    tie = None
    if p1x is not None and p1y is not None and cells.ext is not None:
        cx, cy = cells.ext[:n_kv, 0][None, :], cells.ext[:n_kv, 1][None, :]
        tx, ty = p1x[:, None], p1y[:, None]
        tie = (cy > ty) | ((cy == ty) & (cx > tx))
    span = None if rules.in_span_min is None else rules.in_span_min[sq][:, None]
    keep = _keep(rules, p0, pt, tie, span, has[inv])
    if rules.alibi:
        # negated as integers, as the reference: a float negation would write -0.0
        np.copyto(out, (-np.abs(p0.astype(np.int64) - pt)).astype(out.dtype), where=keep)
    else:
        np.copyto(out, out.dtype.type(0), where=keep)


@functools.lru_cache(maxsize=8)
def _neg_inf_bits(dtype: np.dtype) -> tuple[np.dtype, np.ndarray]:
    """The unsigned type as wide as ``dtype`` and the bits of -inf in it (read-only).
    E.g. float16 -> (uint16, 0xFC00)."""
    uint = np.dtype(f"u{dtype.itemsize}")
    bits = np.array(-np.inf, dtype=dtype).view(uint)
    bits.flags.writeable = False
    return uint, bits


def _mask_streams(
    stack: StackedCells,
    rules: _MaskRules,
    strm: np.ndarray,
    sq: np.ndarray,
    p1: np.ndarray,
    p1x: np.ndarray | None,
    p1y: np.ndarray | None,
    out: np.ndarray,
) -> None:
    """Every stream's rows at once: token ``(s, t)`` (sequence ``sq[s, t]``, position
    ``p1[s, t]``) against the first ``n_kv`` cells of stream ``strm[s]``, none of which is
    held by several sequences (``owner`` alone says whose a cell is). Writes all of ``out``.

    E.g. strm [0, 1], owners [[0, 0, -1], [1, 1, 1]], positions [[0, 1, -1], [0, 1, 2]],
    tokens (seq 0, pos 2) and (seq 1, pos 1): rows [[0, 0, -inf]] and [[0, 0, -inf]].
    """
    n_kv = out.shape[2]
    if (
        USE_NATIVE
        and (p1x is None or p1y is None or stack.ext is None)  # no M-RoPE tie
        and rules.in_span_min is None
        and not rules.alibi
        and out.dtype.itemsize in (2, 4)
        and out.flags.c_contiguous
    ):
        # one native pass: token (s, t) reads the row of stream strm[s]. E.g. size 8,
        # strm [0, 2], 2 tokens each -> row offsets [0, 0, 16, 16]
        lo, hi = _window(rules, p1)
        n = p1.size
        n_tps = p1.shape[1]
        off = strm * stack.size
        off = off if n_tps == 1 else np.repeat(off, n_tps)
        status = lib.pm_kq_mask_rows(
            ffi.from_buffer("int32_t[]", stack.owner_f), ffi.from_buffer("int32_t[]", stack.pos_f),
            stack.owner_f.size, ffi.from_buffer("int64_t[]", off),
            ffi.from_buffer("int32_t[]", np.ascontiguousarray(sq, dtype=np.int32).reshape(-1)),
            ffi.from_buffer("int32_t[]", _bounds_or_open(lo, n, _I32.min)),
            ffi.from_buffer("int32_t[]", _bounds_or_open(hi, n, _I32.max)),
            n, out.shape[2], out.dtype.itemsize, ffi.from_buffer(out, require_writable=True),
        )  # fmt: skip
        if status != lib.PM_OK:  # an internal invariant broke: name what the kernel checks
            check(
                status,
                f"pm_kq_mask_rows (row offsets [{int(off.min(initial=0))}, "
                f"{int(off.max(initial=0))}] + n_kv {n_kv} <= {stack.owner_f.size} cells)",
            )
        return
    rows: slice | np.ndarray = strm
    if int(strm[-1]) - int(strm[0]) == strm.size - 1:
        # consecutive streams (split_equal's sequential ubatches): a view, no gather
        rows = slice(int(strm[0]), int(strm[-1]) + 1)
    own = stack.owner[rows, :n_kv][:, None, :]  # [ns, 1, n_kv]
    p0 = stack.pos[rows, :n_kv][:, None, :]
    pt = p1[:, :, None]  # [ns, n_tps, 1]
    keep = own == sq[:, :, None]
    tie = None
    if p1x is not None and p1y is not None and stack.ext is not None:
        ext = stack.ext[rows, :n_kv]
        cx, cy = ext[:, None, :, 0], ext[:, None, :, 1]
        tx, ty = p1x[:, :, None], p1y[:, :, None]
        tie = (cy > ty) | ((cy == ty) & (cx > tx))
    if tie is None and rules.in_span_min is None:
        # the window as bounds per token: E.g. lo [[6]], hi [[9]] keeps cells at 6..9
        lo, hi = _window(rules, p1)
        if lo is not None:
            keep &= p0 >= lo[:, :, None]
        if hi is not None:
            keep &= p0 <= hi[:, :, None]
    else:
        span = None if rules.in_span_min is None else rules.in_span_min[sq][:, :, None]
        keep = _keep(rules, p0, pt, tie, span, keep)
    if rules.alibi:
        out.fill(-np.inf)
        # negated as integers, as the reference: a float negation would write -0.0
        np.copyto(out, (-np.abs(p0.astype(np.int64) - pt)).astype(out.dtype), where=keep)
        return
    # one pass over the output, on its bits: 0.0 is all zero bits, so masked elements get
    # the bits of -inf. E.g. float32, keep [T, F] -> bits [0, 0xFF800000] = [0.0, -inf]
    uint, neg_inf = _neg_inf_bits(out.dtype)
    np.logical_not(keep, out=keep)
    np.multiply(keep, neg_inf, out=out.view(uint))
