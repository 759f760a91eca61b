"""Attention-only architectures (dense and sliding-window): tiny models and their recorded runs.

``MODEL_WRITERS``: model file name -> writer (see models.py); ``RUNS``: the runs recorded
with them (record_llama_cpp.py adds both to its own).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from runconfig import RunConfig

MODEL_WRITERS: dict[str, Callable[[Path], Path]] = {}
RUNS: list[RunConfig] = []
