"""Binds pymem to the process's one ggml, then loads the cffi extension.

Only this module imports the cffi ``lib``. ggml is resolved in this order:

1. a ggml already loaded in the process (for example by llama-cpp-python);
2. the directory named by ``PYMEM_GGML_LIB_DIR``;
3. the ggml built into this wheel from a source tree (``pymem/_ggml``, see vendor/ggml.cmake);
4. the ggml of an installed llama-cpp-python (``llama_cpp/lib``), so that importing
   ``llama_cpp`` afterwards reuses the same copy;
5. the CPU ggml of the ``libggml-python`` wheel.

The chosen libraries are made global (``RTLD_GLOBAL``) before the extension, which does
not link ggml, is imported; its undefined ggml symbols then resolve to that copy. Loading
a second copy under the same sonames is what breaks processes (reference/packaging.md).

Windows has no undefined symbols: the extension links ggml's import libraries and names
``ggml.dll`` / ``ggml-base.dll``. A DLL of that name already loaded in the process is the
one it gets (the loader matches loaded modules by name); otherwise the chosen directory is
put on the DLL search path (``os.add_dll_directory``) and the DLLs are loaded from it
before the extension, in the same order as above (libggml-python keeps them in ``bin/``).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymem.errors import GGMLBindingError, NativeError

GGML_MIN_VERSION = (0, 20, 0)
GGML_MAX_VERSION = (1, 0, 0)  # exclusive


def ggml_lib_names(platform: str = sys.platform) -> tuple[str, str]:
    """The file names of ggml's base and main libraries on ``platform`` (base first)."""
    if platform == "win32":
        return ("ggml-base.dll", "ggml.dll")
    if platform == "darwin":
        return ("libggml-base.0.dylib", "libggml.0.dylib")
    return ("libggml-base.so.0", "libggml.so.0")


_SONAMES = ggml_lib_names()
_WINDOWS = sys.platform == "win32"
_RTLD_NOLOAD = getattr(os, "RTLD_NOLOAD", 4)
_DLL_DIRS: list[Any] = []  # os.add_dll_directory handles, kept for the process's life


@dataclass(frozen=True)
class GGMLInfo:
    """Which ggml pymem bound and where it came from."""

    version: str
    commit: str
    source: str  # "process", "env", "bundled", "llama_cpp", "libggml-python"
    path: str  # directory of libggml-base
    backends: tuple[str, ...]


def _loaded_ggml_dir_windows() -> str | None:
    """Directory of a ggml-base.dll already loaded in this (Windows) process, if any."""
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.GetModuleHandleW.restype = ctypes.c_void_p
    handle = kernel32.GetModuleHandleW(_SONAMES[0])
    if not handle:
        return None
    buf = ctypes.create_unicode_buffer(32768)
    kernel32.GetModuleFileNameW(ctypes.c_void_p(handle), buf, len(buf))
    return os.path.dirname(buf.value) or "(already loaded)"


def _loaded_ggml_dir() -> str | None:
    """Directory of a libggml-base already mapped into this process, if any."""
    if _WINDOWS:
        return _loaded_ggml_dir_windows()
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith("libggml-base.so"):
                    return os.path.dirname(path)
    except OSError:
        pass
    for name in _SONAMES:
        try:
            ctypes.CDLL(name, mode=_RTLD_NOLOAD)
            return "(already loaded)"
        except OSError:
            continue
    return None


def _spec_dir(package: str, *sub: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *sub)


def _extension_dir() -> Path | None:
    """Where the compiled extension lives: beside this file, else in an installed pymem.

    Running ``python -m pymem`` from a source checkout after ``pip install .`` imports the
    checkout's ``pymem/`` (the current directory comes first on ``sys.path``), which has no
    compiled extension; the installed copy's extension is then used. None means "let the
    import system find it" (editable installs map it from their build directory).
    """
    here = Path(__file__).resolve().parent
    if any(here.glob("_pymem_cffi*")):
        return here
    for entry in sys.path:
        candidate = (Path(entry) if entry else Path.cwd()).resolve() / "pymem"
        if candidate != here and any(candidate.glob("_pymem_cffi*")):
            return candidate
    return None


_EXT_DIR = _extension_dir()


def _load_extension() -> Any:
    """Import ``pymem._pymem_cffi`` from :data:`_EXT_DIR` (or the import system)."""
    here = Path(__file__).resolve().parent
    if _EXT_DIR is None or here == _EXT_DIR:
        return importlib.import_module("pymem._pymem_cffi")
    path = next(_EXT_DIR.glob("_pymem_cffi*"))
    loader = importlib.machinery.ExtensionFileLoader("pymem._pymem_cffi", str(path))
    spec = importlib.util.spec_from_file_location("pymem._pymem_cffi", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["pymem._pymem_cffi"] = module
    return module


def _candidates() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    env = os.environ.get("PYMEM_GGML_LIB_DIR")
    if env:
        found.append(("env", Path(env)))
    found.append(("bundled", (_EXT_DIR or Path(__file__).resolve().parent) / "_ggml"))
    llama = _spec_dir("llama_cpp", "lib")
    if llama is not None:
        found.append(("llama_cpp", llama))
    libggml = _spec_dir("libggml")
    if libggml is not None:
        for sub in ("bin", "lib64", "lib") if _WINDOWS else ("lib64", "lib"):
            found.append(("libggml-python", libggml / sub))
    return found


def _has_ggml(directory: Path) -> bool:
    return all((directory / name).exists() for name in _SONAMES)


def _load_global(directory: Path) -> None:
    if _WINDOWS:
        # the extension's imports name the DLLs: let the loader find them in `directory`
        _DLL_DIRS.append(os.add_dll_directory(str(directory)))  # type: ignore[attr-defined]
        for name in _SONAMES:
            ctypes.CDLL(str(directory / name))
        return
    for name in _SONAMES:
        ctypes.CDLL(str(directory / name), mode=ctypes.RTLD_GLOBAL)


def _bind() -> tuple[str, str]:
    loaded = _loaded_ggml_dir()
    if loaded is not None and _WINDOWS:
        return "process", loaded  # the loader reuses the loaded DLLs by name
    if loaded is not None:
        for name in _SONAMES:
            # promote the process's copy to global scope without loading another
            try:
                ctypes.CDLL(
                    name if loaded.startswith("(") else os.path.join(loaded, name),
                    mode=_RTLD_NOLOAD | ctypes.RTLD_GLOBAL,
                )
            except OSError:
                ctypes.CDLL(name, mode=_RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        return "process", loaded
    env = os.environ.get("PYMEM_GGML_LIB_DIR")
    if env and not _has_ggml(Path(env)):
        raise GGMLBindingError(f"PYMEM_GGML_LIB_DIR={env!r}: no {' and '.join(_SONAMES)} there")
    for source, directory in _candidates():
        if _has_ggml(directory):
            try:
                _load_global(directory)
            except OSError as exc:
                raise GGMLBindingError(
                    f"loading ggml from {directory} ({source}) failed: {exc}"
                ) from exc
            return source, str(directory)
    raise GGMLBindingError(
        "no ggml found: install libggml-python (pip install libggml-python), install "
        "llama-cpp-python, or set PYMEM_GGML_LIB_DIR to a directory holding "
        f"{', '.join(_SONAMES)}"
    )


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


_source, _path = _bind()
try:
    _ext = _load_extension()
except ImportError as exc:
    if "No module named" in str(exc):
        raise GGMLBindingError(
            "pymem's compiled extension is missing: install pymem (pip install .) rather than "
            f"importing the source tree at {Path(__file__).resolve().parent}"
        ) from exc
    # undefined ggml symbols: a ggml older than the headers
    raise GGMLBindingError(
        f"pymem's extension does not fit the ggml bound from {_path} ({_source}): {exc}"
    ) from exc
ffi, lib = _ext.ffi, _ext.lib


def check_version(version: str, where: str) -> None:
    """Refuse a ggml outside ``[GGML_MIN_VERSION, GGML_MAX_VERSION)`` with a clear error."""
    parsed = _parse_version(version)
    if not (GGML_MIN_VERSION <= parsed < GGML_MAX_VERSION):
        raise GGMLBindingError(
            f"ggml version {version!r} from {where} is outside the supported range "
            f">= {'.'.join(map(str, GGML_MIN_VERSION))}, < {'.'.join(map(str, GGML_MAX_VERSION))}"
        )


_version = ffi.string(lib.ggml_version()).decode()
check_version(_version, f"{_path} ({_source})")

# make dynamically loadable backends (CUDA, Metal, Vulkan builds with GGML_BACKEND_DL) visible
if lib.ggml_backend_dev_count() == 0:
    lib.ggml_backend_load_all()

_STATUS_TEXT = {
    lib.PM_ERR_ARG: "invalid argument",
    lib.PM_ERR_RANGE: "out of range",
    lib.PM_ERR_MISMATCH: "tensor type or row size mismatch",
    lib.PM_ERR_ALLOC: "allocation failed",
    lib.PM_ERR_BACKEND: "backend call failed",
}


def check(status: int, what: str) -> None:
    """The one checker every pm_* return code passes through."""
    if status != lib.PM_OK:
        raise NativeError(f"{what}: {_STATUS_TEXT.get(status, f'status {status}')}")


def ggml_info() -> GGMLInfo:
    """Which ggml pymem is bound to: version, commit, where it came from, its backends."""
    backends = tuple(
        ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))).decode()
        for i in range(lib.ggml_backend_reg_count())
    )
    return GGMLInfo(
        version=_version,
        commit=ffi.string(lib.ggml_commit()).decode(),
        source=_source,
        path=_path,
        backends=backends,
    )


def cstr(ptr: Any) -> str:
    return "" if ptr == ffi.NULL else ffi.string(ptr).decode(errors="replace")


__all__ = ["GGMLInfo", "check", "cstr", "ffi", "ggml_info", "lib"]
