"""UBatch helpers: the reserve shape (reference ``ubatch_reserve``) and sequence bitsets."""

from __future__ import annotations

import numpy as np

from pymem.ubatch import LLAMA_MAX_SEQ, UBatch, seq_bitsets


def test_reserve_matches_the_reference_shape() -> None:
    ub = UBatch.reserve(2, 3)
    assert (ub.n_tokens, ub.n_seq_tokens, ub.n_seqs, ub.n_seqs_unq, ub.equal_seqs) == (
        6,
        2,
        3,
        3,
        True,
    )
    assert ub.seq_id_unq.tolist() == [0, 1, 2]
    assert ub.seq_idx[:4].tolist() == [0, 1, 2, -1] and ub.seq_idx.size == LLAMA_MAX_SEQ
    assert ub.seq_id0.tolist() == [0, 0, 1, 1, 2, 2]
    assert ub.pos.tolist() == [0] * 6 and ub.n_seq_id.tolist() == [1] * 6


def test_reserve_with_mrope_sections() -> None:
    ub = UBatch.reserve(4, 1, n_pos=4)
    assert ub.pos.shape == (16,) and ub.pos0.shape == (4,)
    assert not UBatch.reserve(1, 1, n_pos=1).is_pos_2d() and ub.is_pos_2d()


def test_seq_bitsets() -> None:
    bits = seq_bitsets(np.array([[0, 2], [65, -1], [255, 0]], dtype=np.int32))
    assert bits.dtype == np.uint64 and bits.shape == (3, 4)
    assert bits[0].tolist() == [0b101, 0, 0, 0]
    assert bits[1].tolist() == [0, 0b10, 0, 0]
    assert bits[2].tolist() == [1, 0, 0, 1 << 63]
