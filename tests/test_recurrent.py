"""Hand-worked cases for RecurrentMemory (llama_memory_recurrent parity).

Each test states the behaviour it pins; exact cells, heads and positions are asserted
after every operation, followed by the invariant checker.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from recurrent_helpers import check_invariants as check
from test_recurrent_oracle import make_ubatch

from pymem.batch import Batch, BatchAllocator
from pymem.errors import (
    BatchError,
    ClosedError,
    ConfigError,
    RangeError,
    StateError,
)
from pymem.memory import MemoryStatus, StateFlags
from pymem.recurrent import RecurrentMemory
from pymem.spec import LayerSpec, ModelSpec
from pymem.state import StateReader
from pymem.ubatch import UBatch

R, S = 8, 12  # n_embd_r, n_embd_s of the test model (f32: rows of 32 and 48 bytes)


def make_rec(n_seq: int = 4, n_rs_seq: int = 0, mem_size: int | None = None, n_layer: int = 2,
             **kw) -> RecurrentMemory:  # fmt: skip
    spec = ModelSpec(layers=(LayerSpec.ssm(R, S),) * n_layer, arch="mamba")
    return RecurrentMemory(spec, n_seq_max=n_seq, n_rs_seq=n_rs_seq, mem_size=mem_size, **kw)


def ub(*sets: tuple[list[int] | int, int], n_seq_tokens: int = 1) -> UBatch:
    """``ub((seq, last_pos), ([s1, s2], last_pos), ...)``: one set per argument, in order."""
    ids = [[s] if isinstance(s, int) else list(s) for s, _ in sets]
    return make_ubatch(ids, [p for _, p in sets], n_seq_tokens)


def place(mem: RecurrentMemory, *sets: tuple[list[int] | int, int], n_seq_tokens: int = 1) -> None:
    assert mem.find_slot(ub(*sets, n_seq_tokens=n_seq_tokens))
    check(mem)


def cells(mem: RecurrentMemory) -> list[tuple[int, list[int]]]:
    """(pos, seq ids) per cell."""
    return [(int(mem.cells.pos[i]), mem.cells.seq_ids(i)) for i in range(mem.size)]


def fill_rows(mem: RecurrentMemory) -> None:
    """Give every row of every R/S tensor a distinct recognisable value (il*1000 + row)."""
    for il in mem.layers:
        for t in (mem.get_r_l(il), mem.get_s_l(il)):
            a = t.numpy()
            a[:] = (il * 1000 + np.arange(a.shape[0]))[:, None] + (
                0.5 if t is mem.get_s_l(il) else 0
            )


def row_value(blob_rows: bytes, width: int) -> list[float]:
    return np.frombuffer(blob_rows, np.float32).reshape(-1, width)[:, 0].tolist()


# ---------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------


def test_tensors_shapes_names_and_breakdown() -> None:
    mem = make_rec(n_seq=4, n_rs_seq=2)
    r, s = mem.get_r_l(0), mem.get_s_l(1)
    assert (r.name, r.shape[:2], r.row_size) == ("cache_r_l0", (R, 12), 4 * R)
    assert (s.name, s.shape[:2], s.row_size) == ("cache_s_l1", (S, 12), 4 * S)
    assert mem.memory_breakdown() == {"CPU": 2 * 12 * 4 * (R + S)}
    assert mem.get_can_shift() is True
    with pytest.raises(RangeError, match="layer 5"):
        mem.get_r_l(5)
    mem.close()
    with pytest.raises(ClosedError):
        mem.seq_rm(0)


def test_filter_and_device_mapping() -> None:
    spec = ModelSpec(layers=(LayerSpec.ssm(R, S), LayerSpec.attention(2, 8), LayerSpec.ssm(R, S)))
    mem = RecurrentMemory(spec, n_seq_max=2, filter=spec.is_recurrent, device={0: "CPU", 2: "cpu"})
    assert mem.layers == (0, 2)
    # n_layer in the blob header is every model layer, not only the recurrent ones
    assert struct.unpack_from("<III", mem.state_write(), 0) == (0, 0, 3)
    with pytest.raises(ConfigError, match="layer 2"):
        RecurrentMemory(spec, n_seq_max=2, filter=spec.is_recurrent, device={0: "CPU"})


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"n_seq_max": 0}, "n_seq_max"), ({"n_seq_max": 257}, "n_seq_max"), ({"n_rs_seq": -1}, "n_rs_seq"),
     ({"mem_size": 0}, "mem_size"), ({"n_seq_max": True}, "n_seq_max")],
)  # fmt: skip
def test_bad_config(kw: dict, match: str) -> None:
    spec = ModelSpec(layers=(LayerSpec.ssm(R, S),))
    with pytest.raises(ConfigError, match=match):
        RecurrentMemory(spec, **kw)


def test_negative_width_refused() -> None:
    with pytest.raises(ConfigError, match="negative recurrent widths"):
        RecurrentMemory(ModelSpec(layers=(LayerSpec.ssm(-1, S),)), n_seq_max=1)


def test_zero_width_r_keeps_its_state_header() -> None:
    # regression: zero-width R was refused, but MiniMax-01's lightning layers keep only S
    # (no conv state: n_embd_r 0) and the reference allocates a zero-wide R; its state
    # carries R's header (i32 type, u64 row size 0), no row bytes, then S
    import struct

    from pymem.batch import Batch, BatchAllocator

    mem = RecurrentMemory(ModelSpec(layers=(LayerSpec.ssm(0, 8),)), n_seq_max=2)
    balloc = BatchAllocator()
    balloc.init(Batch.from_items([(1, 0, [0], False), (2, 1, [0], True)]), memory=mem, n_seq_max=2)
    ctx = mem.init_batch(balloc, 8, embd_all=False)
    while True:
        ctx.apply()
        if not ctx.next():
            break
    blob = mem.state_write(0)
    # cell_count, pos, n_seq_id | s_trans, n_layer | R: type, row 0 | S: type, row, 32 bytes
    assert len(blob) == 12 + 8 + 12 + 12 + 32
    assert struct.unpack_from("<iQ", blob, 12 + 8) == (0, 0)
    mem.seq_rm(0)
    assert mem.state_read(blob, 1) == len(blob)
    assert mem.seq_pos_max(1) == 1


def test_nextn_layers_are_outside_the_recurrent_memory() -> None:
    # regression: the state header counted every layer (5 for bailingmoe3's 4 trunk
    # layers + 1 NextN layer); the reference's recurrent memory covers hparams.n_layer(),
    # the trunk only: its header says 4, and a trailing NextN layer never gets states
    layers = (LayerSpec.ssm(R, S), LayerSpec.attention(1, 8), LayerSpec.ssm(R, S))
    spec = ModelSpec(layers=layers, n_layer_nextn=1)
    mem = RecurrentMemory(spec, n_seq_max=1, filter=spec.is_recurrent)
    assert (mem.layers, mem.n_layer_trunk) == ((0,), 2)
    blob = mem.state_write(-1)
    # cell_count 0 | s_trans, n_layer
    assert struct.unpack_from("<III", blob, 0) == (0, 0, 2)
    mem.close()


def test_zero_width_s_keeps_its_state_header() -> None:
    # LFM2's short-conv layers have no SSM state: S is zero-wide, but the state still
    # carries its per-layer header (i32 type, u64 row size 0) and no row bytes
    import struct

    from pymem.batch import Batch, BatchAllocator

    mem = RecurrentMemory(ModelSpec(layers=(LayerSpec.ssm(8, 0),)), n_seq_max=2)
    balloc = BatchAllocator()
    balloc.init(Batch.from_items([(1, 0, [0], False), (2, 1, [0], True)]), memory=mem, n_seq_max=2)
    ctx = mem.init_batch(balloc, 8, embd_all=False)
    while True:
        ctx.apply()
        if not ctx.next():
            break
    blob = mem.state_write(0)
    # cell_count, pos, n_seq_id | s_trans, n_layer | R: type, row, 32 bytes | S: type, row 0
    assert len(blob) == 12 + 8 + 12 + 32 + 12
    assert struct.unpack_from("<iQ", blob, len(blob) - 12) == (0, 0)
    mem.seq_rm(0)
    assert mem.state_read(blob, 1) == len(blob)
    assert mem.seq_pos_max(1) == 1


# ---------------------------------------------------------------------------------------
# find_slot
# ---------------------------------------------------------------------------------------


def test_fresh_sequences_fill_cells_in_order() -> None:
    mem = make_rec()
    place(mem, (0, 2), (1, 2), n_seq_tokens=3)
    assert cells(mem) == [(2, [0]), (2, [1]), (-1, []), (-1, [])]
    assert (mem.head, mem.n, mem.used, mem.rs_z) == (0, 2, 2, 0)
    # both start from the zero state, gathered from rs_z = cell 0
    assert mem.cells.src0[:2].tolist() == [0, 0]
    assert mem.cells.src.tolist() == [0, 1, -1, -1]


def test_fork_copy_on_write_and_swap_order() -> None:
    # pins: a shared cell is kept by the last of its sequences in ubatch order; the
    # mover copies pos/src into the first empty cell; cells are swapped so set s lands in
    # head + s; cells in between are "extra" states copied onto themselves.
    mem = make_rec()
    place(mem, (0, 2), (1, 2), n_seq_tokens=3)
    mem.seq_cp(0, 3)
    check(mem)
    assert cells(mem)[:2] == [(2, [0, 3]), (2, [1])]
    assert mem.seq_pos_max(3) == 2 and mem.used == 2

    ctx_cells = ub((3, 3), (0, 3))
    assert mem.find_slot(ctx_cells)
    check(mem)
    # seq 3 moved to empty cell 2 (copying pos 2, src 0); seq 0 kept cell 0; then
    # swap(0 <- cell 2) and swap(1 <- seq 0's content) give [seq 3, seq 0, seq 1]
    assert cells(mem) == [(3, [3]), (3, [0]), (2, [1]), (-1, [])]
    assert (mem.head, mem.n, mem.rs_z) == (0, 3, 2)
    assert mem.cells.src0[:3].tolist() == [0, 0, 1]  # both forks read row 0, seq 1 its old row 1
    assert mem.cells.tail.tolist() == [1, 2, -1, 0]


def test_cow_single_fork_advances() -> None:
    mem = make_rec()
    place(mem, (0, 2), (1, 2), n_seq_tokens=3)
    mem.seq_cp(0, 2)
    place(mem, (2, 3))
    assert cells(mem) == [(2, [0]), (2, [1]), (3, [2]), (-1, [])]
    assert (mem.head, mem.n, mem.rs_z) == (2, 1, 2)
    assert mem.cells.src0[2] == 0  # copy on write: gathers the shared state of cell 0


def test_empty_cell_search_is_cyclic_from_head() -> None:
    # cells [0, 1, 2, 3, 4] hold seqs 0..4; seq 1 removed; head moved to 3 by a decode of
    # seq 3. A new sequence takes cell 5 (first empty at/after head), not cell 1.
    mem = make_rec(n_seq=6)
    place(mem, *[(s, 0) for s in range(5)])
    assert mem.seq_rm(1)
    assert mem.head == 0  # freed cell 1 is not below head 0
    place(mem, (3, 1))
    assert (mem.head, mem.used) == (3, 4)
    place(mem, (1, 0))
    assert mem.cells.tail[1] == 5
    assert cells(mem)[5] == (0, [1]) and cells(mem)[1] == (-1, [])


def test_empty_cell_search_wraps_around() -> None:
    mem = make_rec(n_seq=4)
    place(mem, (0, 0), (1, 0), (2, 0), (3, 0))
    mem.seq_rm(0)
    mem.seq_rm(1)
    place(mem, (3, 1))  # head 3; used 2: 3 > 2 + 2 is false, the search starts at 3
    place(mem, (1, 0))  # cell 3 is taken -> wraps to cell 0
    assert mem.cells.tail[1] == 0


def test_head_restarts_when_many_cells_before_it_are_free() -> None:
    # head 9 > used 2 + 2 * 1 -> the search restarts at 0 (the reference's heuristic)
    mem = make_rec(n_seq=16)
    place(mem, *[(s, 0) for s in range(10)])
    for s in range(8):
        assert mem.seq_rm(s)
    place(mem, (9, 1))
    assert (mem.head, mem.used) == (9, 2)
    place(mem, (10, 0))
    assert mem.cells.tail[10] == 0
    assert (mem.head, mem.n) == (0, 1)


def test_invalid_seq_id_fails_and_changes_nothing() -> None:
    # "eviction" does not exist for recurrent memory: a sequence id at or beyond
    # mem_size has no cell, and the ubatch cannot be placed
    mem = make_rec(n_seq=4, mem_size=2)
    place(mem, (0, 0))
    before = mem.cells.copy()
    assert not mem.find_slot(ub((1, 0), (2, 0)))
    assert not mem.prepare([ub((1, 0)), ub((3, 0))])
    assert np.array_equal(mem.cells.tail, before.tail) and mem.head == before.head
    assert mem.prepare([ub((1, 0)), ub((0, 1))])
    check(mem)


def test_split_simple_ubatch_refused() -> None:
    mem = make_rec()
    u = ub((0, 0))
    u.equal_seqs = False
    with pytest.raises(BatchError, match="equal_seqs"):
        mem.find_slot(u)


def test_coupled_sequences_join_one_cell() -> None:
    # a token of seqs {1, 2} (split_seq with embd_all): both end up in one cell; seq 2's
    # previous (owned) cell is emptied
    mem = make_rec()
    place(mem, (0, 0), (1, 0), (2, 0))
    place(mem, ([1, 2], 1))
    assert cells(mem) == [(0, [0]), (1, [1, 2]), (-1, []), (-1, [])]
    assert (mem.used, mem.head, mem.n) == (2, 1, 1)


def test_non_consecutive_position_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    mem = make_rec()
    place(mem, (0, 3))
    place(mem, (0, 9))
    assert cells(mem)[0] == (9, [0])
    assert "non-consecutive token position 9 after 3" in caplog.text


# ---------------------------------------------------------------------------------------
# sequence ops
# ---------------------------------------------------------------------------------------


def test_seq_rm_results() -> None:
    mem = make_rec()
    place(mem, (0, 9), (1, 4))
    # partial tail cut without snapshots: False, nothing changes
    assert mem.seq_rm(0, 5, -1) is False
    assert mem.seq_rm(0, 9, 10) is False
    # interior range / range past the tail: True, nothing changes (quirk)
    assert mem.seq_rm(0, 2, 5) is True
    assert mem.seq_rm(0, 10, -1) is True
    assert mem.seq_rm(0, 0, 9) is True
    assert cells(mem)[:2] == [(9, [0]), (4, [1])]
    # seq id < 0 is always False, even for the whole range (unsigned compare quirk)
    assert mem.seq_rm(-1, -1, -1) is False
    assert mem.seq_rm(-1, 1, 3) is False
    assert mem.seq_rm(4, -1, -1) is False
    assert mem.used == 2
    # a range from 0 holding the tail removes the sequence
    assert mem.seq_rm(0, 0, 10) is True
    assert cells(mem)[:2] == [(-1, []), (4, [1])]
    assert (mem.head, mem.used) == (0, 1)
    check(mem)
    # unknown sequence: True
    assert mem.seq_rm(2) is True


@pytest.mark.parametrize("kind", [np.int32, np.int64, bool])
def test_seq_rm_takes_numpy_ints_as_plain_ones(kind: type) -> None:
    # seq_rm converts only what is not a plain int (a speed path for the common call):
    # numpy ints (and a bool, an int subclass) give what the plain ints give, every case
    # of test_seq_rm_results
    cases = [(0, 5, -1), (0, 9, 10), (0, 2, 5), (0, 10, -1), (-1, -1, -1), (4, -1, -1),
             (1, 0, 4), (1, 0, 10), (0, 0, 9), (0, 0, 10), (2, -1, -1)]  # fmt: skip
    plain, typed = make_rec(), make_rec()
    for mem in (plain, typed):
        place(mem, (0, 9), (1, 4))
    for args in cases:
        conv = [kind(a) if kind is not bool or a in (0, 1) else a for a in args]
        assert typed.seq_rm(*conv) is plain.seq_rm(*args), args
        assert cells(typed) == cells(plain) and typed.used == plain.used, args
        assert all(type(v) is int for v in (typed.head, typed.used))


def test_seq_rm_shared_cell_keeps_other_sequence() -> None:
    mem = make_rec()
    place(mem, (0, 5))
    mem.seq_cp(0, 1)
    assert mem.seq_rm(0)
    assert cells(mem)[0] == (5, [1])
    assert mem.used == 1
    check(mem)


def test_rollback_within_n_rs_seq() -> None:
    mem = make_rec(n_rs_seq=2)
    fill_rows(mem)
    place(mem, (0, 9), (1, 3), n_seq_tokens=3)
    assert mem.seq_rm(0, 8, -1) is True  # rollback 2 <= 2
    assert mem.seq_pos_max(0) == 7 and mem.rs_idx.tolist() == [2, 0, 0, 0]
    check(mem)
    # single use: a second rollback before the next decode is refused
    assert mem.seq_rm(0, 7, -1) is False
    assert mem.seq_pos_max(0) == 7
    # the per-seq blob holds the logical state: row 2 * mem_size + cell 0 = 8
    data = mem.state_write(0)
    assert struct.unpack_from("<Iii", data, 0) == (1, 7, 0)
    assert row_value(data[12 + 8 + 12 : 12 + 8 + 12 + 4 * R], R) == [8.0]
    # the next decode gathers from the snapshot plane once, then the index is cleared
    ctx = decode_ubatches(mem, [ub((0, 8))])
    assert ctx.s_copy().tolist() == [8]
    assert mem.rs_idx.tolist() == [0, 0, 0, 0]
    assert ctx.s_copy().tolist() == [8]  # a pure getter
    check(mem)


# Departure from the reference (issue 15): a rollback of k tokens is exact only when the
# ubatch that last advanced the sequence held more than k of its tokens (its kernels wrote
# the snapshot planes from inside that ubatch). The reference also accepts k >= that count,
# returns True and restores a stale plane; pymem refuses (False, nothing changed).
def test_rollback_beyond_the_last_ubatch_is_refused() -> None:
    mem = make_rec(n_rs_seq=8)
    place(mem, (0, 17), n_seq_tokens=18)  # positions 0..17 in one ubatch
    place(mem, (0, 18))  # position 18 alone: its planes reach back 0 tokens
    before = (mem.cells.copy(), mem.state_write())
    assert mem.seq_rm(0, 18, -1) is False  # k = 1 >= 1 token in the last ubatch
    assert mem.seq_pos_max(0) == 18 and mem.rs_idx[0] == 0
    assert mem.state_write() == before[1]
    assert (mem.cells.pos == before[0].pos).all()
    # one more ubatch of 4 tokens: rollbacks of 1..3 are exact, 4 is not
    place(mem, (0, 22), n_seq_tokens=4)
    assert mem.seq_rm(0, 19, -1) is False  # k = 4
    assert mem.seq_rm(0, 20, -1) is True  # k = 3
    assert mem.seq_pos_max(0) == 19 and mem.rs_idx[0] == 3
    check(mem)


def test_rollback_exactness_follows_copies_restores_and_clears() -> None:
    mem = make_rec(n_rs_seq=2)
    place(mem, (0, 5), n_seq_tokens=3)
    mem.seq_cp(0, 1)  # seq 1 shares the cell and its planes
    assert mem.seq_rm(1, 5, -1) is True  # k = 1 < 3
    blob = mem.state_write(0)
    mem.seq_rm(2, -1, -1)
    mem.state_read(blob, 2)  # a restored state comes without snapshot planes
    pos = mem.seq_pos_max(2)
    assert pos == 4 and mem.seq_rm(2, pos, -1) is False
    mem.clear()
    place(mem, (0, 1), n_seq_tokens=2)
    mem.seq_rm(0, -1, -1)
    place(mem, (0, 0))  # a fresh start, one token at a time
    place(mem, (0, 1))
    assert mem.seq_rm(0, 1, -1) is False
    check(mem)


def test_rollback_beyond_n_rs_seq_and_edge_values() -> None:
    mem = make_rec(n_rs_seq=2)
    place(mem, (0, 9), n_seq_tokens=3)
    assert mem.seq_rm(0, 7, -1) is False  # rollback 3 > 2
    assert mem.seq_rm(0, 1, 5) is True  # interior: no-op
    assert mem.seq_pos_max(0) == 9 and mem.rs_idx[0] == 0
    assert mem.seq_rm(0, 9, -1) is True  # rollback 1
    assert mem.seq_pos_max(0) == 8
    # a whole-range removal clears the pending rollback
    assert mem.seq_rm(0, -1, -1) is True
    assert mem.rs_idx[0] == 0 and mem.seq_pos_max(0) == -1
    check(mem)


def test_rollback_with_extra_cells_in_range() -> None:
    # the plane offset applies to every gathered cell whose first sequence has a pending
    # rollback, including "extra" cells that are only copied onto themselves
    mem = make_rec(n_rs_seq=1)
    place(mem, (0, 4), (1, 4), (2, 4), n_seq_tokens=2)
    assert mem.seq_rm(1, 4, -1)
    ctx = decode_ubatches(mem, [ub((0, 5), (2, 5))])
    # sets 0 and 2 in cells 0, 1 after swapping; cell 2 (seq 1) is an extra state
    assert cells(mem)[:3] == [(5, [0]), (5, [2]), (3, [1])]
    assert ctx.s_copy().tolist() == [0, 2, 1 * 4 + 1]
    assert mem.rs_idx.tolist() == [0, 0, 0, 0]


def test_fresh_sequence_never_reads_a_stale_rollback_plane() -> None:
    # reference flaw fixed: seq_keep leaves seq 0's pending rollback; when seq 0 starts
    # again it must gather the zeroed row of plane 0, not plane 1
    mem = make_rec(n_rs_seq=1)
    place(mem, (0, 4), (1, 4), n_seq_tokens=2)
    assert mem.seq_rm(0, 4, -1)
    mem.seq_keep(1)
    assert mem.rs_idx[0] == 1  # kept, as the reference does
    ctx = decode_ubatches(mem, [ub((0, 0))])
    assert ctx.s_copy().tolist() == [mem.rs_z] == [0]
    assert mem.rs_idx[0] == 0


def test_shared_cell_with_different_rollbacks_cannot_be_saved_whole() -> None:
    mem = make_rec(n_rs_seq=1)
    place(mem, (0, 4), n_seq_tokens=2)
    assert mem.seq_rm(0, 4, -1)
    mem.seq_cp(0, 1)  # the reference does not copy rs_idx
    with pytest.raises(StateError, match="different pending rollbacks"):
        mem.state_write()
    assert len(mem.state_write(0)) == len(mem.state_write(1))


def test_seq_cp_semantics() -> None:
    mem = make_rec()
    place(mem, (0, 3), (1, 7))
    mem.seq_cp(0, 1, 5, 6)  # range ignored; dst's own cell is freed
    assert cells(mem)[:2] == [(3, [0, 1]), (-1, [])]
    assert (mem.used, mem.seq_pos_max(1)) == (1, 3)
    check(mem)
    mem.seq_cp(2, 0)  # empty source: dst becomes empty too (shared cell keeps seq 1)
    assert cells(mem)[0] == (3, [1])
    mem.seq_cp(1, 9)  # out of range: no-op
    mem.seq_cp(-1, 1)
    assert cells(mem)[0] == (3, [1])
    check(mem)


def test_seq_keep() -> None:
    mem = make_rec()
    place(mem, (0, 3), (1, 7), (2, 1))
    mem.seq_cp(1, 3)
    mem.seq_keep(1)
    assert cells(mem) == [(-1, []), (7, [1]), (-1, []), (-1, [])]
    assert (mem.used, mem.head) == (1, 0)
    check(mem)
    mem.seq_keep(-1)  # no cell holds -1: everything goes (as the reference)
    assert cells(mem) == [(-1, [])] * 4 and mem.used == 0
    check(mem)


def test_seq_add_div_move_position_only() -> None:
    mem = make_rec()
    place(mem, (0, 10), (1, 7))
    mem.seq_add(0, 0, -1, 5)
    mem.seq_add(1, 0, 7, 5)  # 7 not in [0, 7): unchanged
    assert [mem.seq_pos_max(s) for s in (0, 1)] == [15, 7]
    mem.seq_div(0, -1, -1, 4)
    assert mem.seq_pos_max(0) == 3
    mem.seq_div(0, -1, -1, -2)  # C truncation: 3 / -2 == -1 (Python's // gives -2)
    assert mem.seq_pos_min(0) == mem.seq_pos_max(0) == -1  # a negative position is kept
    # ... and is out of reach of every range, since p0 is clamped to 0 (quirk)
    mem.seq_add(0, -1, -1, 10)
    assert mem.seq_rm(0, -1, -1) is True
    assert mem.seq_pos_max(0) == -1 and mem.cells.seq_ids(0) == [0]
    with pytest.raises(RangeError, match="d must not be 0"):
        mem.seq_div(1, -1, -1, 0)
    with pytest.raises(RangeError, match="int32"):
        mem.seq_add(1, -1, -1, 2**31)
    assert mem.seq_pos_max(1) == 7


def test_negative_position_reads_as_max_minus_one() -> None:
    # Regression (recorded run mamba.ops.u1, step 13): seq_add(3, -1, -1, -100) on a state
    # at position 9 leaves the cell at -91; the reference reports seq_pos_min -91 and
    # seq_pos_max -1 (its max starts at -1), pymem reported -91 for both.
    mem = make_rec()
    place(mem, (0, 9), (1, 4))
    mem.seq_add(0, -1, -1, -100)
    assert (mem.seq_pos_min(0), mem.seq_pos_max(0)) == (-91, -1)
    assert mem.cells.seq_ids(int(mem.cells.tail[0])) == [0]  # the state is kept
    mem.seq_div(1, -1, -1, -2)  # C truncation: 4 / -2 == -2
    assert (mem.seq_pos_min(1), mem.seq_pos_max(1)) == (-2, -1)
    mem.seq_add(1, -1, -1, 5)  # p0 clamps to 0: the negative position is out of reach
    assert (mem.seq_pos_min(1), mem.seq_pos_max(1)) == (-2, -1)
    assert (mem.seq_pos_min(2), mem.seq_pos_max(2)) == (-1, -1)


def test_clear() -> None:
    mem = make_rec(n_rs_seq=1)
    fill_rows(mem)
    place(mem, (0, 3), (1, 3))
    mem.seq_rm(0, 3, -1)
    mem.clear(data=False)
    assert cells(mem) == [(-1, [])] * 4 and (mem.head, mem.used) == (0, 0)
    assert mem.rs_idx.tolist() == [0] * 4
    assert mem.get_r_l(0).numpy()[1, 0] == 1.0
    mem.clear()
    assert not mem.get_r_l(0).numpy().any() and not mem.get_s_l(1).numpy().any()
    check(mem)


# ---------------------------------------------------------------------------------------
# contexts: init_batch through the batch allocator, graph inputs
# ---------------------------------------------------------------------------------------


def decode_ubatches(mem: RecurrentMemory, ubatches: list[UBatch]):
    from pymem.recurrent import RecurrentMemoryContext

    assert mem.prepare(ubatches)
    ctx = RecurrentMemoryContext(mem, ubatches)
    ctx.apply()
    check(mem)
    return ctx


def balloc_for(mem: RecurrentMemory, items: list) -> BatchAllocator:
    b = BatchAllocator()
    b.init(Batch.from_items(items), memory=mem, n_seq_max=mem.n_seq_max)
    return b


def test_init_batch_plans_without_mutation_then_applies() -> None:
    mem = make_rec()
    items = [[1, p, [s], p == 2] for s in (0, 1) for p in range(3)]
    ctx = mem.init_batch(balloc_for(mem, items), 256, embd_all=False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    assert mem.used == 0 and mem.seq_pos_max(0) == -1  # planning changed nothing
    u = ctx.get_ubatch()
    assert (u.n_seqs, u.n_seq_tokens) == (2, 3)
    assert ctx.apply()
    assert (ctx.get_head(), ctx.get_n_rs(), ctx.get_rs_z(), ctx.get_size()) == (0, 2, 0, 4)
    assert ctx.s_copy().tolist() == [0, 0]
    assert ctx.s_copy_main().tolist() == [0, 0] and ctx.s_copy_extra().tolist() == []
    assert ctx.r_view(0).shape == (2, R) and ctx.s_view(1).shape == (2, S)
    assert ctx.get_r_l(1) is mem.get_r_l(1)
    assert not ctx.next()
    assert [mem.seq_pos_max(s) for s in range(3)] == [2, 2, -1]
    check(mem)


def test_init_batch_n_keep_tail_with_rollback() -> None:
    # n_rs_seq 2 -> split_equal(n_ubatch, True, n_keep_tail=3): the last 3 tokens of a
    # sequence stay in one ubatch. 5 tokens with n_ubatch 4: [2 tokens] then [3 tokens]
    mem = make_rec(n_rs_seq=2)
    items = [[1, p, [0], p == 4] for p in range(5)]
    ctx = mem.init_batch(balloc_for(mem, items), 4, embd_all=False)
    sizes = [ctx.get_ubatch().n_tokens]
    while ctx.next():
        sizes.append(ctx.get_ubatch().n_tokens)
    assert sizes == [2, 3]


def test_coupled_tokens_need_split_seq() -> None:
    # a prompt shared by seqs 2 and 3: the sequential splitter refuses it (FAILED_PREPARE,
    # decode returns 1); with embd_all the sequence splitter places both in one cell
    mem = make_rec()
    items = [[50, 0, [2, 3], False], [21, 1, [2, 3], True]]
    ctx = mem.init_batch(balloc_for(mem, items), 256, embd_all=False)
    assert ctx.get_status() == MemoryStatus.FAILED_PREPARE
    with pytest.raises(BatchError):
        ctx.get_ubatch()
    assert mem.used == 0
    ctx = mem.init_batch(balloc_for(mem, items), 256, embd_all=True)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    ctx.apply()
    assert cells(mem)[0] == (1, [2, 3])
    check(mem)


def test_full_and_update_contexts() -> None:
    mem = make_rec()
    place(mem, (0, 1), (1, 1))
    full = mem.init_full()
    assert full.get_status() == MemoryStatus.SUCCESS
    assert (full.get_n_rs(), full.get_head(), full.get_rs_z()) == (4, 0, 0)
    assert full.s_copy().tolist() == [0, 0, -1, -1]
    assert full.apply()
    upd = mem.init_update()
    assert upd.get_status() == MemoryStatus.NO_UPDATE
    assert upd.apply()


def test_apply_after_memory_changed() -> None:
    mem = make_rec(n_seq=4, mem_size=1)
    ctx = mem.init_batch(balloc_for(mem, [[1, 0, [0], True]]), 8, embd_all=False)
    mem.seq_cp(0, 0)  # no-op; plan still valid
    assert ctx.apply()
    assert mem.seq_pos_max(0) == 0


# ---------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------


def header(n_layer: int = 2) -> bytes:
    out = struct.pack("<II", 0, n_layer)
    for row in (4 * R, 4 * S):
        for _ in range(n_layer):
            out += struct.pack("<iQ", 0, row)
    return out


def test_empty_state_still_has_data_header() -> None:
    mem = make_rec()
    assert mem.state_write() == struct.pack("<I", 0) + header()
    assert mem.state_write(2) == struct.pack("<I", 0) + header()
    assert mem.state_write(99) == mem.state_write(2)  # no cell holds it: empty, as the reference
    with pytest.raises(RangeError):
        mem.state_write(-2)
    # ON_DEVICE changes nothing in pymem's bytes (the same for every memory type)
    assert mem.state_write(0, StateFlags.ON_DEVICE) == mem.state_write(0)
    with pytest.raises(RangeError, match="unknown bits"):
        mem.state_write(0, 4)


def test_whole_state_layout_and_round_trip() -> None:
    mem = make_rec()
    fill_rows(mem)
    place(mem, (0, 3), (1, 5), (2, 7))
    mem.seq_cp(1, 3)
    mem.seq_rm(0)
    data = mem.state_write()
    # cells 1 (seqs 1, 3) and 2 (seq 2); rows 1, 2 (one run)
    meta = struct.pack("<iIii", 5, 2, 1, 3) + struct.pack("<iIi", 7, 1, 2)
    assert data[: 4 + len(meta)] == struct.pack("<I", 2) + meta
    body = data[4 + len(meta) :]
    assert body[:8] == struct.pack("<II", 0, 2)
    assert row_value(body[8 + 12 : 8 + 12 + 2 * 4 * R], R) == [1.0, 2.0]
    assert data == mem.state_write(-1, StateFlags.PARTIAL_ONLY)
    buf = io.BytesIO()
    assert mem.state_write_to(buf) == len(data) and buf.getvalue() == data

    other = make_rec()
    fill_rows(other)  # a whole restore zeroes everything first
    assert other.state_read(data) == len(data)
    check(other)
    assert cells(other) == [(5, [1, 3]), (7, [2]), (-1, []), (-1, [])]
    assert (other.head, other.used) == (0, 2)
    assert other.state_write() == data
    r = other.get_r_l(0).numpy()
    assert r[:2, 0].tolist() == [1.0, 2.0] and not r[2:].any()
    # the next decode of seq 2 starts from its restored row
    place(other, (2, 8))
    assert other.cells.src0[other.head] == 1


def test_whole_restore_zeroes_exactly_the_rows_it_does_not_write() -> None:
    # the restore zeroes rows [cell_count, n_rows) of every tensor, every rollback plane
    # included, and writes rows [0, cell_count): the bytes clear(True) + writes would leave
    mem = make_rec(n_rs_seq=2)
    fill_rows(mem)
    place(mem, (0, 3), (1, 5), (2, 7))
    mem.seq_rm(1)
    data = mem.state_write()
    other = make_rec(n_rs_seq=2)
    fill_rows(other)
    assert other.state_read(data) == len(data)
    check(other)
    for il in other.layers:
        for got, want in (
            (other.get_r_l(il), mem.get_r_l(il)),
            (other.get_s_l(il), mem.get_s_l(il)),
        ):
            a, b = got.numpy(), want.numpy()
            assert a.shape[0] == 3 * other.size  # plane 0 and two rollback planes
            # cells 0 and 2 of mem went into rows 0 and 1
            assert (a[:2] == b[[0, 2]]).all() and not a[2:].any()
    assert other.state_write() == data


def test_restore_over_a_sequence_at_a_negative_position() -> None:
    # seq_rm(dest, -1, -1) keeps a cell whose position is negative (its range starts at
    # 0), so the restore's placement takes find_slot's general road, as the reference
    mem = make_rec()
    fill_rows(mem)
    place(mem, (0, 5), (1, 7))
    blob = mem.state_write(1)
    mem.seq_add(0, -1, -1, -100)
    assert mem.seq_pos_min(0) == -95
    assert mem.state_read(blob, 0) == len(blob)
    check(mem)
    assert mem.seq_pos_max(0) == 7 and mem.state_write(0) == blob


def test_per_seq_round_trip_places_cell_with_find_slot() -> None:
    mem = make_rec()
    fill_rows(mem)
    place(mem, (0, 3), (1, 5))
    blob = mem.state_write(1)
    assert blob[:12] == struct.pack("<IiI", 1, 5, 0)
    assert mem.state_read(blob, 3) == len(blob)
    check(mem)
    assert cells(mem)[2] == (5, [3]) and mem.head == 2
    assert mem.get_s_l(1).numpy()[2, 0] == 1001.5
    assert mem.state_write(3) == blob
    # into an existing sequence: it is emptied first, then placed again
    assert mem.state_read(blob, 0) == len(blob)
    assert cells(mem)[:3] == [(5, [0]), (5, [1]), (5, [3])]
    check(mem)
    # an empty blob empties the destination
    empty = make_rec().state_write(0)
    assert mem.state_read(empty, 1) == len(empty)
    assert mem.seq_pos_max(1) == -1
    check(mem)


def test_state_file_round_trip() -> None:
    mem = make_rec()
    place(mem, (0, 3))
    buf = io.BytesIO()
    n = mem.state_write_to(buf, 0)
    buf.write(b"tail")
    buf.seek(0)
    other = make_rec()
    assert other.state_read_from(buf, 0) == n
    assert other.state_write(0) == mem.state_write(0)
    assert buf.read() == b"tail"  # left just after the state


def corrupt(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_failed_reads_change_nothing() -> None:
    mem = make_rec()
    fill_rows(mem)
    place(mem, (0, 3), (1, 5))
    mem.seq_cp(0, 2)
    whole = mem.state_write()
    seq = mem.state_write(0)
    snapshot = (mem.state_write(), mem.cells.copy(), mem.get_r_l(0).numpy().copy())

    meta_len = 4 + 4 * 4 + 3 * 4  # cell 0 (seqs 0, 2), cell 1 (seq 1)
    bad_blobs = [
        (whole[:-1], -1, "truncated"),
        (seq[:-5], 1, "truncated"),
        (corrupt(whole, meta_len + 4, "<I", 3), -1, "layer count"),
        (corrupt(whole, meta_len, "<I", 1), -1, "transposition"),
        (corrupt(whole, meta_len + 8, "<i", 1), -1, "r type"),
        (corrupt(whole, meta_len + 12, "<Q", 4), -1, "r row size"),
        (corrupt(whole, 0, "<I", 5), -1, "not enough cells"),
        (corrupt(whole, 12, "<i", 4), -1, "out of range"),
        (corrupt(whole, 28, "<i", 0), -1, "duplicate tail"),
        (corrupt(seq, 8, "<I", 1), 3, "seq_id-agnostic"),
        (corrupt(seq, 0, "<I", 2), 3, "exactly one"),
    ]
    for data, dest, match in bad_blobs:
        with pytest.raises(StateError, match=match):
            mem.state_read(data, dest)
        assert mem.state_write() == snapshot[0], match
        assert np.array_equal(mem.cells.tail, snapshot[1].tail) and mem.head == snapshot[1].head
        assert np.array_equal(mem.get_r_l(0).numpy(), snapshot[2])
    with pytest.raises(RangeError):
        mem.state_read(seq, 4)
    check(mem)


def test_two_phase_read_plan() -> None:
    mem = make_rec()
    place(mem, (0, 3))
    blob = mem.state_write(0)
    other = make_rec()
    plan = other.state_read_parse(StateReader(blob), 1)
    assert other.seq_pos_max(1) == -1  # parsing changed nothing
    plan.commit()
    assert other.seq_pos_max(1) == 3
    with pytest.raises(StateError, match="already committed"):
        plan.commit()
    plan = other.state_read_parse(StateReader(blob), 2)
    other.seq_rm(1)
    with pytest.raises(StateError, match="memory changed"):
        plan.commit()
    assert other.seq_pos_max(2) == -1


# ---------------------------------------------------------------------------------------
# ggml graph helpers
# ---------------------------------------------------------------------------------------


def run_build_rs(mem: RecurrentMemory, ctx_mem, il: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import pymem.ggml as gg
    from pymem._native import lib
    from pymem.recurrent import build_rs, build_rs_inputs, rs_store_view

    with gg.Context() as g:
        inp = build_rs_inputs(g, ctx_mem)
        expand: list = []
        out = build_rs(g, inp, mem.get_r_l(il), R, expand)
        lib.ggml_set_output(out)  # keep it readable after the run
        # the model would compute new states from `out`; store them (+100) as the kernels do
        new = g.scale_bias(out, 1.0, 100.0)
        store = g.cpy(new, rs_store_view(g, inp, mem.get_r_l(il), R))
        runner = gg.GraphRunner("CPU", n_threads=1)
        (gathered,) = runner.run(g, [*expand, out, store], inputs=inp.feed(), read=[out])
        runner.close()
    return gathered[..., 0].ravel(), mem.get_r_l(il).numpy()[:, 0].copy()


def test_build_rs_gathers_zeroes_and_copies_extra_states() -> None:
    # the fork/swap case: cells become [seq 3, seq 0, seq 1] with src0 [0, 0, 1], rs_z 2
    mem = make_rec()
    place(mem, (0, 2), (1, 2), n_seq_tokens=3)
    mem.seq_cp(0, 3)
    fill_rows(mem)
    ctx = decode_ubatches(mem, [ub((3, 3), (0, 3))])
    assert ctx.s_copy().tolist() == [0, 0, 1]
    gathered, rows = run_build_rs(mem, ctx)
    assert gathered.tolist() == [0.0, 0.0]  # both forks start from the shared row 0
    # rows 0, 1: new states (100 + source); row 2: seq 1's state copied from row 1
    assert rows.tolist()[:4] == [100.0, 100.0, 1.0, 3.0]


def test_build_rs_new_sequence_starts_from_zero_and_rollback_plane() -> None:
    mem = make_rec(n_rs_seq=1)
    place(mem, (0, 4), n_seq_tokens=2)
    fill_rows(mem)  # garbage in the cell a new sequence will take
    mem.seq_rm(0, 4, -1)  # rollback seq 0 by one token: plane 1
    ctx = decode_ubatches(mem, [ub((0, 4), (1, 0))])
    assert (ctx.get_rs_z(), ctx.s_copy().tolist()) == (1, [4 + 0, 1])
    gathered, rows = run_build_rs(mem, ctx)
    assert gathered.tolist() == [4.0, 0.0]  # snapshot row 4; zeroed rs_z row 1
    assert rows.tolist()[:2] == [104.0, 100.0]


def test_context_past_the_end_and_failed_status() -> None:
    from pymem.recurrent import RecurrentMemoryContext

    mem = make_rec()
    ctx = RecurrentMemoryContext(mem, [ub((0, 0))])
    assert ctx.apply() and not ctx.next()
    with pytest.raises(RangeError):
        ctx.get_ubatch()
    with pytest.raises(RangeError):
        ctx.apply()
    failed = RecurrentMemoryContext.failed(MemoryStatus.FAILED_PREPARE)
    with pytest.raises(BatchError):
        failed.apply()
    with pytest.raises(BatchError):
        failed.next()
