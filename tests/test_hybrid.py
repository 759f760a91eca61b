"""HybridMemory / HybridISWAMemory: hand-worked cases of layer routing, split choice,
prepare order, combined status, position rules, seq_rm failure paths, state I/O (whole,
per sequence, PARTIAL_ONLY) and failed restores, with every part's invariants checked
after each step.

Pins (reference behaviour): recurrent-style splits (split_seq with embd_all, else
split_equal(sequential = attention not unified, n_keep_tail = n_rs_seq + 1)); recurrent
prepares first; seq_rm asks the recurrent part first and changes nothing when it refuses;
seq_pos_min = max(parts), seq_pos_max = min(parts) (so pos_min > pos_max can happen);
PARTIAL_ONLY drops the plain hybrid's attention part but only the iSWA hybrid's base
cache. Pins (pymem improvement): a failed restore leaves the whole memory unchanged for
both hybrids (compared on whole-state bytes); seq_pos_ranges reports each part.
"""

from __future__ import annotations

from pathlib import Path
from re import escape as re_escape
from typing import Any

import numpy as np
import pytest
from hybrid_helpers import check_hybrid
from test_factory import GRANITE_HYBRID, write_gguf
from test_iswa import ROPE, decode, make_iswa, prompt, randomize
from test_recurrent import make_rec

import pymem.kv.state_io as state_io
from pymem.batch import Batch, BatchAllocator
from pymem.errors import ConfigError, RangeError, StateError
from pymem.factory import ContextParams, create_memory, plan_memory
from pymem.gguf_spec import spec_from_gguf
from pymem.hybrid import HybridContext, HybridISWAMemory, HybridMemory
from pymem.kv import KVCache
from pymem.kv.cells import STALE_MAX, STALE_MIN
from pymem.kv.iswa import KVCacheISWA
from pymem.memory import MemoryStatus, StateFlags
from pymem.spec import LayerSpec, ModelSpec, SWAType
from pymem.state import StateReader


def hybrid_spec(pattern: str = "RAR", n_swa: int = 4) -> ModelSpec:
    """One layer per letter: R recurrent, A full attention, S sliding-window attention."""
    layers = []
    for c in pattern:
        if c == "R":
            layers.append(LayerSpec.ssm(24, 32))
        else:
            layers.append(LayerSpec.attention(2, 8, swa=c == "S", rope=ROPE))
    swa = "S" in pattern
    return ModelSpec(
        layers=tuple(layers),
        n_swa=n_swa if swa else 0,
        swa_type=SWAType.STANDARD if swa else SWAType.NONE,
    )


def make_hybrid(
    pattern: str = "RAR", *, kv_size: int = 256, n_seq_max: int = 4, **kw: Any
) -> HybridMemory:
    kw.setdefault("v_trans", False)
    kw.setdefault("n_ubatch", 8)
    return HybridMemory.build(hybrid_spec(pattern), kv_size=kv_size, n_seq_max=n_seq_max, **kw)


# --------------------------------------------------------------------------------------
# construction and routing
# --------------------------------------------------------------------------------------


def test_default_routing_and_breakdown() -> None:
    mem = make_hybrid("RAR", n_seq_max=2)
    assert type(mem) is HybridMemory and not mem.is_iswa
    assert isinstance(mem.mem_attn, KVCache) and mem.mem_attn.get_layer_ids() == [1]
    assert mem.mem_recr.layers == (0, 2)
    # attention: 1 layer x (K + V) x [16 f16, 256 cells]; recurrent: 2 layers x 2 cells x (24 + 32) f32
    assert mem.memory_breakdown_by_part() == {
        "attention": {"CPU": 2 * 16 * 2 * 256},
        "recurrent": {"CPU": 2 * 2 * (24 + 32) * 4},
    }
    assert mem.memory_breakdown() == {"CPU": 2 * 16 * 2 * 256 + 2 * 2 * (24 + 32) * 4}
    mem.close()

    mem = make_hybrid("RSAR", n_seq_max=2, n_ubatch=1)
    assert type(mem) is HybridISWAMemory and mem.is_iswa
    assert isinstance(mem.mem_attn, KVCacheISWA)
    parts = mem.parts()
    assert list(parts) == ["attention", "swa", "recurrent"]
    assert parts["attention"].get_layer_ids() == [2] and parts["swa"].get_layer_ids() == [1]
    assert mem.mem_recr.layers == (0, 3)
    assert parts["swa"].get_size() == 256  # PAD(min(256, 4 * 2 + 1), 256)
    mem.close()


def test_custom_filters_and_errors() -> None:
    mem = make_hybrid("RARA", filter_attn=lambda il: il == 3, filter_recr=lambda il: il == 2)
    assert mem.mem_attn.get_layer_ids() == [3] and mem.mem_recr.layers == (2,)
    mem.close()
    a = make_hybrid("RAR", n_seq_max=2)
    b = make_hybrid("RAR", n_seq_max=3)
    with pytest.raises(ConfigError, match="n_seq_max"):
        HybridMemory(a.mem_attn, b.mem_recr)
    with pytest.raises(ConfigError, match="KVCacheISWA"):
        HybridISWAMemory(a.mem_attn, a.mem_recr)  # type: ignore[arg-type]
    a.close()
    b.close()


# --------------------------------------------------------------------------------------
# planning: split choice, prepare order, status
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unified", "n_rs_seq", "embd_all", "first_call"),
    [
        (True, 0, False, ("split_equal", 16, False, 0)),
        (False, 0, False, ("split_equal", 16, True, 0)),
        (True, 2, False, ("split_equal", 16, False, 3)),
        (True, 0, True, ("split_seq", 16)),
    ],
)
def test_split_choice(unified: bool, n_rs_seq: int, embd_all: bool, first_call: tuple) -> None:
    mem = make_hybrid(unified=unified, n_rs_seq=n_rs_seq)
    calls: list = []
    assert decode(mem, prompt(0, 5) + prompt(1, 3), n_ubatch=16, embd_all=embd_all, spy=calls) == 0
    assert calls[0] == first_call
    assert {c[0] for c in calls} == {first_call[0]}
    assert (mem.seq_pos_max(0), mem.seq_pos_max(1)) == (4, 2)
    check_hybrid(mem)
    mem.close()


def test_coupled_sequences_need_a_unified_attention_part() -> None:
    shared = [[1, 0, [2, 3], False], [2, 1, [2, 3], True]]
    mem = make_hybrid(unified=True)
    assert decode(mem, shared) == 0
    assert (
        mem.seq_pos_ranges(2) == mem.seq_pos_ranges(3) == {"attention": (0, 1), "recurrent": (1, 1)}
    )
    check_hybrid(mem)
    mem.close()

    mem = make_hybrid(unified=False)
    randomize(mem)
    before = mem.state_write()
    assert decode(mem, shared) == 1  # sequential split refuses coupled sequences
    assert mem.state_write() == before
    check_hybrid(mem)
    mem.close()


def test_recurrent_prepares_first_and_a_failure_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mem = make_hybrid(n_seq_max=2)
    order: list[str] = []
    # the recurrent part plans (a prepare that keeps the placement), the attention part prepares
    for name, part, method in (
        ("recr", mem.mem_recr, "prepare"),
        ("attn", mem.mem_attn, "prepare"),
    ):
        orig = getattr(part, method)

        def spy(ubatches: Any, _orig: Any = orig, _name: str = name) -> Any:
            order.append(_name)
            return _orig(ubatches)

        monkeypatch.setattr(part, method, spy)
    assert decode(mem, prompt(0, 4)) == 0
    assert order == ["recr", "attn"]

    # the attention part cannot fit 300 tokens in 256 cells: recurrent prepared, nothing applied
    order.clear()
    randomize(mem)
    before = mem.state_write()
    assert decode(mem, prompt(1, 300)) == 1
    assert order == ["recr", "attn"]
    assert mem.state_write() == before
    check_hybrid(mem)
    mem.close()

    # the recurrent part has 1 cell for 2 sequences: attention is never asked
    mem = make_hybrid(n_seq_max=2, rs_size=1)
    calls: list[str] = []
    monkeypatch.setattr(mem.mem_attn, "prepare", lambda ub: calls.append("attn"))
    assert decode(mem, prompt(0, 2) + prompt(1, 2)) == 1
    assert calls == []
    assert mem.mem_attn.get_cells(0).used == 0
    mem.close()


class _Ctx:
    def __init__(self, status: MemoryStatus) -> None:
        self.status = status

    def get_status(self) -> MemoryStatus:
        return self.status


@pytest.mark.parametrize(
    ("attn", "recr", "combined"),
    [
        (MemoryStatus.SUCCESS, MemoryStatus.NO_UPDATE, MemoryStatus.SUCCESS),
        (MemoryStatus.NO_UPDATE, MemoryStatus.SUCCESS, MemoryStatus.SUCCESS),
        (MemoryStatus.NO_UPDATE, MemoryStatus.NO_UPDATE, MemoryStatus.NO_UPDATE),
        (MemoryStatus.SUCCESS, MemoryStatus.FAILED_PREPARE, MemoryStatus.FAILED_PREPARE),
        (MemoryStatus.FAILED_COMPUTE, MemoryStatus.FAILED_PREPARE, MemoryStatus.FAILED_COMPUTE),
    ],
)
def test_context_status_is_combined(
    attn: MemoryStatus, recr: MemoryStatus, combined: MemoryStatus
) -> None:
    ctx = HybridContext(_Ctx(attn), _Ctx(recr), [])  # type: ignore[arg-type]
    assert ctx.get_status() == combined


def test_update_full_and_graph_inputs() -> None:
    mem = make_hybrid(n_seq_max=2)
    assert mem.init_update().get_status() == MemoryStatus.NO_UPDATE
    assert mem.init_full().get_status() == MemoryStatus.SUCCESS
    assert decode(mem, prompt(0, 3)) == 0
    mem.seq_add(0, 0, -1, 2)  # a K-shift is pending in the attention part only
    upd = mem.init_update()
    assert upd.get_status() == MemoryStatus.SUCCESS
    assert upd.get_recr().get_status() == MemoryStatus.NO_UPDATE
    upd.apply()
    assert mem.init_update().get_status() == MemoryStatus.NO_UPDATE

    from pymem.batch import Batch, BatchAllocator

    balloc = BatchAllocator()
    balloc.init(Batch.from_items(prompt(0, 2, p0=5) + prompt(1, 2)), memory=mem, n_seq_max=2)
    ctx = mem.init_batch(balloc, 8)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    ctx.apply()
    ub = ctx.get_ubatch()
    assert ub.equal_seqs and ub.n_seqs == 2 and ub.n_seq_tokens == 2
    # attention: cells 3..6 after the first 3 cells; recurrent: cells 0 and 1, one per sequence
    assert ctx.get_attn().get_k_idxs().tolist() == [3, 4, 5, 6]  # type: ignore[union-attr]
    rc = ctx.get_recr()
    assert (rc.get_head(), rc.get_n_rs()) == (0, 2)
    assert ctx.next() is False
    check_hybrid(mem)
    mem.close()


# --------------------------------------------------------------------------------------
# sequence operations and positions
# --------------------------------------------------------------------------------------


def test_seq_rm_asks_the_recurrent_part_first() -> None:
    mem = make_hybrid(n_seq_max=2)
    randomize(mem)
    assert decode(mem, prompt(0, 6) + prompt(1, 4)) == 0
    before = mem.state_write()
    # cuts the recurrent tail (pos 5) without rollback planes: False, attention untouched
    assert mem.seq_rm(0, 3, -1) is False
    assert mem.state_write() == before
    # seq_id -1 is always refused by the recurrent part (reference quirk)
    assert mem.seq_rm(-1, -1, -1) is False
    assert mem.state_write() == before
    # an interior range: recurrent keeps its state (True, no-op), attention drops [1, 3)
    assert mem.seq_rm(0, 1, 3) is True
    assert mem.seq_pos_ranges(0) == {"attention": (0, 5), "recurrent": (5, 5)}
    # split_equal took 4 + 4 tokens (set-major), then seq 0's last 2
    assert mem.mem_attn.get_cells(0).pos[:10].tolist() == [0, -1, -1, 3, 0, 1, 2, 3, 4, 5]
    assert mem.seq_rm(1) is True
    assert mem.seq_pos_ranges(1) == {"attention": (-1, -1), "recurrent": (-1, -1)}
    check_hybrid(mem)
    mem.close()


def test_seq_rm_rollback_removes_the_tail_everywhere() -> None:
    mem = make_hybrid(n_seq_max=1, n_rs_seq=2)  # a hand-built spec keeps n_rs_seq
    assert decode(mem, prompt(0, 6)) == 0
    assert mem.seq_rm(0, 4, -1) is True  # rollback of 2 tokens <= n_rs_seq
    assert mem.seq_pos_ranges(0) == {"attention": (0, 3), "recurrent": (3, 3)}
    assert mem.seq_rm(0, 3, -1) is False  # a rollback is already pending
    assert (mem.seq_pos_min(0), mem.seq_pos_max(0)) == (3, 3)
    check_hybrid(mem)
    mem.close()


@pytest.mark.parametrize(("unified", "expect"), [(False, [0, -1]), (True, [-1, -1])])
def test_position_rules_after_seq_keep(unified: bool, expect: list[int]) -> None:
    mem = make_hybrid(n_seq_max=2, unified=unified)
    assert decode(mem, prompt(0, 4) + prompt(1, 3)) == 0
    assert [mem.seq_pos_min(0), mem.seq_pos_max(0)] == [3, 3]  # max(0, 3), min(3, 3)
    mem.seq_keep(1)
    # one stream per sequence: seq_keep(1) leaves stream 0 alone, the recurrent part drops seq 0
    attn0 = (0, 3) if not unified else (-1, -1)
    assert mem.seq_pos_ranges(0) == {"attention": attn0, "recurrent": (-1, -1)}
    assert [mem.seq_pos_min(0), mem.seq_pos_max(0)] == expect
    check_hybrid(mem)
    mem.close()


def test_sequence_ops_fan_out() -> None:
    mem = make_hybrid("RSAR", n_seq_max=3, n_ubatch=1, swa_full=True)
    assert decode(mem, prompt(0, 5)) == 0
    mem.seq_cp(0, 2)
    assert mem.seq_pos_ranges(2) == {"attention": (0, 4), "swa": (0, 4), "recurrent": (4, 4)}
    mem.seq_add(2, 0, -1, 3)
    assert mem.seq_pos_ranges(2) == {"attention": (3, 7), "swa": (3, 7), "recurrent": (7, 7)}
    mem.seq_div(2, 0, -1, 2)
    assert mem.seq_pos_ranges(2) == {"attention": (1, 3), "swa": (1, 3), "recurrent": (3, 3)}
    mem.clear()
    assert mem.seq_pos_ranges(0) == {"attention": (-1, -1), "swa": (-1, -1), "recurrent": (-1, -1)}
    assert mem.get_can_shift() is True  # swa_full: equal sizes
    check_hybrid(mem, 3)
    mem.close()


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------


def _filled(pattern: str, **kw: Any) -> HybridMemory:
    mem = make_hybrid(pattern, n_seq_max=3, n_ubatch=1, **kw)
    randomize(mem, 3)
    assert decode(mem, prompt(0, 7) + prompt(1, 5, tok0=9)) == 0
    assert decode(mem, prompt(0, 1, p0=7) + prompt(1, 1, p0=5)) == 0
    return mem


@pytest.mark.parametrize("pattern", ["RAR", "RSAR"])
def test_state_round_trips(pattern: str) -> None:
    mem = _filled(pattern)
    whole = mem.state_write()
    assert whole == mem.mem_attn.state_write() + mem.mem_recr.state_write()
    assert mem.state_size(0) == len(mem.state_write(0))
    seq0 = mem.state_write(0)
    mem_base_before = mem.parts()["attention"].state_write()
    assert mem.seq_rm(0) is True
    assert mem.state_read(seq0, 0) == len(seq0)
    assert mem.state_write(0) == seq0
    if pattern == "RAR":
        assert mem.state_write() == whole  # the restored cells land where they were
    else:
        # a per-sequence SWA blob holds only the live window (n_swa 4: positions 4..7 of
        # 0..7), placed anew by find_slot; the base cache gets everything back in place
        assert mem.seq_pos_ranges(0) == {"attention": (0, 7), "swa": (4, 7), "recurrent": (7, 7)}
        assert mem.mem_attn.kv_base.state_write() == mem_base_before  # type: ignore[union-attr]
    # into another sequence
    assert mem.state_read(seq0, 2) == len(seq0)
    assert mem.seq_pos_ranges(2) == mem.seq_pos_ranges(0)
    check_hybrid(mem)
    # whole
    mem.clear()
    assert mem.state_read(whole) == len(whole)
    assert mem.state_write() == whole
    check_hybrid(mem)
    mem.close()


def test_partial_only_blobs() -> None:
    plain = _filled("RAR")
    part = plain.state_write(0, StateFlags.PARTIAL_ONLY)
    assert part == plain.mem_recr.state_write(0)  # the attention part is left out
    attn_before = plain.mem_attn.state_write()
    plain.mem_recr.seq_rm(0)
    assert plain.state_read(part, 0, StateFlags.PARTIAL_ONLY) == len(part)
    assert plain.mem_attn.state_write() == attn_before
    assert plain.state_write(0, StateFlags.PARTIAL_ONLY) == part
    plain.close()

    iswa = _filled("RSAR")
    part = iswa.state_write(1, StateFlags.PARTIAL_ONLY)
    # the iSWA hybrid keeps its SWA cache in partial blobs (only the base cache is left out)
    assert part == iswa.mem_attn.kv_swa.state_write(1) + iswa.mem_recr.state_write(1)  # type: ignore[union-attr]
    base_before = iswa.mem_attn.kv_base.state_write()  # type: ignore[union-attr]
    assert iswa.state_read(part, 1, StateFlags.PARTIAL_ONLY) == len(part)
    assert iswa.mem_attn.kv_base.state_write() == base_before  # type: ignore[union-attr]
    assert iswa.state_write(1, StateFlags.PARTIAL_ONLY) == part
    check_hybrid(iswa)
    iswa.close()


@pytest.mark.parametrize("pattern", ["RAR", "RSAR"])
def test_failed_restore_changes_nothing(pattern: str) -> None:
    mem = _filled(pattern)
    whole = mem.state_write()
    seq0 = mem.state_write(0)
    sizes = [len(p.state_write(0)) for p in mem.parts().values()]
    ends = np.cumsum(sizes).tolist()  # end offset of each part inside a per-sequence blob
    # truncated inside each part, and right at each part boundary
    cuts = sorted({3, *ends[:-1], *(e - 1 for e in ends), ends[0] + 5})
    for cut in cuts:
        for dest in (0, 2):
            with pytest.raises(StateError):
                mem.state_read(seq0[:cut], dest)
            assert mem.state_write() == whole, f"cut {cut} into seq {dest}"
    with pytest.raises(StateError):
        mem.state_read(whole[: len(whole) - 1])
    assert mem.state_write() == whole
    # a blob of another topology is refused as a whole
    other = _filled("RAR" if pattern == "RSAR" else "RSAR")
    with pytest.raises(StateError):
        mem.state_read(other.state_write(0), 0)
    assert mem.state_write() == whole
    other.close()
    # a stale plan is refused with nothing changed
    plan = mem.state_read_parse(StateReader(seq0), 2)
    mem.mem_recr.seq_rm(1)
    after = mem.state_write()
    with pytest.raises(StateError, match="changed"):
        plan.commit()
    assert mem.state_write() == after
    check_hybrid(mem)
    mem.close()


def test_failed_restore_in_recurrent_part_keeps_attention(tmp_path: Path) -> None:
    """The reference would restore the attention part, fail, then undo it (leaving the
    destination empty); pymem leaves the destination exactly as it was."""
    mem = _filled("RAR")
    seq0 = mem.state_write(0)
    attn_len = len(mem.mem_attn.state_write(0))
    before = mem.seq_pos_ranges(1)
    with pytest.raises(StateError):
        mem.state_read(seq0[: attn_len + 10], 1)
    assert mem.seq_pos_ranges(1) == before and before["attention"] == (0, 5)
    # streaming from a file consumes exactly the blob
    path = tmp_path / "seq0.bin"
    with path.open("wb") as f:
        assert mem.state_write_to(f, 0) == len(seq0)
        f.write(b"tail")
    with path.open("rb") as f:
        assert mem.state_read_from(f, 1) == len(seq0)
        assert f.read() == b"tail"
    assert mem.seq_pos_ranges(1) == mem.seq_pos_ranges(0)
    mem.close()


# --------------------------------------------------------------------------------------
# built by the factory from GGUF files
# --------------------------------------------------------------------------------------


def test_factory_builds_what_it_planned(tmp_path: Path) -> None:
    spec = spec_from_gguf(write_gguf(tmp_path / "gh.gguf", "granitehybrid", GRANITE_HYBRID))
    params = ContextParams(n_ctx=1000, n_seq_max=3, flash_attn=False)
    mem = create_memory(spec, params)
    plan = plan_memory(spec, params)
    assert isinstance(mem, HybridMemory) and mem.plan == plan  # type: ignore[attr-defined]
    attn, rec = plan.parts
    assert (attn.layers, rec.layers) == ((2,), (0, 1, 3))
    assert isinstance(mem.mem_attn, KVCache)
    assert (mem.mem_attn.get_size(), mem.mem_attn.n_stream, mem.mem_attn.v_trans) == (512, 3, True)
    assert (mem.mem_recr.size, mem.mem_recr.layers) == (3, (0, 1, 3))
    n_r = 3 * (32 + 2 * 8)
    # bytes allocated == bytes the layer spec needs (K and V: 32 f16 x 512 cells x 3 streams)
    assert mem.memory_breakdown_by_part() == {
        "attention": {"CPU": 2 * 32 * 2 * 512 * 3},
        "recurrent": {"CPU": 3 * 3 * (n_r + 8 * 32) * 4},
    }
    assert decode(mem, prompt(0, 3) + prompt(2, 2)) == 0
    check_hybrid(mem)
    mem.close()


def test_refused_seq_div_changes_neither_part() -> None:
    # the attention part refuses d < 1 (positions cannot be divided by 0 or negatives):
    # the composite asks every part first, so the recurrent part is not touched either
    mem = make_hybrid()
    assert decode(mem, prompt(0, 4)) == 0
    before = mem.state_write()
    with pytest.raises(RangeError):
        mem.seq_div(0, -1, -1, 0)
    with pytest.raises(RangeError):
        mem.seq_div(0, -1, -1, -2)
    assert mem.state_write() == before


def test_no_op_shift_and_div_still_check_the_call() -> None:
    # seq_add by 0 and seq_div by 1 return before any part runs, but only after every
    # part has checked the call: a bad id is refused as for a real shift, and nothing moves
    mem = make_hybrid()
    assert decode(mem, prompt(0, 4)) == 0
    before = mem.state_write()
    for op, arg in ((mem.seq_add, 0), (mem.seq_div, 1)):
        with pytest.raises(RangeError, match="seq_id"):
            op(1000, -1, -1, arg)
        with pytest.raises(RangeError, match="sequence id"):
            op(True, -1, -1, arg)  # type: ignore[operator]
        op(0, -1, -1, arg)
        op(np.int64(0), -1, -1, np.int64(arg))
    assert mem.state_write() == before
    assert mem.seq_pos_max(0) == 3 and mem.seq_pos_max(np.int64(0)) == 3
    assert not mem.mem_attn.get_has_shift()  # no K-shift queued by a shift of 0


# --------------------------------------------------------------------------------------
# seq_pos_min_of / seq_pos_max_of: each memory's vectorised bounds equal its scalar
# queries (iSWA from the SWA cache, hybrid max of mins / min of maxes, recurrent
# negative positions), on random workloads
# --------------------------------------------------------------------------------------


def _random_workload(mem: Any, rng: np.random.Generator, n_seq: int) -> None:
    for s in range(n_seq):
        if rng.random() < 0.8:
            balloc = BatchAllocator()
            balloc.init(
                Batch.from_items(prompt(s, int(rng.integers(1, 12)))), memory=mem, n_seq_max=n_seq
            )
            ctx = mem.init_batch(balloc, 8)
            assert ctx.get_status() == MemoryStatus.SUCCESS
            while ctx.apply() and ctx.next():
                pass
    for s in range(n_seq):
        top = mem.seq_pos_max(s)
        r = rng.random()
        if top > 0 and r < 0.3:
            mem.seq_rm(s, top - int(rng.integers(0, 3)), -1)
        elif top >= 0 and r < 0.5:
            mem.seq_add(s, -1, -1, -int(rng.integers(1, 20)))


@pytest.mark.parametrize("kind", ["hybrid", "hybrid_iswa", "iswa", "recurrent"])
@pytest.mark.parametrize("seed", range(4))
def test_seq_pos_bounds_of_equal_the_scalar_queries(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_seq = 4
    mem: Any = {
        "hybrid": lambda: make_hybrid("RAR", n_seq_max=n_seq),
        "hybrid_iswa": lambda: make_hybrid("RSAR", n_seq_max=n_seq),
        "iswa": lambda: make_iswa(256, n_seq, unified=False),
        "recurrent": lambda: make_rec(n_seq),
    }[kind]()
    _random_workload(mem, rng, n_seq)
    ids = np.concatenate([rng.integers(0, n_seq, 7), np.arange(n_seq)])
    assert mem.seq_pos_min_of(ids).tolist() == [mem.seq_pos_min(int(s)) for s in ids]
    assert mem.seq_pos_max_of(ids).tolist() == [mem.seq_pos_max(int(s)) for s in ids]
    if kind == "recurrent":  # ids past the cells read as empty, as the scalar query
        far = np.array([n_seq, n_seq + 3])
        assert mem.seq_pos_max_of(far).tolist() == [-1, -1]
        assert mem.seq_pos_min_of(far).tolist() == [mem.seq_pos_min(n_seq), -1]


def _frozen(ids: np.ndarray) -> np.ndarray:
    """A read-only id array that owns its data, as the allocator's layout holds them."""
    out = np.array(ids, dtype=np.int64)
    out.flags.writeable = False
    return out


@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_hybrid_pos_max_of_frozen_ids_in_one_native_call(unified: bool, seed: int) -> None:
    """A decode step's frozen ids: the first query memoises them in both parts, the next
    ones take pm_step_hybrid_pos_max, equal to the scalar queries after every kind of
    change (negative recurrent positions after seq_add, removed sequences, stale cached
    bounds after a partial seq_rm, which the kernel leaves to the general way)."""
    rng = np.random.default_rng(seed)
    n_seq = 4
    mem = make_hybrid("RAR", n_seq_max=n_seq, unified=unified)
    ids = _frozen(np.arange(n_seq))
    fused = 0
    _random_workload(mem, rng, n_seq)
    for _ in range(8):
        s = int(rng.integers(0, n_seq))
        r = rng.random()
        if r < 0.2:
            mem.seq_rm(s, -1, -1)
        elif r < 0.4 and mem.seq_pos_max(s) > 0:
            mem.seq_add(s, -1, -1, -int(rng.integers(1, 20)))
        else:  # more tokens after what the sequence holds
            p0 = mem.seq_pos_max(s) + 1
            n = int(rng.integers(1, 6))
            balloc = BatchAllocator()
            pos = np.arange(p0, p0 + n, dtype=np.int32)
            batch = Batch(np.ones(n, np.int32), pos=pos, seq_id=np.full(n, s, np.int32))
            balloc.init(batch, memory=mem, n_seq_max=n_seq)
            ctx = mem.init_batch(balloc, 8)
            assert ctx.get_status() == MemoryStatus.SUCCESS
            while ctx.apply() and ctx.next():
                pass
        # one part alone changed (the parts then disagree: the lesser one is the answer)
        apart = rng.random() < 0.5 and mem.seq_pos_max(s) > 1
        if apart and rng.random() < 0.5:
            mem.mem_attn.seq_rm(s, mem.seq_pos_max(s) - 1, -1)  # the cache's tail only
        elif apart:
            mem.mem_recr.seq_rm(s, -1, -1)  # the recurrent state only
        want = [mem.seq_pos_max(int(q)) for q in ids]
        assert mem.seq_pos_max_of(ids).tolist() == want  # (memoises on the first pass)
        direct = mem._pos_max_native(ids)
        if direct is not None:
            fused += 1
            assert direct.tolist() == want
        assert mem.seq_pos_max_of(ids).tolist() == want
        if apart:
            mem.seq_rm(s, -1, -1)  # the parts agree again
    assert fused >= 3  # the one-call road is the usual one, not a rare branch
    # a recurrent state shifted below 0 (its position -5 or so; the cache lost the cells):
    # the largest position reads -1, as the scalar query
    s = int(np.argmax([mem.seq_pos_max(int(q)) for q in ids]))
    mem.seq_add(s, -1, -1, -(mem.seq_pos_max(s) + 6))
    assert mem.mem_recr.seq_pos_min(s) < -1
    mem.seq_pos_max_of(ids)  # (refreshes what the shift left stale)
    direct = mem._pos_max_native(ids)
    assert direct is not None and direct[s] == mem.seq_pos_max(s) == -1
    # another array with the same ids is not the memoised one: the general way answers
    assert mem._pos_max_native(_frozen(np.arange(n_seq))) is None
    mem.close()


def test_hybrid_pos_max_kernel_refuses_ids_and_keys_outside() -> None:
    from pymem._native import ffi, lib

    mem = make_hybrid("RAR", n_seq_max=2)
    ids = _frozen([0, 1])
    mem.seq_pos_max_of(ids)
    c, _, _, ok = mem.mem_attn._native_cells()
    cells = mem.mem_recr.cells
    out = np.empty(2, dtype=np.int64)

    def call(keys: list[int], rs_ids: list[int]) -> int:
        k = np.array(keys, dtype=np.int64)
        r = np.array(rs_ids, dtype=np.int64)
        return lib.pm_step_hybrid_pos_max(
            c, ffi.from_buffer("int64_t[]", k), ffi.from_buffer("int32_t[]", cells.tail),
            ffi.from_buffer("int32_t[]", cells.pos), cells.size, ffi.from_buffer("int64_t[]", r),
            2, ffi.from_buffer("int64_t[]", out, require_writable=True), ok,
        )  # fmt: skip

    assert call([0, 1], [0, 1]) == lib.PM_OK and ok[0] == 1
    assert out.tolist() == [-1, -1]  # nothing decoded: both parts empty
    assert call([0, 1], [0, cells.size]) == lib.PM_ERR_RANGE
    assert call([0, 1], [-1, 0]) == lib.PM_ERR_RANGE
    assert call([0, 256 * mem.mem_attn.n_stream], [0, 1]) == lib.PM_ERR_RANGE
    mem.close()


@pytest.mark.parametrize("pattern", ["RAR", "RSAR"])
@pytest.mark.parametrize("seed", range(4))
def test_position_queries_equal_the_parts_for_every_id(pattern: str, seed: int) -> None:
    """The hybrid's scalar queries read the recurrent cells themselves (a speed path):
    they must equal the parts' own queries for every id the attention part takes, ids
    past the recurrent cells and negative recurrent positions included, and refuse what
    the attention part refuses, with its error."""
    rng = np.random.default_rng(seed)
    n_seq = 4
    mem: Any = make_hybrid(pattern, n_seq_max=n_seq)
    # asked before the workload too: the queries read the live cells, which the ops
    # change in place and each decode step replaces
    assert (mem.seq_pos_min(1), mem.seq_pos_max(1)) == (-1, -1)
    _random_workload(mem, rng, n_seq)
    if mem.mem_recr.seq_pos_min(0) < 0:  # sequence 0 needs a state to shift below 0
        balloc = BatchAllocator()
        balloc.init(Batch.from_items(prompt(0, 3)), memory=mem, n_seq_max=n_seq)
        ctx = mem.init_batch(balloc, 8)
        assert ctx.get_status() == MemoryStatus.SUCCESS
        while ctx.apply() and ctx.next():
            pass
    mem.seq_add(0, -1, -1, -100)
    attn, recr = mem.mem_attn, mem.mem_recr
    assert recr.seq_pos_min(0) < -1  # a negative recurrent position, reported as it is
    # every id the attention part takes: those of the recurrent cells, past them, its last
    for s in [*range(n_seq + 6), attn.n_seq_max - 1, 255]:
        want_min = max(attn.seq_pos_min(s), recr.seq_pos_min(s))
        want_max = min(attn.seq_pos_max(s), recr.seq_pos_max(s))
        assert (mem.seq_pos_min(s), mem.seq_pos_max(s)) == (want_min, want_max), f"seq {s}"
        assert (mem.seq_pos_min(np.int32(s)), mem.seq_pos_max(np.int64(s))) == (want_min, want_max)
    # what it refuses, the hybrid refuses with the attention part's error
    for bad in (-1, 256, 1 << 40, 1.5, "0"):
        for query in ("seq_pos_min", "seq_pos_max"):
            with pytest.raises(Exception) as want:
                getattr(attn, query)(bad)
            with pytest.raises(type(want.value), match=re_escape(str(want.value))):
                getattr(mem, query)(bad)


@pytest.mark.parametrize("pattern", ["RAR", "RSAR"])
@pytest.mark.parametrize("seed", range(3))
def test_position_queries_asked_first_read_stale_bounds_through_the_part(
    pattern: str, seed: int
) -> None:
    """The hybrid reads an open id's clean bound from the attention part's
    ``PositionBounds`` without calling it; a bound the part's seq_rm left stale must be
    recomputed (the part's query), never read as cached. The cuts here make the
    attention part's bound the deciding one (its maximum below the recurrent position,
    or, shifted up, its minimum above it), and the hybrid is asked first after every op
    (the parts' own queries would refresh the bounds first)."""
    rng = np.random.default_rng(seed)
    n_seq = 4
    mem: Any = make_hybrid(pattern, n_seq_max=n_seq)
    attn, recr = mem.mem_attn, mem.mem_recr
    bounds = attn.bounds
    touched: set[int] = set()  # sequences whose parts disagree: not decoded again
    met = {"min": 0, "max": 0}
    for p0 in (0, 6):  # two ubatches a sequence: an SWA cache's window then starts past 0
        assert decode(mem, [t for q in range(n_seq) for t in prompt(q, 6, p0)]) == 0
    for i in range(24):
        s = int(rng.integers(0, n_seq))
        top = mem.seq_pos_max(s)
        if s not in touched and (top < 2 or rng.random() < 0.3):
            assert decode(mem, prompt(s, int(rng.integers(2, 9)), top + 1)) == 0
        elif i % 2 and attn.seq_pos_min(s) < min(attn.seq_pos_max(s), recr.seq_pos_max(s)):
            # the part's tail cut inside its cells, below the recurrent position: its
            # maximum stale (a cut of all of them would leave exact bounds)
            hi = min(attn.seq_pos_max(s), recr.seq_pos_max(s))
            attn.seq_rm(s, int(rng.integers(attn.seq_pos_min(s), hi)) + 1, -1)
            touched.add(s)
        elif attn.seq_pos_max(s) > attn.seq_pos_min(s):  # shifted up past the recurrent
            attn.seq_add(s, -1, -1, 50)  # position, then a head cut of at least one cell
            if i % 3:  # (or none: an iSWA part's SWA minimum then differs from its base's)
                attn.seq_rm(s, 0, int(rng.integers(attn.seq_pos_min(s), attn.seq_pos_max(s))) + 1)
            touched.add(s)
        for q in range(n_seq):
            stale = bounds.stale[bounds.keys[q]]
            got = (mem.seq_pos_min(q), mem.seq_pos_max(q))  # first: the bounds may be stale
            a_min, a_max = attn.seq_pos_min(q), attn.seq_pos_max(q)
            r_min, r_max = recr.seq_pos_min(q), recr.seq_pos_max(q)
            assert got == (max(a_min, r_min), min(a_max, r_max)), f"seq {q}"
            met["min"] += bool(stale & STALE_MIN) and a_min > r_min  # it decided
            met["max"] += bool(stale & STALE_MAX) and a_max < r_max
    assert met["min"] > 0 and met["max"] > 0, met  # a stale deciding bound met, each side
    attn.close()  # a closed attention part: every id takes its checked road
    for query in (mem.seq_pos_min, mem.seq_pos_max):
        with pytest.raises(Exception, match="closed"):
            query(0)


@pytest.mark.parametrize("seq_id", [-1, 0])
def test_a_blob_changed_after_the_parse_changes_no_part(seq_id: int) -> None:
    """A hybrid's two-phase restore whose blob gets a changed recurrent META after the
    parse (found by review: the recurrent part's native stores re-checked only at their
    own commit, after the attention part had committed): the composite's verify refuses
    it before any part changes; the same blob read at once (state_read) is refused too."""
    src = make_hybrid("RAR", n_seq_max=4)
    assert decode(src, prompt(0, 5) + prompt(1, 3)) == 0
    randomize(src)
    blob = bytearray(src.state_write(seq_id))
    dst = make_hybrid("RAR", n_seq_max=4)
    assert decode(dst, prompt(2, 4)) == 0
    before = (bytes(dst.mem_attn.state_write()), bytes(dst.mem_recr.state_write()))
    plan = dst.state_read_parse(StateReader(blob), seq_id)
    if seq_id >= 0:  # dst does not hold the sequence: its attention part places it
        assert isinstance(plan.parts[0], state_io.PlacedSeqPlan)
    n_attn = len(src.mem_attn.state_write(seq_id))
    # whole: the first cell's first id (out of range); one sequence: its cell's n_seq_id
    at = n_attn + (12 if seq_id == -1 else 8)
    blob[at : at + 4] = (9).to_bytes(4, "little")
    with pytest.raises(StateError, match="changed after it was parsed"):
        plan.commit()
    assert (bytes(dst.mem_attn.state_write()), bytes(dst.mem_recr.state_write())) == before
    with pytest.raises(StateError):
        dst.state_read(bytes(blob), seq_id)
    assert (bytes(dst.mem_attn.state_write()), bytes(dst.mem_recr.state_write())) == before
