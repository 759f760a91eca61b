"""Typed exceptions raised by pymem.

Every caller mistake raises one of these before anything changes; the message names the
argument, the value and the limit. Internal invariants use ``assert`` instead.
"""

from __future__ import annotations


class PymemError(Exception):
    """Base class of every error pymem raises on purpose."""


class GGMLBindingError(PymemError, ImportError):
    """No usable ggml could be bound, or the bound ggml is outside the supported range."""


class NativeError(PymemError, RuntimeError):
    """A native (C layer or ggml) call failed."""


class DeviceError(PymemError, ValueError):
    """An unknown device name, or a device that cannot do what was asked."""


class OutOfMemoryError(PymemError, MemoryError):
    """An allocation larger than the device (or its buffer type) can hold."""


class TypeSpecError(PymemError, ValueError):
    """An unknown ggml type, or a width that does not fit the type's block size."""


class RangeError(PymemError, IndexError):
    """A row, offset, cell or sequence id outside its valid range."""


class ClosedError(PymemError, RuntimeError):
    """An operation on a store or memory that was already closed."""


class BatchError(PymemError, ValueError):
    """A batch the validating allocator refuses (the reference's decode returns -1)."""


class ConfigError(PymemError, ValueError):
    """An invalid memory or layer configuration."""


class StateError(PymemError, ValueError):
    """A state blob that cannot be restored into this memory.

    Raised before anything is changed: a failed restore leaves the memory as it was.
    """


class UnsupportedError(PymemError, NotImplementedError):
    """An operation the configuration does not support (e.g. K-shift with M-RoPE)."""
