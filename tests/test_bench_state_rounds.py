"""benchmarks/bench_vs_llama_cpp.py's state rounds: each figure of a row the median over
the runs, the rest the first run's; runs whose rows do not match are refused, and so is
a ``--rounds`` that would run no round."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="the coexist extra (llama-cpp-python) is not installed")
from bench_modules import load_benchmark


def _row(blob: str, write: float, copy: float) -> dict:
    return dict(v_trans=True, blob=blob, pymem_bytes=100, pymem_write_gbs=write,
                numpy_copy_gbs=copy)  # fmt: skip


def test_rows_of_several_runs_keep_each_figures_median() -> None:
    bench = load_benchmark("bench_vs_llama_cpp")
    runs = [[_row("one sequence", 1.0, 9.0), _row("whole state", 4.0, 1.0)],
            [_row("one sequence", 3.0, 7.0), _row("whole state", 6.0, 2.0)],
            [_row("one sequence", 2.0, 8.0), _row("whole state", 5.0, 9.0)]]  # fmt: skip
    merged = bench.median_rows(runs)
    assert [
        (r["blob"], r["pymem_write_gbs"], r["numpy_copy_gbs"], r["rounds"]) for r in merged
    ] == [
        ("one sequence", 2.0, 8.0, 3),
        ("whole state", 5.0, 2.0, 3),
    ]
    assert merged[0]["pymem_bytes"] == 100  # (not a figure: the first run's)
    assert bench.median_rows(runs[:1])[0]["rounds"] == 1
    with pytest.raises(ValueError, match="differ"):
        bench.median_rows([runs[0], runs[1][::-1]])


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_rounds_must_be_a_count(value: str, capsys) -> None:
    bench = load_benchmark("bench_vs_llama_cpp")
    assert bench.parse_args(["--rounds", "3"]).rounds == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", value])
    assert f"--rounds takes a count >= 1, got {value!r}" in capsys.readouterr().err
