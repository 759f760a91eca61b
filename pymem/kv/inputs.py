"""Graph inputs of the KV cache for one ubatch: row indices, the KQ mask, K-shift positions.

All whole-array numpy; the values are exactly those of the reference's ``set_input_*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pymem.kv.cells import OWNER_MULTI
from pymem.kv.swa import masked_swa
from pymem.spec import SWAType
from pymem.ubatch import LLAMA_MAX_SEQ

if TYPE_CHECKING:
    from pymem.kv.cache import KVCache, NonCausalType, SlotInfo
    from pymem.ubatch import UBatch


def build_k_idxs(kv: KVCache, sinfo: SlotInfo) -> np.ndarray:
    """Global K rows of the slot's tokens: ``strm * kv_size + cell`` (int64).

    E.g. kv_size 8, strm [0, 2], idxs [[3, 4], [0, 1]] -> [3, 4, 16, 17].
    """
    offs = sinfo.strm.astype(np.int64)[:, None] * kv.kv_size
    return (offs + sinfo.idxs).ravel()


def build_v_idxs(kv: KVCache, sinfo: SlotInfo) -> np.ndarray:
    """V destinations of the slot's tokens (int64).

    Without ``v_trans``: rows, as :func:`build_k_idxs`. With ``v_trans``: one index per
    element, token-major then channel, ``strm * kv_size * E + j * kv_size + cell`` with
    ``E = n_embd_v_gqa_max``. E.g. kv_size 8, E 2, one stream 0, idxs [[3, 4]] ->
    [3, 11, 4, 12].
    """
    if not kv.v_trans:
        return build_k_idxs(kv, sinfo)
    e = kv.n_embd_v_gqa_max
    offs = sinfo.strm.astype(np.int64)[:, None, None] * (kv.kv_size * e)
    chan = np.arange(e, dtype=np.int64)[None, None, :] * kv.kv_size
    return (offs + chan + sinfo.idxs[:, :, None].astype(np.int64)).ravel()


def build_k_shift(kv: KVCache) -> np.ndarray:
    """Pending shift of every cell, streams concatenated (int32 ``[kv_size * n_stream]``);
    0 for empty cells."""
    parts = [np.where(c.pos >= 0, c.shift, 0).astype(np.int32) for c in kv.v_cells]
    return np.concatenate(parts)


def _seq_cells(
    kv: KVCache, strm: int, seqs: np.ndarray, n_kv: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cells ``j < n_kv`` of stream ``strm`` holding each of ``seqs``, grouped per sequence.

    Returns ``(ptr, cells)`` in CSR form: the cells of ``seqs[u]`` are
    ``cells[ptr[u]:ptr[u + 1]]``. O(n_kv): single-sequence cells are mapped through a
    lookup table on ``owner``; only cells shared by several sequences need bit tests.
    E.g. owner [0, 1, 0, -1], seqs [0, 1] -> ptr [0, 2, 3], cells [0, 2, 1].
    """
    cells = kv.v_cells[strm]
    owner = cells.owner[:n_kv]
    lut = np.full(LLAMA_MAX_SEQ + 2, -1, dtype=np.int32)
    lut[seqs + 2] = np.arange(seqs.size, dtype=np.int32)
    u_of = lut[owner + 2]
    single = np.flatnonzero(u_of >= 0)
    u = u_of[single]
    members = single
    multi = np.flatnonzero(owner == OWNER_MULTI)
    if multi.size:
        words = cells.seq[multi][:, seqs >> 6]  # [n_multi, U]
        bits = (words >> (seqs & 63).astype(np.uint64)[None, :]) & np.uint64(1)
        m_rows, m_u = np.nonzero(bits)
        u = np.concatenate((u, m_u.astype(np.int32)))
        members = np.concatenate((members, multi[m_rows]))
    order = np.argsort(u.astype(np.int16), kind="stable")
    counts = np.bincount(u, minlength=seqs.size)
    ptr = np.zeros(seqs.size + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, members[order]


def build_kq_mask(
    kv: KVCache,
    ubatch: UBatch,
    n_kv: int,
    causal_attn: bool | None = None,
    dtype: Any = np.float32,
    non_causal_type: NonCausalType | None = None,
) -> np.ndarray:
    """The KQ mask ``[n_stream, n_tps, n_kv]`` of a ubatch (``set_input_kq_mask``).

    ``n_stream`` is 1 for a unified cache, else the ubatch's number of sequences; row
    ``(s, t)`` is token ``s * n_tps + t``. A cell is attended when it holds the token's
    (first) sequence, is not in its future (causal; with M-RoPE, equal positions are
    ordered by ``(y, x)``), and not SWA-masked. The reference reuses rows between tokens
    of a sequence; that shortcut gives the same values as this direct evaluation.

    Only the (token, cell) pairs of a token's own sequence are evaluated: when they are
    a small part of the ``n_tokens x n_kv`` matrix (many sequences, one token each) as
    a list of pairs scattered into a ``-inf`` matrix, otherwise as dense rows.
    """
    from pymem.kv.cache import NonCausalType

    spec = kv.spec
    causal = spec.causal_attn if causal_attn is None else bool(causal_attn)
    nct = NonCausalType(
        spec.extra.get("non_causal_type", 0) if non_causal_type is None else non_causal_type
    )
    if not causal and nct == NonCausalType.SWA_ONLY:
        causal = kv.swa_type == SWAType.NONE
    swa = kv.swa_type != SWAType.NONE
    alibi = spec.use_alibi
    dt = np.dtype(dtype)

    n_tokens = ubatch.n_tokens
    n_stream = 1 if kv.n_stream == 1 else ubatch.n_seqs_unq
    n_tps = n_tokens // n_stream
    seq0 = ubatch.seq_id[:, 0]
    p1_all = ubatch.pos[:n_tokens]
    is_2d = ubatch.is_pos_2d()

    in_span_min = None
    if swa and not causal and nct == NonCausalType.SWA_FULL:
        # the smallest ubatch position of each sequence: cells from there on are in the span
        in_span_min = np.full(LLAMA_MAX_SEQ, np.iinfo(np.int32).max, dtype=np.int32)
        np.minimum.at(in_span_min, seq0, p1_all)

    out = np.empty((n_stream, n_tps, n_kv), dtype=dt)
    out.fill(-np.inf)
    for s in range(n_stream):
        tok = slice(s * n_tps, (s + 1) * n_tps)
        sq = seq0[tok]
        strm = int(kv.seq_to_stream[int(sq[0])])
        cells = kv.v_cells[strm]
        uniq, inv = np.unique(sq, return_inverse=True)
        inv = inv.ravel()
        ptr, members = _seq_cells(kv, strm, uniq, n_kv)
        counts = (ptr[1:] - ptr[:-1])[inv]
        n_pairs = int(counts.sum())
        if n_pairs == 0:
            continue

        if 4 * n_pairs <= n_tps * n_kv:
            # sparse: E.g. counts [2, 3] -> t [0, 0, 1, 1, 1], j = members[ptr[u_t] + k]
            t = np.repeat(np.arange(n_tps), counts)
            first = np.repeat(ptr[:-1][inv] - (np.cumsum(counts) - counts), counts)
            j = members[first + np.arange(n_pairs)]
            p0 = cells.pos[j]
            p1 = p1_all[tok][t]
        else:
            # dense: rows of own-sequence cells, E.g. inv [0, 0, 1] repeats row 0 twice
            has = np.zeros((uniq.size, n_kv), dtype=bool)
            has[np.repeat(np.arange(uniq.size), ptr[1:] - ptr[:-1]), members] = True
            keep2 = has[inv]
            t = j = None
            p0 = cells.pos[:n_kv][None, :]
            p1 = p1_all[tok][:, None]
        keep = keep2 if t is None else np.ones(n_pairs, dtype=bool)
        if causal:
            keep &= p0 <= p1
            if is_2d and cells.ext is not None:
                p1x = ubatch.pos[2 * n_tokens :][tok]
                p1y = ubatch.pos[n_tokens:][tok]
                if t is None:
                    p1x, p1y = p1x[:, None], p1y[:, None]
                    cx, cy = cells.ext[:n_kv, 0][None, :], cells.ext[:n_kv, 1][None, :]
                else:
                    p1x, p1y = p1x[t], p1y[t]
                    cx, cy = cells.ext[j, 0], cells.ext[j, 1]
                later = (cy > p1y) | ((cy == p1y) & (cx > p1x))
                keep &= ~((p0 == p1) & later)
        if swa:
            masked = masked_swa(kv.n_swa, kv.swa_type, p0, p1)
            if in_span_min is not None:
                row_min = in_span_min[sq]
                masked &= ~(p0 >= (row_min[t] if t is not None else row_min[:, None]))
            keep &= ~masked
        if t is None:
            if alibi:
                np.copyto(out[s], -np.abs(p0.astype(np.int64) - p1).astype(dt), where=keep)
            else:
                np.copyto(out[s], dt.type(0), where=keep)
        else:
            tk, jk = t[keep], j[keep]
            if alibi:
                out[s, tk, jk] = -np.abs(p0[keep].astype(np.int64) - p1[keep])
            else:
                out[s, tk, jk] = 0
    return out
