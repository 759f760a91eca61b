"""pymem: inference memory for hybrid language models on ggml.

The KV cache, the iSWA KV cache, recurrent (SSM) state memory and their hybrid
compositions, with llama.cpp's placement, sequence-op results and state bytes.

Importing :mod:`pymem` is cheap: ggml is bound on first use of a native feature
(:func:`ggml_info`, :func:`devices`, :class:`TensorStore`, memories).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ggml_info": "pymem._native",
    "GGMLInfo": "pymem._native",
    "devices": "pymem.backend",
    "get_device": "pymem.backend",
    "add_rpc_device": "pymem.backend",
    "add_rpc_devices": "pymem.backend",
    "Device": "pymem.backend",
    "TensorSpec": "pymem.backend",
    "TensorStore": "pymem.backend",
    "Tensor": "pymem.backend",
    "GGMLType": "pymem.types",
    "ggml_type": "pymem.types",
    "ModelSpec": "pymem.spec",
    "LayerSpec": "pymem.spec",
    "RopeSpec": "pymem.spec",
    "SWAType": "pymem.spec",
    "Batch": "pymem.batch",
    "BatchAllocator": "pymem.batch",
    "KVCache": "pymem.kv",
    "KVCacheISWA": "pymem.kv",
    "RecurrentMemory": "pymem.recurrent",
    "HybridMemory": "pymem.hybrid",
    "HybridISWAMemory": "pymem.hybrid",
    "ContextParams": "pymem.factory",
    "create_memory": "pymem.factory",
    "spec_from_gguf": "pymem.gguf_spec",
    "Memory": "pymem.memory",
    "MemoryContext": "pymem.memory",
    "MemoryStatus": "pymem.memory",
    "StateFlags": "pymem.memory",
    "set_state_threads": "pymem.state",
    "state_threads": "pymem.state",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pymem' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
