"""Typed access to a GGUF file's metadata with the reference's key-type rules.

Why: ``llama_model_loader::get_key`` refuses a key of the wrong GGUF type and
``get_key_or_arr`` a per-layer array of the wrong length; reading keys through one class
makes every architecture's loader throw where the reference throws, with the key named.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import gguf

from pymem.errors import ConfigError

LLAMA_MAX_LAYERS = 512

# GGUF value type ids (gguf.GGUFValueType) the reference's GKV<T> accepts per C++ type
_GT_U32, _GT_I32, _GT_F32, _GT_BOOL, _GT_STRING, _GT_ARRAY = 4, 5, 6, 7, 8, 9
_GT_NAMES = {
    0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool",
    8: "str", 9: "arr", 10: "u64", 11: "i64", 12: "f64",
}  # fmt: skip


class GGUFMeta:
    """Typed access to a GGUF file's key/value metadata, with the reference's type rules."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            reader = gguf.GGUFReader(os.fspath(path), "r")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"path: cannot read GGUF file {os.fspath(path)!r}: {exc}") from exc
        self.path = os.fspath(path)
        self._fields = reader.fields
        self._tensors = {t.name: t for t in reader.tensors}
        self.arch = self.str_req("general.architecture")

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def small_tensor(self, name: str) -> tuple[float, ...] | None:
        """The values of a small 1-D float tensor (RoPE factors), or None when absent.

        The only tensor data memory needs: everything else stays unread.
        """
        t = self._tensors.get(name)
        if t is None:
            return None
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise ConfigError(
                f"{self.path}: tensor {name} has type {t.tensor_type.name}; expected F32 or F16"
            )
        return tuple(float(x) for x in t.data.reshape(-1))

    def k(self, suffix: str) -> str:
        """The arch-prefixed key name, e.g. ``"block_count"`` -> ``"llama.block_count"``."""
        return f"{self.arch}.{suffix}"

    def _field(self, key: str) -> Any | None:
        return self._fields.get(key)

    def _scalar(self, key: str, gt: int, required: bool) -> Any:
        f = self._field(key)
        if f is None:
            if required:
                raise ConfigError(f"{self.path}: key not found in model: {key}")
            return None
        found = int(f.types[0])
        if found != gt:
            raise ConfigError(
                f"{self.path}: key {key} has wrong type {_GT_NAMES.get(found, found)} "
                f"but expected type {_GT_NAMES[gt]}"
            )
        return f.contents()

    def u32_opt(self, key: str) -> int | None:
        v = self._scalar(key, _GT_U32, False)
        return None if v is None else int(v)

    def u32(self, key: str, default: int) -> int:
        v = self.u32_opt(key)
        return default if v is None else v

    def u32_req(self, key: str) -> int:
        return int(self._scalar(key, _GT_U32, True))

    def f32_opt(self, key: str) -> float | None:
        v = self._scalar(key, _GT_F32, False)
        return None if v is None else float(v)

    def f32(self, key: str, default: float) -> float:
        v = self.f32_opt(key)
        return default if v is None else v

    def bool_(self, key: str, default: bool) -> bool:
        v = self._scalar(key, _GT_BOOL, False)
        return default if v is None else bool(v)

    def str_(self, key: str, default: str) -> str:
        v = self._scalar(key, _GT_STRING, False)
        return default if v is None else str(v)

    def str_req(self, key: str) -> str:
        return str(self._scalar(key, _GT_STRING, True))

    def is_array(self, key: str) -> bool:
        f = self._field(key)
        return f is not None and int(f.types[0]) == _GT_ARRAY

    def int_array(self, key: str, *, allow_bool: bool = False) -> list[int] | None:
        """An int (u32/i32, or bool where the reference reads into an int array) array."""
        f = self._field(key)
        if f is None or int(f.types[0]) != _GT_ARRAY:
            return None
        elem = int(f.types[1]) if len(f.types) > 1 else _GT_U32
        ok = (_GT_U32, _GT_I32, _GT_BOOL) if allow_bool else (_GT_U32, _GT_I32)
        if elem not in ok:
            raise ConfigError(
                f"{self.path}: {key} has wrong array element type {_GT_NAMES.get(elem, elem)}"
            )
        if len(f.contents()) > LLAMA_MAX_LAYERS:
            raise ConfigError(
                f"{self.path}: array length {len(f.contents())} for key {key} exceeds max {LLAMA_MAX_LAYERS}"
            )
        return [int(x) for x in f.contents()]

    def u32_or_arr(self, key: str, n: int, default: Sequence[int]) -> list[int]:
        """``get_key_or_arr``: a scalar broadcast to ``n`` layers, or an array of length ``n``."""
        f = self._field(key)
        if f is None:
            return list(default)
        if int(f.types[0]) == _GT_ARRAY:
            arr = self.int_array(key)
            assert arr is not None
            if len(arr) != n:
                raise ConfigError(
                    f"{self.path}: key {key} has wrong array length; expected {n}, got {len(arr)}"
                )
            return arr
        return [self.u32_req(key)] * n
