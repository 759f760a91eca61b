"""Stateful property tests: pymem and the executable spec (tests/spec) side by side.

For each of the five memory types, hypothesis draws a configuration (unified or one
stream per sequence, SWA kinds and windows, n_seq_max up to 64, kv_size down to 4 cells
so that eviction and "no slot" failures happen, n_rs_seq 0..3, K/V types and V layouts)
and then a program of random steps: batches (valid continuations, gaps, restarts,
coupled sequences, bad ids; split by each memory's splitter; placed, applied and
"computed" with synthetic bytes), every sequence operation, state_write/state_read of
single sequences and of the whole memory (partial-only too), clear, pymem.reuse
checkpoints / restores / rollback plans, and the prefix cache (requests served, attached,
looked up; stored entries restored; small RAM budgets so that entries are evicted, a disk
tier or none) against the contract model of tests/spec/prefix.py. After every
step the harness (tests/spec/harness.py) compares op results and error kinds, cell
placement, heads, pending shifts, recurrent cell metadata, pos_min/pos_max of every
sequence, graph inputs of every ubatch (slot cells, K/V row indices, KQ masks,
recurrent head/n_rs/rs_z/s_copy) and the state bytes (whole, per sequence, partial).

Budget: the default run spends about two minutes here (``PYMEM_PROPERTY_SCALE`` scales
the number of examples). ``-m soak`` with ``PYMEM_SOAK_SECONDS=N`` runs seeded random
programs for N seconds per memory type and prints steps per second.

Failures found so far are pinned in tests/test_property_regressions.py.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from spec.gen import HypoRnd, PyRnd, random_config, random_step
from spec.harness import KINDS, Mismatch, Pair, Stats

SCALE = float(os.environ.get("PYMEM_PROPERTY_SCALE", "1"))

# (examples, steps per example): about 20-25 s per memory type on the 2-core CI machine
BUDGET = {
    "kv": (55, 30),
    "iswa": (60, 30),
    "recurrent": (100, 30),
    "hybrid": (60, 30),
    "hybrid_iswa": (36, 30),
}

STATS: dict[str, Stats] = {k: Stats() for k in KINDS}


def machine_for(kind: str) -> type[RuleBasedStateMachine]:
    class MemoryMachine(RuleBasedStateMachine):
        pair: Pair | None = None

        @initialize(data=st.data())
        def setup(self, data: st.DataObject) -> None:
            cfg = random_config(kind, HypoRnd(data))
            self.pair = Pair(cfg, check_seq_states=6)

        @rule(data=st.data())
        def step(self, data: st.DataObject) -> None:
            assert self.pair is not None
            random_step(self.pair, HypoRnd(data))

        def teardown(self) -> None:
            if self.pair is not None:
                self.pair.close()  # (adds the prefix cache's counters to its stats)
                STATS[kind].merge(self.pair.stats)

    MemoryMachine.__name__ = f"{kind}_machine"
    return MemoryMachine


@pytest.mark.parametrize("kind", KINDS)
def test_pymem_matches_spec(kind: str) -> None:
    examples, steps = BUDGET[kind]
    run_state_machine_as_test(
        machine_for(kind),
        settings=settings(
            max_examples=max(1, int(examples * SCALE)),
            stateful_step_count=steps,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        ),
    )
    stats = STATS[kind]
    # the programs must actually exercise the memory, not only fail validation
    assert stats.steps > examples * 5
    assert stats.outcomes.get("decode:ok", 0) > examples
    ops = ("seq_rm", "seq_cp", "state_read", "state_write", "checkpoint", "rollback")
    for op in (*ops, "prefix_attach", "prefix_lookup"):
        assert stats.ops.get(op, 0) > 0, op
    # requests reuse something, not only recompute; budgets are small enough to evict
    assert any(k.startswith("prefix_attach:") and "recompute" not in k for k in stats.outcomes)
    assert stats.outcomes.get("prefix_cache:evicted", 0) > 0


def run_programs(kind: str, seconds: float, seed0: int = 0, steps: int = 40) -> tuple[Stats, int]:
    """Seeded random programs for ``seconds``; returns the merged stats and program count."""
    total = Stats()
    t0 = time.monotonic()
    seed = seed0
    while time.monotonic() - t0 < seconds:
        seed += 1
        r = PyRnd(random.Random(f"{kind}-{seed}"))
        pair = Pair(random_config(kind, r), check_seq_states=6)
        try:
            for _ in range(steps):
                random_step(pair, r)
        except Mismatch as e:
            raise Mismatch(f"soak seed {kind}-{seed}: {e}") from None
        finally:
            pair.close()
            total.merge(pair.stats)
    return total, seed - seed0


@pytest.mark.soak
@pytest.mark.parametrize("kind", KINDS)
def test_soak(kind: str) -> None:
    seconds = float(os.environ.get("PYMEM_SOAK_SECONDS", "1"))
    seed0 = int(os.environ.get("PYMEM_SOAK_SEED", "100000"))
    t0 = time.monotonic()
    stats, programs = run_programs(kind, seconds, seed0)
    dt = time.monotonic() - t0
    print(
        f"\nsoak {kind}: {programs} programs, {stats.steps} steps in {dt:.1f} s "
        f"= {stats.steps / dt:.0f} steps/s"
    )
    assert stats.steps > 0
