"""End to end: the tiny hybrid model decodes through each pymem memory and matches a full
recompute by the numpy oracle after every step.

For each memory type the factory builds (KV, iSWA, recurrent, hybrid, hybrid-iSWA), on
every device pymem finds: prompts of different lengths in one batch, continuous batching
(sequences joining and finishing), forks, speculative rollbacks (and their refusal beyond
the recurrent snapshots), ``seq_keep``, a context shift (``seq_rm`` + ``seq_add``, then the
K-shift) and save / restore into another memory and another sequence id.

Tolerances (max abs logit error, logits are O(4)): f32 caches 2e-5 (observed ~3e-6),
f16 1e-2 (observed ~2e-3), q8_0 0.15 (observed ~0.04); the reasons are in
:data:`pymem.runtime.session.TOLERANCES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pymem.factory import ContextParams, create_memory
from pymem.memory import Memory
from pymem.runtime import Oracle, TinyConfig, TinyModel
from pymem.runtime.session import Session, tolerance_for, usage

MEMORY_TYPES = ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"]
EXPECTED_CLASS = {
    "kv": "KVCache",
    "iswa": "KVCacheISWA",
    "recurrent": "RecurrentMemory",
    "hybrid": "HybridMemory",
    "hybrid_iswa": "HybridISWAMemory",
}
N_RS_SEQ = 2
_MODELS: dict[tuple[str, str], tuple[TinyModel, Oracle]] = {}


def _model(device: str, memory_type: str) -> tuple[TinyModel, Oracle]:
    """One model (weights on the device) and oracle per (device, preset), shared by tests."""
    key = (device, memory_type)
    if key not in _MODELS:
        model = TinyModel(TinyConfig.preset(memory_type), device)
        _MODELS[key] = (model, Oracle(model.weights))
    return _MODELS[key]


def _memory(device: str, memory_type: str, **params: object) -> Memory:
    cfg = TinyConfig.preset(memory_type)
    kw: dict = dict(n_ctx=256, n_seq_max=6, flash_attn=False, type_k="f32", type_v="f32",
                    kv_unified=True, n_rs_seq=N_RS_SEQ, device=device)  # fmt: skip
    kw.update(params)
    mem = create_memory(cfg.spec(), ContextParams(**kw))
    assert mem is not None and type(mem).__name__ == EXPECTED_CLASS[memory_type]
    return mem


@contextmanager
def session(device: str, memory_type: str, **params: object) -> Iterator[Session]:
    model, oracle = _model(device, memory_type)
    mem = _memory(device, memory_type, **params)
    flash = bool(params.get("flash_attn", False))
    tol = tolerance_for(
        str(params.get("type_k", "f32")), str(params.get("type_v", "f32")), model, flash
    )
    try:
        yield Session(model, mem, n_seq_max=6, n_ubatch=int(params.get("n_ubatch", 512)),
                      flash_attn=flash, tol=tol, oracle=oracle)  # fmt: skip
    finally:
        mem.close()


def tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, TinyConfig().n_vocab, n).tolist()


def assert_parity(s: Session, min_checks: int) -> None:
    bad = [(r.label, r.seq_id, r.max_err) for r in s.failures]
    assert not bad, f"logits differ from the oracle by more than {s.tol}: {bad}"
    assert len(s.results) >= min_checks
    s.expect_positions()


def holders(s: Session) -> set[int]:
    """Sequence ids holding at least one cell, over every memory part."""
    out: set[int] = set()
    for part in usage(s.memory):
        out |= {int(v) for v in np.unique(part.owners) if v >= 0}
    return out


def is_recurrent(memory_type: str) -> bool:
    return "R" in TinyConfig.preset(memory_type).layers


# --- serving: prompts, continuous batching, fork, finish, keep ------------------------------


def run_serving(s: Session, rng: np.random.Generator, unified: bool = True) -> None:
    s.decode({0: tokens(rng, 7), 1: tokens(rng, 3), 2: tokens(rng, 5)}, "prompts")
    for _ in range(2):
        s.decode({q: tokens(rng, 1) for q in s.histories}, "step")
    s.decode({0: tokens(rng, 1), 1: tokens(rng, 1), 2: tokens(rng, 1), 3: tokens(rng, 4)}, "join 3")
    s.finish(1)
    assert 1 not in holders(s)
    s.decode({q: tokens(rng, 1) for q in s.histories}, "step")
    s.fork(0, 4)
    out = s.decode(
        {0: tokens(rng, 1), 4: tokens(rng, 1), 2: tokens(rng, 1), 3: tokens(rng, 1)}, "branches"
    )
    s.decode({0: tokens(rng, 2), 4: tokens(rng, 3)}, "branches")
    assert not np.allclose(out[0], out[4])  # the branches really differ
    s.keep(4)
    if unified:
        assert holders(s) == {4}
    else:  # the reference's seq_keep clears only the kept sequence's own stream
        assert 4 in holders(s) and s.memory.seq_pos_max(4) >= 0
    s.decode({4: tokens(rng, 1), 5: tokens(rng, 3)}, "join 5 after keep")
    s.decode({4: tokens(rng, 1), 5: tokens(rng, 1)}, "step")


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
@pytest.mark.parametrize("attn", ["soft_max_v_trans", "flash_attn"])
def test_serving_matches_oracle(device: str, memory_type: str, attn: str) -> None:
    with session(device, memory_type, flash_attn=attn == "flash_attn") as s:
        run_serving(s, np.random.default_rng(1))
        assert_parity(s, min_checks=20)


@pytest.mark.parametrize("memory_type", ["kv", "hybrid_iswa"])
def test_serving_one_stream_per_sequence(device: str, memory_type: str) -> None:
    # non-unified: each sequence its own stream; seq_cp copies a whole stream at the next update
    with session(device, memory_type, kv_unified=False) as s:
        run_serving(s, np.random.default_rng(2), unified=False)
        assert_parity(s, min_checks=20)


@pytest.mark.parametrize("memory_type", ["kv", "hybrid_iswa"])
def test_serving_small_ubatches(device: str, memory_type: str) -> None:
    # n_ubatch 4: prompts spread over several ubatches, each placed and computed in turn
    with session(device, memory_type, n_ubatch=4) as s:
        run_serving(s, np.random.default_rng(3))
        assert s.decoder.stats.steps[0].n_ubatches > 3
        assert_parity(s, min_checks=20)


# --- quantised and half-precision caches ----------------------------------------------------


@pytest.mark.parametrize("memory_type", ["kv", "hybrid_iswa"])
@pytest.mark.parametrize(
    ("cache", "attn"), [("f16", "soft_max"), ("f16", "flash"), ("q8_0", "flash")]
)
def test_cache_types_within_stated_tolerance(
    device: str, memory_type: str, cache: str, attn: str
) -> None:
    # q8_0 V needs V by rows (flash attention); K-shift of a q8_0 K goes through f32 and back
    with session(device, memory_type, type_k=cache, type_v=cache, flash_attn=attn == "flash") as s:
        rng = np.random.default_rng(4)
        run_serving(s, rng)
        s.decode({4: tokens(rng, 9)}, "long")
        s.context_shift(4, 3, 7)
        s.decode({4: tokens(rng, 2), 5: tokens(rng, 1)}, "after shift")
        assert_parity(s, min_checks=20)
        assert s.max_err > 1e-5  # the cache really is lossy: the test compares something


# --- rollback -------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_rollback_within_snapshots_and_refusal_beyond(device: str, memory_type: str) -> None:
    recurrent = is_recurrent(memory_type)
    with session(device, memory_type) as s:
        rng = np.random.default_rng(5)
        s.decode({0: tokens(rng, 6), 1: tokens(rng, 4)}, "prompts")
        # speculative step: 3 drafted tokens per sequence in one ubatch, 2 of seq 0 rejected
        s.decode({0: tokens(rng, 3), 1: tokens(rng, 3)}, "drafts")
        assert s.rollback(0, N_RS_SEQ)
        s.decode({0: tokens(rng, 1), 1: tokens(rng, 1)}, "after rollback")
        # beyond the snapshots: recurrent state cannot go back that far, attention can
        s.decode({0: tokens(rng, N_RS_SEQ + 1)}, "drafts")
        assert s.rollback(0, N_RS_SEQ + 1) is (not recurrent)
        s.decode({0: tokens(rng, 1)}, "after refusal" if recurrent else "after rollback")
        # a snapshot is single-use: a second rollback before the next decode is refused
        s.decode({1: tokens(rng, 3)}, "drafts")
        assert s.rollback(1, 1)
        assert s.rollback(1, 1) is (not recurrent)
        s.decode({0: tokens(rng, 1), 1: tokens(rng, 2)}, "after")
        assert_parity(s, min_checks=11)


# --- context shift ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory_type", "unified"),
    [*((m, True) for m in MEMORY_TYPES), ("kv", False), ("hybrid_iswa", False)],
)
def test_context_shift_matches_oracle_on_shifted_positions(
    device: str, memory_type: str, unified: bool
) -> None:
    with session(device, memory_type, kv_unified=unified) as s:
        assert s.memory.get_can_shift()
        rng = np.random.default_rng(6)
        s.decode({0: tokens(rng, 12), 1: tokens(rng, 5)}, "prompts")
        s.decode({0: tokens(rng, 1), 1: tokens(rng, 1)}, "step")
        # drop positions [3, 8) of seq 0 and move 8.. back to 3..: the K-shift runs at the
        # next decode; seq 1 is untouched
        s.context_shift(0, 3, 8)
        assert s.memory.seq_pos_max(0) == 12 - 5  # positions 0..12, five dropped
        s.decode({0: tokens(rng, 1), 1: tokens(rng, 1)}, "after shift")
        s.decode({0: tokens(rng, 3)}, "after shift")
        s.context_shift(0, 0, 2)  # the start of the sequence too
        s.decode({0: tokens(rng, 2), 1: tokens(rng, 1)}, "after shift")
        assert_parity(s, min_checks=8)


def test_iswa_without_swa_full_cannot_shift(device: str) -> None:
    # the SWA cache is then smaller than the base cache: get_can_shift is False, as in the reference
    mem = _memory(device, "iswa", swa_full=False, n_ctx=1024)
    try:
        assert not mem.get_can_shift()
    finally:
        mem.close()


# --- save / restore ---------------------------------------------------------------------------


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_save_restore_into_another_memory_and_seq_id(
    device: str, memory_type: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    with session(device, memory_type) as s, session(device, memory_type) as other:
        s.decode({0: tokens(rng, 6), 1: tokens(rng, 4)}, "prompts")
        s.decode({0: tokens(rng, 1), 1: tokens(rng, 1)}, "step")
        blob = s.save(0)
        path = tmp_path / "seq1.state"
        n_file = s.save(1, path)
        assert isinstance(blob, (bytes, bytearray)) and n_file == path.stat().st_size

        # another memory: seq 0's state as seq 3, seq 1's from the file as seq 1
        assert other.restore(blob, 3, s.histories[0]) == len(blob)
        assert other.restore(path, 1, s.histories[1]) == n_file
        assert other.save(1) == path.read_bytes()  # same sequence id, same bytes
        other.decode({3: tokens(rng, 2), 1: tokens(rng, 1)}, "restored")
        other.decode({3: tokens(rng, 1), 1: tokens(rng, 1), 0: tokens(rng, 3)}, "restored + new")
        assert_parity(other, min_checks=5)

        # the same memory, another seq id: a copy through the state format
        s.restore(blob, 2, s.histories[0])
        s.decode({2: tokens(rng, 2), 0: tokens(rng, 1), 1: tokens(rng, 1)}, "copy")
        assert_parity(s, min_checks=7)
