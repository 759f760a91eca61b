"""A per-sequence recurrent restore places its one cell with ``place_new_sequence``, not
the general ``find_slot``: pinned equal to it (every cell field, counters, sources, the
steady record, the log lines, the result) on the cell states of random programs of
ubatches and sequence ops, for every sequence removed and placed again at positions that
follow its old one, jump, or sit at the ends of int32."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_recurrent import make_rec, ub
from test_recurrent_steady import _program

from pymem.memory import POS_MAX
from pymem.recurrent import cells as rc


def _fields(c: rc.RecurrentCells) -> tuple:
    arrays = (c.pos, c.src, c.src0, c.tail, c.rs_idx, c.n_last)
    st = c.steady
    steady = None if st is None else (st.ids, st.ids_dtype, st.tail, st.lo, st.used, st.rng_bytes)
    return (*(a.tobytes() for a in arrays), c.head, c.used, c.n, c.rs_z, steady)


def _states(seed: int) -> tuple[list[rc.RecurrentCells], int, int]:
    """Copies of the cells after every step of a random program (make_rec memory)."""
    n_seq = [3, 5, 8][seed % 3]
    mem_size, n_rs_seq = n_seq + seed % 2, [0, 2][seed % 2]
    mem = make_rec(n_seq=n_seq, n_rs_seq=n_rs_seq, mem_size=mem_size)
    states = []
    for op in _program(seed, n_seq, mem_size, n_rs_seq):
        if op[0] == "ub":
            sets, last, nst = op[1:]
            mem.find_slot(ub(*zip([s if len(s) > 1 else s[0] for s in sets], last),
                             n_seq_tokens=nst))  # fmt: skip
        else:
            getattr(mem, op[0])(*op[1:])
        states.append(mem.cells.copy())
    return states, mem.n_seq_max, n_rs_seq


@pytest.mark.parametrize("seed", range(12))
def test_place_new_sequence_equals_find_slot(seed: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pymem.recurrent.cells")
    rng = np.random.default_rng(seed)
    states, n_seq_max, n_rs_seq = _states(seed)
    n_compared = 0
    for live in states:
        for s in range(min(n_seq_max, live.size)):
            base = live.copy()
            rc.seq_rm_cells(base, n_seq_max, n_rs_seq, s, 0, POS_MAX)
            if base.tail[s] >= 0:
                continue  # a negative position survives the seq_rm: find_slot's case
            old = int(live.pos[live.tail[s]]) if live.tail[s] >= 0 else -1
            for pos in (old + 1, old + int(rng.integers(2, 5)), -(2**31), 2**31 - 1):
                general, fast = base.copy(), base.copy()
                caplog.clear()
                want = rc.find_slot(general, rc.SlotRequest.one_token(s, pos))
                want_logs = [r.getMessage() for r in caplog.records]
                caplog.clear()
                got = rc.place_new_sequence(fast, s, pos)
                assert got == want and [r.getMessage() for r in caplog.records] == want_logs
                assert _fields(fast) == _fields(general), (s, pos)
                n_compared += 1
    assert n_compared > 100


def test_place_new_sequence_refuses_as_find_slot(caplog: pytest.LogCaptureFixture) -> None:
    # the only empty cell is still the pending copy source of another cell: no zero state
    # can go there, and both refuse with the same log line and the same leftovers
    caplog.set_level(logging.ERROR, logger="pymem.recurrent.cells")
    c = rc.RecurrentCells(2, 2)
    c.tail[:] = [-1, 1]
    c.pos[:] = [-1, 5]
    c.src[:] = [-1, 0]
    c.used = 1
    general, fast = c.copy(), c.copy()
    assert not rc.find_slot(general, rc.SlotRequest.one_token(0, 3))
    want = [r.getMessage() for r in caplog.records]
    caplog.clear()
    assert not rc.place_new_sequence(fast, 0, 3)
    assert [r.getMessage() for r in caplog.records] == want and "zero state" in want[0]
    assert _fields(fast) == _fields(general)
