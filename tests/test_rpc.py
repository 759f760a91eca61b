"""Per-layer placement on ggml's RPC backend gives the same bytes as one device.

tests/rpc_worker.py runs in a fresh interpreter bound (PYMEM_GGML_LIB_DIR) to the ggml
that ``.ci/ggml_rpc build-rpc`` builds with GGML_RPC=ON (one ggml per process: this
process's ggml has no RPC backend). It starts two rpc-servers on 127.0.0.1, places
tiny-jamba's K/V and R/S layers on them and on the CPU, and checks every tensor and state
blob against the CPU-only memory; then decodes with the GGUF engine and the
memory on one server and compares logits and state with the CPU's; then replays the
recorded tiny-jamba, llama, lfm2 and gemma2 runs with their layers split over the CPU and
one or two servers (ggml's backend scheduler, :class:`pymem.ggml.MultiDeviceRunner`) and
compares every decode's logits and every state blob with the CPU-only replay; then kills
a server under a split memory and expects a DeviceError. Skipped only when build-rpc/ is absent outside CI; in
CI (``$CI`` set) a missing build fails. The scheduler over the CPU alone is checked in
this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pymem
import pymem.ggml as gg
from pymem import rpc_link
from pymem.backend import TensorSpec, TensorStore
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
        timeout=240,
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
    # the GGUF engine's weights and the whole memory on one rpc-server (the one-device
    # runner, computing on the server) give the CPU's logits and state bytes exactly
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


@pytest.mark.parametrize("n_servers", [1, 2])
def test_split_decode_matches_cpu(n_servers: int) -> None:
    # recorded runs with their layers on the CPU and rpc-servers (jamba: 4 streams, flash
    # attention, seq ops, state restores, K/V and R/S layers each split; llama without
    # flash attention: K-shift of RoPE'd K on a server, transposed V; lfm2: rollback
    # planes; gemma2: the iSWA pair): the scheduler splits each graph, the servers run
    # ggml's CPU kernels with one thread, so every decode's logits and every state blob
    # equal the CPU-only replay's bit for bit; with two servers also with the weights on one
    _build_or_skip()
    out = _run_worker(f"split{n_servers}")
    rpc = [f"RPC{i}" for i in range(n_servers)]
    runs = out["runs"]
    names = ["jamba.main.fa1.u0", "llama.main.fa0.u1", "lfm2.rollback.fa1.u1", "gemma2.main.fa0.u1"]
    assert list(runs) == names + ([f"jamba.main.fa1.u0@{rpc[0]}"] if n_servers > 1 else [])
    for name, got in runs.items():
        used = sorted(set(got["placement"].values()) | {got["weights"]})
        # weights and memory on the CPU alone took the one-device runner: no scheduler
        # but the split's (weights on a server: the CPU-only memory needs one too)
        assert "+".join(used) in got["runners"], (name, got)
        assert len(got["runners"]) == (1 if got["weights"] == "CPU" else 2), (name, got)
        assert min(got["n_splits"]) > 1, (name, got)
        assert got["decodes"] >= 12 and got["logits_identical"] == got["decodes"], (name, got)
        assert got["logits_max_rel"] == 0.0, (name, got)
        assert got["blobs"] > 100 and got["blobs_differing"] == [], (name, got)
    jamba = runs["jamba.main.fa1.u0"]
    assert jamba["runners"] == {"+".join(sorted(["CPU", *rpc])): [*rpc, "CPU"]}
    if n_servers > 1:
        assert "RPC1" in out["foreign_error"], out


def test_gone_server_raises_device_error() -> None:
    # ggml aborts the process on a lost rpc-server; pymem checks this process's connection
    # first and raises a typed error instead: the split runner's next graph, state writes,
    # restores (whole and one sequence; the sequence removed before stays removed: a
    # restore that fails changes nothing) and a clear with data. Closing the memory and
    # the model leaves the server's buffers unfreed and the worker exits normally
    # (_run_worker asserts return code 0; ggml's abort would be SIGABRT)
    _build_or_skip()
    out = _run_worker("gone")
    assert out["device"] == "RPC0"
    assert set(out["errors"]) == {"forward", "state_write", "state_read", "state_seq_read", "clear"}
    for name, error in out["errors"].items():
        assert error and "RPC0" in error and "is gone" in error, (name, out)
    assert out["removed"] == [-1, -1] and out["restore_kept"] == [-1, -1], out
    assert out["clear_kept"] == 3, out  # seq 1 (a copy of seq 0's 4 tokens) still there


def test_tiny_model_over_a_split_memory_matches_cpu() -> None:
    # the tiny runtime model (runtime/graph.py) with every other layer's K/V or R/S on a
    # server takes ggml's scheduler for its graphs (DeviceRunners) and decodes, removes
    # and decodes again with the CPU-only memory's logits and state bytes exactly
    _build_or_skip()
    out = _run_worker("tiny")
    assert set(out["types"]) == {"kv", "recurrent", "hybrid"}
    for memory_type, got in out["types"].items():
        assert got["decodes"] == 3 and got["logits_identical"] == 3, (memory_type, got)
        assert got["state_identical"], (memory_type, got)
        assert got["runners_cpu"] == [] and got["runners_split"] == ["CPU+RPC0"], got
    # a one-device runner refuses a graph that writes a server's tensor (computing it on
    # the CPU would write through the server's addresses); the tensor is left as it was
    assert out["one_device_error"] and "RPC0" in out["one_device_error"], out
    assert out["server_tensor_untouched"], out


def test_scheduler_on_the_cpu_matches_the_graph_runner() -> None:
    # MultiDeviceRunner over the CPU alone: one split, and the same bytes as GraphRunner
    # for a graph that reads a store tensor as a weight and writes rows of another
    rng = np.random.default_rng(0)
    w_val = rng.standard_normal((4, 8)).astype(np.float32)
    x_val = rng.standard_normal((3, 8)).astype(np.float32)
    results = []
    specs = [TensorSpec("w", "f32", (8, 4)), TensorSpec("k", "f16", (4, 16))]
    for runner in (gg.GraphRunner("CPU", n_threads=1), gg.MultiDeviceRunner(["CPU"], 1)):
        with TensorStore("CPU", specs) as store, gg.Context() as ctx:
            store["w"].write_bytes(w_val)
            x = ctx.new_tensor("f32", (8, 3), input=True)
            idx = ctx.new_tensor("i64", (3,), input=True)
            y = ctx.mul_mat(store["w"].ptr, x)
            stored = ctx.set_rows(store["k"].ptr, y, idx)
            gf = ctx.graph([y, stored])
            assert gg.graph_devices(gf) == [pymem.get_device("CPU")]
            (got,) = runner.compute(gf, {x: x_val, idx: np.array([5, 0, 9])}, [y])
            results.append((got.copy(), bytes(store["k"].read_bytes())))
        runner.close()
    assert runner.n_splits == 1 and runner.names == ["CPU"]
    np.testing.assert_allclose(results[0][0].reshape(3, 4), x_val @ w_val.T, rtol=1e-5)
    assert results[0][0].tobytes() == results[1][0].tobytes()
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("use_proc", [True, False], ids=["proc-tcp-info", "dev-fd-peek"])
def test_server_link_sees_a_closed_connection(use_proc: bool) -> None:
    # the gone-server check without an rpc-server: a listening socket stands in for one;
    # "none" before this process connects, "up" while connected, "down" once the peer
    # closed. Linux reads /proc and TCP_INFO; macOS and the BSDs list /dev/fd and peek
    # (that path runs here too, on Linux's /dev/fd)
    if use_proc and not os.path.exists("/proc/net/tcp"):
        pytest.skip("reads Linux's /proc")
    if not use_proc and not os.path.isdir("/dev/fd"):
        pytest.skip("lists /dev/fd")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        link = rpc_link.ServerLink("127.0.0.1", port, use_proc=use_proc)
        assert link.status() == "none"
        link.check("RPC9")  # no connection yet, but the server accepts one
        server.accept()[0].close()  # (the check's probe)
        with socket.create_connection(server.getsockname()) as client:
            peer, _ = server.accept()
            assert link.status() == "up" and link.fd == client.fileno()
            peer.sendall(b"x")  # a reply waiting to be read: still up, and left unread
            time.sleep(0.05)
            assert link.status() == "up" and client.recv(1) == b"x"
            peer.close()
            deadline = time.monotonic() + 5
            while link.status() == "up" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert link.status() == "down" and link.is_down()
            with pytest.raises(DeviceError, match="closed this process's connection"):
                link.check("RPC9")
    # no connection and nothing listening: gone too
    with pytest.raises(DeviceError, match=r"RPC9.*is gone"):
        rpc_link.ServerLink("127.0.0.1", port, use_proc=use_proc).check("RPC9")
        assert link.status() == "none"
