"""Hybrid memories: attention + recurrent state for models that mix both kinds of layer.

``llama_memory_hybrid`` (a :class:`~pymem.kv.KVCache` + a
:class:`~pymem.recurrent.RecurrentMemory`) and ``llama_memory_hybrid_iswa`` (a
:class:`~pymem.kv.iswa.KVCacheISWA` + a RecurrentMemory) differ only in their attention
part, so pymem has one composition, :class:`HybridMemory`, whose attention part is either
(:class:`HybridISWAMemory` is the same class with an iSWA attention part)::

    HybridMemory
    +-- attn: KVCache | KVCacheISWA   layers where filter_attn(il) (default: not recurrent)
    +-- recr: RecurrentMemory         layers where filter_recr(il) (default: recurrent)

The parts are driven only through their public interfaces (``prepare``, contexts, seq
ops, two-phase state I/O); the hybrid never touches their cells.

Reference behaviour kept on purpose (pinned by tests/test_hybrid.py):

* ``init_batch`` splits as recurrent memory does: ``split_seq`` when ``embd_all``, else
  ``split_equal(n_ubatch, sequential = attention not unified, n_keep_tail = n_rs_seq + 1
  if n_rs_seq else 0)``; then the recurrent part prepares first, the attention part second.
* ``seq_rm`` asks the recurrent part first and returns False, changing nothing, when it
  refuses (a partial range that cuts a recurrent state; any ``seq_id < 0``).
* ``seq_pos_min = max(attn, recr)`` and ``seq_pos_max = min(attn, recr)`` (llama.cpp
  PR 24797 discusses why that is confusing: after ``seq_keep`` the answer can be
  ``pos_min > pos_max``). :meth:`HybridMemory.seq_pos_ranges` reports each part's own range.
* ``get_can_shift`` is the attention part's answer.
* State: ``[attention][recurrent]``. Under ``PARTIAL_ONLY`` the plain hybrid leaves the
  attention part out; the iSWA hybrid leaves only the base cache out (the SWA cache is
  still written), exactly as the reference.

Better than the reference without changing any byte or return value: a failed
``state_read`` leaves the whole memory as it was (every part is parsed and validated
before any is committed). The reference's plain hybrid undoes its attention part but has
already emptied the destination; its iSWA hybrid undoes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from pymem._native import check, ffi, lib
from pymem.composite import CompositeMemory, PairContext
from pymem.errors import ConfigError
from pymem.kv import KVCache, KVCacheContext, KVCacheISWA, KVCacheISWAContext
from pymem.kv.cells import EMPTY_MIN, STALE_MAX, STALE_MIN
from pymem.memory import PARTIAL_ONLY_BIT, Memory, Split
from pymem.recurrent import RecurrentMemory, RecurrentMemoryContext
from pymem.spec import ModelSpec, SWAType

if TYPE_CHECKING:
    from pymem.batch import BatchAllocator

AttnPart = KVCache | KVCacheISWA
AttnContext = KVCacheContext | KVCacheISWAContext


class HybridContext(PairContext[AttnContext, RecurrentMemoryContext]):
    """Attention and recurrent contexts over the same ubatches (``llama_memory_hybrid_context``).

    Status, ``next`` and ``apply`` (attention, then recurrent) as
    :class:`~pymem.composite.PairContext`. Graph inputs come from the parts:
    :meth:`get_attn` (a KVCacheContext, or a KVCacheISWAContext with ``get_base()`` /
    ``get_swa()``) and :meth:`get_recr` (a RecurrentMemoryContext).
    """

    def get_attn(self) -> AttnContext:
        return self._pair("get_attn")[0]

    def get_recr(self) -> RecurrentMemoryContext:
        return self._pair("get_recr")[1]


class HybridMemory(CompositeMemory):
    """Attention (KVCache or KVCacheISWA) + recurrent memory (``llama_memory_hybrid[_iswa]``).

    Build it from two parts (``HybridMemory(attn, recr)``), from a spec with
    :meth:`build`, or let :func:`pymem.factory.create_memory` choose.
    """

    context_type = HybridContext
    prepare_order = (1, 0)  # the recurrent part plans first, as the reference

    def __init__(self, attn: AttnPart, recr: RecurrentMemory) -> None:
        if attn.n_seq_max != recr.n_seq_max:
            raise ConfigError(
                f"recr: n_seq_max {recr.n_seq_max} differs from the attention part's {attn.n_seq_max}"
            )
        self.mem_attn = attn
        self.mem_recr = recr
        self.spec: ModelSpec = recr.spec
        self.n_seq_max = recr.n_seq_max
        self.is_iswa = isinstance(attn, KVCacheISWA)
        # the attention part's position queries, bound once, and its cached bounds: a
        # runtime asks them every step, and the attention part's call is a third of these
        # sub-microsecond queries (an open id's clean bound is read here, without it)
        self._attn_pos_min = attn.seq_pos_min
        self._attn_pos_max = attn.seq_pos_max
        self._attn_bounds = attn.bounds

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        *,
        type_k: Any = "f16",
        type_v: Any = "f16",
        v_trans: bool = True,
        kv_size: int,
        n_seq_max: int,
        n_rs_seq: int = 0,
        rs_size: int | None = None,
        unified: bool = True,
        swa_full: bool = False,
        n_ubatch: int = 512,
        n_pad: int = 1,
        device: str | Mapping[int, str] = "CPU",
        filter_attn: Callable[[int], bool] | None = None,
        filter_recr: Callable[[int], bool] | None = None,
    ) -> HybridMemory:
        """The reference constructors: a hybrid-iSWA memory when the spec slides, else plain.

        Default filters: recurrent layers -> recurrent part, the others -> attention.
        ``rs_size`` defaults to ``max(1, n_seq_max)``.
        """

        def f_attn(il: int) -> bool:
            return filter_attn(il) if filter_attn is not None else not spec.layers[il].recurrent

        def f_recr(il: int) -> bool:
            return filter_recr(il) if filter_recr is not None else spec.layers[il].recurrent

        attn: AttnPart
        common = dict(type_k=type_k, type_v=type_v, v_trans=v_trans, device=device, unified=unified)
        if spec.swa_type != SWAType.NONE:
            attn = KVCacheISWA(
                spec, swa_full=swa_full, kv_size=kv_size, n_seq_max=n_seq_max, n_ubatch=n_ubatch,
                n_pad=n_pad, filter=f_attn, **common,
            )  # fmt: skip
        else:
            attn = KVCache(
                spec, kv_size=kv_size, n_seq_max=n_seq_max, n_pad=n_pad, n_swa=spec.n_swa,
                swa_type=spec.swa_type, filter=f_attn, **common,
            )  # fmt: skip
        try:
            recr = RecurrentMemory(
                spec,
                mem_size=rs_size if rs_size is not None else max(1, n_seq_max),
                n_seq_max=n_seq_max,
                n_rs_seq=n_rs_seq,
                filter=f_recr,
                device=device,
            )
        except Exception:
            attn.close()
            raise
        return HybridISWAMemory(attn, recr) if isinstance(attn, KVCacheISWA) else cls(attn, recr)

    # --- parts and properties --------------------------------------------------------
    def get_mem_attn(self) -> AttnPart:
        return self.mem_attn

    def get_mem_recr(self) -> RecurrentMemory:
        return self.mem_recr

    def parts(self) -> dict[str, Any]:
        """The innermost memories by name, in serialisation order.

        Plain: ``attention``, ``recurrent``; iSWA: ``attention`` (base), ``swa``, ``recurrent``.
        """
        if isinstance(self.mem_attn, KVCacheISWA):
            return {
                "attention": self.mem_attn.kv_base,
                "swa": self.mem_attn.kv_swa,
                "recurrent": self.mem_recr,
            }
        return {"attention": self.mem_attn, "recurrent": self.mem_recr}

    def get_can_shift(self) -> bool:
        return self.mem_attn.get_can_shift()

    @property
    def n_pos_per_embd(self) -> int:
        return self.spec.n_pos_per_embd

    def _members(self) -> tuple[AttnPart, RecurrentMemory]:
        return (self.mem_attn, self.mem_recr)

    # --- planning (prepare / context_for / init_* come from CompositeMemory) ----------

    def splits(self, balloc: BatchAllocator, n_ubatch: int, embd_all: bool) -> list[Split]:
        """As recurrent memory: ``split_seq`` for ``embd_all``, else ``split_equal`` with
        ``sequential`` when the attention part has streams and the rollback tail kept."""
        if embd_all:
            return [partial(balloc.split_seq, n_ubatch)]
        sequential = self.mem_attn.get_n_stream() != 1
        n_rs_seq = self.mem_recr.n_rs_seq
        n_keep_tail = n_rs_seq + 1 if n_rs_seq > 0 else 0
        return [partial(balloc.split_equal, n_ubatch, sequential, n_keep_tail)]

    # --- sequence operations ---------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Recurrent part first; when it refuses, False and nothing changed anywhere."""
        if not self.mem_recr.seq_rm(seq_id, p0, p1):
            return False
        return self.mem_attn.seq_rm(seq_id, p0, p1)

    # The two position queries read both parts' bounds themselves, with no call into
    # either (the attention part's only for a stale bound or an id off its fast path): a
    # runtime asks them every step, and each part call was ~0.15 µs of the hybrid's 0.47
    # µs against llama.cpp's 0.42-0.49 through ctypes (bench_vs_llama_cpp's seq ops).
    # tests/test_hybrid.py checks them against the parts, stale bounds included. (The
    # recurrent part's memoryviews are made when its cells are committed: two per
    # decode step.)
    def seq_pos_min(self, seq_id: int) -> int:
        """``max(attention, recurrent)``, as the reference (see :meth:`seq_pos_ranges`)."""
        b = self._attn_bounds
        if type(seq_id) is int and 0 <= seq_id < b.n_open:
            key = b.keys[seq_id]
            if b.stale[key] & STALE_MIN:
                attn = self._attn_pos_min(seq_id)  # recomputes the bound
            else:
                attn = b.pos_min[key]
                if attn == EMPTY_MIN:
                    attn = -1
        else:
            attn = self._attn_pos_min(seq_id)  # checks the id: raises on a bad one
        recr_mem = self.mem_recr
        if seq_id >= recr_mem.size:  # the attention part takes ids up to LLAMA_MAX_SEQ
            return attn
        tail, pos = recr_mem.position_views
        t: int = tail[seq_id]
        recr: int = pos[t] if t >= 0 else -1
        return attn if attn > recr else recr  # not max(): a builtin call costs here

    def seq_pos_max(self, seq_id: int) -> int:
        """``min(attention, recurrent)``, as the reference; the recurrent part's maximum
        never reads below -1 (see :meth:`RecurrentMemory.seq_pos_max`)."""
        b = self._attn_bounds
        if type(seq_id) is int and 0 <= seq_id < b.n_open:
            key = b.keys[seq_id]
            attn = self._attn_pos_max(seq_id) if b.stale[key] & STALE_MAX else b.pos_max[key]
        else:
            attn = self._attn_pos_max(seq_id)  # checks the id: raises on a bad one
        recr_mem = self.mem_recr
        if seq_id >= recr_mem.size:
            return -1  # attn >= -1: an attention cell's position is never negative
        tail, pos = recr_mem.position_views
        t: int = tail[seq_id]
        if t < 0:
            return -1
        recr: int = pos[t]
        return attn if attn < recr else (recr if recr > -1 else -1)

    def seq_pos_min_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return np.maximum(
            self.mem_attn.seq_pos_min_of(seq_ids), self.mem_recr.seq_pos_min_of(seq_ids)
        )

    def seq_pos_max_of(self, seq_ids: np.ndarray) -> np.ndarray:
        fused = self._pos_max_native(seq_ids)
        if fused is not None:
            return fused
        return np.minimum(
            self.mem_attn.seq_pos_max_of(seq_ids), self.mem_recr.seq_pos_max_of(seq_ids)
        )

    def _pos_max_native(self, seq_ids: np.ndarray) -> np.ndarray | None:
        """:meth:`seq_pos_max_of` of a decode step's frozen ids in one native call
        (:c:func:`pm_step_hybrid_pos_max`) where both parts memoised them (the step
        before asked the general way) and the attention part is one KV cache; None
        otherwise, or where a cached bound is stale (the general way refreshes it)."""
        attn = self.mem_attn
        if not isinstance(attn, KVCache):
            return None
        keys_c = attn.frozen_keys_c(seq_ids)
        ids_c = None if keys_c is None else self.mem_recr.frozen_ids_c(seq_ids)
        if ids_c is None:
            return None
        n = len(seq_ids)
        out = np.empty(n, dtype=np.int64)
        c, ok = attn.step_cells()
        cells = self.mem_recr.cells
        tail, pos = cells.c_buffers()[:2]
        status = lib.pm_step_hybrid_pos_max(
            c, keys_c, tail, pos, cells.size, ids_c, n,
            ffi.from_buffer("int64_t[]", out, require_writable=True), ok,
        )  # fmt: skip
        if status != lib.PM_OK:
            check(status, f"pm_step_hybrid_pos_max ({n} ids)")
        return out if ok[0] else None

    def seq_pos_ranges(self, seq_id: int) -> dict[str, tuple[int, int]]:
        """Each part's own ``(pos_min, pos_max)`` of ``seq_id``, ``(-1, -1)`` when absent.

        ``"attention"``: the full-attention cache (everything still attended by full
        layers); ``"swa"`` (iSWA hybrids only): the window the SWA layers still see;
        ``"recurrent"``: the position folded into the recurrent state (min == max).
        E.g. after ``seq_keep(1)`` with one stream per sequence, sequence 0 may report
        ``seq_pos_min 0 > seq_pos_max -1``; here: ``{"attention": (0, 12), "recurrent": (-1, -1)}``.
        """
        out: dict[str, tuple[int, int]] = {}
        if isinstance(self.mem_attn, KVCacheISWA):
            out.update(self.mem_attn.seq_pos_ranges(seq_id))
        else:
            out["attention"] = (
                self.mem_attn.seq_pos_min(seq_id),
                self.mem_attn.seq_pos_max(seq_id),
            )
        out["recurrent"] = (self.mem_recr.seq_pos_min(seq_id), self.mem_recr.seq_pos_max(seq_id))
        return out

    # --- state -----------------------------------------------------------------------
    def _attn_in_state(self, flags: int) -> bool:
        """Whether the attention part takes part in a blob with these flags.

        PARTIAL_ONLY drops a plain KV attention part entirely; an iSWA part handles the
        flag itself (drops its base cache, keeps its SWA cache).
        """
        return self.is_iswa or not int(flags) & PARTIAL_ONLY_BIT

    def _state_members(self, flags: int) -> tuple[Memory, ...]:
        """``[attention][recurrent]``, the attention part only when :meth:`_attn_in_state`."""
        if self._attn_in_state(flags):
            return (self.mem_attn, self.mem_recr)
        return (self.mem_recr,)


class HybridISWAMemory(HybridMemory):
    """``llama_memory_hybrid_iswa``: a :class:`HybridMemory` whose attention part is a
    :class:`~pymem.kv.iswa.KVCacheISWA`. No behaviour of its own; the class exists so that
    ``isinstance`` and ``repr`` say which reference type a memory is."""

    def __init__(self, attn: KVCacheISWA, recr: RecurrentMemory) -> None:
        if not isinstance(attn, KVCacheISWA):
            raise ConfigError(
                f"attn: a hybrid-iSWA memory needs a KVCacheISWA, got {type(attn).__name__}"
            )
        super().__init__(attn, recr)
