"""The steady-state shortcut of the recurrent slot search (``find_slot`` after an
uncoupled placement of the same sequences, with ``tail`` unchanged) must give exactly what
the general path gives: every cell array, every scalar, the return value and the
warnings. Random programs of decode steps (mostly the same sets again, sometimes
reordered, coupled, jumping or with new sequences) mixed with sequence ops run twice,
once with the shortcut and once with it disabled, and the traces are compared step by
step. Also pins that the shortcut is taken at all, and the R2 rule on its general side:
a sequence moved by another's slot search gets ``n_last`` 0. The shortcut runs as the
native ``pm_step_rs_steady`` (its checks and writes in one call) or as numpy
(``_find_slot_steady``, the reference); both are compared with the general path."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_recurrent import make_rec, ub

from pymem.errors import StateError
from pymem.recurrent import RecurrentMemory
from pymem.recurrent import cells as rc
from pymem.state import StateReader


def _snap(mem: RecurrentMemory) -> tuple:
    c = mem.cells
    arrays = (c.pos, c.src, c.src0, c.tail, c.rs_idx, c.n_last)
    return (*(a.tolist() for a in arrays), c.head, c.used, c.n, c.rs_z)


def _program(seed: int, n_seq: int, mem_size: int, n_rs_seq: int) -> list[tuple]:
    """A list of operations: ("ub", sets, last_pos, n_seq_tokens) or a seq op."""
    rng = np.random.default_rng(seed)
    ops: list[tuple] = []
    pos = dict.fromkeys(range(n_seq), -1)
    sets: list[list[int]] = [[s] for s in range(min(3, n_seq))]
    for _ in range(60):
        r = rng.random()
        if r < 0.55:  # the same sets again (the steady state), occasionally reordered
            if rng.random() < 0.1:
                sets = [sets[i] for i in rng.permutation(len(sets))]
        elif r < 0.7:  # a new choice of sets, sometimes coupled
            k = int(rng.integers(1, n_seq + 1))
            ids = [int(x) for x in rng.permutation(n_seq)[:k]]
            if k >= 2 and rng.random() < 0.3:
                sets = [[ids[0], ids[1]]] + [[x] for x in ids[2:]]
            else:
                sets = [[x] for x in ids]
        else:
            s, d = (int(x) for x in rng.integers(0, n_seq, 2))
            kind = int(rng.integers(0, 5))
            if kind == 0:
                ops.append(("seq_rm", s, -1, -1))
                pos[s] = -1
            elif kind == 1:  # a rollback of one or two tokens (or a refused cut)
                ops.append(("seq_rm", s, max(0, pos[s] - int(rng.integers(0, 2))), -1))
            elif kind == 2:
                ops.append(("seq_cp", s, d, -1, -1))
            elif kind == 3:
                ops.append(("seq_add", s, 0, -1, int(rng.integers(-2, 3))))
            else:
                ops.append(("seq_keep", s) if rng.random() < 0.2 else ("seq_rm", d, -1, -1))
            continue
        nst = int(rng.integers(1, 3))
        jump = int(rng.integers(0, 3)) if rng.random() < 0.1 else 0
        last = [pos[ids[0]] + nst + jump for ids in sets]
        for ids, p in zip(sets, last, strict=True):
            for s in ids:
                pos[s] = p
        ops.append(("ub", [list(x) for x in sets], last, nst))
    return ops


def _count_shortcuts(monkeypatch: pytest.MonkeyPatch, native: bool) -> list[int]:
    """Switch the native shortcut on or off; the list grows by one per shortcut taken."""
    monkeypatch.setattr(rc, "USE_NATIVE", native)
    taken: list[int] = []
    steady, steady_native = rc._find_slot_steady, rc._find_slot_steady_native
    monkeypatch.setattr(rc, "_find_slot_steady", lambda *a: taken.append(1) or steady(*a))

    def counted_native(*a):
        done = steady_native(*a)
        taken.extend([1] * done)
        return done

    monkeypatch.setattr(rc, "_find_slot_steady_native", counted_native)
    return taken


def _run(ops: list[tuple], n_seq: int, mem_size: int, n_rs_seq: int,
         caplog: pytest.LogCaptureFixture) -> list:  # fmt: skip
    mem = make_rec(n_seq=n_seq, n_rs_seq=n_rs_seq, mem_size=mem_size)
    trace = []
    for op in ops:
        caplog.clear()
        if op[0] == "ub":
            sets, last, nst = op[1:]
            result = mem.find_slot(ub(*zip([s if len(s) > 1 else s[0] for s in sets], last),
                                      n_seq_tokens=nst))  # fmt: skip
        elif op[0] == "state":  # a restore: the cells change without a sequence op
            result = mem.state_read(mem.state_write(op[1]), op[2])
        else:
            result = getattr(mem, op[0])(*op[1:])
        trace.append((op, result, _snap(mem), [r.getMessage() for r in caplog.records]))
    return trace


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_steady_path_equals_general_path(
    seed: int, native: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="pymem.recurrent.cells")
    n_seq = [3, 5, 8][seed % 3]
    mem_size = n_seq + seed % 2
    n_rs_seq = [0, 2][seed % 2]
    ops = _program(seed, n_seq, mem_size, n_rs_seq)
    taken = _count_shortcuts(monkeypatch, native)
    fast = _run(ops, n_seq, mem_size, n_rs_seq, caplog)
    monkeypatch.setattr(rc, "_remember_steady", lambda *a: None)
    n_taken = len(taken)
    general = _run(ops, n_seq, mem_size, n_rs_seq, caplog)
    assert len(taken) == n_taken  # the second run never took the shortcut
    for i, (a, b) in enumerate(zip(fast, general, strict=True)):
        assert a == b, f"step {i}: {a[0]}"
    assert n_taken > 0


def test_steady_path_taken_on_repeated_decode_and_dropped_after_a_fork() -> None:
    mem = make_rec(n_seq=4)
    for p in range(3):
        assert mem.find_slot(ub((0, p), (1, p), (2, p)))
    st = mem.cells.steady
    assert st is not None and st.lo == 0 and st.used == 3 and st.rng.tolist() == [0, 1, 2]
    # a fork changes tail: the general path places the next step (seq 0 copies on write
    # into cell 3, then the window [1, 3] is put in ubatch order) and remembers anew
    mem.seq_cp(0, 3)
    assert mem.find_slot(ub((0, 3), (1, 3), (2, 3)))
    c = mem.cells
    assert c.tail[:4].tolist() == [1, 2, 3, 0]
    assert (c.head, c.n, c.used, c.rs_z) == (1, 3, 4, 3)
    assert c.src0.tolist() == [0, 0, 1, 2]
    assert c.steady is not None and c.steady.lo == 1


def test_sequence_moved_after_a_steady_run_loses_its_rollbacks() -> None:
    # R2 (tests/test_property_regressions.py) after shortcut steps: seq 2 decodes alone
    # (steady, cell 2); then sets (0), (2) take the window [0, 1], the swap moves seq 1's
    # cell to 2, so seq 1's snapshot planes are gone: n_last 0, no rollback reach
    mem = make_rec(n_seq=4, n_rs_seq=2)
    assert mem.find_slot(ub((0, 2), (1, 2), (2, 2), n_seq_tokens=3))
    assert mem.find_slot(ub((2, 5), n_seq_tokens=3))
    assert mem.find_slot(ub((2, 8), n_seq_tokens=3))
    assert mem.cells.steady is not None and mem.cells.steady.lo == 2
    assert mem.rollback_reach(1) == 2
    assert mem.find_slot(ub((0, 5), (2, 11), n_seq_tokens=3))
    assert mem.cells.tail[:3].tolist() == [0, 2, 1]
    assert mem.cells.n_last[:3].tolist() == [3, 0, 3]
    assert mem.rollback_reach(1) == 0 and mem.rollback_reach(2) == 2


def test_seq_pos_bounds_of_frozen_ids_follow_the_cells() -> None:
    # the allocator's frozen int32 ids are range-checked and widened once; later calls
    # with the same object must still read the current cells (removed, shifted, forked)
    mem = make_rec(n_seq=4)
    assert mem.find_slot(ub((0, 4), (1, 6), (2, 8)))
    ids = np.array([2, 0, 3, 1], dtype=np.int32)
    ids.flags.writeable = False

    def check() -> None:
        assert mem.seq_pos_min_of(ids).tolist() == [mem.seq_pos_min(int(s)) for s in ids]
        assert mem.seq_pos_max_of(ids).tolist() == [mem.seq_pos_max(int(s)) for s in ids]

    check()
    assert mem.seq_pos_min_of(ids).tolist() == [8, 4, -1, 6]
    mem.seq_rm(0, -1, -1)
    mem.seq_add(2, -1, -1, -20)
    check()
    assert mem.seq_pos_min_of(ids).tolist() == [-12, -1, -1, 6]
    assert mem.seq_pos_max_of(ids).tolist() == [-1, -1, -1, 6]
    mem.seq_cp(1, 3)
    check()
    writable = ids.copy()  # not frozen: checked on every call
    writable[0] = 7
    assert mem.seq_pos_min_of(writable).tolist() == [-1, -1, 6, 6]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_steady_path_equals_general_path_across_restores(
    seed: int, native: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a state read changes the cells without a sequence op: a per-sequence read plans on
    # a copy that carries the shortcut's record (and places its cell by find_slot), a
    # whole read starts from fresh cells. Either way the next decode step must be exactly
    # what the general path gives (tail, used, head, sources after the restore)
    caplog.set_level(logging.WARNING, logger="pymem.recurrent.cells")
    n_seq = [3, 5][seed % 2]
    rng = np.random.default_rng(1000 + seed)
    ops: list[tuple] = []
    for op in _program(seed, n_seq, n_seq, 0):
        ops.append(op)
        if op[0] == "ub" and rng.random() < 0.25:
            s, d = (int(x) for x in rng.integers(0, n_seq, 2))
            ops.append(
                ("state", -1, -1)
                if rng.random() < 0.3
                else ("state", s, s if rng.random() < 0.5 else d)
            )
    taken = _count_shortcuts(monkeypatch, native)
    fast = _run(ops, n_seq, n_seq, 0, caplog)
    n_taken = len(taken)
    monkeypatch.setattr(rc, "_remember_steady", lambda *a: None)
    general = _run(ops, n_seq, n_seq, 0, caplog)
    assert len(taken) == n_taken
    for i, (a, b) in enumerate(zip(fast, general, strict=True)):
        assert a == b, f"step {i}: {a[0]}"
    assert n_taken > 0


def _plan_and_apply(mem: RecurrentMemory, ubatch) -> tuple[bool, list[int] | None]:
    """A batch's road for one ubatch: ``prepare`` (which must change nothing), then the
    apply of its plan; (fits, s_copy rows) as a context would see them."""
    before = _snap(mem)
    plan = mem.prepare([ubatch])
    assert _snap(mem) == before  # planning changed nothing (a steady one asked in place)
    if plan is None:
        return False, None
    return True, mem.apply_ubatch(plan.requests[0], plan, 0).tolist()


@pytest.mark.parametrize("seed", range(16))
def test_a_steady_decode_step_is_planned_without_a_copy_and_placed_in_place(
    seed: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare asks the steady step of the live cells (pm_step_rs_steady, dry) and plans
    # no copy; the apply places it in those cells. Every step (cells, scalars, s_copy,
    # warnings) must equal the copy-planning road of the numpy reference, and the in-place
    # road must have been taken, keeping the cells object and copying nothing
    caplog.set_level(logging.WARNING, logger="pymem.recurrent.cells")
    n_seq = [3, 5, 8][seed % 3]
    n_rs_seq = [0, 2][seed % 2]
    ops = _program(seed, n_seq, n_seq, n_rs_seq)

    def run(native: bool) -> tuple[list, int]:
        monkeypatch.setattr(rc, "USE_NATIVE", native)
        copies = [0]
        real_copy = rc.RecurrentCells.copy

        def counted(self: rc.RecurrentCells) -> rc.RecurrentCells:
            copies[0] += 1
            return real_copy(self)

        monkeypatch.setattr(rc.RecurrentCells, "copy", counted)
        mem = make_rec(n_seq=n_seq, n_rs_seq=n_rs_seq)
        trace, in_place = [], 0
        for op in ops:
            caplog.clear()
            if op[0] == "ub":
                sets, last, nst = op[1:]
                ubatch = ub(*zip([s if len(s) > 1 else s[0] for s in sets], last), n_seq_tokens=nst)
                cells, n_copies = mem.cells, copies[0]
                result = _plan_and_apply(mem, ubatch)
                in_place += mem.cells is cells and copies[0] == n_copies and result[0]
            else:
                result = getattr(mem, op[0])(*op[1:])
            trace.append((op, result, _snap(mem), [r.getMessage() for r in caplog.records]))
        monkeypatch.setattr(rc.RecurrentCells, "copy", real_copy)
        return trace, in_place

    fast, n_in_place = run(True)
    reference, n_ref_in_place = run(False)
    for i, (a, b) in enumerate(zip(fast, reference, strict=True)):
        assert a == b, f"step {i}: {a[0]}"
    assert n_in_place > 0 and n_ref_in_place == 0


def _decode_three(mem: RecurrentMemory) -> None:
    for p in range(3):
        assert _plan_and_apply(mem, ub((0, p), (1, p), (2, p)))[0]


def test_a_steady_step_in_place_is_a_change_of_the_memory() -> None:
    # the cells object stays, so only the version tells that the step changed it: plans
    # made before it (a state read's, a batch's) must be refused or placed anew after it
    mem = make_rec(n_seq=4)
    _decode_three(mem)
    for seq_id in (0, -1):
        read = mem.state_read_parse(StateReader(mem.state_write(seq_id)), seq_id)
        batch = mem.prepare([ub((0, 3), (1, 3), (2, 3))])
        assert batch is not None and batch.states == [None]
        cells = mem.cells
        assert _plan_and_apply(mem, ub((0, 3), (1, 3), (2, 3)))[0]
        assert mem.cells is cells  # (in place)
        with pytest.raises(StateError, match="changed after"):
            read.commit()
        # the batch plan's step was taken: applied now, it is placed anew from the cells
        # as they are (positions 3 again after 3: a jump the general road logs and takes)
        mem.apply_ubatch(batch.requests[0], batch, 0)
        assert mem.cells is not cells
        mem = make_rec(n_seq=4)
        _decode_three(mem)


def test_a_steady_plan_applied_after_a_change_places_the_step_anew() -> None:
    # a plan made steady, then the memory changed before the apply (the version moved):
    # the apply must not trust the plan's check; it places the ubatch from the current
    # cells, as a plan made after the change would
    decode_three = _decode_three
    for change in (("seq_cp", 0, 3), ("seq_rm", 1, -1, -1), ("seq_add", 2, -1, -1, 5)):
        late, fresh = make_rec(n_seq=4), make_rec(n_seq=4)
        decode_three(late)
        decode_three(fresh)
        step = ub((0, 3), (1, 3), (2, 3))
        plan = late.prepare([step])
        assert plan is not None and plan.states == [None]  # planned in place: steady
        getattr(late, change[0])(*change[1:])
        getattr(fresh, change[0])(*change[1:])
        s_copy = late.apply_ubatch(plan.requests[0], plan, 0).tolist()
        assert (True, s_copy) == _plan_and_apply(fresh, step), change
        assert _snap(late) == _snap(fresh), change


@pytest.mark.parametrize("seed", range(6))
def test_native_drop_seq_equals_numpy(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # RecurrentCells.drop_seq in one native call (pm_rs_drop_seq) and in numpy (the
    # reference): the same tails, positions, sources and emptied cell for every id of
    # random cells with shared ones (seq_cp) and sequences without a cell; an id or a
    # tail outside the cells is refused with nothing written
    rng = np.random.default_rng(seed)
    size = n_tail = 7  # (a sequence id names a tail entry: one per cell)
    for _ in range(20):
        base = rc.RecurrentCells(size, 9)
        base.tail[:] = rng.integers(-1, size, n_tail)
        base.pos[:] = rng.integers(-1, 50, size)
        base.src[:] = rng.integers(-1, size, size)
        for seq_id in range(n_tail):
            got = []
            for native in (True, False):
                monkeypatch.setattr(rc, "USE_NATIVE", native)
                c = base.copy()
                emptied = c.drop_seq(seq_id)
                got.append((emptied, c.tail.tolist(), c.pos.tolist(), c.src.tolist()))
            assert got[0] == got[1], (seed, seq_id)
    monkeypatch.setattr(rc, "USE_NATIVE", True)
    c = base.copy()
    c.tail[2] = size  # a tail past the cells
    before = (c.tail.tolist(), c.pos.tolist(), c.src.tolist())
    for bad in (2, n_tail, -1):
        with pytest.raises(Exception, match="pm_rs_drop_seq"):
            c.drop_seq(bad)
        assert (c.tail.tolist(), c.pos.tolist(), c.src.tolist()) == before
