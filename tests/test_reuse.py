"""Checkpoints and rollback plans (pymem.reuse) are exact: the logits after going back
equal a decode that never went forward.

Each case decodes a 24-token prompt in chunks of 8 with a checkpoint after each chunk, asks
for the cheapest exact way back to position 13, carries it out, decodes what the plan says
to decode again, then one more token; a fresh memory decodes the same tokens in the same
chunks (so every kernel sees the same batch shapes) and must give bit-identical logits.
The GGUF engine computes both with llama.cpp's graphs over pymem's memory.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pymem
from pymem.batch import Batch, BatchAllocator
from pymem.errors import ConfigError, RangeError, StateError
from pymem.factory import ContextParams, create_memory
from pymem.memory import Memory
from pymem.reuse import (
    apply_rollback,
    checkpoint,
    needs_checkpoints,
    plan_rollback,
    restore_checkpoint,
    window_start,
)
from pymem.runtime.decoder import Decoder
from pymem.runtime.gguf_llama import GGUFModel
from pymem.spec import SWAType, masked_swa

MODELS = Path(__file__).parent / "data" / "models"
PROMPT = [(5 * i + 2) % 60 + 1 for i in range(24)]
CHUNK = 8
BACK_TO = 13
NEXT = 11

# model -> (context parameters, the plan expected for going back to BACK_TO)
CASES: dict[str, tuple[dict[str, Any], str, int]] = {
    "tiny-llama.gguf": (dict(flash_attn=False), "trim", 13),
    "tiny-gemma2.gguf": (dict(flash_attn=True, swa_full=False), "trim", 13),  # window kept
    "tiny-mamba.gguf": (dict(), "checkpoint", 8),
    "tiny-jamba.gguf": (dict(flash_attn=False), "checkpoint", 8),
    "tiny-lfm2.gguf": (dict(flash_attn=True), "checkpoint", 8),
    "tiny-lfm2-swa.gguf": (dict(flash_attn=False, swa_full=False), "checkpoint", 8),
}


def _memory(model: str, **over: Any) -> Memory:
    kw = dict(n_ctx=256, n_seq_max=2, n_batch=64, n_ubatch=64, kv_unified=True)
    kw.update(CASES[model][0])
    kw.update(over)
    mem = create_memory(pymem.spec_from_gguf(MODELS / model), ContextParams(**kw))
    assert mem is not None
    return mem


def _decode(engine: GGUFModel, mem: Memory, toks: list[int], p0: int, seq: int, fa: bool) -> np.ndarray:  # fmt: skip
    """Decode ``toks`` at positions ``p0..`` of ``seq``; the last token's logits."""
    items = [(t, p0 + i, [seq], i == len(toks) - 1) for i, t in enumerate(toks)]
    dec = Decoder(engine, mem, n_seq_max=2, n_ubatch=64, flash_attn=fa)
    return dec.decode(Batch.from_items(items))[-1]


@pytest.fixture(scope="module")
def engines():
    cache: dict[str, GGUFModel] = {}
    yield lambda model: cache.setdefault(model, GGUFModel(MODELS / model))
    for e in cache.values():
        e.close()


@pytest.mark.parametrize("model", list(CASES))
def test_rollback_plans_are_exact(model: str, engines) -> None:
    engine = engines(model)
    fa = bool(CASES[model][0].get("flash_attn", False))
    want_kind, want_resume = CASES[model][1], CASES[model][2]
    with _memory(model) as mem, _memory(model) as fresh:
        ckpts = []
        for c0 in range(0, len(PROMPT), CHUNK):
            _decode(engine, mem, PROMPT[c0 : c0 + CHUNK], c0, 0, fa)
            if needs_checkpoints(mem):
                ckpts.append(checkpoint(mem, 0))
        plan = plan_rollback(mem, 0, BACK_TO, ckpts)
        assert (plan.kind, plan.resume_from) == (want_kind, want_resume), plan.reason
        assert plan.n_replay == BACK_TO - want_resume
        resume = apply_rollback(mem, plan)
        assert resume == want_resume and mem.seq_pos_max(0) == resume - 1
        if resume < BACK_TO:
            _decode(engine, mem, PROMPT[resume:BACK_TO], resume, 0, fa)
        got = _decode(engine, mem, [NEXT], BACK_TO, 0, fa)

        # the same tokens in the chunks this memory saw them in, never past BACK_TO
        cuts = sorted({0, *range(CHUNK, BACK_TO, CHUNK), resume, BACK_TO})
        for a, b in itertools.pairwise(cuts):
            _decode(engine, fresh, PROMPT[a:b], a, 0, fa)
        want = _decode(engine, fresh, [NEXT], BACK_TO, 0, fa)
    if plan.kind == "trim":
        # K/V of 8..12 were computed in the 8..15 chunk here, in 8..12 there: kernels may
        # round the last bit differently for another batch shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    else:
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_snapshot_plane_is_the_plan_when_it_reaches() -> None:
    # lfm2 supports rollback planes: a 4-token ubatch, then going back 2 needs no replay
    with _memory("tiny-lfm2.gguf", n_rs_seq=3) as mem:
        balloc = BatchAllocator()
        balloc.init(
            Batch.from_items([(1, p, [0], p == 3) for p in range(4)]), memory=mem, n_seq_max=2
        )
        ctx = mem.init_batch(balloc, 64, False)
        ctx.apply()
        plan = plan_rollback(mem, 0, 2)
        assert (plan.kind, plan.n_replay) == ("snapshot", 0)
        assert plan_rollback(mem, 0, 0).kind == "recompute"
        far = plan_rollback(mem, 0, 1)  # 3 tokens back: the planes of a 4-token ubatch reach 3
        assert far.kind == "snapshot"
        assert apply_rollback(mem, plan) == 2 and mem.seq_pos_max(0) == 1
        # a second rollback before the next decode: the plane is spent
        again = plan_rollback(mem, 0, 1)
        assert again.kind == "recompute" and "reach back 0" in again.reason


def test_plans_change_nothing_and_explain_themselves() -> None:
    with _memory("tiny-jamba.gguf") as mem:
        balloc = BatchAllocator()
        balloc.init(
            Batch.from_items([(1, p, [0], False) for p in range(10)]), memory=mem, n_seq_max=2
        )
        ctx = mem.init_batch(balloc, 64, False)
        ctx.apply()
        before = mem.state_write()
        plan = plan_rollback(mem, 0, 5)
        assert plan.kind == "recompute" and "no checkpoint" in plan.reason
        assert plan_rollback(mem, 0, 10).kind == "none"
        assert mem.state_write() == before
        with pytest.raises(RangeError):
            plan_rollback(mem, 0, -1)


def test_restore_refuses_what_it_cannot_do_exactly() -> None:
    with _memory("tiny-jamba.gguf") as mem, _memory("tiny-jamba.gguf", n_ctx=512) as other:
        balloc = BatchAllocator()
        balloc.init(
            Batch.from_items([(1, p, [0], False) for p in range(10)]), memory=mem, n_seq_max=2
        )
        ctx = mem.init_batch(balloc, 64, False)
        ctx.apply()
        ck = checkpoint(mem, 0)
        with pytest.raises(StateError, match="laid out"):
            restore_checkpoint(other, 0, ck)
        mem.get_mem_attn().seq_rm(0, 5, -1)  # the attention cells no longer reach pos 9
        before = mem.state_write()
        with pytest.raises(StateError, match="end at 4"):
            restore_checkpoint(mem, 0, ck)
        assert mem.state_write() == before
        with pytest.raises(RangeError):
            checkpoint(mem, 1)  # an empty sequence


def test_window_start_follows_the_swa_rule() -> None:
    assert window_start(SWAType.STANDARD, 4, 10) == 7
    assert window_start(SWAType.CHUNKED, 4, 10) == 8
    assert window_start(SWAType.SYMMETRIC, 4, 10) == 8
    assert window_start(SWAType.STANDARD, 8, 3) == 0
    assert window_start(SWAType.NONE, 0, 10) == 0


@pytest.mark.parametrize("swa_type", [SWAType.STANDARD, SWAType.CHUNKED, SWAType.SYMMETRIC])
def test_window_start_is_the_first_position_masked_swa_shows(swa_type: SWAType) -> None:
    # window_start is arithmetic; masked_swa is the one definition of the rule: every
    # position before the start is masked, the start and everything after it visible
    for n_swa in range(1, 10):
        for pos in range(0, 41):
            start = window_start(swa_type, n_swa, pos)
            visible = ~masked_swa(n_swa, swa_type, np.arange(pos + 1), pos)
            assert 0 <= start <= pos and visible[start:].all(), (n_swa, pos)
            assert not visible[:start].any(), (n_swa, pos)
    with pytest.raises(ConfigError, match="swa_type"):
        window_start(7, 4, 10)  # type: ignore[arg-type]


def test_a_window_that_moved_on_needs_a_checkpoint(engines) -> None:
    # 300 tokens through a 256-cell SWA cache (window 8): the cells of early positions
    # were reused, so going back to 40 cannot trim; the checkpoint at 31 is the way back
    model, fa = "tiny-gemma2.gguf", True
    prompt = [(3 * i + 1) % 60 + 1 for i in range(300)]
    engine = engines(model)
    with _memory(model, n_ctx=512) as mem, _memory(model, n_ctx=512) as fresh:
        swa = mem.get_swa()
        ckpts = []
        for c0 in range(0, 300, 16):
            _decode(engine, mem, prompt[c0 : c0 + 16], c0, 0, fa)
            ckpts.append(checkpoint(mem, 0))
        assert swa.seq_pos_min(0) > window_start(swa.swa_type, swa.n_swa, 40)
        assert plan_rollback(mem, 0, 290).kind == "trim"  # the window of 290 is still there
        plan = plan_rollback(mem, 0, 40, ckpts)
        assert (plan.kind, plan.resume_from, plan.n_replay) == ("checkpoint", 32, 8), plan.reason
        assert "window" in plan.reason
        assert apply_rollback(mem, plan) == 32
        _decode(engine, mem, prompt[32:40], 32, 0, fa)
        got = _decode(engine, mem, [NEXT], 40, 0, fa)
        for c0 in (0, 16):
            _decode(engine, fresh, prompt[c0 : c0 + 16], c0, 0, fa)
        _decode(engine, fresh, prompt[32:40], 32, 0, fa)
        want = _decode(engine, fresh, [NEXT], 40, 0, fa)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_checkpoint_names_do_not_clash() -> None:
    # pymem.reuse.checkpoint used to be both a submodule and the function it re-exports:
    # `import pymem.reuse.checkpoint` then shadowed the function with the module
    import importlib

    import pymem.reuse as reuse

    module = importlib.import_module("pymem.reuse.checkpoints")
    assert callable(reuse.checkpoint) and reuse.checkpoint is module.checkpoint
    assert reuse.restore_checkpoint is module.restore_checkpoint
