"""A tiny hybrid decoder (attention, sliding-window attention, Mamba-2) with random
weights, its ggml graph over pymem's memory, and an independent numpy oracle.

Used by the end-to-end tests and ``python -m pymem demo`` to show that a real model
decoding through pymem gives the same logits as a full recompute.
"""

from pymem.runtime.config import PRESETS, TinyConfig
from pymem.runtime.graph import AttentionInputs, RecurrentInputs, StepInputs, TinyModel
from pymem.runtime.oracle import Oracle
from pymem.runtime.weights import TinyWeights

__all__ = [
    "PRESETS",
    "AttentionInputs",
    "Oracle",
    "RecurrentInputs",
    "StepInputs",
    "TinyConfig",
    "TinyModel",
    "TinyWeights",
]
