"""benchmarks/bench_guard.py, the regression guard: its child run times every case on
this checkout (a smoke run: each case runs, each time is a positive number, and the
sequence ops left the memories as the cases expect), and its comparison marks what it
should."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from bench_modules import load_benchmark

GUARD = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_guard.py"


def _guard() -> ModuleType:
    return load_benchmark("bench_guard")


def test_child_run_times_every_case() -> None:
    """The child's quick run on this checkout, in a fresh process as the guard runs it:
    one JSON line of every hot-path case (decode steps, state calls, ops), none missing."""
    env = dict(os.environ, PYTHONPATH=str(GUARD.parent.parent))
    done = subprocess.run([sys.executable, str(GUARD), "--child", "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cases = json.loads(done.stdout.strip().splitlines()[-1])
    for model in ("llama", "jamba", "gemma2"):
        for layout in ("unified", "streams"):
            assert f"decode {model} {layout}" in cases
    assert "decode llama unified forked" in cases
    for tag in ("llama", "llama fa", "jamba", "gemma2"):
        for call in ("whole write", "whole read", "whole read cleared", "seq write",
                     "seq read", "seq swap-in"):  # fmt: skip
            assert f"state {tag} {call}" in cases
        assert f"state {tag} forked whole read" in cases
    assert len(cases) >= 49
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in cases.values())


def test_compare_marks_slower_and_faster() -> None:
    guard = _guard()
    old = [{"a": 10.0, "b": 10.0, "c": 10.0, "gone": 1.0} for _ in range(3)]
    new = [{"a": 12.0, "b": 8.0, "c": 10.5, "new": 1.0}, {"a": 13.0, "b": 8.0, "c": 10.4,
           "new": 1.0}, {"a": 11.0, "b": 8.5, "c": 10.6, "new": 1.0}]  # fmt: skip
    rows, result, slower = guard.compare_runs(old, new, 1.15)
    assert slower == ["a"]  # median 12 / 10 = 1.2
    assert [r[0] for r in rows] == ["a", "b", "c"]  # cases only one build has: left out
    assert [r[-1] for r in rows] == ["SLOWER", "faster", ""]  # b: 8 / 10 < 1 / 1.15
    assert result["a"] == pytest.approx({"against_us": 10.0, "now_us": 12.0, "ratio": 1.2})
    assert result["c"]["ratio"] == pytest.approx(1.05)
