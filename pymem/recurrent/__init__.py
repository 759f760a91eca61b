"""Recurrent state memory (SSM, RWKV, short-conv layers): cells, slot search, rollback
planes, state I/O and the graph helpers (``llama_memory_recurrent``)."""

from __future__ import annotations

from pymem.recurrent.memory import (
    RecurrentCells,
    RecurrentMemory,
    RecurrentMemoryContext,
    RecurrentPlan,
    RSGraphInputs,
    build_rs,
    build_rs_inputs,
    rs_store_view,
)

__all__ = [
    "RSGraphInputs",
    "RecurrentCells",
    "RecurrentMemory",
    "RecurrentMemoryContext",
    "RecurrentPlan",
    "build_rs",
    "build_rs_inputs",
    "rs_store_view",
]
