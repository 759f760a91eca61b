"""Sliding-window masking over arrays (``llama_hparams::is_masked_swa``, vectorised)."""

from __future__ import annotations

import numpy as np

from pymem.spec import SWAType


def masked_swa(
    n_swa: int, swa_type: SWAType, p0: np.ndarray | int, p1: np.ndarray | int
) -> np.ndarray:
    """Whether a cell at ``p0`` is outside the window of a token at ``p1`` (broadcasting).

    STANDARD masks ``p1 - p0 >= n_swa``; CHUNKED masks cells before the chunk of ``p1``
    (``p0 < (p1 // n_swa) * n_swa``); SYMMETRIC masks ``|p1 - p0| > n_swa // 2``.
    E.g. STANDARD, n_swa 4: p0 [0, 1, 2, 3, 4], p1 5 -> [True, True, False, False, False].
    """
    p0 = np.asarray(p0, dtype=np.int64)
    p1 = np.asarray(p1, dtype=np.int64)
    if swa_type == SWAType.NONE:
        return np.zeros(np.broadcast_shapes(p0.shape, p1.shape), dtype=bool)
    if swa_type == SWAType.STANDARD:
        return p1 - p0 >= n_swa
    if swa_type == SWAType.CHUNKED:
        # positions are >= 0, so floor division is the reference's truncating division
        return p0 < (p1 // n_swa) * n_swa
    if swa_type == SWAType.SYMMETRIC:
        return np.abs(p1 - p0) > n_swa // 2
    raise ValueError(f"swa_type: unknown value {swa_type!r}")
