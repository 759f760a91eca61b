"""Hostile inputs: damaged and mismatched state blobs, invalid batches, impossible sizes.

Every case must raise a typed error (a ``pymem.errors.PymemError`` subclass) and leave the
memory byte for byte as it was: the whole-state blob, every cell array, heads, pending
stream copies and every tensor byte are compared (tests/spec/hostile.py ``snapshot``).
A damaged blob that still parses (a flipped tensor byte, say) must give the state the
executable spec reaches from the same bytes. Blobs declaring huge counts must be refused
without allocating what they declare. Nothing may leak over 1,000 create/fail/close cycles.
"""

from __future__ import annotations

import gc
import os
import types

import numpy as np
import pytest
from spec import runs as spec_runs
from spec.harness import Config, Pair, build_pymem
from spec.hostile import (
    RUNS,
    SYNTH_CONFIGS,
    HostileFailure,
    expect_refused_unchanged,
    filled_pair,
    flips,
    huge_count_blobs,
    memory_nbytes,
    peak_alloc,
    pick_blobs,
    real_memory,
    snapshot,
    truncations,
)

from pymem.batch import Batch, BatchAllocator
from pymem.errors import (
    ClosedError,
    ConfigError,
    OutOfMemoryError,
    PymemError,
    StateError,
)
from pymem.kv import KVCache
from pymem.recurrent import RecurrentMemory
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType

KINDS = list(SYNTH_CONFIGS)

# --------------------------------------------------------------------------------------
# damaged blobs: every truncation point
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RUNS))
def test_truncated_real_blobs_are_refused_without_change(kind: str) -> None:
    mem, run = real_memory(kind)
    try:
        whole, seq = pick_blobs(run)
        mem.state_read(whole[2])  # a non-empty memory to restore into
        n = 0
        for _, seq_id, payload in (whole, seq):
            out = truncations(mem, payload, seq_id)
            assert out.refused == len(payload) and out.accepted == 0
            n += out.cases
        assert n > 1000
        # the full blobs still restore after all that
        assert mem.state_read(seq[2], seq[1]) == len(seq[2])
    finally:
        mem.close()


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_synthetic_blobs_are_refused_without_change(kind: str) -> None:
    pair = filled_pair(SYNTH_CONFIGS[kind])
    try:
        blobs = [(-1, 0, pair.pm.state_write(-1)), (1, 0, pair.pm.state_write(1))]
        if kind in ("iswa", "hybrid", "hybrid_iswa"):
            blobs.append((0, 1, pair.pm.state_write(0, 1)))  # partial-only
        for seq_id, flags, payload in blobs:
            out = truncations(pair.pm, payload, seq_id, flags)
            assert out.refused == len(payload), (seq_id, flags)
    finally:
        pair.close()


# --------------------------------------------------------------------------------------
# damaged blobs: seeded random byte flips (compared with the spec when accepted)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RUNS))
def test_flipped_real_blobs(kind: str) -> None:
    mem, run = real_memory(kind)
    sp = spec_runs.build_memory(run)
    twin = types.SimpleNamespace(pm=mem, sp=sp, cfg=types.SimpleNamespace(n_seq_max=run["n_seq"]))
    try:
        whole, seq = pick_blobs(run)
        mem.state_read(whole[2])
        sp.state_read(whole[2])
        total = flips(twin, whole[2], -1, 400, seed=1)
        total2 = flips(twin, seq[2], seq[1], 400, seed=2)
        assert total.cases + total2.cases == 800
        # both kinds of outcome happen: corrupt metadata is refused, corrupt data accepted
        assert total.refused > 50 and total.accepted > 50
        assert total2.refused > 50 and total2.accepted > 50
    finally:
        mem.close()


@pytest.mark.parametrize("kind", KINDS)
def test_flipped_synthetic_blobs(kind: str) -> None:
    pair = filled_pair(SYNTH_CONFIGS[kind])
    try:
        whole = pair.pm.state_write(-1)
        one = pair.pm.state_write(1)
        a = flips(pair, whole, -1, 300, seed=11)
        b = flips(pair, one, 1, 300, seed=12)
        assert a.refused > 30 and b.refused > 30
    finally:
        pair.close()


@pytest.mark.parametrize("kind", ["kv", "iswa", "hybrid", "hybrid_iswa"])
def test_flipped_synthetic_blobs_into_a_cleared_memory(kind: str) -> None:
    """The same corruptions read into a memory without cells (a session loaded into a
    fresh context: a composite's one call then leaves its first part's records to the
    refill that places them): refused ones change nothing, accepted ones give the
    spec's state."""
    pair = filled_pair(SYNTH_CONFIGS[kind])
    try:
        whole = pair.pm.state_write(-1)
        pair.pm.clear(False)
        pair.sp.clear(False)
        out = flips(pair, whole, -1, 300, seed=13)
        assert out.refused > 30 and out.accepted > 30
    finally:
        pair.close()


# --------------------------------------------------------------------------------------
# blobs from a mismatched configuration
# --------------------------------------------------------------------------------------

MISMATCHES = [
    # (what differs, source config, target config)
    ("layer count", Config("kv", layout="AA"), Config("kv", layout="AAA")),
    ("K type", Config("kv", type_k="f16", type_v="f16"), Config("kv", type_k="f32", type_v="f16")),
    ("V type", Config("kv", type_v="f16"), Config("kv", type_v="bf16")),
    ("K/V quantised vs not", Config("kv", head_dim=32, type_k="q8_0", v_trans=False, type_v="q8_0"),
     Config("kv", head_dim=32, type_k="f16", v_trans=False, type_v="f16")),
    ("head width", Config("kv", head_dim=8), Config("kv", head_dim=16)),
    ("V width (transposed)", Config("kv", v_dims=(8, 16)), Config("kv", v_dims=(8, 8))),
    ("V width (rows)", Config("kv", v_dims=(8, 16), v_trans=False), Config("kv", v_dims=(16, 16), v_trans=False)),
    ("stream count", Config("kv", unified=True), Config("kv", unified=False)),
    ("stream count (other way)", Config("kv", unified=False), Config("kv", unified=True)),
    ("v_trans", Config("kv", v_trans=True), Config("kv", v_trans=False)),
    ("n_seq_max", Config("kv", n_seq_max=8), Config("kv", n_seq_max=2)),
    ("kv_size", Config("kv", kv_size=32), Config("kv", kv_size=4)),
    ("plain KV into iSWA", Config("kv", layout="AA"),
     Config("iswa", layout="AWA", n_swa=3, swa_type=1, swa_size=8)),
    ("iSWA layer split", Config("iswa", layout="AWA", n_swa=3, swa_type=1, swa_size=8),
     Config("iswa", layout="AWW", n_swa=3, swa_type=1, swa_size=8)),
    ("SWA cache size", Config("iswa", layout="AW", n_swa=8, swa_type=1, swa_size=16),
     Config("iswa", layout="AW", n_swa=8, swa_type=1, swa_size=4)),
    ("recurrent layer count", Config("recurrent", layout="RR"), Config("recurrent", layout="R")),
    ("recurrent R width", Config("recurrent", layout="RR"), Config("recurrent", layout="RR", n_embd_r=4)),
    ("recurrent S width", Config("recurrent", layout="RR"), Config("recurrent", layout="RR", n_embd_s=12)),
    ("recurrent n_seq_max", Config("recurrent", layout="R", n_seq_max=8), Config("recurrent", layout="R", n_seq_max=2)),
    ("hybrid layer count", Config("hybrid", layout="RARA"), Config("hybrid", layout="RRA")),
    ("hybrid streams", Config("hybrid", layout="RA", unified=False), Config("hybrid", layout="RA", unified=True)),
    ("hybrid into recurrent", Config("hybrid", layout="RA"), Config("recurrent", layout="RA")),
    ("hybrid-iSWA into hybrid", Config("hybrid_iswa", layout="RAW", n_swa=3, swa_type=1, swa_size=8),
     Config("hybrid", layout="RAW")),
]  # fmt: skip


def _fill(pair: Pair, seqs: list[int], n: int) -> None:
    for s in seqs:
        pair.decode([[5 + s, p, [s], p == n - 1] for p in range(n)])


@pytest.mark.parametrize("what,src_cfg,dst_cfg", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_blob_is_refused_without_change(
    what: str, src_cfg: Config, dst_cfg: Config
) -> None:
    src = Pair(src_cfg, check_seq_states=1)
    dst = Pair(dst_cfg, check_seq_states=1)
    try:
        seqs = sorted({s for s in (0, 1, src_cfg.n_seq_max - 1) if s < src_cfg.n_seq_max})
        _fill(src, seqs, 4)
        _fill(dst, [0], 3)
        whole = src.pm.state_write(-1)
        expect_refused_unchanged(dst.pm, lambda: dst.pm.state_read(whole), f"{what}: whole blob")
        held = [s for s in seqs if src.pm.seq_pos_max(s) >= 0]
        assert held, "the source memory holds nothing"
        s = held[-1]
        one = src.pm.state_write(s)
        if s < dst_cfg.n_seq_max and what not in ("n_seq_max", "recurrent n_seq_max"):
            expect_refused_unchanged(dst.pm, lambda: dst.pm.state_read(one, s), f"{what}: seq blob")
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("kind", ["iswa", "hybrid", "hybrid_iswa"])
def test_partial_and_full_blobs_do_not_mix(kind: str) -> None:
    pair = filled_pair(SYNTH_CONFIGS[kind])
    try:
        full = pair.pm.state_write(1, 0)
        partial = pair.pm.state_write(1, 1)
        assert len(partial) < len(full)
        expect_refused_unchanged(
            pair.pm, lambda: pair.pm.state_read(partial, 1, 0), "partial read as full"
        )
        if kind != "hybrid":  # a hybrid's full blob starts with a KV part: read as RS it fails
            expect_refused_unchanged(
                pair.pm, lambda: pair.pm.state_read(full[:-1], 1, 1), "full read as partial"
            )
    finally:
        pair.close()


# --------------------------------------------------------------------------------------
# empty input, huge declared counts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seq_id", [-1, 0, 2])
def test_empty_blob(kind: str, seq_id: int) -> None:
    pair = filled_pair(SYNTH_CONFIGS[kind])
    try:
        err = expect_refused_unchanged(
            pair.pm, lambda: pair.pm.state_read(b"", seq_id), "empty blob"
        )
        assert isinstance(err, StateError)
    finally:
        pair.close()


@pytest.mark.parametrize("kind", KINDS)
def test_huge_declared_counts_allocate_nothing_big(kind: str) -> None:
    pair = filled_pair(SYNTH_CONFIGS[kind])
    try:
        n_layer = len(pair.cfg.layout)
        base = 4 * memory_nbytes(pair.pm) + (1 << 20)
        for what, blob in huge_count_blobs("recurrent" if kind == "recurrent" else kind, n_layer):
            for seq_id in (-1, 1):
                before = snapshot(pair.pm)
                peak, err = peak_alloc(
                    lambda blob=blob, seq_id=seq_id: pair.pm.state_read(blob, seq_id)
                )
                assert isinstance(err, PymemError), (what, seq_id, err)
                assert snapshot(pair.pm) == before, (what, seq_id)
                assert peak < base, (what, seq_id, peak, base)
    finally:
        pair.close()


@pytest.mark.parametrize("kind", list(RUNS))
def test_damaged_real_blobs_allocate_what_the_blob_can_describe(kind: str) -> None:
    mem, run = real_memory(kind)
    try:
        whole, _ = pick_blobs(run)
        bound = 4 * memory_nbytes(mem) + 8 * len(whole[2]) + (1 << 20)
        rng = np.random.default_rng(5)
        for _ in range(40):
            b = bytearray(whole[2][: int(rng.integers(1, len(whole[2])))])
            for off in rng.integers(0, len(b), 3):
                b[off] = 0xFF
            peak, err = peak_alloc(lambda b=b: mem.state_read(bytes(b)))
            assert err is None or isinstance(err, PymemError), err
            assert peak < bound, (peak, bound)
            mem.state_read(whole[2])
    finally:
        mem.close()


# --------------------------------------------------------------------------------------
# invalid batches: typed error before any change
# --------------------------------------------------------------------------------------

N_SEQ = 4


def _batch_cases(mem) -> list[tuple[str, object]]:
    """Each case is a callable doing batch construction + validation (+ planning)."""
    x = mem.seq_pos_max(0)  # seq 0 holds positions [0, x]

    def init(batch_kw: dict, *, n_pos: int = 1, **init_kw):
        def run():
            b = Batch(**batch_kw)
            balloc = BatchAllocator(n_pos)
            kw = dict(memory=mem, n_seq_max=N_SEQ, n_vocab=64)
            kw.update(init_kw)
            balloc.init(b, **kw)
            ctx = mem.init_batch(balloc, init_kw.get("n_ubatch", 8), False)
            return ctx

        return run

    def plan(batch_kw: dict, n_ubatch: int):
        def run():
            balloc = BatchAllocator(1)
            balloc.init(Batch(**batch_kw), memory=mem, n_seq_max=N_SEQ, n_vocab=64)
            return mem.init_batch(balloc, n_ubatch, False)

        return run

    t = np.array
    i32 = np.int32
    nxt = x + 1
    e4 = np.zeros((2, 4), dtype=np.float32)
    return [
        # --- refused by the reference
        ("empty batch", init(dict(token=t([], dtype=i32), pos=t([], dtype=i32)))),
        ("n_seq_max above LLAMA_MAX_SEQ", init(dict(token=t([1], dtype=i32), pos=t([0], dtype=i32), seq_id=[[3]]), n_seq_max=257)),
        ("mixed content kinds (token id -1)", init(dict(token=t([1, -1], dtype=i32), pos=t([nxt, nxt + 1], dtype=i32)))),
        ("no token ids and no embeddings", init(dict(token=t([-1, -1], dtype=i32), pos=t([nxt, nxt + 1], dtype=i32)))),
        ("token id = n_vocab", init(dict(token=t([64], dtype=i32), pos=t([nxt], dtype=i32)))),
        ("negative token id", init(dict(token=t([-7], dtype=i32), pos=t([nxt], dtype=i32)))),
        ("seq id = n_seq_max", init(dict(token=t([1], dtype=i32), pos=t([0], dtype=i32), seq_id=[[N_SEQ]]))),
        ("negative seq id", init(dict(token=t([1], dtype=i32), pos=t([0], dtype=i32), seq_id=[[-2]]))),
        ("position does not continue the memory (Y != X + 1)", init(dict(token=t([1], dtype=i32), pos=t([x + 3], dtype=i32)))),
        ("restart inside a sequence (Y <= X)", init(dict(token=t([1], dtype=i32), pos=t([0], dtype=i32)))),
        ("position gap inside the batch", init(dict(token=t([1, 2], dtype=i32), pos=t([nxt, nxt + 2], dtype=i32)))),
        ("decreasing positions", init(dict(token=t([1, 2, 3], dtype=i32), pos=t([nxt, nxt + 1, nxt], dtype=i32)))),
        ("coupled sequences that diverged", init(dict(token=t([1], dtype=i32), pos=t([nxt], dtype=i32), seq_id=[[0, 3]]))),
        ("embedding width mismatch", init(dict(embd=e4, pos=t([nxt, nxt + 1], dtype=i32)), n_embd=8)),
        ("M-RoPE token position not after the memory", init(dict(token=t([1], dtype=i32), pos=t([x], dtype=i32)), n_pos=4)),
        # --- missed by the reference
        ("NaN embedding", init(dict(embd=np.full((1, 4), np.nan, dtype=np.float32), pos=t([nxt], dtype=i32)), n_embd=4)),
        ("inf embedding", init(dict(embd=np.full((1, 4), np.inf, dtype=np.float32), pos=t([nxt], dtype=i32)), n_embd=4)),
        ("negative position", init(dict(token=t([1], dtype=i32), pos=t([-3], dtype=i32), seq_id=[[2]]))),
        ("float token ids", init(dict(token=t([1.5]), pos=t([nxt], dtype=i32)))),
        ("string token ids", init(dict(token=t(["a"]), pos=t([nxt], dtype=i32)))),
        ("float positions", init(dict(token=t([1], dtype=i32), pos=t([nxt + 0.5])))),
        ("positions past int32", init(dict(token=t([1], dtype=i32), pos=t([2**31], dtype=np.int64), seq_id=[[2]]))),
        ("float sequence ids", init(dict(token=t([1], dtype=i32), pos=t([0], dtype=i32), seq_id=t([0.5])))),
        ("2-D token array", init(dict(token=t([[1, 2]], dtype=i32), pos=t([nxt, nxt + 1], dtype=i32)))),
        ("pos length differs from tokens", init(dict(token=t([1, 2], dtype=i32), pos=t([nxt], dtype=i32)))),
        ("seq_id rows differ from tokens", init(dict(token=t([1, 2], dtype=i32), pos=t([nxt, nxt + 1], dtype=i32), seq_id=[[0]]))),
        ("output flags of the wrong shape", init(dict(token=t([1], dtype=i32), pos=t([nxt], dtype=i32), output=t([1, 0])))),
        ("float output flags", init(dict(token=t([1], dtype=i32), pos=t([nxt], dtype=i32), output=t([0.5])))),
        ("1-D embedding", init(dict(embd=np.zeros(4, dtype=np.float32), pos=t([nxt], dtype=i32)), n_embd=4)),
        ("embedding rows differ from tokens", init(dict(token=t([1, 2], dtype=i32), embd=np.zeros((1, 4), np.float32), pos=t([nxt, nxt + 1], dtype=i32)), n_embd=4)),
        ("a token with no sequence id", init(dict(token=t([1], dtype=i32), pos=t([nxt], dtype=i32), seq_id=[[]]))),
        ("n_seq_id larger than the seq_id row", init(dict(token=t([1], dtype=i32), pos=t([nxt], dtype=i32), seq_id=t([[0]], dtype=i32), n_seq_id=t([3], dtype=i32)))),
        ("n_ubatch = 0", plan(dict(token=t([1], dtype=i32), pos=t([nxt], dtype=i32)), 0)),
    ]  # fmt: skip


BATCH_CASE_NAMES = [
    name for name, _ in _batch_cases(types.SimpleNamespace(seq_pos_max=lambda s: 2))
]


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_batches_are_refused_before_any_change(kind: str) -> None:
    pair = filled_pair(SYNTH_CONFIGS[kind])
    try:
        if pair.pm.seq_pos_max(0) < 0:  # the cases continue sequence 0
            assert pair.decode([[1, p, [0], p == 2] for p in range(3)]) == 0
        assert pair.pm.seq_pos_max(0) >= 0 and pair.pm.seq_pos_max(3) < 0
        cases = _batch_cases(pair.pm)
        assert [c[0] for c in cases] == BATCH_CASE_NAMES
        kinds = {}
        for name, run in cases:
            err = expect_refused_unchanged(pair.pm, run, f"batch: {name}")
            kinds[name] = type(err).__name__
        # nearly all are BatchErrors; configuration-like ones may be ConfigError/RangeError
        assert sum(1 for v in kinds.values() if v == "BatchError") >= len(cases) - 4, kinds
        # and a valid batch is still accepted afterwards (placed, or "no slot" when full)
        x = pair.pm.seq_pos_max(0)
        assert pair.decode([[1, x + 1, [0], True]]) in (0, 1)
    finally:
        pair.close()


# --------------------------------------------------------------------------------------
# resources
# --------------------------------------------------------------------------------------


def _spec(n_layer: int = 2, head: int = 64, recurrent: bool = False) -> ModelSpec:
    rope = RopeSpec(n_rot=head, rope_type=RopeType.NONE)
    if recurrent:
        return ModelSpec(
            layers=tuple(LayerSpec.ssm(head, head) for _ in range(n_layer)), arch="spec"
        )
    return ModelSpec(
        layers=tuple(LayerSpec.attention(1, head, rope=rope) for _ in range(n_layer)), arch="spec"
    )


def test_allocation_larger_than_the_device() -> None:
    # 2 layers x 2 tensors x 4096 x 2^24 cells x f16 = 512 GiB
    with pytest.raises(OutOfMemoryError):
        KVCache(_spec(head=4096), kv_size=1 << 24, n_seq_max=1)
    with pytest.raises(OutOfMemoryError):
        KVCache(_spec(head=4096), kv_size=1 << 16, n_seq_max=256, unified=False)
    with pytest.raises(OutOfMemoryError):
        RecurrentMemory(_spec(head=1 << 15, recurrent=True), n_seq_max=256, n_rs_seq=1 << 10)


@pytest.mark.parametrize(
    "make,err",
    [
        (lambda: KVCache(_spec(), kv_size=0, n_seq_max=1), ConfigError),
        (lambda: KVCache(_spec(), kv_size=-4, n_seq_max=1), ConfigError),
        (lambda: KVCache(_spec(), kv_size=16, n_seq_max=257), ConfigError),
        (lambda: KVCache(_spec(), kv_size=16, n_seq_max=0), ConfigError),
        (lambda: KVCache(_spec(), kv_size=16, n_seq_max=4, n_pad=3), ConfigError),
        (lambda: KVCache(_spec(), kv_size=16, n_seq_max=4, type_k="nope"), PymemError),
        (lambda: RecurrentMemory(_spec(recurrent=True), n_seq_max=257), ConfigError),
        (lambda: RecurrentMemory(_spec(recurrent=True), n_seq_max=0), ConfigError),
        (lambda: RecurrentMemory(_spec(recurrent=True), n_seq_max=4, n_rs_seq=-1), ConfigError),
        (
            lambda: build_pymem(Config("iswa", layout="AW", kv_size=0, n_swa=4, swa_type=1)),
            ConfigError,
        ),
        (lambda: build_pymem(Config("hybrid", layout="RA", n_seq_max=300)), ConfigError),
    ],
)
def test_impossible_sizes_raise_clear_errors(make, err) -> None:
    with pytest.raises(err) as e:
        make()
    assert str(e.value)  # the message names the field and the value


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(
    bool(os.environ.get("PYMEM_SANITIZED")), reason="ASan's quarantine holds freed memory by design"
)
def test_nothing_leaks_over_1000_cycles() -> None:
    spec_kv = _spec(head=256)  # 2 layers x 2 x 256 x 128 cells x f16 = 256 KiB per cache
    spec_rs = _spec(head=1024, recurrent=True)

    def cycle() -> None:
        kv = KVCache(spec_kv, kv_size=128, n_seq_max=2)
        rs = RecurrentMemory(spec_rs, n_seq_max=8)
        kv.close()
        kv.close()  # idempotent
        with pytest.raises(ClosedError):
            rs.close() or rs.get_r_l(0)
        for bad in (
            lambda: KVCache(spec_kv, kv_size=1 << 24, n_seq_max=64, unified=False),  # too big
            lambda: KVCache(spec_kv, kv_size=0, n_seq_max=1),
            lambda: RecurrentMemory(spec_rs, n_seq_max=1000),
        ):
            with pytest.raises(PymemError):
                bad()

    for _ in range(50):  # warm up allocator caches
        cycle()
    gc.collect()
    rss0 = _rss()
    for _ in range(1000):
        cycle()
    gc.collect()
    grown = _rss() - rss0
    # a leaked cache would be 256 KiB per cycle (250 MiB over 1000 cycles)
    assert grown < 24 * 2**20, grown


# K1 (found here, fixed): a closed KVCache used to go on planning and applying batches
@pytest.mark.parametrize("kind", KINDS)
def test_operations_after_close_raise_typed_errors(kind: str) -> None:
    pair = filled_pair(SYNTH_CONFIGS[kind])
    mem = pair.pm
    blob = mem.state_write(-1)
    blob_one = mem.state_write(0)
    mem.close()
    ops = {
        "state_write": lambda: mem.state_write(-1),
        "state_read": lambda: mem.state_read(blob),
        "decode": lambda: _plan_one(mem, pair.cfg.n_seq_max),
        "seq_pos_max": lambda: mem.seq_pos_max(0),
        "seq_pos_min": lambda: mem.seq_pos_min(0),
        "seq_pos_max_of": lambda: mem.seq_pos_max_of(np.array([0, 1])),
        "seq_pos_min_of": lambda: mem.seq_pos_min_of(np.array([0, 1])),
        "seq_rm": lambda: mem.seq_rm(0, -1, -1),
        "seq_rm tail": lambda: mem.seq_rm(0, 1, -1),
        "seq_cp": lambda: mem.seq_cp(0, 1, -1, -1),
        "seq_keep": lambda: mem.seq_keep(0),
        "seq_add": lambda: mem.seq_add(0, 0, -1, 1),
        "seq_div": lambda: mem.seq_div(0, 0, -1, 2),
        "state_size": lambda: mem.state_size(-1),
        "state_size one": lambda: mem.state_size(0),
        "state_write one": lambda: mem.state_write(0),
        "state_read one": lambda: mem.state_read(blob_one, 0),
        "clear": lambda: mem.clear(True),
        "init_update": lambda: mem.init_update(False),
        "init_full": lambda: mem.init_full(),
    }
    failures = []
    for name, op in ops.items():
        try:
            op()
        except PymemError:
            continue
        except Exception as e:
            failures.append(f"{name}: untyped {type(e).__name__}: {e}")
            continue
        failures.append(f"{name} succeeded")
    if failures:
        raise HostileFailure(f"{kind} after close: " + "; ".join(failures))


def _plan_one(mem, n_seq_max: int) -> None:
    balloc = BatchAllocator(1)
    balloc.init(
        Batch(np.array([1], dtype=np.int32), seq_id=[[3]]),
        memory=mem,
        n_seq_max=n_seq_max,
        n_vocab=64,
    )
    ctx = mem.init_batch(balloc, 8, False)
    ctx.apply()


# --------------------------------------------------------------------------------------
# the streaming variants: state_write_to / state_read_from on file objects
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_file_streams_match_bytes_and_refuse_truncated_files(kind: str) -> None:
    import io

    pair = filled_pair(SYNTH_CONFIGS[kind])
    try:
        mem = pair.pm
        for seq_id in (-1, 1):
            f = io.BytesIO()
            n = mem.state_write_to(f, seq_id)
            blob = mem.state_write(seq_id)
            assert n == len(blob) and f.getvalue() == blob
            # a file holding the blob and more: exactly the blob is consumed
            f = io.BytesIO(blob + b"trailing")
            assert mem.state_read_from(f, seq_id) == len(blob)
            assert f.tell() == len(blob)
            before = snapshot(mem)
            for k in range(0, len(blob), max(1, len(blob) // 97)):
                f = io.BytesIO(blob[:k])
                expect_refused_unchanged(
                    mem,
                    lambda f=f, s=seq_id: mem.state_read_from(f, s),
                    f"file truncated at {k}",
                    before,
                )
    finally:
        pair.close()
