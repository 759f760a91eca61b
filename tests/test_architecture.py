"""The package's layers (docs/architecture.md) hold, and the contract that says so bites.

pyproject.toml declares the layers as an import-linter contract: runtime > model-to-memory
(factory, gguf_spec) > compositions (hybrid) > kv | recurrent > core. These tests run
`lint-imports` on the package as it is (kept), then on a copy with one upward import
injected (broken), so a contract that stopped checking anything would fail here too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: the test extra installs import-linter")
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_package(dst: Path) -> Path:
    shutil.copytree(
        ROOT / "pymem", dst / "pymem", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def _layer_names() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"layers = \[(.*?)\]", text, re.S)
    assert block is not None, "pyproject.toml: no layers contract"
    names: set[str] = set()
    for entry in re.findall(r'"([^"]+)"', block.group(1)):
        names.update(n.strip() for n in re.split(r"[|:]", entry))
    return names


def test_layers_contract_is_kept() -> None:
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_every_module_is_in_a_layer() -> None:
    top = {p.stem for p in (ROOT / "pymem").glob("*.py") if p.stem != "__init__"}
    top |= {p.parent.name for p in (ROOT / "pymem").glob("*/__init__.py")}
    assert top == _layer_names(), "a module outside the layers contract is unchecked"


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("kv/cells.py", "pymem.hybrid"),  # a leaf memory reaching a composition
        ("memory.py", "pymem.kv"),  # the interface reaching an implementation
        ("recurrent/__init__.py", "pymem.kv"),  # kv and recurrent are independent
        ("hybrid.py", "pymem.runtime"),  # memory code reaching the runtime
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, module: str, upward: str) -> None:
    root = _copy_package(tmp_path)
    target = root / "pymem" / module
    target.write_text(target.read_text() + f"\nimport {upward}  # injected upward import\n")
    res = _lint(root)
    assert res.returncode != 0, res.stdout
    assert "BROKEN" in res.stdout
    importer = "pymem." + module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    assert f"{importer} -> {upward}" in res.stdout, res.stdout


# the modules a runtime may import before it has loaded its ggml (a session file's format,
# the state layer's readers and plans): ggml is bound on first native use, not by them
# (pymem/__init__.py; the binding picks the process's ggml, reference/packaging.md)
@pytest.mark.parametrize("module", ["pymem", "pymem.state", "pymem.sessions"])
def test_importing_the_format_layers_binds_no_ggml(module: str) -> None:
    code = f"import sys, {module}; print('pymem._native' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False", f"importing {module} loaded pymem._native"
