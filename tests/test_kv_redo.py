"""KVCells redo logs: a per-sequence state restore commits the placement it simulated at
parse time (``redo_log`` before the rollback, ``redo`` at commit) instead of placing the
sequence again. Pins that redo reproduces the simulated cells exactly, including the
cached per-sequence min/max, and that a restore through it equals a fresh placement."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, decode, make_kv

from pymem.kv.cells import KVCells
from pymem.state import StateReader


def _state(c: KVCells) -> str:
    seqs = range(8)
    return repr(
        (
            c.snapshot(),
            c.n_multi,
            [c.seq_pos_min(s) for s in seqs],
            [c.seq_pos_max(s) for s in seqs],
        )
    )


@pytest.mark.parametrize("seed", range(6))
def test_redo_reproduces_the_journaled_mutations(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = KVCells(64, with_ext=bool(seed % 2))
    idx = np.sort(rng.choice(64, 40, replace=False))
    c.set_new(
        idx, rng.integers(0, 50, idx.size), rng.integers(0, 4, (idx.size, 1)).astype(np.int32)
    )
    before = _state(c)
    c.begin()
    used = np.flatnonzero(c.pos >= 0)
    c.seq_add_bit(used[::3], 5)  # shared cells
    c.seq_rm_bit(np.flatnonzero(c.seq_mask(1)), 1)
    c.rm(np.flatnonzero(c.pos >= 0)[:4])
    free = np.flatnonzero(c.pos < 0)[:6]
    c.set_new(free, np.arange(100, 106), np.array([[2, 6]] * 6, dtype=np.int32))
    c.pos_add(np.flatnonzero(c.seq_mask(2)), -3)
    after = _state(c)
    log = c.redo_log()
    c.rollback()
    assert _state(c) == before
    c.redo(log)
    assert _state(c) == after


def test_per_sequence_restore_commits_the_simulated_placement() -> None:
    """The same blob restored into two identical caches: one through parse + commit (redo),
    one by placing the sequence again (seq_rm, find_slot, apply) gives the same cells."""
    items = [[1, p, [s], False] for p in range(6) for s in range(3)]
    kvs = [make_kv(n_cells=32, n_seq=3) for _ in range(2)]
    for kv in kvs:
        decode(kv, items, n_ubatch=4)
        kv.seq_rm(1, 2, 4)
    blob = kvs[0].state_write(2)
    kvs[0].state_read(blob, 1)
    # reference placement on the other cache, by hand
    from pymem.kv import state_io as sio

    kv = kvs[1]
    words = np.frombuffer(blob, dtype="<i4")
    n = int(words[1])
    pos = words[2 : 2 + 3 * n].reshape(n, 3)[:, 0].copy()
    kv.seq_rm(1, -1, -1)
    ub = sio._restore_ubatch(kv.n_pos_per_embd, 1, pos, None)
    sinfo = kv.find_slot(ub, False)
    assert sinfo is not None
    kv.apply_ubatch(sinfo, ub)
    assert repr([c.snapshot() for c in kvs[0].v_cells]) == repr([c.snapshot() for c in kv.v_cells])
    assert kvs[0].v_heads == kv.v_heads
    for s in range(3):
        assert kvs[0].seq_pos_min(s) == kv.seq_pos_min(s)
        assert kvs[0].seq_pos_max(s) == kv.seq_pos_max(s)
    check_invariants(kvs[0])
    # a plan parsed before a change refuses to commit (the redo would be stale)
    plan = kvs[0].state_read_parse(StateReader(blob), 0)
    kvs[0].seq_rm(2, 0, 1)
    with pytest.raises(Exception, match="changed"):
        plan.commit()
