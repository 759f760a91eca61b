"""The recurrent memory's batch context (``llama_memory_recurrent_context``).

Owns :class:`RecurrentMemoryContext`: walking a batch's ubatches, applying each one
(through :meth:`RecurrentMemory.apply_ubatch`, the only mutation of a decode) and the
graph inputs of the current ubatch (``head``, ``n_rs``, ``rs_z``, ``s_copy``, the R/S
tensors and host views of their rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pymem.backend import Tensor
from pymem.errors import BatchError, RangeError
from pymem.memory import GraphInputs, MemoryContext, MemoryStatus, RSInputs
from pymem.recurrent.cells import SlotRequest, s_copy_rows
from pymem.ubatch import UBatch

if TYPE_CHECKING:
    from pymem.recurrent.memory import RecurrentMemory, RecurrentPlan  # cycle: memory imports this


class RecurrentMemoryContext(MemoryContext):
    """One planned pass over a batch's ubatches (or a full / no-op context).

    Graph inputs for the current ubatch (valid after :meth:`apply`): ``get_head()``,
    ``get_n_rs()`` (cells ``[head, head + n_rs)`` are read and written by the graph),
    ``get_rs_z()`` (the cell zeroed in-graph, or -1), :meth:`s_copy` (int32 rows the
    states are gathered from: the first ``n_seqs`` feed the ubatch's sequences, the rest
    are copied back in place), and the R/S tensors and row views.
    """

    def __init__(
        self,
        mem: RecurrentMemory | None,
        ubatches: Sequence[UBatch] | None,
        *,
        is_full: bool = False,
        status: MemoryStatus = MemoryStatus.SUCCESS,
        requests: Sequence[SlotRequest] | None = None,
        plan: RecurrentPlan | None = None,
    ) -> None:
        self.mem = mem
        self._plan = plan
        self.ubatches: list[UBatch] = list(ubatches or [])
        # what find_slot needs from each ubatch, extracted once at planning time
        self._requests = list(requests) if requests is not None else None
        self.is_full = is_full
        self.status = status
        self.i_next = 0
        self._s_copy: np.ndarray | None = None

    @classmethod
    def failed(cls, status: MemoryStatus) -> RecurrentMemoryContext:
        """A context carrying only a status (FAILED_PREPARE, or NO_UPDATE for updates)."""
        return cls(None, None, status=status)

    def get_status(self) -> MemoryStatus:
        return self.status

    def next(self) -> bool:
        self._require_success("next")
        self._s_copy = None
        self.i_next += 1
        return self.i_next < len(self.ubatches)

    def apply(self) -> bool:
        """Place the current ubatch (``find_slot``) and fix its graph inputs.

        Pending rollbacks of the gathered cells are consumed here (single use).
        A full or update context has nothing to apply.
        """
        if self.status.is_fail():
            raise BatchError(f"apply: context status is {self.status.name}")
        if not self.ubatches:
            return True
        i = self.i_next
        if i >= len(self.ubatches):
            raise RangeError(f"apply: no current ubatch (index {i} of {len(self.ubatches)})")
        mem = self._mem()
        mem.check_open()
        if self._requests is not None:
            req = self._requests[i]
        else:
            req = SlotRequest.from_ubatch(self.ubatches[i])
        self._s_copy = mem.apply_ubatch(req, self._plan, i)
        return True

    def get_ubatch(self) -> UBatch:
        self._require_success("get_ubatch")
        if self.i_next >= len(self.ubatches):
            raise RangeError(
                f"get_ubatch: no current ubatch (index {self.i_next} of {len(self.ubatches)})"
            )
        return self.ubatches[self.i_next]

    # -- graph inputs ---------------------------------------------------------------------
    def graph_inputs(self) -> GraphInputs:
        """The state-copy inputs of the current ubatch (``recr``)."""
        self._require_success("graph_inputs")
        mem = self._mem()
        c = mem.cells
        # what get_head / get_n_rs / get_rs_z give, read once (once per ubatch of a step)
        head, n_rs, rs_z = (0, mem.size, 0) if self.is_full else (c.head, c.n, c.rs_z)
        mem.rows_touched(head + n_rs)  # (the rows its graph writes, in any plane)
        return GraphInputs(
            recr=RSInputs(
                head=head,
                n_rs=n_rs,
                rs_z=rs_z,
                size=mem.size,
                n_rs_seq=mem.n_rs_seq,
                s_copy=np.asarray(self.s_copy(), dtype=np.int32),
                r_l=self.get_r_l,
                s_l=self.get_s_l,
            )
        )

    def get_n_rs(self) -> int:
        mem = self._mem()
        return mem.size if self.is_full else mem.n

    def get_head(self) -> int:
        return 0 if self.is_full else self._mem().head

    def get_rs_z(self) -> int:
        return 0 if self.is_full else self._mem().rs_z

    def get_size(self) -> int:
        return self._mem().size

    def s_copy(self) -> np.ndarray:
        """int32 ``[n_rs]``: row of R/S each cell ``head + i`` starts from (with plane offset)."""
        if self._s_copy is not None:
            return self._s_copy
        mem = self._mem()
        return s_copy_rows(mem.cells, self.get_head(), self.get_n_rs(), mem.n_rs_seq, consume=False)

    def s_copy_main(self) -> np.ndarray:
        """The first ``n_seqs`` entries of :meth:`s_copy` (states the ubatch advances)."""
        n_seqs = self.get_ubatch().n_seqs if self.ubatches else self.get_n_rs()
        return self.s_copy()[:n_seqs]

    def s_copy_extra(self) -> np.ndarray:
        """The rest of :meth:`s_copy` (states copied back into their own cells)."""
        n_seqs = self.get_ubatch().n_seqs if self.ubatches else self.get_n_rs()
        return self.s_copy()[n_seqs:]

    def get_r_l(self, il: int) -> Tensor:
        return self._mem().get_r_l(il)

    def get_s_l(self, il: int) -> Tensor:
        return self._mem().get_s_l(il)

    def r_view(self, il: int) -> np.ndarray:
        """Host numpy view of layer ``il``'s R rows ``[head, head + n_rs)`` of plane 0 (the
        rows a graph of this context writes: the memory's ``rows_hi`` covers them)."""
        h, n = self.get_head(), self.get_n_rs()
        self._mem().rows_touched(h + n)
        return self.get_r_l(il).host_view()[h : h + n]

    def s_view(self, il: int) -> np.ndarray:
        """Host numpy view of layer ``il``'s S rows ``[head, head + n_rs)`` of plane 0 (as
        :meth:`r_view`)."""
        h, n = self.get_head(), self.get_n_rs()
        self._mem().rows_touched(h + n)
        return self.get_s_l(il).host_view()[h : h + n]

    def _mem(self) -> RecurrentMemory:
        if self.mem is None:
            raise BatchError(f"context with status {self.status.name} has no memory")
        return self.mem

    def _require_success(self, what: str) -> None:
        if self.status != MemoryStatus.SUCCESS:
            raise BatchError(f"{what}: context status is {self.status.name}")
