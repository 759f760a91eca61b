"""KVCacheISWA: hand-worked cases of layer routing, sizing, split choice, fan-out,
position rules, can_shift, state I/O (whole, per sequence, PARTIAL_ONLY) and failure
paths, with both caches' invariants checked after every step.

Pins (reference behaviour): the SWA size formula; split_simple first when unified, then
split_equal(sequential = not unified); seq_pos_min/max from the SWA cache only (pos_min
rises as the window moves); can_shift only with equal sizes; base part omitted under
PARTIAL_ONLY. Pins (pymem improvement): a restore that fails in the SWA part leaves the
base part unchanged too (the reference keeps the restored base cells).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from kv_helpers import check_invariants as check_kv

from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError, ConfigError, StateError
from pymem.kv import PositionBounds
from pymem.kv.iswa import KVCacheISWA
from pymem.memory import Memory, MemoryStatus, StateFlags
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType, SWAType

ROPE = RopeSpec(n_rot=8, rope_type=RopeType.NEOX)


def iswa_spec(
    pattern: str = "SAS", n_swa: int = 4, swa_type: SWAType = SWAType.STANDARD, **kw: Any
) -> ModelSpec:
    """One layer per letter: A full attention, S sliding window, R recurrent (Mamba-like)."""
    layers = []
    for c in pattern:
        if c == "R":
            layers.append(LayerSpec.ssm(24, 32))
        else:
            layers.append(LayerSpec.attention(2, 8, swa=c == "S", rope=ROPE))
    return ModelSpec(
        layers=tuple(layers), n_swa=n_swa, swa_type=swa_type, arch=kw.pop("arch", "gemma2"), **kw
    )


def make_iswa(
    kv_size: int = 512, n_seq_max: int = 2, n_ubatch: int = 8, *, unified: bool = True, swa_full: bool = False,
    spec: ModelSpec | None = None, **kw: Any,
) -> KVCacheISWA:  # fmt: skip
    return KVCacheISWA(
        spec or iswa_spec(), kv_size=kv_size, n_seq_max=n_seq_max, n_ubatch=n_ubatch, unified=unified,
        swa_full=swa_full, v_trans=kw.pop("v_trans", False), **kw,
    )  # fmt: skip


def randomize(mem: Memory, seed: int = 0) -> None:
    """Fill every K/V/R/S tensor of a memory with random bytes (stands in for the graph)."""
    rng = np.random.default_rng(seed)
    for t in tensors(mem):
        view = t.numpy().view(np.uint8)
        view[...] = rng.integers(0, 256, view.shape, dtype=np.uint8)


def tensors(mem: Any) -> list[Any]:
    """The tensors of a memory and of its parts, recursively."""
    from pymem.kv import KVCache
    from pymem.recurrent import RecurrentMemory

    if isinstance(mem, KVCache):
        return [t for lay in mem.layers for t in (lay.k, lay.v) if t is not None]
    if isinstance(mem, RecurrentMemory):
        return [t for il in mem.layers for t in (mem.get_r_l(il), mem.get_s_l(il))]
    return [t for part in mem.parts().values() for t in tensors(part)]


class Spy:
    """Wraps a BatchAllocator and records the splitter calls (``split_all`` only drives a
    splitter, so the calls it makes are recorded, not it)."""

    def __init__(self, balloc: BatchAllocator) -> None:
        self.balloc = balloc
        self.calls: list[tuple] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.balloc, name)
        if name.startswith("split_") and name not in ("split_reset", "split_all"):

            def wrapped(*args: Any) -> Any:
                self.calls.append((name, *args))
                return attr(*args)

            return wrapped
        return attr


def decode(
    mem: Any, items: list, n_ubatch: int = 256, embd_all: bool = False, spy: list | None = None
) -> int:
    """The reference's decode memory flow; returns 0, 1 (no slot) or -1 (invalid batch).

    ``spy`` (a list) receives the splitter calls of the planning pass.
    """
    balloc = BatchAllocator(mem.n_pos_per_embd)
    try:
        balloc.init(Batch.from_items(items), memory=mem, n_seq_max=mem.n_seq_max)
    except BatchError:
        return -1
    upd = mem.init_update()
    if upd.get_status() == MemoryStatus.SUCCESS:
        upd.apply()
    b: Any = balloc
    if spy is not None:
        b = Spy(balloc)
    ctx = mem.init_batch(b, n_ubatch, embd_all)
    if spy is not None:
        spy.extend(b.calls)
    if ctx.get_status() != MemoryStatus.SUCCESS:
        return 1
    while True:
        ctx.apply()
        if not ctx.next():
            break
    return 0


def prompt(seq: int, n: int, p0: int = 0, tok0: int = 1) -> list:
    return [[(tok0 + i) % 60, p0 + i, [seq], i == n - 1] for i in range(n)]


def seq_positions(kv: Any, seq: int) -> set[int]:
    cells = kv.get_cells(seq)
    return {
        int(cells.pos[i]) for i in range(cells.size) if cells.pos[i] >= 0 and cells.seq_has(i, seq)
    }


def check_iswa(mem: KVCacheISWA, n_seq: int | None = None) -> None:
    """Both caches' invariants; SWA positions are a subset of base positions; the memory's
    positions are the SWA cache's."""
    check_kv(mem.kv_base)
    check_kv(mem.kv_swa)
    for s in range(n_seq if n_seq is not None else mem.n_seq_max):
        assert seq_positions(mem.kv_swa, s) <= seq_positions(mem.kv_base, s), f"seq {s}"
        assert mem.seq_pos_min(s) == mem.kv_swa.seq_pos_min(s)
        assert mem.seq_pos_max(s) == mem.kv_swa.seq_pos_max(s)


# --------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------


def test_layers_routed_and_sizes() -> None:
    mem = make_iswa(kv_size=1024, n_seq_max=4, n_ubatch=512, spec=iswa_spec("SASAR"))
    assert mem.kv_base.get_layer_ids() == [1, 3]  # the recurrent layer 4 has no attention widths
    assert mem.kv_swa.get_layer_ids() == [0, 2]
    assert (mem.kv_base.swa_type, mem.kv_swa.swa_type, mem.kv_swa.n_swa) == (
        SWAType.NONE,
        SWAType.STANDARD,
        4,
    )
    # PAD(min(1024, 4 * 4 + 512), 256) = 768 cells per stream
    assert (mem.kv_base.get_size(), mem.kv_swa.get_size()) == (1024, 768)
    assert mem.get_can_shift() is False
    # bytes: 2 layers x (K + V) x [16 f16, cells, 1 stream]
    assert mem.memory_breakdown_by_part() == {
        "base": {"CPU": 2 * 2 * 16 * 2 * 1024},
        "swa": {"CPU": 2 * 2 * 16 * 2 * 768},
    }
    assert mem.memory_breakdown() == {"CPU": 2 * 2 * 16 * 2 * (1024 + 768)}
    mem.close()

    full = make_iswa(kv_size=1024, n_seq_max=4, n_ubatch=512, swa_full=True)
    assert full.kv_swa.get_size() == 1024 and full.get_can_shift() is True
    full.close()
    multi = make_iswa(kv_size=1024, n_seq_max=4, n_ubatch=512, unified=False)
    assert multi.kv_swa.get_size() == 768 and multi.n_stream == 4  # PAD(4 * 1 + 512)
    multi.close()


def test_construction_errors() -> None:
    with pytest.raises(ConfigError, match="sliding window"):
        make_iswa(spec=ModelSpec(layers=(LayerSpec.attention(1, 8),)))
    with pytest.raises(ConfigError, match="n_ubatch"):
        make_iswa(n_ubatch=0)
    a, b = make_iswa(), make_iswa(unified=False)
    with pytest.raises(ConfigError, match="must not slide"):
        KVCacheISWA.from_parts(a.kv_swa, a.kv_base)
    with pytest.raises(ConfigError, match="streams"):
        KVCacheISWA.from_parts(a.kv_base, b.kv_swa)
    a.close()
    b.close()


# --------------------------------------------------------------------------------------
# split choice
# --------------------------------------------------------------------------------------


def test_unified_tries_simple_split_first() -> None:
    mem = make_iswa()
    calls: list = []
    items = prompt(0, 5) + prompt(1, 3)
    assert decode(mem, items, n_ubatch=4, spy=calls) == 0
    # simple split in ubatches of 4 (plus the final call that finds nothing left)
    assert [c[0] for c in calls] == ["split_simple"] * 3
    assert mem.kv_base.v_cells[0].pos[:8].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    check_iswa(mem)
    mem.close()


def test_not_unified_uses_sequential_equal_split() -> None:
    mem = make_iswa(unified=False)
    calls: list = []
    assert decode(mem, prompt(0, 3) + prompt(1, 3), n_ubatch=8, spy=calls) == 0
    assert calls[0] == ("split_equal", 8, True, 0)
    assert {c[0] for c in calls} == {"split_equal"}
    assert mem.kv_swa.v_cells[1].pos[:3].tolist() == [0, 1, 2]  # seq 1 in its own stream
    # coupled sequences cannot be split sequentially: no slot, nothing changes
    before = mem.state_write()
    assert decode(mem, [[5, 3, [0, 1], True]]) == 1
    assert mem.state_write() == before
    check_iswa(mem)
    mem.close()


def test_falls_back_to_equal_split_when_simple_does_not_fit() -> None:
    # SWA cache of PAD(min(1024, 4 * 2 + 1), 256) = 256 cells. A simple ubatch of 257
    # tokens cannot fit; the non-sequential equal split gives 2 x 128 = 256 tokens, then
    # 2 x 72 = 144 tokens that reuse SWA-masked cells of the first ubatch.
    mem = make_iswa(kv_size=1024, n_seq_max=2, n_ubatch=1)
    assert mem.kv_swa.get_size() == 256
    calls: list = []
    items = [it for i in range(200) for it in (prompt(0, 200)[i], prompt(1, 200, tok0=7)[i])]
    assert decode(mem, items, n_ubatch=257, spy=calls) == 0
    names = [c[0] for c in calls]
    assert names[0] == "split_simple" and calls[names.index("split_equal")][1:] == (257, False, 0)
    assert mem.kv_base.v_cells[0].used == 400
    assert mem.kv_swa.v_cells[0].used == 256  # every SWA cell in use after the reuse
    # ubatch 1 (set-major): cells 0..127 seq 0 pos 0..127, cells 128..255 seq 1 pos 0..127.
    # ubatch 2 sees masked cells 0..124 and 128..252 (pos <= 124); its 72 seq-0 tokens take
    # cells 0..71, its 72 seq-1 tokens cells 72..124 (seq 0's!) and 128..146. Purges: seq 0
    # up to pos 124, seq 1 up to pos 18. The base cache keeps everything.
    assert mem.seq_pos_ranges(0) == {"attention": (0, 199), "swa": (125, 199)}
    assert mem.seq_pos_ranges(1) == {"attention": (0, 199), "swa": (19, 199)}
    assert (mem.seq_pos_min(0), mem.seq_pos_max(0)) == (125, 199)
    check_iswa(mem)
    mem.close()


def test_failed_prepare_changes_nothing() -> None:
    mem = make_iswa(kv_size=256, n_seq_max=1, n_ubatch=1, spec=iswa_spec(n_swa=512))
    assert mem.kv_swa.get_size() == 256
    randomize(mem)
    assert decode(mem, prompt(0, 200)) == 0
    before = mem.state_write()
    assert decode(mem, prompt(0, 100, p0=200)) == 1  # 300 > 256 cells in the base cache
    assert mem.state_write() == before
    check_iswa(mem)
    mem.close()


# --------------------------------------------------------------------------------------
# fan-out and position rules
# --------------------------------------------------------------------------------------


def test_positions_come_from_the_swa_cache() -> None:
    # n_swa 4, SWA cache 256 cells: after 300 single-sequence positions the SWA cache has
    # reused (and purged) the oldest cells, the base cache has all of them
    mem = make_iswa(kv_size=512, n_seq_max=1, n_ubatch=1)
    assert decode(mem, prompt(0, 250)) == 0
    assert mem.seq_pos_min(0) == 0
    for p in range(250, 300):
        assert decode(mem, prompt(0, 1, p0=p)) == 0
        check_iswa(mem, 1)
    assert mem.seq_pos_ranges(0) == {"attention": (0, 299), "swa": (mem.kv_swa.seq_pos_min(0), 299)}
    # 50 new tokens took the 6 empty cells, then 44 masked cells holding positions 0..43
    assert mem.seq_pos_min(0) == 44 and mem.seq_pos_max(0) == 299
    mem.close()


def test_sequence_ops_fan_out() -> None:
    mem = make_iswa(n_seq_max=3)
    assert decode(mem, prompt(0, 6)) == 0
    mem.seq_cp(0, 1, -1, -1)
    assert seq_positions(mem.kv_base, 1) == seq_positions(mem.kv_swa, 1) == set(range(6))
    assert mem.seq_rm(1, 4, -1) is True
    assert seq_positions(mem.kv_base, 1) == seq_positions(mem.kv_swa, 1) == set(range(4))
    mem.seq_add(1, 0, -1, 10)
    assert seq_positions(mem.kv_base, 1) == seq_positions(mem.kv_swa, 1) == set(range(10, 14))
    # cells are shared: moving seq 1 moved seq 0's shared cells too (positions belong to cells)
    assert seq_positions(mem.kv_base, 0) == {10, 11, 12, 13, 4, 5}
    mem.seq_div(0, 0, -1, 2)
    assert seq_positions(mem.kv_swa, 0) == seq_positions(mem.kv_base, 0) == {5, 6, 2}
    mem.seq_keep(0)
    assert seq_positions(mem.kv_base, 1) == seq_positions(mem.kv_swa, 1) == set()
    assert mem.seq_rm(-1, -1, -1) is True
    assert mem.kv_base.v_cells[0].used == mem.kv_swa.v_cells[0].used == 0
    # the shift flag stays set after the shifted cells are gone (as the reference): an update is due
    upd = mem.init_update()
    assert upd.get_status() == MemoryStatus.SUCCESS
    upd.apply()
    assert mem.init_update().get_status() == MemoryStatus.NO_UPDATE
    check_iswa(mem, 3)
    mem.close()


def test_update_context_combines_both_caches() -> None:
    mem = make_iswa(swa_full=True)
    randomize(mem)
    assert decode(mem, prompt(0, 4)) == 0
    assert mem.init_update().get_status() == MemoryStatus.NO_UPDATE
    mem.seq_add(0, 0, -1, 3)
    upd = mem.init_update()
    assert upd.get_status() == MemoryStatus.SUCCESS
    assert upd.ctx_base.get_status() == upd.ctx_swa.get_status() == MemoryStatus.SUCCESS  # type: ignore[union-attr]
    upd.apply()
    assert not mem.kv_base.get_has_shift() and not mem.kv_swa.get_has_shift()
    assert mem.init_update().get_status() == MemoryStatus.NO_UPDATE
    mem.close()


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("v_trans", [False, True])
def test_state_round_trips(v_trans: bool) -> None:
    mem = make_iswa(n_seq_max=2, v_trans=v_trans)
    randomize(mem, 1)
    assert decode(mem, prompt(0, 7) + prompt(1, 5, tok0=9)) == 0
    whole = mem.state_write()
    assert whole == mem.kv_base.state_write() + mem.kv_swa.state_write()
    assert mem.state_size() == len(whole)
    seq0 = mem.state_write(0)
    partial = mem.state_write(0, StateFlags.PARTIAL_ONLY)
    assert partial == mem.kv_swa.state_write(0)  # the base part is left out
    assert seq0 == mem.kv_base.state_write(0) + partial

    # per sequence: remove, restore, same bytes (whole and per sequence)
    assert mem.seq_rm(0) is True
    assert mem.state_read(seq0, 0) == len(seq0)
    assert mem.state_write(0) == seq0
    check_iswa(mem)
    # PARTIAL_ONLY: only the SWA part is read
    mem.kv_swa.seq_rm(1)
    assert mem.state_read(
        mem.state_write(0, StateFlags.PARTIAL_ONLY), 1, StateFlags.PARTIAL_ONLY
    ) == len(partial)
    assert mem.kv_swa.seq_pos_max(1) == 6 and mem.kv_base.seq_pos_max(1) == 4
    # whole state: clear, restore, identical bytes
    mem.clear()
    assert mem.state_read(whole) == len(whole)
    assert mem.state_write() == whole
    check_iswa(mem)
    mem.close()


def test_failed_restore_changes_nothing() -> None:
    mem = make_iswa(n_seq_max=2)
    randomize(mem, 2)
    assert decode(mem, prompt(0, 7) + prompt(1, 5, tok0=9)) == 0
    seq0 = mem.state_write(0)
    whole = mem.state_write()
    base_len = len(mem.kv_base.state_write(0))
    # truncated inside the SWA part: the base part parsed fine, yet nothing is restored
    for cut in (len(seq0) - 1, base_len + 9, base_len, 3):
        with pytest.raises(StateError):
            mem.state_read(seq0[:cut], 1)
        assert mem.state_write() == whole
    with pytest.raises(StateError):
        mem.state_read(whole[:-1])
    assert mem.state_write() == whole
    # a stale plan is refused as a whole
    from pymem.state import StateReader

    plan = mem.state_read_parse(StateReader(seq0), 1)
    mem.kv_swa.seq_rm(1, 0, 1)
    after = mem.state_write()
    with pytest.raises(StateError, match="changed"):
        plan.commit()
    assert mem.state_write() == after
    check_iswa(mem)
    mem.close()


def test_position_bounds_read_as_the_queries_answer() -> None:
    """``KVCacheISWA.bounds`` (what a hybrid reads an open id's bound from) are the SWA
    cache's, as ``seq_pos_min`` / ``seq_pos_max`` answer: here the SWA cache has
    overwritten a sequence's oldest cells, so its minimum differs from the base's. Once
    closed, no id may be read from them."""
    mem = make_iswa(1024, 2, n_ubatch=32, unified=False)
    for p0 in range(0, 320, 32):
        assert decode(mem, [t for q in range(2) for t in prompt(q, 32, p0)], n_ubatch=32) == 0
    bounds = mem.bounds
    assert isinstance(bounds, PositionBounds) and bounds is mem.kv_swa.bounds
    assert bounds.n_open == 2  # one stream a sequence: the ids below n_seq_max
    for q in range(2):
        key = bounds.keys[q]
        want = (mem.seq_pos_min(q), mem.seq_pos_max(q))  # (recomputes what overwrites left stale)
        assert not bounds.stale[key]
        assert (bounds.pos_min[key], bounds.pos_max[key]) == want
        assert bounds.pos_min[key] > mem.kv_base.seq_pos_min(q) == 0  # the window's start
    mem.close()
    assert bounds.n_open == 0
