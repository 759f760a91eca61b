"""pymem's KVCache against the literal loop model in kv_oracle.py on random operation
sequences: after every operation the cells (positions, shifts, sequence sets), the heads
and the per-sequence positions must agree, every planned slot must be the same cell list,
and every ubatch's KQ mask must equal the reference algorithm's (with its row reuse)."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
from kv_helpers import check_invariants, make_spec
from kv_oracle import OKV

from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError
from pymem.kv import KVCache
from pymem.memory import MemoryStatus
from pymem.spec import ModelSpec, RopeSpec, RopeType, SWAType


def compare(kv: KVCache, ok: OKV) -> None:
    assert kv.v_heads == ok.heads
    for st, (c, o) in enumerate(zip(kv.v_cells, ok.cells)):
        assert c.pos.tolist() == o.pos, f"stream {st}: pos"
        assert c.shift.tolist() == o.shift, f"stream {st}: shift"
        assert [set(c.seq_ids_of(i)) for i in range(c.size)] == o.seq, f"stream {st}: seq"
        assert c.has_shift == o.has_shift
    for s in range(kv.n_seq_max):
        o = ok.cells[ok.seq_to_stream[s]]
        assert kv.seq_pos_min(s) == o.seq_pos_min(s)
        assert kv.seq_pos_max(s) == o.seq_pos_max(s)


def ubatch_tokens(ub) -> list[tuple[int, list[int]]]:
    return [(int(ub.pos[i]), [int(x) for x in ub.seq_id[i] if x >= 0]) for i in range(ub.n_tokens)]


def random_batch(rng: random.Random, kv: KVCache, n_seq: int, unified: bool) -> list:
    items = []
    per_seq = []
    if unified and rng.random() < 0.2:
        empty = [s for s in range(n_seq) if kv.seq_pos_max(s) < 0]
        if len(empty) >= 2:
            a, b = rng.sample(empty, 2)
            return [[rng.randrange(64), p, [a, b], p == 2] for p in range(3)]
    seqs = rng.sample(range(n_seq), rng.randint(1, n_seq))
    for s in seqs:
        start = kv.seq_pos_max(s) + 1
        n = rng.randint(1, 4)
        per_seq.append([[rng.randrange(64), start + k, [s], k == n - 1] for k in range(n)])
    # interleave keeping each sequence's order
    while any(per_seq):
        lst = rng.choice([p for p in per_seq if p])
        items.append(lst.pop(0))
    return items


def run_decode(kv: KVCache, ok: OKV, items: list, n_ubatch: int, rng: random.Random) -> None:
    balloc = BatchAllocator()
    try:
        balloc.init(Batch.from_items(items), memory=kv, n_seq_max=kv.n_seq_max)
    except BatchError:
        return
    upd = kv.init_update()
    if upd.get_status() == MemoryStatus.SUCCESS:
        upd.apply()
        for c in ok.cells:
            c.shift = [0] * c.size
            c.has_shift = False
    compare(kv, ok)
    # the oracle plans the same ubatches on a copy
    balloc.split_reset()
    ubs = []
    while True:
        ub = (
            balloc.split_simple(n_ubatch)
            if kv.n_stream == 1
            else balloc.split_equal(n_ubatch, True, 0)
        )
        if ub is None:
            break
        ubs.append(ub)
    plan_ok = balloc.n_used == balloc.n_tokens
    plans = []
    if plan_ok:
        sim = copy.deepcopy(ok)
        for ub in ubs:
            slot = sim.find_slot(ubatch_tokens(ub), [int(x) for x in ub.seq_id_unq], False)
            if slot is None:
                plan_ok = False
                break
            plans.append(slot)
            sim.apply(slot, ubatch_tokens(ub))
    before = [c.snapshot() for c in kv.v_cells], list(kv.v_heads)
    ctx = kv.init_batch(balloc, n_ubatch, False)
    after = [c.snapshot() for c in kv.v_cells], list(kv.v_heads)
    assert repr(before) == repr(after), "init_batch changed the cache"
    if not plan_ok:
        assert ctx.get_status() == MemoryStatus.FAILED_PREPARE
        return
    assert ctx.get_status() == MemoryStatus.SUCCESS
    k = 0
    while True:
        ctx.apply()
        sinfo = ctx.get_sinfo()
        assert [(int(s), sinfo.idxs[j].tolist()) for j, s in enumerate(sinfo.strm)] == plans[k]
        toks = ubatch_tokens(ctx.get_ubatch())
        ok.apply(plans[k], toks)
        compare(kv, ok)
        n_stream = 1 if kv.n_stream == 1 else ctx.get_ubatch().n_seqs_unq
        causal = rng.random() < 0.7
        alibi = kv.spec.use_alibi
        mine = ctx.get_kq_mask(causal_attn=causal)
        want = ok.kq_mask(toks, n_stream, ctx.get_n_kv(), causal, alibi)
        np.testing.assert_array_equal(mine, np.array(want, dtype=np.float32))
        k += 1
        if not ctx.next():
            break


CONFIGS = [
    dict(n_cells=16, n_seq=4, unified=True),
    dict(n_cells=12, n_seq=3, unified=False),
    dict(n_cells=16, n_seq=4, unified=True, n_swa=4, swa_type=SWAType.STANDARD),
    dict(n_cells=16, n_seq=3, unified=True, n_swa=4, swa_type=SWAType.CHUNKED),
    dict(n_cells=16, n_seq=3, unified=True, n_swa=6, swa_type=SWAType.SYMMETRIC),
    dict(n_cells=10, n_seq=2, unified=False, n_swa=3, swa_type=SWAType.STANDARD),
    dict(n_cells=300, n_seq=4, unified=True, alibi=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", range(6))
def test_random_ops_match_oracle(cfg, seed):
    cfg = dict(cfg)
    rng = random.Random(seed * 7919 + len(str(cfg)))
    n_cells, n_seq, unified = cfg.pop("n_cells"), cfg.pop("n_seq"), cfg.pop("unified")
    alibi = cfg.pop("alibi", False)
    base = make_spec(rope=RopeSpec(n_rot=8, rope_type=RopeType.NONE))
    spec = ModelSpec(layers=base.layers, use_alibi=alibi, arch="llama")
    kv = KVCache(spec, kv_size=n_cells, n_seq_max=n_seq, unified=unified, **cfg)
    ok = OKV(n_cells, n_seq, unified, cfg.get("n_swa", 0), cfg.get("swa_type", SWAType.NONE))
    n_ubatch = rng.choice([3, 8, 64])
    for _ in range(60):
        r = rng.random()
        if r < 0.45:
            run_decode(kv, ok, random_batch(rng, kv, n_seq, unified), n_ubatch, rng)
        elif r < 0.6:
            s = rng.choice([-1, *range(n_seq)])
            p0 = rng.choice([-1, 0, rng.randrange(12)])
            p1 = rng.choice([-1, rng.randrange(20)])
            assert kv.seq_rm(s, p0, p1) is True
            ok.seq_rm(s, p0, p1)
        elif r < 0.7:
            a, b = rng.randrange(n_seq), rng.randrange(n_seq)
            if unified:
                p0, p1 = rng.choice([(-1, -1), (2, 6), (0, 3)])
            else:
                p0, p1 = -1, -1
            kv.seq_cp(a, b, p0, p1)
            ok.seq_cp(a, b, p0, p1)
        elif r < 0.75:
            s = rng.randrange(n_seq)
            kv.seq_keep(s)
            ok.seq_keep(s)
        elif r < 0.88:
            s = rng.randrange(n_seq)
            p0, p1, d = rng.choice([-1, 0, 3]), rng.choice([-1, 5, 9]), rng.randint(-6, 6)
            kv.seq_add(s, p0, p1, d)
            ok.seq_add(s, p0, p1, d)
        else:
            s = rng.randrange(n_seq)
            p0, p1, d = rng.choice([-1, 2]), rng.choice([-1, 8]), rng.randint(1, 3)
            kv.seq_div(s, p0, p1, d)
            ok.seq_div(s, p0, p1, d)
        compare(kv, ok)
        check_invariants(kv)
    kv.close()


def test_oracle_mask_row_reuse_equals_direct_evaluation():
    """The reference copies mask rows between tokens of a sequence and recomputes only
    cells near the ubatch; on a long prompt with SWA that must equal pymem's direct rule."""
    ok = OKV(64, 2, True, 5, SWAType.STANDARD)
    kv = KVCache(
        make_spec(rope=RopeSpec(n_rot=8, rope_type=RopeType.NONE)),
        kv_size=64,
        n_seq_max=2,
        n_swa=5,
        swa_type=SWAType.STANDARD,
    )
    items = [[1, p, [0], False] for p in range(40)] + [[1, p, [1], False] for p in range(10)]
    balloc = BatchAllocator()
    balloc.init(Batch.from_items(items), memory=kv, n_seq_max=2)
    ctx = kv.init_batch(balloc, 64, False)
    ctx.apply()
    toks = ubatch_tokens(ctx.get_ubatch())
    ok.apply([(0, ctx.get_sinfo().idxs[0].tolist())], toks)
    for causal in (True, False):
        want = np.array(ok.kq_mask(toks, 1, ctx.get_n_kv(), causal), dtype=np.float32)
        np.testing.assert_array_equal(ctx.get_kq_mask(causal_attn=causal), want)
        assert math.isinf(want[0, 39, 0]) and want[0, 39, 39] == 0
