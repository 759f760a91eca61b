"""What the GGUF engine needs to know to build one architecture's graph.

Why: each family's graph lives in its own module (``graph_*.py``, a mixin of the
engine's graph builder) and registers an :class:`ArchGraph` per architecture; the engine
(:mod:`pymem.runtime.gguf_llama`) merges the tables. The float32 helpers make Python
floats round the way the reference's C ``float`` arithmetic does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ArchGraph:
    """How the engine builds one architecture's graph (``llama_model_<arch>::graph``).

    ``build(g, inp, out_ids)``: token embeddings -> the hidden state of the output rows,
    before the output norm; ``output_norm``: that norm's tensor (None: ``build`` applies
    the output norm itself and returns its output rows); ``finish(g, logits)``:
    what the reference does to the logits after ``output`` (soft-capping, scaling), or
    None.
    """

    build: Callable[[Any, Any, Any], Any]
    output_norm: str | None = "output_norm.weight"
    finish: Callable[[Any, Any], Any] | None = None


def f32_div(a: float, b: float) -> float:
    """``a / b`` computed in float32, as C computes ``1.0f / x``."""
    return float(np.float32(a) / np.float32(b))


def f32(x: float) -> float:
    """``x`` rounded to float32 (what a C ``float`` parameter receives)."""
    return float(np.float32(x))
