"""The recurrent memory's invariant checker, shared by the recurrent and hybrid tests."""

from __future__ import annotations

import numpy as np

from pymem.recurrent import RecurrentMemory


def check_invariants(mem: RecurrentMemory) -> None:
    """Tail/cell consistency as the reference's debug check, plus pymem's own promises.

    Every sequence is in at most one cell (its tail, in range); a cell is empty iff no tail
    points at it, and then has pos -1 and src -1 or itself; non-empty cells copy from
    themselves between ubatches; ``used`` counts the non-empty cells; ``head`` and the
    rollback indices are in range; each sequence's positions are its tail cell's
    (``seq_pos_max`` never below -1, as the reference's maximum starts at -1).
    """
    c = mem.cells
    assert c.tail.dtype == np.int32 and ((c.tail >= -1) & (c.tail < c.size)).all()
    counts = c.seq_counts()
    empty = np.flatnonzero(counts == 0)
    full = np.flatnonzero(counts > 0)
    assert (c.pos[empty] == -1).all()
    assert ((c.src[empty] == -1) | (c.src[empty] == empty)).all()
    assert (c.src[full] == full).all()
    assert c.used == full.size
    assert 0 <= c.head < c.size
    assert (c.rs_idx <= mem.n_rs_seq).all()
    for s in range(c.size):
        expected = int(c.pos[c.tail[s]]) if c.tail[s] >= 0 else -1
        assert mem.seq_pos_min(s) == expected, f"seq {s}: pos_min"
        assert mem.seq_pos_max(s) == max(-1, expected), f"seq {s}: pos_max"
    check_rows_past_zero(mem)


def check_rows_past_zero(mem: RecurrentMemory) -> None:
    """Plane 0's host R/S rows of the cells from ``rows_hi[0]`` on, and the rollback
    planes' from ``rows_hi[1]`` on, are zero: a whole restore zeroes only below them."""
    hi0, hi_planes = (int(h) for h in mem.rows_hi)
    for il in mem.layers:
        for t in (mem.get_r_l(il), mem.get_s_l(il)):
            if t.device.is_host and t.row_size > 0:
                planes = t.host_view().view(np.uint8).reshape(-1, mem.size, t.row_size)
                assert not planes[0, hi0:].any(), f"{t.name}: bytes past cell {hi0}"
                assert not planes[1:, hi_planes:].any(), (
                    f"{t.name}: plane bytes past cell {hi_planes}"
                )
