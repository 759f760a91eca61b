"""The KV cache's decode-step shortcuts against the general code they bypass.

Pins: the one-stream KQ mask of a ubatch with one token per sequence
(``inputs._mask_one_per_seq``: each cell decided once, against its owner's token) equals
the per-stream pair evaluation, for every SWA kind, causal or not, f32 and f16, on
caches with window-purged, removed and shared cells (shared cells take the general path).
"""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, make_kv
from test_kv_batched import SWA_KINDS, per_stream_mask

import pymem.kv.inputs as kv_inputs
from pymem.kv.inputs import build_kq_mask
from pymem.spec import NonCausalType
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

MASK_OPTIONS = (
    {},
    {"causal_attn": False},
    {"causal_attn": False, "non_causal_type": NonCausalType.SWA_FULL},
    {"causal_attn": False, "non_causal_type": NonCausalType.SWA_ONLY},
)


def tokens_ubatch(seqs: list[int], pos: list[int]) -> UBatch:
    """A split_simple-style ubatch: token i of sequence ``seqs[i]`` (any order) at ``pos[i]``."""
    n = len(seqs)
    seq = np.asarray(seqs, dtype=np.int32)
    unq = np.unique(seq).astype(np.int32)
    seq_idx = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
    seq_idx[unq] = np.arange(unq.size, dtype=np.int32)
    return UBatch(
        equal_seqs=False,
        n_tokens=n,
        n_seq_tokens=1,
        n_seqs=n,
        n_seqs_unq=int(unq.size),
        n_pos=1,
        token=np.arange(n, dtype=np.int32) + 3,
        embd=None,
        pos=np.asarray(pos, dtype=np.int32),
        n_seq_id=np.ones(n, dtype=np.int32),
        seq_id=seq.reshape(n, 1),
        seq_id_unq=unq,
        seq_idx=seq_idx,
        output=np.ones(n, dtype=np.int8),
        batch_idxs=np.arange(n, dtype=np.int32),
    )


@pytest.mark.parametrize("swa_type", SWA_KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_one_stream_decode_mask_equals_pair_evaluation(monkeypatch, swa_type, seed: int) -> None:
    taken = []
    fast = kv_inputs._mask_one_per_seq
    monkeypatch.setattr(kv_inputs, "_mask_one_per_seq", lambda *a: taken.append(1) or fast(*a))
    rng = np.random.default_rng(3000 + 10 * seed + int(swa_type))
    swa = {} if swa_type == 0 else {"swa_type": swa_type, "n_swa": 5}
    n_seq = 6
    kv = make_kv(96, n_seq, unified=True, **swa)
    for step in range(30):
        if step % 7 == 6:  # some cells leave: a tail, or a shared prefix appears
            s = int(rng.integers(0, n_seq))
            if rng.random() < 0.5 and kv.seq_pos_max(s) > 2:
                kv.seq_rm(s, kv.seq_pos_max(s) - 1, -1)
            elif kv.seq_pos_max(s) >= 0:
                d = int(rng.integers(0, n_seq))
                if d != s:
                    kv.seq_rm(d, -1, -1)
                    kv.seq_cp(s, d, -1, -1)
        seqs = rng.permutation(n_seq)[: int(rng.integers(1, n_seq + 1))].tolist()
        ub = tokens_ubatch(seqs, [kv.seq_pos_max(s) + 1 for s in seqs])
        sinfo = kv.find_slot(ub)
        if sinfo is None:
            break
        kv.apply_ubatch(sinfo, ub)
        check_invariants(kv)
        n_kv = kv.get_n_kv(sinfo)
        for kw in MASK_OPTIONS:
            for dtype in (np.float32, np.float16):
                got = build_kq_mask(kv.layout, kv.v_cells, kv.spec, ub, n_kv, dtype=dtype, **kw)
                want = per_stream_mask(kv, ub, n_kv, dtype=dtype, **kw)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.tobytes() == want.tobytes(), (step, kw, dtype)
    assert len(taken) > 20  # the shortcut ran (and shared cells did not take it)
