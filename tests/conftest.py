"""Shared pytest fixtures: every test that takes ``device`` runs on every ggml device."""

from __future__ import annotations

import os

import pytest


def _device_names() -> list[str]:
    import pymem

    names = [d.name for d in pymem.devices()]
    only = os.environ.get("PYMEM_TEST_DEVICES")
    if only:
        names = [n for n in names if n in only.split(",")]
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _device_names())
