"""llama.cpp's state files and context blobs, read and written over any pymem memory.

pymem's memories already write and read the bytes of llama.cpp's memory module; this module
adds what ``llama_context`` puts around them, so a runtime can continue a prompt cache that
llama.cpp (or llama-cpp-python) saved and hand one back::

    context blob  (llama_state_get_data, Llama.save_state().llama_state)
        u32 len | arch name (len bytes) | memory state, whole
    session file  (llama_state_save_file)
        u32 'ggsn' 0x6767736e | u32 version 10 | u32 n_token | i32 token[n_token] | context blob
    sequence file (llama_state_seq_save_file)
        u32 'ggsq' 0x67677371 | u32 version 3  | u32 n_token | i32 token[n_token] | memory state, one sequence
    sequence blob (llama_state_seq_get_data)
        u32 0xaf143cd8 | i32 seq_id it was taken from | memory state, one sequence

Everything is little-endian with no padding. The reference checks the architecture name of
a context blob (and nothing else about the model); pymem does the same, and like every
pymem restore, a file or blob that fails any check (magic, version, token count, arch, the
memory part, bytes left over) raises :class:`~pymem.errors.StateError` naming the offset
and changes nothing.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np

from pymem.errors import StateError
from pymem.memory import Memory
from pymem.state import Progress, StateReader

SESSION_MAGIC = 0x6767736E  # 'ggsn'
SESSION_VERSION = 10
SEQ_MAGIC = 0x67677371  # 'ggsq'
SEQ_VERSION = 3
SEQ_BLOB_MAGIC = 0xAF143CD8  # llama_context's io_magic before a sequence blob
_ARCH_MAX = 256  # longer than any architecture name the reference knows

FileKind = Literal["session", "sequence"]
_KINDS: dict[int, tuple[FileKind, int]] = {
    SESSION_MAGIC: ("session", SESSION_VERSION),
    SEQ_MAGIC: ("sequence", SEQ_VERSION),
}


@dataclass(frozen=True)
class FileHeader:
    """What precedes the state in a session or sequence file."""

    kind: FileKind
    version: int
    tokens: np.ndarray  # int32 [n_token]: the prompt the state holds
    state_offset: int  # bytes before the state (the context blob or the sequence state)


def read_header(data: bytes | bytearray | memoryview) -> FileHeader:
    """Parse a session or sequence file's header (magic, version, tokens)."""
    buf = memoryview(data)
    if len(buf) < 12:
        raise StateError(f"state file: {len(buf)} bytes, shorter than the 12-byte header")
    magic, version, n_token = struct.unpack_from("<III", buf, 0)
    if magic not in _KINDS:
        raise StateError(
            f"state file: magic {magic:#010x} at offset 0 is neither 'ggsn' ({SESSION_MAGIC:#010x}, "
            f"session) nor 'ggsq' ({SEQ_MAGIC:#010x}, sequence)"
        )
    kind, want = _KINDS[magic]
    if version != want:
        raise StateError(f"{kind} file: version {version} at offset 4, pymem reads version {want}")
    end = 12 + 4 * n_token
    if end > len(buf):
        raise StateError(
            f"{kind} file: n_token {n_token} at offset 8 needs {end} bytes, the file has {len(buf)}"
        )
    tokens = np.frombuffer(buf, dtype="<i4", count=n_token, offset=12).astype(np.int32)
    return FileHeader(kind, version, tokens, end)


def _header(kind: FileKind, tokens: Sequence[int] | np.ndarray) -> bytes:
    toks = np.asarray(tokens, dtype=np.int64)
    if toks.ndim != 1:
        raise StateError(f"tokens: one token id per entry, got shape {toks.shape}")
    if toks.size and (toks.min() < -(2**31) or toks.max() >= 2**31):
        raise StateError("tokens: ids must fit int32")
    magic, version = (
        (SESSION_MAGIC, SESSION_VERSION) if kind == "session" else (SEQ_MAGIC, SEQ_VERSION)
    )
    return struct.pack("<III", magic, version, toks.size) + toks.astype("<i4").tobytes()


def _arch_bytes(arch: str) -> bytes:
    name = arch.encode()
    if not name or len(name) > _ARCH_MAX:
        raise StateError(f"arch: a model architecture name (1..{_ARCH_MAX} bytes), got {arch!r}")
    return struct.pack("<I", len(name)) + name


# --- context blobs (llama_state_get_data / llama_state_set_data) ------------------------


def context_state(mem: Memory, arch: str) -> bytes:
    """``llama_state_get_data``: the architecture name, then the whole memory state."""
    return _arch_bytes(arch) + mem.state_write()


def _read_arch(reader: StateReader, arch: str, where: str) -> None:
    at = reader.offset
    n = reader.read_u32(f"{where}: arch name length")
    if n > _ARCH_MAX:
        raise StateError(f"{where}: arch name length {n} at offset {at} exceeds {_ARCH_MAX}")
    got = bytes(reader.read_view(n, f"{where}: arch name")).decode(errors="replace")
    if got != arch:
        raise StateError(f"{where}: wrong model arch {got!r} at offset {at + 4}, expected {arch!r}")


def load_context_state(mem: Memory, data: bytes | bytearray | memoryview, arch: str) -> int:
    """``llama_state_set_data``: check the architecture, restore the whole memory.

    Returns the bytes consumed. Nothing changes unless every check passed.
    """
    reader = StateReader(data)
    _read_arch(reader, arch, "context state")
    mem.state_read_parse(reader, -1, 0).commit()
    return reader.offset


# --- sequence blobs (llama_state_seq_get_data / llama_state_seq_set_data) ---------------


def seq_state(mem: Memory, seq_id: int, flags: int = 0) -> bytes:
    """``llama_state_seq_get_data``: the blob magic, ``seq_id``, then that sequence's state."""
    return struct.pack("<Ii", SEQ_BLOB_MAGIC, seq_id) + mem.state_write(seq_id, flags)


def load_seq_state(
    mem: Memory, data: bytes | bytearray | memoryview, seq_id: int, flags: int = 0
) -> int:
    """``llama_state_seq_set_data``: restore a sequence blob into ``seq_id`` (any source id).

    Returns the bytes consumed; nothing changes unless every check passed.
    """
    reader = StateReader(data)
    magic = reader.read_u32("sequence blob magic")
    if magic != SEQ_BLOB_MAGIC:
        raise StateError(
            f"sequence blob: magic {magic:#010x} at offset 0, expected {SEQ_BLOB_MAGIC:#010x}"
        )
    reader.read_i32("sequence blob source seq_id")
    mem.state_read_parse(reader, seq_id, flags).commit()
    return reader.offset


# --- session and sequence files ------------------------------------------------------------


def save_session(
    path: str | os.PathLike[str],
    mem: Memory,
    arch: str,
    tokens: Sequence[int] | np.ndarray,
    progress: Progress | None = None,
) -> int:
    """``llama_state_save_file``: the prompt ``tokens`` and the context state; bytes written.

    The memory state streams into the file (no second copy of it in memory);
    ``progress(done, total)`` reports the state's bytes as they are written.
    """
    with open(path, "wb") as f:
        return _write_file(f, "session", tokens, mem, -1, arch, progress)


def save_sequence(
    path: str | os.PathLike[str],
    mem: Memory,
    seq_id: int,
    tokens: Sequence[int] | np.ndarray,
    progress: Progress | None = None,
) -> int:
    """``llama_state_seq_save_file``: the prompt ``tokens`` and sequence ``seq_id``'s state."""
    with open(path, "wb") as f:
        return _write_file(f, "sequence", tokens, mem, seq_id, None, progress)


def _write_file(
    f: BinaryIO,
    kind: FileKind,
    tokens: Sequence[int] | np.ndarray,
    mem: Memory,
    seq_id: int,
    arch: str | None,
    progress: Progress | None,
) -> int:
    n = f.write(_header(kind, tokens))
    if arch is not None:
        n += f.write(_arch_bytes(arch))
    return n + mem.state_write_to(f, seq_id, 0, progress)


def load_session(
    path: str | os.PathLike[str], mem: Memory, arch: str, progress: Progress | None = None
) -> np.ndarray:
    """``llama_state_load_file``: restore the whole memory; returns the prompt tokens.

    The file must be a session file of this architecture whose state is consumed exactly.
    ``progress(done, total)`` reports the file's bytes as they are read.
    """
    return _load(path, mem, "session", -1, arch, progress)


def load_sequence(
    path: str | os.PathLike[str], mem: Memory, seq_id: int, progress: Progress | None = None
) -> np.ndarray:
    """``llama_state_seq_load_file``: restore ``seq_id`` from a sequence file; returns its
    prompt tokens. The sequence state must fill the rest of the file exactly."""
    return _load(path, mem, "sequence", seq_id, None, progress)


def _load(
    path: str | os.PathLike[str],
    mem: Memory,
    kind: FileKind,
    seq_id: int,
    arch: str | None,
    progress: Progress | None,
) -> np.ndarray:
    with open(path, "rb") as f:
        whole = StateReader.from_file(f, progress)
    data = whole.read_view(whole.remaining, "file")
    head = read_header(data)
    if head.kind != kind:
        raise StateError(f"{os.fspath(path)}: a {head.kind} file, expected a {kind} file")
    reader = StateReader(data[head.state_offset :])
    if arch is not None:
        _read_arch(reader, arch, kind)
    plan = mem.state_read_parse(reader, seq_id, 0)
    if reader.remaining:
        raise StateError(
            f"{kind} file: {reader.remaining} bytes left after the state at offset "
            f"{head.state_offset + reader.offset}"
        )
    plan.commit()
    return head.tokens
