"""A minimal runtime: ``llama_context::decode`` for the tiny model over any pymem memory.

:class:`Decoder` does what a real runtime does with pymem, in the reference's order:
validate the batch (:class:`pymem.batch.BatchAllocator`), run a pending memory update
(K-shift, stream copies), plan every ubatch (``init_batch``), then per ubatch
``apply()``, take the graph inputs from the memory context, compute the graph, and
scatter the output logits back to batch order. It times the bookkeeping (everything but
the graph compute) separately, because that is what pymem adds to a decode step.

The memory side is read through adapters that turn each memory context into the
:class:`~pymem.models.graph.StepInputs` the graph needs: a KV cache context gives one
attention part, an iSWA context two (``"base"``, ``"swa"``), a recurrent context the
state-copy inputs, and a hybrid context its attention and recurrent parts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pymem.batch import Batch, BatchAllocator
from pymem.errors import ConfigError, PymemError
from pymem.memory import Memory, MemoryContext, MemoryStatus
from pymem.models.graph import StepInputs, TinyModel
from pymem.ubatch import UBatch


class DecodeError(PymemError, RuntimeError):
    """A decode the memory could not place (the reference's ``decode`` returning 1)."""


class KVAttention:
    """Attention inputs of one KV cache context (``llama_kv_cache_context``) for one ubatch.

    The numpy inputs (KQ mask, row indices) are built at construction, right after
    ``apply()``, so their cost is timed as bookkeeping. Graph nodes come from the
    context's own helpers (``get_k``/``get_v``/``cpy_k``/``cpy_v``).
    """

    def __init__(self, kctx: Any, ubatch: UBatch, flash_attn: bool) -> None:
        kv = kctx.kv
        sinfo = kctx.get_sinfo()
        self.kctx = kctx
        self.kv = kv
        self.layers = frozenset(int(il) for il in kv.get_layer_ids())
        self.v_trans = bool(kv.v_trans)
        self.n_kv = int(kctx.get_n_kv())
        self.n_stream = int(sinfo.n_stream)
        self.s0 = int(sinfo.s0)
        self.size = int(kv.get_size())
        self._mask = kctx.get_kq_mask(dtype=np.float16 if flash_attn else np.float32)
        self._k_idxs = kctx.get_k_idxs()
        self._v_idxs = kctx.get_v_idxs()

    def get_k(self, ctx: Any, il: int) -> Any:
        return self.kctx.get_k(ctx, il)

    def get_v(self, ctx: Any, il: int) -> Any:
        return self.kctx.get_v(ctx, il)

    def cpy_k(self, ctx: Any, k_cur: Any, k_idxs: Any, il: int) -> Any:
        return self.kctx.cpy_k(ctx, k_cur, k_idxs, il)

    def cpy_v(self, ctx: Any, v_cur: Any, v_idxs: Any, il: int) -> Any:
        return self.kctx.cpy_v(ctx, v_cur, v_idxs, il)

    def kq_mask(self, ubatch: UBatch) -> np.ndarray:
        return self._mask

    def k_idxs(self, ubatch: UBatch) -> np.ndarray:
        return self._k_idxs

    def v_idxs(self, ubatch: UBatch) -> np.ndarray:
        return self._v_idxs


class RecurrentState:
    """Recurrent inputs of one recurrent memory context for the current ubatch."""

    def __init__(self, rctx: Any) -> None:
        self.rctx = rctx
        self.head = int(rctx.get_head())
        self.n_rs = int(rctx.get_n_rs())
        self.rs_z = int(rctx.get_rs_z())
        self.size = int(rctx.get_size())
        self.n_rs_seq = int(rctx.mem.n_rs_seq)
        self._s_copy = np.asarray(rctx.s_copy(), dtype=np.int32)

    def r_tensor(self, il: int) -> Any:
        return self.rctx.get_r_l(il)

    def s_tensor(self, il: int) -> Any:
        return self.rctx.get_s_l(il)

    def s_copy(self) -> np.ndarray:
        return self._s_copy


def step_inputs(mctx: MemoryContext, ubatch: UBatch, flash_attn: bool) -> StepInputs:
    """The graph inputs of the current ubatch of any pymem memory context.

    Dispatches on what the context offers (the reference's names): ``get_attn()`` /
    ``get_recr()`` for hybrids, ``get_base()`` / ``get_swa()`` for iSWA, ``get_sinfo()``
    for a KV cache, ``s_copy()`` for recurrent memory.
    """
    out = StepInputs()
    _collect(mctx, ubatch, flash_attn, out)
    return out


def _collect(mctx: Any, ubatch: UBatch, flash_attn: bool, out: StepInputs) -> None:
    if hasattr(mctx, "get_recr") and hasattr(mctx, "get_attn"):
        _collect(mctx.get_attn(), ubatch, flash_attn, out)
        _collect(mctx.get_recr(), ubatch, flash_attn, out)
    elif hasattr(mctx, "get_base") and hasattr(mctx, "get_swa"):
        out.attn["base"] = KVAttention(mctx.get_base(), ubatch, flash_attn)
        out.attn["swa"] = KVAttention(mctx.get_swa(), ubatch, flash_attn)
    elif hasattr(mctx, "get_sinfo"):
        out.attn["kv"] = KVAttention(mctx, ubatch, flash_attn)
    elif hasattr(mctx, "s_copy"):
        out.recr = RecurrentState(mctx)
    else:
        raise ConfigError(f"memory context {type(mctx).__name__}: no attention or recurrent inputs")


@dataclass
class StepStats:
    """Timings of one decode call, in seconds."""

    n_tokens: int = 0
    n_ubatches: int = 0
    t_bookkeeping: float = 0.0  # batch checks, update, planning, apply, graph inputs
    t_graph: float = 0.0  # graph build and compute (the model, not the memory)
    t_update: float = 0.0  # pending K-shift / stream copies (part of bookkeeping)


@dataclass
class DecodeStats:
    steps: list[StepStats] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.steps)

    def total(self, what: str) -> float:
        return float(sum(getattr(s, what) for s in self.steps))


class Decoder:
    """Decodes batches of the tiny model through a pymem memory (``llama_decode``).

    ``decode(batch)`` returns ``float32 [batch.n_tokens, n_vocab]``: the logits of every
    output token at its batch index, NaN rows for tokens that are not outputs. Raises
    :class:`pymem.errors.BatchError` for a refused batch (nothing changed) and
    :class:`DecodeError` when the memory has no room (nothing changed either).
    """

    def __init__(self, model: TinyModel, memory: Memory, *, n_seq_max: int, n_ubatch: int = 512,
                 flash_attn: bool = False) -> None:  # fmt: skip
        self.model = model
        self.memory = memory
        self.n_seq_max = n_seq_max
        self.n_ubatch = n_ubatch
        self.flash_attn = flash_attn
        self.balloc = BatchAllocator()
        self.stats = DecodeStats()
        self.on_ubatch: Any = None  # optional callback(ubatch, step_inputs) for inspection

    def update(self, optimize: bool = False) -> bool:
        """Apply a pending memory update (K-shift after ``seq_add``); True if one ran."""
        uctx = self.memory.init_update(optimize)
        if uctx.get_status() == MemoryStatus.SUCCESS:
            uctx.apply()
            return True
        return False

    def decode(self, batch: Batch) -> np.ndarray:
        stats = StepStats(n_tokens=batch.n_tokens)
        t0 = time.perf_counter()
        self.balloc.init(batch, memory=self.memory, n_seq_max=self.n_seq_max,
                         n_vocab=self.model.config.n_vocab)  # fmt: skip
        tu = time.perf_counter()
        self.update()
        stats.t_update = time.perf_counter() - tu
        mctx = self.memory.init_batch(self.balloc, self.n_ubatch, False)
        if mctx.get_status() == MemoryStatus.FAILED_PREPARE:
            self.update(optimize=True)  # the reference retries once after an update
            mctx = self.memory.init_batch(self.balloc, self.n_ubatch, False)
        status = mctx.get_status()
        if status != MemoryStatus.SUCCESS:
            raise DecodeError(
                f"decode: failed to find a memory slot for {batch.n_tokens} tokens (status {status.name})"
            )
        logits = np.full((batch.n_tokens, self.model.config.n_vocab), np.nan, dtype=np.float32)
        stats.t_bookkeeping += time.perf_counter() - t0
        while True:
            t0 = time.perf_counter()
            mctx.apply()
            ubatch = mctx.get_ubatch()
            inputs = step_inputs(mctx, ubatch, self.flash_attn)
            t1 = time.perf_counter()
            if self.on_ubatch is not None:
                self.on_ubatch(ubatch, inputs)
            out = self.model.forward(ubatch, inputs, flash_attn=self.flash_attn)
            t2 = time.perf_counter()
            sel = np.flatnonzero(ubatch.output != 0)
            logits[ubatch.batch_idxs[sel]] = out[sel]
            stats.n_ubatches += 1
            stats.t_bookkeeping += t1 - t0
            stats.t_graph += t2 - t1
            t0 = time.perf_counter()
            more = mctx.next()
            stats.t_bookkeeping += time.perf_counter() - t0
            if not more:
                break
        self.stats.steps.append(stats)
        return logits
