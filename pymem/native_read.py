"""The one native call of a state read over several memories' parts (a composite's whole
memory or one sequence, a plain cache's read into empty cells): its ``pm_whole_part``
program, built once and checked before each call, and the call itself.

Apart from :mod:`pymem.state` (the blob format, readers and plans), which binds no ggml
at import: a runtime may read a session's format before it has loaded its ggml.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymem._native import check, ffi, lib
from pymem.errors import StateError
from pymem.state import WholePart


def whole_program(parts: Sequence[WholePart | None]) -> tuple[Any, list[WholePart]] | None:
    """The ``pm_whole_part`` array of a native whole or one-sequence read of ``parts``,
    each filled once (every pointer in it stays valid while the parts are open, so a
    caller keeps it and asks :func:`program_ready` before each call); None where a part
    offers none."""
    found = [p for p in parts if p is not None]
    if len(found) != len(parts):
        return None
    array = ffi.new("pm_whole_part[]", len(found))
    for i, part in enumerate(found):
        part.fill(array[i])
    return array, found


def program_ready(program: tuple[Any, Sequence[WholePart]]) -> bool:
    """Whether every part of a :func:`whole_program` may take a native call now
    (:meth:`WholePart.ready`, which also refreshes the fields that follow the memory)."""
    array, parts = program
    for i, part in enumerate(parts):  # noqa: SIM110 (all() over a generator: +0.1 µs a call)
        if not part.ready(array[i]):
            return False
    return True


def native_parts_read(
    array: Any, parts: Sequence[WholePart], data: object, seq_id: int
) -> int | None:
    """One native read of ``parts`` (``array``: their filled ``pm_whole_part`` structs):
    the whole blob (``seq_id`` -1, :c:func:`pm_whole_read`) or one sequence's
    (:c:func:`pm_seq_read`), then what Python keeps (:meth:`WholePart.commit` /
    :meth:`WholePart.sequence_read`). The bytes consumed, or None with nothing changed
    where the call declines or ``data`` is not one buffer; StateError when the blob
    changed while it was restored."""
    try:
        src = ffi.from_buffer(data)
    except (TypeError, ValueError, BufferError):
        return None
    consumed = ffi.new("int64_t *")
    done = ffi.new("int32_t *")
    whole = seq_id == -1
    if whole:
        status = lib.pm_whole_read(array, len(parts), src, len(src), consumed, done)
    else:
        status = lib.pm_seq_read(array, len(parts), seq_id, src, len(src), consumed, done)
    for part in parts:  # (every check may have filled the scratch, declined or not)
        part.written()
    if status == lib.PM_ERR_RANGE:
        raise StateError("state plan: the blob changed while it was restored")
    check(status, "state read: whole memory" if whole else "state read: one sequence")
    if not done[0]:
        return None
    for i, part in enumerate(parts):
        if whole:
            part.commit(array[i])
        else:
            part.sequence_read(array[i])
    return int(consumed[0])
