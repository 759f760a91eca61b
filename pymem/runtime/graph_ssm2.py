"""Mamba-2 layers and the hybrids built on them: Mamba-2, Granite-4 (granitehybrid), Falcon-H1, Nemotron-H.

A mixin of the engine's graph builder (``pymem.runtime.gguf_llama._Graph``): methods
here use its context (``self.ctx``), hyper-parameters (``self.hp``), weights
(``self.m._w``), inputs and shared blocks (``norm``, ``ffn``, ``attention``,
``build_rs``, ...). :data:`ARCH_GRAPHS` registers the architectures built here.
"""

from __future__ import annotations

from pymem.runtime.arch_graph import ArchGraph


class SSM2Graph:
    """Graph builders of this family (mixed into the engine's graph builder)."""


ARCH_GRAPHS: dict[str, ArchGraph] = {}
