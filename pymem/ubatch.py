"""The micro-batch (ubatch) that memories place and graphs consume.

Field names and meanings follow ``llama_ubatch`` (llama-batch.h). Arrays are numpy with
fixed dtypes so memories can vectorise over them:

    token      int32  [n_tokens]            (None for embedding batches)
    embd       float32[n_tokens, n_embd]    (None for token batches)
    pos        int32  [n_pos * n_tokens]    section-major: pos[j * n_tokens + i]
    n_seq_id   int32  [n_tokens]
    seq_id     int32  [n_tokens, max_n_seq] padded with -1 past n_seq_id[i]
    seq_id_unq int32  [n_seqs_unq]          ascending unique sequence ids
    seq_idx    int32  [LLAMA_MAX_SEQ]       index of a seq id in seq_id_unq, -1 if absent
    output     int8   [n_tokens]
    batch_idxs int32  [n_tokens]            index of each token in the original batch

With ``equal_seqs`` the tokens are set-major: the first ``n_seq_tokens`` tokens belong
to sequence set 0, the next to set 1, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LLAMA_MAX_SEQ = 256
"""Upper bound on sequence ids, as in the reference (``LLAMA_MAX_SEQ``)."""


@dataclass(eq=False)
class UBatch:
    """One micro-batch: a subset of a batch's tokens that is placed and computed together."""

    equal_seqs: bool
    n_tokens: int
    n_seq_tokens: int
    n_seqs: int
    n_seqs_unq: int
    n_pos: int
    token: np.ndarray | None
    embd: np.ndarray | None
    pos: np.ndarray
    n_seq_id: np.ndarray
    seq_id: np.ndarray
    seq_id_unq: np.ndarray
    seq_idx: np.ndarray
    output: np.ndarray
    batch_idxs: np.ndarray

    @property
    def seq_id0(self) -> np.ndarray:
        """The primary sequence id of each token (``seq_id[i][0]``)."""
        return self.seq_id[:, 0]

    @property
    def pos0(self) -> np.ndarray:
        """The sequential (first-section) position of each token."""
        return self.pos[: self.n_tokens]

    def is_pos_2d(self) -> bool:
        """M-RoPE 2-D positions (the reference: ``n_pos >= 3``)."""
        return self.n_pos >= 3

    @classmethod
    def reserve(cls, n_seq_tokens: int, n_seqs: int, n_pos: int = 1) -> UBatch:
        """A synthetic ubatch of the given shape (the reference's ``ubatch_reserve``).

        Used for worst-case graph reservation (``init_full``) and state restore paths.
        As in the reference, sequence set ``s`` is sequence id ``s`` (``seq_id_unq =
        [0, n_seqs)``, ``seq_idx[s] = s``); tokens are set-major, all tokens and positions
        are 0. Restore paths overwrite ``seq_id`` / ``pos`` with the real values.
        """
        n_tokens = n_seq_tokens * n_seqs
        seq_idx = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
        seq_idx[:n_seqs] = np.arange(n_seqs, dtype=np.int32)
        # E.g. n_seq_tokens=2, n_seqs=3 -> seq_id column [0, 0, 1, 1, 2, 2]
        seq_of_token = np.repeat(np.arange(n_seqs, dtype=np.int32), n_seq_tokens)
        return cls(
            equal_seqs=True,
            n_tokens=n_tokens,
            n_seq_tokens=n_seq_tokens,
            n_seqs=n_seqs,
            n_seqs_unq=n_seqs,
            n_pos=n_pos,
            token=np.zeros(n_tokens, dtype=np.int32),
            embd=None,
            pos=np.zeros(n_tokens * n_pos, dtype=np.int32),
            n_seq_id=np.ones(n_tokens, dtype=np.int32),
            seq_id=seq_of_token.reshape(n_tokens, 1),
            seq_id_unq=np.arange(n_seqs, dtype=np.int32),
            seq_idx=seq_idx,
            output=np.zeros(n_tokens, dtype=np.int8),
            batch_idxs=np.arange(n_tokens, dtype=np.int32),
        )


def seq_bitsets(seq_id: np.ndarray) -> np.ndarray:
    """Sequence-id matrix (``[n, k]``, padded with -1) to 256-bit sets as ``uint64[n, 4]``.

    E.g. rows [[0, 2], [65, -1]] -> [[0b101, 0, 0, 0], [0, 0b10, 0, 0]].
    """
    n = seq_id.shape[0]
    bits = np.zeros((n, LLAMA_MAX_SEQ // 64), dtype=np.uint64)
    rows, cols = np.nonzero(seq_id >= 0)
    ids = seq_id[rows, cols].astype(np.int64)
    # np.bitwise_or.at accumulates repeated (row, word) pairs, unlike fancy assignment
    np.bitwise_or.at(
        bits, (rows, ids >> 6), np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64))
    )
    return bits
