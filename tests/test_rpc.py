"""Per-layer placement on ggml's RPC backend gives the same bytes as one device.

tests/rpc_worker.py runs in a fresh interpreter bound (PYMEM_GGML_LIB_DIR) to the ggml
that ``.ci/ggml_rpc build-rpc`` builds with GGML_RPC=ON (one ggml per process: this
process's ggml has no RPC backend). It starts two rpc-servers on 127.0.0.1, places
tiny-jamba's K/V and R/S layers on them and on the CPU, and checks every tensor and state
blob against the CPU-only memory; then decodes with the GGUF engine and the
memory on one server and compares logits and state with the CPU's. Skipped only when build-rpc/ is absent outside CI; in
CI (``$CI`` set) a missing build fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pymem
from pymem.errors import DeviceError

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build-rpc"
SERVER = BUILD / "bin" / "rpc-server"
WORKER = Path(__file__).parent / "rpc_worker.py"


def _build_or_skip() -> None:
    if SERVER.exists() and (BUILD / "lib" / "libggml-rpc.so").exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{BUILD}: no RPC ggml build; CI runs .ci/ggml_rpc build-rpc first")
    pytest.skip(f"no ggml built with GGML_RPC at {BUILD} (run: bash .ci/ggml_rpc build-rpc)")


def _run_worker(n_servers: int | str) -> dict:
    env = dict(os.environ, PYMEM_GGML_LIB_DIR=str(BUILD / "lib"))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(SERVER), str(n_servers)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n_servers", [1, 2])
def test_split_placement_matches_cpu(n_servers: int) -> None:
    _build_or_skip()
    out = _run_worker(n_servers)
    rpc = [f"RPC{i}" for i in range(n_servers)]
    assert sorted(out["devices"]) == rpc
    # jamba: layers 0, 2 hold R/S and 1, 3 hold K/V; placed round robin over CPU + servers
    assert set(out["breakdown"]) == {"CPU", *rpc}
    assert all(n > 0 for n in out["breakdown"].values())
    assert list(out["breakdown_cpu"]) == ["CPU"]


def test_decode_on_an_rpc_device_matches_cpu() -> None:
    # pymem's graph runners compute on one device: the GGUF engine's weights and the whole
    # memory on one rpc-server give the CPU's logits and state bytes exactly
    _build_or_skip()
    out = _run_worker("engine")
    assert out["device"] == "RPC0" and out["rows"] == 2
    assert out["identical"] and out["state_identical"], out


def test_rpc_on_a_ggml_without_it() -> None:
    # this process's ggml (llama-cpp-python's or libggml-python's) has no RPC backend
    if "RPC" in pymem.ggml_info().backends:
        pytest.skip("the bound ggml has an RPC backend")
    with pytest.raises(DeviceError, match="no RPC backend"):
        pymem.add_rpc_device("127.0.0.1:50052")
    with pytest.raises(DeviceError, match="endpoint"):
        pymem.add_rpc_device("localhost")
