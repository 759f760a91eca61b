"""A minimal runtime: ``llama_context::decode`` for the tiny model over any pymem memory.

:class:`Decoder` does what a real runtime does with pymem, in the reference's order:
validate the batch (:class:`pymem.batch.BatchAllocator`), run a pending memory update
(K-shift, stream copies), plan every ubatch (``init_batch``), then per ubatch
``apply()``, take the graph inputs from the memory context, compute the graph, and
scatter the output logits back to batch order. It times the bookkeeping (everything but
the graph compute) separately, because that is what pymem adds to a decode step.

The memory side is read from each context's typed graph inputs
(:meth:`pymem.memory.MemoryContext.graph_inputs`) and adapted to the
:class:`~pymem.runtime.graph.StepInputs` the graph needs: one attention part per KV cache
(``"kv"``, or ``"base"`` and ``"swa"`` for iSWA) and the recurrent state-copy inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pymem.batch import Batch, BatchAllocator
from pymem.errors import ConfigError, PymemError
from pymem.memory import KVInputs, Memory, MemoryContext, MemoryStatus, RSInputs
from pymem.runtime.graph import StepInputs
from pymem.ubatch import UBatch


class DecodeError(PymemError, RuntimeError):
    """A decode the memory could not place (the reference's ``decode`` returning 1)."""


class KVAttention:
    """Attention inputs of one KV cache (:class:`pymem.memory.KVInputs`) for one ubatch.

    The KQ mask is built at construction, right after ``apply()``, so its cost is timed
    as bookkeeping. Graph nodes come from the cache context (``get_k``/``get_v``/
    ``cpy_k``/``cpy_v``).
    """

    def __init__(self, inp: KVInputs, flash_attn: bool) -> None:
        self.inp = inp
        self.view = inp.view
        self.layers = inp.layers
        self.v_trans = inp.v_trans
        self.n_kv = inp.n_kv
        self.n_stream = inp.n_stream
        self.s0 = inp.s0
        self.size = inp.size
        self._mask = inp.kq_mask(dtype=np.float16 if flash_attn else np.float32)

    def get_k(self, ctx: Any, il: int) -> Any:
        return self.view.get_k(ctx, il)

    def get_v(self, ctx: Any, il: int) -> Any:
        return self.view.get_v(ctx, il)

    def cpy_k(self, ctx: Any, k_cur: Any, k_idxs: Any, il: int) -> Any:
        return self.view.cpy_k(ctx, k_cur, k_idxs, il)

    def cpy_v(self, ctx: Any, v_cur: Any, v_idxs: Any, il: int) -> Any:
        return self.view.cpy_v(ctx, v_cur, v_idxs, il)

    def kq_mask(self, ubatch: UBatch) -> np.ndarray:
        return self._mask

    def k_idxs(self, ubatch: UBatch) -> np.ndarray:
        return self.inp.k_idxs

    def v_idxs(self, ubatch: UBatch) -> np.ndarray:
        return self.inp.v_idxs


class RecurrentState:
    """Recurrent inputs (:class:`pymem.memory.RSInputs`) for the current ubatch."""

    def __init__(self, inp: RSInputs) -> None:
        self.inp = inp
        self.head = inp.head
        self.n_rs = inp.n_rs
        self.rs_z = inp.rs_z
        self.size = inp.size
        self.n_rs_seq = inp.n_rs_seq

    def r_tensor(self, il: int) -> Any:
        return self.inp.r_l(il)

    def s_tensor(self, il: int) -> Any:
        return self.inp.s_l(il)

    def s_copy(self) -> np.ndarray:
        return self.inp.s_copy


def context_n_ctx_seq(memory: Memory) -> int | None:
    """The context's cells per sequence (``llama_cparams::n_ctx_seq``), from the plan
    :func:`pymem.factory.create_memory` attaches to its memories; None for a memory built
    another way. LongRoPE models pick their factors by it (:attr:`StepInputs.n_ctx_seq`)."""
    plan = getattr(memory, "plan", None)
    return plan.ctx.n_ctx_seq if plan is not None else None


def step_inputs(
    mctx: MemoryContext, ubatch: UBatch, flash_attn: bool, n_ctx_seq: int | None = None
) -> StepInputs:
    """The graph inputs of the current ubatch of any pymem memory context.

    Every context hands its typed inputs (:meth:`pymem.memory.MemoryContext.graph_inputs`):
    one attention part per KV cache ("kv", or "base" and "swa" for iSWA) and the
    recurrent inputs where the memory has a recurrent part. ``n_ctx_seq``: the context's
    cells per sequence (:attr:`StepInputs.n_ctx_seq`).
    """
    gi = mctx.graph_inputs()
    out = StepInputs(n_ctx_seq=n_ctx_seq)
    for name, inp in gi.attn.items():
        out.attn[name] = KVAttention(inp, flash_attn)
    if gi.recr is not None:
        out.recr = RecurrentState(gi.recr)
    if not out.attn and out.recr is None:
        raise ConfigError(f"memory context {type(mctx).__name__}: no attention or recurrent inputs")
    return out


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


class DecoderModel(Protocol):
    """A model the decoder can run: the tiny model or the GGUF engine (``GGUFModel``)."""

    @property
    def config(self) -> Any:
        """Has ``n_vocab``."""

    def forward(self, ubatch: UBatch, inputs: StepInputs, flash_attn: bool = False) -> np.ndarray:
        """Logits ``[ubatch.n_tokens, n_vocab]`` (rows of non-output tokens unspecified)."""


class Decoder:
    """Decodes batches of a model through a pymem memory (``llama_decode``).

    ``decode(batch)`` returns ``float32 [batch.n_tokens, n_vocab]``: the logits of every
    output token at its batch index, NaN rows for tokens that are not outputs. Raises
    :class:`pymem.errors.BatchError` for a refused batch (nothing changed) and
    :class:`DecodeError` when the memory has no room (nothing changed either).
    """

    def __init__(self, model: DecoderModel, memory: Memory, *, n_seq_max: int, n_ubatch: int = 512,
                 flash_attn: bool = False) -> None:  # fmt: skip
        self.model = model
        self.memory = memory
        self.n_seq_max = n_seq_max
        self.n_ubatch = n_ubatch
        self.flash_attn = flash_attn
        self.balloc = BatchAllocator()
        self.stats = DecodeStats()
        self.on_ubatch: Any = None  # optional callback(ubatch, step_inputs) for inspection
        self.n_ctx_seq = context_n_ctx_seq(memory)

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
            inputs = step_inputs(mctx, ubatch, self.flash_attn, self.n_ctx_seq)
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
