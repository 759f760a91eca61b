"""RWKV and the other linear-recurrence families: RWKV-6/7 (and their Qwen-based flavours),
PLaMo-2, Kimi-Linear (KDA), MiniMax-01 (lightning attention).

A mixin of the engine's graph builder (``pymem.runtime.gguf_llama._Graph``): methods
here use its context (``self.ctx``), hyper-parameters (``self.hp``), weights
(``self.m._w``), inputs and shared blocks (``norm``, ``ffn``, ``attention``,
``build_rs``, ...). :data:`ARCH_GRAPHS` registers the architectures built here.
"""

from __future__ import annotations

from pymem.runtime.arch_graph import ArchGraph


class RWKVGraph:
    """Graph builders of this family (mixed into the engine's graph builder)."""


ARCH_GRAPHS: dict[str, ArchGraph] = {}
