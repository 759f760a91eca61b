"""The memory interface every memory type implements, and the status combine rule.

Contract (as llama.cpp's ``llama_memory_i``):

* ``init_batch`` splits a batch into ubatches and plans a slot for each of them without
  changing anything; it returns a context. ``MemoryContext.apply()`` is the **only** call
  that mutates memory; ``next()`` advances to the next ubatch.
* Ranges are half-open ``[p0, p1)``: ``p0 < 0`` means 0, ``p1 < 0`` means +infinity.
  ``seq_id < 0`` means every sequence where an operation allows it.
* Every caller mistake raises a :class:`pymem.errors.PymemError` before anything changes.

The planning protocol every memory implements (leaf or composite)::

    init_batch(balloc, n_ubatch, embd_all)          (one implementation, below)
      for split in splits(balloc, n_ubatch, embd_all):   which splitters, in which order
          ubatches = balloc.split_all(split)
          plan = prepare(ubatches)                   plan every ubatch; changes nothing
          if plan is not None:
              return context_for(plan, ubatches)     a context that applies the plan
      return failed_context(FAILED_PREPARE)

A composite's plan is its parts' plans (``prepare`` of each part, in the reference's
order) and its context pairs its parts' contexts, so compositions nest without knowing
what their parts are. ``MemoryContext.graph_inputs()`` hands a runtime the typed inputs
of the current ubatch (:class:`GraphInputs`), per part, so nothing probes a context for
methods.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np

from pymem.state import StatePlan, TwoPhaseStateIO

if TYPE_CHECKING:
    from pymem.backend import Tensor
    from pymem.batch import BatchAllocator
    from pymem.ubatch import UBatch


POS_MAX = 2**31 - 1
"""``std::numeric_limits<llama_pos>::max()``: what ``p1 < 0`` (+infinity) stands for."""


def clamp_range(p0: int, p1: int) -> tuple[int, int]:
    """``[p0, p1)`` with the sentinels resolved: ``p0 < 0`` -> 0, ``p1 < 0`` -> POS_MAX.

    E.g. (-1, -1) -> (0, 2147483647); (3, 7) -> (3, 7).
    """
    return (0 if p0 < 0 else int(p0)), (POS_MAX if p1 < 0 else int(p1))


class MemoryStatus(enum.IntEnum):
    """Outcome of preparing a memory context (``llama_memory_status``)."""

    SUCCESS = 0
    NO_UPDATE = 1
    FAILED_PREPARE = 2
    FAILED_COMPUTE = 3

    def is_fail(self) -> bool:
        return self in (MemoryStatus.FAILED_PREPARE, MemoryStatus.FAILED_COMPUTE)


def status_combine(s0: MemoryStatus, s1: MemoryStatus) -> MemoryStatus:
    """Combine the statuses of two sub-contexts as the reference does.

    The first failure wins; otherwise any SUCCESS makes SUCCESS; else NO_UPDATE.
    E.g. (NO_UPDATE, SUCCESS) -> SUCCESS, (FAILED_PREPARE, FAILED_COMPUTE) -> FAILED_PREPARE.
    """
    for s in (s0, s1):
        if s.is_fail():
            return s
    if MemoryStatus.SUCCESS in (s0, s1):
        return MemoryStatus.SUCCESS
    return MemoryStatus.NO_UPDATE


class StateFlags(enum.IntFlag):
    """``llama_state_seq_flags``."""

    NONE = 0
    PARTIAL_ONLY = 1  # alias SWA_ONLY: only the SWA / recurrent parts
    ON_DEVICE = 2


PARTIAL_ONLY_BIT = int(StateFlags.PARTIAL_ONLY)
"""``StateFlags.PARTIAL_ONLY`` as a plain int: every state call tests it (an IntFlag
operation costs an enum construction each time)."""


class AttentionView(Protocol):
    """The graph side of one KV cache for the current ubatch (a ``KVCacheContext``).

    Views of the cache tensors and ``set_rows`` nodes that store new K/V rows; ``ctx`` is
    a :class:`pymem.ggml.Context`.
    """

    def get_k(self, ctx: Any, il: int) -> Any: ...

    def get_v(self, ctx: Any, il: int) -> Any: ...

    def cpy_k(self, ctx: Any, k_cur: Any, k_idxs: Any, il: int) -> Any: ...

    def cpy_v(self, ctx: Any, v_cur: Any, v_idxs: Any, il: int) -> Any: ...

    def get_kq_mask(
        self, causal_attn: bool | None = None, dtype: Any = np.float32, non_causal_type: Any = None
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class KVInputs:
    """One KV cache's graph inputs for the current ubatch.

    ``k_idxs`` / ``v_idxs`` are the int64 rows (elements for a transposed V) the ubatch's
    K/V go to; ``kq_mask(...)`` builds the mask with the graph's options. ``layers`` are
    the model layers whose K/V this cache holds; ``view`` gives tensor views and stores.
    """

    layers: frozenset[int]
    v_trans: bool
    n_kv: int
    n_stream: int
    s0: int
    size: int
    k_idxs: np.ndarray
    v_idxs: np.ndarray
    view: AttentionView

    def kq_mask(self, **options: Any) -> np.ndarray:
        """The KQ mask (``get_kq_mask`` options: causal_attn, dtype, non_causal_type)."""
        return self.view.get_kq_mask(**options)


@dataclass(frozen=True)
class RSInputs:
    """A recurrent memory's graph inputs for the current ubatch.

    Rows ``[head, head + n_rs)`` of every plane are read through ``s_copy`` (the source
    row, plane offset included, of each) and the ubatch writes its states back there.
    """

    head: int
    n_rs: int
    rs_z: int
    size: int
    n_rs_seq: int
    s_copy: np.ndarray
    r_l: Callable[[int], Tensor]
    s_l: Callable[[int], Tensor]


@dataclass(frozen=True)
class GraphInputs:
    """The memory side of the current ubatch: attention inputs by part, recurrent inputs.

    A KV cache gives ``{"kv": ...}``, an iSWA cache ``{"base": ..., "swa": ...}``; a
    hybrid merges its parts'. E.g. a hybrid-iSWA memory: ``attn`` has "base" and "swa",
    ``recr`` is set.
    """

    attn: Mapping[str, KVInputs] = field(default_factory=dict)
    recr: RSInputs | None = None

    def merged(self, other: GraphInputs) -> GraphInputs:
        """Both parts' inputs; a part name in both is a configuration error."""
        clash = set(self.attn) & set(other.attn)
        if clash or (self.recr is not None and other.recr is not None):
            raise ValueError(f"graph inputs: two parts give {sorted(clash) or 'recurrent'}")
        return GraphInputs({**self.attn, **other.attn}, self.recr or other.recr)

    def renamed(self, name: str) -> GraphInputs:
        """The single attention part under ``name`` (how iSWA names its two caches)."""
        (only,) = self.attn.values()
        return GraphInputs({name: only}, self.recr)

    def attn_part(self, il: int) -> KVInputs:
        """The attention inputs of the part holding layer ``il``."""
        for inp in self.attn.values():
            if il in inp.layers:
                return inp
        raise KeyError(f"layer {il}: no attention part holds it (parts: {list(self.attn)})")


class MemoryContext(ABC):
    """One planned pass over the ubatches of a batch (or an update / a full reservation)."""

    @abstractmethod
    def get_status(self) -> MemoryStatus: ...

    @abstractmethod
    def next(self) -> bool:
        """Advance to the next ubatch; False when there is none."""

    @abstractmethod
    def apply(self) -> bool:
        """Commit the current ubatch's planned slot (or the pending update) to memory."""

    @abstractmethod
    def get_ubatch(self) -> UBatch: ...

    @abstractmethod
    def graph_inputs(self) -> GraphInputs:
        """The typed graph inputs of the current ubatch (after ``apply()``)."""


PlanT = TypeVar("PlanT")
Split = Callable[[], "UBatch | None"]


class Memory(TwoPhaseStateIO, ABC, Generic[PlanT]):
    """A model's inference memory: KV cache, iSWA, recurrent, or a hybrid.

    ``PlanT`` is what :meth:`prepare` returns: slot infos for a KV cache, placed cells for
    recurrent memory, the parts' plans for a composite.
    """

    # --- planning -------------------------------------------------------------------
    def init_batch(
        self, balloc: BatchAllocator, n_ubatch: int, embd_all: bool = False
    ) -> MemoryContext:
        """Split the allocator's batch and plan every ubatch; nothing changes.

        Each splitter from :meth:`splits` is tried in order; the first whose ubatches
        all fit gives the context. Otherwise the status is FAILED_PREPARE.
        """
        self.check_open()
        for split in self.splits(balloc, n_ubatch, embd_all):
            ubatches = balloc.split_all(split)
            if ubatches is None:
                continue
            plan = self.prepare(ubatches)
            if plan is None:
                continue
            return self.context_for(plan, ubatches)
        return self.failed_context(MemoryStatus.FAILED_PREPARE)

    @abstractmethod
    def splits(self, balloc: BatchAllocator, n_ubatch: int, embd_all: bool) -> Iterable[Split]:
        """The splitters ``init_batch`` tries, in the reference's order."""

    @abstractmethod
    def prepare(self, ubatches: Sequence[UBatch]) -> PlanT | None:
        """Plan every ubatch in order, each seeing the ones before; None if one does not
        fit. Changes nothing."""

    @abstractmethod
    def context_for(self, plan: PlanT, ubatches: Sequence[UBatch]) -> MemoryContext:
        """A batch context that applies ``plan`` (made by :meth:`prepare` of ``ubatches``)."""

    @abstractmethod
    def failed_context(self, status: MemoryStatus) -> MemoryContext:
        """A context that only reports ``status`` (FAILED_PREPARE, NO_UPDATE)."""

    @abstractmethod
    def init_full(self) -> MemoryContext: ...

    @abstractmethod
    def init_update(self, optimize: bool = False) -> MemoryContext: ...

    @abstractmethod
    def get_can_shift(self) -> bool: ...

    def check_open(self) -> None:
        """Raise :class:`~pymem.errors.ClosedError` once :meth:`close` freed the buffers.

        Memories that own buffers override this; the default has nothing to check.
        """
        return None

    # --- sequence operations --------------------------------------------------------
    @abstractmethod
    def clear(self, data: bool = True) -> None: ...

    @abstractmethod
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...

    @abstractmethod
    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None: ...

    @abstractmethod
    def seq_keep(self, seq_id: int) -> None: ...

    @abstractmethod
    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None: ...

    @abstractmethod
    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None: ...

    @abstractmethod
    def seq_pos_min(self, seq_id: int) -> int: ...

    @abstractmethod
    def seq_pos_max(self, seq_id: int) -> int: ...

    # Vectorised forms of the two queries above (what batch validation asks): entry j is
    # ``seq_pos_min(seq_ids[j])`` / ``seq_pos_max(seq_ids[j])`` as int64, with the same
    # errors for the first id the scalar would refuse. The defaults loop; the memories
    # answer from their cached per-sequence bounds in one gather.
    def seq_pos_min_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return np.array([self.seq_pos_min(s) for s in np.asarray(seq_ids).tolist()], np.int64)

    def seq_pos_max_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return np.array([self.seq_pos_max(s) for s in np.asarray(seq_ids).tolist()], np.int64)

    # What a seq op would refuse, raised before anything changes; a composition asks
    # every part before any part changes. The defaults refuse nothing.
    def check_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        return None

    def check_seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        return None

    def check_seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        return None

    # --- accounting -----------------------------------------------------------------
    @abstractmethod
    def parts(self) -> Mapping[str, Memory[Any]]:
        """The innermost memories by name, in serialisation order (a leaf: itself)."""

    @abstractmethod
    def cell_owners(self) -> np.ndarray:
        """int32 per cell (streams / parts concatenated): the seq id holding it, -1 when
        free, -2 when shared by several sequences. For occupancy displays and tests."""

    @abstractmethod
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes allocated per device buffer (device name -> bytes)."""

    # --- state ----------------------------------------------------------------------
    # state_write / state_write_to / state_size / state_read / state_read_from come from
    # TwoPhaseStateIO over these two; a restore that fails changes nothing.
    @abstractmethod
    def state_write_into(self, writer: Any, seq_id: int = -1, flags: int = 0) -> None: ...

    @abstractmethod
    def state_read_parse(self, reader: Any, seq_id: int = -1, flags: int = 0) -> StatePlan: ...

    @abstractmethod
    def check_devices(self) -> None:
        """Raise :class:`~pymem.errors.DeviceError` when a device holding this memory's
        tensors is gone (an rpc-server), changing nothing."""

    @abstractmethod
    def close(self) -> None:
        """Release the device buffers now (also on ``with`` exit)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
