"""Checkpoints: what a sequence cannot get back by trimming, captured at one position.

Attention K/V can be trimmed to any prefix (``seq_rm(seq, pos, -1)``). Two kinds of state
cannot: a recurrent state summarises every token before it, and a sliding-window cache
drops cells once they leave the window. A :class:`Checkpoint` holds exactly those parts of
one sequence, as the memory's own ``PARTIAL_ONLY`` state bytes, at the position of the
last token folded in::

    memory part             trimmed on restore     held by the checkpoint
    full attention (KV)     yes: seq_rm(pos+1..)   no (still in the cache)
    SWA window (KV)         no                     yes: the window's cells
    recurrent (R/S)         no                     yes: the sequence's state rows

So a checkpoint costs the recurrent rows plus the window, never the whole context, and
restoring it is exact: the sequence's state equals the one it had when the checkpoint was
taken (the full-attention cells up to that position never changed). llama.cpp's server
keeps the same bytes per slot; here they are objects any runtime can hold.

Where the bytes live (``where``)::

    where      held in                              take                 restore
    "device"   a backend buffer on the memory's     state_write, one     parse the host
    (default)  device (one i8 tensor, a             parse that learns    metadata; payloads
               TensorStore of its own, or a range   the payload ranges,  copied device ->
               of a shared CheckpointArena)         one host -> device   device (tensor to
                                                    upload               tensor), then commit
    "host"     a Python ``bytes`` object            state_write          parse, commit

A device checkpoint keeps host RAM free (a server with many checkpoints on a GPU holds
them in the memory it was sized for) and frees its buffer at :meth:`Checkpoint.close`
(or ``with``), not when the garbage collector gets to it. Its restore is a device copy
that still goes through the memory's two-phase state read: at take, while the bytes are
on the host anyway, the blob is parsed once (:class:`~pymem.state.PayloadRecorder`) to
learn which byte ranges are tensor payloads; the checkpoint keeps the rest, the
metadata (headers, counts, cell records: e.g. 68 of 1,860 bytes for a hybrid's recurrent
rows), on the host. A restore parses and validates that metadata exactly as a host blob
(:class:`~pymem.state.DeviceBlobReader`: the payloads come out as
:class:`~pymem.state.DevicePayload` ranges of the device buffer), and only the commit
copies the payloads into the cache tensors (``pm_tensor_copy_runs``), so a restore that
fails still changes nothing and no payload byte passes through the host. A checkpoint
moved to a device later (:meth:`Checkpoint.to_device`) learns its ranges there when given
the memory (the prefix cache gives it, e.g. for a loaded cache), else at its first
restore, which reads the blob back once. A buffer that is host memory (the
CPU backend's) is parsed in place instead (:data:`ZERO_COPY_HOST`). One exception on a
device: transposed V (no flash attention) into many short runs of cells is read to the
host once and placed there (one backend copy per element would cost far more).
:meth:`Checkpoint.to_host` spills a checkpoint to host bytes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pymem.backend import Tensor, TensorSpec, TensorStore, get_device
from pymem.errors import ClosedError, ConfigError, RangeError, StateError
from pymem.hybrid import HybridMemory
from pymem.kv import KVCache, KVCacheISWA
from pymem.memory import Memory, StateFlags
from pymem.recurrent import RecurrentMemory
from pymem.spec import SWAType, window_start
from pymem.state import (
    BlobSplit,
    DeviceBlobReader,
    PayloadRecorder,
    SplitMismatch,
    StatePlan,
    StateReader,
)

Where = Literal["device", "host"]
WHERE: tuple[str, ...] = ("device", "host")


class CheckpointArena:
    """One device buffer that device checkpoints take byte ranges of (first fit, ranges
    rounded up to ``ALIGN`` bytes, neighbours merged when freed).

    Why: a buffer per checkpoint is one device allocation per take and one free per
    drop; on a GPU a free can wait for the device, in the middle of serving. A prefix
    cache with ``arena_bytes`` allocates once and reuses the ranges. A checkpoint that
    finds no free range large enough (full, or fragmented) gets a buffer of its own.
    """

    ALIGN = 64

    def __init__(self, device: str | None, nbytes: int) -> None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < self.ALIGN:
            raise ConfigError(f"arena nbytes: must be an int >= {self.ALIGN}, got {nbytes!r}")
        self.store = TensorStore(device, [TensorSpec("arena", "i8", (nbytes,))])
        self.tensor = self.store["arena"]
        self.capacity = nbytes
        self.used = 0  # bytes of the ranges handed out (rounded up)
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, size), by offset

    @property
    def device(self) -> str:
        return self.store.device.name

    def _span(self, n: int) -> int:
        # E.g. ALIGN 64: 996 -> 1024, 1024 -> 1024
        return -(-n // self.ALIGN) * self.ALIGN

    def alloc(self, n: int) -> int | None:
        """The offset of a free range of ``n`` bytes, or None when none is that large."""
        if self.store.closed:
            raise ClosedError("checkpoint arena: already closed")
        span = self._span(n)
        for i, (off, size) in enumerate(self._free):
            if size >= span:
                if size == span:
                    del self._free[i]
                else:
                    self._free[i] = (off + span, size - span)
                self.used += span
                return off
        return None

    def release(self, off: int, n: int) -> None:
        """Give the range at ``off`` back, merged with free neighbours."""
        span = self._span(n)
        self.used -= span
        free = self._free
        i = 0
        while i < len(free) and free[i][0] < off:
            i += 1
        free.insert(i, (off, span))
        if i + 1 < len(free) and off + span == free[i + 1][0]:  # merge the next one
            free[i] = (off, span + free.pop(i + 1)[1])
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:  # and the previous one
            prev = free[i - 1]
            free[i - 1] = (prev[0], prev[1] + free.pop(i)[1])

    def close(self) -> None:
        """Free the buffer; checkpoints still in it raise ClosedError when read."""
        self.store.close()


class Checkpoint:
    """The untrimmable state of sequence ``seq_id`` after the token at ``pos``.

    ``Checkpoint(seq_id, pos, blob, layout)`` holds ``blob`` in host memory;
    :func:`checkpoint` (``where="device"``) or :meth:`to_device` put the bytes in a buffer
    on a backend device. Either way :attr:`blob` gives the bytes back and :meth:`close`
    frees them now (idempotent); any use after that raises
    :class:`~pymem.errors.ClosedError`.
    """

    def __init__(self, seq_id: int, pos: int, blob: bytes, layout: tuple[str, ...]) -> None:
        self.seq_id = seq_id
        self.pos = pos
        self.layout = layout  # the memory parts the blob fits (see :func:`layout_of`)
        self._host: bytes | None = bytes(blob)
        self._store: TensorStore | None = None  # a buffer of its own, or
        self._slot: tuple[CheckpointArena, int] | None = None  # a range of an arena
        self._nbytes = len(self._host)
        self._closed = False
        # the blob's host metadata + payload ranges, once a parse has shown them: a device
        # checkpoint's restore parses these and copies the payloads device to device
        self._split: BlobSplit | None = None

    # --- where the bytes are ---------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the blob (the same wherever it is held; 0 after :meth:`close`)."""
        return 0 if self._closed else self._nbytes

    @property
    def host_nbytes(self) -> int:
        """Host bytes a device checkpoint keeps beside its buffer: the blob's metadata,
        parsed at restore (0 for host bytes, before the payload ranges are known, and
        after :meth:`close`). E.g. 68 for a 1,860-byte hybrid checkpoint."""
        if self._closed or self.where == "host" or self._split is None:
            return 0
        return len(self._split.meta)

    @property
    def where(self) -> Where:
        return "device" if self._store is not None or self._slot is not None else "host"

    @property
    def device(self) -> str:
        """The backend device holding the bytes (e.g. ``"CUDA0"``, ``"CPU"``), or
        ``"host"`` for a Python ``bytes`` object."""
        if self._slot is not None:
            return self._slot[0].device
        return self._store.device.name if self._store is not None else "host"

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"checkpoint of seq {self.seq_id} at pos {self.pos}: already closed")

    @property
    def blob(self) -> bytes:
        """The ``PARTIAL_ONLY`` state bytes (a device checkpoint reads them back: a copy)."""
        self._check_open()
        if self._host is not None:
            return self._host
        return bytes(self._read())

    def _read(self) -> bytes | bytearray:
        """The bytes, read from the device into one host buffer when they live there."""
        self._check_open()
        if self._host is not None:
            return self._host
        out = bytearray(self._nbytes)
        if self._slot is not None:
            arena, off = self._slot
            arena.tensor.read_into(out, off)
        else:
            assert self._store is not None
            self._store["blob"].read_into(out)
        return out

    def _held_in(self) -> tuple[Tensor, int] | None:
        """The tensor holding the bytes and their offset in it; None for host bytes.
        Raises :class:`~pymem.errors.ClosedError` when the buffer (or arena) was freed."""
        self._check_open()
        if self._slot is not None:
            arena, off = self._slot
            if arena.store.closed:
                raise ClosedError("checkpoint arena: already closed")
            return arena.tensor, off
        if self._store is not None:
            return self._store["blob"], 0
        return None

    def _reader(self) -> StateReader | None:
        """A reader that leaves the payload bytes where they are: over the buffer itself
        when it is host memory (a CPU backend buffer: zero copy, see
        :data:`ZERO_COPY_HOST`), else over the host metadata, handing out the payloads
        as device ranges. None for host bytes or while the payload ranges are unknown."""
        held = self._held_in()
        if held is None:
            return None
        tensor, off = held
        if ZERO_COPY_HOST and tensor.device.is_host:
            raw = tensor.host_view().reshape(-1).view(np.uint8)
            return StateReader(raw[off : off + self._nbytes].data)
        split = self._split
        if split is None or split.nbytes != self._nbytes:
            return None
        return DeviceBlobReader(split, tensor, off)

    def _free_device(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._slot is not None:
            arena, off = self._slot
            self._slot = None
            arena.release(off, self._nbytes)

    def to_device(
        self, device: str | None, arena: CheckpointArena | None = None, mem: Memory | None = None
    ) -> Checkpoint:
        """Move the bytes into a range of ``arena`` when it has one free, else a buffer of
        their own on ``device`` (a name; None: the default device, or the arena's),
        freeing the previous copy; returns ``self``. An empty blob (nothing to allocate)
        and a checkpoint already on that device stay as they are.

        With ``mem`` (a memory of this checkpoint's layout), the payload ranges are learned
        now from the host bytes (one parse, as at take), so even the first restore is a
        device copy; without it, or when that parse refuses the blob now, the first
        restore reads the blob back once and learns them."""
        self._check_open()
        if arena is not None:
            device = arena.device
        if self.where == "device" and (device is None or self.device == device):
            return self
        data = self._read()
        if not data:
            return self
        if mem is not None and self._split is None and not _parsed_in_place(device):
            self._learn_payloads(mem, data)
        off = arena.alloc(len(data)) if arena is not None else None
        if arena is not None and off is not None:
            try:
                arena.tensor.write_bytes(data, off)
            except BaseException:
                arena.release(off, len(data))
                raise
            self._free_device()
            self._slot, self._host = (arena, off), None
            return self
        store = TensorStore(device, [TensorSpec("blob", "i8", (len(data),))])
        try:
            store["blob"].write_bytes(data)
        except BaseException:
            store.close()
            raise
        self._free_device()
        self._store, self._host = store, None
        return self

    def _learn_payloads(self, mem: Memory, data: bytes | bytearray) -> None:
        """Record the blob's payload ranges from one parse of its host bytes for this
        sequence (changing nothing); a parse refused now (the layout differs, the cells
        would not fit at the moment) leaves them unknown."""
        if layout_of(mem) != self.layout:
            return
        recorder = PayloadRecorder(data)
        try:
            mem.state_read_parse(recorder, self.seq_id, StateFlags.PARTIAL_ONLY)
        except StateError:
            return
        self._split = recorder.split()

    def to_host(self) -> Checkpoint:
        """Spill the bytes to host memory and free the device buffer; returns ``self``."""
        self._check_open()
        if self.where == "device":
            self._host = bytes(self._read())
            self._free_device()
        return self

    def close(self) -> None:
        """Free the bytes now (the device buffer or range, or the host copy). Idempotent."""
        if not self._closed:
            self._free_device()
        self._host = None
        self._closed = True

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        held = "closed" if self._closed else f"{self._nbytes} bytes on {self.device}"
        return f"Checkpoint(seq_id={self.seq_id}, pos={self.pos}, {held})"


def memory_device(mem: Memory) -> str:
    """The device holding most of ``mem``'s buffers: where its checkpoints go by default.
    E.g. ``{"CUDA0": 96 MiB, "CPU": 2 MiB}`` (a few layers offloaded the other way) ->
    ``"CUDA0"``."""
    sizes = mem.memory_breakdown()
    if not sizes:
        return "CPU"
    return max(sizes.items(), key=lambda kv: kv[1])[0]


def layout_of(mem: Memory) -> tuple[str, ...]:
    """A short description of the memory's parts and sizes: a checkpoint fits only a memory
    with the same one. E.g. ``("kv:512x1", "recurrent:4+2")``."""
    out = []
    for name, part in mem.parts().items():
        if isinstance(part, KVCache):
            out.append(f"{name}:kv:{part.get_size()}x{part.get_n_stream()}")
        elif isinstance(part, RecurrentMemory):
            out.append(f"{name}:recurrent:{part.size}+{part.n_rs_seq}")
        else:
            out.append(f"{name}:{type(part).__name__}")
    return tuple(out)


def trimmed_parts(mem: Memory) -> list[KVCache]:
    """The full-attention caches a checkpoint does not hold (a restore trims them).

    A plain hybrid's attention cache, an iSWA cache's base cache; none for a plain KV cache
    (its ``PARTIAL_ONLY`` state is the whole sequence) or recurrent memory.
    """
    if isinstance(mem, HybridMemory):
        attn = mem.get_mem_attn()
        return [attn.get_base()] if isinstance(attn, KVCacheISWA) else [attn]
    if isinstance(mem, KVCacheISWA):
        return [mem.get_base()]
    return []


def needs_checkpoints(mem: Memory) -> bool:
    """Whether trimming a sequence can lose state: a recurrent part or a sliding window."""
    for part in mem.parts().values():
        if isinstance(part, RecurrentMemory):
            return True
        if isinstance(part, KVCache) and part.swa_type != SWAType.NONE:
            return True
    return False


def checkpoint(
    mem: Memory, seq_id: int, where: Where = "device", arena: CheckpointArena | None = None
) -> Checkpoint:
    """Capture ``seq_id``'s untrimmable state at its current position, held on the
    memory's device (``where="device"``, see :func:`memory_device`) or in host bytes
    (``"host"``). The state is written through the host either way (``state_write``); a
    device checkpoint then parses it once to learn its payload ranges (kept with its host
    metadata, so a restore copies the payloads device to device) and uploads it once
    (into a range of ``arena`` when given and it has room); the host copy is dropped."""
    if where not in WHERE:
        raise ConfigError(f"where: must be one of {WHERE}, got {where!r}")
    pos = mem.seq_pos_max(seq_id)
    if pos < 0:
        raise RangeError(f"seq_id = {seq_id}: the sequence is empty, nothing to checkpoint")
    blob = mem.state_write(seq_id, StateFlags.PARTIAL_ONLY)
    ck = Checkpoint(seq_id, pos, blob, layout_of(mem))
    if where == "device":
        device = arena.device if arena is not None else memory_device(mem)
        if not _parsed_in_place(device):
            # learn where the payloads lie while the bytes are on the host anyway (the
            # parse changes nothing); a restore then copies them device to device
            ck._learn_payloads(mem, blob)
        ck.to_device(device, arena)
    return ck


def _parsed_in_place(device: str | None) -> bool:
    """Whether a checkpoint on ``device`` is restored from its buffer in place (host
    memory, :data:`ZERO_COPY_HOST`) and so needs no payload ranges."""
    return ZERO_COPY_HOST and get_device(device).is_host


def restorable(mem: Memory, seq_id: int, pos: int) -> str:
    """Why a checkpoint at ``pos`` cannot be restored exactly into ``seq_id``'s cells, or
    "" when it can: every cache it leaves out (:func:`trimmed_parts`) must hold the
    sequence up to ``pos``, and one that slides must still hold the window of a token at
    ``pos + 1`` (the checkpoint does not bring those cells back)."""
    for part in trimmed_parts(mem):
        have = part.seq_pos_max(seq_id)
        if have < pos:
            return (
                f"sequence {seq_id}'s full-attention cells end at {have}; the checkpoint needs "
                f"them up to its position"
            )
        if part.swa_type != SWAType.NONE:
            need = min(window_start(part.swa_type, part.n_swa, pos + 1), pos)
            low = part.seq_pos_min(seq_id)
            if low > need:
                return (
                    f"the sliding window of a token at {pos + 1} starts at {need}, but "
                    f"sequence {seq_id}'s cells start at {low} (the checkpoint leaves them out)"
                )
    return ""


def restore_checkpoint(mem: Memory, seq_id: int, ckpt: Checkpoint) -> int:
    """Bring ``seq_id`` back to ``ckpt``: trim the full-attention cells after ``ckpt.pos`` and
    restore the recurrent / window state. Returns the position decoding continues from.

    ``seq_id`` may differ from the sequence the checkpoint was taken from, as long as its
    full-attention cells hold positions ``[0, ckpt.pos]`` of the same tokens (after a
    ``seq_cp``, say). Nothing changes unless every check passes: the layout matches, the
    full-attention cache still holds ``ckpt.pos``, a trimmed cache that slides (a hybrid
    whose attention cache has a window) still holds the window of a token at
    ``ckpt.pos + 1`` (see :func:`restorable`), and the blob parses.

    A device checkpoint is parsed from the metadata it keeps on the host and its payloads
    are copied device to device by the commit (see the module docstring): the two-phase
    read still makes a failed restore change nothing. A closed checkpoint (or arena)
    raises :class:`~pymem.errors.ClosedError` before anything is checked.
    """
    ckpt._check_open()
    if ckpt.layout != layout_of(mem):
        raise StateError(
            f"checkpoint: taken on a memory laid out as {ckpt.layout}, this one is {layout_of(mem)}"
        )
    trim = trimmed_parts(mem)
    why = restorable(mem, seq_id, ckpt.pos)
    if why:
        raise StateError(f"checkpoint at pos {ckpt.pos}: {why}")
    plan = _parse_for_restore(mem, seq_id, ckpt)
    for part in trim:
        if part.seq_pos_max(seq_id) > ckpt.pos:  # a cache-wide scan otherwise
            part.seq_rm(seq_id, ckpt.pos + 1, -1)
    plan.commit()
    return ckpt.pos + 1


def _parse_for_restore(mem: Memory, seq_id: int, ckpt: Checkpoint) -> StatePlan:
    """Parse ``ckpt`` for ``seq_id`` (changing nothing): a device checkpoint whose payload
    ranges are known from its host metadata, its payloads left on the device; otherwise
    (host bytes, ranges not known yet, or a parse that takes other ranges) the whole blob,
    read to the host, learning the ranges for the next restore of a device checkpoint."""
    reader = ckpt._reader()
    if reader is not None:
        try:
            return mem.state_read_parse(reader, seq_id, StateFlags.PARTIAL_ONLY)
        except SplitMismatch:
            pass  # nothing changed: parse the whole blob, which names any real problem
    recorder = PayloadRecorder(ckpt._read())
    plan = mem.state_read_parse(recorder, seq_id, StateFlags.PARTIAL_ONLY)
    if ckpt.where == "device":
        ckpt._split = recorder.split()
    return plan


ZERO_COPY_HOST = True
"""A checkpoint whose buffer is host memory (the CPU backend's) is parsed in place: its
payloads are memoryviews of that buffer, written like a host blob's (one native call
for every K/V layer), with no copy of their own. Tests turn it off to drive the
device-copy path (:class:`~pymem.state.DeviceBlobReader`) on a CPU-only machine."""
