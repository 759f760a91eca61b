"""Every recorded llama.cpp run replays through pymem with the same cells, results and bytes.

The runs in tests/data/runs (and any directory named by ``PYMEM_REPLAY_RUNS``) are
replayed generically by tests/replay.py: the memory is built by the factory from the
run's model and context parameters, and after every step the results, positions, state
sizes and state blobs must equal the reference's.
"""

from __future__ import annotations

import pytest
from replay import Run, build_memory, replay, run_files

RUNS = run_files()


def test_recorded_runs_are_present() -> None:
    names = {p.stem for p in RUNS}
    assert {"llama.main.fa0.u1", "mamba.main.u1", "jamba.main.fa1.u0"} <= names
    # tests/record/record_llama_cpp.py: iSWA, hybrid-iSWA, streams, rollback, q8_0, full caches
    assert {
        "gemma2.main.fa0.u1",
        "gemma2.main.fa1.u0",
        "lfm2-swa.noshift.fa0.u1",
        "lfm2.rollback.fa1.u1",
        "llama-e8.main.fa1.u0",
        "llama.noshift-q8_0.fa1.u1",
        "gemma2-e8.fill.fa0.u1",
        "mamba.ops.u1",
        "lfm2-swa.checkpoint.fa0.u0",
    } <= names


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_replay_matches_reference(path) -> None:
    run = Run.load(path)
    mem = build_memory(run)
    try:
        report = replay(run, mem)
    finally:
        mem.close()
    assert report.steps == len(run.data["steps"])
    # most steps record every blob; a run that recorded none would prove nothing
    assert report.blobs_compared >= report.steps
