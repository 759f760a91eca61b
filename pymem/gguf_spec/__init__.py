"""Read a GGUF model file's metadata into the :class:`~pymem.spec.ModelSpec` memory needs.

``spec_from_gguf(path)`` -> the spec ``create_memory`` takes; ``hparams_from_gguf`` -> the
hyper-parameters behind it. Which architectures are read, and how, is the table in
:mod:`pymem.gguf_spec.rules`; anything else raises :class:`~pymem.errors.UnsupportedError`
naming the architecture. Keys are read with the reference's type rules: a scalar must have
the GGUF type the reference expects, a per-layer key is a scalar (broadcast) or an int
array of exactly ``block_count`` entries; violations raise
:class:`~pymem.errors.ConfigError` naming the key, where the reference throws.
"""

from __future__ import annotations

import os

from pymem.gguf_spec.hparams import GGUFHParams, hparams_from_gguf
from pymem.gguf_spec.meta import LLAMA_MAX_LAYERS, GGUFMeta
from pymem.gguf_spec.rules import (
    HYBRID_ARCHS,
    NO_KV_SHIFT_ARCHS,
    RECURRENT_ARCHS,
    RULES,
    SLIDING_WINDOW_ARCHS,
    SUPPORTED_ARCHS,
)
from pymem.spec import ModelSpec

__all__ = [
    "HYBRID_ARCHS",
    "LLAMA_MAX_LAYERS",
    "NO_KV_SHIFT_ARCHS",
    "RECURRENT_ARCHS",
    "RULES",
    "SLIDING_WINDOW_ARCHS",
    "SUPPORTED_ARCHS",
    "GGUFHParams",
    "GGUFMeta",
    "hparams_from_gguf",
    "spec_from_gguf",
]


def spec_from_gguf(path: str | os.PathLike[str]) -> ModelSpec:
    """The :class:`ModelSpec` of a GGUF model file (what its memory must hold).

    Besides the layers, the spec carries ``n_ctx_train`` (used when ``ContextParams.n_ctx
    == 0``), ``n_layer_nextn``, ``n_ff`` (per layer), whether the architecture is
    recurrent or hybrid in the reference's classification (``is_recurrent_arch``,
    ``is_hybrid_arch``), which decides the memory type as ``create_memory`` does, and
    ``kv_shiftable``.
    """
    return hparams_from_gguf(path).to_model_spec()
