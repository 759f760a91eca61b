"""benchmarks/state_verdict.py, issue 14's state target as a rule: a row side is met at
0.8 of a copy, else bound only where the least of its geometry's call is below 0.8 and
pymem is 2x llama.cpp or more; each shortfall is named."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_modules import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "state_verdict.py"


def _module() -> ModuleType:
    return load_benchmark("state_verdict")


def _state(blob: str, write: float, read: float, llama: float = 1.0) -> dict:
    """A state row: pymem's write / read GB/s against a 10 GB/s copy, llama.cpp at
    ``llama`` GB/s both ways."""
    return dict(model="llama", v_trans=True, blob=blob, numpy_copy_gbs=10.0,
                pymem_write_buffer_gbs=write, pymem_read_gbs=read,
                llama_cpp_write_gbs=llama, llama_cpp_read_gbs=llama)  # fmt: skip


def _bound(call: str, least: float) -> dict:
    return dict(model="tiny-llama", v_trans=True, call=call, least_vs_copy=least,
                bound=least < 0.8)  # fmt: skip


def _by_side(rows: list[dict]) -> dict[str, tuple[str, str]]:
    return {r["side"]: (r["verdict"], r["why"]) for r in rows}


def test_met_bound_and_each_shortfall_named() -> None:
    mod = _module()
    bounds = [_bound("one sequence, write", 0.7), _bound("one sequence, swapped in", 0.85)]
    # write at 0.8 of the copy: met whatever its bound; read 0.7 with an unbound least
    rows = _by_side(mod.verdicts([_state("one sequence, swapped in", 8.0, 7.0)], bounds))
    assert rows == {"write": ("met", ""), "read": ("not met", "not bound (least 0.85)")}
    # write 0.75: bound (least 0.70) at 7.5x llama.cpp, but not at 1.5x
    assert _by_side(mod.verdicts([_state("one sequence, swapped in", 7.5, 9.0)], bounds))[
        "write"
    ] == ("bound", "least 0.70")
    slow = _by_side(mod.verdicts([_state("one sequence, swapped in", 7.5, 9.0, llama=5.0)], bounds))
    assert slow["write"] == ("not met", "bound, but 1.5x llama.cpp")
    # a row whose bound call the layout-bound run lacks (a restore that changes cells, here)
    other = _by_side(mod.verdicts([_state("whole state, another one", 9.0, 7.9)], bounds))
    assert other["read"] == ("not met", "no bound measured for its geometry")
    assert _by_side(mod.verdicts([_state("whole state", 7.0, 9.0)], bounds))["write"] == (
        "not met",
        "no bound measured for its geometry",
    )
    with pytest.raises(ValueError, match="'a new kind of row'"):
        mod.verdicts([_state("a new kind of row", 9.0, 9.0)], bounds)


def test_every_state_row_of_the_benchmark_has_its_bound_calls() -> None:
    """The rows bench_vs_llama_cpp writes and the calls bench_layout_bound measures are
    the ones the rule maps (a renamed row or call would leave a row without its bound)."""
    mod = _module()
    bench = (SCRIPT.parent / "bench_vs_llama_cpp.py").read_text()
    bound = (SCRIPT.parent / "bench_layout_bound.py").read_text()
    for blob, calls in mod.BOUND_CALLS.items():
        assert f'("{blob}", ' in bench, blob
        for call in calls:
            assert call is None or f'("{call}", ' in bound, call


def test_main_judges_each_run_and_sums_up(tmp_path: Path, capsys) -> None:
    mod = _module()
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"state": [_state("one sequence", 9.0, 7.0)]}))
    bound = tmp_path / "bound.json"
    bound.write_text(json.dumps({"rows": [_bound("one sequence, read", 0.6)]}))
    assert mod.main([str(state), str(state), "--bound", str(bound)]) == 0
    out = capsys.readouterr().out
    assert out.count("1 met, 1 bound, 0 not met") == 2
    assert "not met in some run: 0 of the rows (2 run(s))" in out
