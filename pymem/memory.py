"""The memory interface every memory type implements, and the status combine rule.

Contract (as llama.cpp's ``llama_memory_i``):

* ``init_batch`` splits a batch into ubatches and plans a slot for each of them without
  changing anything; it returns a context. ``MemoryContext.apply()`` is the **only** call
  that mutates memory; ``next()`` advances to the next ubatch.
* Ranges are half-open ``[p0, p1)``: ``p0 < 0`` means 0, ``p1 < 0`` means +infinity.
  ``seq_id < 0`` means every sequence where an operation allows it.
* Every caller mistake raises a :class:`pymem.errors.PymemError` before anything changes.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from pymem.batch import BatchAllocator
    from pymem.ubatch import UBatch


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


class Memory(ABC):
    """A model's inference memory: KV cache, iSWA, recurrent, or a hybrid."""

    # --- planning -------------------------------------------------------------------
    @abstractmethod
    def init_batch(
        self, balloc: BatchAllocator, n_ubatch: int, embd_all: bool
    ) -> MemoryContext: ...

    @abstractmethod
    def init_full(self) -> MemoryContext: ...

    @abstractmethod
    def init_update(self, optimize: bool = False) -> MemoryContext: ...

    @abstractmethod
    def get_can_shift(self) -> bool: ...

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

    # --- accounting -----------------------------------------------------------------
    @abstractmethod
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes allocated per device buffer (device name -> bytes)."""

    # --- state ----------------------------------------------------------------------
    @abstractmethod
    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes: ...

    @abstractmethod
    def state_write_to(self, fileobj: BinaryIO, seq_id: int = -1, flags: int = 0) -> int:
        """Stream the state into a binary file object; returns the bytes written."""

    @abstractmethod
    def state_read(
        self, data: bytes | bytearray | memoryview, seq_id: int = -1, flags: int = 0
    ) -> int:
        """Restore from a blob; returns the bytes consumed. Nothing changes on failure."""

    @abstractmethod
    def state_read_from(self, fileobj: BinaryIO, seq_id: int = -1, flags: int = 0) -> int: ...

    @abstractmethod
    def close(self) -> None:
        """Release the device buffers now (also on ``with`` exit)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
