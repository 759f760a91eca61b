"""``python -m pymem demo`` runs in-process with small options, passes, and says so."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pymem.__main__ import main
from pymem.runtime.demo import DemoOptions, run


def test_demo_command_line_passes_and_prints_summary(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--device", device, "--steps", "16", "--n-seq-max", "6", "--no-png"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "HybridISWAMemory (hybrid_iswa)" in out
    for part in ("attention", "swa", "recurrent"):
        assert f"  {part} " in out  # one summary row per memory part
    assert "bytes per device" in out and f"{device}:" in out
    assert "bookkeeping per decode call" in out
    assert "rollback of 2 drafted tokens (n_rs_seq 2): done" in out
    assert "rollback of 3 tokens (> n_rs_seq): refused" in out
    assert "context shift of seq 3" in out
    assert "save/restore: seq 0 -> file" in out
    assert "parity vs full numpy recompute: PASS" in out


@pytest.mark.parametrize("memory_type", ["kv", "recurrent"])
def test_demo_other_memory_types(device: str, memory_type: str) -> None:
    out = io.StringIO()
    result = run(DemoOptions(memory_type=memory_type, device=device, steps=16, png=None), out=out)
    assert result.ok, out.getvalue()
    assert result.n_checks > 40 and result.max_err <= result.tol
    # attention alone can roll back any number of tokens; recurrent state only n_rs_seq
    expect = "done" if memory_type == "kv" else "refused"
    assert f"rollback of 3 tokens (> n_rs_seq): {expect}" in out.getvalue()


def test_demo_fails_when_parity_fails(device: str, capsys: pytest.CaptureFixture[str]) -> None:
    # a q8_0 cache is lossy (errors ~0.04): held to 1e-3 the demo must report FAIL and exit 1
    code = main(["demo", "--device", device, "--steps", "6", "--type-k", "q8_0", "--type-v", "q8_0",
                 "--flash-attn", "--tolerance", "1e-3", "--no-png"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "parity vs full numpy recompute: FAIL" in out and "FAILED:" in out


def test_demo_writes_occupancy_png(device: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the PNG needs matplotlib (pip install pymem[demo])")
    png = tmp_path / "occupancy.png"
    out = io.StringIO()
    result = run(DemoOptions(device=device, steps=8, png=str(png)), out=out)
    assert result.ok and result.png == str(png)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"cache occupancy plot: {png}" in out.getvalue()
