"""What the composed memories share: fan-out to their parts, a combined context, two-phase state.

:class:`~pymem.kv.iswa.KVCacheISWA` (a base and an SWA :class:`~pymem.kv.KVCache`) and
:class:`~pymem.hybrid.HybridMemory` (an attention part and a recurrent part) are both
memories made of other memories, driven only through the parts' public interfaces::

    CompositeMemory                    (this module)
    +-- KVCacheISWA:  [base, swa]      seq_rm on both; positions from the SWA cache
    +-- HybridMemory: [attn, recr]     seq_rm recurrent first; positions combined

What they do alike lives here, once:

* ``clear``, ``seq_cp``, ``seq_keep``, ``seq_add``, ``seq_div`` and ``close`` go to every
  part in order; ``seq_cp`` / ``seq_add`` / ``seq_div`` first ask every part what it
  would refuse (``check_<op>``), so a refused op changes no part. ``memory_breakdown``
  sums the parts per device.
* State is the parts' states back to back (``[part 0][part 1]``), each part written and
  parsed by itself; the subclass says which parts a state with given flags holds.
  ``state_read`` parses and validates every part before committing any
  (:class:`CompositeStatePlan`), so a bad blob changes nothing anywhere. The reference
  reads part by part and leaves earlier parts restored when a later one fails.
* :class:`PairContext` runs two part contexts over the same ubatches:
  ``llama_kv_cache_iswa_context`` and ``llama_memory_hybrid_context``.

What differs (split choice, ``seq_rm``, positions, ``get_can_shift``, which parts a
``PARTIAL_ONLY`` state holds) stays in each subclass.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np

from pymem._native import check, ffi, lib
from pymem.errors import BatchError, RangeError, StateError
from pymem.memory import GraphInputs, Memory, MemoryContext, MemoryStatus, status_combine
from pymem.native_read import native_parts_read, program_ready, whole_program
from pymem.state import (
    STATE_FLAGS_KNOWN,
    STORE_TOO_LATE,
    CompositeStatePlan,
    SeqReader,
    SeqWriter,
    StatePlan,
    StateReader,
    StateWriter,
    WholePart,
    uninit_bytearray,
)

if TYPE_CHECKING:
    from pymem.ubatch import UBatch


O = TypeVar("O")  # what a part offers for a one-sequence state call


class CompositeMemory(Memory[tuple[Any, ...]]):
    """A memory made of other memories (see the module docstring).

    Subclasses give :meth:`_members` (the parts they hold, in serialisation order),
    :meth:`parts` (the innermost memories by name), ``context_type`` (the pair context
    their plans become) and, where they differ from the defaults, :attr:`prepare_order`
    (which part plans first) and :meth:`_state_members` (which parts a flag leaves out).
    """

    context_type: ClassVar[type[PairContext[Any, Any]]]
    n_seq_max: int  # (every part's: the subclasses check that they agree)
    _no_update: MemoryContext | None = None  # init_update's answer when no part has work
    prepare_order: ClassVar[tuple[int, ...]] = (0, 1)
    """Indices into :meth:`_members` in the order their ``prepare`` runs."""

    @abstractmethod
    def _members(self) -> Sequence[Memory[Any]]:
        """The parts this memory holds directly, in serialisation order."""

    def _state_members(self, flags: int) -> Sequence[Memory[Any]]:
        """The parts a state written with ``flags`` holds (default: all of them)."""
        return self._members()

    @abstractmethod
    def parts(self) -> Mapping[str, Any]:
        """The innermost memories by name, in serialisation order."""

    def check_open(self) -> None:
        for part in self._members():
            part.check_open()

    # --- planning: the parts' plans, in prepare_order ----------------------------------
    def prepare(self, ubatches: Sequence[UBatch]) -> tuple[Any, ...] | None:
        """Every part's plan (in :attr:`prepare_order`); None as soon as one part fails."""
        members = self._members()
        plans: list[Any] = [None] * len(members)
        for i in self.prepare_order:
            plan = members[i].prepare(ubatches)
            if plan is None:
                return None
            plans[i] = plan
        return tuple(plans)

    def context_for(self, plan: tuple[Any, ...], ubatches: Sequence[UBatch]) -> MemoryContext:
        ubs = list(ubatches)
        a, b = self._members()
        return self.context_type(a.context_for(plan[0], ubs), b.context_for(plan[1], ubs), ubs)

    def failed_context(self, status: MemoryStatus) -> MemoryContext:
        return self.context_type.failed(status)

    def init_full(self) -> MemoryContext:
        first, second = (m.init_full() for m in self._members())
        return self.context_type(first, second, [])

    def init_update(self, optimize: bool = False) -> MemoryContext:
        """The parts' updates; when neither part has one, one shared NO_UPDATE context
        (it only reports its status, so every decode step reuses it)."""
        a, b = self._members()
        first, second = a.init_update(optimize), b.init_update(optimize)
        no_update = MemoryStatus.NO_UPDATE
        if first.get_status() == no_update and second.get_status() == no_update:
            if self._no_update is None:
                self._no_update = self.context_type(first, second, [], update=True)
            return self._no_update
        return self.context_type(first, second, [], update=True)

    # --- accounting ------------------------------------------------------------------
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes per device, all parts summed (as the reference)."""
        out: dict[str, int] = {}
        for part in self._members():
            for dev, n in part.memory_breakdown().items():
                out[dev] = out.get(dev, 0) + n
        return out

    def cell_owners(self) -> np.ndarray:
        return np.concatenate([part.cell_owners() for part in self.parts().values()])

    def memory_breakdown_by_part(self) -> dict[str, dict[str, int]]:
        """Bytes per device for each part (names as :meth:`parts`)."""
        return {name: mem.memory_breakdown() for name, mem in self.parts().items()}

    def close(self) -> None:
        for part in self._members():
            part.close()

    # --- sequence operations that every part takes, in order ---------------------------
    # Every part's check_<op> runs before any part changes, so that a refusal by a later
    # part (e.g. a partial seq_cp across streams that only the smaller SWA cache counts as
    # partial) cannot leave an earlier part changed; the reference asserts there instead.
    def check_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Raise what :meth:`seq_cp` would refuse, changing nothing."""
        for part in self._members():
            part.check_seq_cp(seq_id_src, seq_id_dst, p0, p1)

    def check_seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Raise what :meth:`seq_add` would refuse, changing nothing."""
        for part in self._members():
            part.check_seq_add(seq_id, p0, p1, shift)

    def check_seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Raise what :meth:`seq_div` would refuse, changing nothing."""
        for part in self._members():
            part.check_seq_div(seq_id, p0, p1, d)

    def check_devices(self) -> None:
        for part in self._members():
            part.check_devices()

    def clear(self, data: bool = True) -> None:
        if data:
            self.check_devices()  # before any part changes
        for part in self._members():
            part.clear(data)

    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        self.check_seq_cp(seq_id_src, seq_id_dst, p0, p1)
        for part in self._members():
            part.seq_cp(seq_id_src, seq_id_dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        for part in self._members():
            part.seq_keep(seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.check_seq_add(seq_id, p0, p1, shift)
        if int(shift) == 0:  # every part's no-op, once every part has checked the call
            return
        for part in self._members():
            part.seq_add(seq_id, p0, p1, shift)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self.check_seq_div(seq_id, p0, p1, d)
        if int(d) == 1:
            return
        for part in self._members():
            part.seq_div(seq_id, p0, p1, d)

    # --- state -------------------------------------------------------------------------
    def state_write_into(self, writer: StateWriter, seq_id: int = -1, flags: int = 0) -> None:
        for part in self._state_members(flags):
            part.state_write_into(writer, seq_id, flags)

    def _every_part(self, offer: Callable[[Any], O | None], flags: int) -> list[O] | None:
        """What ``offer`` gives for every part in the blob's order (``flags`` select the
        parts), or None as soon as one part offers nothing."""
        found = []
        for part in self._state_members(flags):
            one = offer(part)
            if one is None:
                return None
            found.append(one)
        return found

    def seq_writer(self, seq_id: int, flags: int) -> SeqWriter | None:
        """Every part's sized writer, one after the other into one view (None unless
        every part offers one)."""
        parts = self._every_part(lambda part: part.seq_writer(seq_id, flags), flags)
        if parts is None:
            return None

        def fill(view: memoryview) -> int:
            at = 0
            for size, part_fill in parts:
                at += part_fill(view[at : at + size])
            return at

        return sum(size for size, _ in parts), fill

    def seq_reader(self, seq_id: int, flags: int) -> SeqReader | None:
        """Every part's native check, one after the other over one view, then every
        part's store (None unless every part offers one; a blob that any part declines
        changes nothing: no store runs before every check passed)."""
        parts = self._every_part(lambda part: part.seq_reader(seq_id, flags), flags)
        if parts is None:
            return None

        def check(
            view: memoryview,
        ) -> tuple[int, Callable[[], None], Callable[[], bool]] | None:
            at = 0
            found = []
            for part_check in parts:
                one = part_check(view[at:])
                if one is None:
                    return None
                at += one[0]
                found.append(one)

            def current() -> bool:
                return all(one[2]() for one in found)

            def store() -> None:
                if not current():  # a part changed since its check: no part stores
                    raise StateError(STORE_TOO_LATE)
                for one in found:
                    one[1]()

            return at, store, current

        return check

    def state_read(
        self, data: bytes | bytearray | memoryview, seq_id: int = -1, flags: int = 0
    ) -> int:
        """Restore from a blob; returns the bytes consumed. Nothing changes on failure.

        A whole blob, or one sequence's, of parts that all offer :meth:`whole_part` is
        checked and stored in one native call (:meth:`_native_read`); one sequence also
        part by part (:meth:`seq_reader`); anything those decline, by the two-phase
        parse."""
        if self._native_call(seq_id, flags):
            done = self._native_read(data, seq_id, flags)
            if done is not None:
                return done
        return super().state_read(data, seq_id, flags)

    _whole_programs: dict[int, tuple[Any, list[WholePart]]] | None = None

    def _whole_leaves(self, flags: int) -> list[Memory[Any]]:
        """The innermost memories a whole blob with ``flags`` holds, in its order."""
        leaves: list[Memory[Any]] = []
        for part in self._state_members(flags):
            if isinstance(part, CompositeMemory):
                leaves.extend(part._whole_leaves(flags))
            else:
                leaves.append(part)
        return leaves

    def _whole_program(self, flags: int) -> tuple[Any, list[WholePart]] | None:
        """The ``pm_whole_part`` array of a whole read with ``flags`` and its parts, built
        on first use (every pointer in it stays valid while the parts are open: each call
        asks :meth:`WholePart.ready` first); None where a part offers none."""
        programs = self._whole_programs
        if programs is None:
            programs = self._whole_programs = {}
        if flags not in programs:
            program = whole_program([leaf.whole_part() for leaf in self._whole_leaves(flags)])
            if program is None:
                return None  # (not kept: a native road switched off may come back)
            programs[flags] = program
        return programs[flags]

    def _ready_program(self, flags: int) -> tuple[Any, list[WholePart]] | None:
        """:meth:`_whole_program` when every part is ready for a native call now."""
        program = self._whole_program(flags)
        return program if program is not None and program_ready(program) else None

    def _native_read(self, data: object, seq_id: int, flags: int) -> int | None:
        """The whole memory's restore (``seq_id`` -1: :c:func:`pm_whole_read`) or one
        sequence's (:c:func:`pm_seq_read`) in one native call: every part's check, then
        every part's store, then what Python keeps (:meth:`WholePart.commit` /
        :meth:`WholePart.sequence_read`). The bytes consumed, or None with nothing changed
        where it does not apply (a part offers no :meth:`whole_part`, is not ready, reads
        a sequence in Python (a sliding window) or declines the blob: the readers or the
        two-phase parse then decide)."""
        program = self._ready_program(flags)
        if program is None:
            return None
        array, parts = program
        whole = seq_id == -1
        if not whole:
            for i, part in enumerate(parts):
                if not part.read_sequence(array[i], seq_id):
                    return None
        return native_parts_read(array, parts, data, seq_id)

    def _native_write(self, out: Any, seq_id: Any, flags: Any, sized: bool = False) -> int | None:
        """The whole blob (``seq_id`` -1: :c:func:`pm_whole_write`) or one sequence's
        (:c:func:`pm_seq_write`) in one native call, every part sized, then written, into
        ``out`` (a writable buffer; None: the size alone); the blob's bytes. None, nothing
        written, where it does not apply (not :meth:`_native_call`, a part offers no
        :meth:`whole_part` or is not ready, a part declines: the parts' writers then
        decide, and name what they refuse). RangeError, nothing written, when ``out`` is
        too small. ``sized``: this call's size query (``out`` None) ran just before, with
        nothing changed since, and ``out`` holds exactly that size: the parts are written
        as the query selected them (one search of a KV stream, not two)."""
        if not self._native_call(seq_id, flags):
            return None
        program = self._ready_program(flags)
        if program is None:
            return None
        array, parts = program
        if seq_id != -1:
            for i, part in enumerate(parts):
                part.for_sequence(array[i], seq_id)
        if out is None:
            dest, cap = ffi.NULL, 0
        else:
            try:
                dest = ffi.from_buffer(out, require_writable=True)
            except (TypeError, ValueError, BufferError):
                return None  # (the general road names what is wrong with it)
            cap = len(dest)
        written = ffi.new("int64_t *")
        done = ffi.new("int32_t *")
        sized_c = int(sized and out is not None)
        if seq_id == -1:
            status = lib.pm_whole_write(array, len(parts), dest, cap, sized_c, written, done)
        else:
            status = lib.pm_seq_write(array, len(parts), seq_id, dest, cap, sized_c, written, done)
        for part in parts:  # (a size query selects cells too: the scratch is taken)
            part.written()
        if status == lib.PM_ERR_RANGE and out is None:
            return int(written[0])
        if status == lib.PM_ERR_RANGE:
            raise RangeError(
                f"state_write_buffer: out holds {cap} bytes, the state needs {written[0]}"
            )
        check(status, "state write: a memory's blob")
        return int(written[0]) if done[0] else None

    def _native_call(self, seq_id: Any, flags: Any) -> bool:
        """Whether a state call of ``seq_id`` with ``flags`` may take a one-call road: the
        whole memory (-1) or a sequence in ``[0, n_seq_max)``, known flags (anything else
        goes to the general road, which names what is wrong)."""
        return (
            type(seq_id) is int
            and -1 <= seq_id < self.n_seq_max
            and type(flags) is int
            and not flags & ~STATE_FLAGS_KNOWN
        )

    def state_size(self, seq_id: int = -1, flags: int = 0) -> int:
        size = self._native_write(None, seq_id, flags)
        return size if size is not None else super().state_size(seq_id, flags)

    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        size = self._native_write(None, seq_id, flags)
        if size is not None:
            out = uninit_bytearray(size)  # (no Python runs on the memory in between)
            if self._native_write(out, seq_id, flags, sized=True) == size:
                return bytes(out) if size < 4096 else out  # type: ignore[return-value]
        return super().state_write(seq_id, flags)

    def state_write_buffer(self, out: Any, seq_id: int = -1, flags: int = 0) -> int:
        # (None is the native road's size query: the general road refuses it by name)
        done = None if out is None else self._native_write(out, seq_id, flags)
        return done if done is not None else super().state_write_buffer(out, seq_id, flags)

    def state_read_parse(
        self, reader: StateReader, seq_id: int = -1, flags: int = 0
    ) -> CompositeStatePlan:
        """Parse and validate every part (nothing changes); ``commit()`` applies them all.

        A part that is itself composite contributes its own parts, so the plan is flat.
        """
        plans: list[StatePlan] = []
        for part in self._state_members(flags):
            plan = part.state_read_parse(reader, seq_id, flags)
            plans.extend(plan.parts if isinstance(plan, CompositeStatePlan) else [plan])
        return CompositeStatePlan(plans)


A = TypeVar("A", bound=MemoryContext)
B = TypeVar("B", bound=MemoryContext)
P = TypeVar("P", bound="PairContext[Any, Any]")


class PairContext(MemoryContext, Generic[A, B]):
    """Two part contexts over the same ubatches (a failed one holds neither).

    The status is the parts' statuses combined (:func:`pymem.memory.status_combine`);
    ``next()`` advances both, ``apply()`` applies the first part then the second (both,
    even when the first reports False). Anything but ``apply()`` and ``get_status()``
    on a context that did not succeed raises :class:`~pymem.errors.BatchError`.
    """

    def __init__(
        self,
        first: A | None,
        second: B | None,
        ubatches: Sequence[UBatch],
        *,
        status: MemoryStatus | None = None,
        update: bool = False,
    ) -> None:
        self.is_update = update
        self.first = first
        self.second = second
        self.ubatches = list(ubatches)
        self.i_next = 0
        if status is None:
            assert first is not None and second is not None
            status = status_combine(first.get_status(), second.get_status())
        self.status = status

    @classmethod
    def failed(cls: type[P], status: MemoryStatus) -> P:
        return cls(None, None, [], status=status)

    def get_status(self) -> MemoryStatus:
        return self.status

    def _pair(self, what: str) -> tuple[A, B]:
        """Both part contexts; BatchError naming ``what`` unless this context succeeded."""
        if self.status != MemoryStatus.SUCCESS or self.first is None or self.second is None:
            raise BatchError(f"{what}: context status is {self.status.name}")
        return self.first, self.second

    def next(self) -> bool:
        first, second = self._pair("next")
        first.next()
        second.next()
        self.i_next += 1
        return self.i_next < len(self.ubatches)

    def apply(self) -> bool:
        if self.status.is_fail():
            raise BatchError(f"apply: context status is {self.status.name}")
        if self.first is None or self.second is None:
            return True
        res_first = self.first.apply()
        res_second = self.second.apply()
        return res_first and res_second

    def get_ubatch(self) -> UBatch:
        self._pair("get_ubatch")
        if self.i_next >= len(self.ubatches):
            raise BatchError("get_ubatch: no current ubatch")
        return self.ubatches[self.i_next]

    def graph_inputs(self) -> GraphInputs:
        """Both parts' inputs (see :meth:`GraphInputs.merged`)."""
        first, second = self._pair("graph_inputs")
        return first.graph_inputs().merged(second.graph_inputs())
