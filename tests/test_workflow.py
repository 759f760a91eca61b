"""The hosted-CI workflow (.github/workflows/wheels.yml) and the wheel check (.ci/wheel)
stay runnable: the backend matrix the README promises is there, and every test file they
name exists (a renamed test would otherwise break a job this project's CI never runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML: a dependency of gguf

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "wheels.yml"


def _jobs() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    return doc["jobs"]


def _runs(job: dict) -> str:
    return "\n".join(str(step.get("run", "")) for step in job["steps"])


def test_backend_matrix() -> None:
    jobs = _jobs()
    assert set(jobs["cpu"]["strategy"]["matrix"]["os"]) == {
        "ubuntu-latest",
        "macos-latest",
        "windows-latest",
    }
    cuda_env = {k: v for step in jobs["cuda"]["steps"] for k, v in step.get("env", {}).items()}
    assert "-DGGML_CUDA=on" in cuda_env["CMAKE_ARGS"]
    assert cuda_env["PYMEM_GGML_SOURCE_DIR"].endswith("vendor/llama.cpp/ggml")
    assert jobs["metal"]["runs-on"].startswith("macos")
    metal_env = {k: v for step in jobs["metal"]["steps"] for k, v in step.get("env", {}).items()}
    assert "-DGGML_METAL=on" in metal_env["CMAKE_ARGS"]
    # the wheel is built and installed with no extras before the smoke tests run
    cpu = _runs(jobs["cpu"])
    assert "pip wheel --no-deps" in cpu and "pip install dist/pymem-*.whl" in cpu


@pytest.mark.parametrize("where", ["workflow", ".ci/wheel"])
def test_named_test_files_exist(where: str) -> None:
    text = (
        "\n".join(_runs(job) for job in _jobs().values())
        if where == "workflow"
        else (ROOT / ".ci" / "wheel").read_text(encoding="utf-8")
    )
    named = set(re.findall(r"tests/test_\w+\.py", text))
    assert named, where
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{where} runs test files that do not exist: {missing}"
