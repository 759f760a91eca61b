"""Recurrent state memory (SSM, RWKV, short-conv layers): ``llama_memory_recurrent``.

Modules, one concern each (the explanatory notes live in :mod:`pymem.recurrent.memory`):

* :mod:`~pymem.recurrent.cells`: cell metadata, slot search, ``seq_rm``, ``s_copy`` (no tensors);
* :mod:`~pymem.recurrent.memory`: :class:`RecurrentMemory` and its batch plan;
* :mod:`~pymem.recurrent.context`: :class:`RecurrentMemoryContext`, one pass over a batch;
* :mod:`~pymem.recurrent.state_io`: state blobs, written and parsed in two phases;
* :mod:`~pymem.recurrent.graph`: the ggml graph helpers (``build_rs_inp`` / ``build_rs``).
"""

from __future__ import annotations

from pymem.recurrent.cells import RecurrentCells
from pymem.recurrent.context import RecurrentMemoryContext
from pymem.recurrent.graph import RSGraphInputs, build_rs, build_rs_inputs, rs_store_view
from pymem.recurrent.memory import RecurrentMemory, RecurrentPlan

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
