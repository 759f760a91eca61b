"""A refused KQ-mask kernel call leaves its output as it was (checked before any write)."""

from __future__ import annotations

import numpy as np
import pytest

from pymem._native import ffi, lib
from pymem.ubatch import LLAMA_MAX_SEQ


def _i32(a: np.ndarray):
    return ffi.from_buffer("int32_t[]", a)


@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("bad", ["token past the batch", "owner past the table"])
def test_owner_kernel_refusal_writes_nothing(elem: int, bad: str) -> None:
    n_cells, n_kv, n_tokens = 8, 6, 2
    owner = np.zeros(n_cells, dtype=np.int32)
    pos = np.arange(n_cells, dtype=np.int32)
    lo, hi = np.zeros(n_tokens, np.int32), np.full(n_tokens, 9, np.int32)
    tok_of = np.full(LLAMA_MAX_SEQ + 2, -1, dtype=np.int64)
    tok_of[2] = 1  # sequence 0 -> token 1
    owner[:3] = 1  # sequence 1 -> token 0, on the first cells
    tok_of[3] = 0
    # the refusal comes from the last cell: every earlier cell would have been written
    if bad == "token past the batch":
        owner[n_kv - 1] = 2
        tok_of[4] = n_tokens
    else:
        owner[n_kv - 1] = LLAMA_MAX_SEQ + 5
    dtype = np.float16 if elem == 2 else np.float32
    out = np.full((n_tokens, n_kv), 7.0, dtype=dtype)
    status = lib.pm_kq_mask_owner(
        _i32(owner), _i32(pos), n_cells, ffi.from_buffer("int64_t[]", tok_of), tok_of.size,
        ffi.NULL, 1, _i32(lo), _i32(hi), n_tokens, n_kv, elem,
        ffi.from_buffer(out, require_writable=True),
    )  # fmt: skip
    assert status == lib.PM_ERR_RANGE
    assert (out == 7.0).all()
    # the same call with the bad cell fixed writes the mask
    owner[n_kv - 1] = 0
    status = lib.pm_kq_mask_owner(
        _i32(owner), _i32(pos), n_cells, ffi.from_buffer("int64_t[]", tok_of), tok_of.size,
        ffi.NULL, 1, _i32(lo), _i32(hi), n_tokens, n_kv, elem,
        ffi.from_buffer(out, require_writable=True),
    )  # fmt: skip
    assert status == lib.PM_OK
    want = np.full((n_tokens, n_kv), -np.inf, dtype=dtype)
    want[0, :3] = 0  # token 0 (sequence 1) sees cells 0..2
    want[1, 3:] = 0  # token 1 (sequence 0) sees cells 3..5
    assert np.array_equal(out, want)


@pytest.mark.parametrize(
    "bad", ["offsets not from 0", "offsets descending", "past the tokens", "token past the rows"]
)
def test_sequence_list_kernel_refusal_writes_nothing(bad: str) -> None:
    """``pm_kq_mask_seqs`` checks its per-sequence token lists before the first write; the
    fixed lists write the mask (sequence 1's two tokens see cells 0..2, sequence 0's one
    token cells 3..5)."""
    n_cells, n_kv, n_tokens = 8, 6, 3
    owner = np.array([1, 1, 1, 0, 0, 0, -1, -1], dtype=np.int32)
    pos = np.arange(n_cells, dtype=np.int32)
    lo, hi = np.zeros(n_tokens, np.int32), np.full(n_tokens, 9, np.int32)
    ptr = np.zeros(LLAMA_MAX_SEQ + 1, dtype=np.int64)
    ptr[1:] = 3
    ptr[1] = 1  # sequence 0: token [2]; sequence 1: tokens [0, 1]
    tok = np.array([2, 0, 1], dtype=np.int64)
    bad_ptr, bad_tok = ptr.copy(), tok.copy()
    if bad == "offsets not from 0":
        bad_ptr[0] = 1
    elif bad == "offsets descending":
        bad_ptr[2] = 0
    elif bad == "past the tokens":
        bad_ptr[2:] = 4
    else:
        bad_tok[1] = n_tokens
    out = np.full((n_tokens, n_kv), 7.0, dtype=np.float32)

    def call(p: np.ndarray, t: np.ndarray) -> int:
        return lib.pm_kq_mask_seqs(
            _i32(owner), _i32(pos), n_cells, ffi.from_buffer("int64_t[]", p),
            ffi.from_buffer("int64_t[]", t), LLAMA_MAX_SEQ, ffi.NULL, 1, _i32(lo), _i32(hi),
            n_tokens, n_kv, 4, ffi.from_buffer(out, require_writable=True),
        )  # fmt: skip

    assert call(bad_ptr, bad_tok) == lib.PM_ERR_RANGE
    assert (out == 7.0).all()
    assert call(ptr, tok) == lib.PM_OK
    want = np.full((n_tokens, n_kv), -np.inf, dtype=np.float32)
    want[:2, :3] = 0
    want[2, 3:] = 0
    assert np.array_equal(out, want)
