"""Constants, errors and small helpers shared by the executable spec.

The spec is a second, deliberately naive implementation of llama.cpp's memory
bookkeeping (the version vendored by llama-cpp-python 0.3.36), written from
/work/shared/reference/llama-cpp-memory.md and the reference source. It shares no code
with ``pymem``: plain lists, sets and loops, one cell at a time, so that a reader can
hold it beside ``llama-kv-cache.cpp`` and check it line by line.
"""

from __future__ import annotations

import enum

LLAMA_MAX_SEQ = 256
LLAMA_TOKEN_NULL = -1
I32_MAX = 2**31 - 1

STATE_SEQ_MAGIC = 0xAF143CD8

FLAG_PARTIAL_ONLY = 1
FLAG_ON_DEVICE = 2


class SpecError(Exception):
    """Base of everything the spec raises on purpose."""


class SpecBatchError(SpecError):
    """A batch the reference refuses in ``llama_batch_allocr::init`` (decode returns -1)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class SpecStateError(SpecError):
    """A blob the memory cannot restore (the reference's "failed to restore kv cache")."""


class SpecAbort(SpecError):
    """A case where the reference asserts, aborts or has undefined behaviour.

    pymem must raise a typed error (``PymemError``) here instead of crashing.
    """


class SwaType(enum.IntEnum):
    NONE = 0
    STANDARD = 1
    CHUNKED = 2
    SYMMETRIC = 3


class Status(enum.IntEnum):
    SUCCESS = 0
    NO_UPDATE = 1
    FAILED_PREPARE = 2
    FAILED_COMPUTE = 3


def status_combine(s0: Status, s1: Status) -> Status:
    """``llama_memory_status_combine``: first failure wins, else any SUCCESS, else NO_UPDATE."""
    has_update = False
    for s in (s0, s1):
        if s in (Status.FAILED_PREPARE, Status.FAILED_COMPUTE):
            return s
        if s == Status.SUCCESS:
            has_update = True
    return Status.SUCCESS if has_update else Status.NO_UPDATE


def is_masked_swa(n_swa: int, swa_type: int, p0: int, p1: int) -> bool:
    """``llama_hparams::is_masked_swa``, with C integer division (positions are >= 0)."""
    if swa_type == SwaType.NONE:
        return False
    if swa_type == SwaType.STANDARD:
        return p1 - p0 >= n_swa
    if swa_type == SwaType.CHUNKED:
        if n_swa == 0:
            raise SpecAbort("chunked SWA with n_swa = 0 divides by zero")
        chunk_start = c_div(p1, n_swa) * n_swa
        return p0 < chunk_start
    if swa_type == SwaType.SYMMETRIC:
        half = c_div(n_swa, 2)
        diff = p1 - p0
        return diff < -half or diff > half
    raise SpecAbort(f"unknown swa_type {swa_type}")


def c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    if b == 0:
        raise SpecAbort("integer division by zero")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def pad_to(x: int, n: int) -> int:
    """``GGML_PAD``: round up to a multiple of n."""
    return ((x + n - 1) // n) * n


# ggml types the spec knows: name -> (ggml type id, block size, bytes per block)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "f32": (0, 1, 4),
    "f16": (1, 1, 2),
    "q4_0": (2, 32, 18),
    "q4_1": (3, 32, 20),
    "q5_0": (6, 32, 22),
    "q5_1": (7, 32, 24),
    "q8_0": (8, 32, 34),
    "iq4_nl": (20, 32, 18),
    "bf16": (30, 1, 2),
}


def type_id(name: str) -> int:
    return GGML_TYPES[name][0]


def type_size(name: str) -> int:
    """``ggml_type_size``: bytes per block."""
    return GGML_TYPES[name][2]


def is_quantized(name: str) -> bool:
    return GGML_TYPES[name][1] > 1


def row_size(name: str, n: int) -> int:
    """``ggml_row_size``: bytes of ``n`` elements (n a multiple of the block size)."""
    _, blck, size = GGML_TYPES[name]
    if n % blck:
        raise SpecAbort(f"{n} elements are not a multiple of the {name} block size {blck}")
    return size * n // blck


def norm_range(p0: int, p1: int) -> tuple[int, int]:
    """``p0 < 0`` means 0, ``p1 < 0`` means +infinity (INT32_MAX)."""
    if p0 < 0:
        p0 = 0
    if p1 < 0:
        p1 = I32_MAX
    return p0, p1
