"""Graph inputs of the KV cache for one ubatch: row indices, the KQ mask, K-shift positions.

All whole-array numpy; the values are exactly those of the reference's ``set_input_*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pymem.kv.cells import OWNER_MULTI
from pymem.kv.swa import masked_swa
from pymem.spec import SWAType

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


def _seq_rows(kv: KVCache, strm: int, seqs: np.ndarray, n_kv: int) -> np.ndarray:
    """``has[u, j]``: whether cell ``j < n_kv`` of stream ``strm`` holds ``seqs[u]``."""
    cells = kv.v_cells[strm]
    owner = cells.owner[:n_kv]
    # E.g. owner [0, 1, -2, -1], seqs [0, 1] -> [[T, F, ?, F], [F, T, ?, F]] (? from the bits)
    has = owner[None, :] == seqs[:, None]
    multi = np.flatnonzero(owner == OWNER_MULTI)
    if multi.size:
        words = cells.seq[multi][:, seqs >> 6]  # [n_multi, U]
        bits = (words >> (seqs & 63).astype(np.uint64)[None, :]) & np.uint64(1)
        has[:, multi] = bits.T.astype(bool)
    return has


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
    seq0 = ubatch.seq_id[:, 0].astype(np.int64)
    p1_all = ubatch.pos[:n_tokens].astype(np.int64)
    is_2d = ubatch.is_pos_2d()

    in_span_min = None
    if swa and not causal and nct == NonCausalType.SWA_FULL:
        # the smallest ubatch position of each sequence: cells from there on are in the span
        in_span_min = np.full(int(seq0.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(in_span_min, seq0, p1_all)

    out = np.empty((n_stream, n_tps, n_kv), dtype=dt)
    drop = dt.type(-np.inf)
    keep_val = dt.type(0)
    for s in range(n_stream):
        tok = slice(s * n_tps, (s + 1) * n_tps)
        sq = seq0[tok]
        p1 = p1_all[tok][:, None]
        strm = int(kv.seq_to_stream[int(sq[0])])
        cells = kv.v_cells[strm]
        p0 = cells.pos[:n_kv].astype(np.int64)[None, :]
        uniq, inv = np.unique(sq, return_inverse=True)
        keep = _seq_rows(kv, strm, uniq, n_kv)[inv.ravel()]
        if causal:
            keep &= p0 <= p1
            if is_2d and cells.ext is not None:
                p1x = ubatch.pos[2 * n_tokens :][tok].astype(np.int64)[:, None]
                p1y = ubatch.pos[n_tokens:][tok].astype(np.int64)[:, None]
                cx = cells.ext[:n_kv, 0].astype(np.int64)[None, :]
                cy = cells.ext[:n_kv, 1].astype(np.int64)[None, :]
                later = (cy > p1y) | ((cy == p1y) & (cx > p1x))
                keep &= ~((p0 == p1) & later)
        if swa:
            masked = masked_swa(kv.n_swa, kv.swa_type, p0, p1)
            if in_span_min is not None:
                masked &= ~(p0 >= in_span_min[sq][:, None])
            keep &= ~masked
        if alibi:
            out[s] = np.where(keep, -np.abs(p0 - p1).astype(dt), drop)
        else:
            out[s] = np.where(keep, keep_val, drop)
    return out
