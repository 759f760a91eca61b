"""The benchmark scripts (benchmarks/*.py) as modules, for the tests of their logic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py loaded as a fresh module (the directory is not a package), as
    running it sees itself: its siblings importable (``_util``), and the module in
    sys.modules while it runs (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no benchmark script {name!r} in {BENCHMARKS}")
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod
