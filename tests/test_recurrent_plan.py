"""Planned placements: ``init_batch`` keeps the cells it planned for each ubatch and
``apply`` commits them while the memory is unchanged, instead of running ``find_slot``
again. Pins that this equals placing each ubatch afresh (cells, heads, ``s_copy`` and the
single-use rollback planes consumed between ubatches), and that a memory changed after
``init_batch`` is placed again from its current cells."""

from __future__ import annotations

import pytest
from test_recurrent import balloc_for, cells, check, make_rec

from pymem.recurrent import RecurrentMemory, RecurrentMemoryContext
from pymem.recurrent import memory as rec


def _state(mem: RecurrentMemory) -> tuple:
    c = mem.cells
    return (
        cells(mem),
        c.src.tolist(),
        c.src0.tolist(),
        c.rs_idx.tolist(),
        c.head,
        c.n,
        c.rs_z,
        c.used,
    )


def _run(mem: RecurrentMemory, items: list, n_ubatch: int, planned: bool) -> list:
    """init_batch + every apply; with ``planned`` False the context places again."""
    ctx = mem.init_batch(balloc_for(mem, items), n_ubatch, embd_all=False)
    if not planned:
        ctx = RecurrentMemoryContext(mem, ctx.ubatches)
    out = []
    while True:
        ctx.apply()
        check(mem)
        out.append((ctx.s_copy().tolist(), _state(mem)))
        if not ctx.next():
            return out


def _setup(n_rs_seq: int) -> RecurrentMemory:
    mem = make_rec(n_seq=4, n_rs_seq=n_rs_seq)
    _run(mem, [[1, p, [s], p == 3] for s in range(3) for p in range(4)], 64, True)
    mem.seq_cp(0, 3)  # seq 3 shares seq 0's cell: copy on write at its next ubatch
    if n_rs_seq:
        assert mem.seq_rm(1, 3, -1)  # a pending rollback of seq 1, consumed by its next ubatch
    return mem


@pytest.mark.parametrize("n_rs_seq", [0, 1])
def test_planned_applies_equal_fresh_placement(n_rs_seq: int) -> None:
    p1 = 3 if n_rs_seq else 4
    items = [[1, 4 + k, [0], True] for k in range(3)]
    items += [[1, p1 + k, [1], True] for k in range(3)]
    items += [[1, 4 + k, [3], True] for k in range(3)]
    items += [[1, k, [2], True] for k in range(4, 7)]
    # several ubatches: 2-token pieces of each sequence, in the splitter's order
    got = _run(_setup(n_rs_seq), items, 4, planned=True)
    want = _run(_setup(n_rs_seq), items, 4, planned=False)
    assert len(got) > 1 and got == want


def test_a_change_after_init_batch_places_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    # prepare and apply call find_slot by the name memory.py imported: patch that name
    orig = rec.find_slot

    def spy(c, req):
        calls.append(1)
        return orig(c, req)

    monkeypatch.setattr(rec, "find_slot", spy)
    items = [[1, 0, [s], True] for s in range(3)]
    mem = make_rec(n_seq=4)
    ctx = mem.init_batch(balloc_for(mem, items), 8, embd_all=False)
    assert len(calls) == 1  # planned once
    ctx.apply()
    assert len(calls) == 1  # applied from the plan
    planned = _state(mem)

    # seq 3 takes cell 0 after planning: apply places again, from the current cells
    mem = make_rec(n_seq=4)
    ctx = mem.init_batch(balloc_for(mem, items), 8, embd_all=False)
    other = mem.init_batch(balloc_for(mem, [[1, 0, [3], True]]), 8, embd_all=False)
    other.apply()
    calls.clear()
    ctx.apply()
    assert len(calls) == 1
    assert cells(mem) == [(0, [3]), (0, [0]), (0, [1]), (0, [2])] != planned[0]
    check(mem)

    # the same through a whole state restore of the planned memory itself
    mem = make_rec(n_seq=4)
    blob = mem.state_write()
    ctx = mem.init_batch(balloc_for(mem, items), 8, embd_all=False)
    mem.state_read(blob)
    calls.clear()
    ctx.apply()
    assert len(calls) == 1 and _state(mem) == planned
