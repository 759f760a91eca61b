"""How pymem/_native.py finds ggml per platform (Linux runs here; the Windows path is
exercised with the OS calls replaced, since no Windows machine runs these tests).

Windows: the extension links ggml's import libraries, so the binding must put the chosen
directory on the DLL search path before importing it, look in libggml-python's ``bin/``
first (its wheel keeps the DLLs there), and reuse a ggml-base.dll already in the process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import pymem._native as native


def test_library_names_per_platform() -> None:
    assert native.ggml_lib_names("win32") == ("ggml-base.dll", "ggml.dll")
    assert native.ggml_lib_names("darwin") == ("libggml-base.0.dylib", "libggml.0.dylib")
    assert native.ggml_lib_names("linux") == ("libggml-base.so.0", "libggml.so.0")


def test_windows_searches_bin_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    libggml = tmp_path / "libggml"
    monkeypatch.setattr(native, "_WINDOWS", True)
    monkeypatch.setattr(
        native, "_spec_dir", lambda pkg, *sub: libggml if pkg == "libggml" else None
    )
    monkeypatch.delenv("PYMEM_GGML_LIB_DIR", raising=False)
    dirs = [d for src, d in native._candidates() if src == "libggml-python"]
    assert dirs == [libggml / "bin", libggml / "lib64", libggml / "lib"]
    monkeypatch.setattr(native, "_WINDOWS", False)
    dirs = [d for src, d in native._candidates() if src == "libggml-python"]
    assert dirs == [libggml / "lib64", libggml / "lib"]


def test_windows_load_puts_the_directory_on_the_dll_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(native, "_WINDOWS", True)
    monkeypatch.setattr(native, "_SONAMES", native.ggml_lib_names("win32"))
    monkeypatch.setattr(native, "_DLL_DIRS", [])
    monkeypatch.setattr(
        native.os, "add_dll_directory", lambda d: calls.append(("dir", d)) or d, raising=False
    )
    monkeypatch.setattr(native.ctypes, "CDLL", lambda path, *a, **k: calls.append(("load", path)))
    native._load_global(tmp_path)
    assert calls == [
        ("dir", str(tmp_path)),
        ("load", str(tmp_path / "ggml-base.dll")),
        ("load", str(tmp_path / "ggml.dll")),
    ]
    kept = native._DLL_DIRS
    assert kept == [str(tmp_path)]  # the handle stays alive


def test_windows_reuses_a_loaded_ggml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_WINDOWS", True)
    monkeypatch.setattr(native, "_loaded_ggml_dir", lambda: r"C:\\llama_cpp\\lib")
    monkeypatch.setattr(native.ctypes, "CDLL", lambda *a, **k: pytest.fail("loaded a second ggml"))
    assert native._bind() == ("process", r"C:\\llama_cpp\\lib")
