"""pymem's state container: one memory state (whole or one sequence) in a checksummed file.

Why: llama.cpp's session and sequence files (:mod:`pymem.sessions`) say nothing about the
model beyond an architecture name, nothing about the memory layout, and carry no checksum,
so a file from another model of the same architecture, or one damaged on disk, is found
out only when the state parse happens to fail, or not at all. A prefix cache that keeps
states on disk needs to know before it restores. The container wraps the very same state
bytes with what a reader must check first::

    0        u8[8]   magic "PYMEMST\\0"
    8        u32     format version (1)
    12       u32     header length H
    16       u8[H]   UTF-8 JSON header (ContainerHeader: kind, seq_id, flags, fingerprint,
                     memory layout, position ranges, tokens, payload_len)
    16+H     u8[P]   payload: mem.state_write(seq_id, flags), exactly as llama.cpp's bytes
    16+H+P   u8[32]  SHA-256 of every byte before it

Little-endian, no padding. The payload streams from the memory into the file while the
checksum is computed (no second copy of the state in memory). A read checks the magic,
the version, the header, the file size and the checksum before anything parses the
payload; :func:`load_container` also checks the model fingerprint and the memory layout,
and restores two-phase (parse, then commit), so every refused load changes nothing. Every
refusal is a :class:`~pymem.errors.StateError` that names the offset or the field.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, cast

import gguf
import numpy as np

from pymem.errors import ConfigError, StateError
from pymem.factory import memory_type
from pymem.kv import KVCache
from pymem.memory import Memory
from pymem.recurrent import RecurrentMemory
from pymem.state import StateReader

log = logging.getLogger(__name__)

MAGIC = b"PYMEMST\0"
VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
PREFIX_SIZE = _PREFIX.size
"""Where a container's JSON header starts."""
DIGEST_SIZE = 32  # SHA-256
_HEADER_MAX = 1 << 30  # a header longer than this is damage, not tokens

ContainerKind = Literal["whole", "sequence"]


@dataclass(frozen=True)
class ContainerHeader:
    """The JSON header of a container (what a reader checks before the payload).

    ``kind``: ``"whole"`` (``seq_id == -1``) or ``"sequence"`` (the sequence it was taken
    from). ``flags``: the state flags the payload was written with (restore with the
    same). ``fingerprint``: the model, as the writer's caller named it (e.g.
    :func:`model_fingerprint`). ``memory``: the layout (:func:`memory_layout`) of the
    memory that wrote it. ``pos``: ``seq_id -> (pos_min, pos_max)`` of every sequence in
    the state. ``payload_offset`` is where the payload starts in the file (not in JSON).
    """

    kind: ContainerKind
    seq_id: int
    flags: int
    fingerprint: str
    memory: dict[str, Any]
    pos: dict[int, tuple[int, int]]
    tokens: tuple[int, ...]
    payload_len: int
    payload_offset: int = field(default=0, compare=False)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def to_json(self) -> bytes:
        doc = {
            "kind": self.kind,
            "seq_id": self.seq_id,
            "flags": self.flags,
            "fingerprint": self.fingerprint,
            "memory": self.memory,
            "pos": {str(s): list(r) for s, r in sorted(self.pos.items())},
            "n_tokens": self.n_tokens,
            "tokens": list(self.tokens),
            "payload_len": self.payload_len,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, text: bytes | memoryview, payload_offset: int) -> ContainerHeader:
        """Parse and type-check a header (offsets in messages are the header's, 16)."""
        try:
            doc = json.loads(bytes(text).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError(
                f"container header at offset {_PREFIX.size}: not UTF-8 JSON ({exc})"
            ) from None
        if not isinstance(doc, dict):
            raise StateError(f"container header at offset {_PREFIX.size}: not a JSON object")

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in doc:
                raise StateError(f"container header: field {key!r} is missing")
            v = doc[key]
            if isinstance(v, bool) or not isinstance(v, kind):
                raise StateError(f"container header: field {key!r} has the wrong type: {v!r}")
            return v

        kind = get("kind", str)
        if kind not in ("whole", "sequence"):
            raise StateError(f"container header: kind {kind!r}, expected 'whole' or 'sequence'")
        seq_id, flags = get("seq_id", int), get("flags", int)
        if (kind == "whole") != (seq_id == -1) or seq_id < -1:
            raise StateError(f"container header: seq_id {seq_id} does not fit kind {kind!r}")
        if flags < 0:
            raise StateError(f"container header: flags {flags} < 0")
        tokens = get("tokens", list)
        if get("n_tokens", int) != len(tokens) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise StateError(
                f"container header: n_tokens {doc['n_tokens']} and tokens ({len(tokens)} "
                "entries) disagree, or a token is not an int"
            )
        pos: dict[int, tuple[int, int]] = {}
        for s, r in get("pos", dict).items():
            if not (s.lstrip("-").isdigit() and isinstance(r, list) and len(r) == 2):
                raise StateError(f"container header: pos entry {s!r}: {r!r} is not [min, max]")
            pos[int(s)] = (int(r[0]), int(r[1]))
        payload_len = get("payload_len", int)
        if payload_len < 0:
            raise StateError(f"container header: payload_len {payload_len} < 0")
        return cls(
            kind=kind,
            seq_id=seq_id,
            flags=flags,
            fingerprint=get("fingerprint", str),
            memory=get("memory", dict),
            pos=pos,
            tokens=tuple(tokens),
            payload_len=payload_len,
            payload_offset=payload_offset,
        )


# --- what the header says about the model and the memory ----------------------------------


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """``"<arch>:<32 hex digits>"``: the architecture and a SHA-256 over a GGUF file's
    metadata (every key and value, tokenizer included) and its tensors' names, types and
    shapes.

    Cheap (no tensor data is read). Two files with equal metadata and tensor shapes but
    different weights get the same fingerprint: a caller that needs to tell fine-tunes
    apart that share all metadata passes its own fingerprint instead.
    """
    try:
        reader = gguf.GGUFReader(os.fspath(path), "r")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"path: cannot read GGUF file {os.fspath(path)!r}: {exc}") from exc
    h = hashlib.sha256()
    arch = "unknown"
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):  # the container's own version and counts
            continue
        if name == "general.architecture":
            arch = bytes(fld.parts[fld.data[0]]).decode(errors="replace")
        h.update(b"".join(np.ascontiguousarray(p).tobytes() for p in fld.parts))
    for t in reader.tensors:
        h.update(f"{t.name}:{int(t.tensor_type)}:{[int(d) for d in t.shape]};".encode())
    return f"{arch}:{h.hexdigest()[:32]}"


def memory_layout(mem: Memory) -> dict[str, Any]:
    """The memory's type and, per part in serialisation order, what its state bytes
    depend on: KV ``n_stream``, ``v_trans``, K/V types and layers; recurrent R/S types
    and layers. ``size`` (cells) is informative: a state restores into any size that
    holds its cells."""
    parts: list[dict[str, Any]] = []
    for name, part in mem.parts().items():
        if isinstance(part, KVCache):
            parts.append(
                {
                    "name": name,
                    "kind": "kv",
                    "size": part.get_size(),
                    "n_stream": part.get_n_stream(),
                    "v_trans": part.v_trans,
                    "type_k": part.type_k.name,
                    "type_v": part.type_v.name,
                    "layers": part.get_layer_ids(),
                }
            )
        elif isinstance(part, RecurrentMemory):
            parts.append(
                {
                    "name": name,
                    "kind": "recurrent",
                    "size": part.size,
                    "type_r": part.type_r.name,
                    "type_s": part.type_s.name,
                    "layers": list(part.layers),
                }
            )
        else:
            raise ConfigError(f"mem: part {name!r} is neither a KVCache nor a RecurrentMemory")
    return {"type": memory_type(mem), "parts": parts}


def check_layout(have: Mapping[str, Any], mem: Memory) -> None:
    """Refuse a container layout (``header.memory``) that differs from ``mem``'s in
    anything but sizes: type, and per part its kind, layers, types, ``n_stream`` and
    ``v_trans`` (what the state bytes depend on)."""
    want = memory_layout(mem)
    if have.get("type") != want["type"]:
        raise StateError(
            f"container header: memory.type {have.get('type')!r}, this memory is {want['type']!r}"
        )
    parts = have.get("parts")
    if not isinstance(parts, list) or len(parts) != len(want["parts"]):
        raise StateError(
            f"container header: memory.parts {parts!r} do not match this memory's "
            f"{len(want['parts'])} parts"
        )
    for i, (a, b) in enumerate(zip(parts, want["parts"])):
        for key, value in b.items():
            if key == "size":
                continue
            if not isinstance(a, dict) or a.get(key) != value:
                got = a.get(key) if isinstance(a, dict) else a
                raise StateError(
                    f"container header: memory.parts[{i}].{key} is {got!r}, this memory has {value!r}"
                )


def _n_seq_max(mem: Memory) -> int:
    return max(int(cast(Any, p).n_seq_max) for p in mem.parts().values())


def _pos_ranges(mem: Memory, seq_id: int) -> dict[int, tuple[int, int]]:
    seqs = range(_n_seq_max(mem)) if seq_id == -1 else (seq_id,)
    out: dict[int, tuple[int, int]] = {}
    for s in seqs:
        hi = mem.seq_pos_max(s)
        if hi >= 0:
            out[s] = (mem.seq_pos_min(s), hi)
    return out


# --- writing ---------------------------------------------------------------------------


class _HashingFile(io.RawIOBase):
    """Writes through to ``f`` and hashes every byte on the way (no second copy)."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.f.write(data)
        n = memoryview(data).nbytes
        self.n += n
        return n


def write_body(f: BinaryIO, header_text: bytes, write_payload: Callable[[BinaryIO], object]) -> int:
    """Prefix, header, the payload ``write_payload`` streams, then the digest of it all; bytes
    written. The one place a container's layout is written (pymem.reuse.persist uses it)."""
    hf = _HashingFile(f)
    hf.write(_PREFIX.pack(MAGIC, VERSION, len(header_text)))
    hf.write(header_text)
    write_payload(cast(BinaryIO, hf))
    digest = hf.sha.digest()
    f.write(digest)
    return hf.n + len(digest)


def write_atomic(
    path: str | os.PathLike[str], header_text: bytes, write_payload: Callable[[BinaryIO], object]
) -> int:
    """:func:`write_body` into a temporary file beside ``path``, renamed into place once
    complete (readers never see half a container; a failure leaves no file behind)."""
    target = os.fspath(path)
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            n = write_body(f, header_text, write_payload)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


def write_container(
    path_or_file: str | os.PathLike[str] | BinaryIO,
    mem: Memory,
    seq_id: int = -1,
    flags: int = 0,
    *,
    fingerprint: str,
    tokens: Sequence[int] | np.ndarray = (),
) -> int:
    """Write ``mem``'s state (``seq_id`` -1: the whole memory) as a container; bytes written.

    A path is written to a temporary file beside it and renamed into place, so readers
    never see half a container. ``tokens``: the prompt the state holds (int32 ids).
    """
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ConfigError(f"fingerprint: a non-empty string naming the model, got {fingerprint!r}")
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if toks.size and (toks.min() < -(2**31) or toks.max() >= 2**31):
        raise StateError("tokens: ids must fit int32")
    header = ContainerHeader(
        kind="whole" if seq_id == -1 else "sequence",
        seq_id=int(seq_id),
        flags=int(flags),
        fingerprint=fingerprint,
        memory=memory_layout(mem),
        pos=_pos_ranges(mem, seq_id),
        tokens=tuple(int(t) for t in toks),
        payload_len=mem.state_size(seq_id, flags),
    )

    def payload(out: BinaryIO) -> None:
        n = mem.state_write_to(out, header.seq_id, header.flags)
        if n != header.payload_len:
            raise StateError(
                f"payload: the memory wrote {n} bytes, its state_size said {header.payload_len}"
            )

    if not isinstance(path_or_file, (str, os.PathLike)):
        return write_body(path_or_file, header.to_json(), payload)
    n = write_atomic(path_or_file, header.to_json(), payload)
    log.debug(
        "wrote %s: %d bytes, %s state, payload %d",
        os.fspath(path_or_file), n, header.kind, header.payload_len,
    )  # fmt: skip
    return n


# --- reading ---------------------------------------------------------------------------


def parse_container(data: bytes | bytearray | memoryview) -> tuple[ContainerHeader, memoryview]:
    """Check a whole container in memory; returns its header and a view of the payload.

    Checked in file order: magic (offset 0), version (8), header length (12), the header
    (16), the file size the header implies, then the SHA-256 over everything before the
    last 32 bytes. The payload itself is not parsed here.
    """
    buf = memoryview(data).cast("B")
    if len(buf) < _PREFIX.size:
        raise StateError(
            f"container: {len(buf)} bytes, truncated inside the {_PREFIX.size}-byte prefix"
        )
    magic, version, n_header = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise StateError(f"container: magic {magic!r} at offset 0, expected {MAGIC!r}")
    if version != VERSION:
        raise StateError(f"container: format version {version} at offset 8, pymem reads {VERSION}")
    start = _PREFIX.size
    if n_header > min(_HEADER_MAX, len(buf) - start):
        raise StateError(
            f"container: header length {n_header} at offset 12 runs past the end of the "
            f"file ({len(buf)} bytes): truncated or damaged"
        )
    header = ContainerHeader.from_json(buf[start : start + n_header], start + n_header)
    want = header.payload_offset + header.payload_len + DIGEST_SIZE
    if len(buf) != want:
        what = "truncated" if len(buf) < want else "bytes after the checksum"
        raise StateError(
            f"container: {len(buf)} bytes, the header's payload_len {header.payload_len} "
            f"(payload at offset {header.payload_offset}) makes {want}: {what}"
        )
    body = len(buf) - DIGEST_SIZE
    if hashlib.sha256(buf[:body]).digest() != bytes(buf[body:]):
        raise StateError(
            f"container: checksum mismatch: the SHA-256 at offset {body} does not match bytes "
            f"0..{body} (damaged file)"
        )
    return header, buf[header.payload_offset : body]


def read_container(
    path: str | os.PathLike[str],
) -> tuple[ContainerHeader, memoryview]:
    """Read and check a container file (see :func:`parse_container`)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse_container(data)
    except StateError as exc:
        raise StateError(f"{os.fspath(path)}: {exc}") from None


def load_container(
    path: str | os.PathLike[str],
    mem: Memory,
    seq_id: int | None = None,
    *,
    fingerprint: str | None = None,
) -> ContainerHeader:
    """Restore a container into ``mem``; returns its header. Nothing changes on failure.

    ``seq_id``: where a sequence container goes (default: the sequence it came from); a
    whole container restores the whole memory (``seq_id`` None or -1). ``fingerprint``:
    when given, a container of another model is refused. The memory's layout must match
    the container's in everything but sizes.
    """
    header, payload = read_container(path)
    where = os.fspath(path)
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise StateError(
            f"{where}: container header field fingerprint is {header.fingerprint!r}, this model "
            f"is {fingerprint!r} (a foreign model's state)"
        )
    try:
        check_layout(header.memory, mem)
    except StateError as exc:
        raise StateError(f"{where}: {exc}") from None
    if header.kind == "whole":
        if seq_id not in (None, -1):
            raise StateError(
                f"seq_id: {where} holds the whole memory; it restores with seq_id -1, not {seq_id}"
            )
        dest = -1
    else:
        dest = header.seq_id if seq_id is None else int(seq_id)
        if dest < 0:
            raise StateError(
                f"seq_id: {where} holds sequence {header.seq_id}; restore it into a sequence "
                f"id >= 0, not {dest}"
            )
    reader = StateReader(payload)
    try:
        plan = mem.state_read_parse(reader, dest, header.flags)
    except StateError as exc:
        raise StateError(f"{where}: payload at offset {header.payload_offset}: {exc}") from None
    if reader.remaining:
        raise StateError(
            f"{where}: payload: {reader.remaining} bytes left after the state at offset "
            f"{header.payload_offset + reader.offset}"
        )
    plan.commit()
    return header


__all__ = [
    "DIGEST_SIZE",
    "MAGIC",
    "VERSION",
    "ContainerHeader",
    "check_layout",
    "load_container",
    "memory_layout",
    "model_fingerprint",
    "parse_container",
    "read_container",
    "write_container",
]


def write_container_payload(
    path: str | os.PathLike[str],
    payload: bytes | bytearray | memoryview,
    mem: Memory,
    seq_id: int,
    flags: int,
    *,
    fingerprint: str,
    pos: Mapping[int, tuple[int, int]],
    tokens: Sequence[int] | np.ndarray = (),
) -> int:
    """Write state bytes already taken from ``mem`` (``mem.state_write(seq_id, flags)``
    earlier, e.g. a checkpoint's blob) as a container at ``path``; bytes written.

    ``mem`` gives the layout only (it must be the memory the bytes came from, or one laid
    out the same); ``pos``: ``seq_id -> (pos_min, pos_max)`` the state held when taken.
    Written beside ``path`` and renamed into place, as :func:`write_container`.
    """
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ConfigError(f"fingerprint: a non-empty string naming the model, got {fingerprint!r}")
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if toks.size and (toks.min() < -(2**31) or toks.max() >= 2**31):
        raise StateError("tokens: ids must fit int32")
    data = memoryview(payload).cast("B")
    header = ContainerHeader(
        kind="whole" if seq_id == -1 else "sequence",
        seq_id=int(seq_id),
        flags=int(flags),
        fingerprint=fingerprint,
        memory=memory_layout(mem),
        pos={int(s): (int(r[0]), int(r[1])) for s, r in pos.items()},
        tokens=tuple(int(t) for t in toks),
        payload_len=len(data),
    )
    return write_atomic(path, header.to_json(), lambda out: out.write(data))
