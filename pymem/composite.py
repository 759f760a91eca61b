"""What the composed memories share: fan-out to their parts, a combined context, two-phase state.

:class:`~pymem.iswa.KVCacheISWA` (a base and an SWA :class:`~pymem.kv.KVCache`) and
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, Protocol, TypeVar

from pymem.errors import BatchError, StateError
from pymem.memory import Memory, MemoryContext, MemoryStatus, status_combine

if TYPE_CHECKING:
    from pymem.state import StateReader, StateWriter
    from pymem.ubatch import UBatch


def plan_is_current(plan: Any) -> bool:
    """Whether a parsed state plan can still be committed (its memory has not changed).

    Compositions check every part before committing any, so a stale plan is refused
    with nothing changed.
    """
    fn = getattr(plan, "is_current", None)
    if callable(fn):
        return bool(fn())
    mem = getattr(plan, "kv", None) or getattr(plan, "memory", None)
    version = getattr(plan, "version", None)
    if mem is None or version is None:
        return True
    return getattr(mem, "_version", version) == version


@dataclass
class CompositeStatePlan:
    """Parsed, validated state parts of several memories; :meth:`commit` applies all.

    Parts are committed in serialisation order only after every part was parsed and
    checked to be current, so a bad blob (or a stale plan) changes nothing anywhere.
    """

    parts: list[Any]
    committed: bool = False

    def is_current(self) -> bool:
        return all(plan_is_current(p) for p in self.parts)

    def commit(self) -> None:
        if self.committed:
            raise StateError("state plan: already committed")
        if not self.is_current():
            raise StateError(
                "state plan: the memory changed after the blob was parsed; parse it again"
            )
        self.committed = True
        for p in self.parts:
            p.commit()


class MemoryPart(Protocol):
    """What a composite asks of each of its parts (KVCache, KVCacheISWA, RecurrentMemory)."""

    def clear(self, data: bool = True) -> None: ...

    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None: ...

    def seq_keep(self, seq_id: int) -> None: ...

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None: ...

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None: ...

    def memory_breakdown(self) -> dict[str, int]: ...

    def close(self) -> None: ...

    def state_write_into(self, writer: StateWriter, seq_id: int = -1, flags: int = 0) -> None: ...

    def state_read_parse(self, reader: StateReader, seq_id: int = -1, flags: int = 0) -> Any: ...


class TwoPhaseStateIO:
    """The byte-level state calls of a memory whose state I/O has two phases.

    The memory provides ``state_write_into(writer, seq_id, flags)`` and
    ``state_read_parse(reader, seq_id, flags) -> plan`` (parsing changes nothing;
    ``plan.commit()`` applies it); this mixin turns them into ``state_write`` (bytes),
    ``state_write_to`` (a binary file), ``state_size``, ``state_read`` and
    ``state_read_from``. A restore that fails changes nothing.
    """

    @abstractmethod
    def state_write_into(self, writer: StateWriter, seq_id: int = -1, flags: int = 0) -> None: ...

    @abstractmethod
    def state_read_parse(self, reader: StateReader, seq_id: int = -1, flags: int = 0) -> Any: ...

    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        from pymem.state import write_state

        return write_state(lambda w: self.state_write_into(w, seq_id, flags))

    def state_write_to(self, fileobj: BinaryIO, seq_id: int = -1, flags: int = 0) -> int:
        """Stream the state into a binary file object; returns the bytes written."""
        from pymem.state import write_state_to

        return write_state_to(fileobj, lambda w: self.state_write_into(w, seq_id, flags))

    def state_size(self, seq_id: int = -1, flags: int = 0) -> int:
        from pymem.state import state_size

        return state_size(lambda w: self.state_write_into(w, seq_id, flags))

    def state_read(
        self, data: bytes | bytearray | memoryview, seq_id: int = -1, flags: int = 0
    ) -> int:
        """Restore from a blob; returns the bytes consumed. Nothing changes on failure."""
        from pymem.state import StateReader

        reader = StateReader(data)
        self.state_read_parse(reader, seq_id, flags).commit()
        return reader.offset

    def state_read_from(self, fileobj: BinaryIO, seq_id: int = -1, flags: int = 0) -> int:
        """Restore from the rest of a binary file; returns the bytes consumed.

        A seekable file is left just after those bytes (whatever follows stays unread).
        """
        from pymem.state import StateReader

        start = fileobj.tell() if fileobj.seekable() else None
        reader = StateReader.from_file(fileobj)
        self.state_read_parse(reader, seq_id, flags).commit()
        if start is not None:
            fileobj.seek(start + reader.offset)
        return reader.offset


class CompositeMemory(TwoPhaseStateIO, Memory):
    """A memory made of other memories (see the module docstring).

    Subclasses give :meth:`_members` (the parts they hold, in serialisation order),
    :meth:`parts` (the innermost memories by name) and, when a flag leaves a part out of
    the state, :meth:`_state_members`.
    """

    @abstractmethod
    def _members(self) -> Sequence[MemoryPart]:
        """The parts this memory holds directly, in serialisation order."""

    def _state_members(self, flags: int) -> Sequence[MemoryPart]:
        """The parts a state written with ``flags`` holds (default: all of them)."""
        return self._members()

    @abstractmethod
    def parts(self) -> Mapping[str, Any]:
        """The innermost memories by name, in serialisation order."""

    # --- accounting ------------------------------------------------------------------
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes per device, all parts summed (as the reference)."""
        out: dict[str, int] = {}
        for part in self._members():
            for dev, n in part.memory_breakdown().items():
                out[dev] = out.get(dev, 0) + n
        return out

    def memory_breakdown_by_part(self) -> dict[str, dict[str, int]]:
        """Bytes per device for each part (names as :meth:`parts`)."""
        return {name: mem.memory_breakdown() for name, mem in self.parts().items()}

    def close(self) -> None:
        for part in self._members():
            part.close()

    # --- sequence operations that every part takes, in order ---------------------------
    def _check_parts(self, op: str, *args: int) -> None:
        """Every part's ``check_<op>`` (where it has one: KVCache and composites do).

        Run before any part changes, so that a refusal by a later part (e.g. a partial
        ``seq_cp`` across streams that only the smaller SWA cache counts as partial)
        cannot leave an earlier part changed; the reference asserts there instead.
        """
        for part in self._members():
            check = getattr(part, f"check_{op}", None)
            if check is not None:
                check(*args)

    def check_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Raise what :meth:`seq_cp` would refuse, changing nothing."""
        self._check_parts("seq_cp", seq_id_src, seq_id_dst, p0, p1)

    def check_seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Raise what :meth:`seq_add` would refuse, changing nothing."""
        self._check_parts("seq_add", seq_id, p0, p1, shift)

    def check_seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Raise what :meth:`seq_div` would refuse, changing nothing."""
        self._check_parts("seq_div", seq_id, p0, p1, d)

    def clear(self, data: bool = True) -> None:
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
        for part in self._members():
            part.seq_add(seq_id, p0, p1, shift)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self.check_seq_div(seq_id, p0, p1, d)
        for part in self._members():
            part.seq_div(seq_id, p0, p1, d)

    # --- state -------------------------------------------------------------------------
    def state_write_into(self, writer: StateWriter, seq_id: int = -1, flags: int = 0) -> None:
        for part in self._state_members(flags):
            part.state_write_into(writer, seq_id, flags)

    def state_read_parse(
        self, reader: StateReader, seq_id: int = -1, flags: int = 0
    ) -> CompositeStatePlan:
        """Parse and validate every part (nothing changes); ``commit()`` applies them all.

        A part that is itself composite contributes its own parts, so the plan is flat.
        """
        plans: list[Any] = []
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
    ) -> None:
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
