"""The README's API tour runs as written (CI also runs it in a venv with no extras)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_tour_runs(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_tour.py"), str(ROOT / "README.md")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "README API tour: ok" in res.stdout
