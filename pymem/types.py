"""The ggml type table: name, block size, type size, row sizes, for every ggml type.

Read from the bound ggml at import, so it always matches the library in the process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pymem._native import ffi, lib
from pymem.errors import TypeSpecError


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type. ``block_size`` elements are stored in ``type_size`` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int
    is_quantized: bool

    def row_size(self, n: int) -> int:
        """Bytes of a row of ``n`` elements (``ggml_row_size``); ``n`` must fill whole blocks."""
        if n % self.block_size:
            raise TypeSpecError(
                f"width {n} is not a multiple of the block size {self.block_size} of type {self.name}"
            )
        return n // self.block_size * self.type_size

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """The numpy dtype of one element, or None for block-quantised types."""
        return _NUMPY.get(self.name)

    def __str__(self) -> str:
        return self.name


_NUMPY: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "f64": np.dtype(np.float64),
    "i8": np.dtype(np.int8),
    "i16": np.dtype(np.int16),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
}


def _build_table() -> dict[str, GGMLType]:
    table: dict[str, GGMLType] = {}
    for tid in range(lib.GGML_TYPE_COUNT):
        block = lib.ggml_blck_size(tid)
        if block <= 0:  # ids of removed types (q4_2, q4_3, ...)
            continue
        name = ffi.string(lib.ggml_type_name(tid)).decode()
        table[name] = GGMLType(
            tid, name, int(block), int(lib.ggml_type_size(tid)), bool(lib.ggml_is_quantized(tid))
        )
    return table


TYPES: dict[str, GGMLType] = _build_table()
_BY_ID: dict[int, GGMLType] = {t.id: t for t in TYPES.values()}


def ggml_type(value: str | int | GGMLType) -> GGMLType:
    """Look up a ggml type by name (``"f16"``, ``"q8_0"``, case-insensitive) or id."""
    if isinstance(value, GGMLType):
        return value
    if isinstance(value, str):
        found = TYPES.get(value.lower())
        if found is None:
            raise TypeSpecError(
                f"type: unknown ggml type {value!r}; known: {', '.join(sorted(TYPES))}"
            )
        return found
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        found = _BY_ID.get(int(value))
        if found is None:
            raise TypeSpecError(f"type: unknown ggml type id {value} (valid ids: {sorted(_BY_ID)})")
        return found
    raise TypeSpecError(f"type: expected a ggml type name or id, got {value!r}")
