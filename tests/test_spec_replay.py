"""The executable spec (tests/spec) replayed against the recorded llama.cpp runs.

Pins the spec itself: every recorded step's result, the [pos_min, pos_max] of every
sequence after it, the per-sequence and whole state sizes, and the metadata of every
recorded blob (stream and cell counts, positions, sequence ids, tensor headers and
region sizes) must come out of the spec exactly. The property tests trust the spec only
because of this file.
"""

from __future__ import annotations

import json

import pytest
from spec import runs
from spec.batch import BatchIn, alloc_init, compat
from spec.common import I32_MAX, SpecAbort, SwaType, is_masked_swa
from spec.decode import seq_blob_payload, whole_blob_payload
from spec.kv import KVConfig, KVLayer
from spec.layout import layout
from spec.memory import KVMemory, RecurrentMemory
from spec.recurrent import RSConfig
from spec.stdset import unordered_set_order

RUNS = ["llama.main.fa0.u1", "mamba.main.u1", "jamba.main.fa1.u0"]


@pytest.mark.parametrize("name", RUNS)
def test_replay_matches_reference(name: str) -> None:
    checks = runs.replay(name)
    assert len(checks) == len(runs.load_run(name)["steps"])
    problems = [f"step {c.i} ({c.op}): {p}" for c in checks for p in c.problems]
    assert problems == []


@pytest.mark.parametrize("name", RUNS)
def test_replay_restores_every_recorded_blob_unchanged(name: str) -> None:
    # a blob the reference wrote, restored into the spec and written again, is the same
    # bytes (data included): the spec's reader and writer are exact inverses on real blobs
    run = runs.load_run(name)
    arch = run["memory"]["arch"]
    ids = {s["state"] for s in run["steps"] if "state" in s}
    assert len(ids) > 5
    for blob_id in sorted(ids):
        mem = runs.build_memory(run)
        blob = runs.load_blob(blob_id)
        payload = whole_blob_payload(blob, arch)
        assert mem.state_read(payload) == len(payload)
        assert mem.state_write() == payload


def test_replay_detects_a_wrong_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    # negative control: a spec that places a ubatch's tokens in reverse order must fail
    import spec.kv as kv

    orig = kv.KVCache.find_slot

    def reversed_slots(self, ub, cont=False):
        res = orig(self, ub, cont)
        if res is not None and len(res.idxs[0]) > 1:
            res.idxs[0] = res.idxs[0][::-1]
        return res

    monkeypatch.setattr(kv.KVCache, "find_slot", reversed_slots)
    checks = runs.replay("llama.main.fa0.u1")
    assert sum(1 for c in checks if c.problems) > 10


def test_unordered_set_order_matches_libstdcxx() -> None:
    # ground truth compiled with g++ 12.2 (tests/data/unordered_set_order.json)
    cases = json.loads((runs.DATA / "unordered_set_order.json").read_text())["cases"]
    assert len(cases) > 300
    for c in cases:
        assert unordered_set_order(c["insert"]) == c["order"], c["insert"]


def _alloc(items: list, mem=None, n_seq_max: int = 4):
    toks = compat(BatchIn.from_items(items), mem, n_seq_max, 1)
    return alloc_init(toks, mem, n_seq_max=n_seq_max, n_vocab=64)


def test_split_equal_takes_n_ubatch_plus_one_sets() -> None:
    # quirk: split_equal breaks only after accepting MORE than n_ubatch sets
    a = _alloc([[1, 0, [s], True] for s in range(4)])
    ub = a.split_equal(2, False)
    assert ub.n_tokens == 3 and ub.seq_id_unq == [0, 1, 2]
    ub = a.split_equal(2, False)
    assert ub.n_tokens == 1 and ub.seq_id_unq == [3]
    assert a.split_equal(2, False) is None


def test_split_equal_sequential_needs_consecutive_seq_ids() -> None:
    a = _alloc([[1, 0, [0], True], [1, 0, [2], True], [1, 0, [1], True]])
    ub = a.split_equal(8, True)
    # seq 2 is skipped (0 then 2 is not consecutive); seq 1 follows 0
    assert ub.seq_id_unq == [0, 1] and ub.batch_idxs == [0, 2]


def test_split_equal_refuses_coupled_sequences_when_sequential() -> None:
    a = _alloc([[1, 0, [0, 1], True]])
    assert a.split_equal(8, True) is None and a.n_used == 0
    assert a.split_equal(8, False).seq_id == [[1, 0]]  # libstdc++ order puts 1 first


def test_split_equal_keep_tail_extends_the_first_set() -> None:
    # 5 + 5 tokens, n_ubatch 6, n_keep_tail 3: round-robin takes 3 + 3 and would leave
    # 2 < 3 in each set, so no set can be kept; the first is extended to completion
    items = [[1, p, [s], False] for s in range(2) for p in range(5)]
    a = _alloc(items)
    assert a.split_equal(6, True, 3).batch_idxs == [0, 1, 2, 3, 4]
    assert a.split_equal(6, True, 3).batch_idxs == [5, 6, 7, 8, 9]
    assert a.split_equal(6, True, 3) is None


def test_split_equal_keep_tail_truncates_the_first_set() -> None:
    # 7 + 7 tokens, n_ubatch 6, n_keep_tail 5: 3 + 3 would leave 4 < 5 and 3 + 4 > 6,
    # so the first set is cut back until 5 tokens remain and goes alone
    items = [[1, p, [s], False] for s in range(2) for p in range(7)]
    a = _alloc(items)
    assert a.split_equal(6, True, 5).batch_idxs == [0, 1]
    with pytest.raises(SpecAbort):
        _alloc(items).split_equal(5, True, 5)  # GGML_ASSERT(n_ubatch > n_keep_tail)


def test_split_seq_takes_subsets_only() -> None:
    a = _alloc(
        [[1, 0, [0, 1], False], [1, 1, [0], False], [1, 0, [2], False], [1, 1, [0, 1], False]]
    )
    ub = a.split_seq(8)
    # {0,1} then {0} (a subset); {2} is not; {0,1} is not a subset of {0}
    assert ub.batch_idxs == [0, 1] and ub.n_seqs == 1
    assert a.split_seq(8).batch_idxs == [2]
    assert a.split_seq(8).batch_idxs == [3]


def test_swa_kinds() -> None:
    assert is_masked_swa(4, SwaType.STANDARD, 0, 4) and not is_masked_swa(4, SwaType.STANDARD, 1, 4)
    assert is_masked_swa(4, SwaType.CHUNKED, 3, 4) and not is_masked_swa(4, SwaType.CHUNKED, 4, 7)
    assert is_masked_swa(4, SwaType.SYMMETRIC, 0, 3) and not is_masked_swa(
        4, SwaType.SYMMETRIC, 5, 3
    )
    assert not is_masked_swa(4, SwaType.NONE, 0, 1000)


def _rs(n_seq: int = 4, n_rs_seq: int = 0) -> RecurrentMemory:
    return RecurrentMemory(RSConfig(1, [0], 4, 8, n_seq, n_seq, n_rs_seq))


def _decode(mem, items, n_seq_max: int = 4, n_ubatch: int = 16) -> int:
    from spec.decode import decode

    return decode(
        mem, BatchIn.from_items(items), n_seq_max=n_seq_max, n_vocab=64, n_ubatch=n_ubatch
    )


def test_recurrent_seq_rm_cases() -> None:
    mem = _rs(n_rs_seq=2)
    assert _decode(mem, [[1, p, [0], p == 9] for p in range(10)]) == 0
    assert mem.seq_pos_max(0) == 9
    assert mem.seq_rm(0, 0, 5) is True and mem.seq_pos_max(0) == 9  # interior: no-op
    assert mem.seq_rm(0, 9, -1) is True and mem.seq_pos_max(0) == 8  # rollback by 1
    assert mem.seq_rm(0, 8, -1) is False  # a rollback is pending
    assert mem.rs.s_copy_inputs() == [4]  # plane 1 of cell 0: consumed once
    assert mem.seq_rm(0, 6, -1) is False  # rollback 8 - 5 = 3 > n_rs_seq 2
    assert mem.seq_rm(0, 7, -1) is True and mem.seq_pos_max(0) == 6  # rollback by 2


def test_recurrent_rollback_bound() -> None:
    mem = _rs(n_rs_seq=2)
    assert _decode(mem, [[1, p, [0], p == 9] for p in range(10)]) == 0
    assert mem.seq_rm(0, 7, -1) is False  # rollback 3 > n_rs_seq 2: nothing changes
    assert mem.seq_pos_max(0) == 9
    assert mem.seq_rm(-1, -1, -1) is False  # seq -1 is refused (unsigned compare)
    assert mem.seq_pos_max(0) == 9


def test_kv_seq_rm_minus_one_partial_range() -> None:
    cfg = KVConfig([KVLayer(0, 8, 8)], kv_size=16, n_seq_max=4)
    mem = KVMemory(cfg)
    assert _decode(mem, [[1, p, [s], False] for s in range(2) for p in range(4)]) == 0
    assert mem.seq_rm(-1, 1, 3) is True
    assert [mem.seq_pos_min(0), mem.seq_pos_max(0)] == [0, 3]
    assert [p for p in mem.kv.cells[0].pos] == [0, -1, -1, 3, 0, -1, -1, 3] + [-1] * 8
    assert I32_MAX == 2**31 - 1


def test_layout_walks_recorded_blobs_to_the_end() -> None:
    run = runs.load_run("llama.main.fa0.u1")
    mem = runs.build_memory(run)
    for st in run["steps"]:
        for s, blob_id in enumerate(st.get("seq_state", [])):
            lay = layout(mem, seq_blob_payload(runs.load_blob(blob_id)), s)
            assert not any(x[0] == "trailing bytes" for x in lay)
