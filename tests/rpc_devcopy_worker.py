"""Run by tests/test_checkpoint_devcopy.py in a fresh interpreter bound to a ggml built
with GGML_RPC: the device-copy path on buffers that are not host memory.

Usage: python tests/rpc_devcopy_worker.py RPC_SERVER_BINARY

Starts one ``rpc-server`` on 127.0.0.1 (tests/rpc_worker.py's helpers) and checks, on its
device (RPC0):

* ``Tensor.copy_runs_from`` (``pm_tensor_copy_runs``) between two RPC tensors (the
  backend-copy branch: I8 tensors placed in both buffers, ``ggml_backend_tensor_copy``,
  a copy on the server), RPC -> CPU, CPU -> RPC and within one RPC buffer, each against a
  numpy reference of the same run set;
* checkpoint restores of memories held on RPC0: a device checkpoint (payloads copied
  buffer to buffer on the server) against a host checkpoint restored into a twin
  memory, every tensor and the state compared; host reads of any tensor counted during
  the device restore (sequence 0 decoded in one run, in runs of 4 and in single cells
  between sequence 1's);
* ``kv.state_rows.write_payloads`` of DevicePayloads against host bytes for transposed V
  into one run, runs of 4 cells and single cells (the "staged" method: its payload is read
  to the host, the one documented exception).

Prints one JSON line; exits non-zero on a mismatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from rpc_worker import start_server, stop

MODELS = Path(__file__).parent / "data" / "models"
# the cases of test_checkpoint_devcopy.CASES run here (one of each memory type, both V layouts)
RPC_CASES = ("llama-vtrans", "llama-vrows", "mamba", "jamba-hybrid", "lfm2-swa-hybrid-iswa")


def copy_runs_cases(dev: str) -> dict[str, bool]:
    from pymem.backend import TensorSpec, TensorStore

    rng = np.random.default_rng(3)
    out: dict[str, bool] = {}
    stores = {
        d: TensorStore(d, [TensorSpec("src", "i8", (4096,)), TensorSpec("dst", "f16", (64, 32))])
        for d in (dev, "CPU")
    }
    try:
        pairs = {"rpc->rpc": (dev, dev), "rpc->cpu": (dev, "CPU"), "cpu->rpc": ("CPU", dev)}
        for name, (a, b) in pairs.items():
            src, dst = stores[a]["src"], stores[b]["dst"]
            src_bytes = rng.integers(0, 256, src.nbytes, dtype=np.uint8)
            dst_bytes = rng.integers(0, 256, dst.nbytes, dtype=np.uint8)
            src.write_bytes(src_bytes)
            dst.write_bytes(dst_bytes)
            starts = np.array([2, 40, 90], dtype=np.uint64)
            sizes = np.array([6, 30, 2], dtype=np.uint64)
            n_rep, stride, off, src_off = 9, 130, 4, 17
            dst.copy_runs_from(src, src_off, off, n_rep, stride, starts, sizes)
            want = dst_bytes.copy()
            at = src_off
            for r in range(n_rep):
                for s, n in zip(starts.tolist(), sizes.tolist()):
                    d = off + r * stride + s
                    want[d : d + n] = src_bytes[at : at + n]
                    at += n
            out[name] = dst.read_bytes() == want.tobytes()
        # one buffer: the source's bytes to a place beside them
        src = stores[dev]["src"]
        before = np.frombuffer(src.read_bytes(), dtype=np.uint8).copy()
        src.copy_runs_from(src, 0, 2048, 1, 0, np.array([0], np.uint64), np.array([512], np.uint64))
        want = before.copy()
        want[2048:2560] = before[:512]
        out["rpc same buffer"] = src.read_bytes() == want.tobytes()
    finally:
        for s in stores.values():
            s.close()
    return out


def restore_cases(dev: str) -> dict[str, dict[str, Any]]:
    # the CPU tests' helpers (memories, fills, host-read counting), here on ``dev``
    from test_checkpoint_devcopy import _fill, _HostReads, _memory, _scramble, _snapshot

    from pymem.reuse import checkpoint, restore_checkpoint

    results: dict[str, dict[str, Any]] = {}
    for case in RPC_CASES:
        for run in (24, 4, 1):
            with _memory(case, device=dev) as a, _memory(case, device=dev) as b:
                for mem in (a, b):
                    # sequence 0's cells in runs of `run` cells between sequence 1's
                    for p in range(0, 24, run):
                        _fill(mem, 0, p, p + run)
                        if run < 24:
                            _fill(mem, 1, p, p + run)
                    _scramble(mem, 1)
                dev_ck = checkpoint(a, 0)
                host_ck = checkpoint(b, 0, where="host")
                for mem in (a, b):
                    _fill(mem, 0, 24, 40)
                    _scramble(mem, 2)
                with _HostReads() as reads:
                    restore_checkpoint(a, 0, dev_ck)
                restore_checkpoint(b, 0, host_ck)
                results[f"{case}-runs{run}"] = dict(
                    device=dev_ck.device,
                    split=dev_ck._split is not None,
                    identical=_snapshot(a) == _snapshot(b),
                    host_reads=len(reads.calls),
                )
                dev_ck.close()
                host_ck.close()
    return results


def payload_writer_cases(dev: str) -> dict[str, bool]:
    """``write_payloads`` of a DevicePayload against host bytes, for every transposed-V
    method on a device: one run, runs of 4 cells ("ranges") and single cells
    ("staged")."""
    import pymem
    from pymem.backend import TensorSpec, TensorStore
    from pymem.factory import ContextParams, create_memory
    from pymem.kv import KVCache
    from pymem.kv.state_rows import write_payloads
    from pymem.state import DevicePayload

    out: dict[str, bool] = {}
    spec = pymem.spec_from_gguf(MODELS / "tiny-llama.gguf")
    params = ContextParams(n_ctx=128, n_seq_max=1, flash_attn=False, device=dev)
    a, b = create_memory(spec, params), create_memory(spec, params)
    assert isinstance(a, KVCache) and isinstance(b, KVCache) and a.layout.v_trans
    rng = np.random.default_rng(7)
    try:
        for name, idx in (("one run", np.arange(10, 30)), ("runs of 4", np.arange(40) // 4 * 8
                          + np.arange(40) % 4), ("single cells", np.arange(0, 80, 3))):  # fmt: skip
            idx = np.asarray(idx, dtype=np.int64)
            layers_a, layers_b = a.layers, b.layers
            payloads_a, payloads_b, stores = [], [], []
            for la, lb in zip(layers_a, layers_b):
                for kind in ("k", "v"):
                    t = la.k if kind == "k" else la.v
                    assert t is not None
                    n = idx.size * (t.row_size if kind == "k" else la.n_embd_v_gqa * 2)
                    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                    store = TensorStore(dev, [TensorSpec("blob", "i8", (n + 64,))])
                    store["blob"].write_bytes(data, 64)
                    stores.append(store)
                    payloads_a.append((la, kind, DevicePayload(store["blob"], 64, n)))
                    payloads_b.append((lb, kind, memoryview(data)))
            write_payloads(a.layout, 0, idx, payloads_a)
            write_payloads(b.layout, 0, idx, payloads_b)
            same = all(
                ta.read_bytes() == tb.read_bytes()
                for la, lb in zip(layers_a, layers_b)
                for ta, tb in ((la.k, lb.k), (la.v, lb.v))
                if ta is not None and tb is not None
            )
            out[name] = same
            for st in stores:
                st.close()
    finally:
        a.close()
        b.close()
    return out


def main() -> None:
    proc, endpoint = start_server(sys.argv[1])
    try:
        import pymem

        dev = pymem.add_rpc_device(endpoint).name
        out = dict(
            device=dev,
            copy_runs=copy_runs_cases(dev),
            payload_writer=payload_writer_cases(dev),
            restores=restore_cases(dev),
        )
        print(json.dumps(out))
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
